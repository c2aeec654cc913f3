"""An offline tiny tokenizer with a Qwen-like chat template, and a WAV writer, for the data
pipeline tests (tests/test_data_pipeline.py).

The tokenizer is character-level: every character of CHARACTERS is one token, and the special
tokens of SPECIAL_TOKENS are single tokens, so its vocabulary (84 entries) fits the tiny test
LLM's (benchmarks/model_configs.py TINY_VOCAB = 96). Its ids line up with the tiny LLM config:
<|endoftext|> = 0 (its pad id), <|im_start|> = 1 (bos), <|im_end|> = 2 (eos). Character
tokens make tokenization concatenative: tokenizing a + b gives tokens(a) + tokens(b) whenever
neither splits a special token, which is what makes the reference's joint tokenization
comparable to the processor's piecewise one.
"""

from __future__ import annotations

import os

import numpy as np
import soundfile
from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PLACEHOLDER = "<|video_pad|>"
LOCATOR = "<|AUDIO|>"
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    PLACEHOLDER,
    LOCATOR,
    "<start_audio>",
    "<end_audio>",
    "<unk>",
)
CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,?!'-:;\"()/"
# Qwen's template, reduced to plain string contents and no tools.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tiny_tokenizer(with_locator: bool = True, pad_token: str | None = None) -> PreTrainedTokenizerFast:
    """The tiny tokenizer: EOS <|im_end|>, no pad token unless `pad_token` is given (the
    processor then pads with EOS, as the reference does). `with_locator=False` leaves <|AUDIO|>
    out of the vocabulary (it tokenizes to <unk>s and characters), for the processor to add it."""
    specials = [token for token in SPECIAL_TOKENS if with_locator or token != LOCATOR]
    vocab = {token: index for index, token in enumerate(specials + list(CHARACTERS))}
    # A BPE model without merges splits its input into characters; with no pre-tokenizer the
    # whitespace stays, and the Fuse decoder joins the characters back without separators.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token=pad_token,
        chat_template=CHAT_TEMPLATE,
    )


def save_tiny_tokenizer(directory: str | os.PathLike) -> str:
    """Saves the tiny tokenizer in `directory` (AutoTokenizer.from_pretrained loads it); returns its path."""
    directory = os.fspath(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    return directory


def write_wav(
    path: str | os.PathLike,
    seconds: float,
    rate: int = 16000,
    channels: int = 1,
    kind: str = "tone",
    seed: int = 0,
    subtype: str = "PCM_16",
) -> np.ndarray:
    """Writes a WAV file (`subtype` "PCM_16" or "FLOAT") of `kind`: a 440 Hz tone (channel c at
    amplitude 0.5 / (c + 1)), uniform noise in [-0.5, 0.5) or silence. Returns the float32
    samples [frames, channels] it encoded (PCM_16 stores them quantized to 16 bits)."""
    frames = int(round(seconds * rate))
    time = np.arange(frames, dtype=np.float64) / rate
    if kind == "tone":
        samples = np.stack([0.5 / (c + 1) * np.sin(2 * np.pi * 440.0 * time) for c in range(channels)], axis=1)
    elif kind == "noise":
        samples = np.random.default_rng(seed).uniform(-0.5, 0.5, size=(frames, channels))
    elif kind == "silence":
        samples = np.zeros((frames, channels))
    else:
        raise ValueError(f"write_wav: kind must be 'tone', 'noise' or 'silence', got {kind!r}")
    samples = samples.astype(np.float32)
    soundfile.write(os.fspath(path), samples, rate, subtype=subtype)
    return samples
