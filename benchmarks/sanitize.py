"""One small call of every kernel, forward and backward, for `compute-sanitizer` (gpu_check.sh).

    compute-sanitizer --tool memcheck --error-exitcode 1 python -m benchmarks.sanitize
    python -m benchmarks.sanitize --list          # what it would run (no GPU needed)

Shapes are small (the sanitizer slows kernels by orders of magnitude) but odd, with a masked key
and a sub-sampled local branch, so that every tail and mask path of the kernels runs once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

import orca_kernels


def _conv(device: torch.device) -> list[torch.Tensor]:
    x = torch.randn(2, 37, 48, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(40, 48, 5, device=device, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(40, device=device, dtype=torch.bfloat16, requires_grad=True)
    y = orca_kernels.strided_conv1d(x, weight, bias, stride=4, padding=2, backend="extension")
    return [y, *torch.autograd.grad(y.float().square().sum(), (x, weight, bias))]


def _ortho(device: torch.device) -> list[torch.Tensor]:
    g = torch.randn(2, 8, 72, device=device, dtype=torch.bfloat16, requires_grad=True)
    local = torch.randn(2, 131, 72, device=device, dtype=torch.bfloat16, requires_grad=True)
    diversity, cross = orca_kernels.ortho_losses(g, local, max_local_samples=100, backend="triton")
    return [diversity, cross, *torch.autograd.grad(diversity + cross, (g, local))]


def _ortho_split(device: torch.device) -> list[torch.Tensor]:
    """Few tiles and a long H: the forward splits its H loop (ortho_loss.hidden_splits)."""
    g = torch.randn(1, 8, 2056, device=device, dtype=torch.bfloat16, requires_grad=True)
    local = torch.randn(1, 131, 2056, device=device, dtype=torch.bfloat16, requires_grad=True)
    diversity, cross = orca_kernels.ortho_losses(g, local, max_local_samples=100, backend="triton")
    return [diversity, cross, *torch.autograd.grad(diversity + cross, (g, local))]


def _rope(device: torch.device) -> list[torch.Tensor]:
    audio = torch.randn(2, 23, 80, device=device, dtype=torch.bfloat16, requires_grad=True)
    out = orca_kernels.audio_rope(audio, 2.5, 1e4, backend="triton")
    return [out, *torch.autograd.grad(out.float().square().sum(), audio)]


def _attention(device: torch.device) -> list[torch.Tensor]:
    q = torch.randn(2, 19, 4, 80, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 29, 4, 80, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 29, 4, 80, device=device, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.zeros(2, 29, dtype=torch.bool, device=device)
    mask[0, 20:] = True
    mask[1] = True  # a fully masked batch element: the kernels' zero-output path
    out = orca_kernels.flash_cross_attention(q, k, v, mask, backend="triton")
    return [out, *torch.autograd.grad(out.float().square().sum(), (q, k, v))]


def _decode(device: torch.device) -> list[torch.Tensor]:
    """One request's decode step: the keys are split (flash_attention.decode_splits) and merged;
    keys 64..127 are masked, so one split has no key at all."""
    q = torch.randn(1, 1, 2, 80, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, 203, 2, 80, device=device, dtype=torch.bfloat16)
    v = torch.randn(1, 203, 2, 80, device=device, dtype=torch.bfloat16)
    mask = torch.zeros(1, 203, dtype=torch.bool, device=device)
    mask[0, 64:128] = True
    return [orca_kernels.flash_cross_attention(q, k, v, mask, backend="triton")]


def _gated_cross_attention(device: torch.device) -> list[torch.Tensor]:
    from orca_model import OrcaGatedCrossAttention

    size, heads = 96, 4
    module = OrcaGatedCrossAttention(size, heads).to(device, torch.bfloat16)
    torch.nn.init.normal_(module.gate_proj[2].weight)  # a gate that depends on the input
    hidden = torch.randn(2, 7, size, device=device, dtype=torch.bfloat16, requires_grad=True)
    audio = torch.randn(2, 11, size, device=device, dtype=torch.bfloat16)
    parameters = module.parameters_in_order()
    out = orca_kernels.gated_cross_attention(hidden, audio, *parameters, heads, backend="triton")
    return [out, *torch.autograd.grad(out.float().square().sum(), (hidden, *parameters))]


CALLS: dict[str, Callable[[torch.device], list[torch.Tensor]]] = {
    "strided_conv1d (extension) fwd+bwd": _conv,
    "ortho_losses fwd+bwd (sub-sampled)": _ortho,
    "ortho_losses fwd+bwd (H loop split)": _ortho_split,
    "audio_rope fwd+bwd": _rope,
    "flash_cross_attention fwd+bwd (masked, hd 80)": _attention,
    "flash_cross_attention decode (keys split, an empty split)": _decode,
    "gated_cross_attention fwd+bwd (gated_residual)": _gated_cross_attention,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the calls and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(CALLS))
        return 0
    if not torch.cuda.is_available():
        print("benchmarks.sanitize: needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    for name, call in CALLS.items():
        outputs = call(device)
        torch.cuda.synchronize()
        finite = all(bool(torch.isfinite(t).all()) for t in outputs)
        print(f"{name}: {'ok' if finite else 'NON-FINITE OUTPUT'}", flush=True)
        if not finite:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
