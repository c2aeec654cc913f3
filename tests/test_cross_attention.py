"""The fused gated cross-attention (module and functional op) against the reference module."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import orca_kernels
from call_counts import count_calls
from orca_kernels import _utils, cross_attention, reference
from orca_model.cross_attention import AudioMemoryCache, OrcaGatedCrossAttention
from tolerances import MODULE_RELATIVE_TOLERANCE, assert_matches_truth, assert_no_worse_than_unfused


def make_pair(hidden_size, num_heads, dtype, triton_device):
    """A reference module and a fused one with the same (randomised) state dict."""
    reference_module = OrcaGatedCrossAttention(hidden_size, num_heads, rope_theta=1e6)
    # Nonzero gate weights and biases so that every parameter shapes the output.
    for parameter in (
        reference_module.gate_proj[2].weight,
        reference_module.cross_attn.in_proj_bias,
        reference_module.cross_attn.out_proj.bias,
        reference_module.ln.bias,
    ):
        torch.nn.init.normal_(parameter, std=0.5)
    fused_module = OrcaGatedCrossAttention(hidden_size, num_heads, rope_theta=1e6, use_fused=True)
    fused_module.load_state_dict(reference_module.state_dict())
    return reference_module.to(triton_device, dtype), fused_module.to(triton_device, dtype)


def run(module, hidden, audio, mask, spans, grad_out, cache=None):
    """Output, alignment loss and the gradients of (hidden, audio, every parameter)."""
    hidden, audio = hidden.detach().requires_grad_(), audio.detach().requires_grad_()
    out = module(hidden, audio, mask, spans, audio_cache=cache)
    loss = (out * grad_out).sum()
    if module.layer_align_loss is not None:
        loss = loss + module.layer_align_loss
    grads = torch.autograd.grad(loss, [hidden, audio, *module.parameters()])
    return out.detach(), module.layer_align_loss, grads


CASES = [  # (batch, T_x, T_a, hidden, heads, masked, spans, training)
    (1, 1, 1, 16, 2, False, None, True),  # head dim 8
    (2, 5, 13, 40, 4, True, [(0, 1, 4), (1, 0, 3)], True),  # head dim 10: not a power of two
    (2, 7, 65, 32, 2, False, [], True),  # head dim 16
    (3, 4, 13, 32, 4, True, None, False),
    (2, 3, 65, 40, 4, True, [(1, 2, 2)], True),  # no valid span: the loss is None
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("batch,t_x,t_a,size,heads,masked,spans,training", CASES)
def test_module_matches_reference(triton_device, dtype, batch, t_x, t_a, size, heads, masked, spans, training):
    reference_module, fused_module = make_pair(size, heads, dtype, triton_device)
    truth_module, _ = make_pair(size, heads, torch.float64, triton_device)
    truth_module.load_state_dict(reference_module.state_dict())
    for module in (reference_module, fused_module, truth_module):
        module.train(training)
    hidden = torch.randn(batch, t_x, size, device=triton_device, dtype=dtype)
    audio = torch.randn(batch, t_a, size, device=triton_device, dtype=dtype)
    mask = None
    if masked:  # True = keep (the module's convention); the last keys of row 0 are padding
        mask = torch.ones(batch, t_a, dtype=torch.bool, device=triton_device)
        mask[0, max(1, t_a // 2) :] = False
    grad_out = torch.randn(batch, t_x, size, device=triton_device, dtype=dtype)

    out, loss, grads = run(fused_module, hidden, audio, mask, spans, grad_out)
    truth_out, truth_loss, truth_grads = run(
        truth_module, hidden.double(), audio.double(), mask, spans, grad_out.double()
    )
    tol = MODULE_RELATIVE_TOLERANCE
    assert out.dtype == dtype
    assert_matches_truth(out, truth_out, name="output", tolerances=tol)
    if truth_loss is None:
        assert loss is None
    else:
        assert_matches_truth(loss.detach(), truth_loss.detach(), name="layer_align_loss", tolerances=tol)
    names = ["hidden", "audio"] + [name for name, _ in fused_module.named_parameters()]
    for name, got, want in zip(names, grads, truth_grads, strict=True):
        assert_matches_truth(got, want, name=f"grad {name}", tolerances=tol)


def test_fully_masked_row_matches_reference(triton_device):
    """A batch row whose keys are all padding attends to nothing, as in the reference."""
    reference_module, fused_module = make_pair(16, 2, torch.float64, triton_device)
    hidden = torch.randn(2, 3, 16, dtype=torch.float64, device=triton_device)
    audio = torch.randn(2, 5, 16, dtype=torch.float64, device=triton_device)
    mask = torch.ones(2, 5, dtype=torch.bool, device=triton_device)
    mask[1] = False
    grad_out = torch.randn(2, 3, 16, dtype=torch.float64, device=triton_device)
    got, want = (
        run(fused_module, hidden, audio, mask, None, grad_out),
        run(reference_module, hidden, audio, mask, None, grad_out),
    )
    assert torch.isfinite(want[0]).all()
    assert_matches_truth(got[0], want[0], tolerances=MODULE_RELATIVE_TOLERANCE)
    for a, b in zip(got[2], want[2], strict=True):
        assert_matches_truth(a, b, tolerances=MODULE_RELATIVE_TOLERANCE)


def run_layers(layers, hidden, audio, spans, grad_out, autocast):
    """Two injected layers in a row sharing one AudioMemoryCache, as in the model, optionally
    under bf16 autocast: (output, each layer's output dtype, alignment losses, gradients of
    hidden, audio and every parameter)."""
    hidden, audio = hidden.detach().requires_grad_(), audio.detach().requires_grad_()
    cache, dtypes, losses = AudioMemoryCache(), [], []
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = hidden
        for layer in layers:
            out = layer(out, audio, None, spans, audio_cache=cache)
            dtypes.append(out.dtype)
            losses.append(layer.layer_align_loss)
    objective = (out.double() * grad_out).sum() + sum(loss.double() for loss in losses)
    grads = torch.autograd.grad(objective, [hidden, audio, *(p for layer in layers for p in layer.parameters())])
    return out.detach(), dtypes, [loss.detach() for loss in losses], grads


@pytest.mark.parametrize(
    "hidden_dtype,dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
    ids=["fp32", "bf16", "fp32-stream-bf16-modules"],
)
def test_autocast_follows_the_reference_module(triton_device, hidden_dtype, dtype):
    """Under bf16 autocast (how users train), with the residual stream in `hidden_dtype`, the
    parameters in `dtype` (bf16: the reference's LLM and modules,
    docs/reference-behaviour.md#bf16-parameters-without-master-weights; an fp32 stream over bf16
    modules is what CUDA autocast makes of it after the first injected layer,
    docs/reference-behaviour.md#residual-stream-turns-fp32-under-autocast) and an fp32 audio
    memory: the fused layers give the reference layers'
    dtypes -- each layer's output (under CPU autocast a bf16 stream stays bf16; under CUDA
    autocast LayerNorm runs in fp32 and the stream turns fp32), the alignment losses and every
    gradient -- and are no further from an fp64 run than the reference is (the bf16 rule of
    tolerances.py)."""
    pairs = [make_pair(32, 4, dtype, triton_device) for _ in range(2)]
    reference_layers = [pair[0].train() for pair in pairs]
    fused_layers = [pair[1].train() for pair in pairs]
    truth_layers = [copy.deepcopy(layer).double() for layer in reference_layers]
    hidden = torch.randn(2, 5, 32, device=triton_device).to(hidden_dtype)
    audio = torch.randn(2, 13, 32, device=triton_device)
    grad_out = torch.randn(2, 5, 32, device=triton_device, dtype=torch.float64)
    spans = [(0, 1, 4), (1, 0, 3)]
    got = run_layers(fused_layers, hidden, audio, spans, grad_out, autocast=True)
    want = run_layers(reference_layers, hidden, audio, spans, grad_out, autocast=True)
    truth = run_layers(truth_layers, hidden.double(), audio.double(), spans, grad_out, autocast=False)
    assert got[1] == want[1], f"layer output dtypes {got[1]} != the reference's {want[1]}"
    assert [loss.dtype for loss in got[2]] == [loss.dtype for loss in want[2]]
    assert [g.dtype for g in got[3]] == [g.dtype for g in want[3]]
    assert_no_worse_than_unfused(got[0], want[0], truth[0], name="output")
    for i, (a, b, t) in enumerate(zip(got[2], want[2], truth[2], strict=True)):
        assert_no_worse_than_unfused(a, b, t, name=f"layer_align_loss {i}")
    for i, name in enumerate(["hidden", "audio"]):
        assert_no_worse_than_unfused(got[3][i], want[3][i], truth[3][i], name=f"grad {name}")
    # Parameter gradients per layer, as one vector: a single bias's gradient is a sum with
    # cancellation whose bf16 error is luck either way (see tolerances.BF16_RESOLUTION); the
    # fp32/fp64 tests above check every parameter on its own.
    count = len(list(fused_layers[0].parameters()))
    for i in range(2):
        layer = slice(2 + i * count, 2 + (i + 1) * count)
        a, b, t = (torch.cat([g.flatten().double() for g in grads[layer]]) for grads in (got[3], want[3], truth[3]))
        assert_no_worse_than_unfused(a, b, t, name=f"layer {i} parameter gradients")


def test_cached_decode_equals_uncached(triton_device):
    """Decode steps reuse one AudioMemoryCache: RoPE and the K/V GEMM run once per request."""
    _, fused_module = make_pair(32, 4, torch.float64, triton_device)
    fused_module.eval()
    audio = torch.randn(2, 13, 32, dtype=torch.float64, device=triton_device)
    cache = AudioMemoryCache()
    for _ in range(3):
        step = torch.randn(2, 1, 32, dtype=torch.float64, device=triton_device)
        cached = fused_module(step, audio, audio_cache=cache)
        assert torch.equal(cached, fused_module(step, audio))
    assert list(cache.kv) == [id(fused_module)] and list(cache.rotated) == [torch.float64]


def test_empty_audio_returns_input(triton_device):
    for module in make_pair(16, 2, torch.float32, triton_device):
        module.train()
        hidden = torch.randn(2, 3, 16, device=triton_device)
        assert module(hidden, None) is hidden and module.layer_align_loss is None
        assert module(hidden, torch.randn(2, 0, 16, device=triton_device)) is hidden


def test_state_dict_keys_are_the_reference_ones():
    reference_module, fused_module = make_pair(16, 2, torch.float32, "cpu")
    expected = {
        "cross_attn.in_proj_weight",
        "cross_attn.in_proj_bias",
        "cross_attn.out_proj.weight",
        "cross_attn.out_proj.bias",
        "gate_proj.0.weight",
        "gate_proj.0.bias",
        "gate_proj.2.weight",
        "gate_proj.2.bias",
        "ln.weight",
        "ln.bias",
    }
    assert set(reference_module.state_dict()) == set(fused_module.state_dict()) == expected


def test_functional_op_gradcheck_and_reference_backend(triton_device):
    _, module = make_pair(16, 2, torch.float64, triton_device)
    hidden = torch.randn(1, 2, 16, dtype=torch.float64, device=triton_device, requires_grad=True)
    audio = torch.randn(1, 3, 16, dtype=torch.float64, device=triton_device, requires_grad=True)
    params = module.parameters_in_order()

    def op(h, a):
        return orca_kernels.gated_cross_attention(
            h, a, *params, 2, position_scale=2.5, rope_theta=1e6, backend="triton"
        )

    assert torch.autograd.gradcheck(op, (hidden, audio), fast_mode=True)
    expected = orca_kernels.gated_cross_attention(hidden, audio, *params, 2, rope_theta=1e6, backend="torch")
    assert torch.equal(expected, reference.gated_cross_attention(hidden, audio, *params, 2, rope_theta=1e6))
    assert_matches_truth(op(hidden, audio).detach(), expected.detach(), tolerances=MODULE_RELATIVE_TOLERANCE)


def test_module_torch_compile_fullgraph(triton_device):
    reference_module, fused_module = make_pair(16, 2, torch.float32, triton_device)
    fused_module.train()
    hidden = torch.randn(2, 3, 16, device=triton_device, requires_grad=True)
    audio = torch.randn(2, 5, 16, device=triton_device)
    compiled = torch.compile(fused_module, backend="aot_eager", fullgraph=True)
    out = compiled(hidden, audio)
    assert_matches_truth(out.detach(), reference_module(hidden, audio).detach(), tolerances=MODULE_RELATIVE_TOLERANCE)
    out.sum().backward()
    assert hidden.grad is not None and all(p.grad is not None for p in fused_module.parameters())


def test_functional_op_bad_inputs():
    _, module = make_pair(16, 2, torch.float32, "cpu")
    params = module.parameters_in_order()
    hidden, audio = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    op = orca_kernels.gated_cross_attention
    with pytest.raises(ValueError, match="audio has shape"):
        op(hidden, torch.randn(3, 5, 16), *params, 2)
    with pytest.raises(ValueError, match="does not divide"):
        op(hidden, audio, *params, 3)
    with pytest.raises(ValueError, match="in_proj_weight has shape"):
        op(hidden, audio, params[0][:, :8], *params[1:], 2)
    with pytest.raises(ValueError, match="key_padding_mask must have dtype torch.bool"):
        op(hidden, audio, *params, 2, key_padding_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        op(hidden, audio, *params, 2, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend must be one of"):
        op(hidden, audio, *params, 2, backend="cuda")
    with pytest.raises(ValueError, match="hidden must have 3 dimensions"):
        op(hidden[0], audio, *params, 2)


def test_cached_kv_pair_is_gated_cross_attention_checked_once(triton_device, monkeypatch):
    """The public pair behind a K/V cache (project once, attend per step) gives exactly what
    `gated_cross_attention` gives, which validates once and calls their unchecked cores."""
    _, module = make_pair(16, 2, torch.float32, triton_device)
    params = module.parameters_in_order()
    hidden = torch.randn(2, 3, 16, device=triton_device)
    audio = torch.randn(2, 5, 16, device=triton_device)
    mask = torch.zeros(2, 5, dtype=torch.bool, device=triton_device)
    mask[0, 3:] = True
    rotated = orca_kernels.audio_rope(audio, 2.5, 1e6, backend="triton")
    kv = orca_kernels.project_audio_kv(rotated, params[0], params[1])
    assert kv.shape == (2, 5, 32)
    pair = orca_kernels.attend_audio_kv(hidden, kv, *params, 2, mask)

    checks = count_calls(cross_attention, ["check_parameters", "check_key_padding_mask"], monkeypatch.setattr)
    fused = orca_kernels.gated_cross_attention(
        hidden, audio, *params, 2, key_padding_mask=mask, rope_theta=1e6, backend="triton"
    )
    assert checks == {"check_parameters": 1, "check_key_padding_mask": 1}
    assert torch.equal(pair, fused)
    assert orca_kernels.attend_audio_kv(hidden, kv[:, :0], *params, 2) is hidden  # no memory, as gated_cross_attention


def test_cached_kv_pair_bad_inputs():
    """project_audio_kv and attend_audio_kv check their inputs as gated_cross_attention does, and
    each error names the op and the argument."""
    _, module = make_pair(16, 2, torch.float32, "cpu")
    params = module.parameters_in_order()
    hidden, rotated, kv = torch.randn(2, 3, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 32)
    project, attend = orca_kernels.project_audio_kv, orca_kernels.attend_audio_kv
    with pytest.raises(TypeError, match="project_audio_kv: rotated must be a torch.Tensor"):
        project(rotated.tolist(), *params[:2])
    with pytest.raises(ValueError, match="project_audio_kv: rotated must have 3 dimensions"):
        project(rotated[0], *params[:2])
    with pytest.raises(ValueError, match=r"project_audio_kv: in_proj_weight has shape \(48, 8\)"):
        project(rotated, params[0][:, :8], params[1])
    with pytest.raises(ValueError, match=r"project_audio_kv: in_proj_bias has shape \(47,\)"):
        project(rotated, params[0], params[1][:-1])
    with pytest.raises(ValueError, match="project_audio_kv: in_proj_weight is on cpu but expected meta"):
        project(rotated.to("meta"), *params[:2])

    with pytest.raises(ValueError, match="attend_audio_kv: hidden must have 3 dimensions"):
        attend(hidden[0], kv, *params, 2)
    with pytest.raises(ValueError, match="attend_audio_kv: audio_kv has dtype torch.int64"):
        attend(hidden, kv.long(), *params, 2)
    with pytest.raises(ValueError, match=r"attend_audio_kv: audio_kv has shape \(3, 5, 32\)"):
        attend(hidden, torch.randn(3, 5, 32), *params, 2)
    with pytest.raises(ValueError, match=r"audio_kv has shape \(2, 5, 16\).*expected \[2, T_a, 32\]"):
        attend(hidden, rotated, *params, 2)  # the memory itself instead of its projection
    with pytest.raises(ValueError, match="attend_audio_kv: audio_kv is on meta but hidden is on cpu"):
        attend(hidden, kv.to("meta"), *params, 2)
    with pytest.raises(TypeError, match="attend_audio_kv: num_heads must be an int"):
        attend(hidden, kv, *params, 2.0)
    with pytest.raises(ValueError, match="attend_audio_kv: num_heads=3 does not divide"):
        attend(hidden, kv, *params, 3)
    for index, name in enumerate(cross_attention.PARAMETER_NAMES):
        bad = list(params)
        bad[index] = bad[index][..., :-1]
        with pytest.raises(ValueError, match=f"attend_audio_kv: {name} has shape"):
            attend(hidden, kv, *bad, 2)
    with pytest.raises(ValueError, match="attend_audio_kv: key_padding_mask must have dtype torch.bool"):
        attend(hidden, kv, *params, 2, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"attend_audio_kv: key_padding_mask has shape \(2, 4\)"):
        attend(hidden, kv, *params, 2, torch.ones(2, 4, dtype=torch.bool))


def test_kernels_available(monkeypatch):
    """Where the fused kernels run: use_triton's "auto" policy, for a device. attend_audio_kv, which
    has no reference backend, refuses a device where they cannot run."""
    _, module = make_pair(16, 2, torch.float32, "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_utils, "KERNELS_INTERPRETED", False)
    assert orca_kernels.kernels_available("cpu") is False
    assert orca_kernels.kernels_available(torch.device("meta")) is False
    assert orca_kernels.kernels_available("cuda") is torch.cuda.is_available()
    with pytest.raises(RuntimeError, match="attend_audio_kv: the Triton kernels cannot run on cpu"):
        orca_kernels.attend_audio_kv(torch.randn(2, 3, 16), torch.randn(2, 5, 32), *module.parameters_in_order(), 2)
    monkeypatch.setattr(_utils, "KERNELS_INTERPRETED", True)
    assert orca_kernels.kernels_available("cpu") is True
    monkeypatch.setattr(_utils, "KERNELS_INTERPRETED", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set after the import: the kernels were compiled for the GPU
    with pytest.raises(RuntimeError, match="set it before the import"):
        orca_kernels.kernels_available("cpu")


BAD_ROPE_ARGUMENTS = [  # (keyword, value, error, message)
    *[
        ("position_scale", value, ValueError, "position_scale must be finite and > 0")
        for value in (0.0, -2.5, float("nan"), float("inf"))
    ],
    *[
        ("rope_theta", value, ValueError, "rope_theta must be finite and > 0")
        for value in (0.0, -1.0, float("nan"), float("inf"))
    ],
    ("position_scale", "2.5", TypeError, "position_scale must be a real number"),
    ("rope_theta", True, TypeError, "rope_theta must be a real number"),
]


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
@pytest.mark.parametrize("keyword, value, error, message", BAD_ROPE_ARGUMENTS)
@pytest.mark.parametrize("t_a", [5, 0])
def test_bad_rope_arguments_are_refused_by_every_backend(triton_device, backend, keyword, value, error, message, t_a):
    """A zero, negative or non-finite position_scale / rope_theta used to give NaN silently on
    the reference backend; every backend now refuses it, naming the argument (empty audio too)."""
    _, module = make_pair(16, 2, torch.float32, triton_device)
    params = module.parameters_in_order()
    hidden = torch.randn(2, 3, 16, device=triton_device)
    audio = torch.randn(2, t_a, 16, device=triton_device)
    with pytest.raises(error, match=f"^gated_cross_attention: {message}"):
        orca_kernels.gated_cross_attention(hidden, audio, *params, 2, backend=backend, **{keyword: value})
    with pytest.raises(error, match=f"^gated_cross_attention: {message}"):
        reference.gated_cross_attention(hidden, audio, *params, 2, **{keyword: value})
    if t_a:
        with pytest.raises(error, match=f"^audio_rope: {message}"):
            reference.audio_rope(audio, **{keyword: value})


def test_small_and_int_rope_arguments_are_accepted():
    _, module = make_pair(16, 2, torch.float32, "cpu")
    params = module.parameters_in_order()
    hidden, audio = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    out = orca_kernels.gated_cross_attention(
        hidden, audio, *params, 2, position_scale=1e-3, rope_theta=2, backend="torch"
    )
    assert out.isfinite().all()


def test_fused_module_refuses_head_dims_the_kernels_lack(triton_device):
    """A fused module whose head dim exceeds the kernels' 256 says how to run it (no backend= here)."""
    module = OrcaGatedCrossAttention(2 * 257, 2, use_fused=True).to(triton_device)
    hidden, audio = torch.zeros(1, 1, 2 * 257, device=triton_device), torch.zeros(1, 3, 2 * 257, device=triton_device)
    with pytest.raises(ValueError, match=r"head dim 257 \(hidden_size / num_heads\) > 256 .*\(use_fused=False"):
        module(hidden, audio)


