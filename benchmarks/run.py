"""The benchmark suite: `python -m benchmarks.run` (the README's main job).

Runs every op's cases for the current device (the quick workload on the CPU, the model shapes on
a GPU), prints a table and writes `<out>/<device>-<date>.json` and `.csv` (tagged with the device,
library versions and git sha) plus `-speedup.png` and `-memory.png` plots.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch

from benchmarks import (
    bench_cross_attention,
    bench_decoder_layer,
    bench_local_branch,
    bench_model,
    bench_ortho_loss,
    bench_strided_conv,
)
from benchmarks.harness import Result, run_case

# Suites whose fused path has no CPU kernel return no cases, or no "orca" provider, on the CPU.
SUITES = {
    "strided_conv1d": bench_strided_conv,
    "ortho_losses": bench_ortho_loss,
    "gated_cross_attention": bench_cross_attention,
    "local_branch": bench_local_branch,
    "decoder_layer": bench_decoder_layer,
    "model": bench_model,
}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        # --list may name a CUDA device on a machine without one (gpu_check.sh --dry-run)
        return torch.cuda.get_device_name(device) if torch.cuda.is_available() else "cuda (no device here)"
    return f"cpu {platform.machine()} x{os.cpu_count()}"


def git_sha() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metadata(device: torch.device, quick: bool) -> dict:
    def version(module: str) -> str:
        try:
            return __import__(module).__version__
        except ImportError:
            return "not installed"

    return {
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "workload": "quick" if quick else "full",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "python": platform.python_version(),
        "git_sha": git_sha(),
    }


def format_table(results: list[Result]) -> str:
    header = ["op", "shape", "dtype", "provider", "ms fwd", "ms fwd+bwd", "peak MB", "x eager", "x compiled", "max err"]
    fmt = lambda v: "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = [
        [
            r.op,
            r.shape,
            r.dtype,
            r.provider,
            fmt(r.ms_fwd),
            fmt(r.ms_fwd_bwd),
            fmt(r.peak_mb),
            fmt(r.speedup_vs_eager),
            fmt(r.speedup_vs_compiled),
            "-" if r.max_error is None else f"{r.max_error:.2e}",
        ]
        for r in results
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plot(results: list[Result], meta: dict, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r.op, r.shape) for r in results))
    providers = list(dict.fromkeys(r.provider for r in results))
    by_key = {(r.op, r.shape, r.provider): r for r in results}
    paths = []
    for metric, title, filename in [
        ("speedup_vs_eager", "forward+backward speedup vs eager (higher is better)", "speedup"),
        ("peak_mb", "peak memory, MB (lower is better)", "memory"),
    ]:
        fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(cases)), 4))
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            values = [getattr(by_key.get((op, shape, provider)), metric, None) or 0.0 for op, shape in cases]
            ax.bar([c + i * width for c in range(len(cases))], values, width, label=provider)
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
        ax.set_xticklabels([f"{op}\n{shape}" for op, shape in cases], fontsize=7)
        if metric == "speedup_vs_eager":
            ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_title(f"{title}\n{meta['device']}, {meta['date']}, {meta['git_sha'][:12]}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = f"{stem}-{filename}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    workload = parser.add_mutually_exclusive_group()
    workload.add_argument("--quick", action="store_true", help="small shapes (the default on the CPU)")
    workload.add_argument(
        "--full", action="store_true", help="the model shapes of docs/model-shapes.md (the default on a GPU)"
    )
    parser.add_argument("--ops", nargs="*", choices=sorted(SUITES), help="only these ops")
    parser.add_argument("--out", default=os.environ.get("OUT_DIR", RESULTS_DIR), help="folder for JSON/CSV/PNG")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--list", action="store_true", help="list the cases with a rough time estimate; run nothing")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop starting new cases after this many seconds, and say which were skipped (results so far are kept)",
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    quick = args.quick or (not args.full and device.type == "cpu")
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cpu" else 10)
    repeats = args.repeats if args.repeats is not None else (5 if device.type == "cpu" else 30)
    meta = metadata(device, quick)
    print(
        f"orca-kernels benchmarks on {meta['device']} ({meta['workload']} workload), torch {meta['torch']}, "
        f"triton {meta['triton']}, git {meta['git_sha']}",
        flush=True,
    )

    build_on = device
    if args.list and device.type == "cuda" and not torch.cuda.is_available():
        # Rehearsal without a GPU: the CUDA cases are built on the meta device (no memory, no
        # kernels), which lists them with their shapes and providers.
        build_on = torch.device("meta")
        print("no CUDA device here: listing the CUDA cases as built on the meta device")
    cases = [
        case
        for name, suite in SUITES.items()
        if not args.ops or name in args.ops
        for case in suite.cases(build_on, quick)
    ]
    if args.list:
        total = 0.0
        for i, case in enumerate(cases, 1):
            seconds = estimated_seconds(case, device)
            total += seconds
            print(f"[{i}/{len(cases)}] {case_label(case)}  ~{seconds:.0f} s")
        print(
            f"{len(cases)} cases, roughly {total / 60:.1f} min "
            "(an estimate: compile time dominates and is not measured)"
        )
        return 0

    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", meta["device"].lower()).strip("-")
    stem = os.path.join(args.out, f"{slug}-{datetime.date.today().isoformat()}")
    results: list[Result] = []
    start = time.perf_counter()
    skipped: list[str] = []
    for i, case in enumerate(cases, 1):
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            skipped = [case_label(c) for c in cases[i - 1 :]]
            break
        print(f"[{i}/{len(cases)}] {case_label(case)}", flush=True)
        results += run_case(case, device, warmup, repeats)
        write_results(results, meta, stem)  # case by case: a run cut short keeps what it measured
    print(format_table(results))
    if skipped:
        meta["skipped"] = skipped
        write_results(results, meta, stem)
        print(f"time budget of {args.budget_s:.0f} s spent: skipped {len(skipped)} of {len(cases)} cases:")
        print("\n".join(f"  {label}" for label in skipped))
    written = [f"{stem}.json", f"{stem}.csv"] + (plot(results, meta, stem) if results else [])
    print("wrote " + ", ".join(written))
    return 0


def case_label(case) -> str:
    return f"{case.op} {case.shape} {str(case.dtype).removeprefix('torch.')}"


def estimated_seconds(case, device: torch.device) -> float:
    """A rough time for one case: torch.compile of a provider takes ~20 s on a GPU (~40 s on the
    CPU) and dominates; the timed calls themselves take a few seconds."""
    compiles = sum(1 for provider in case.providers if provider.name.startswith("compiled"))
    per_compile = 20.0 if device.type == "cuda" else 40.0
    return compiles * per_compile * (2 if case.backward else 1) + 3.0 * len(case.providers)


def write_results(results: list[Result], meta: dict, stem: str) -> None:
    """JSON and CSV of the results so far, tagged with the run's metadata."""
    with open(f"{stem}.json", "w") as f:
        json.dump({"metadata": meta, "results": [r.row() for r in results]}, f, indent=2)
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*meta, *results[0].row()] if results else list(meta))
        writer.writeheader()
        for r in results:
            writer.writerow({**meta, **r.row()})


if __name__ == "__main__":
    sys.exit(main())
