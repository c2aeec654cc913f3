"""DeSTA25AudioModel on tiny random Whisper + Qwen3 / Llama checkpoints loaded with
from_pretrained: splicing, memory, losses and gradients, checkpoints both ways, generation."""

from __future__ import annotations

import pytest
import torch
from transformers.models.bert.modeling_bert import BertEncoder

from orca_kernels import reference
from orca_model import DeSTA25AudioModel, total_training_loss
from orca_model.connector import qformer_config
from tiny_models import HIDDEN, NUM_GLOBAL_TOKENS, ROPE_THETA, build, make_batch

LOCAL_TOKENS = 4  # (16 frames + 2·2 − 5) // 4 + 1


@pytest.fixture(params=["qwen3", "llama"])
def kind(request):
    return request.param


def test_structure_and_trainable_parameters(checkpoints, kind):
    model = build(checkpoints, kind)
    assert len(model.orca_cross_attns) == 2
    assert all(m.rope_theta == ROPE_THETA[kind] for m in model.orca_cross_attns)
    assert all(m.audio_position_scale == 2.5 and m.num_heads == 4 for m in model.orca_cross_attns)
    assert model.perception.connector.target_layer_ids == [0, 1, 2, 3]
    assert all(not p.requires_grad for p in model.llm_model.parameters())
    assert all(not p.requires_grad for p in model.perception.whisper.parameters())
    prefixes = {name.split(".")[0] + "." + name.split(".")[1] for name in model.trainable_parameter_names}
    assert prefixes == {"perception.connector", "orca_cross_attns.0", "orca_cross_attns.1"}
    assert list(model.state_dict()) == model.trainable_parameter_names


def test_splicing_and_memory(checkpoints):
    model = build(checkpoints).eval()
    batch = make_batch(transcription_lengths=(3, 0))
    seen = {}

    def record(name, value):
        seen[name] = value  # a pre-hook must return None

    model.llm_model.register_forward_pre_hook(
        lambda module, args, kwargs: record("embeds", kwargs["inputs_embeds"]), with_kwargs=True
    )
    model.orca_cross_attns[0].register_forward_pre_hook(lambda module, args: record("memory", args[1]))
    out = model(**batch)
    embeds, embed_tokens = seen["embeds"], model.llm_model.get_input_embeddings()
    expected = embed_tokens(batch["input_ids"]).clone()
    for index, (row, start) in enumerate(batch["batch_start_positions"]):
        transcription = embed_tokens(batch["batch_transcription_ids"][index][0])
        expected[row, start : start + NUM_GLOBAL_TOKENS] = out.audio_global[index]
        expected[row, start + NUM_GLOBAL_TOKENS : start + NUM_GLOBAL_TOKENS + len(transcription)] = transcription
    assert torch.equal(embeds, expected)
    assert out.audio_global.shape == (2, NUM_GLOBAL_TOKENS, HIDDEN)
    assert out.audio_local.shape == (2, LOCAL_TOKENS, HIDDEN)
    # orca_global_cross_attn: the memory is cat(global, local).
    assert torch.equal(seen["memory"], torch.cat([out.audio_global, out.audio_local], dim=1))
    local_only = build(checkpoints, orca_global_cross_attn=False).eval()
    local_only.orca_cross_attns[0].register_forward_pre_hook(lambda module, args: record("local", args[1]))
    local_only(**batch)
    assert seen["local"].shape == (2, LOCAL_TOKENS, HIDDEN)


def test_losses_and_gradients_reach_every_trainable_parameter(checkpoints, kind):
    model = build(checkpoints, kind).train()
    out = model(**make_batch(transcription_lengths=(2, 3)))
    assert set(out.orca_losses) == {"L_ortho_diversity", "L_ortho_qformer_local", "L_align_layerwise"}
    assert out.loss is not None and out.hidden_states is not None
    assert all(m.layer_align_loss is None for m in model.orca_cross_attns)  # collected and cleared
    total_training_loss(out).backward()
    for name, param in model.named_parameters():
        if name in model.trainable_parameter_names:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            # gate_proj.2.weight starts at 0, so nothing flows back into gate_proj.0 at step 0.
            if ".gate_proj.0." not in name:
                assert param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_training_prompts_without_transcription_have_no_alignment_loss(checkpoints):
    # docs/reference-behaviour.md#alignment-loss-is-dead-in-training, reproduced: empty transcriptions
    # give empty spans and no layer loss.
    out = build(checkpoints).train()(**make_batch())
    assert set(out.orca_losses) == {"L_ortho_diversity", "L_ortho_qformer_local"}


