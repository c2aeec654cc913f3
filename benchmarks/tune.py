"""Measured launch settings: `python -m benchmarks.tune` (GPU).

For every launch of the flash cross-attention kernels at the model shapes (the compile audit's
MODELS: forward, dK/dV and dQ, decode and prefill, bf16 by default) it times candidate tile and
warp settings on the current GPU, the heuristic's own setting first, and writes the fastest of
each into orca_kernels/_tuned.py, which `flash_attention._configs` reads before its heuristics.
Entries measured on other cards (other sm) are kept. Candidates that do not compile (too much
shared memory, too many registers) are skipped and counted.

    python -m benchmarks.tune                  # measure, then write orca_kernels/_tuned.py
    python -m benchmarks.tune --dry-run        # list the launches and candidates (no GPU needed)
    python -m benchmarks.tune --out FILE       # write somewhere else (and keep _tuned.py as it is)
    python -m benchmarks.tune --widths 80 --budget-s 240   # part of the work, within a time budget
    python -m benchmarks.tune --dispatch       # the attention dispatch table instead (see below)

Kernels are timed inside their op (`_forward`, or `_backward` for dK/dV and dQ, the other kernel
on its current setting), so a winner is the fastest end to end, launch overheads included.

--dispatch measures what `backend="auto"` chooses between on this card (orca_kernels.dispatch):
for each model shape, mode (train: forward and backward together, since the Triton backward needs
the Triton forward's logsumexp; inference; decode) and mask kind, the vendor path (SDPA as the
package calls it, PyTorch choosing its backend) and the Triton kernels (their current launch
settings), each timed REPEATS times after a warm-up (median and 80th percentile, CUDA events) with
its peak memory; SDPA forced to cuDNN, flash and memory-efficient attention is timed beside them
for the record. It writes orca_kernels/_dispatch_table.py, keeping other cards' entries; the rule
that turns an entry into a choice is `dispatch.triton_wins`, applied when the table is read.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import pprint
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.compile_audit import MODELS, ModelShape
from orca_kernels import _dispatch_table, _tuned, dispatch
from orca_kernels import flash_attention as attention

TABLE = Path(attention.__file__).with_name("_tuned.py")
DISPATCH_TABLE = Path(attention.__file__).with_name("_dispatch_table.py")
REPEATS = 25
# The forward, the two-kernel backward's dK/dV and dQ kernels, and the one-pass backward.
KERNELS = ("fwd", "dkdv", "dq", "bwd")
PHASES = {"decode": 1, "prefill": 300}  # query rows: one decode step, a training sequence
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Launch:
    kernel: str  # one of KERNELS
    model: ModelShape
    phase: str
    dtype: torch.dtype

    @property
    def width(self) -> int:
        """The head width the kernels tile (main + tail blocks), as `_configs` receives it."""
        return attention.head_width(self.model.head_dim)

    def key(self, capability: tuple[int, int]) -> str:
        return attention.tuning_key(self.kernel, self.dtype, PHASES[self.phase], self.width, capability)


def launches(dtypes: list[torch.dtype]) -> list[Launch]:
    """One per kernel, dtype, head width and phase (models sharing a width are measured once)."""
    seen, result = set(), []
    for dtype, model, phase, kernel in itertools.product(dtypes, MODELS, PHASES, KERNELS):
        launch = Launch(kernel, model, phase, dtype)
        identity = (kernel, dtype, launch.width, phase)
        if kernel == "bwd" and launch.width > attention.ONE_PASS_MAX_WIDTH:
            continue  # the one-pass backward does not take this head width
        if identity not in seen:
            seen.add(identity)
            result.append(launch)
    return result


def candidates(launch: Launch, capability: tuple[int, int]) -> Iterator[dict[str, int]]:
    """The heuristic's setting, then a grid of tiles, warps and pipeline stages."""
    heuristic = attention.heuristic_configs(launch.dtype, PHASES[launch.phase], launch.width, capability)
    yield heuristic[launch.kernel]
    if launch.kernel == "fwd":
        rows = (16,) if launch.phase == "decode" else (32, 64, 128)
        grid = itertools.product(rows, (32, 64, 128), (4, 8), (2, 3, 4))
    else:
        grid = itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (1, 2, 3))
    for block_m, block_n, warps, stages in grid:
        config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
        if config != heuristic[launch.kernel]:
            yield config


