"""The benchmark suite: `python -m benchmarks.run` (the README's main job).

Runs every op's cases for the current device (the quick workload on the CPU, the model shapes on
a GPU), prints a table and writes `<out>/<device>-<date>.json` and `.csv` (tagged with the device,
library versions, cuDNN version, attention dispatch table and git sha) plus `-speedup.png` and
`-memory.png` plots.

    python -m benchmarks.run --list                       # the cases and providers, run nothing
    python -m benchmarks.run --only attention_core,decode_step --full --budget-s 60 --out DIR
    python -m benchmarks.run --only model_train_step --providers eager,orca --profile

A subset (`--only` case ops, `--shapes` model labels, `--providers` names) writes into the same
files as the rest of the run: an invocation whose output file already holds a run of the same
device, workload, versions and git sha merges into it (a row it measures again is replaced, the
others are kept); any other existing file is left alone and the results go to `<stem>-2.json`, ...
An `--only` naming no case op of any suite exits with status 3 (gpu_check.sh's slots for work not
written yet rely on it).
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
import traceback

import torch

from benchmarks import (
    bench_cross_attention,
    bench_decoder_layer,
    bench_local_branch,
    bench_model,
    bench_ortho_loss,
    bench_strided_conv,
)
from benchmarks.harness import Provider, Result, profile_kernels, run_case, unstable
from orca_kernels import dispatch

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
UNKNOWN_OP = 3  # exit status: --only names no case op of any suite
# The metadata written into every CSV row (the JSON holds the rest: per-case records, invocations).
CSV_METADATA = (
    "device",
    "date",
    "workload",
    "torch",
    "cuda",
    "cudnn",
    "triton",
    "transformers",
    "python",
    "git_sha",
    "dispatch_table",
)


def known_ops() -> dict[str, str]:
    """Every case op -> the suite that makes it (each suite's OPS)."""
    return {op: name for name, suite in SUITES.items() for op in suite.OPS}


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

    meta = {
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "workload": "quick" if quick else "full",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "python": platform.python_version(),
        "git_sha": git_sha(),
    }
    meta.update(dispatch_metadata())
    return meta


def dispatch_metadata() -> dict:
    """Which attention dispatch table `backend="auto"` reads (orca_kernels.dispatch): a run made
    with a table is held to it (tests/test_dispatch_results.py)."""
    return {"dispatch_table": dispatch.table_id()}


def format_table(results: list[Result]) -> str:
    header = [
        "op",
        "shape",
        "dtype",
        "provider",
        "ms fwd",
        "ms fwd+bwd",
        "peak MB",
        "x eager",
        "x compiled",
        "max err",
        "note",
    ]
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
            note(r),
        ]
        for r in results
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def note(r: Result) -> str:
    """The table's note on a row: why a provider was refused, else a timing whose spread stayed
    loose (a number a rerun may not give), the provider's own note and what `backend="auto"` picks."""
    for key, what in (("skipped", "refused"), ("skipped_backward", "backward refused")):
        if key in r.extra:
            reason = r.extra[key]
            return f"{what}: {reason if len(reason) <= 60 else reason[:57] + '...'}"
    notes = []
    spreads = [(r.ms_fwd_p20, r.ms_fwd_p80), (r.ms_fwd_bwd_p20, r.ms_fwd_bwd_p80)]
    loose = [p80 / p20 for p20, p80 in spreads if unstable(p20, p80)]
    if loose:
        notes.append(f"UNSTABLE p80/p20 {max(loose):.2f}")
    if r.extra.get("note"):  # the provider's own (Provider.stats), e.g. a generation's time to first token
        notes.append(str(r.extra["note"]))
    if r.extra.get("auto_backend"):
        notes.append("auto: " + " ".join(f"{mode}={pick}" for mode, pick in r.extra["auto_backend"].items()))
    return "; ".join(notes)


