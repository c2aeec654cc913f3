"""Attention-core timings measured by `python -m benchmarks.tune --dispatch` on a GPU (generated;
edit by rerunning it). `orca_kernels.dispatch` reads it: keys and the rule are described there.

Nothing has been measured with this tool yet: every training and inference call of
`backend="auto"` on CUDA takes the vendor path (SDPA), every decode step the flash-decoding kernel.
"""

TABLE_ID = "empty"

TABLE: dict[str, dict] = {}
