"""Data-parallel training of DeSTA25AudioModel with DDP and FSDP2, 2 CPU processes over gloo.

Two ranks (tests/distributed_worker.py, launched with subprocess) each run one training step
(LM + ORCA losses, `total_training_loss`) on their half of a batch; their gradients must equal
those of one process on the whole batch. The halves are two `make_batch` batches of the same
shape (same padding, same transcription lengths, so the same number of label tokens and of
transcription spans): every loss is then a mean over equally many terms on each rank (the LM
loss over label tokens, the ortho losses over audios, the alignment loss over spans), so the
average of the two ranks' losses, which is what DDP's and FSDP2's gradient averaging computes,
is the whole batch's loss. Dropout is off (the Q-Former's is 0.1) and everything is fp32.

What is pinned down:
- DDP (find_unused_parameters=False) and FSDP2 (`fully_shard` on each cross-attention module,
  the connector and the root, on a CPU device mesh) give the single-process gradients of every
  trainable parameter, with the fused ops (under TRITON_INTERPRET=1) and without.
- Those gradients hold the ORCA losses: they differ from the LM loss's alone in the global
  branch, the local branch and every cross-attention module but the last (layer i's alignment
  loss reads the hidden state before module i's injection, so it reaches modules 0..i-1 only).
- find_unused_parameters=False is enough for the default config (every trainable parameter
  gets a gradient; DDP runs a second step without complaint), and with zero loss weights; the
  config without local tokens and without global tokens in the memory (orca_local_enabled=False,
  orca_global_cross_attn=False) leaves the cross-attention modules unused and needs
  find_unused_parameters=True.
- `outputs.orca_losses` survives DDP's output handling with find_unused_parameters=True (DDP
  flattens and rebuilds the output there).

The whole run is bounded: a 60 s timeout on every collective, and the parent kills the workers
after WORKER_TIMEOUT_S and fails with their stderr.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from child_process import CHECKOUT, child_environment
from distributed_worker import FUSED_OPS, load_model
from orca_kernels._utils import triton_interpret
from orca_model import total_training_loss
from tiny_models import build, make_batch

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
WORLD_SIZE = 2
WORKER_TIMEOUT_S = 300
LENGTH = 10  # prompt tokens: short, the interpreter's cost grows with the rows
TRANSCRIPTIONS = (2, 1)  # one span per audio: the per-layer alignment loss is on
ORCA_LOSSES = ["L_align_layerwise", "L_ortho_diversity", "L_ortho_qformer_local"]
NUM_LAYERS = 2  # decoder layers of the tiny Qwen3: one cross-attention module each
RTOL, ATOL = 1e-5, 1e-6
# The fused ops run on the CPU only through the Triton interpreter.
FUSED = [False, True] if triton_interpret() else [False]
# No local tokens and no global tokens in the memory: the cross-attention has no memory to read.
NO_MEMORY = {"orca_local_enabled": False, "orca_global_cross_attn": False}


def scenarios() -> list[dict]:
    """What the workers run, in order. The fused ones are the expensive ones (interpreter)."""
    runs = []
    for fused in FUSED:
        tag = "fused" if fused else "unfused"
        # Unfused, two steps: DDP checks at the start of the second that the first one's reduction
        # finished. (The fused path's graph reaches the same parameters: every one has a gradient.)
        steps = 1 if fused else 2
        runs.append({"name": f"ddp_{tag}", "wrapper": "ddp", "fused": fused, "find_unused": False, "steps": steps})
        runs.append({"name": f"fsdp2_{tag}", "wrapper": "fsdp2", "fused": fused})
    runs += [
        {"name": "ddp_find_unused", "wrapper": "ddp", "fused": False, "find_unused": True},
        # A model of another config: its own weights, the same on both ranks (seeded, and DDP broadcasts).
        {"name": "no_memory_ddp", "wrapper": "ddp", "fused": False, "find_unused": False, "steps": 2, "may_fail": True},
        {"name": "no_memory_ddp_find_unused", "wrapper": "ddp", "fused": False, "find_unused": True, "steps": 2},
    ]
    for scenario in runs:
        if scenario["name"].startswith("no_memory"):
            scenario.update(overrides=NO_MEMORY, init=False)
    return runs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def halves() -> list[dict]:
    """Each rank's batch: same shapes, padding and transcription lengths, different tokens and audio."""
    return [make_batch(2, LENGTH, TRANSCRIPTIONS, seed=rank + 1) for rank in range(WORLD_SIZE)]


