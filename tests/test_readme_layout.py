"""The README's layout table matches the tree: every top-level folder has a row, every row names a
path that exists, and the package, extension and benchmark rows name each of their files."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_SOURCE = {"build", "dist", "gpu-out", "gpu-out-dry"}  # build outputs, git-ignored


def layout_rows() -> dict[str, str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    table = text[text.index("## Layout") : text.index("## Building")]
    return dict(re.findall(r"^\| `([^`]+)` \| (.+) \|$", table, flags=re.MULTILINE))


def test_every_top_level_folder_has_a_row_and_every_row_exists():
    rows = layout_rows()
    folders = {
        f"{name}/"
        for name in os.listdir(ROOT)
        if os.path.isdir(os.path.join(ROOT, name))
        and not name.startswith((".", "_"))
        and not name.endswith(".egg-info")
        and name not in NOT_SOURCE
    }
    assert folders <= set(rows), f"folders without a row in README's layout table: {sorted(folders - set(rows))}"
    missing = [path for path in rows if not os.path.exists(os.path.join(ROOT, path))]
    assert missing == [], f"rows naming paths that do not exist: {missing}"


def test_the_rows_name_every_module():
    rows = layout_rows()
    checks = {
        "orca_kernels/": [n[:-3] for n in os.listdir(os.path.join(ROOT, "orca_kernels")) if n.endswith(".py")],
        "orca_model/": [n[:-3] for n in os.listdir(os.path.join(ROOT, "orca_model")) if n.endswith(".py")],
        "csrc/": os.listdir(os.path.join(ROOT, "csrc")),
        # bench_<op>.py files are covered by the row's pattern; every other file is named
        "benchmarks/": [
            n
            for n in os.listdir(os.path.join(ROOT, "benchmarks"))
            if n.endswith((".py", ".sh")) and not n.startswith(("bench_", "__"))
        ],
    }
    for row, names in checks.items():
        unnamed = sorted(n for n in names if n != "__init__" and n.removesuffix(".py") not in rows[row])
        assert unnamed == [], f"README's {row} row does not name {unnamed}"
