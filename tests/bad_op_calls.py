"""Bad-input calls of the registered strided-conv ops and the RuntimeError text each must raise.

The ops (`torch.ops.orca_kernels.strided_conv1d*`) can be called without the Python wrapper, so
they check their inputs too. One home for the calls, run as a script:

    python tests/bad_op_calls.py

by tests/test_strided_conv.py (in a child process: a crash fails that test naming the call) and by
benchmarks/gpu_check.sh (under cuda-gdb, for a native backtrace, when that test died on a signal).
Each call is announced on stdout ("calling <call>") before it runs. Every call runs even after one
raised the wrong error or none (a later one may be the crash); the script then fails listing them,
and otherwise ends printing "all raised".
"""

from __future__ import annotations

import re

import torch

import orca_kernels  # noqa: F401  (registers torch.ops.orca_kernels)

# x [2, 37, 6]: stride * C_in is a 32-bit int (at most 2**31 - 1), 37 + 2 * padding a 64-bit one.
STRIDE_LIMIT_MESSAGE = (
    "strided_conv1d: stride must be at most 357913941 for C_in = 6 (stride * C_in, the row step of the "
    "compiled kernels' GEMMs, must fit in 32 bits: at most 2**31 - 1), got 1099511627776"
)
PADDING_LIMIT_MESSAGE = (
    "strided_conv1d: padding must be at most 4611686018427387885 for T = 37 (T + 2 * padding must fit in "
    "64 bits: at most 2**63 - 1), got 4611686018427387904"
)

# Each call, evaluated with `ops`, `x`, `weight` and `bias` of run_bad_op_calls, and its message.
BAD_OP_CALLS = [
    ("ops.strided_conv1d(x[0], weight, bias, 4, 2)", "x must have 3 dimensions"),
    ("ops.strided_conv1d(x, torch.randn(5, 7, 5), bias, 4, 2)", "weight has 7 input channels"),
    ("ops.strided_conv1d(x, weight, bias.double(), 4, 2)", "bias has dtype"),
    ("ops.strided_conv1d(x, weight, bias, 0, 2)", "stride must be >= 1"),
    ("ops.strided_conv1d(x, weight, bias, 4, -2)", "padding must be >= 0"),
    ("ops.strided_conv1d(x[:, :2], weight, bias, 4, 1)", "too short for one window"),
    ("ops.strided_conv1d(x.int(), weight.int(), None, 4, 2)", "unsupported dtype"),
    ("ops.strided_conv1d_grad_input(torch.randn(2, 9, 5), weight, 37, 4, 2)", "grad_out has shape"),
    ("ops.strided_conv1d_grad_weight(torch.randn(3, 10, 5), x, 5, 4, 2)", "grad_out has shape"),
    ("ops.strided_conv1d_grad_input(torch.randn(2, 9, 5), weight, -1, 4, 2)", "input_length must be >= 0, got -1"),
    # The geometry rules of orca_kernels/strided_conv.py's _check_inputs, in the same words.
    (
        "ops.strided_conv1d(x, weight[:, :, :0], bias, 4, 2)",
        re.escape("strided_conv1d: weight kernel size must be >= 1, got 0"),
    ),
    ("ops.strided_conv1d_grad_weight(torch.randn(2, 10, 5), x, 0, 4, 2)", "weight kernel size must be >= 1, got 0"),
    *[
        (call, re.escape(STRIDE_LIMIT_MESSAGE))
        for call in (
            "ops.strided_conv1d(x, weight, bias, 2**40, 2**40)",
            "ops.strided_conv1d_grad_input(torch.randn(2, 3, 5), weight, 37, 2**40, 2**40)",
            "ops.strided_conv1d_grad_weight(torch.randn(2, 3, 5), x, 5, 2**40, 2**40)",
        )
    ],
    ("ops.strided_conv1d(x, weight, bias, 2**40, 2**62)", re.escape(PADDING_LIMIT_MESSAGE)),
]


def run_bad_op_calls() -> None:
    """Make every call in BAD_OP_CALLS; AssertionError naming those that did not raise their error."""
    names = {
        "torch": torch,
        "ops": torch.ops.orca_kernels,
        "x": torch.randn(2, 37, 6),
        "weight": torch.randn(5, 6, 5),
        "bias": torch.randn(5),
    }
    wrong = []
    for call, message in BAD_OP_CALLS:
        print("calling", call, flush=True)
        try:
            eval(call, names)
        except RuntimeError as error:
            if not re.search(message, str(error)):
                wrong.append(f"{call}: raised {str(error)!r}, expected {message!r}")
        else:
            wrong.append(f"{call}: no error")
    assert not wrong, "\n".join(wrong)
    print("all raised", flush=True)


if __name__ == "__main__":
    run_bad_op_calls()