def concatenate(parts: list[dict]) -> dict:
    """The whole batch: the halves' rows one after the other (audio positions moved with their rows)."""
    whole = {key: torch.cat([part[key] for part in parts]) for key in ("input_ids", "attention_mask", "labels")}
    whole["batch_features"] = torch.cat([part["batch_features"] for part in parts])
    whole["batch_transcription_ids"] = [ids for part in parts for ids in part["batch_transcription_ids"]]
    whole["batch_start_positions"] = []
    offset = 0
    for part in parts:
        whole["batch_start_positions"] += [(row + offset, start) for row, start in part["batch_start_positions"]]
        offset += part["input_ids"].size(0)
    return whole


def initial_weights(checkpoints) -> dict[str, torch.Tensor]:
    """Trainable weights moved off their initialisation, so that every parameter shapes the
    loss (the gate's last Linear starts at zero, which gives gate_proj.0 a zero gradient)."""
    model = build(checkpoints, "qwen3")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
        for module in model.orca_cross_attns:
            module.gate_proj[2].weight.copy_(0.5 * torch.randn(module.gate_proj[2].weight.shape, generator=generator))
            module.ln.weight.mul_(4)
    return model.state_dict()


@contextmanager
def one_thread():
    """The parent computes while the two workers run: one thread each on a small machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def single_process(spec: dict, batch: dict, fused: bool) -> dict[str, torch.Tensor]:
    """The gradients of the total loss on the whole batch in this process."""
    model = load_model(spec, {"fused": fused})
    outputs = model(**batch)
    assert sorted(outputs.orca_losses) == ORCA_LOSSES
    total_training_loss(outputs).backward()
    return {name: model.get_parameter(name).grad for name in model.trainable_parameter_names}


def lm_loss_gradients(spec: dict, batch: dict) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(The gradients of the LM loss alone on the whole batch in this process, the trainable
    parameters the ORCA losses reach in its autograd graph), unfused: the interpreter's backward
    is the slow part of a fused step, the ORCA losses' share of the gradient is orders of
    magnitude above the fused ops' rounding, and which parameters a loss reaches is a property of
    the graph, not of the kernels' rounding."""
    model = load_model(spec, {"fused": False})
    outputs = model(**batch)
    names = model.trainable_parameter_names
    parameters = [model.get_parameter(name) for name in names]
    orca_loss = sum(outputs.orca_losses.values())
    orca_grads = torch.autograd.grad(orca_loss, parameters, retain_graph=True, allow_unused=True)
    outputs.loss.backward()
    reached = {name for name, grad in zip(names, orca_grads, strict=True) if grad is not None}
    return {name: parameter.grad for name, parameter in zip(names, parameters, strict=True)}, reached


def missing_gradients(checkpoints, batch: dict, **overrides) -> list[str]:
    """The trainable parameters that get no gradient from one single-process step (unfused)."""
    torch.manual_seed(0)
    model = build(checkpoints, "qwen3", **overrides)
    model.train()
    total_training_loss(model(**batch)).backward()
    return [name for name, param in model.named_parameters() if param.requires_grad and param.grad is None]


def wait(workers: list[subprocess.Popen], deadline: float) -> bool:
    """Wait for every worker until `deadline` (time.monotonic()), or until one fails (the
    others would wait for it until the collective timeout). False if the deadline passed."""
    while time.monotonic() < deadline:
        codes = [worker.poll() for worker in workers]
        if all(code == 0 for code in codes) or any(code not in (None, 0) for code in codes):
            return True
        time.sleep(0.1)
    return False


