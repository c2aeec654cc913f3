"""The model's batch inputs: their validation, and the audio memory laid out by row.

A batch holds B prompts and N audios; audio i sits in row `batch_start_positions[i][0]`. The
decoder layers read the cross-attention memory row by row, so the memory handed to them is
[B, T_a, H] with row r holding the audio of row r. The reference indexes it by audio instead,
which feeds a row another row's audio as soon as the audios are not exactly one per row in row
order (docs/reference-behaviour.md#audio-to-row-alignment).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from orca_kernels.validation import check_index, check_int_tensor, check_is_tensor, check_rank

MODEL = "DeSTA25AudioModel"


def check_batch_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    batch_features: torch.Tensor | None,
    batch_transcription_ids: Sequence[torch.Tensor],
    batch_start_positions: Sequence[tuple[int, int]],
    *,
    num_global_tokens: int,
    num_mel_bins: int,
    num_frames: int,
    batch_encoder_states: Sequence[torch.Tensor] | torch.Tensor | None = None,
) -> list[int]:
    """Every input of `forward` / `generate`, checked before any work; returns the row of each audio.

    input_ids [B, T_x] and labels [B, T_x] integer ids, attention_mask [B, T_x]; batch_features
    [N, num_mel_bins, num_frames]; batch_transcription_ids N tensors [L_i] or [1, L_i];
    batch_start_positions N (row, start) pairs; batch_encoder_states instead of the features: the
    target layers' states, L tensors [N, T, D] or one [L, N, T, D] (their shapes are the
    perception's to check). Audio i occupies positions
    [start, start + num_global_tokens + L_i) of its row, which must fit in T_x, and a row holds
    at most one audio (the memory is one audio's tokens per row).
    """
    check_int_tensor(MODEL, "input_ids", input_ids, 2, holding="integer token ids")
    batch, length = input_ids.shape
    for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
        if tensor is None:
            continue
        check_is_tensor(MODEL, name, tensor)
        if tensor.shape != input_ids.shape:
            raise ValueError(
                f"{MODEL}: {name} has shape {tuple(tensor.shape)} but input_ids has {tuple(input_ids.shape)}"
            )
    if isinstance(batch_start_positions, torch.Tensor) or not isinstance(batch_start_positions, Sequence):
        raise TypeError(
            f"{MODEL}: batch_start_positions must be a sequence of (row, start) pairs, "
            f"got {type(batch_start_positions).__name__}"
        )
    num_audio = len(batch_start_positions)
    if num_audio == 0:
        return []
    if batch_encoder_states is not None:
        if batch_features is not None:
            raise ValueError(f"{MODEL}: pass batch_features or batch_encoder_states, not both")
        states = batch_encoder_states
        first = states[0] if not isinstance(states, torch.Tensor) and len(states) else states
        check_is_tensor(MODEL, "batch_encoder_states", first)
        count = first.size(1) if isinstance(states, torch.Tensor) and states.dim() == 4 else first.size(0)
        if len(batch_transcription_ids) != num_audio or count != num_audio:
            raise ValueError(
                f"{MODEL}: batch_start_positions has {num_audio} entries, batch_transcription_ids "
                f"{len(batch_transcription_ids)} and batch_encoder_states {count}: one of each per audio"
            )
        return _rows_of_audios(input_ids, batch_transcription_ids, batch_start_positions, num_global_tokens)
    check_rank(MODEL, "batch_features", batch_features, 3, layout="[N, n_mels, frames]")
    if batch_features.size(1) != num_mel_bins:
        raise ValueError(
            f"{MODEL}: batch_features has {batch_features.size(1)} mel bins but the Whisper encoder takes "
            f"{num_mel_bins}"
        )
    if batch_features.size(2) != num_frames:
        raise ValueError(
            f"{MODEL}: batch_features has {batch_features.size(2)} frames but the Whisper encoder takes "
            f"{num_frames}: pad the features to {num_frames} frames (the feature extractor does)"
        )
    if len(batch_transcription_ids) != num_audio or batch_features.size(0) != num_audio:
        raise ValueError(
            f"{MODEL}: batch_start_positions has {num_audio} entries, batch_transcription_ids "
            f"{len(batch_transcription_ids)} and batch_features {batch_features.size(0)}: one of each per audio"
        )
    return _rows_of_audios(input_ids, batch_transcription_ids, batch_start_positions, num_global_tokens)


def _rows_of_audios(
    input_ids: torch.Tensor,
    batch_transcription_ids: Sequence[torch.Tensor],
    batch_start_positions: Sequence[tuple[int, int]],
    num_global_tokens: int,
) -> list[int]:
    """The row of each audio, its (row, start) pair and transcription checked against the prompt."""
    batch, length = input_ids.shape
    rows: list[int] = []
    audio_of_row: dict[int, int] = {}
    for index, (position, ids) in enumerate(zip(batch_start_positions, batch_transcription_ids, strict=True)):
        if not isinstance(position, Sequence) or len(position) != 2:
            raise ValueError(f"{MODEL}: batch_start_positions[{index}] must be a (row, start) pair, got {position!r}")
        row = check_index(MODEL, f"batch_start_positions[{index}] row", position[0])
        start = check_index(MODEL, f"batch_start_positions[{index}] start", position[1])
        if not 0 <= row < batch:
            raise ValueError(f"{MODEL}: audio {index} is placed in row {row}, but the batch has rows 0..{batch - 1}")
        name = f"batch_transcription_ids[{index}]"
        check_is_tensor(MODEL, name, ids)
        if ids.dim() not in (1, 2) or (ids.dim() == 2 and ids.size(0) != 1):
            raise ValueError(f"{MODEL}: {name} must be [L] or [1, L] token ids, got shape {tuple(ids.shape)}")
        needed = num_global_tokens + ids.shape[-1]
        if start < 0 or start + needed > length:
            raise ValueError(
                f"{MODEL}: audio {index} starts at position {start} of row {row} and needs {needed} positions "
                f"({num_global_tokens} global tokens + {ids.shape[-1]} transcription tokens), but rows have "
                f"positions 0..{length - 1}"
            )
        if row in audio_of_row:
            raise ValueError(
                f"{MODEL}: audios {audio_of_row[row]} and {index} are both in row {row}; a row holds at most one "
                "audio (the cross-attention memory is one audio's tokens per row)"
            )
        audio_of_row[row] = index
        rows.append(row)
    return rows


def memory_by_row(memory: torch.Tensor, rows: Sequence[int], batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per-audio memory [N, T_a, H] laid out by row -> ([B, T_a, H], keep mask [B, T_a] or None).

    Audio i goes to row rows[i]; a row without audio gets zeros and an all-False keep mask, which
    the cross-attention reads as "no injection for this row". One audio per row in row order (the
    usual batch) is returned as it is, with no mask.
    """
    if list(rows) == list(range(batch)):
        return memory, None
    index = torch.tensor(list(rows), dtype=torch.long, device=memory.device)
    by_row = memory.new_zeros(batch, *memory.shape[1:]).index_copy(0, index, memory)
    keep = torch.zeros(batch, memory.size(1), dtype=torch.bool, device=memory.device)
    keep[index] = True
    return by_row, keep
