"""orca_kernels.local_branch: the Linear folded into the strided Conv1d (docs/ops.md#local-branch-fold).

The folded branch must give the unfolded one's numbers at every geometry, the padded edges
above all (the Conv1d zero-pads the Linear's output, not its bias), and the gradients of every
parameter through the composed weight; the inference cache must never hand out a stale weight.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import orca_kernels
from orca_kernels import local_fold, reference
from orca_kernels.local_fold import FoldedWeightCache, fold_pays, fold_projection, folded_channels
from tolerances import assert_matches_truth

NUM_LAYERS = 3
BACKENDS = ["torch", "extension"]


def make_branch(batch, frames, width, hidden, kernel_size, dtype=torch.float64, out_channels=None, seed=0):
    """(states, parameters) of one branch: L states [B, T, D]; layer weights, Linear, Conv1d, LayerNorm."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    out_channels = hidden if out_channels is None else out_channels
    states = [rand(batch, frames, width) for _ in range(NUM_LAYERS)]
    parameters = [
        rand(NUM_LAYERS),
        rand(hidden, width) / width**0.5,
        rand(hidden),
        rand(out_channels, hidden, kernel_size) / (hidden * kernel_size) ** 0.5,
        rand(out_channels),
        1 + rand(out_channels) / 4,
        rand(out_channels) / 4,
    ]
    return states, [p.requires_grad_() for p in parameters]


def unfolded_truth(states, parameters, stride, padding):
    """The reference branch in fp64 (its conv with an explicit padding)."""

    def conv(x, weight, bias, stride_, _):
        return reference.strided_conv1d(x, weight, bias, stride_, padding)

    return reference.local_branch([s.double() for s in states], *parameters, stride=stride, conv=conv)


# (B, T, D, H, k, stride, padding): lengths not divisible by the stride, windows that reach past
# both ends, padding beyond k//2 (whole windows in the padding), one frame, one output row.
GEOMETRIES = [
    (2, 37, 6, 9, 5, 4, 2),
    (1, 38, 5, 7, 5, 4, 2),
    (3, 39, 8, 4, 5, 4, 2),
    (2, 40, 7, 11, 5, 4, 2),
    (2, 16, 7, 11, 3, 2, 0),
    (2, 9, 3, 5, 5, 4, 4),
    (1, 3, 5, 4, 5, 4, 2),
    (1, 1, 4, 3, 1, 1, 0),
    (2, 13, 16, 8, 4, 3, 1),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "B{}-T{}-D{}-H{}-k{}-s{}-p{}".format(*g))
