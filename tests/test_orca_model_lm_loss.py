"""The LM loss without logits (`orca_model.lm_loss`) and Liger's kernels in the LLM instance
(`orca_model.liger`, `DeSTA25Trainer(use_liger_kernel=True)`).

The loss against Hugging Face's (`ForCausalLMLoss` on the LM head's logits, what the inner Qwen3 /
Llama computes): the label shift, ignore_index -100, the mean or the sum over
`num_items_in_batch`; fp32 to RELATIVE_TOLERANCE, bf16 autocast within LOW_PRECISION_FACTOR x
HF's error against fp64 (`assert_no_worse_than_unfused`); the gradients of the hidden states,
the LM head's weight, inputs_embeds (where the connector's audio tokens enter) and every
trainable parameter (LoRA's included); what backward keeps (no [tokens, vocab] tensor); the
model's outputs (no logits in training, logits in evaluation); FSDP2 with 2 processes over gloo,
the tied LM head sharded.

Liger: patched into one LLM instance only (a Qwen3 / Llama built after it is HF's, bit for bit;
transformers' module-level names are untouched), the patched LLM giving the unpatched one's
loss and gradients; the Trainer applying it. Liger's kernels are Triton: they run where the
`triton_device` fixture exists (CUDA, or the CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, Qwen3ForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from orca_model import DeSTA25AudioModel, total_training_loss
from orca_model.lm_loss import FusedLinearCrossEntropyLoss, causal_lm_loss, default_chunk_rows
from tiny_models import VOCAB, build, llm_config, make_batch, to_device, whisper_config
from tolerances import (
    MODEL_RELATIVE_TOLERANCE,
    RELATIVE_TOLERANCE,
    assert_no_worse_than_unfused,
    relative_error,
)

HIDDEN = 64
FP32 = RELATIVE_TOLERANCE[torch.float32]
LENGTH = 10  # prompt tokens of the model tests: the interpreter's cost grows with the rows
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None


def random_inputs(batch=3, length=11, seed=0, dtype=torch.float32):
    """hidden [B, T, H], an LM head [V, H] and labels with the collator's -100s: left padding and
    a prompt (row 0), a cut response (row 2)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, HIDDEN, generator=generator).to(dtype)
    weight = (0.2 * torch.randn(VOCAB, HIDDEN, generator=generator)).to(dtype)
    labels = torch.randint(0, VOCAB, (batch, length), generator=generator)
    labels[0, :4] = -100
    labels[2, -3:] = -100
    return hidden, weight, labels


def hf_loss(hidden, weight, labels, num_items_in_batch=None):
    """What the inner LLM computes: its LM head, then transformers' ForCausalLMLoss."""
    return ForCausalLMLoss(F.linear(hidden, weight), labels, weight.size(0), num_items_in_batch=num_items_in_batch)


def fp64_loss(hidden, weight, labels, num_items_in_batch=None):
    """The truth: the shifted cross-entropy in fp64 (ForCausalLMLoss itself computes in fp32)."""
    logits = F.linear(hidden.double(), weight.double())[:, :-1].reshape(-1, weight.size(0))
    targets = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    count = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return total / count


