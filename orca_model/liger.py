"""Liger-Kernel's Triton RMSNorm, SwiGLU and RoPE in one LLM instance (`use_liger_kernel=True`).

The Hugging Face Trainer applies Liger to the model it trains only when that model is a
`PreTrainedModel`; a `DeSTA25AudioModel` is not, so `TrainingArguments(use_liger_kernel=True)`
would patch nothing. `DeSTA25Trainer` calls `apply_liger_kernel_to_llm(model.llm_model)` instead.

Liger's own `apply_liger_kernel_to_qwen3(model=...)` / `..._llama(model=...)` also replace
module-level names of transformers (`modeling_qwen3.apply_rotary_pos_emb`, `Qwen3RMSNorm`,
`Qwen3MLP`), which changes every model of that family built later in the process, the reference
path included. Here nothing outside the given instance changes:

- each RMSNorm module (`<Model>RMSNorm`: the decoder layers' two, Qwen3's q/k norms, the final
  norm) gets a `forward` of its own that calls `liger_rms_norm` ("llama" casting, as HF's);
- each MLP (`<Model>MLP`, SiLU) gets a `forward` of its own with `liger_swiglu`;
- each attention module (`<Model>Attention`) gets a copy of its class's `forward` whose globals
  name `liger_rotary_pos_emb` as `apply_rotary_pos_emb` (the module-level function the class's
  forward calls); the module's globals are not touched.

The LM loss is not Liger's: with `use_fused_orca` the model computes it without logits itself
(`orca_model.lm_loss`), otherwise it is the LLM's own. The kernels are Triton: they run on CUDA,
and on the CPU only under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import types

from torch import nn

SUPPORTED_MODEL_TYPES = ("qwen3", "llama")
KERNELS = ("rope", "rms_norm", "swiglu")
# Liger's loss options, which `liger_kernel_config` may hold: this model's LM loss is its own.
LOSS_OPTIONS = ("cross_entropy", "fused_linear_cross_entropy")
APPLIED = "_orca_liger_kernels"  # instance attribute: the kernels applied so far


def _liger():
    try:
        from liger_kernel.transformers import functional
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError as error:
        raise ImportError(
            "use_liger_kernel needs Liger-Kernel: pip install liger-kernel (or 'orca-kernels[train]')"
        ) from error
    return functional, liger_rotary_pos_emb


def _rms_norm_forward(self, hidden_states):
    functional, _ = _liger()
    return functional.liger_rms_norm(
        hidden_states, self.weight, self.variance_epsilon, offset=0.0, casting_mode="llama", in_place=True
    )


def _swiglu_forward(self, x):
    functional, _ = _liger()
    return self.down_proj(functional.liger_swiglu(self.gate_proj(x), self.up_proj(x)))


def _calls_rope(function) -> bool:
    code = getattr(function, "__code__", None)
    return (
        code is not None and "apply_rotary_pos_emb" in code.co_names and "apply_rotary_pos_emb" in function.__globals__
    )


def _copy_function(function, scope: dict, closure) -> types.FunctionType:
    copy = types.FunctionType(function.__code__, scope, function.__name__, function.__defaults__, closure)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__dict__.update(function.__dict__)
    copy.__qualname__, copy.__doc__, copy.__module__ = function.__qualname__, function.__doc__, function.__module__
    return copy


def _with_liger_rope(function, owner: str):
    """A copy of `function` in which the innermost forward (the one that calls the module-level
    `apply_rotary_pos_emb`) sees Liger's in a copy of its globals; each decorator around it
    (transformers' kwarg deprecations, the `kernels` package's router) is copied with its closure
    pointing at the new inner function, so that every wrapper keeps working."""
    if _calls_rope(function):
        _, liger_rotary_pos_emb = _liger()
        return _copy_function(
            function,
            {**function.__globals__, "apply_rotary_pos_emb": liger_rotary_pos_emb},
            None if function.__closure__ is None else function.__closure__,
        )
    inner = getattr(function, "__wrapped__", None)
    if inner is None:
        raise NotImplementedError(
            f"apply_liger_kernel_to_llm: {owner}.forward does not call a module-level apply_rotary_pos_emb, so "
            "Liger's RoPE cannot be put in this instance (pass rope=False)"
        )
    replacement = _with_liger_rope(inner, owner)
    cells, replaced = [], False
    for cell in function.__closure__ or ():
        try:
            holds_inner = cell.cell_contents is inner
        except ValueError:  # an empty cell
            holds_inner = False
        cells.append(types.CellType(replacement) if holds_inner else cell)
        replaced |= holds_inner
    if not replaced:
        raise NotImplementedError(
            f"apply_liger_kernel_to_llm: a decorator of {owner}.forward does not hold the function it wraps in its "
            "closure, so Liger's RoPE cannot be put in this instance (pass rope=False)"
        )
    copy = _copy_function(function, function.__globals__, tuple(cells))
    copy.__wrapped__ = replacement
    return copy


_ROPE_FORWARDS: dict[type, types.FunctionType] = {}


def _rope_forward(cls: type) -> types.FunctionType:
    """`cls.forward`, decorators included, calling Liger's RoPE (`_with_liger_rope`)."""
    if cls not in _ROPE_FORWARDS:
        _ROPE_FORWARDS[cls] = _with_liger_rope(cls.forward, cls.__qualname__)
    return _ROPE_FORWARDS[cls]


