"""Training data: the reference's JSONL manifests (`ManifestDataset`) and the collator that turns
their items into `DeSTA25AudioModel.forward`'s inputs (`DeSTA25Collator`).

A manifest holds one JSON object per line, in one of two formats:

- prompt-only, what the reference trains with:
  `{"id": "<audio path>", "prompt": "Describe the audio.", "response": "A dog barks."}`.
  The user message is "<prompt> <|AUDIO|>" (the locator appended when the prompt has no audio
  marker), the transcription is empty. Other fields (the reference's data also carries
  "messages", "seed_description", ...) are ignored, as the reference ignores them.
- messages: `{"messages": [{"role": ..., "content": "... <|AUDIO|>", "audios": [{"audio":
  "a.wav", "text": "optional transcription"}]}, ...], "response": "..."}`, used when a record
  has no "prompt". Each message holds one audio per marker of its content (a `<|AUDIO|>` locator
  or a `<start_audio>…<end_audio>` block); an entry may be the path alone; a missing or null
  "text" is "". The messages are checked by `DeSTA25Processor.conversation_audios`, the check
  `generate(messages)` makes too.

Audio paths are relative to `data_root` unless absolute. A record with an empty response (or an
empty prompt) is dropped, as the reference drops it.

How this maps to the reference. The reference's dataset templates and expands every record up
front (`datasets.map`), and its collator tokenizes the string `context + response + eos`
jointly, truncates it on the right to `max_seq_length`, left-pads the batch, labels the tokens
from `len(tokenize(context))` on, shifts each audio's start by the row's padding, decodes the
audio files and runs the Whisper feature extractor. Here the dataset reads and validates the
records eagerly and templates an item when it is fetched (in the DataLoader workers, with its
audio decoding); the collator builds the ids with `DeSTA25Processor.expand_prompt` and appends
`response ids + eos id`, which gives the reference's ids and labels for a tokenizer whose
joint tokenization equals the concatenation (the tests check it on the test tokenizer).
Differences, all on inputs the reference mishandles: an unreadable audio file is replaced by the
next item (the reference drops it in the collator and can return an empty batch), a sample whose
audio span the truncation would cut is dropped (the reference passes a partial span to the
model), and a malformed record is an error naming its file and line.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from orca_model.processing import DeSTA25Processor, left_pad, pad_prompts

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels the loss skips


@dataclass(frozen=True, slots=True)  # millions of records are held in memory
class _Record:
    """One manifest record: the audio paths (resolved) and transcriptions, in marker order, and
    either the prompt (prompt-only format) or the messages (role and content only)."""

    audios: tuple[str, ...]
    transcriptions: tuple[str, ...]
    prompt: str | None
    messages: tuple[dict[str, str], ...] | None
    response: str


class ManifestDataset(torch.utils.data.Dataset):
    """The records of one or more JSONL manifests; an item is one record with its audio decoded.

    Args:
        manifest_paths: a JSONL file or several (read in order, eagerly).
        processor: the `DeSTA25Processor` (audio loading, chat template, audio markers).
        data_root: the directory audio paths are relative to.
        system_prompt: a system message put before the record's messages (unless they start
            with one).
        max_skips: how many consecutive unreadable items `__getitem__` replaces before it raises.

    `__getitem__(i)` returns {"waveforms": N float32 arrays [samples] at 16 kHz, "transcriptions":
    N strings, "audio_paths": N paths, "context": the templated prompt text, "response": str,
    "index": the record used}. An item whose audio cannot be read (missing or undecodable file)
    is logged and replaced by item i+1, i+2, ... (modulo the length); `skipped_files` counts
    those files over all DataLoader workers.
    """

    def __init__(
        self,
        manifest_paths: str | os.PathLike | Sequence[str | os.PathLike],
        processor: DeSTA25Processor,
        data_root: str | os.PathLike = "",
        system_prompt: str | None = None,
        max_skips: int = 32,
    ):
        if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 1:
            raise ValueError(f"ManifestDataset: max_skips must be an int >= 1, got {max_skips!r}")
        if isinstance(manifest_paths, (str, os.PathLike)):
            manifest_paths = [manifest_paths]
        manifest_paths = [os.fspath(path) for path in manifest_paths]
        self.processor = processor
        self.data_root = os.fspath(data_root)
        self.system_prompt = system_prompt
        self.max_skips = max_skips
        self.records: list[_Record] = []
        dropped = 0
        for manifest in manifest_paths:
            with open(manifest, encoding="utf-8") as file:
                for number, line in enumerate(file, start=1):
                    if not line.strip():
                        continue
                    record = self._parse(line, f"{manifest}:{number}")
                    if record is None:
                        dropped += 1
                    else:
                        self.records.append(record)
        if dropped:
            logger.warning("ManifestDataset: dropped %d record(s) with an empty response or prompt", dropped)
        if not self.records:
            raise ValueError(f"ManifestDataset: no usable records in {manifest_paths}")
        # Shared with the DataLoader workers (each holds a copy of the dataset), so the main
        # process sees every worker's skips. Made by the spawn context: its lock can go to workers
        # of any start method (fork, spawn, forkserver), the fork context's only to forked ones.
        self._skipped = multiprocessing.get_context("spawn").Value("q", 0)

    @property
    def skipped_files(self) -> int:
        """Unreadable audio files met so far (a file met twice counts twice)."""
        return self._skipped.value

    def __len__(self) -> int:
        return len(self.records)

    # ------------------------------------------------------------------ reading the manifest

    def _parse(self, line: str, where: str) -> _Record | None:
        """One manifest line (`where`: its file and line number) -> a record, or None for a record
        the reference drops."""
        prefix = f"ManifestDataset: {where}"

        def malformed(problem: str) -> ValueError:
            return ValueError(f"{prefix}: {problem}")

        try:
            fields = json.loads(line)
        except json.JSONDecodeError as error:
            raise malformed(f"invalid JSON ({error})") from None
        if not isinstance(fields, dict):
            raise malformed(f"a record must be a JSON object, got {type(fields).__name__}")
        if "response" not in fields:
            raise malformed("the record has no 'response'")
        response = fields["response"]
        if response is not None and not isinstance(response, str):
            raise malformed(f"'response' must be a string, got {type(response).__name__}")
        if "prompt" in fields:
            record = self._parse_prompt_only(fields, malformed)
        elif "messages" in fields:
            record = self._parse_messages(fields["messages"], prefix)
        else:
            raise malformed("the record needs 'id' and 'prompt' (prompt-only format) or 'messages'")
        if record is None or not response or not response.strip():
            return None
        return _Record(**record, response=response)

    def _parse_prompt_only(self, fields: dict[str, Any], malformed) -> dict[str, Any] | None:
        audio, prompt = fields.get("id"), fields["prompt"]
        if not isinstance(audio, str) or not audio:
            raise malformed(f"'id' must be the audio path (a non-empty string), got {audio!r}")
        if prompt is not None and not isinstance(prompt, str):
            raise malformed(f"'prompt' must be a string, got {type(prompt).__name__}")
        prompt = (prompt or "").strip()
        if not prompt:
            return None
        markers = self.processor.count_audio_markers(prompt)
        if markers > 1:
            raise malformed(f"the prompt has {markers} audio markers but the record has one audio ('id')")
        if markers == 0:
            prompt = f"{prompt} {self.processor.audio_locator}"
        return {"audios": (self._resolve(audio),), "transcriptions": ("",), "prompt": prompt, "messages": None}

    def _parse_messages(self, messages: Any, prefix: str) -> dict[str, Any]:
        """The "messages" of a record; errors start with `prefix` (the dataset, file and line)."""
        audios = self.processor.conversation_audios(messages, prefix)
        if not audios:
            raise ValueError(f"{prefix}: the record has no audio (no 'audios' entries in its messages)")
        return {
            "audios": tuple(self._resolve(audio.path) for audio in audios),
            "transcriptions": tuple(audio.text or "" for audio in audios),
            "prompt": None,
            "messages": tuple({"role": message["role"], "content": message["content"]} for message in messages),
        }

    def _resolve(self, path: str) -> str:
        return os.path.join(self.data_root, path)  # an absolute path stays as it is

    # ------------------------------------------------------------------ items

    def _context(self, record: _Record) -> str:
        messages = record.messages or ({"role": "user", "content": record.prompt},)
        return self.processor.apply_chat_template(messages, system_prompt=self.system_prompt)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"ManifestDataset: index {index} out of range for {len(self)} records")
        index %= len(self)
        # A dataset shorter than max_skips is tried once around.
        attempts = min(self.max_skips, len(self))
        for attempt in range(attempts):
            current = (index + attempt) % len(self)
            record = self.records[current]
            try:
                waveforms = [self.processor.load_audio(path) for path in record.audios]
            except (OSError, ValueError) as error:
                last_error = error
                with self._skipped.get_lock():
                    self._skipped.value += 1
                logger.warning("ManifestDataset: skipping item %d: %s", current, error)
                continue
            return {
                "waveforms": waveforms,
                "transcriptions": list(record.transcriptions),
                "audio_paths": list(record.audios),
                "context": self._context(record),
                "response": record.response,
                "index": current,
            }
        raise RuntimeError(
            f"ManifestDataset: {attempts} items in a row from index {index} have unreadable audio (the last, item "
            f"{current}: {last_error}); check data_root={self.data_root!r}"
        )


class DeSTA25Collator:
    """Dataset items -> one training batch for `DeSTA25AudioModel.forward`.

    Per sample: ids = context ids (each audio marker expanded to K + L_i placeholders) + response
    ids + EOS id, cut to `max_seq_length` on the right. The batch is left-padded to its longest
    row. Returns:
        input_ids [B, T], attention_mask [B, T] (0 on padding), labels [B, T] (IGNORE_INDEX except
            on the response tokens and the EOS);
        batch_features [N, n_mels, frames]: one row per audio, in sample order;
        batch_transcription_ids: N LongTensors [1, L_i];
        batch_start_positions: N (row, start) pairs of ints, the padding counted.
    A sample whose audio span the truncation would cut is dropped with a warning; a batch with
    no sample left is a ValueError.
    """

    def __init__(self, processor: DeSTA25Processor, max_seq_length: int = 300):
        if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 1:
            raise ValueError(f"DeSTA25Collator: max_seq_length must be an int >= 1, got {max_seq_length!r}")
        self.processor = processor
        self.max_seq_length = max_seq_length

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        processor = self.processor
        rows: list[list[int]] = []
        label_rows: list[list[int]] = []
        starts: list[list[int]] = []
        waveforms: list[Any] = []
        transcription_ids: list[torch.Tensor] = []
        for item in items:
            ids_of_item = [processor.transcription_ids(text) for text in item["transcriptions"]]
            context, starts_of_item = processor.expand_prompt(item["context"], [ids.size(1) for ids in ids_of_item])
            target = processor.tokenizer.encode(item["response"], add_special_tokens=False) + [processor.eos_token_id]
            ids = (context + target)[: self.max_seq_length]
            ends = [
                start + processor.num_audio_tokens + t.size(1)
                for start, t in zip(starts_of_item, ids_of_item, strict=True)
            ]
            if max(ends, default=0) > len(ids):
                logger.warning(
                    "DeSTA25Collator: dropping the sample of %s: its audio tokens end at position %d but "
                    "max_seq_length is %d",
                    item.get("audio_paths", "?"),
                    max(ends),
                    self.max_seq_length,
                )
                continue
            rows.append(ids)
            label_rows.append(([IGNORE_INDEX] * len(context) + target)[: self.max_seq_length])
            starts.append(starts_of_item)
            waveforms += item["waveforms"]
            transcription_ids += ids_of_item
        if not rows:
            raise ValueError(
                f"DeSTA25Collator: every sample of the batch ({len(items)}) has audio tokens beyond "
                f"max_seq_length={self.max_seq_length}"
            )
        input_ids, attention_mask, positions = pad_prompts(rows, starts, processor.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": left_pad(label_rows, IGNORE_INDEX),
            "batch_features": processor.features(waveforms),
            "batch_transcription_ids": transcription_ids,
            "batch_start_positions": positions,
        }
