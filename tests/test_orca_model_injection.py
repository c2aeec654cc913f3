"""Deep injection through forward hooks: the reference's monkey-patched results on Llama and
Qwen3, hooks that fire once per layer, tuple outputs, the context cleared on errors, unchanged
state-dict keys, and a torch.compile trace."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM, Qwen3ForCausalLM

from orca_model import DeepInjection, OrcaGatedCrossAttention, decoder_layers, total_training_loss
from tiny_models import HIDDEN, VOCAB, build, llm_config, make_batch

T_A = 7


def tiny_llm(kind: str) -> nn.Module:
    model_class = Qwen3ForCausalLM if kind == "qwen3" else LlamaForCausalLM
    return model_class(llm_config(kind)).eval()


def cross_attns(count: int = 2) -> nn.ModuleList:
    modules = nn.ModuleList(OrcaGatedCrossAttention(HIDDEN, 4, rope_theta=1e6) for _ in range(count))
    with torch.no_grad():  # a gate that is not the same for every token
        for module in modules:
            module.gate_proj[2].weight.normal_()
    return modules


class ReferenceHolder:
    audio = None
    positions = None


def reference_wrap(llm: nn.Module, modules: nn.ModuleList, holder: ReferenceHolder) -> None:
    """The reference's `_enable_orca_deep_injection`: `layer.forward` replaced on each instance."""

    def make_wrapped(original, xattn):
        def wrapped(hidden_states, *args, **kwargs):
            outputs = original(hidden_states, *args, **kwargs)
            h, rest = (outputs[0], outputs[1:]) if isinstance(outputs, tuple) else (outputs, ())
            if holder.audio is not None:
                h = xattn(
                    hidden_states=h,
                    audio_local=holder.audio,
                    audio_local_mask=None,
                    transcription_positions=holder.positions,
                )
            return (h,) + rest if isinstance(outputs, tuple) else h

        return wrapped

    for layer, xattn in zip(decoder_layers(llm), modules, strict=True):
        layer.forward = make_wrapped(layer.forward, xattn)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
@pytest.mark.parametrize("training", [False, True])
def test_hooks_give_the_reference_results(kind, training):
    llm = tiny_llm(kind)
    reference_llm = copy.deepcopy(llm)
    modules = cross_attns().train(training)
    injection = DeepInjection(decoder_layers(llm), modules)
    holder = ReferenceHolder()
    reference_wrap(reference_llm, modules, holder)

    input_ids = torch.randint(3, VOCAB, (2, 9))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, :2] = 0
    audio = torch.randn(2, T_A, HIDDEN)
    positions = [(0, 1, 4), (1, 3, 6)]

    plain = llm(input_ids=input_ids, attention_mask=attention_mask).logits
    with injection.context.active(audio, None, positions):
        logits = llm(input_ids=input_ids, attention_mask=attention_mask).logits
    losses = injection.pop_layer_align_losses()
    holder.audio, holder.positions = audio, positions
    expected = reference_llm(input_ids=input_ids, attention_mask=attention_mask).logits
    expected_losses = [m.layer_align_loss for m in modules if m.layer_align_loss is not None]

    assert torch.equal(logits, expected)
    assert not torch.equal(logits, plain)
    assert len(losses) == (2 if training else 0)
    for loss, expected_loss in zip(losses, expected_losses, strict=True):
        assert torch.equal(loss, expected_loss)
    # Outside the context the hooks do nothing.
    assert torch.equal(llm(input_ids=input_ids, attention_mask=attention_mask).logits, plain)


def test_hooks_fire_once_per_layer_and_keys_are_unchanged():
    llm = tiny_llm("qwen3")
    keys = list(llm.state_dict())
    modules = cross_attns()
    calls = []
    for index, module in enumerate(modules):
        module.register_forward_hook(lambda m, args, out, index=index: calls.append(index))
    injection = DeepInjection(decoder_layers(llm), modules)
    assert list(llm.state_dict()) == keys
    assert "forward" not in vars(decoder_layers(llm)[0])  # no instance-level patch
    with injection.context.active(torch.randn(1, T_A, HIDDEN)):
        llm(input_ids=torch.randint(3, VOCAB, (1, 5)))
    assert calls == [0, 1]
    injection.remove()
    calls.clear()
    with injection.context.active(torch.randn(1, T_A, HIDDEN)):
        llm(input_ids=torch.randint(3, VOCAB, (1, 5)))
    assert calls == []


