"""orca_kernels._utils.TableCache, the one cache of the RoPE tables and the sampled local rows:
bounded, thread-safe, and aware of CUDA-graph capture."""

from __future__ import annotations

import threading

import pytest
import torch

from orca_kernels import reference
from orca_kernels._utils import TableCache
from orca_kernels.ortho_loss import _indices_cache, _sample_indices
from orca_kernels.rope import _tables, rope_half_tables


def test_evicts_the_least_recently_used_entry():
    cache = TableCache(max_entries=2)
    cpu = torch.device("cpu")
    built = []

    def build(value):
        built.append(value)
        return torch.tensor(value)

    cache.get("a", cpu, lambda: build(1))
    cache.get("b", cpu, lambda: build(2))
    cache.get("a", cpu, lambda: build(-1))  # a hit: refreshes "a", builds nothing
    cache.get("c", cpu, lambda: build(3))  # evicts "b", the least recently used
    assert built == [1, 2, 3]
    assert len(cache) == 2
    assert cache.get("a", cpu, lambda: build(-1)).item() == 1
    assert cache.get("b", cpu, lambda: build(4)).item() == 4  # rebuilt after eviction


def test_many_threads_many_shapes_and_devices_get_the_right_tables():
    """Threads ask for RoPE tables and sample indices of different shapes on two devices at once,
    with a cache small enough to evict all the time: every answer equals the table built alone."""
    _tables.clear()
    _indices_cache.clear()
    devices = [torch.device("cpu"), torch.device("meta")]
    shapes = [(length, width) for length in (1, 7, 101, 383, 439) for width in (2, 16, 80)]
    expected_tables = {
        (length, width): reference.rope_cos_sin(length, width, 2.5, 1e4, torch.device("cpu"))
        for length, width in shapes
    }
    errors: list[str] = []

    def work(seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for _ in range(60):
            length, width = shapes[int(torch.randint(len(shapes), (1,), generator=generator))]
            device = devices[int(torch.randint(2, (1,), generator=generator))]
            cos, sin = rope_half_tables(length, width, 2.5, 1e4, device)
            if cos.shape != (length, width // 2) or cos.device != device:
                errors.append(f"table {length}x{width} on {device}: {tuple(cos.shape)} on {cos.device}")
            elif device.type == "cpu":
                full_cos, full_sin = expected_tables[(length, width)]
                if not (
                    torch.equal(cos, full_cos[0, :, : width // 2]) and torch.equal(sin, full_sin[0, :, : width // 2])
                ):
                    errors.append(f"table {length}x{width}: wrong values")
            num_local = 101 + int(torch.randint(400, (1,), generator=generator))
            indices = _sample_indices(num_local, 100, torch.device("cpu"))
            if not torch.equal(indices, reference.local_sample_indices(num_local, 100, torch.device("cpu"))):
                errors.append(f"indices for {num_local} rows: wrong values")

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(_tables) <= _tables.max_entries and len(_indices_cache) <= _indices_cache.max_entries


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
def test_a_miss_during_graph_capture_is_not_kept():
    cache = TableCache(max_entries=4)
    device = torch.device("cuda")
    hit = cache.get("hit", device, lambda: torch.ones(3, device=device))
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        assert cache.get("hit", device, lambda: torch.zeros(3, device=device)) is hit
        cache.get("miss", device, lambda: torch.full((3,), 2.0, device=device))
    assert len(cache) == 1