def loss_and_grads(loss_fn, hidden, weight, labels, *, weight_grad=True, scale=1.0, **kwargs):
    """(loss, d(scale·loss)/d hidden, d/d weight) on fresh leaves."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_(weight_grad)
    loss = loss_fn(hidden, weight, labels, **kwargs)
    (scale * loss).backward()
    return loss.detach(), hidden.grad, weight.grad


# ---------------------------------------------------------------------------------- the function


@pytest.mark.parametrize("num_items", [None, 40, "tensor"])
@pytest.mark.parametrize("chunk_rows", [None, 1, 5])
def test_matches_hf_loss_in_fp32(num_items, chunk_rows):
    """Loss, hidden gradient and LM-head gradient equal HF's (and the fp64 truth) to the fp32
    tolerance, with one chunk or many (ragged last chunk), the mean or sum / num_items_in_batch,
    and an incoming gradient other than 1 (backward scales the saved gradients)."""
    hidden, weight, labels = random_inputs()
    num_items = torch.tensor(23) if num_items == "tensor" else num_items
    want = loss_and_grads(hf_loss, hidden, weight, labels, scale=3.0, num_items_in_batch=num_items)
    got = loss_and_grads(
        causal_lm_loss, hidden, weight, labels, scale=3.0, num_items_in_batch=num_items, chunk_rows=chunk_rows
    )
    truth = loss_and_grads(fp64_loss, hidden.double(), weight.double(), labels, scale=3.0, num_items_in_batch=num_items)
    for name, a, b, t in zip(("loss", "hidden grad", "weight grad"), got, want, truth, strict=True):
        assert a.dtype == b.dtype, name
        assert relative_error(a, b) <= FP32, f"{name}: {relative_error(a, b):.2e} from HF's"
        assert relative_error(a, t) <= FP32, f"{name}: {relative_error(a, t):.2e} from fp64"
    # The ignored positions (and each row's last, which predicts nothing) get no gradient.
    no_target = F.pad(labels, (0, 1), value=-100)[:, 1:] == -100
    assert torch.equal(got[1][no_target], torch.zeros_like(got[1][no_target]))


def test_frozen_head_gets_no_gradient_and_inputs_still_do():
    hidden, weight, labels = random_inputs()
    loss, hidden_grad, weight_grad = loss_and_grads(causal_lm_loss, hidden, weight, labels, weight_grad=False)
    _, want_grad, _ = loss_and_grads(hf_loss, hidden, weight, labels, weight_grad=False)
    assert weight_grad is None
    assert relative_error(hidden_grad, want_grad) <= FP32


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_bf16_autocast_no_worse_than_hf(weights):
    """Under bf16 autocast (fp32 weights, as the tiny configs; bf16 weights and hidden states, as
    the real configs' llm_dtype): the logits GEMM in bf16 as HF's LM head has it, the softmax in
    fp32; loss and gradients at most 2x HF's own error against fp64, with HF's dtypes."""
    dtype = getattr(torch, weights)
    hidden, weight, labels = random_inputs(batch=4, length=37, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = loss_and_grads(hf_loss, hidden, weight, labels)
        got = loss_and_grads(causal_lm_loss, hidden, weight, labels, chunk_rows=16)
    truth = loss_and_grads(fp64_loss, hidden.double(), weight.double(), labels)
    for name, a, b, t in zip(("loss", "hidden grad", "weight grad"), got, want, truth, strict=True):
        assert a.dtype == b.dtype, f"{name}: {a.dtype} != HF's {b.dtype}"
        assert_no_worse_than_unfused(a, b, t.to(a.dtype), name=name)


def test_no_labelled_token_is_hf_nan_or_zero():
    """A batch without a labelled token: the mean is NaN (0 / 0) as HF's, the sum over
    num_items_in_batch is 0; the graph stays connected (DDP needs every step's backward)."""
    hidden, weight, labels = random_inputs()
    labels[:, 1:] = -100
    assert torch.isnan(causal_lm_loss(hidden, weight, labels)) and torch.isnan(hf_loss(hidden, weight, labels))
    loss, hidden_grad, _ = loss_and_grads(causal_lm_loss, hidden, weight, labels, num_items_in_batch=5)
    assert loss.item() == 0.0 == hf_loss(hidden, weight, labels, 5).item()
    assert torch.equal(hidden_grad, torch.zeros_like(hidden_grad))


def test_default_chunk_is_bounded():
    assert default_chunk_rows(151936) == 220 and default_chunk_rows(128256) == 261
    assert default_chunk_rows(VOCAB) > 10**5  # tiny vocabularies: one chunk


def saved_bytes(fn, parameter: torch.Tensor) -> tuple[int, list[tuple[int, ...]]]:
    """(bytes of the tensors autograd saves for backward while `fn` runs, each storage once, not
    counting `parameter`'s storage (saved by reference, or as a view: no new memory); the shapes
    of all saved tensors)."""
    storages: dict[int, int] = {}
    shapes: list[tuple[int, ...]] = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        storage = tensor.untyped_storage()
        if storage.data_ptr() != parameter.untyped_storage().data_ptr():
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values()), shapes


@pytest.mark.parametrize(("dtype", "autocast"), [(torch.float32, False), (torch.bfloat16, True), (torch.float32, True)])
def test_saves_no_logits(dtype, autocast):
    """What backward keeps (LM head frozen, as in training; fp32, bf16 under autocast as the
    configs train, fp32 weights under autocast as the tiny ones): HF's path saves the fp32
    log-softmax of every position [B·T, V] and its targets (and under autocast with fp32 weights
    the bf16 copy of the weight); the fused loss saves the hidden-state gradient of the labelled
    rows [N, H] (in the GEMM's dtype) and their indices [N], nothing with the vocabulary in it.
    (At Qwen3's 151,936 x B32 x T300: 5.8 GB against at most 19.7 MB; docs/training.md.)"""
    hidden, weight, labels = random_inputs(dtype=dtype)
    weight = torch.nn.Parameter(weight, requires_grad=False)
    hidden.requires_grad_()
    rows = int((F.pad(labels, (0, 1), value=-100)[:, 1:] != -100).sum())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hf_bytes, hf_shapes = saved_bytes(lambda: hf_loss(hidden, weight, labels), weight)
        fused_bytes, fused_shapes = saved_bytes(lambda: causal_lm_loss(hidden, weight, labels), weight)
    tokens = hidden.shape[0] * hidden.shape[1]
    weight_copy = weight.numel() * 2 if autocast and dtype == torch.float32 else 0
    assert (tokens, VOCAB) in hf_shapes and hf_bytes == tokens * VOCAB * 4 + tokens * 8 + 4 + weight_copy
    gemm_dtype = torch.bfloat16 if autocast else dtype
    assert fused_bytes == rows * HIDDEN * gemm_dtype.itemsize + rows * 8, (fused_bytes, fused_shapes)
    assert sorted(fused_shapes) == [(rows,), (rows, HIDDEN)]


# ---------------------------------------------------------------------------------- in the model


def capture_inputs_embeds(model: DeSTA25AudioModel) -> list[torch.Tensor]:
    """The inputs_embeds of each LLM call (the prompt with the audio tokens spliced in)."""
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):
        seen.append(kwargs["inputs_embeds"])

    model.llm_model.register_forward_pre_hook(record, with_kwargs=True)
    return seen


