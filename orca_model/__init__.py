"""orca_model: the DeSTA2.5 / ORCA model around orca_kernels, with the drop-in
`use_fused_orca` flag (config, connector, gated cross-attention, injection, losses, generation)."""

from orca_model.config import DeSTA25Config, rope_theta_from_config
from orca_model.connector import ORCAHybridConnector
from orca_model.cross_attention import OrcaGatedCrossAttention
from orca_model.injection import DeepInjection, InjectionContext, decoder_layers
from orca_model.losses import DeSTA25Output, compute_orca_losses, total_training_loss
from orca_model.modeling import DeSTA25AudioModel

__all__ = [
    "DeSTA25AudioModel",
    "DeSTA25Config",
    "DeSTA25Output",
    "DeepInjection",
    "InjectionContext",
    "ORCAHybridConnector",
    "OrcaGatedCrossAttention",
    "compute_orca_losses",
    "decoder_layers",
    "rope_theta_from_config",
    "total_training_loss",
]