def _inputs(launch: Launch, device: torch.device):
    """q, k, v as the module passes them (views of projections), out, lse, grad_out."""
    model, dtype = launch.model, launch.dtype
    batch, hidden, heads = model.batch, model.hidden, model.heads
    text = PHASES[launch.phase]
    q = torch.randn(batch, text, hidden, device=device, dtype=dtype).unflatten(-1, (heads, launch.model.head_dim))
    kv = torch.randn(batch, model.audio_tokens, 2 * hidden, device=device, dtype=dtype)
    k, v = (kv[..., i * hidden : (i + 1) * hidden].unflatten(-1, (heads, launch.model.head_dim)) for i in (0, 1))
    scale = launch.model.head_dim**-0.5
    out, lse = attention._forward(q, k, v, None, scale)
    return q, k, v, out, lse, torch.randn_like(out), scale


def measure(launch: Launch, device: torch.device, capability: tuple[int, int]) -> tuple[dict, float, float, int]:
    """(best config, its ms, the heuristic's ms, candidates that failed to compile)."""
    import triton.testing

    q, k, v, out, lse, grad_out, scale = _inputs(launch, device)
    if launch.kernel == "fwd":
        run = lambda: attention._forward(q, k, v, None, scale)  # noqa: E731
    else:
        one_pass = launch.kernel == "bwd"
        run = lambda: attention._backward(q, k, v, None, out, lse, grad_out, scale, one_pass=one_pass)  # noqa: E731
    key = launch.key(capability)
    previous = _tuned.TUNED.pop(key, None)
    timings, failed = [], 0
    try:
        for config in candidates(launch, capability):
            _tuned.TUNED[key] = config
            try:
                timings.append((triton.testing.do_bench(run, warmup=5, rep=20), config))
            except Exception:  # OutOfResources, a register or shared-memory limit of this card
                failed += 1
    finally:
        _tuned.TUNED.pop(key, None)
        if previous is not None:
            _tuned.TUNED[key] = previous
    heuristic_ms = timings[0][0] if timings else float("nan")
    best_ms, best = min(timings, key=lambda pair: pair[0])
    return best, best_ms, heuristic_ms, failed


def backward_layouts(measured: dict[Launch, float], capability: tuple[int, int]) -> dict[str, dict[str, int]]:
    """The backward layout entries ("flash_layout/..." -> {"one_pass": 0 or 1}) where both layouts
    were measured: each dK/dV or dQ timing is the whole two-kernel backward (with the other kernel
    on its setting), the "bwd" timing the one-pass backward."""
    entries = {}
    for launch, one_pass_ms in measured.items():
        if launch.kernel != "bwd":
            continue
        two_kernel = [
            ms for other, ms in measured.items() if other.kernel in ("dkdv", "dq") and _same_site(other, launch)
        ]
        if two_kernel:
            key = attention.tuning_key("layout", launch.dtype, PHASES[launch.phase], launch.width, capability)
            entries[key] = {"one_pass": int(one_pass_ms < min(two_kernel))}
    return entries


def _same_site(a: Launch, b: Launch) -> bool:
    return (a.dtype, a.width, a.phase) == (b.dtype, b.width, b.phase)


def render(table: dict[str, dict[str, int]], header: str) -> str:
    """The source of orca_kernels/_tuned.py holding `table`."""
    body = pprint.pformat(dict(sorted(table.items())), width=110, sort_dicts=False)
    return (
        '"""Launch settings measured by `python -m benchmarks.tune` on a GPU (generated; edit by rerunning it).\n\n'
        "TUNED maps a launch key (`flash_attention.tuning_key`: kernel, sm, dtype, head width, phase) to the\n"
        "keyword arguments of the fastest candidate measured for it. A key that is absent uses the\n"
        f'kernel\'s heuristics.\n\n{header}\n"""\n\nTUNED: dict[str, dict[str, int]] = {body}\n'
    )


# ----------------------------------------------------------------------------- the dispatch table


