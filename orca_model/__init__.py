"""orca_model: the DeSTA2.5 / ORCA model around orca_kernels, with the drop-in
`use_fused_orca` flag (config, connector, gated cross-attention, injection, losses, generation).

The package is filled in by the orca_model issue; it imports today so that the layout is fixed.
"""
