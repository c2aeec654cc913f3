"""FLOP formulas of the package's custom ops, for `torch.utils.flop_counter.FlopCounterMode`.

A custom op counts 0 FLOPs in `FlopCounterMode` unless a formula is registered for it
(`torch.utils.flop_counter.register_flop_formula`); importing `orca_kernels` registers these, so a
count of the fused path (`benchmarks.cost`, or any FlopCounterMode created after the import)
includes every kernel of the package. The ops' math is docs/ops.md's; the rules are
FlopCounterMode's own:

- a product that is a matrix product (attention, similarities, a convolution) counts 2 FLOPs
  per multiply-add, as FlopCounterMode counts mm/bmm/conv/SDPA, so the fused ops count the same
  as the aten ops they replace (`flash_cross_attention` as SDPA: 4·B·nh·Tx·Ta·hd forward, the
  five tile products of the one-pass backward, 10·B·nh·Tx·Ta·hd; the two-kernel backward layout
  recomputes two more, which this does not count, as SDPA's formula does not);
- the elementwise and row-reduction work of the fused ops (the RoPE, LayerNorm, gate and
  residual, the normalisations) is counted too, one FLOP per arithmetic operation of docs/ops.md's
  formulas (a GELU or a sigmoid as a few): FlopCounterMode counts nothing for the aten ops of that
  kind, so these fused ops count slightly more than the unfused ops they replace, a few FLOPs per
  element against the GEMMs' thousands. Without it `audio_rope` would count 0 and a cost model
  could not tell that it ran.

Each formula receives the op's arguments with tensors replaced by their shapes
(FlopCounterMode's `shape_wrapper`), and returns an int. The `_C` ops (`strided_conv1d` and its
two gradients) are registered only when the extension is loaded.
"""

from __future__ import annotations

from math import prod

import torch
from torch.utils.flop_counter import register_flop_formula

# The op modules register the ops this module looks up (importing them first keeps this module
# independent of the package's import order).
from orca_kernels import _extension, flash_attention, gated_residual, ortho_loss, rope, strided_conv  # noqa: F401

_ops = torch.ops.orca_kernels

# Per-row arithmetic of gated_residual (docs/ops.md#gated_residual), H = hidden width, G = gate
# width: LayerNorm (sum, centre, square and sum, scale by rstd, γ, β: 7H), gate (GELU ~5G, the
# dot with w₂ 2G, bias and sigmoid ~5), residual (gate · y + hidden: 2H).
_RESIDUAL_PER_H, _RESIDUAL_PER_G, _RESIDUAL_PER_ROW = 9, 7, 5
# Its backward recomputes the statistics and the gate (7H, 7G), then dy, dx̂ and ∂attended (8H),
# ∂gate = Σ ∂out ⊙ y (2H), ∂u (GELU′ and the chain, ~8G) and the parameter partial sums (∂γ,
# ∂β: 3H; ∂w₂: 2G).
_RESIDUAL_BWD_PER_H, _RESIDUAL_BWD_PER_G, _RESIDUAL_BWD_PER_ROW = 20, 17, 10
# audio_rope: per (x1, x2) pair, x1·c − x2·s and x1·s + x2·c: 4 products and 2 sums.
_ROPE_PER_PAIR = 6


def _attention(q_shape, k_shape) -> int:
    """2·B·nh·Tx·Ta·hd: one of attention's tile products (q [B, Tx, nh, hd], k [B, Ta, nh, hd])."""
    batch, tx, heads, head_dim = q_shape
    return 2 * batch * heads * tx * k_shape[1] * head_dim


