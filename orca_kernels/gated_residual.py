"""LayerNorm of the attention output + data-dependent gate + residual, fused
(docs/ops.md#gated_residual): out = h + σ(GELU(u)·w₂ + b₂) ⊙ LN(o), per row, with u = h·W₁ᵀ + b₁
computed outside (a cuBLAS GEMM, H -> H/4).

One Triton program per row in the forward; the backward recomputes the LayerNorm statistics and
the gate from its inputs (nothing but the inputs is saved) and reduces the parameter gradients
through per-program partial sums that are added in a fixed order (deterministic, no atomics).
Everything is computed in fp32 (fp64 for fp64 inputs); inputs may have different dtypes, as they
do under autocast, and the output dtype is given explicitly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from orca_kernels import _utils
from orca_kernels._triton_helpers import TL_DTYPES, accumulator_dtype, cast_for_store, row_warps
from orca_kernels._utils import device_context, new_output, refuse_double_backward
from orca_kernels.reference import LAYER_NORM_EPS


@triton.jit
def _gelu_and_derivative(u):
    """Exact (erf) GELU of u and its derivative Φ(u) + u·φ(u)."""
    cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
    pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327
    return u * cdf, cdf + u * pdf


@triton.jit
def _layer_norm_and_gate(
    o_ptr,
    u_ptr,
    w2_ptr,
    b2_ptr,
    lnw_ptr,
    lnb_ptr,
    row,
    stride_o,
    stride_u,
    H,
    G,
    eps,
    COMPUTE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """For one row: x̂ (normalised o), rstd, LN weight, y = LN(o), u, GELU(u) and its derivative,
    w₂ and the gate σ(GELU(u)·w₂ + b₂). Masked lanes hold zeros."""
    cols = tl.arange(0, BLOCK_H)
    h_ok = cols < H
    o = tl.load(o_ptr + row * stride_o + cols, mask=h_ok, other=0.0).to(COMPUTE)
    mean = tl.sum(o, axis=0) / H
    centered = tl.where(h_ok, o - mean, 0.0)
    # A second pass over the residuals: the first mean can be an ulp off (sum / H rounds), which a
    # near-constant row turns into x̂ noise of ulp / sqrt(eps). After it a constant row is exactly 0.
    centered = tl.where(h_ok, centered - tl.sum(centered, axis=0) / H, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / H + eps)
    x_hat = centered * rstd
    ln_w = tl.load(lnw_ptr + cols, mask=h_ok, other=0.0).to(COMPUTE)
    y = x_hat * ln_w + tl.load(lnb_ptr + cols, mask=h_ok, other=0.0).to(COMPUTE)

    g_cols = tl.arange(0, BLOCK_G)
    g_ok = g_cols < G
    u = tl.load(u_ptr + row * stride_u + g_cols, mask=g_ok, other=0.0).to(COMPUTE)
    act, act_grad = _gelu_and_derivative(u)
    w2 = tl.load(w2_ptr + g_cols, mask=g_ok, other=0.0).to(COMPUTE)
    pre = tl.sum(act * w2, axis=0) + tl.load(b2_ptr).to(COMPUTE)
    gate = 1.0 / (1.0 + tl.exp(-pre))
    return x_hat, rstd, ln_w, y, act, act_grad, w2, gate


@triton.jit
def _gated_residual_fwd_kernel(
    h_ptr,
    o_ptr,
    u_ptr,
    w2_ptr,
    b2_ptr,
    lnw_ptr,
    lnb_ptr,
    out_ptr,
    stride_h,
    stride_o,
    stride_u,
    stride_out,
    H,
    G,
    eps,
    COMPUTE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    _, _, _, y, _, _, _, gate = _layer_norm_and_gate(
        o_ptr, u_ptr, w2_ptr, b2_ptr, lnw_ptr, lnb_ptr, row, stride_o, stride_u, H, G, eps, COMPUTE, BLOCK_H, BLOCK_G
    )
    cols = tl.arange(0, BLOCK_H)
    h_ok = cols < H
    h = tl.load(h_ptr + row * stride_h + cols, mask=h_ok, other=0.0).to(COMPUTE)
    out = h + gate * y
    tl.store(out_ptr + row * stride_out + cols, cast_for_store(out, out_ptr), mask=h_ok)


@triton.jit
def _gated_residual_bwd_kernel(
    dout_ptr,
    o_ptr,
    u_ptr,
    w2_ptr,
    b2_ptr,
    lnw_ptr,
    lnb_ptr,
    do_ptr,
    du_ptr,
    partial_lnw_ptr,
    partial_lnb_ptr,
    partial_w2_ptr,
    partial_b2_ptr,
    stride_dout,
    stride_o,
    stride_u,
    stride_do,
    stride_du,
    N,
    H,
    G,
    eps,
    ROWS_PER_PROGRAM,
    COMPUTE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Rows [pid·R, (pid+1)·R): writes ∂o and ∂u per row, and this program's partial sums of the
    LayerNorm weight/bias and gate w₂/b₂ gradients."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    h_ok = cols < H
    g_cols = tl.arange(0, BLOCK_G)
    g_ok = g_cols < G
    acc_lnw = tl.zeros([BLOCK_H], dtype=COMPUTE)
    acc_lnb = tl.zeros([BLOCK_H], dtype=COMPUTE)
    acc_w2 = tl.zeros([BLOCK_G], dtype=COMPUTE)
    acc_b2 = tl.zeros([BLOCK_G], dtype=COMPUTE)  # a vector so that every lane sums alike; lane 0 is kept
    first = pid.to(tl.int64) * ROWS_PER_PROGRAM  # int64 row offsets: rows x stride can pass 2^31
    for row in range(first, tl.minimum(first + ROWS_PER_PROGRAM, N)):
        x_hat, rstd, ln_w, y, act, act_grad, w2, gate = _layer_norm_and_gate(
            o_ptr,
            u_ptr,
            w2_ptr,
            b2_ptr,
            lnw_ptr,
            lnb_ptr,
            row,
            stride_o,
            stride_u,
            H,
            G,
            eps,
            COMPUTE,
            BLOCK_H,
            BLOCK_G,
        )
        dout = tl.load(dout_ptr + row * stride_dout + cols, mask=h_ok, other=0.0).to(COMPUTE)
        d_gate = tl.sum(dout * y, axis=0)
        dy = dout * gate
        dx_hat = dy * ln_w
        mean_dx_hat = tl.sum(dx_hat, axis=0) / H
        mean_dx_hat_x_hat = tl.sum(dx_hat * x_hat, axis=0) / H
        do = (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_x_hat) * rstd
        tl.store(do_ptr + row * stride_do + cols, cast_for_store(do, do_ptr), mask=h_ok)
        acc_lnw += dy * x_hat
        acc_lnb += dy
        d_pre = d_gate * gate * (1.0 - gate)
        acc_w2 += d_pre * act
        acc_b2 += tl.where(g_cols == 0, d_pre, 0.0)
        du = d_pre * w2 * act_grad
        tl.store(du_ptr + row * stride_du + g_cols, cast_for_store(du, du_ptr), mask=g_ok)
    tl.store(partial_lnw_ptr + pid * H + cols, acc_lnw, mask=h_ok)
    tl.store(partial_lnb_ptr + pid * H + cols, acc_lnb, mask=h_ok)
    tl.store(partial_w2_ptr + pid * G + g_cols, acc_w2, mask=g_ok)
    tl.store(partial_b2_ptr + pid + g_cols, acc_b2, mask=g_cols == 0)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., C] as [N, C] with unit column stride (a view when possible)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _vector(parameter: torch.Tensor) -> torch.Tensor:
    """A parameter as the unit-stride vector the kernels index (a strided view is copied: they are small)."""
    return parameter.reshape(-1).contiguous()


def _launch(hidden_size: int, gate_size: int) -> dict:
    """Block sizes and warps: a program holds whole rows, so the warps follow the row width."""
    block_h = triton.next_power_of_2(hidden_size)
    return {"BLOCK_H": block_h, "BLOCK_G": triton.next_power_of_2(max(gate_size, 1)), "num_warps": row_warps(block_h)}


def _forward(hidden, attended, gate_hidden, gate_out_weight, gate_out_bias, ln_weight, ln_bias, eps: float, out_dtype):
    """Launch the forward kernel: out [B, T, H] in out_dtype."""
    size, gate_size = hidden.shape[-1], gate_hidden.shape[-1]
    out = new_output(hidden.shape, dtype=out_dtype, device=hidden.device)
    h, o, u = _rows(hidden), _rows(attended), _rows(gate_hidden)
    if h.shape[0] == 0:
        return out
    compute = accumulator_dtype(hidden.dtype, attended.dtype, gate_hidden.dtype)
    with device_context(hidden):
        _gated_residual_fwd_kernel[(h.shape[0],)](
            h,
            o,
            u,
            _vector(gate_out_weight),
            _vector(gate_out_bias),
            _vector(ln_weight),
            _vector(ln_bias),
            out,
            h.stride(0),
            o.stride(0),
            u.stride(0),
            size,
            size,
            gate_size,
            eps,
            COMPUTE=TL_DTYPES[compute],
            **_launch(size, gate_size),
        )
    return out


def _backward(grad_out, attended, gate_hidden, gate_out_weight, gate_out_bias, ln_weight, ln_bias, eps: float):
    """Launch the backward kernel: gradients of (attended, gate_hidden, gate_out_weight,
    gate_out_bias, ln_weight, ln_bias)."""
    size, gate_size = attended.shape[-1], gate_hidden.shape[-1]
    device = attended.device
    dout, o, u = _rows(grad_out), _rows(attended), _rows(gate_hidden)
    num_rows = o.shape[0]
    d_attended = new_output(attended.shape, dtype=attended.dtype, device=device)
    d_gate_hidden = new_output(gate_hidden.shape, dtype=gate_hidden.dtype, device=device)
    programs = max(1, min(num_rows, _utils.persistent_programs(device)))
    rows_per_program = triton.cdiv(max(num_rows, 1), programs)
    compute = accumulator_dtype(grad_out.dtype, attended.dtype, gate_hidden.dtype)
    partial_lnw = torch.zeros(programs, size, dtype=compute, device=device)
    partial_lnb = torch.zeros(programs, size, dtype=compute, device=device)
    partial_w2 = torch.zeros(programs, gate_size, dtype=compute, device=device)
    partial_b2 = torch.zeros(programs, dtype=compute, device=device)
    if num_rows > 0:
        with device_context(attended):
            _gated_residual_bwd_kernel[(programs,)](
                dout,
                o,
                u,
                _vector(gate_out_weight),
                _vector(gate_out_bias),
                _vector(ln_weight),
                _vector(ln_bias),
                d_attended.view(-1, size),
                d_gate_hidden.view(-1, gate_size),
                partial_lnw,
                partial_lnb,
                partial_w2,
                partial_b2,
                dout.stride(0),
                o.stride(0),
                u.stride(0),
                size,
                gate_size,
                num_rows,
                size,
                gate_size,
                eps,
                rows_per_program,
                COMPUTE=TL_DTYPES[compute],
                **_launch(size, gate_size),
            )
    return (
        d_attended,
        d_gate_hidden,
        partial_w2.sum(0).reshape(gate_out_weight.shape).to(gate_out_weight.dtype),
        partial_b2.sum(0).reshape(gate_out_bias.shape).to(gate_out_bias.dtype),
        partial_lnw.sum(0).to(ln_weight.dtype),
        partial_lnb.sum(0).to(ln_bias.dtype),
    )


@torch.library.custom_op("orca_kernels::gated_residual", mutates_args=())
def _gated_residual_op(
    hidden: torch.Tensor,
    attended: torch.Tensor,
    gate_hidden: torch.Tensor,
    gate_out_weight: torch.Tensor,
    gate_out_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return _forward(hidden, attended, gate_hidden, gate_out_weight, gate_out_bias, ln_weight, ln_bias, eps, out_dtype)


@_gated_residual_op.register_fake
def _(hidden, attended, gate_hidden, gate_out_weight, gate_out_bias, ln_weight, ln_bias, eps, out_dtype):
    return hidden.new_empty(hidden.shape, dtype=out_dtype)


@torch.library.custom_op("orca_kernels::gated_residual_backward", mutates_args=())
def _gated_residual_backward_op(
    grad_out: torch.Tensor,
    attended: torch.Tensor,
    gate_hidden: torch.Tensor,
    gate_out_weight: torch.Tensor,
    gate_out_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (attended, gate_hidden, gate_out_weight, gate_out_bias, ln_weight, ln_bias);
    the hidden state's gradient is grad_out itself."""
    return _backward(grad_out, attended, gate_hidden, gate_out_weight, gate_out_bias, ln_weight, ln_bias, eps)


