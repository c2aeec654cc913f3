"""Flash cross-attention (the attention core of the gated cross-attention, docs/ops.md#flash_cross_attention).

`flash_cross_attention(q[B, Tx, nh, hd], k[B, Ta, nh, hd], v[B, Ta, nh, hd], key_padding_mask[B, Ta] | None,
*, scale=None) -> out[B, Tx, nh, hd]` computes, per batch element and head, softmax(q kᵀ · scale) v over the
keys that are not masked (non-causal; scale defaults to 1/sqrt(hd)); `out` is contiguous, so
`out.view(B, Tx, nh * hd)` feeds the output projection directly. Forward and backward are Triton
kernels in the FlashAttention-2 form: online softmax, no [Tx, Ta] matrix in memory.

Inputs are read in place through their strides (only a last dimension with stride != 1 is copied):
in the module q is a view of the Q projection and k, v are column halves of one packed [B, Ta, 2H]
K/V projection. key_padding_mask follows nn.MultiheadAttention: True = ignore that key.

Fully masked query rows (every key of a batch element masked, or Ta = 0) give an output of exactly
0 and zero gradients. That is what the reference gives: `F.multi_head_attention_forward(...,
key_padding_mask=mask, need_weights=False)` on the CPU (torch 2.14) turns the mask into an additive
-inf mask and calls SDPA, whose softmax is a "safe softmax" that returns 0 for an all -inf row
(not NaN); the attention output is then 0 before out_proj, and no gradient flows through such a
row (checked in fp16/bf16/fp32/fp64, train and eval, and against the module's path in the tests).
The kernels take the mask the same way, as an additive [B, Ta] bias of 0 / -inf, keep a row max
of -inf for such rows, write 0, and store a logsumexp of +inf, which makes every recomputed
probability in the backward exactly 0.

Numerics: fp16/bf16 inputs use fp16/bf16 tensor-core dots (P is rounded to the input dtype
before P·V, as in FlashAttention-2) with fp32 accumulation and softmax statistics; fp32 inputs use
IEEE fp32 dots (no TF32); fp64 runs entirely in fp64 (for gradcheck). The softmax runs in base 2
(scores pre-multiplied by scale·log2(e)). Under triton 3.8's interpreter tl.dot on bf16 operands is
wrong (docs/architecture.md#interpreter-workarounds), so bf16 dot operands are upcast to fp32
there and fp32 -> bf16 stores are rounded to nearest even by hand (the interpreter truncates); a
GPU runs native bf16.

Backward (deterministic: no atomics): a preprocess kernel computes delta = rowsum(dO ∘ O); one
kernel per key block accumulates dK and dV over all query blocks; one kernel per query block
accumulates dQ over all key blocks. Both recompute P = exp2(q kᵀ · scale·log2e − lse) from the
saved row logsumexp. Grids are (row blocks, nh, B), so programs of one (b, h) run together and
share its K/V in L2, and neither grid axis over heads or batch exceeds CUDA's 65535 limit.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from orca_kernels import _tuned, _utils, dispatch, reference
from orca_kernels._triton_helpers import accumulator_dtype, cast_for_store, kernel_dtypes, register_cap
from orca_kernels._utils import (
    KERNELS_INTERPRETED,
    device_context,
    new_output,
    refuse_double_backward,
    use_triton,
)
from orca_kernels.validation import check_backend, check_key_padding_mask, check_tensor

OP = "flash_cross_attention"
BACKENDS = ("auto", "sdpa", "triton", "torch")
MAX_HEAD_DIM = 256  # the kernels keep [BLOCK, head_dim] tiles in registers
MAX_ONE_PASS_KEY_BLOCKS = 4  # see one_pass_backward
ONE_PASS_MAX_WIDTH = 64  # see one_pass_backward
LOG2E = math.log2(math.e)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _scalar(hi, lo, ACC_DTYPE: tl.constexpr):
    # Float kernel arguments are fp32 on the GPU: fp64 constants arrive as hi + lo, exact to ~2^-48.
    return tl.zeros((), ACC_DTYPE) + hi + lo


@triton.jit
def _key_bias(bias_ptr, b, cols, Ta, sbb, sbt, HAS_MASK: tl.constexpr):
    """[BLOCK_N] additive score bias of keys `cols`: 0, or -inf where masked or past Ta."""
    if HAS_MASK:
        return tl.load(bias_ptr + b * sbb + cols.to(tl.int64) * sbt, mask=cols < Ta, other=float("-inf"))
    else:
        return tl.where(cols < Ta, 0.0, float("-inf"))


@triton.jit
def _mask_scores(s, bias, HAS_MASK: tl.constexpr):
    """The score tile `s` with -inf where the key bias `bias`, broadcast along the tile's query
    axis (bias[None, :], or bias[:, None] on a transposed tile), is -inf. With a mask, a masked key
    scores -inf whatever q and k hold (a NaN there must not reach the row). Without one only the
    tail past Ta is -inf, which the bias already added, and a NaN in q makes the row NaN anyway."""
    if HAS_MASK:
        s = tl.where(bias == float("-inf"), float("-inf"), s)
    return s


@triton.jit
def _tile_mask(rows, d, num_rows, head_dim, EVEN_D: tl.constexpr):
    """Mask of a [len(rows), BLOCK_D] tile's elements inside [num_rows, head_dim]. EVEN_D (head_dim
    == BLOCK_D, e.g. 64 or 128) drops the column test, so loads and stores along the head dim
    stay whole vectors."""
    if EVEN_D:
        mask = (rows < num_rows)[:, None]
    else:
        mask = (rows < num_rows)[:, None] & (d < head_dim)[None, :]
    return mask


@triton.jit
def _load_tile(ptr, rows, d, num_rows, head_dim, row_stride, EVEN_D: tl.constexpr):
    """[len(rows), BLOCK_D] tile of a [num_rows, head_dim] slab with unit last-dim stride; 0 outside."""
    offsets = rows.to(tl.int64)[:, None] * row_stride + d[None, :]
    return tl.load(ptr + offsets, mask=_tile_mask(rows, d, num_rows, head_dim, EVEN_D), other=0.0)


@triton.jit
def _load_keys(ptr, cols, d, Ta, head_dim, row_stride, bias, EVEN_D: tl.constexpr, HAS_MASK: tl.constexpr):
    """[len(cols), BLOCK_D] tile of keys or values: 0 past Ta and, with a mask, at masked keys
    (bias -inf), so that nothing a masked key holds, a NaN included, reaches a dot (0 · NaN would
    spread it to the output and to dQ)."""
    mask = _tile_mask(cols, d, Ta, head_dim, EVEN_D)
    if HAS_MASK:
        mask = mask & (bias != float("-inf"))[:, None]
    return tl.load(ptr + cols.to(tl.int64)[:, None] * row_stride + d[None, :], mask=mask, other=0.0)


@triton.jit
def _dot_t(a, a_tail, b, b_tail, ACC_DTYPE: tl.constexpr, HAS_TAIL: tl.constexpr):
    """a · bᵀ over the head dim, as one dot over the main columns plus one over the tail's."""
    out = tl.dot(a, tl.trans(b), input_precision="ieee").to(ACC_DTYPE)
    if HAS_TAIL:
        out += tl.dot(a_tail, tl.trans(b_tail), input_precision="ieee").to(ACC_DTYPE)
    return out


