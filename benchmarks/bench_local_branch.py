"""The connector's local branch, forward+backward: softmax mix of the L = 4 target Whisper layers
[B, 1500, D] -> Linear(D -> H) -> strided Conv1d(H, H, k5, s4) -> LayerNorm -> local tokens [B, 375, H].

Two cases per shape: training (forward+backward, the parameters need gradients) and inference
(forward only, nothing needs a gradient). Providers: "eager" (orca_kernels.reference.local_branch,
the conv as F.conv1d on transposes), "compiled" (torch.compile of it) and "orca"
(`orca_kernels.local_branch` as ORCAHybridConnector runs it under use_fused_orca: the Linear folded
into the Conv1d where `fold_pays` says so, composed per call in training and cached across calls
at inference; the conv through the extension on the channels-last activations). The extension has
a CPU kernel, so all three run in the quick CPU workload. The Whisper states are fp32 (the encoder
runs in fp32) and need no gradient (it is frozen); the branch's parameters are in the LLM's dtype.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import nn

from benchmarks.harness import Case, Provider
from orca_kernels import FoldedWeightCache, local_branch, reference

NUM_LAYERS, FRAMES, KERNEL_SIZE, STRIDE = 4, 1500, 5, 4
# (label, batch, Whisper width D, LLM width H): Whisper large-v3 into the LLMs of docs/model-shapes.md#training-shapes
OPS = ("local_branch", "local_branch_inference")  # the case ops this suite makes (benchmarks.run --only)
FULL_SHAPES = [("llama3.1-8b", 12, 1280, 4096), ("qwen3-4b", 12, 1280, 2560), ("qwen3-0.6b", 32, 1280, 1024)]
QUICK_SHAPES = [("quick", 2, 64, 128)]


def _eager(*inputs):
    """inputs: the L states [B, T, D], then layer weights [L], Linear weight [H, D] and bias, Conv1d
    weight [H, H, k] and bias, LayerNorm weight and bias -> [B, T_l, H]."""
    return reference.local_branch(inputs[:NUM_LAYERS], *inputs[NUM_LAYERS:], stride=STRIDE)


def _fused(*inputs, cache: FoldedWeightCache):
    """The same branch as ORCAHybridConnector runs it under use_fused_orca (same inputs as _eager)."""
    return local_branch(inputs[:NUM_LAYERS], *inputs[NUM_LAYERS:], stride=STRIDE, cache=cache, backend="extension")


def cases(device: torch.device, quick: bool) -> list[Case]:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    compiled = torch.compile(_eager)
    result = []
    for (label, batch, encoder_size, size), training in itertools.product(
        QUICK_SHAPES if quick else FULL_SHAPES, (True, False)
    ):
        providers = [
            Provider("eager", _eager),
            Provider("compiled", compiled),
            Provider("orca", functools.partial(_fused, cache=FoldedWeightCache())),
        ]

        def make_inputs(batch=batch, encoder_size=encoder_size, size=size, training=training):
            states = [torch.randn(batch, FRAMES, encoder_size, device=device) for _ in range(NUM_LAYERS)]
            # The connector's modules, for their initial weights (the mix starts uniform, as there).
            proj = nn.Linear(encoder_size, size, device=device, dtype=dtype)
            conv = nn.Conv1d(size, size, KERNEL_SIZE, device=device, dtype=dtype)
            layer_weights = torch.zeros(NUM_LAYERS, device=device, dtype=dtype)
            parameters = [layer_weights, proj.weight, proj.bias, conv.weight, conv.bias]
            parameters += [torch.ones(size, device=device, dtype=dtype), torch.zeros(size, device=device, dtype=dtype)]
            return *states, *(p.detach().requires_grad_(training) for p in parameters)

        result.append(
            Case(
                op="local_branch" if training else "local_branch_inference",
                shape=f"{label} {NUM_LAYERS}x[{batch},{FRAMES},{encoder_size}]->H{size} k{KERNEL_SIZE} s{STRIDE}",
                dtype=dtype,
                make_inputs=make_inputs,
                providers=providers,
                reference_fp64=_eager,
                backward=training,
            )
        )
    return result
