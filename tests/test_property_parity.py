"""Property-based parity of every public op of orca_kernels with its fp64 PyTorch reference.

Each test draws a small problem (shapes including batch 1 and, where the op allows them, zero-size
dimensions; dtype; memory layout; masks and sample counts; value magnitudes) with hypothesis,
builds the inputs from a drawn seed, runs the kernel (Triton, or the compiled extension for
strided_conv1d) and checks it against `orca_kernels.reference` evaluated in fp64 on the same
rounded inputs, for the output and for the gradients of a random upstream gradient, with the one
tolerance table of the suite (tests/tolerances.py).

Values come from a torch generator seeded by hypothesis rather than element by element: tensors
of a few hundred elements drawn one element at a time are slow to generate and shrink poorly,
while a seed plus the structural parameters (shape, layout, magnitude, which rows are special)
shrinks to a short, exact reproducer that hypothesis prints.

Example counts come from the loaded hypothesis profile (tests/conftest.py): `_examples(n)` is n
under the "ci" profile and scales with the profile's max_examples ("nightly" is 20x).
Non-contiguous inputs are views of wider buffers whose gaps hold NaN, so a kernel that reads
outside its view poisons its result.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import orca_kernels
from orca_kernels import reference
from orca_kernels.gated_residual import gated_residual
from tolerances import (
    LOW_PRECISION_FACTOR,
    MODULE_RELATIVE_TOLERANCE,
    RELATIVE_TOLERANCE,
    assert_matches_truth,
    assert_no_worse_than_unfused,
    relative_error,
)

pytestmark = pytest.mark.skipif(
    not orca_kernels.kernels_available("cpu") and not torch.cuda.is_available(),
    reason="the Triton kernels run on CUDA or under TRITON_INTERPRET=1",
)

DEVICE = torch.device("cpu") if orca_kernels.kernels_available("cpu") else torch.device("cuda")
# Examples per test under the "ci" profile; the profile's max_examples is this budget's unit.
CI_PROFILE_EXAMPLES = 100
LOW_PRECISION = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# Decimal exponents of input magnitudes per dtype: large (and small) values where the dtype holds
# them and the op stays well conditioned; fp16 tops out at 65504, so its range is narrow.
MAGNITUDES = {
    torch.float64: (-30, 30),
    torch.float32: (-6, 12),
    torch.bfloat16: (-6, 12),
    torch.float16: (-2, 1),
}


def _examples(ci_count: int) -> settings:
    """settings with `ci_count` examples under the ci profile, scaled by the loaded profile."""
    return settings(max_examples=max(1, round(ci_count * settings.default.max_examples / CI_PROFILE_EXAMPLES)))


# ----------------------------------------------------------------------------- input helpers


@st.composite
def layouts(draw, ndim: int):
    """How a tensor sits in memory: contiguous, rows of a wider buffer, every other element of a
    wider buffer (no unit stride), or a permutation of a contiguous buffer (transposes)."""
    kind = draw(st.sampled_from(["contiguous", "row_padded", "strided", "permuted"]))
    perm = tuple(draw(st.permutations(range(ndim)))) if kind == "permuted" else None
    return kind, perm


def _place(values: torch.Tensor, dtype: torch.dtype, layout) -> torch.Tensor:
    """`values` rounded to `dtype`, laid out as `layout` says, as a leaf that requires grad."""
    kind, perm = layout
    values = values.to(dtype)
    n = values.shape[-1] if values.dim() else 0
    if kind == "row_padded":
        buffer = torch.full((*values.shape[:-1], n + 3), math.nan, dtype=dtype, device=values.device)
        buffer[..., 2 : 2 + n] = values
        placed = buffer[..., 2 : 2 + n]
    elif kind == "strided":
        buffer = torch.full((*values.shape[:-1], 2 * n + 1), math.nan, dtype=dtype, device=values.device)
        buffer[..., 1::2] = values
        placed = buffer[..., 1::2]
    elif kind == "permuted":
        inverse = [perm.index(i) for i in range(len(perm))]
        placed = values.permute(perm).contiguous().permute(inverse)
    else:
        placed = values.clone()
    assert torch.equal(placed.nan_to_num(), values.nan_to_num())
    return placed.requires_grad_()


def _randn(gen: torch.Generator, shape, exponent: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0**exponent


def _to64(tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def _value_and_grads(fn, leaves, grad_out):
    """fn(*leaves) and the gradients of every leaf for the upstream gradient grad_out (zeros for a
    leaf the output does not depend on)."""
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads, strict=True)]
    return out.detach(), grads


def _check_all(names, actual, truth, same_dtype=None, tolerances=None):
    """assert_matches_truth over parallel lists (same-dtype references required for fp16/bf16).

    In fp32/fp64 a result passes within `tolerances`, or within LOW_PRECISION_FACTOR x the
    relative error of the same-dtype reference when one is given. Drawn problems include sums
    with cancellation (a bias gradient over rows whose terms nearly cancel, a rank-one weight
    gradient scaled by one such sum) whose relative error no fp32 computation bounds; the
    reference's own error measures that conditioning, so the kernel must match it, not beat it.
    """
    same_dtype = same_dtype or [None] * len(actual)
    tolerances = RELATIVE_TOLERANCE if tolerances is None else tolerances
    for name, a, t, r in zip(names, actual, truth, same_dtype, strict=True):
        if a.dtype in tolerances and r is not None:
            allowed = max(tolerances[a.dtype], LOW_PRECISION_FACTOR * relative_error(r, t))
            tolerances_here = {**tolerances, a.dtype: allowed}
        else:
            tolerances_here = tolerances
        assert_matches_truth(a, t, same_dtype_reference=r, name=name, tolerances=tolerances_here)


dtypes = st.sampled_from(ALL_DTYPES)
seeds = st.integers(0, 2**32 - 1)


def _exponent(draw, dtype: torch.dtype) -> int:
    low, high = MAGNITUDES[dtype]
    return draw(st.integers(low, high))


# ----------------------------------------------------------------------------- strided_conv1d


@_examples(100)
@given(
    data=st.data(),
    dtype=dtypes,
    batch=st.integers(0, 3),
    length=st.integers(0, 24),
    c_in=st.integers(0, 5),
    c_out=st.integers(0, 5),
    kernel_size=st.integers(1, 7),
    stride=st.integers(1, 5),
    # Up to past the kernel size: windows wholly in the padding (the bias), at both ends, and
    # with T = 0 every window.
    padding=st.integers(0, 9),
    with_bias=st.booleans(),
    seed=seeds,
)
def test_strided_conv1d_matches_reference(
    data, dtype, batch, length, c_in, c_out, kernel_size, stride, padding, with_bias, seed
):
    """strided_conv1d(backend="extension") = nn.Conv1d on the transposed input, in value and in the
    gradients of x, weight and bias, for any geometry with at least one window, any layout of x,
    the degenerate sizes included (B, T, C_in, C_out = 0; padding past the kernel size)."""
    assume(length + 2 * padding >= kernel_size)
    gen = torch.Generator().manual_seed(seed)
    # fp16 products of two in-range values stay in range only for modest magnitudes.
    x_exp, w_exp = _exponent(data.draw, dtype), _exponent(data.draw, dtype)
    x = _place(_randn(gen, (batch, length, c_in), x_exp), dtype, data.draw(layouts(3)))
    weight = _place(_randn(gen, (c_out, c_in, kernel_size), w_exp), dtype, data.draw(layouts(3)))
    leaves = [x, weight] + ([_place(_randn(gen, (c_out,), x_exp + w_exp), dtype, ("contiguous", None))] * with_bias)
    length_out = (length + 2 * padding - kernel_size) // stride + 1
    grad_out = _randn(gen, (batch, length_out, c_out)).to(dtype).double()

    def conv(backend_fn):
        return lambda x, w, *b: backend_fn(x, w, b[0] if b else None, stride, padding)

    extension = conv(lambda *a: orca_kernels.strided_conv1d(*a, backend="extension"))
    out, grads = _value_and_grads(extension, leaves, grad_out)
    truth, truth_grads = _value_and_grads(conv(reference.strided_conv1d), _to64(leaves), grad_out)
    same_dtype = None
    if dtype in LOW_PRECISION:
        # The bar of test_strided_conv.py: fp32 arithmetic on the dtype's values, rounded to the
        # dtype (what a half conv accumulating in fp32 gives; torch's CPU bf16 conv is unreliable).
        f32_leaves = [t.detach().float().requires_grad_() for t in leaves]
        ref, ref_grads = _value_and_grads(conv(reference.strided_conv1d), f32_leaves, grad_out)
        same_dtype = [t.to(dtype) for t in (ref, *ref_grads)]
    assert out.dtype == dtype
    names = ["output", "grad_x", "grad_weight", "grad_bias"][: 1 + len(leaves)]
    _check_all(names, [out, *grads], [truth, *truth_grads], same_dtype)


# ----------------------------------------------------------------------------- orthogonality losses


@_examples(70)
@given(
    data=st.data(),
    dtype=dtypes,
    which=st.sampled_from(["both", "diversity", "cross"]),
    batch=st.integers(0, 2),
    num_global=st.integers(0, 5),
    num_local=st.integers(0, 10),
    hidden=st.integers(0, 12),
    max_local_samples=st.none() | st.integers(1, 16),
    zero_rows=st.booleans(),
    seed=seeds,
)
def test_ortho_losses_match_reference(
    data, dtype, which, batch, num_global, num_local, hidden, max_local_samples, zero_rows, seed
):
    """ortho_losses / ortho_diversity_loss / ortho_cross_loss (Triton) = the reference losses, with
    the gradients of a random weighting of the losses, for any sub-sampling count (below, at and
    above the number of local rows, or None), rows of widely different norms, all-zero rows and
    any layout. Empty inputs give the reference's NaN / 1/Kg and zero gradients."""
    gen = torch.Generator().manual_seed(seed)
    low, high = MAGNITUDES[dtype]

    def tokens(rows):
        # Every row its own magnitude: the losses are scale invariant per row, the kernels' raw
        # dot products and sums of squares are not.
        exponents = torch.randint(low, high + 1, (batch, rows, 1), generator=gen).double()
        values = _randn(gen, (batch, rows, hidden)) * 10.0**exponents
        # All-zero rows contribute 0 (F.normalize's clamp). Not in fp16, where the reference's
        # clamp underflows to 0 and gives NaN: the documented difference of ortho_loss.py.
        # At least two nonzero rows stay, else the losses can be constant (gradients mathematically 0).
        if zero_rows and dtype != torch.float16 and rows >= 3:
            values[:, torch.randint(rows, (1,), generator=gen).item()] = 0
        return _place(values, dtype, data.draw(layouts(3)))

    g, l = tokens(num_global), tokens(num_local)
    weights = _randn(gen, (2,)).tolist()
    if num_local == 0:  # the cross loss is NaN (a mean over nothing): no part of the objective
        weights[1] = 0.0
    if num_global == 1:
        # The only Gram entry is cos(g, g) = 1: the diversity loss and its gradient are rounding
        # noise (checked for size below), so it takes no part in the gradient check.
        weights[0] = 0.0

    def losses(g, l, backend):
        if which == "both":
            return orca_kernels.ortho_losses(g, l, max_local_samples, backend=backend)
        if which == "diversity":
            return orca_kernels.ortho_diversity_loss(g, backend=backend), None
        return None, orca_kernels.ortho_cross_loss(g, l, max_local_samples, backend=backend)

    def objective_and_grads(g, l, backend):
        div, cross = losses(g, l, backend)
        terms = [w * loss for w, loss in zip(weights, (div, cross), strict=True) if loss is not None]
        grads = torch.autograd.grad(sum(terms), (g, l), allow_unused=True)
        grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip((g, l), grads, strict=True)]
        return [x if x is None else x.detach() for x in (div, cross)], grads

    (div, cross), grads = objective_and_grads(g, l, "triton")
    (div_truth, cross_truth), truth_grads = objective_and_grads(*_to64((g, l)), "torch")
    (div_ref, cross_ref), ref_grads = objective_and_grads(g, l, "torch")
    for actual, ref in ((div, div_ref), (cross, cross_ref)):
        assert actual is None or actual.dtype == ref.dtype
    names = ["grad global_tokens", "grad local_tokens"]
    if min(batch, num_global, hidden) == 0 or (which == "cross" and num_local == 0):
        # Means over nothing: NaN (1/Kg for the diversity loss of H = 0 tokens), zero gradients.
        for actual, ref in ((div, div_ref), (cross, cross_ref)):
            if actual is not None:
                torch.testing.assert_close(actual, ref, equal_nan=True)
        for name, grad in zip(names, grads, strict=True):
            assert torch.equal(grad, torch.zeros_like(grad)), name
        return
    same_dtype = dtype in LOW_PRECISION
    if div is not None:
        if num_global == 1 and div_truth.item() < 0.5:  # one nonzero token: rounding noise
            assert 0 <= div.item() < torch.finfo(dtype).eps, "diversity of one token"
        else:
            assert_matches_truth(div, div_truth, same_dtype_reference=div_ref, name="diversity")
    if cross is not None and num_local == 0:
        torch.testing.assert_close(cross, cross_ref, equal_nan=True)
    elif cross is not None:
        assert_matches_truth(cross, cross_truth, same_dtype_reference=cross_ref if same_dtype else None, name="cross")
    if hidden == 1:
        # One hidden unit: every normalised token is ±1 whatever its value, so the gradients are
        # mathematically 0 and the fp64 "truth" is rounding noise; only their size is checked.
        for name, grad in zip(names, grads, strict=True):
            assert torch.isfinite(grad).all(), name
    elif weights[0] != 0.0 or which != "diversity":
        _check_all(names, grads, truth_grads, ref_grads if same_dtype else None)
    indices = reference.local_sample_indices(num_local, max_local_samples, DEVICE)
    if which != "diversity" and indices is not None:  # only sampled local rows get a gradient
        unsampled = torch.ones(num_local, dtype=torch.bool)
        unsampled[indices] = False
        assert torch.all(grads[1][:, unsampled] == 0)


