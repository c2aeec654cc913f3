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


def _patch_interpreter_index() -> None:
    """triton < 3.8's interpreter turns a scalar (a shape-(1,) array) into an int by int(array),
    which NumPy >= 2.4 refuses, so any `range(0, n, BLOCK)` over a kernel argument fails. Do what
    3.8 does (triton-lang/triton#9172): squeeze first. Kernel code and GPU builds are untouched."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_orca_squeezes", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._orca_squeezes = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if KERNELS_INTERPRETED and tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 8):
    _patch_interpreter_index()


def kernel_dtypes(dtype: torch.dtype) -> tuple:
    """(dot operand dtype, accumulator dtype) of the kernels for inputs of `dtype`."""
    accumulator = tl.float64 if dtype == torch.float64 else tl.float32
    operand = tl.float32 if (dtype == torch.bfloat16 and KERNELS_INTERPRETED) else TL_DTYPES[dtype]
    return operand, accumulator


def round_bf16_on_store(dtype: torch.dtype) -> bool:
    """Whether `cast_for_store` must round fp32 -> bf16 by hand (the interpreter truncates)."""
    return dtype == torch.bfloat16 and KERNELS_INTERPRETED


def row_warps(block: int) -> int:
    """Warps of a program that holds a row of `block` elements (a power of two) in registers, in
    the fp32 accumulator: 4 up to 1024 elements, then one more warp per 256 (8 at 2048, 16 at
    4096 and beyond), so that a thread holds at most ~8 elements of each live row vector. The
    compile audit (benchmarks/compile_audit.py) checks the result has no register spills."""
    return max(4, min(16, block // 256))


def register_cap(num_warps: int, blocks_per_sm: int) -> int:
    """`maxnreg` for a kernel meant to keep `blocks_per_sm` blocks of `num_warps` warps resident:
    left without a cap, ptxas sometimes aims at a higher occupancy and spills registers to get
    there (the compile audit found 8-160 byte spills that a cap removes)."""
    return min(255, 65536 // (32 * num_warps * blocks_per_sm))


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