@register_flop_formula(_ops.flash_cross_attention)
def flash_cross_attention_flop(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    """softmax(q kᵀ) v: the scores and P·V, as SDPA's formula counts them."""
    return 2 * _attention(q_shape, k_shape)


@register_flop_formula(_ops.flash_cross_attention_backward)
def flash_cross_attention_backward_flop(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    """The scores recomputed, dP = dO Vᵀ, dV = Pᵀ dO, dQ = dS K, dK = dSᵀ Q: five products, as
    SDPA's backward formula counts them."""
    return 5 * _attention(q_shape, k_shape)


@register_flop_formula(_ops.audio_rope)
def audio_rope_flop(x_shape, *args, out_shape=None, **kwargs) -> int:
    """Full-width rotate-half RoPE of x [B, T, H]: 6 FLOPs per pair of the H/2 pairs of a row
    (the backward is the same op, rotating the other way)."""
    return _ROPE_PER_PAIR * prod(x_shape) // 2


@register_flop_formula(_ops.gated_residual)
def gated_residual_flop(hidden_shape, attended_shape, gate_hidden_shape, *args, out_shape=None, **kwargs) -> int:
    """hidden + σ(GELU(u)·w₂ + b₂) ⊙ LayerNorm(attended), per row of H (u: G wide)."""
    rows = prod(hidden_shape[:-1])
    width, gate = hidden_shape[-1], gate_hidden_shape[-1]
    return rows * (_RESIDUAL_PER_H * width + _RESIDUAL_PER_G * gate + _RESIDUAL_PER_ROW)


@register_flop_formula(_ops.gated_residual_backward)
def gated_residual_backward_flop(grad_out_shape, attended_shape, gate_hidden_shape, *args, out_shape=None, **kwargs):
    """The gradients of attended, u and the four gate/LayerNorm parameters, the statistics and
    the gate recomputed (docs/ops.md#gated_residual)."""
    rows = prod(attended_shape[:-1])
    width, gate = attended_shape[-1], gate_hidden_shape[-1]
    return rows * (_RESIDUAL_BWD_PER_H * width + _RESIDUAL_BWD_PER_G * gate + _RESIDUAL_BWD_PER_ROW)


def _samples(local_shape, max_local_samples) -> int:
    """n, the sampled local rows (orca_kernels.ortho_loss._num_samples)."""
    if local_shape is None:
        return 0
    return local_shape[1] if max_local_samples is None else min(local_shape[1], max_local_samples)


def _ortho_forward(global_shape, columns: int, local_rows: int) -> int:
    """The similarities of the K global rows to `columns` token-list entries over H (2 per
    multiply-add), the squared norms of the K + n entries, and the squared-error means."""
    batch, tokens, width = global_shape
    similarities = 2 * batch * tokens * columns * width
    return similarities + 2 * batch * (tokens + local_rows) * width + 3 * batch * tokens * columns


@register_flop_formula(_ops.ortho_diversity_loss)
def ortho_diversity_loss_flop(global_shape, *args, out_shape=None, **kwargs) -> int:
    """mean((ĝĝᵀ − I)²): the [B, K, K] Gram matrix over H."""
    return _ortho_forward(global_shape, global_shape[1], 0)


@register_flop_formula(_ops.ortho_cross_loss)
def ortho_cross_loss_flop(global_shape, local_shape, max_local_samples=None, *args, out_shape=None, **kwargs) -> int:
    """mean((ĝ l̂[:, idx]ᵀ)²): the [B, K, n] cross similarities over H."""
    n = _samples(local_shape, max_local_samples)
    return _ortho_forward(global_shape, n, n)


@register_flop_formula(_ops.ortho_losses)
def ortho_losses_flop(global_shape, local_shape, max_local_samples=None, *args, out_shape=None, **kwargs) -> int:
    """Both losses from one [B, K, K + n] similarity matrix."""
    n = _samples(local_shape, max_local_samples)
    return _ortho_forward(global_shape, global_shape[1] + n, n)


@register_flop_formula(_ops.ortho_losses_backward)
def ortho_losses_backward_flop(global_shape, local_shape, similarities_shape, norms_shape, *args, **kwargs) -> int:
    """∂L/∂x̂ of every token-list entry from the saved similarities [B, K, columns] (the K global
    rows over all columns, the n sampled local rows over the K global rows), then the
    normalisation's backward (~4 FLOPs per element of the K + n entries)."""
    batch, tokens, width = global_shape
    columns = similarities_shape[2]
    local_rows = norms_shape[1] - tokens
    dots = 2 * batch * width * (tokens * columns + local_rows * tokens)
    return dots + 4 * batch * (tokens + local_rows) * width


def _conv(grad_or_out_shape, weight_shape) -> int:
    """2·B·T_out·C_out·C_in·k: the convolution's multiply-adds (FlopCounterMode's conv rule:
    bias not counted), for the output [B, T_out, C_out] or its gradient."""
    batch, length_out, channels_out = grad_or_out_shape
    return 2 * batch * length_out * channels_out * weight_shape[1] * weight_shape[2]


def _register_extension_formulas() -> None:
    @register_flop_formula(_ops.strided_conv1d)
    def strided_conv1d_flop(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        """Conv1d over channels-last x [B, T, C_in] with weight [C_out, C_in, k]."""
        return _conv(out_shape, weight_shape)

    @register_flop_formula(_ops.strided_conv1d_grad_input)
    def strided_conv1d_grad_input_flop(grad_out_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        """∂x: the transposed convolution of the gradient [B, T_out, C_out], as many FLOPs as the forward."""
        return _conv(grad_out_shape, weight_shape)

    @register_flop_formula(_ops.strided_conv1d_grad_weight)
    def strided_conv1d_grad_weight_flop(grad_out_shape, x_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
        """∂weight [C_out, C_in, k]: as many FLOPs as the forward."""
        batch, length_out, channels_out = grad_out_shape
        return 2 * batch * length_out * channels_out * x_shape[2] * kernel_size


if _extension.LOADED:
    _register_extension_formulas()