# ----------------------------------------------------------------------------- q and u in one GEMM


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched inside the block, by name (`addmm`, `mm`, `cat`, ...),
    with the shapes of their first tensor argument."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        self.calls.append((func.overloadpacket.__name__, tuple(first.shape) if first is not None else ()))
        return func(*args, **(kwargs or {}))

    def count(self, *names: str) -> int:
        return sum(name in names for name, _ in self.calls)


GEMMS = ("mm", "addmm", "addmm_", "bmm")
SHAPE = (2, 25, 7, 16, 2)  # B, T_x, T_a, H, heads


def functional_inputs(shape, dtype, device):
    batch, t_x, t_a, size, heads = shape
    _, module = make_pair(size, heads, dtype, device)
    hidden = torch.randn(batch, t_x, size, device=device, dtype=dtype)
    audio = torch.randn(batch, t_a, size, device=device, dtype=dtype)
    mask = torch.zeros(batch, t_a, dtype=torch.bool, device=device)
    mask[0, t_a - 2 :] = True
    return module, hidden, audio, mask


def test_query_and_gate_gradients_match_the_reference(triton_device):
    """With autograd (fp64): the output and the gradients of hidden, the audio and all ten
    parameters (in_proj_weight's Q rows, in_proj_bias, gate_hidden_weight and gate_hidden_bias
    through the shared projection) match backend="torch". The backward writes ∂hidden once:
    ∂q·W_q, then ∂u·W₁ accumulated into it (addmm_), and autograd adds one gradient of hidden
    (the residual's) instead of two; ∂k and ∂v meet in one concatenation, not in two zero-filled
    buffers."""
    module, hidden, audio, mask = functional_inputs(SHAPE, torch.float64, triton_device)
    params = [p.detach().requires_grad_() for p in module.parameters_in_order()]
    hidden.requires_grad_()
    audio.requires_grad_()
    grad_out = torch.randn_like(hidden)

    def outputs_and_grads(backend):
        with OpCounter() as forward:
            out = orca_kernels.gated_cross_attention(
                hidden, audio, *params, 2, key_padding_mask=mask, rope_theta=1e6, backend=backend
            )
        with OpCounter() as backward:
            grads = torch.autograd.grad(out, [hidden, audio, *params], grad_out)
        return out, grads, forward, backward

    out, grads, forward, backward = outputs_and_grads("triton")
    assert forward.count(*GEMMS) == 4, forward.calls  # K/V, q, u, out
    assert backward.count("addmm_") == 1, backward.calls
    batch, t_x, t_a, size, _ = SHAPE
    kv_slices = [call for call in backward.calls if call == ("slice_backward", (batch, t_a, size))]
    assert not kv_slices and ("cat", ()) in backward.calls, backward.calls
    hidden_adds = [call for call in backward.calls if call == ("add", tuple(hidden.shape))]
    assert len(hidden_adds) == 1, backward.calls
    want_out, want_grads, _, _ = outputs_and_grads("torch")
    assert_matches_truth(out.detach(), want_out.detach(), name="output", tolerances=MODULE_RELATIVE_TOLERANCE)
    names = ["hidden", "audio", *cross_attention.PARAMETER_NAMES]
    for name, got, want in zip(names, grads, want_grads, strict=True):
        assert_matches_truth(got, want, name=f"grad {name}", tolerances=MODULE_RELATIVE_TOLERANCE)


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_query_and_gate_under_autocast(triton_device, grad):
    """CPU/CUDA autocast with fp32 parameters: the q/u projection and its own backward run in
    bf16 as F.linear would; the outputs' and gradients' dtypes are the reference's and their errors
    no worse than the reference's (the bf16 rule of tolerances.py)."""
    module, hidden, audio, _ = functional_inputs(SHAPE, torch.float32, triton_device)
    params = [p.detach().requires_grad_(grad) for p in module.parameters_in_order()]
    hidden.requires_grad_(grad)

    def run(backend, dtype, autocast):
        leaves = [p.detach().to(dtype).requires_grad_(grad) for p in params]
        h = hidden.detach().to(dtype).requires_grad_(grad)
        with torch.autocast(triton_device.type, dtype=torch.bfloat16, enabled=autocast):
            out = orca_kernels.gated_cross_attention(h, audio.to(dtype), *leaves, 2, rope_theta=1e6, backend=backend)
        grads = torch.autograd.grad(out.double().sum(), [h, *leaves]) if grad else []
        return out.detach(), grads

    got, want, truth = (
        run("triton", torch.float32, True),
        run("torch", torch.float32, True),
        run("torch", torch.float64, False),
    )
    assert got[0].dtype == want[0].dtype
    assert_no_worse_than_unfused(got[0], want[0], truth[0], name="output")
    for i, (a, b, t) in enumerate(zip(got[1], want[1], truth[1], strict=True)):
        assert a.dtype == b.dtype
        assert_no_worse_than_unfused(a, b, t, name=f"grad {i}")


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
@pytest.mark.parametrize(
    "index, dtype",
    [(None, torch.float64), (8, torch.float16), (3, torch.bfloat16)],
    ids=["fp64-parameters", "fp16-ln_weight", "bf16-out_proj_bias"],
)
def test_parameters_of_another_dtype_are_refused_outside_autocast(triton_device, backend, index, dtype):
    """fp64 parameters with fp32 activations, or one fp16 LayerNorm weight among fp32 ones: one
    error naming the first parameter that differs, on every backend, for the op and its cached
    pair (the reference failed deep inside with torch's own message, the Triton path computed in
    a dtype nobody asked for)."""
    _, module = make_pair(16, 2, torch.float32, triton_device)
    params = list(module.parameters_in_order())
    if index is None:
        params = [p.to(dtype) for p in params]
    else:
        params[index] = params[index].to(dtype)
    name = cross_attention.PARAMETER_NAMES[0 if index is None else index]
    hidden = torch.randn(2, 3, 16, device=triton_device)
    audio = torch.randn(2, 5, 16, device=triton_device)
    message = (
        f"^gated_cross_attention: {name} is {dtype} but hidden is torch.float32; outside torch.autocast every "
        "parameter must have hidden's dtype"
    )
    with pytest.raises(ValueError, match=message):
        orca_kernels.gated_cross_attention(hidden, audio, *params, 2, backend=backend)
    if backend == "triton":
        kv = torch.randn(2, 5, 32, device=triton_device)
        with pytest.raises(ValueError, match=message.replace("gated_cross_attention", "attend_audio_kv")):
            orca_kernels.attend_audio_kv(hidden, kv, *params, 2)
        if index in (None, 0, 1):
            with pytest.raises(ValueError, match=f"^project_audio_kv: {name} is {dtype} but rotated is"):
                orca_kernels.project_audio_kv(audio, *params[:2])


