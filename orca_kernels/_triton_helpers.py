"""The kernels' one dtype policy and one interpreter policy, and their launch-setting rules.

- Dtypes: fp16/bf16/fp32 inputs accumulate in fp32, fp64 in fp64 (`accumulator_dtype`); dots take
  the input dtype (`kernel_dtypes`).
- The interpreter: triton 3.8's interpreter (how CPU CI runs the kernels) gets `tl.dot` on bf16
  operands wrong and truncates fp32 -> bf16 casts instead of rounding them; a GPU does both right.
  Under the interpreter bf16 dot operands are upcast to fp32 (`kernel_dtypes`), and every store
  and every rounding to the data's dtype goes through `cast_for_store` / `round_like`, which
  round by hand when the target is bf16 (decided at compile time from the pointer's or value's
  element type, so kernels carry no flag for it). See docs/architecture.md#interpreter-workarounds.
- Launch settings: `row_warps` and `register_cap`, checked by benchmarks/compile_audit.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from orca_kernels._utils import KERNELS_INTERPRETED

TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


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


# Kernels read it as a compile-time constant: the rounding below vanishes from GPU builds.
INTERPRETED = tl.constexpr(KERNELS_INTERPRETED)


def accumulator_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """What the kernels accumulate in for inputs of these dtypes: fp64 if any is fp64, else fp32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def kernel_dtypes(dtype: torch.dtype) -> tuple:
    """(dot operand dtype, accumulator dtype) of the kernels for inputs of `dtype`, as tl dtypes."""
    operand = tl.float32 if (dtype == torch.bfloat16 and KERNELS_INTERPRETED) else TL_DTYPES[dtype]
    return operand, TL_DTYPES[accumulator_dtype(dtype)]


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
def round_like(x, like):
    """fp32/fp64 `x` rounded to `like`'s dtype and kept in x's dtype (every op of a sequence that
    the reference runs in the data's dtype rounds there); by hand for bf16 under the interpreter."""
    if INTERPRETED and like.dtype == tl.bfloat16 and x.dtype == tl.float32:
        y = round_bf16_bits(x)
    else:
        y = x.to(like.dtype).to(x.dtype)
    return y


@triton.jit
def cast_for_store(x, ptr):
    """`x` in `ptr`'s element type, rounded to nearest even (by hand for fp32 -> bf16 under the
    interpreter, whose cast truncates)."""
    if INTERPRETED and ptr.dtype.element_ty == tl.bfloat16 and x.dtype == tl.float32:
        x = round_bf16_bits(x)
    return x.to(ptr.dtype.element_ty)
