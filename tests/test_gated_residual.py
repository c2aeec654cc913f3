"""gated_residual (Triton LayerNorm + gate + residual) against orca_kernels.reference.gated_residual."""

from __future__ import annotations

import pytest
import torch

from orca_kernels import reference
from orca_kernels.gated_residual import gated_residual
from tolerances import assert_matches_truth

NAMES = ["hidden", "attended", "gate_hidden", "gate_out_weight", "gate_out_bias", "ln_weight", "ln_bias"]


def make_inputs(batch, length, size, dtype, triton_device, contiguous=True):
    gate = max(size // 4, 1)
    shapes = [(batch, length, size), (batch, length, size), (batch, length, gate), (1, gate), (1,), (size,), (size,)]
    tensors = [torch.randn(s, dtype=torch.float64, device=triton_device) for s in shapes]
    tensors[1] = tensors[1] * 2 + 0.5  # a LayerNorm input with a nonzero mean
    tensors[5] = tensors[5] + 1
    if not contiguous:  # the attention output and gate activations as column slices of wider buffers
        wide = torch.randn(batch, length, size + 5, dtype=torch.float64, device=triton_device)
        wide[..., 2 : 2 + size] = tensors[1]
        tensors[1] = wide[..., 2 : 2 + size]
    return [t.to(dtype) for t in tensors]


def grads(fn, inputs, grad_out):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(out.dtype))]


CASES = [(1, 1, 8, True), (2, 5, 20, True), (2, 7, 80, False), (1, 3, 128, True), (3, 2, 36, False)]


@pytest.mark.parametrize("batch,length,size,contiguous", CASES)
# bf16 too: the kernel has no tl.dot, and its bf16 stores round under the interpreter as on a GPU.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_composition(triton_device, dtype, batch, length, size, contiguous):
    inputs = make_inputs(batch, length, size, dtype, triton_device, contiguous)
    grad_out = torch.randn(batch, length, size, device=triton_device).to(dtype).double()
    got = grads(gated_residual, inputs, grad_out)
    truth = grads(reference.gated_residual, [t.double() for t in inputs], grad_out)
    same_dtype = grads(reference.gated_residual, inputs, grad_out)
    for name, a, t, r in zip(["out", *NAMES], got, truth, same_dtype, strict=True):
        assert a.dtype == dtype, name
        assert_matches_truth(a, t, same_dtype_reference=r, name=name)


@pytest.mark.parametrize("which", [3, 4, 5, 6], ids=NAMES[3:])
def test_strided_parameters(triton_device, which):
    """A parameter that is a strided view (every other element of a wider tensor) gives the
    reference's values and gradients: the kernels read the parameters as unit-stride vectors, so
    the launcher packs a strided one (it once read the gaps)."""
    inputs = make_inputs(2, 3, 12, torch.float64, triton_device)
    wide = torch.randn(
        *inputs[which].shape[:-1], 2 * inputs[which].shape[-1], dtype=torch.float64, device=triton_device
    )
    wide[..., ::2] = inputs[which]
    inputs[which] = wide[..., ::2]
    assert not inputs[which].is_contiguous() or inputs[which].numel() == 1
    grad_out = torch.randn(2, 3, 12, dtype=torch.float64, device=triton_device)
    got = grads(gated_residual, inputs, grad_out)
    truth = grads(reference.gated_residual, inputs, grad_out)
    for name, a, t in zip(["out", *NAMES], got, truth, strict=True):
        assert_matches_truth(a, t, name=name)


def test_mixed_dtypes_follow_the_caller(triton_device):
    """Under autocast the LayerNorm output is fp32 while the GEMM outputs are half: the kernel
    reads each input in its own dtype and writes out_dtype; gradients keep each input's dtype."""
    inputs = make_inputs(2, 4, 16, torch.float32, triton_device)
    inputs[1], inputs[2] = inputs[1].half(), inputs[2].half()  # attention output and gate GEMM in fp16
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = gated_residual(*leaves, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    expected = reference.gated_residual(*[t.double() for t in inputs])
    assert_matches_truth(out, expected)
    out.sum().backward()
    assert [t.grad.dtype for t in leaves] == [t.dtype for t in inputs]


def test_expanded_gradient_and_zero_rows(triton_device):
    inputs = [t.requires_grad_() for t in make_inputs(2, 3, 12, torch.float64, triton_device)]
    gated_residual(*inputs).sum().backward()  # an expanded (stride-0) upstream gradient
    reference_leaves = [t.detach().clone().requires_grad_() for t in inputs]
    reference.gated_residual(*reference_leaves).sum().backward()
    for name, a, r in zip(NAMES, inputs, reference_leaves, strict=True):
        assert_matches_truth(a.grad, r.grad, name=name)

    empty = [t.requires_grad_() for t in make_inputs(0, 3, 12, torch.float64, triton_device)]
    out = gated_residual(*empty)
    assert out.shape == (0, 3, 12)
    out.sum().backward()
    assert torch.equal(empty[5].grad, torch.zeros(12, dtype=torch.float64, device=triton_device))


def test_gradcheck_fp64(triton_device):
    inputs = [t.requires_grad_() for t in make_inputs(2, 2, 8, torch.float64, triton_device)]
    assert torch.autograd.gradcheck(gated_residual, tuple(inputs), fast_mode=True)


def test_opcheck(triton_device):
    inputs = [t.requires_grad_() for t in make_inputs(2, 3, 12, torch.float32, triton_device)]
    ops = torch.ops.orca_kernels
    torch.library.opcheck(ops.gated_residual.default, (*inputs, 1e-5, torch.float32))
    grad_out = torch.randn(2, 3, 12, device=triton_device)
    torch.library.opcheck(ops.gated_residual_backward.default, (grad_out, *[t.detach() for t in inputs[1:]], 1e-5))


def test_torch_compile_fullgraph(triton_device):
    inputs = [t.requires_grad_() for t in make_inputs(2, 3, 12, torch.float32, triton_device)]
    compiled = torch.compile(gated_residual, backend="aot_eager", fullgraph=True)
    out = compiled(*inputs)
    assert_matches_truth(out.detach(), reference.gated_residual(*[t.detach().double() for t in inputs]))
    out.square().sum().backward()
    assert all(t.grad is not None for t in inputs)


def test_batch_of_rows_spread_over_programs(triton_device):
    """More rows than backward programs: every program's partial sums are added."""
    inputs = make_inputs(3, 11, 8, torch.float64, triton_device)
    grad_out = torch.randn(3, 11, 8, dtype=torch.float64, device=triton_device)
    for name, a, t in zip(
        ["out", *NAMES],
        grads(gated_residual, inputs, grad_out),
        grads(reference.gated_residual, inputs, grad_out),
        strict=True,
    ):
        assert_matches_truth(a, t, name=name)
