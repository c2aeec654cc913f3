"""Pieces shared by the Triton kernels: operand dtypes and the interpreter's bf16 workarounds.

triton 3.8's interpreter (how CPU CI runs the kernels) gets `tl.dot` on bf16 operands wrong and
truncates fp32 -> bf16 casts instead of rounding them; a GPU does both right. Under the
interpreter bf16 dot operands are therefore upcast to fp32 and bf16 stores rounded by hand.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from orca_kernels._utils import KERNELS_INTERPRETED

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def kernel_dtypes(dtype: torch.dtype) -> tuple:
    """(dot operand dtype, accumulator dtype) of the kernels for inputs of `dtype`."""
    accumulator = tl.float64 if dtype == torch.float64 else tl.float32
    operand = tl.float32 if (dtype == torch.bfloat16 and KERNELS_INTERPRETED) else TL_DTYPES[dtype]
    return operand, accumulator


def round_bf16_on_store(dtype: torch.dtype) -> bool:
    """Whether `cast_for_store` must round fp32 -> bf16 by hand (the interpreter truncates)."""
    return dtype == torch.bfloat16 and KERNELS_INTERPRETED


@triton.jit
def round_bf16_bits(x):
    """fp32 `x` rounded to the nearest bf16 (ties to even) on the bits, kept in fp32 (where it is
    exact, so a later cast to bf16 cannot change it, truncating or not)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def cast_for_store(x, ptr, ROUND_BF16: tl.constexpr):
    """`x` in `ptr`'s element type; ROUND_BF16: fp32 -> bf16 rounded to nearest even on the bits."""
    if ROUND_BF16:
        x = round_bf16_bits(x)
    return x.to(ptr.dtype.element_ty)
