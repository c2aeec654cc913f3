"""Which attention core `backend="auto"` runs on CUDA: the vendor path (PyTorch's SDPA, which picks
cuDNN, FlashAttention or memory-efficient attention itself) unless a measurement says the
package's Triton kernels win (docs/architecture.md#attention-dispatch).

The measurements live in `orca_kernels._dispatch_table` (written by `python -m benchmarks.tune
--dispatch` on a GPU). An entry is keyed by

    <card>|<op>|<mode>|<dtype>|d<head width>|<mask kind>|<shape bucket>

- card: the GPU's name as `torch.cuda.get_device_name` gives it ("NVIDIA H200"); when no entry
  has that name, its compute capability ("sm90") is tried, so an H100 uses an H200's table;
- op: "flash_cross_attention" (the one op with two paths today);
- mode: "train" (a gradient will be taken), "decode" (no gradient, at most 16 query rows: a
  generation step) or "inference";
- dtype: "bfloat16", "float16", "float32";
- head width: the head dim as the Triton kernels tile it (`flash_attention.head_width`);
- mask kind: "none" or "keys" (a key padding mask reaches the core);
- shape bucket: query rows and keys, each rounded up to a power of two ("tx512-ta512").

and holds both paths' timings of one run on that card (median and 80th percentile, ms) and their
peak memory (MiB). The rule is applied here, at lookup, not by the writer, so a table cannot pick
against it: Triton runs only where its median beat the vendor's by at least 5%, its 80th
percentile is below the vendor's median, and its peak memory is at most `MEMORY_SLACK` times the
vendor's. Anything else, a missing entry included, is the vendor path.

Two rules come before the table:
- `torch.use_deterministic_algorithms(True)`: the Triton kernels (no atomics, the same bits at
  every run); SDPA's CUDA backward is not deterministic on every backend.
- decode: the Triton flash-decoding kernel (keys split over the GPU's SMs, no host sync, ready
  for CUDA graphs) unless an entry for the decode shape says the vendor path won.

Everything here reads shapes, dtypes and the device only: no tensor value, so no host sync, and
`torch.compile(fullgraph=True)` traces it.
"""

from __future__ import annotations

import functools

import torch
import triton

from orca_kernels import _dispatch_table

OP = "flash_cross_attention"
VENDOR = "sdpa"
TRITON = "triton"
MODES = ("train", "inference", "decode")
MASK_KINDS = ("none", "keys")
DECODE_MAX_ROWS = 16  # the forward kernel's decode tile: one row block
MIN_SPEEDUP = 1.05  # Triton's median must be at least this much faster than the vendor's
MEMORY_SLACK = 1.0  # Triton's peak memory at most this many times the vendor's
MAX_TRITON_HEAD_DIM = 256  # the Triton kernels keep [BLOCK, head_dim] tiles in registers


def mode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """ "train" when autograd will record the call, "decode" for a generation step (no gradient, at
    most DECODE_MAX_ROWS query rows), else "inference"."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "train"
    return "decode" if q.shape[1] <= DECODE_MAX_ROWS else "inference"


def shape_bucket(Tx: int, Ta: int) -> str:
    return f"tx{triton.next_power_of_2(max(Tx, 1))}-ta{triton.next_power_of_2(max(Ta, 1))}"


def table_key(card: str, mode: str, dtype: torch.dtype, width: int, mask_kind: str, Tx: int, Ta: int) -> str:
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{card}|{OP}|{mode}|{dtype_name}|d{width}|{mask_kind}|{shape_bucket(Tx, Ta)}"


@torch.compiler.assume_constant_result
def _card_names(index: int | None) -> tuple[str, str]:
    """(device name, "sm<major><minor>") of CUDA device `index` (None: the current one); constant
    for a process."""
    return _cached_card_names(index)


@functools.cache
def _cached_card_names(index: int | None) -> tuple[str, str]:
    if not torch.cuda.is_available():  # fake CUDA tensors (cost counting) on a machine without a GPU
        return "", ""
    index = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"sm{major}{minor}"


def triton_wins(entry: dict) -> bool:
    """The table's rule for one measured entry (see the module docstring)."""
    triton_median, triton_p80 = entry["triton_ms"]
    vendor_median, _ = entry["sdpa_ms"]
    faster = triton_median * MIN_SPEEDUP <= vendor_median and triton_p80 < vendor_median
    return faster and entry["triton_peak_mib"] <= MEMORY_SLACK * entry["sdpa_peak_mib"]


def lookup(cards: tuple[str, ...], mode: str, dtype: torch.dtype, width: int, mask_kind: str, Tx: int, Ta: int):
    """The first table entry for these cards (most specific first), or None."""
    for card in cards:
        entry = _dispatch_table.TABLE.get(table_key(card, mode, dtype, width, mask_kind, Tx, Ta))
        if entry is not None:
            return entry
    return None


def attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None) -> str:
    """ "sdpa" or "triton": the attention core `backend="auto"` runs for these CUDA tensors (q [B, Tx,
    nh, hd], k and v [B, Ta, nh, hd], key_padding_mask [B, Ta] or None). See the module docstring."""
    from orca_kernels.flash_attention import head_width  # the kernels' module imports this one

    head_dim = q.shape[-1]
    if head_dim > MAX_TRITON_HEAD_DIM:
        return VENDOR
    if torch.are_deterministic_algorithms_enabled():
        return TRITON
    current = mode(q, k, v)
    mask_kind = "none" if key_padding_mask is None else "keys"
    cards = _card_names(q.device.index)
    entry = lookup(cards, current, q.dtype, head_width(head_dim), mask_kind, q.shape[1], k.shape[1])
    if entry is None:
        return TRITON if current == "decode" else VENDOR
    return TRITON if triton_wins(entry) else VENDOR


def table_id() -> str:
    """Which table this process dispatches by (recorded with every benchmark run)."""
    return _dispatch_table.TABLE_ID
