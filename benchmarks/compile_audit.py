"""Static compile audit: every Triton kernel launch the ops make at the model shapes, compiled for
sm_80 (A100) and sm_90 (H100/H200) on a machine without a GPU.

The Triton interpreter proves numbers, not that a kernel compiles for a card, nor what it costs
there. This tool records the launches (kernel, grid, arguments, launch settings) that the ops'
launchers make for the GPU at the shapes of the three models ORCA-DeSTA trains (forward and
backward, every dtype, decode and training, with and without a key padding mask, the autocast mix
of fp32 parameters and bf16 activations), specialises each launch as Triton does on a GPU, and
compiles it with `triton.compile` down to a cubin (ptxas runs). `cuobjdump -res-usage` then gives
registers and spills, the PTX tells whether a dot reached the tensor cores.

Checks, each a failure of the run (exit status 1):
- every launch compiles for every target;
- no register spill (STACK or LOCAL bytes) in any fp16, bf16, fp32 or autocast variant (fp64 is
  for gradcheck at small shapes: reported, not required);
- dynamic shared memory within the target's per-block limit;
- a bf16/fp16 kernel with a `tt.dot` lowers it to tensor-core instructions (wgmma or mma.sync);
- no warp duplicates another's work (fp64 again reported, not required), read from the TTGIR:
  every tensor in an `nvidia_mma` layout (a dot's result tile and what stays in its layout) must
  hold at least one per-warp instruction tile per warp along M and N (M: warpsPerCTA[0] x
  instrShape[0] rows; N: warpsPerCTA[1] x instrShape[1] columns); 8 warps over a 64-row tile
  compute every element twice. Axes of size 1 (broadcast row statistics) are exempt. The result of
  an FMA dot (fp32) is held to the same rule in its blocked layout (a warp's tile: sizePerThread x
  threadsPerWarp); see `duplicated_warps`;
- every `@triton.jit` kernel of orca_kernels is launched by some case (nothing goes unaudited).

Launches are recorded on meta tensors (no memory, no compute): the launchers only read shapes,
strides and dtypes. Run it without TRITON_INTERPRET (the kernels must be compiled kernels):

    python -m benchmarks.compile_audit --out benchmarks/results        # table + JSON
    python -m benchmarks.compile_audit --arch sm_90 --jobs 8            # one target, more processes
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from unittest import mock

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from orca_kernels import _utils, gated_residual, ortho_loss, rope
from orca_kernels import flash_attention as attention


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU the kernels must compile for."""

    arch: str
    capability: int
    multiprocessors: int
    max_shared_per_block: int  # bytes of dynamic shared memory one block may opt in to
    shared_per_multiprocessor: int
    card: str


