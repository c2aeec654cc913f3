"""strided_conv1d (the compiled extension) against F.conv1d on the transposed input."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import orca_kernels
from child_process import child_environment
from orca_kernels import _extension, reference, strided_conv
from tolerances import assert_matches_truth

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
WINDOWS = [(5, 4, 2), (5, 2, 2), (7, 4, 3), (3, 1, 1)]  # (kernel_size, stride, padding)
LENGTHS = [1, 4, 37, 101, 1500]
C_IN, C_OUT = 6, 5


def make_input(batch, length, channels, dtype, device, contiguous=True):
    """x [batch, length, channels]; non-contiguous = a column slice of a wider buffer."""
    if contiguous:
        return torch.randn(batch, length, channels, dtype=dtype, device=device)
    wide = torch.randn(batch, length, channels + 3, dtype=dtype, device=device)
    return wide[:, :, 2 : 2 + channels]


def conv_and_grads(conv, x, weight, bias, stride, padding, grad_out=None):
    """Output and the gradients of (x, weight, bias) for the upstream gradient grad_out."""
    leaves = [t.detach().requires_grad_() for t in (x, weight)] + (
        [bias.detach().requires_grad_()] if bias is not None else []
    )
    out = conv(leaves[0], leaves[1], leaves[2] if bias is not None else None, stride, padding)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return [out.detach(), *grads]


def half_precision_reference(x, weight, bias, stride, padding, grad_out):
    """The bar of a fp16/bf16 check: PyTorch's conv run in fp32 on the dtype's values, each result
    rounded to the dtype, which is what a half-precision conv accumulating in fp32 computes.
    Not PyTorch's bf16 conv itself: on the GPU machine's CPU (torch 2.11) it returned unwritten
    weight-gradient taps (NaN, 1e8) where a window overlaps the input with one tap only."""
    f32 = lambda t: t.float() if t is not None else None  # noqa: E731
    results = conv_and_grads(reference.strided_conv1d, f32(x), f32(weight), f32(bias), stride, padding, grad_out)
    return [r.to(x.dtype) for r in results]


def extension_conv(x, weight, bias, stride, padding):
    return orca_kernels.strided_conv1d(x, weight, bias, stride, padding, backend="extension")


CASES = [
    (window, length, batch, with_bias, contiguous)
    for window, length in itertools.product(WINDOWS, LENGTHS)
    if length + 2 * window[2] >= window[0]
    for batch, with_bias, contiguous in [(1, True, True), (3, False, True), (3, True, False), (1, False, False)]
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window,length,batch,with_bias,contiguous", CASES)
def test_matches_f_conv1d(device, dtype, window, length, batch, with_bias, contiguous):
    kernel_size, stride, padding = window
    x = make_input(batch, length, C_IN, dtype, device, contiguous)
    weight = torch.randn(C_OUT, C_IN, kernel_size, dtype=dtype, device=device)
    bias = torch.randn(C_OUT, dtype=dtype, device=device) if with_bias else None
    length_out = (length + 2 * padding - kernel_size) // stride + 1
    # The upstream gradient in the tested dtype: the truth differentiates with the same values.
    grad_out = torch.randn(batch, length_out, C_OUT, dtype=dtype, device=device).double()

    actual = conv_and_grads(extension_conv, x, weight, bias, stride, padding, grad_out)
    to64 = lambda t: t.double() if t is not None else None  # noqa: E731
    truth = conv_and_grads(reference.strided_conv1d, to64(x), to64(weight), to64(bias), stride, padding, grad_out)
    same_dtype = half_precision_reference(x, weight, bias, stride, padding, grad_out)
    names = ["output", "grad_x", "grad_weight", "grad_bias"][: len(actual)]  # no grad_bias without a bias
    for name, a, t, r in zip(names, actual, truth, same_dtype, strict=True):
        assert a.dtype == dtype
        assert_matches_truth(a, t, same_dtype_reference=r, name=name)


@settings(max_examples=40, deadline=None)
@given(
    kernel_size=st.integers(1, 9),
    stride=st.integers(1, 6),
    padding=st.integers(0, 5),
    length=st.integers(1, 40),
    batch=st.integers(1, 3),
    contiguous=st.booleans(),
)
# One output row whose window spans three stride-wide chunks: an edge frame once merged into the
# full chunk before it, a GEMM reduction longer than its leading dimension (found by this test).
@example(kernel_size=6, stride=2, padding=1, length=4, batch=1, contiguous=True)
@example(kernel_size=6, stride=3, padding=1, length=4, batch=2, contiguous=False)
def test_random_geometry_fp64(kernel_size, stride, padding, length, batch, contiguous):
    """Every (kernel, stride, padding, length) plan covers each valid (row, frame) pair once."""
    if length + 2 * padding < kernel_size:
        return
    x = make_input(batch, length, 3, torch.float64, "cpu", contiguous)
    weight = torch.randn(4, 3, kernel_size, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64)
    length_out = (length + 2 * padding - kernel_size) // stride + 1
    grad_out = torch.randn(batch, length_out, 4, dtype=torch.float64)
    actual = conv_and_grads(extension_conv, x, weight, bias, stride, padding, grad_out)
    truth = conv_and_grads(reference.strided_conv1d, x, weight, bias, stride, padding, grad_out)
    for name, a, t in zip(["output", "grad_x", "grad_weight", "grad_bias"], actual, truth, strict=True):
        assert_matches_truth(a, t, name=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_conversions_are_exact(device, dtype):
    """An identity kernel copies x: every finite fp16/bf16 value (subnormals and the largest
    included) survives the widening to fp32 exactly. (inf would meet 0·inf = NaN in the sum.)"""
    info = torch.finfo(dtype)
    special = [
        0.0,
        info.tiny,
        info.tiny / 8,
        -info.tiny / 4,
        info.smallest_normal * 1.5,
        info.max,
        -info.max,
        1.0,
        -2.5,
    ]
    x = torch.cat([torch.tensor(special), torch.randn(23)]).to(dtype).reshape(1, 8, 4).to(device)
    weight = torch.eye(4, dtype=dtype, device=device).unsqueeze(-1)
    out = orca_kernels.strided_conv1d(x, weight, None, 1, 0, backend="extension")
    assert torch.equal(out, x)


def test_gradcheck_fp64():
    x = make_input(2, 11, 3, torch.float64, "cpu", contiguous=False).requires_grad_()
    weight = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w, b: extension_conv(a, w, b, 4, 2), (x, weight, bias))
    assert torch.autograd.gradcheck(lambda a, w: extension_conv(a, w, None, 2, 3), (x, weight))


def test_expanded_and_transposed_gradients(device):
    """Gradients that arrive expanded (from .sum()) or with a transposed layout are handled."""
    x = torch.randn(2, 21, 3, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(4, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
    extension_conv(x, weight, None, 4, 2).sum().backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    reference.strided_conv1d(x_ref, w_ref, None, 4, 2).sum().backward()
    assert_matches_truth(x.grad, x_ref.grad, name="grad_x")
    assert_matches_truth(weight.grad, w_ref.grad, name="grad_weight")

    grad_t = torch.randn(2, 4, 6, dtype=torch.float64, device=device).transpose(1, 2)  # [2, 6, 4], strided
    got = torch.autograd.grad(extension_conv(x, weight, None, 4, 2), (x, weight), grad_t)
    want = torch.autograd.grad(reference.strided_conv1d(x_ref, w_ref, None, 4, 2), (x_ref, w_ref), grad_t)
    for a, t in zip(got, want, strict=True):
        assert_matches_truth(a, t)


def test_zero_batch(device):
    x = torch.randn(0, 37, 6, device=device, requires_grad=True)
    weight = torch.randn(5, 6, 5, device=device, requires_grad=True)
    bias = torch.randn(5, device=device, requires_grad=True)
    out = extension_conv(x, weight, bias, 4, 2)
    assert out.shape == (0, 10, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


def test_expanded_input_batch(device):
    """x broadcast over the batch (batch stride 0) is read in place and gives the same result."""
    base = torch.randn(1, 30, 6, dtype=torch.float64, device=device)
    weight = torch.randn(5, 6, 5, dtype=torch.float64, device=device)
    grad_out = torch.randn(4, 8, 5, dtype=torch.float64, device=device)
    got = conv_and_grads(extension_conv, base.expand(4, 30, 6), weight, None, 4, 2, grad_out)
    want = conv_and_grads(reference.strided_conv1d, base.expand(4, 30, 6).contiguous(), weight, None, 4, 2, grad_out)
    for a, t in zip(got, want, strict=True):
        assert_matches_truth(a, t)


def test_opcheck(device):
    x = make_input(2, 19, 6, torch.float32, device, contiguous=False).requires_grad_()
    weight = torch.randn(5, 6, 5, device=device, requires_grad=True)
    bias = torch.randn(5, device=device, requires_grad=True)
    ops = torch.ops.orca_kernels
    torch.library.opcheck(ops.strided_conv1d.default, (x, weight, bias, 4, 2))
    torch.library.opcheck(ops.strided_conv1d.default, (x, weight, None, 2, 1))
    grad_out = torch.randn(2, 5, 5, device=device)
    torch.library.opcheck(ops.strided_conv1d_grad_input.default, (grad_out, weight.detach(), 19, 4, 2))
    torch.library.opcheck(ops.strided_conv1d_grad_weight.default, (grad_out, x.detach(), 5, 4, 2))


def test_torch_compile_fullgraph(device):
    x = torch.randn(2, 37, 6, device=device, requires_grad=True)
    weight = torch.randn(5, 6, 5, device=device, requires_grad=True)
    compiled = torch.compile(extension_conv, backend="aot_eager", fullgraph=True)
    out = compiled(x, weight, None, 4, 2)
    out.square().sum().backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    reference.strided_conv1d(x_ref, w_ref, None, 4, 2).square().sum().backward()
    assert_matches_truth(out.detach(), reference.strided_conv1d(x_ref, w_ref, None, 4, 2).detach())
    assert_matches_truth(x.grad, x_ref.grad, name="grad_x")
    assert_matches_truth(weight.grad, w_ref.grad, name="grad_weight")


def test_backends(device):
    x = torch.randn(2, 37, 6, device=device)
    weight = torch.randn(5, 6, 5, device=device)
    torch_out = orca_kernels.strided_conv1d(x, weight, None, 4, 2, backend="torch")
    assert torch.equal(torch_out, reference.strided_conv1d(x, weight, None, 4, 2))
    assert_matches_truth(orca_kernels.strided_conv1d(x, weight, None, 4, 2), torch_out)
    with pytest.raises(ValueError, match="backend"):
        orca_kernels.strided_conv1d(x, weight, None, 4, 2, backend="triton")
    if device.type == "cpu":
        with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
            orca_kernels.strided_conv1d(x, weight, None, 4, 2, backend="cuda")


def test_bad_input_python_errors():
    x, weight, bias = torch.randn(2, 37, 6), torch.randn(5, 6, 5), torch.randn(5)
    conv = orca_kernels.strided_conv1d
    cases = [
        (lambda: conv(x[0], weight, bias, 4, 2), ValueError, "x must have 3 dimensions"),
        (lambda: conv(x, weight[0], bias, 4, 2), ValueError, "weight must have 3 dimensions"),
        (lambda: conv(x, torch.randn(5, 7, 5), bias, 4, 2), ValueError, "weight has 7 input channels"),
        (lambda: conv(x, weight, torch.randn(4), 4, 2), ValueError, "bias has 4 elements"),
        (lambda: conv(x, weight, bias, 0, 2), ValueError, "stride must be >= 1"),
        (lambda: conv(x, weight, bias, 4, -1), ValueError, "padding must be >= 0"),
        (lambda: conv(x, weight.double(), bias, 4, 2), ValueError, "weight has dtype"),
        (lambda: conv(x, weight, bias.half(), 4, 2), ValueError, "bias has dtype"),
        (lambda: conv(x.int(), weight, bias, 4, 2), ValueError, "x has dtype"),
        (lambda: conv(x, weight, bias, 4.0, 2), TypeError, "stride must be an int"),
        (lambda: conv(x, weight, bias, 2**70, 2), ValueError, r"stride must be at most 2\*\*63 - 1"),
        (lambda: conv(x[:, :2], weight, bias, 4, 1), ValueError, "too short for one window"),
        (lambda: conv(x, weight, bias, 4, 2, backend="fast"), ValueError, "backend must be one of"),
        (lambda: conv(x, weight.to("meta"), bias, 4, 2), ValueError, "weight is on meta"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


# Every backend accepts the same inputs, with one result, and refuses the others with one error.
# (id, B, T, C_in, C_out, kernel_size, stride, padding)
STRIDE_LIMIT_3 = strided_conv.max_stride(3)  # 715827882: stride * C_in = 2**31 - 2 for C_in = 3
STRIDE_LIMIT_1 = strided_conv.max_stride(1)  # 2**31 - 1
EDGE_CASES = [
    ("C_out=0", 2, 7, 3, 0, 3, 2, 1),
    ("C_in=0", 2, 7, 0, 4, 3, 2, 1),
    ("T=0 with padding", 2, 0, 3, 4, 3, 1, 2),  # every window in the padding: the bias
    ("T=0, k=1, padding 1", 2, 0, 3, 4, 1, 2, 1),
    ("B=0", 0, 7, 3, 4, 3, 2, 1),
    ("all sizes 0", 0, 0, 0, 0, 1, 1, 1),
    ("no window reads x", 2, 1, 3, 4, 1, 3, 5),
    ("padding > kernel size", 2, 5, 3, 4, 3, 2, 4),  # bias rows at both ends
    ("stride > T", 2, 3, 3, 4, 3, 10, 0),
    ("stride at the 32-bit limit", 2, 3, 3, 4, 1, STRIDE_LIMIT_3, 0),
    ("stride = padding at the limit, 3 rows", 2, 1, 3, 4, 1, STRIDE_LIMIT_3, STRIDE_LIMIT_3),
    # 1025 rows, row 512 reads x, the others are the bias: the padding is never materialised.
    ("padding ~2**40, stride at the limit", 2, 3, 1, 2, 3, STRIDE_LIMIT_1, 512 * STRIDE_LIMIT_1),
    ("stride = padding = 2**40, B=0", 0, 1, 3, 4, 1, 2**40, 2**40),
    ("stride = padding = 2**40, C_in=0", 2, 1, 0, 4, 1, 2**40, 2**40),
    ("stride = padding = 2**40, C_out=0", 2, 1, 3, 0, 1, 2**40, 2**40),
    ("stride 2**40 + 1, no window reads x", 2, 1, 3, 4, 1, 2**40 + 1, 2**40),
    ("padding at the 64-bit limit", 2, 1, 3, 4, 1, 2**62, strided_conv.max_padding(1)),
]


def skip_unless_runs(backend: str, device: torch.device) -> None:
    if backend == "cuda" and device.type != "cuda":
        pytest.skip("backend='cuda' needs CUDA tensors")
    if backend in ("extension", "cuda") and not _extension.supports(device):
        pytest.skip(f"orca_kernels._C has no {device.type} kernels in this build")


def backend_conv(backend: str):
    return lambda x, weight, bias, stride, padding: orca_kernels.strided_conv1d(
        x, weight, bias, stride, padding, backend=backend
    )


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "column_slice"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("backend", strided_conv.BACKENDS)
@pytest.mark.parametrize("case", EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_edge_sizes_agree_on_every_backend(device, case, backend, with_bias, contiguous):
    """The degenerate sizes and the limits the extension computes: every backend returns its
    result, output and gradients of x, weight and bias (compared with the reference, which the
    extension matches), the rows whose window lies in the padding being the bias exactly."""
    skip_unless_runs(backend, device)
    _, batch, length, c_in, c_out, kernel_size, stride, padding = case
    x = make_input(batch, length, c_in, torch.float64, device, contiguous)
    weight = torch.randn(c_out, c_in, kernel_size, dtype=torch.float64, device=device)
    bias = torch.randn(c_out, dtype=torch.float64, device=device) if with_bias else None
    length_out = (length + 2 * padding - kernel_size) // stride + 1
    grad_out = torch.randn(batch, length_out, c_out, dtype=torch.float64, device=device)

    got = conv_and_grads(backend_conv(backend), x, weight, bias, stride, padding, grad_out)
    want = conv_and_grads(reference.strided_conv1d, x, weight, bias, stride, padding, grad_out)
    assert got[0].shape == (batch, length_out, c_out)
    for name, a, t in zip(["output", "grad_x", "grad_weight", "grad_bias"], got, want, strict=False):
        assert a.shape == t.shape, name
        assert_matches_truth(a, t, name=f"{backend} {name}")
    first, last = reference.conv1d_rows_reading_input(length, kernel_size, stride, padding)
    if c_in == 0 or first > last:
        first, last = length_out, length_out - 1  # no row reads x
    edge = bias if with_bias else torch.zeros(c_out, dtype=torch.float64, device=device)
    for rows in (got[0][:, :first], got[0][:, last + 1 :]):
        assert torch.equal(rows, edge.expand_as(rows))


@pytest.mark.parametrize("backend", strided_conv.BACKENDS)
def test_rows_in_the_padding_never_read_x(device, backend):
    """A window wholly in the padding is the bias, even where x holds NaN or inf: no backend
    multiplies the padding's zeros into x's values."""
    skip_unless_runs(backend, device)
    x = torch.tensor([[[math.nan, math.inf, -math.inf]]], dtype=torch.float64, device=device)
    weight = torch.randn(4, 3, 1, dtype=torch.float64, device=device)
    bias = torch.randn(4, dtype=torch.float64, device=device)
    out = orca_kernels.strided_conv1d(x, weight, bias, 3, 5, backend=backend)  # rows start at -5, -2, 1, 4
    assert torch.equal(out, bias.expand(1, 4, 4))


# (id, B, T, C_in, C_out, kernel_size, stride, padding, the error's exact text)
BAD_GEOMETRY = [
    ("kernel size 0", 2, 5, 3, 4, 0, 1, 1, "strided_conv1d: weight kernel size must be >= 1, got 0"),
    (
        "T=0 without padding",
        2, 0, 3, 4, 1, 1, 0,
        "strided_conv1d: x has length 0, too short for one window of kernel size 1 with padding 0",
    ),
    (
        "output length 0",
        2, 2, 3, 4, 5, 1, 1,
        "strided_conv1d: x has length 2, too short for one window of kernel size 5 with padding 1",
    ),
    (
        "stride = padding = 2**40, 3 rows",
        1, 1, 3, 4, 1, 2**40, 2**40,
        "strided_conv1d: stride must be at most 715827882 for C_in = 3 (stride * C_in, the row step of the "
        "compiled kernels' GEMMs, must fit in 32 bits: at most 2**31 - 1), got 1099511627776",
    ),
    (
        "stride one over the 32-bit limit",
        2, 3, 3, 4, 1, STRIDE_LIMIT_3 + 1, 0,
        "strided_conv1d: stride must be at most 715827882 for C_in = 3 (stride * C_in, the row step of the "
        "compiled kernels' GEMMs, must fit in 32 bits: at most 2**31 - 1), got 715827883",
    ),
    (
        "padding one over the 64-bit limit",
        0, 1, 3, 4, 1, 2**62, 2**62,
        "strided_conv1d: padding must be at most 4611686018427387903 for T = 1 (T + 2 * padding must fit in "
        "64 bits: at most 2**63 - 1), got 4611686018427387904",
    ),
]  # fmt: skip


@pytest.mark.parametrize("backend", strided_conv.BACKENDS)
@pytest.mark.parametrize("case", BAD_GEOMETRY, ids=[c[0] for c in BAD_GEOMETRY])
def test_bad_geometry_is_one_error_on_every_backend(device, case, backend):
    """Each refused geometry gives the same ValueError, word for word, on every backend, before
    any backend is chosen (so also backend='cuda' with CPU tensors, or where _C is missing)."""
    _, batch, length, c_in, c_out, kernel_size, stride, padding, message = case
    x = torch.randn(batch, length, c_in, device=device)
    weight = torch.randn(c_out, c_in, kernel_size, device=device)
    bias = torch.randn(c_out, device=device)
    with pytest.raises(ValueError) as caught:
        orca_kernels.strided_conv1d(x, weight, bias, stride, padding, backend=backend)
    assert str(caught.value) == message


def test_bad_input_op_errors():
    """The registered ops check their inputs too (they can be called without the wrapper). The
    calls (tests/bad_op_calls.py) run in a child process, each announced first: a crash (the GPU
    machine's build once died with SIGSEGV on two of them) then fails this test naming the call,
    not the test run, and gpu_check.sh reruns them under cuda-gdb."""
    tests = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(tests, "bad_op_calls.py")
    child = subprocess.run(
        [sys.executable, script], capture_output=True, text=True, timeout=300, env=child_environment()
    )
    last_call = [line for line in child.stdout.splitlines() if line.startswith("calling")][-1:]
    assert child.returncode == 0 and child.stdout.rstrip().endswith("all raised"), (
        f"exit status {child.returncode} at {last_call}:\n{child.stderr[-2000:]}"
    )


def test_extension_is_built_and_auto_uses_it(device):
    """The install builds _C (with CUDA where nvcc and a CUDA torch exist); auto then picks it."""
    assert _extension.LOADED, _extension.LOAD_ERROR
    assert strided_conv._use_extension(torch.empty(1, device=device), "auto")
    assert not strided_conv._use_extension(torch.empty(1, device=device), "torch")


def test_output_poisoning_is_active():
    """The NaN poisoning the parity tests rely on is switched on for this run."""
    from orca_kernels._utils import new_output

    assert torch.isnan(new_output((3,), dtype=torch.float32, device=torch.device("cpu"))).all()


def test_matches_nn_conv1d_module_checkpoint_layout():
    """The weight is nn.Conv1d's: a module's parameters plug in unchanged."""
    conv = torch.nn.Conv1d(6, 5, 5, stride=4, padding=2).double()
    x = torch.randn(2, 40, 6, dtype=torch.float64)
    out = extension_conv(x, conv.weight, conv.bias, 4, 2)
    assert_matches_truth(out, conv(x.transpose(1, 2)).transpose(1, 2))
    assert_matches_truth(out, F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, 4, 2).transpose(1, 2))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_follows_conv1d(device, x_dtype):
    """Inside autocast strided_conv1d follows autocast's rule for conv1d, as nn.Conv1d does: an
    fp32 weight with a bf16 (or fp32) x runs in bf16 instead of being refused as a dtype
    mismatch, and the gradients come back in each input's own dtype. fp64 is left alone."""
    x = torch.randn(2, 37, 6, device=device).to(x_dtype).requires_grad_()
    weight = torch.randn(5, 6, 5, device=device, requires_grad=True)
    bias = torch.randn(5, device=device, requires_grad=True)
    grad_out = torch.randn(2, 10, 5, device=device).bfloat16().double()  # exact in bf16
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = orca_kernels.strided_conv1d(x, weight, bias, 4, 2)
        expected = F.conv1d(x.transpose(1, 2), weight, bias, stride=4, padding=2).transpose(1, 2)
    assert out.dtype == expected.dtype == torch.bfloat16
    grads = torch.autograd.grad(out, (x, weight, bias), grad_out.to(out.dtype))
    assert [g.dtype for g in grads] == [x_dtype, torch.float32, torch.float32]
    # Against fp64 on the bf16-rounded inputs, at most 2x the error of a bf16 conv1d.
    rounded = [t.detach().bfloat16() for t in (x, weight, bias)]
    truth = conv_and_grads(reference.strided_conv1d, *[t.double() for t in rounded], 4, 2, grad_out)
    same_dtype = half_precision_reference(*rounded, 4, 2, grad_out)
    names = ["out", "grad_x", "grad_weight", "grad_bias"]
    for name, actual, want, ref in zip(names, [out.detach(), *grads], truth, same_dtype, strict=True):
        assert_matches_truth(actual.bfloat16(), want, same_dtype_reference=ref, name=name)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        x64, w64 = x.detach().double(), weight.detach().double()
        assert orca_kernels.strided_conv1d(x64, w64, None, 4, 2).dtype == torch.float64