def plot(results: list, meta: dict, stem: str) -> list[str]:
    """Speedup and memory charts of the rows (Result or their dicts), readable at a page's width:
    one panel per op, horizontal bars, one group per shape, one bar per provider (refused rows
    are left out, and say so in the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r.row() if isinstance(r, Result) else r for r in results]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colours = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    paths = []
    for metric, title, filename in [
        ("speedup_vs_eager", "speedup vs eager (forward+backward where there is one; higher is better)", "speedup"),
        ("peak_mb", "peak memory, MB (lower is better)", "memory"),
    ]:
        panels = []
        for op in ops:
            shapes = list(dict.fromkeys(r["shape"] for r in rows if r["op"] == op))
            bars = [
                (shape, r["provider"], r[metric])
                for shape in shapes
                for r in rows
                if r["op"] == op and r["shape"] == shape and r.get(metric) is not None
            ]
            if bars:
                panels.append((op, shapes, bars))
        if not panels:
            continue
        heights = [0.9 + 0.22 * len(bars) + 0.15 * len(shapes) for _, shapes, bars in panels]
        fig, axes = plt.subplots(
            len(panels), 1, figsize=(9, sum(heights)), gridspec_kw={"height_ratios": heights}, squeeze=False
        )
        for ax, (op, shapes, bars) in zip(axes[:, 0], panels, strict=True):
            y, seen = 0.0, set()
            for shape in shapes:
                positions = []
                for bar_shape, provider, value in bars:
                    if bar_shape == shape:
                        ax.barh(y, value, color=colours[provider], label=None if provider in seen else provider)
                        ax.text(value, y, f" {value:.3g}", va="center", fontsize=7)
                        seen.add(provider)
                        positions.append(y)
                        y -= 1
                if positions:  # the shape's name beside its group of bars
                    middle = sum(positions) / len(positions)
                    ax.text(
                        -0.01, middle, shape, ha="right", va="center", fontsize=7, transform=ax.get_yaxis_transform()
                    )
                y -= 0.6
            ax.set_yticks([])
            if metric == "speedup_vs_eager":
                ax.axvline(1.0, color="gray", linewidth=0.8)
            ax.set_title(op, fontsize=9, loc="left")
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
            ax.tick_params(axis="x", labelsize=7)
        fig.suptitle(f"{title}\n{meta['device']}, {meta['date']}, {meta['git_sha'][:12]}", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / sum(heights)))  # room for the two-line title
        fig.subplots_adjust(left=0.3, right=0.84)
        path = f"{stem}-{filename}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def split_names(values: list[str] | None) -> list[str]:
    """`--only a,b c` -> ["a", "b", "c"]."""
    return [name for value in values or [] for name in value.split(",") if name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    workload = parser.add_mutually_exclusive_group()
    workload.add_argument("--quick", action="store_true", help="small shapes (the default on the CPU)")
    workload.add_argument(
        "--full", action="store_true", help="the model shapes of docs/model-shapes.md (the default on a GPU)"
    )
    parser.add_argument("--ops", nargs="*", choices=sorted(SUITES), help="only these suites")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="OP",
        help="only the cases of these ops, comma-separated (e.g. attention_core,decode_step; see --list); "
        f"exit status {UNKNOWN_OP} when none of them is a case op of any suite",
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        metavar="LABEL",
        help="only the cases of these model shapes, run shape by shape in this order (e.g. qwen3-0.6b,qwen3-4b)",
    )
    parser.add_argument(
        "--providers", nargs="+", metavar="NAME", help="only these providers, comma-separated (e.g. eager,orca)"
    )
    parser.add_argument(
        "--all-providers",
        action="store_true",
        help="also run the providers this device skips by default "
        "(torch.compile around the interpreted kernels on the CPU)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="a torch.profiler table of the costliest kernels by model part, for the cases that define one "
        "(model_train_step: eager and orca), written to <out>/<device>-<date>-profile.txt",
    )
    parser.add_argument("--out", default=os.environ.get("OUT_DIR", RESULTS_DIR), help="folder for JSON/CSV/PNG")
    parser.add_argument("--no-plots", action="store_true", help="write the JSON and CSV only")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--list", action="store_true", help="list the cases and providers with a rough time estimate; run nothing"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no provider after this many seconds, and say which were skipped (results so far are kept)",
    )
    args = parser.parse_args(argv)

    only, shapes, chosen = split_names(args.only), split_names(args.shapes), split_names(args.providers)
    ops = known_ops()
    if only and not set(only) & set(ops):
        print(f"no benchmark case op named {', '.join(only)}; the case ops are: {', '.join(ops)}", file=sys.stderr)
        return UNKNOWN_OP
    unknown = [op for op in only if op not in ops]
    if unknown:
        print(f"not a case op (ignored): {', '.join(unknown)}", file=sys.stderr)

    device = torch.device(args.device)
    quick = args.quick or (not args.full and device.type == "cpu")
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cpu" else 10)
    repeats = args.repeats if args.repeats is not None else (5 if device.type == "cpu" else 30)
    meta = metadata(device, quick)
    print(
        f"orca-kernels benchmarks on {meta['device']} ({meta['workload']} workload), torch {meta['torch']}, "
        f"triton {meta['triton']}, cuDNN {meta['cudnn']}, dispatch table {meta['dispatch_table']}, "
        f"git {meta['git_sha']}",
        flush=True,
    )

    build_on = device
    if args.list and device.type == "cuda" and not torch.cuda.is_available():
        # Rehearsal without a GPU: the CUDA cases are built on the meta device (no memory, no
        # kernels), which lists them with their shapes and providers.
        build_on = torch.device("meta")
        print("no CUDA device here: listing the CUDA cases as built on the meta device")
    suites = [
        name
        for name, suite in SUITES.items()
        if (not args.ops or name in args.ops) and (not only or set(only) & set(suite.OPS))
    ]
    cases = []
    for name in suites:
        for case in SUITES[name].cases(build_on, quick):
            if case.op not in SUITES[name].OPS:
                raise RuntimeError(f"benchmarks.bench suite {name!r} makes op {case.op!r}, missing from its OPS")
            if (not only or case.op in only) and (not shapes or case.shape.split()[0] in shapes):
                cases.append(case)
    if shapes:  # shape-major, in the order given: a budget cut drops the last shapes, not a suite
        cases.sort(key=lambda case: shapes.index(case.shape.split()[0]))

    def skip_reason(provider: Provider) -> str | None:
        """Why a provider is not run here, or None; deselected providers are not reported."""
        if provider.skip_here and not args.all_providers:
            return f"skipped on this device: {provider.skip_here} (--all-providers runs it)"
        return None

    def selected(case) -> list[Provider]:
        return [p for p in case.providers if not chosen or p.name in chosen]

    if args.list:
        total = 0.0
        for i, case in enumerate(cases, 1):
            providers = selected(case)
            runs = [p for p in providers if skip_reason(p) is None]
            seconds = estimated_seconds(case, device, runs)
            total += seconds
            names = ", ".join(p.name + ("" if skip_reason(p) is None else " (not run here)") for p in providers)
            print(f"[{i}/{len(cases)}] {case_label(case)}  [{names}]  ~{seconds:.0f} s")
            for p in providers:
                if skip_reason(p) is not None:
                    print(f"      {p.name}: {skip_reason(p)}")
        print(
            f"{len(cases)} cases, roughly {total / 60:.1f} min "
            "(an estimate: compile time dominates and is not measured)"
        )
        return 0

    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", meta["device"].lower()).strip("-")
    stem, previous = results_file(os.path.join(args.out, f"{slug}-{datetime.date.today().isoformat()}"), meta)
    invocation = {
        "date": meta["date"],
        "argv": list(sys.argv[1:] if argv is None else argv),
        "git_sha": meta["git_sha"],
        "dispatch_table": meta.get("dispatch_table"),
    }
    results: list[Result] = []
    case_info: dict[str, dict] = {}
    skipped: list[dict] = []
    failures: list[str] = []
    profile_path = f"{stem}-profile.txt"
    profiled = False
    start = time.perf_counter()

    def save() -> None:  # after every provider: a run cut short keeps what it measured
        write_results(*merged(previous, meta, results, case_info, skipped, invocation), stem)

    current = 0
    interrupted = False
    try:
        for i, case in enumerate(cases, 1):
            current = i
            label = case_label(case)
            if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                left = cases[i - 1 :]
                skipped.extend({"case": case_label(c), "provider": None, "reason": "time budget"} for c in left)
                break
            print(f"[{i}/{len(cases)}] {label}", flush=True)
            names = frozenset(p.name for p in selected(case))

            def skip(provider: Provider, label=label, names=names) -> str | None:
                if provider.name not in names:
                    return "not selected"
                reason = skip_reason(provider)
                if reason is None and args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                    reason = "time budget"
                if reason is not None:
                    skipped.append({"case": label, "provider": provider.name, "reason": reason})
                    print(f"  {provider.name}: {reason}", flush=True)
                return reason

            def on_result(result: Result, case=case, label=label) -> None:
                nonlocal profiled
                results.append(result)
                case_info[label] = {key: value for key, value in result.extra.items() if not key.startswith("skipped")}
                save()
                groups = case.profile_groups(result.provider) if args.profile and case.profile_groups else None
                if groups and result.ms_fwd is not None:
                    provider = next(p for p in case.providers if p.name == result.provider)
                    where = f"{meta['device']}, {meta['date']}, git {meta['git_sha'][:12]}"
                    title = f"{label} / {result.provider} ({where})"
                    table = profile_kernels(provider.fn, case.make_inputs(), device, groups, title)
                    with open(profile_path, "a" if profiled else "w") as f:
                        f.write(table + "\n")
                    profiled = True
                    print(table, flush=True)

            def on_error(provider: Provider | None, error: Exception, label=label) -> None:
                # A failure is recorded and the run goes on: the other providers and cases still count.
                traceback.print_exception(error)
                reason = (
                    f"error: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                )
                skipped.append({"case": label, "provider": provider.name if provider else None, "reason": reason[:500]})
                failures.append(label)
                print(f"  {provider.name if provider else 'case'}: FAILED ({reason[:200]})", flush=True)

            try:
                run_case(case, device, warmup, repeats, skip=skip, on_result=on_result, on_error=on_error)
            except Exception as error:  # making the inputs or the fp64 reference failed
                on_error(None, error)
            save()
    except KeyboardInterrupt:  # gpu_check.sh's slot ended (SIGINT): keep what was measured, say what was not
        interrupted = True
        remaining = cases[max(current, 1) - 1 :]
        skipped.extend({"case": case_label(c), "provider": None, "reason": "interrupted"} for c in remaining)
        print(f"interrupted during case {current} of {len(cases)}", flush=True)
    if not cases:
        print("no case to run")
    all_results = merged(previous, meta, results, case_info, skipped, invocation)[0]
    print(format_table(results))
    save()
    if skipped:
        print(f"skipped {len(skipped)} case(s) or provider(s):")
        for s in skipped:
            print(f"  {s['case']}{' / ' + s['provider'] if s['provider'] else ''}: {s['reason']}")
        if any(s["reason"] == "time budget" for s in skipped):
            print(f"time budget of {args.budget_s:.0f} s spent")
    written = [f"{stem}.json", f"{stem}.csv"]
    if all_results and not args.no_plots:
        written += plot(all_results, meta, stem)
    if profiled:
        written.append(profile_path)
    print("wrote " + ", ".join(written))
    if failures:
        print(f"FAILED: {len(failures)} provider(s) or case(s) raised (their errors are above and in the skipped list)")
    return 130 if interrupted else 1 if failures else 0


def case_label(case) -> str:
    return f"{case.op} {case.shape} {str(case.dtype).removeprefix('torch.')}"


def estimated_seconds(case, device: torch.device, providers=None) -> float:
    """A rough time for one case: torch.compile of a provider takes ~20 s on a GPU (~40 s on the
    CPU) and dominates; the timed calls themselves take a few seconds."""
    providers = case.providers if providers is None else providers
    compiles = sum(1 for provider in providers if "compiled" in provider.name)
    per_compile = 20.0 if device.type == "cuda" else 40.0
    return compiles * per_compile * (2 if case.backward else 1) + 3.0 * len(providers)


def _mergeable(old: dict, new: dict) -> bool:
    """Whether two runs' metadata describe the same setup (their rows belong in one file): the
    device, workload, versions and commit; a working tree dirtied in between (gpu_check.sh's
    dispatch tuning rewrites a tracked file) is the same commit, and each invocation records its
    own sha and dispatch table."""
    keys = ("device", "workload", "torch", "triton")
    commit = lambda meta: str(meta.get("git_sha", "")).removesuffix("-dirty")  # noqa: E731
    return all(old.get(key) == new.get(key) for key in keys) and commit(old) == commit(new)


def results_file(base: str, meta: dict) -> tuple[str, dict | None]:
    """The stem to write (base, or base-2, base-3, ... where base holds another setup's run) and
    the run already there to merge into (None: a new file)."""
    stem, n = base, 1
    while os.path.exists(f"{stem}.json"):
        try:
            with open(f"{stem}.json") as f:
                previous = json.load(f)
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous is not None and _mergeable(previous.get("metadata", {}), meta):
            return stem, previous
        n += 1
        stem = f"{base}-{n}"
    return stem, None


def merged(
    previous: dict | None,
    meta: dict,
    results: list[Result],
    case_info: dict,
    skipped: list[dict],
    invocation: dict,
) -> tuple[list[dict], dict]:
    """(rows, metadata) of `previous` (a run loaded from the file, or None) with this invocation's
    results: a row measured again replaces the old one in place, new rows follow; the skipped list
    drops what has now been measured; the per-case records and the invocations accumulate."""
    key = lambda row: (row["op"], row["shape"], row["dtype"], row["provider"])  # noqa: E731
    rows = {key(row): row for row in (previous or {}).get("results", [])}
    for result in results:
        rows[key(result.row())] = result.row()
    old_meta = (previous or {}).get("metadata", {})
    measured = {(f"{row['op']} {row['shape']} {row['dtype']}", row["provider"]) for row in map(Result.row, results)}
    done_cases = {case for case, _ in measured}
    old_skipped = [
        s
        for s in old_meta.get("skipped", [])
        if isinstance(s, dict)
        and (s["case"], s["provider"]) not in measured
        and not (s["provider"] is None and s["case"] in done_cases)
    ]
    new_meta = {
        **old_meta,
        **meta,
        "cases": {**old_meta.get("cases", {}), **case_info},
        "invocations": [*old_meta.get("invocations", []), {**invocation, "skipped": len(skipped)}],
        "skipped": old_skipped + [s for s in skipped if s["reason"] != "not selected"],
    }
    if not new_meta["skipped"]:
        del new_meta["skipped"]
    return list(rows.values()), new_meta


def write_results(rows: list, meta: dict, stem: str) -> None:
    """JSON and CSV of the rows (Result or their dicts), tagged with the run's metadata."""
    rows = [r.row() if isinstance(r, Result) else r for r in rows]
    with open(f"{stem}.json", "w") as f:
        json.dump({"metadata": meta, "results": rows}, f, indent=2)
    scalar_meta = {key: meta.get(key) for key in CSV_METADATA}
    with open(f"{stem}.csv", "w", newline="") as f:
        fields = [*scalar_meta, *(rows[0] if rows else {})]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**scalar_meta, **row, "extra": json.dumps(row.get("extra", {}), sort_keys=True)})


if __name__ == "__main__":
    sys.exit(main())
