"""Double backward (a second differentiation of a create_graph=True backward) through the registered ops.

Every op either gives the right second derivative (strided_conv1d: its backward ops are registered
with their own autograd formulas; audio_rope: its backward is the rotation op again) or raises a
RuntimeError naming the op. Never autograd's "no autograd kernel" warning and wrong numbers.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import orca_kernels
from orca_kernels import _extension, rope, strided_conv
from orca_kernels.gated_residual import gated_residual

needs_extension = pytest.mark.skipif(not _extension.LOADED, reason="orca_kernels._C is not loaded")


@pytest.fixture(autouse=True)
def _no_autograd_fallback_warning():
    """Autograd's fallback for an op without an autograd kernel warns and then computes wrong
    second derivatives: make that warning an error in every test here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*autograd kernel was not registered.*")
        yield


def _second_derivative_loss(grads) -> torch.Tensor:
    return sum((g * g).sum() for g in grads if g is not None)


# ----------------------------------------------------------------------------- strided_conv1d


def _conv_inputs(device, c_in=3, with_bias=True):
    x = torch.randn(2, 11, c_in, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(4, c_in, 3, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True) if with_bias else None
    return x, weight, bias


@needs_extension
@pytest.mark.parametrize("stride,padding", [(2, 1), (1, 0), (3, 2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_strided_conv_gradgradcheck(device, stride, padding, with_bias):
    x, weight, bias = _conv_inputs(device, with_bias=with_bias)
    inputs = (x, weight) if bias is None else (x, weight, bias)

    def conv(x, weight, bias=None):
        return strided_conv.strided_conv1d(x, weight, bias, stride, padding, backend="extension")

    assert torch.autograd.gradgradcheck(conv, inputs)


@needs_extension
def test_strided_conv_second_derivative_matches_torch_backend(device):
    """The reported symptom: a gradient penalty through the extension op disagreed with backend='torch'."""
    results = {}
    for backend in ("extension", "torch"):
        torch.manual_seed(0)
        x, weight, bias = _conv_inputs(device)
        out = strided_conv.strided_conv1d(x, weight, bias, 2, 1, backend=backend)
        grads = torch.autograd.grad((out**2).sum(), (x, weight, bias), create_graph=True)
        penalty = (grads[0] ** 2).sum() + (grads[1] ** 3).sum() + grads[2].sum() ** 2
        results[backend] = torch.autograd.grad(penalty, (x, weight, bias))
    for got, want in zip(results["extension"], results["torch"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@needs_extension
def test_strided_conv_backward_ops_opcheck(device):
    """opcheck with inputs that require grad also runs the backward ops' own autograd formulas."""
    ops = torch.ops.orca_kernels
    grad_out = torch.randn(2, 5, 4, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(4, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
    x = torch.randn(2, 19, 3, dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(ops.strided_conv1d_grad_input.default, (grad_out, weight, 19, 4, 2))
    torch.library.opcheck(ops.strided_conv1d_grad_weight.default, (grad_out, x, 5, 4, 2))


# ----------------------------------------------------------------------------- strided_conv1d, C_in = 0


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("backend", ["torch", pytest.param("extension", marks=needs_extension)])
def test_strided_conv_zero_input_channels(device, backend, with_bias):
    x, weight, bias = _conv_inputs(device, c_in=0, with_bias=with_bias)
    out = strided_conv.strided_conv1d(x, weight, bias, 2, 1, backend=backend)
    length_out = (11 + 2 - 3) // 2 + 1
    assert out.shape == (2, length_out, 4)
    expected = bias.detach().expand(2, length_out, 4) if with_bias else torch.zeros_like(out)
    assert torch.equal(out, expected)
    grad_out = torch.randn_like(out)
    leaves = (x, weight) if bias is None else (x, weight, bias)
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert grads[0].shape == x.shape and grads[1].shape == weight.shape
    if with_bias:
        torch.testing.assert_close(grads[2], grad_out.sum(dim=(0, 1)))


@needs_extension
def test_strided_conv_zero_input_channels_backends_agree(device):
    x, weight, bias = _conv_inputs(device, c_in=0)
    outs = [strided_conv.strided_conv1d(x, weight, bias, 3, 2, backend=b) for b in ("extension", "torch")]
    assert outs[0].shape == outs[1].shape
    assert torch.equal(outs[0], outs[1])


# ----------------------------------------------------------------------------- audio_rope


def test_audio_rope_gradgradcheck(triton_device):
    audio = torch.randn(2, 3, 6, dtype=torch.float64, device=triton_device, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a: rope.audio_rope(a, 2.5, 10000.0, backend="triton"), (audio,))


# ----------------------------------------------------------------------------- ops that raise


def _flash(device):
    q = torch.randn(1, 3, 2, 8, dtype=torch.float64, device=device, requires_grad=True)
    k = torch.randn(1, 5, 2, 8, dtype=torch.float64, device=device, requires_grad=True)
    v = torch.randn(1, 5, 2, 8, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.tensor([[False, True, False, False, True]], device=device)
    return (q, k, v), lambda q, k, v: orca_kernels.flash_cross_attention(q, k, v, mask, backend="triton")


def _ortho_losses(device):
    g = torch.randn(2, 3, 8, dtype=torch.float64, device=device, requires_grad=True)
    l = torch.randn(2, 7, 8, dtype=torch.float64, device=device, requires_grad=True)
    return (g, l), lambda g, l: sum(orca_kernels.ortho_losses(g, l, 4, backend="triton"))


def _ortho_diversity(device):
    g = torch.randn(2, 3, 8, dtype=torch.float64, device=device, requires_grad=True)
    return (g,), lambda g: orca_kernels.ortho_diversity_loss(g, backend="triton")


def _ortho_cross(device):
    g = torch.randn(2, 3, 8, dtype=torch.float64, device=device, requires_grad=True)
    l = torch.randn(2, 5, 8, dtype=torch.float64, device=device, requires_grad=True)
    return (g, l), lambda g, l: orca_kernels.ortho_cross_loss(g, l, None, backend="triton")


def _gated_residual(device):
    shapes = [(1, 3, 8), (1, 3, 8), (1, 3, 2), (1, 2), (1,), (8,), (8,)]
    inputs = tuple(torch.randn(s, dtype=torch.float64, device=device, requires_grad=True) for s in shapes)
    return inputs, gated_residual


RAISING = [
    (_flash, "orca_kernels.flash_cross_attention"),
    (_ortho_losses, "orca_kernels.ortho_losses"),
    (_ortho_diversity, "orca_kernels.ortho_losses"),
    (_ortho_cross, "orca_kernels.ortho_losses"),
    (_gated_residual, "orca_kernels.gated_residual"),
]


@pytest.mark.parametrize("make,name", RAISING, ids=[make.__name__.lstrip("_") for make, _ in RAISING])
def test_double_backward_raises(triton_device, make, name):
    inputs, fn = make(triton_device)
    out = fn(*inputs)
    # A first backward with create_graph=True works and gives the plain backward's numbers ...
    plain = torch.autograd.grad(out.sum(), inputs, retain_graph=True)
    grads = torch.autograd.grad(out.sum(), inputs, create_graph=True)
    for got, want in zip(grads, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # ... and differentiating it again raises, naming the op.
    with pytest.raises(RuntimeError, match=rf"{name}.*double backward \(create_graph=True\) is not supported"):
        torch.autograd.grad(_second_derivative_loss(grads), inputs, allow_unused=True)


def test_double_backward_raises_from_model_style_penalty(triton_device):
    """A gradient penalty (backward of a gradient norm) through flash attention raises too."""
    (q, k, v), fn = _flash(triton_device)
    (grad_q,) = torch.autograd.grad(fn(q, k, v).square().sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match=r"orca_kernels\.flash_cross_attention: double backward"):
        grad_q.norm().backward()
