"""GPU truth without a GPU: the static compile audit (benchmarks/compile_audit.py) as a test.

Every Triton launch the ops make at the model shapes must compile for sm_80 and sm_90, without
register spills (fp64 aside), within the shared-memory limit, with fp16/bf16 dots on the tensor
cores, and without warps that repeat each other's work (read from the TTGIR's layouts). The audit
compiles real kernels, so it runs in a subprocess without TRITON_INTERPRET (this process may have
imported the kernels as interpreted functions).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from child_process import CHECKOUT, child_environment


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = child_environment(TRITON_INTERPRET=None)
    command = [sys.executable, *args]
    return subprocess.run(command, cwd=CHECKOUT, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_launch_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    result = _run(["-m", "benchmarks.compile_audit", "--out", str(tmp_path)], timeout=1800)
    reports = list(tmp_path.glob("compile_audit_triton-*.json"))
    assert reports, f"the audit wrote no report:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    report = json.loads(reports[0].read_text())
    assert report["failures"] == [], "\n".join(report["failures"])
    assert result.returncode == 0, result.stderr[-3000:]

    rows = report["rows"]
    assert {row["arch"] for row in rows} == {"sm_80", "sm_90"}
    assert set().union(*(row["precisions"] for row in rows)) == {"bf16", "fp16", "fp32", "fp64", "autocast"}
    assert all("error" not in row["result"] for row in rows)
    # Hopper's bf16/fp16 attention reaches wgmma; Ampere's mma.sync.
    half_dots = [row for row in rows if row["result"]["has_dot"] and set(row["precisions"]) & {"bf16", "fp16"}]
    assert any(row["result"]["tensor_cores"] == "wgmma" for row in half_dots if row["arch"] == "sm_90")
    assert all(row["result"]["tensor_cores"] for row in half_dots)
    table = (tmp_path / reports[0].name.replace(".json", ".md")).read_text()
    assert "| kernel | arch |" in table and "Failures: 0" in table


def test_the_audit_checks_can_fail():
    """The checks can fail: a launch setting known to spill (fp32 attention, 4 warps, head dim
    128) is reported, so is a rope kernel compiled with fma contraction (no longer bitwise equal
    to the reference), and so is a kernel that no case launches."""
    script = textwrap.dedent(
        """
        import copy
        from benchmarks import compile_audit as audit

        launch = next(
            l for l in audit.record(audit.TARGETS["sm_90"], audit.MODELS[2:])
            if l.kernel.__name__ == "_flash_cross_attention_fwd_kernel" and l.precision == "fp32"
        )
        variant = audit.specialise(launch)
        variant["constexprs"].update(BLOCK_M=32, BLOCK_N=32)
        variant["options"] = {"num_warps": 4, "num_stages": 1}
        row = {"variant": variant, "arch": "sm_90", "cases": [launch.case], "precisions": {"fp32"}}
        row["result"] = audit.compile_variant(variant, "sm_90")
        failures = audit._check(row)
        assert any("spills" in f for f in failures), (row["result"], failures)

        rope = next(l for l in audit.record(audit.TARGETS["sm_90"], audit.MODELS[:1])
                    if l.kernel.__name__ == "_audio_rope_fwd_kernel" and l.precision == "fp32")
        variant = audit.specialise(rope)
        assert variant["options"]["enable_fp_fusion"] is False
        variant["options"]["enable_fp_fusion"] = True
        row = {"variant": variant, "arch": "sm_90", "cases": [rope.case], "precisions": {"fp32"}}
        row["result"] = audit.compile_variant(variant, "sm_90")
        assert any("fused multiply-adds" in f for f in audit._check(row)), row["result"]

        every_case = audit.cases
        audit.cases = lambda models: (c for c in every_case(models) if "audio_rope" in c[0])
        report = audit.audit(["sm_90"], 1, audit.MODELS[:1], progress=False)
        unaudited = [f for f in report["failures"] if "no case launches it" in f]
        assert len(unaudited) == len(audit.package_kernels()) - 1, report["failures"]
        print("ok", row["result"]["spill_bytes"])
        """
    )
    result = _run(["-c", script], timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.startswith("ok")


# A chained dot (S = A B feeding S C, as attention's QK^T feeds P V): Triton lays its warps all
# along M, [num_warps, 1], so 8 warps over 64 rows repeat every element twice.
_CHAINED_DOT_KERNEL = """
import triton
import triton.language as tl


