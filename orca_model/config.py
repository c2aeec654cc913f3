"""DeSTA25Config: the reference's configuration (docs/model-shapes.md#desta25config-fields) plus `use_fused_orca`."""

from __future__ import annotations

import contextvars
import logging
import math
import numbers
from collections.abc import Callable
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from orca_kernels.cross_attention import ATTENTION_BACKENDS
from orca_kernels.validation import check_bool

logger = logging.getLogger(__name__)

DEFAULT_ROPE_THETA = 10000.0  # the reference's fallback when the LLM config has no θ

# "qformer_1" is the reference's default (its Q-Former-only mode, which DeSTA25AudioModel refuses
# with NotImplementedError); "orca_hybrid" is what this package builds.
CONNECTOR_MODES = ("qformer_1", "orca_hybrid")
# The frozen Whisper encoder's weight dtypes: fp32 is the reference's (docs/training.md#the-frozen-encoder).
ENCODER_DTYPES = ("float32", "bfloat16", "float16")
# torch dtype names the LLM can be loaded in (`getattr(torch, llm_dtype)`).
LLM_DTYPES = ("bfloat16", "float16", "float32", "float64")
LOSS_WEIGHTS = (
    "orca_ortho_weight_global",
    "orca_ortho_diversity_weight",
    "orca_ortho_weight_qformer_local",
    "orca_align_weight_local",
)


def _field_error(name: str, allowed: str, value: Any) -> ValueError:
    return ValueError(f"DeSTA25Config: {name} must be {allowed}, got {value!r}")


def _real(name: str, value: Any, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"DeSTA25Config: {name} must be a real number ({allowed}), got {type(value).__name__}")
    if not math.isfinite(value):
        raise _field_error(name, allowed, value)
    return value


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"DeSTA25Config: {name} must be an int >= 1, got {type(value).__name__}")
    if value < 1:
        raise _field_error(name, "an int >= 1", value)


def _positive_real(name: str, value: Any) -> None:
    if not _real(name, value, "finite and > 0") > 0:
        raise _field_error(name, "finite and > 0", value)


def _weight(name: str, value: Any) -> None:
    if not _real(name, value, "finite and >= 0") >= 0:
        raise _field_error(name, "finite and >= 0", value)


def _finite(name: str, value: Any) -> None:
    _real(name, value, "finite")


def _boolean(name: str, value: Any) -> None:
    check_bool("DeSTA25Config", name, value)


def _layer_ids(name: str, value: Any) -> None:
    """None or a list (or tuple) of ints; which ints are allowed is `target_layer_ids_for`'s rule."""
    if value is None:
        return
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"DeSTA25Config: {name} must be None or a list of ints, got {type(value).__name__}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise TypeError(
                f"DeSTA25Config: {name} must be None or a list of ints, got a {type(item).__name__} in {value!r}"
            )


def _one_of(choices: tuple[str, ...]) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if value not in choices:
            raise _field_error(name, f"one of {', '.join(map(repr, choices))}", value)

    return check


# Checked whenever the field is set: in __init__ (so from_pretrained / from_dict / from_json_file
# too), by from_pretrained's keyword overrides (set after __init__), and by later assignments.
FIELD_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "connector_mode": _one_of(CONNECTOR_MODES),
    "qformer_num_hidden_layers": _positive_int,
    "orca_audio_position_scale": _positive_real,
    "orca_global_num_tokens": _positive_int,
    "orca_local_downsample": _positive_int,
    "orca_local_kernel_size": _positive_int,
    "orca_gate_init": _finite,
    **dict.fromkeys(LOSS_WEIGHTS, _weight),
    "use_fused_orca": _boolean,
    "orca_attention_backend": _one_of(ATTENTION_BACKENDS),
    "llm_dtype": _one_of(LLM_DTYPES),
    "encoder_dtype": _one_of(ENCODER_DTYPES),
    "orca_target_layer_ids": _layer_ids,
}


