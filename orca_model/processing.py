"""DeSTA25Processor: the prompt and audio front end of DeSTA2.5 / ORCA, one implementation for
training (orca_model.data) and for generation from chat messages.

The model reads a prompt in which audio i occupies K + L_i consecutive placeholder tokens
starting at `batch_start_positions[i]`: K global audio tokens (`orca_global_num_tokens`) followed
by the L_i tokens of its transcription (empty in training, so L_i = 0). The processor

- loads audio files as 16 kHz mono float32 (`load_audio`) and turns them into Whisper features
  (`features`);
- checks a conversation of chat messages against its audio entries, one per marker, and returns
  them (`conversation_audios`: the one check of the chat format, for the training manifests and
  for `generate(messages)`);
- templates chat messages (`apply_chat_template`) and expands the audio markers of the templated
  text into placeholder ids, returning where each audio starts (`expand_prompt`). A marker is the
  audio locator (`<|AUDIO|>`) or a whole `<start_audio>…<end_audio>` block (tags and anything
  between them, a locator included, are one audio);
- left-pads a batch of prompts for generation (`prompt_inputs`).

How it maps to the reference: the reference tokenizes the templated text to token strings,
replaces each marker by K + L_i placeholder strings, joins the tokens back into a string and lets
the collator tokenize that string again. Here the text between markers is encoded once
(`add_special_tokens=False`) and the placeholder ids are inserted directly, so the ids do not
depend on the tokenizer's string round trip; for a tokenizer whose round trip is exact (the
test tokenizer) both give the same ids (tests/test_data_pipeline.py checks it). The reference's
`AudioSegment.from_file(target_sr=16000, channel_selector="average")` is `load_audio` (soundfile
decoding, channel average, polyphase resampling).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile
import torch
from scipy.signal import resample_poly
from transformers import AutoTokenizer, PreTrainedTokenizerBase, WhisperFeatureExtractor

NAME = "DeSTA25Processor"
PROCESSOR_FILE = "desta25_processor.json"
SAMPLING_RATE = 16000  # Whisper's
AUDIO_START, AUDIO_END = "<start_audio>", "<end_audio>"


def left_pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Rows of different lengths -> LongTensor [B, T] (T the longest row), padded on the left with `value`."""
    length = max((len(row) for row in rows), default=0)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            out[index, length - len(row) :] = torch.tensor(row, dtype=torch.long)
    return out


