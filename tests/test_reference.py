"""orca_kernels.reference against direct transcriptions of the formulas in docs/ops.md (loops over
elements in fp64) and against the reference's own building blocks (nn.MultiheadAttention,
nn.Conv1d, ...) bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from orca_kernels import reference
from tolerances import assert_matches_truth

# ----------------------------------------------------------------------------- sub-sampling


@pytest.mark.parametrize("num_local", [99, 100, 101, 375, 439])
def test_local_sample_indices(num_local):
    indices = reference.local_sample_indices(num_local, 100, torch.device("cpu"))
    if num_local <= 100:
        assert indices is None
        return
    # For these lengths the device formula equals the exact integer floor(i (n-1) / 99)
    # (docs/ops.md#sampled-local-rows).
    assert indices.tolist() == [i * (num_local - 1) // 99 for i in range(100)]
    assert indices.dtype == torch.long and indices[0] == 0 and indices[-1] == num_local - 1


def test_local_sample_indices_spec_prefix_and_none():
    assert reference.local_sample_indices(375, 100, torch.device("cpu"))[:8].tolist() == [0, 3, 7, 11, 15, 18, 22, 26]
    assert reference.local_sample_indices(375, None, torch.device("cpu")) is None
    assert reference.local_sample_indices(375, 7, torch.device("cpu")).tolist() == [0, 62, 124, 187, 249, 311, 374]


# ----------------------------------------------------------------------------- orthogonality losses


def cosine(u: list[float], v: list[float]) -> float:
    norm = lambda w: max(math.sqrt(sum(x * x for x in w)), 1e-12)  # noqa: E731  (F.normalize's clamp)
    return sum(a * b for a, b in zip(u, v, strict=True)) / (norm(u) * norm(v))


def test_diversity_loss_formula():
    g = torch.randn(2, 5, 7, dtype=torch.float64)
    g[1, 3] = 0.0  # a zero token: normalize clamps its norm, its cosines are 0
    batch, tokens, _ = g.shape
    rows = g.tolist()
    total = 0.0
    for b in range(batch):
        for i in range(tokens):
            for j in range(tokens):
                total += (cosine(rows[b][i], rows[b][j]) - (1.0 if i == j else 0.0)) ** 2
    expected = torch.tensor(total / (batch * tokens * tokens), dtype=torch.float64)
    assert_matches_truth(reference.ortho_diversity_loss(g), expected)


def test_diversity_loss_low_precision_is_float32():
    """The reference subtracts a float32 identity, which promotes a bf16 Gram matrix."""
    assert reference.ortho_diversity_loss(torch.randn(2, 4, 16, dtype=torch.bfloat16)).dtype == torch.float32


@pytest.mark.parametrize("num_local,max_samples", [(9, 100), (101, 100), (375, 100), (40, 7), (40, None)])
def test_cross_loss_formula(num_local, max_samples):
    g = torch.randn(2, 3, 6, dtype=torch.float64)
    local = torch.randn(2, num_local, 6, dtype=torch.float64)
    if max_samples is None or num_local <= max_samples:
        rows = list(range(num_local))
    else:  # torch.linspace(dtype=long) truncates toward zero
        rows = [int(i * (num_local - 1) / (max_samples - 1)) for i in range(max_samples)]
    total = sum(cosine(g[b, k].tolist(), local[b, t].tolist()) ** 2 for b in range(2) for k in range(3) for t in rows)
    expected = torch.tensor(total / (2 * 3 * len(rows)), dtype=torch.float64)
    assert_matches_truth(reference.ortho_cross_loss(g, local, max_samples), expected)


# ----------------------------------------------------------------------------- audio RoPE


def rope_tables_fp32(length: int, dim: int, scale: float, theta: float):
    """cos/sin [length, dim/2] as the spec computes them: fp32 pow, reciprocal, t/scale, product."""
    half = dim // 2
    inv_freq = 1.0 / torch.pow(torch.tensor(theta, dtype=torch.float32), torch.arange(half, dtype=torch.float32) / half)
    positions = torch.arange(length, dtype=torch.float32) / scale
    angles = positions[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def test_rope_formula_fp64():
    audio = torch.randn(2, 9, 12, dtype=torch.float64)
    cos, sin = rope_tables_fp32(9, 12, 2.5, 1e6)
    expected = torch.empty_like(audio)
    for b in range(2):
        for t in range(9):
            for i in range(6):
                c, s = float(cos[t, i]), float(sin[t, i])
                x1, x2 = float(audio[b, t, i]), float(audio[b, t, i + 6])
                expected[b, t, i] = x1 * c - x2 * s
                expected[b, t, i + 6] = x1 * s + x2 * c
    assert_matches_truth(reference.audio_rope(audio, 2.5, 1e6), expected)


def test_rope_positions_are_divided_not_multiplied():
    """t / 2.5 in fp32 differs from t * 0.4 at some t; the reference divides."""
    cos, _ = reference.rope_cos_sin(64, 8, 2.5, 10000.0)
    positions = torch.arange(64, dtype=torch.float32) / 2.5
    assert torch.equal(cos[0, :, 0], positions.cos())
    assert torch.equal(cos[0, :, :4], cos[0, :, 4:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rope_low_precision_op_sequence(dtype):
    """In bf16/fp16 every product and sum rounds separately, after cos/sin are cast to the dtype."""
    audio = torch.randn(3, 7, 10).to(dtype)
    cos, sin = rope_tables_fp32(7, 10, 2.5, 5e5)
    c, s = cos.to(dtype), sin.to(dtype)
    x1, x2 = audio[..., :5], audio[..., 5:]
    expected = torch.cat([(x1 * c) - (x2 * s), (x1 * s) + (x2 * c)], dim=-1)
    assert torch.equal(reference.audio_rope(audio, 2.5, 5e5), expected)


# ----------------------------------------------------------------------------- gated cross-attention


class SpecModule(nn.Module):
    """The reference module's layers, built as the reference builds them."""

    def __init__(self, hidden_size: int, num_heads: int, gate_init: float = 0.1):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.gate_proj = nn.Sequential(
            nn.Linear(hidden_size, hidden_size // 4), nn.GELU(), nn.Linear(hidden_size // 4, 1)
        )
        nn.init.normal_(self.gate_proj[-1].weight)  # nonzero here so the gate varies per token
        nn.init.constant_(self.gate_proj[-1].bias, gate_init)
        nn.init.normal_(self.cross_attn.in_proj_bias)
        self.ln = nn.LayerNorm(hidden_size)

    def params(self):
        return (
            self.cross_attn.in_proj_weight,
            self.cross_attn.in_proj_bias,
            self.cross_attn.out_proj.weight,
            self.cross_attn.out_proj.bias,
            self.gate_proj[0].weight,
            self.gate_proj[0].bias,
            self.gate_proj[2].weight,
            self.gate_proj[2].bias,
            self.ln.weight,
            self.ln.bias,
        )


def spec_attention(hidden, memory, module: SpecModule, num_heads: int, key_padding_mask=None):
    """Per-head softmax attention written out: Q = hWq+bq, [K|V] = mWkv+bkv, softmax(QKᵀ/√d)V."""
    embed = hidden.shape[-1]
    head_dim = embed // num_heads
    w, bias = module.cross_attn.in_proj_weight, module.cross_attn.in_proj_bias
    q = hidden @ w[:embed].T + bias[:embed]
    k = memory @ w[embed : 2 * embed].T + bias[embed : 2 * embed]
    v = memory @ w[2 * embed :].T + bias[2 * embed :]
    out = torch.zeros_like(q)
    for h in range(num_heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        scores = q[:, :, cols] @ k[:, :, cols].transpose(1, 2) / math.sqrt(head_dim)
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, :], float("-inf"))
        out[:, :, cols] = scores.softmax(dim=-1) @ v[:, :, cols]
    return out @ module.cross_attn.out_proj.weight.T + module.cross_attn.out_proj.bias