@triton.jit
def _flash_cross_attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    out_ptr,
    lse_ptr,
    Tx,
    Ta,
    num_heads,
    head_dim,
    qk_scale_hi,
    qk_scale_lo,
    sqb,
    sqt,
    sqh,
    skb,
    skt,
    skh,
    svb,
    svt,
    svh,
    sbb,
    sbt,
    sob,
    sot,
    soh,
    keys_per_split,
    sos,
    sls,
    HAS_MASK: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """out[b, rows, h] and lse[b, h, rows] (base 2, of the scores · scale·log2e) for BLOCK_M query rows.

    SPLIT (flash-decoding): program_id(0) also picks a range of `keys_per_split` keys (a multiple
    of BLOCK_N); the program writes that range's normalised partial output and logsumexp at split
    offsets `sos` / `sls` (fp32 scratch), which `_flash_decode_combine_kernel` merges."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    qk_scale = _scalar(qk_scale_hi, qk_scale_lo, ACC_DTYPE)
    row_blocks = tl.cdiv(Tx, BLOCK_M)
    split = tl.program_id(0) // row_blocks
    rows = (tl.program_id(0) % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    key_begin = split * keys_per_split
    key_end = tl.minimum(Ta, key_begin + keys_per_split)
    d = tl.arange(0, BLOCK_D)
    dt = BLOCK_D + tl.arange(0, BLOCK_DT)
    q_base = q_ptr + b * sqb + h * sqh
    q = _load_tile(q_base, rows, d, Tx, head_dim, sqt, EVEN_D).to(DOT_DTYPE)
    q_t = _load_tile(q_base, rows, dt, Tx, head_dim, sqt, False).to(DOT_DTYPE) if HAS_TAIL else q
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh

    m_i = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_M,), ACC_DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC_DTYPE)
    acc_t = tl.zeros((BLOCK_M, BLOCK_DT), ACC_DTYPE)  # the tail columns' (unused without a tail)
    valid_keys = 0  # unmasked keys of this batch element: none makes every row fully masked
    for n0 in range(key_begin, key_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        bias = _key_bias(bias_ptr, b, cols, Ta, sbb, sbt, HAS_MASK)
        if HAS_MASK:
            valid_keys += tl.sum((bias == 0.0).to(tl.int32), 0)
        k = _load_keys(k_base, cols, d, Ta, head_dim, skt, bias, EVEN_D, HAS_MASK).to(DOT_DTYPE)
        k_t = _load_keys(k_base, cols, dt, Ta, head_dim, skt, bias, False, HAS_MASK).to(DOT_DTYPE) if HAS_TAIL else k
        s = _dot_t(q, q_t, k, k_t, ACC_DTYPE, HAS_TAIL) * qk_scale + bias[None, :]
        s = _mask_scores(s, bias[None, :], HAS_MASK)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no valid key so far has max -inf: subtract 0 instead, so p = 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_keys(v_base, cols, d, Ta, head_dim, svt, bias, EVEN_D, HAS_MASK).to(DOT_DTYPE)
        # out_dtype: triton 3.6 asserts it equals a non-fp32 accumulator's dtype (no default from acc).
        acc = tl.dot(p.to(DOT_DTYPE), v, acc * alpha[:, None], input_precision="ieee", out_dtype=ACC_DTYPE)
        if HAS_TAIL:
            v_t = _load_keys(v_base, cols, dt, Ta, head_dim, svt, bias, False, HAS_MASK).to(DOT_DTYPE)
            acc_t = tl.dot(p.to(DOT_DTYPE), v_t, acc_t * alpha[:, None], input_precision="ieee", out_dtype=ACC_DTYPE)
        m_i = m_new

    # Fully masked rows (no unmasked key, whatever the scores): out 0 (the reference's safe
    # softmax) even where a masked value is NaN (acc = 0 · NaN), and lse +inf, which the backward
    # reads as "fully masked". A row with unmasked keys and l = 0 (a -inf in q) is 0/0 = NaN, as
    # the reference gives for a non-finite query.
    no_key = (valid_keys == 0) if HAS_MASK else (key_end <= key_begin)
    out = tl.where(no_key, 0.0, acc / l_i[:, None])
    if SPLIT:
        # A split without an unmasked key weighs nothing in the combine (-inf); one whose keys all
        # scored -inf (l = 0) is NaN there, as the whole row is without the split.
        lse = tl.where(no_key, float("-inf"), tl.where(l_i == 0.0, float("nan"), m_i + tl.log2(l_i)))
    else:
        lse = tl.where(no_key, float("inf"), m_i + tl.log2(l_i))
    out_ptr += split.to(tl.int64) * sos
    lse_ptr += split.to(tl.int64) * sls
    o_offsets = b * sob + h * soh + rows.to(tl.int64)[:, None] * sot + d[None, :]
    tl.store(out_ptr + o_offsets, cast_for_store(out, out_ptr), mask=_tile_mask(rows, d, Tx, head_dim, EVEN_D))
    if HAS_TAIL:
        out_t = tl.where(no_key, 0.0, acc_t / l_i[:, None])
        o_offsets = b * sob + h * soh + rows.to(tl.int64)[:, None] * sot + dt[None, :]
        tl.store(out_ptr + o_offsets, cast_for_store(out_t, out_ptr), mask=_tile_mask(rows, dt, Tx, head_dim, False))
    tl.store(lse_ptr + (b * num_heads + h) * Tx + rows, lse, mask=rows < Tx)


@triton.jit
def _flash_decode_combine_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    lse_ptr,
    Tx,
    num_heads,
    head_dim,
    num_splits,
    sps,
    spb,
    spt,
    sph,
    sls,
    sob,
    sot,
    soh,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """out[b, rows, h] and lse[b, h, rows] from the splits' partial outputs (strides sp*) and
    logsumexps (split stride sls): out = Σ_s 2^(lse_s − lse) · out_s with lse = log2 Σ_s 2^lse_s.
    No split with a key: out 0 and lse +inf, the unsplit kernel's fully masked row."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    stats = part_lse_ptr + (b * num_heads + h) * Tx + rows
    m = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    for split in range(0, num_splits):
        m = tl.maximum(m, tl.load(stats + split * sls, mask=rows < Tx, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros((BLOCK_M,), ACC_DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC_DTYPE)
    for split in range(0, num_splits):
        weight = tl.exp2(tl.load(stats + split * sls, mask=rows < Tx, other=float("-inf")) - m_use)
        part = _load_tile(part_out_ptr + split * sps + b * spb + h * sph, rows, d, Tx, head_dim, spt, EVEN_D)
        total += weight
        acc += weight[:, None] * part
    no_key = m == float("-inf")
    out = tl.where(no_key[:, None], 0.0, acc / total[:, None])
    lse = tl.where(no_key, float("inf"), m + tl.log2(total))
    o_offsets = b * sob + h * soh + rows.to(tl.int64)[:, None] * sot + d[None, :]
    tl.store(out_ptr + o_offsets, cast_for_store(out, out_ptr), mask=_tile_mask(rows, d, Tx, head_dim, EVEN_D))
    tl.store(lse_ptr + (b * num_heads + h) * Tx + rows, lse, mask=rows < Tx)


@triton.jit
def _walked(length, lse_ptr, HAS_MASK: tl.constexpr):
    """How far a backward loop of one (batch, head) walks over its `length` query rows or keys:
    all of them, or none when the batch element's keys are all masked. Every row of a batch
    element sees the same keys, so the forward's mark of a fully masked row (lse +inf, at lse_ptr
    for row 0) holds for all of them: dQ, dK and dV are then exactly 0, even where a masked q, k
    or v holds NaN (which 0 · NaN would spread)."""
    if HAS_MASK:
        return tl.where(tl.load(lse_ptr) == float("inf"), 0, length)
    else:
        return length


@triton.jit
def _flash_cross_attention_bwd_preprocess_kernel(
    out_ptr,
    do_ptr,
    delta_ptr,
    Tx,
    num_heads,
    head_dim,
    sob,
    sot,
    soh,
    sdob,
    sdot,
    sdoh,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """delta[b, h, rows] = Σ_d dO ∘ O (= Σ_keys P ∘ dP)."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    o = _load_tile(out_ptr + b * sob + h * soh, rows, d, Tx, head_dim, sot, EVEN_D).to(ACC_DTYPE)
    do = _load_tile(do_ptr + b * sdob + h * sdoh, rows, d, Tx, head_dim, sdot, EVEN_D).to(ACC_DTYPE)
    tl.store(delta_ptr + (b * num_heads + h) * Tx + rows, tl.sum(o * do, 1), mask=rows < Tx)


@triton.jit
def _load_key_block(
    k_base,
    v_base,
    cols,
    d,
    dt,
    Ta,
    head_dim,
    skt,
    svt,
    bias,
    DOT_DTYPE: tl.constexpr,
    EVEN_D: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """(k, v, k tail, v tail) of the keys `cols` in the dot dtype, masked keys as zeros."""
    k = _load_keys(k_base, cols, d, Ta, head_dim, skt, bias, EVEN_D, HAS_MASK).to(DOT_DTYPE)
    v = _load_keys(v_base, cols, d, Ta, head_dim, svt, bias, EVEN_D, HAS_MASK).to(DOT_DTYPE)
    k_t = _load_keys(k_base, cols, dt, Ta, head_dim, skt, bias, False, HAS_MASK).to(DOT_DTYPE) if HAS_TAIL else k
    v_t = _load_keys(v_base, cols, dt, Ta, head_dim, svt, bias, False, HAS_MASK).to(DOT_DTYPE) if HAS_TAIL else v
    return k, v, k_t, v_t


@triton.jit
def _key_block_step(
    k,
    v,
    k_t,
    v_t,
    bias,
    dk,
    dv,
    dk_t,
    dv_t,
    q_base,
    do_base,
    lse_ptr,
    delta_ptr,
    rows,
    d,
    dt,
    Tx,
    head_dim,
    sqt,
    sdot,
    qk_scale,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    EVEN_D: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """One query block's share of a key block's gradients, on transposed tiles: dV += Pᵀ dO and
    dK += dSᵀ Q (unscaled) with dS = P ∘ (dO Vᵀ − delta), P recomputed from the saved logsumexp.
    Returns (dk, dv, dk tail, dv tail, dSᵀ in the dot dtype); lse_ptr and delta_ptr point at the
    (batch, head)'s statistics. Shared by the dK/dV kernel and the one-pass backward."""
    q = _load_tile(q_base, rows, d, Tx, head_dim, sqt, EVEN_D).to(DOT_DTYPE)
    do = _load_tile(do_base, rows, d, Tx, head_dim, sdot, EVEN_D).to(DOT_DTYPE)
    q_t = _load_tile(q_base, rows, dt, Tx, head_dim, sqt, False).to(DOT_DTYPE) if HAS_TAIL else q
    do_t = _load_tile(do_base, rows, dt, Tx, head_dim, sdot, False).to(DOT_DTYPE) if HAS_TAIL else do
    # Rows past Tx get lse = +inf, hence P = 0, like fully masked rows.
    lse = tl.load(lse_ptr + rows, mask=rows < Tx, other=float("inf"))
    delta = tl.load(delta_ptr + rows, mask=rows < Tx, other=0.0)
    s_t = _dot_t(k, k_t, q, q_t, ACC_DTYPE, HAS_TAIL) * qk_scale + bias[:, None]
    s_t = _mask_scores(s_t, bias[:, None], HAS_MASK)
    p_t = tl.exp2(s_t - lse[None, :])
    # out_dtype: triton 3.6 asserts it equals a non-fp32 accumulator's dtype (no default from acc).
    dv = tl.dot(p_t.to(DOT_DTYPE), do, dv, input_precision="ieee", out_dtype=ACC_DTYPE)
    if HAS_TAIL:
        dv_t = tl.dot(p_t.to(DOT_DTYPE), do_t, dv_t, input_precision="ieee", out_dtype=ACC_DTYPE)
    dp_t = _dot_t(v, v_t, do, do_t, ACC_DTYPE, HAS_TAIL)
    ds_t = (p_t * (dp_t - delta[None, :])).to(DOT_DTYPE)
    dk = tl.dot(ds_t, q, dk, input_precision="ieee", out_dtype=ACC_DTYPE)
    if HAS_TAIL:
        dk_t = tl.dot(ds_t, q_t, dk_t, input_precision="ieee", out_dtype=ACC_DTYPE)
    return dk, dv, dk_t, dv_t, ds_t


@triton.jit
def _store_key_grads(
    dk_ptr,
    dv_ptr,
    dk,
    dv,
    dk_t,
    dv_t,
    bias,
    scale,
    g_base,
    cols,
    d,
    dt,
    Ta,
    head_dim,
    sgt,
    EVEN_D: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """Store a key block's dK (times scale) and dV at offset g_base (row stride sgt); a masked key
    gets exactly zero gradients, even from a query row holding NaN (0 · NaN)."""
    dk = dk * scale
    if HAS_MASK:
        padded = (bias == float("-inf"))[:, None]
        dk, dv = tl.where(padded, 0.0, dk), tl.where(padded, 0.0, dv)
    g_offsets = g_base + cols.to(tl.int64)[:, None] * sgt + d[None, :]
    g_mask = _tile_mask(cols, d, Ta, head_dim, EVEN_D)
    tl.store(dk_ptr + g_offsets, cast_for_store(dk, dk_ptr), mask=g_mask)
    tl.store(dv_ptr + g_offsets, cast_for_store(dv, dv_ptr), mask=g_mask)
    if HAS_TAIL:
        dk_t = dk_t * scale
        if HAS_MASK:
            dk_t, dv_t = tl.where(padded, 0.0, dk_t), tl.where(padded, 0.0, dv_t)
        g_offsets = g_base + cols.to(tl.int64)[:, None] * sgt + dt[None, :]
        g_mask = _tile_mask(cols, dt, Ta, head_dim, False)
        tl.store(dk_ptr + g_offsets, cast_for_store(dk_t, dk_ptr), mask=g_mask)
        tl.store(dv_ptr + g_offsets, cast_for_store(dv_t, dv_ptr), mask=g_mask)


@triton.jit
def _flash_cross_attention_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    Tx,
    Ta,
    num_heads,
    head_dim,
    qk_scale_hi,
    qk_scale_lo,
    scale_hi,
    scale_lo,
    sqb,
    sqt,
    sqh,
    skb,
    skt,
    skh,
    svb,
    svt,
    svh,
    sbb,
    sbt,
    sdob,
    sdot,
    sdoh,
    sgb,
    sgt,
    sgh,
    HAS_MASK: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    HAS_TAIL: tl.constexpr,
):
    """dK, dV [B, Ta, nh, hd] (strides sg*) of BLOCK_N keys, accumulated over every query block:
    dV = Pᵀ dO, dK = scale · dSᵀ Q with dS = P ∘ (dO Vᵀ − delta). Works on transposed tiles."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    qk_scale = _scalar(qk_scale_hi, qk_scale_lo, ACC_DTYPE)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dt = BLOCK_D + tl.arange(0, BLOCK_DT)
    bias = _key_bias(bias_ptr, b, cols, Ta, sbb, sbt, HAS_MASK)
    k, v, k_t, v_t = _load_key_block(
        k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh, cols, d, dt, Ta, head_dim, skt, svt, bias,
        DOT_DTYPE, EVEN_D, HAS_TAIL, HAS_MASK,
    )  # fmt: skip
    q_base = q_ptr + b * sqb + h * sqh
    do_base = do_ptr + b * sdob + h * sdoh
    stats_base = (b * num_heads + h) * Tx

    dk = tl.zeros((BLOCK_N, BLOCK_D), ACC_DTYPE)
    dv = tl.zeros((BLOCK_N, BLOCK_D), ACC_DTYPE)
    dk_t = tl.zeros((BLOCK_N, BLOCK_DT), ACC_DTYPE)  # the tail columns' (unused without a tail)
    dv_t = tl.zeros((BLOCK_N, BLOCK_DT), ACC_DTYPE)
    for m0 in range(0, _walked(Tx, lse_ptr + stats_base, HAS_MASK), BLOCK_M):
        dk, dv, dk_t, dv_t, _ = _key_block_step(
            k, v, k_t, v_t, bias, dk, dv, dk_t, dv_t, q_base, do_base, lse_ptr + stats_base,
            delta_ptr + stats_base, m0 + tl.arange(0, BLOCK_M), d, dt, Tx, head_dim, sqt, sdot, qk_scale,
            DOT_DTYPE, ACC_DTYPE, EVEN_D, HAS_TAIL, HAS_MASK,
        )  # fmt: skip
    _store_key_grads(
        dk_ptr, dv_ptr, dk, dv, dk_t, dv_t, bias, _scalar(scale_hi, scale_lo, ACC_DTYPE), b * sgb + h * sgh,
        cols, d, dt, Ta, head_dim, sgt, EVEN_D, HAS_TAIL, HAS_MASK,
    )  # fmt: skip


@triton.jit
def _flash_cross_attention_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    Tx,
    Ta,
    num_heads,
    head_dim,
    qk_scale_hi,
    qk_scale_lo,
    scale_hi,
    scale_lo,
    sqb,
    sqt,
    sqh,
    skb,
    skt,
    skh,
    svb,
    svt,
    svh,
    sbb,
    sbt,
    sdob,
    sdot,
    sdoh,
    sgb,
    sgt,
    sgh,
    HAS_MASK: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    HAS_TAIL: tl.constexpr,
):
    """dQ [B, Tx, nh, hd] (strides sg*) of BLOCK_M query rows: scale · dS K over every key block."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    qk_scale = _scalar(qk_scale_hi, qk_scale_lo, ACC_DTYPE)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dt = BLOCK_D + tl.arange(0, BLOCK_DT)
    q_base = q_ptr + b * sqb + h * sqh
    do_base = do_ptr + b * sdob + h * sdoh
    q = _load_tile(q_base, rows, d, Tx, head_dim, sqt, EVEN_D).to(DOT_DTYPE)
    do = _load_tile(do_base, rows, d, Tx, head_dim, sdot, EVEN_D).to(DOT_DTYPE)
    q_t = _load_tile(q_base, rows, dt, Tx, head_dim, sqt, False).to(DOT_DTYPE) if HAS_TAIL else q
    do_t = _load_tile(do_base, rows, dt, Tx, head_dim, sdot, False).to(DOT_DTYPE) if HAS_TAIL else do
    stats_base = (b * num_heads + h) * Tx
    lse = tl.load(lse_ptr + stats_base + rows, mask=rows < Tx, other=float("inf"))
    delta = tl.load(delta_ptr + stats_base + rows, mask=rows < Tx, other=0.0)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh

    dq = tl.zeros((BLOCK_M, BLOCK_D), ACC_DTYPE)
    dq_t = tl.zeros((BLOCK_M, BLOCK_DT), ACC_DTYPE)  # the tail columns' (unused without a tail)
    for n0 in range(0, _walked(Ta, lse_ptr + stats_base, HAS_MASK), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        bias = _key_bias(bias_ptr, b, cols, Ta, sbb, sbt, HAS_MASK)
        k = _load_keys(k_base, cols, d, Ta, head_dim, skt, bias, EVEN_D, HAS_MASK).to(DOT_DTYPE)
        v = _load_keys(v_base, cols, d, Ta, head_dim, svt, bias, EVEN_D, HAS_MASK).to(DOT_DTYPE)
        k_t = _load_keys(k_base, cols, dt, Ta, head_dim, skt, bias, False, HAS_MASK).to(DOT_DTYPE) if HAS_TAIL else k
        v_t = _load_keys(v_base, cols, dt, Ta, head_dim, svt, bias, False, HAS_MASK).to(DOT_DTYPE) if HAS_TAIL else v
        s = _dot_t(q, q_t, k, k_t, ACC_DTYPE, HAS_TAIL) * qk_scale + bias[None, :]
        s = _mask_scores(s, bias[None, :], HAS_MASK)
        p = tl.exp2(s - lse[:, None])
        dp = _dot_t(do, do_t, v, v_t, ACC_DTYPE, HAS_TAIL)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(DOT_DTYPE), k, dq, input_precision="ieee", out_dtype=ACC_DTYPE)  # for triton 3.6
        if HAS_TAIL:
            dq_t = tl.dot(ds.to(DOT_DTYPE), k_t, dq_t, input_precision="ieee", out_dtype=ACC_DTYPE)
    dq = dq * _scalar(scale_hi, scale_lo, ACC_DTYPE)

    g_offsets = b * sgb + h * sgh + rows.to(tl.int64)[:, None] * sgt + d[None, :]
    tl.store(dq_ptr + g_offsets, cast_for_store(dq, dq_ptr), mask=_tile_mask(rows, d, Tx, head_dim, EVEN_D))
    if HAS_TAIL:
        dq_t = dq_t * _scalar(scale_hi, scale_lo, ACC_DTYPE)
        g_offsets = b * sgb + h * sgh + rows.to(tl.int64)[:, None] * sgt + dt[None, :]
        tl.store(dq_ptr + g_offsets, cast_for_store(dq_t, dq_ptr), mask=_tile_mask(rows, dt, Tx, head_dim, False))


@triton.jit
def _flash_cross_attention_bwd_fused_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    dq_acc_ptr,
    Tx,
    Ta,
    num_heads,
    head_dim,
    qk_scale_hi,
    qk_scale_lo,
    scale_hi,
    scale_lo,
    sqb,
    sqt,
    sqh,
    skb,
    skt,
    skh,
    svb,
    svt,
    svh,
    sbb,
    sbt,
    sdob,
    sdot,
    sdoh,
    sgb,
    sgt,
    sgh,
    sdqb,
    sdqt,
    sdqh,
    acc_width,
    HAS_MASK: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    HAS_TAIL: tl.constexpr,
):
    """dQ [B, Tx, nh, hd] (strides sdq*), dK, dV [B, Ta, nh, hd] (strides sg*) of one (batch, head) in one
    pass: 5 tile products per (key block, query block) pair (S, dP, dV, dK and dQ), where the
    two-kernel backward recomputes S and dP for dQ (7).

    The program walks the key blocks in order; for each it accumulates dK and dV in registers over
    every query block, and adds each query block's dS·K to dQ's fp32 partial sum, which this
    program alone owns (dq_acc [B, nh, Tx, acc_width], no atomics: the same bits at every
    run). The last key block writes dQ itself, scaled and in its dtype, so the partial sums never
    need a pass of their own."""
    h = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    qk_scale = _scalar(qk_scale_hi, qk_scale_lo, ACC_DTYPE)
    scale = _scalar(scale_hi, scale_lo, ACC_DTYPE)
    d = tl.arange(0, BLOCK_D)
    dt = BLOCK_D + tl.arange(0, BLOCK_DT)
    q_base = q_ptr + b * sqb + h * sqh
    do_base = do_ptr + b * sdob + h * sdoh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    stats_base = (b * num_heads + h) * Tx
    acc_base = dq_acc_ptr + stats_base * acc_width
    walked = _walked(Tx, lse_ptr + stats_base, HAS_MASK)
    last = tl.cdiv(Ta, BLOCK_N) - 1
    if walked == 0:
        # Every key of this batch element is masked: dQ is 0 (the loops below write only dK, dV).
        for m0 in range(0, Tx, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            zero = tl.zeros((BLOCK_M, BLOCK_D), ACC_DTYPE)
            g_offsets = b * sdqb + h * sdqh + rows.to(tl.int64)[:, None] * sdqt + d[None, :]
            tl.store(dq_ptr + g_offsets, cast_for_store(zero, dq_ptr), mask=_tile_mask(rows, d, Tx, head_dim, EVEN_D))
            if HAS_TAIL:
                zero_t = tl.zeros((BLOCK_M, BLOCK_DT), ACC_DTYPE)
                g_offsets = b * sdqb + h * sdqh + rows.to(tl.int64)[:, None] * sdqt + dt[None, :]
                tl.store(
                    dq_ptr + g_offsets, cast_for_store(zero_t, dq_ptr), mask=_tile_mask(rows, dt, Tx, head_dim, False)
                )
    for block in range(0, last + 1):
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
        bias = _key_bias(bias_ptr, b, cols, Ta, sbb, sbt, HAS_MASK)
        k, v, k_t, v_t = _load_key_block(
            k_base, v_base, cols, d, dt, Ta, head_dim, skt, svt, bias, DOT_DTYPE, EVEN_D, HAS_TAIL, HAS_MASK
        )
        dk = tl.zeros((BLOCK_N, BLOCK_D), ACC_DTYPE)
        dv = tl.zeros((BLOCK_N, BLOCK_D), ACC_DTYPE)
        dk_t = tl.zeros((BLOCK_N, BLOCK_DT), ACC_DTYPE)  # the tail columns' (unused without a tail)
        dv_t = tl.zeros((BLOCK_N, BLOCK_DT), ACC_DTYPE)
        for m0 in range(0, walked, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            dk, dv, dk_t, dv_t, ds_t = _key_block_step(
                k, v, k_t, v_t, bias, dk, dv, dk_t, dv_t, q_base, do_base, lse_ptr + stats_base,
                delta_ptr + stats_base, rows, d, dt, Tx, head_dim, sqt, sdot, qk_scale,
                DOT_DTYPE, ACC_DTYPE, EVEN_D, HAS_TAIL, HAS_MASK,
            )  # fmt: skip
            # dQ of these rows: this key block's dS·K added to the partial sum of the blocks before.
            ds = tl.trans(ds_t)
            row_mask = (rows < Tx)[:, None]
            acc_offsets = rows.to(tl.int64)[:, None] * acc_width + d[None, :]
            dq = tl.dot(ds, k, input_precision="ieee", out_dtype=ACC_DTYPE)
            if block > 0:
                dq += tl.load(acc_base + acc_offsets, mask=row_mask, other=0.0)
            if block == last:
                g_offsets = b * sdqb + h * sdqh + rows.to(tl.int64)[:, None] * sdqt + d[None, :]
                dq_mask = _tile_mask(rows, d, Tx, head_dim, EVEN_D)
                tl.store(dq_ptr + g_offsets, cast_for_store(dq * scale, dq_ptr), mask=dq_mask)
            else:
                tl.store(acc_base + acc_offsets, dq, mask=row_mask)
            if HAS_TAIL:
                acc_offsets = rows.to(tl.int64)[:, None] * acc_width + dt[None, :]
                dq_t = tl.dot(ds, k_t, input_precision="ieee", out_dtype=ACC_DTYPE)
                if block > 0:
                    dq_t += tl.load(acc_base + acc_offsets, mask=row_mask, other=0.0)
                if block == last:
                    g_offsets = b * sdqb + h * sdqh + rows.to(tl.int64)[:, None] * sdqt + dt[None, :]
                    dq_mask = _tile_mask(rows, dt, Tx, head_dim, False)
                    tl.store(dq_ptr + g_offsets, cast_for_store(dq_t * scale, dq_ptr), mask=dq_mask)
                else:
                    tl.store(acc_base + acc_offsets, dq_t, mask=row_mask)
        _store_key_grads(
            dk_ptr, dv_ptr, dk, dv, dk_t, dv_t, bias, scale, b * sgb + h * sgh, cols, d, dt, Ta, head_dim, sgt,
            EVEN_D, HAS_TAIL, HAS_MASK,
        )  # fmt: skip
        # The next key block reads the dQ partial sums this one wrote, possibly from other threads.
        tl.debug_barrier()


# ----------------------------------------------------------------------------- launchers


def _to_fp32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _split(x: float) -> tuple[float, float]:
    """x as fp32 hi + lo (see `_scalar`)."""
    hi = _to_fp32(x)
    return hi, _to_fp32(x - hi)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # The kernels address the head dim with stride 1 (vectorised loads); anything else is copied.
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def head_dim_blocks(head_dim: int) -> tuple[int, int]:
    """(main, tail) column blocks that cover head_dim: tiles are powers of two, so a head dim
    that is not one is covered by a main block (the largest power of two below it) plus a tail
    block (>= 16, a dot's minimum), where that is narrower than rounding up: 80 = 64 + 16 rather
    than 128 (40% less tensor-core work), 96 = 64 + 32, 40 = 32 + 16. A tail of 0 means one
    block (powers of two; 112, whose tail would be 64 anyway; widths up to 16)."""
    whole = max(16, triton.next_power_of_2(head_dim))
    main = whole // 2
    tail = max(16, triton.next_power_of_2(head_dim - main)) if head_dim > main else 0
    if head_dim <= 16 or head_dim == whole or main + tail >= whole:
        return whole, 0
    return main, tail


def head_width(head_dim: int) -> int:
    """The columns the kernels tile for head_dim (main + tail blocks): what `_configs` and the
    tuning keys are keyed by."""
    return sum(head_dim_blocks(head_dim))


def _head_dim_args(head_dim: int) -> dict:
    """The kernels' head-dim constexprs. Without a tail BLOCK_DT is a placeholder (dead code)."""
    main, tail = head_dim_blocks(head_dim)
    return {"BLOCK_D": main, "EVEN_D": tail > 0 or head_dim == main, "BLOCK_DT": max(tail, 16), "HAS_TAIL": tail > 0}


def _configs(dtype: torch.dtype, Tx: int, block_d: int, capability: tuple[int, int]) -> dict[str, dict[str, int]]:
    """Launch parameters of the forward ("fwd"), dK/dV ("dkdv"), dQ ("dq") and one-pass backward
    ("bwd") kernels: the
    interpreter's, else those `python -m benchmarks.tune` measured for this card, dtype, head
    width and phase (orca_kernels/_tuned.py), else the heuristics of `heuristic_configs`."""
    if KERNELS_INTERPRETED:
        # The interpreter's cost is per op, not per element: few, mid-sized blocks (two of them
        # already at the test shapes, so the block loops and tails are exercised).
        one = {"BLOCK_M": 32, "BLOCK_N": 32}
        return {"fwd": one, "dkdv": one, "dq": one, "bwd": one}
    configs = heuristic_configs(dtype, Tx, block_d, capability)
    for kernel in configs:
        key = tuning_key(kernel, dtype, Tx, block_d, capability)
        configs[kernel] = _tuned.TUNED.get(key, configs[kernel])
    return configs


def tuning_key(kernel: str, dtype: torch.dtype, Tx: int, block_d: int, capability: tuple[int, int]) -> str:
    """The key of a launch in the measured table: kernel, sm, dtype, head width (main + tail
    blocks) and phase (decode for one query row, else prefill)."""
    phase = "decode" if Tx == 1 else "prefill"
    return f"flash_{kernel}/sm{capability[0]}{capability[1]}/{str(dtype).removeprefix('torch.')}/d{block_d}/{phase}"


def heuristic_configs(
    dtype: torch.dtype, Tx: int, block_d: int, capability: tuple[int, int]
) -> dict[str, dict[str, int]]:
    """The launch rules used where nothing was measured (and the tuner's first candidate)."""
    if dtype == torch.float32:
        # IEEE fp32 dots run on FMA units, whose operand layouts hold whole rows of a tile per
        # thread: 8 warps, and narrower key blocks for wide heads, keep every kernel free of
        # register spills on sm_80 and sm_90 (benchmarks/compile_audit.py checks it).
        # The backward kernels get a one-block cap: uncapped, ptxas aimed at two blocks and spilled
        # 8 bytes on sm80 with a mask (dK/dV at head dim 80, the one-pass kernel at 128).
        one = {"BLOCK_M": 32, "BLOCK_N": 32 if block_d <= 64 else 16, "num_warps": 8, "num_stages": 1}
        backward = one | {"maxnreg": register_cap(8, 1)}
        return {"fwd": one | {"maxnreg": register_cap(8, 2)}, "dkdv": backward, "dq": backward, "bwd": backward}
    if dtype == torch.float64:
        # fp64 MMA, for gradcheck: small tiles, one stage, more warps for wide heads.
        one = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 8 if block_d >= 128 else 4, "num_stages": 1}
        return {"fwd": one, "dkdv": one, "dq": one, "bwd": one}
    # fp16/bf16 on the tensor cores (wgmma on sm90; chosen for H100, to be tuned by benchmarks/).
    # Every setting keeps each warp on rows and columns of its own: a tile product's rows (its M)
    # must hold 16 per warp the compiler puts along M (all of them, on sm90's wgmma and wherever
    # one product feeds another), else warps recompute each other's tiles (the compile audit's
    # duplicated-warp check). Each also compiles without register spills on sm80 and sm90.
    power_of_two = not block_d & (block_d - 1)
    # Forward: 16 query rows for decode (Tx = 1), else 64 (one warpgroup) or 128 rows (two),
    # whichever pads Tx less (Tx = 300: 5 x 64 rather than 3 x 128).
    if Tx <= 16:
        # A cap for two blocks per SM: uncapped, triton 3.6's ptxas spilled at hd 128 with a mask.
        fwd = {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "maxnreg": register_cap(4, 2)}
        if not power_of_two:
            # A split head dim (80 = 64 + 16): the 16-column tail product puts every warp along M,
            # so the 16 rows take one warp (flash-decoding then makes more programs); uncapped,
            # since a cap spills there.
            fwd = {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 1, "num_stages": 3}
    elif triton.cdiv(Tx, 128) * 128 > triton.cdiv(Tx, 64) * 64:
        fwd = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    else:
        # Three stages spill on sm80 at head dim 128 with a mask (triton 3.6), and past 128 anywhere.
        deep = block_d < 128 or (block_d == 128 and capability >= (9, 0))
        fwd = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3 if deep else 2}
    # Two-kernel backward. dK/dV works on transposed tiles: its products' rows are the BLOCK_N
    # keys; dQ's are the BLOCK_M query rows. Two [BLOCK_N, BLOCK_D] fp32 accumulators (dK and dV)
    # bound the dK/dV tiles.
    cap = register_cap(4, 1)
    if capability >= (9, 0):
        dkdv = {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "maxnreg": cap}
    elif power_of_two:
        # Ampere's mma.sync spreads these 8 warps along the head dim, not the keys.
        dkdv = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2, "maxnreg": register_cap(8, 1)}
    else:
        dkdv = {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "maxnreg": cap}
    dq = {"BLOCK_M": 64, "BLOCK_N": 64 if capability >= (9, 0) else 32, "num_warps": 4, "num_stages": 2, "maxnreg": cap}
    # One-pass backward (head widths up to ONE_PASS_MAX_WIDTH): the key products' rows are BLOCK_N
    # keys, dQ's the BLOCK_M query rows, and the program holds dK, dV and a dQ tile at once. On
    # sm90 two warpgroups over 128 keys, one stage (two spill with triton 3.6).
    if not power_of_two:
        one_pass = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 2, "num_stages": 2}
    elif capability >= (9, 0):
        one_pass = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 1, "maxnreg": register_cap(8, 1)}
    else:
        one_pass = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    return {"fwd": fwd, "dkdv": dkdv, "dq": dq, "bwd": one_pass}


