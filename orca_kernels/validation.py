"""Argument validation shared by the orca_kernels ops and the orca_model modules.

Every check runs before any work and raises with a message of one form,
`"{op}: {name} must be ..., got ..."`, where `op` is the public op or module that was called and
`name` the argument as its caller spells it (`"batch_start_positions[1] start"`). What they
guarantee:

- A value of the wrong type gives `TypeError`, naming the type received (`got float`); a value
  of the right type but out of range, or a tensor of the wrong rank, dtype or device, gives
  `ValueError`, naming the value, shape, dtype or device received.
- bool is not an int, an index or a real number (Python makes it a subclass of int), and a
  flag must be a bool, not 0/1 or a string.
- An int argument of an op (a schema `int`, which is int64) is a Python `int` no larger than
  2**63 - 1: a larger one is refused here instead of overflowing in the dispatcher.
- A floating tensor is fp16, bf16, fp32 or fp64; paired with another tensor, it has that
  tensor's dtype and device. An integer tensor has an integer dtype (not bool, floating or
  complex).
- The audio RoPE's position scale and θ are real numbers, finite and > 0.
"""

from __future__ import annotations

import math
import numbers

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT64_MAX = 2**63 - 1


def check_backend(op: str, backend: str, allowed: tuple[str, ...], name: str = "backend") -> None:
    """One of the backend names `allowed` (the argument is called `name`)."""
    if not isinstance(backend, str) or backend not in allowed:
        raise ValueError(f"{op}: {name} must be one of {', '.join(map(repr, allowed))}, got {backend!r}")


def check_bool(op: str, name: str, value) -> None:
    """A bool flag: True or False, not an int or a string that reads like one."""
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")


def check_int(op: str, name: str, value, minimum: int) -> None:
    """An int (not bool) in [minimum, 2**63 - 1]: what the ops' int64 schema arguments hold."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    if value > INT64_MAX:
        raise ValueError(f"{op}: {name} must be at most 2**63 - 1 (a 64-bit int), got {value}")


def check_index(op: str, name: str, value) -> int:
    """An integer index given in Python, as an int: an int or another integral number (numpy's
    integers), not bool. Its range depends on what it indexes; the caller checks it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    return int(value)


def check_finite_real(op: str, name: str, value) -> None:
    """A real number (not bool) that is finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")


def check_rope_arguments(op: str, position_scale, rope_theta, *, scale_name: str = "position_scale") -> None:
    """The audio RoPE's position_scale and rope_theta: real numbers (not bool), finite and > 0.
    A scale of 0 divides the positions by zero and θ <= 0 gives NaN frequencies: NaN everywhere
    downstream, silently. Every backend of every op that takes them calls this one check;
    `scale_name` is the caller's name for the scale (the module's `audio_position_scale`)."""
    for name, value in ((scale_name, position_scale), ("rope_theta", rope_theta)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{op}: {name} must be a real number (finite and > 0), got {type(value).__name__}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{op}: {name} must be finite and > 0, got {value}")


def check_is_tensor(op: str, name: str, value) -> None:
    """A torch.Tensor, of any rank and dtype."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def check_rank(op: str, name: str, value, ndim: int, *, layout: str | None = None) -> None:
    """A torch.Tensor of rank `ndim`, of any dtype. `layout` names its dimensions in the
    message (`"[B, T, H]"`)."""
    check_is_tensor(op, name, value)
    if value.dim() != ndim:
        expected = f"be {layout} ({ndim} dimensions)" if layout is not None else f"have {ndim} dimensions"
        raise ValueError(f"{op}: {name} must {expected}, got shape {tuple(value.shape)}")


def check_tensor(op: str, name: str, value, ndim: int, *, like: torch.Tensor | None = None) -> None:
    """A floating tensor of rank `ndim`, with the dtype and device of `like` when given."""
    check_rank(op, name, value, ndim)
    if value.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: {name} has dtype {value.dtype}; supported: float16, bfloat16, float32, float64")
    if like is not None and value.dtype != like.dtype:
        raise ValueError(f"{op}: {name} has dtype {value.dtype} but expected {like.dtype}")
    if like is not None and value.device != like.device:
        raise ValueError(f"{op}: {name} is on {value.device} but expected {like.device}")


def check_int_tensor(op: str, name: str, value, ndim: int, *, holding: str = "integers") -> None:
    """A tensor of rank `ndim` with an integer dtype (not bool, floating or complex). `holding`
    says in the message what its integers are (`"integer token ids"`)."""
    check_rank(op, name, value, ndim)
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise ValueError(f"{op}: {name} must hold {holding}, got dtype {value.dtype}")


def check_key_padding_mask(op: str, mask, batch: int, length: int, like: torch.Tensor) -> None:
    """None, or a bool [batch, length] tensor (True = ignore that key) on like's device."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: key_padding_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{op}: key_padding_mask must have dtype torch.bool (True = ignore), got {mask.dtype}")
    if tuple(mask.shape) != (batch, length):
        expected = (batch, length)
        raise ValueError(f"{op}: key_padding_mask has shape {tuple(mask.shape)} but expected [B, T_a] = {expected}")
    if mask.device != like.device:
        raise ValueError(f"{op}: key_padding_mask is on {mask.device} but expected {like.device}")
