"""The one benchmark harness: timing, peak memory and accuracy of each provider of an op.

A *case* is one op at one shape and dtype; its *providers* (the eager reference,
`torch.compile(reference)`, the fused orca_kernels path, ...) are timed on the same inputs in the
same run. Timing: warm-up, then the median and 20th/80th percentiles of repeats, with CUDA events
on a GPU and perf_counter on the CPU (a case whose calls take seconds may cap both). Memory: on a
GPU the peak allocated during forward+backward above what was allocated before; on the CPU the
bytes of the tensors autograd saves for backward plus the output (the activation memory a
training step keeps). Accuracy: max |provider − fp64 reference| over the forward output, where an
fp64 run fits (not for whole models).

A provider that may be refused by its backend (SDPA forced to one kernel that does not take the
inputs) is recorded as a row with no timings and `extra["skipped"]` saying why, not as a failure.
`profile_kernels` runs one call under torch.profiler and tabulates its costliest kernels (CPU ops
on the CPU) by the module each ran for (forward and backward).
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

Inputs = Sequence[torch.Tensor | None]


@dataclass
class Provider:
    name: str
    fn: Callable[..., torch.Tensor]
    may_refuse: bool = False  # a RuntimeError from fn is a refusal of these inputs: a skipped row with the reason
    skip_here: str | None = None  # why this provider is not run on this device by default (listed, not run)
    # What the provider measured itself over its calls (e.g. a generation's time to first token),
    # added to its row's `extra` after the run; a "note" entry is shown in the table's note column.
    stats: Callable[[], dict] | None = None


class Refused(RuntimeError):
    """Raised by a provider whose backend does not take the case's inputs (the message says why)."""


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
    # What a run records about the case beside the timings (e.g. which SDPA kernel PyTorch picks),
    # computed once from its inputs; it goes into every row's `extra`.
    info: Callable[[Inputs], dict] | None = None
    # For `run.py --profile`: provider name -> [(group label, modules)] whose calls are that group
    # in the profiler table; None for a provider that is not profiled.
    profile_groups: Callable[[str], Sequence[tuple[str, Sequence[nn.Module]]] | None] | None = None

    def label(self) -> str:
        return f"{self.op} {self.shape} {str(self.dtype).removeprefix('torch.')}"


@dataclass
class Result:
    op: str
    shape: str
    dtype: str
    provider: str
    ms_fwd: float | None  # None: the provider was refused (extra["skipped"] says why)
    ms_fwd_p20: float | None
    ms_fwd_p80: float | None
    ms_fwd_bwd: float | None
    ms_fwd_bwd_p20: float | None
    ms_fwd_bwd_p80: float | None
    peak_mb: float | None
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


TIGHT_SPREAD = 1.2  # p80 / p20 of a row's timings at or below which a number is one a rerun gives
MAX_ROUNDS = 4  # rounds of `repeats` calls at most while the spread is looser


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile of fn's calls, in milliseconds: `repeats` calls, and up to
    MAX_ROUNDS rounds of them while p80 / p20 exceeds TIGHT_SPREAD (a loaded machine's hiccups
    then weigh less; a row whose spread stays loose is flagged by `unstable`)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples: list[float] = []
    for _ in range(MAX_ROUNDS):
        samples += [_one_call_ms(fn, device) for _ in range(repeats)]
        median, p20, p80 = _quantiles(samples)
        if p80 <= TIGHT_SPREAD * p20:
            break
    return median, p20, p80


def unstable(p20: float | None, p80: float | None) -> bool:
    """Whether a timing's spread stayed looser than TIGHT_SPREAD after MAX_ROUNDS rounds."""
    return p20 is not None and p80 is not None and p80 > TIGHT_SPREAD * p20


def _one_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
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


def _refusal(error: BaseException, caught: Sequence[warnings.WarningMessage]) -> str:
    """The reason a backend refused the inputs: its warnings (PyTorch's SDPA says there why each
    kernel does not fit) and the error's first line."""
    lines = [str(w.message).strip() for w in caught] + [(str(error).strip() or type(error).__name__).splitlines()[0]]
    return "; ".join(dict.fromkeys(line for line in lines if line))[:600]


def _attempt(provider: Provider, call: Callable[[], object]) -> tuple[object, str | None]:
    """call() -> (its value, None), or (None, the reason) where the provider refused the inputs."""
    try:
        if not provider.may_refuse:
            return call(), None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return call(), None
            except RuntimeError as error:
                return None, _refusal(error, caught)
    except Refused as error:
        return None, str(error)


def fill_speedups(results: list[Result], backward: bool) -> None:
    """Speedups against the eager and compiled rows (forward+backward time, or forward time for
    forward-only cases); None where either time is missing."""
    key = "ms_fwd_bwd" if backward else "ms_fwd"
    eager = next((r for r in results if r.provider == "eager"), None)
    compiled = next((r for r in results if r.provider == "compiled"), None)
    ratio = lambda base, r: (  # noqa: E731
        getattr(base, key) / getattr(r, key) if base is not None and getattr(base, key) and getattr(r, key) else None
    )
    for r in results:
        r.speedup_vs_eager, r.speedup_vs_compiled = ratio(eager, r), ratio(compiled, r)


