"""The global branch's Q-Former under `use_fused_orca` (orca_model/qformer.py): BERT's modules
and parameters with non-causal F.scaled_dot_product_attention in place of BERT's eager
attention, and the encoder states made contiguous once per target layer.

- parity with the eager Q-Former (outputs and every gradient, fp32 and fp64, dropout off);
- the attention dropout: the same distribution as the eager one (exact zeros at rate p, the kept
  probabilities scaled by 1/(1 − p)), off in eval;
- the self-attention over the queries is bidirectional (and the probe would see a causal mask);
- one module, one state dict: the config switch flips the path, checkpoints move both ways;
- what autograd keeps: fewer bytes than eager, no [B, heads, Q, S] probability tensor;
- one copy of each target layer's states (Whisper's are stored [B, D, T]), under autocast too.

Tiny configs (tests/tiny_models.py): D = 32, 2 heads of 16. No kernel of orca_kernels runs here
(the connector's local branch is off), so the file runs without the C extension and without
TRITON_INTERPRET.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.bert.modeling_bert import BertEncoder

from orca_model import DeSTA25Config, ORCAHybridConnector
from orca_model.connector import qformer_config
from tiny_models import llm_config, whisper_config
from tolerances import MODULE_RELATIVE_TOLERANCE, assert_matches_truth, assert_no_worse_than_unfused

D, HEADS, HEAD_DIM = 32, 2, 16  # the tiny Whisper's width and heads: the Q-Former's
K, T, B = 3, 23, 2  # global tokens, encoder frames, batch: K, T and HEAD_DIM all differ
TARGETS = 4  # the tiny Whisper's 4 layers, all targets
QFORMER_LAYERS = 2
ATTENTION_DROPOUT = 0.1  # BertConfig's attention_probs_dropout_prob, the reference's


@pytest.fixture(autouse=True)
def _fp32_without_tf32():
    """fp32 parity on a GPU needs IEEE fp32 GEMMs (TF32 would give errors of ~1e-3)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def make_connector(fused: bool, layers: int = QFORMER_LAYERS, tokens: int = K, **fields) -> ORCAHybridConnector:
    """The connector's global branch alone (the local branch off: it runs orca_kernels ops)."""
    config = DeSTA25Config(
        connector_mode="orca_hybrid",
        orca_global_num_tokens=tokens,
        qformer_num_hidden_layers=layers,
        llm_config=llm_config("qwen3"),
        encoder_config=whisper_config(),
        orca_local_enabled=False,
        use_fused_orca=fused,
        **fields,
    )
    return ORCAHybridConnector(config)


def whisper_states(
    batch: int = B, frames: int = T, dtype: torch.dtype = torch.float32, device="cpu"
) -> list[torch.Tensor]:
    """Encoder states [B, T, D] stored as Whisper's are, [B, D, T] (its stem's permute)."""
    return [torch.randn(batch, D, frames, dtype=dtype, device=device).transpose(1, 2) for _ in range(TARGETS)]


def set_dropout(connector: ORCAHybridConnector, attention: float = 0.0, hidden: float = 0.0) -> None:
    """The Q-Former's dropout probabilities: BERT's attention modules (`.self.dropout`, the p that
    BERT passes to the attention function in training) and the hidden-state dropouts."""
    for name, module in connector.global_qformer.named_modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = attention if name.endswith("self.dropout") else hidden


