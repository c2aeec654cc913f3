"""Strided Conv1d on channels-last activations (the local branch's downsampling).

`strided_conv1d(x[B, T, C_in], weight[C_out, C_in, k], bias[C_out] | None, stride, padding)`
returns `[B, T_out, C_out]`, T_out = (T + 2*padding - k) // stride + 1, with the numbers of
`F.conv1d` on `x.transpose(1, 2)`. The weight keeps nn.Conv1d's layout, so checkpoints load
unchanged. The compiled kernels (csrc/) read `x` in place: no im2col copy, no transposes.
"""

from __future__ import annotations

import torch

from orca_kernels import _extension, reference
from orca_kernels._utils import autocast_lower_precision, warn_once
from orca_kernels.validation import check_backend, check_int, check_tensor

OP = "strided_conv1d"
BACKENDS = ("auto", "extension", "cuda", "torch")


# The compiled kernels' GEMMs step stride * C_in elements from one output row to the next (their
# leading dimension, a 32-bit int in BLAS: csrc/conv1d_plan.h's max_stride), and the extension
# computes T + 2 * padding in an int64.
MAX_ROW_STEP = 2**31 - 1
MAX_LENGTH_SUM = 2**63 - 1


def max_stride(channels_in: int) -> int:
    """The largest stride the compiled kernels run for C_in = channels_in >= 1 input channels."""
    return MAX_ROW_STEP // channels_in


def max_padding(length: int) -> int:
    """The largest padding for an input of `length` rows: T + 2 * padding fits in an int64."""
    return (MAX_LENGTH_SUM - length) // 2


def _check_inputs(x, weight, bias, stride, padding) -> None:
    """The one check of every backend, before any work: what the extension computes is valid on
    all of them, with the same result; anything else is the same error on all of them.

    Valid: any B, T, C_in, C_out >= 0 with T + 2 * padding >= k >= 1 (one window at least), so
    B = 0, C_in = 0, C_out = 0 and T = 0 with enough padding (every window in the padding: the
    bias) included. A stride over `max_stride(C_in)` is refused only when some GEMM would run (B,
    C_in, C_out >= 1 and some window reads x): the result of the others needs no GEMM."""
    check_tensor(OP, "x", x, 3)
    check_tensor(OP, "weight", weight, 3, like=x)
    if weight.shape[1] != x.shape[2]:
        raise ValueError(
            f"{OP}: weight has {weight.shape[1]} input channels but x has {x.shape[2]} (x is [B, T, C_in])"
        )
    if bias is not None:
        check_tensor(OP, "bias", bias, 1, like=x)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{OP}: bias has {bias.shape[0]} elements but weight has {weight.shape[0]} output channels"
            )
    check_int(OP, "stride", stride, 1)
    check_int(OP, "padding", padding, 0)
    batch, length, channels_in = x.shape
    channels_out, _, kernel_size = weight.shape
    if kernel_size < 1:
        raise ValueError(f"{OP}: weight kernel size must be >= 1, got {kernel_size}")
    if padding > max_padding(length):
        raise ValueError(
            f"{OP}: padding must be at most {max_padding(length)} for T = {length} "
            f"(T + 2 * padding must fit in 64 bits: at most 2**63 - 1), got {padding}"
        )
    if length + 2 * padding < kernel_size:
        raise ValueError(
            f"{OP}: x has length {length}, too short for one window of kernel size {kernel_size} with padding {padding}"
        )
    first, last = reference.conv1d_rows_reading_input(length, kernel_size, stride, padding)
    runs_gemms = batch > 0 and channels_in > 0 and channels_out > 0 and first <= last
    if runs_gemms and stride > max_stride(channels_in):
        raise ValueError(
            f"{OP}: stride must be at most {max_stride(channels_in)} for C_in = {channels_in} "
            f"(stride * C_in, the row step of the compiled kernels' GEMMs, must fit in 32 bits: "
            f"at most 2**31 - 1), got {stride}"
        )