# ----------------------------------------------------------------------------- audio_rope


@_examples(80)
@given(
    data=st.data(),
    dtype=dtypes,
    batch=st.integers(0, 3),
    length=st.integers(0, 20),
    half=st.integers(0, 12),
    position_scale=st.floats(0.05, 20.0),
    rope_theta=st.sampled_from([10000.0, 1e6]) | st.floats(1.01, 1e7),
    non_finite=st.sampled_from([None, math.nan, math.inf, -math.inf]),
    seed=seeds,
)
def test_audio_rope_matches_reference(data, dtype, batch, length, half, position_scale, rope_theta, non_finite, seed):
    """audio_rope(backend="triton") is bit-identical to the same-dtype reference (its documented
    promise), values and gradients, NaN/±inf included (same positions, same values), and within the
    tolerance of the fp64 reference for finite inputs."""
    gen = torch.Generator().manual_seed(seed)
    values = _randn(gen, (batch, length, 2 * half), _exponent(data.draw, dtype))
    if non_finite is not None and values.numel():
        values.view(-1)[torch.randint(values.numel(), (1,), generator=gen)] = non_finite
    audio = _place(values, dtype, data.draw(layouts(3)))
    grad_out = _randn(gen, audio.shape).to(dtype)

    def rope(backend):
        return lambda a: orca_kernels.audio_rope(a, position_scale, rope_theta, backend=backend)

    out, grads = _value_and_grads(rope("triton"), [audio], grad_out)
    ref, ref_grads = _value_and_grads(rope("torch"), [audio], grad_out)
    for name, actual, expected in zip(["output", "grad"], [out, *grads], [ref, *ref_grads], strict=True):
        assert actual.dtype == dtype
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=name)
    if non_finite is None:
        truth, truth_grads = _value_and_grads(rope("torch"), _to64([audio]), grad_out.double())
        _check_all(["output", "grad"], [out, *grads], [truth, *truth_grads], [ref, *ref_grads])


