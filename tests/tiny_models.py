"""Tiny random Whisper / Qwen3 / Llama checkpoints saved to a directory, loaded back through
`from_pretrained` by the model, and synthetic DeSTA2.5 batches for them (orca_model tests). The
configs are benchmarks/model_configs.py's tiny ones."""

from __future__ import annotations

import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM, WhisperForConditionalGeneration

from benchmarks import model_configs
from orca_model import DeSTA25AudioModel, DeSTA25Config

VOCAB = model_configs.TINY_VOCAB
HIDDEN = model_configs.TINY_HIDDEN
ROPE_THETA = {"qwen3": model_configs.QWEN3_ROPE_THETA, "llama": model_configs.LLAMA3_ROPE_THETA}
MEL_BINS = model_configs.TINY_MEL_BINS
FRAMES = model_configs.TINY_FRAMES
NUM_GLOBAL_TOKENS = model_configs.TINY_GLOBAL_TOKENS


whisper_config = model_configs.tiny_whisper


def llm_config(kind: str, num_layers: int = 2) -> Qwen3Config | LlamaConfig:
    """The tiny "qwen3" or "llama" config."""
    return {"qwen3": model_configs.tiny_qwen3, "llama": model_configs.tiny_llama}[kind](num_layers)


def save_whisper(directory: str) -> str:
    path = os.path.join(directory, "whisper")
    WhisperForConditionalGeneration(whisper_config()).save_pretrained(path)
    return path


def save_llm(directory: str, kind: str) -> str:
    path = os.path.join(directory, kind)
    model_class = Qwen3ForCausalLM if kind == "qwen3" else LlamaForCausalLM
    model_class(llm_config(kind)).save_pretrained(path)
    return path


def save_checkpoints(directory: str) -> dict[str, str]:
    """The tiny Whisper, Qwen3 and Llama checkpoints saved under `directory`: name -> path (the
    `checkpoints` fixture of tests/conftest.py). Their weights come from seed 0 whatever ran
    before (a module-scoped fixture is built before the per-test seed), so a test sees the same
    model alone and in the whole suite; the global random state is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return {
            "whisper": save_whisper(directory),
            "qwen3": save_llm(directory, "qwen3"),
            "llama": save_llm(directory, "llama"),
        }


def desta_config(llm_path: str, whisper_path: str, **overrides) -> DeSTA25Config:
    """An ORCAHybrid config as the reference's YAMLs set it (global tokens in the memory, deep
    injection), at tiny sizes, fp32 LLM, 1 Q-Former layer."""
    return DeSTA25Config(
        **model_configs.tiny_desta_fields(llm_model_id=llm_path, encoder_model_id=whisper_path, **overrides)
    )


def build(checkpoints: dict[str, str], kind: str = "qwen3", **overrides) -> DeSTA25AudioModel:
    """A model on the saved tiny Whisper and the `kind` LLM, its config's fields overridden."""
    return DeSTA25AudioModel(desta_config(checkpoints[kind], checkpoints["whisper"], **overrides))


def to_device(batch: dict, device: torch.device | str) -> dict:
    """A batch of `make_batch` with its tensors (the transcription ids included) on `device`."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            moved[key] = value.to(device)
        elif key == "batch_transcription_ids":
            moved[key] = [ids.to(device) for ids in value]
        else:
            moved[key] = value
    return moved


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


# Encoder frames of the audio-file tests: Whisper's hop of 160 samples over a 1 s window gives
# 100 mel frames, which a Whisper with 50 positions takes.
AUDIO_FRAMES = 50


def save_audio_checkpoints(directory: str) -> dict[str, str]:
    """Checkpoints for the audio-file paths (manifests, the trainer, serving): a tiny Whisper with
    AUDIO_FRAMES positions and its feature extractor (1 s windows, 16 mel bins), and the tiny Qwen3
    with the tiny character tokenizer (tests/tiny_tokenizer.py) saved beside it, so that a
    DeSTA25Config pointing at them builds the model and the processor offline. Seeded like
    `save_checkpoints`."""
    from transformers import WhisperFeatureExtractor

    from tiny_tokenizer import save_tiny_tokenizer

    with torch.random.fork_rng():
        torch.manual_seed(0)
        whisper = os.path.join(directory, "whisper-audio")
        WhisperForConditionalGeneration(whisper_config(frames=AUDIO_FRAMES)).save_pretrained(whisper)
        WhisperFeatureExtractor(feature_size=MEL_BINS, chunk_length=1).save_pretrained(whisper)
        llm = save_llm(directory, "qwen3")
        save_tiny_tokenizer(llm)
    return {"whisper": whisper, "qwen3": llm}


def audio_desta_config(checkpoints: dict[str, str], **overrides) -> DeSTA25Config:
    """`desta_config` on the audio checkpoints with the tiny tokenizer's placeholder token."""
    from tiny_tokenizer import PLACEHOLDER

    return desta_config(checkpoints["qwen3"], checkpoints["whisper"], placeholder_token=PLACEHOLDER, **overrides)