def _use_extension(x: torch.Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    if backend == "cuda" and x.device.type != "cuda":
        raise ValueError(f"{OP}: backend='cuda' needs CUDA tensors, got x on {x.device}")
    if backend in ("extension", "cuda"):
        _extension.require(x.device, OP)
        return True
    if _extension.supports(x.device):
        return True
    if _extension.LOADED:  # _C loaded but lacks this device: the import said nothing about it.
        warn_once(
            f"{OP}-{x.device.type}",
            f"{OP}: orca_kernels._C has no {x.device.type} kernels; using the PyTorch reference",
        )
    return False


def strided_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Conv1d over channels-last `x[B, T, C_in]` -> `[B, T_out, C_out]`, differentiable.

    backend: "auto" (the compiled kernel where `_C` supports the device, else the reference),
    "extension" (the compiled kernel on x's device), "cuda" (the compiled CUDA kernel) or
    "torch" (the reference: F.conv1d on transposed views). fp16/bf16 accumulate in fp32.
    Inside an autocast region it follows autocast's rule for conv1d: x, weight and bias run in
    the autocast dtype (fp64 excepted), so fp32 weights with a bf16 x work as they do in nn.Conv1d.
    """
    check_backend(OP, backend, BACKENDS)
    if isinstance(x, torch.Tensor):
        x, weight, bias = autocast_lower_precision(x, weight, bias, device_type=x.device.type)
    _check_inputs(x, weight, bias, stride, padding)
    if _use_extension(x, backend):
        return torch.ops.orca_kernels.strided_conv1d(x, weight, bias, stride, padding)
    return reference.strided_conv1d(x, weight, bias, stride, padding)


def _output_length(length_in, kernel_size: int, stride: int, padding: int):
    return (length_in + 2 * padding - kernel_size) // stride + 1


def _register_fake_and_autograd() -> None:
    ops = torch.ops.orca_kernels

    @torch.library.register_fake("orca_kernels::strided_conv1d")
    def _(x, weight, bias, stride, padding):
        length_out = _output_length(x.shape[1], weight.shape[2], stride, padding)
        return x.new_empty((x.shape[0], length_out, weight.shape[0]))

    @torch.library.register_fake("orca_kernels::strided_conv1d_grad_input")
    def _(grad_out, weight, input_length, stride, padding):
        return grad_out.new_empty((grad_out.shape[0], input_length, weight.shape[1]))

    @torch.library.register_fake("orca_kernels::strided_conv1d_grad_weight")
    def _(grad_out, x, kernel_size, stride, padding):
        return x.new_empty((grad_out.shape[2], x.shape[2], kernel_size))

    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.stride, ctx.padding = stride, padding

    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.strided_conv1d_grad_input(grad_out, weight, x.shape[1], ctx.stride, ctx.padding)
        if ctx.needs_input_grad[1]:
            grad_weight = ops.strided_conv1d_grad_weight(grad_out, x, weight.shape[2], ctx.stride, ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(dim=(0, 1))
        return grad_x, grad_weight, grad_bias, None, None

    torch.library.register_autograd("orca_kernels::strided_conv1d", backward, setup_context=setup_context)

    # Double backward: both backward ops are linear in each argument, and their own backwards are
    # the three ops again (grad_input is conv's adjoint in x, grad_weight its adjoint in weight), so
    # every order of derivative goes through the compiled kernels.
    def setup_grad_input(ctx, inputs, output):
        grad_out, weight, _, stride, padding = inputs
        ctx.save_for_backward(grad_out, weight)
        ctx.stride, ctx.padding = stride, padding

    def grad_input_backward(ctx, grad_grad_x):
        grad_out, weight = ctx.saved_tensors
        grad_grad_out = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_grad_out = ops.strided_conv1d(grad_grad_x, weight, None, ctx.stride, ctx.padding)
        if ctx.needs_input_grad[1]:
            grad_weight = ops.strided_conv1d_grad_weight(
                grad_out, grad_grad_x, weight.shape[2], ctx.stride, ctx.padding
            )
        return grad_grad_out, grad_weight, None, None, None

    def setup_grad_weight(ctx, inputs, output):
        grad_out, x, _, stride, padding = inputs
        ctx.save_for_backward(grad_out, x)
        ctx.stride, ctx.padding = stride, padding

    def grad_weight_backward(ctx, grad_grad_weight):
        grad_out, x = ctx.saved_tensors
        grad_grad_out = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_grad_out = ops.strided_conv1d(x, grad_grad_weight, None, ctx.stride, ctx.padding)
        if ctx.needs_input_grad[1]:
            grad_x = ops.strided_conv1d_grad_input(grad_out, grad_grad_weight, x.shape[1], ctx.stride, ctx.padding)
        return grad_grad_out, grad_x, None, None, None

    torch.library.register_autograd(
        "orca_kernels::strided_conv1d_grad_input", grad_input_backward, setup_context=setup_grad_input
    )
    torch.library.register_autograd(
        "orca_kernels::strided_conv1d_grad_weight", grad_weight_backward, setup_context=setup_grad_weight
    )


if _extension.LOADED:
    _register_fake_and_autograd()