def test_fold_is_exact_in_fp64(geometry, backend):
    """Forward and every parameter's gradient of the folded branch equal the unfolded fp64 branch."""
    batch, frames, width, hidden, kernel_size, stride, padding = geometry
    states, parameters = make_branch(batch, frames, width, hidden, kernel_size)
    truth = unfolded_truth(states, parameters, stride, padding)
    probe = torch.randn(truth.shape, dtype=torch.float64)
    truth_grads = torch.autograd.grad((truth * probe).sum(), parameters)
    folded = orca_kernels.local_branch(
        states, *parameters, stride=stride, padding=padding, fold="always", backend=backend
    )
    grads = torch.autograd.grad((folded * probe).sum(), parameters)
    torch.testing.assert_close(folded, truth, rtol=0, atol=1e-12)
    for name, grad, truth_grad in zip(
        ("layer_weights", "proj_weight", "proj_bias", "conv_weight", "conv_bias", "ln_weight", "ln_bias"),
        grads,
        truth_grads,
        strict=True,
    ):
        torch.testing.assert_close(grad, truth_grad, rtol=0, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("geometry", GEOMETRIES[:4], ids=lambda g: "B{}-T{}-D{}-H{}".format(*g))
def test_unfolded_path_is_the_reference(geometry):
    batch, frames, width, hidden, kernel_size, stride, padding = geometry
    states, parameters = make_branch(batch, frames, width, hidden, kernel_size)
    unfolded = orca_kernels.local_branch(states, *parameters, stride=stride, padding=padding, fold="never")
    torch.testing.assert_close(unfolded, unfolded_truth(states, parameters, stride, padding), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fold_in_every_dtype(dtype, backend):
    """Folded output and gradients against the fp64 truth, held to the suite's bar: fp32 by
    relative tolerance, fp16/bf16 at most twice the unfolded same-dtype branch's error."""
    states, parameters = make_branch(2, 41, 12, 16, 5, dtype=dtype, seed=1)
    states64, parameters64 = make_branch(2, 41, 12, 16, 5, dtype=dtype, seed=1)
    states64 = [s.double() for s in states64]
    parameters64 = [p.detach().double().requires_grad_() for p in parameters64]
    truth = unfolded_truth(states64, parameters64, 4, 2)
    probe = torch.randn(truth.shape, dtype=torch.float64)
    truth_grads = torch.autograd.grad((truth * probe).sum(), parameters64)
    results = {}
    for fold in ("always", "never"):
        out = orca_kernels.local_branch(states, *parameters, stride=4, padding=2, fold=fold, backend=backend)
        grads = torch.autograd.grad((out.double() * probe).sum(), parameters)
        results[fold] = (out, grads)
    folded, folded_grads = results["always"]
    unfolded, unfolded_grads = results["never"]
    assert folded.dtype == dtype
    assert_matches_truth(folded, truth, same_dtype_reference=unfolded, name="local tokens")
    for index in (1, 2, 3):  # the Linear's weight and bias and the conv weight: through the composition
        assert_matches_truth(
            folded_grads[index], truth_grads[index], same_dtype_reference=unfolded_grads[index], name=f"grad {index}"
        )


def test_non_contiguous_states_and_weights():
    states, parameters = make_branch(2, 33, 6, 10, 5)
    truth = unfolded_truth(states, parameters, 4, 2)
    strided_states = [s.transpose(0, 1).contiguous().transpose(0, 1) for s in states]
    assert not strided_states[0].is_contiguous()
    proj_weight_t = parameters[1].detach().t().contiguous().t()
    assert not proj_weight_t.is_contiguous()
    args = [parameters[0], proj_weight_t, *parameters[2:]]
    out = orca_kernels.local_branch(strided_states, *args, stride=4, padding=2, fold="always")
    torch.testing.assert_close(out, truth, rtol=0, atol=1e-12)


def test_composed_weight_layout():
    """Channels [0, D) hold W_conv·W_lin, channel D W_conv·b_lin, the rest zero; C aligned to 8."""
    proj_weight, proj_bias = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    conv_weight = torch.randn(4, 6, 3, dtype=torch.float64)
    folded = fold_projection(proj_weight, proj_bias, conv_weight)
    assert folded.shape == (4, folded_channels(5), 3) == (4, 8, 3)
    expected = torch.einsum("ohj,hc->ocj", conv_weight, proj_weight)
    torch.testing.assert_close(folded[:, :5], expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(folded[:, 5], torch.einsum("ohj,h->oj", conv_weight, proj_bias), rtol=0, atol=1e-13)
    assert (folded[:, 6:] == 0).all()
    assert folded_channels(7) == 8 and folded_channels(8) == 16 and folded_channels(1280) == 1288
    no_bias = fold_projection(proj_weight, None, conv_weight)
    assert (no_bias[:, 5] == 0).all()


def test_fold_rule_counts_flops():
    """Llama-3.1-8B's branch (B=12, T=1500, D=1280 -> H=4096) folds in training and inference; a
    single clip in training does not (composing costs more than it saves); inference always."""
    llama = dict(frames=1500, encoder_width=1280, hidden=4096, out_channels=4096, kernel_size=5, stride=4, padding=2)
    assert fold_pays(12, training=True, **llama)
    assert not fold_pays(1, training=True, **llama)
    assert fold_pays(1, training=False, **llama)
    # The counts themselves: B=1, T=8, D=2, H=3, k=1, s=1, p=0 gives 8 output rows; unfolded
    # 8·2·3 + 8·1·3·3 = 120 MACs, folded 8·1·8·3 = 192 (C = 8): no fold, in either mode.
    tiny = dict(frames=8, encoder_width=2, hidden=3, out_channels=3, kernel_size=1, stride=1, padding=0)
    assert not fold_pays(1, training=False, **tiny)
    # H=40 instead: unfolded 8·2·40 + 8·40·40 = 13440, folded 8·8·40 = 2560 (+ composing 1·40·8·40
    # = 12800 in training: 15360 > 13440).
    wide = dict(tiny, hidden=40, out_channels=40)
    assert fold_pays(1, training=False, **wide)
    assert not fold_pays(1, training=True, **wide)


def test_auto_follows_the_rule(monkeypatch):
    calls = []
    real = local_fold.fold_projection
    monkeypatch.setattr(local_fold, "fold_projection", lambda *a: calls.append(1) or real(*a))
    states, parameters = make_branch(1, 8, 2, 40, 1)  # the rule test's `wide` geometry
    with torch.no_grad():
        orca_kernels.local_branch(states, *parameters, stride=1, padding=0)
    assert calls == [1]  # inference folds
    orca_kernels.local_branch(states, *parameters, stride=1, padding=0)
    assert calls == [1]  # training does not: composing would cost more than it saves


def test_cache_composes_once_per_weight_version(monkeypatch):
    calls = []
    real = local_fold.fold_projection
    monkeypatch.setattr(local_fold, "fold_projection", lambda *a: calls.append(1) or real(*a))
    states, parameters = make_branch(2, 21, 6, 10, 5)
    parameters = [p.detach() for p in parameters]
    cache = FoldedWeightCache()

    def run():
        return orca_kernels.local_branch(states, *parameters, stride=4, padding=2, fold="always", cache=cache)

    first = run()
    torch.testing.assert_close(run(), first, rtol=0, atol=0)
    assert len(calls) == 1
    parameters[3].mul_(2)  # an in-place update (an optimizer step): a new version
    second = run()
    assert len(calls) == 2 and not torch.equal(second, first)
    torch.testing.assert_close(second, unfolded_truth(states, parameters, 4, 2), rtol=0, atol=1e-12)
    parameters[1] = parameters[1].clone()  # a replaced tensor (same values): must not be trusted by address
    run()
    assert len(calls) == 3
    with torch.enable_grad():  # a weight that needs grad is composed in the graph, never cached
        parameters[2].requires_grad_()
        run().sum().backward()
        assert parameters[2].grad is not None
    assert len(calls) == 4
    copied = copy.deepcopy(cache)  # a deep-copied model gets an empty cache of its own
    assert copied._folded is None


def test_cached_weight_serves_calls_in_and_out_of_autocast():
    """The cache composes in the parameters' dtype even when its first call runs under autocast,
    so a later call without autocast still gets a weight of its own dtype."""
    states, parameters = make_branch(2, 21, 6, 10, 5, dtype=torch.float32)
    parameters = [p.detach() for p in parameters]
    cache = FoldedWeightCache()

    def run():
        return orca_kernels.local_branch(states, *parameters, stride=4, padding=2, fold="always", cache=cache)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        run()
    assert cache._folded.dtype == torch.float32
    torch.testing.assert_close(run(), unfolded_truth(states, parameters, 4, 2).float(), rtol=1e-5, atol=1e-5)


def test_cache_under_concurrent_requests(monkeypatch):
    """Eight threads, two weight sets alternating in place: every result is that of the weights
    it ran with, and each version is composed once at most per switch."""
    states, parameters = make_branch(2, 25, 6, 10, 5)
    parameters = [p.detach() for p in parameters]
    expected = unfolded_truth(states, parameters, 4, 2)
    cache = FoldedWeightCache()
    errors = []

    def worker():
        try:
            for _ in range(20):
                out = orca_kernels.local_branch(states, *parameters, stride=4, padding=2, fold="always", cache=cache)
                torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        except Exception as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert errors == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(fold="sometimes"), r"local_branch: fold must be one of \('auto', 'always', 'never'\), got 'sometimes'"),
        (dict(backend="cudnn"), r"local_branch: backend must be one of"),
        (dict(layer_weights=torch.zeros(2, dtype=torch.float64)), r"layer_weights has 2 entries for 3 target layers"),
        (dict(states=[]), r"target_layer_states must be a non-empty sequence"),
        (dict(width=7), r"target_layer_states\[0\] has shape \(2, 21, 7\); every state must be \[B, T, 6\]"),
        (
            dict(conv_weight=torch.zeros(10, 9, 5, dtype=torch.float64)),
            r"conv_weight has 9 input channels but the Linear gives 10",
        ),
        (dict(stride=0), r"local_branch: stride must be"),
        (
            dict(proj_bias=torch.zeros(9, dtype=torch.float64)),
            r"local_branch: proj_bias has 9 elements but proj_weight has 10 rows",
        ),
        (dict(padding=-1), r"local_branch: padding must be"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    states, parameters = make_branch(2, 21, 6, 10, 5)
    if "width" in change:
        states, _ = make_branch(2, 21, change["width"], 10, 5)
    layer_weights, proj_weight, proj_bias, conv_weight, conv_bias, ln_weight, ln_bias = parameters
    layer_weights = change.get("layer_weights", layer_weights)
    conv_weight = change.get("conv_weight", conv_weight)
    proj_bias = change.get("proj_bias", proj_bias)
    states = change.get("states", states)
    options = {key: change[key] for key in ("fold", "backend", "stride", "padding") if key in change}
    with pytest.raises((ValueError, TypeError), match=message):
        orca_kernels.local_branch(
            states, layer_weights, proj_weight, proj_bias, conv_weight, conv_bias, ln_weight, ln_bias, **options
        )


def test_fold_pays_bad_input():
    geometry = dict(frames=8, encoder_width=2, hidden=3, out_channels=3, kernel_size=1, stride=1, padding=0)
    with pytest.raises(ValueError, match="fold_pays: stride must be >= 1, got 0"):
        fold_pays(1, training=True, **(geometry | {"stride": 0}))
    with pytest.raises(TypeError, match="fold_pays: training must be a bool, got int"):
        fold_pays(1, training=1, **geometry)


def test_fold_projection_bad_input():
    with pytest.raises(ValueError, match="conv_weight has 5 input channels but proj_weight has 6 output features"):
        fold_projection(torch.zeros(6, 4), None, torch.zeros(3, 5, 2))
    with pytest.raises(ValueError, match="proj_bias has 5 elements but proj_weight has 6 rows"):
        fold_projection(torch.zeros(6, 4), torch.zeros(5), torch.zeros(3, 6, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_and_double_backward(backend):
    """fp64 gradcheck and gradgradcheck of the folded branch in every input it differentiates."""
    states, parameters = make_branch(1, 11, 3, 4, 3, seed=2)
    states = [s.requires_grad_() for s in states]

    def branch(*inputs):
        return orca_kernels.local_branch(
            list(inputs[:NUM_LAYERS]), *inputs[NUM_LAYERS:], stride=2, padding=1, fold="always", backend=backend
        )

    inputs = (*states, *parameters)
    assert torch.autograd.gradcheck(branch, inputs)
    assert torch.autograd.gradgradcheck(branch, inputs)
