"""Train a tiny ORCA-DeSTA model on synthetic data on the CPU (well under a minute).

A random Whisper encoder and a random Qwen3 LLM are saved to a temporary directory and loaded
back through `from_pretrained`, exactly as real checkpoints are. The connector and the gated
cross-attention modules train on LM loss + the ORCA losses; each step prints them all.

    python examples/train_tiny.py
    python examples/train_tiny.py --use-fused-orca              # the fused kernels
    TRITON_INTERPRET=1 python examples/train_tiny.py --use-fused-orca --steps 5   # Triton on the CPU (slow)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen3ForCausalLM, WhisperForConditionalGeneration
from transformers.utils import logging as hf_logging

from orca_model import DeSTA25AudioModel, DeSTA25Config, total_training_loss

# The tiny configs' one home is benchmarks/model_configs.py, which is not installed: this script
# runs from a checkout, so its root is put on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import model_configs  # noqa: E402

# Twice the tests' encoder frames and a larger vocabulary than theirs.
VOCAB, MEL_BINS, FRAMES = 128, model_configs.TINY_MEL_BINS, 32
NUM_GLOBAL_TOKENS = model_configs.TINY_GLOBAL_TOKENS


def save_tiny_checkpoints(directory: str) -> tuple[str, str]:
    """Random tiny Whisper (4 encoder layers, d_model 32) and Qwen3 (2 layers, hidden 64)."""
    whisper_path, llm_path = f"{directory}/whisper", f"{directory}/qwen3"
    WhisperForConditionalGeneration(model_configs.tiny_whisper(frames=FRAMES)).save_pretrained(whisper_path)
    Qwen3ForCausalLM(model_configs.tiny_qwen3(vocab_size=VOCAB)).save_pretrained(llm_path)
    return whisper_path, llm_path


def synthetic_batch(batch_size: int, generator: torch.Generator) -> dict:
    """Prompt = 2 text tokens, K audio placeholders, 2 text tokens; response = 3 tokens that
    depend on the audio (its class), labelled; the rest is -100, as in DeSTA2.5 training."""
    classes = torch.arange(batch_size) % 2
    prompt_length, response_length = 2 + NUM_GLOBAL_TOKENS + 2, 3
    input_ids = torch.randint(3, VOCAB, (batch_size, prompt_length + response_length), generator=generator)
    responses = torch.tensor([[10, 11, 12], [20, 21, 22]])[classes]
    input_ids[:, prompt_length:] = responses
    labels = torch.full_like(input_ids, -100)
    labels[:, prompt_length:] = responses
    # Two audio classes: different frequency patterns (scaled up: a random Whisper's positional
    # embedding drowns small inputs).
    time_axis = torch.arange(2 * FRAMES, dtype=torch.float)
    patterns = torch.stack([torch.sin(time_axis / 3), torch.sign(torch.sin(time_axis / 7))])
    noise = torch.randn(batch_size, MEL_BINS, 2 * FRAMES, generator=generator)
    features = 100 * (patterns[classes, None, :] + 0.1 * noise)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "batch_features": features,
        "batch_transcription_ids": [torch.zeros(1, 0, dtype=torch.long)] * batch_size,  # "" as in training
        "batch_start_positions": [(row, 2) for row in range(batch_size)],
        "labels": labels,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--use-fused-orca", action="store_true", help="run the fused kernels")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    start = time.time()
    with tempfile.TemporaryDirectory() as directory:
        whisper_path, llm_path = save_tiny_checkpoints(directory)
        config = DeSTA25Config(
            **model_configs.tiny_desta_fields(llm_model_id=llm_path, encoder_model_id=whisper_path),
            orca_ortho_diversity_weight=0.05,
            orca_ortho_weight_qformer_local=0.05,
            orca_align_weight_local=0.05,
            use_fused_orca=args.use_fused_orca,
        )
        model = DeSTA25AudioModel(config).train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    print(f"use_fused_orca={args.use_fused_orca}: {sum(p.numel() for p in parameters):,} trainable parameters")
    optimizer = torch.optim.AdamW(parameters, lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    batch = synthetic_batch(args.batch_size, generator)
    for step in range(1, args.steps + 1):
        outputs = model(**batch)
        loss = total_training_loss(outputs)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        orca = "  ".join(f"{name} {value.item():.4f}" for name, value in outputs.orca_losses.items())
        print(f"step {step:3d}  lm {outputs.loss.item():.4f}  {orca}  total {loss.item():.4f}")
    print(f"done in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
