"""orca_kernels.validation, the one home of the argument checks: every error names the op and the
argument, a type error names the type received, bools are not ints, indices or real numbers, and
ints beyond 64 bits are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orca_kernels import validation as v

OP = "some_op"


@pytest.mark.parametrize(
    "check, error, message",
    [
        (lambda: v.check_bool(OP, "flag", 1), TypeError, "flag must be a bool, got int"),
        (lambda: v.check_bool(OP, "flag", "True"), TypeError, "flag must be a bool, got str"),
        (lambda: v.check_int(OP, "n", True, 1), TypeError, "n must be an int, got bool"),
        (lambda: v.check_int(OP, "n", 2.0, 1), TypeError, "n must be an int, got float"),
        (lambda: v.check_int(OP, "n", 0, 1), ValueError, "n must be >= 1, got 0"),
        (lambda: v.check_int(OP, "n", 2**63, 1), ValueError, "n must be at most 2**63 - 1 (a 64-bit int)"),
        (lambda: v.check_index(OP, "row", False), TypeError, "row must be an int, got bool"),
        (lambda: v.check_index(OP, "row", 1.0), TypeError, "row must be an int, got float"),
        (lambda: v.check_finite_real(OP, "x", True), TypeError, "x must be a real number, got bool"),
        (lambda: v.check_finite_real(OP, "x", float("inf")), ValueError, "x must be finite, got inf"),
        (lambda: v.check_rope_arguments(OP, 1.0, True), TypeError, "rope_theta must be a real number"),
        (lambda: v.check_is_tensor(OP, "t", [1]), TypeError, "t must be a torch.Tensor, got list"),
        (lambda: v.check_rank(OP, "t", torch.zeros(2), 3), ValueError, "t must have 3 dimensions, got shape (2,)"),
        (
            lambda: v.check_rank(OP, "t", torch.zeros(2), 3, layout="[B, T, H]"),
            ValueError,
            "t must be [B, T, H] (3 dimensions), got shape (2,)",
        ),
        (lambda: v.check_tensor(OP, "t", torch.zeros(2, dtype=torch.long), 1), ValueError, "t has dtype torch.int64"),
        (
            lambda: v.check_int_tensor(OP, "ids", torch.zeros(2, dtype=torch.bool), 1),
            ValueError,
            "ids must hold integers, got dtype torch.bool",
        ),
        (
            lambda: v.check_int_tensor(OP, "ids", torch.zeros(2), 1, holding="integer token ids"),
            ValueError,
            "ids must hold integer token ids, got dtype torch.float32",
        ),
        (lambda: v.check_backend(OP, "cuda", ("auto", "torch")), ValueError, "backend must be one of 'auto', 'torch'"),
    ],
)
def test_errors_name_the_op_the_argument_and_what_was_received(check, error, message):
    with pytest.raises(error) as caught:
        check()
    assert str(caught.value).startswith(f"{OP}: {message}")


def test_good_values_pass():
    v.check_bool(OP, "flag", False)
    v.check_int(OP, "n", 2**63 - 1, 1)
    assert v.check_index(OP, "row", np.int64(3)) == 3 and type(v.check_index(OP, "row", np.int64(3))) is int
    v.check_finite_real(OP, "x", -0.5)
    v.check_rope_arguments(OP, 2.5, 10000)
    v.check_tensor(OP, "t", torch.zeros(2, 3, dtype=torch.bfloat16), 2, like=torch.zeros(1, dtype=torch.bfloat16))
    v.check_int_tensor(OP, "ids", torch.zeros(2, 3, dtype=torch.int32), 2)
    v.check_key_padding_mask(OP, None, 2, 3, torch.zeros(1))