def test_no_audio_runs_the_plain_llm(checkpoints):
    model = build(checkpoints).eval()
    batch = make_batch()
    out = model(batch["input_ids"], batch["attention_mask"], batch["batch_features"][:0], [], [])
    plain = model.llm_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.equal(out.logits, plain.logits) and out.orca_losses == {}


def test_context_and_layer_losses_are_cleared_when_the_forward_raises(checkpoints):
    model = build(checkpoints).train()
    batch = make_batch()
    model.orca_cross_attns[1].register_forward_pre_hook(lambda module, args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        model(**batch)
    assert model._injection.context.audio is None
    assert all(m.layer_align_loss is None for m in model.orca_cross_attns)


def test_deep_injection_disabled(checkpoints):
    model = build(checkpoints, orca_deep_injection_enabled=False).eval()
    assert not hasattr(model, "orca_cross_attns")
    assert all(not k.startswith("orca_cross_attns") for k in model.state_dict())
    assert model(**make_batch()).logits.shape == (2, 12, 96)


def test_unsupported_modes_are_errors(checkpoints):
    with pytest.raises(NotImplementedError, match="orca_hybrid"):
        build(checkpoints, connector_mode="qformer_1")


def test_checkpoint_round_trip(checkpoints, tmp_path):
    model = build(checkpoints).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.01)  # differ from any fresh init
    model.save_pretrained(tmp_path)
    loaded = DeSTA25AudioModel.from_pretrained(tmp_path).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    batch = make_batch()
    assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def reference_layout_checkpoint(config, num_layers: int = 2) -> dict[str, torch.Tensor]:
    """A checkpoint with the reference's key names, written out by hand: the connector under
    perception.connector., the Q-Former with the names of HF's BertEncoder (the reference uses
    that class), and the cross-attention modules under the old `ocar_cross_attns` prefix."""
    d, h, k = config.encoder_config.d_model, config.llm_config.hidden_size, config.orca_global_num_tokens
    connector = {
        **{f"global_queries.{i}": torch.randn(1, k, d) for i in range(4)},
        "global_layer_weights": torch.randn(k, 4),
        "global_proj.0.weight": torch.randn(d),
        "global_proj.0.bias": torch.randn(d),
        "global_proj.1.weight": torch.randn(h, d),
        "global_proj.1.bias": torch.randn(h),
        "local_layer_weights": torch.randn(4),
        "local_proj_in.weight": torch.randn(h, d),
        "local_proj_in.bias": torch.randn(h),
        "local_conv.weight": torch.randn(h, h, 5),
        "local_conv.bias": torch.randn(h),
        "local_ln.weight": torch.randn(h),
        "local_ln.bias": torch.randn(h),
    }
    qformer = BertEncoder(qformer_config(config)).state_dict()
    state = {f"perception.connector.{name}": value for name, value in connector.items()}
    state.update({f"perception.connector.global_qformer.{name}": torch.randn_like(v) for name, v in qformer.items()})
    for i in range(num_layers):
        layer = {
            "cross_attn.in_proj_weight": torch.randn(3 * h, h),
            "cross_attn.in_proj_bias": torch.randn(3 * h),
            "cross_attn.out_proj.weight": torch.randn(h, h),
            "cross_attn.out_proj.bias": torch.randn(h),
            "gate_proj.0.weight": torch.randn(h // 4, h),
            "gate_proj.0.bias": torch.randn(h // 4),
            "gate_proj.2.weight": torch.randn(1, h // 4),
            "gate_proj.2.bias": torch.randn(1),
            "ln.weight": torch.randn(h),
            "ln.bias": torch.randn(h),
        }
        state.update({f"ocar_cross_attns.{i}.{name}": value for name, value in layer.items()})
    return state


def test_reference_layout_checkpoint_loads_both_ways(checkpoints):
    model = build(checkpoints)
    checkpoint = reference_layout_checkpoint(model.config)
    result = model.load_state_dict(checkpoint)
    assert result.missing_keys == [] and result.unexpected_keys == []
    ours = model.state_dict()
    renamed = {key.replace("ocar_cross_attns", "orca_cross_attns"): value for key, value in checkpoint.items()}
    assert set(ours) == set(renamed)  # what we save is what the reference loads (`orca_` names)
    for key, value in renamed.items():
        assert torch.equal(ours[key], value), key
    with pytest.raises(RuntimeError, match="missing keys"):
        model.load_state_dict({k: v for k, v in checkpoint.items() if "local_conv" not in k})
    with pytest.raises(RuntimeError, match="unexpected keys"):
        model.load_state_dict({**checkpoint, "perception.connector.extra": torch.zeros(1)})


def generate(model, batch, **kwargs):
    keys = ("input_ids", "attention_mask", "batch_features", "batch_transcription_ids", "batch_start_positions")
    return model.generate(*(batch[key] for key in keys), **kwargs)


def make_audio_dominant(model: DeSTA25AudioModel) -> None:
    """A gate that varies per token and a loud injection, so that the audio decides the tokens
    a random tiny model generates."""
    with torch.no_grad():
        for module in model.orca_cross_attns:
            module.gate_proj[2].weight.normal_()
            module.ln.weight.mul_(50)


def test_greedy_generation_cached_equals_uncached(checkpoints, kind):
    model = build(checkpoints, kind).eval()
    make_audio_dominant(model)
    batch = make_batch(transcription_lengths=(2, 1))
    cached = generate(model, batch, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = generate(model, batch, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (2, 6) and torch.equal(cached, uncached)
    # The first token is the argmax of the teacher-forced forward's last position.
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.equal(cached[:, 0], logits[:, -1].argmax(-1))
    assert model._injection.context.audio is None


def test_beams_and_several_returned_sequences(checkpoints):
    model = build(checkpoints).eval()
    make_audio_dominant(model)
    batch = make_batch(padded=False)
    beams = generate(model, batch, max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2)
    assert beams.shape[0] == 4
    # Each prompt's beams attend to its own audio: reversing the batch reverses the result.
    reversed_batch = {
        "input_ids": batch["input_ids"].flip(0),
        "attention_mask": batch["attention_mask"],
        "batch_features": batch["batch_features"].flip(0),
        "batch_transcription_ids": batch["batch_transcription_ids"][::-1],
        "batch_start_positions": batch["batch_start_positions"],
    }
    reversed_beams = generate(
        model, reversed_batch, max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2
    )
    assert torch.equal(reversed_beams, torch.cat([beams[2:], beams[:2]]))
    torch.manual_seed(0)
    sampled = generate(model, batch, max_new_tokens=4, do_sample=True, num_return_sequences=3)
    assert sampled.shape == (6, 4)
    # One beam and one sequence is greedy decoding.
    single = generate(model, batch, max_new_tokens=4, do_sample=False, num_beams=1)
    assert torch.equal(single, generate(model, batch, max_new_tokens=4, do_sample=False))


def test_generation_rotates_the_audio_memory_once_per_request(checkpoints, monkeypatch):
    calls = []
    rope = reference.audio_rope
    monkeypatch.setattr(reference, "audio_rope", lambda *args, **kwargs: calls.append(1) or rope(*args, **kwargs))
    model = build(checkpoints).eval()
    generate(model, make_batch(), max_new_tokens=5, do_sample=False)
    assert len(calls) == 1  # not once per decode step and layer (2 layers x 5 steps)
    generate(model, make_batch(), max_new_tokens=5, do_sample=False)
    assert len(calls) == 2  # a new request, a new cache
