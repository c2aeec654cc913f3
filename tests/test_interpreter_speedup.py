"""The test-time interpreter speed-up (tests/interpreter_speedup.py) is active where the suite
interprets kernels, patches triton.language once per launch, and leaves it unpatched after."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from orca_kernels._utils import triton_interpret

pytestmark = pytest.mark.skipif(not triton_interpret(), reason="only the interpreter re-patches per helper call")


@triton.jit
def _doubled(x):
    return x * 2


@triton.jit
def _helpers_in_a_loop_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    value = tl.load(x_ptr + offsets)
    for _ in range(0, 3):
        # tl.sum is itself a helper (triton.language.standard) that sees triton.language.core.
        value = _doubled(value) + 0 * tl.sum(value, 0)
    tl.store(out_ptr + offsets, value)


def test_one_patch_per_launch_and_helpers_still_work():
    import interpreter_speedup

    x = torch.arange(8, dtype=torch.float32)
    out = torch.full_like(x, float("nan"))
    before = interpreter_speedup.scans()
    _helpers_in_a_loop_kernel[(2,)](x, out, BLOCK=8)  # two programs, six helper calls each
    # The launch's own patch, and triton.language.core's at the first tl.sum: 2 scans, not 14.
    assert interpreter_speedup.scans() - before == 2
    torch.testing.assert_close(out, x * 8, rtol=0, atol=0)
    # The launch restored triton.language: its builtins are the compiler's again.
    assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.arange)
