"""The paths a training run takes through the model: gradient checkpointing of the LLM with the
injection, and the reference's LoRA (`use_lora=True`). They run where the Triton kernels run
(`triton_device`: the CPU under the interpreter, CUDA on a GPU machine)."""

from __future__ import annotations

import pytest
import torch

from orca_model import DeSTA25AudioModel, total_training_loss
from orca_model.modeling import LORA_SETTINGS
from tiny_models import build, make_batch, to_device


def loss_and_grads(model: DeSTA25AudioModel, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total training loss and the gradient of every trainable parameter (reset first)."""
    model.zero_grad(set_to_none=True)
    loss = total_training_loss(model(**batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def deterministic(model: DeSTA25AudioModel) -> DeSTA25AudioModel:
    """Training mode (per-layer alignment losses on) without the Q-Former's random dropout, so two
    runs see the same function."""
    model.train()
    model.perception.eval()
    return model


def enable_on_llm(model: DeSTA25AudioModel, **kwargs) -> None:
    """Checkpointing switched on the LLM itself, as a user of the reference would."""
    llm = model.llm_model  # transformers 5.24 renamed gradient to activation checkpointing
    if hasattr(llm, "activation_checkpointing_enable"):
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


@pytest.mark.parametrize("use_fused_orca", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize(
    "enable",
    [
        lambda model: model.gradient_checkpointing_enable(),
        lambda model: enable_on_llm(model),
        lambda model: enable_on_llm(model, use_reentrant=True),
    ],
    ids=["model", "llm-direct", "llm-reentrant"],
)
def test_gradient_checkpointing_keeps_the_injection(checkpoints, triton_device, use_fused_orca, enable):
    """Same loss and the same gradient for every trainable parameter with and without
    checkpointing: the recomputed decoder layers and the injection see the same memory. The
    transcriptions are non-empty so the per-layer alignment losses are in the total too."""
    model = deterministic(build(checkpoints, use_fused_orca=use_fused_orca).to(triton_device))
    batch = to_device(make_batch(transcription_lengths=(2, 3)), triton_device)
    reference_loss, reference_grads = loss_and_grads(model, batch)
    # Without the injection the loss would differ: the check below can fail.
    with torch.no_grad():
        plain = model.llm_model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    assert not torch.allclose(plain, model(**batch).loss)

    enable(model)
    calls = []
    handle = model.orca_cross_attns[0].register_forward_hook(lambda *args: calls.append(1))
    loss, grads = loss_and_grads(model, batch)
    handle.remove()
    assert len(calls) == 1  # the injection ran once, outside the checkpoint (never recomputed)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert all(grads[n].abs().sum() > 0 for n in grads if n.startswith("orca_cross_attns.1.gate_proj.2"))

    model.gradient_checkpointing_disable()
    loss, _ = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=1e-6)


def test_gradient_checkpointing_with_input_gradients(checkpoints, triton_device):
    """With the embeddings' input-gradient hook on (what checkpointing enables for PEFT), the audio
    tokens are spliced out of place: the reference fails there with "a view of a leaf Variable
    that requires grad"."""
    model = deterministic(build(checkpoints).to(triton_device))
    batch = to_device(make_batch(), triton_device)
    reference_loss, reference_grads = loss_and_grads(model, batch)
    model.gradient_checkpointing_enable()
    model.llm_model.enable_input_require_grads()
    loss, grads = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def lora_names(model: DeSTA25AudioModel) -> set[str]:
    """The reference's LoRA weights: A and B of each target projection in every decoder layer."""
    layers = model.llm_model.config.num_hidden_layers
    return {
        f"llm_model.model.layers.{i}.self_attn.{proj}.lora_{ab}.default.weight"
        for i in range(layers)
        for proj in LORA_SETTINGS["target_modules"]
        for ab in "AB"
    }


def test_lora_trainable_set_is_the_reference(checkpoints):
    plain = build(checkpoints)
    model = build(checkpoints, use_lora=True)
    expected = set(plain.trainable_parameter_names) | lora_names(model)
    assert set(model.trainable_parameter_names) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    lora = dict(model.llm_model.named_modules())["model.layers.0.self_attn.q_proj"]
    assert (lora.r["default"], lora.lora_alpha["default"], lora.lora_dropout["default"].p) == (16, 16, 0.1)
    assert set(model.state_dict()) == expected  # trainable-only checkpoints carry the LoRA weights


@pytest.mark.parametrize("use_fused_orca", [False, True], ids=["unfused", "fused"])
def test_lora_starts_as_the_plain_model_and_trains(checkpoints, triton_device, use_fused_orca):
    """LoRA's B starts at zero: the same loss as the model without LoRA and the same trainable
    weights; its gradient reaches the LoRA weights, with checkpointing too."""
    plain = deterministic(build(checkpoints, use_fused_orca=use_fused_orca).to(triton_device))
    model = deterministic(build(checkpoints, use_lora=True, use_fused_orca=use_fused_orca).to(triton_device))
    model.llm_model.eval()  # LoRA dropout off for the comparison
    model.load_state_dict(plain.state_dict(), strict=False)
    batch = to_device(make_batch(), triton_device)
    plain_loss, plain_grads = loss_and_grads(plain, batch)
    loss, grads = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    b_grads = [grads[n] for n in lora_names(model) if ".lora_B." in n]
    assert all(g.abs().sum() > 0 for g in b_grads)

    model.gradient_checkpointing_enable()
    checkpointed_loss, checkpointed = loss_and_grads(model, batch)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_lora_checkpoint_round_trip(checkpoints, tmp_path):
    model = build(checkpoints, use_lora=True).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_()  # trained-looking LoRA weights
    model.save_pretrained(tmp_path)
    loaded = DeSTA25AudioModel.from_pretrained(tmp_path).eval()
    assert loaded.config.use_lora
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0, msg=name)
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
