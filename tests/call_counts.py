"""Counting calls to a module's functions: the one helper behind every "did the fused op really
run" check (the model tests, the decode step, the distributed worker)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any


def count_calls(
    module: ModuleType, names: Iterable[str], set_attribute: Callable[[Any, str, Any], None] = setattr
) -> dict[str, int]:
    """Replaces `module.<name>` for each name by a wrapper that counts its calls and forwards
    them; returns the live counts. Tests pass `monkeypatch.setattr` as `set_attribute` (undone
    after the test); a worker process patches for its whole life with the builtin."""
    calls = dict.fromkeys(names, 0)
    for name in calls:
        original = getattr(module, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        set_attribute(module, name, counting)
    return calls