def run_with_grads(connector, states, probe):
    """Global tokens and the gradients of <tokens, probe> (a random projection: its gradient has
    no cancellation) for every parameter and every state."""
    states = [s.detach().requires_grad_() for s in states]
    connector.zero_grad()
    tokens, _ = connector(states)
    (tokens * probe.to(tokens.dtype)).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in connector.named_parameters()}
    grads.update({f"states[{i}]": s.grad.detach().clone() for i, s in enumerate(states)})
    return tokens.detach(), grads


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fused_qformer_matches_eager(dtype, mode, device):
    """Fused against an fp64 eager run of the same weights (the truth): the global tokens and
    the gradient of every parameter and encoder state within the suite's module tolerance;
    "train" is training mode with the dropout probabilities at 0 (the fused path's training
    branch, deterministic). The eager path in the same dtype meets the same bound.

    The key biases are checked apart: softmax is invariant to them (q·b_k is constant over a
    row), so their gradient is 0 up to rounding and has no relative error to speak of."""
    eager = make_connector(False).to(device=device, dtype=dtype)
    fused = make_connector(True).to(device=device, dtype=dtype)
    fused.load_state_dict(eager.state_dict())
    truth_model = make_connector(False).to(device=device, dtype=torch.float64)
    truth_model.load_state_dict(eager.state_dict())
    for connector in (eager, fused, truth_model):
        connector.train(mode == "train")
        set_dropout(connector)
    states = whisper_states(dtype=torch.float64, device=device)
    probe = torch.randn(B, K, llm_config("qwen3").hidden_size, dtype=torch.float64, device=device)
    truth_tokens, truth_grads = run_with_grads(truth_model, states, probe)
    for connector in (fused, eager):
        tokens, grads = run_with_grads(connector, [s.to(dtype) for s in states], probe)
        path = "fused" if connector is fused else "eager"
        assert_matches_truth(tokens, truth_tokens, name=f"{path} global tokens", tolerances=MODULE_RELATIVE_TOLERANCE)
        assert grads.keys() == truth_grads.keys()
        scale = max(g.abs().max().item() for g in truth_grads.values())
        for name, grad in grads.items():
            if name.endswith("key.bias"):
                bound = 10 * torch.finfo(dtype).eps * scale
                assert grad.abs().max().item() <= bound, f"{path} {name}: {grad.abs().max().item():.3e}"
                continue
            assert_matches_truth(
                grad, truth_grads[name], name=f"{path} {name} gradient", tolerances=MODULE_RELATIVE_TOLERANCE
            )