def _family_modules(llm: nn.Module, suffix: str) -> list[nn.Module]:
    """The modules of `llm` whose class is the model family's `<Prefix><suffix>` (defined in the
    same transformers module as the LLM's class)."""
    home = type(llm).__module__
    return [m for m in llm.modules() if type(m).__module__ == home and type(m).__name__.endswith(suffix)]


def apply_liger_kernel_to_llm(
    llm: nn.Module, *, rope: bool = True, rms_norm: bool = True, swiglu: bool = True, **loss_options: bool
) -> dict[str, int]:
    """Put Liger's RMSNorm, SwiGLU and RoPE kernels in this Qwen3 / Llama instance (a causal LM,
    LoRA-injected or not) and nowhere else. Returns how many modules each kernel went into.

    `loss_options` are Liger's `cross_entropy` / `fused_linear_cross_entropy` keys of a
    `liger_kernel_config`: accepted when False; True raises, as the LM loss is this package's
    (`use_fused_orca`). Applying twice is harmless."""
    unknown = set(loss_options) - set(LOSS_OPTIONS)
    if unknown:
        raise ValueError(
            f"apply_liger_kernel_to_llm: unknown options {sorted(unknown)}; the kernels are {', '.join(KERNELS)}"
        )
    if any(loss_options.values()):
        raise ValueError(
            "apply_liger_kernel_to_llm: the LM loss is not Liger's here: with use_fused_orca=True the model computes "
            "it without logits itself (orca_model.lm_loss); set cross_entropy and fused_linear_cross_entropy to False"
        )
    model_type = getattr(getattr(llm, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"apply_liger_kernel_to_llm: Liger is applied to {', '.join(SUPPORTED_MODEL_TYPES)} LLMs, got "
            f"model_type {model_type!r}"
        )
    _liger()  # the ImportError now, not at the first forward
    counts = {"rope": 0, "rms_norm": 0, "swiglu": 0}
    if rms_norm:
        for module in _family_modules(llm, "RMSNorm"):
            module.forward = types.MethodType(_rms_norm_forward, module)
            counts["rms_norm"] += 1
    if swiglu:
        for module in _family_modules(llm, "MLP"):
            if getattr(module.config, "hidden_act", None) not in ("silu", "swish"):
                raise NotImplementedError(
                    f"apply_liger_kernel_to_llm: Liger's SwiGLU is SiLU-gated; {type(module).__name__} uses "
                    f"{module.config.hidden_act!r} (pass swiglu=False)"
                )
            module.forward = types.MethodType(_swiglu_forward, module)
            counts["swiglu"] += 1
    if rope:
        for module in _family_modules(llm, "Attention"):
            module.forward = types.MethodType(_rope_forward(type(module)), module)
            counts["rope"] += 1
    applied = set(llm.__dict__.get(APPLIED, ()))
    llm.__dict__[APPLIED] = tuple(sorted(applied | {name for name, count in counts.items() if count}))
    return counts


def liger_kernels_applied(llm: nn.Module) -> tuple[str, ...]:
    """The kernels `apply_liger_kernel_to_llm` put in this instance (empty if none)."""
    return llm.__dict__.get(APPLIED, ())
