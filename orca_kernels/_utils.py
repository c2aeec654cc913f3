"""Small helpers shared by the ops: backend resolution, output allocation, autocast, the table
cache. Argument checks live in `orca_kernels.validation`."""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import warnings
from collections.abc import Callable

import torch

# Tests set this so that every output buffer an op allocates starts as NaN: an element a kernel
# forgets to write then fails the comparison. The C++ glue reads the same variable.
POISON_ENV = "ORCA_KERNELS_POISON_OUTPUTS"


def triton_interpret() -> bool:
    """Whether Triton kernels run on the CPU through the interpreter (how CPU CI tests them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# triton.jit chooses the interpreter or the GPU compiler when a kernel module is imported, which
# happens with `import orca_kernels`, right after this module.
KERNELS_INTERPRETED = triton_interpret()


def kernels_available(device: torch.device | str) -> bool:
    """Whether the fused Triton kernels run for tensors on `device`: CUDA devices (when a GPU is
    present), and the CPU when TRITON_INTERPRET=1 was set before importing orca_kernels. Raises
    when TRITON_INTERPRET=1 was set only after the import (the kernels were compiled for a GPU)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return False
    return _kernels_run_on("kernels_available", device)


def _kernels_run_on(op: str, device: torch.device) -> bool:
    if device.type == "cpu" and triton_interpret() and not KERNELS_INTERPRETED:
        raise RuntimeError(
            f"{op}: TRITON_INTERPRET=1 was set after orca_kernels was imported, so its Triton kernels were "
            "compiled for the GPU; set it before the import to run them on CPU tensors"
        )
    return device.type == "cuda" or (device.type == "cpu" and KERNELS_INTERPRETED)


def use_triton(op: str, tensor: torch.Tensor, backend: str) -> bool:
    """Resolve `backend` ("auto" | "triton" | "torch") for a Triton op: auto runs Triton on CUDA
    tensors, and on CPU tensors when the kernels were imported under TRITON_INTERPRET=1 (else the
    reference); an explicit "triton" that cannot run raises instead of falling back."""
    if backend == "torch":
        return False
    runnable = _kernels_run_on(op, tensor.device)
    if backend == "triton" and not runnable:
        raise RuntimeError(
            f"{op}: backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            f"importing orca_kernels (got {tensor.device})"
        )
    return runnable


def autocast_enabled(device_type: str) -> bool:
    """Whether an autocast region is active for `device_type` (never for "meta": shape inference
    has no autocast)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def autocast_lower_precision(*tensors: torch.Tensor | None, device_type: str) -> tuple:
    """The tensors as torch's autocast casts the inputs of an op on its lower-precision list
    (conv1d, linear, matmul/bmm/einsum): inside an autocast region for `device_type`, every floating
    tensor on that device type other than fp64 goes to the autocast dtype; outside one (or for
    None, non-floating, fp64 or other-device tensors) nothing changes. For fused ops that take one
    dtype and replace such an op, so that they follow autocast instead of refusing mixed dtypes."""
    # Autocast exists for cpu, cuda and a few accelerators; "meta" (shape inference) has none.
    if not autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if _autocast_eligible(t, device_type) else t for t in tensors)


def _autocast_eligible(t, device_type: str) -> bool:
    """Autocast's own test (at::autocast::is_eligible): a floating, non-fp64 tensor on its device type."""
    return (
        isinstance(t, torch.Tensor)
        and t.is_floating_point()
        and t.dtype != torch.float64
        and t.device.type == device_type
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


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability launch settings are chosen for ((0, 0) off CUDA, where the
    interpreter ignores them)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def refuse_double_backward(backward_op, public: str, alternative: str) -> None:
    """Give the custom op that computes a backward an autograd formula that raises: its kernels
    have no derivative of their own, so differentiating its result again is refused with an error
    naming the public op and the way out (torch's default error names only the *_backward op; a _C
    op without a formula would even warn and give wrong numbers). A first backward with
    create_graph=True still runs."""
    message = f"orca_kernels.{public}: double backward (create_graph=True) is not supported; use {alternative}"

    def backward(ctx, *grads):
        raise RuntimeError(message)

    backward_op.register_autograd(backward)


def device_context(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def new_output(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised output buffer (NaN-filled when ORCA_KERNELS_POISON_OUTPUTS=1)."""
    if os.environ.get(POISON_ENV, "0") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


class TableCache:
    """A bounded, thread-safe cache of small tensors derived from their key alone (RoPE tables,
    sample indices), shared by every layer and request.

    - Bounded: least recently used entries go beyond `max_entries` (a server sees many lengths).
    - Thread-safe: one lock around lookups and inserts; a racing miss may compute an entry twice,
      never store a half-built one.
    - CUDA-graph aware: a hit during capture returns the cached tensor (allocated before the
      capture, so replays read it); a miss during capture computes a tensor that lives in the
      graph's memory pool and is not kept, so nothing outside the graph ever holds it.
    """

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, device: torch.device, build: Callable[[], object]):
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = build()
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return value
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
