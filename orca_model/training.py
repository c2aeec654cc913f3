"""Training with the Hugging Face Trainer: `DeSTA25Trainer` and the reference's training arguments.

The reference's trainer adds the ORCA losses to the LM loss only when the output still carries
them as an attribute, which accelerate's fp32 output wrapper and DDP drop: it trains on the LM
loss alone without saying so (docs/reference-behaviour.md#silent-orca-losses). Here the losses are
output fields, and a missing field is an error, never a silent LM-only run.

Logging: each term (the LM loss and every ORCA loss) is summed on the device at every step and
averaged over the steps since the last log when the Trainer logs (`logging_steps`), reduced over
the processes: one host read per log, none per step (the reference calls `.item()` per term per
step).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from orca_model.liger import apply_liger_kernel_to_llm
from orca_model.losses import total_training_loss
from orca_model.modeling import DeSTA25AudioModel

# The logged terms, in a fixed order so that every process reduces the same vector even when a
# term is missing on some of them (the alignment loss exists only for audios with a transcription).
LOGGED_TERMS = ("lm_loss", "L_ortho_diversity", "L_ortho_qformer_local", "L_align_layerwise")


@dataclass
class DeSTA25TrainingArguments(TrainingArguments):
    """`TrainingArguments` with the reference's defaults: Adafactor, lr 1e-4, 5000 warm-up steps,
    weight decay 0.01, bf16 mixed precision, gradient clipping at 1.0, the batch size halved on
    out-of-memory (`auto_find_batch_size`). Two differ on purpose: the collator's batch keys are
    kept (`remove_unused_columns=False`, the model takes them all), and DDP does not search for
    unused parameters (every trainable parameter gets a gradient from the default losses; the
    reference sets it True, which costs a graph traversal per step)."""

    optim: str = field(default="adafactor", metadata={"help": "The optimizer (the reference's: adafactor)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "The peak learning rate."})
    warmup_steps: float = field(default=5000, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.01, metadata={"help": "Weight decay."})
    bf16: bool = field(default=True, metadata={"help": "bf16 mixed precision (autocast)."})
    auto_find_batch_size: bool = field(default=True, metadata={"help": "Halve the batch size on OOM."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep every collator key."})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "DDP's search for parameters without gradient (not needed here)."}
    )


class _TermAverages:
    """Per-term sums on the device and step counts on the host since the last log."""

    def __init__(self):
        self.sums: torch.Tensor | None = None
        self.counts = [0] * len(LOGGED_TERMS)

    def add(self, terms: Mapping[str, torch.Tensor]) -> None:
        present = [name for name in LOGGED_TERMS if name in terms]
        if not present:
            return
        values = torch.stack([terms[name].detach().float() for name in present])
        if self.sums is None:
            self.sums = values.new_zeros(len(LOGGED_TERMS))
        index = [LOGGED_TERMS.index(name) for name in present]
        self.sums[index] += values
        for i in index:
            self.counts[i] += 1

    def pop(self, reduce_sum) -> dict[str, float]:
        """Mean of each term over the steps of every process (terms no process saw are left out)."""
        if self.sums is None:
            return {}
        counts = torch.tensor(self.counts, dtype=self.sums.dtype, device=self.sums.device)
        totals = reduce_sum(torch.cat([self.sums, counts]))
        sums, counts = totals.split(len(LOGGED_TERMS))
        sums, counts = sums.tolist(), counts.tolist()
        self.sums, self.counts = None, [0] * len(LOGGED_TERMS)
        return {name: s / c for name, s, c in zip(LOGGED_TERMS, sums, counts, strict=True) if c > 0}


class _DropMessage(logging.Filter):
    """Drops the records that start with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# What the Trainer logs in `train()` when `use_liger_kernel` meets a model that is not a
# PreTrainedModel: not true of a DeSTA25AudioModel, whose LLM DeSTA25Trainer has patched.
_NOT_PRETRAINED = _DropMessage("The model is not an instance of PreTrainedModel. No liger kernels")


def _unwrapped(model):
    """The model inside DDP's or torch.compile's wrapper (FSDP2 shards in place)."""
    for attribute in ("module", "_orig_mod"):
        model = getattr(model, attribute, model)
    return model


class DeSTA25Trainer(Trainer):
    """A `transformers.Trainer` for `DeSTA25AudioModel`: the loss is the LM loss plus every
    weighted ORCA loss (`orca_model.total_training_loss`), each term logged at the logging cadence
    (`lm_loss`, `L_ortho_diversity`, ...; with an `eval_` prefix in evaluation). Saving writes the
    reference's checkpoint layout (config.json + the trainable weights in model.safetensors), which
    `DeSTA25AudioModel.from_pretrained` loads. Works unchanged under `torchrun` / `accelerate
    launch` (DDP, FSDP through accelerate) and with `gradient_checkpointing=True`.

    `use_liger_kernel=True` puts Liger's RMSNorm, SwiGLU and RoPE into the model's LLM instance
    (`orca_model.liger.apply_liger_kernel_to_llm`; `liger_kernel_config` may switch each off),
    when the Trainer is built and on each `model_init` model; the Trainer itself would patch
    nothing, the model not being a PreTrainedModel. The LM loss stays the model's
    (`use_fused_orca`: without logits).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._terms = {"train": _TermAverages(), "eval": _TermAverages()}
        if self.args.use_liger_kernel and self.model is not None:
            self._apply_liger_kernel(self.model)

    def _apply_liger_kernel(self, model) -> None:
        model = _unwrapped(model)
        if not isinstance(model, DeSTA25AudioModel):
            return  # the Trainer's own `apply_liger_kernel` handles a PreTrainedModel in `train()`
        apply_liger_kernel_to_llm(model.llm_model, **(self.args.liger_kernel_config or {}))

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        if self.args.use_liger_kernel:
            self._apply_liger_kernel(model)
        return model

    def train(self, *args, **kwargs):
        with self._liger_warning_dropped():
            return super().train(*args, **kwargs)

    @contextmanager
    def _liger_warning_dropped(self):
        if not (self.args.use_liger_kernel and isinstance(_unwrapped(self.model), DeSTA25AudioModel)):
            yield
            return
        liger_logger = logging.getLogger("transformers.integrations.liger")
        liger_logger.addFilter(_NOT_PRETRAINED)
        try:
            yield
        finally:
            liger_logger.removeFilter(_NOT_PRETRAINED)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        orca_losses = outputs.get("orca_losses") if isinstance(outputs, Mapping) else None
        if orca_losses is None:
            raise RuntimeError(
                f"DeSTA25Trainer: the model's output ({type(outputs).__name__}) has no orca_losses field; a wrapper "
                "dropped it, and training would silently run on the LM loss alone"
            )
        loss = total_training_loss(outputs)
        self._terms["train" if model.training else "eval"].add({"lm_loss": outputs.loss, **orca_losses})
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs.update(self._terms["train"].pop(self._reduce_sum))
        elif "eval_loss" in logs:
            logs.update({f"eval_{k}": v for k, v in self._terms["eval"].pop(self._reduce_sum).items()})
        super().log(logs, *args, **kwargs)

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum") if self.accelerator.num_processes > 1 else tensor

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, DeSTA25AudioModel):
            super()._save(output_dir, state_dict)
            return
        model.save_pretrained(output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
