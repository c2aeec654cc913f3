"""Tiny random Whisper / Qwen3 / Llama checkpoints saved to a directory, loaded back through
`from_pretrained` by the model, and synthetic DeSTA2.5 batches for them (orca_model tests)."""

from __future__ import annotations

import os

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from orca_model import DeSTA25Config

VOCAB = 96
HIDDEN = 64  # LLM width: 4 cross-attention heads of 16
ROPE_THETA = {"qwen3": 1e6, "llama": 5e5}
MEL_BINS = 16
FRAMES = 16  # encoder frames; the features have 2 * FRAMES mel frames
NUM_GLOBAL_TOKENS = 4


def whisper_config(encoder_layers: int = 4, frames: int = FRAMES) -> WhisperConfig:
    return WhisperConfig(
        d_model=32, encoder_layers=encoder_layers, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=MEL_BINS,
        max_source_positions=frames, max_target_positions=16, vocab_size=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1,
    )


def llm_config(kind: str, num_layers: int = 2) -> Qwen3Config | LlamaConfig:
    common = dict(
        hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=num_layers,
        intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "qwen3":
        return Qwen3Config(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA[kind]}, **common)
    return LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA[kind]}, **common)


def save_whisper(directory: str) -> str:
    path = os.path.join(directory, "whisper")
    WhisperForConditionalGeneration(whisper_config()).save_pretrained(path)
    return path


def save_llm(directory: str, kind: str) -> str:
    path = os.path.join(directory, kind)
    model_class = Qwen3ForCausalLM if kind == "qwen3" else LlamaForCausalLM
    model_class(llm_config(kind)).save_pretrained(path)
    return path


def desta_config(llm_path: str, whisper_path: str, **overrides) -> DeSTA25Config:
    """An ORCAHybrid config as the reference's YAMLs set it (global tokens in the memory, deep
    injection), at tiny sizes, fp32 LLM, 1 Q-Former layer."""
    fields = dict(
        llm_model_id=llm_path, encoder_model_id=whisper_path, connector_mode="orca_hybrid", orca_enabled=True,
        orca_global_cross_attn=True, qformer_num_hidden_layers=1, orca_global_num_tokens=NUM_GLOBAL_TOKENS,
        llm_dtype="float32",
    )
    fields.update(overrides)
    return DeSTA25Config(**fields)


def make_batch(
    batch_size: int = 2,
    length: int = 12,
    transcription_lengths: tuple[int, ...] | None = None,
    seed: int = 0,
    padded: bool = True,
) -> dict:
    """Prompts with one audio each at (row, 2 + padding), row r left-padded by r tokens (none
    unless `padded`); transcription i has transcription_lengths[i] random tokens (default: none,
    as in training)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = transcription_lengths or (0,) * batch_size
    input_ids = torch.randint(3, VOCAB, (batch_size, length), generator=generator)
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    starts = []
    for row in range(batch_size):
        padding = row if padded else 0
        input_ids[row, :padding] = 0
        attention_mask[row, :padding] = 0
        starts.append((row, padding + 2))
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        # Large features: in a random Whisper the positional embedding would drown small ones.
        "batch_features": 100 * torch.randn(batch_size, MEL_BINS, 2 * FRAMES, generator=generator),
        "batch_transcription_ids": [torch.randint(3, VOCAB, (1, n), generator=generator) for n in lengths],
        "batch_start_positions": starts,
        "labels": labels,
    }
