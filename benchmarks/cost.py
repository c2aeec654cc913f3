"""The cost of one full-size training step, predicted without a GPU and without weights.

    python -m benchmarks.cost --model qwen3-0.6b --batch 32
    python -m benchmarks.cost --model all --variants reference,fused,reference+ckpt,fused+ckpt --card h200
    python -m benchmarks.cost --model qwen3-0.6b --batch 32 --measure     # on a GPU: predicted vs measured peak

What runs is bench_model.py's `model_train_step` (the reference's training step): the forward with
labels under `torch.autocast("cuda", dtype=torch.bfloat16)`, `total_training_loss`, the backward,
gradient clipping at 1.0 and an Adafactor step (Hugging Face Trainer's `optim="adafactor"`), on the
whole model: every layer of the LLM and of Whisper large-v3, the committed config
(configs/orca_hybrid_*.json), the LLM and Whisper configs of benchmarks/model_configs.py. It runs
on fake tensors (`torch._subclasses.FakeTensorMode`): the model is built on the meta device and its
parameters become fake CUDA tensors, so nothing is allocated and nothing is computed, but every
operator is dispatched with the shapes, dtypes and device of a GPU run:

- CUDA autocast is real (its C++ op lists, not an imitation): only `torch.autocast`'s "is CUDA
  available" check is answered yes.
- The model takes the path a GPU runs: `orca_kernels.kernels_available` says yes for CUDA
  tensors, `flash_cross_attention(backend="auto")` asks `orca_kernels.dispatch` (SDPA unless the
  committed table measured the Triton kernels faster on the chosen card), `strided_conv1d` runs
  the extension's op, and `F.scaled_dot_product_attention` runs the kernel PyTorch picks on an
  H100/H200 (FlashAttention-2 for fp16/bf16 without a mask, the memory-efficient kernel otherwise)
  instead of the math fallback a CUDA-less process would take. The fused ops are torch.library
  custom ops with fake implementations; their FLOPs come from `orca_kernels.flop_counts`.
- The backward runs in `PythonEngine`, a Python copy of autograd's engine loop (dependencies,
  sequence-number order, gradient accumulation in place when the engine would, saved tensors
  released as soon as their node has run, AccumulateGrad's stealing): on a machine without a GPU
  the C++ engine refuses a graph of CUDA tensors (it asks the driver for the device's streams).
  On a GPU machine `engine="native"` runs the C++ engine on the same fake tensors instead.
- Data-dependent operators (`nonzero`, `.item()`, `.all()` in a condition) read values that fake tensors
  do not have: the integer and boolean tensors derived from the batch (ids, labels, masks) carry
  a real CPU shadow, computed alongside, from which those operators take their results.

Per component (encoder, Q-Former, local branch, LLM attention / MLP / norms, injected
cross-attention, LM head, LM loss, ORCA losses, optimizer; forward and backward, recomputation
included) it reports:

- FLOPs: `torch.utils.flop_counter`'s formulas (what `FlopCounterMode` counts), attributed to the
  module running (in the backward: the module whose forward made the autograd node);
- bytes moved: each operator reads its inputs and writes its outputs once (a broadcast input
  once, an embedding or index_select only the rows it gathers; views and allocations move
  nothing);
- saved-for-backward bytes: the distinct storages `torch.autograd.graph.saved_tensors_hooks`
  sees saved during the forward, parameters excluded, attributed to the module that saved them;
- the floor at a card's peak (FLOPs / peak, bytes / bandwidth; `--card`, `--peak-tflops`,
  `--bandwidth-tbs`) and the eager roofline, the sum over operators of max(bytes / bandwidth,
  FLOPs / peak);
- the predicted peak memory and where it happens: every storage is tracked from its allocation to
  its death (a `weakref.finalize` on the storage, which PyTorch keeps alive exactly as long as
  any tensor, view or saved variable uses it), rounded up to the CUDA caching allocator's 512-byte
  blocks; live bytes are split into parameters, gradients, optimizer state, the batch, tensors
  saved for backward and other activations. The optimizer state exists before the step (a step
  after the first), as in training.

`measured_peak_vs_predicted` compares the prediction with `torch.cuda.max_memory_allocated` of the
same step on a GPU. docs/training-cost.md has the numbers and what each lever saves.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import datetime
import gc
import heapq
import json
import math
import os
import subprocess
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from unittest import mock

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry
from transformers import PretrainedConfig
from transformers.optimization import Adafactor

import orca_kernels
from benchmarks import bench_model, model_configs
from orca_kernels import _extension, _utils, dispatch, flash_attention
from orca_model import DeSTA25AudioModel, DeSTA25Config, modeling, total_training_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "cost")
GiB = 2**30
ALLOCATOR_ROUND = 512  # bytes: the CUDA caching allocator's block granularity


# ----------------------------------------------------------------------------- cards, models, variants


@dataclasses.dataclass(frozen=True)
class Card:
    label: str
    device_name: str  # what torch.cuda.get_device_name says (the attention dispatch table's key)
    capability: str
    peak_flops: float  # dense bf16 FLOP/s
    bandwidth: float  # HBM bytes/s

    def floor_seconds(self, flops: float, nbytes: float) -> dict[str, float]:
        compute, memory = flops / self.peak_flops, nbytes / self.bandwidth
        return {"compute": compute, "memory": memory, "floor": max(compute, memory)}


CARDS = {
    "h100": Card("H100 SXM", "NVIDIA H100 80GB HBM3", "sm90", 989e12, 3.35e12),
    "h200": Card("H200", "NVIDIA H200", "sm90", 989e12, 4.8e12),
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model and batch shape: the committed training config with its LLM and encoder configs."""

    label: str
    config_file: str  # configs/
    llm_config: Callable[[], PretrainedConfig]
    encoder_config: Callable[[], PretrainedConfig]
    batch: int
    seq_len: int = 300  # T_x: the prompt with its K audio tokens
    overrides: tuple[tuple[str, object], ...] = ()
    llm_dtype: str = "bfloat16"

    def config(self, use_fused_orca: bool, **overrides) -> DeSTA25Config:
        fields = dict(self.overrides) | overrides
        return bench_model.desta_config(
            self.config_file,
            self.llm_config(),
            self.encoder_config(),
            llm_dtype=self.llm_dtype,
            use_fused_orca=use_fused_orca,
            **fields,
        )

    def with_batch(self, batch: int | None) -> Workload:
        return self if batch is None else dataclasses.replace(self, batch=batch)


# The whole models (every decoder layer; bench_model builds 4 layers of the two large ones to fit
# its GPU time), at the training batches of docs/model-shapes.md.
MODELS = {
    "qwen3-0.6b": Workload(
        "qwen3-0.6b", "orca_hybrid_qwen3_0.6b.json", model_configs.qwen3_0_6b, model_configs.whisper_large_v3, 32
    ),
    "qwen3-4b": Workload(
        "qwen3-4b", "orca_hybrid_qwen3_4b.json", model_configs.qwen3_4b, model_configs.whisper_large_v3, 12
    ),
    "llama3.1-8b": Workload(
        "llama3.1-8b", "orca_hybrid_llama3.1_8b.json", model_configs.llama3_1_8b, model_configs.whisper_large_v3, 12
    ),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    fused: bool  # use_fused_orca
    checkpointing: bool  # the LLM's gradient checkpointing


VARIANTS = {
    v.name: v
    for v in (
        Variant("reference", False, False),
        Variant("fused", True, False),
        Variant("reference+ckpt", False, True),
        Variant("fused+ckpt", True, True),
    )
}
DEFAULT_VARIANTS = ("reference", "fused", "reference+ckpt", "fused+ckpt")

PHASES = ("forward", "backward", "optimizer")
COMPONENTS = (
    "encoder",
    "Q-Former",
    "local branch",
    "prompt + memory",
    "LLM attention",
    "LLM MLP",
    "LLM norms + residual",
    "injected cross-attention",
    "LM head",
    "LM loss",
    "ORCA losses",
    "optimizer",
    "other",
)
# Live-memory categories.
PARAMS, GRADS, OPTIM, BATCH, SAVED, OTHER = (
    "parameters",
    "gradients",
    "optimizer state",
    "batch",
    "saved for backward",
    "other activations",
)
CATEGORIES = (PARAMS, GRADS, OPTIM, BATCH, SAVED, OTHER)
GEMMS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "_scaled_mm"}
# Operators that move no data: views, metadata, allocations without a fill.
NO_TRAFFIC = {
    "view",
    "_unsafe_view",
    "t",
    "transpose",
    "slice",
    "split",
    "split_with_sizes",
    "unbind",
    "chunk",
    "detach",
    "expand",
    "unsqueeze",
    "squeeze",
    "alias",
    "as_strided",
    "permute",
    "select",
    "empty",
    "empty_like",
    "new_empty",
    "new_empty_strided",
    "empty_strided",
    "_reshape_alias",
    "lift_fresh",
    "lift_fresh_copy",
    "set_",
    "resize_",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
}
GATHERS = {"embedding", "index_select", "gather", "index"}  # read as many source bytes as they write
DATA_DEPENDENT = {
    "nonzero",
    "_local_scalar_dense",
    "is_nonzero",
    "masked_select",
    "unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "repeat_interleave",
    "equal",
    "allclose",
    "argwhere",
    "nonzero_static",
    "_assert_async",
    "item",
}
SHADOW_MAX_NUMEL = 2**22  # integer/bool tensors up to this size carry a real CPU shadow


