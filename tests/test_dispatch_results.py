"""The committed GPU benchmark runs against the dispatch table they were made with: every path
`backend="auto"` picked (the attention core's `auto` rows) is at least 0.95x eager on that card.

A run made before the dispatch existed (no `dispatch_table` in its metadata, like the H200 run of
2026-11-27) is not held to it. The checks themselves are tested on made-up runs, so that this file
fails when a committed run breaks the rule, not only when one is added."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
MIN_RATIO = 0.95


def slow_auto_rows(run: dict) -> list[str]:
    """The `auto` rows of a GPU run made with a dispatch table that are below MIN_RATIO x eager
    (forward and backward where the case has a backward, else the forward), as readable lines."""
    meta = run.get("metadata", {})
    if not meta.get("dispatch_table") or not str(meta.get("device", "")).lower().startswith("nvidia"):
        return []
    found = []
    for row in run.get("results", []):
        if row.get("provider") != "auto" or row.get("speedup_vs_eager") is None:
            continue
        if row["speedup_vs_eager"] < MIN_RATIO:
            picks = (row.get("extra") or {}).get("auto_backend")
            found.append(f"{row['op']} {row['shape']} {row['dtype']}: {row['speedup_vs_eager']:.2f}x eager ({picks})")
    return found


def committed_runs() -> list[Path]:
    return sorted(path for path in RESULTS.glob("*.json") if not path.name.startswith("compile_audit"))


@pytest.mark.parametrize("path", committed_runs(), ids=lambda path: path.name)
def test_committed_runs_keep_auto_at_least_as_fast_as_eager(path):
    slow = slow_auto_rows(json.loads(path.read_text()))
    assert not slow, f"{path.name}: the dispatch table picked a slower path:\n" + "\n".join(slow)


def _run(table, device, ratio, provider="auto"):
    row = {"op": "attention_core", "shape": "qwen3-0.6b", "dtype": "bfloat16", "provider": provider}
    return {
        "metadata": {"device": device, "dispatch_table": table},
        "results": [row | {"speedup_vs_eager": ratio, "extra": {"auto_backend": {"train": "triton"}}}],
    }


def test_the_check_can_fail():
    assert slow_auto_rows(_run("NVIDIA H200 2026-12-05", "NVIDIA H200", 0.9))
    assert not slow_auto_rows(_run("NVIDIA H200 2026-12-05", "NVIDIA H200", 0.96))
    assert not slow_auto_rows(_run(None, "NVIDIA H200", 0.5))  # made before the dispatch existed
    assert not slow_auto_rows(_run("empty", "cpu x86_64 x2", 0.5))  # a CPU run: no GPU dispatch
    assert not slow_auto_rows(_run("empty", "NVIDIA H200", 0.5, provider="triton"))  # not auto's pick