# Serving (tests/test_orca_model_serving.py). Whisper's ASR needs what whisper-large-v3 ships and
# a random Whisper lacks: a generation config (decoder start, language and task tokens, the
# no-timestamps token) and a tokenizer. The tiny one has whisper_config's 64 ids: pad 0, decoder
# start 1, EOS 2, then characters, then the language / task / no-timestamps tokens last, so that no
# id falls in Whisper's timestamp range (ids above the no-timestamps token).
WHISPER_SPECIAL_TOKENS = ("<|pad|>", "<|startoftranscript|>", "<|endoftext|>")
WHISPER_CHARACTERS = "abcdefghijklmnopqrstuvwxyz 0123456789.,?!'-ABCDEFGHIJKLM"  # all in the tiny LLM tokenizer
WHISPER_TASK_TOKENS = ("<|en|>", "<|de|>", "<|translate|>", "<|transcribe|>", "<|notimestamps|>")
# The serving models' weight scales. At the default 0.02 a random tiny LLM answers one token over
# and over whatever the prompt, and a random Whisper's encoder output is its positional embedding
# whatever the audio; at these scales the greedy answers (and Whisper's transcriptions) depend on
# the prompt and on the audio.
SERVING_INIT_STD = 0.2  # the LLMs
SERVING_WHISPER_INIT_STD = 0.3


def save_whisper_asr_files(path: str) -> str:
    """Writes the tiny Whisper's generation config and tokenizer into `path` (a Whisper checkpoint
    of whisper_config's vocabulary), so that WhisperForConditionalGeneration.generate runs there as
    on whisper-large-v3 (language detection, transcribe, no timestamps) and its ids decode. The
    special ids are suppressed: a random decoder would otherwise emit them and decode to ""."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    tokens = list(WHISPER_SPECIAL_TOKENS) + list(WHISPER_CHARACTERS) + list(WHISPER_TASK_TOKENS)
    config = whisper_config()
    assert len(tokens) == config.vocab_size, (len(tokens), config.vocab_size)
    ids = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=ids, merges=[], unk_token="<|endoftext|>"))
    backend.decoder = decoders.Fuse()
    specials = list(WHISPER_SPECIAL_TOKENS) + list(WHISPER_TASK_TOKENS)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|startoftranscript|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    ).save_pretrained(path)
    special_ids = [ids[token] for token in specials if token != "<|endoftext|>"]
    GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        is_multilingual=True,
        lang_to_id={token: ids[token] for token in WHISPER_TASK_TOKENS[:2]},
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        begin_suppress_tokens=[config.eos_token_id],
        suppress_tokens=special_ids,
    ).save_pretrained(path)
    return path


def save_serving_checkpoints(directory: str, kinds: tuple[str, ...] = ("qwen3", "llama")) -> dict[str, str]:
    """Checkpoints for serving: save_audio_checkpoints' tiny Whisper (AUDIO_FRAMES positions, its
    feature extractor) with weights at SERVING_WHISPER_INIT_STD and the ASR files of
    `save_whisper_asr_files`, and one tiny LLM per kind with weights at SERVING_INIT_STD and the
    tiny tokenizer beside it; keys "whisper" and each kind (`serving_desta_config` takes them).
    Seeded like `save_checkpoints`."""
    from transformers import WhisperFeatureExtractor

    from tiny_tokenizer import save_tiny_tokenizer

    with torch.random.fork_rng():
        torch.manual_seed(0)
        whisper = os.path.join(directory, "whisper-asr")
        config = whisper_config(frames=AUDIO_FRAMES)
        config.init_std = SERVING_WHISPER_INIT_STD
        WhisperForConditionalGeneration(config).save_pretrained(whisper)
        WhisperFeatureExtractor(feature_size=MEL_BINS, chunk_length=1).save_pretrained(whisper)
        result = {"whisper": save_whisper_asr_files(whisper)}
        for kind in kinds:
            config = llm_config(kind)
            config.initializer_range = SERVING_INIT_STD
            path = os.path.join(directory, f"{kind}-serving")
            (Qwen3ForCausalLM if kind == "qwen3" else LlamaForCausalLM)(config).save_pretrained(path)
            result[kind] = save_tiny_tokenizer(path)
    return result


def serving_desta_config(checkpoints: dict[str, str], kind: str = "qwen3", **overrides) -> DeSTA25Config:
    """`audio_desta_config` on the serving checkpoints, with the `kind` LLM."""
    from tiny_tokenizer import PLACEHOLDER

    return desta_config(checkpoints[kind], checkpoints["whisper"], placeholder_token=PLACEHOLDER, **overrides)