# ----------------------------------------------------------------------------- flash_cross_attention


@st.composite
def attention_problems(draw, finite: bool = True, long_memory: bool = False):
    """(dtype, q, k, v leaves and views, mask, scale, grad_out) of a small attention problem.
    long_memory: 33 to 100 keys, more than one of the interpreter's 32-key blocks."""
    dtype = draw(dtypes)
    smallest = 0 if finite else 1  # a non-finite query needs a query
    batch, t_x = draw(st.integers(smallest, 3)), draw(st.integers(smallest, 9))
    t_a = draw(st.integers(33, 100) if long_memory else st.integers(0, 10))
    # Head dims that fit one block, and ones the kernels split into main + tail blocks (33, 40, 80).
    heads, head_dim = draw(st.integers(1, 3)), draw(st.integers(1, 20) | st.sampled_from([33, 40, 80]))
    gen = torch.Generator().manual_seed(draw(seeds))
    # Large q with small k (and the other way round): the scores stay O(1), so the problem stays
    # well conditioned while the kernel handles values far from 1; v's magnitude is free.
    qk_exp = draw(st.integers(*MAGNITUDES[dtype]).map(lambda e: max(-4, min(4, e))))
    v_exp = _exponent(draw, dtype)
    q = _place(_randn(gen, (batch, t_x, heads, head_dim), qk_exp), dtype, draw(layouts(4)))
    packed = draw(st.booleans())
    if packed:  # k and v as the two column halves of one [B, Ta, 2H] projection, as the module has
        kv_values = torch.cat(
            [_randn(gen, (batch, t_a, heads * head_dim), -qk_exp), _randn(gen, (batch, t_a, heads * head_dim), v_exp)],
            dim=-1,
        )
        kv = _place(kv_values, dtype, draw(layouts(3)))
        leaves = [q, kv]

        def views(leaves):
            q, kv = leaves
            size = heads * head_dim
            return q, kv[..., :size].unflatten(-1, (heads, head_dim)), kv[..., size:].unflatten(-1, (heads, head_dim))

    else:
        k = _place(_randn(gen, (batch, t_a, heads, head_dim), -qk_exp), dtype, draw(layouts(4)))
        v = _place(_randn(gen, (batch, t_a, heads, head_dim), v_exp), dtype, draw(layouts(4)))
        leaves = [q, k, v]

        def views(leaves):
            return tuple(leaves)

    mask = None
    if draw(st.booleans()):
        mask = torch.rand(batch, t_a, generator=gen) < draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
        if batch and draw(st.booleans()):  # one batch element with every key ignored
            mask[draw(st.integers(0, batch - 1))] = True
    bad = None
    if not finite:
        bad = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        index = tuple(draw(st.integers(0, s - 1)) for s in q.shape)
        with torch.no_grad():
            q[index] = bad
    scale = draw(st.none() | st.floats(0.05, 2.0))
    grad_out = _randn(gen, (batch, t_x, heads, head_dim)).to(dtype)
    return dtype, leaves, views, packed, mask, scale, grad_out, bad


