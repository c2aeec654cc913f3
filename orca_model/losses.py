"""The ORCA auxiliary losses, the model output that carries them, and LM + ORCA training loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

import orca_kernels
from orca_kernels import reference
from orca_model.config import DeSTA25Config

MAX_LOCAL_SAMPLES = 100  # local tokens the cross loss reads, as in the reference


def layer_align_loss(
    hidden: torch.Tensor,
    audio_pooled: torch.Tensor,
    transcription_positions: Sequence[tuple[int, int, int]] | None = None,
    has_audio: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The per-layer alignment loss of one cross-attention module (training only).

    hidden [B, T_x, H] is the pre-injection hidden state, audio_pooled [B, H] the pooled memory
    of each row (`reference.pool_rotated_audio`). Each transcription span (row, start, end) with
    start < end <= T_x is mean-pooled and compared with the pooled audio of its own row; loss =
    mean(1 − cos); no valid span gives None. Without spans every text token is pooled per row,
    over the rows with audio (has_audio [B] bool; all rows when None).

    The reference pairs the valid spans with the audio rows by list index: the same numbers when
    audio i sits in row i and every span is valid, another row's audio otherwise
    (docs/reference-behaviour.md#audio-to-row-alignment). The span pooling and the loss without
    spans are the reference's own (`reference.pool_transcription_spans`,
    `reference.align_loss_per_row`); only the pairing and the rows counted differ.
    """
    if transcription_positions is not None and len(transcription_positions) > 0:
        spans = reference.pool_transcription_spans(hidden, transcription_positions)
        if spans is None:
            return None
        rows, text_pooled = spans
        return (1 - F.cosine_similarity(audio_pooled[rows], text_pooled, dim=-1)).mean()
    per_row = reference.align_loss_per_row(hidden, audio_pooled)
    if has_audio is None:
        return per_row.mean()
    weights = has_audio.to(per_row.dtype)
    return (per_row * weights).sum() / weights.sum().clamp(min=1)


def compute_orca_losses(
    config: DeSTA25Config,
    global_tokens: torch.Tensor | None,
    local_tokens: torch.Tensor | None,
    text_hidden: torch.Tensor | None = None,
    layer_align_losses: Sequence[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The reference's `compute_orca_losses` (docs/ops.md#compute_orca_losses), already weighted.

    global_tokens [B, K, H], local_tokens [B, T_l, H] (the local tokens only, not the memory),
    layer_align_losses the non-None per-layer losses of the cross-attention modules.
    `text_hidden` is accepted for the reference's call signature; the reference does not use it.

    Returns a dict with, when their inputs exist:
        L_ortho_diversity: orca_ortho_diversity_weight · mean((ĝĝᵀ − I)²)
        L_ortho_qformer_local: orca_ortho_weight_qformer_local · mean((ĝ l̂[:, idx]ᵀ)²), idx the
            100 linspace rows when T_l > 100
        L_align_layerwise: orca_align_weight_local · mean(layer_align_losses)
    With `config.use_fused_orca` (read at every call) the two orthogonality losses come from one
    fused call.
    """
    diversity = cross = None
    if global_tokens is not None:
        if config.use_fused_orca:
            if local_tokens is not None:
                diversity, cross = orca_kernels.ortho_losses(
                    global_tokens, local_tokens, max_local_samples=MAX_LOCAL_SAMPLES
                )
            else:
                diversity = orca_kernels.ortho_diversity_loss(global_tokens)
        else:  # the reference's formulas, behind the same input checks
            diversity = orca_kernels.ortho_diversity_loss(global_tokens, backend="torch")
            if local_tokens is not None:
                cross = orca_kernels.ortho_cross_loss(global_tokens, local_tokens, MAX_LOCAL_SAMPLES, backend="torch")

    losses = {}
    if diversity is not None:
        losses["L_ortho_diversity"] = config.orca_ortho_diversity_weight * diversity
    if cross is not None:
        losses["L_ortho_qformer_local"] = config.orca_ortho_weight_qformer_local * cross
    if layer_align_losses:
        losses["L_align_layerwise"] = config.orca_align_weight_local * torch.stack(list(layer_align_losses)).mean()
    return losses


@dataclass
class DeSTA25Output(CausalLMOutputWithPast):
    """The LLM's `CausalLMOutputWithPast` (loss, logits, cache, hidden_states, attentions, as the
    installed transformers names them) plus the ORCA results, all declared fields.

    The reference attaches `orca_losses` as a plain attribute, which accelerate's fp32 output
    conversion and DDP's pytree round trip drop (docs/reference-behaviour.md#silent-orca-losses),
    so training there sees the LM loss only. As fields they survive both.

    Attributes added:
        orca_losses: the weighted losses of `compute_orca_losses` (name -> scalar).
        audio_global: global tokens [N_audio, K, H].
        audio_local: local tokens [N_audio, T_l, H].
    """

    orca_losses: dict[str, torch.Tensor] | None = None
    audio_global: torch.Tensor | None = None
    audio_local: torch.Tensor | None = None


def total_training_loss(outputs: DeSTA25Output) -> torch.Tensor:
    """LM loss + every ORCA loss (already weighted), summed in the reference trainer's order.

    This is the whole of the reference trainer's loss; in a Hugging Face Trainer subclass:

        class OrcaTrainer(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                outputs = model(**inputs)
                loss = total_training_loss(outputs)
                return (loss, outputs) if return_outputs else loss
    """
    if outputs.loss is None:
        raise ValueError("total_training_loss needs the LM loss: call the model with labels")
    total = outputs.loss
    for loss in (outputs.orca_losses or {}).values():
        total = total + loss
    return total
