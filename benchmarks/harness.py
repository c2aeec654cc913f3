"""The one benchmark harness: timing, peak memory and accuracy of each provider of an op.

A *case* is one op at one shape and dtype; its *providers* (the eager reference,
`torch.compile(reference)`, the fused orca_kernels path, ...) are timed on the same inputs in the
same run. Timing: warm-up, then the median and 20th/80th percentiles of repeats, with CUDA events
on a GPU and perf_counter on the CPU (a case whose calls take seconds may cap both). Memory: on a
GPU the peak allocated during forward+backward above what was allocated before; on the CPU the
bytes of the tensors autograd saves for backward plus the output (the activation memory a
training step keeps). Accuracy: max |provider − fp64 reference| over the forward output, where an
fp64 run fits (not for whole models).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

Inputs = Sequence[torch.Tensor | None]


@dataclass
class Provider:
    name: str
    fn: Callable[..., torch.Tensor]


@dataclass
class Case:
    op: str
    shape: str
    dtype: torch.dtype
    make_inputs: Callable[[], Inputs]  # fresh inputs; floating tensors that need grads require them
    providers: list[Provider]
    reference_fp64: Callable[..., torch.Tensor] | None  # the reference on the inputs cast to fp64; None: none fits
    parameters: Sequence[torch.Tensor] = ()  # module parameters whose .grad is cleared between runs
    backward: bool = True  # False: forward-only cases (decode steps, and whole training steps timed as one call)
    max_warmup: int | None = None  # caps on the run's warm-up and repeats, for cases whose calls take seconds
    max_repeats: int | None = None


@dataclass
class Result:
    op: str
    shape: str
    dtype: str
    provider: str
    ms_fwd: float
    ms_fwd_p20: float
    ms_fwd_p80: float
    ms_fwd_bwd: float | None
    ms_fwd_bwd_p20: float | None
    ms_fwd_bwd_p80: float | None
    peak_mb: float
    max_error: float | None
    speedup_vs_eager: float | None = None
    speedup_vs_compiled: float | None = None
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        return asdict(self)


def targets_gpu(device: torch.device) -> bool:
    """Whether cases are built for a GPU: CUDA, or the meta device that stands in for it when
    `run.py --list` rehearses the GPU workload on a machine without one."""
    return device.type in ("cuda", "meta")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile of `repeats` calls of fn, in milliseconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    quantiles = statistics.quantiles(samples, n=5) if len(samples) > 1 else [samples[0]] * 4
    return statistics.median(samples), quantiles[0], quantiles[3]


def _grad_leaves(inputs: Inputs) -> list[torch.Tensor]:
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def forward_backward(
    fn, inputs: Inputs, grad_out: torch.Tensor | None, parameters: Sequence[torch.Tensor] = ()
) -> None:
    """One forward (+ backward with grad_out unless it is None), gradients cleared afterwards."""
    if grad_out is None:
        with torch.no_grad():
            fn(*inputs)
        return
    out = fn(*inputs)
    torch.autograd.backward(out, grad_out)
    for leaf in [*_grad_leaves(inputs), *parameters]:
        leaf.grad = None


def peak_memory_mb(fn, inputs: Inputs, grad_out: torch.Tensor | None, device: torch.device, parameters=()) -> float:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        forward_backward(fn, inputs, grad_out, parameters)
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    leaf_storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
        torch.set_grad_enabled(grad_out is not None),
    ):
        out = fn(*inputs)
    saved = sum(size for ptr, size in storages.items() if ptr not in leaf_storages)
    return (saved + out.untyped_storage().nbytes()) / 2**20


def run_case(case: Case, device: torch.device, warmup: int, repeats: int) -> list[Result]:
    """Every provider of `case` on the same inputs: timings, peak memory, max error vs fp64."""
    if case.max_warmup is not None:
        warmup = min(warmup, case.max_warmup)
    if case.max_repeats is not None:
        repeats = min(repeats, case.max_repeats)
    inputs = case.make_inputs()
    truth = None
    if case.reference_fp64 is not None:
        with torch.no_grad():
            as_fp64 = [
                t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs
            ]
            truth = case.reference_fp64(*as_fp64)
    grad_out = None
    results = []
    for provider in case.providers:
        with torch.no_grad():
            out = provider.fn(*inputs)
        if case.backward and grad_out is None:
            grad_out = torch.randn_like(out, dtype=case.dtype)
        max_error = None if truth is None else (out.double() - truth).abs().max().item() if truth.numel() else 0.0

        def forward(fn=provider.fn):
            with torch.no_grad():
                fn(*inputs)

        fwd = time_ms(forward, device, warmup, repeats)
        if case.backward:
            step = lambda fn=provider.fn, g=grad_out: forward_backward(fn, inputs, g, case.parameters)
            fwd_bwd = time_ms(step, device, warmup, repeats)
        else:
            fwd_bwd = (None, None, None)
        peak = peak_memory_mb(provider.fn, inputs, grad_out, device, case.parameters)
        results.append(
            Result(
                case.op,
                case.shape,
                str(case.dtype).removeprefix("torch."),
                provider.name,
                *fwd,
                *fwd_bwd,
                peak,
                max_error,
            )
        )
    eager = next((r for r in results if r.provider == "eager"), None)
    compiled = next((r for r in results if r.provider == "compiled"), None)
    # Speedups compare forward+backward time, or forward time for forward-only cases.
    key = "ms_fwd_bwd" if case.backward else "ms_fwd"
    for r in results:
        r.speedup_vs_eager = getattr(eager, key) / getattr(r, key) if eager else None
        r.speedup_vs_compiled = getattr(compiled, key) / getattr(r, key) if compiled else None
    return results
