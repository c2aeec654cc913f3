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

Kernels are timed inside their op (`_forward`, or `_backward` for dK/dV and dQ, the other kernel
on its current setting), so a winner is the fastest end to end, launch overheads included.
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
from orca_kernels import _tuned
from orca_kernels import flash_attention as attention

TABLE = Path(attention.__file__).with_name("_tuned.py")
PHASES = {"decode": 1, "prefill": 300}  # query rows: one decode step, a training sequence
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Launch:
    kernel: str  # "fwd", "dkdv" or "dq"
    model: ModelShape
    phase: str
    dtype: torch.dtype

    @property
    def head_dim(self) -> int:
        return self.model.hidden // self.model.heads

    @property
    def width(self) -> int:
        """The head width the kernels tile (main + tail blocks), as `_configs` receives it."""
        return attention.head_width(self.head_dim)

    def key(self, capability: tuple[int, int]) -> str:
        return attention.tuning_key(self.kernel, self.dtype, PHASES[self.phase], self.width, capability)


def launches(dtypes: list[torch.dtype]) -> list[Launch]:
    """One per kernel, dtype, head width and phase (models sharing a width are measured once)."""
    seen, result = set(), []
    for dtype, model, phase, kernel in itertools.product(dtypes, MODELS, PHASES, ("fwd", "dkdv", "dq")):
        launch = Launch(kernel, model, phase, dtype)
        identity = (kernel, dtype, launch.width, phase)
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
    q = torch.randn(batch, text, hidden, device=device, dtype=dtype).unflatten(-1, (heads, launch.head_dim))
    kv = torch.randn(batch, model.audio_tokens, 2 * hidden, device=device, dtype=dtype)
    k, v = (kv[..., i * hidden : (i + 1) * hidden].unflatten(-1, (heads, launch.head_dim)) for i in (0, 1))
    scale = launch.head_dim**-0.5
    out, lse = attention._forward(q, k, v, None, scale)
    return q, k, v, out, lse, torch.randn_like(out), scale


def measure(launch: Launch, device: torch.device, capability: tuple[int, int]) -> tuple[dict, float, float, int]:
    """(best config, its ms, the heuristic's ms, candidates that failed to compile)."""
    import triton.testing

    q, k, v, out, lse, grad_out, scale = _inputs(launch, device)
    if launch.kernel == "fwd":
        run = lambda: attention._forward(q, k, v, None, scale)  # noqa: E731
    else:
        run = lambda: attention._backward(q, k, v, None, out, lse, grad_out, scale)  # noqa: E731
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


def render(table: dict[str, dict[str, int]], header: str) -> str:
    """The source of orca_kernels/_tuned.py holding `table`."""
    body = pprint.pformat(dict(sorted(table.items())), width=110, sort_dicts=False)
    return (
        '"""Launch settings measured by `python -m benchmarks.tune` on a GPU (generated; edit by rerunning it).\n\n'
        "TUNED maps a launch key (`flash_attention.tuning_key`: kernel, sm, dtype, head width, phase) to the\n"
        "keyword arguments of the fastest candidate measured for it. A key that is absent uses the\n"
        f'kernel\'s heuristics.\n\n{header}\n"""\n\nTUNED: dict[str, dict[str, int]] = {body}\n'
    )


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
    args = parser.parse_args(argv)
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
    start = time.monotonic()
    for index, launch in enumerate(todo, 1):
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: {len(todo) - index + 1} launches left unmeasured")
            break
        best, best_ms, heuristic_ms, failed = measure(launch, device, capability)
        table[launch.key(capability)] = best
        print(
            f"[{index}/{len(todo)}] {launch.key(capability)}: {best_ms * 1e3:.1f} us "
            f"(heuristic {heuristic_ms * 1e3:.1f} us, {heuristic_ms / best_ms:.2f}x) {best}"
            + (f", {failed} candidates did not compile" if failed else ""),
            flush=True,
        )
    card = torch.cuda.get_device_name(device)
    versions = f"torch {torch.__version__}, triton {__import__('triton').__version__}"
    header = f"Last measured on {card} (sm{capability[0]}{capability[1]}), {versions}, {datetime.date.today()}."
    args.out.write_text(render(table, header))
    print(f"wrote {len(table)} entries to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
