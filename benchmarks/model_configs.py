"""Hugging Face configs of the models ORCA-DeSTA trains on, written inline (no hub access), and
tiny ones for the quick CPU workload. Shared by the decoder-layer and end-to-end suites; the tiny
ones are also the tests' (tests/tiny_models.py) and examples/train_tiny.py's models.

The real ones copy the published config.json of Qwen/Qwen3-0.6B, Qwen/Qwen3-4B,
meta-llama/Llama-3.1-8B(-Instruct) and openai/whisper-large-v3; `num_layers` lets a benchmark
build fewer decoder layers at the real width (its shape label must say so).
"""

from __future__ import annotations

from transformers import LlamaConfig, Qwen3Config, WhisperConfig

# SDPA, as from_pretrained picks by default; a bare decoder layer would otherwise get eager attention.
ATTENTION = "sdpa"
QWEN3_ROPE_THETA = 1e6
LLAMA3_ROPE_THETA = 5e5

TINY_HIDDEN = 64  # 4 attention heads of 16
TINY_VOCAB = 96
TINY_MEL_BINS = 16
TINY_FRAMES = 16  # encoder frames: the mel features have 2 * TINY_FRAMES frames
TINY_GLOBAL_TOKENS = 4


def tiny_desta_fields(**overrides) -> dict:
    """DeSTA25Config fields of a tiny ORCAHybrid model, as the reference's YAMLs set them (global
    tokens in the memory, deep injection): 1 Q-Former layer, fp32 LLM; pass the checkpoint paths
    (llm_model_id, encoder_model_id) and anything else as overrides."""
    return (
        dict(
            connector_mode="orca_hybrid",
            orca_enabled=True,
            orca_global_cross_attn=True,
            qformer_num_hidden_layers=1,
            orca_global_num_tokens=TINY_GLOBAL_TOKENS,
            llm_dtype="float32",
        )
        | overrides
    )


def _qwen3(hidden: int, intermediate: int, heads: int, num_layers: int) -> Qwen3Config:
    """Qwen3's published config at one size (the two sizes differ in these fields only)."""
    return Qwen3Config(
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
        rope_parameters={"rope_type": "default", "rope_theta": QWEN3_ROPE_THETA},
        attn_implementation=ATTENTION,
    )


def qwen3_0_6b(num_layers: int = 28) -> Qwen3Config:
    return _qwen3(hidden=1024, intermediate=3072, heads=16, num_layers=num_layers)


def qwen3_4b(num_layers: int = 36) -> Qwen3Config:
    return _qwen3(hidden=2560, intermediate=9728, heads=32, num_layers=num_layers)


def llama3_1_8b(num_layers: int = 32) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": LLAMA3_ROPE_THETA,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        attn_implementation=ATTENTION,
    )


def whisper_large_v3() -> WhisperConfig:
    return WhisperConfig(
        vocab_size=51866,
        num_mel_bins=128,
        d_model=1280,
        encoder_layers=32,
        encoder_attention_heads=20,
        encoder_ffn_dim=5120,
        decoder_layers=32,
        decoder_attention_heads=20,
        decoder_ffn_dim=5120,
        max_source_positions=1500,
        max_target_positions=448,
        pad_token_id=50256,
        bos_token_id=50257,
        eos_token_id=50257,
        decoder_start_token_id=50258,
        attn_implementation=ATTENTION,
    )


def _tiny_llm_fields(num_layers: int, vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation=ATTENTION,
    )


def tiny_qwen3(num_layers: int = 2, vocab_size: int = TINY_VOCAB) -> Qwen3Config:
    """Hidden 64, 4 heads of 16 (2 KV heads), θ as Qwen3's."""
    return Qwen3Config(
        head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": QWEN3_ROPE_THETA},
        **_tiny_llm_fields(num_layers, vocab_size),
    )


def tiny_llama(num_layers: int = 2, vocab_size: int = TINY_VOCAB) -> LlamaConfig:
    """`tiny_qwen3`'s sizes as a Llama (head dim 64 / 4 = 16), θ as Llama 3's without its scaling."""
    return LlamaConfig(
        rope_parameters={"rope_type": "default", "rope_theta": LLAMA3_ROPE_THETA},
        **_tiny_llm_fields(num_layers, vocab_size),
    )


def tiny_whisper(encoder_layers: int = 4, frames: int = TINY_FRAMES) -> WhisperConfig:
    """`encoder_layers` encoder layers of width 32, 16 mel bins, `frames` encoder frames (2 * frames mel frames)."""
    return WhisperConfig(
        vocab_size=64,
        num_mel_bins=TINY_MEL_BINS,
        d_model=32,
        encoder_layers=encoder_layers,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        max_source_positions=frames,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        attn_implementation=ATTENTION,
    )
