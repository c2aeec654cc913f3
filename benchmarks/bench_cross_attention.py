"""The gated cross-attention: the fused module vs the reference module (eager, torch.compile of
each), the attention core over every path `backend="auto"` can take, and a decode step with and
without the per-request audio K/V cache.

attention_core, per model shape, forward and forward+backward, without a key padding mask
("mask=none") and with one that masks every key of a quarter of the batch rows and nothing else
("mask=rows": the rows without audio of a model batch). Providers:

- eager: `reference.flash_cross_attention` (the module's reference path);
- triton: the package's kernels with their current launch settings (`_tuned.py`, else the
  heuristics);
- sdpa: the package's SDPA path, PyTorch choosing cuDNN, FlashAttention or memory-efficient
  attention itself;
- sdpa-cudnn, sdpa-flash, sdpa-efficient: the same path with SDPA forced to that one kernel
  (`torch.nn.attention.sdpa_kernel`); a kernel that refuses the inputs gives a row with no timings
  and the reason in `extra["skipped"]`;
- auto (GPU): `backend="auto"`, what the model runs; flash-attn where it is installed.

Every row records in `extra` the mask kind, the kernel SDPA picks for the sdpa path's call
(`torch._fused_sdp_choice`, for a training and an inference call) and, on CUDA, the backend
`orca_kernels.dispatch.attention_backend` picks (`auto_backend`), so that a run shows whether the
dispatch table picked a path at least as fast as eager.
"""

from __future__ import annotations

import functools

import torch
from torch.overrides import TorchFunctionMode

from benchmarks.harness import Case, Provider, targets_gpu
from orca_kernels import dispatch, flash_attention, flash_cross_attention, kernels_available, reference
from orca_model.cross_attention import AudioMemoryCache, OrcaGatedCrossAttention

OPS = ("gated_cross_attention", "attention_core", "decode_step")  # the case ops (benchmarks.run --only)

# (label, batch, T_x, hidden, heads, T_a, rope θ): the training shapes of docs/model-shapes.md#training-shapes
FULL_SHAPES = [
    ("llama3.1-8b", 12, 300, 4096, 32, 383, 5e5),
    ("qwen3-4b", 12, 300, 2560, 32, 439, 1e6),
    ("qwen3-0.6b", 32, 300, 1024, 16, 439, 1e6),
]
QUICK_SHAPES = [("quick", 2, 16, 64, 4, 24, 1e6)]
DECODE_BATCH = 8
MASK_KINDS = ("none", "rows")
SDPA_FORCED = {  # provider -> the one torch.nn.attention.SDPBackend it allows
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
}
SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
COMPILE_ON_CPU = "torch.compile of the fused path under the Triton interpreter takes minutes on the CPU"


def whole_rows_mask(batch: int, t_a: int, device: torch.device) -> torch.Tensor:
    """key_padding_mask [batch, t_a], True = ignore: every key of every fourth row from the last
    (row 1 of 2, rows 3, 7, 11 of 12), nothing else."""
    mask = torch.zeros(batch, t_a, dtype=torch.bool, device=device)
    mask[torch.arange(batch - 1, -1, -4, device=device)] = True
    return mask


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

    def run(q, k, v, mask):
        if mask is not None:
            raise RuntimeError("flash_attn_func takes no key padding mask")
        return flash_attn_func(q, k, v)

    return [Provider("flash-attn", run, may_refuse=True)]


def sdpa_path():
    """The package's SDPA path (`backend="sdpa"`), or before it existed the reference, which calls
    SDPA too."""
    if "sdpa" in flash_attention.BACKENDS:
        return functools.partial(flash_cross_attention, backend="sdpa")
    return reference.flash_cross_attention


def forced_sdpa(kernel: str):
    """The SDPA path with SDPA allowed only `kernel` (a torch.nn.attention.SDPBackend name); its
    backward runs the same kernel's backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = sdpa_path()

    def run(q, k, v, mask):
        with sdpa_kernel([getattr(SDPBackend, kernel)]):
            return sdpa(q, k, v, mask)

    return run


class _SdpaCalls(TorchFunctionMode):
    """Records the arguments of every F.scaled_dot_product_attention call made inside it."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls.append({**dict(zip(SDPA_ARGUMENTS, args, strict=False)), **kwargs})
        return func(*args, **kwargs)


