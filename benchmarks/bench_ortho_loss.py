"""The orthogonality losses (diversity + global-local), fused vs eager and torch.compile."""

from __future__ import annotations

import torch

from benchmarks.harness import Case, Provider, targets_gpu
from orca_kernels import kernels_available, ortho_losses, reference

OPS = ("ortho_losses",)  # the case ops this suite makes (benchmarks.run --only)
LOCAL_TOKENS = 375  # Whisper's 1500 frames after the stride-4 conv
# (label, batch, global tokens K, hidden)
FULL_SHAPES = [("qwen3-0.6b", 32, 64, 1024), ("qwen3-4b", 12, 64, 2560), ("llama3.1-8b", 12, 8, 4096)]
QUICK_SHAPES = [("quick", 2, 8, 64)]


def _reference(global_tokens, local_tokens):
    """Both losses as one tensor (the harness times one output)."""
    diversity = reference.ortho_diversity_loss(global_tokens)
    cross = reference.ortho_cross_loss(global_tokens, local_tokens)
    return torch.stack([diversity.float(), cross.float()])


def _fused(global_tokens, local_tokens):
    diversity, cross = ortho_losses(global_tokens, local_tokens, backend="triton")
    return torch.stack([diversity.float(), cross.float()])


def cases(device: torch.device, quick: bool) -> list[Case]:
    if not (targets_gpu(device) or kernels_available(device)):
        return []  # Triton kernels: CUDA (or the CPU interpreter, far too slow to time)
    dtype = torch.bfloat16 if targets_gpu(device) else torch.float32
    result = []
    for label, batch, tokens, size in QUICK_SHAPES if quick else FULL_SHAPES:

        def make_inputs(batch=batch, tokens=tokens, size=size):
            global_tokens = torch.randn(batch, tokens, size, device=device, dtype=dtype, requires_grad=True)
            return global_tokens, torch.randn(batch, LOCAL_TOKENS, size, device=device, dtype=dtype, requires_grad=True)

        result.append(
            Case(
                op="ortho_losses",
                shape=f"{label} B{batch} Kg{tokens} Tl{LOCAL_TOKENS} H{size}",
                dtype=dtype,
                make_inputs=make_inputs,
                providers=[
                    Provider("eager", _reference),
                    Provider("compiled", torch.compile(_reference)),
                    Provider("orca", _fused),
                ],
                reference_fp64=_reference,
            )
        )
    return result
