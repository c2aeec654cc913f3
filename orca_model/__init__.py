"""orca_model: the DeSTA2.5 / ORCA model around orca_kernels, with the drop-in
`use_fused_orca` flag (config, connector, gated cross-attention, injection, losses, generation),
and the paths around it: the processor (audio files and prompts), the manifest dataset and
collator, the Hugging Face Trainer (`DeSTA25Trainer`), and serving from audio files
(`DeSTA25AudioModel.generate(messages)`, `EnergyVAD`, `GenerationOutput`)."""

from importlib import import_module

from orca_model.config import DeSTA25Config, rope_theta_from_config
from orca_model.connector import ORCAHybridConnector
from orca_model.cross_attention import OrcaGatedCrossAttention
from orca_model.injection import DeepInjection, InjectionContext, decoder_layers
from orca_model.losses import DeSTA25Output, compute_orca_losses, total_training_loss
from orca_model.modeling import DeSTA25AudioModel, register_chat_pipeline

# What `DeSTA25AudioModel.generate(messages)` runs: the serving pipeline, imported on first use.
# The model core only defines the `ChatPipeline` protocol; the package wires it here, so that
# `orca_model.serving` depends on `orca_model.modeling` and never the other way round.
register_chat_pipeline(lambda: import_module("orca_model.serving").PIPELINE)

# Imported on first use: they need the `train` extra (soundfile, scipy, accelerate), which the
# model and the kernels do not.
_LAZY = {
    "DeSTA25Processor": "orca_model.processing",
    "ManifestDataset": "orca_model.data",
    "DeSTA25Collator": "orca_model.data",
    "DeSTA25Trainer": "orca_model.training",
    "DeSTA25TrainingArguments": "orca_model.training",
    "EnergyVAD": "orca_model.serving",
    "GenerationOutput": "orca_model.serving",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'orca_model' has no attribute {name!r}")


__all__ = [
    "DeSTA25AudioModel",
    "DeSTA25Collator",
    "DeSTA25Config",
    "DeSTA25Output",
    "DeSTA25Processor",
    "DeSTA25Trainer",
    "DeSTA25TrainingArguments",
    "DeepInjection",
    "EnergyVAD",
    "GenerationOutput",
    "InjectionContext",
    "ManifestDataset",
    "ORCAHybridConnector",
    "OrcaGatedCrossAttention",
    "compute_orca_losses",
    "decoder_layers",
    "rope_theta_from_config",
    "total_training_loss",
]
