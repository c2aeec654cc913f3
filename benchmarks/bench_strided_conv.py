"""strided_conv1d: the extension vs F.conv1d with its transposes (eager and torch.compile)."""

from __future__ import annotations

import functools

import torch

from benchmarks.harness import Case, Provider
from orca_kernels import reference, strided_conv1d

KERNEL_SIZE, STRIDE, PADDING = 5, 4, 2
OPS = ("strided_conv1d",)  # the case ops this suite makes (benchmarks.run --only)
FRAMES = 1500  # Whisper frames per 30 s clip

# (label, batch, hidden): the local branch's conv runs on [B, 1500, H] (docs/model-shapes.md#training-shapes)
FULL_SHAPES = [("llama3.1-8b", 12, 4096), ("qwen3-4b", 12, 2560), ("qwen3-0.6b", 32, 1024)]
QUICK_SHAPES = [("quick", 2, 128)]


def _conv(x, weight, bias, fn):
    return fn(x, weight, bias, STRIDE, PADDING)


def cases(device: torch.device, quick: bool) -> list[Case]:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    compiled_reference = torch.compile(reference.strided_conv1d)
    providers = [
        Provider("eager", functools.partial(_conv, fn=reference.strided_conv1d)),
        Provider("compiled", functools.partial(_conv, fn=compiled_reference)),
        Provider("orca", functools.partial(_conv, fn=functools.partial(strided_conv1d, backend="extension"))),
    ]
    result = []
    for label, batch, hidden in QUICK_SHAPES if quick else FULL_SHAPES:

        def make_inputs(batch=batch, hidden=hidden):
            x = torch.randn(batch, FRAMES, hidden, device=device, dtype=dtype, requires_grad=True)
            bound = 1.0 / (hidden * KERNEL_SIZE) ** 0.5  # nn.Conv1d's init scale keeps outputs O(1)
            weight = (torch.rand(hidden, hidden, KERNEL_SIZE, device=device, dtype=dtype) * 2 - 1) * bound
            bias = (torch.rand(hidden, device=device, dtype=dtype) * 2 - 1) * bound
            return x, weight.requires_grad_(), bias.requires_grad_()

        result.append(
            Case(
                op="strided_conv1d",
                shape=f"{label} x[{batch},{FRAMES},{hidden}] k{KERNEL_SIZE} s{STRIDE}",
                dtype=dtype,
                make_inputs=make_inputs,
                providers=providers,
                reference_fp64=functools.partial(_conv, fn=reference.strided_conv1d),
            )
        )
    return result
