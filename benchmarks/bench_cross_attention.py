"""The gated cross-attention: the fused module vs the reference module (eager and
torch.compile), the attention core vs SDPA (flash backend) and flash-attn, and a decode step
with and without the per-request audio K/V cache."""

from __future__ import annotations

import functools

import torch

from benchmarks.harness import Case, Provider, targets_gpu
from orca_kernels import flash_cross_attention, kernels_available, reference
from orca_model.cross_attention import AudioMemoryCache, OrcaGatedCrossAttention

# (label, batch, T_x, hidden, heads, T_a, rope θ): the training shapes of docs/model-shapes.md#training-shapes
FULL_SHAPES = [
    ("llama3.1-8b", 12, 300, 4096, 32, 383, 5e5),
    ("qwen3-4b", 12, 300, 2560, 32, 439, 1e6),
    ("qwen3-0.6b", 32, 300, 1024, 16, 439, 1e6),
]
QUICK_SHAPES = [("quick", 2, 16, 64, 4, 24, 1e6)]
DECODE_BATCH = 8


def _modules(size, heads, theta, dtype, device):
    eager = OrcaGatedCrossAttention(size, heads, rope_theta=theta)
    torch.nn.init.normal_(eager.gate_proj[2].weight, std=0.02)  # a gate that depends on the token
    fused = OrcaGatedCrossAttention(size, heads, rope_theta=theta, use_fused=True)
    fused.load_state_dict(eager.state_dict())
    return eager.to(device, dtype).eval(), fused.to(device, dtype).eval()


def _reference_fp64(module, heads, theta):
    params = [p.detach().double() for p in module.parameters_in_order()]
    return lambda hidden, audio: reference.gated_cross_attention(hidden, audio, *params, heads, rope_theta=theta)


def _flash_attn_provider():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return []
    return [Provider("flash-attn", lambda q, k, v: flash_attn_func(q, k, v))]


def _sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return reference.flash_cross_attention(q, k, v)


def cases(device: torch.device, quick: bool) -> list[Case]:
    if not (targets_gpu(device) or kernels_available(device)):
        return []  # the fused path runs on CUDA (or the CPU interpreter, far too slow to time)
    dtype = torch.bfloat16 if targets_gpu(device) else torch.float32
    result = []
    for label, batch, t_x, size, heads, t_a, theta in QUICK_SHAPES if quick else FULL_SHAPES:
        eager, fused = _modules(size, heads, theta, dtype, device)
        shape = f"{label} B{batch} Tx{t_x} H{size} h{heads} Ta{t_a}"

        def module_inputs(batch=batch, t_x=t_x, t_a=t_a, size=size):
            hidden = torch.randn(batch, t_x, size, device=device, dtype=dtype, requires_grad=True)
            return hidden, torch.randn(batch, t_a, size, device=device, dtype=dtype, requires_grad=True)

        result.append(
            Case(
                op="gated_cross_attention",
                shape=shape,
                dtype=dtype,
                make_inputs=module_inputs,
                providers=[
                    Provider("eager", eager),
                    Provider("compiled", torch.compile(eager)),
                    Provider("orca", fused),
                ],
                reference_fp64=_reference_fp64(eager, heads, theta),
                parameters=[*eager.parameters(), *fused.parameters()],
            )
        )

        head_dim = size // heads

        def attention_inputs(batch=batch, t_x=t_x, t_a=t_a, heads=heads, head_dim=head_dim):
            make = lambda length: torch.randn(
                batch, length, heads, head_dim, device=device, dtype=dtype, requires_grad=True
            )  # noqa: E731
            return make(t_x), make(t_a), make(t_a)

        core = [
            Provider("eager", reference.flash_cross_attention),
            Provider("compiled", torch.compile(reference.flash_cross_attention)),
        ]
        if targets_gpu(device):
            core += [Provider("sdpa-flash", _sdpa_flash), *_flash_attn_provider()]
        core.append(Provider("orca", functools.partial(flash_cross_attention, backend="triton")))
        result.append(
            Case(
                op="attention_core",
                shape=f"{label} B{batch} Tx{t_x} Ta{t_a} h{heads} d{head_dim}",
                dtype=dtype,
                make_inputs=attention_inputs,
                providers=core,
                reference_fp64=reference.flash_cross_attention,
            )
        )

        # A batch of requests, and one request alone (whose few programs the keys are split over).
        for decode_batch in sorted({1, min(DECODE_BATCH, batch)}):

            def decode_inputs(decode_batch=decode_batch, t_a=t_a, size=size):
                step = torch.randn(decode_batch, 1, size, device=device, dtype=dtype)
                return step, torch.randn(decode_batch, t_a, size, device=device, dtype=dtype)

            cache = AudioMemoryCache()

            def cached_step(step, audio, cache=cache, fused=fused):
                return fused(step, audio, audio_cache=cache)  # the cache is filled at the first call

            result.append(
                Case(
                    op="decode_step",
                    shape=f"{label} B{decode_batch} Tx1 H{size} Ta{t_a}",
                    dtype=dtype,
                    make_inputs=decode_inputs,
                    providers=[
                        Provider("eager", eager),
                        Provider("orca-uncached", fused),
                        Provider("orca-cached", cached_step),
                    ],
                    reference_fp64=_reference_fp64(eager, heads, theta),
                    backward=False,
                )
            )
    return result
