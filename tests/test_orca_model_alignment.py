"""Audio-to-row alignment: a row sees its own audio and nothing else, whatever order the audios
come in; a row without audio is the plain LLM's row; an impossible assignment is an error."""

from __future__ import annotations

import pytest
import torch

from orca_kernels import cross_attention as fused_module
from orca_model.inputs import memory_by_row
from tiny_models import build, make_batch, to_device
from tolerances import relative_error

FP32_MODEL_TOLERANCE = 1e-5  # the same fp32 computation, batched in another order


def reorder_audios(batch: dict, order: list[int]) -> dict:
    """The same prompts with the audio lists given in another order (audio order[i] first)."""
    return {
        **batch,
        "batch_features": batch["batch_features"][order],
        "batch_transcription_ids": [batch["batch_transcription_ids"][i] for i in order],
        "batch_start_positions": [batch["batch_start_positions"][i] for i in order],
    }


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_audio_order_does_not_change_any_row(checkpoints, fused):
    """Audios listed in another order than their rows: every row's final hidden states, the LM
    loss and every ORCA loss are those of the row-ordered batch. (The reference feeds row r the memory of audio r.)"""
    model = build(checkpoints, use_fused_orca=fused).train()
    model.perception.eval()  # no Q-Former dropout; the cross-attentions train (alignment loss)
    batch = make_batch(batch_size=3, transcription_lengths=(2, 1, 3))
    in_order = model(**batch)
    shuffled = model(**reorder_audios(batch, [2, 0, 1]))
    # The final hidden states, the LM head's input (training with use_fused_orca returns no logits).
    assert relative_error(shuffled.hidden_states[-1], in_order.hidden_states[-1]) < FP32_MODEL_TOLERANCE
    assert relative_error(shuffled.loss, in_order.loss) < FP32_MODEL_TOLERANCE
    assert (
        set(shuffled.orca_losses)
        == set(in_order.orca_losses)
        == {
            "L_ortho_diversity",
            "L_ortho_qformer_local",
            "L_align_layerwise",
        }
    )
    for name, loss in in_order.orca_losses.items():
        assert relative_error(shuffled.orca_losses[name], loss) < FP32_MODEL_TOLERANCE, name


def test_the_shuffled_batch_differs_from_a_misaligned_memory(checkpoints):
    """The test above can fail: feeding each row the memory of audio r (the reference's
    indexing) changes the logits far beyond the tolerance."""
    model = build(checkpoints).eval()
    batch = make_batch(batch_size=3)
    in_order = model(**batch).logits
    features = batch["batch_features"][[2, 0, 1]]  # audio r's features now in slot r
    misaligned = model(**{**batch, "batch_features": features}).logits
    assert relative_error(misaligned, in_order) > 100 * FP32_MODEL_TOLERANCE


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_a_row_without_audio_is_the_plain_llm_row(checkpoints, fused):
    """One audio, in row 1 of 2: row 0 gets no splice and no injection (its logits are the LLM's
    alone), and row 1 is what it is in a batch of its own."""
    model = build(checkpoints, use_fused_orca=fused).eval()
    batch = make_batch(batch_size=2, padded=False)
    one_audio = reorder_audios(batch, [1])
    out = model(**one_audio)
    plain = model.llm_model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1])
    assert relative_error(out.logits[0], plain.logits[0]) < FP32_MODEL_TOLERANCE
    alone = model(
        batch["input_ids"][1:],
        batch["attention_mask"][1:],
        batch["batch_features"][1:],
        batch["batch_transcription_ids"][1:],
        [(0, batch["batch_start_positions"][1][1])],
    )
    assert relative_error(out.logits[1], alone.logits[0]) < FP32_MODEL_TOLERANCE


@pytest.mark.parametrize("attention_backend", ["triton", "sdpa"])
def test_rows_without_audio_run_the_unmasked_attention_core(checkpoints, triton_device, monkeypatch, attention_backend):
    """The model's mask only marks whole rows (memory_by_row), which the module returns unchanged:
    the fused path calls the attention core without a mask, with the configured backend, and the
    logits are the reference path's (the masked one)."""
    model = build(checkpoints, use_fused_orca=True, orca_attention_backend=attention_backend).eval().to(triton_device)
    batch = to_device(reorder_audios(make_batch(batch_size=3, padded=False), [2, 0]), triton_device)  # row 1: none
    calls = []
    core = fused_module.flash_cross_attention

    def spy(q, k, v, key_padding_mask, **kwargs):
        calls.append((key_padding_mask, kwargs["backend"]))
        return core(q, k, v, key_padding_mask, **kwargs)

    monkeypatch.setattr(fused_module, "flash_cross_attention", spy)
    fused = model(**batch).logits
    assert calls == [(None, attention_backend)] * model.config.llm_config.num_hidden_layers
    model.set_use_fused_orca(False)
    reference = model(**batch).logits
    assert relative_error(fused, reference) < FP32_MODEL_TOLERANCE


