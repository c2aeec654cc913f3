"""orca-kernels: fused kernels for ORCA-DeSTA audio-language models.

Functional ops (differentiable, each with a `backend=` argument) and the pure-PyTorch oracle
`orca_kernels.reference`, which is also the CPU path where no compiled kernel exists.
"""

from importlib import metadata as _metadata

from orca_kernels import flop_counts as _flop_counts  # noqa: F401  (registers the custom ops' FLOP formulas)
from orca_kernels import reference
from orca_kernels._utils import kernels_available
from orca_kernels.cross_attention import attend_audio_kv, gated_cross_attention, project_audio_kv
from orca_kernels.flash_attention import flash_cross_attention
from orca_kernels.local_fold import FoldedWeightCache, fold_pays, fold_projection, local_branch
from orca_kernels.ortho_loss import ortho_cross_loss, ortho_diversity_loss, ortho_losses
from orca_kernels.rope import audio_rope
from orca_kernels.strided_conv import strided_conv1d

__all__ = [
    "reference",
    "strided_conv1d",
    "local_branch",
    "fold_projection",
    "fold_pays",
    "FoldedWeightCache",
    "ortho_diversity_loss",
    "ortho_cross_loss",
    "ortho_losses",
    "audio_rope",
    "flash_cross_attention",
    "gated_cross_attention",
    "project_audio_kv",
    "attend_audio_kv",
    "kernels_available",
]
try:  # the version has one home, pyproject.toml; an uninstalled source tree has none
    __version__ = _metadata.version("orca-kernels")
except _metadata.PackageNotFoundError:
    __version__ = "0+unknown"
