"""The benchmark runner (benchmarks/run.py, harness.py) and gpu_check.sh's plan, on the CPU in a few
seconds: every variant is listed for the GPU workload, a subset runs and merges into one results
file, a backend that refuses the inputs is a skipped row with its reason, the attention core
records SDPA's choice, the dispatch table and cuDNN, and the profiler table groups the training
step's kernels by model part. Measuring needs a GPU (gpu_check.sh)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from torch import nn

from benchmarks import run
from benchmarks.harness import Case, Provider, Refused, group_range, profile_kernels, run_case
from orca_kernels import dispatch, kernels_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--device", "cpu", "--quick", "--warmup", "0", "--repeats", "1", "--no-plots"]  # also on a GPU machine


def listing(capsys, *args: str) -> dict[str, str]:
    """`run.py --list` of the GPU workload (built on the meta device): case label -> its line."""
    assert run.main(["--device", "cuda", "--full", "--list", *args]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    return {line.split("]", 1)[1].split("  [")[0].strip(): line for line in lines}


def providers_of(line: str) -> list[str]:
    return [name.split(" (")[0] for name in line.split("  [", 1)[1].split("]")[0].split(", ")]


def test_the_gpu_listing_has_every_variant(capsys):
    ops = "attention_core,decode_step,gated_cross_attention,decoder_layer+injection,model_train_step"
    cases = listing(capsys, "--only", ops)
    core = {label: line for label, line in cases.items() if label.startswith("attention_core")}
    # Three model shapes (head dims 128, 80, 64) by two mask kinds.
    for head_dim in ("d128", "d80", "d64"):
        for mask in ("mask=none", "mask=rows"):
            (line,) = [line for label, line in core.items() if head_dim in label and mask in label]
            expected = ["eager", "triton", "sdpa", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "auto"]
            assert providers_of(line)[: len(expected)] == expected
    for op in ("gated_cross_attention", "decoder_layer+injection"):
        rows = [line for label, line in cases.items() if label.startswith(op)]
        assert len(rows) == 3
        assert all(set(providers_of(line)) == {"eager", "compiled", "orca", "orca+compiled"} for line in rows)
    train = [line for label, line in cases.items() if label.startswith("model_train_step")]
    assert len(train) == 3 and all("orca+compiled" in providers_of(line) for line in train)
    assert sum(label.startswith("decode_step") for label in cases) == 6
    assert not any(label.startswith(("strided_conv1d", "model_generate")) for label in cases)


def test_shapes_run_in_the_order_given_and_providers_are_selected(capsys):
    ops = "gated_cross_attention,decoder_layer+injection"
    cases = listing(capsys, "--only", ops, "--shapes", "qwen3-4b,qwen3-0.6b")
    assert [label.split()[:2] for label in cases] == [
        ["gated_cross_attention", "qwen3-4b"],
        ["decoder_layer+injection", "qwen3-4b"],
        ["gated_cross_attention", "qwen3-0.6b"],
        ["decoder_layer+injection", "qwen3-0.6b"],
    ]
    cases = listing(capsys, "--only", "model_train_step", "--providers", "eager,orca")
    assert all(providers_of(line) == ["eager", "orca"] for line in cases.values())


def test_an_unknown_op_exits_3(capsys):
    assert run.main(["--only", "no_such_case_op", "--list"]) == run.UNKNOWN_OP
    assert "attention_core" in capsys.readouterr().err


def test_every_suite_declares_its_ops():
    ops = run.known_ops()
    for name, suite in run.SUITES.items():
        for case in suite.cases(torch.device("meta"), quick=False):
            assert ops[case.op] == name, case.op


def test_compiled_fused_variants_are_listed_but_not_run_on_the_cpu(capsys):
    assert run.main(["--device", "cpu", "--list", "--only", "decoder_layer+injection,model_train_step"]) == 0
    out = capsys.readouterr().out
    if kernels_available(torch.device("cpu")):  # the fused path runs here (TRITON_INTERPRET=1)
        assert out.count("orca+compiled (not run here)") == 2
        assert "--all-providers runs it" in out
    else:
        assert "orca+compiled" not in out  # no fused path on this CPU at all


def test_attention_core_run_records_choices_refusals_and_metadata(tmp_path):
    assert run.main(["--only", "attention_core", "--out", str(tmp_path), *FAST]) == 0
    (path,) = tmp_path.glob("*.json")
    saved = json.loads(path.read_text())
    meta, rows = saved["metadata"], saved["results"]
    assert meta["dispatch_table"] == dispatch.table_id()
    assert "cudnn" in meta and meta["invocations"][0]["argv"][:2] == ["--only", "attention_core"]
    assert meta["device"].startswith("cpu") and meta["workload"] == "quick"
    by_mask = {mask: [r for r in rows if r["extra"]["mask"] == mask] for mask in ("none", "rows")}
    for found in by_mask.values():
        names = [r["provider"] for r in found]
        assert names[:1] == ["eager"] and {"sdpa", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient"} <= set(names)
        assert ("triton" in names) == kernels_available(torch.device("cpu"))
        for row in found:
            assert set(row["extra"]["sdpa_choice"]) == {"train", "inference"}
        # The CPU has no cuDNN or memory-efficient kernel: refused, with the reason, not a failure.
        refused = {r["provider"]: r for r in found if "skipped" in r["extra"]}
        assert {"sdpa-cudnn", "sdpa-efficient"} <= set(refused)
        assert all(r["ms_fwd"] is None and r["extra"]["skipped"] for r in refused.values())
        measured = [r for r in found if r["provider"] not in refused]
        assert all(r["ms_fwd"] > 0 and r["ms_fwd_bwd"] > 0 and r["max_error"] < 1e-5 for r in measured)
    label = next(iter(meta["cases"]))
    assert meta["cases"][label]["sdpa_choice"]["train"] == "flash_attention"  # PyTorch's CPU flash kernel


def test_subset_invocations_merge_into_one_file(tmp_path, monkeypatch):
    common = ["--only", "attention_core", "--shapes", "quick", "--out", str(tmp_path), *FAST]
    assert run.main([*common, "--providers", "eager"]) == 0
    assert run.main([*common, "--providers", "sdpa,eager"]) == 0
    (path,) = tmp_path.glob("*.json")
    saved = json.loads(path.read_text())
    keys = [(r["shape"].split()[-1], r["provider"]) for r in saved["results"]]
    # eager measured twice (replaced in place), sdpa appended, per mask kind
    assert sorted(keys) == sorted((m, p) for m in ("mask=none", "mask=rows") for p in ("eager", "sdpa"))
    assert len(saved["metadata"]["invocations"]) == 2
    # Another git sha is another setup: a file of its own, the first left as it was.
    monkeypatch.setattr(run, "git_sha", lambda: "another-sha")
    assert run.main([*common, "--providers", "eager"]) == 0
    assert {p.name for p in tmp_path.glob("*.json")} == {path.name, path.name.replace(".json", "-2.json")}
    assert json.loads(path.read_text()) == saved


def test_auto_backend_is_asked_per_mode(monkeypatch):
    from benchmarks.bench_cross_attention import auto_backends

    asked = []

    def attention_backend(q, k, v, mask):
        asked.append((torch.is_grad_enabled() and q.requires_grad, q.shape[1], mask is None))
        return "triton" if q.requires_grad else "sdpa"

    monkeypatch.setattr(dispatch, "attention_backend", attention_backend)
    q, kv = torch.empty(2, 3, 4, 8), torch.empty(2, 5, 4, 8)
    assert auto_backends(q, kv, kv, None) == {}  # not CUDA: auto is not the dispatch table's there
    assert auto_backends(q, kv, kv, None, devices=("cpu",)) == {"train": "triton", "inference": "sdpa"}
    assert asked == [(True, 3, True), (False, 3, True)]


def test_a_refusal_is_a_skipped_row_and_other_errors_propagate():
    def refuse(x):
        raise RuntimeError("no kernel for these inputs")

    case = Case(
        op="toy",
        shape="s",
        dtype=torch.float32,
        make_inputs=lambda: [torch.randn(3, requires_grad=True)],
        providers=[
            Provider("eager", lambda x: 2 * x),
            Provider("picky", refuse, may_refuse=True),
            Provider("refused", lambda x: (_ for _ in ()).throw(Refused("says no"))),
            Provider("skipped", lambda x: x, skip_here="not here"),
        ],
        reference_fp64=lambda x: 2 * x,
        info=lambda inputs: {"numel": inputs[0].numel()},
    )
    seen = []
    rows = run_case(case, torch.device("cpu"), 0, 1, skip=lambda p: p.skip_here, on_result=seen.append)
    assert [r.provider for r in rows] == [r.provider for r in seen] == ["eager", "picky", "refused"]
    assert rows[0].ms_fwd > 0 and rows[0].speedup_vs_eager == 1 and rows[0].extra == {"numel": 3}
    assert rows[1].extra["skipped"] == "no kernel for these inputs" and rows[1].ms_fwd is None
    assert rows[2].extra["skipped"] == "says no" and rows[2].speedup_vs_eager is None
    case.providers = [Provider("broken", refuse), Provider("eager", lambda x: 2 * x)]
    with pytest.raises(RuntimeError, match="no kernel"):
        run_case(case, torch.device("cpu"), 0, 1)
    failed = []  # with on_error, a failure is reported and the next provider still runs
    rows = run_case(case, torch.device("cpu"), 0, 1, on_error=lambda p, e: failed.append((p.name, str(e))))
    assert failed == [("broken", "no kernel for these inputs")] and [r.provider for r in rows] == ["eager"]


def test_profile_groups_forward_backward_and_step():
    encoder, head = nn.Linear(8, 16), nn.Linear(16, 4)
    optimizer = torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.1)

    def step(x):
        with torch.enable_grad():
            head(torch.relu(encoder(x))).sum().backward()
            with group_range("optimizer"):
                optimizer.step()
                optimizer.zero_grad()

    groups = [("enc", [encoder]), ("head", [head])]
    table = profile_kernels(step, [torch.randn(4, 8)], torch.device("cpu"), groups, "toy")
    rows = [line.split() for line in table.split("the 25 costliest kernels:")[1].splitlines() if line.strip()]
    passes = {(row[0], row[1]) for row in rows[1:]}
    assert {("enc", "fwd"), ("enc", "bwd"), ("head", "fwd"), ("head", "bwd"), ("optimizer", "step")} <= passes
    assert ("enc", "bwd", "aten::mm") in {(row[0], row[1], row[-1]) for row in rows[1:]}
    assert encoder._forward_hooks == {} and encoder._forward_pre_hooks == {}  # the hooks are removed


def test_training_step_profile_by_model_part(tmp_path):
    args = ["--only", "model_train_step", "--providers", "eager", "--profile", "--out", str(tmp_path), *FAST]
    assert run.main(args) == 0
    (profile,) = tmp_path.glob("*-profile.txt")
    text = profile.read_text()
    assert "model_train_step quick" in text and "/ eager" in text
    for group in ("encoder (Whisper)", "Q-Former", "LLM layers", "injected cross-attention", "LM head + loss"):
        assert group in text, group
    assert "optimizer (clip + Adafactor)" in text and " step " in text


def test_gpu_check_plan_order_and_slots():
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    subprocess.run(["bash", "-n", script], check=True)
    out = subprocess.run(["bash", script, "--plan"], capture_output=True, text=True, check=True, timeout=30).stdout
    steps = [line.split()[:2] for line in out.splitlines() if line.startswith("  ") and " s " in line]
    names = [name for name, _ in steps]
    assert names == [
        "build",
        "a_tests_cuda",
        "a2_backtrace",
        "b_attention",
        "tune_dispatch",
        "c_module_layer",
        "d_train_step",
        "e1_train_memory",
        "e2_decode_compiled",
        "sanitizer",
    ]
    slots = dict((name, int(slot)) for name, slot in steps)
    assert slots["a_tests_cuda"] <= 90 and slots["tune_dispatch"] <= 90
    assert "450 s deadline" in out


def test_timing_repeats_until_the_spread_is_tight_or_flags_it(monkeypatch):
    """A hiccup among the first calls: more rounds until p80/p20 is within TIGHT_SPREAD; a spread
    that stays loose after MAX_ROUNDS is returned as it is and the table flags the row."""
    from benchmarks import harness, run

    calls = []

    def timed(samples):
        samples = iter(samples)
        monkeypatch.setattr(harness, "_one_call_ms", lambda fn, device: calls.append(1) or next(samples))
        return harness.time_ms(lambda: None, torch.device("cpu"), warmup=0, repeats=5)

    # One slow call in 5 gives p80/p20 = 75; another round of steady calls brings it back.
    median, p20, p80 = timed([75.0, 1.0, 1.0, 1.0, 1.0] + [1.0] * 5)
    assert len(calls) == 10 and p80 <= harness.TIGHT_SPREAD * p20 and median == 1.0
    calls.clear()
    median, p20, p80 = timed([1.0, 3.0] * 10 * harness.MAX_ROUNDS)
    assert len(calls) == 5 * harness.MAX_ROUNDS and harness.unstable(p20, p80)
    row = harness.Result("op", "shape", "float32", "orca", 2.0, p20, p80, None, None, None, 1.0, 0.0)  # fwd only
    assert run.note(row).startswith("UNSTABLE p80/p20")