def test_bf16_autocast_agrees_with_eager():
    """How the reference trains (autocast, here the CPU's bf16): the fused global tokens and the
    global branch's gradients are no further from an fp32 run than the eager ones are (the
    suite's low-precision rule, tests/tolerances.py)."""
    eager = make_connector(False)
    fused = make_connector(True)
    fused.load_state_dict(eager.state_dict())
    for connector in (eager, fused):
        set_dropout(connector)
    states = whisper_states()
    probe = torch.randn(B, K, llm_config("qwen3").hidden_size)
    truth_tokens, truth_grads = run_with_grads(eager, states, probe)
    results = []
    for connector in (eager, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(run_with_grads(connector, states, probe))
    (eager_tokens, eager_grads), (fused_tokens, fused_grads) = results
    assert fused_tokens.dtype == eager_tokens.dtype == torch.bfloat16
    assert_no_worse_than_unfused(fused_tokens, eager_tokens, truth_tokens, name="global tokens")

    def flat(grads):
        return torch.cat([g.flatten().double() for name, g in sorted(grads.items()) if "qformer" in name])

    assert_no_worse_than_unfused(flat(fused_grads), flat(eager_grads), flat(truth_grads), name="Q-Former gradients")


# ----------------------------------------------------------------------------- dropout


def capture_attention(connector, block: str) -> list[torch.Tensor]:
    """The context that `block` ("attention" or "crossattention") of Q-Former layer 0 feeds its
    output projection, [B, Q, D], one entry per target layer per forward."""
    seen = []
    module = getattr(connector.global_qformer.layer[0], block).output.dense
    module.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    return seen


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("block", ["attention", "crossattention"])
def test_attention_dropout_has_the_eager_distribution(fused, block, device):
    """The dropout on the attention probabilities, observed exactly: with the block's value
    projection the identity and its value inputs one-hot per head (row s of every head is e_s),
    the context IS the dropped probability matrix, P·mask/(1 − p). So, in both paths and with
    the reference's p = 0.1 (only on `block`; every other dropout off, so P is the same in every
    run): eval gives P itself, the same in both paths; in training every entry is 0 or
    P/(1 − p) exactly, and the zeroed fraction over many runs is p (within 5 sigma of the
    binomial). A path that drops nothing, drops in eval or scales wrongly fails. fp64 on the CPU;
    fp32 on CUDA, where SDPA's dropout runs inside its memory-efficient kernel."""
    torch.manual_seed(1)
    frames, batch, runs = 12, 64, 8  # frames and tokens <= HEAD_DIM: one-hot rows fit a head
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    connector = make_connector(fused, layers=1).to(device=device, dtype=dtype)
    set_dropout(connector)
    attention = getattr(connector.global_qformer.layer[0], block).self
    attention.dropout.p = ATTENTION_DROPOUT
    sources = K if block == "attention" else frames
    one_hot = torch.zeros(sources, D, dtype=dtype, device=device)
    for head in range(HEADS):
        one_hot[:, head * HEAD_DIM : head * HEAD_DIM + sources] = torch.eye(sources)
    with torch.no_grad():
        attention.value.weight.copy_(torch.eye(D, device=device))
        attention.value.bias.zero_()
        if block == "attention":  # the values are the queries themselves
            for queries in connector.global_queries:
                queries.copy_(one_hot)
    if block == "crossattention":
        states = [one_hot.expand(batch, -1, -1)] * TARGETS
    else:
        states = whisper_states(batch, dtype=dtype, device=device)
    seen = capture_attention(connector, block)

    def probabilities(context):  # [B, Q, D] -> [B, heads, Q, sources]
        heads = context.view(batch, K, HEADS, HEAD_DIM).transpose(1, 2)
        assert torch.all(heads[..., sources:] == 0)
        return heads[..., :sources]

    with torch.no_grad():
        connector.eval()
        connector(states)
        expected = torch.stack([probabilities(c) for c in seen])  # [targets, B, heads, Q, sources]
        reference = make_connector(not fused, layers=1).to(device=device, dtype=dtype).eval()
        reference.load_state_dict(connector.state_dict())
        reference_seen = capture_attention(reference, block)
        reference(states)
        torch.testing.assert_close(torch.stack([probabilities(c) for c in reference_seen]), expected)
        torch.testing.assert_close(expected.sum(-1), torch.ones_like(expected.sum(-1)))
        assert expected.min() > 0  # so a zero is a dropped probability

        seen.clear()
        connector.train()
        for _ in range(runs):
            connector(states)
    dropped = torch.stack([probabilities(c) for c in seen]).view(runs, *expected.shape)
    zeroed = dropped == 0
    kept = expected.expand_as(dropped) / (1 - ATTENTION_DROPOUT)
    torch.testing.assert_close(dropped[~zeroed], kept[~zeroed], rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)
    fraction, n = zeroed.double().mean().item(), zeroed.numel()
    sigma = (ATTENTION_DROPOUT * (1 - ATTENTION_DROPOUT) / n) ** 0.5
    assert abs(fraction - ATTENTION_DROPOUT) <= 5 * sigma, f"zeroed {fraction:.4f} of {n}, p = {ATTENTION_DROPOUT}"
    assert not torch.equal(zeroed[0], zeroed[1])  # a fresh mask per run


# ----------------------------------------------------------------------------- non-causal


def last_query_moves_first_token(connector) -> bool:
    """Whether changing the last query token of every query set changes global token 0. The
    Q-Former's FFN, its cross-attention and the layer mix are per token, so only the
    self-attention carries token K−1 into token 0: under a causal mask it cannot."""
    states = whisper_states()
    with torch.no_grad():
        before, _ = connector(states)
        for queries in connector.global_queries:
            queries[:, -1] += 1.0
        after, _ = connector(states)
    assert not torch.allclose(after[:, -1], before[:, -1], rtol=0, atol=1e-6)  # the change is seen
    return not torch.allclose(after[:, 0], before[:, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_self_attention_is_bidirectional(fused):
    """Both paths: token 0 sees the last query token, although the self-attention modules are
    built `is_causal=True` (the Q-Former is `is_decoder=True`)."""
    connector = make_connector(fused).eval()
    assert all(layer.attention.self.is_causal for layer in connector.global_qformer.layer)
    assert last_query_moves_first_token(connector)


def test_the_probe_sees_a_causal_mask():
    """The trap the fused path avoids, and proof that the probe above can fail: BERT with
    `attn_implementation="sdpa"` masks the Q-Former's self-attention causally (transformers'
    sdpa_attention_forward follows the module's is_causal), so token 0 no longer sees the
    last query token."""
    connector = make_connector(False).eval()
    connector.global_qformer.config._attn_implementation = "sdpa"
    assert not last_query_moves_first_token(connector)


# ----------------------------------------------------------------------------- one module


def test_the_config_switch_flips_the_same_module(monkeypatch):
    """One connector, the flag flipped both ways through its config: under the flag every
    Q-Former attention (self and cross, every layer, every target layer) is one
    scaled_dot_product_attention call, otherwise none; the state dict is the same tensors
    throughout, BERT's keys, and the plain BertEncoder's."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        assert kwargs["is_causal"] is False
        calls.append(kwargs["dropout_p"])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    connector = make_connector(False)
    before = connector.state_dict()
    plain = BertEncoder(qformer_config(connector.config)).state_dict()
    qformer_keys = {key.removeprefix("global_qformer.") for key in before if key.startswith("global_qformer.")}
    assert qformer_keys == set(plain)
    states = whisper_states()
    per_forward = TARGETS * QFORMER_LAYERS * 2
    # (flag, training, the dropout_p of every SDPA call: BERT's p in training, 0 in eval)
    for flag, training, p in ((True, True, ATTENTION_DROPOUT), (False, True, None), (True, False, 0.0)):
        calls.clear()
        connector.config.use_fused_orca = flag
        connector.train(training)
        connector(states)
        assert calls == ([p] * per_forward if flag else []), (flag, training, calls)
        after = connector.state_dict()
        assert after.keys() == before.keys()
        assert all(after[key].data_ptr() == before[key].data_ptr() for key in before)


def test_checkpoints_move_between_the_paths():
    """A fused connector loads an eager one's state dict (strictly) and vice versa, and each
    then computes the other's global tokens."""
    states = whisper_states(dtype=torch.float64)
    for source_fused in (False, True):
        source = make_connector(source_fused).double().eval()
        target = make_connector(not source_fused).double().eval()
        target.load_state_dict(source.state_dict(), strict=True)
        with torch.no_grad():
            assert_matches_truth(target(states)[0], source(states)[0], tolerances=MODULE_RELATIVE_TOLERANCE)


def test_gradient_checkpointing_of_the_qformer_layers():
    """BERT's layers stay the modules that run (only the attention function is ours), so their
    gradient checkpointing applies to the fused path: with dropout on and the same seed, the
    checkpointed run (which recomputes each layer, dropout included, in the backward) gives the
    plain run's tokens and gradients."""
    connector = make_connector(True).double().train()
    states = whisper_states(dtype=torch.float64)
    probe = torch.randn(B, K, llm_config("qwen3").hidden_size, dtype=torch.float64)
    torch.manual_seed(5)
    plain = run_with_grads(connector, states, probe)
    checkpoints = []

    def checkpoint(*args, **kwargs):
        checkpoints.append(1)
        return torch.utils.checkpoint.checkpoint(*args, use_reentrant=False, **kwargs)

    for layer in connector.global_qformer.layer:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = checkpoint
    torch.manual_seed(5)
    checkpointed = run_with_grads(connector, states, probe)
    assert len(checkpoints) == TARGETS * QFORMER_LAYERS
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=1e-12, atol=0)
    for name, grad in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], grad, rtol=1e-10, atol=1e-14, msg=name)