def head_losses(model: DeSTA25AudioModel, batch: dict, num_items_in_batch=None):
    """One training forward of the fused model -> (its LM loss, HF's loss on the same final
    hidden states, the outputs, the LLM's inputs_embeds). Both losses share the whole graph up to
    the LM head (the same dropout draws), so any difference is the loss's."""
    seen = capture_inputs_embeds(model)
    outputs = model(**batch, num_items_in_batch=num_items_in_batch)
    llm = model.llm_model
    logits = llm.get_output_embeddings()(outputs.hidden_states[-1])
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    reference = llm.loss_function(logits=logits, labels=batch["labels"], vocab_size=llm.config.vocab_size, **extra)
    return outputs.loss, reference, outputs, seen[-1]


def assert_gradients_match(got: dict, want: dict, tolerance: float) -> None:
    assert list(got) == list(want)
    largest = max(g.abs().max().item() for g in want.values() if g is not None)
    for name, grad in got.items():
        assert (grad is None) == (want[name] is None), name
        if grad is None:
            continue
        if want[name].abs().max() <= 1e-6 * largest:
            # Zero up to rounding (a key bias shifts every score of a query alike): an absolute check.
            assert grad.abs().max() <= 1e-6 * largest, name
            continue
        assert relative_error(grad, want[name]) <= tolerance, f"{name}: {relative_error(grad, want[name]):.2e}"


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
@pytest.mark.parametrize("use_lora", [False, True], ids=["frozen", "lora"])
def test_model_lm_loss_is_the_llms(checkpoints, kind, use_lora):
    """In training with use_fused_orca the model's LM loss is HF's loss of its inner LLM (same
    forward, fp32): the loss and the gradient of inputs_embeds to RELATIVE_TOLERANCE, every
    trainable parameter's (connector, cross-attention, LoRA) to MODEL_RELATIVE_TOLERANCE, with
    and without num_items_in_batch. `logits` is None
    then; evaluation returns the logits and the LLM's own loss."""
    torch.manual_seed(0)
    model = build(checkpoints, kind, use_fused_orca=True, use_lora=use_lora).train()
    batch = make_batch(length=LENGTH, transcription_lengths=(2, 1))
    names = model.trainable_parameter_names
    parameters = [model.get_parameter(name) for name in names]
    assert any(".lora_" in name for name in names) == use_lora
    for num_items in (None, 13):
        fused, reference, outputs, inputs_embeds = head_losses(model, batch, num_items)
        assert outputs.logits is None and fused.dtype == reference.dtype == torch.float32
        assert relative_error(fused, reference) <= FP32
        targets = [inputs_embeds, *parameters]
        got = torch.autograd.grad(fused, targets, retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(reference, targets, allow_unused=True)
        assert want[0].abs().sum() > 0 and relative_error(got[0], want[0]) <= FP32, "inputs_embeds"
        # Through the whole model, as the suite compares model gradients (MODEL_RELATIVE_TOLERANCE).
        assert_gradients_match(
            dict(zip(names, got[1:], strict=True)),
            dict(zip(names, want[1:], strict=True)),
            MODEL_RELATIVE_TOLERANCE[torch.float32],
        )
    model.eval()
    with torch.no_grad():
        evaluated = model(**batch)
    assert evaluated.logits.shape == (2, LENGTH, VOCAB)
    llm = model.llm_model
    expected = llm.loss_function(logits=evaluated.logits, labels=batch["labels"], vocab_size=VOCAB)
    assert torch.equal(evaluated.loss, expected)


def test_unfused_model_keeps_hfs_loss_and_logits(checkpoints):
    """use_fused_orca=False: the LLM's own loss on its logits, num_items_in_batch passed through
    to it; the fused loss module is not called."""
    model = build(checkpoints, "qwen3").train()
    calls = []
    model.lm_loss.register_forward_hook(lambda *args: calls.append(1))
    batch = make_batch(length=LENGTH)
    for num_items in (None, 7):
        extra = {} if num_items is None else {"num_items_in_batch": num_items}
        outputs = model(**batch, **extra)
        expected = model.llm_model.loss_function(
            logits=outputs.logits, labels=batch["labels"], vocab_size=VOCAB, **extra
        )
        assert torch.equal(outputs.loss, expected)
    assert calls == []


def test_fused_loss_is_the_lm_loss_module(checkpoints):
    """The fused loss runs as `model.lm_loss` (a FusedLinearCrossEntropyLoss, no parameters, no
    state-dict key), once per training forward with labels, on the final hidden states and the
    LM head's weight: hooks see it there (the profiler's groups, a FLOP counter)."""
    model = build(checkpoints, "qwen3", use_fused_orca=True).train()
    assert isinstance(model.lm_loss, FusedLinearCrossEntropyLoss) and not list(model.lm_loss.parameters())
    assert not any(key.startswith("lm_loss") for key in model.state_dict())
    calls = []
    model.lm_loss.register_forward_hook(lambda module, args, output: calls.append(args))
    batch = make_batch(length=LENGTH)
    outputs = model(**batch)
    assert len(calls) == 1
    hidden, weight, labels = calls[0][:3]
    assert hidden is outputs.hidden_states[-1] and weight is model.llm_model.lm_head.weight
    assert labels is batch["labels"]
    model(**{key: value for key, value in batch.items() if key != "labels"})
    model.eval()
    model(**batch)
    assert len(calls) == 1


@pytest.mark.parametrize("llm_dtype", ["float32", "bfloat16"])
def test_model_bf16_autocast_no_worse_than_hf(checkpoints, llm_dtype):
    """bf16 autocast (how the reference trains), on the same forward: the fused LM loss, the
    gradient it sends into the final hidden states and what that gradient gives every trainable
    parameter (per component) are at most 2x HF's error against the fp64 loss of the same
    hidden states."""
    torch.manual_seed(0)
    model = build(checkpoints, "qwen3", use_fused_orca=True, llm_dtype=llm_dtype).train()
    batch = make_batch(length=LENGTH, transcription_lengths=(2, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(**batch)
        hidden = outputs.hidden_states[-1]
        weight = model.llm_model.lm_head.weight
        reference = hf_loss(hidden, weight, batch["labels"])
    truth_hidden = hidden.detach().double().requires_grad_()
    truth = fp64_loss(truth_hidden, weight.detach(), batch["labels"])
    assert outputs.loss.dtype == reference.dtype
    assert_no_worse_than_unfused(outputs.loss, reference, truth.float(), name="LM loss")
    grads = [torch.autograd.grad(loss, hidden, retain_graph=True)[0] for loss in (outputs.loss, reference)]
    grads.append(torch.autograd.grad(truth, truth_hidden)[0].to(hidden.dtype))
    assert grads[0].dtype == grads[1].dtype
    assert_no_worse_than_unfused(*grads, name="hidden-state gradient")
    names = model.trainable_parameter_names
    parameters = [model.get_parameter(name) for name in names]
    per_head = [torch.autograd.grad(hidden, parameters, grad, retain_graph=True) for grad in grads]
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        groups.setdefault(".".join(name.split(".")[:2]), []).append(index)
    for group, indices in groups.items():
        got, want, exact = (torch.cat([g[i].flatten().double() for i in indices]) for g in per_head)
        assert_no_worse_than_unfused(got, want, exact, name=f"gradients of {group}")


# ---------------------------------------------------------------------------------- FSDP2

WORLD_SIZE = 2
WORKER_TIMEOUT_S = 240
# No injection and no local branch: the LM loss is what is under test, and the rest of the fused
# model (one ortho op) stays cheap under the interpreter; LoRA puts trainable weights in the LLM.
FSDP_CONFIG = {"use_fused_orca": True, "use_lora": True, "orca_deep_injection_enabled": False}
FSDP_CONFIG["orca_local_enabled"] = False
# What fully_shard wraps besides the connector and the root: nothing (tests/test_distributed.py's
# layout), or every decoder layer (accelerate's transformer-based wrap). The tied embedding / LM
# head stays in the root's group either way: the prompt's embedding and the loss read it in the
# root's forward, where FSDP2 has gathered it.
SHARDINGS = ("root", "layers")


def save_tied_qwen3(directory: Path) -> str:
    """The tiny Qwen3 with its LM head tied to the embeddings (Qwen3-0.6B's and 4B's layout)."""
    config = llm_config("qwen3")
    config.tie_word_embeddings = True
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config)
    path = directory / "qwen3-tied"
    model.save_pretrained(path)
    return str(path)


def fsdp_halves() -> list[dict]:
    """Each rank's batch: same shapes and padding (as many labelled tokens), other tokens and audio."""
    return [make_batch(2, LENGTH, seed=rank + 1) for rank in range(WORLD_SIZE)]


def fsdp_model(spec: dict) -> DeSTA25AudioModel:
    from distributed_worker import disable_dropout

    torch.manual_seed(0)
    model = build(spec["checkpoints"], "qwen3", **FSDP_CONFIG)
    model.load_state_dict(torch.load(spec["init"], weights_only=True))
    disable_dropout(model)
    return model.train()


def fsdp_worker(rank: int, spec_path: str) -> None:
    """One rank: for each sharding, a fresh model, FSDP2 on a CPU mesh, one step on this rank's
    half; saves the loss, the full gradients and whether the LM head's weight was a shard
    (DTensor) when the loss read it and after the step."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from distributed_worker import full_gradients

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        batch = torch.load(spec["batches"], weights_only=True)[rank]
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for sharding in SHARDINGS:
            model = fsdp_model(spec)
            assert model.llm_model.lm_head.weight is model.llm_model.model.embed_tokens.weight  # tied
            if sharding == "layers":
                for layer in model.llm_model.model.layers:
                    fully_shard(layer, mesh=mesh)
            fully_shard(model.perception.connector, mesh=mesh)
            fully_shard(model, mesh=mesh)
            seen: list[bool] = []  # per loss call: was the LM head's weight a shard?
            model.lm_loss.register_forward_pre_hook(lambda m, args, out=seen: out.append(isinstance(args[1], DTensor)))
            outputs = model(**batch)
            total_training_loss(outputs).backward()
            seen.append(isinstance(model.llm_model.lm_head.weight, DTensor))
            result = {"loss": outputs.loss.detach(), "grads": full_gradients(model), "sharded_head": seen}
            torch.save(result, os.path.join(spec["out"], f"{sharding}_rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_runs(checkpoints, tmp_path_factory) -> dict:
    from test_distributed import concatenate, free_port, stop_and_read, wait

    from child_process import CHECKOUT, child_environment

    directory = tmp_path_factory.mktemp("lm_loss_fsdp")
    spec = {
        "checkpoints": {"qwen3": save_tied_qwen3(directory), "whisper": checkpoints["whisper"]},
        "init": str(directory / "init.pt"),
        "batches": str(directory / "batches.pt"),
        "out": str(directory),
    }
    torch.manual_seed(0)
    model = build(spec["checkpoints"], "qwen3", **FSDP_CONFIG)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # LoRA's B starts at zero: every trainable weight moved
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
    torch.save(model.state_dict(), spec["init"])
    parts = fsdp_halves()
    torch.save(parts, spec["batches"])
    (directory / "spec.json").write_text(json.dumps(spec))
    env = child_environment(Path(__file__).parent, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env["OMP_NUM_THREADS"] = "1"
    logs, workers = [], []
    start = time.monotonic()
    try:
        for rank in range(WORLD_SIZE):
            log = open(directory / f"rank{rank}.log", "w+")  # noqa: SIM115 (closed below)
            logs.append(log)
            command = [sys.executable, __file__, str(rank), str(directory / "spec.json")]
            workers.append(subprocess.Popen(command, cwd=CHECKOUT, env=env, stdout=log, stderr=subprocess.STDOUT))
        whole = concatenate(parts)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            references = {}
            for fused in (True, False):
                reference = fsdp_model(spec)
                reference.set_use_fused_orca(fused)
                outputs = reference(**whole)
                total_training_loss(outputs).backward()
                references[fused] = {
                    "loss": outputs.loss.detach(),
                    "grads": {n: reference.get_parameter(n).grad for n in reference.trainable_parameter_names},
                }
        finally:
            torch.set_num_threads(threads)
        timed_out = not wait(workers, start + WORKER_TIMEOUT_S)
    finally:
        output = stop_and_read(workers, logs)
    if timed_out or any(worker.returncode for worker in workers):
        why = f"timed out after {WORKER_TIMEOUT_S} s" if timed_out else [w.returncode for w in workers]
        pytest.fail(f"FSDP2 workers failed ({why}):\n" + "\n".join(output))
    results = {
        sharding: [torch.load(directory / f"{sharding}_rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
        for sharding in SHARDINGS
    }
    return {"results": results, "references": references}


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_fsdp2_gradients_equal_single_process(fsdp_runs, sharding):
    """FSDP2 over 2 processes, the LLM's tied embedding / LM head sharded: every trainable
    parameter's gradient (LoRA in the LLM, the connector) equals one process's on the whole
    batch, whose fused LM loss equals HF's. The loss reads the weight gathered (a plain tensor)
    and keeps no reference to it: after the step it is a shard (DTensor) again."""
    references = fsdp_runs["references"]
    assert relative_error(references[True]["loss"], references[False]["loss"]) <= FP32
    want = references[True]["grads"]
    assert_gradients_match(want, references[False]["grads"], MODEL_RELATIVE_TOLERANCE[torch.float32])
    ranks = fsdp_runs["results"][sharding]
    assert all(result["sharded_head"] == [False, True] for result in ranks)
    mean_loss = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
    assert relative_error(mean_loss, references[True]["loss"]) <= FP32
    for rank, result in enumerate(ranks):
        assert list(result["grads"]) == list(want), rank
        assert any(".lora_" in name for name in want)
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, want[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------- Liger


@pytest.fixture
def liger(monkeypatch, triton_device):
    """Liger's kernels on `triton_device`. Under the interpreter two of its assumptions need a
    shim, test-scoped: compiled Triton passes a float argument as an fp32 scalar (Liger's RMSNorm
    calls `eps.to(...)` on it) where the interpreter passes the Python float, and Liger's RMSNorm
    uses libdevice's rsqrt, which the interpreter lacks (triton.language.math's is the same op)."""
    if not HAS_LIGER:
        pytest.skip("liger-kernel is not installed (pip install 'orca-kernels[train]')")
    if triton_device.type == "cpu":
        import numpy as np
        import triton.language as tl
        from liger_kernel.ops import rms_norm
        from triton.runtime import interpreter

        convert = interpreter._implicit_cvt

        def floats_as_fp32(arg):
            if isinstance(arg, float):
                return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
            return convert(arg)

        monkeypatch.setattr(interpreter, "_implicit_cvt", floats_as_fp32)
        monkeypatch.setattr(rms_norm, "rsqrt", lambda x: tl.math.rsqrt(x))
    return triton_device


LLM_CLASSES = {"qwen3": Qwen3ForCausalLM, "llama": LlamaForCausalLM}


def plain_llm_step(kind: str, device) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A freshly built (seeded) HF LLM's logits, loss and gradients on a fixed batch."""
    with torch.random.fork_rng():
        torch.manual_seed(3)
        llm = LLM_CLASSES[kind](llm_config(kind)).to(device)
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(4)).to(device)
    outputs = llm(input_ids=ids, labels=ids)
    outputs.loss.backward()
    return outputs.logits.detach(), outputs.loss.detach(), [p.grad for p in llm.parameters()]


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_liger_goes_into_this_llm_only(checkpoints, kind, liger):
    """`apply_liger_kernel_to_llm` patches the given LLM's RMSNorms, MLPs and attentions (their
    own `forward`), not transformers: the module-level names and the classes stay HF's, and a
    plain LLM built afterwards in the same process gives the same logits, loss and gradients, bit
    for bit, as one built before. The patched model's training step (LM + ORCA losses,
    use_fused_orca=False: the LLM's own loss on its logits) equals the unpatched one's."""
    from orca_model.liger import apply_liger_kernel_to_llm, liger_kernels_applied

    modeling = importlib.import_module(LLM_CLASSES[kind].__module__)
    prefix = {"qwen3": "Qwen3", "llama": "Llama"}[kind]
    classes = [getattr(modeling, prefix + suffix) for suffix in ("RMSNorm", "MLP", "Attention")]
    names = ("apply_rotary_pos_emb", prefix + "RMSNorm", prefix + "MLP")
    before_names = {name: getattr(modeling, name) for name in names}
    before_forwards = [cls.__dict__["forward"] for cls in classes]
    before = plain_llm_step(kind, liger)

    unpatched = build(checkpoints, kind).to(liger)
    model = build(checkpoints, kind).to(liger)
    model.load_state_dict(unpatched.state_dict())  # the same trainable weights (the LLM's are the checkpoint's)
    counts = apply_liger_kernel_to_llm(model.llm_model)
    layers = 2
    norms = layers * (4 if kind == "qwen3" else 2) + 1  # input, post-attention (+ q, k) per layer; the final
    assert counts == {"rope": layers, "rms_norm": norms, "swiglu": layers}
    assert liger_kernels_applied(model.llm_model) == ("rms_norm", "rope", "swiglu")
    assert "forward" in model.llm_model.model.layers[0].self_attn.__dict__
    assert not any("forward" in m.__dict__ for m in unpatched.llm_model.modules())
    assert {name: getattr(modeling, name) for name in before_names} == before_names
    assert all(value.__module__ == modeling.__name__ for value in before_names.values())  # HF's own
    assert [cls.__dict__["forward"] for cls in classes] == before_forwards
    after = plain_llm_step(kind, liger)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert all(torch.equal(a, b) for a, b in zip(after[2], before[2], strict=True))

    batch = to_device(make_batch(length=LENGTH, transcription_lengths=(2, 1)), liger)
    results = []
    for candidate in (unpatched, model):
        candidate.train()
        candidate.perception.eval()  # no Q-Former dropout: the two models see the same function
        outputs = candidate(**batch)
        total_training_loss(outputs).backward()
        expected = candidate.llm_model.loss_function(logits=outputs.logits, labels=batch["labels"], vocab_size=VOCAB)
        assert torch.equal(outputs.loss, expected)  # HF's own loss on the (patched) LLM's logits
        results.append((outputs, {n: candidate.get_parameter(n).grad for n in candidate.trainable_parameter_names}))
    (want, want_grads), (got, got_grads) = results
    tolerance = MODEL_RELATIVE_TOLERANCE[torch.float32]
    assert relative_error(got.logits, want.logits) <= tolerance
    assert relative_error(got.loss, want.loss) <= tolerance
    assert_gradients_match(got_grads, want_grads, tolerance)


