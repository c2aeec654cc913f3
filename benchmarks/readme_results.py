"""Writes the README's results section from the committed GPU results (never typed by hand).

    python -m benchmarks.readme_results          # rewrite the section in README.md
    python -m benchmarks.readme_results --check  # exit 1 if README.md is out of date (a test runs this)

The newest `benchmarks/results/*.json` measured on a GPU (by its metadata date) becomes a table,
with its plots; CPU runs are never shown (a CPU timing says nothing about a GPU kernel).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
START, END = "<!-- results:start -->", "<!-- results:end -->"


def latest_gpu_run() -> tuple[str, dict] | None:
    runs = []
    for path in glob.glob(os.path.join(RESULTS, "*.json")):
        with open(path) as f:
            run = json.load(f)
        if "metadata" not in run:  # not a benchmark run (the compile audit's reports live here too)
            continue
        if not run["metadata"]["device"].lower().startswith("cpu"):
            runs.append((run["metadata"]["date"], path, run))
    if not runs:
        return None
    _, path, run = max(runs)
    return path, run


def render() -> str:
    found = latest_gpu_run()
    if found is None:
        return (
            "No GPU results are committed yet. `benchmarks/gpu_check.sh` produces them on an H100/H200; "
            "they land in `benchmarks/results/` tagged with card, date, versions and git sha."
        )
    path, run = found
    meta = run["metadata"]
    fmt = lambda v: "–" if v is None else f"{v:.3g}"  # noqa: E731
    lines = [
        f"Measured on **{meta['device']}**, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}, "
        f"git `{meta['git_sha'][:12]}` ({os.path.relpath(path, ROOT)}). Speedups are forward+backward "
        "(forward for decode steps) against the eager reference and `torch.compile(reference)` in the same run.",
        "",
        "| op | shape | dtype | provider | ms fwd | ms fwd+bwd | peak MB | × eager | × compiled |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in run["results"]:
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['provider']} | {fmt(r['ms_fwd'])} "
            f"| {fmt(r['ms_fwd_bwd'])} | {fmt(r['peak_mb'])} | {fmt(r['speedup_vs_eager'])} "
            f"| {fmt(r['speedup_vs_compiled'])} |"
        )
    stem = os.path.relpath(path, ROOT)[: -len(".json")]
    for plot in ("speedup", "memory"):
        if os.path.exists(os.path.join(ROOT, f"{stem}-{plot}.png")):
            lines += ["", f"![{plot}]({stem}-{plot}.png)"]
    return "\n".join(lines)


def updated_readme() -> tuple[str, str]:
    with open(README) as f:
        text = f.read()
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return text, f"{head}{START}\n{render()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md is not up to date")
    args = parser.parse_args(argv)
    current, new = updated_readme()
    if args.check:
        if current != new:
            print("README.md results are out of date: run `python -m benchmarks.readme_results`", file=sys.stderr)
            return 1
        return 0
    with open(README, "w") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