# ----------------------------------------------------------------------------- memory


def saved_storages(fn) -> dict[int, tuple[int, torch.dtype, tuple[int, ...]]]:
    """What autograd keeps for the backward of fn(): {storage pointer: (bytes, dtype, the first
    saved view's shape)}, a storage saved through several views counted once (as in
    tests/test_saved_tensors.py)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages.setdefault(storage.data_ptr(), (storage.nbytes(), tensor.dtype, tuple(tensor.shape)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return {pointer: entry for pointer, entry in storages.items() if entry[0] > 0}


def probability_shaped(shape: tuple[int, ...], frames: int) -> bool:
    """A [..., Q, S] attention-probability (or dropout-mask) tensor of the tiny shapes: the
    queries against the queries or against the frames, with a head axis."""
    return len(shape) >= 3 and shape[-2:] in ((K, K), (K, frames))


def test_fused_qformer_saves_less_for_backward(device, capsys):
    """In training (dropout on where SDPA has a fused kernel with dropout, i.e. on CUDA; on the
    CPU SDPA's dropout runs in its math kernel, so there the attention dropout is 0 in both
    paths), the bytes autograd keeps beyond the inputs (parameters and states): the fused
    Q-Former keeps no [.., Q, S] probability or mask tensor (the eager one keeps them, which
    shows the check can see them) and fewer bytes. The per-layer difference is printed."""
    attention = ATTENTION_DROPOUT if device.type == "cuda" else 0.0
    states = whisper_states(device=device)
    connectors = {}
    for fused in (False, True):
        connector = make_connector(fused).to(device).train()
        set_dropout(connector, attention=attention, hidden=0.1)
        connectors[fused] = connector
    connectors[True].load_state_dict(connectors[False].state_dict())
    inputs = {s.untyped_storage().data_ptr() for s in states}
    inputs |= {p.untyped_storage().data_ptr() for p in connectors[False].parameters()}
    inputs |= {p.untyped_storage().data_ptr() for p in connectors[True].parameters()}
    saved = {}
    for fused, connector in connectors.items():
        storages = saved_storages(lambda connector=connector: connector(states))
        saved[fused] = [entry for pointer, entry in storages.items() if pointer not in inputs]
    eager_bytes = sum(nbytes for nbytes, _, _ in saved[False])
    fused_bytes = sum(nbytes for nbytes, _, _ in saved[True])
    assert any(probability_shaped(shape, T) for _, _, shape in saved[False])
    assert not [shape for _, _, shape in saved[True] if probability_shaped(shape, T)]
    assert fused_bytes < eager_bytes, (fused_bytes, eager_bytes)
    with capsys.disabled():
        per_layer = (eager_bytes - fused_bytes) / (TARGETS * QFORMER_LAYERS)
        print(
            f"\n[{device.type}, attention dropout {attention}] saved for backward: eager {eager_bytes} B, "
            f"fused {fused_bytes} B; {per_layer:.0f} B less per Q-Former layer and target layer "
            f"(B={B}, K={K}, T={T}, D={D}, heads={HEADS}, fp32)"
        )


class StateCopies(TorchDispatchMode):
    """Counts the ops that copy from the storage of one of `tensors` (clone, _to_copy, copy_;
    `.contiguous()`, `.to()` and the Linear's fold of a strided input all come down to them)."""

    COPIES = {torch.ops.aten.clone.default, torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}

    def __init__(self, tensors):
        super().__init__()
        self.pointers = {t.untyped_storage().data_ptr() for t in tensors}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.COPIES:
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            if source.untyped_storage().data_ptr() in self.pointers:
                self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["whisper", "contiguous", "whisper, bf16 autocast"])