TARGETS = {
    "sm_90": Target("sm_90", 90, 132, 232448, 233472, "H100/H200 SXM"),
    "sm_80": Target("sm_80", 80, 108, 166912, 167936, "A100"),
}
REGISTERS_PER_MULTIPROCESSOR = 65536
THREADS_PER_MULTIPROCESSOR = 2048
BLOCKS_PER_MULTIPROCESSOR = 32


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The cross-attention and loss shapes of one model in training (DeSTA2.5 + ORCA)."""

    name: str
    hidden: int
    heads: int
    batch: int
    audio_tokens: int  # T_a: local tokens of the audio memory
    global_tokens: int  # K_g: Q-Former tokens

    @property
    def head_dim(self) -> int:
        """The cross-attention's head dim (H / heads, not the LLM's own)."""
        return self.hidden // self.heads


MODELS = (
    ModelShape("qwen3-0.6b", 1024, 16, 32, 439, 64),
    ModelShape("qwen3-4b", 2560, 32, 12, 439, 64),
    ModelShape("llama3.1-8b", 4096, 32, 12, 383, 8),
)
TEXT_LENGTHS = {"decode": 1, "prefill-64": 64, "prefill-128": 128, "train": 300}
MAX_LOCAL_SAMPLES = 100
# Compiler options a launch may pass besides warps and stages.
LAUNCH_OPTIONS = ("maxnreg", "num_ctas", "enable_fp_fusion")
# Kernels bitwise equal to the reference's separate elementwise ops: ptxas must not contract a*b + c
# into one fma (a launch passes enable_fp_fusion=False), or the result differs in the last bit.
UNCONTRACTED_KERNELS = {"_audio_rope_fwd_kernel"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
TL_DTYPE_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bool: "i1",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.int32: "i32",
    torch.int64: "i64",
}


# ----------------------------------------------------------------------------- recording


@dataclasses.dataclass
class Launch:
    """One kernel launch as a launcher made it."""

    kernel: JITFunction
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict
    case: str = ""
    precision: str = ""  # bf16 | fp16 | fp32 | fp64 | autocast: which spill rule applies


@contextlib.contextmanager
def recorded_launches(target: Target) -> Iterator[list[Launch]]:
    """Within the block, `kernel[grid](...)` records the launch instead of running it, and the
    launchers size their grids for `target`."""
    launches: list[Launch] = []

    def getitem(kernel, grid):
        def launch(*args, **kwargs):
            launches.append(Launch(kernel, tuple(grid), args, kwargs))

        return launch

    with (
        mock.patch.object(JITFunction, "__getitem__", getitem),
        mock.patch.object(_utils, "persistent_programs", lambda device: 4 * target.multiprocessors),
        mock.patch.object(_utils, "cuda_capability", lambda device: divmod(target.capability, 10)),
    ):
        yield launches


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _attention_launches(model: ModelShape, text: int, dtype: torch.dtype, masked: bool, backward: bool) -> None:
    """The flash cross-attention as the gated cross-attention calls it: q a view of its
    projection, k and v column halves of the packed [B, T_a, 2H] K/V projection."""
    B, H, nh = model.batch, model.hidden, model.heads
    hd = H // nh
    q = _meta(B, text, H, dtype=dtype).unflatten(-1, (nh, hd))
    kv = _meta(B, model.audio_tokens, 2 * H, dtype=dtype)
    k, v = kv[..., :H].unflatten(-1, (nh, hd)), kv[..., H:].unflatten(-1, (nh, hd))
    mask = _meta(B, model.audio_tokens, dtype=torch.bool) if masked else None
    out, lse = attention._forward(q, k, v, mask, hd**-0.5)
    if backward:
        # Both layouts of the backward: which one runs is a rule or a measurement on the card.
        for one_pass in (True, False)[attention.head_width(hd) > attention.ONE_PASS_MAX_WIDTH :]:
            attention._backward(q, k, v, mask, out, lse, torch.empty_like(out), hd**-0.5, one_pass=one_pass)


def _rope_launches(model: ModelShape, dtype: torch.dtype, backward: bool) -> None:
    audio = _meta(model.batch, model.audio_tokens, model.hidden, dtype=dtype)
    rope._rotate(audio, 2.5, 1e4, False)
    if backward:
        rope._rotate(audio, 2.5, 1e4, True)


def _gated_residual_launches(
    model: ModelShape, text: int, activation: torch.dtype, residual: torch.dtype, parameter: torch.dtype, backward: bool
) -> None:
    """hidden (the residual stream) in `residual`, the attention output and the gate's first GEMM
    in `activation`, the module's parameters in `parameter` (the autocast mix: fp32 parameters,
    bf16 GEMM outputs)."""
    B, H = model.batch, model.hidden
    G = H // 4
    hidden = _meta(B, text, H, dtype=residual)
    attended = _meta(B, text, H, dtype=activation)
    gate_hidden = _meta(B, text, G, dtype=activation)
    w2, b2 = _meta(1, G, dtype=parameter), _meta(1, dtype=parameter)
    ln_w, ln_b = _meta(H, dtype=parameter), _meta(H, dtype=parameter)
    out_dtype = torch.promote_types(torch.promote_types(residual, activation), parameter)
    out = gated_residual._forward(hidden, attended, gate_hidden, w2, b2, ln_w, ln_b, 1e-5, out_dtype)
    if backward:
        gated_residual._backward(torch.empty_like(out), attended, gate_hidden, w2, b2, ln_w, ln_b, 1e-5)


def _ortho_launches(model: ModelShape, dtype: torch.dtype, losses: str) -> None:
    """losses: "both" (ortho_losses), "diversity" or "cross", forward and backward."""
    g = _meta(model.batch, model.global_tokens, model.hidden, dtype=dtype)
    local = _meta(model.batch, model.audio_tokens, model.hidden, dtype=dtype) if losses != "diversity" else None
    _, _, sim, norms = ortho_loss._forward(g, local, MAX_LOCAL_SAMPLES, with_div=losses != "cross")
    grad = _meta(dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    grad_cross = _meta(dtype=dtype) if local is not None else None
    ortho_loss._backward(g, local, sim, norms, grad if losses != "cross" else None, grad_cross, MAX_LOCAL_SAMPLES)


def cases(models=MODELS) -> Iterator[tuple[str, str, Callable[[], None]]]:
    """(case label, precision, launcher call) for every launch family at the model shapes.

    fp16/bf16/fp32 at every model shape; fp64 (gradcheck) at the smallest model only, as its
    kernels specialise on the same block sizes whatever the batch."""
    for model in models:
        precisions = ["bf16", "fp16", "fp32"] + (["fp64"] if model is models[0] else [])
        for precision in precisions:
            dtype = DTYPES[precision]
            m = model.name
            yield f"{m} {precision} audio_rope fwd+bwd", precision, lambda m=model, d=dtype: _rope_launches(m, d, True)
            for masked in (False, True):
                label = "masked" if masked else "unmasked"
                for phase, text in TEXT_LENGTHS.items():
                    train = phase == "train"
                    yield (
                        f"{m} {precision} attention {phase} {label}" + (" fwd+bwd" if train else " fwd"),
                        precision,
                        lambda m=model, t=text, d=dtype, k=masked, b=train: _attention_launches(m, t, d, k, b),
                    )
                # One request decoding alone: too few programs, so the keys are split (flash-decoding).
                yield (
                    f"{m} {precision} attention decode-b1 {label} fwd",
                    precision,
                    lambda m=model, d=dtype, k=masked: _attention_launches(
                        dataclasses.replace(m, batch=1), 1, d, k, False
                    ),
                )
            for phase, text in TEXT_LENGTHS.items():
                train = phase == "train"
                yield (
                    f"{m} {precision} gated_residual {phase}" + (" fwd+bwd" if train else " fwd"),
                    precision,
                    lambda m=model, t=text, d=dtype, b=train: _gated_residual_launches(m, t, d, d, d, b),
                )
            for losses in ("both", "diversity", "cross"):
                yield (
                    f"{m} {precision} ortho {losses} fwd+bwd",
                    precision,
                    lambda m=model, d=dtype, s=losses: _ortho_launches(m, d, s),
                )
        # Training under CUDA bf16 autocast: fp32 parameters, bf16 GEMM outputs; the residual
        # stream is bf16 into the first injected layer and fp32 after it.
        for residual in (torch.bfloat16, torch.float32):
            yield (
                f"{model.name} autocast gated_residual train residual={TL_DTYPE_NAMES[residual]} fwd+bwd",
                "autocast",
                lambda m=model, r=residual: _gated_residual_launches(m, 300, torch.bfloat16, r, torch.float32, True),
            )


def record(target: Target, models=MODELS) -> list[Launch]:
    launches: list[Launch] = []
    for label, precision, call in cases(models):
        with recorded_launches(target) as recorded:
            call()
        for launch in recorded:
            launch.case, launch.precision = label, precision
        launches += recorded
    return launches


def package_kernels() -> set[str]:
    """Every kernel entry point (`@triton.jit` `_*_kernel`) of orca_kernels, as module:name."""
    names = set()
    for module in (attention, gated_residual, ortho_loss, rope):
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel"):
                names.add(f"{module.__name__}:{name}")
    return names


# ----------------------------------------------------------------------------- specialisation


def _aligned(tensor: torch.Tensor) -> bool:
    # Allocations are 256-byte aligned; a view's offset decides (K and V are column halves).
    return tensor.storage_offset() * tensor.element_size() % 16 == 0


def _encode_constexpr(value):
    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"compile_audit: cannot encode constexpr {value!r}")


def _decode_constexpr(value):
    return tl.dtype(value["tl_dtype"]) if isinstance(value, dict) else value


def specialise(launch: Launch) -> dict:
    """The launch as Triton specialises it on a GPU: signature types, constexprs (declared ones
    and int arguments equal to 1), 16-divisibility of pointers and ints, and the options; a
    JSON-able dict that identifies the compiled variant."""
    kernel = launch.kernel
    kwargs = dict(launch.kwargs)
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    for name in LAUNCH_OPTIONS:
        if name in kwargs:
            options[name] = kwargs.pop(name)
    names = [p.name for p in kernel.params]
    values = dict(zip(names[: len(launch.args)], launch.args, strict=True)) | kwargs  # the rest come as kwargs
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(f"compile_audit: {kernel.__name__} launched without {missing}")
    signature, constexprs, divisible = {}, {}, []
    for index, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", _encode_constexpr(value)
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TL_DTYPE_NAMES[value.dtype]
            if _aligned(value):
                divisible.append(index)
        elif isinstance(value, bool):
            signature[param.name] = "u1"  # as the JIT types a Python bool
        elif isinstance(value, int):
            if value == 1 and not param.do_not_specialize:
                signature[param.name], constexprs[param.name] = "constexpr", 1
                continue
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                divisible.append(index)
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        elif value is None:
            signature[param.name], constexprs[param.name] = "constexpr", None
        else:
            raise TypeError(f"compile_audit: {kernel.__name__}: cannot specialise {param.name}={value!r}")
    return {
        "kernel": f"{kernel.fn.__module__}:{kernel.__name__}",
        "signature": signature,
        "constexprs": constexprs,
        "divisible": divisible,
        "options": options,
    }


def settings_label(variant: dict) -> str:
    """The launch settings a reader tunes: block constexprs, warps, stages."""
    blocks = [f"{k}={v}" for k, v in variant["constexprs"].items() if k.startswith("BLOCK")]
    options = variant["options"]
    caps = [f"maxnreg={options['maxnreg']}"] if "maxnreg" in options else []
    return " ".join(blocks + [f"w{options['num_warps']}", f"s{options['num_stages']}"] + caps)


# ----------------------------------------------------------------------------- compiling


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, LOCAL and SHARED of the cubin's one function, from `cuobjdump -res-usage`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run(
            [_cuobjdump(), "-res-usage", file.name], capture_output=True, text=True, check=True
        ).stdout
    usage = {}
    for line in text.splitlines():
        if line.strip().startswith("REG:"):
            for field in line.split():
                key, _, value = field.partition(":")
                if key in ("REG", "STACK", "LOCAL", "SHARED"):
                    usage[key] = int(value)
    if "REG" not in usage:
        raise RuntimeError(f"compile_audit: no resource usage in cuobjdump's output:\n{text}")
    return usage


def contracted_multiply_adds(ptx: str) -> int:
    """fma instructions in `ptx` that round a product and a sum once. Triton's sm_80 bf16
    arithmetic is written as fma without contracting anything (sm_80 has no bf16 mul or add):
    `fma a, b, -0` is a rounded product, `fma a, ±1, c` a rounded sum (also as bf16x2 pairs);
    those are not counted."""
    constants = {  # register -> its bits in hex (ptxas writes some constants in signed decimal)
        register: hex(int(value, 0) & ((1 << int(bits)) - 1))
        for bits, register, value in re.findall(r"mov\.b(16|32|64)\s+(%\w+), (-?(?:0[xX][0-9A-Fa-f]+|\d+));", ptx)
    }
    # Scalars and the packed pairs of bf16x2 (-0, -0) and (±1, ±1).
    negative_zero = {"0x8000", "0x80008000", "0x80000000", "0x8000000000000000", "0f80000000", "0d8000000000000000"}
    one = {"0x3f80", "0xbf80", "0x3f803f80", "0xbf80bf80", "0x3f800000", "0xbf800000"}
    one |= {"0x3ff0000000000000", "0xbff0000000000000"}
    one |= {"0f3f800000", "0fbf800000", "0d3ff0000000000000", "0dbff0000000000000"}

    def value(operand: str) -> str:
        operand = operand.strip()
        return constants.get(operand, operand).lower()

    count = 0
    for a, b, c in re.findall(r"fma\.rn[.\w]*\s+%\w+, ([^,]+), ([^,]+), ([^;]+);", ptx):
        if value(c) not in negative_zero and value(a) not in one and value(b) not in one:
            count += 1
    return count


MMA_LAYOUT = re.compile(r"^(#[\w.]+) = (#ttg\.nvidia_mma<\{[^}]*\}>)", re.MULTILINE)
BLOCKED_LAYOUT = re.compile(r"^(#[\w.]+) = (#ttg\.blocked<\{[^}]*\}>)", re.MULTILINE)


def _layout_fields(layout: str) -> dict[str, list[int] | int]:
    """The integer and list fields of a `#ttg.nvidia_mma<{...}>` or `#ttg.blocked<{...}>` attribute."""
    fields: dict[str, list[int] | int] = {}
    for key, value in re.findall(r"(\w+) = (\[[^\]]*\]|-?\d+)", layout):
        numbers = [int(x) for x in value.strip("[]").split(",") if x.strip()]
        fields[key] = numbers if value.startswith("[") else numbers[0]
    return fields


def _tensor_types(text: str) -> Iterator[tuple[str, list[int], str]]:
    """(type text, shape, encoding) of every `tensor<DxDx...xT, #encoding>` in `text`, brackets
    balanced (an element type may be `!tt.ptr<f16>`, an encoding an inline `#ttg.x<{...}>`)."""
    for match in re.finditer(r"tensor<", text):
        depth, end = 1, match.end()
        while depth and end < len(text):
            depth += {"<": 1, ">": -1}.get(text[end], 0)
            end += 1
        body = text[match.end() : end - 1]
        dims = re.match(r"((?:\d+x)+)", body)
        comma = body.find(", #")
        if dims and comma > 0:
            shape = [int(d) for d in dims.group(1).rstrip("x").split("x")]
            yield text[match.start() : end], shape, body[comma + 2 :].strip()


def _axis_names(rank: int) -> list[str]:
    return (["batch"] if rank == 3 else []) + ["M", "N"]


def duplicated_warps(ttgir: str) -> list[dict]:
    """Tensors whose layout gives some warps copies of other warps' elements, from the TTGIR.

    nvidia_mma layouts (the layout of a `tt.dot`'s result, and everything Triton keeps in it):
    along each axis the warps cover warpsPerCTA x the per-warp instruction tile (M: instrShape[0],
    16 rows, 8 for fp64; N: instrShape[1], the whole warpgroup's N on Hopper's wgmma, 8 on
    mma.sync), so a tensor with fewer tiles along M or N than warps there is computed more than once
    (8 warps over a 64-row tile: the second warpgroup repeats the first). Chained dots (attention's
    S = QK^T feeding P @ V) share one layout with every warp on one axis: along M on Hopper
    ([num_warps, 1], whatever the tile), along M or N on mma.sync. Every tensor type in an mma
    layout is checked; an axis of size 1 is a broadcast (a row statistic such as `m_i[:, None]`),
    held by every warp on purpose.

    blocked layouts, only where they hold a dot's result (a `tt.dot` on the FMA units, as IEEE
    fp32 dots are): a warp holds sizePerThread x threadsPerWarp elements along an axis, and an axis
    shorter than warpsPerCTA x that gives whole warps copies, that is, repeated multiply-adds.
    (Elementwise and reduction tensors in blocked layouts are left alone: Triton picks one blocked
    layout for a kernel's loads and vectors, and copies of a row vector cost little.)

    One finding per layout and offending axes: the axes (warps x per-warp tile > the tensor's
    size), the layout, and the tensor types in it."""
    layouts = {alias: ("mma", layout) for alias, layout in MMA_LAYOUT.findall(ttgir)}
    blocked = {alias: ("blocked", layout) for alias, layout in BLOCKED_LAYOUT.findall(ttgir)}
    dot_results = set()
    for line in ttgir.splitlines():
        if re.search(r"= (tt\.dot|ttng\.warp_group_dot) ", line) and "->" in line:
            dot_results.update(t for t, _, _ in _tensor_types(line.rsplit("->", 1)[1]))
    findings: dict[tuple[str, tuple[str, ...]], dict] = {}
    for type_text, shape, encoding in _tensor_types(ttgir):
        if encoding in layouts or encoding.startswith("#ttg.nvidia_mma<"):
            kind, layout = layouts.get(encoding, ("mma", encoding))
        elif type_text in dot_results and (encoding in blocked or encoding.startswith("#ttg.blocked<")):
            kind, layout = blocked.get(encoding, ("blocked", encoding))
        else:
            continue
        fields = _layout_fields(layout)
        warps = fields.get("warpsPerCTA", [])
        if len(warps) != len(shape) or len(shape) not in (2, 3):
            continue
        if kind == "mma":
            if fields.get("versionMajor") not in (2, 3):
                continue
            per_warp = fields["instrShape"][: len(shape)]  # v3: [16, N, K]; v2: [16, 8] or [1, 16, 8]
            kind = f"nvidia_mma v{fields['versionMajor']}"
        else:
            per_warp = [s * t for s, t in zip(fields["sizePerThread"], fields["threadsPerWarp"], strict=True)]
        axes = tuple(
            f"{axis} {w} warps x {p} = {w * p} > {size}"
            for axis, size, w, p in zip(_axis_names(len(shape)), shape, warps, per_warp, strict=True)
            if size > 1 and w > 1 and math.ceil(size / p) < w
        )
        if axes:
            finding = findings.setdefault(
                (encoding, axes),
                {"layout": encoding, "kind": kind, "warpsPerCTA": warps, "per_warp": per_warp, "axes": list(axes)},
            )
            finding.setdefault("tensors", [])
            if type_text not in finding["tensors"]:
                finding["tensors"].append(type_text)
    return list(findings.values())


def describe_duplication(finding: dict) -> str:
    """One finding of `duplicated_warps` in words."""
    return (
        f"{'; '.join(finding['axes'])} in {finding['layout']} ({finding['kind']}, warpsPerCTA={finding['warpsPerCTA']},"
        f" per warp {finding['per_warp']}): {', '.join(finding['tensors'])}"
    )


def compile_variant(variant: dict, arch: str) -> dict:
    """Compile one variant for `arch`; its resources, or the error."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = TARGETS[arch]
    module, name = variant["kernel"].split(":")
    kernel = getattr(importlib.import_module(module), name)
    constexprs = {k: _decode_constexpr(v) for k, v in variant["constexprs"].items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i in variant["divisible"]}
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(kernel, variant["signature"], constexprs, attrs),
            target=GPUTarget("cuda", target.capability, 32),
            options=dict(variant["options"]),
        )
    except Exception as error:  # noqa: BLE001 - any compiler error is the finding to report
        return {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"}
    usage = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    tensor_cores = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else ""
    return {
        "registers": usage["REG"],
        "spill_bytes": usage.get("STACK", 0) + usage.get("LOCAL", 0),
        "shared_bytes": max(int(compiled.metadata.shared), usage.get("SHARED", 0)),
        "has_dot": "tt.dot " in compiled.asm["ttir"] or "tt.dot\n" in compiled.asm["ttir"],
        "tensor_cores": tensor_cores,
        "fused_multiply_adds": contracted_multiply_adds(ptx),
        "duplicated_warps": duplicated_warps(compiled.asm["ttgir"]),
        "seconds": round(time.perf_counter() - start, 2),
    }


def blocks_per_multiprocessor(result: dict, num_warps: int, target: Target) -> int:
    """Resident blocks per SM, from registers (allocated per warp in units of 256), shared
    memory (1 KiB reserved per block), threads and the block limit."""
    threads = 32 * num_warps
    registers_per_warp = math.ceil(result["registers"] * 32 / 256) * 256
    by_registers = REGISTERS_PER_MULTIPROCESSOR // (registers_per_warp * num_warps)
    by_shared = target.shared_per_multiprocessor // (result["shared_bytes"] + 1024)
    return min(BLOCKS_PER_MULTIPROCESSOR, THREADS_PER_MULTIPROCESSOR // threads, by_registers, by_shared)


# ----------------------------------------------------------------------------- the audit


def audit(archs: list[str], jobs: int, models=MODELS, progress: bool = True) -> dict:
    """Record, compile and check; the report as a JSON-able dict."""
    if _utils.KERNELS_INTERPRETED:
        raise RuntimeError("compile_audit: TRITON_INTERPRET=1 is set; the audit compiles the kernels, run it without")
    rows: dict[tuple[str, str], dict] = {}
    launched = set()
    for arch in archs:
        for launch in record(TARGETS[arch], models):
            variant = specialise(launch)
            launched.add(variant["kernel"])
            key = (json.dumps(variant, sort_keys=True), arch)
            row = rows.setdefault(key, {"variant": variant, "arch": arch, "cases": [], "precisions": set(), "grid": ()})
            row["cases"].append(launch.case)
            row["precisions"].add(launch.precision)
            if math.prod(launch.grid) > math.prod(row["grid"] or (0,)):
                row["grid"] = launch.grid
    pending = list(rows.values())
    start = time.perf_counter()
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(compile_variant, row["variant"], row["arch"]): row for row in pending}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            futures[future]["result"] = future.result()
            if progress and (done % 10 == 0 or done == len(futures)):
                print(f"compiled {done}/{len(futures)} variants ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    failures = []
    for row in pending:
        failures += _check(row)
    unlaunched = sorted(package_kernels() - launched)
    failures += [f"{name}: no case launches it, so it is not audited" for name in unlaunched]
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "archs": archs,
        "seconds": round(time.perf_counter() - start, 1),
        "rows": [_row_json(row) for row in pending],
        "failures": failures,
    }


def _check(row: dict) -> list[str]:
    variant, result, target = row["variant"], row["result"], TARGETS[row["arch"]]
    where = f"{variant['kernel'].split(':')[1]} [{settings_label(variant)}] {row['arch']} ({row['cases'][0]})"
    if "error" in result:
        return [f"{where}: does not compile: {result['error']}"]
    failures = []
    if result["spill_bytes"] and row["precisions"] - {"fp64"}:
        failures.append(f"{where}: spills {result['spill_bytes']} bytes ({result['registers']} registers)")
    if result["shared_bytes"] > target.max_shared_per_block:
        failures.append(f"{where}: {result['shared_bytes']} bytes of shared memory > {target.max_shared_per_block}")
    if variant["kernel"].split(":")[1] in UNCONTRACTED_KERNELS and result["fused_multiply_adds"]:
        count = result["fused_multiply_adds"]
        failures.append(f"{where}: {count} fused multiply-adds (the reference rounds each product)")
    if result.get("duplicated_warps") and row["precisions"] - {"fp64"}:
        findings = " | ".join(map(describe_duplication, result["duplicated_warps"]))
        failures.append(f"{where}: warps duplicate work: {findings}")
    half = row["precisions"] & {"bf16", "fp16"}
    if half and result["has_dot"] and not result["tensor_cores"]:
        failures.append(f"{where}: a {'/'.join(sorted(half))} dot does not reach the tensor cores")
    return failures


def _row_json(row: dict) -> dict:
    out = {k: v for k, v in row.items() if k != "precisions"}
    out["precisions"] = sorted(row["precisions"])
    result = row["result"]
    if "error" not in result:
        target = TARGETS[row["arch"]]
        blocks = blocks_per_multiprocessor(result, row["variant"]["options"]["num_warps"], target)
        out["blocks_per_sm"] = blocks
        out["waves"] = round(math.prod(row["grid"]) / max(1, blocks * target.multiprocessors), 2)
    return out


def _duplication_label(findings: list[dict]) -> str:
    """The table's short form of `duplicated_warps`: axis, warps x tile > size (first tensor)."""
    short = []
    for finding in findings:
        tile = re.match(r"tensor<((?:\d+x)+)", finding["tensors"][0]).group(1).rstrip("x")
        axes = ", ".join(re.sub(r" warps x (\d+) = \d+ > ", r"x\1>", axis) for axis in finding["axes"])
        short.append(f"{axes} ({tile})")
    return "; ".join(short) or "-"


def markdown(report: dict) -> str:
    """The report as one table, worst first (spills, then registers)."""
    lines = [
        f"# Compile audit: triton {report['triton']}, torch {report['torch']}",
        "",
        "Every Triton launch of the ops at the model shapes (Qwen3-0.6B, Qwen3-4B, Llama-3.1-8B; decode,",
        "prefill and training; every dtype; with and without a key padding mask; the autocast mix),",
        "compiled statically with `python -m benchmarks.compile_audit`. Registers and spills from",
        "`cuobjdump -res-usage`; duplicated warps (axis: warps x per-warp tile > the tile's size) from the",
        "TTGIR's layouts; blocks/SM from registers, shared memory and threads; waves = programs of",
        "the largest grid / (blocks/SM x SMs: "
        + ", ".join(f"{t.arch} {t.multiprocessors}" for t in TARGETS.values())
        + ").",
        "",
        f"Failures: {len(report['failures'])}" + "".join(f"\n- {f}" for f in report["failures"]),
        "",
        "| kernel | arch | dtypes | settings | regs | spill B | smem B | blocks/SM | tensor cores | duplicated warps "
        "| largest grid | waves | cases |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def order(row):
        result = row["result"]
        return (
            -(result.get("spill_bytes", 1 << 30)),
            row["variant"]["kernel"],
            row["arch"],
            -result.get("registers", 0),
        )

    for row in sorted(report["rows"], key=order):
        variant, result = row["variant"], row["result"]
        name = variant["kernel"].split(":")[1]
        dtypes = "/".join(row["precisions"])
        if "error" in result:
            lines.append(
                f"| {name} | {row['arch']} | {dtypes} | {settings_label(variant)} | error: {result['error']} ||||||||| "
            )
            continue
        grid = "x".join(map(str, row["grid"]))
        lines.append(
            f"| {name} | {row['arch']} | {dtypes} | {settings_label(variant)} | {result['registers']} | "
            f"{result['spill_bytes']} | {result['shared_bytes']} | {row['blocks_per_sm']} | "
            f"{result['tensor_cores'] or ('none' if result['has_dot'] else '-')} | "
            f"{_duplication_label(result.get('duplicated_warps', []))} | {grid} | {row['waves']} | "
            f"{len(row['cases'])}: {row['cases'][0]} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", nargs="+", choices=sorted(TARGETS), default=["sm_90", "sm_80"])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    parser.add_argument("--out", help="folder for compile_audit_triton-<version>.{json,md}")
    args = parser.parse_args(argv)
    report = audit(args.arch, args.jobs)
    table = markdown(report)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"compile_audit_triton-{report['triton']}")
        with open(stem + ".json", "w") as file:
            json.dump(report, file, indent=1)
        with open(stem + ".md", "w") as file:
            file.write(table)
    print(table)
    print(
        f"{len(report['rows'])} variants compiled in {report['seconds']} s; {len(report['failures'])} failures",
        file=sys.stderr,
    )
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