def sdpa_choice(fn, inputs, train: bool) -> str:
    """The kernel PyTorch's SDPA picks for the call `fn(*inputs)` makes (torch._fused_sdp_choice on
    the same arguments, with or without autograd recording), e.g. "flash_attention"."""
    from torch.nn.attention import SDPBackend

    recorder = _SdpaCalls()
    with torch.set_grad_enabled(train), recorder:
        fn(*inputs)
    if not recorder.calls:
        return "no SDPA call"
    call = dict(recorder.calls[-1])
    query, key, value = call.pop("query"), call.pop("key"), call.pop("value")
    defaults = (("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False))
    positional = [call.pop(name, default) for name, default in defaults]
    with torch.set_grad_enabled(train):
        choice = torch._fused_sdp_choice(query, key, value, *positional, **call)
    try:
        return SDPBackend(choice).name.lower()
    except ValueError:
        return str(choice)


def auto_backends(q, k, v, mask, modes=("train", "inference"), devices=("cuda",)) -> dict[str, str]:
    """{mode: what `orca_kernels.dispatch.attention_backend` picks} for tensors shaped like q, k, v
    (it reads shapes, dtypes and the device only) on `devices`, where it decides; {} elsewhere.
    "train": a call autograd records; "inference", "decode": one without grad."""
    if q.device.type not in devices:
        return {}
    picks = {}
    for mode in modes:
        train = mode == "train"
        leaves = [t.detach().requires_grad_(train) for t in (q, k, v)]
        with torch.set_grad_enabled(train):
            picks[mode] = dispatch.attention_backend(*leaves, mask)
    return picks


def _core_info(mask_kind: str):
    def info(inputs) -> dict:
        record: dict = {"mask": mask_kind}
        if inputs[0].device.type != "meta":
            record["sdpa_choice"] = {
                mode: sdpa_choice(sdpa_path(), inputs, mode == "train") for mode in ("train", "inference")
            }
        auto = auto_backends(*inputs)
        if auto:
            record["auto_backend"] = auto
        return record

    return info


def auto_info(batch, t_x, t_a, heads, head_dim, dtype, device, modes=("train", "inference")):
    """Case.info: what `backend="auto"` picks for the attention core of a module call at these
    sizes (no mask), per mode; {} off CUDA."""

    def info(inputs) -> dict:
        q = torch.empty(batch, t_x, heads, head_dim, device=device, dtype=dtype)
        kv = torch.empty(batch, t_a, heads, head_dim, device=device, dtype=dtype)
        auto = auto_backends(q, kv, kv, None, modes)
        return {"auto_backend": auto} if auto else {}

    return info


def _attention_cases(label, batch, t_x, t_a, heads, head_dim, dtype, device, fused_runs) -> list[Case]:
    result = []
    for mask_kind in MASK_KINDS:

        def attention_inputs(batch=batch, t_x=t_x, t_a=t_a, heads=heads, head_dim=head_dim, mask_kind=mask_kind):
            make = lambda length: torch.randn(  # noqa: E731
                batch, length, heads, head_dim, device=device, dtype=dtype, requires_grad=True
            )
            mask = whole_rows_mask(batch, t_a, device) if mask_kind == "rows" else None
            return make(t_x), make(t_a), make(t_a), mask

        providers = [Provider("eager", reference.flash_cross_attention)]
        if fused_runs:
            providers.append(Provider("triton", functools.partial(flash_cross_attention, backend="triton")))
        if "sdpa" in flash_attention.BACKENDS:
            providers.append(Provider("sdpa", sdpa_path()))
        providers += [Provider(name, forced_sdpa(kernel), may_refuse=True) for name, kernel in SDPA_FORCED.items()]
        if targets_gpu(device):
            providers.append(Provider("auto", functools.partial(flash_cross_attention, backend="auto")))
            providers += _flash_attn_provider()
        result.append(
            Case(
                op="attention_core",
                shape=f"{label} B{batch} Tx{t_x} Ta{t_a} h{heads} d{head_dim} mask={mask_kind}",
                dtype=dtype,
                make_inputs=attention_inputs,
                providers=providers,
                reference_fp64=reference.flash_cross_attention,
                info=_core_info(mask_kind),
            )
        )
    return result


def cases(device: torch.device, quick: bool) -> list[Case]:
    gpu = targets_gpu(device)
    # The fused path runs on CUDA, or on the CPU through the interpreter (far too slow to time
    # but the quick workload): without it the CPU gets the attention core's PyTorch paths only.
    fused_runs = gpu or kernels_available(device)
    dtype = torch.bfloat16 if gpu else torch.float32
    compile_skip = None if gpu else COMPILE_ON_CPU
    result = []
    for label, batch, t_x, size, heads, t_a, theta in QUICK_SHAPES if quick else FULL_SHAPES:
        head_dim = size // heads
        if fused_runs:
            eager, fused = _modules(size, heads, theta, dtype, device)

            def module_inputs(batch=batch, t_x=t_x, t_a=t_a, size=size):
                hidden = torch.randn(batch, t_x, size, device=device, dtype=dtype, requires_grad=True)
                return hidden, torch.randn(batch, t_a, size, device=device, dtype=dtype, requires_grad=True)

            result.append(
                Case(
                    op="gated_cross_attention",
                    shape=f"{label} B{batch} Tx{t_x} H{size} h{heads} Ta{t_a}",
                    dtype=dtype,
                    make_inputs=module_inputs,
                    # The compiled providers last: a time budget that cuts the case keeps eager and orca.
                    providers=[
                        Provider("eager", eager),
                        Provider("orca", fused),
                        Provider("compiled", torch.compile(eager)),
                        Provider("orca+compiled", torch.compile(fused), skip_here=compile_skip),
                    ],
                    reference_fp64=_reference_fp64(eager, heads, theta),
                    parameters=[*eager.parameters(), *fused.parameters()],
                    info=auto_info(batch, t_x, t_a, heads, head_dim, dtype, device, ("train", "inference")),
                )
            )

        result += _attention_cases(label, batch, t_x, t_a, heads, head_dim, dtype, device, fused_runs)

        if not fused_runs:
            continue
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
                    info=auto_info(decode_batch, 1, t_a, heads, head_dim, dtype, device, ("decode",)),
                )
            )
    return result