def test_encoder_states_are_copied_once_per_target_layer(layout):
    """A training forward copies each target layer's states once in the fused path (the copy
    that makes them contiguous, which under autocast is also the cast autocast would make), and
    not at all when they are already contiguous in the dtype the Linears read; the eager path
    copies (or casts) them once per K/V projection, 2 x layers per target layer. What autograd
    keeps follows: one buffer of the states' size per target layer, where the eager path keeps
    one per K/V projection."""
    states = whisper_states()
    if layout == "contiguous":
        states = [s.contiguous() for s in states]
    pointers = {s.untyped_storage().data_ptr() for s in states}
    counts, kept = {}, {}
    for fused in (False, True):
        connector = make_connector(fused).train()
        with StateCopies(states) as copies, torch.autocast("cpu", torch.bfloat16, enabled="autocast" in layout):
            storages = saved_storages(lambda connector=connector: connector(states))
        counts[fused] = copies.count
        # The K/V Linears' inputs: buffers saved as [B, T, D] or [B·T, D], other than the states.
        kept[fused] = sum(
            shape in ((B, T, D), (B * T, D)) and pointer not in pointers for pointer, (_, _, shape) in storages.items()
        )
    per_projection = TARGETS * QFORMER_LAYERS * 2
    if layout == "contiguous":
        assert counts == {False: 0, True: 0}
    else:
        assert counts == {False: per_projection, True: TARGETS}
        assert kept == {False: per_projection, True: TARGETS}
