"""Shared test setup: NaN-poisoned op outputs, seeding, devices."""

from __future__ import annotations

import os

# Every output buffer an op allocates starts as NaN, so an element no kernel writes fails the
# comparison (orca_kernels._utils.new_output and the C++ glue read this at call time).
os.environ["ORCA_KERNELS_POISON_OUTPUTS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from orca_kernels._utils import triton_interpret  # noqa: E402

if triton_interpret():
    import interpreter_speedup  # noqa: E402

    interpreter_speedup.install()

# Under pytest-xdist (the README's `-n 2`) every worker is a process of its own: one intra-op
# thread each keeps the workers from competing for the same cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

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


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Tiny random Whisper, Qwen3 and Llama checkpoints (tiny_models.py), saved once per module."""
    from tiny_models import save_checkpoints  # transformers and orca_model: only where used

    return save_checkpoints(str(tmp_path_factory.mktemp("tiny")))


# Hypothesis profiles, chosen by ORCA_HYPOTHESIS_PROFILE. "ci" (the default) is derandomized: the
# same examples on every run, so a red CI means a change broke something, not that a new example
# turned up. "nightly" draws fresh examples, 20x as many (the test files scale their counts by
# max_examples / 100), and prints the blob that replays a failure. Neither keeps an example
# database (no .hypothesis/ in the tree) or a deadline (the Triton interpreter is slow), and the
# "explain" phase is off (it reruns a failing example dozens of times).
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

_HYPOTHESIS_COMMON = {
    "deadline": None,
    "print_blob": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much],
    "phases": [Phase.explicit, Phase.generate, Phase.shrink],
}
settings.register_profile("ci", max_examples=100, derandomize=True, **_HYPOTHESIS_COMMON)
settings.register_profile("nightly", max_examples=2000, **_HYPOTHESIS_COMMON)
settings.load_profile(os.environ.get("ORCA_HYPOTHESIS_PROFILE", "ci"))
