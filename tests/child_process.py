"""The environment of a child process a test starts (a worker, the training command, a script
that must crash alone): the one place that says "import this checkout, whatever is installed"."""

from __future__ import annotations

import os
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def child_environment(*extra_paths: str | os.PathLike, **variables: str | None) -> dict[str, str]:
    """This process's environment (TRITON_INTERPRET and ORCA_KERNELS_POISON_OUTPUTS included) with
    this checkout, then `extra_paths`, first on PYTHONPATH, and `variables` set (None removes
    one)."""
    python_path = [str(CHECKOUT), *map(str, extra_paths), os.environ.get("PYTHONPATH", "")]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, python_path))}
    for name, value in variables.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return environment
