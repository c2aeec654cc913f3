"""audio_rope (Triton) against the reference: bit-identical values and gradients."""

from __future__ import annotations

import pytest
import torch

from orca_kernels import _utils, reference, rope
from tolerances import assert_matches_truth

# bf16 too under the interpreter: it truncates fp32 -> bf16 casts, and the kernel rounds by hand there.
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 13, 20), (3, 65, 80), (1, 439, 128)])
def test_bitwise_equal_to_reference(triton_device, shape):
    for dtype in DTYPES:
        audio = torch.randn(*shape, dtype=dtype, device=triton_device, requires_grad=True)
        grad = torch.randn(shape, dtype=dtype, device=triton_device)
        out = rope.audio_rope(audio, 2.5, 1e6, backend="triton")
        expected = reference.audio_rope(audio, 2.5, 1e6)
        assert torch.equal(out, expected), dtype
        (got,) = torch.autograd.grad(out, audio, grad)
        (want,) = torch.autograd.grad(expected, audio, grad)
        assert torch.equal(got, want), dtype


def test_non_contiguous_and_expanded(triton_device):
    wide = torch.randn(2, 9, 40, dtype=torch.float64, device=triton_device)
    audio = wide[:, :, 5:25].requires_grad_()  # a column slice: strided rows
    out = rope.audio_rope(audio, 5.0, 5e5, backend="triton")
    assert torch.equal(out, reference.audio_rope(audio, 5.0, 5e5))
    out.sum().backward()  # an expanded upstream gradient
    audio_ref = audio.detach().clone().requires_grad_()
    reference.audio_rope(audio_ref, 5.0, 5e5).sum().backward()
    assert torch.equal(audio.grad, audio_ref.grad)


def test_gradcheck_fp64(triton_device):
    audio = torch.randn(2, 3, 4, dtype=torch.float64, device=triton_device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: rope.audio_rope(a, 2.5, 10000.0, backend="triton"), (audio,))
    assert torch.autograd.gradgradcheck(lambda a: rope.audio_rope(a, 2.5, 10000.0, backend="triton"), (audio,))


def test_opcheck(triton_device):
    audio = torch.randn(2, 7, 12, device=triton_device, requires_grad=True)
    torch.library.opcheck(torch.ops.orca_kernels.audio_rope.default, (audio, 2.5, 1e6, False))


def test_torch_compile_fullgraph(triton_device):
    audio = torch.randn(2, 7, 12, device=triton_device, requires_grad=True)
    compiled = torch.compile(
        lambda a: rope.audio_rope(a, 2.5, 1e6, backend="triton"), backend="aot_eager", fullgraph=True
    )
    out = compiled(audio)
    assert_matches_truth(out, reference.audio_rope(audio, 2.5, 1e6))
    out.square().sum().backward()
    assert audio.grad is not None and torch.isfinite(audio.grad).all()


def test_empty_and_table_cache(triton_device):
    assert rope.audio_rope(torch.randn(0, 5, 8, device=triton_device), backend="triton").shape == (0, 5, 8)
    assert rope.audio_rope(torch.randn(2, 0, 8, device=triton_device), backend="triton").shape == (2, 0, 8)
    first = rope.rope_half_tables(33, 16, 2.5, 1e6, triton_device)
    assert rope.rope_half_tables(33, 16, 2.5, 1e6, triton_device)[0] is first[0]  # built once, shared


def test_bad_inputs():
    audio = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="audio must have 3 dimensions"):
        rope.audio_rope(audio[0])
    with pytest.raises(ValueError, match="width must be even"):
        rope.audio_rope(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="position_scale must be finite and > 0"):
        rope.audio_rope(audio, 0.0)
    with pytest.raises(ValueError, match="rope_theta must be finite and > 0"):
        rope.audio_rope(audio, 2.5, -1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        rope.audio_rope(audio, backend="cuda")
    with pytest.raises(ValueError, match="audio has dtype"):
        rope.audio_rope(audio.long())


def test_backend_resolution(monkeypatch):
    cpu = torch.empty(1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_utils, "KERNELS_INTERPRETED", False)
    assert not _utils.use_triton("audio_rope", cpu, "auto")  # auto on the CPU: the reference
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _utils.use_triton("audio_rope", cpu, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="set it before the import"):
        _utils.use_triton("audio_rope", cpu, "auto")
    monkeypatch.setattr(_utils, "KERNELS_INTERPRETED", True)
    assert _utils.use_triton("audio_rope", cpu, "auto")
    assert not _utils.use_triton("audio_rope", cpu, "torch")