def pad_prompts(
    rows: Sequence[Sequence[int]], starts: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """B token rows, `starts[b]` the audio start positions in row b -> input_ids [B, T] and
    attention_mask [B, T], left-padded, and the (row, start) pair of every audio, row by row,
    its start moved by the row's padding."""
    input_ids = left_pad(rows, pad_token_id)
    length = input_ids.size(1)
    positions = [
        (row, start + length - len(ids))
        for row, (ids, starts_of_row) in enumerate(zip(rows, starts, strict=True))
        for start in starts_of_row
    ]
    return input_ids, left_pad([[1] * len(ids) for ids in rows], 0), positions


@dataclass(frozen=True)
class ChatAudio:
    """One audio entry of a chat message, as `DeSTA25Processor.conversation_audios` checked it.

    path: the audio file, as given (the caller resolves a relative one).
    text: its transcription, or None when the entry gives none.
    waveform: its decoded audio, float32 [samples] at 16 kHz mono, when the entry carries one
        (then nothing needs to read `path`), else None.
    """

    path: str
    text: str | None
    waveform: np.ndarray | None = None


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _describe_message(index: int, message: dict) -> str:
    """The message as errors name it: its index, role and content ("message 1 (role 'user',
    content '...')"), a long content cut (a string to 80 characters, anything else to 100 of its
    repr)."""
    content = message.get("content")
    if isinstance(content, str) and len(content) > 80:
        content = content[:77] + "..."
    return f"message {index} (role {message.get('role')!r:.80}, content {content!r:.100})"


def _checked_waveform(waveform: Any, name: str) -> np.ndarray:
    """A decoded waveform given with an audio entry -> float32 [samples]; ValueError naming the
    entry (`name`) unless it is a non-empty, finite, 1-D floating numpy array."""
    if not isinstance(waveform, np.ndarray) or waveform.ndim != 1 or not np.issubdtype(waveform.dtype, np.floating):
        got = (
            f"an array of shape {waveform.shape} and dtype {waveform.dtype}"
            if isinstance(waveform, np.ndarray)
            else type(waveform).__name__
        )
        raise ValueError(f"{name} must be a 1-D floating numpy array of 16 kHz samples, got {got}")
    if waveform.size == 0:
        raise ValueError(f"{name} holds no samples")
    if not np.isfinite(waveform).all():
        raise ValueError(f"{name} holds non-finite samples (NaN or inf)")
    return waveform.astype(np.float32, copy=False)


def _chat_audio(entry: Any, name: str, waveforms: bool) -> ChatAudio:
    """One entry of a message's "audios" (`name` places it) -> a ChatAudio; see
    `DeSTA25Processor.conversation_audios`."""
    if isinstance(entry, (str, os.PathLike)):
        entry = {"audio": entry}
    if not isinstance(entry, dict):
        raise ValueError(
            f'{name} must be {{"audio": path, "text": optional transcription}} or a path, got {entry!r:.80}'
        )
    path = entry.get("audio")
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"{name}['audio'] must be the audio path (a non-empty string or path-like), got {path!r:.80}")
    path = os.fspath(path)
    text = entry.get("text")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{name}['text'] (audio {path!r}) must be a string or None, got {type(text).__name__}")
    waveform = entry.get("waveform") if waveforms else None
    if waveform is not None:
        waveform = _checked_waveform(waveform, f"{name}['waveform'] (audio {path!r})")
    return ChatAudio(path, text, waveform)


