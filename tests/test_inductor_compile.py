"""torch.compile with the default inductor backend over every public op, forward and backward.

The other compile tests use backend="aot_eager", which traces the ops but runs the traced graph
eagerly. Inductor also lowers the graph: it has to treat every custom op as an extern kernel
(through its fake implementation, with the strides it chooses), compile the surrounding code
(C++ on the CPU, Triton on CUDA) and compile the AOT backward graph that calls the backward ops.
Each test compiles a small function with fullgraph=True, counts the frames compiled (one frame,
no graph break, no recompile), checks that the dynamo graph calls the orca_kernels op (not a
fallback), and compares output and gradients with the same function run eagerly.

Under TRITON_INTERPRET=1 (the CPU suite) the Triton kernels run through the interpreter and
inductor emits C++; on a GPU machine the same tests run on CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import orca_kernels
from orca_kernels import _extension
from orca_kernels.gated_residual import gated_residual
from tolerances import RELATIVE_TOLERANCE, relative_error

needs_extension = pytest.mark.skipif(not _extension.LOADED, reason="orca_kernels._C is not loaded")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test starts from an empty dynamo cache and zeroed counters, so that a frame count or
    a graph-break count belongs to that test alone (and no test reuses another's compiled code)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def compile_inductor(fn, **kwargs):
    """fn compiled with fullgraph=True by the default inductor backend, wrapped in a counter that
    records each frame dynamo hands to inductor (frame_count) and its FX graph (graphs)."""
    counter = CompileCounterWithBackend("inductor")
    return torch.compile(fn, backend=counter, fullgraph=True, **kwargs), counter


def op_names(counter) -> set[str]:
    """The orca_kernels ops the compiled graphs call, e.g. {"audio_rope"}."""
    names = set()
    for graph in counter.graphs:
        for node in graph.graph.nodes:
            target = str(node.target)
            if node.op == "call_function" and "orca_kernels" in target:
                names.add(target.split("orca_kernels.")[-1].split(".")[0])
    return names


def assert_one_graph(counter, *ops: str) -> None:
    """One frame compiled, no graph break recorded, and the graph calls each of `ops`."""
    assert counter.frame_count == 1, f"{counter.frame_count} frames compiled (a graph break or a recompile)"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert set(ops) <= op_names(counter), f"the graph calls {op_names(counter)}, expected {set(ops)}"


def outputs_and_grads(fn, inputs, grad_outputs, dynamic_dims=None):
    """fn's outputs (a tuple) and the gradients of every input that requires grad, for fixed
    upstream gradients (applied outside fn, so the backward graph gets them as inputs).
    dynamic_dims {input index: dim} are marked dynamic on the fresh leaves fn is called with."""
    leaves = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]
    for index, dim in (dynamic_dims or {}).items():
        torch._dynamo.mark_dynamic(leaves[index], dim)
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(outputs, wrt, grad_outputs)
    return [o.detach() for o in outputs], list(grads)


def assert_matches_eager(compiled, eager, names, exact: set[str] = frozenset()) -> None:
    """Compiled against eager: bit-identical for the `exact` names (results an orca_kernels op
    computes on its own, where inductor only calls the same kernel), else within the fp32
    tolerance of tests/tolerances.py (results inductor computes itself, e.g. a bias gradient's sum)."""
    assert len(compiled) == len(eager) == len(names)
    for name, actual, expected in zip(names, compiled, eager, strict=True):
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
        assert not torch.isnan(actual).any(), f"{name}: NaN (an unwritten output element?)"
        if name in exact:
            error = relative_error(actual, expected)
            assert torch.equal(actual, expected), f"{name}: not bit-identical to eager (relative error {error:.3e})"
        else:
            error = relative_error(actual, expected)
            assert error <= RELATIVE_TOLERANCE[torch.float32], f"{name}: relative error {error:.3e}"


def check_op(fn, inputs, grad_outputs, names, ops, exact, **compile_kwargs) -> None:
    """Compile fn with inductor, run it forward and backward, and compare it with eager."""
    compiled_fn, counter = compile_inductor(fn, **compile_kwargs)
    got = outputs_and_grads(compiled_fn, inputs, grad_outputs)
    assert_one_graph(counter, *ops)
    want = outputs_and_grads(fn, inputs, grad_outputs)
    assert_matches_eager(got[0] + got[1], want[0] + want[1], names, exact)


# ----------------------------------------------------------------------------- one op each


@needs_extension
def test_strided_conv1d(device):
    """The extension op and its two backward ops run as inductor extern kernels; only the bias
    gradient (grad_out.sum in the Python backward) is computed by inductor's own code."""
    x = torch.randn(2, 37, 6, device=device, requires_grad=True)
    weight = torch.randn(5, 6, 5, device=device, requires_grad=True)
    bias = torch.randn(5, device=device, requires_grad=True)
    fn = lambda x, w, b: orca_kernels.strided_conv1d(x, w, b, 4, 2, backend="extension")
    grad_out = torch.randn(2, 10, 5, device=device)
    check_op(
        fn,
        (x, weight, bias),
        (grad_out,),
        ["out", "grad_x", "grad_weight", "grad_bias"],
        ["strided_conv1d"],
        exact={"out", "grad_x", "grad_weight"},
    )


def test_ortho_losses(triton_device):
    """The three loss ops (combined with sub-sampling, cross without, diversity alone) in one
    graph; their backward op runs from inductor's backward graph."""
    g = torch.randn(2, 4, 16, device=triton_device, requires_grad=True)
    l = torch.randn(2, 130, 16, device=triton_device, requires_grad=True)

    def fn(g, l):
        div, cross = orca_kernels.ortho_losses(g, l, 100, backend="triton")
        all_rows = orca_kernels.ortho_cross_loss(g, l, None, backend="triton")
        return div, cross, all_rows, orca_kernels.ortho_diversity_loss(g, backend="triton")

    weights = tuple(torch.tensor(w, device=triton_device) for w in (0.3, 1.0, 0.7, 1.3))
    names = ["div", "cross", "cross_all_rows", "div_alone", "grad_global", "grad_local"]
    ops = ["ortho_losses", "ortho_cross_loss", "ortho_diversity_loss"]
    check_op(fn, (g, l), weights, names, ops, exact=set(names))


def test_audio_rope(triton_device):
    """The rotation op; its backward is the same op with the inverse flag."""
    audio = torch.randn(2, 7, 12, device=triton_device, requires_grad=True)
    fn = lambda a: orca_kernels.audio_rope(a, 2.5, 1e6, backend="triton")
    names = ["out", "grad_audio"]
    check_op(fn, (audio,), (torch.randn(2, 7, 12, device=triton_device),), names, ["audio_rope"], set(names))


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_padding_mask"])
def test_flash_cross_attention(triton_device, masked):
    """Attention over k, v that are column views of one packed K/V projection (the module's
    layout, so inductor must hand the op strided views), with and without a key padding mask
    (one batch element with its last keys masked)."""
    B, Tx, Ta, nh, hd = 2, 7, 13, 2, 8
    q = torch.randn(B, Tx, nh, hd, device=triton_device, requires_grad=True)
    kv = torch.randn(B, Ta, 2 * nh * hd, device=triton_device, requires_grad=True)
    mask = torch.zeros(B, Ta, dtype=torch.bool, device=triton_device)
    mask[0, 9:] = True

    def fn(q, kv, mask):
        k, v = kv[..., : nh * hd].unflatten(-1, (nh, hd)), kv[..., nh * hd :].unflatten(-1, (nh, hd))
        return orca_kernels.flash_cross_attention(q, k, v, mask if masked else None, backend="triton")

    names = ["out", "grad_q", "grad_kv"]
    grad_out = torch.randn(B, Tx, nh, hd, device=triton_device)
    check_op(fn, (q, kv, mask), (grad_out,), names, ["flash_cross_attention"], set(names))


def test_gated_residual(triton_device):
    """LayerNorm + gate + residual: one op forward, one backward op for all seven gradients."""
    H, G = 12, 3
    shapes = [(2, 3, H), (2, 3, H), (2, 3, G), (1, G), (1,), (H,), (H,)]
    inputs = [torch.randn(s, device=triton_device, requires_grad=True) for s in shapes]
    names = ["out", "grad_hidden", "grad_attended", "grad_gate_hidden", "grad_w2", "grad_b2", "grad_lnw", "grad_lnb"]
    grad_out = torch.randn(2, 3, H, device=triton_device)
    check_op(gated_residual, inputs, (grad_out,), names, ["gated_residual"], set(names))


def test_gated_cross_attention(triton_device):
    """The whole fused layer (RoPE, four GEMMs, attention, gated residual) with a key padding
    mask. Inductor lowers the GEMMs and their bias gradients itself, so results are compared
    within the fp32 tolerance rather than bit for bit."""
    H, nh, G = 16, 2, 4
    hidden = torch.randn(2, 3, H, device=triton_device, requires_grad=True)
    audio = torch.randn(2, 5, H, device=triton_device, requires_grad=True)
    shapes = [(3 * H, H), (3 * H,), (H, H), (H,), (G, H), (G,), (1, G), (1,), (H,), (H,)]
    params = [(0.3 * torch.randn(s, device=triton_device)).requires_grad_() for s in shapes]
    mask = torch.zeros(2, 5, dtype=torch.bool, device=triton_device)
    mask[1, 3:] = True

    def fn(hidden, audio, mask, *params):
        return orca_kernels.gated_cross_attention(
            hidden, audio, *params, nh, key_padding_mask=mask, rope_theta=1e6, backend="triton"
        )

    names = ["out", "grad_hidden", "grad_audio", *(f"grad_param{i}" for i in range(len(params)))]
    ops = ["audio_rope", "flash_cross_attention", "gated_residual"]
    grad_out = torch.randn(2, 3, H, device=triton_device)
    check_op(fn, (hidden, audio, mask, *params), (grad_out,), names, ops, exact=set())


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_gated_cross_attention_query_gate_projection(triton_device, grad):
    """The q/u projection in one graph: with autograd its autograd.Function (custom backward
    included), without it two plain GEMMs; the graph's GEMMs are four: K/V, q, u, out."""
    H, nh, G = 16, 2, 4
    hidden = torch.randn(2, 25, H, device=triton_device, requires_grad=grad)
    audio = torch.randn(2, 5, H, device=triton_device, requires_grad=grad)
    shapes = [(3 * H, H), (3 * H,), (H, H), (H,), (G, H), (G,), (1, G), (1,), (H,), (H,)]
    params = [(0.3 * torch.randn(s, device=triton_device)).requires_grad_(grad) for s in shapes]

    def fn(hidden, audio, *params):
        return orca_kernels.gated_cross_attention(hidden, audio, *params, nh, rope_theta=1e6, backend="triton")

    ops = ["audio_rope", "flash_cross_attention", "gated_residual"]
    if grad:
        names = ["out", "grad_hidden", "grad_audio", *(f"grad_param{i}" for i in range(len(params)))]
        check_op(fn, (hidden, audio, *params), (torch.randn(2, 25, H, device=triton_device),), names, ops, exact=set())
        return
    compiled_fn, counter = compile_inductor(fn)
    with torch.no_grad():
        got, want = compiled_fn(hidden, audio, *params), fn(hidden, audio, *params)
    assert_one_graph(counter, *ops)
    assert_matches_eager([got], [want], ["out"])
    linears = [
        n for g in counter.graphs for n in g.graph.nodes if n.op == "call_function" and "linear" in str(n.target)
    ]
    assert len(linears) == 4, [str(n.target) for n in linears]


# ----------------------------------------------------------------------------- dynamic shapes


def run_lengths(fn, make_inputs, lengths, dynamic_dims, grad: bool):
    """Compile fn once with inductor, call it for each length with `dynamic_dims` {input index:
    dim} marked dynamic (mark_dynamic raises if the compiled code specialises them), and compare
    with eager; returns the compile counter."""
    compiled_fn, counter = compile_inductor(fn)
    for length in lengths:
        inputs = make_inputs(length)
        if grad:
            with torch.no_grad():
                grad_out = torch.randn_like(fn(*inputs))
            got = outputs_and_grads(compiled_fn, inputs, (grad_out,), dynamic_dims)
            want = outputs_and_grads(fn, inputs, (grad_out,))
            got, want = got[0] + got[1], want[0] + want[1]
        else:
            for index, dim in dynamic_dims.items():
                torch._dynamo.mark_dynamic(inputs[index], dim)
            got, want = [compiled_fn(*inputs)], [fn(*inputs)]
        assert_matches_eager(got, want, [f"result{i} (length {length})" for i in range(len(got))])
    return counter


def _conv_inputs(device, grad):
    weight = torch.randn(5, 6, 5, device=device, requires_grad=grad)
    bias = torch.randn(5, device=device, requires_grad=grad)
    return lambda length: (torch.randn(2, length, 6, device=device, requires_grad=grad), weight, bias)


def _conv(x, weight, bias):
    return orca_kernels.strided_conv1d(x, weight, bias, 4, 2, backend="extension")


@needs_extension
def test_strided_conv1d_dynamic_length_inference(device):
    """Forward only (inference): one graph serves two input lengths with a symbolic T, so the
    fake implementation's output length (T + 2p - k) // s + 1 is traced symbolically."""
    counter = run_lengths(_conv, _conv_inputs(device, False), [37, 53], {0: 1}, grad=False)
    assert_one_graph(counter, "strided_conv1d")


@needs_extension
def test_strided_conv1d_dynamic_length_training(device):
    """Forward and backward: one graph serves two lengths. The backward ops take the input length
    and kernel size as SymInt: an `int` there forced a guard T == 37, which mark_dynamic turns into
    a ConstraintViolationError (with dynamic=True: a silent recompile per length, and eager after
    torch._dynamo.config.recompile_limit lengths)."""
    counter = run_lengths(_conv, _conv_inputs(device, True), [37, 53], {0: 1}, grad=True)
    assert_one_graph(counter, "strided_conv1d")


def test_flash_cross_attention_dynamic_lengths(triton_device):
    """Forward and backward over two (Tx, Ta) pairs, both lengths symbolic in q, k, v and the
    mask: one graph, no recompile, and the same numbers as eager."""
    B, nh, hd = 2, 2, 8

    def make_inputs(lengths):
        Tx, Ta = lengths
        q, k, v = (torch.randn(B, t, nh, hd, device=triton_device, requires_grad=True) for t in (Tx, Ta, Ta))
        mask = torch.zeros(B, Ta, dtype=torch.bool, device=triton_device)
        mask[0, Ta - 3 :] = True
        return q, k, v, mask

    fn = lambda q, k, v, mask: orca_kernels.flash_cross_attention(q, k, v, mask, backend="triton")
    counter = run_lengths(fn, make_inputs, [(7, 13), (5, 21)], {0: 1, 1: 1, 2: 1, 3: 1}, grad=True)
    assert_one_graph(counter, "flash_cross_attention")


# ----------------------------------------------------------------------------- a decoder layer


def test_decoder_layer_with_fused_injection(triton_device):
    """A tiny Qwen3 decoder layer with the fused gated cross-attention (use_fused=True) applied by
    orca_model's DeepInjection forward hook, as DeSTA25AudioModel runs it: the layer call compiled
    with fullgraph=True is one graph holding the layer, the hook and the fused ops (no graph
    break), forward and backward, within the fp32 tolerance of eager (benchmarks'
    "orca+compiled" provider of decoder_layer+injection)."""
    from benchmarks.bench_decoder_layer import InjectedDecoderLayer
    from tiny_models import llm_config

    B, Tx, Ta = 2, 5, 7
    module = InjectedDecoderLayer(llm_config("qwen3", num_layers=1), Tx, True, torch.float32, triton_device)
    with torch.no_grad():
        module.cross_attn.gate_proj[2].weight.normal_(std=0.3)  # a gate that depends on the token
    hidden = torch.randn(B, Tx, module.cross_attn.hidden_size, device=triton_device)
    audio = torch.randn(B, Ta, module.cross_attn.hidden_size, device=triton_device)
    grad_out = torch.randn_like(hidden)
    parameters = list(module.cross_attn.parameters())
    compiled_layer, counter = compile_inductor(module.decoder_layer)

    def outputs_and_grads(layer_call):
        leaves = [hidden.clone().requires_grad_(), audio.clone().requires_grad_()]
        with module.injection.context.active(leaves[1]):
            out = layer_call(leaves[0])
        grads = torch.autograd.grad(out, [*leaves, *parameters], grad_out)
        return [out.detach(), *grads]

    got = outputs_and_grads(compiled_layer)
    assert_one_graph(counter, "audio_rope", "flash_cross_attention", "gated_residual")
    want = outputs_and_grads(module.decoder_layer)
    names = ["out", "grad_hidden", "grad_audio", *(f"grad_{name}" for name, _ in module.cross_attn.named_parameters())]
    assert_matches_eager(got, want, names)
