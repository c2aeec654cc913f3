"""The one tolerance table of the test suite, and the comparisons that use it.

fp64 and fp32 results are compared with the fp64 truth by relative max error (max |a - b| over
max |b|). A fp16/bf16 result may be at most LOW_PRECISION_FACTOR times further from the fp64
truth than the same-dtype PyTorch reference is (DESIGN.md).
"""

from __future__ import annotations

import torch

RELATIVE_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
}
LOW_PRECISION_FACTOR = 2.0
# Whole modules (attention + LayerNorm + gate + residual, the bounds): the LayerNorm
# divides by a per-row deviation, which amplifies the attention's rounding.
MODULE_RELATIVE_TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 5e-5,
}


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    scale = expected.double().abs().max().item()
    return max_error(actual, expected) / (scale if scale > 0 else 1.0)


def assert_matches_truth(
    actual: torch.Tensor,
    truth: torch.Tensor,
    *,
    same_dtype_reference: torch.Tensor | None = None,
    name: str = "output",
    tolerances: dict = RELATIVE_TOLERANCE,
) -> None:
    """`actual` against the fp64 `truth`: within `tolerances` (RELATIVE_TOLERANCE, or
    MODULE_RELATIVE_TOLERANCE for whole modules) for fp64/fp32; for fp16/bf16 within
    LOW_PRECISION_FACTOR x the error of `same_dtype_reference` (required then)."""
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: contains NaN (an unwritten output element?)"
    if actual.dtype in tolerances:
        error = relative_error(actual, truth)
        assert error <= tolerances[actual.dtype], f"{name}: relative error {error:.3e} ({actual.dtype})"
        return
    assert same_dtype_reference is not None, f"{name}: a {actual.dtype} check needs the same-dtype reference"
    error, reference_error = max_error(actual, truth), max_error(same_dtype_reference, truth)
    assert error <= LOW_PRECISION_FACTOR * reference_error, (
        f"{name}: error {error:.3e} vs the {actual.dtype} reference's {reference_error:.3e} "
        f"(allowed {LOW_PRECISION_FACTOR}x)"
    )