def target_layer_ids_for(num_layers: int, use_all_layers: bool, layer_ids: list[int] | None) -> list[int]:
    """The encoder layers the connector reads (`DeSTA25Config.target_layer_ids`), and the one home
    of the rule and its messages: `layer_ids` when given, which must be a non-empty, sorted list
    of unique indices in [0, num_layers); every layer when `use_all_layers`; otherwise
    (i+1)·L/4 − 1 for i = 0..3, which needs L = num_layers divisible by 4."""
    if layer_ids is not None:
        ids = list(layer_ids)
        # The reference walks the encoder layers in order and keeps those in the list, so an
        # unsorted or repeated list would not mean what it says.
        if not ids or ids != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= num_layers:
            raise ValueError(
                f"DeSTA25Config: orca_target_layer_ids must be a non-empty, sorted list of unique encoder "
                f"layer indices in [0, {num_layers}), got {ids}"
            )
        return ids
    if use_all_layers:
        return list(range(num_layers))
    if num_layers % 4 != 0:
        raise ValueError(
            "DeSTA25Config: orca_target_layer_ids must be set (or orca_use_all_layers=True) for an encoder "
            f"whose layer count is not a multiple of 4, got None with {num_layers} encoder layers"
        )
    return [(i + 1) * num_layers // 4 - 1 for i in range(4)]


def _check_target_layers(fields: dict[str, Any]) -> None:
    target_layer_ids_for(
        fields["encoder_config"].num_hidden_layers, fields["orca_use_all_layers"], fields["orca_target_layer_ids"]
    )


def _check_injection_heads(fields: dict[str, Any]) -> None:
    """OrcaGatedCrossAttention(H, heads of the LLM) exists only where the heads divide H."""
    if not fields["orca_deep_injection_enabled"]:
        return
    hidden = getattr(fields["llm_config"], "hidden_size", None)
    heads = getattr(fields["llm_config"], "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads:
        raise ValueError(
            "DeSTA25Config: llm_config must have num_attention_heads dividing hidden_size while "
            "orca_deep_injection_enabled (the ORCA cross-attention's head dim is hidden_size / "
            f"num_attention_heads), got hidden_size={hidden}, num_attention_heads={heads}"
        )


# Fields the model is built from together, and their check. It runs whenever one of them is set,
# once all of them exist (the last one __init__ sets completes the group), on the value being set
# and the others' current values, so a config never holds a combination the model cannot be built
# from. Inside `from_dict` (so `from_pretrained`) it runs once, after the keyword overrides.
GROUP_CHECKS: tuple[tuple[tuple[str, ...], Callable[[dict[str, Any]], None]], ...] = (
    (("encoder_config", "orca_use_all_layers", "orca_target_layer_ids"), _check_target_layers),
    (("llm_config", "orca_deep_injection_enabled"), _check_injection_heads),
)
_DEFER_GROUP_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("defer_group_checks", default=False)
_UNSET = object()


def _as_config(value: PretrainedConfig | dict[str, Any] | None, model_id: str) -> PretrainedConfig:
    """A sub-config from a config object, a serialised dict (a saved DeSTA25Config nests them),
    or, when None, `AutoConfig.from_pretrained(model_id)` (a hub id or a local directory)."""
    if value is None:
        return AutoConfig.from_pretrained(model_id)
    if isinstance(value, PretrainedConfig):
        return value
    fields = dict(value)
    fields.pop("transformers_version", None)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def rope_theta_from_config(llm_config: PretrainedConfig) -> float:
    """θ of the audio RoPE, read from the LLM config and logged.

    transformers 5.x keeps it in `rope_parameters["rope_theta"]` (per layer type for models with
    several attention kinds; the full-attention one is taken), 4.x in `rope_theta`. The
    reference reads `rope_theta` only, so under 5.x it silently falls back to 10000
    (docs/reference-behaviour.md#rope-theta-under-transformers-5); here either layout gives the
    model's θ. Rope scaling (llama3) is ignored, as in the reference.
    """
    theta, source = None, None
    parameters = getattr(llm_config, "rope_parameters", None)
    if isinstance(parameters, dict):
        if "rope_theta" in parameters:
            theta, source = parameters["rope_theta"], "rope_parameters"
        else:
            per_type = {k: v for k, v in parameters.items() if isinstance(v, dict) and "rope_theta" in v}
            key = "full_attention" if "full_attention" in per_type else next(iter(per_type), None)
            if key is not None:
                theta, source = per_type[key]["rope_theta"], f"rope_parameters[{key!r}]"
    if theta is None and getattr(llm_config, "rope_theta", None) is not None:
        theta, source = llm_config.rope_theta, "rope_theta"
    if theta is None:
        logger.warning("ORCA audio RoPE: the LLM config has no rope_theta; using %s", DEFAULT_ROPE_THETA)
        return DEFAULT_ROPE_THETA
    logger.info("ORCA audio RoPE: theta = %s (from the LLM config's %s)", float(theta), source)
    return float(theta)


class DeSTA25Config(PretrainedConfig):
    """Configuration of `DeSTA25AudioModel`, field for field the reference's (bf7f21f).

    Reference fields and defaults: `llm_model_id`, `encoder_model_id`, `connector_mode`
    ("qformer_1"; this package builds "orca_hybrid"), `qformer_num_hidden_layers` (2),
    `prompt_size`, `use_lora`, `audio_locator`, `placeholder_token`, and the `orca_*` fields of
    docs/model-shapes.md#desta25config-fields (`orca_local_downsample=4`, `orca_audio_position_scale=2.5`, the loss
    weights, ...; `orca_ortho_weight_global` is kept but unused, as in the reference).

    Additions:
        use_fused_orca: run the connector's Conv1d, the ortho losses and the gated
            cross-attention through orca_kernels' fused ops (same parameters, same checkpoints).
        orca_attention_backend: with use_fused_orca, the attention core of the gated
            cross-attention: "auto" (on CUDA the vendor path, SDPA, unless the package's dispatch
            table measured its Triton kernels faster on this card; the Triton kernels under
            `torch.use_deterministic_algorithms(True)`), "sdpa" or "triton" to force one.
        orca_target_layer_ids: 0-based encoder layers the connector reads, sorted and unique;
            None derives them from the encoder's layer count (see `target_layer_ids`).
        encoder_dtype: dtype of the frozen Whisper encoder's weights, one of ENCODER_DTYPES:
            "float32" (the reference's); "float16" / "bfloat16" halve its memory and move its
            states further from the reference's (docs/training.md#the-frozen-encoder).
        llm_dtype: dtype the LLM is loaded in, and that the connector and the cross-attention
            modules are cast to ("bfloat16" is what the reference hardcodes).
        llm_config, encoder_config: the sub-configs, as config objects or dicts; None loads them
            with AutoConfig from `llm_model_id` / `encoder_model_id` (a hub id or a directory).

    Validation (FIELD_CHECKS, whenever a field is set, so also by from_pretrained's overrides and
    later assignments): `connector_mode` in CONNECTOR_MODES, `llm_dtype` in LLM_DTYPES,
    `encoder_dtype` in ENCODER_DTYPES;
    `qformer_num_hidden_layers`, `orca_global_num_tokens`, `orca_local_downsample`,
    `orca_local_kernel_size` ints >= 1; `orca_audio_position_scale` finite and > 0; the four loss
    weights finite and >= 0; `orca_gate_init` finite; `use_fused_orca` a bool; `orca_attention_backend` in
    ATTENTION_BACKENDS; `orca_target_layer_ids` None or a list of ints. Then what the model is built
    from together (GROUP_CHECKS): the target layers (`target_layer_ids_for`: explicit ids sorted,
    unique, in [0, encoder layers); without them, all layers or an encoder layer count divisible by
    4), and, with `orca_deep_injection_enabled`, the LLM's heads dividing its hidden size. A bad
    value is a ValueError (TypeError for a wrong type) naming the field and what it allows.
    """

    model_type = "desta25"
    # transformers 4.x builds a default instance to diff against when saving; that instance
    # would fetch the default LLM's config from the hub.
    has_no_defaults_at_init = True

    def __init__(
        self,
        llm_model_id: str = "DeSTA-ntu/Llama-3.1-8B-Instruct",
        encoder_model_id: str = "openai/whisper-large-v3",
        connector_mode: str = "qformer_1",
        qformer_num_hidden_layers: int = 2,
        prompt_size: int = 64,
        use_lora: bool = False,
        audio_locator: str = "<|AUDIO|>",
        placeholder_token: str = "<|reserved_special_token_87|>",
        orca_enabled: bool = False,
        orca_use_all_layers: bool = False,
        orca_local_enabled: bool = True,
        orca_global_cross_attn: bool = False,
        orca_deep_injection_enabled: bool = True,
        orca_audio_position_scale: float = 2.5,
        orca_global_num_tokens: int = 4,
        orca_local_downsample: int = 4,
        orca_local_kernel_size: int = 5,
        orca_gate_init: float = 0.1,
        orca_ortho_weight_global: float = 0.01,
        orca_ortho_diversity_weight: float = 0.01,
        orca_ortho_weight_qformer_local: float = 0.01,
        orca_align_weight_local: float = 0.05,
        use_fused_orca: bool = False,
        orca_attention_backend: str = "auto",
        orca_target_layer_ids: list[int] | None = None,
        llm_dtype: str = "bfloat16",
        encoder_dtype: str = "float32",
        llm_config: PretrainedConfig | dict[str, Any] | None = None,
        encoder_config: PretrainedConfig | dict[str, Any] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.llm_model_id = llm_model_id
        self.encoder_model_id = encoder_model_id
        self.connector_mode = connector_mode
        self.qformer_num_hidden_layers = qformer_num_hidden_layers
        self.prompt_size = prompt_size
        self.use_lora = use_lora
        self.audio_locator = audio_locator
        self.placeholder_token = placeholder_token
        self.llm_config = _as_config(llm_config, llm_model_id)
        self.encoder_config = _as_config(encoder_config, encoder_model_id)

        self.orca_enabled = orca_enabled
        self.orca_use_all_layers = orca_use_all_layers
        self.orca_local_enabled = orca_local_enabled
        self.orca_global_cross_attn = orca_global_cross_attn
        self.orca_deep_injection_enabled = orca_deep_injection_enabled
        self.orca_audio_position_scale = orca_audio_position_scale
        self.orca_global_num_tokens = orca_global_num_tokens
        self.orca_local_downsample = orca_local_downsample
        self.orca_local_kernel_size = orca_local_kernel_size
        self.orca_gate_init = orca_gate_init
        self.orca_ortho_weight_global = orca_ortho_weight_global
        self.orca_ortho_diversity_weight = orca_ortho_diversity_weight
        self.orca_ortho_weight_qformer_local = orca_ortho_weight_qformer_local
        self.orca_align_weight_local = orca_align_weight_local

        self.use_fused_orca = use_fused_orca
        self.orca_attention_backend = orca_attention_backend
        self.orca_target_layer_ids = orca_target_layer_ids  # stored as a list (__setattr__)
        self.llm_dtype = llm_dtype
        self.encoder_dtype = encoder_dtype
        self.info = "Ｄｅｓｔａ２。５ Ａｕｄｉｏ"  # the reference stores this banner in its configs too

    def __setattr__(self, name: str, value: Any) -> None:
        """Validates the fields of FIELD_CHECKS and GROUP_CHECKS as they are set (at construction
        and after it), before storing them: an error names the field and its allowed values
        instead of a late crash or a NaN loss, and a refused value is not stored."""
        check = FIELD_CHECKS.get(name)
        if check is not None:
            check(name, value)
        if name == "orca_target_layer_ids" and value is not None:
            value = [int(i) for i in value]  # a tuple or numpy ints are stored as the list JSON holds
        if not _DEFER_GROUP_CHECKS.get():
            self._check_groups(name, value)
        super().__setattr__(name, value)

    def _check_groups(self, name: str | None = None, value: Any = None) -> None:
        """GROUP_CHECKS (those holding `name`, with `value` in its place; all when name is None)
        whose fields are all set."""
        for fields, check in GROUP_CHECKS:
            if name is not None and name not in fields:
                continue
            current = {field: value if field == name else getattr(self, field, _UNSET) for field in fields}
            if all(v is not _UNSET for v in current.values()):
                check(current)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """PretrainedConfig.from_dict (so also from_pretrained), with GROUP_CHECKS run once on the
        result, after the keyword overrides are applied: overrides may change fields that are
        checked together (`orca_target_layer_ids=None, orca_use_all_layers=True`) in any order.
        FIELD_CHECKS still run on each value as it is set."""
        token = _DEFER_GROUP_CHECKS.set(True)
        try:
            result = super().from_dict(config_dict, **kwargs)
        finally:
            _DEFER_GROUP_CHECKS.reset(token)
        config = result[0] if isinstance(result, tuple) else result
        config._check_groups()
        return result

    @property
    def is_orca(self) -> bool:
        """The reference's switch for the ORCA components."""
        return bool(self.orca_enabled or self.connector_mode == "orca_hybrid")

    def target_layer_ids(self) -> list[int]:
        """0-based indices of the encoder layers the connector reads.

        `orca_target_layer_ids` when set; all layers when `orca_use_all_layers`; otherwise
        (i+1)·L/4 − 1 for i = 0..3 with L the encoder's layer count, which gives the reference's
        table (tiny [0, 1, 2, 3], small [2, 5, 8, 11], medium [5, 11, 17, 23], large-v3 and
        large-v3-turbo [7, 15, 23, 31]) and extends it to any L divisible by 4. The fields were
        checked when set (`target_layer_ids_for`, the one home of the rule and its messages).
        """
        return target_layer_ids_for(
            self.encoder_config.num_hidden_layers, self.orca_use_all_layers, self.orca_target_layer_ids
        )

    def audio_rope_theta(self) -> float:
        """θ of the audio RoPE from the LLM config (logged), see `rope_theta_from_config`."""
        return rope_theta_from_config(self.llm_config)
