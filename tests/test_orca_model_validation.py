"""OrcaGatedCrossAttention refuses bad arguments and inputs with errors that name them, at
construction or at the top of forward, instead of a bare AssertionError, a reshape error or a
silent NaN."""

from __future__ import annotations

import re

import pytest
import torch

from orca_model import OrcaGatedCrossAttention
from tiny_models import llm_config, whisper_config

HIDDEN, HEADS = 16, 2


def test_heads_that_do_not_divide_the_hidden_size():
    with pytest.raises(ValueError, match=r"OrcaGatedCrossAttention: num_heads=3 must divide hidden_size=16"):
        OrcaGatedCrossAttention(16, 3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"hidden_size": 0}, ValueError, "hidden_size must be >= 1, got 0"),
        ({"hidden_size": 16.0}, TypeError, "hidden_size must be an int, got float"),
        ({"num_heads": 0}, ValueError, "num_heads must be >= 1, got 0"),
        ({"num_heads": True}, TypeError, "num_heads must be an int, got bool"),
        ({"audio_position_scale": 0}, ValueError, "audio_position_scale must be finite and > 0, got 0"),
        ({"audio_position_scale": -2.5}, ValueError, "audio_position_scale must be finite and > 0, got -2.5"),
        ({"audio_position_scale": float("nan")}, ValueError, "audio_position_scale must be finite and > 0, got nan"),
        ({"audio_position_scale": "2.5"}, TypeError, "audio_position_scale must be a real number"),
        ({"rope_theta": -1.0}, ValueError, "rope_theta must be finite and > 0, got -1.0"),
        ({"rope_theta": 0.0}, ValueError, "rope_theta must be finite and > 0, got 0.0"),
        ({"rope_theta": float("inf")}, ValueError, "rope_theta must be finite and > 0, got inf"),
        ({"gate_init": float("nan")}, ValueError, "gate_init must be finite, got nan"),
        ({"gate_init": None}, TypeError, "gate_init must be a real number, got NoneType"),
        ({"use_fused": 1}, TypeError, "use_fused must be a bool, got int"),
    ],
)
def test_bad_constructor_arguments_are_named(kwargs, error, match):
    arguments = {"hidden_size": HIDDEN, "num_heads": HEADS, **kwargs}
    with pytest.raises(error, match=f"^OrcaGatedCrossAttention: {match}"):
        OrcaGatedCrossAttention(**arguments)


def test_zero_position_scale_no_longer_gives_nan():
    """It used to build, and its forward returned NaN everywhere."""
    with pytest.raises(ValueError, match="audio_position_scale"):
        OrcaGatedCrossAttention(HIDDEN, HEADS, audio_position_scale=0)
    module = OrcaGatedCrossAttention(HIDDEN, HEADS, audio_position_scale=1e-3)
    assert module(torch.randn(2, 3, HIDDEN), torch.randn(2, 5, HIDDEN)).isfinite().all()


def test_a_model_config_with_a_zero_position_scale_is_refused():
    """A DeSTA25Config with orca_audio_position_scale = 0 used to train to a NaN loss."""
    from orca_model import DeSTA25Config

    with pytest.raises(ValueError, match="DeSTA25Config: orca_audio_position_scale must be finite and > 0"):
        DeSTA25Config(orca_audio_position_scale=0.0, llm_config=llm_config("qwen3"), encoder_config=whisper_config())


@pytest.fixture
def module():
    return OrcaGatedCrossAttention(HIDDEN, HEADS)


def test_batch_mismatch_names_both_batch_sizes(module):
    with pytest.raises(
        ValueError, match="hidden_states has batch size 7 but audio_local has batch size 8; they must match"
    ):
        module(torch.randn(7, 3, HIDDEN), torch.randn(8, 5, HIDDEN))
    with pytest.raises(ValueError, match="hidden_states has batch size 2 but audio_local has batch size 3"):
        module(torch.randn(2, 3, HIDDEN), torch.randn(3, 0, HIDDEN))  # even with an empty memory


@pytest.mark.parametrize(
    "hidden_shape, audio_shape, error, match",
    [
        ((3, HIDDEN), (2, 5, HIDDEN), ValueError, r"hidden_states must be \[B, T, H\] \(3 dimensions\), got shape"),
        ((2, 3, HIDDEN), (5, HIDDEN), ValueError, r"audio_local must be \[B, T, H\] \(3 dimensions\), got shape"),
        ((2, 3, 8), (2, 5, HIDDEN), ValueError, "hidden_states has hidden size 8 but the module has hidden_size=16"),
        ((2, 3, HIDDEN), (2, 5, 8), ValueError, "audio_local has hidden size 8 but the module has hidden_size=16"),
    ],
)
def test_bad_input_shapes_are_named(module, hidden_shape, audio_shape, error, match):
    with pytest.raises(error, match=f"^OrcaGatedCrossAttention: {match}"):
        module(torch.randn(hidden_shape), torch.randn(audio_shape))


def test_non_tensor_inputs_are_named(module):
    with pytest.raises(TypeError, match="OrcaGatedCrossAttention: hidden_states must be a torch.Tensor, got list"):
        module([[0.0]], torch.randn(2, 5, HIDDEN))
    with pytest.raises(TypeError, match="OrcaGatedCrossAttention: audio_local must be a torch.Tensor, got list"):
        module(torch.randn(2, 3, HIDDEN), [[0.0]])
    with pytest.raises(TypeError, match="OrcaGatedCrossAttention: audio_local_mask must be a torch.Tensor, got list"):
        module(torch.randn(2, 3, HIDDEN), torch.randn(2, 5, HIDDEN), [[True] * 5] * 2)


@pytest.mark.parametrize("mask_shape", [(2, 4), (3, 5), (5,), (2, 5, 1)])
@pytest.mark.parametrize("use_fused", [False, True])
def test_mask_shape_names_the_mask_and_the_expected_shape(mask_shape, use_fused):
    module = OrcaGatedCrossAttention(HIDDEN, HEADS, use_fused=use_fused)
    mask = torch.ones(mask_shape, dtype=torch.bool)
    expected = f"OrcaGatedCrossAttention: audio_local_mask has shape {tuple(mask_shape)} but expected [B, T_a] = (2, 5)"
    with pytest.raises(ValueError, match="^" + re.escape(expected)):
        module(torch.randn(2, 3, HIDDEN), torch.randn(2, 5, HIDDEN), mask)


def test_good_inputs_still_run(module):
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    out = module(torch.randn(2, 3, HIDDEN), torch.randn(2, 5, HIDDEN), mask)
    assert out.shape == (2, 3, HIDDEN) and out.isfinite().all()
    hidden = torch.randn(2, 3, HIDDEN)
    assert module(hidden, None) is hidden
