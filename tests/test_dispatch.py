"""orca_kernels.dispatch: what `backend="auto"` runs on CUDA, by rule and by the measured table
(docs/architecture.md#attention-dispatch). The choice reads shapes, dtypes and the card only, so it
is tested here on CPU tensors with the card and the table patched."""

from __future__ import annotations

import pytest
import torch

from orca_kernels import _dispatch_table, dispatch
from orca_kernels.flash_attention import head_width

CARD = ("NVIDIA H200", "sm90")


def _qkv(Tx=300, Ta=439, hd=64, dtype=torch.bfloat16, requires_grad=False):
    q = torch.zeros(2, Tx, 2, hd, dtype=dtype, requires_grad=requires_grad)
    k = torch.zeros(2, Ta, 2, hd, dtype=dtype, requires_grad=requires_grad)
    return q, k, k.clone()


def _entry(triton=(0.90, 0.92), sdpa=(1.0, 1.02), triton_mib=100.0, sdpa_mib=100.0) -> dict:
    return {"triton_ms": list(triton), "sdpa_ms": list(sdpa), "triton_peak_mib": triton_mib, "sdpa_peak_mib": sdpa_mib}


@pytest.fixture
def table(monkeypatch):
    """An empty table to fill, on an H200."""
    entries: dict = {}
    monkeypatch.setattr(_dispatch_table, "TABLE", entries)
    monkeypatch.setattr(dispatch, "_card_names", lambda index: CARD)
    return entries


def _key(card, mode, q, k, mask_kind="none"):
    return dispatch.table_key(card, mode, q.dtype, head_width(q.shape[-1]), mask_kind, q.shape[1], k.shape[1])


def test_modes():
    assert dispatch.mode(*_qkv(requires_grad=True)) == "train"
    with torch.no_grad():
        assert dispatch.mode(*_qkv(requires_grad=True)) == "inference"
    assert dispatch.mode(*_qkv(Tx=1)) == "decode"
    assert dispatch.mode(*_qkv(Tx=16)) == "decode"
    assert dispatch.mode(*_qkv(Tx=17)) == "inference"
    assert dispatch.mode(*_qkv(Tx=1, requires_grad=True)) == "train"


def test_key_layout():
    key = dispatch.table_key("NVIDIA H200", "train", torch.bfloat16, 80, "keys", 300, 439)
    assert key == "NVIDIA H200|flash_cross_attention|train|bfloat16|d80|keys|tx512-ta512"
    assert dispatch.shape_bucket(0, 1) == "tx1-ta1"


def test_no_entry_is_the_vendor_path_except_decode(table):
    assert dispatch.attention_backend(*_qkv(requires_grad=True), None) == "sdpa"
    assert dispatch.attention_backend(*_qkv(), None) == "sdpa"
    assert dispatch.attention_backend(*_qkv(Tx=1), None) == "triton"  # flash-decoding
    assert dispatch.attention_backend(*_qkv(Tx=1), torch.zeros(2, 439, dtype=torch.bool)) == "triton"


def test_a_measured_win_picks_triton_for_its_key_only(table):
    q, k, v = _qkv(requires_grad=True)
    table[_key("NVIDIA H200", "train", q, k)] = _entry()
    assert dispatch.attention_backend(q, k, v, None) == "triton"
    assert dispatch.attention_backend(q, k, v, torch.zeros(2, 439, dtype=torch.bool)) == "sdpa"  # other mask kind
    assert dispatch.attention_backend(*_qkv(hd=128, requires_grad=True), None) == "sdpa"  # other width
    with torch.no_grad():
        assert dispatch.attention_backend(q, k, v, None) == "sdpa"  # other mode


def test_the_compute_capability_is_the_fallback_key(table):
    q, k, v = _qkv(requires_grad=True)
    table[_key("sm90", "train", q, k)] = _entry()
    assert dispatch.attention_backend(q, k, v, None) == "triton"
    table[_key("NVIDIA H200", "train", q, k)] = _entry(triton=(1.1, 1.2))  # the card's own entry wins
    assert dispatch.attention_backend(q, k, v, None) == "sdpa"


@pytest.mark.parametrize(
    "entry, wins",
    [
        (_entry(triton=(0.95, 0.96)), True),  # 5.3% faster
        (_entry(triton=(0.96, 0.97)), False),  # 4.2%: not enough
        (_entry(triton=(0.90, 1.01)), False),  # p80 above the vendor's median
        (_entry(triton_mib=101.0), False),  # more memory
        (_entry(triton=(1.2, 1.3)), False),
    ],
)
def test_the_rule_is_applied_at_lookup(table, entry, wins):
    q, k, v = _qkv(requires_grad=True)
    table[_key("NVIDIA H200", "train", q, k)] = entry
    assert dispatch.triton_wins(entry) is wins
    assert dispatch.attention_backend(q, k, v, None) == ("triton" if wins else "sdpa")


def test_a_measured_vendor_win_in_decode(table):
    q, k, v = _qkv(Tx=1)
    table[_key("NVIDIA H200", "decode", q, k)] = _entry(triton=(1.5, 1.6))
    assert dispatch.attention_backend(q, k, v, None) == "sdpa"


def test_deterministic_algorithms_take_the_triton_kernels(table):
    q, k, v = _qkv(requires_grad=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert dispatch.attention_backend(q, k, v, None) == "triton"
        # Past the kernels' head-dim limit only the vendor path exists.
        assert dispatch.attention_backend(*_qkv(hd=320, requires_grad=True), None) == "sdpa"
    finally:
        torch.use_deterministic_algorithms(previous)


def test_the_committed_table_follows_the_key_layout():
    """Every committed entry parses: a known mode, dtype, mask kind, and both paths' numbers."""
    assert isinstance(_dispatch_table.TABLE_ID, str) and _dispatch_table.TABLE_ID
    for key, entry in _dispatch_table.TABLE.items():
        card, op, mode, dtype, width, mask_kind, bucket = key.split("|")
        assert card and op == dispatch.OP and mode in dispatch.MODES and mask_kind in dispatch.MASK_KINDS, key
        assert isinstance(getattr(torch, dtype), torch.dtype) and width.startswith("d") and bucket.startswith("tx")
        assert isinstance(dispatch.triton_wins(entry), bool)


def test_no_gpu_gives_no_card_names():
    """Fake CUDA tensors on a machine without a GPU (cost counting) find no entry, not an error."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert dispatch._cached_card_names(None) == ("", "")


def test_the_choice_traces_in_one_graph():
    """torch.compile(fullgraph=True) traces the choice (the card's names as a constant, the table a
    dict lookup, the modes from grad mode and requires_grad) and guards on what it read."""

    def scaled(q, k, v):
        return q * (1.0 if dispatch.attention_backend(q, k, v, None) == "sdpa" else 2.0)

    compiled = torch.compile(scaled, fullgraph=True, backend="eager")
    q = torch.randn(2, 300, 2, 64, requires_grad=True)
    k = torch.randn(2, 439, 2, 64)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        results = []
        for deterministic in (False, True):  # the vendor path (no table entry), then Triton
            torch.use_deterministic_algorithms(deterministic)
            results.append(compiled(q, k, k))
            torch.testing.assert_close(results[-1], scaled(q, k, k), rtol=0, atol=0)
    finally:
        torch.use_deterministic_algorithms(previous)
    torch.testing.assert_close(results[1], 2 * results[0], rtol=0, atol=0)
