"""One rank of tests/test_distributed.py: `python tests/distributed_worker.py RANK SPEC_JSON`.

Joins a gloo process group on the CPU (MASTER_ADDR / MASTER_PORT from the environment, 60 s
collective timeout) and runs the spec's scenarios in order, the same on every rank. Each
scenario builds a fresh DeSTA25AudioModel on the tiny checkpoints, loads the spec's trainable
weights, turns dropout off, wraps the model (DDP or FSDP2 `fully_shard`), runs `steps` training
steps on this rank's half of the batch (forward, `total_training_loss`, backward) and saves to
`{out}/{scenario}_rank{rank}.pt`: the full gradient of every trainable parameter after the first
step (None where there is none), the type and ORCA loss names of the output DDP / FSDP2 handed
back, how many steps completed, the error that stopped a step (if any) and how often the fused
ops ran. The parent process compares these against a single-process run.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import transformers
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import interpreter_speedup
import orca_kernels
from call_counts import count_calls
from orca_kernels._utils import triton_interpret
from orca_model import DeSTA25AudioModel, total_training_loss
from tiny_models import build

if triton_interpret():
    interpreter_speedup.install()

FUSED_OPS = ("local_branch", "ortho_losses", "project_audio_kv")


def disable_dropout(model: nn.Module) -> None:
    """Every nn.Dropout to p = 0 (the Q-Former's are 0.1), so that a step is deterministic."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def load_model(spec: dict, scenario: dict) -> DeSTA25AudioModel:
    torch.manual_seed(0)
    model = build(spec["checkpoints"], "qwen3", use_fused_orca=scenario["fused"], **scenario.get("overrides", {}))
    if scenario.get("init", True):
        state = torch.load(spec["init"], weights_only=True)
        result = model.load_state_dict(state)
        assert not result.missing_keys and not result.unexpected_keys, result
    disable_dropout(model)
    model.train()
    return model


def shard(model: DeSTA25AudioModel, world_size: int) -> DeSTA25AudioModel:
    """FSDP2 on a CPU mesh: each cross-attention module and the connector are their own groups
    (their parameters are all-gathered for their own forward and their gradients reduce-scattered
    as their backward ends); the root group holds the frozen LLM and encoder."""
    mesh = init_device_mesh("cpu", (world_size,))
    for module in model.orca_cross_attns:
        fully_shard(module, mesh=mesh)
    fully_shard(model.perception.connector, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_gradients(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """name -> the whole gradient of each trainable parameter (FSDP2's sharded DTensor gradients
    gathered: a collective, in the same order on every rank)."""
    grads = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        grad = param.grad
        if isinstance(grad, DTensor):
            grad = grad.full_tensor()
        grads[name] = None if grad is None else grad.detach().clone()
    return grads


def count_fused_calls() -> dict[str, int]:
    """Counts of the fused ops' entry points (orca_model calls them through the package), so the
    parent can tell the fused path really ran."""
    return count_calls(orca_kernels, FUSED_OPS)


def run_scenario(spec: dict, scenario: dict, rank: int, batch: dict, calls: dict[str, int]) -> dict:
    model = load_model(spec, scenario)
    if scenario["wrapper"] == "ddp":
        wrapped = DistributedDataParallel(model, find_unused_parameters=scenario["find_unused"])
    else:
        wrapped = shard(model, spec["world_size"])
    before = dict(calls)
    result = {"grads": None, "output_type": None, "orca_losses": None, "steps": 0, "error": None}
    for step in range(scenario.get("steps", 1)):
        try:
            model.zero_grad(set_to_none=True)
            outputs = wrapped(**batch)
            if step == 0:
                result["output_type"] = type(outputs).__name__
                result["orca_losses"] = sorted(getattr(outputs, "orca_losses", None) or {})
            total_training_loss(outputs).backward()
        except RuntimeError as error:
            if not scenario.get("may_fail"):
                raise
            result["error"] = f"step {step}: {error}"  # for the parent to check
            break
        if step == 0:
            result["grads"] = full_gradients(model)
        result["steps"] = step + 1
    result["fused_calls"] = {name: calls[name] - before[name] for name in FUSED_OPS}
    return result


def main(rank: int, spec_path: str) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    transformers.logging.disable_progress_bar()  # a failure's log is the parent's error message
    with open(spec_path) as file:
        spec = json.load(file)
    dist.init_process_group(
        "gloo", init_method="env://", rank=rank, world_size=spec["world_size"], timeout=timedelta(seconds=60)
    )
    try:
        batch = torch.load(spec["batches"], weights_only=True)[rank]
        calls = count_fused_calls()
        for scenario in spec["scenarios"]:
            start = time.perf_counter()
            result = run_scenario(spec, scenario, rank, batch, calls)
            print(f"{scenario['name']}: {time.perf_counter() - start:.1f} s", flush=True)
            torch.save(result, os.path.join(spec["out"], f"{scenario['name']}_rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]), sys.argv[2])
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # no waiting on the other rank's collectives