def _bias_args(mask: torch.Tensor | None, dtype: torch.dtype, fallback: torch.Tensor) -> tuple:
    """(bias [B, Ta] in the accumulator dtype, 0 or -inf, and its strides) for the kernels.

    Additive and floating, as F.multi_head_attention_forward turns the mask into: a bool/uint8
    load feeding the dots makes triton 3.8 pick a dot-operand layout (kWidth 4) that its fp64 MMA
    lowering rejects on sm90. The tensor is [B, Ta], negligible next to K and V."""
    if mask is None:
        return fallback, 0, 0
    bias = torch.zeros(mask.shape, dtype=accumulator_dtype(dtype), device=mask.device).masked_fill_(mask, float("-inf"))
    return bias, bias.stride(0), bias.stride(1)


def _forward(q, k, v, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Tx, nh, hd] contiguous, lse [B, nh, Tx] base-2 logsumexp, +inf for masked rows)."""
    B, Tx, nh, hd = q.shape
    Ta = k.shape[1]
    out = new_output((B, Tx, nh, hd), dtype=q.dtype, device=q.device)
    lse = new_output((B, nh, Tx), dtype=accumulator_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out, lse
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    dot_dtype, acc_dtype = kernel_dtypes(q.dtype)
    head = _head_dim_args(hd)
    cfg = _configs(q.dtype, Tx, head_width(hd), _utils.cuda_capability(q.device))["fwd"]
    row_blocks = triton.cdiv(Tx, cfg["BLOCK_M"])
    splits, keys_per_split = decode_splits(
        B * nh * row_blocks, Tx, Ta, cfg["BLOCK_N"], q.device, cfg.get("num_warps", 4)
    )
    # Split: the kernel writes fp32 (fp64) partials [S, B, Tx, nh, hd] and [S, B, nh, Tx] instead.
    dest, dest_lse = out, lse
    if splits > 1:
        dest = new_output((splits, B, Tx, nh, hd), dtype=accumulator_dtype(q.dtype), device=q.device)
        dest_lse = new_output((splits, B, nh, Tx), dtype=lse.dtype, device=q.device)
    grid = (row_blocks * splits, nh, B)
    bias, sbb, sbt = _bias_args(mask, q.dtype, q)
    with device_context(q):
        _flash_cross_attention_fwd_kernel[grid](
            q,
            k,
            v,
            bias,
            dest,
            dest_lse,
            Tx,
            Ta,
            nh,
            hd,
            *_split(scale * LOG2E),
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            v.stride(0),
            v.stride(1),
            v.stride(2),
            sbb,
            sbt,
            *dest.stride()[-4:-1],
            keys_per_split,
            dest.stride(0) if splits > 1 else 0,
            dest_lse.stride(0) if splits > 1 else 0,
            HAS_MASK=mask is not None,
            DOT_DTYPE=dot_dtype,
            ACC_DTYPE=acc_dtype,
            SPLIT=splits > 1,
            **head,
            **cfg,
        )
        if splits > 1:
            block_d = max(16, triton.next_power_of_2(hd))
            _flash_decode_combine_kernel[(row_blocks, nh, B)](
                dest,
                dest_lse,
                out,
                lse,
                Tx,
                nh,
                hd,
                splits,
                *dest.stride()[:4],
                dest_lse.stride(0),
                out.stride(0),
                out.stride(1),
                out.stride(2),
                ACC_DTYPE=acc_dtype,
                BLOCK_M=cfg["BLOCK_M"],
                BLOCK_D=block_d,
                EVEN_D=hd == block_d,
            )
    return out, lse


def decode_splits(
    programs: int, Tx: int, Ta: int, block_n: int, device: torch.device, num_warps: int = 4
) -> tuple[int, int]:
    """(splits, keys per split) of the forward over the keys (flash-decoding). A decode step
    (Tx <= 16: one row block) has B·nh programs, too few to fill a GPU when B is small (B = 1 and
    32 heads: 32 programs for 132 SMs), each walking all Ta keys; splitting the keys into ranges
    of whole key blocks gives about eight warps per SM (two programs of 4 warps, eight of one).
    The interpreter splits every decode into single key blocks, so the tests exercise the split
    and the combine."""
    blocks = triton.cdiv(Ta, block_n)
    if Tx > 16 or blocks <= 1:
        return 1, max(Ta, 1)
    # persistent_programs is 4 per SM: 2 programs of 4 warps per SM, 8 of 1 warp.
    wanted_programs = _utils.persistent_programs(device) * 2 // num_warps
    wanted = blocks if KERNELS_INTERPRETED else wanted_programs // max(programs, 1)
    splits = min(blocks, max(1, wanted))
    blocks_per_split = triton.cdiv(blocks, splits)
    return triton.cdiv(blocks, blocks_per_split), blocks_per_split * block_n


def one_pass_backward(B: int, nh: int, Ta: int, head_dim: int, block_n: int, device: torch.device) -> bool:
    """Whether the backward runs as one pass per (batch, head) (`_flash_cross_attention_bwd_fused_kernel`:
    5 tile products per tile pair, and an fp32 dQ partial sum [B, nh, Tx, head width] written and
    read back once per key block but the last) rather than two kernels over key blocks and query
    blocks (7 products, no scratch): for head widths up to ONE_PASS_MAX_WIDTH (wider heads spill
    the registers that hold dK, dV and a dQ tile at once), where B·nh programs fill the GPU twice
    over (one per (batch, head), the one-pass grid) and the keys take at most
    MAX_ONE_PASS_KEY_BLOCKS blocks, so that
    the partial sums move at most 3 fp32 copies of dQ each way (Qwen3-0.6B: 439 keys in 128-key
    blocks; the narrower tiles the split and wide heads need would make 12-14 blocks). Under the
    interpreter (4 "SMs") both run in the tests: one pass from B·nh = 2 and up to 4 key blocks."""
    fills = B * nh >= _utils.persistent_programs(device) // 2
    return fills and triton.cdiv(Ta, block_n) <= MAX_ONE_PASS_KEY_BLOCKS and head_width(head_dim) <= ONE_PASS_MAX_WIDTH


def _backward(
    q, k, v, mask, out, lse, grad_out, scale: float, one_pass: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, in the input dtype. one_pass: force the one-pass or the
    two-kernel backward (the tuner times both); None chooses by `one_pass_backward`."""
    B, Tx, nh, hd = q.shape
    Ta = k.shape[1]
    dq = new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = new_output(k.shape, dtype=k.dtype, device=k.device)
    dv = new_output(v.shape, dtype=v.dtype, device=v.device)
    if B * nh * hd == 0:
        return dq, dk, dv
    if Tx == 0 or Ta == 0:  # nothing attends or nothing to attend to: no gradient
        return dq.zero_(), dk.zero_(), dv.zero_()
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    grad_out = _unit_last_stride(grad_out)  # e.g. expanded from .sum(): all strides 0
    lse = lse.contiguous()  # indexed as [B, nh, Tx]; the forward's own lse already is
    dot_dtype, acc_dtype = kernel_dtypes(q.dtype)
    head = _head_dim_args(hd)
    cfgs = _configs(q.dtype, Tx, head_width(hd), _utils.cuda_capability(q.device))
    block_d = max(16, triton.next_power_of_2(hd))  # the elementwise preprocess takes one padded block
    delta = new_output((B, nh, Tx), dtype=accumulator_dtype(q.dtype), device=q.device)
    bias, sbb, sbt = _bias_args(mask, q.dtype, q)
    common = dict(
        HAS_MASK=mask is not None,
        DOT_DTYPE=dot_dtype,
        ACC_DTYPE=acc_dtype,
        **head,
    )
    strides = (
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        sbb,
        sbt,
        grad_out.stride(0),
        grad_out.stride(1),
        grad_out.stride(2),
    )
    scales = (*_split(scale * LOG2E), *_split(scale))
    with device_context(q):
        pre_m = cfgs["dq"]["BLOCK_M"]
        _flash_cross_attention_bwd_preprocess_kernel[(triton.cdiv(Tx, pre_m), nh, B)](
            out,
            grad_out,
            delta,
            Tx,
            nh,
            hd,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            grad_out.stride(0),
            grad_out.stride(1),
            grad_out.stride(2),
            ACC_DTYPE=acc_dtype,
            BLOCK_M=pre_m,
            BLOCK_D=block_d,
            EVEN_D=hd == block_d,
        )
        if one_pass is None:
            # The layout `python -m benchmarks.tune` measured faster on this card, else the rule.
            key = tuning_key("layout", q.dtype, Tx, head_width(hd), _utils.cuda_capability(q.device))
            measured = None if KERNELS_INTERPRETED else _tuned.TUNED.get(key)
            if measured is not None:
                one_pass = bool(measured["one_pass"])
            else:
                one_pass = one_pass_backward(B, nh, Ta, hd, cfgs["bwd"]["BLOCK_N"], q.device)
        if one_pass:
            if head_width(hd) > ONE_PASS_MAX_WIDTH:
                raise ValueError(
                    f"{OP}: the one-pass backward takes head widths up to {ONE_PASS_MAX_WIDTH}, got head dim {hd}"
                )
            cfg = cfgs["bwd"]
            # dQ's partial sums, [B, nh, Tx, main + tail columns], fp32 (fp64 for fp64); only
            # written where there is more than one key block.
            acc_shape = (B, nh, Tx, head_width(hd)) if Ta > cfg["BLOCK_N"] else (1,)
            dq_acc = q.new_empty(acc_shape, dtype=accumulator_dtype(q.dtype))
            _flash_cross_attention_bwd_fused_kernel[(nh, B)](
                q,
                k,
                v,
                bias,
                grad_out,
                lse,
                delta,
                dq,
                dk,
                dv,
                dq_acc,
                Tx,
                Ta,
                nh,
                hd,
                *scales,
                *strides,
                dk.stride(0),
                dk.stride(1),
                dk.stride(2),
                dq.stride(0),
                dq.stride(1),
                dq.stride(2),
                head_width(hd),
                **common,
                **cfg,
            )
            return dq, dk, dv
        cfg = cfgs["dkdv"]
        _flash_cross_attention_bwd_dkdv_kernel[(triton.cdiv(Ta, cfg["BLOCK_N"]), nh, B)](
            q,
            k,
            v,
            bias,
            grad_out,
            lse,
            delta,
            dk,
            dv,
            Tx,
            Ta,
            nh,
            hd,
            *scales,
            *strides,
            dk.stride(0),
            dk.stride(1),
            dk.stride(2),
            **common,
            **cfg,
        )
        cfg = cfgs["dq"]
        _flash_cross_attention_bwd_dq_kernel[(triton.cdiv(Tx, cfg["BLOCK_M"]), nh, B)](
            q,
            k,
            v,
            bias,
            grad_out,
            lse,
            delta,
            dq,
            Tx,
            Ta,
            nh,
            hd,
            *scales,
            *strides,
            dq.stride(0),
            dq.stride(1),
            dq.stride(2),
            **common,
            **cfg,
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------- registered ops


@torch.library.custom_op("orca_kernels::flash_cross_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Tx, nh, hd], lse [B, nh, Tx]); lse (base 2, +inf for fully masked rows) is what
    the backward needs and is not differentiable."""
    return _forward(q, k, v, key_padding_mask, scale)


@torch.library.custom_op("orca_kernels::flash_cross_attention_backward", mutates_args=())
def _backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_k, grad_v), contiguous, from the forward's out and lse."""
    return _backward(q, k, v, key_padding_mask, out, lse, grad_out, scale)


@_attention_op.register_fake
def _(q, k, v, key_padding_mask, scale):
    B, Tx, nh, hd = q.shape
    return q.new_empty((B, Tx, nh, hd)), q.new_empty((B, nh, Tx), dtype=accumulator_dtype(q.dtype))


@_backward_op.register_fake
def _(q, k, v, key_padding_mask, out, lse, grad_out, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v = _backward_op(q, k, v, key_padding_mask, out, lse, grad_out, ctx.scale)
    return grad_q, grad_k, grad_v, None, None


_attention_op.register_autograd(_attention_backward, setup_context=_setup_context)


refuse_double_backward(_backward_op, "flash_cross_attention", "backend='torch'")


# ----------------------------------------------------------------------------- public functions


def _check_inputs(q, k, v, key_padding_mask, scale) -> None:
    check_tensor(OP, "q", q, 4)
    check_tensor(OP, "k", k, 4, like=q)
    check_tensor(OP, "v", v, 4, like=q)
    B, _, nh, hd = q.shape
    for dim, name in ((0, "batch size"), (2, "number of heads"), (3, "head dim")):
        if k.shape[dim] != q.shape[dim]:
            raise ValueError(
                f"{OP}: k has {name} {k.shape[dim]} but q has {q.shape[dim]} "
                "(q is [B, Tx, nh, hd], k and v are [B, Ta, nh, hd])"
            )
    if v.shape != k.shape:
        raise ValueError(f"{OP}: v has shape {tuple(v.shape)} but k has {tuple(k.shape)}")
    if hd == 0:
        raise ValueError(f"{OP}: q has head dim 0; the head dim (q's last dimension) must be >= 1")
    check_key_padding_mask(OP, key_padding_mask, B, k.shape[1], q)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"{OP}: scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"{OP}: scale must be finite, got {scale}")


def _sdpa_attention(q, k, v, key_padding_mask, scale: float) -> torch.Tensor:
    """The vendor path: PyTorch's SDPA, which picks cuDNN, FlashAttention or memory-efficient
    attention itself on CUDA, under the package's contract (`reference.masked_sdpa`: the
    reference's safe-softmax zeros, no trace of a padded key). [B, Tx, nh, hd] in and out, out
    contiguous. A non-finite query row is made NaN explicitly on the CPU only (CPU SDPA returns 0
    there for short key lists); CUDA's fused kernels propagate the NaN themselves."""
    if k.shape[1] == 0:
        return reference.flash_cross_attention(q, k, v, key_padding_mask, scale=scale)
    return reference.masked_sdpa(q, k, v, key_padding_mask, scale, poison_non_finite=q.device.type == "cpu")


def resolve_backend(q, k, v, key_padding_mask, backend: str) -> str:
    """The attention core a call runs: "torch" (the reference), "sdpa" or "triton".

    auto: on CUDA, `orca_kernels.dispatch.attention_backend` (the vendor path unless a measurement
    on this card says the Triton kernels win, the Triton kernels under deterministic algorithms,
    flash-decoding for a decode step); on CPU tensors, the Triton kernels under TRITON_INTERPRET=1
    (how CI tests them), else the reference. An explicit "triton" that cannot run raises."""
    if backend in ("torch", "sdpa"):
        return backend
    if backend == "auto" and q.device.type == "cuda" and torch.cuda.is_available():
        return dispatch.attention_backend(q, k, v, key_padding_mask)
    return "triton" if use_triton(OP, q, backend) else "torch"


def flash_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Non-causal attention of q [B, Tx, nh, hd] over k, v [B, Ta, nh, hd] -> out [B, Tx, nh, hd]
    (contiguous), differentiable in q, k and v.

    key_padding_mask [B, Ta] bool, True = ignore that key (nn.MultiheadAttention's convention); a
    query whose keys are all ignored (or Ta = 0) gets 0 and no gradient, as in the reference, and
    an ignored key's k and v reach neither the output nor any gradient (not even a NaN there).
    scale defaults to 1/sqrt(hd). q, k, v may have any strides (views of packed projections are
    read in place); fp16/bf16/fp32/fp64, accumulation in fp32 (fp64 for fp64). Empty batches,
    Tx = 0 and Ta = 0 are allowed.

    backend: "auto" (see `resolve_backend`: on CUDA the vendor path, SDPA, unless the dispatch
    table measured the Triton kernels faster on this card; docs/architecture.md#attention-dispatch),
    "sdpa" (PyTorch's SDPA with the package's masking rules, CPU and CUDA), "triton" (the
    package's kernels: CUDA, or the CPU under TRITON_INTERPRET=1; deterministic; head dims up to
    256), or "torch" (`orca_kernels.reference.flash_cross_attention`).
    """
    check_backend(OP, backend, BACKENDS)
    _check_inputs(q, k, v, key_padding_mask, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    chosen = resolve_backend(q, k, v, key_padding_mask, backend)
    if chosen == "torch":
        return reference.flash_cross_attention(q, k, v, key_padding_mask, scale=scale)
    if chosen == "sdpa":
        return _sdpa_attention(q, k, v, key_padding_mask, scale)
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(
            f"{OP}: head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the Triton kernels; "
            "use backend='sdpa' or backend='torch'"
        )
    return _attention_op(q, k, v, key_padding_mask, scale)[0]
