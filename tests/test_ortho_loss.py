"""Fused orthogonality losses (orca_kernels.ortho_loss) against the reference (docs/ops.md#ortho_losses).

Kernel tests run where the kernels run (the `triton_device` fixture of conftest.py): CPU tensors
through the interpreter under TRITON_INTERPRET=1, CUDA tensors otherwise. Shapes are small and each
listed value of Kg, Tl, H, B and max_local_samples appears in at least one case rather than in a
full product, to keep the interpreter fast.
"""

from __future__ import annotations

import re

import pytest
import torch

import orca_kernels
from orca_kernels import _utils, reference
from tolerances import assert_matches_truth

# (B, Kg, Tl, H, max_local_samples): every Kg in {1, 4, 8, 64}, Tl in {1, 50, 99, 100, 101, 375, 383,
# 439}, H in {16, 80, 128}, B in {1, 3}, max_local_samples in {100, None, 7}; plus Kg past one block.
CASES = [
    (1, 1, 1, 16, 100),
    (3, 4, 50, 80, 100),
    (1, 8, 99, 128, None),
    (1, 64, 100, 16, 100),
    (1, 4, 101, 80, 100),
    (3, 8, 375, 16, 100),
    (1, 1, 383, 80, None),
    (3, 4, 439, 16, 7),
    (1, 64, 439, 80, 100),
    (1, 65, 12, 16, 7),
]


@pytest.fixture
def device(triton_device):
    """The devices where the Triton kernels run in this process (conftest.TRITON_DEVICES)."""
    return triton_device


def _tokens(shape, dtype, device) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64, device=device).to(dtype).requires_grad_()


def _truth(g, l, max_local_samples, weights):
    """fp64 reference losses and gradients of weights·(diversity, cross)."""
    g64 = g.detach().double().requires_grad_()
    l64 = l.detach().double().requires_grad_()
    div = reference.ortho_diversity_loss(g64)
    cross = reference.ortho_cross_loss(g64, l64, max_local_samples)
    grads = torch.autograd.grad(weights[0] * div + weights[1] * cross, (g64, l64))
    return div, cross, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Kg{}-Tl{}-H{}-n{}".format(*c))
