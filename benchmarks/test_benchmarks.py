"""pytest-benchmark view of the suite, for tracking runs over time (not part of the test command):

    python -m pytest benchmarks/test_benchmarks.py --benchmark-autosave
    python -m pytest benchmarks/test_benchmarks.py --benchmark-compare

Each case of `benchmarks.run.SUITES` (the quick workload on the CPU, the model shapes on a GPU)
and each of its providers is one benchmark of forward+backward (forward only for decode steps).
A provider this device skips by default (`Provider.skip_here`) and one whose backend refuses the
inputs (SDPA forced to a kernel that does not take them) are skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness import Refused, forward_backward, synchronize
from benchmarks.run import SUITES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = DEVICE.type == "cpu"
CASES = [case for suite in SUITES.values() for case in suite.cases(DEVICE, QUICK)]
PARAMS = [
    pytest.param(case, provider, id=f"{case.op}-{case.shape}-{provider.name}".replace(" ", "_"))
    for case in CASES
    for provider in case.providers
]


@pytest.mark.parametrize("case,provider", PARAMS)
def test_provider(benchmark, case, provider):
    if provider.skip_here:
        pytest.skip(provider.skip_here)
    inputs = case.make_inputs()
    grad_out = None
    try:
        with torch.no_grad():
            out = provider.fn(*inputs)
    except RuntimeError as error:
        if provider.may_refuse or isinstance(error, Refused):
            pytest.skip(f"{provider.name} refuses these inputs: {error}")
        raise
    if case.backward:
        grad_out = torch.randn_like(out)

    def step():
        forward_backward(provider.fn, inputs, grad_out, case.parameters)
        synchronize(DEVICE)

    benchmark.extra_info.update(op=case.op, shape=case.shape, dtype=str(case.dtype), device=str(DEVICE))
    benchmark(step)
