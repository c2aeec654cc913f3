"""orca_model: the DeSTA2.5 / ORCA model around orca_kernels, with the drop-in
`use_fused_orca` flag (config, connector, gated cross-attention, injection, losses, generation)."""

from orca_model.cross_attention import OrcaGatedCrossAttention

__all__ = ["OrcaGatedCrossAttention"]