def _attention(views, mask, scale, backend):
    return lambda *leaves: orca_kernels.flash_cross_attention(*views(leaves), mask, scale=scale, backend=backend)


@_examples(80)
@given(problem=attention_problems())
def test_flash_cross_attention_matches_reference(problem):
    """flash_cross_attention(backend="triton") = the SDPA reference in value and in the gradients
    of q, k and v, with or without a key padding mask (partly or fully masked batch elements, whose
    output and gradients are exactly 0), any scale, any layout (k/v packed or separate), empty
    batch, Tx or Ta."""
    dtype, leaves, views, packed, mask, scale, grad_out, _ = problem
    out, grads = _value_and_grads(_attention(views, mask, scale, "triton"), leaves, grad_out.double())
    truth, truth_grads = _value_and_grads(_attention(views, mask, scale, "torch"), _to64(leaves), grad_out.double())
    ref, ref_grads = _value_and_grads(_attention(views, mask, scale, "torch"), leaves, grad_out.double())
    same_dtype = [ref, *ref_grads]
    assert out.dtype == dtype and out.is_contiguous()
    names = ["output", *(["grad q", "grad kv"] if packed else ["grad q", "grad k", "grad v"])]
    results, truths = [out, *grads], [truth, *truth_grads]
    batch, t_a = out.shape[0], views(leaves)[1].shape[1]
    attended = t_a - (mask.sum(-1) if mask is not None else torch.zeros(batch, dtype=torch.long))
    if batch and int(attended.max()) <= 1:
        # At most one key per query: the softmax is constant, so dq and dk are rounding noise
        # (mathematically 0); they are only checked for being small. Packed, dk is the first half
        # of the kv gradient and dv the second.
        if packed:
            size = grads[1].shape[-1] // 2
            grads = [grads[0], grads[1][..., :size], grads[1][..., size:]]
            truth_grads = [truth_grads[0], truth_grads[1][..., :size], truth_grads[1][..., size:]]
            names = ["output", "grad q", "grad k", "grad v"]
            results, truths = [out, *grads], [truth, *truth_grads]
            if same_dtype:
                same_dtype = [same_dtype[0], same_dtype[1], same_dtype[2][..., :size], same_dtype[2][..., size:]]
        for grad in grads[:2]:
            # Noise scales with |q|·|k|·|v|·|dO| (q and k enter dk and dq crosswise).
            bound = 1e3 * torch.finfo(dtype).eps
            for t in (*truths[:1], *_to64(views(leaves)), grad_out):
                bound *= 1 + (t.detach().abs().max().item() if t.numel() else 0)
            assert grad.numel() == 0 or grad.abs().max() <= bound
        names, results, truths = [names[0], names[3]], [results[0], results[3]], [truths[0], truths[3]]
        same_dtype = same_dtype and [same_dtype[0], same_dtype[3]]
    _check_all(names, results, truths, same_dtype)
    if mask is not None:  # fully masked batch elements: exactly 0, with exactly zero gradients
        for b in torch.nonzero(mask.all(-1)).flatten().tolist():
            for name, t in zip(names, [out, *grads], strict=False):
                assert torch.all(t[b] == 0), name


