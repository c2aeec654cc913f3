"""orca_kernels imports and works without its compiled extension, and says so once."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_import_without_extension_warns_once_and_explains():
    script = textwrap.dedent(
        """
        import importlib.abc, sys, warnings

        class BlockExtension(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "orca_kernels._C":
                    raise ImportError("simulated: _C built against another torch")

        sys.meta_path.insert(0, BlockExtension())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            import orca_kernels
            import orca_kernels.strided_conv
        messages = [str(w.message) for w in caught if "orca_kernels._C" in str(w.message)]
        assert len(messages) == 1, messages
        assert "pip install --no-build-isolation -e ." in messages[0]

        x, weight = torch.randn(2, 37, 6), torch.randn(5, 6, 5)
        out = orca_kernels.strided_conv1d(x, weight, None, 4, 2)  # auto: the reference
        assert torch.equal(out, orca_kernels.reference.strided_conv1d(x, weight, None, 4, 2))
        try:
            orca_kernels.strided_conv1d(x, weight, None, 4, 2, backend="extension")
        except RuntimeError as error:
            assert "not available" in str(error) and "pip install --no-build-isolation -e ." in str(error), error
        else:
            raise AssertionError("backend='extension' without _C must raise")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")