def test_losses_match_reference(device, dtype, case):
    B, K, T, H, max_local_samples = case
    g, l = _tokens((B, K, H), dtype, device), _tokens((B, T, H), dtype, device)
    weights = (1.7, 0.6)
    div, cross = orca_kernels.ortho_losses(g, l, max_local_samples, backend="triton")
    grad_g, grad_l = torch.autograd.grad(weights[0] * div + weights[1] * cross, (g, l))
    div_truth, cross_truth, (grad_g_truth, grad_l_truth) = _truth(g, l, max_local_samples, weights)
    assert div.dtype == cross.dtype == dtype
    if K == 1:  # the only Gram entry is cos(g, g) = 1: the loss is rounding noise
        assert 0 <= div.item() < torch.finfo(dtype).eps
    else:
        assert_matches_truth(div, div_truth, name="diversity")
    assert_matches_truth(cross, cross_truth, name="cross")
    assert_matches_truth(grad_g, grad_g_truth, name="grad global_tokens")
    assert_matches_truth(grad_l, grad_l_truth, name="grad local_tokens")
    indices = reference.local_sample_indices(T, max_local_samples, device)
    if indices is not None:  # only sampled local rows get a gradient
        unsampled = torch.ones(T, dtype=torch.bool, device=device)
        unsampled[indices] = False
        assert torch.all(grad_l[:, unsampled] == 0)
        assert torch.all(grad_l[:, indices].abs().sum(-1) > 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", [(3, 8, 101, 80, 100), (1, 4, 30, 16, None)], ids=["subsampled", "all-rows"])
def test_single_losses_match_reference(device, dtype, case):
    B, K, T, H, max_local_samples = case
    g, l = _tokens((B, K, H), dtype, device), _tokens((B, T, H), dtype, device)
    div = orca_kernels.ortho_diversity_loss(g, backend="triton")
    cross = orca_kernels.ortho_cross_loss(g, l, max_local_samples, backend="triton")
    (grad_div,) = torch.autograd.grad(div, g)
    grad_cross_g, grad_cross_l = torch.autograd.grad(cross, (g, l))
    div_truth, _, (grad_div_truth, _) = _truth(g, l, max_local_samples, (1.0, 0.0))
    _, cross_truth, (grad_cross_g_truth, grad_cross_l_truth) = _truth(g, l, max_local_samples, (0.0, 1.0))
    assert_matches_truth(div, div_truth, name="diversity")
    assert_matches_truth(grad_div, grad_div_truth, name="diversity grad")
    assert_matches_truth(cross, cross_truth, name="cross")
    assert_matches_truth(grad_cross_g, grad_cross_g_truth, name="cross grad global_tokens")
    assert_matches_truth(grad_cross_l, grad_cross_l_truth, name="cross grad local_tokens")


def test_wide_hidden_size(device):
    g, l = _tokens((1, 4, 1280), torch.float32, device), _tokens((1, 9, 1280), torch.float32, device)
    div, cross = orca_kernels.ortho_losses(g, l, 4, backend="triton")
    grad_g, grad_l = torch.autograd.grad(div + cross, (g, l))
    div_truth, cross_truth, (grad_g_truth, grad_l_truth) = _truth(g, l, 4, (1.0, 1.0))
    for actual, truth, name in [
        (div, div_truth, "diversity"),
        (cross, cross_truth, "cross"),
        (grad_g, grad_g_truth, "grad global"),
        (grad_l, grad_l_truth, "grad local"),
    ]:
        assert_matches_truth(actual, truth, name=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_and_tiny_rows(device, dtype):
    """Tokens with norm < 1e-12 are divided by the clamped norm (no radial gradient term); all-zero
    tokens contribute 0 and get a zero gradient."""
    g, l = _tokens((2, 5, 80), dtype, device), _tokens((2, 120, 80), dtype, device)
    with torch.no_grad():
        g[0, 2] = 0
        g[1, 4] *= 1e-14
        l[1, 0] = 0  # a sampled row (idx[0] = 0)
        l[1, 3] = 0  # an unsampled row
        l[0, 6] *= 1e-14  # sampled
    div, cross = orca_kernels.ortho_losses(g, l, backend="triton")
    grad_g, grad_l = torch.autograd.grad(div + 0.5 * cross, (g, l))
    div_truth, cross_truth, (grad_g_truth, grad_l_truth) = _truth(g, l, 100, (1.0, 0.5))
    assert_matches_truth(div, div_truth, name="diversity")
    assert_matches_truth(cross, cross_truth, name="cross")
    assert_matches_truth(grad_g, grad_g_truth, name="grad global_tokens")
    assert_matches_truth(grad_l, grad_l_truth, name="grad local_tokens")
    assert torch.all(grad_g[0, 2] == 0) and torch.all(grad_l[1, 0] == 0)


def test_non_contiguous_inputs_and_gradients(device):
    wide_g = torch.randn(3, 12, 100, dtype=torch.float64, device=device)
    g = wide_g[:, ::2, 7:87].requires_grad_()  # [3, 6, 80], token stride 200
    l = torch.randn(3, 80, 45, dtype=torch.float64, device=device).transpose(1, 2).requires_grad_()  # hidden stride 45
    assert not g.is_contiguous() and not l.is_contiguous()
    # Loss gradients that are views at an offset into a larger buffer.
    grad_outputs = torch.tensor([0.0, 1.3, 0.0, 0.4], dtype=torch.float64, device=device)
    div, cross = orca_kernels.ortho_losses(g, l, 7, backend="triton")
    grad_g, grad_l = torch.autograd.grad((div, cross), (g, l), grad_outputs=(grad_outputs[1], grad_outputs[3]))
    div_truth, cross_truth, (grad_g_truth, grad_l_truth) = _truth(g, l, 7, (1.3, 0.4))
    assert_matches_truth(div, div_truth, name="diversity")
    assert_matches_truth(cross, cross_truth, name="cross")
    assert_matches_truth(grad_g, grad_g_truth, name="grad global_tokens")
    assert_matches_truth(grad_l, grad_l_truth, name="grad local_tokens")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_reference_error(device, dtype):
    """fp16/bf16: at most 2x the same-dtype reference's error against fp64. (On CPU the bf16 dot
    operands are upcast under the interpreter, so the GPU run is the real bf16 check.)"""
    g, l = _tokens((2, 8, 80), dtype, device), _tokens((2, 120, 80), dtype, device)
    div, cross = orca_kernels.ortho_losses(g, l, backend="triton")
    grad_g, grad_l = torch.autograd.grad(div + cross, (g, l))
    div_ref, cross_ref = orca_kernels.ortho_losses(g, l, backend="torch")
    grad_g_ref, grad_l_ref = torch.autograd.grad(div_ref + cross_ref, (g, l))
    div_truth, cross_truth, (grad_g_truth, grad_l_truth) = _truth(g, l, 100, (1.0, 1.0))
    assert (div.dtype, cross.dtype, grad_g.dtype) == (div_ref.dtype, cross_ref.dtype, grad_g_ref.dtype)
    assert (div.dtype, cross.dtype, grad_g.dtype) == (torch.float32, dtype, dtype)
    for actual, ref, truth, name in [
        (div, div_ref, div_truth, "diversity"),
        (cross, cross_ref, cross_truth, "cross"),
        (grad_g, grad_g_ref, grad_g_truth, "grad global_tokens"),
        (grad_l, grad_l_ref, grad_l_truth, "grad local_tokens"),
    ]:
        assert_matches_truth(actual, truth, same_dtype_reference=ref, name=name)


@pytest.mark.parametrize(
    "shape_g, shape_l",
    [((0, 4, 16), (0, 9, 16)), ((2, 0, 16), (2, 9, 16)), ((2, 3, 16), (2, 0, 16)), ((2, 3, 0), (2, 9, 0))],
    ids=["B0", "Kg0", "Tl0", "H0"],
)
def test_empty_inputs_follow_reference(device, shape_g, shape_l):
    """Means over nothing are NaN as in the reference; gradients are zero (or empty)."""
    g, l = _tokens(shape_g, torch.float32, device), _tokens(shape_l, torch.float32, device)
    div, cross = orca_kernels.ortho_losses(g, l, backend="triton")
    grad_g, grad_l = torch.autograd.grad(div + cross, (g, l), allow_unused=True)
    div_ref, cross_ref = orca_kernels.ortho_losses(g, l, backend="torch")
    grad_g_ref, grad_l_ref = torch.autograd.grad(div_ref + cross_ref, (g, l), allow_unused=True)
    torch.testing.assert_close(div, div_ref, equal_nan=True)
    torch.testing.assert_close(cross, cross_ref, equal_nan=True)
    torch.testing.assert_close(grad_g, grad_g_ref, equal_nan=True)
    torch.testing.assert_close(grad_l, grad_l_ref, equal_nan=True)


def test_gradcheck_fp64(device):
    g, l = _tokens((2, 3, 16), torch.float64, device), _tokens((2, 9, 16), torch.float64, device)
    checks = {
        "losses": lambda g, l: orca_kernels.ortho_losses(g, l, 4, backend="triton"),
        "diversity": lambda g, l: orca_kernels.ortho_diversity_loss(g, backend="triton") + 0 * l.sum(),
        "cross": lambda g, l: orca_kernels.ortho_cross_loss(g, l, 4, backend="triton"),
    }
    for name, fn in checks.items():
        assert torch.autograd.gradcheck(fn, (g, l), fast_mode=True), name


def test_opcheck(device):
    g = torch.randn(2, 3, 16, dtype=torch.float32, device=device, requires_grad=True)
    l = torch.randn(2, 11, 16, dtype=torch.float32, device=device, requires_grad=True)
    ops = torch.ops.orca_kernels
    torch.library.opcheck(ops.ortho_diversity_loss.default, (g,))
    torch.library.opcheck(ops.ortho_cross_loss.default, (g, l, 5))
    torch.library.opcheck(ops.ortho_losses.default, (g, l, None))
    grad = torch.tensor(1.0, device=device)
    _, _, sim, norms = ops.ortho_losses.default(g.detach(), l.detach(), 5)
    torch.library.opcheck(ops.ortho_losses_backward.default, (g.detach(), l.detach(), sim, norms, grad, grad, 5))
    _, sim, norms = ops.ortho_diversity_loss.default(g.detach())
    torch.library.opcheck(ops.ortho_losses_backward.default, (g.detach(), None, sim, norms, grad, None, None))


def test_backward_op_checks_the_saved_tensors(device):
    """The backward op can be called directly: similarities and norms that no forward of these
    tokens wrote are refused before a kernel reads them."""
    g, l = _tokens((2, 3, 16), torch.float32, device), _tokens((2, 11, 16), torch.float32, device)
    grad = torch.tensor(1.0, device=device)
    ops = torch.ops.orca_kernels
    _, _, sim, norms = ops.ortho_losses.default(g, l, 5)  # sim [2, 3, 8], norms [2, 8]
    _, cross_sim, _ = ops.ortho_cross_loss.default(g, l, 5)  # [2, 3, 5]: no Gram columns
    backward = ops.ortho_losses_backward.default
    bad = [
        ((sim[:, :, :4], norms, grad), "similarities has shape (2, 3, 4) and dtype torch.float32; the forward"),
        ((sim.double(), norms, grad), "similarities has shape (2, 3, 8) and dtype torch.float64"),
        ((cross_sim, norms, grad), "writes (2, 3, 8) in torch.float32"),  # the diversity loss needs the Gram
        ((sim, norms[:, :5], grad), "norms has shape (2, 5)"),
        ((sim, norms[0], grad), "norms must have 2 dimensions"),
    ]
    for (similarities, saved_norms, grad_div), message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            backward(g, l, similarities, saved_norms, grad_div, grad, 5)
    backward(g, l, cross_sim, norms, None, grad, 5)  # the cross loss alone: its own columns


def test_torch_compile_fullgraph(device):
    g, l = _tokens((2, 4, 16), torch.float32, device), _tokens((2, 130, 16), torch.float32, device)

    def objective(g, l):
        div, cross = orca_kernels.ortho_losses(g, l, 100, backend="triton")
        return 0.3 * div + cross + orca_kernels.ortho_cross_loss(g, l, None) + orca_kernels.ortho_diversity_loss(g)

    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    loss = compiled(g, l)
    grads = torch.autograd.grad(loss, (g, l))
    loss_eager = objective(g, l)
    grads_eager = torch.autograd.grad(loss_eager, (g, l))
    torch.testing.assert_close(loss, loss_eager, rtol=0, atol=0)
    for actual, expected in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- errors and backends


@pytest.mark.parametrize(
    "make_args, error, match",
    [
        (lambda g, l: (g[0], l), ValueError, "global_tokens must have 3 dimensions"),
        (lambda g, l: (g, l[0]), ValueError, "local_tokens must have 3 dimensions"),
        (lambda g, l: (g.int(), l), ValueError, "global_tokens has dtype torch.int32"),
        (lambda g, l: (g, l.double()), ValueError, "local_tokens has dtype torch.float64"),
        (lambda g, l: (g, l[:1]), ValueError, "local_tokens has batch size 1"),
        (lambda g, l: (g, l[..., :8]), ValueError, "local_tokens has hidden size 8"),
        (lambda g, l: (g, l.to("meta")), ValueError, "local_tokens is on meta"),
        (lambda g, l: (g.numpy(), l), TypeError, "global_tokens must be a torch.Tensor"),
        (lambda g, l: (g, l, 0), ValueError, "max_local_samples must be >= 1"),
        (lambda g, l: (g, l, 2.5), TypeError, "max_local_samples must be an int"),
        (lambda g, l: (g, l, 2**64), ValueError, r"max_local_samples must be at most 2\*\*63 - 1"),
        (lambda g, l: (g, None), TypeError, "local_tokens must be a torch.Tensor, got NoneType"),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_bad_inputs_name_the_argument(make_args, error, match, backend):
    g, l = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    args = make_args(g, l)
    for fn in (orca_kernels.ortho_losses, orca_kernels.ortho_cross_loss):
        with pytest.raises(error, match=match):
            fn(*args, backend=backend)
    if len(args) == 2 and "global_tokens" in match:
        with pytest.raises(error, match=match):
            orca_kernels.ortho_diversity_loss(args[0], backend=backend)


def test_unknown_backend():
    g = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'triton', 'torch'"):
        orca_kernels.ortho_diversity_loss(g, backend="cuda")


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_utils, "KERNELS_INTERPRETED", False)
    g, l = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
        orca_kernels.ortho_losses(g, l, backend="triton")
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
        orca_kernels.ortho_diversity_loss(g, backend="triton")
    # auto without the interpreter: the reference, bit for bit
    div, cross = orca_kernels.ortho_losses(g, l, backend="auto")
    assert torch.equal(div, reference.ortho_diversity_loss(g))
    assert torch.equal(cross, reference.ortho_cross_loss(g, l))


def test_interpreter_set_after_import_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_utils, "KERNELS_INTERPRETED", False)
    with pytest.raises(RuntimeError, match="set it before the import"):
        orca_kernels.ortho_cross_loss(torch.randn(2, 3, 16), torch.randn(2, 5, 16))


def test_auto_uses_the_kernels_where_they_run(monkeypatch, device):

    def fail(*args, **kwargs):
        raise AssertionError("the reference ran instead of the Triton kernels")

    for name in ("ortho_diversity_loss", "ortho_cross_loss"):
        monkeypatch.setattr(reference, name, fail)
    g, l = torch.randn(2, 3, 16, device=device), torch.randn(2, 5, 16, device=device)
    orca_kernels.ortho_losses(g, l)
    orca_kernels.ortho_diversity_loss(g)
    orca_kernels.ortho_cross_loss(g, l)
    with pytest.raises(AssertionError, match="the reference ran"):
        orca_kernels.ortho_losses(g, l, backend="torch")


@pytest.mark.parametrize("local_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_follows_the_reference_dtypes(device, local_dtype):
    """Inside bf16 autocast the losses take what the model gives them: bf16 global tokens (a
    Linear) and local tokens from a LayerNorm, fp32 under CUDA autocast and bf16 under the CPU's
    (docs/reference-behaviour.md#autocast-dtypes-of-the-losses). Mixed dtypes are not refused
    there, the loss and gradient dtypes are the reference's under the same autocast, and the
    values are at most 2x the reference's error against fp64. (On the CPU the bf16 dot operands
    are upcast under the interpreter.)"""
    g, l = _tokens((2, 8, 32), torch.bfloat16, device), _tokens((2, 40, 32), local_dtype, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        div, cross = orca_kernels.ortho_losses(g, l, backend="triton")
        div_ref, cross_ref = orca_kernels.ortho_losses(g, l, backend="torch")
        singles = (
            orca_kernels.ortho_diversity_loss(g, backend="triton"),
            orca_kernels.ortho_cross_loss(g, l, backend="triton"),
        )
    assert (div.dtype, cross.dtype) == (div_ref.dtype, cross_ref.dtype) == (singles[0].dtype, singles[1].dtype)
    grads = torch.autograd.grad(div + cross, (g, l))
    grads_ref = torch.autograd.grad(div_ref + cross_ref, (g, l))
    assert [t.dtype for t in grads] == [t.dtype for t in grads_ref] == [torch.bfloat16, local_dtype]
    div_truth, cross_truth, grads_truth = _truth(g, l, 100, (1.0, 1.0))
    for actual, ref, truth, name in [
        (div, div_ref, div_truth, "diversity"),
        (cross, cross_ref, cross_truth, "cross"),
        (grads[0], grads_ref[0], grads_truth[0], "grad global_tokens"),
        (grads[1], grads_ref[1], grads_truth[1], "grad local_tokens"),
    ]:
        # bf16 computations whatever the result's dtype: the 2x rule, not the fp32 table.
        assert_matches_truth(actual, truth, same_dtype_reference=ref, name=name, tolerances={})


def test_hidden_splits_fill_the_gpu(monkeypatch):
    """At Llama-3.1-8B's shape (B = 12, Kg = 8, 100 sampled local rows: 24 tiles of 16 x 64 in
    bf16, H = 4096 in 32-wide chunks) a 132-SM card gets 11 splits of 12 chunks each: 264
    programs; a shape with enough tiles is not split, nor a short H loop."""
    from orca_kernels import ortho_loss

    monkeypatch.setattr(ortho_loss, "KERNELS_INTERPRETED", False)
    monkeypatch.setattr(ortho_loss._utils, "persistent_programs", lambda device: 4 * 132)
    cuda = torch.device("cuda")
    assert ortho_loss.hidden_splits(24, 4096, 32, cuda) == (11, 12 * 32)
    assert ortho_loss.hidden_splits(300, 4096, 32, cuda) == (1, 4096)
    assert ortho_loss.hidden_splits(24, 96, 32, cuda) == (1, 96)