@_examples(40)
@given(problem=attention_problems(long_memory=True))
def test_flash_decode_split_matches_reference(problem):
    """A decode step (Tx <= 9 <= 16) over a memory of several key blocks runs split over the keys
    (one program per block under the interpreter) and merged by the combine kernel: its output
    is the reference's, with masks that leave whole splits without a key or mask whole rows."""
    dtype, leaves, views, packed, mask, scale, _, _ = problem
    with torch.no_grad():
        out = _attention(views, mask, scale, "triton")(*leaves)
        truth = _attention(views, mask, scale, "torch")(*_to64(leaves))
        ref = _attention(views, mask, scale, "torch")(*leaves)
    _check_all(["output"], [out], [truth], [ref])
    if mask is not None:
        for b in torch.nonzero(mask.all(-1)).flatten().tolist():
            assert torch.all(out[b] == 0)


@_examples(40)
@given(problem=attention_problems(finite=False))
def test_flash_cross_attention_non_finite_query(problem):
    """A NaN or ±inf in one query element: the kernel's output row (batch, query, head) is NaN as
    the reference's is (unless its batch element is fully masked: then 0 on both), and the NaN
    pattern and finite values of the output and of every gradient agree between the backends
    (test_flash_attention.py::test_non_finite_query_gives_nan_on_both_backends)."""
    dtype, leaves, views, packed, mask, scale, grad_out, bad = problem
    assume(dtype in (torch.float32, torch.float64))  # the promise is stated and tested for fp32/fp64
    out, grads = _value_and_grads(_attention(views, mask, scale, "triton"), leaves, grad_out)
    ref, ref_grads = _value_and_grads(_attention(views, mask, scale, "torch"), leaves, grad_out)
    truth, truth_grads = _value_and_grads(_attention(views, mask, scale, "torch"), _to64(leaves), grad_out.double())
    q = views(leaves)[0].detach()
    bad_rows = ~q.isfinite().all(-1)  # [B, Tx, nh]
    if mask is not None:
        bad_rows &= ~mask.all(-1)[:, None, None]
    if views(leaves)[1].shape[1] > 0:
        assert ref[bad_rows].isnan().all(), "the reference hid a non-finite query"
    names = ["output", "grad q", "grad k/kv", "grad v"]
    attended = views(leaves)[1].shape[1] - (mask.sum(-1) if mask is not None else 0)
    one_key = bool((torch.as_tensor(attended) == 1).any())
    for name, actual, expected, exact in zip(
        names, [out, *grads], [ref, *ref_grads], [truth, *truth_grads], strict=False
    ):
        if name != "output" and (not math.isnan(bad) or one_key):
            # The gradients of a row whose output is NaN are not specified beyond NaN in, NaN out:
            # an infinite query scores ±inf, and inf − inf, 0 · inf are NaN in the kernel and 0 in
            # SDPA's CPU softmax; so is dq (and dk) of a NaN query with one key, 0 · NaN (the
            # softmax is constant). Their outputs agree above.
            continue
        assert torch.equal(actual.isnan(), expected.isnan()), f"{name}: NaN patterns differ"
        # The finite entries against the fp64 truth, with the suite's tolerance (relative to their
        # largest magnitude, which an absolute tolerance would not respect for large v).
        assert torch.equal(actual.isnan(), exact.isnan()), f"{name}: NaN patterns differ from fp64"
        assert_matches_truth(actual.nan_to_num(0.0), exact.nan_to_num(0.0), name=name)


