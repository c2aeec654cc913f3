"""DeSTA25Trainer and `python -m orca_model.train` on a manifest of generated audio files (tiny
models, the CPU): accelerate's bf16 wrapper, the ORCA losses in the optimised loss and in the
logs, checkpoints in the reference's layout."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from child_process import child_environment
from orca_model import DeSTA25AudioModel, DeSTA25Config
from orca_model.data import DeSTA25Collator, ManifestDataset
from orca_model.processing import DeSTA25Processor
from orca_model.train import main as train_main
from orca_model.training import LOGGED_TERMS, DeSTA25Trainer, DeSTA25TrainingArguments
from tiny_models import audio_desta_config, save_audio_checkpoints
from tiny_tokenizer import write_wav

ORCA_TERMS = LOGGED_TERMS[1:]


@pytest.fixture(scope="module")
def run_files(tmp_path_factory) -> dict[str, str]:
    """Tiny checkpoints, a config JSON pointing at them, wav files of two kinds (tones, noise) and
    lengths 0.3-1.2 s, and a manifest mixing the reference's prompt-only records with message
    records that carry a transcription (so the per-layer alignment loss is on)."""
    root = tmp_path_factory.mktemp("trainer")
    checkpoints = save_audio_checkpoints(str(root))
    config = str(root / "config.json")
    audio_desta_config(
        checkpoints,
        orca_ortho_diversity_weight=0.05,
        orca_ortho_weight_qformer_local=0.05,
        orca_align_weight_local=0.05,
    ).to_json_file(config)
    audio = root / "audio"
    audio.mkdir()
    records = []
    for index in range(4):
        kind = ("tone", "noise")[index % 2]
        write_wav(audio / f"{index}.wav", seconds=0.3 + 0.3 * index, kind=kind, seed=index)
        answer = {"tone": "a tone.", "noise": "noise."}[kind]
        if index < 2:
            records.append({"id": f"{index}.wav", "prompt": "what is it?", "response": answer})
        else:
            message = {"role": "user", "content": "what is it? <|AUDIO|>", "audios": [{"audio": f"{index}.wav"}]}
            message["audios"][0]["text"] = "hi"
            records.append({"messages": [message], "response": answer})
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(record) + "\n" for record in records))
    return {"config": config, "manifest": str(manifest), "data_root": str(audio), "root": str(root)}


def training_arguments(output_dir: str, **overrides) -> DeSTA25TrainingArguments:
    """A short CPU run that learns fast: every step sees the whole (4-record) manifest."""
    settings = dict(
        output_dir=output_dir,
        max_steps=6,
        per_device_train_batch_size=4,
        optim="adamw_torch",
        learning_rate=3e-3,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),  # a GPU machine trains on CUDA, the fused kernels native
        auto_find_batch_size=False,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return DeSTA25TrainingArguments(**settings)


def test_reference_defaults():
    args = DeSTA25TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])
    assert (args.optim, args.learning_rate, args.warmup_steps, args.weight_decay) == ("adafactor", 1e-4, 5000, 0.01)
    assert (args.bf16, args.max_grad_norm, args.auto_find_batch_size) == (True, 1.0, True)
    assert not args.remove_unused_columns


# The fused run takes 2 steps (6 steps of the Triton interpreter under bf16 cost minutes): it
# checks the logs and the loss's composition; the unfused run also checks that the loss falls.
@pytest.mark.parametrize(("use_fused_orca", "steps"), [(False, 6), (True, 2)], ids=["unfused", "fused"])
def test_trainer_under_bf16_logs_every_loss_and_learns(run_files, tmp_path, use_fused_orca, steps):
    config = DeSTA25Config.from_json_file(run_files["config"])
    config.use_fused_orca = use_fused_orca
    model = DeSTA25AudioModel(config)
    processor = DeSTA25Processor.from_config(config)
    dataset = ManifestDataset(run_files["manifest"], processor, data_root=run_files["data_root"])
    trainer = DeSTA25Trainer(
        model=model,
        args=training_arguments(str(tmp_path / "run"), bf16=True, max_steps=steps),
        train_dataset=dataset,
        data_collator=DeSTA25Collator(processor),
        processing_class=processor,
    )
    trainer.train()

    # accelerate's mixed-precision wrapper (autocast + fp32 outputs) was on the model's forward:
    # the wrapper that drops the reference's losses.
    assert trainer.accelerator.mixed_precision == "bf16"
    assert hasattr(trainer.model, "_original_forward")
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == steps
    for entry in logs:
        assert set(ORCA_TERMS) <= entry.keys(), entry
        # The optimised (logged) loss is the LM loss plus every ORCA loss; the Trainer rounds the
        # loss to 4 decimals.
        total = entry["lm_loss"] + sum(entry[name] for name in ORCA_TERMS)
        assert math.isclose(entry["loss"], total, abs_tol=2e-4), entry
        assert all(entry[name] > 0 for name in ORCA_TERMS)
    if steps >= 6:
        # Only the connector and the cross-attention train, against a random frozen LLM: the loss
        # falls slowly, but it falls.
        assert logs[-1]["loss"] < logs[0]["loss"] - 0.1

    trainer.save_model(str(tmp_path / "saved"))
    saved = sorted(os.listdir(tmp_path / "saved"))
    assert {"config.json", "model.safetensors", "desta25_processor.json"} <= set(saved)
    loaded = DeSTA25AudioModel.from_pretrained(tmp_path / "saved")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert DeSTA25Processor.from_pretrained(tmp_path / "saved").num_audio_tokens == config.orca_global_num_tokens


def test_trainer_refuses_an_output_without_orca_losses(run_files, tmp_path):
    """A wrapper that dropped the losses is an error, never an LM-only run (the reference's bug)."""

    class LosesTheField(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(()))

        def forward(self, **inputs):
            return CausalLMOutputWithPast(loss=self.weight * 2)

    trainer = DeSTA25Trainer(model=LosesTheField(), args=training_arguments(str(tmp_path), bf16=False))
    with pytest.raises(RuntimeError, match="no orca_losses"):
        trainer.compute_loss(trainer.model, {})


def command_arguments(run_files: dict[str, str], manifest: str, output, *options: str) -> list[str]:
    """`python -m orca_model.train` arguments for a 2-step run on the reference ops on the CPU,
    then `options`."""
    return [
        "--config", run_files["config"],
        "--train_manifest", manifest,
        "--data_root", run_files["data_root"],
        "--output_dir", str(output),
        "--use_fused_orca", "False",
        "--max_steps", "2",
        "--per_device_train_batch_size", "2",
        "--use_cpu", "True",
        "--bf16", "False",
        "--report_to", "none",
        *options,
    ]  # fmt: skip


def test_train_command(run_files, tmp_path, caplog):
    """`python -m orca_model.train` end to end (in process): 2 steps on the reference ops, a
    checkpoint that loads back, and a record whose audio file is missing skipped and reported."""
    output = tmp_path / "out"
    manifest = tmp_path / "with_a_missing_file.jsonl"
    missing = json.dumps({"id": "missing.wav", "prompt": "what is it?", "response": "gone."})
    manifest.write_text(missing + "\n" + Path(run_files["manifest"]).read_text())
    train_main(command_arguments(run_files, str(manifest), output, "--save_strategy", "no", "--disable_tqdm", "True"))
    model = DeSTA25AudioModel.from_pretrained(output)
    assert not model.config.use_fused_orca
    assert "missing.wav" in caplog.text  # the skip, as it happened
    assert "unreadable audio files were skipped" in caplog.text  # and the total at the end
    assert {"config.json", "model.safetensors", "training_args.bin"} <= set(os.listdir(output))


def test_train_command_under_torchrun(run_files, tmp_path):
    """The same command under `torchrun` with 2 processes (gloo on the CPU): DDP through the
    Trainer. 4 records, 2 per process: one step per epoch, so step 2 ends epoch 2 (a single
    process would be at epoch 1)."""
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        "-m", "orca_model.train",
        *command_arguments(run_files, run_files["manifest"], output),
        "--save_strategy", "steps",
        "--save_steps", "2",
        "--logging_steps", "1",
        "--ddp_timeout", "120",
    ]  # fmt: skip
    environment = child_environment(TRITON_INTERPRET="0")  # the reference ops: nothing to interpret
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun did not finish in 300 s:\n{error.stderr}")
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((output / "checkpoint-2" / "trainer_state.json").read_text())
    logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["epoch"] for entry in logs] == [1.0, 2.0]
    assert all(set(ORCA_TERMS[:2]) <= entry.keys() for entry in logs)
    DeSTA25AudioModel.from_pretrained(output)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("command", ["orca_model.train", "orca_model.generate"])
def test_commands_have_help(command, capsys):
    module = __import__(command, fromlist=["main"])
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