@triton.jit
def _chained_dot_kernel(a_ptr, b_ptr, c_ptr, out_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    c = tl.load(c_ptr + n[:, None] * K + k[None, :])
    s = tl.dot(a, b)
    tl.store(out_ptr + m[:, None] * K + k[None, :], tl.dot(s.to(tl.float16), c))
"""


_BLOCKED = (
    "#blocked = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [2, 16], warpsPerCTA = [8, 1], order = [1, 0]}>"
)


def _ttgir(layouts: str, *types: str, dot: str = "") -> str:
    """A TTGIR module: the layout aliases `layouts` and `_BLOCKED`, a `tt.dot` whose result is of
    type `dot` if given, and an elementwise op on each of `types`."""
    lines = [layouts, _BLOCKED, 'module attributes {"ttg.num-warps" = 8 : i32} {']
    if dot:
        operand = "tensor<16x16xf32, #blocked1>"
        lines.append(f"  %d = tt.dot %a, %b, %c, inputPrecision = ieee : {operand} * {operand} -> {dot} loc(#loc1)")
    lines += [f"  %{i} = arith.addf %x, %y : {t} loc(#loc2)" for i, t in enumerate(types)]
    return "\n".join(lines + ["}"])


def test_duplicated_warps_reads_mma_and_dot_layouts_from_ttgir():
    """The duplicated-warps check on TTGIR text: Hopper (wgmma, v3) and Ampere (mma.sync, v2)
    layouts whose warps overrun the tile along M or N are flagged, those that fit are not, nor is a
    broadcast axis of size 1; a blocked layout is judged only where it holds a dot's result."""
    from benchmarks import compile_audit as audit

    v3 = "#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 64, 16]}>"
    (finding,) = audit.duplicated_warps(_ttgir(v3, "tensor<64x64xf32, #mma>", "tensor<1x64xf32, #mma>"))
    assert finding["axes"] == ["M 8 warps x 16 = 128 > 64"] and finding["tensors"] == ["tensor<64x64xf32, #mma>"]
    assert finding["kind"] == "nvidia_mma v3" and finding["warpsPerCTA"] == [8, 1]
    assert audit.duplicated_warps(_ttgir(v3, "tensor<128x64xf32, #mma>", "tensor<128x1xf32, #mma>")) == []
    # Two warpgroups side by side along N: a 64-wide tile holds one 64-wide wgmma, not two.
    v3_wide = v3.replace("[8, 1]", "[4, 2]")
    (finding,) = audit.duplicated_warps(_ttgir(v3_wide, "tensor<64x64x!tt.ptr<f32>, #mma>"))
    assert finding["axes"] == ["N 2 warps x 64 = 128 > 64"]
    assert audit.duplicated_warps(_ttgir(v3_wide, "tensor<64x128xf32, #mma>")) == []

    v2 = "#mma = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 8]}>"
    (finding,) = audit.duplicated_warps(_ttgir(v2, "tensor<16x64xf32, #mma>"))
    assert finding["axes"] == ["M 4 warps x 16 = 64 > 16"] and finding["kind"] == "nvidia_mma v2"
    assert audit.duplicated_warps(_ttgir(v2, "tensor<64x64xf32, #mma>", "tensor<64x1xf32, #mma>")) == []
    assert audit.duplicated_warps(_ttgir(v2.replace("[4, 1]", "[1, 4]"), "tensor<16x64xf32, #mma>")) == []
    # fp64's mma.sync is m8n8: 4 warps along N over 16 columns, two of them copies.
    fp64 = v2.replace("[4, 1]", "[1, 4]").replace("[16, 8]", "[8, 8]")
    (finding,) = audit.duplicated_warps(_ttgir(fp64, "tensor<16x16xf64, #mma>"))
    assert finding["axes"] == ["N 4 warps x 8 = 32 > 16"]
    # A second alias is judged by its own layout.
    both = f"{v2}\n{v3.replace('#mma =', '#mma1 =')}"
    findings = audit.duplicated_warps(_ttgir(both, "tensor<64x64xf32, #mma>", "tensor<64x64xf32, #mma1>"))
    assert [f["layout"] for f in findings] == ["#mma1"]

    # Blocked (FMA dots): a warp holds 2 x 16 of the result; 8 warps over 8 rows, 4 of them copies.
    (finding,) = audit.duplicated_warps(_ttgir("", dot="tensor<8x16xf32, #blocked>"))
    assert finding["axes"] == ["M 8 warps x 2 = 16 > 8"] and finding["kind"] == "blocked"
    assert audit.duplicated_warps(_ttgir("", "tensor<8x16xf32, #blocked>")) == []  # not a dot's result
    assert audit.duplicated_warps(_ttgir("", dot="tensor<16x16xf32, #blocked>")) == []

    # In the audit: a failure for bf16 and the other precisions, reported for fp64 alone.
    variant = {"kernel": "m:_k", "constexprs": {"BLOCK_M": 64}, "options": {"num_warps": 8, "num_stages": 2}}
    result = {"spill_bytes": 0, "registers": 100, "shared_bytes": 0, "fused_multiply_adds": 0, "has_dot": True}
    result["tensor_cores"] = "wgmma"
    result["duplicated_warps"] = audit.duplicated_warps(_ttgir(v3, "tensor<64x64xf32, #mma>"))
    row = {"variant": variant, "arch": "sm_90", "cases": ["case"], "precisions": {"bf16"}, "result": result}
    (failure,) = audit._check(row)
    assert "warps duplicate work: M 8 warps x 16 = 128 > 64 in #mma" in failure
    assert audit._check(row | {"precisions": {"fp64"}}) == []
    assert audit._duplication_label(result["duplicated_warps"]) == "M 8x16>64 (64x64)"


def test_duplicated_warps_on_a_compiled_kernel(tmp_path):
    """A real chained dot compiled for sm_90 (and sm_80): 8 warps over 64 rows are flagged by the
    audit, 4 warps pass."""
    (tmp_path / "chained_dot.py").write_text(_CHAINED_DOT_KERNEL)
    script = textwrap.dedent(
        """
        from benchmarks import compile_audit as audit

        def check(arch, num_warps):
            variant = {
                "kernel": "chained_dot:_chained_dot_kernel",
                "signature": {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "out_ptr": "*fp32",
                              "M": "constexpr", "N": "constexpr", "K": "constexpr"},
                "constexprs": {"M": 64, "N": 64, "K": 32},
                "divisible": [0, 1, 2, 3],
                "options": {"num_warps": num_warps, "num_stages": 1},
            }
            row = {"variant": variant, "arch": arch, "cases": ["chained"], "precisions": {"fp16"}}
            row["result"] = audit.compile_variant(variant, arch)
            assert "error" not in row["result"], row["result"]
            return row["result"], audit._check(row)

        result, failures = check("sm_90", 8)
        assert result["tensor_cores"] == "wgmma", result
        assert [f["warpsPerCTA"] for f in result["duplicated_warps"]] == [[8, 1]], result
        assert result["duplicated_warps"][0]["axes"] == ["M 8 warps x 16 = 128 > 64"], result
        assert len(failures) == 1 and "warps duplicate work" in failures[0], failures
        result, failures = check("sm_90", 4)
        assert result["duplicated_warps"] == [] and failures == [], (result, failures)
        result, failures = check("sm_80", 8)
        assert result["tensor_cores"] == "mma.sync" and len(failures) == 1, (result, failures)
        print("ok")
        """
    )
    env = child_environment(tmp_path, TRITON_INTERPRET=None)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=CHECKOUT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.startswith("ok")