@contextlib.contextmanager
def cuda_autocast_without_a_gpu(dtype: torch.dtype):
    """CUDA's autocast rules for fake CUDA tensors on a machine without a GPU, where
    `torch.autocast("cuda")` disables itself: the same state set directly."""
    previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", previous[0])
        torch.set_autocast_dtype("cuda", previous[1])


def test_mixed_dtypes_follow_cuda_autocast_on_fake_tensors():
    """Under CUDA autocast the model feeds fp32 hidden states to bf16 modules (the residual stream
    turns fp32 after the first injected layer): accepted, with the reference's output dtype. Run on
    fake CUDA tensors (no GPU needed), where the op takes the reference backend; the same call
    outside autocast is refused."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, module = make_pair(16, 2, torch.bfloat16, "cpu")
    real = [p.detach() for p in module.parameters_in_order()]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        params = [mode.from_tensor(p).to("cuda") for p in real]
        hidden = torch.empty(2, 3, 16, device="cuda")
        audio = torch.empty(2, 5, 16, device="cuda", dtype=torch.bfloat16)
        with cuda_autocast_without_a_gpu(torch.bfloat16):
            out = orca_kernels.gated_cross_attention(hidden, audio, *params, 2, backend="torch")
        assert out.dtype == torch.float32 and out.device.type == "cuda"
        with pytest.raises(ValueError, match="in_proj_weight is torch.bfloat16 but hidden is torch.float32"):
            orca_kernels.gated_cross_attention(hidden, audio, *params, 2, backend="torch")


def test_layers_share_one_cast_of_the_rotated_memory_under_autocast(triton_device):
    """Under autocast with an fp32 residual stream (CUDA's, after the first injected layer), every
    fused layer's K/V GEMM reads the rotated memory cast once to the autocast dtype, and autograd
    keeps that one copy for all layers (each GEMM used to cast and keep its own)."""
    layers = [make_pair(16, 2, torch.float32, triton_device)[1].train() for _ in range(3)]
    hidden = torch.randn(2, 3, 16, device=triton_device, requires_grad=True)
    audio = torch.randn(2, 5, 16, device=triton_device)
    cache = AudioMemoryCache()
    saved = []

    def keep(tensor):
        saved.append(tensor)
        return tensor

    with (
        torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t),
        torch.autocast(triton_device.type, dtype=torch.bfloat16),
    ):
        out = hidden
        for layer in layers:
            out = layer(out, audio, audio_cache=cache)
    (gemm_input,) = cache.kv_input.values()
    assert gemm_input.dtype == torch.bfloat16 and torch.equal(gemm_input, cache.rotated[torch.float32].bfloat16())
    # Every bf16 buffer of the memory's size that autograd keeps (the GEMMs view it as [B·T_a, H]).
    memory_copies = {
        t.untyped_storage().data_ptr()
        for t in saved
        if t.dtype == torch.bfloat16 and t.untyped_storage().nbytes() == 2 * 5 * 16 * 2
    }
    assert memory_copies == {gemm_input.untyped_storage().data_ptr()}
    out.sum().backward()
    assert all(p.grad is not None for layer in layers for p in layer.cross_attn.parameters())