_HAS_NODE_HOOK = hasattr(torch.autograd.graph, "node_creation_hook")  # torch >= 2.14


def _round(nbytes: int) -> int:
    return -(-nbytes // ALLOCATOR_ROUND) * ALLOCATOR_ROUND if nbytes else 0


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # sparse, nested or no storage
        return None


# ----------------------------------------------------------------------------- what the counter records


@dataclasses.dataclass
class Peak:
    bytes: int = 0
    phase: str = ""
    component: str = ""
    op: str = ""
    module: str = ""
    by_category: dict[str, int] = dataclasses.field(default_factory=dict)
    activations_by_component: dict[str, int] = dataclasses.field(default_factory=dict)


class _Saved:
    """What the pack hook stores in the graph instead of the tensor: a box the engine can empty
    when the node that saved it has run (autograd's release_variables)."""

    __slots__ = ("tensor", "key", "counter", "__weakref__")

    def __init__(self, tensor: torch.Tensor, key: int, counter: Counter):
        self.tensor, self.key, self.counter = tensor, key, counter
        counter._saved_ref(key, +1)

    def release(self) -> None:
        if self.tensor is not None:
            self.tensor = None
            self.counter._saved_ref(self.key, -1)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.release()


class Counter:
    """Everything one step records: operator costs by component and phase, saved tensors, the
    storages alive and the peak. Driven by `_Recorder` (every operator), the saved-tensor hooks,
    the module hooks, the autograd node-creation hook and the engine."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, fake_mode=None):
        self.model, self.optimizer, self.fake_mode = model, optimizer, fake_mode
        self.names = {id(m): name for name, m in model.named_modules()}
        self.phase = "setup"
        self.module_stack: list[str] = []
        self.overrides: list[str] = []
        self.node_component: str | None = None  # the backward node running (its forward's component)
        self.node_name = ""
        self.connector_local = False  # the connector's forward past its global projection
        self.pending_boxes: list[_Saved] = []
        self.pending_frames: list = []  # checkpoint frames whose hooks packed since the last node
        self.unpacked: list[_Saved] | None = None  # while PythonEngine runs a node: the boxes it read
        # Where node_creation_hook is missing (torch < 2.14): the component of each range of
        # autograd sequence numbers, for the backward.
        self.sequence_starts: list[int] = []
        self.sequence_components: list[str] = []
        # Operators: component index, phase index, FLOPs, bytes.
        self.op_records: list[tuple[int, int, int, int]] = []
        self.op_totals: dict[str, list[int]] = {}  # op -> [calls, FLOPs, bytes]
        # Saved tensors (forward): distinct storages.
        self.saved_seen: set[int] = set()
        self.saved_bytes = 0
        self.saved_by_component: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
        self.excluded_storages: set[int] = set()  # parameters and buffers: never counted as saved
        # Live storages: key -> [rounded bytes, base category, component, saved refs].
        self.live: dict[int, list] = {}
        self.live_bytes = 0
        self.by_category = dict.fromkeys(CATEGORIES, 0)
        self.activations_by_component = dict.fromkeys(COMPONENTS, 0)
        self.peak = Peak()
        self.marks: dict[str, int] = {}
        param_component = {}
        for name, module in model.named_modules():
            component = self._component_of_module(name, None)
            for param in module.parameters(recurse=False):
                param_component.setdefault(id(param), component)
        self.param_component = param_component

    # -- components

    def _component_of_module(self, name: str, func_name: str | None) -> str:
        if name.startswith("perception.whisper") or name == "perception":
            return "encoder"
        if name.startswith("perception.connector"):
            rest = name[len("perception.connector") :]
            if rest.startswith((".global_qformer", ".global_proj")):
                return "Q-Former"
            if rest.startswith(".local_"):
                return "local branch"
            return "local branch" if self.connector_local else "Q-Former"
        if name.startswith("orca_cross_attns"):
            return "injected cross-attention"
        if name.startswith("lm_loss") or name.startswith("llm_model.lm_head") or name == "llm_model":
            return "LM head" if func_name in GEMMS else "LM loss"
        if name.startswith("llm_model"):
            parts = name.split(".")
            if "self_attn" in parts or "rotary_emb" in parts:
                return "LLM attention"
            if "mlp" in parts:
                return "LLM MLP"
            if "embed_tokens" in parts:
                return "prompt + memory"
            return "LLM norms + residual"
        if name == "":
            return "prompt + memory"
        return "other"

    def component(self, func_name: str | None = None) -> str:
        if self.phase == "optimizer":
            return "optimizer"
        if self.overrides:
            return self.overrides[-1]
        if self.module_stack:
            return self._component_of_module(self.module_stack[-1], func_name)
        node_component = self.node_component
        if node_component is None and self.phase == "backward":  # autograd's own engine
            node = torch._C._current_autograd_node()
            if node is not None:
                node_component = self.node_component_of(node)
        if node_component is not None:
            if node_component in ("LM head", "LM loss"):
                return "LM head" if func_name in GEMMS else "LM loss"
            return node_component
        return "other"

    @contextlib.contextmanager
    def override(self, component: str) -> Iterator[None]:
        self.overrides.append(component)
        try:
            yield
        finally:
            self.overrides.pop()

    def module_pre_hook(self, module, args) -> None:
        name = self.names.get(id(module))
        if name is None:
            return
        if name == "perception.connector":
            self.connector_local = False
        self.module_stack.append(name)

    def module_post_hook(self, module, args, output) -> None:
        name = self.names.get(id(module))
        if name is None:
            return
        if self.module_stack and self.module_stack[-1] == name:
            self.module_stack.pop()
        if name == "perception.connector.global_proj":
            self.connector_local = True

    def node_created(self, node) -> None:
        metadata = node.metadata
        metadata["orca_component"] = self.component()
        if self.pending_boxes:
            # Weakly: the graph's saved variables own the boxes (autograd's engine frees them).
            metadata["orca_boxes"] = [weakref.ref(box) for box in self.pending_boxes]
            self.pending_boxes = []
        if self.pending_frames:
            frames = {id(frame): frame for frame in self.pending_frames}.values()
            metadata["orca_frames"] = [weakref.ref(frame) for frame in frames]
            for frame in frames:
                frame._orca_nodes = getattr(frame, "_orca_nodes", 0) + 1
            self.pending_frames = []

    # -- saved tensors

    def pack(self, tensor: torch.Tensor):
        key = _storage_key(tensor)
        if key is None:
            return tensor
        self.track(tensor)
        if key not in self.saved_seen and key not in self.excluded_storages and self.phase == "forward":
            self.saved_seen.add(key)
            nbytes = tensor.untyped_storage().nbytes()
            self.saved_bytes += nbytes
            self.saved_by_component[self.component()] += nbytes
        box = _Saved(tensor, key, self)
        self.pending_boxes.append(box)
        return box

    def unpack(self, box):
        if not isinstance(box, _Saved):
            return box
        if box.tensor is None:
            raise RuntimeError("benchmarks.cost: a saved tensor was used after its node released it")
        if self.unpacked is not None:
            self.unpacked.append(box)
        return box.tensor

    def node_component_of(self, node) -> str:
        """The component whose forward made `node` (its tag, else its sequence number's range); a
        parameter's AccumulateGrad: the component of the module that holds the parameter."""
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in self.param_component:
            return self.param_component[id(variable)]
        component = node.metadata.get("orca_component")
        if component is not None:
            return component
        index = bisect.bisect_right(self.sequence_starts, _sequence_nr(node)) - 1
        return self.sequence_components[index] if index >= 0 else "other"

    def _saved_ref(self, key: int, delta: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        before = entry[3]
        entry[3] += delta
        if entry[1] != OTHER:
            return
        if before == 0 and entry[3] > 0:
            self.by_category[OTHER] -= entry[0]
            self.by_category[SAVED] += entry[0]
        elif before > 0 and entry[3] == 0:
            self.by_category[SAVED] -= entry[0]
            self.by_category[OTHER] += entry[0]

    # -- storages

    def track(self, tensor: torch.Tensor, category: str | None = None) -> None:
        key = _storage_key(tensor)
        if key is None:
            return
        entry = self.live.get(key)
        if entry is not None:
            if category is not None and category != entry[1]:
                self.recategorize(key, category)
            return
        storage = tensor.untyped_storage()
        size = _round(storage.nbytes())
        if size == 0:
            return
        category = category or OTHER
        component = self.component()
        self.live[key] = [size, category, component, 0]
        self.live_bytes += size
        self.by_category[category] += size
        if category == OTHER:
            self.activations_by_component[component] += size
        finalizer = weakref.finalize(storage, self._free, key)
        finalizer.atexit = False
        if self.live_bytes > self.peak.bytes:
            self._record_peak()

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is None:
            return
        size, category, component, saved = entry
        self.live_bytes -= size
        self.by_category[SAVED if (category == OTHER and saved > 0) else category] -= size
        if category == OTHER:
            self.activations_by_component[component] -= size

    def recategorize(self, key: int, category: str) -> None:
        entry = self.live.get(key)
        if entry is None or entry[1] == category:
            return
        size, old, component, saved = entry
        self.by_category[SAVED if (old == OTHER and saved > 0) else old] -= size
        if old == OTHER:
            self.activations_by_component[component] -= size
        entry[1] = category
        self.by_category[SAVED if (category == OTHER and saved > 0) else category] += size
        if category == OTHER:
            self.activations_by_component[component] += size

    def _record_peak(self) -> None:
        self.peak = Peak(
            self.live_bytes,
            self.phase,
            self.component(self._current_op),
            self._current_op or "",
            self.module_stack[-1] if self.module_stack else self.node_name,
            dict(self.by_category),
            {k: v for k, v in self.activations_by_component.items() if v},
        )

    _current_op: str | None = None

    def mark(self, name: str) -> None:
        self.marks[name] = self.live_bytes

    def set_phase(self, name: str) -> None:
        if name == "backward":
            self.mark("end of forward")
        self.phase = name

    def grad_accumulated(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            self.track(param.grad, GRADS)

    # -- operators

    def record_op(self, func, args, kwargs, out) -> None:
        name = func.overloadpacket.__name__
        self._current_op = name
        component = self.component(name)
        if (
            self.phase == "forward"
            and not _HAS_NODE_HOOK
            and (not self.sequence_components or self.sequence_components[-1] != component)
        ):
            self.sequence_starts.append(torch._C._autograd._get_sequence_nr() - 1)
            self.sequence_components.append(component)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        for t in outs:
            self.track(t)
        if name in NO_TRAFFIC or func.is_view or not outs:
            return
        flops = _flops(func, args, kwargs, out)
        nbytes = _traffic(name, args, kwargs, outs)
        self.op_records.append((COMPONENTS.index(component), PHASES.index(self.phase), flops, nbytes))
        totals = self.op_totals.setdefault(str(func.overloadpacket), [0, 0, 0])
        totals[0] += 1
        totals[1] += flops
        totals[2] += nbytes


def _unique_bytes(t: torch.Tensor) -> int:
    """Bytes an operator reads from `t`: its elements, a broadcast (stride-0) dimension once."""
    elements = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            elements *= size
    return elements * t.element_size()


def _traffic(name: str, args, kwargs, outs: list[torch.Tensor]) -> int:
    written = sum(t.numel() * t.element_size() for t in outs)
    inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    if name in GATHERS and inputs:
        # The source (the first tensor; embedding's is its weight) is read where gathered.
        source = inputs[0]
        return written + written + sum(_unique_bytes(t) for t in inputs if t is not source)
    if name == "copy_" and len(inputs) >= 2:
        return _unique_bytes(inputs[1]) + written
    read = sum(_unique_bytes(t) for t in inputs)
    return read + written


_SDPA_FLOPS = {
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention_backward",
}


def _flops(func, args, kwargs, out) -> int:
    formula = flop_registry.get(func.overloadpacket)
    if formula is None:
        return 0
    if func.overloadpacket.__name__ in _SDPA_FLOPS:
        args = _gqa_as_mha(func.overloadpacket.__name__, args)
    return int(formula(*args, **kwargs, out_val=out))


def _gqa_as_mha(name: str, args) -> list:
    """SDPA's formulas assert equal head counts; grouped-query attention (the LLM's, through
    FlashAttention with fewer K/V heads) does the work of as many heads as the query has. The
    formulas take shapes (FlopCounterMode's shape_wrapper passes torch.Size through)."""
    args = [x.shape if isinstance(x, torch.Tensor) else x for x in args]
    q_index = 1 if name.endswith("_backward") else 0
    heads = args[q_index][1]
    for index in (q_index + 1, q_index + 2):
        shape = args[index]
        if isinstance(shape, torch.Size) and len(shape) == 4 and shape[1] != heads:
            args[index] = torch.Size((shape[0], heads, *shape[2:]))
    return args


class _Recorder(TorchDispatchMode):
    """Sees every operator (above FakeTensorMode): shadows of integer tensors, data-dependent
    operators answered from them, then the counter's record."""

    def __init__(self, counter: Counter, fake_mode: FakeTensorMode | None):
        super().__init__()
        self.counter, self.fake_mode = counter, fake_mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if self.fake_mode is not None and name in DATA_DEPENDENT:
            out = self._from_shadow(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
            if self.fake_mode is not None:
                self._shadow(func, args, kwargs, out)
        self.counter.record_op(func, args, kwargs, out)
        return out

    # -- shadows: real CPU values of the small integer tensors of the batch and what derives from them

    def _shadow(self, func, args, kwargs, out) -> None:
        leaves, _ = tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if any(getattr(t, "_orca_shadow", None) is None for t in tensors):
            if func._schema.is_mutable:  # a shadowed tensor written from unshadowed ones: stale
                for t in tensors:
                    if getattr(t, "_orca_shadow", None) is not None:
                        del t._orca_shadow
            return
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs or any(t.is_floating_point() or t.is_complex() or t.numel() > SHADOW_MAX_NUMEL for t in outs):
            return
        real = self._real(func, args, kwargs)
        for fake, value in zip(outs, [t for t in tree_flatten(real)[0] if isinstance(t, torch.Tensor)], strict=False):
            fake._orca_shadow = value

    def _real(self, func, args, kwargs):
        def to_real(x):
            if isinstance(x, torch.Tensor):
                return x._orca_shadow
            if isinstance(x, torch.device):
                return torch.device("cpu")
            return x

        real_args, real_kwargs = tree_map(to_real, (args, kwargs))
        with unset_fake_temporarily():
            return func(*real_args, **real_kwargs)

    def _from_shadow(self, func, args, kwargs):
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(getattr(t, "_orca_shadow", None) is None for t in tensors):
            raise RuntimeError(
                f"benchmarks.cost: {func} reads tensor values, which fake tensors do not have, on a tensor that "
                "does not derive from the batch's integer tensors (only those carry real values)"
            )
        real = self._real(func, args, kwargs)
        device = tensors[0].device if tensors else torch.device("cpu")

        def to_fake(x):
            if not isinstance(x, torch.Tensor):
                return x
            meta = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
            fake = FakeTensor(self.fake_mode, meta, device)
            fake._orca_shadow = x
            return fake

        return tree_map(to_fake, real)


# ----------------------------------------------------------------------------- the backward engine


class PythonEngine:
    """autograd's engine loop in Python, for fake CUDA tensors on a machine without a GPU (the C++
    engine asks the CUDA driver for each device's current stream before it runs a CUDA graph).

    What matters for memory follows the C++ engine (torch/csrc/autograd/engine.cpp,
    input_buffer.cpp, functions/accumulate_grad.h): nodes run when every gradient they wait for
    has arrived, highest sequence number first (AccumulateGrad before anything else); a node's
    saved tensors are released as soon as it has run; gradients for one input are summed in place
    into the first when nothing else holds it, else out of place; an output gradient takes the
    shape and dtype of the input it flows into (`validate_outputs`); AccumulateGrad steals a
    gradient whose layout matches the parameter's and clones it otherwise; a custom Function gets
    zeros for the outputs without a gradient (`materialize_grads`). Hooks registered on tensors or
    nodes are not run (the step registers none)."""

    def __init__(self, counter: Counter | None = None):
        self.counter = counter

    def backward(self, tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None, **kwargs):
        if create_graph or inputs is not None:
            raise NotImplementedError("benchmarks.cost.PythonEngine: create_graph and inputs= are not supported")
        tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        if grad_tensors is None:
            grad_tensors = [None] * len(tensors)
        elif isinstance(grad_tensors, torch.Tensor):
            grad_tensors = [grad_tensors]
        roots = []
        for t, g in zip(tensors, grad_tensors, strict=True):
            if g is None:
                if t.numel() != 1:
                    raise RuntimeError("grad can be implicitly created only for scalar outputs")
                g = torch.ones_like(t, memory_format=torch.preserve_format)
            roots.append((t, g))
        # Non-reentrant checkpoints recompute once per backward, keyed by the C++ engine's graph
        # task (or by a GraphExecGroup): one key for this backward.
        if hasattr(torch.utils.checkpoint, "GraphExecGroup"):
            exists = torch._C._get_graph_exec_group() is not None
            group = contextlib.nullcontext() if exists else torch.utils.checkpoint.GraphExecGroup()
        else:
            task = id(roots)
            group = mock.patch.object(torch._C, "_current_graph_task_id", lambda: task)
        with group, torch.no_grad():
            self._run(roots)

    def _run(self, roots) -> None:
        nodes: dict[int, object] = {}
        dependencies: dict[int, int] = {}
        buffers: dict[int, list] = {}
        stack = []
        for t, _ in roots:
            node = t.grad_fn
            if node is not None and id(node) not in nodes:
                nodes[id(node)] = node
                stack.append(node)
        while stack:
            node = stack.pop()
            for next_node, _ in node.next_functions:
                if next_node is None:
                    continue
                key = id(next_node)
                dependencies[key] = dependencies.get(key, 0) + 1
                if key not in nodes:
                    nodes[key] = next_node
                    stack.append(next_node)
        for t, g in roots:
            node = t.grad_fn
            if node is None:
                if t.requires_grad:
                    t.grad = g if t.grad is None else t.grad + g
                continue
            self._add(buffers, node, t.output_nr, g)
        ready: list[tuple[int, int, int]] = []
        order = 0
        for t, _ in roots:
            node = t.grad_fn
            if node is not None and dependencies.get(id(node), 0) == 0 and id(node) in nodes:
                heapq.heappush(ready, (-_sequence_nr(node), order, id(node)))
                order += 1
                dependencies[id(node)] = -1  # queued
        while ready:
            _, _, key = heapq.heappop(ready)
            node = nodes.pop(key)
            grads = buffers.pop(key, None) or [None] * len(node._input_metadata)
            outputs = self._call(node, grads)
            del grads
            for edge, grad in zip(node.next_functions, outputs, strict=False):
                next_node, input_nr = edge
                if next_node is None:
                    continue
                next_key = id(next_node)
                if grad is not None:
                    self._add(buffers, next_node, input_nr, _validate(grad, next_node._input_metadata[input_nr]))
                dependencies[next_key] -= 1
                if dependencies[next_key] == 0:
                    heapq.heappush(ready, (-_sequence_nr(next_node), order, next_key))
                    order += 1
            del outputs, node
            if self.counter is not None:  # the gradients' sums above belong to the node that made them
                self.counter.node_component, self.counter.node_name = None, ""

    def _add(self, buffers: dict, node, input_nr: int, grad: torch.Tensor) -> None:
        buffer = buffers.get(id(node))
        if buffer is None:
            buffer = buffers[id(node)] = [None] * max(len(node._input_metadata), input_nr + 1)
        old = buffer[input_nr]
        if old is None:
            buffer[input_nr] = grad
        elif _can_accumulate_in_place(old):
            buffer[input_nr] = old.add_(grad)
        else:
            buffer[input_nr] = old + grad

    def _call(self, node, grads: list) -> tuple:
        counter = self.counter
        if counter is not None:
            counter.node_component = counter.node_component_of(node)
            counter.node_name = node.name()
            counter.unpacked = None if _HAS_NODE_HOOK else []
        try:
            if isinstance(node, torch.autograd.function.BackwardCFunction):
                outputs = self._call_function(node, grads)
            elif node.name() == "torch::autograd::AccumulateGrad":
                self._accumulate(node, grads[0])
                outputs = ()
            else:
                outputs = node(*grads)
                if not isinstance(outputs, tuple):
                    outputs = (outputs,)
        finally:
            # autograd's release_variables: what the node saved (tagged at its creation) and, where
            # torch has no creation hook, what it read.
            for reference in node.metadata.pop("orca_boxes", ()):
                box = reference()
                if box is not None:
                    box.release()
            if counter is not None:
                for box in counter.unpacked or ():
                    box.release()
                counter.unpacked = None
            # A checkpoint's frame (its saved inputs) lives as long as the saved variables of the
            # nodes of its region: when the last of them has run, autograd frees it.
            for reference in node.metadata.pop("orca_frames", ()):
                frame = reference()
                if frame is not None:
                    frame._orca_nodes -= 1
                    if frame._orca_nodes == 0:
                        _free_frame(frame)
        return outputs

    @staticmethod
    def _call_function(node, grads: list) -> tuple:
        metadata = node.metadata
        outputs_info = metadata.get("orca_outputs")
        args = []
        for index, grad in enumerate(grads):
            materialize = metadata.get("orca_materialize_grads", True)
            if grad is None and materialize and outputs_info is not None and index < len(outputs_info):
                shape, dtype, device, differentiable = outputs_info[index]
                if differentiable or node._materialize_non_diff_grads:
                    grad = torch.zeros(shape, dtype=dtype, device=device)
            args.append(grad)
        result = node.apply(*args)
        if not isinstance(result, tuple):
            result = (result,)
        tensor_args = metadata.get("orca_tensor_args")
        if tensor_args is not None:
            result = tuple(grad for grad, is_tensor in zip(result, tensor_args, strict=False) if is_tensor)
        return result

    def _accumulate(self, node, grad: torch.Tensor | None) -> None:
        param = node.variable
        if grad is None or not param.requires_grad:
            return
        if param.grad is None:
            if grad.stride() == param.stride() or not is_non_overlapping_and_dense(param):
                param.grad = grad.detach()
            else:
                param.grad = torch.empty_strided(
                    param.shape, param.stride(), dtype=param.dtype, device=param.device
                ).copy_(grad)
        else:
            param.grad.add_(grad)
        if self.counter is not None:
            self.counter.grad_accumulated(param)


def is_non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """Whether `t`'s elements fill its storage span without gaps or overlaps in some dimension
    order (TensorImpl::is_non_overlapping_and_dense), from its sizes and strides."""
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride(), strict=True) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _free_frame(frame) -> None:
    """What a checkpoint frame's death frees: its saved inputs and the layer call its recompute
    closure holds (the call's keyword tensors: RoPE tables, position ids). Nothing recomputes it
    any more: every node of its region has run."""
    for box in frame.__dict__.pop("_orca_boxes", ()):
        box.release()
    recompute = getattr(frame, "recompute_fn", None)
    code = getattr(recompute, "__code__", None)
    for name, cell in zip(code.co_freevars if code else (), recompute.__closure__ or (), strict=False):
        if name in ("fn", "kwargs", "args"):
            cell.cell_contents = None


def _sequence_nr(node) -> int:
    # AccumulateGrad's is UINT64_MAX: it runs as soon as it is ready.
    return node._sequence_nr()


def _validate(grad: torch.Tensor, metadata) -> torch.Tensor:
    """autograd's validate_outputs: the gradient takes the input's shape (summed over broadcast
    dimensions) and dtype."""
    shape = tuple(metadata.shape)
    if tuple(grad.shape) != shape:
        grad = grad.sum_to_size(shape)
    if grad.dtype != metadata.dtype:
        grad = grad.to(metadata.dtype)
    return grad


def _can_accumulate_in_place(t: torch.Tensor) -> bool:
    """input_buffer.cpp's can_accumulate_inplace for a plain tensor: dense, and the buffer holds
    the only reference to it and to its storage."""
    if not is_non_overlapping_and_dense(t):
        return False
    if sys.getrefcount(t) > 4:  # the buffer, the caller's name, this argument, getrefcount's own
        return False
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= _LONE_STORAGE_USE_COUNT


_LONE_STORAGE_USE_COUNT = 2  # one tensor and the storage's own Python object


@contextlib.contextmanager
def _recorded_functions() -> Iterator[None]:
    """Custom autograd Functions record, on their node, which arguments were tensors and their
    outputs' shapes: what PyNode::apply reads (is_variable_input, output_info) and the Python
    engine cannot ask the node for."""
    function = torch.autograd.function.Function
    original = function.__dict__["apply"]  # a classmethod (a C classmethod_descriptor in recent torch)

    def apply(cls, *args, **kwargs):
        out = original.__get__(None, cls)(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        node = next((o.grad_fn for o in outs if isinstance(o, torch.Tensor) and o.grad_fn is not None), None)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            metadata = node.metadata
            metadata["orca_tensor_args"] = tuple(isinstance(a, torch.Tensor) for a in args)
            metadata["orca_outputs"] = [
                (o.shape, o.dtype, o.device, o.requires_grad) for o in outs if isinstance(o, torch.Tensor)
            ]
        return out

    context = torch.autograd.function.FunctionCtx
    set_materialize = context.set_materialize_grads

    def set_materialize_grads(self, value: bool):  # the flag cannot be read back from the node
        set_materialize(self, value)
        self.metadata["orca_materialize_grads"] = value

    with (
        mock.patch.object(function, "apply", classmethod(apply)),
        mock.patch.object(context, "set_materialize_grads", set_materialize_grads),
    ):
        yield


# ----------------------------------------------------------------------------- the GPU path on fake tensors


def _kernels_available(device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" or _utils._kernels_run_on("kernels_available", device)


def _resolve_backend(original):
    def resolve(q, k, v, key_padding_mask, backend):
        if backend == "auto" and q.device.type == "cuda":
            return dispatch.attention_backend(q, k, v, key_padding_mask)
        return original(q, k, v, key_padding_mask, backend)

    return resolve


_SDPA = F.scaled_dot_product_attention


def _cuda_sdpa(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
) -> torch.Tensor:
    """F.scaled_dot_product_attention as PyTorch runs it on CUDA tensors on an H100/H200 (its
    priority order: FlashAttention, memory-efficient, math): FlashAttention for fp16/bf16 without a
    mask (grouped-query attention included), the memory-efficient kernel with a mask or in fp32,
    else the math path. Without a GPU PyTorch's own choice falls to the math path, which builds
    the [Tq, Tk] scores. Installed as the module attribute, which every caller (transformers'
    SDPA attention, F.multi_head_attention_forward, orca_kernels) reads at each call, so that the
    recomputation of a checkpoint in the backward takes the same kernel."""
    if query.device.type != "cuda":
        return _SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    dtype = query.dtype
    if torch.is_autocast_enabled("cuda") and query.is_floating_point() and dtype != torch.float64:
        dtype = torch.get_autocast_dtype("cuda")
    head_dim = query.shape[-1]
    grouped = query.shape[-3] != key.shape[-3]
    if query.dim() == 4 and attn_mask is None and dtype in (torch.float16, torch.bfloat16) and head_dim <= 256:
        scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        pad = -head_dim % 8
        if pad:
            query, key, value = (F.pad(t, (0, pad)) for t in (query, key, value))
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale
        )[0]
        return out[..., :head_dim] if pad else out
    if query.dim() == 4 and not grouped and head_dim <= 256:
        if torch.is_autocast_enabled("cuda"):
            query, key, value = (t.to(dtype) if t.is_floating_point() else t for t in (query, key, value))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.where(attn_mask.logical_not(), float("-inf"), 0.0).to(query.dtype)
            else:
                attn_mask = attn_mask.to(query.dtype)
        needs_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, needs_lse, dropout_p, is_causal, scale=scale
        )[0]
    return _SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


@contextlib.contextmanager
def cuda_path(card: Card) -> Iterator[None]:
    """What a GPU process would answer, for fake CUDA tensors on a machine without one: autocast
    may be entered for CUDA, the fused kernels run on CUDA tensors, the attention core is chosen
    by the dispatch for `card`, the extension runs its CUDA op, SDPA picks a fused kernel."""
    import torch.cuda.amp.common as amp_common

    patches = [
        mock.patch.object(amp_common, "amp_definitely_not_available", lambda: False),
        mock.patch.object(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True),
        mock.patch.object(orca_kernels, "kernels_available", _kernels_available),
        mock.patch.object(_utils, "kernels_available", _kernels_available),
        mock.patch.object(flash_attention, "resolve_backend", _resolve_backend(flash_attention.resolve_backend)),
        mock.patch.object(dispatch, "_card_names", lambda index: (card.device_name, card.capability)),
        mock.patch.object(F, "scaled_dot_product_attention", _cuda_sdpa),
    ]
    if _extension.LOADED:
        supports = _extension.supports
        patches.append(
            mock.patch.object(
                _extension, "supports", lambda device: torch.device(device).type == "cuda" or supports(device)
            )
        )
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


@contextlib.contextmanager
def _not_tracing() -> Iterator[None]:
    """transformers takes a fake tensor for a sign of tracing (`is_tracing`) and then keeps masks it
    would drop in a real run (an all-ones padding mask: SDPA's is_causal and FlashAttention instead
    of an explicit [B, 1, T, T] mask): fake tensors here stand for a real run."""
    from torch.utils import _foreach_utils
    from transformers.utils import import_utils

    # Likewise torch's foreach kernels (clip_grad_norm_) take plain tensors only.
    foreach_types = [*_foreach_utils._foreach_supported_types, FakeTensor]
    with contextlib.ExitStack() as stack:
        if hasattr(import_utils, "is_fake_tensor"):  # transformers 5.x
            stack.enter_context(mock.patch.object(import_utils, "is_fake_tensor", lambda x: False))
        stack.enter_context(mock.patch.object(_foreach_utils, "_foreach_supported_types", foreach_types))
        yield


def _clear_table_caches() -> None:
    """The package's table caches (RoPE tables, sample indices) keyed by device: a fake run must
    not leave fake tensors there for a real run of the same process, nor find real ones."""
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("orca_kernels", "orca_model")):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, _utils.TableCache):
                value.clear()


def fake_model(model: torch.nn.Module, mode: FakeTensorMode, device: torch.device) -> None:
    """Replace every parameter and buffer of a meta-device `model` by a fake tensor on `device`
    (tied parameters stay tied; requires_grad kept)."""
    converted: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        meta = t.detach() if t.device.type == "meta" else t.detach().to("meta")
        return FakeTensor(mode, meta, device)

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in converted:
                data = fake(param)
                with mode:
                    converted[id(param)] = torch.nn.Parameter(data, requires_grad=param.requires_grad)
            module._parameters[name] = converted[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            if id(buffer) not in converted:
                converted[id(buffer)] = fake(buffer)
            module._buffers[name] = converted[id(buffer)]


# ----------------------------------------------------------------------------- the step


def make_optimizer(model: torch.nn.Module) -> Adafactor:
    """bench_model's: Trainer's optim="adafactor" (no relative step, no parameter scaling)."""
    return Adafactor(
        [p for p in model.parameters() if p.requires_grad],
        lr=1e-4,
        weight_decay=0.01,
        scale_parameter=False,
        relative_step=False,
    )


def make_batch(model: DeSTA25AudioModel, rows: int, seq_len: int, device: torch.device) -> dict:
    """bench_model's training batch: rows prompts of seq_len tokens (PROMPT_TOKENS text tokens,
    the K placeholders of the audio's global tokens, text), no padding, one 30 s audio per row,
    labels on the text after the audio, no transcription."""
    config = model.config
    encoder = config.encoder_config
    vocab = config.llm_config.vocab_size
    num_tokens = config.orca_global_num_tokens
    input_ids = torch.randint(3, vocab, (rows, seq_len), device=device)
    prompt = torch.arange(seq_len, device=device) < bench_model.PROMPT_TOKENS + num_tokens
    features = torch.randn(rows, encoder.num_mel_bins, 2 * encoder.max_source_positions, device=device)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "batch_features": features,
        "batch_transcription_ids": [torch.zeros(1, 0, dtype=torch.long, device=device)] * rows,
        "batch_start_positions": [(row, bench_model.PROMPT_TOKENS) for row in range(rows)],
        "labels": input_ids.masked_fill(prompt, -100),
    }


def train_step(
    model: DeSTA25AudioModel,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    *,
    checkpointing: bool,
    autocast: bool,
    phase: Callable[[str], None] = lambda name: None,
) -> torch.Tensor:
    """bench_model's model_train_step: forward (bf16 autocast on CUDA), LM + ORCA losses,
    backward, clip at 1.0, Adafactor, zero_grad. The outputs stay alive until the step ends, as
    there."""
    device_type = batch["input_ids"].device.type
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()
    with torch.enable_grad():
        phase("forward")
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            outputs = model(**batch)
            loss = total_training_loss(outputs)
        phase("backward")
        loss.backward()
        phase("optimizer")
        torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def init_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer state a step after the first finds: one step on zero gradients."""
    for param in optimizer.param_groups[0]["params"]:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def recording(counter: Counter, fake_mode: FakeTensorMode | None, engine: PythonEngine | None) -> Iterator[None]:
    """Every hook of a counted step: modules, node creation, saved tensors, the ORCA-loss and
    align-loss attribution, operators, and (with `engine`) the backward through it."""
    from orca_model import cross_attention as cross_attention_module

    align = cross_attention_module.layer_align_loss
    orca_losses = modeling.compute_orca_losses

    def align_loss(*args, **kwargs):
        with counter.override("ORCA losses"):
            return align(*args, **kwargs)

    def compute_orca_losses(*args, **kwargs):
        with counter.override("ORCA losses"):
            return orca_losses(*args, **kwargs)

    with contextlib.ExitStack() as stack:
        stack.enter_context(
            torch.nn.modules.module.register_module_forward_pre_hook(counter.module_pre_hook)
        )  # handles are context managers
        stack.enter_context(
            torch.nn.modules.module.register_module_forward_hook(counter.module_post_hook, always_call=True)
        )
        stack.enter_context(mock.patch.object(cross_attention_module, "layer_align_loss", align_loss))
        stack.enter_context(mock.patch.object(modeling, "compute_orca_losses", compute_orca_losses))
        if _HAS_NODE_HOOK:
            stack.enter_context(torch.autograd.graph.node_creation_hook(counter.node_created))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack))
        stack.enter_context(_recorded_functions())
        if engine is not None:
            stack.enter_context(mock.patch.object(torch.autograd, "backward", engine.backward))
            stack.enter_context(_checkpoint_frames(counter))
        for param in counter.optimizer.param_groups[0]["params"] if counter.optimizer else ():
            stack.enter_context(_post_accumulate_hook(param, counter))
        stack.enter_context(_Recorder(counter, fake_mode))
        yield


@contextlib.contextmanager
def _checkpoint_frames(counter: Counter) -> Iterator[None]:
    """What PythonEngine needs to free a non-reentrant checkpoint's saved inputs when autograd
    would: the boxes of the inputs a frame saves (`_CheckpointFrame.save_inputs`, not a node's),
    and the nodes of its region that saved something through its hooks (their saved variables
    keep the frame alive)."""
    checkpoint = torch.utils.checkpoint
    frame_class, hook_class = (
        getattr(checkpoint, "_CheckpointFrame", None),
        getattr(checkpoint, "_checkpoint_hook", None),
    )
    if frame_class is None or hook_class is None or not hasattr(frame_class, "save_inputs"):
        yield
        return
    save_inputs = frame_class.save_inputs

    def save(frame, *args, **kwargs):
        before = len(counter.pending_boxes)
        result = save_inputs(frame, *args, **kwargs)
        boxes = counter.pending_boxes[before:]
        del counter.pending_boxes[before:]
        node = getattr(getattr(frame, "input_saver", None), "grad_fn", None)  # older torch: a node saves them
        if node is not None:
            boxes += [box for box in (ref() for ref in node.metadata.get("orca_boxes", ())) if box is not None]
        frame._orca_boxes = boxes
        return result

    class Hook(hook_class):
        def __init__(self, frame, *args, **kwargs):
            super().__init__(frame, *args, **kwargs)
            pack = self.pack_hook

            def pack_hook(tensor):
                counter.pending_frames.append(frame)
                return pack(tensor)

            pack_hook.__dict__.update(pack.__dict__)  # checkpoint marks its own hooks
            self.pack_hook = pack_hook

    with mock.patch.object(frame_class, "save_inputs", save), mock.patch.object(checkpoint, "_checkpoint_hook", Hook):
        yield


@contextlib.contextmanager
def _post_accumulate_hook(param: torch.Tensor, counter: Counter) -> Iterator[None]:
    handle = param.register_post_accumulate_grad_hook(counter.grad_accumulated)
    try:
        yield
    finally:
        handle.remove()


def start_counting(counter: Counter, model: torch.nn.Module, optimizer, batch: dict) -> None:
    """The storages alive when the step starts: parameters and buffers, optimizer state, batch."""
    for t in [*model.parameters(), *model.buffers()]:
        counter.track(t, PARAMS)
        key = _storage_key(t)
        if key is not None:
            counter.excluded_storages.add(key)
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    counter.track(value, OPTIM)
    for value in tree_flatten(batch)[0]:
        if isinstance(value, torch.Tensor):
            counter.track(value, BATCH)
    counter.peak = Peak()
    counter._record_peak()
    counter.mark("step start")
    counter.by_category_at_start = dict(counter.by_category)


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass
class StepCost:
    """One variant's counted step."""

    model: str
    batch: int
    seq_len: int
    variant: str
    fused: bool
    checkpointing: bool
    device: str
    autocast: bool
    engine: str
    audio_memory: int
    parameters: dict[str, int]
    optimizer_state: int
    batch_bytes: int
    step_start: int
    end_of_forward: int
    peak: Peak
    saved_bytes: int
    saved_by_component: dict[str, int]
    components: dict[str, dict[str, int]]  # component -> flops_/bytes_ forward/backward/optimizer
    op_records: list[tuple[int, int, int, int]]
    op_totals: dict[str, list[int]]
    count_seconds: float

    def flops(self, phase: str | None = None) -> int:
        return sum(r[2] for r in self.op_records if phase is None or PHASES[r[1]] == phase)

    def bytes_moved(self, phase: str | None = None) -> int:
        return sum(r[3] for r in self.op_records if phase is None or PHASES[r[1]] == phase)

    def roofline(self, card: Card, component: str | None = None) -> float:
        """Σ over operators of max(bytes / bandwidth, FLOPs / peak), seconds."""
        index = None if component is None else COMPONENTS.index(component)
        return sum(
            max(r[3] / card.bandwidth, r[2] / card.peak_flops)
            for r in self.op_records
            if index is None or r[0] == index
        )

    def to_json(self, cards: dict[str, Card]) -> dict:
        flops, nbytes = self.flops(), self.bytes_moved()
        components = {}
        for name, values in self.components.items():
            components[name] = dict(values) | {
                "saved_bytes": self.saved_by_component.get(name, 0),
                "roofline_s": {key: self.roofline(card, name) for key, card in cards.items()},
            }
        top = sorted(self.op_totals.items(), key=lambda item: -item[1][2])[:40]
        return {
            "variant": self.variant,
            "use_fused_orca": self.fused,
            "gradient_checkpointing": self.checkpointing,
            "device": self.device,
            "autocast": "bfloat16" if self.autocast else None,
            "engine": self.engine,
            "flops": {phase: self.flops(phase) for phase in PHASES} | {"total": flops},
            "bytes_moved": {phase: self.bytes_moved(phase) for phase in PHASES} | {"total": nbytes},
            "saved_for_backward_bytes": self.saved_bytes,
            "floor_s": {key: card.floor_seconds(flops, nbytes) for key, card in cards.items()},
            "eager_roofline_s": {key: self.roofline(card) for key, card in cards.items()},
            "memory": {
                "parameters": self.parameters,
                "optimizer_state": self.optimizer_state,
                "batch": self.batch_bytes,
                "step_start": self.step_start,
                "end_of_forward": self.end_of_forward,
                "peak": self.peak.bytes,
                "peak_above_step_start": self.peak.bytes - self.step_start,
                "peak_at": {
                    "phase": self.peak.phase,
                    "component": self.peak.component,
                    "op": self.peak.op,
                    "module_or_node": self.peak.module,
                },
                "peak_by_category": self.peak.by_category,
                "peak_activations_by_component": self.peak.activations_by_component,
            },
            "components": components,
            "top_ops_by_bytes": {op: {"calls": c, "flops": f, "bytes": b} for op, (c, f, b) in top},
            "count_seconds": self.count_seconds,
        }


def _component_table(counter: Counter) -> dict[str, dict[str, int]]:
    table = {name: {f"{kind}_{phase}": 0 for kind in ("flops", "bytes") for phase in PHASES} for name in COMPONENTS}
    for component, phase, flops, nbytes in counter.op_records:
        entry = table[COMPONENTS[component]]
        entry[f"flops_{PHASES[phase]}"] += flops
        entry[f"bytes_{PHASES[phase]}"] += nbytes
    return table


def _parameter_bytes(model: torch.nn.Module) -> dict[str, int]:
    seen: dict[int, tuple[int, bool]] = {}
    for param in model.parameters():
        key = _storage_key(param)
        if key is not None:
            seen[key] = (_round(param.untyped_storage().nbytes()), param.requires_grad)
    trainable = sum(size for size, grad in seen.values() if grad)
    frozen = sum(size for size, grad in seen.values() if not grad)
    buffers = {_storage_key(b): _round(b.untyped_storage().nbytes()) for b in model.buffers()}
    return {"trainable": trainable, "frozen": frozen, "buffers": sum(buffers.values())}


def count_step(
    workload: Workload | str,
    variant: Variant | str = "fused",
    *,
    batch: int | None = None,
    device: str = "cuda",
    autocast: bool | None = None,
    card: Card | str = "h100",
    engine: str | None = None,
    config_overrides: dict | None = None,
    fake: bool = True,
    seed: int = 0,
) -> StepCost:
    """Count one training step of `workload` (a MODELS key or a Workload).

    device: "cuda" (the GPU path, the default) or "cpu" (the CPU path: what a real CPU run of the
    same step dispatches). autocast: bf16 autocast (default on for CUDA, off on the CPU). engine:
    "python" (PythonEngine; the default for fake CUDA tensors without a GPU) or "native"
    (autograd's C++ engine). card: whose attention dispatch table the CUDA path reads.
    fake=False counts a real run instead (random weights from `seed`, real tensors on `device`, the
    native engine): what the fake count is checked against."""
    workload = MODELS[workload] if isinstance(workload, str) else workload
    workload = workload.with_batch(batch)
    variant = VARIANTS[variant] if isinstance(variant, str) else variant
    card = CARDS[card] if isinstance(card, str) else card
    target = torch.device(device, 0) if device == "cuda" else torch.device(device)
    autocast = (device == "cuda") if autocast is None else autocast
    if engine is None:
        engine = "native" if device != "cuda" or torch.cuda.is_available() or not fake else "python"
    if device == "cuda" and engine == "native" and not torch.cuda.is_available():
        raise RuntimeError("benchmarks.cost: engine='native' needs a GPU for CUDA tensors; use engine='python'")
    if device == "cuda" and engine == "native" and fake:
        torch.empty(1, device="cuda")  # the C++ engine needs the CUDA context a real forward would have made
    started = time.perf_counter()
    config = workload.config(variant.fused, **(config_overrides or {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        with torch.device("meta" if fake else target), bench_model.random_weights(config):
            model = DeSTA25AudioModel(config)
    _clear_table_caches()
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    if fake:
        fake_model(model, mode, target)
    path = cuda_path(card) if device == "cuda" and fake else contextlib.nullcontext()
    try:
        with path, _not_tracing(), mode or contextlib.nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = make_optimizer(model)
            init_optimizer_state(model, optimizer)
            counter = Counter(model, optimizer, mode)
            with _shadowing(mode) if fake else contextlib.nullcontext():
                batch_tensors = make_batch(model, workload.batch, workload.seq_len, target)
            start_counting(counter, model, optimizer, batch_tensors)
            python_engine = PythonEngine(counter) if engine == "python" else None
            with recording(counter, mode, python_engine):
                train_step(
                    model,
                    optimizer,
                    batch_tensors,
                    checkpointing=variant.checkpointing,
                    autocast=autocast,
                    phase=counter.set_phase,
                )
            counter.phase = "done"
    finally:
        _clear_table_caches()
    local_tokens = config.encoder_config.max_source_positions + 2 * (config.orca_local_kernel_size // 2)
    local_tokens = (local_tokens - config.orca_local_kernel_size) // config.orca_local_downsample + 1
    memory_tokens = local_tokens + (config.orca_global_num_tokens if config.orca_global_cross_attn else 0)
    result = StepCost(
        model=workload.label,
        batch=workload.batch,
        seq_len=workload.seq_len,
        variant=variant.name,
        fused=variant.fused,
        checkpointing=variant.checkpointing,
        device=f"{device} (fake tensors)" if fake else device,
        autocast=autocast,
        engine=engine,
        audio_memory=memory_tokens,
        parameters=_parameter_bytes(model),
        optimizer_state=_state_bytes(optimizer),
        batch_bytes=counter.by_category_at_start[BATCH],
        step_start=counter.marks["step start"],
        end_of_forward=counter.marks.get("end of forward", 0),
        peak=counter.peak,
        saved_bytes=counter.saved_bytes,
        saved_by_component={k: v for k, v in counter.saved_by_component.items() if v},
        components=_component_table(counter),
        op_records=counter.op_records,
        op_totals=counter.op_totals,
        count_seconds=time.perf_counter() - started,
    )
    del model, optimizer, batch_tensors, counter
    gc.collect()
    return result


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    keys = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                keys[_storage_key(value)] = _round(value.untyped_storage().nbytes())
    return sum(keys.values())


@contextlib.contextmanager
def _shadowing(mode: FakeTensorMode) -> Iterator[None]:
    """The batch's integer tensors made with their real values alongside."""
    recorder = _Recorder(_NullCounter(), mode)
    with recorder:
        yield


class _NullCounter:
    def record_op(self, *args) -> None:
        pass


# ----------------------------------------------------------------------------- the GPU comparison


def measured_peak_vs_predicted(
    workload: Workload | str = "qwen3-0.6b",
    variant: Variant | str = "fused",
    *,
    batch: int | None = None,
    card: Card | str | None = None,
    engine: str = "python",
) -> dict:
    """On a GPU: the predicted peak of one training step (fake tensors, as without a GPU) against
    `torch.cuda.max_memory_allocated` of the same step run for real (random weights, bf16
    autocast, after a warm-up step that creates the optimizer state, cuBLAS workspaces and
    caches). Returns both, their ratio, and the same for the peak above the step's start (what
    bench_model's peak column reports)."""
    if not torch.cuda.is_available():
        raise RuntimeError("measured_peak_vs_predicted needs a GPU")
    workload = MODELS[workload] if isinstance(workload, str) else workload
    workload = workload.with_batch(batch)
    variant = VARIANTS[variant] if isinstance(variant, str) else variant
    name = torch.cuda.get_device_name()
    if card is None:
        card = "h200" if "H200" in name else "h100"
    predicted = count_step(workload, variant, card=card, engine=engine)
    device = torch.device("cuda")
    config = workload.config(variant.fused)
    torch.manual_seed(0)
    with torch.device(device), bench_model.random_weights(config):
        model = DeSTA25AudioModel(config)
    optimizer = make_optimizer(model)
    batch_tensors = make_batch(model, workload.batch, workload.seq_len, device)
    step = dict(checkpointing=variant.checkpointing, autocast=True)
    train_step(model, optimizer, batch_tensors, **step)  # warm-up: optimizer state, workspaces, caches
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    train_step(model, optimizer, batch_tensors, **step)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    result = {
        "model": workload.label,
        "batch": workload.batch,
        "variant": variant.name,
        "device": name,
        "engine": engine,
        "predicted_peak": predicted.peak.bytes,
        "measured_peak": peak,
        "ratio": predicted.peak.bytes / peak,
        "predicted_step_start": predicted.step_start,
        "measured_step_start": start,
        "predicted_peak_above_start": predicted.peak.bytes - predicted.step_start,
        "measured_peak_above_start": peak - start,
        "ratio_above_start": (predicted.peak.bytes - predicted.step_start) / max(peak - start, 1),
        "predicted_peak_at": dataclasses.asdict(predicted.peak)
        | {"by_category": None, "activations_by_component": None},
    }
    del model, optimizer, batch_tensors
    gc.collect()
    torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------- report


def _gb(n: float) -> str:
    return f"{n / GiB:.2f}"


def summary_table(results: Sequence[StepCost], card: Card) -> str:
    """One row per variant; the ratios are to the reference path's row (the first row without one)."""
    reference = next((r for r in results if r.variant == "reference"), results[0])
    ref_above = max(reference.peak.bytes - reference.step_start, 1)
    lines = [
        "| variant | TFLOP fwd / bwd | GB moved | saved for bwd GiB (× ref) | peak GiB (× ref) "
        f"| peak above step start GiB (× ref) | peak at | floor ms ({card.label}) | eager roofline ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        floor = card.floor_seconds(r.flops(), r.bytes_moved())
        bound = "compute" if floor["compute"] >= floor["memory"] else "memory"
        above = r.peak.bytes - r.step_start
        lines.append(
            f"| {r.variant} | {r.flops('forward') / 1e12:.1f} / {r.flops('backward') / 1e12:.1f} "
            f"| {r.bytes_moved() / 1e9:.0f} "
            f"| {_gb(r.saved_bytes)} ({r.saved_bytes / max(reference.saved_bytes, 1):.3f}) "
            f"| {_gb(r.peak.bytes)} ({r.peak.bytes / max(reference.peak.bytes, 1):.3f}) "
            f"| {_gb(above)} ({above / ref_above:.3f}) "
            f"| {r.peak.phase}: {r.peak.component} (`{r.peak.op}`) "
            f"| {floor['floor'] * 1e3:.0f} ({bound}) | {r.roofline(card) * 1e3:.0f} |"
        )
    return "\n".join(lines)


def component_table(result: StepCost, card: Card) -> str:
    lines = [
        f"| component | GFLOP fwd | GFLOP bwd | GB moved | saved MiB | roofline ms ({card.label}) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in COMPONENTS:
        c = result.components[name]
        flops = c["flops_forward"] + c["flops_backward"] + c["flops_optimizer"]
        nbytes = c["bytes_forward"] + c["bytes_backward"] + c["bytes_optimizer"]
        saved = result.saved_by_component.get(name, 0)
        if not (flops or nbytes or saved):
            continue
        lines.append(
            f"| {name} | {c['flops_forward'] / 1e9:.0f} | {(c['flops_backward']) / 1e9:.0f} | {nbytes / 1e9:.1f} "
            f"| {saved / 2**20:.0f} | {result.roofline(card, name) * 1e3:.1f} |"
        )
    lines.append(
        f"| **total** | **{result.flops('forward') / 1e9:.0f}** | **{result.flops('backward') / 1e9:.0f}** "
        f"| **{result.bytes_moved() / 1e9:.1f}** | **{result.saved_bytes / 2**20:.0f}** "
        f"| **{result.roofline(card) * 1e3:.1f}** |"
    )
    return "\n".join(lines)


def comparison_table(results: Sequence[StepCost], card: Card) -> str:
    """Per component, the variants side by side: saved-for-backward MiB, GFLOP (forward +
    backward, recomputation included) and eager roofline ms."""
    names = " / ".join(r.variant for r in results)
    lines = [
        f"| component | saved MiB ({names}) | GFLOP ({names}) | roofline ms, {card.label} ({names}) |",
        "| --- | --- | --- | --- |",
    ]
    for name in COMPONENTS:
        saved = [r.saved_by_component.get(name, 0) / 2**20 for r in results]
        flops = [sum(r.components[name][f"flops_{phase}"] for phase in PHASES) / 1e9 for r in results]
        times = [r.roofline(card, name) * 1e3 for r in results]
        if not any(saved) and not any(flops) and max(times) < 0.05:
            continue
        lines.append(
            f"| {name} | {' / '.join(f'{v:.0f}' for v in saved)} | {' / '.join(f'{v:.0f}' for v in flops)} "
            f"| {' / '.join(f'{v:.1f}' for v in times)} |"
        )
    return "\n".join(lines)


def memory_table(results: Sequence[StepCost]) -> str:
    lines = [
        "| variant | " + " | ".join(CATEGORIES) + " | peak GiB | where |",
        "| --- |" + " --- |" * (len(CATEGORIES) + 2),
    ]
    for r in results:
        cells = " | ".join(_gb(r.peak.by_category.get(c, 0)) for c in CATEGORIES)
        where = f"{r.peak.phase}, {r.peak.component}, `{r.peak.op}` in {r.peak.module or '–'}"
        lines.append(f"| {r.variant} | {cells} | {_gb(r.peak.bytes)} | {where} |")
    return "\n".join(lines)


def report(results: Sequence[StepCost], card: Card) -> str:
    first = results[0]
    head = (
        f"## {first.model}, batch {first.batch}, T_x {first.seq_len}, T_a {first.audio_memory}: one training step "
        f"(bf16 autocast, Adafactor), predicted on fake tensors\n\n"
        f"Card: {card.label}, {card.peak_flops / 1e12:.0f} TFLOP/s, {card.bandwidth / 1e12:.2f} TB/s. "
        f"GiB = 2^30 bytes, GB = 1e9. Parameters: {_gb(first.parameters['trainable'])} GiB trainable, "
        f"{_gb(first.parameters['frozen'])} GiB frozen; optimizer state {_gb(first.optimizer_state)} GiB.\n"
    )
    parts = [head, summary_table(results, card), "", "Live memory at the peak (GiB):", "", memory_table(results)]
    parts += ["", "By component:", "", comparison_table(results, card)]
    for r in results:
        parts += ["", f"### {r.variant}", "", component_table(r, card)]
    return "\n".join(parts) + "\n"


def plot(results: Sequence[StepCost], card: Card, path: str) -> None:
    """Two panels of horizontal stacked bars, one bar per variant, 800 px wide: the live memory at
    the peak by category, and the eager roofline time on `card` by component."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = list(results)[::-1]
    names = [r.variant for r in ordered]
    components = [c for c in COMPONENTS if any(r.roofline(card, c) for r in results)]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(8, 4.4 + 1.0 * len(results)), dpi=100, gridspec_kw={"hspace": 0.75}
    )
    colours = plt.get_cmap("tab20").colors
    panels = (
        (top, CATEGORIES, lambda r, c: r.peak.by_category.get(c, 0) / GiB, "GiB live at the peak", 3),
        (bottom, components, lambda r, c: r.roofline(card, c) * 1e3, f"eager roofline ms ({card.label})", 5),
    )
    for axis, keys, value, label, columns in panels:
        left = [0.0] * len(ordered)
        for i, key in enumerate(keys):
            values = [value(r, key) for r in ordered]
            colour = colours[(2 * i) % 20] if axis is top else colours[i % 20]
            axis.barh(names, values, left=left, color=colour, label=key)
            left = [a + b for a, b in zip(left, values, strict=True)]
        for y, total in enumerate(left):
            axis.text(total, y, f" {total:.1f}", va="center", fontsize=8)
        axis.set_xlim(0, max(left) * 1.12)
        axis.set_xlabel(label, fontsize=9)
        axis.tick_params(labelsize=8)
        axis.legend(fontsize=7, ncol=columns, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)
    first = results[0]
    top.set_title(f"{first.model}, batch {first.batch}: one training step, predicted (fake tensors)", fontsize=9)
    fig.subplots_adjust(left=0.16, right=0.97, top=0.95, bottom=0.17)
    fig.savefig(path)
    plt.close(fig)


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def write_results(results: Sequence[StepCost], cards: dict[str, Card], card: Card, out: str, plots: bool = True):
    """<out>/<model>-B<batch>.json, .md (and .png): the JSON has no "metadata" key, so
    benchmarks/readme_results.py never takes it for a GPU run."""
    os.makedirs(out, exist_ok=True)
    first = results[0]
    stem = os.path.join(out, f"{first.model}-B{first.batch}")
    data = {
        "cost_model": {
            "what": "one training step on fake tensors (benchmarks/cost.py)",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "git_sha": _git_sha(),
            "torch": torch.__version__,
            "cards": {key: dataclasses.asdict(value) for key, value in cards.items()},
            "report_card": card.label,
        },
        "model": first.model,
        "batch": first.batch,
        "seq_len": first.seq_len,
        "audio_memory": first.audio_memory,
        "parameters": first.parameters,
        "optimizer_state": first.optimizer_state,
        "variants": {r.variant: r.to_json(cards) for r in results},
    }
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(report(results, card))
    if plots:
        plot(results, card, stem + ".png")
    return stem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3-0.6b", help=f"{', '.join(MODELS)} or all")
    parser.add_argument("--batch", type=int, default=None, help="batch (default: the model's training batch)")
    parser.add_argument("--seq-len", type=int, default=None, help="T_x (default 300)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--card", default="h100", choices=sorted(CARDS), help="the card of the report's times")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the card's dense bf16 peak")
    parser.add_argument("--bandwidth-tbs", type=float, default=None, help="override the card's HBM bandwidth")
    parser.add_argument("--engine", choices=("python", "native"), default=None, help="backward engine (see docstring)")
    parser.add_argument("--out", default=RESULTS, help="folder of the JSON, table and plot")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--measure", action="store_true", help="on a GPU: predicted vs measured peak per variant")
    args = parser.parse_args(argv)
    cards = dict(CARDS)
    card = cards[args.card]
    if args.peak_tflops or args.bandwidth_tbs:
        card = dataclasses.replace(
            card,
            label=f"{card.label} (custom)",
            peak_flops=(args.peak_tflops or card.peak_flops / 1e12) * 1e12,
            bandwidth=(args.bandwidth_tbs or card.bandwidth / 1e12) * 1e12,
        )
        cards["custom"] = card
    variants = [VARIANTS[name] for name in args.variants.split(",")]
    models = list(MODELS) if args.model == "all" else [args.model]
    for label in models:
        workload = MODELS[label].with_batch(args.batch)
        if args.seq_len:
            workload = dataclasses.replace(workload, seq_len=args.seq_len)
        if args.measure:
            rows = [measured_peak_vs_predicted(workload, v, engine=args.engine or "python") for v in variants]
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, f"{label}-B{workload.batch}-measured.json")
            with open(path, "w") as f:
                json.dump(rows, f, indent=1, default=str)
            for row in rows:
                print(
                    f"{row['variant']}: predicted {_gb(row['predicted_peak'])} GiB, measured "
                    f"{_gb(row['measured_peak'])} GiB (ratio {row['ratio']:.4f}); above the step's start "
                    f"{_gb(row['predicted_peak_above_start'])} vs {_gb(row['measured_peak_above_start'])} GiB "
                    f"(ratio {row['ratio_above_start']:.4f})"
                )
            print(f"wrote {path}")
            continue
        results = []
        for variant in variants:
            print(f"counting {label} B{workload.batch} {variant.name} ...", file=sys.stderr, flush=True)
            results.append(count_step(workload, variant, card=args.card, engine=args.engine))
            print(f"  done in {results[-1].count_seconds:.1f} s", file=sys.stderr, flush=True)
        print(report(results, card))
        stem = write_results(results, cards, card, args.out, plots=not args.no_plot)
        print(f"wrote {stem}.json, {stem}.md" + ("" if args.no_plot else f", {stem}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
