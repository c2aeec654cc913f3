"""Every public op on meta tensors (shape inference without data: model surgery, memory planning,
the compile audit) gives meta outputs of the right shapes, never an error from deep inside."""

from __future__ import annotations

import warnings

import torch

import orca_kernels

H, GATE = 8, 2  # hidden size and the gate's hidden width (H / 4)
PARAMETER_SHAPES = [(3 * H, H), (3 * H,), (H, H), (H,), (GATE, H), (GATE,), (1, GATE), (1,), (H,), (H,)]


def meta(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


def test_every_op_infers_shapes_on_meta_tensors():
    params = [meta(*shape) for shape in PARAMETER_SHAPES]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the extension has no meta kernel: the reference runs
        conv = orca_kernels.strided_conv1d(meta(2, 37, 6), meta(5, 6, 5), meta(5), 4, 2)
    diversity, cross = orca_kernels.ortho_losses(meta(2, 3, H), meta(2, 5, H))
    results = {
        "strided_conv1d": (conv, (2, 10, 5)),
        "ortho_losses diversity": (diversity, ()),
        "ortho_losses cross": (cross, ()),
        "ortho_diversity_loss": (orca_kernels.ortho_diversity_loss(meta(2, 3, H)), ()),
        "ortho_cross_loss": (orca_kernels.ortho_cross_loss(meta(2, 3, H), meta(2, 5, H)), ()),
        "audio_rope": (orca_kernels.audio_rope(meta(2, 5, H), 2.5, 1e4), (2, 5, H)),
        "flash_cross_attention": (
            orca_kernels.flash_cross_attention(meta(2, 3, 2, 4), meta(2, 5, 2, 4), meta(2, 5, 2, 4)),
            (2, 3, 2, 4),
        ),
        "gated_cross_attention": (
            orca_kernels.gated_cross_attention(meta(2, 3, H), meta(2, 5, H), *params, 2),
            (2, 3, H),
        ),
    }
    for name, (out, shape) in results.items():
        assert out.device.type == "meta", name
        assert tuple(out.shape) == shape, name