def test_generation_with_a_row_without_audio_and_beams(checkpoints):
    """The row mask is expanded with the memory for beams and several returned sequences."""
    model = build(checkpoints).eval()
    batch = reorder_audios(make_batch(batch_size=2), [1])
    batch.pop("labels")
    ids = model.generate(**batch, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert ids.shape[0] == 4


def test_memory_by_row_layout():
    memory = torch.randn(2, 3, 4)
    same, no_mask = memory_by_row(memory, [0, 1], 2)
    assert same is memory and no_mask is None
    by_row, keep = memory_by_row(memory, [2, 0], 3)
    assert torch.equal(by_row[2], memory[0]) and torch.equal(by_row[0], memory[1]) and torch.all(by_row[1] == 0)
    assert keep.tolist() == [[True] * 3, [False] * 3, [True] * 3]


def _bad_inputs():
    """(change to a valid two-row, two-audio batch, error type, message)."""
    return [
        (lambda b: b.update(batch_start_positions=[(0, 2), (0, 5)]), ValueError, "both in row 0"),
        (lambda b: b.update(batch_start_positions=[(0, 2), (2, 2)]), ValueError, "placed in row 2"),
        (lambda b: b.update(batch_start_positions=[(0, 2), (1, -1)]), ValueError, "starts at position -1"),
        (lambda b: b.update(batch_start_positions=[(0, 2), (1, 11)]), ValueError, "needs 5 positions"),
        (lambda b: b.update(batch_start_positions=[(0, 2), (1, 2.0)]), TypeError, r"\[1\] start must be an int"),
        (lambda b: b.update(batch_start_positions=[(0, 2), (1,)]), ValueError, r"\[1\] must be a \(row, start\)"),
        (lambda b: b.update(batch_start_positions=[(0, 2)]), ValueError, "one of each per audio"),
        (lambda b: b.update(batch_start_positions=torch.tensor([[0, 2], [1, 2]])), TypeError, "sequence of"),
        (lambda b: b.update(input_ids=b["input_ids"].float()), ValueError, "input_ids must hold integer"),
        (lambda b: b.update(input_ids=b["input_ids"][0]), ValueError, "input_ids must have 2 dimensions"),
        (lambda b: b.update(attention_mask=b["attention_mask"][:, 1:]), ValueError, "attention_mask has shape"),
        (lambda b: b.update(labels=b["labels"][:1]), ValueError, "labels has shape"),
        (lambda b: b.update(batch_features=b["batch_features"][:, :5]), ValueError, "5 mel bins"),
        (lambda b: b.update(batch_features=b["batch_features"][0]), ValueError, "batch_features must be"),
        (lambda b: b.update(batch_features=b["batch_features"][..., 1:]), ValueError, "frames but the Whisper"),
        (lambda b: b.update(batch_features=b["batch_features"].tolist()), TypeError, "batch_features must be a"),
        (
            lambda b: b.update(batch_transcription_ids=[torch.zeros(1, 1, 2, dtype=torch.long)] * 2),
            ValueError,
            r"batch_transcription_ids\[0\] must be",
        ),
        (lambda b: b.update(batch_transcription_ids=[[1], [2]]), TypeError, r"batch_transcription_ids\[0\] must be a"),
    ]


@pytest.mark.parametrize("change, error, message", _bad_inputs())
def test_impossible_inputs_are_errors_before_any_work(checkpoints, change, error, message, monkeypatch):
    """Each bad input raises an error naming it, in forward and generate, before the encoder runs."""
    model = build(checkpoints).eval()

    def encoder_must_not_run(*args, **kwargs):
        raise AssertionError("the encoder ran before the inputs were checked")

    monkeypatch.setattr(model.perception, "forward", encoder_must_not_run)
    batch = make_batch(batch_size=2, transcription_lengths=(1, 1))
    change(batch)
    with pytest.raises(error, match=message):
        model(**batch)
    batch.pop("labels")
    if "labels" not in message:
        with pytest.raises(error, match=message):
            model.generate(**batch, max_new_tokens=1)