def stop(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.kill()
    for worker in workers:
        worker.wait()


def stop_and_read(workers: list[subprocess.Popen], logs: list) -> list[str]:
    """Stop the workers, close their log files and return each rank's last 6000 characters."""
    stop(workers)
    output = []
    for rank, log in enumerate(logs):
        log.seek(0)
        output.append(f"--- rank {rank} ---\n{log.read()[-6000:]}")
        log.close()
    return output


@pytest.fixture(scope="module")
def run(checkpoints, tmp_path_factory) -> dict:
    """The distributed runs and their single-process references (`distributed_runs`), computed
    once per test session: under pytest-xdist the tests of this module are spread over several
    workers, and the first to get here computes them for all (40 s of work, on a machine whose
    cores the two distributed workers already need)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return distributed_runs(checkpoints, tmp_path_factory.mktemp("distributed"))
    shared = tmp_path_factory.getbasetemp().parent  # every xdist worker's base temp is in it
    results = shared / "distributed_runs.pt"
    with FileLock(str(shared / "distributed_runs.lock")):
        if not results.exists():
            torch.save(distributed_runs(checkpoints, tmp_path_factory.mktemp("distributed")), results)
    return torch.load(results, weights_only=False)  # written by this session's tests


def distributed_runs(checkpoints, directory: Path) -> dict:
    """Launch the two workers, compute the single-process references meanwhile, wait for the
    workers (killed after WORKER_TIMEOUT_S) and load their results."""
    parts = halves()
    spec = {
        "world_size": WORLD_SIZE,
        "checkpoints": checkpoints,
        "init": str(directory / "init.pt"),
        "batches": str(directory / "batches.pt"),
        "out": str(directory),
        "scenarios": scenarios(),
    }
    torch.save(initial_weights(checkpoints), spec["init"])
    torch.save(parts, spec["batches"])
    (directory / "spec.json").write_text(json.dumps(spec))

    env = child_environment(WORKER.parent, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    workers, logs = [], []
    try:
        for rank in range(WORLD_SIZE):
            log = open(directory / f"rank{rank}.log", "w+")  # noqa: SIM115 (closed below)
            logs.append(log)
            workers.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), str(rank), str(directory / "spec.json")],
                    cwd=CHECKOUT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        whole = concatenate(parts)
        with one_thread():
            references = {fused: single_process(spec, whole, fused) for fused in FUSED}
            lm_only, orca_reached = lm_loss_gradients(spec, whole)
            missing = {
                "default": missing_gradients(checkpoints, whole),
                "zero weights": missing_gradients(
                    checkpoints,
                    whole,
                    orca_ortho_diversity_weight=0.0,
                    orca_ortho_weight_qformer_local=0.0,
                    orca_align_weight_local=0.0,
                ),
                "local memory only": missing_gradients(checkpoints, whole, orca_global_cross_attn=False),
                "no local tokens": missing_gradients(checkpoints, whole, orca_local_enabled=False),
                "no memory": missing_gradients(checkpoints, whole, **NO_MEMORY),
            }
        timed_out = not wait(workers, deadline)
    finally:
        output = stop_and_read(workers, logs)
    codes = [worker.returncode for worker in workers]
    if timed_out or any(codes):
        why = f"timed out after {WORKER_TIMEOUT_S} s" if timed_out else f"exit codes {codes}"
        pytest.fail(f"distributed workers failed ({why}):\n" + "\n".join(output))
    results = {
        scenario["name"]: [
            torch.load(directory / f"{scenario['name']}_rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)
        ]
        for scenario in spec["scenarios"]
    }
    return {
        "results": results,
        "references": references,
        "lm_only": lm_only,
        "orca_reached": orca_reached,
        "missing": missing,
    }


def tag(fused: bool) -> str:
    return "fused" if fused else "unfused"


def assert_same_gradients(ranks: list[dict], expected: dict[str, torch.Tensor]) -> None:
    """Both ranks hold the same, whole gradient of every trainable parameter, the expected one."""
    for rank, result in enumerate(ranks):
        assert result["error"] is None, f"rank {rank}: {result['error']}"
        grads = result["grads"]
        assert list(grads) == list(expected), f"rank {rank}: other trainable parameters"
        for name, grad in grads.items():
            assert grad is not None, f"rank {rank}: {name} got no gradient"
            torch.testing.assert_close(grad, expected[name], rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
            assert torch.equal(grad, ranks[0]["grads"][name]), f"{name}: the ranks disagree"


def assert_fused_ran(ranks: list[dict], fused: bool) -> None:
    # Per forward: one local branch, one fused ortho call, one audio K/V projection per layer.
    per_step = {"local_branch": 1, "ortho_losses": 1, "project_audio_kv": NUM_LAYERS}
    for result in ranks:
        steps = result["steps"]
        assert result["fused_calls"] == {op: per_step[op] * steps if fused else 0 for op in FUSED_OPS}


def test_halves_weigh_the_same():
    """What makes the average of the ranks' losses the whole batch's: each half has as many
    label tokens (after the causal LM's shift), audios and transcription spans as the other."""
    parts = halves()
    counts = [(part["labels"][:, 1:] != -100).sum().item() for part in parts]
    assert counts[0] == counts[1] > 0
    assert [len(part["batch_start_positions"]) for part in parts] == [2, 2]
    spans = [[ids.numel() for ids in part["batch_transcription_ids"]] for part in parts]
    assert spans[0] == spans[1] == list(TRANSCRIPTIONS)
    assert not torch.equal(parts[0]["input_ids"], parts[1]["input_ids"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("fused", FUSED, ids=tag)
def test_gradients_equal_single_process(run, fused, strategy):
    ranks = run["results"][f"{strategy}_{tag(fused)}"]
    assert_same_gradients(ranks, run["references"][fused])
    assert_fused_ran(ranks, fused)
    for result in ranks:
        assert result["output_type"] == "DeSTA25Output"
        assert result["orca_losses"] == ORCA_LOSSES


@pytest.mark.parametrize("fused", FUSED, ids=tag)
def test_orca_losses_are_in_the_gradients(run, fused):
    """The distributed gradients are not the LM loss's: each part's differs by far more than the
    tolerance (the ortho losses reach the connector's branches, the alignment losses the
    cross-attention modules), except the last cross-attention module's. Layer i's alignment
    loss reads the hidden state before module i's injection, so it reaches modules 0..i-1 and
    the connector but not module i: the last module learns from the LM loss alone, which the
    autograd graph shows exactly (its gradient equals the LM loss's only up to the rounding of
    the two paths, fused in parallel against unfused in one process)."""
    grads = run["results"][f"ddp_{tag(fused)}"][0]["grads"]
    lm_only, reached = run["lm_only"], run["orca_reached"]
    parts: dict[str, list[str]] = {}
    for name in grads:
        if name.startswith("orca_cross_attns."):
            part = ".".join(name.split(".")[:2])
        else:
            part = "local branch" if name.startswith("perception.connector.local_") else "global branch"
        parts.setdefault(part, []).append(name)
    assert len(parts) == 2 + NUM_LAYERS
    last = f"orca_cross_attns.{NUM_LAYERS - 1}"
    for part, names in parts.items():
        if part == last:
            assert not reached & set(names), f"{part}: an ORCA loss reaches the last cross-attention module"
        else:
            assert reached & set(names), f"{part}: no ORCA loss reaches it"
            difference = max((grads[n] - lm_only[n]).norm() / lm_only[n].norm().clamp(min=1e-12) for n in names)
            assert difference > 1e-2, f"{part}: the ORCA losses add nothing to the distributed gradient"


def test_find_unused_parameters_false_is_enough(run):
    """Every trainable parameter takes part in the default config's step (some get a zero
    gradient at initialisation, gate_proj.0 behind the zero gate weight, but a gradient), also
    with the ORCA loss weights at zero (a weighted loss stays in the graph), so DDP's reduction
    finishes and it runs a second step with find_unused_parameters=False."""
    assert run["missing"]["default"] == []
    assert run["missing"]["zero weights"] == []
    assert run["missing"]["local memory only"] == []
    assert run["missing"]["no local tokens"] == []
    for fused in FUSED:
        for rank, result in enumerate(run["results"][f"ddp_{tag(fused)}"]):
            assert result["error"] is None, f"rank {rank}: {result['error']}"
            assert all(grad is not None for grad in result["grads"].values())
            assert result["steps"] == (1 if fused else 2)


def test_no_memory_config_needs_find_unused_parameters(run):
    """Without local tokens and without global tokens in the memory the injection hooks have no
    memory and no cross-attention module runs: their parameters get no gradient, DDP with
    find_unused_parameters=False never finishes the first step's reduction and refuses the
    second step; with find_unused_parameters=True both steps run."""
    missing = run["missing"]["no memory"]
    assert missing and all(name.startswith("orca_cross_attns.") for name in missing)
    assert len(missing) == NUM_LAYERS * 10  # every parameter of every cross-attention module
    for result in run["results"]["no_memory_ddp"]:
        assert result["steps"] == 1
        assert result["error"].startswith("step 1:") and "finished reduction" in result["error"], result["error"]
    ranks = run["results"]["no_memory_ddp_find_unused"]
    for rank, result in enumerate(ranks):
        assert result["error"] is None and result["steps"] == 2, f"rank {rank}: {result['error']}"
        assert sorted(name for name, grad in result["grads"].items() if grad is None) == sorted(missing)
        for name, grad in result["grads"].items():
            assert grad is None or torch.equal(grad, ranks[0]["grads"][name]), f"{name}: not reduced"


def test_orca_losses_survive_ddp_find_unused_parameters(run):
    """With find_unused_parameters=True DDP flattens the output and rebuilds it; the ORCA losses
    are fields of DeSTA25Output, so they come back (the reference's plain attribute did not),
    and the gradients are those of the whole batch."""
    ranks = run["results"]["ddp_find_unused"]
    for result in ranks:
        assert result["output_type"] == "DeSTA25Output"
        assert result["orca_losses"] == ORCA_LOSSES
    assert_same_gradients(ranks, run["references"][False])
