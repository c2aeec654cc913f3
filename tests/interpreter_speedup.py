"""A test-time speed-up of triton's interpreter (TRITON_INTERPRET=1, how CI runs the kernels).

At every call of a `@triton.jit` helper from inside a kernel, the interpreter re-scans
triton.language for builtins to wrap (`InterpretedFunction.__call__` -> `_patch_lang`). The
kernel's launch (`GridExecutor.__call__`) has wrapped them already and unwraps them when it ends,
so the scan changes nothing, yet it costs about half a millisecond per helper call: about 40% of
the interpreted tests' time (the kernels call `_load_tile`, `_key_bias`, ... in their loops).

`install()` skips that scan for a helper whose triton.language modules the running launch has
patched already (itself, or at an earlier helper call: the interpreter never undoes a helper
call's patch); launches, and a helper's first sight of another module, are patched as before. Triton 3.6 and 3.8
(the two stacks CI tests) share these internals; `install` raises if they are missing, so a
triton that changes them fails loudly instead of silently running slower.
"""

from __future__ import annotations

import functools
import inspect

import triton.language as tl
from triton.runtime import interpreter

_state = {"launching": False, "scans": 0}
_launches: list[tuple[object, set[int]]] = []  # (patch scope, patched modules) of running launches


def _languages(fn) -> set[int]:
    """The triton.language modules `_patch_lang` patches for fn: those its globals hold."""
    return {id(value) for value in fn.__globals__.values() if inspect.ismodule(value) and value in (tl, tl.core)}


def install() -> None:
    """Skip the interpreter's redundant re-patching of triton.language in helper calls (idempotent)."""
    if getattr(interpreter, "_orca_skips_helper_patching", False):
        return
    for name in ("GridExecutor", "_patch_lang", "_LangPatchScope"):
        if not hasattr(interpreter, name):
            raise RuntimeError(f"triton.runtime.interpreter has no {name}: update tests/interpreter_speedup.py")
    launch_call = interpreter.GridExecutor.__call__
    patch_lang = interpreter._patch_lang
    restore = interpreter._LangPatchScope.restore

    @functools.wraps(launch_call)
    def launch(self, *args, **kwargs):
        _state["launching"] = True  # the next _patch_lang is this launch's own
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            _state["launching"] = False

    @functools.wraps(patch_lang)
    def patch(fn):
        languages = _languages(fn)
        if _state["launching"]:
            _state["launching"] = False
            scope = patch_lang(fn)
            _launches.append((scope, languages))
        elif _launches and languages <= _launches[-1][1]:
            return interpreter._LangPatchScope()  # patched by the running launch: nothing to do or undo
        else:
            # A helper that sees other modules (triton.language's own helpers, tl.sum or tl.zeros,
            # see triton.language.core): patched here, and, as a helper call's scope is never
            # undone, patched for the rest of the launch.
            scope = patch_lang(fn)
            if _launches:
                _launches[-1][1].update(languages)
        _state["scans"] += 1
        return scope

    @functools.wraps(restore)
    def restore_launch(self) -> None:
        restore(self)
        for index, (scope, _) in enumerate(_launches):
            if scope is self:
                del _launches[index]
                break

    interpreter.GridExecutor.__call__ = launch
    interpreter._patch_lang = patch
    interpreter._LangPatchScope.restore = restore_launch
    interpreter._orca_skips_helper_patching = True


def scans() -> int:
    """How many times triton.language was really scanned and patched since `install()`."""
    return _state["scans"]
