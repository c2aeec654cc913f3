"""Full-width audio RoPE (docs/ops.md#audio_rope) in one Triton pass.

`audio_rope(audio[B, T, H], position_scale, rope_theta)` rotates [x1, x2] (the halves of the
whole hidden vector, not per head) by the angle (t / scale)·θ^(−i / (H/2)):
[x1·c − x2·s, x1·s + x2·c]. As in the reference, cos and sin are computed in fp32, cast to the
audio's dtype, and every product and sum rounds in that dtype, so results are bit-identical to the
reference's op sequence. The backward is the inverse rotation (sin negated), the same kernel.
The fp32 table is built once per (length, width, scale, θ, device) and shared by every layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from orca_kernels import reference
from orca_kernels._triton_helpers import TL_DTYPES, accumulator_dtype, cast_for_store, round_like
from orca_kernels._utils import KERNELS_INTERPRETED, TableCache, device_context, new_output, use_triton
from orca_kernels.validation import check_backend, check_rope_arguments, check_tensor

OP = "audio_rope"
BACKENDS = ("auto", "triton", "torch")

# (length, width, scale, θ, device) -> fp32 cos, sin [length, width/2]; every layer shares them.
_tables = TableCache(max_entries=64)


def rope_half_tables(length: int, dim: int, position_scale: float, rope_theta: float, device: torch.device):
    """fp32 cos and sin [length, dim/2], cached: the reference rebuilds them in every layer."""

    def build():
        cos, sin = reference.rope_cos_sin(length, dim, position_scale, rope_theta, device)
        return cos[0, :, : dim // 2].contiguous(), sin[0, :, : dim // 2].contiguous()

    return _tables.get((length, dim, float(position_scale), float(rope_theta), device), device, build)


@triton.jit
def _audio_rope_fwd_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    ROWS,
    T,
    HALF,
    stride_xb,
    stride_xt,
    stride_xh,
    stride_ob,
    stride_ot,
    INVERSE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per tile of BLOCK_ROWS rows (b*T + t) x BLOCK columns of the first half.

    Every product and sum is rounded to the data's dtype, as the reference's separate ops are:
    computed in COMPUTE (fp32, fp64 for fp64 data; exact for products of two fp16/bf16 values)
    and cast back after each op, which also keeps the interpreter off bf16 arithmetic."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < ROWS)[:, None] & (cols < HALF)[None, :]
    b = (rows // T).to(tl.int64)[:, None]
    t = (rows % T).to(tl.int64)[:, None]
    x_tile = x_ptr + b * stride_xb + t * stride_xt + cols[None, :] * stride_xh
    data = tl.load(x_tile, mask=mask)  # in the data's dtype, which every rounding below is to
    x2 = tl.load(x_tile + HALF * stride_xh, mask=mask)
    # The fp32 table is cast to the data's dtype before multiplying, as the reference does.
    table = t * HALF + cols[None, :]
    c = round_like(tl.load(cos_ptr + table, mask=mask).to(COMPUTE), data)
    s = round_like(tl.load(sin_ptr + table, mask=mask).to(COMPUTE), data)
    if INVERSE:
        s = -s
    x1 = data.to(COMPUTE)
    x2 = x2.to(COMPUTE)
    first = round_like(x1 * c, data) - round_like(x2 * s, data)
    second = round_like(x1 * s, data) + round_like(x2 * c, data)
    out_tile = out_ptr + b * stride_ob + t * stride_ot + cols[None, :]
    tl.store(out_tile, cast_for_store(first, out_ptr), mask=mask)
    tl.store(out_tile + HALF, cast_for_store(second, out_ptr), mask=mask)


def _rotate(x: torch.Tensor, position_scale: float, rope_theta: float, inverse: bool) -> torch.Tensor:
    """Launch the kernel: x [B, T, H] rotated (by the opposite angle when `inverse`), contiguous."""
    batch, length, dim = x.shape
    out = new_output((batch, length, dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    cos, sin = rope_half_tables(length, dim, position_scale, rope_theta, x.device)
    half = dim // 2
    block = min(1024, triton.next_power_of_2(half))
    # Rows per program: a few on a GPU (one row is already a wide tile); many under the
    # interpreter, whose cost is per program.
    block_rows = 64 if KERNELS_INTERPRETED else max(1, 4096 // (4 * block))
    grid = (triton.cdiv(batch * length, block_rows), triton.cdiv(half, block))
    with device_context(x):
        _audio_rope_fwd_kernel[grid](
            x,
            cos,
            sin,
            out,
            batch * length,
            length,
            half,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            out.stride(0),
            out.stride(1),
            INVERSE=inverse,
            COMPUTE=TL_DTYPES[accumulator_dtype(x.dtype)],
            BLOCK_ROWS=block_rows,
            BLOCK=block,
            # No a*b - c*d -> fma contraction: the reference rounds every product (bitwise parity).
            enable_fp_fusion=False,
        )
    return out


@torch.library.custom_op("orca_kernels::audio_rope", mutates_args=())
def _rope_op(x: torch.Tensor, position_scale: float, rope_theta: float, inverse: bool) -> torch.Tensor:
    return _rotate(x, position_scale, rope_theta, inverse)


@_rope_op.register_fake
def _(x, position_scale, rope_theta, inverse):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _rope_setup(ctx, inputs, output):
    _, ctx.position_scale, ctx.rope_theta, ctx.inverse = inputs


def _rope_backward(ctx, grad):
    # A rotation's transpose is the rotation by the opposite angle.
    return _rope_op(grad, ctx.position_scale, ctx.rope_theta, not ctx.inverse), None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)


def audio_rope(
    audio: torch.Tensor, position_scale: float = 2.5, rope_theta: float = 10000.0, backend: str = "auto"
) -> torch.Tensor:
    """Full-width RoPE of audio [B, T, H] at positions t / position_scale -> [B, T, H] (H even).

    backend: "auto" (Triton on CUDA, or on the CPU under TRITON_INTERPRET=1; else the reference),
    "triton", or "torch" (orca_kernels.reference.audio_rope)."""
    check_backend(OP, backend, BACKENDS)
    check_tensor(OP, "audio", audio, 3)
    if audio.shape[-1] % 2:
        raise ValueError(f"{OP}: audio's width must be even for a rotate-half RoPE, got {audio.shape[-1]}")
    check_rope_arguments(OP, position_scale, rope_theta)
    if use_triton(OP, audio, backend):
        return _rope_op(audio, float(position_scale), float(rope_theta), False)
    return reference.audio_rope(audio, position_scale, rope_theta)