# ----------------------------------------------------------------------------- gated_residual


@_examples(80)
@given(
    data=st.data(),
    dtype=dtypes,
    batch=st.integers(0, 3),
    length=st.integers(0, 6),
    # H = 1: LayerNorm gives its bias, d/d(ln_weight) is 0; H = 2: it gives ±1 and d/d(attended) comes
    # from eps alone. Both are cancellation noise, in the fp64 truth too.
    size=st.integers(3, 24),
    gate=st.integers(1, 8),
    constant_row=st.booleans(),
    seed=seeds,
)
def test_gated_residual_matches_reference(data, dtype, batch, length, size, gate, constant_row, seed):
    """gated_residual (Triton) = hidden + σ(GELU(u)·w₂ + b₂) ⊙ LayerNorm(attended) of the
    reference, in value and in the gradients of all seven inputs, for any layout of the
    activations and parameters, large residual streams and LayerNorm inputs, constant rows."""
    gen = torch.Generator().manual_seed(seed)
    hidden_exp, attended_exp = _exponent(data.draw, dtype), _exponent(data.draw, dtype)
    attended = _randn(gen, (batch, length, size), attended_exp) + 0.5 * 10.0**attended_exp  # nonzero mean
    if constant_row and batch * length > 1:  # not the only row, whose d/d(ln_weight) would be 0
        attended[0, 0] = 10.0**attended_exp  # zero variance: LayerNorm gives its bias
    values = [
        _randn(gen, (batch, length, size), hidden_exp),
        attended,
        _randn(gen, (batch, length, gate)),  # the gate's pre-activation: GELU and σ saturate
        _randn(gen, (1, gate)),
        _randn(gen, (1,)),
        _randn(gen, (size,)) + 1,
        _randn(gen, (size,)),
    ]
    # Activations in any layout; the parameters contiguous, as a module holds them (strided ones:
    # test_gated_residual_strided_parameters).
    leaves = [_place(v, dtype, data.draw(layouts(3)) if v.dim() == 3 else ("contiguous", None)) for v in values]
    grad_out = _randn(gen, (batch, length, size)).to(dtype).double()
    out, grads = _value_and_grads(gated_residual, leaves, grad_out)
    truth, truth_grads = _value_and_grads(reference.gated_residual, _to64(leaves), grad_out)
    ref, ref_grads = _value_and_grads(reference.gated_residual, leaves, grad_out)
    same_dtype = [ref, *ref_grads]
    assert out.dtype == dtype
    names = ["output", "hidden", "attended", "gate_hidden", "gate_out_weight", "gate_out_bias", "ln_weight", "ln_bias"]
    _check_all(names, [out, *grads], [truth, *truth_grads], same_dtype)


# ----------------------------------------------------------------------------- gated cross-attention


@st.composite
def module_problems(draw):
    """A gated cross-attention problem: dtype, hidden, memory, the ten parameters (leaves), heads,
    mask, RoPE arguments, upstream gradient."""
    dtype = draw(dtypes)
    # Batch >= 1: the reference (F.multi_head_attention_forward) cannot reshape an empty batch.
    batch, t_x, t_a = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(0, 7))
    heads, head_dim = draw(st.integers(1, 3)), 2 * draw(st.integers(1, 4))  # the RoPE needs an even H
    size = heads * head_dim
    assume(size >= 4)  # the gate's hidden width is H // 4
    gate = size // 4
    gen = torch.Generator().manual_seed(draw(seeds))
    # A large residual stream with correspondingly small query and gate weights: the attention
    # and the gate see O(1) inputs (well conditioned), the residual add sees large values.
    hidden_exp = draw(st.integers(-2, 3 if dtype == torch.float16 else 6))
    std = 1 / math.sqrt(size)
    in_proj_weight = _randn(gen, (3 * size, size)) * std
    in_proj_weight[:size] *= 10.0**-hidden_exp
    parameters = [
        in_proj_weight,
        _randn(gen, (3 * size,)) * 0.5,
        _randn(gen, (size, size)) * std,
        _randn(gen, (size,)) * 0.5,
        _randn(gen, (gate, size)) * std * 10.0**-hidden_exp,
        _randn(gen, (gate,)) * 0.5,
        _randn(gen, (1, gate)),
        _randn(gen, (1,)) * 0.5,
        _randn(gen, (size,)) + 1,
        _randn(gen, (size,)) * 0.5,
    ]
    hidden = _place(_randn(gen, (batch, t_x, size), hidden_exp), dtype, draw(layouts(3)))
    memory = _place(_randn(gen, (batch, t_a, size)), dtype, draw(layouts(3)))
    # The GEMM weights and biases in any layout; the last four (read by gated_residual) contiguous,
    # see test_gated_residual_strided_parameters.
    params = [
        _place(p, dtype, draw(layouts(p.dim())) if i < 6 else ("contiguous", None)) for i, p in enumerate(parameters)
    ]
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(batch, t_a, generator=gen) < draw(st.sampled_from([0.0, 0.4, 1.0]))
        if batch and draw(st.booleans()):
            mask[draw(st.integers(0, batch - 1))] = True
    rope = (draw(st.floats(0.5, 5.0)), draw(st.sampled_from([10000.0, 1e6])))
    grad_out = _randn(gen, (batch, t_x, size)).to(dtype)
    return dtype, hidden, memory, params, heads, mask, rope, grad_out