@_gated_residual_backward_op.register_fake
def _(grad_out, attended, gate_hidden, gate_out_weight, gate_out_bias, ln_weight, ln_bias, eps):
    return (
        torch.empty_like(attended),
        torch.empty_like(gate_hidden),
        torch.empty_like(gate_out_weight),
        torch.empty_like(gate_out_bias),
        torch.empty_like(ln_weight),
        torch.empty_like(ln_bias),
    )


def _setup_context(ctx, inputs, output):
    hidden, attended, gate_hidden, gate_out_weight, gate_out_bias, ln_weight, ln_bias, eps, _ = inputs
    ctx.save_for_backward(attended, gate_hidden, gate_out_weight, gate_out_bias, ln_weight, ln_bias)
    ctx.eps, ctx.hidden_dtype = eps, hidden.dtype


def _residual_backward(ctx, grad_out):
    grads = _gated_residual_backward_op(grad_out, *ctx.saved_tensors, ctx.eps)
    return (grad_out.to(ctx.hidden_dtype), *grads, None, None)


_gated_residual_op.register_autograd(_residual_backward, setup_context=_setup_context)


refuse_double_backward(
    _gated_residual_backward_op,
    "gated_residual",
    "gated_cross_attention(backend='torch') or orca_kernels.reference.gated_residual",
)


def gated_residual(
    hidden: torch.Tensor,
    attended: torch.Tensor,
    gate_hidden: torch.Tensor,
    gate_out_weight: torch.Tensor,
    gate_out_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    eps: float = LAYER_NORM_EPS,
) -> torch.Tensor:
    """hidden + σ(GELU(gate_hidden)·w₂ + b₂) ⊙ LayerNorm(attended) -> [B, T, H] (Triton).

    hidden, attended [B, T, H]; gate_hidden [B, T, G] (the gate's first Linear, before GELU);
    gate_out_weight [1, G], gate_out_bias [1]; ln_weight, ln_bias [H]. out_dtype defaults to
    hidden's dtype. Callers validate shapes and devices (see cross_attention.gated_cross_attention).
    """
    return _gated_residual_op(
        hidden,
        attended,
        gate_hidden,
        gate_out_weight,
        gate_out_bias,
        ln_weight,
        ln_bias,
        float(eps),
        out_dtype if out_dtype is not None else hidden.dtype,
    )