class DeSTA25Processor:
    """Tokenizer + Whisper feature extractor + the audio-marker conventions of one model.

    Args:
        tokenizer: the LLM's tokenizer. It is modified as the reference does: the audio locator
            is added as a token when missing, `padding_side` becomes "left", and the pad token
            becomes the EOS token when it has none.
        feature_extractor: a `WhisperFeatureExtractor` at 16 kHz.
        num_audio_tokens: K, the global audio tokens per audio (`orca_global_num_tokens`).
        placeholder_token: the token audio positions hold in `input_ids` ("<|video_pad|>" for
            Qwen3, "<|reserved_special_token_87|>" for Llama 3.1); one token of the tokenizer.
        audio_locator: the audio marker of prompt texts; one token once added.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        feature_extractor: WhisperFeatureExtractor,
        *,
        num_audio_tokens: int,
        placeholder_token: str,
        audio_locator: str = "<|AUDIO|>",
    ):
        if isinstance(num_audio_tokens, bool) or not isinstance(num_audio_tokens, int) or num_audio_tokens < 1:
            raise ValueError(f"{NAME}: num_audio_tokens must be an int >= 1, got {num_audio_tokens!r}")
        for name, token in (("audio_locator", audio_locator), ("placeholder_token", placeholder_token)):
            if not isinstance(token, str) or not token:
                raise ValueError(f"{NAME}: {name} must be a non-empty string, got {token!r}")
        if audio_locator == placeholder_token:
            raise ValueError(f"{NAME}: audio_locator and placeholder_token are both {audio_locator!r}")
        rate = getattr(feature_extractor, "sampling_rate", None)
        if rate != SAMPLING_RATE:
            raise ValueError(f"{NAME}: feature_extractor must work at {SAMPLING_RATE} Hz (Whisper's), got {rate!r}")
        if audio_locator not in tokenizer.get_vocab():
            tokenizer.add_tokens([audio_locator])
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"{NAME}: the tokenizer has neither a pad token nor an EOS token")
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{NAME}: the tokenizer has no EOS token (training targets end with it)")
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.num_audio_tokens = num_audio_tokens
        self.audio_locator = audio_locator
        self.placeholder_token = placeholder_token
        self.sampling_rate = SAMPLING_RATE
        self.audio_locator_id = self._single_token_id("audio_locator", audio_locator)
        self.placeholder_id = self._single_token_id("placeholder_token", placeholder_token)
        # One marker: a <start_audio>…<end_audio> block (the shortest one, across lines) or a
        # bare locator. Alternation order makes a locator inside a block part of that block.
        self._marker = re.compile(f"{re.escape(AUDIO_START)}.*?{re.escape(AUDIO_END)}|{re.escape(audio_locator)}", re.S)

    def _single_token_id(self, name: str, token: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(
                f"{NAME}: {name} {token!r} must be one token of the tokenizer, but it tokenizes to "
                f"{len(ids)} token(s) {pieces}"
            )
        return ids[0]

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    # ------------------------------------------------------------------ construction and saving

    @classmethod
    def from_config(
        cls,
        config: Any,
        tokenizer: PreTrainedTokenizerBase | None = None,
        feature_extractor: WhisperFeatureExtractor | None = None,
    ) -> DeSTA25Processor:
        """The processor of a `DeSTA25Config`: the tokenizer of `config.llm_model_id` and the
        feature extractor of `config.encoder_model_id` (unless given), with the config's
        `audio_locator`, `placeholder_token` and K = `orca_global_num_tokens`."""
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(config.llm_model_id)
        if feature_extractor is None:
            feature_extractor = WhisperFeatureExtractor.from_pretrained(config.encoder_model_id)
        return cls(
            tokenizer,
            feature_extractor,
            num_audio_tokens=config.orca_global_num_tokens,
            placeholder_token=config.placeholder_token,
            audio_locator=config.audio_locator,
        )

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Saves the tokenizer, the feature extractor and `desta25_processor.json` (locator,
        placeholder, K) in `directory`; returns its path."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.feature_extractor.save_pretrained(directory)
        fields = {
            "audio_locator": self.audio_locator,
            "placeholder_token": self.placeholder_token,
            "num_audio_tokens": self.num_audio_tokens,
        }
        with open(os.path.join(directory, PROCESSOR_FILE), "w", encoding="utf-8") as file:
            json.dump(fields, file, indent=2)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> DeSTA25Processor:
        """A processor saved by `save_pretrained` (a local directory)."""
        directory = os.fspath(directory)
        path = os.path.join(directory, PROCESSOR_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{NAME}: '{directory}' has no {PROCESSOR_FILE}; save it with save_pretrained")
        with open(path, encoding="utf-8") as file:
            fields = json.load(file)
        return cls(
            AutoTokenizer.from_pretrained(directory), WhisperFeatureExtractor.from_pretrained(directory), **fields
        )

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, config: Any = None) -> DeSTA25Processor:
        """The processor of a model checkpoint: the one saved beside it (a trainer saves it), else
        the one of its config (`config`, or the directory's own config.json when None)."""
        if os.path.isfile(os.path.join(directory, PROCESSOR_FILE)):
            return cls.from_pretrained(directory)
        if config is None:
            from orca_model.config import DeSTA25Config

            config = DeSTA25Config.from_pretrained(directory)
        return cls.from_config(config)

    # ------------------------------------------------------------------ audio

    def load_audio(self, path: str | os.PathLike) -> np.ndarray:
        """An audio file (wav, flac, ogg, ... as libsndfile decodes) -> float32 [samples] at 16 kHz,
        the channels averaged. FileNotFoundError for a missing file, ValueError for one that cannot
        be decoded or holds no samples."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{NAME}: audio file '{path}' does not exist")
        try:
            samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
        except (RuntimeError, TypeError) as error:  # libsndfile's errors are RuntimeErrors
            reason = getattr(error, "error_string", None) or str(error)
            raise ValueError(f"{NAME}: audio file '{path}' cannot be decoded: {reason}") from error
        if samples.shape[0] == 0:
            raise ValueError(f"{NAME}: audio file '{path}' holds no samples")
        mono = samples.mean(axis=1, dtype=np.float32)
        if rate != self.sampling_rate:
            common = math.gcd(rate, self.sampling_rate)
            mono = resample_poly(mono, self.sampling_rate // common, rate // common).astype(np.float32, copy=False)
        return mono

    def features(self, waveforms: Sequence[np.ndarray]) -> torch.Tensor:
        """16 kHz waveforms (N arrays [samples]) -> fp32 Whisper features [N, n_mels, frames]."""
        if len(waveforms) == 0:
            raise ValueError(f"{NAME}: features needs at least one waveform")
        for index, wave in enumerate(waveforms):
            if np.ndim(wave) != 1:
                raise ValueError(f"{NAME}: waveforms[{index}] must be 1-D [samples], got shape {np.shape(wave)}")
        extracted = self.feature_extractor(list(waveforms), sampling_rate=self.sampling_rate, return_tensors="pt")
        return extracted.input_features.float()

    # ------------------------------------------------------------------ text

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        system_prompt: str | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """Chat messages ({"role", "content", ...}) -> the templated prompt text. `system_prompt`
        is prepended as a system message unless the messages start with one. Only role and
        content reach the template (an "audios" entry is the caller's)."""
        turns = [{"role": message["role"], "content": message["content"]} for message in messages]
        if system_prompt and (not turns or turns[0]["role"] != "system"):
            turns.insert(0, {"role": "system", "content": system_prompt})
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)

    def count_audio_markers(self, text: str) -> int:
        """Audio markers in `text`: locators and <start_audio>…<end_audio> blocks (a locator inside
        a block is part of that block)."""
        return sum(1 for _ in self._marker.finditer(text))

    def conversation_audios(self, messages: Any, where: str, *, waveforms: bool = False) -> list[ChatAudio]:
        """Checks one conversation of the reference's chat format and returns its audios, message
        by message, each message's in marker order.

        A conversation is a non-empty list of messages {"role": str, "content": str, "audios":
        list}. The content holds one audio marker (`count_audio_markers`: a locator or a
        `<start_audio>…<end_audio>` block) per entry of "audios"; a missing, null or empty
        "audios" is no audio. An entry is {"audio": path, "text": optional transcription} or the
        path alone (a non-empty string or path-like). With `waveforms` (serving) an entry may
        also carry "waveform": its decoded audio, a non-empty, finite, 1-D floating numpy array
        of 16 kHz mono samples, returned as float32. Without, that key is ignored as any other
        (a JSON manifest cannot hold decoded audio).

        Anything else raises ValueError "{where}: <problem>", the problem naming the message (its
        index, role and content), the entry and the field, with the marker and audio counts for
        a mismatch. `where` places the conversation for the reader (a manifest line, the
        conversation of a batch).
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(f"{where}: the messages must be a non-empty list of message dicts, got {messages!r:.80}")
        audios: list[ChatAudio] = []
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(
                    f"{where}: message {index} must be a dict, got {type(message).__name__}: {message!r:.80}"
                )
            name = f"{where}: {_describe_message(index, message)}"
            for field in ("role", "content"):
                if not isinstance(message.get(field), str):
                    raise ValueError(f"{name}: {field!r} must be a string, got {type(message.get(field)).__name__}")
            entries = message.get("audios") or ()
            if not isinstance(entries, (list, tuple)):
                raise ValueError(f"{name}: 'audios' must be a list, got {type(entries).__name__}")
            markers = self.count_audio_markers(message["content"])
            if markers != len(entries):
                raise ValueError(
                    f"{name} has {_plural(markers, 'audio marker')} in its content ({self.audio_locator} locators "
                    f"or {AUDIO_START}…{AUDIO_END} blocks) but {_plural(len(entries), 'audio')} in its 'audios' "
                    "list: give one audio per marker"
                )
            for position, entry in enumerate(entries):
                audios.append(_chat_audio(entry, f"{name}: audios[{position}]", waveforms))
        return audios

    def transcription_ids(self, text: str) -> torch.Tensor:
        """A transcription -> LongTensor [1, L] of its token ids (no special tokens); "" gives [1, 0]."""
        return torch.tensor([self.tokenizer.encode(text, add_special_tokens=False)], dtype=torch.long)

    def expand_prompt(
        self, text: str, transcription_lengths: Sequence[int], audio_tags: bool = False
    ) -> tuple[list[int], list[int]]:
        """Templated text with one marker per audio -> (token ids, start position of each audio).

        Marker i becomes K + transcription_lengths[i] placeholder ids; the text around the
        markers is encoded without special tokens (the chat template writes them as text). With
        `audio_tags` the placeholders sit between `<start_audio>` and `<end_audio>`, encoded as
        text with their neighbours: the reference's `generate` wraps each locator so before
        expanding it (training prompts have no tags).
        """
        matches = list(self._marker.finditer(text))
        if len(matches) != len(transcription_lengths):
            raise ValueError(
                f"{NAME}: the prompt has {len(matches)} audio markers ({self.audio_locator} locators or "
                f"{AUDIO_START}…{AUDIO_END} blocks) but {len(transcription_lengths)} audios"
            )
        opening, closing = (AUDIO_START, AUDIO_END) if audio_tags else ("", "")
        ids: list[int] = []
        starts: list[int] = []
        end, before = 0, ""
        for index, (match, length) in enumerate(zip(matches, transcription_lengths, strict=True)):
            if isinstance(length, bool) or not isinstance(length, int) or length < 0:
                raise ValueError(f"{NAME}: transcription_lengths[{index}] must be an int >= 0, got {length!r}")
            ids += self._encode_text(before + text[end : match.start()] + opening)
            starts.append(len(ids))
            ids += [self.placeholder_id] * (self.num_audio_tokens + length)
            end, before = match.end(), closing
        ids += self._encode_text(before + text[end:])
        return ids, starts

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def prompt_inputs(
        self, texts: Sequence[str], transcriptions: Sequence[Sequence[str]], audio_tags: bool = False
    ) -> dict[str, Any]:
        """Generation inputs of B templated prompts: `transcriptions[b]` holds the transcription
        ("" for none) of each audio of prompt b, in marker order; `audio_tags` as in
        `expand_prompt`.

        Returns input_ids [B, T] and attention_mask [B, T] (left padding), batch_transcription_ids
        (N LongTensors [1, L_i], prompt by prompt) and batch_start_positions (N (row, start) pairs,
        the padding counted), as `DeSTA25AudioModel.generate` takes them with `batch_features`.
        """
        if len(texts) != len(transcriptions):
            raise ValueError(f"{NAME}: {len(texts)} prompts but transcriptions for {len(transcriptions)}")
        rows: list[list[int]] = []
        transcription_ids: list[torch.Tensor] = []
        starts: list[list[int]] = []
        for text, texts_of_prompt in zip(texts, transcriptions, strict=True):
            ids_of_prompt = [self.transcription_ids(transcription) for transcription in texts_of_prompt]
            ids, starts_of_prompt = self.expand_prompt(text, [ids.size(1) for ids in ids_of_prompt], audio_tags)
            rows.append(ids)
            starts.append(starts_of_prompt)
            transcription_ids += ids_of_prompt
        input_ids, attention_mask, positions = pad_prompts(rows, starts, self.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "batch_transcription_ids": transcription_ids,
            "batch_start_positions": positions,
        }
