"""Shared test setup: NaN-poisoned op outputs, seeding, devices."""

from __future__ import annotations

import os

# Every output buffer an op allocates starts as NaN, so an element no kernel writes fails the
# comparison (orca_kernels._utils.new_output and the C++ glue read this at call time).
os.environ["ORCA_KERNELS_POISON_OUTPUTS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from orca_kernels._utils import triton_interpret  # noqa: E402

# Compiled-extension and reference tests run on the CPU and, where present, on CUDA.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Triton kernels run on CPU tensors through the interpreter (CI) and natively on CUDA (a GPU
# machine runs the suite without TRITON_INTERPRET); never both in one process.
TRITON_DEVICES = ["cpu"] if triton_interpret() else (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(params=TRITON_DEVICES)
def triton_device(request) -> torch.device:
    """Where the Triton kernels can run in this process."""
    return torch.device(request.param)
