"""Loading of the compiled extension `orca_kernels._C`.

Importing orca_kernels never fails because `_C` is missing or was built against another torch:
the reason is reported once, as a warning, and the ops that need `_C` raise a clear error when
asked for explicitly (`backend="extension"` / `"cuda"`).
"""

from __future__ import annotations

import warnings

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the orca-kernels checkout "
    "(a CUDA build needs nvcc and a CUDA build of torch; see README.md)"
)

try:
    from orca_kernels import _C  # noqa: F401  (loading registers torch.ops.orca_kernels.*)

    LOAD_ERROR: str | None = None
    WITH_CUDA = bool(_C.WITH_CUDA)
except (ImportError, OSError, RuntimeError) as error:  # missing, or built against another torch
    LOAD_ERROR = f"{type(error).__name__}: {error}"
    WITH_CUDA = False
    warnings.warn(
        f"orca_kernels: the compiled extension orca_kernels._C is unavailable ({LOAD_ERROR}); "
        f"strided_conv1d falls back to the PyTorch reference under backend='auto'. To use it, {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )

LOADED = LOAD_ERROR is None


def supports(device: torch.device) -> bool:
    """Whether `_C` has kernels for tensors on `device`."""
    return LOADED and (device.type == "cpu" or (device.type == "cuda" and WITH_CUDA))


def require(device: torch.device, op: str) -> None:
    """Raise a RuntimeError that says how to build `_C` when it cannot run `op` on `device`."""
    if not LOADED:
        raise RuntimeError(f"{op}: orca_kernels._C is not available ({LOAD_ERROR}); {BUILD_HINT}")
    if not supports(device):
        raise RuntimeError(
            f"{op}: orca_kernels._C has no kernels for {device.type} tensors "
            f"(built {'with' if WITH_CUDA else 'without'} CUDA); {BUILD_HINT}"
        )