PARAMETER_NAMES = [
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
]


def _check_module(dtype, names, actual, truth, same_dtype):
    """A whole module: MODULE_RELATIVE_TOLERANCE in fp32/fp64; in fp16/bf16 (a chain of rounded
    ops) the suite's rule for chains, no worse than LOW_PRECISION_FACTOR x the unfused path."""
    if dtype not in LOW_PRECISION:
        _check_all(names, actual, truth, same_dtype, tolerances=MODULE_RELATIVE_TOLERANCE)
        return
    # As the suite's bf16 module tests do, the parameter gradients are one group: a single bias
    # gradient (a sum with cancellation) can beat or miss the unfused path's error by chance.
    groups = [(names[i], actual[i], truth[i], same_dtype[i]) for i in range(3)]
    groups.append(
        (
            "parameter gradients",
            *(torch.cat([t.flatten().double() for t in ts[3:]]) for ts in (actual, truth, same_dtype)),
        )
    )
    for name, a, t, r in groups:
        assert a.shape == t.shape and not a.isnan().any(), name
        if t.numel():
            assert_no_worse_than_unfused(a, r, t, name=name)


@_examples(50)
@given(problem=module_problems(), attention_backend=st.sampled_from(["triton", "sdpa"]))
def test_gated_cross_attention_matches_reference(problem, attention_backend):
    """gated_cross_attention(backend="triton") with either attention core = the reference module's
    functional path in value and in the gradients of hidden, audio and all ten parameters, with or
    without a mask (fully masked batch elements attend to nothing), empty audio (returns hidden),
    any layout."""
    dtype, hidden, audio, params, heads, mask, (position_scale, rope_theta), grad_out = problem

    def op(backend):
        return lambda hidden, audio, *params: orca_kernels.gated_cross_attention(
            hidden,
            audio,
            *params,
            heads,
            key_padding_mask=mask,
            position_scale=position_scale,
            rope_theta=rope_theta,
            backend=backend,
            attention_backend=attention_backend,
        )

    leaves = [hidden, audio, *params]
    out, grads = _value_and_grads(op("triton"), leaves, grad_out)
    truth, truth_grads = _value_and_grads(op("torch"), _to64(leaves), grad_out.double())
    ref, ref_grads = _value_and_grads(op("torch"), leaves, grad_out)
    assert out.dtype == dtype
    if audio.shape[1] == 0:  # empty audio: hidden itself, on both backends
        assert torch.equal(out, hidden.detach())
    _check_module(
        dtype, ["output", "hidden", "audio", *PARAMETER_NAMES], [out, *grads], [truth, *truth_grads], [ref, *ref_grads]
    )


@_examples(30)
@given(problem=module_problems(), data=st.data())
def test_a_parameter_of_another_dtype_is_one_error_on_every_backend(problem, data):
    """Outside autocast, any one parameter in another floating dtype than hidden: the same error,
    naming it, from every backend, before any work (empty audio included)."""
    dtype, hidden, audio, params, heads, mask, _, _ = problem
    index = data.draw(st.integers(0, len(params) - 1))
    other = data.draw(st.sampled_from([d for d in ALL_DTYPES if d != dtype]))
    params = list(params)
    params[index] = params[index].detach().to(other)
    messages = set()
    for backend in ("triton", "torch", "auto"):
        with pytest.raises(ValueError) as error:
            orca_kernels.gated_cross_attention(hidden, audio, *params, heads, key_padding_mask=mask, backend=backend)
        messages.add(str(error.value))
    assert messages == {
        f"gated_cross_attention: {PARAMETER_NAMES[index]} is {other} but hidden is {dtype}; outside torch.autocast "
        "every parameter must have hidden's dtype (under autocast the GEMMs cast them)"
    }


