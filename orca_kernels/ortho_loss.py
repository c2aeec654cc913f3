"""Fused orthogonality losses of ORCA-DeSTA (docs/ops.md#ortho_losses), forward and backward in Triton.

- `ortho_diversity_loss(global_tokens[B, Kg, H])` = mean over [B, Kg, Kg] of (ĝ ĝᵀ − I)².
- `ortho_cross_loss(global_tokens[B, Kg, H], local_tokens[B, Tl, H], max_local_samples=100)`
  = mean over [B, Kg, n] of (ĝ l̂[:, idx]ᵀ)², idx from `reference.local_sample_indices`
  (`torch.linspace(0, Tl-1, max_local_samples, dtype=torch.long)` on the local tokens' device when
  Tl > max_local_samples, else every row; n = len(idx)).
- `ortho_losses(...) -> (diversity, cross)`: both from one pass over the global tokens.

x̂ = x / max(‖x‖, 1e-12), as F.normalize. Numbers and dtypes follow `orca_kernels.reference`:
the diversity loss is float32 for fp16/bf16 inputs (the reference subtracts a float32 identity),
the cross loss has the input dtype, fp64 stays fp64; gradients have the input dtype. Inside an
autocast region the Triton path accepts mixed global/local dtypes and gives the reference's loss
dtypes under that autocast (see `_autocast_tokens`). The kernels accumulate fp16/bf16 in fp32.
One deliberate difference: in fp16 the reference's clamp at 1e-12 underflows to 0, so an
all-zero fp16 row gives it NaN; here the clamp is applied in fp32 and such a row contributes 0,
as it does in fp32.

Empty inputs (B, Kg or H = 0, or Tl = 0 for the cross loss) give what the reference gives (NaN
for a mean over nothing, 1/Kg for the diversity loss of H = 0 tokens) without launching a kernel,
and zero gradients.

Kernels, one program per tile of a "token list" per batch element: entries [0, Kg) are the global
rows, entries [Kg, Kg + n) the sampled local rows (gathered through idx), so the Gram and the cross
similarities are one matrix, rows = global tokens, columns = token-list entries.
- Forward: grid B × row blocks × column blocks. A program accumulates raw dot products and both
  sums of squares over H tiles, normalises afterwards, and writes its two partial sums; a second
  one-program kernel sums the partials in a fixed order and scales them. Deterministic: no atomics.
- The forward also writes what the backward needs: the similarities of the global rows to the
  columns it used (B·K·(K + n) values) and the norm of every token-list entry (B·(K + n)), in the
  accumulator dtype. That is far less than the reference keeps (normalised copies of the tokens,
  B·(K + n)·H values), and the backward then never recomputes a dot product over H.
- Backward: grid B × hidden slices × row blocks of the token list, thousands of programs at the
  model shapes. A program forms ∂L/∂x̂ = (∂L/∂sim ÷ ‖column‖) @ columns for its rows in its H
  slice (global rows: the Gram and cross columns; local rows: the global columns, reading the
  saved similarities transposed), with ∂L/∂sim computed from the saved similarities on the fly,
  then applies the normalisation's backward; the per-row scalar x̂·∂L/∂x̂ = Σ ∂L/∂sim·sim comes
  from the same loop. Local rows that are not sampled get a zero gradient, written by the
  program of the neighbouring sample (in its H slice).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from orca_kernels import _utils, reference
from orca_kernels._triton_helpers import accumulator_dtype, cast_for_store, kernel_dtypes, register_cap
from orca_kernels._utils import (
    KERNELS_INTERPRETED,
    TableCache,
    autocast_fp32_normalisations,
    autocast_lower_precision,
    device_context,
    new_output,
    refuse_double_backward,
    use_triton,
)
from orca_kernels.validation import check_backend, check_int, check_rank, check_tensor

BACKENDS = ("auto", "triton", "torch")
_EPS = tl.constexpr(1e-12)  # F.normalize's default; the kernels clamp norms in the accumulator dtype


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _load_tokens(
    g_ptr,
    l_ptr,
    idx_ptr,
    b,
    entries,
    h,
    K,
    n,
    H,
    sgb,
    sgk,
    sgh,
    slb,
    slt,
    slh,
    WITH_LOCAL: tl.constexpr,
    SUBSAMPLE: tl.constexpr,
):
    """[R, BLOCK_H] tile of token-list `entries` [R] at hidden offsets `h`: entry e < K is global
    row e, K <= e < K + n is local row idx[e - K] (e - K without sub-sampling); 0 elsewhere."""
    h_ok = (h < H)[None, :]
    h64 = h.to(tl.int64)[None, :]
    is_global = entries < K
    offsets = b * sgb + entries.to(tl.int64)[:, None] * sgk + h64 * sgh
    tile = tl.load(g_ptr + offsets, mask=is_global[:, None] & h_ok, other=0.0)
    if WITH_LOCAL:
        is_local = (entries >= K) & (entries < K + n)
        if SUBSAMPLE:
            rows = tl.load(idx_ptr + (entries - K), mask=is_local, other=0)
        else:
            rows = entries - K
        offsets = b * slb + rows.to(tl.int64)[:, None] * slt + h64 * slh
        tile += tl.load(l_ptr + offsets, mask=is_local[:, None] & h_ok, other=0.0)
    return tile


@triton.jit
def _similarities(
    g_ptr,
    l_ptr,
    idx_ptr,
    b,
    rows,
    cols,
    K,
    n,
    H,
    h_begin,
    h_end,
    sgb,
    sgk,
    sgh,
    slb,
    slt,
    slh,
    ROWS_LOCAL: tl.constexpr,
    SUBSAMPLE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Raw dot products [BLOCK_M, BLOCK_N] of token-list rows × cols, and both sums of squares,
    over the hidden range [h_begin, h_end) (h_begin a multiple of BLOCK_H)."""
    dots = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
    row_sq = tl.zeros((BLOCK_M,), ACC_DTYPE)
    col_sq = tl.zeros((BLOCK_N,), ACC_DTYPE)
    for h0 in range(h_begin, h_end, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        x = _load_tokens(
            g_ptr, l_ptr, idx_ptr, b, rows, h, K, n, H, sgb, sgk, sgh, slb, slt, slh, ROWS_LOCAL, SUBSAMPLE
        )
        y = _load_tokens(g_ptr, l_ptr, idx_ptr, b, cols, h, K, n, H, sgb, sgk, sgh, slb, slt, slh, True, SUBSAMPLE)
        # fp16/bf16 products are exact in fp32; "ieee" keeps fp32 inputs off TF32.
        # out_dtype: triton 3.6 asserts it equals a non-fp32 accumulator's dtype (no default from acc).
        dots = tl.dot(x.to(DOT_DTYPE), tl.trans(y.to(DOT_DTYPE)), dots, input_precision="ieee", out_dtype=ACC_DTYPE)
        xa = x.to(ACC_DTYPE)
        ya = y.to(ACC_DTYPE)
        row_sq += tl.sum(xa * xa, 1)
        col_sq += tl.sum(ya * ya, 1)
    return dots, row_sq, col_sq


@triton.jit
def _tile(tile, col_start, num_row_blocks, num_col_blocks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(batch element, global rows [BLOCK_M], token-list columns [BLOCK_N]) of forward tile `tile`."""
    tiles = num_row_blocks * num_col_blocks
    b = (tile // tiles).to(tl.int64)
    rows = ((tile % tiles) // num_col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_start + (tile % num_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    return b, rows, cols


@triton.jit
def _part(parts_ptr, index, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pointers of part `index` of the split forward: the dots [BLOCK_M, BLOCK_N], then the row
    and the column sums of squares, stored one after the other."""
    part = parts_ptr + index.to(tl.int64) * (BLOCK_M * BLOCK_N + BLOCK_M + BLOCK_N)
    dots = part + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    row_sq = part + BLOCK_M * BLOCK_N + tl.arange(0, BLOCK_M)
    col_sq = part + BLOCK_M * BLOCK_N + BLOCK_M + tl.arange(0, BLOCK_N)
    return dots, row_sq, col_sq


@triton.jit
def _ortho_losses_split_kernel(
    g_ptr,
    l_ptr,
    idx_ptr,
    parts_ptr,
    K,
    n,
    H,
    h_per_split,
    col_start,
    num_row_blocks,
    num_col_blocks,
    num_splits,
    sgb,
    sgk,
    sgh,
    slb,
    slt,
    slh,
    SUBSAMPLE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One hidden range [split·h_per_split, ...) of one tile's dots and sums of squares, stored
    as part (tile, split) for `_ortho_losses_fwd_kernel` (FROM_PARTS) to add up: with few tiles
    (B·Kg small) the H loop is what keeps a GPU busy, so it is spread over programs."""
    pid = tl.program_id(0)
    split = pid % num_splits
    b, rows, cols = _tile(pid // num_splits, col_start, num_row_blocks, num_col_blocks, BLOCK_M, BLOCK_N)
    h_begin = split * h_per_split
    dots, row_sq, col_sq = _similarities(
        g_ptr,
        l_ptr,
        idx_ptr,
        b,
        rows,
        cols,
        K,
        n,
        H,
        h_begin,
        tl.minimum(H, h_begin + h_per_split),
        sgb,
        sgk,
        sgh,
        slb,
        slt,
        slh,
        False,
        SUBSAMPLE,
        DOT_DTYPE,
        ACC_DTYPE,
        BLOCK_M,
        BLOCK_N,
        BLOCK_H,
    )
    dots_ptrs, row_sq_ptrs, col_sq_ptrs = _part(parts_ptr, pid, BLOCK_M, BLOCK_N)
    tl.store(dots_ptrs, dots)
    tl.store(row_sq_ptrs, row_sq)
    tl.store(col_sq_ptrs, col_sq)


@triton.jit
def _ortho_losses_fwd_kernel(
    g_ptr,
    l_ptr,
    idx_ptr,
    partial_ptr,
    sim_ptr,
    norms_ptr,
    K,
    n,
    H,
    col_start,
    col_end,
    num_row_blocks,
    num_col_blocks,
    num_programs,
    parts_ptr,
    num_splits,
    sgb,
    sgk,
    sgh,
    slb,
    slt,
    slh,
    FROM_PARTS: tl.constexpr,
    SUBSAMPLE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """partial[0, pid] = Σ (Gram − I)², partial[1, pid] = Σ cross² over this program's tile of
    global rows × token-list columns [col_start, col_end). FROM_PARTS: the dots and sums of
    squares are the sum, in split order, of the `num_splits` parts `_ortho_losses_split_kernel`
    wrote (one per hidden range), instead of one pass over H.

    For the backward it also writes the tile's similarities to sim [B, K, col_end - col_start]
    and the norms ‖x‖ (unclamped) of token-list entries to norms [B, K + n]: the global rows'
    from the first column tile, the local columns' from the first row tile."""
    pid = tl.program_id(0)
    b, rows, cols = _tile(pid, col_start, num_row_blocks, num_col_blocks, BLOCK_M, BLOCK_N)
    if FROM_PARTS:
        dots = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
        row_sq = tl.zeros((BLOCK_M,), ACC_DTYPE)
        col_sq = tl.zeros((BLOCK_N,), ACC_DTYPE)
        for split in range(0, num_splits):
            dots_ptrs, row_sq_ptrs, col_sq_ptrs = _part(parts_ptr, pid * num_splits + split, BLOCK_M, BLOCK_N)
            dots += tl.load(dots_ptrs)
            row_sq += tl.load(row_sq_ptrs)
            col_sq += tl.load(col_sq_ptrs)
    else:
        dots, row_sq, col_sq = _similarities(
            g_ptr,
            l_ptr,
            idx_ptr,
            b,
            rows,
            cols,
            K,
            n,
            H,
            0,
            H,
            sgb,
            sgk,
            sgh,
            slb,
            slt,
            slh,
            False,
            SUBSAMPLE,
            DOT_DTYPE,
            ACC_DTYPE,
            BLOCK_M,
            BLOCK_N,
            BLOCK_H,
        )
    row_norm = tl.sqrt(row_sq)
    col_norm = tl.sqrt(col_sq)
    sim = dots / (
        tl.maximum(row_norm, tl.full((BLOCK_M,), _EPS, ACC_DTYPE))[:, None]
        * tl.maximum(col_norm, tl.full((BLOCK_N,), _EPS, ACC_DTYPE))[None, :]
    )
    valid = (rows < K)[:, None] & (cols < col_end)[None, :]
    width = col_end - col_start
    sim_offsets = (b * K + rows.to(tl.int64))[:, None] * width + (cols - col_start)[None, :]
    tl.store(sim_ptr + sim_offsets, sim, mask=valid)
    tile = pid % (num_row_blocks * num_col_blocks)
    norms_base = norms_ptr + b * (K + n)
    tl.store(norms_base + rows, row_norm, mask=(rows < K) & (tile % num_col_blocks == 0))
    tl.store(norms_base + cols, col_norm, mask=(cols >= K) & (cols < col_end) & (tile < num_col_blocks))
    gram = (cols < K)[None, :]
    centred = tl.where(rows[:, None] == cols[None, :], sim - 1.0, sim)
    div_part = tl.sum(tl.sum(tl.where(valid & gram, centred * centred, 0.0), 1), 0)
    cross_part = tl.sum(tl.sum(tl.where(valid & (~gram), sim * sim, 0.0), 1), 0)
    tl.store(partial_ptr + pid, div_part)
    tl.store(partial_ptr + num_programs + pid, cross_part)


@triton.jit
def _ortho_losses_reduce_kernel(
    partial_ptr,
    div_ptr,
    cross_ptr,
    num_partials,
    div_count,
    cross_count,
    WITH_DIV: tl.constexpr,
    WITH_CROSS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The two losses: partial sums added in a fixed order, divided by the element counts."""
    div_acc = tl.zeros((BLOCK,), ACC_DTYPE)
    cross_acc = tl.zeros((BLOCK,), ACC_DTYPE)
    for p0 in range(0, num_partials, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        div_acc += tl.load(partial_ptr + p, mask=p < num_partials, other=0.0)
        cross_acc += tl.load(partial_ptr + num_partials + p, mask=p < num_partials, other=0.0)
    if WITH_DIV:
        div = tl.sum(div_acc, 0) / tl.cast(div_count, ACC_DTYPE)
        tl.store(div_ptr, div.to(div_ptr.dtype.element_ty))
    if WITH_CROSS:
        cross = tl.sum(cross_acc, 0) / tl.cast(cross_count, ACC_DTYPE)
        tl.store(cross_ptr, cast_for_store(cross, cross_ptr))


@triton.jit
def _ortho_losses_bwd_kernel(
    g_ptr,
    l_ptr,
    idx_ptr,
    sim_ptr,
    norms_ptr,
    grad_div_ptr,
    grad_cross_ptr,
    dg_ptr,
    dl_ptr,
    B,
    K,
    n,
    T_local,
    H,
    sim_col_start,
    sim_cols,
    global_col_start,
    global_col_end,
    num_global_blocks,
    num_blocks,
    num_h_blocks,
    sgb,
    sgk,
    sgh,
    slb,
    slt,
    slh,
    WITH_DIV: tl.constexpr,
    WITH_CROSS: tl.constexpr,
    SUBSAMPLE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Gradients of BLOCK_M token-list rows in one BLOCK_H slice of the hidden size: global rows
    write dg [B, K, H], local rows dl [B, T_local, H] (both contiguous). sim [B, K, sim_cols]
    (token-list columns from sim_col_start) and norms [B, K + n] come from the forward.
    global_col_* is the column range of global rows ([0, K) Gram, [K, K + n) cross)."""
    pid = tl.program_id(0)
    # Row blocks vary fastest: programs that read the same column tiles run together (L2).
    block = pid % num_blocks
    h_block = (pid // num_blocks) % num_h_blocks
    b = (pid // (num_blocks * num_h_blocks)).to(tl.int64)
    local_block = block >= num_global_blocks
    row_start = tl.where(local_block, K + (block - num_global_blocks) * BLOCK_M, block * BLOCK_M)
    row_end = tl.where(local_block, K + n, K)
    col_start = tl.where(local_block, 0, global_col_start)
    col_end = tl.where(local_block, K, global_col_end)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    h = h_block * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = (h < H)[None, :]

    # dL/dsim: 2·(sim − δ)·g / (B·K·K) for a Gram entry (counted twice: the Gram is symmetric),
    # 2·sim·g / (B·K·n) for a cross entry, g the incoming loss gradient.
    Kf = tl.cast(K, ACC_DTYPE)  # tl.cast: an int argument equal to 1 arrives as a constexpr
    alpha = tl.zeros((), ACC_DTYPE)
    beta = tl.zeros((), ACC_DTYPE)
    if WITH_DIV:
        alpha = tl.load(grad_div_ptr).to(ACC_DTYPE) * 4.0 / (tl.cast(B, ACC_DTYPE) * Kf * Kf)
    if WITH_CROSS:
        beta = tl.load(grad_cross_ptr).to(ACC_DTYPE) * 2.0 / (tl.cast(B, ACC_DTYPE) * Kf * tl.cast(n, ACC_DTYPE))

    # Zero this slice of the unsampled local rows between this block's samples and the previous
    # block's (before the first / after the last sample for the end blocks). Sampled rows in that
    # span are overwritten after the barrier below. Two ifs: the first is decided at compile time.
    if SUBSAMPLE:
        if local_block:
            s0 = row_start - K
            s1 = tl.minimum(s0 + BLOCK_M, n)
            lo = tl.where(s0 == 0, 0, tl.load(idx_ptr + tl.maximum(s0 - 1, 0)) + 1)
            hi = tl.where(s1 == n, T_local, tl.load(idx_ptr + s1 - 1) + 1)
            zeros = tl.zeros((BLOCK_M, BLOCK_H), dl_ptr.dtype.element_ty)
            for r0 in range(lo, hi, BLOCK_M):
                r = r0 + tl.arange(0, BLOCK_M)
                offsets = (b * T_local + r.to(tl.int64))[:, None] * H + h[None, :]
                tl.store(dl_ptr + offsets, zeros, mask=(r < hi)[:, None] & h_ok)
        # The zeroed rows were written by other threads of this program.
        tl.debug_barrier()

    # dL/dx̂ = Σ_columns dL/dsim · ŷ = (dL/dsim ÷ ‖column‖) @ columns, and the per-row scalar
    # x̂·dL/dx̂ = Σ dL/dsim · sim for the normalisation's backward.
    eps_cols = tl.full((BLOCK_N,), _EPS, ACC_DTYPE)
    sim_base = sim_ptr + b * K * sim_cols
    norms_base = norms_ptr + b * (K + n)
    acc = tl.zeros((BLOCK_M, BLOCK_H), ACC_DTYPE)
    proj = tl.zeros((BLOCK_M,), ACC_DTYPE)
    for c0 in range(col_start, col_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        pair_ok = row_ok[:, None] & (cols < col_end)[None, :]
        # sim holds global rows × token-list columns: a local row reads its column of it.
        offsets = tl.where(
            local_block,
            cols[None, :] * sim_cols + (rows - sim_col_start)[:, None],
            rows[:, None] * sim_cols + (cols - sim_col_start)[None, :],
        )
        sim = tl.load(sim_base + offsets, mask=pair_ok, other=0.0)
        col_norm = tl.maximum(tl.load(norms_base + cols, mask=cols < col_end, other=1.0), eps_cols)
        gram = (rows < K)[:, None] & (cols < K)[None, :]
        centred = tl.where(rows[:, None] == cols[None, :], sim - 1.0, sim)
        d_sim = tl.where(pair_ok, tl.where(gram, alpha * centred, beta * sim), 0.0)
        proj += tl.sum(d_sim * sim, 1)
        y = _load_tokens(g_ptr, l_ptr, idx_ptr, b, cols, h, K, n, H, sgb, sgk, sgh, slb, slt, slh, True, SUBSAMPLE)
        weights = d_sim / col_norm[None, :]
        # out_dtype: for triton 3.6 (see `_similarities`).
        acc = tl.dot(weights, y.to(ACC_DTYPE), acc, input_precision=GRAD_PRECISION, out_dtype=ACC_DTYPE)

    # x̂ = x / max(‖x‖, eps): dL/dx = dL/dx̂ / ‖x‖ − x·(x̂·dL/dx̂) / ‖x‖², the second term only
    # where the clamp is inactive (clamp_min passes the gradient at equality).
    eps_rows = tl.full((BLOCK_M,), _EPS, ACC_DTYPE)
    row_norm = tl.load(norms_base + rows, mask=row_ok, other=1.0)
    active = row_norm >= eps_rows
    row_norm = tl.maximum(row_norm, eps_rows)
    radial = tl.where(active, proj, 0.0) / (row_norm * row_norm)
    x = _load_tokens(g_ptr, l_ptr, idx_ptr, b, rows, h, K, n, H, sgb, sgk, sgh, slb, slt, slh, WITH_CROSS, SUBSAMPLE)
    grad = acc / row_norm[:, None] - radial[:, None] * x.to(ACC_DTYPE)
    is_global = rows < K
    dg_rows = (b * K + rows.to(tl.int64)) * H
    tl.store(dg_ptr + dg_rows[:, None] + h[None, :], cast_for_store(grad, dg_ptr), mask=is_global[:, None] & h_ok)
    if WITH_CROSS:
        is_local = (rows >= K) & row_ok
        if SUBSAMPLE:
            local_rows = tl.load(idx_ptr + (rows - K), mask=is_local, other=0)
        else:
            local_rows = rows - K
        dl_rows = (b * T_local + local_rows.to(tl.int64)) * H
        tl.store(dl_ptr + dl_rows[:, None] + h[None, :], cast_for_store(grad, dl_ptr), mask=is_local[:, None] & h_ok)


# ----------------------------------------------------------------------------- launchers

# (T_local, max_local_samples, device) -> the sampled rows; saves a launch per call.
_indices_cache = TableCache(max_entries=64)


def _sample_indices(num_local: int, max_local_samples: int | None, device: torch.device) -> torch.Tensor | None:
    """`reference.local_sample_indices`, cached (None: every row is used)."""
    if max_local_samples is None or num_local <= max_local_samples:
        return None
    return _indices_cache.get(
        (num_local, max_local_samples, device),
        device,
        lambda: reference.local_sample_indices(num_local, max_local_samples, device),
    )


def _block(size: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(size, 1))))


def split_warps(block_m: int, block_n: int) -> int:
    """Warps of the split forward's [block_m, block_n] dot tile: one per 128 elements (a 16 x 8
    instruction tile), at most 8, so that no warp recomputes another's part of a small tile
    (Llama-3.1-8B's 8 global tokens give 16 x 16 tiles: 2 warps, not 8)."""
    return max(1, min(8, block_m * block_n // 128))


def hidden_splits(tiles: int, H: int, block_h: int, device: torch.device) -> tuple[int, int]:
    """(splits, hidden width per split) of the forward's H loop. The forward has one program per
    tile of rows x columns per batch element: B·⌈Kg/BLOCK_M⌉·⌈(Kg + n)/BLOCK_N⌉, 24 at
    Llama-3.1-8B's shape (B = 12, Kg = 8, 100 sampled local rows) for 132 SMs, each looping over
    H = 4096. Below about two programs per SM the loop is split into ranges of whole BLOCK_H
    chunks, at least four chunks each. The interpreter splits any loop of two chunks or more in
    two, so the tests exercise the parts."""
    chunks = triton.cdiv(H, block_h)
    if KERNELS_INTERPRETED:
        wanted = 2
    else:
        wanted = min(chunks // 4, _utils.persistent_programs(device) // 2 // max(tiles, 1))
    splits = max(1, min(chunks, wanted))
    chunks_per_split = triton.cdiv(chunks, splits)
    return triton.cdiv(chunks, chunks_per_split), chunks_per_split * block_h


def _diversity_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _num_samples(num_local: int, max_local_samples: int | None) -> int:
    """n, the local rows the cross loss uses (`reference.local_sample_indices`'s length)."""
    return num_local if max_local_samples is None else min(num_local, max_local_samples)


def _saved_shapes(g: torch.Tensor, l: torch.Tensor | None, max_local_samples: int | None, with_div: bool):
    """Shapes of what the forward keeps for the backward: the similarities [B, K, columns] of
    the global rows to the token-list columns the losses use ([0, K) if with_div, then the n
    sampled local rows if l is given), and the norms [B, K + n] of every token-list entry."""
    B, K, _ = g.shape
    n = _num_samples(l.shape[1], max_local_samples) if l is not None else 0
    return (B, K, (K if with_div else 0) + n), (B, K + n)


def _forward(
    g: torch.Tensor, l: torch.Tensor | None, max_local_samples: int | None, with_div: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(diversity if with_div else None, cross if local tokens l are given else None,
    similarities, norms): the last two (accumulator dtype, shapes from `_saved_shapes`) are what
    the backward reads instead of recomputing them."""
    B, K, H = g.shape
    idx = _sample_indices(l.shape[1], max_local_samples, l.device) if l is not None else None
    n = _num_samples(l.shape[1], max_local_samples) if l is not None else 0
    sim_shape, norms_shape = _saved_shapes(g, l, max_local_samples, with_div)
    # An empty loss launches nothing and takes the reference's value (NaN for a mean over nothing).
    div = reference.ortho_diversity_loss(g) if with_div and B * K * H == 0 else None
    cross = reference.ortho_cross_loss(g, l, max_local_samples) if l is not None and B * K * H * n == 0 else None
    kernel_div, kernel_cross = with_div and div is None, l is not None and cross is None
    saved_dtype = accumulator_dtype(g.dtype)
    if not (kernel_div or kernel_cross):
        # Nothing to differentiate (the backward gives zeros): zeros keep the outputs defined.
        zeros = (torch.zeros(shape, dtype=saved_dtype, device=g.device) for shape in (sim_shape, norms_shape))
        return div, cross, *zeros
    sim = new_output(sim_shape, dtype=saved_dtype, device=g.device)
    norms = new_output(norms_shape, dtype=saved_dtype, device=g.device)

    dot_dtype, acc_dtype = kernel_dtypes(g.dtype)
    col_start = 0 if kernel_div else K
    col_end = K + n if kernel_cross else K
    # Sizes that compile without register spills on sm_80 and sm_90 in every dtype (8 warps;
    # benchmarks/compile_audit.py checks it): fp32/fp64 tiles take twice the registers.
    widest = 64 if g.dtype in (torch.float16, torch.bfloat16) else 32
    block_m, block_n, block_h = _block(K, 16, 64), _block(col_end - col_start, 16, widest), _block(H, 16, 32)
    num_row_blocks = triton.cdiv(K, block_m)
    num_col_blocks = triton.cdiv(col_end - col_start, block_n)
    num_programs = B * num_row_blocks * num_col_blocks
    splits, h_per_split = hidden_splits(num_programs, H, block_h, g.device)
    partials = new_output((2, num_programs), dtype=accumulator_dtype(g.dtype), device=g.device)
    part_size = block_m * block_n + block_m + block_n
    parts = (
        new_output((num_programs * splits * part_size,), dtype=accumulator_dtype(g.dtype), device=g.device)
        if splits > 1
        else g
    )
    if kernel_div:
        div = new_output((), dtype=_diversity_dtype(g.dtype), device=g.device)
    if kernel_cross:
        cross = new_output((), dtype=g.dtype, device=g.device)
    lt = l if kernel_cross else g  # pointers the kernel does not read stand in for absent ones
    with device_context(g):
        if splits > 1:
            _ortho_losses_split_kernel[(num_programs * splits,)](
                g,
                lt,
                idx if idx is not None else g,
                parts,
                K,
                n,
                H,
                h_per_split,
                col_start,
                num_row_blocks,
                num_col_blocks,
                splits,
                *g.stride(),
                *lt.stride(),
                SUBSAMPLE=idx is not None,
                DOT_DTYPE=dot_dtype,
                ACC_DTYPE=acc_dtype,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                BLOCK_H=block_h,
                num_warps=split_warps(block_m, block_n),
            )
        _ortho_losses_fwd_kernel[(num_programs,)](
            g,
            lt,
            idx if idx is not None else g,
            partials,
            sim,
            norms,
            K,
            n,
            H,
            col_start,
            col_end,
            num_row_blocks,
            num_col_blocks,
            num_programs,
            parts,
            splits,
            *g.stride(),
            *lt.stride(),
            FROM_PARTS=splits > 1,
            SUBSAMPLE=idx is not None,
            DOT_DTYPE=dot_dtype,
            ACC_DTYPE=acc_dtype,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_H=block_h,
            num_warps=8,
        )
        _ortho_losses_reduce_kernel[(1,)](
            partials,
            div if kernel_div else partials,
            cross if kernel_cross else partials,
            num_programs,
            B * K * K,
            B * K * n,
            WITH_DIV=kernel_div,
            WITH_CROSS=kernel_cross,
            ACC_DTYPE=acc_dtype,
            BLOCK=_block(num_programs, 16, 1024),
        )
    return div, cross, sim, norms


def _check_saved(
    g: torch.Tensor, l: torch.Tensor | None, max_local_samples: int | None, sim, norms, with_div: bool
) -> None:
    """The backward op's similarities and norms are what a forward of these tokens wrote
    (`_saved_shapes`; the op can be called directly and the kernel reads them unchecked): shapes,
    accumulator dtype, device. Without the diversity loss, the combined forward's (with the Gram
    columns) and the cross loss's (without) both serve."""
    op = "ortho_losses_backward"
    (sim_shape, norms_shape), (cross_sim_shape, _) = (
        _saved_shapes(g, l, max_local_samples, with_gram) for with_gram in (True, False)
    )
    sim_shapes = [sim_shape] if with_div else [cross_sim_shape, sim_shape]
    for name, value, shapes in (("similarities", sim, sim_shapes), ("norms", norms, [norms_shape])):
        check_rank(op, name, value, len(shapes[0]))
        if value.device != g.device:
            raise ValueError(f"{op}: {name} is on {value.device} but the tokens are on {g.device}")
        if tuple(value.shape) not in shapes or value.dtype != accumulator_dtype(g.dtype):
            raise ValueError(
                f"{op}: {name} has shape {tuple(value.shape)} and dtype {value.dtype}; the forward of these "
                f"tokens writes {' or '.join(str(s) for s in shapes)} in {accumulator_dtype(g.dtype)}"
            )


def _backward(
    g: torch.Tensor,
    l: torch.Tensor | None,
    sim: torch.Tensor,
    norms: torch.Tensor,
    grad_div: torch.Tensor | None,
    grad_cross: torch.Tensor | None,
    max_local_samples: int | None,
) -> list[torch.Tensor]:
    """[dL/dg] or [dL/dg, dL/dl] (contiguous) for L = grad_div·diversity + grad_cross·cross; a
    None grad_* leaves that loss out. grad_cross is given exactly when l is. sim and norms are
    the forward's (`_forward`): sim's columns start at token-list entry 0 when it holds the Gram
    (its width exceeds n), else at K."""
    B, K, H = g.shape
    T_local = l.shape[1] if l is not None else 0
    idx = _sample_indices(T_local, max_local_samples, l.device) if l is not None else None
    n = _num_samples(T_local, max_local_samples)
    # Empty losses pass no gradient, as in the reference.
    with_div = grad_div is not None and B * K * H > 0
    with_cross = l is not None and B * K * H * n > 0
    if not (with_div or with_cross):
        zeros = [torch.zeros_like(g, memory_format=torch.contiguous_format)]
        return zeros if l is None else zeros + [torch.zeros_like(l, memory_format=torch.contiguous_format)]

    _check_saved(g, l, max_local_samples, sim, norms, with_div)
    _, acc_dtype = kernel_dtypes(g.dtype)
    sim, norms = sim.contiguous(), norms.contiguous()
    sim_cols = sim.shape[2]
    sim_col_start = 0 if sim_cols > n else K
    global_col_start = 0 if with_div else K
    global_col_end = K + n if with_cross else K
    block_m = _block(max(K, n), 16, 32)
    block_n = _block(global_col_end - global_col_start, 16, 32)
    # One program per (batch, row block, hidden slice): B·⌈(K + n)/32⌉·H/BLOCK_H programs, over
    # 3000 at every model shape, where one per row block (60-192) left most SMs idle.
    tensor_cores = g.dtype in (torch.float16, torch.bfloat16)
    block_h = _block(H, 16, 64 if tensor_cores and not KERNELS_INTERPRETED else 32)
    warps = 4 if tensor_cores else 8
    num_global_blocks = triton.cdiv(K, block_m)
    num_blocks = num_global_blocks + (triton.cdiv(n, block_m) if with_cross else 0)
    num_h_blocks = triton.cdiv(H, block_h)
    dg = new_output(g.shape, dtype=g.dtype, device=g.device)
    dl = new_output(l.shape, dtype=l.dtype, device=l.device) if l is not None else None  # [B, 0, H] if not with_cross
    lt = l if with_cross else g  # pointers the kernel does not read stand in for absent ones
    with device_context(g):
        _ortho_losses_bwd_kernel[(B * num_h_blocks * num_blocks,)](
            g,
            lt,
            idx if idx is not None else g,
            sim,
            norms,
            grad_div if with_div else grad_cross,
            grad_cross if with_cross else grad_div,
            dg,
            dl if with_cross else dg,
            B,
            K,
            n,
            T_local,
            H,
            sim_col_start,
            sim_cols,
            global_col_start,
            global_col_end,
            num_global_blocks,
            num_blocks,
            num_h_blocks,
            *g.stride(),
            *lt.stride(),
            WITH_DIV=with_div,
            WITH_CROSS=with_cross,
            SUBSAMPLE=idx is not None,
            ACC_DTYPE=acc_dtype,
            # fp16/bf16: TF32 holds the input values exactly and the weights to 2^-11.
            GRAD_PRECISION="ieee" if g.dtype in (torch.float32, torch.float64) else "tf32",
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_H=block_h,
            # IEEE fp32/fp64 dots run on FMA units with whole tile rows per thread: 8 warps (4
            # spilled on sm_90); the tensor-core dots take 4. The register cap (a block's share at
            # 8 warps, two blocks' at 4: 255 either way) matters: left uncapped, ptxas aimed at
            # occupancy and spilled at 80 registers, and a cap for two 8-warp blocks (128) spilled
            # under triton 3.6. benchmarks/compile_audit.py checks every variant.
            num_warps=warps,
            maxnreg=register_cap(warps, 2 if tensor_cores else 1),
        )
    return [dg] if l is None else [dg, dl]


# ----------------------------------------------------------------------------- registered ops


# Each loss op returns its losses, then the similarities and norms (`_forward`), which the backward
# reads and which are not differentiable.


@torch.library.custom_op("orca_kernels::ortho_diversity_loss", mutates_args=())
def _diversity_op(global_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    div, _, sim, norms = _forward(global_tokens, None, None, with_div=True)
    return div, sim, norms


@torch.library.custom_op("orca_kernels::ortho_cross_loss", mutates_args=())
def _cross_op(
    global_tokens: torch.Tensor, local_tokens: torch.Tensor, max_local_samples: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, cross, sim, norms = _forward(global_tokens, local_tokens, max_local_samples, with_div=False)
    return cross, sim, norms


@torch.library.custom_op("orca_kernels::ortho_losses", mutates_args=())
def _losses_op(
    global_tokens: torch.Tensor, local_tokens: torch.Tensor, max_local_samples: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(global_tokens, local_tokens, max_local_samples, with_div=True)


@torch.library.custom_op("orca_kernels::ortho_losses_backward", mutates_args=())
def _backward_op(
    global_tokens: torch.Tensor,
    local_tokens: torch.Tensor | None,
    similarities: torch.Tensor,
    norms: torch.Tensor,
    grad_diversity: torch.Tensor | None,
    grad_cross: torch.Tensor | None,
    max_local_samples: int | None,
) -> list[torch.Tensor]:
    """[grad_global] without local tokens, else [grad_global, grad_local]; a None loss gradient
    means that loss is not part of the objective."""
    return _backward(global_tokens, local_tokens, similarities, norms, grad_diversity, grad_cross, max_local_samples)


def _fake_saved(global_tokens, local_tokens, max_local_samples, with_div) -> list[torch.Tensor]:
    dtype = accumulator_dtype(global_tokens.dtype)
    shapes = _saved_shapes(global_tokens, local_tokens, max_local_samples, with_div)
    return [global_tokens.new_empty(shape, dtype=dtype) for shape in shapes]


@_diversity_op.register_fake
def _(global_tokens):
    div = global_tokens.new_empty((), dtype=_diversity_dtype(global_tokens.dtype))
    return div, *_fake_saved(global_tokens, None, None, True)


@_cross_op.register_fake
def _(global_tokens, local_tokens, max_local_samples):
    return global_tokens.new_empty(()), *_fake_saved(global_tokens, local_tokens, max_local_samples, False)


@_losses_op.register_fake
def _(global_tokens, local_tokens, max_local_samples):
    div = global_tokens.new_empty((), dtype=_diversity_dtype(global_tokens.dtype))
    return div, global_tokens.new_empty(()), *_fake_saved(global_tokens, local_tokens, max_local_samples, True)


@_backward_op.register_fake
def _(global_tokens, local_tokens, similarities, norms, grad_diversity, grad_cross, max_local_samples):
    grads = [global_tokens.new_empty(global_tokens.shape)]
    return grads if local_tokens is None else grads + [local_tokens.new_empty(local_tokens.shape)]


def _save_for_backward(ctx, inputs, output) -> None:
    """The tokens, the similarities and the norms: B·K·(K + n) + B·(K + n) accumulator values,
    where the reference keeps normalised copies of all the tokens it uses (B·(K + n)·H)."""
    sim, norms = output[-2:]
    ctx.save_for_backward(*inputs[:2], sim, norms)
    ctx.mark_non_differentiable(sim, norms)
    ctx.max_local_samples = inputs[2] if len(inputs) > 2 else None


def _diversity_backward(ctx, grad, _grad_sim, _grad_norms):
    global_tokens, sim, norms = ctx.saved_tensors
    return _backward_op(global_tokens, None, sim, norms, grad, None, None)[0]


def _cross_backward(ctx, grad, _grad_sim, _grad_norms):
    global_tokens, local_tokens, sim, norms = ctx.saved_tensors
    grad_global, grad_local = _backward_op(global_tokens, local_tokens, sim, norms, None, grad, ctx.max_local_samples)
    return grad_global, grad_local, None


def _losses_backward(ctx, grad_div, grad_cross, _grad_sim, _grad_norms):
    global_tokens, local_tokens, sim, norms = ctx.saved_tensors
    grad_global, grad_local = _backward_op(
        global_tokens, local_tokens, sim, norms, grad_div, grad_cross, ctx.max_local_samples
    )
    return grad_global, grad_local, None


_diversity_op.register_autograd(_diversity_backward, setup_context=_save_for_backward)
_cross_op.register_autograd(_cross_backward, setup_context=_save_for_backward)
_losses_op.register_autograd(_losses_backward, setup_context=_save_for_backward)


refuse_double_backward(_backward_op, "ortho_losses (ortho_diversity_loss, ortho_cross_loss)", "backend='torch'")


# ----------------------------------------------------------------------------- public functions


def _autocast_tokens(global_tokens, local_tokens=None) -> tuple:
    """The tokens as the kernels take them inside an autocast region, where the kernels (one
    dtype for both inputs) must give the reference's dtypes although the tokens may differ in
    dtype (under CUDA autocast the global tokens come from a Linear, bf16, and the local tokens
    from a LayerNorm, fp32: docs/reference-behaviour.md#autocast-dtypes-of-the-losses).
    - CUDA autocast runs norm and pow in fp32, so the reference normalises in fp32 and both of
      its losses are fp32: the tokens go to fp32.
    - CPU autocast runs the reference's normalisation in the input dtype and its einsum on
      autocast-dtype operands (diversity fp32 through the fp32 identity, cross in the autocast
      dtype): the tokens go to the autocast dtype, as autocast casts matmul operands.
    fp64 tokens stay fp64. Outside autocast nothing changes."""
    if not isinstance(global_tokens, torch.Tensor):
        return global_tokens, local_tokens
    device_type = global_tokens.device.type
    if autocast_fp32_normalisations(device_type):
        return tuple(
            t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t
            for t in (global_tokens, local_tokens)
        )
    return autocast_lower_precision(global_tokens, local_tokens, device_type=device_type)


def _check_inputs(op: str, global_tokens, local_tokens=None, max_local_samples=None, *, with_local: bool) -> None:
    """global_tokens [B, Kg, H]; with_local: also local_tokens [B, Tl, H] (required) and
    max_local_samples (an int >= 1, or None)."""
    check_tensor(op, "global_tokens", global_tokens, 3)
    if with_local:
        check_tensor(op, "local_tokens", local_tokens, 3, like=global_tokens)
        if local_tokens.shape[0] != global_tokens.shape[0]:
            raise ValueError(
                f"{op}: local_tokens has batch size {local_tokens.shape[0]} "
                f"but global_tokens has {global_tokens.shape[0]}"
            )
        if local_tokens.shape[2] != global_tokens.shape[2]:
            raise ValueError(
                f"{op}: local_tokens has hidden size {local_tokens.shape[2]} "
                f"but global_tokens has {global_tokens.shape[2]}"
            )
    if max_local_samples is not None:
        check_int(op, "max_local_samples", max_local_samples, 1)


def ortho_diversity_loss(global_tokens: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """mean over [B, Kg, Kg] of (ĝ ĝᵀ − I)² for global_tokens [B, Kg, H] -> scalar.

    float32 for fp16/bf16 inputs (as the reference), else the input dtype. backend: "auto" (Triton
    on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1; else the reference), "triton",
    or "torch" (the reference).
    """
    op = "ortho_diversity_loss"
    check_backend(op, backend, BACKENDS)
    kernel_global, _ = _autocast_tokens(global_tokens)
    _check_inputs(op, kernel_global, with_local=False)
    if use_triton(op, kernel_global, backend):
        return _diversity_op(kernel_global)[0]
    return reference.ortho_diversity_loss(global_tokens)  # the reference follows autocast itself


def ortho_cross_loss(
    global_tokens: torch.Tensor,
    local_tokens: torch.Tensor,
    max_local_samples: int | None = 100,
    backend: str = "auto",
) -> torch.Tensor:
    """mean over [B, Kg, n] of (ĝ l̂[:, idx]ᵀ)² for global_tokens [B, Kg, H] and local_tokens
    [B, Tl, H] -> scalar in the input dtype.

    idx = torch.linspace(0, Tl-1, max_local_samples, dtype=torch.long) on the local tokens' device
    when Tl > max_local_samples, else every row (also for max_local_samples=None). Only sampled
    local rows get a nonzero gradient. backend as for `ortho_diversity_loss`.
    """
    op = "ortho_cross_loss"
    check_backend(op, backend, BACKENDS)
    kernel_global, kernel_local = _autocast_tokens(global_tokens, local_tokens)
    _check_inputs(op, kernel_global, kernel_local, max_local_samples, with_local=True)
    if use_triton(op, kernel_global, backend):
        return _cross_op(kernel_global, kernel_local, max_local_samples)[0]
    return reference.ortho_cross_loss(global_tokens, local_tokens, max_local_samples)


def ortho_losses(
    global_tokens: torch.Tensor,
    local_tokens: torch.Tensor,
    max_local_samples: int | None = 100,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ortho_diversity_loss(global_tokens), ortho_cross_loss(global_tokens, local_tokens,
    max_local_samples)) for global_tokens [B, Kg, H] and local_tokens [B, Tl, H], computed together:
    the Triton path reads the global tokens once, in one forward and one backward kernel."""
    op = "ortho_losses"
    check_backend(op, backend, BACKENDS)
    kernel_global, kernel_local = _autocast_tokens(global_tokens, local_tokens)
    _check_inputs(op, kernel_global, kernel_local, max_local_samples, with_local=True)
    if use_triton(op, kernel_global, backend):
        return _losses_op(kernel_global, kernel_local, max_local_samples)[:2]
    return (
        reference.ortho_diversity_loss(global_tokens),
        reference.ortho_cross_loss(global_tokens, local_tokens, max_local_samples),
    )