def run_case(
    case: Case,
    device: torch.device,
    warmup: int,
    repeats: int,
    skip: Callable[[Provider], str | None] | None = None,
    on_result: Callable[[Result], None] | None = None,
    on_error: Callable[[Provider, Exception], None] | None = None,
) -> list[Result]:
    """Every provider of `case` on the same inputs: timings, peak memory, max error vs fp64.

    skip(provider) -> a reason not to run it (the caller records it) or None; on_result(result)
    is called after each provider (speedups are filled in as the eager and compiled rows arrive),
    so a run cut short keeps every provider it finished; on_error(provider, error), where given,
    takes a provider's failure (not a refusal) and the case goes on with the next provider,
    which otherwise raises."""
    if case.max_warmup is not None:
        warmup = min(warmup, case.max_warmup)
    if case.max_repeats is not None:
        repeats = min(repeats, case.max_repeats)
    inputs = case.make_inputs()
    info: dict = {}
    if case.info is not None:
        try:
            info = case.info(inputs)
        except Exception as error:  # a record beside the timings: never worth losing the timings for
            info = {"info_error": f"{type(error).__name__}: {error}"}
    truth = None
    if case.reference_fp64 is not None:
        with torch.no_grad():
            as_fp64 = [
                t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs
            ]
            truth = case.reference_fp64(*as_fp64)
    grad_out = None
    results: list[Result] = []
    for provider in case.providers:
        if skip is not None and skip(provider) is not None:
            continue
        try:
            result, grad_out = _run_provider(case, provider, inputs, info, truth, grad_out, device, warmup, repeats)
        except Exception as error:
            if on_error is None:
                raise
            on_error(provider, error)
            continue
        results.append(result)
        fill_speedups(results, case.backward)
        if on_result is not None:
            on_result(result)
    return results


def _run_provider(
    case: Case,
    provider: Provider,
    inputs: Inputs,
    info: dict,
    truth: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    device: torch.device,
    warmup: int,
    repeats: int,
) -> tuple[Result, torch.Tensor | None]:
    """One provider's row of run_case, and the upstream gradient of the case (drawn from the
    first provider's output that a backward case sees, then shared by every provider)."""
    dtype = str(case.dtype).removeprefix("torch.")
    extra = dict(info)

    def forward(fn=provider.fn):
        with torch.no_grad():
            return fn(*inputs)

    out, refused = _attempt(provider, forward)
    if refused is not None:
        extra["skipped"] = refused
        return Result(case.op, case.shape, dtype, provider.name, *[None] * 8, extra=extra), grad_out
    if case.backward and grad_out is None:
        grad_out = torch.randn_like(out, dtype=case.dtype)
    max_error = None if truth is None else (out.double() - truth).abs().max().item() if truth.numel() else 0.0
    del out
    fwd = time_ms(forward, device, warmup, repeats)
    fwd_bwd: tuple = (None, None, None)
    if case.backward:
        step = lambda: forward_backward(provider.fn, inputs, grad_out, case.parameters)  # noqa: E731
        timed, refused = _attempt(provider, lambda: time_ms(step, device, warmup, repeats))
        if refused is None:
            fwd_bwd = timed
        else:
            extra["skipped_backward"] = refused
    memory_grad = grad_out if fwd_bwd[0] is not None else None  # None: forward only
    peak, refused = _attempt(
        provider, lambda: peak_memory_mb(provider.fn, inputs, memory_grad, device, case.parameters)
    )
    if refused is not None:
        extra["skipped_peak_memory"] = refused
    if provider.stats is not None:
        extra.update(provider.stats())
    return Result(case.op, case.shape, dtype, provider.name, *fwd, *fwd_bwd, peak, max_error, extra=extra), grad_out


# ----------------------------------------------------------------------------- kernel profile

# The record_function ranges that name a group: around a module's forward (its backward is found
# through the autograd nodes its ops recorded), or around a part of a step outside any module.
GROUP_PREFIX = "orca_group::"
STEP_PREFIX = "orca_step::"
BACKWARD_NODE = "autograd::engine::evaluate_function: "
GROUP_WIDTH = 38


def group_range(label: str) -> torch.autograd.profiler.record_function:
    """A profiler range that makes every kernel launched inside it count for group `label` in
    `profile_kernels`'s table (e.g. the optimizer step); its pass is shown as "step"."""
    return torch.autograd.profiler.record_function(STEP_PREFIX + label)