@dataclass(frozen=True)
class DispatchCase:
    """One key of the dispatch table at a model shape: mode, mask kind, dtype."""

    model: ModelShape
    mode: str
    mask_kind: str
    dtype: torch.dtype

    @property
    def query_rows(self) -> int:
        return 1 if self.mode == "decode" else PHASES["prefill"]

    @property
    def batch(self) -> int:
        return 8 if self.mode == "decode" else self.model.batch  # decode: the serving benchmark's batch

    def key(self, card: str) -> str:
        width = attention.head_width(self.model.head_dim)
        return dispatch.table_key(
            card, self.mode, self.dtype, width, self.mask_kind, self.query_rows, self.model.audio_tokens
        )


def dispatch_cases(dtypes: list[torch.dtype], widths: list[int] | None = None) -> list[DispatchCase]:
    return [
        DispatchCase(model, mode, mask_kind, dtype)
        for dtype, model, mode, mask_kind in itertools.product(dtypes, MODELS, dispatch.MODES, dispatch.MASK_KINDS)
        if widths is None or attention.head_width(model.head_dim) in widths
    ]


def _dispatch_inputs(case: DispatchCase, device: torch.device):
    """Leaves (the Q projection, the packed K/V projection), the q, k, v views the module passes,
    the mask (every key of the last batch rows but one padded: rows without audio) and grad_out."""
    model, hd = case.model, case.model.head_dim
    train = case.mode == "train"
    q_proj = torch.randn(case.batch, case.query_rows, model.hidden, device=device, dtype=case.dtype)
    kv = torch.randn(case.batch, model.audio_tokens, 2 * model.hidden, device=device, dtype=case.dtype)
    leaves = [t.requires_grad_(train) for t in (q_proj, kv)]
    q = q_proj.unflatten(-1, (model.heads, hd))
    k, v = (kv[..., i * model.hidden : (i + 1) * model.hidden].unflatten(-1, (model.heads, hd)) for i in (0, 1))
    mask = None
    if case.mask_kind == "keys":
        mask = torch.zeros(case.batch, model.audio_tokens, dtype=torch.bool, device=device)
        mask[:, model.audio_tokens * 3 // 4 :] = True  # a quarter of the keys padded, as shorter clips give
    grad_out = torch.randn(case.batch, case.query_rows, model.heads, hd, device=device, dtype=case.dtype)
    return leaves, (q, k, v), mask, grad_out


def time_call(run, repeats: int = REPEATS) -> tuple[float, float, float]:
    """(median ms, 80th percentile ms, peak MiB above the memory in use before) of `run`."""
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, (4 * len(times)) // 5)], peak


def measure_dispatch(case: DispatchCase, device: torch.device) -> dict:
    """The table entry of `case`: both paths' (median, p80) ms and peak MiB, and the forced SDPA
    backends' medians (None where a backend refuses the inputs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    leaves, qkv, mask, grad_out = _dispatch_inputs(case, device)

    def runner(backend: str):
        def run():
            out = attention.flash_cross_attention(*qkv, mask, backend=backend)
            if case.mode == "train":
                torch.autograd.grad(out, leaves, grad_out)

        return run

    entry: dict = {}
    for backend in ("sdpa", "triton"):
        median, p80, peak = time_call(runner(backend))
        entry[f"{backend}_ms"] = [round(median, 5), round(p80, 5)]
        entry[f"{backend}_peak_mib"] = round(peak, 2)
    forced = {}
    for name, kind in (
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        try:
            with sdpa_kernel([kind]):
                forced[name] = round(time_call(runner("sdpa"), repeats=10)[0], 5)
        except RuntimeError:  # this backend does not take these inputs (a mask, a head dim, a dtype)
            forced[name] = None
    entry["sdpa_forced_ms"] = forced
    return entry


def triton_version() -> str:
    import triton

    return triton.__version__


def render_dispatch(table: dict[str, dict], table_id: str, header: str) -> str:
    """The source of orca_kernels/_dispatch_table.py holding `table`."""
    body = pprint.pformat(dict(sorted(table.items())), width=110, sort_dicts=False)
    return (
        '"""Attention-core timings measured by `python -m benchmarks.tune --dispatch` on a GPU (generated;\n'
        "edit by rerunning it). `orca_kernels.dispatch` reads it: keys and the rule are described there.\n\n"
        f'{header}\n"""\n\nTABLE_ID = {table_id!r}\n\nTABLE: dict[str, dict] = {body}\n'
    )


def run_dispatch(args, dtypes: list[torch.dtype]) -> int:
    todo = dispatch_cases(dtypes, args.widths)
    if args.dry_run:
        for case in todo:
            print(f"{case.key('<card>')}  ({case.model.name}, B{case.batch}): sdpa, triton, sdpa forced")
        return 0
    if not torch.cuda.is_available() or attention.KERNELS_INTERPRETED:
        print("benchmarks.tune measures on a GPU (without TRITON_INTERPRET); use --dry-run to list", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    card = torch.cuda.get_device_name(device)
    table = dict(_dispatch_table.TABLE)
    start = time.monotonic()
    for index, case in enumerate(todo, 1):
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: {len(todo) - index + 1} cases left unmeasured")
            break
        entry = measure_dispatch(case, device)
        table[case.key(card)] = entry
        choice = "triton" if dispatch.triton_wins(entry) else "sdpa"
        print(f"[{index}/{len(todo)}] {case.key(card)}: {entry} -> {choice}", flush=True)
        out = args.out if args.out != TABLE else DISPATCH_TABLE
        versions = f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, triton {triton_version()}"
        today = datetime.date.today()
        header = f"Last measured on {card}, {versions}, {today}: {index} of {len(todo)} cases."
        out.write_text(render_dispatch(table, f"{card} {today}", header))  # after every case: a cut run keeps its part
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16"])
    parser.add_argument("--dry-run", action="store_true", help="list launches and candidates; measure nothing")
    parser.add_argument("--out", type=Path, default=TABLE, help="the table to write (default: orca_kernels/_tuned.py)")
    parser.add_argument(
        "--widths", type=int, nargs="+", help="only these head widths (main + tail blocks: 64, 80, 128)"
    )
    parser.add_argument(
        "--budget-s", type=float, help="start no launch after this many seconds; what was measured is still written"
    )
    parser.add_argument(
        "--dispatch", action="store_true", help="measure the attention dispatch table (orca_kernels/_dispatch_table.py)"
    )
    args = parser.parse_args(argv)
    if args.dispatch:
        return run_dispatch(args, [DTYPES[name] for name in args.dtypes])
    todo = [
        launch
        for launch in launches([DTYPES[name] for name in args.dtypes])
        if launch.width in (args.widths or [launch.width])
    ]

    if args.dry_run:
        for capability in ((9, 0), (8, 0)):
            for launch in todo:
                count = sum(1 for _ in candidates(launch, capability))
                print(f"{launch.key(capability)}  ({launch.model.name}): {count} candidates")
        return 0
    if not torch.cuda.is_available() or attention.KERNELS_INTERPRETED:
        print("benchmarks.tune measures on a GPU (without TRITON_INTERPRET); use --dry-run to list", file=sys.stderr)
        return 2

    device = torch.device("cuda")
    capability = torch.cuda.get_device_capability(device)
    table = dict(_tuned.TUNED)
    measured: dict[Launch, float] = {}
    start = time.monotonic()
    for index, launch in enumerate(todo, 1):
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: {len(todo) - index + 1} launches left unmeasured")
            break
        best, best_ms, heuristic_ms, failed = measure(launch, device, capability)
        table[launch.key(capability)] = best
        measured[launch] = best_ms
        print(
            f"[{index}/{len(todo)}] {launch.key(capability)}: {best_ms * 1e3:.1f} us "
            f"(heuristic {heuristic_ms * 1e3:.1f} us, {heuristic_ms / best_ms:.2f}x) {best}"
            + (f", {failed} candidates did not compile" if failed else ""),
            flush=True,
        )
    table.update(backward_layouts(measured, capability))
    card = torch.cuda.get_device_name(device)
    versions = f"torch {torch.__version__}, triton {__import__('triton').__version__}"
    header = f"Last measured on {card} (sm{capability[0]}{capability[1]}), {versions}, {datetime.date.today()}."
    args.out.write_text(render(table, header))
    print(f"wrote {len(table)} entries to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
