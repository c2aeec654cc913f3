"""Small helpers shared by the ops: backend names, input checks, output allocation."""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Tests set this so that every output buffer an op allocates starts as NaN: an element a kernel
# forgets to write then fails the comparison. The C++ glue reads the same variable.
POISON_ENV = "ORCA_KERNELS_POISON_OUTPUTS"


def triton_interpret() -> bool:
    """Whether Triton kernels run on the CPU through the interpreter (how CPU CI tests them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# triton.jit chooses the interpreter or the GPU compiler when a kernel module is imported, which
# happens with `import orca_kernels`, right after this module.
KERNELS_INTERPRETED = triton_interpret()


def use_triton(op: str, tensor: torch.Tensor, backend: str) -> bool:
    """Resolve `backend` ("auto" | "triton" | "torch") for a Triton op: auto runs Triton on CUDA
    tensors, and on CPU tensors when the kernels were imported under TRITON_INTERPRET=1 (else the
    reference); an explicit "triton" that cannot run raises instead of falling back."""
    if backend == "torch":
        return False
    if tensor.device.type == "cpu" and triton_interpret() and not KERNELS_INTERPRETED:
        raise RuntimeError(
            f"{op}: TRITON_INTERPRET=1 was set after orca_kernels was imported, so its Triton kernels were "
            "compiled for the GPU; set it before the import to run them on CPU tensors"
        )
    runnable = tensor.device.type == "cuda" or (tensor.device.type == "cpu" and KERNELS_INTERPRETED)
    if backend == "triton" and not runnable:
        raise RuntimeError(
            f"{op}: backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            f"importing orca_kernels (got {tensor.device})"
        )
    return runnable


def autocast_lower_precision(*tensors: torch.Tensor | None, device_type: str) -> tuple:
    """The tensors as torch's autocast casts the inputs of an op on its lower-precision list
    (conv1d, linear, matmul/bmm/einsum): inside an autocast region for `device_type`, every floating
    tensor on that device type other than fp64 goes to the autocast dtype; outside one (or for
    None, non-floating, fp64 or other-device tensors) nothing changes. For fused ops that take one
    dtype and replace such an op, so that they follow autocast instead of refusing mixed dtypes."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if _autocast_eligible(t, device_type) else t for t in tensors)


def _autocast_eligible(t, device_type: str) -> bool:
    """Autocast's own test (at::autocast::is_eligible): a floating, non-fp64 tensor on its device type."""
    return (
        isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.device.type == device_type
    )


def autocast_fp32_normalisations(device_type: str) -> bool:
    """Whether an autocast region is active on `device_type` whose fp32 list holds layer_norm,
    norm and pow, so that a bf16/fp16 input gives an fp32 result: CUDA's does; the CPU's does not
    (there a bf16 LayerNorm or normalisation stays bf16). Fused ops use it to give the reference's
    dtypes under autocast (docs/reference-behaviour.md#autocast-dtype-regimes)."""
    return device_type == "cuda" and torch.is_autocast_enabled(device_type)


def persistent_programs(device: torch.device) -> int:
    """Programs of a kernel whose programs loop over rows (gradient partial sums): 4 per SM fill a
    GPU; under the interpreter, whose cost is per program, 4 in all."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def device_context(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def new_output(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised output buffer (NaN-filled when ORCA_KERNELS_POISON_OUTPUTS=1)."""
    if os.environ.get(POISON_ENV, "0") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def check_backend(op: str, backend: str, allowed: tuple[str, ...]) -> None:
    if backend not in allowed:
        raise ValueError(f"{op}: backend must be one of {', '.join(map(repr, allowed))}, got {backend!r}")


def check_tensor(op: str, name: str, value, ndim: int, *, like: torch.Tensor | None = None) -> None:
    """A floating tensor of rank `ndim`, with the dtype and device of `like` when given."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if value.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: {name} has dtype {value.dtype}; supported: float16, bfloat16, float32, float64")
    if like is not None and value.dtype != like.dtype:
        raise ValueError(f"{op}: {name} has dtype {value.dtype} but expected {like.dtype}")
    if like is not None and value.device != like.device:
        raise ValueError(f"{op}: {name} is on {value.device} but expected {like.device}")


def check_int(op: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