class TupleLayer(nn.Module):
    """A transformers 4.x-style decoder layer: returns (hidden_states, extra)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, hidden_states):
        return self.linear(hidden_states), "extra"


class TupleLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([TupleLayer(), TupleLayer()])

    def forward(self, hidden_states):
        extras = []
        for layer in self.model.layers:
            hidden_states, extra = layer(hidden_states)
            extras.append(extra)
        return hidden_states, extras


def test_tuple_layer_outputs_keep_their_structure():
    lm = TupleLM()
    modules = cross_attns()
    injection = DeepInjection(decoder_layers(lm), modules)
    x, audio = torch.randn(2, 5, HIDDEN), torch.randn(2, T_A, HIDDEN)
    with injection.context.active(audio):
        out, extras = lm(x)
    expected = x
    for layer, module in zip(lm.model.layers, modules, strict=True):
        expected = module(layer.linear(expected), audio)
    assert torch.equal(out, expected) and extras == ["extra", "extra"]


def test_context_is_cleared_when_the_forward_raises():
    llm = tiny_llm("llama")
    modules = cross_attns().train()
    injection = DeepInjection(decoder_layers(llm), modules)

    def fail(module, args):
        raise RuntimeError("layer 1 failed")

    handle = modules[1].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="layer 1 failed"), injection.context.active(torch.randn(1, T_A, HIDDEN)):
        llm(input_ids=torch.randint(3, VOCAB, (1, 5)))
    context = injection.context
    assert context.audio is None and context.transcription_positions is None and context.audio_cache is None
    handle.remove()
    with injection.context.active(torch.randn(1, T_A, HIDDEN)):  # usable again
        llm(input_ids=torch.randint(3, VOCAB, (1, 5)))
    with (
        pytest.raises(RuntimeError, match="already active"),
        injection.context.active(torch.randn(1, T_A, HIDDEN)),
        injection.context.active(torch.randn(1, T_A, HIDDEN)),
    ):
        pass


def test_memory_batch_mismatch_is_a_clear_error():
    llm = tiny_llm("qwen3")
    injection = DeepInjection(decoder_layers(llm), cross_attns())
    with (
        pytest.raises(ValueError, match="batch size 1 .* have 3"),
        injection.context.active(torch.randn(1, T_A, HIDDEN)),
    ):
        llm(input_ids=torch.randint(3, VOCAB, (3, 5)))
    with pytest.raises(ValueError, match="layers has 2 decoder layers but cross_attns has 3"):
        DeepInjection(decoder_layers(llm), cross_attns(3))


def test_torch_compile_traces_the_hooks():
    lm = TupleLM()
    injection = DeepInjection(decoder_layers(lm), cross_attns())
    x, audio = torch.randn(2, 5, HIDDEN), torch.randn(2, T_A, HIDDEN)
    compiled = torch.compile(lm, backend="eager", fullgraph=True)
    with injection.context.active(audio):
        expected = lm(x)[0]
        actual = compiled(x)[0]
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_a_deepcopy_injects_into_itself(checkpoints, checkpointing):
    """A deepcopy of the model (an EMA copy, say) keeps its injection: its hooks and checkpoint
    wrappers point at the copy's memory and modules, not the original's."""
    model = build(checkpoints).train()
    model.perception.eval()  # no Q-Former dropout: the two models see the same function
    if checkpointing:
        model.gradient_checkpointing_enable()
    batch = make_batch(transcription_lengths=(2, 1))
    duplicate = copy.deepcopy(model)
    original, copied = model(**batch), duplicate(**batch)
    torch.testing.assert_close(copied.logits, original.logits, rtol=0, atol=0)
    assert (
        copied.orca_losses.keys()
        == original.orca_losses.keys()
        == {
            "L_ortho_diversity",
            "L_ortho_qformer_local",
            "L_align_layerwise",
        }
    )
    total_training_loss(copied).backward()
    assert all(p.grad is not None for p in duplicate.orca_cross_attns[0].parameters())
    assert all(p.grad is None for p in model.orca_cross_attns.parameters())
