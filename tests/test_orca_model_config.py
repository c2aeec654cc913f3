"""DeSTA25Config: the reference's fields and defaults, target layers, θ under 4.x/5.x layouts,
serialisation without the hub, and the three configs/ files."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import pytest
from transformers import LlamaConfig, PretrainedConfig, Qwen3Config

from orca_model import DeSTA25Config, rope_theta_from_config
from tiny_models import llm_config, whisper_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# The reference's fields and defaults (docs/model-shapes.md#desta25config-fields), plus use_fused_orca.
REFERENCE_DEFAULTS = {
    "llm_model_id": "DeSTA-ntu/Llama-3.1-8B-Instruct",
    "encoder_model_id": "openai/whisper-large-v3",
    "connector_mode": "qformer_1",
    "qformer_num_hidden_layers": 2,
    "prompt_size": 64,
    "use_lora": False,
    "audio_locator": "<|AUDIO|>",
    "placeholder_token": "<|reserved_special_token_87|>",
    "orca_enabled": False,
    "orca_use_all_layers": False,
    "orca_local_enabled": True,
    "orca_global_cross_attn": False,
    "orca_deep_injection_enabled": True,
    "orca_audio_position_scale": 2.5,
    "orca_global_num_tokens": 4,
    "orca_local_downsample": 4,
    "orca_local_kernel_size": 5,
    "orca_gate_init": 0.1,
    "orca_ortho_weight_global": 0.01,
    "orca_ortho_diversity_weight": 0.01,
    "orca_ortho_weight_qformer_local": 0.01,
    "orca_align_weight_local": 0.05,
    "use_fused_orca": False,
}


def tiny(**fields) -> DeSTA25Config:
    fields.setdefault("llm_config", llm_config("qwen3"))
    fields.setdefault("encoder_config", whisper_config())
    return DeSTA25Config(**fields)


def test_reference_fields_and_defaults():
    config = tiny()
    for name, value in REFERENCE_DEFAULTS.items():
        assert getattr(config, name) == value, name
    parameters = inspect.signature(DeSTA25Config.__init__).parameters
    assert {name: parameters[name].default for name in REFERENCE_DEFAULTS} == REFERENCE_DEFAULTS


def test_sub_configs_load_from_local_directories(tmp_path):
    llm_config("llama").save_pretrained(tmp_path / "llm")
    whisper_config().save_pretrained(tmp_path / "whisper")
    config = DeSTA25Config(llm_model_id=str(tmp_path / "llm"), encoder_model_id=str(tmp_path / "whisper"))
    assert isinstance(config.llm_config, LlamaConfig)
    assert config.encoder_config.num_hidden_layers == 4


@pytest.mark.parametrize(
    "layers, expected",
    [(4, [0, 1, 2, 3]), (12, [2, 5, 8, 11]), (24, [5, 11, 17, 23]), (32, [7, 15, 23, 31])],
    ids=["tiny", "small", "medium", "large-v3"],
)
def test_target_layers_reproduce_the_reference_table(layers, expected):
    assert tiny(encoder_config=whisper_config(encoder_layers=layers)).target_layer_ids() == expected


TARGET_IDS_RULE = (
    "DeSTA25Config: orca_target_layer_ids must be a non-empty, sorted list of unique encoder layer indices"
)
NO_DEFAULT_LAYERS = (
    "DeSTA25Config: orca_target_layer_ids must be set (or orca_use_all_layers=True) for an encoder whose "
    "layer count is not a multiple of 4, got None with 6 encoder layers"
)


def test_target_layers_all_override_and_errors():
    """The target layers the connector would refuse are refused when the config is built, with the
    message `target_layer_ids()` gives (one home: target_layer_ids_for)."""
    assert tiny(orca_use_all_layers=True).target_layer_ids() == [0, 1, 2, 3]
    assert tiny(orca_target_layer_ids=[1, 3]).target_layer_ids() == [1, 3]
    assert tiny(orca_target_layer_ids=(0, 3)).orca_target_layer_ids == [0, 3]  # stored as JSON holds it
    for bad in ([3, 1], [1, 1], [4], [-1, 0], []):
        with pytest.raises(ValueError) as caught:
            tiny(orca_target_layer_ids=bad)
        assert str(caught.value) == f"{TARGET_IDS_RULE} in [0, 4), got {bad}"
    six_layers = whisper_config(encoder_layers=6)
    with pytest.raises(ValueError) as caught:
        tiny(encoder_config=six_layers)
    assert str(caught.value) == NO_DEFAULT_LAYERS
    # An encoder without a default layer set is fine with explicit ids or all layers.
    assert tiny(encoder_config=six_layers, orca_target_layer_ids=[1, 5]).target_layer_ids() == [1, 5]
    assert tiny(encoder_config=six_layers, orca_use_all_layers=True).target_layer_ids() == list(range(6))


def test_target_layers_are_checked_on_assignment():
    """An assignment that would leave target layers the model cannot be built from is refused,
    with the same messages, and the value is not stored: ids, the all-layers flag, the encoder."""
    config = tiny(encoder_config=whisper_config(encoder_layers=6), orca_use_all_layers=True)
    with pytest.raises(ValueError) as caught:
        config.orca_use_all_layers = False
    assert str(caught.value) == NO_DEFAULT_LAYERS and config.orca_use_all_layers is True
    with pytest.raises(ValueError, match=r"in \[0, 6\), got \[2, 6\]"):
        config.orca_target_layer_ids = [2, 6]
    assert config.orca_target_layer_ids is None
    config.orca_target_layer_ids = [2, 5]
    config.orca_use_all_layers = False  # the explicit ids now decide
    with pytest.raises(ValueError, match=r"in \[0, 4\), got \[2, 5\]"):
        config.encoder_config = whisper_config(encoder_layers=4)
    assert config.encoder_config.num_hidden_layers == 6
    with pytest.raises(ValueError) as caught:
        config.orca_target_layer_ids = None
    assert str(caught.value) == NO_DEFAULT_LAYERS and config.orca_target_layer_ids == [2, 5]


def test_target_layers_are_checked_after_from_pretrained_overrides(tmp_path):
    """from_pretrained checks the fields set together once its keyword overrides are applied, so
    overrides may move between valid states in any order, and may not end in an invalid one."""
    tiny(encoder_config=whisper_config(encoder_layers=6), orca_target_layer_ids=[1, 5]).save_pretrained(tmp_path)
    loaded = DeSTA25Config.from_pretrained(tmp_path, orca_target_layer_ids=None, orca_use_all_layers=True)
    assert loaded.target_layer_ids() == list(range(6))
    with pytest.raises(ValueError) as caught:
        DeSTA25Config.from_pretrained(tmp_path, orca_target_layer_ids=None)
    assert str(caught.value) == NO_DEFAULT_LAYERS
    with pytest.raises(ValueError) as caught:
        DeSTA25Config.from_pretrained(tmp_path, orca_target_layer_ids=[5, 1])
    assert str(caught.value) == f"{TARGET_IDS_RULE} in [0, 6), got [5, 1]"
    with pytest.raises(TypeError, match="orca_target_layer_ids must be None or a list of ints, got str"):
        DeSTA25Config.from_pretrained(tmp_path, orca_target_layer_ids="1,5")
    saved = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"in \[0, 6\), got \[1, 6\]"):
        DeSTA25Config.from_dict({**saved, "orca_target_layer_ids": [1, 6]})


def test_injection_needs_llm_heads_dividing_the_hidden_size():
    """With deep injection the model builds one OrcaGatedCrossAttention(hidden_size, the LLM's heads)
    per decoder layer, which needs the heads to divide the hidden size (a Qwen3 config, with its
    own head_dim, need not): refused at construction and on assignment, not after the LLM loads."""
    odd_heads = Qwen3Config(**{**llm_config("qwen3").to_dict(), "num_attention_heads": 3, "num_key_value_heads": 1})
    message = (
        "DeSTA25Config: llm_config must have num_attention_heads dividing hidden_size while "
        "orca_deep_injection_enabled (the ORCA cross-attention's head dim is hidden_size / "
        "num_attention_heads), got hidden_size=64, num_attention_heads=3"
    )
    with pytest.raises(ValueError) as caught:
        tiny(llm_config=odd_heads)
    assert str(caught.value) == message
    config = tiny(llm_config=odd_heads, orca_deep_injection_enabled=False)  # no cross-attention built
    with pytest.raises(ValueError) as caught:
        config.orca_deep_injection_enabled = True
    assert str(caught.value) == message and config.orca_deep_injection_enabled is False


class _V4StyleConfig(PretrainedConfig):
    """A transformers 4.x LLM config: θ as a plain `rope_theta` attribute, no rope_parameters."""

    model_type = "v4_style_llm"

    def __init__(self, rope_theta: float = 5e5, **kwargs):
        self.rope_theta = rope_theta
        super().__init__(**kwargs)


def test_rope_theta_from_5x_4x_and_per_layer_type_layouts(caplog):
    with caplog.at_level(logging.INFO, logger="orca_model.config"):
        assert rope_theta_from_config(Qwen3Config(rope_parameters={"rope_type": "default", "rope_theta": 1e6})) == 1e6
    assert "theta = 1000000.0" in caplog.text and "rope_parameters" in caplog.text
    llama31 = LlamaConfig(
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    assert rope_theta_from_config(llama31) == 5e5  # the llama3 scaling is ignored, as in the reference
    assert rope_theta_from_config(_V4StyleConfig(rope_theta=5e5)) == 5e5
    per_type = PretrainedConfig()
    per_type.rope_parameters = {"sliding_attention": {"rope_theta": 1e4}, "full_attention": {"rope_theta": 1e6}}
    assert rope_theta_from_config(per_type) == 1e6
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="orca_model.config"):
        assert rope_theta_from_config(PretrainedConfig()) == 10000.0
    assert "no rope_theta" in caplog.text
    assert tiny(llm_config=llm_config("llama")).audio_rope_theta() == 5e5


def test_save_and_load_without_the_hub(tmp_path):
    config = tiny(
        connector_mode="orca_hybrid",
        use_fused_orca=True,
        orca_attention_backend="sdpa",
        orca_target_layer_ids=[1, 3],
        llm_dtype="float32",
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["llm_config"]["model_type"] == "qwen3"  # nested, as the reference's configs are
    loaded = DeSTA25Config.from_pretrained(tmp_path)  # the ids are hub names: nothing is fetched
    for name in (*REFERENCE_DEFAULTS, "orca_target_layer_ids", "llm_dtype", "orca_attention_backend"):
        assert getattr(loaded, name) == getattr(config, name), name
    assert loaded.llm_config.to_dict() == config.llm_config.to_dict()
    assert loaded.encoder_config.num_hidden_layers == 4
    assert DeSTA25Config.from_pretrained(tmp_path, use_fused_orca=False).use_fused_orca is False


@pytest.mark.parametrize(
    "name, llm_id, tokens, placeholder",
    [
        ("orca_hybrid_llama3.1_8b.json", "DeSTA-ntu/Llama-3.1-8B-Instruct", 8, "<|reserved_special_token_87|>"),
        ("orca_hybrid_qwen3_0.6b.json", "Qwen/Qwen3-0.6B", 64, "<|video_pad|>"),
        ("orca_hybrid_qwen3_4b.json", "Qwen/Qwen3-4B", 64, "<|video_pad|>"),
    ],
)
def test_configs_directory_files_load_into_the_config(name, llm_id, tokens, placeholder):
    fields = json.loads((CONFIG_DIR / name).read_text())
    assert set(fields) <= set(inspect.signature(DeSTA25Config.__init__).parameters), "unknown field"
    # The sub-configs are passed in, as the hub is out of reach here; the large-v3 layer count
    # gives the reference's target layers.
    config = DeSTA25Config(**fields, llm_config=llm_config("qwen3"), encoder_config=whisper_config(encoder_layers=32))
    assert (config.llm_model_id, config.orca_global_num_tokens, config.placeholder_token) == (
        llm_id,
        tokens,
        placeholder,
    )
    assert config.connector_mode == "orca_hybrid" and config.is_orca
    assert (config.orca_local_downsample, config.orca_local_kernel_size, config.orca_audio_position_scale) == (
        4,
        5,
        2.5,
    )
    assert config.qformer_num_hidden_layers == 6 and config.orca_global_cross_attn
    assert (
        config.orca_ortho_diversity_weight
        == config.orca_ortho_weight_qformer_local
        == config.orca_align_weight_local
        == 0.05
    )
    assert config.target_layer_ids() == [7, 15, 23, 31]
    assert config.use_fused_orca is False and config.llm_dtype == "bfloat16"


NAN, INF = float("nan"), float("inf")
LOSS_WEIGHTS = (
    "orca_ortho_weight_global",
    "orca_ortho_diversity_weight",
    "orca_ortho_weight_qformer_local",
    "orca_align_weight_local",
)
# (field, bad value, error type, what the message must say besides the field's name)
BAD_FIELDS = [
    *[
        (name, value, ValueError, "an int >= 1")
        for name in (
            "orca_local_downsample",
            "orca_local_kernel_size",
            "orca_global_num_tokens",
            "qformer_num_hidden_layers",
        )
        for value in (0, -4)
    ],
    *[
        (name, value, TypeError, "an int >= 1")
        for name in ("orca_local_downsample", "orca_local_kernel_size", "orca_global_num_tokens")
        for value in (4.0, True, "4")
    ],
    ("connector_mode", "orca", ValueError, "one of 'qformer_1', 'orca_hybrid'"),
    ("connector_mode", None, ValueError, "one of 'qformer_1', 'orca_hybrid'"),
    *[("orca_audio_position_scale", value, ValueError, "finite and > 0") for value in (0.0, 0, -2.5, NAN, INF, -INF)],
    ("orca_audio_position_scale", "2.5", TypeError, "finite and > 0"),
    ("orca_audio_position_scale", True, TypeError, "finite and > 0"),
    *[(name, value, ValueError, "finite and >= 0") for name in LOSS_WEIGHTS for value in (-0.05, NAN, INF)],
    ("orca_align_weight_local", None, TypeError, "finite and >= 0"),
    ("orca_gate_init", NAN, ValueError, "finite"),
    ("orca_gate_init", INF, ValueError, "finite"),
    ("llm_dtype", "bf16", ValueError, "one of 'bfloat16', 'float16', 'float32', 'float64'"),
    ("llm_dtype", "int8", ValueError, "one of 'bfloat16', 'float16', 'float32', 'float64'"),
    ("orca_attention_backend", "cudnn", ValueError, "one of 'auto', 'sdpa', 'triton'"),
    ("orca_attention_backend", None, ValueError, "one of 'auto', 'sdpa', 'triton'"),
    ("encoder_dtype", "float64", ValueError, "one of 'float32', 'bfloat16', 'float16'"),
    ("use_fused_orca", 1, TypeError, "must be a bool, got int"),
    ("use_fused_orca", "true", TypeError, "must be a bool, got str"),
    ("use_fused_orca", None, TypeError, "must be a bool, got NoneType"),
    # tiny()'s encoder has 4 layers
    *[
        (
            "orca_target_layer_ids",
            value,
            ValueError,
            "a non-empty, sorted list of unique encoder layer indices in [0, 4)",
        )
        for value in ([3, 1], [1, 1], [0, 4], [-1, 2], [])
    ],
    *[
        ("orca_target_layer_ids", value, TypeError, "None or a list of ints")
        for value in ("1,3", 3, [1.0, 3.0], [True], [None])
    ],
]


def _bad_id(case) -> str:
    return f"{case[0]}={case[1]!r}"


@pytest.mark.parametrize("name, value, error, allowed", BAD_FIELDS, ids=[_bad_id(c) for c in BAD_FIELDS])
def test_bad_field_is_refused_at_construction(name, value, error, allowed):
    with pytest.raises(error, match=f"DeSTA25Config: {name} must be") as caught:
        tiny(**{name: value})
    assert allowed in str(caught.value)


@pytest.mark.parametrize("name, value, error, allowed", BAD_FIELDS[::5], ids=[_bad_id(c) for c in BAD_FIELDS[::5]])
def test_bad_field_is_refused_on_assignment(name, value, error, allowed):
    config = tiny()
    before = getattr(config, name)
    with pytest.raises(error, match=f"DeSTA25Config: {name} must be"):
        setattr(config, name, value)
    assert getattr(config, name) == before  # the bad value was not stored


def test_bad_field_is_refused_by_from_pretrained_and_from_dict(tmp_path):
    tiny(connector_mode="orca_hybrid").save_pretrained(tmp_path)
    # from_pretrained sets its keyword overrides after __init__
    with pytest.raises(ValueError, match="DeSTA25Config: orca_audio_position_scale must be finite and > 0"):
        DeSTA25Config.from_pretrained(tmp_path, orca_audio_position_scale=0.0)
    with pytest.raises(TypeError, match="DeSTA25Config: use_fused_orca must be a bool, got str"):
        DeSTA25Config.from_pretrained(tmp_path, use_fused_orca="yes")
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["orca_local_downsample"] = 0
    with pytest.raises(ValueError, match="DeSTA25Config: orca_local_downsample must be an int >= 1"):
        DeSTA25Config.from_dict(saved)
    (tmp_path / "config.json").write_text(json.dumps({**saved, "orca_local_downsample": 4, "llm_dtype": "bf16"}))
    with pytest.raises(ValueError, match="DeSTA25Config: llm_dtype must be one of"):
        DeSTA25Config.from_json_file(str(tmp_path / "config.json"))


def test_boundary_values_are_accepted():
    config = tiny(
        orca_local_downsample=1,
        orca_local_kernel_size=1,
        orca_global_num_tokens=1,
        orca_audio_position_scale=1,  # an int scale is a real number
        orca_gate_init=-3.0,
        **dict.fromkeys(LOSS_WEIGHTS, 0.0),  # a zero weight switches a loss off
        llm_dtype="float16",
        connector_mode="orca_hybrid",
        use_fused_orca=True,
    )
    assert config.orca_align_weight_local == 0.0 and config.use_fused_orca is True


@pytest.mark.parametrize(
    "name", ["orca_hybrid_llama3.1_8b.json", "orca_hybrid_qwen3_0.6b.json", "orca_hybrid_qwen3_4b.json"]
)
def test_configs_directory_files_pass_validation_and_round_trip(name, tmp_path):
    """Each committed config, with sub-configs passed in (no hub): construction, to_dict ->
    from_dict, save_pretrained -> from_pretrained and to_json_file -> from_json_file all keep
    every field."""
    fields = json.loads((CONFIG_DIR / name).read_text())
    config = DeSTA25Config(**fields, llm_config=llm_config("qwen3"), encoder_config=whisper_config(encoder_layers=32))
    copies = [DeSTA25Config.from_dict(config.to_dict())]
    config.save_pretrained(tmp_path)
    copies.append(DeSTA25Config.from_pretrained(tmp_path))
    config.to_json_file(tmp_path / "copy.json")
    copies.append(DeSTA25Config.from_json_file(str(tmp_path / "copy.json")))
    for copy in copies:
        for field, value in fields.items():
            assert getattr(copy, field) == value, (name, field)
        assert copy.to_dict() == config.to_dict()
        assert copy.target_layer_ids() == [7, 15, 23, 31]
