"""benchmarks.module_bytes: the launch-by-launch byte count of the cross-attention layer
(docs/ops.md#bytes-moved) on fake tensors at a real training shape: every launch has a role, the
q/u backward saves what the docs say, and the counts follow the formulas they state."""

from __future__ import annotations

import pytest

from benchmarks import module_bytes
from orca_kernels import kernels_available

pytestmark = pytest.mark.skipif(
    not kernels_available("cpu"), reason="the fused path on CPU tensors: TRITON_INTERPRET=1"
)

NAME, B, TX, H, HEADS, TA = module_bytes.MODELS[0]  # Qwen3-0.6B


@pytest.fixture(scope="module")
def runs():
    return {which: module_bytes.record(B, TX, H, HEADS, TA, which=which) for which in module_bytes.VARIANTS}


def test_every_launch_has_a_role(runs):
    for launches in runs.values():
        assert all(not launch.label.startswith("?") for launch in launches), [x.label for x in launches]


def test_the_query_gate_backward_saves_two_passes_over_the_stream(runs):
    """After against before: the second dgrad GEMM accumulates into the first's output (reading
    it: one pass more) instead of writing its own, which autograd then summed (2 reads, 1 write):
    two [N, H] bf16 passes fewer, the same FLOPs."""
    bandwidth, peak = module_bytes.H200_BANDWIDTH, module_bytes.H200_BF16_PEAK
    before = module_bytes.totals(runs["before"], bandwidth, peak)
    after = module_bytes.totals(runs["after"], bandwidth, peak)
    stream = B * TX * H * 2  # one [N, H] bf16 pass
    assert before["fwd"] == after["fwd"]
    assert before["bwd"][0] - after["bwd"][0] == 2 * stream
    assert before["bwd"][1] == after["bwd"][1]  # the same FLOPs


def test_gemm_flops_and_bytes_follow_their_shapes(runs):
    """The K/V projection's forward GEMM: 2·M·N·K FLOPs, its operands read and its output written once."""
    (kv,) = [x for x in runs["after"] if x.phase == "fwd" and x.label.startswith("K/V projection")]
    rows = B * TA
    assert kv.flops == 2 * rows * H * 2 * H
    assert kv.read == 2 * (rows * H + 2 * H * H + 2 * H) and kv.write == 2 * rows * 2 * H