class _GroupHooks:
    """Forward pre/post hooks that open and close a group range around each call of a module."""

    def __init__(self, label: str):
        self.label, self.open = label, []

    def enter(self, module, args):
        self.open.append(torch.autograd.profiler.record_function(GROUP_PREFIX + self.label).__enter__())

    def exit(self, module, args, output):
        if self.open:
            self.open.pop().__exit__(None, None, None)


def _attribute(event, forward_by_seq: dict) -> tuple[str, str]:
    """(group, "fwd" | "bwd" | "step" | "") of a profiler event: the innermost group range around
    it, or for an op run by the autograd engine, the group of the forward op that recorded its node."""
    node = event
    while node is not None:
        if node.name.startswith(GROUP_PREFIX):
            return node.name[len(GROUP_PREFIX) :], "fwd"
        if node.name.startswith(STEP_PREFIX):
            return node.name[len(STEP_PREFIX) :], "step"
        if node.name.startswith(BACKWARD_NODE) and node.sequence_nr >= 0:
            forward = forward_by_seq.get((node.fwd_thread, node.sequence_nr))
            while forward is not None:
                if forward.name.startswith(GROUP_PREFIX):
                    return forward.name[len(GROUP_PREFIX) :], "bwd"
                forward = forward.cpu_parent
            return "other", "bwd"
        node = node.cpu_parent
    return "other", ""


def profile_kernels(
    fn: Callable[..., object],
    inputs: Inputs,
    device: torch.device,
    groups: Sequence[tuple[str, Sequence[nn.Module]]],
    title: str,
    top: int = 25,
) -> str:
    """One call of fn(*inputs) under torch.profiler (after one unprofiled call, so that nothing is
    compiled or allocated for the first time inside it): a table of the time per module group and
    of the `top` costliest kernels, each with its group and direction.

    groups: (label, modules) pairs; a kernel belongs to the innermost group whose module call (or
    `group_range`) launched it, or, in the backward pass, to the group of the forward op whose
    autograd node ran it. On CUDA the kernels are the GPU kernels (their device time); on the CPU,
    which has none, the CPU ops by self time."""
    handles = []
    for label, modules in groups:
        hooks = _GroupHooks(label)
        for module in modules:
            handles.append(module.register_forward_pre_hook(hooks.enter))
            handles.append(module.register_forward_hook(hooks.exit, always_call=True))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with torch.no_grad():
            fn(*inputs)
        synchronize(device)
        with torch.profiler.profile(activities=activities) as prof, torch.no_grad():
            fn(*inputs)
            synchronize(device)
    finally:
        for handle in handles:
            handle.remove()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    forward_by_seq: dict = {}
    for event in events:
        if event.sequence_nr >= 0 and not event.fwd_thread and not event.name.startswith(BACKWARD_NODE):
            forward_by_seq.setdefault((event.thread, event.sequence_nr), event)
    on_gpu = any(event.kernels for event in events)
    per_kernel: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for event in events:
        if on_gpu:
            timed = [(kernel.name, kernel.duration) for kernel in event.kernels]
        elif not event.name.startswith((GROUP_PREFIX, STEP_PREFIX)) and event.self_cpu_time_total > 0:
            timed = [(event.name, event.self_cpu_time_total)]
        else:
            timed = []
        if not timed:
            continue
        group, direction = _attribute(event, forward_by_seq)
        for name, microseconds in timed:
            entry = per_kernel[(group, direction, name)]
            entry[0] += microseconds / 1e3
            entry[1] += 1
    total = sum(ms for ms, _ in per_kernel.values()) or 1.0
    per_group: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for (group, direction, _), (ms, _) in per_kernel.items():
        per_group[group][1 if direction == "bwd" else 0] += ms
    what = "GPU kernels (device time)" if on_gpu else "CPU ops (self CPU time; no GPU kernels here)"
    lines = [f"## {title}", "", f"{what}: {total:.2f} ms in one call", "", "time by module group:", ""]
    w = GROUP_WIDTH
    lines.append(f"{'group':<{w}} {'fwd/step ms':>11} {'bwd ms':>9} {'total ms':>9} {'share':>6}")
    for group, (fwd, bwd) in sorted(per_group.items(), key=lambda item: -sum(item[1])):
        lines.append(f"{group:<{w}} {fwd:11.3f} {bwd:9.3f} {fwd + bwd:9.3f} {(fwd + bwd) / total:6.1%}")
    lines += ["", f"the {top} costliest kernels:", ""]
    lines.append(f"{'group':<{w}} {'pass':<4} {'calls':>5} {'total ms':>9} {'share':>6}  kernel")
    ranked = sorted(per_kernel.items(), key=lambda item: -item[1][0])[:top]
    for (group, direction, name), (ms, calls) in ranked:
        short = name if len(name) <= 110 else name[:107] + "..."
        lines.append(f"{group:<{w}} {direction or '-':<4} {calls:5d} {ms:9.3f} {ms / total:6.1%}  {short}")
    return "\n".join(lines) + "\n"