@_examples(40)
@given(problem=module_problems())
def test_project_and_attend_audio_kv_match_reference(problem):
    """The decode pair: project_audio_kv(rotated) is the packed K/V rows of the in-projection
    (rotated · W[H:3H]ᵀ + b[H:3H]), and attend_audio_kv(hidden, project_audio_kv(rotated)) equals
    the reference's post-RoPE path, reference.attend_rotated, in value and gradients (of hidden,
    the rotated memory and all ten parameters). Empty memory returns hidden."""
    dtype, hidden, rotated, params, heads, mask, _, grad_out = problem
    size = hidden.shape[-1]
    kv = orca_kernels.project_audio_kv(rotated, params[0], params[1]).detach()
    kv_truth = F.linear(
        rotated.detach().double(), params[0].detach().double()[size:], params[1].detach().double()[size:]
    )
    same_dtype = F.linear(rotated.detach(), params[0].detach()[size:], params[1].detach()[size:])
    assert kv.shape == (*rotated.shape[:2], 2 * size) and kv.dtype == dtype
    assert_matches_truth(kv, kv_truth, same_dtype_reference=same_dtype, name="project_audio_kv")

    def fused(hidden, rotated, *params):
        kv = orca_kernels.project_audio_kv(rotated, params[0], params[1])
        return orca_kernels.attend_audio_kv(hidden, kv, *params, heads, mask)

    def unfused(hidden, rotated, *params):
        if rotated.shape[1] == 0:
            return hidden
        return reference.attend_rotated(hidden, rotated, *params, heads, mask)

    leaves = [hidden, rotated, *params]
    out, grads = _value_and_grads(fused, leaves, grad_out)
    truth, truth_grads = _value_and_grads(unfused, _to64(leaves), grad_out.double())
    ref, ref_grads = _value_and_grads(unfused, leaves, grad_out)
    assert out.dtype == dtype
    _check_module(
        dtype,
        ["output", "hidden", "rotated", *PARAMETER_NAMES],
        [out, *grads],
        [truth, *truth_grads],
        [ref, *ref_grads],
    )


# ----------------------------------------------------------------------------- regressions found by this file


@_examples(10)
@given(
    which=st.sampled_from(["gate_out_weight", "ln_weight", "ln_bias"]),
    op=st.sampled_from(["gated_residual", "gated_cross_attention"]),
    seed=seeds,
)
@example(which="ln_bias", op="gated_residual", seed=0)
def test_gated_residual_strided_parameters(which, op, seed):
    """A parameter of the gated residual that is a strided view (every other element of a wider
    tensor) gives the reference's result. The kernel once read gate_out_weight, ln_weight and
    ln_bias as if contiguous, so gated_residual and gated_cross_attention(backend="triton") read
    the gaps."""
    gen = torch.Generator().manual_seed(seed)
    size, heads = 8, 2
    names = ["hidden", "audio", *PARAMETER_NAMES]
    shapes = [(1, 2, size), (1, 3, size), (3 * size, size), (3 * size,), (size, size), (size,), (2, size), (2,)]
    shapes += [(1, 2), (1,), (size,), (size,)]
    values = {name: _randn(gen, shape) for name, shape in zip(names, shapes, strict=True)}
    tensors = {name: v.clone() for name, v in values.items()}
    tensors[which] = _place(values[which], torch.float64, ("strided", None)).detach()
    assert not tensors[which].is_contiguous()
    if op == "gated_residual":
        hidden, attended = tensors["hidden"], tensors["audio"][:, :2]
        args = [hidden, attended, _randn(gen, (1, 2, 2)), *(tensors[n] for n in PARAMETER_NAMES[6:])]
        out, expected = gated_residual(*args), reference.gated_residual(*args)
    else:
        args = [tensors[n] for n in names]
        out = orca_kernels.gated_cross_attention(*args, heads, backend="triton")
        expected = reference.gated_cross_attention(*args, heads)
    assert_matches_truth(out, expected, name=f"{op} with a strided {which}", tolerances=MODULE_RELATIVE_TOLERANCE)


@_examples(10)
@given(
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
    t_a=st.integers(0, 4),
    grad_mode=st.booleans(),
    seed=seeds,
)
@example(bad=math.nan, t_a=1, grad_mode=False, seed=0)
@example(bad=math.nan, t_a=0, grad_mode=False, seed=0)
def test_flash_cross_attention_non_finite_query_no_keys(bad, t_a, grad_mode, seed):
    """A non-finite query with no key to attend to (every key ignored, or Ta = 0 without a
    mask): 0 output and zero gradients on both backends, as the reference gives for a fully
    masked element (test_fully_masked_row_stays_zero_with_a_nan_query) and the kernel's docstring
    promises ("a query whose keys are all ignored (or Ta = 0) gets 0"). Once, fully masked, the
    kernel gave NaN (output and gradients), and with Ta = 0 without a mask the reference did."""
    gen = torch.Generator().manual_seed(seed)
    q = _randn(gen, (1, 1, 1, 1)).requires_grad_()
    k, v = (_randn(gen, (1, t_a, 1, 1)).requires_grad_() for _ in range(2))
    with torch.no_grad():
        q[0, 0, 0, 0] = bad
    mask = torch.ones(1, t_a, dtype=torch.bool) if t_a else None
    for backend in ("torch", "triton"):
        out = orca_kernels.flash_cross_attention(q, k, v, mask, backend=backend)
        assert torch.equal(out, torch.zeros_like(out)), f"{backend}: {out.flatten().tolist()}"
        if grad_mode:
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            assert all(torch.equal(g, torch.zeros_like(g)) for g in grads), backend
