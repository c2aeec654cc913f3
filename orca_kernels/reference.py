"""Pure-PyTorch reference of every ORCA-DeSTA op: the oracle the kernels are tested against,
and the CPU path where no compiled kernel exists.

Each function reproduces the reference implementation (voidful/DeSTA2.5-Audio at bf7f21f,
described in docs/reference-behaviour.md) operation for operation, including its dtype behaviour, so
that results match it bit for bit in every dtype. Where the reference has a known quirk it is
kept and named in the docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from orca_kernels.validation import check_rope_arguments

LAYER_NORM_EPS = 1e-5


# ----------------------------------------------------------------------------- orthogonality losses


def local_sample_indices(num_local: int, max_local_samples: int | None, device: torch.device) -> torch.Tensor | None:
    """Rows of the local tokens the cross loss reads: None (all rows) when `max_local_samples` is
    None or num_local <= max_local_samples, else exactly
    `torch.linspace(0, num_local - 1, max_local_samples, dtype=torch.long, device=device)`
    (values truncated toward zero; the device's own formula, see docs/ops.md#sampled-local-rows)."""
    if max_local_samples is None or num_local <= max_local_samples:
        return None
    return torch.linspace(0, num_local - 1, max_local_samples, dtype=torch.long, device=device)


def ortho_diversity_loss(global_tokens: torch.Tensor) -> torch.Tensor:
    """mean((ĝ ĝᵀ − I)²) over [B, K, K] for global_tokens [B, K, H], ĝ = F.normalize(·, dim=-1).

    As in the reference, I is a float32 identity, so bf16/fp16 inputs give a float32 loss."""
    g = F.normalize(global_tokens, dim=-1)
    gram = torch.einsum("bkh,bqh->bkq", g, g)
    identity = torch.eye(gram.size(-1), device=gram.device)
    return ((gram - identity) ** 2).mean()


def ortho_cross_loss(
    global_tokens: torch.Tensor, local_tokens: torch.Tensor, max_local_samples: int | None = 100
) -> torch.Tensor:
    """mean((ĝ l̂[:, idx]ᵀ)²) over [B, K_g, n] for global_tokens [B, K_g, H] and local_tokens
    [B, T_l, H], idx from `local_sample_indices` (n = min(T_l, max_local_samples))."""
    g = F.normalize(global_tokens, dim=-1)
    local = F.normalize(local_tokens, dim=-1)
    indices = local_sample_indices(local.size(1), max_local_samples, local.device)
    if indices is not None:
        local = local[:, indices, :]
    cross = torch.einsum("bgh,blh->bgl", g, local)
    return (cross**2).mean()


# ----------------------------------------------------------------------------- audio RoPE


def rope_cos_sin(
    length: int, dim: int, position_scale: float, rope_theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos and sin tables [1, length, dim] at fractional positions t / position_scale:
    angle[t, i] = (t / scale) · θ^(−i / (dim/2)) for i < dim/2, duplicated over both halves."""
    half = dim // 2
    inv_freq = 1.0 / (rope_theta ** (torch.arange(half, dtype=torch.float, device=device) / half))
    positions = torch.arange(length, dtype=torch.float, device=device) / position_scale
    angles = positions.unsqueeze(-1) * inv_freq.unsqueeze(0)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().unsqueeze(0), angles.sin().unsqueeze(0)


def apply_full_width_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half over the whole last dimension (not per head): with x = [x1, x2] split at the
    middle, [x1·c − x2·s, x1·s + x2·c]. cos/sin are cast to x.dtype first, and every product and
    sum rounds in x.dtype, as in the reference."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)


def audio_rope(audio: torch.Tensor, position_scale: float = 2.5, rope_theta: float = 10000.0) -> torch.Tensor:
    """Full-width RoPE of audio [B, T, H] at positions t / position_scale -> [B, T, H].
    position_scale and rope_theta must be finite and > 0 (`check_rope_arguments`)."""
    check_rope_arguments("audio_rope", position_scale, rope_theta)
    cos, sin = rope_cos_sin(audio.shape[1], audio.shape[-1], position_scale, rope_theta, audio.device)
    return apply_full_width_rope(audio, cos, sin)


# ----------------------------------------------------------------------------- gated cross-attention


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
) -> torch.Tensor:
    """hidden [B, T_x, H] + σ(gate) ⊙ LN(MHA(hidden, rope(audio), rope(audio))) -> [B, T_x, H].

    Parameters are those of the reference module: `cross_attn.{in_proj_weight [3H, H],
    in_proj_bias [3H], out_proj.weight [H, H], out_proj.bias [H]}`, `gate_proj.0` (H -> H/4,
    gate_hidden_*), `gate_proj.2` (H/4 -> 1, gate_out_*), `ln`. audio [B, T_a, H] is cast to
    hidden's dtype and rotated over its full width; the rotated audio is both key and value; the
    queries are not rotated. key_padding_mask [B, T_a] follows nn.MultiheadAttention (True =
    ignore). Empty audio (T_a = 0) returns `hidden` itself. position_scale and rope_theta must be
    finite and > 0 (checked even for empty audio, as the Triton backend does).
    """
    check_rope_arguments("gated_cross_attention", position_scale, rope_theta)
    if audio.shape[1] == 0:
        return hidden
    audio = audio.to(dtype=hidden.dtype, device=hidden.device)
    memory = audio_rope(audio, position_scale, rope_theta)
    return attend_rotated(
        hidden,
        memory,
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
        num_heads,
        key_padding_mask,
    )


def flash_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention core of the gated cross-attention in PyTorch (SDPA, as F.multi_head_attention_forward
    calls it): q [B, Tx, nh, hd] over k, v [B, Ta, nh, hd] -> [B, Tx, nh, hd] (contiguous).

    key_padding_mask [B, Ta] bool, True = ignore; scale defaults to 1/sqrt(hd).

    Fully masked rows (and every row when T_a = 0) give 0 with zero gradients on every device and
    SDPA backend, whatever their q, k and v hold: their mask is lifted (so the softmax stays
    finite) and their output replaced by 0, which is what the CPU reference's safe softmax gives.
    The kernels give the same.

    A query row holding a NaN or ±inf gives a NaN output row, as the Triton kernel does (its scores
    are NaN). The CPU SDPA kernel without a mask returns 0 for such a row instead, which would hide
    the bad input, so NaN is added to those rows explicitly (+0 elsewhere: exact, and no gradient
    path). Fully masked rows stay 0, with zero gradients, even then.
    """
    if k.shape[1] == 0:
        # No key at all is a fully masked row for every query (SDPA would give NaN): 0, with zero
        # gradients whatever q holds.
        # (k and v are empty: their sums are exact zeros, which keeps them in the graph.)
        return torch.where(torch.zeros_like(q, dtype=torch.bool), q, 0.0) + (k.sum() + v.sum()) * 0
    return masked_sdpa(q, k, v, key_padding_mask, scale, poison_non_finite=True)


def masked_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    scale: float | None,
    *,
    poison_non_finite: bool,
) -> torch.Tensor:
    """SDPA under the package's attention contract, T_a > 0: q [B, Tx, nh, hd] over k, v
    [B, Ta, nh, hd] -> [B, Tx, nh, hd] (contiguous). The reference's core, and the vendor path of
    `flash_cross_attention(backend="sdpa")`, which poisons only on the CPU (CUDA's fused kernels
    propagate a non-finite query's NaN themselves).

    Padded keys and values are zeroed first: SDPA's boolean mask alone lets a NaN there reach the
    output and dq, dk (0 · NaN in its backward). Where every key is masked, the mask is lifted over
    zeroed queries (a NaN there would reach the gradients through SDPA's backward, whose
    rowsum(dO ∘ O) is 0 · NaN) and the output is replaced by 0. poison_non_finite: a query row
    holding a NaN or ±inf gets a NaN output row (+0 elsewhere: exact, and no gradient path)."""
    finite = q.isfinite().all(dim=-1, keepdim=True).transpose(1, 2) if poison_non_finite else None
    keep = empty = None
    if key_padding_mask is not None:
        padded = key_padding_mask[:, :, None, None]  # [B, Ta, 1, 1]
        k, v = k.masked_fill(padded, 0), v.masked_fill(padded, 0)
        empty = key_padding_mask.all(dim=1)[:, None, None, None]  # [B, 1, 1, 1]
        q = q.masked_fill(empty, 0)
        keep = (~key_padding_mask)[:, None, None, :] | empty  # [B, 1, 1, Ta], True = attend
    qt, kt, vt = (sdpa_aligned(t.transpose(1, 2)) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep, scale=scale)
    if finite is not None:
        out = poison_rows(out, finite)
    if empty is not None:
        out = out.masked_fill(empty, 0)
    return out.transpose(1, 2).contiguous()


def sdpa_aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy where a stride or the start is not a multiple of 16 bytes. SDPA's
    fused CUDA kernels load 16-byte vectors, and torch's own layout check misses some views: a
    one-row query slice of a projection with an odd row stride crashed cuDNN's attention backward
    on an H200 (torch 2.11: misaligned address, and the CUDA context is lost)."""
    if t.device.type != "cuda":
        return t
    size = t.element_size()  # storage offset, not data_ptr: also traceable with fake tensors
    aligned = all((n * size) % 16 == 0 for n in (t.storage_offset(), *t.stride()[:-1]))
    return t if aligned else t.contiguous()


def poison_rows(out: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """out + (0 where `finite`, NaN elsewhere), broadcast over the last dim; gradients pass unchanged."""
    return out + torch.where(finite, 0.0, float("nan")).to(out.dtype)


def gated_residual(
    hidden: torch.Tensor,
    attended: torch.Tensor,
    gate_hidden: torch.Tensor,
    gate_out_weight: torch.Tensor,
    gate_out_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float = LAYER_NORM_EPS,
) -> torch.Tensor:
    """The module's last three steps: hidden + σ(GELU(gate_hidden)·w₂ + b₂) ⊙ LayerNorm(attended)
    -> [B, T, H]; hidden, attended [B, T, H], gate_hidden [B, T, G] (the gate's first Linear, before
    GELU), gate_out_weight [1, G], gate_out_bias [1], ln_weight and ln_bias [H]."""
    normed = F.layer_norm(attended, (attended.shape[-1],), ln_weight, ln_bias, eps)
    gate = torch.sigmoid(F.linear(F.gelu(gate_hidden), gate_out_weight, gate_out_bias))
    return hidden + gate * normed


def attend_rotated(
    hidden: torch.Tensor,
    memory: torch.Tensor,
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
) -> torch.Tensor:
    """`gated_cross_attention` after the RoPE: hidden [B, T_x, H] attends over the already rotated
    memory [B, T_a, H] (same dtype), then LayerNorm, data-dependent gate, residual."""
    embed_dim = hidden.shape[-1]
    # nn.MultiheadAttention(batch_first=True) transposes to [T, B, H]; key is value, so the
    # functional path projects K and V with one packed GEMM and runs SDPA without weights.
    query = hidden.transpose(1, 0)
    key = memory.transpose(1, 0)
    attended, _ = F.multi_head_attention_forward(
        query,
        key,
        key,
        embed_dim,
        num_heads,
        in_proj_weight,
        in_proj_bias,
        None,
        None,
        False,
        0.0,
        out_proj_weight,
        out_proj_bias,
        training=False,
        key_padding_mask=key_padding_mask,
        need_weights=False,
    )
    attended = F.layer_norm(attended.transpose(1, 0), (embed_dim,), ln_weight, ln_bias, LAYER_NORM_EPS)
    gate = torch.sigmoid(
        F.linear(F.gelu(F.linear(hidden, gate_hidden_weight, gate_hidden_bias)), gate_out_weight, gate_out_bias)
    )
    return hidden + gate * attended


def pool_rotated_audio(rotated_audio: torch.Tensor) -> torch.Tensor:
    """normalize(mean over T_a) of the rotated memory [B_a, T_a, H] -> [B_a, H], without gradient
    (the reference computes it under no_grad; it is the same for every layer)."""
    with torch.no_grad():
        return F.normalize(rotated_audio.mean(dim=1), dim=-1)


def pool_transcription_spans(
    hidden: torch.Tensor, transcription_positions: Sequence[tuple[int, int, int]]
) -> tuple[list[int], torch.Tensor] | None:
    """The transcription spans (b, s, e) of hidden [B, T_x, H] with s < e <= T_x, each the mean of
    hidden[b, s:e], stacked and normalised -> (the row b of each span, [N, H]); None when no span
    is valid. The span half of `layer_align_loss`, shared with `orca_model.losses`."""
    valid = [(b, s, e) for b, s, e in transcription_positions if s < e and e <= hidden.size(1)]
    if not valid:
        return None
    text_pooled = F.normalize(torch.stack([hidden[b, s:e, :].mean(dim=0) for b, s, e in valid], dim=0), dim=-1)
    return [b for b, _, _ in valid], text_pooled


def align_loss_per_row(hidden: torch.Tensor, audio_pooled: torch.Tensor) -> torch.Tensor:
    """1 − cos(audio_pooled[b], normalize(mean over T_x of hidden[b])) for each row b -> [B]: the
    loss without transcription spans, before its mean (every text token pooled, padding
    included). The fallback of `layer_align_loss`, shared with `orca_model.losses`."""
    text_pooled = F.normalize(hidden.mean(dim=1), dim=-1)
    return 1 - F.cosine_similarity(audio_pooled, text_pooled, dim=-1)


def layer_align_loss(
    hidden: torch.Tensor,
    audio_pooled: torch.Tensor,
    transcription_positions: Sequence[tuple[int, int, int]] | None = None,
) -> torch.Tensor | None:
    """The per-layer alignment loss of the reference module (set in training mode only).

    hidden [B, T_x, H] is the pre-injection hidden state; audio_pooled [B_a, H] is
    `pool_rotated_audio` of the rotated memory. With non-empty transcription_positions (b, s, e),
    spans with s < e <= T_x are mean-pooled and matched to the audio rows **by list index** (first
    n = min(B_a, N)); no valid span gives None. Otherwise every text token (padding included) is
    pooled. Loss = mean(1 − cos).
    """
    if transcription_positions is not None and len(transcription_positions) > 0:
        spans = pool_transcription_spans(hidden, transcription_positions)
        if spans is None:
            return None
        _, text_pooled = spans
        n = min(audio_pooled.size(0), text_pooled.size(0))
        return (1 - F.cosine_similarity(audio_pooled[:n], text_pooled[:n], dim=-1)).mean()
    return align_loss_per_row(hidden, audio_pooled).mean()


# ----------------------------------------------------------------------------- local branch


def conv1d_rows_reading_input(length: int, kernel_size: int, stride: int, padding: int) -> tuple[int, int]:
    """The output rows [first, last] of a Conv1d whose window reads x (first > last when none
    does): row t reads input rows t*stride - padding ... t*stride - padding + kernel_size - 1, and
    the rows that overlap [0, length) are consecutive. The rows outside are the bias alone."""
    if length == 0:
        return 0, -1
    length_out = (length + 2 * padding - kernel_size) // stride + 1
    first = max(0, -((kernel_size - 1 - padding) // stride))  # ceil((padding - kernel_size + 1) / stride)
    last = min(length_out - 1, (length - 1 + padding) // stride)
    return first, last


def strided_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int
) -> torch.Tensor:
    """nn.Conv1d on channels-last x [B, T, C_in] -> [B, T_out, C_out] (a transposed view).

    Where every window reads x (padding < kernel size), exactly F.conv1d. The sizes F.conv1d
    refuses or mis-shapes give what the extension computes: C_in = 0, T = 0 (every window in the
    padding) or no window over x give the bias broadcast (zeros without bias), C_out = 0 gives
    [B, T_out, 0], with zero gradients for x and weight. With padding >= kernel size the rows
    whose window lies in the padding are the bias and F.conv1d runs over the others only, so a
    padding of 2**40 is never materialised."""
    batch, length, channels_in = x.shape
    channels_out, _, kernel_size = weight.shape
    length_out = (length + 2 * padding - kernel_size) // stride + 1
    first, last = conv1d_rows_reading_input(length, kernel_size, stride, padding)
    if channels_in == 0 or channels_out == 0 or first > last:
        # Zeros [B, 1, 1] that keep x and weight in the graph (zero gradients) and read none of
        # their values, as the extension reads none: a NaN in x stays out of the bias rows.
        zeros = x[:, :0].sum(dim=(1, 2))[:, None, None] + weight[:0].sum()
        out = zeros.expand(batch, length_out, channels_out)
        return out + bias if bias is not None else out.contiguous()
    if first == 0 and last == length_out - 1:
        return F.conv1d(x.transpose(1, 2), weight, bias, stride=stride, padding=padding).transpose(1, 2)
    start, end = first * stride - padding, last * stride - padding + kernel_size  # the input rows read
    window = F.pad(x[:, max(start, 0) : min(end, length)].transpose(1, 2), (max(-start, 0), max(end - length, 0)))
    middle = F.conv1d(window, weight, bias, stride=stride).transpose(1, 2)

    def edge(rows: int) -> torch.Tensor:
        if bias is None:
            return middle.new_zeros(batch, rows, channels_out)
        return bias.to(middle.dtype).expand(batch, rows, channels_out)

    return torch.cat([edge(first), middle, edge(length_out - 1 - last)], dim=1)


def local_branch(
    target_layer_states: Sequence[torch.Tensor],
    layer_weights: torch.Tensor,
    proj_in_weight: torch.Tensor,
    proj_in_bias: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    stride: int = 4,
    conv: Callable[..., torch.Tensor] = strided_conv1d,
) -> torch.Tensor:
    """Local tokens [B, T_l, H] from the L target encoder states [B, T, D]: softmax layer mix
    (weights cast to the module dtype after the softmax) -> Linear(D -> H) -> Conv1d(H, H, k,
    stride, padding k//2) -> LayerNorm. The states are cast to the module dtype first, as the
    reference casts them to its weight dtype. `conv(x, weight, bias, stride, padding)` is the
    channels-last Conv1d, the reference's by default (benchmarks swap in the compiled one)."""
    dtype = proj_in_weight.dtype
    stacked = torch.stack([s.to(dtype) for s in target_layer_states], dim=0).permute(1, 2, 0, 3)  # [B, T, L, D]
    mix = torch.softmax(layer_weights, dim=-1).unsqueeze(-1).to(dtype)  # [L, 1]
    fused = (stacked * mix).sum(dim=2)
    features = F.linear(fused, proj_in_weight, proj_in_bias)
    features = conv(features, conv_weight, conv_bias, stride, conv_weight.shape[-1] // 2)
    return F.layer_norm(features, (features.shape[-1],), ln_weight, ln_bias, LAYER_NORM_EPS)
