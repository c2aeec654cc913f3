"""The gated residual cross-attention of the audio memory (docs/ops.md#gated_cross_attention), fused.

    rotated = audio_rope(audio)                              one Triton pass, table cached
    kv      = rotated · W_kvᵀ + b_kv        [B, T_a, 2H]     cuBLAS; the per-layer K/V cache
    q       = hidden · W_qᵀ + b_q                            cuBLAS
    u       = hidden · W₁ᵀ + b₁             [B, T_x, H/4]    cuBLAS
    attn    = flash_cross_attention(q, k, v, mask)           SDPA or Triton (dispatch), no [T_x, T_a] matrix
    o       = attn · W_oᵀ + b_o                              cuBLAS
    out     = hidden + σ(GELU(u)·w₂ + b₂) ⊙ LN(o)            one Triton pass (gated_residual)

The GEMMs (~93% of the FLOPs) stay in cuBLAS; everything between them is fused. K and V are
column views of one packed projection, read in place by the attention core; their gradients
meet in one buffer (`split`, one concatenation in the backward rather than a zero-filled buffer
per view). The backward of q and u writes ∂hidden once (`_query_and_gate`).
docs/ops.md#bytes-moved counts every launch. During generation `project_audio_kv` runs once per
request and layer and `attend_audio_kv` at every step: the public, validated pair;
`gated_cross_attention` validates once and calls their unchecked cores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orca_kernels import reference
from orca_kernels._utils import autocast_enabled, autocast_fp32_normalisations, use_triton
from orca_kernels.flash_attention import flash_cross_attention
from orca_kernels.gated_residual import gated_residual
from orca_kernels.rope import audio_rope
from orca_kernels.validation import check_backend, check_int, check_key_padding_mask, check_rope_arguments, check_tensor

OP = "gated_cross_attention"
PROJECT_OP = "project_audio_kv"
ATTEND_OP = "attend_audio_kv"
BACKENDS = ("auto", "triton", "torch")
ATTENTION_BACKENDS = ("auto", "sdpa", "triton")  # the fused path's attention core
PARAMETER_NAMES = (
    "in_proj_weight",
    "in_proj_bias",
    "out_proj_weight",
    "out_proj_bias",
    "gate_hidden_weight",
    "gate_hidden_bias",
    "gate_out_weight",
    "gate_out_bias",
    "ln_weight",
    "ln_bias",
)


def check_parameters(
    hidden_size: int, parameters: tuple[torch.Tensor, ...], like: torch.Tensor, op: str = OP, like_name: str = "hidden"
) -> None:
    """The module parameters have the reference module's shapes (G = H // 4), `like`'s device and,
    outside an autocast region for that device, `like`'s dtype (as the reference's GEMMs and
    LayerNorm require; under autocast they cast, and CUDA's feeds fp32 hidden states to bf16
    modules after the first injected layer): all ten, or the first ones of PARAMETER_NAMES (the
    in-projection alone for `project_audio_kv`)."""
    gate = hidden_size // 4
    shapes = [
        (3 * hidden_size, hidden_size),
        (3 * hidden_size,),
        (hidden_size, hidden_size),
        (hidden_size,),
        (gate, hidden_size),
        (gate,),
        (1, gate),
        (1,),
        (hidden_size,),
        (hidden_size,),
    ]
    count = len(parameters)
    same_dtype = not autocast_enabled(like.device.type)
    for name, value, shape in zip(PARAMETER_NAMES[:count], parameters, shapes[:count], strict=True):
        check_tensor(op, name, value, len(shape))
        if tuple(value.shape) != shape:
            raise ValueError(f"{op}: {name} has shape {tuple(value.shape)} but expected {shape} for H = {hidden_size}")
        if value.device != like.device:
            raise ValueError(f"{op}: {name} is on {value.device} but expected {like.device}")
        if same_dtype and value.dtype != like.dtype:
            raise ValueError(
                f"{op}: {name} is {value.dtype} but {like_name} is {like.dtype}; outside torch.autocast every "
                f"parameter must have {like_name}'s dtype (under autocast the GEMMs cast them)"
            )


def check_num_heads(op: str, num_heads: int, hidden_size: int) -> None:
    check_int(op, "num_heads", num_heads, 1)
    if hidden_size % num_heads:
        raise ValueError(f"{op}: num_heads={num_heads} does not divide the hidden size {hidden_size}")


def _check_attention_inputs(
    op: str,
    hidden: torch.Tensor,
    memory_name: str,
    memory: torch.Tensor,
    widths: int,
    parameters: tuple[torch.Tensor, ...],
    num_heads: int,
    key_padding_mask: torch.Tensor | None,
) -> None:
    """What `gated_cross_attention` and `attend_audio_kv` both take: hidden [B, T_x, H], a memory
    [B, T_a, widths·H] on hidden's device (the audio, widths = 1, or its packed K/V, widths = 2),
    num_heads dividing H, the ten parameters and the mask [B, T_a]."""
    check_tensor(op, "hidden", hidden, 3)
    check_tensor(op, memory_name, memory, 3)
    batch, _, size = hidden.shape
    if memory.shape[0] != batch or memory.shape[2] != widths * size:
        raise ValueError(
            f"{op}: {memory_name} has shape {tuple(memory.shape)} but hidden is {tuple(hidden.shape)}: "
            f"expected [{batch}, T_a, {widths * size}]"
        )
    if memory.device != hidden.device:
        raise ValueError(f"{op}: {memory_name} is on {memory.device} but hidden is on {hidden.device}")
    check_num_heads(op, num_heads, size)
    check_parameters(size, parameters, hidden, op)
    check_key_padding_mask(op, key_padding_mask, batch, memory.shape[1], hidden)


def project_audio_kv(rotated: torch.Tensor, in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor) -> torch.Tensor:
    """Packed [K | V] = rotated · W_kvᵀ + b_kv -> [B, T_a, 2H], one GEMM as in
    nn.MultiheadAttention when key is value (rows H..3H of the packed in-projection).

    rotated [B, T_a, H] is the RoPE-rotated audio memory (`audio_rope`); in_proj_weight [3H, H]
    and in_proj_bias [3H] are the module's packed in-projection. The result is what
    `attend_audio_kv` takes, and can be cached: it depends on the audio only, not on the query.
    """
    check_tensor(PROJECT_OP, "rotated", rotated, 3)
    check_parameters(rotated.shape[2], (in_proj_weight, in_proj_bias), rotated, PROJECT_OP, "rotated")
    return _project_audio_kv(rotated, in_proj_weight, in_proj_bias)


def _project_audio_kv(rotated: torch.Tensor, in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor) -> torch.Tensor:
    size = in_proj_weight.shape[1]
    return F.linear(rotated, in_proj_weight[size:], in_proj_bias[size:])


def residual_dtype(hidden: torch.Tensor, attended: torch.Tensor, gate_hidden: torch.Tensor) -> torch.dtype:
    """The dtype the reference's `hidden + gate * ln(attended)` has. The gate has the dtype of its
    GEMMs (gate_hidden's); LayerNorm keeps attended's dtype, except under CUDA autocast, whose fp32
    list holds layer_norm: there LN(bf16) is fp32 and promotes the sum, so the residual stream
    turns fp32 after the first injected layer
    (docs/reference-behaviour.md#residual-stream-turns-fp32-under-autocast). CPU autocast has no
    such rule: a bf16 LayerNorm stays bf16 there, and so does a bf16 residual stream."""
    norm = torch.float32 if autocast_fp32_normalisations(hidden.device.type) else attended.dtype
    return torch.promote_types(torch.promote_types(hidden.dtype, norm), gate_hidden.dtype)


# ----------------------------------------------------------------------------- q and u
#
# q = hidden·W_qᵀ + b_q and the gate's u = hidden·W₁ᵀ + b₁ both read hidden [B, T_x, H]. Their
# backward (`_QueryGateProjection`) writes ∂hidden once: ∂q·W_q, then ∂u·W₁ accumulated into it by
# the GEMM (beta = 1), so autograd has one [B, T_x, H] gradient fewer to write and to add. The
# forward stays two GEMMs: one over a packed [W_q; W₁] would read hidden once, but the weights
# change every step, and concatenating them moves more bytes than the read saves at two of the
# three model shapes and no time at the third (docs/ops.md#bytes-moved).


class _QueryGateProjection(torch.autograd.Function):
    """(q [..., H], u [..., G]) = (hidden·W_qᵀ + b_q, hidden·W₁ᵀ + b₁), two GEMMs. The backward
    saves hidden and the two weights and computes ∂hidden = ∂q·W_q + ∂u·W₁ as a GEMM and an
    accumulating GEMM."""

    @staticmethod
    def forward(hidden, w_q, b_q, w_1, b_1):
        return F.linear(hidden, w_q, b_q), F.linear(hidden, w_1, b_1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, w_q, _, w_1, _ = inputs
        needs = ctx.needs_input_grad
        weight_grads = needs[1] or needs[3]
        ctx.save_for_backward(hidden if weight_grads else None, w_q if needs[0] else None, w_1 if needs[0] else None)
        ctx.hidden_shape = hidden.shape

    @staticmethod
    def backward(ctx, grad_q, grad_u):
        hidden, w_q, w_1 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # The GEMMs ran in q's dtype (the autocast dtype under autocast): so do their backwards.
        dtype = grad_q.dtype
        dq = grad_q.reshape(-1, grad_q.shape[-1])
        du = grad_u.reshape(-1, grad_u.shape[-1]).to(dtype)
        grad_hidden = grad_w_q = grad_b_q = grad_w_1 = grad_b_1 = None
        if needs[0]:
            grad_hidden = torch.mm(dq, w_q.to(dtype))
            grad_hidden = grad_hidden.addmm_(du, w_1.to(dtype)).view(ctx.hidden_shape)
        if needs[1] or needs[3]:
            rows = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
            grad_w_q = dq.t().mm(rows) if needs[1] else None
            grad_w_1 = du.t().mm(rows) if needs[3] else None
        if needs[2]:
            grad_b_q = dq.sum(0)
        if needs[4]:
            grad_b_1 = du.sum(0)
        return grad_hidden, grad_w_q, grad_b_q, grad_w_1, grad_b_1


def _query_and_gate(
    hidden: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor,
    gate_hidden_weight: torch.Tensor,
    gate_hidden_bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [B, T_x, H], u [B, T_x, G]): the attention's query projection and the gate's first
    Linear, both of hidden."""
    size = hidden.shape[-1]
    w_q, b_q = in_proj_weight[:size], in_proj_bias[:size]
    sources = (hidden, in_proj_weight, in_proj_bias, gate_hidden_weight, gate_hidden_bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        return _QueryGateProjection.apply(hidden, w_q, b_q, gate_hidden_weight, gate_hidden_bias)
    return F.linear(hidden, w_q, b_q), F.linear(hidden, gate_hidden_weight, gate_hidden_bias)


def attend_audio_kv(
    hidden: torch.Tensor,
    audio_kv: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor,
    gate_hidden_weight: torch.Tensor,
    gate_hidden_bias: torch.Tensor,
    gate_out_weight: torch.Tensor,
    gate_out_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    num_heads: int,
    key_padding_mask: torch.Tensor | None = None,
    *,
    attention_backend: str = "auto",
) -> torch.Tensor:
    """hidden [B, T_x, H] attends over a projected audio memory audio_kv [B, T_a, 2H] (from
    `project_audio_kv`, possibly cached), then LayerNorm, gate and residual -> [B, T_x, H]: the
    rest of `gated_cross_attention` once the memory is rotated and projected (one decode step).

    The parameters are `gated_cross_attention`'s; key_padding_mask [B, T_a] bool, True = ignore.
    An empty memory (T_a = 0) returns `hidden`. There is no reference backend: this runs the
    Triton kernels, so the tensors must be where they can run (`orca_kernels.kernels_available`).
    attention_backend picks the attention core as `flash_cross_attention`'s backend does: "auto"
    (by measurement on CUDA, docs/architecture.md#attention-dispatch), "sdpa" or "triton".
    """
    parameters = (
        in_proj_weight,
        in_proj_bias,
        out_proj_weight,
        out_proj_bias,
        gate_hidden_weight,
        gate_hidden_bias,
        gate_out_weight,
        gate_out_bias,
        ln_weight,
        ln_bias,
    )
    _check_attention_inputs(ATTEND_OP, hidden, "audio_kv", audio_kv, 2, parameters, num_heads, key_padding_mask)
    check_backend(ATTEND_OP, attention_backend, ATTENTION_BACKENDS, "attention_backend")
    if not use_triton(ATTEND_OP, hidden, "auto"):
        raise RuntimeError(
            f"{ATTEND_OP}: the Triton kernels cannot run on {hidden.device} (they need CUDA, or the CPU with "
            "TRITON_INTERPRET=1 set before importing orca_kernels); gated_cross_attention(backend='torch') runs "
            "the reference"
        )
    if audio_kv.shape[1] == 0:
        return hidden
    return _attend_audio_kv(hidden, audio_kv, *parameters, num_heads, key_padding_mask, attention_backend)


def _attend_audio_kv(
    hidden: torch.Tensor,
    audio_kv: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor,
    gate_hidden_weight: torch.Tensor,
    gate_hidden_bias: torch.Tensor,
    gate_out_weight: torch.Tensor,
    gate_out_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    num_heads: int,
    key_padding_mask: torch.Tensor | None,
    attention_backend: str,
) -> torch.Tensor:
    """`attend_audio_kv` on inputs its callers have validated, with T_a > 0."""
    size = hidden.shape[-1]
    head_dim = size // num_heads
    query, gate_hidden = _query_and_gate(hidden, in_proj_weight, in_proj_bias, gate_hidden_weight, gate_hidden_bias)
    q = query.unflatten(-1, (num_heads, head_dim))
    # One split, not two slices: autograd then joins ∂k and ∂v with one concatenation instead of
    # zero-filling a [B, T_a, 2H] buffer for each and adding the two.
    k, v = (half.unflatten(-1, (num_heads, head_dim)) for half in audio_kv.split(size, dim=-1))
    attn = flash_cross_attention(q, k, v, key_padding_mask, backend=attention_backend)
    attended = F.linear(attn.flatten(-2), out_proj_weight, out_proj_bias)
    return gated_residual(
        hidden,
        attended,
        gate_hidden,
        gate_out_weight,
        gate_out_bias,
        ln_weight,
        ln_bias,
        out_dtype=residual_dtype(hidden, attended, gate_hidden),
    )


def gated_cross_attention(
    hidden: torch.Tensor,
    audio: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor,
    gate_hidden_weight: torch.Tensor,
    gate_hidden_bias: torch.Tensor,
    gate_out_weight: torch.Tensor,
    gate_out_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    num_heads: int,
    *,
    key_padding_mask: torch.Tensor | None = None,
    position_scale: float = 2.5,
    rope_theta: float = 10000.0,
    backend: str = "auto",
    attention_backend: str = "auto",
) -> torch.Tensor:
    """hidden [B, T_x, H] + σ(gate(hidden)) ⊙ LN(MHA(hidden, rope(audio), rope(audio))) -> [B, T_x, H].

    The parameters are the reference module's (see `orca_kernels.reference.gated_cross_attention`
    for their shapes and meaning); audio [B, T_a, H] is cast to hidden's dtype; key_padding_mask
    [B, T_a] bool, True = ignore (a query whose keys are all ignored attends to nothing: its
    attention output is 0, as in the reference). Empty audio returns `hidden`.
    backend: "auto" (Triton on CUDA, and on the CPU under TRITON_INTERPRET=1; else the
    reference), "triton", or "torch" (the reference). attention_backend, for the fused path: the
    attention core, as `flash_cross_attention`'s backend ("auto": by measurement on CUDA, "sdpa",
    "triton"). position_scale and rope_theta must be finite and > 0 on every backend.
    """
    check_backend(OP, backend, BACKENDS)
    check_backend(OP, attention_backend, ATTENTION_BACKENDS, "attention_backend")
    parameters = (
        in_proj_weight,
        in_proj_bias,
        out_proj_weight,
        out_proj_bias,
        gate_hidden_weight,
        gate_hidden_bias,
        gate_out_weight,
        gate_out_bias,
        ln_weight,
        ln_bias,
    )
    _check_attention_inputs(OP, hidden, "audio", audio, 1, parameters, num_heads, key_padding_mask)
    check_rope_arguments(OP, position_scale, rope_theta)  # here, so both backends (and T_a = 0) refuse alike
    if not use_triton(OP, hidden, backend):
        return reference.gated_cross_attention(
            hidden,
            audio,
            *parameters,
            num_heads,
            key_padding_mask=key_padding_mask,
            position_scale=position_scale,
            rope_theta=rope_theta,
        )
    if audio.shape[1] == 0:
        return hidden
    rotated = audio_rope(audio.to(hidden.dtype), position_scale, rope_theta, backend="triton")
    audio_kv = _project_audio_kv(rotated, in_proj_weight, in_proj_bias)
    return _attend_audio_kv(hidden, audio_kv, *parameters, num_heads, key_padding_mask, attention_backend)
