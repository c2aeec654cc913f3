"""orca-kernels: fused kernels for ORCA-DeSTA audio-language models.

Functional ops (differentiable, each with a `backend=` argument) and the pure-PyTorch oracle
`orca_kernels.reference`, which is also the CPU path where no compiled kernel exists.
"""

from orca_kernels import reference
from orca_kernels.conv_downsample import strided_conv1d

__all__ = ["reference", "strided_conv1d"]
__version__ = "0.1.0"