def spec_injection(hidden, audio, module: SpecModule, num_heads: int, key_padding_mask=None):
    memory = reference.audio_rope(audio.to(hidden.dtype), 2.5, 1e6)
    attended = spec_attention(hidden, memory, module, num_heads, key_padding_mask)
    mean = attended.mean(-1, keepdim=True)
    var = ((attended - mean) ** 2).mean(-1, keepdim=True)
    normed = (attended - mean) / torch.sqrt(var + 1e-5) * module.ln.weight + module.ln.bias
    up = hidden @ module.gate_proj[0].weight.T + module.gate_proj[0].bias
    gelu = 0.5 * up * (1 + torch.erf(up / math.sqrt(2)))
    gate = torch.sigmoid(gelu @ module.gate_proj[2].weight.T + module.gate_proj[2].bias)
    return hidden + gate * normed


@pytest.mark.parametrize("with_mask", [False, True])
def test_gated_cross_attention_formula_fp64(with_mask):
    module = SpecModule(16, 4).double()
    hidden, audio = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    mask = torch.tensor([[False] * 5 + [True] * 2, [True] + [False] * 6]) if with_mask else None
    got = reference.gated_cross_attention(
        hidden, audio, *module.params(), 4, key_padding_mask=mask, position_scale=2.5, rope_theta=1e6
    )
    assert_matches_truth(got, spec_injection(hidden, audio, module, 4, mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gated_cross_attention_matches_module_bitwise(dtype):
    """Same calls as the reference module (nn.MultiheadAttention's forward, LayerNorm, gate)."""
    module = SpecModule(32, 4).to(dtype)
    hidden, audio = torch.randn(3, 6, 32).to(dtype), torch.randn(3, 11, 32)  # audio is cast to hidden's dtype
    memory = reference.audio_rope(audio.to(dtype), 2.5, 10000.0)
    attended, _ = module.cross_attn(query=hidden, key=memory, value=memory, need_weights=False)
    expected = hidden + torch.sigmoid(module.gate_proj(hidden)) * module.ln(attended)
    got = reference.gated_cross_attention(hidden, audio, *module.params(), 4)
    assert torch.equal(got, expected)


def test_gated_cross_attention_empty_audio_returns_input():
    module = SpecModule(8, 2)
    hidden = torch.randn(2, 3, 8)
    assert reference.gated_cross_attention(hidden, torch.randn(2, 0, 8), *module.params(), 2) is hidden


# ----------------------------------------------------------------------------- alignment loss


def spec_align(hidden, rotated, spans):
    audio = [torch.nn.functional.normalize(rotated[b].mean(0), dim=-1).tolist() for b in range(rotated.shape[0])]
    if spans is None:
        text = [hidden[b].mean(0).tolist() for b in range(hidden.shape[0])]
    else:
        text = [hidden[b, s:e].mean(0).tolist() for b, s, e in spans if s < e <= hidden.shape[1]]
        if not text:
            return None
    n = min(len(audio), len(text))
    return torch.tensor(sum(1 - cosine(audio[i], text[i]) for i in range(n)) / n, dtype=torch.float64)


@pytest.mark.parametrize(
    "spans",
    [
        None,
        [],
        [(0, 1, 4), (1, 0, 2)],
        [(1, 2, 5), (0, 3, 3), (0, 0, 9)],
        [(0, 2, 2)],
        [(0, 0, 6), (1, 1, 6), (0, 2, 3)],
    ],
)
def test_layer_align_loss_formula(spans):
    hidden = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    rotated = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    got = reference.layer_align_loss(hidden, reference.pool_rotated_audio(rotated), spans)
    expected = spec_align(hidden.detach(), rotated.detach(), spans if spans else None)
    if expected is None:
        assert got is None
        return
    assert_matches_truth(got.detach(), expected)
    got.backward()
    assert rotated.grad is None  # the pooled audio is computed without gradient
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- local branch


def test_local_branch_matches_modules_bitwise():
    layers, batch, frames, d_enc, d_llm = 4, 2, 37, 12, 8
    states = [torch.randn(batch, frames, d_enc) for _ in range(layers)]
    layer_weights = torch.randn(layers)
    proj_in, conv, ln = nn.Linear(d_enc, d_llm), nn.Conv1d(d_llm, d_llm, 5, stride=4, padding=2), nn.LayerNorm(d_llm)
    stacked = torch.stack(states, dim=0).permute(1, 2, 0, 3)
    fused = (stacked * torch.softmax(layer_weights, dim=-1).unsqueeze(-1)).sum(dim=2)
    expected = ln(conv(proj_in(fused).transpose(1, 2)).transpose(1, 2))
    got = reference.local_branch(
        states, layer_weights, proj_in.weight, proj_in.bias, conv.weight, conv.bias, ln.weight, ln.bias, stride=4
    )
    assert got.shape == (batch, (frames + 4 - 5) // 4 + 1, d_llm)
    assert torch.equal(got, expected)


def test_local_branch_token_count_for_whisper_frames():
    states = [torch.randn(1, 1500, 4) for _ in range(2)]
    conv_weight = torch.randn(4, 4, 5)
    out = reference.local_branch(
        states, torch.zeros(2), torch.eye(4), torch.zeros(4), conv_weight, torch.zeros(4), torch.ones(4), torch.zeros(4)
    )
    assert out.shape == (1, 375, 4)
