"""GPU truth without a GPU: the static compile audit (benchmarks/compile_audit.py) as a test.

Every Triton launch the ops make at the model shapes must compile for sm_80 and sm_90, without
register spills (fp64 aside), within the shared-memory limit, with fp16/bf16 dots on the tensor
cores. The audit compiles real kernels, so it runs in a subprocess without TRITON_INTERPRET (this
process may have imported the kernels as interpreted functions).
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
