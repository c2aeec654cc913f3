"""Bytes and FLOPs of every launch of the fused gated cross-attention, forward and backward, at the
training shapes, and the time each takes at the HBM and tensor-core rooflines
(docs/ops.md#bytes-moved).

    TRITON_INTERPRET=1 python -m benchmarks.module_bytes [--markdown] [--bandwidth 4.8e12] [--peak 989e12]

Nothing is computed and no GPU is needed (TRITON_INTERPRET=1 only opens the fused path on CPU
tensors): `gated_cross_attention(backend="triton")` and its
backward run on fake tensors (FakeTensorMode; the Triton ops answer through their fake
implementations) under a dispatch mode that records every operator with its operands. Each
operator that is not a view is one launch; it reads each operand and writes each result once
(compulsory traffic: what a kernel must move, however well it reuses L2), with these exceptions:

- in-place ops (`addmm_`) read and write their destination;
- `slice_backward` (the gradient of a slice) is two launches: a zero fill of the whole input and a
  copy of the slice's gradient into it;
- the Triton ops are modelled from their launchers: `flash_cross_attention_backward` is the
  preprocess (rowsum(dO∘O)) and either the one-pass kernel (where `flash_attention.one_pass_backward`
  holds: Qwen3-0.6B), which also writes and reads back its fp32 dQ partial sums once per key block
  but the last, or the dK/dV and the dQ kernels; `gated_residual_backward` is the zero
  fill of its per-program partial sums (4 per SM), the kernel, and their four reductions; the
  RoPE reads its fp32 cos/sin table as well.

FLOPs are counted for the GEMMs (2·M·N·K) and the attention (4·B·nh·Tx·Ta·hd forward; 10 for the
one-pass backward's five tile products, 8 and 6 for the two kernels, which recompute the scores).
A launch's roofline time is max(bytes / bandwidth, FLOPs / peak). The defaults are an H200's:
4.8 TB/s HBM3e and 989 TFLOP/s dense bf16 (an H100 SXM has 3.35 TB/s and the same peak). Shapes
and dtypes are docs/model-shapes.md's: bf16 activations and parameters, B·Tx query rows, a key
padding mask, gradients of everything.

Two variants of the q and u projections: `after` is the code as it is (its backward writes ∂hidden
once); `before` leaves their backward to autograd (the code before `_query_and_gate`). The
difference is what it saves.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import traceback
import warnings
from collections.abc import Iterator
from unittest import mock

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import orca_kernels
from benchmarks import cost
from orca_kernels import cross_attention, flash_attention

H200_BANDWIDTH = 4.8e12  # bytes/s
H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s (H100 SXM: the same)
SMS = 132  # H100 SXM and H200: gated_residual_backward has 4 programs per SM

# (name, B, Tx, H, heads, Ta): docs/model-shapes.md#training-shapes
MODELS = [
    ("Qwen3-0.6B", 32, 300, 1024, 16, 439),
    ("Qwen3-4B", 12, 300, 2560, 32, 439),
    ("Llama-3.1-8B", 12, 300, 4096, 32, 383),
]

# Views, metadata and allocations without a fill (the cost model's list), and the seed gradient
# of .sum(): no launch.
FREE = cost.NO_TRAFFIC | {"promote_types", "ones_like"}


@dataclasses.dataclass
class Launch:
    phase: str  # "fwd" or "bwd"
    label: str  # op and operand shapes in symbols (N = B·Tx, M = B·Ta, G = H/4, ...)
    read: int  # bytes
    write: int
    flops: int = 0

    def seconds(self, bandwidth: float, peak: float) -> float:
        return max((self.read + self.write) / bandwidth, self.flops / peak)


def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


ROLES = [  # (a piece of the line of orca_kernels/cross_attention.py that made the launch, its role)
    ("audio_rope(", "RoPE"),
    ("in_proj_weight[size:]", "K/V projection"),
    ("audio_kv.split(", "K/V split"),
    ("_QueryGateProjection", "q/u projection"),
    ("_query_and_gate(", "q/u projection"),
    ("w_q, b_q = ", "W_q view"),
    ("flash_cross_attention(", "attention"),
    ("attended = F.linear", "out projection"),
    ("gated_residual(", "gated residual"),
]


def role() -> str:
    """What the launch being dispatched is for: the line of the module that made it (in the
    backward, the line that made the autograd node running, from anomaly mode's trace)."""
    node = torch._C._current_autograd_node()
    trace = node.metadata.get("traceback_", []) if node is not None else traceback.format_stack()
    lines = [line for entry in trace for line in entry.splitlines() if "cross_attention.py" not in line]
    for line in reversed(lines):
        for piece, name in ROLES:
            if piece in line:
                return name
    return "?"


class Recorder(TorchDispatchMode):
    """Every non-view operator dispatched inside the block, as Launches (see the module docstring)."""

    def __init__(self, symbols: dict[int, str], programs: int) -> None:
        super().__init__()
        self.symbols, self.programs = symbols, programs
        self.phase = "fwd"
        self.launches: list[Launch] = []

    def shapes(self, tensors, inputs: bool = True) -> str:
        """The operands' shapes in symbols; the gate's [1, G] and [1] parameters left out of the inputs."""
        shown = [t for t in tensors if not inputs or (t.dim() > 0 and t.shape[0] != 1)]
        return "·".join("[" + ",".join(self.symbols.get(int(d), str(int(d))) for d in t.shape) + "]" for t in shown)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if name in FREE or func.is_view or not outs:  # views, allocations, metadata (prim.device)
            return out
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        # In the backward an add is autograd summing two gradients of one tensor.
        prefix = "autograd sums gradients: add" if name == "add" and self.phase == "bwd" else f"{role()}: {name}"
        label = f"{prefix} {self.shapes(ins)} → {self.shapes(outs, inputs=False)}"
        self.launches.extend(self.model(name, prefix, label, args, ins, outs))
        return out

    def model(self, name: str, prefix: str, label: str, args, ins, outs) -> list[Launch]:
        read, write = sum(map(_bytes, ins)), sum(map(_bytes, outs))
        add = lambda label, r, w, f=0: Launch(self.phase, label, r, w, f)  # noqa: E731
        if name in ("mm", "addmm", "addmm_"):
            a, b = ins[-2], ins[-1]
            flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
            return [add(label, read, _bytes(ins[0]) if name == "addmm_" else write, flops)]
        if name == "slice_backward":
            return [add(f"{label} (zero fill)", 0, write), add(f"{label} (copy)", read, read)]
        if name == "audio_rope":
            x = args[0]
            return [add(label, read + 2 * x.shape[1] * (x.shape[2] // 2) * 4, write)]  # + fp32 cos, sin [Ta, H/2]
        if name == "flash_cross_attention":
            q, k = args[0], args[1]
            B, Tx, nh, hd = q.shape
            return [add(label, read, write, 4 * B * nh * Tx * k.shape[1] * hd)]
        if name == "flash_cross_attention_backward":
            q, k, v, mask, o, lse, dout = args[:7]
            dq, dk, dv = outs
            B, Tx, nh, hd = q.shape
            attention = B * nh * Tx * k.shape[1] * hd
            common = 2 * _bytes(lse) + _bytes(mask)  # lse, delta (fp32 [B, nh, Tx] both), the mask
            inputs = _bytes(q) + _bytes(k) + _bytes(v) + _bytes(dout) + common
            preprocess = add(f"{prefix}: preprocess δ = rowsum(dO∘O)", _bytes(o) + _bytes(dout), _bytes(lse))
            config = flash_attention.heuristic_configs(q.dtype, Tx, flash_attention.head_width(hd), (9, 0))["bwd"]
            with mock.patch.object(flash_attention._utils, "persistent_programs", lambda device: 4 * SMS):
                one_pass = flash_attention.one_pass_backward(B, nh, k.shape[1], hd, config["BLOCK_N"], None)
            if not one_pass:
                return [
                    preprocess,
                    add(f"{prefix}: dK, dV kernel", inputs, _bytes(dk) + _bytes(dv), 8 * attention),
                    add(f"{prefix}: dQ kernel", inputs, _bytes(dq), 6 * attention),
                ]
            key_blocks = -(-k.shape[1] // config["BLOCK_N"])
            partial_sums = (key_blocks - 1) * B * nh * Tx * flash_attention.head_width(hd) * 4  # fp32
            return [
                preprocess,
                add(
                    f"{prefix}: one-pass dQ, dK, dV kernel",
                    inputs + partial_sums,
                    _bytes(dq) + _bytes(dk) + _bytes(dv) + partial_sums,
                    10 * attention,
                ),
            ]
        if name == "gated_residual_backward":
            size, gate = args[1].shape[-1], args[2].shape[-1]
            partials = self.programs * (2 * size + gate + 1) * 4  # fp32 [P, H] x2, [P, G], [P]
            return [
                add(f"{prefix}: zero the partial sums", 0, partials),
                add(f"{label} (kernel)", read, write + partials),
                add(f"{prefix}: reduce the partial sums", partials, sum(map(_bytes, outs[2:]))),
            ]
        if name.endswith("_"):  # in place: the destination is read and written
            return [add(label, read, _bytes(ins[0]))]
        return [add(label, read, write)]


def _separate_query_and_gate(hidden, in_proj_weight, in_proj_bias, gate_hidden_weight, gate_hidden_bias):
    """The code before the shared projection: two GEMMs, autograd's backward."""
    size = hidden.shape[-1]
    q = F.linear(hidden, in_proj_weight[:size], in_proj_bias[:size])
    return q, F.linear(hidden, gate_hidden_weight, gate_hidden_bias)


VARIANTS = {"before": _separate_query_and_gate, "after": None}


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    if VARIANTS[name] is None:
        yield
        return
    original = cross_attention._query_and_gate
    cross_attention._query_and_gate = VARIANTS[name]
    try:
        yield
    finally:
        cross_attention._query_and_gate = original


def record(batch: int, tx: int, size: int, heads: int, ta: int, which: str = "after", programs: int = 4 * SMS):
    """The launches of one forward and backward of the module at this shape."""
    if not orca_kernels.kernels_available("cpu"):
        raise SystemExit("module_bytes: set TRITON_INTERPRET=1 (the fused path on fake CPU tensors; nothing runs)")
    gate, hd = size // 4, size // heads
    symbols = {
        batch * tx: "N",
        batch * ta: "M",
        size: "H",
        gate: "G",
        2 * size: "2H",
        3 * size: "3H",
        size + gate: "H+G",
        batch: "B",
        tx: "Tx",
        ta: "Ta",
        heads: "nh",
        hd: "hd",
        programs: "P",
    }
    dtype = torch.bfloat16
    with FakeTensorMode():
        hidden = torch.empty(batch, tx, size, dtype=dtype, requires_grad=True)
        audio = torch.empty(batch, ta, size, dtype=dtype, requires_grad=True)
        shapes = [(3 * size, size), (3 * size,), (size, size), (size,), (gate, size), (gate,), (1, gate), (1,)]
        shapes += [(size,), (size,)]
        params = [torch.empty(s, dtype=dtype, requires_grad=True) for s in shapes]
        mask = torch.zeros(batch, ta, dtype=torch.bool)
        grad_out = torch.empty(batch, tx, size, dtype=dtype)
        recorder = Recorder(symbols, programs)
        # Anomaly mode keeps each autograd node's forward trace: the role of a backward launch.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Anomaly Detection has been enabled")
            anomaly = torch.autograd.detect_anomaly(check_nan=False)
        with variant(which), recorder, anomaly:
            out = orca_kernels.gated_cross_attention(
                hidden, audio, *params, heads, key_padding_mask=mask, backend="triton", attention_backend="triton"
            )
            recorder.phase = "bwd"
            torch.autograd.grad(out, [hidden, audio, *params], grad_out)
    return recorder.launches


def totals(launches, bandwidth: float, peak: float) -> dict[str, tuple[float, float, float]]:
    """{phase: (bytes, FLOPs, roofline seconds)} for fwd, bwd and all."""
    result = {}
    for phase in ("fwd", "bwd", "all"):
        chosen = [x for x in launches if phase in ("all", x.phase)]
        result[phase] = (
            sum(x.read + x.write for x in chosen),
            sum(x.flops for x in chosen),
            sum(x.seconds(bandwidth, peak) for x in chosen),
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bandwidth", type=float, default=H200_BANDWIDTH, help="HBM bytes/s (default: H200)")
    parser.add_argument("--peak", type=float, default=H200_BF16_PEAK, help="dense bf16 FLOP/s (default: H100/H200)")
    parser.add_argument("--markdown", action="store_true", help="one launch table for the three models")
    args = parser.parse_args()
    runs = {name: {which: record(*shape, which=which) for which in VARIANTS} for name, *shape in MODELS}
    print(f"roofline: {args.bandwidth / 1e12:.2f} TB/s, {args.peak / 1e12:.0f} TFLOP/s; MB = 1e6 bytes\n")
    for name, by_variant in runs.items():
        print(f"## {name}")
        for which, launches in by_variant.items():
            print(f"### {which}: {len(launches)} launches")
            for x in launches:
                us = x.seconds(args.bandwidth, args.peak) * 1e6
                gflop = f"{x.flops / 1e9:8.1f} GFLOP" if x.flops else " " * 14
                print(f"  {x.phase} {x.read / 1e6:9.2f} MB r {x.write / 1e6:9.2f} MB w {gflop} {us:8.2f} us  {x.label}")
            for phase, (nbytes, flops, seconds) in totals(launches, args.bandwidth, args.peak).items():
                print(f"  total {phase}: {nbytes / 1e6:9.1f} MB, {flops / 1e9:8.1f} GFLOP, {seconds * 1e6:8.1f} us")
            roles: dict[str, list[float]] = {}
            for x in launches:
                kind = "GEMM" if x.flops and "attention" not in x.label else "other"
                entry = roles.setdefault(f"{x.label.split(':')[0]} ({kind})", [0.0, 0.0])
                entry[0] += x.read + x.write
                entry[1] += x.seconds(args.bandwidth, args.peak)
            print("  by role: " + "; ".join(f"{r} {b / 1e6:.0f} MB {t * 1e6:.1f} us" for r, (b, t) in roles.items()))
        before = totals(by_variant["before"], args.bandwidth, args.peak)
        for which in VARIANTS:
            if which != "before":
                now = totals(by_variant[which], args.bandwidth, args.peak)
                saved = ", ".join(
                    f"{phase} {(before[phase][0] - now[phase][0]) / 1e6:.1f} MB "
                    f"{(before[phase][2] - now[phase][2]) * 1e6:.1f} us"
                    for phase in ("fwd", "bwd", "all")
                )
                print(f"  saved against before by {which!r}: {saved}")
        print()
    if args.markdown:
        print(markdown({name: v["after"] for name, v in runs.items()}, args.bandwidth, args.peak))


def markdown(runs: dict[str, list[Launch]], bandwidth: float, peak: float) -> str:
    """One row per launch (its label and occurrence), merged across the models in launch order,
    with MB, GFLOP and µs per model ("–": the model does not make that launch)."""
    keys: list[tuple[str, str, int]] = []
    cells: dict[tuple[str, str, int], dict[str, Launch]] = {}
    for name, launches in runs.items():
        seen: dict[tuple[str, str], int] = {}
        position = -1
        for x in launches:
            occurrence = seen[(x.phase, x.label)] = seen.get((x.phase, x.label), 0) + 1
            key = (x.phase, x.label, occurrence)
            if key not in cells:
                keys.insert(position + 1, key)
                cells[key] = {}
            position = keys.index(key)
            cells[key][name] = x
    lines = [
        "| pass | launch | " + " | ".join(f"{n}: MB, GFLOP, µs" for n in runs) + " |",
        "| --- | --- |" + " --- |" * len(runs),
    ]
    for key in keys:
        row = []
        for name in runs:
            x = cells[key].get(name)
            if x is None:
                row.append("–")
                continue
            flops = f"{x.flops / 1e9:.1f}" if x.flops else "–"
            row.append(f"{(x.read + x.write) / 1e6:.1f}, {flops}, {x.seconds(bandwidth, peak) * 1e6:.1f}")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(row) + " |")
    for phase in ("fwd", "bwd", "all"):
        row = []
        for launches in runs.values():
            nbytes, flops, seconds = totals(launches, bandwidth, peak)[phase]
            row.append(f"**{nbytes / 1e6:.0f}, {flops / 1e9:.0f}, {seconds * 1e6:.0f}**")
        lines.append(f"| **{phase}** | **total** | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
