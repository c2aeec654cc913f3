"""Shared test setup: NaN-poisoned op outputs, seeding, devices."""

from __future__ import annotations

import os

# Every output buffer an op allocates starts as NaN, so an element no kernel writes fails the
# comparison (orca_kernels._utils.new_output and the C++ glue read this at call time).
os.environ["ORCA_KERNELS_POISON_OUTPUTS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)
