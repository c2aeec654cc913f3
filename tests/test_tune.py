"""benchmarks.tune: its launches and candidates, the table it writes, and that the kernels read it.

The measuring itself needs a GPU (gpu_check.sh runs the tuner's dry run; a GPU session runs it)."""

from __future__ import annotations

import torch

from benchmarks import tune
from orca_kernels import _tuned
from orca_kernels import flash_attention as attention


def test_dry_run_lists_every_launch(capsys):
    assert tune.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = {line.split()[0] for line in lines}
    # Llama-3.1-8B and Qwen3-0.6B (head dim 128 and 64) and Qwen3-4B (80: 64 + 16 columns).
    for width in (64, 80, 128):
        for kernel in ("fwd", "dkdv", "dq", "bwd"):
            for phase in ("decode", "prefill"):
                # The one-pass backward ("bwd") takes head widths up to 64.
                assert (f"flash_{kernel}/sm90/bfloat16/d{width}/{phase}" in keys) is (kernel != "bwd" or width <= 64)
    # Two cards, two phases; three kernels at three widths, plus the one-pass backward at one.
    assert len(keys) == len(lines) == 2 * 2 * (3 * 3 + 1)


def test_dry_run_filters_widths(capsys):
    assert tune.main(["--dry-run", "--widths", "80"]) == 0
    keys = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert len(keys) == 2 * 3 * 2 and all("/d80/" in key for key in keys)


def test_candidates_start_with_the_heuristic_and_are_distinct():
    for launch in tune.launches([torch.bfloat16]):
        found = list(tune.candidates(launch, (9, 0)))
        heuristic = attention.heuristic_configs(torch.bfloat16, tune.PHASES[launch.phase], launch.width, (9, 0))
        assert found[0] == heuristic[launch.kernel]
        assert len({tuple(sorted(c.items())) for c in found}) == len(found) > 10


def test_written_table_reads_back():
    table = {"flash_fwd/sm90/bfloat16/d80/prefill": {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}}
    namespace: dict = {}
    exec(tune.render(table, "Measured on a test."), namespace)  # noqa: S102 - our own generated source
    assert namespace["TUNED"] == table


def test_kernels_use_a_measured_setting(monkeypatch):
    """A measured entry replaces the heuristic for its key only (the GPU path of _configs)."""
    monkeypatch.setattr(attention, "KERNELS_INTERPRETED", False)
    measured = {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4, "num_stages": 4}
    key = attention.tuning_key("fwd", torch.bfloat16, 300, 80, (9, 0))
    monkeypatch.setattr(_tuned, "TUNED", {key: measured})
    configs = attention._configs(torch.bfloat16, 300, 80, (9, 0))
    heuristic = attention.heuristic_configs(torch.bfloat16, 300, 80, (9, 0))
    assert configs["fwd"] == measured
    assert configs["dkdv"] == heuristic["dkdv"] and configs["dq"] == heuristic["dq"]
    decode = attention.heuristic_configs(torch.bfloat16, 1, 80, (9, 0))["fwd"]
    assert attention._configs(torch.bfloat16, 1, 80, (9, 0))["fwd"] == decode  # another key: the heuristic


def test_measuring_needs_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tune.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_the_faster_backward_layout_is_recorded():
    """Both layouts measured at a site: the entry says which was faster (each dK/dV or dQ timing is
    the whole two-kernel backward); a site with only one layout measured gets no entry."""
    launches = {kernel: tune.Launch(kernel, tune.MODELS[0], "prefill", torch.bfloat16) for kernel in tune.KERNELS}
    key = attention.tuning_key("layout", torch.bfloat16, 300, launches["bwd"].width, (9, 0))
    measured = {launches["dkdv"]: 1.0, launches["dq"]: 0.9, launches["bwd"]: 0.8}
    assert tune.backward_layouts(measured, (9, 0)) == {key: {"one_pass": 1}}
    measured[launches["bwd"]] = 0.95
    assert tune.backward_layouts(measured, (9, 0)) == {key: {"one_pass": 0}}
    assert tune.backward_layouts({launches["bwd"]: 0.8}, (9, 0)) == {}


def test_a_measured_backward_layout_is_followed(monkeypatch):
    """The GPU path of _backward takes the layout the tuner recorded over the rule."""
    monkeypatch.setattr(attention, "KERNELS_INTERPRETED", False)
    monkeypatch.setattr(attention._utils, "cuda_capability", lambda device: (9, 0))
    ran = []
    monkeypatch.setattr(attention, "_flash_cross_attention_bwd_fused_kernel", _Recorder("one pass", ran))
    monkeypatch.setattr(attention, "_flash_cross_attention_bwd_dkdv_kernel", _Recorder("dkdv", ran))
    monkeypatch.setattr(attention, "_flash_cross_attention_bwd_dq_kernel", _Recorder("dq", ran))
    monkeypatch.setattr(attention, "_flash_cross_attention_bwd_preprocess_kernel", _Recorder("pre", []))
    q = torch.zeros(2, 300, 2, 64, dtype=torch.bfloat16)
    k = torch.zeros(2, 439, 2, 64, dtype=torch.bfloat16)
    lse = torch.zeros(2, 2, 300)
    key = attention.tuning_key("layout", torch.bfloat16, 300, 64, (9, 0))
    for one_pass, expected in ((1, ["one pass"]), (0, ["dkdv", "dq"])):
        monkeypatch.setitem(_tuned.TUNED, key, {"one_pass": one_pass})
        ran.clear()
        attention._backward(q, k, k, None, q, lse, q, 0.125)
        assert ran == expected


class _Recorder:
    """Stands in for a kernel: `kernel[grid](...)` records its name."""

    def __init__(self, name, ran):
        self.name, self.ran = name, ran

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.ran.append(self.name)