def test_liger_options(checkpoints, liger):
    from orca_model.liger import apply_liger_kernel_to_llm

    model = build(checkpoints, "qwen3")
    assert apply_liger_kernel_to_llm(model.llm_model, rope=False, swiglu=False) == {
        "rope": 0,
        "rms_norm": 9,
        "swiglu": 0,
    }
    for bad in ({"fused_linear_cross_entropy": True}, {"cross_entropy": True}, {"geglu": True}):
        with pytest.raises(ValueError, match="fused_linear_cross_entropy|unknown options"):
            apply_liger_kernel_to_llm(model.llm_model, **bad)
    whisper = whisper_config()
    with pytest.raises(NotImplementedError, match="qwen3, llama"):
        apply_liger_kernel_to_llm(type("Other", (torch.nn.Module,), {"config": whisper})())


def test_trainer_use_liger_kernel(checkpoints, liger, tmp_path):
    """`use_liger_kernel=True`: DeSTA25Trainer patches the model's LLM (the HF Trainer alone
    would patch nothing: the model is not a PreTrainedModel), `liger_kernel_config` switches
    kernels off, and a training step runs on the patched model."""
    from orca_model.liger import liger_kernels_applied
    from orca_model.training import DeSTA25Trainer, DeSTA25TrainingArguments

    def arguments(**overrides):
        return DeSTA25TrainingArguments(
            output_dir=str(tmp_path),
            use_liger_kernel=True,
            bf16=False,
            use_cpu=liger.type == "cpu",
            report_to=[],
            optim="adamw_torch",
            max_steps=1,
            per_device_train_batch_size=1,
            auto_find_batch_size=False,
            save_strategy="no",
            disable_tqdm=True,
            **overrides,
        )

    model = build(checkpoints, "qwen3")
    DeSTA25Trainer(model=model, args=arguments(liger_kernel_config={"rope": False}))
    assert liger_kernels_applied(model.llm_model) == ("rms_norm", "swiglu")

    model = build(checkpoints, "qwen3")
    batch = make_batch(length=LENGTH)
    trainer = DeSTA25Trainer(model=model, args=arguments(), train_dataset=[batch], data_collator=lambda items: items[0])
    assert liger_kernels_applied(model.llm_model) == ("rms_norm", "rope", "swiglu")
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))


if __name__ == "__main__":
    fsdp_worker(int(sys.argv[1]), sys.argv[2])
