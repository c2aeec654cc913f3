"""compute_orca_losses against the reference's formulas, and `orca_losses` as a declared output
field: it survives a pytree round trip (DDP) and accelerate-style fp32 conversion, where the
reference's plain attribute is lost (docs/reference-behaviour.md#silent-orca-losses)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from orca_model import DeSTA25Config, DeSTA25Output, compute_orca_losses, total_training_loss
from tiny_models import llm_config, whisper_config


def make_config(**fields) -> DeSTA25Config:
    return DeSTA25Config(
        connector_mode="orca_hybrid",
        llm_config=llm_config("qwen3"),
        encoder_config=whisper_config(),
        orca_ortho_diversity_weight=0.3,
        orca_ortho_weight_qformer_local=0.7,
        orca_align_weight_local=0.11,
        **fields,
    )


def reference_losses(g, l, layer_losses, config):
    """The reference's compute_orca_losses, transcribed."""
    losses = {}
    gn = F.normalize(g, dim=-1)
    gram = torch.einsum("bkh,bqh->bkq", gn, gn)
    losses["L_ortho_diversity"] = config.orca_ortho_diversity_weight * ((gram - torch.eye(gram.size(-1))) ** 2).mean()
    ln = F.normalize(l, dim=-1)
    if ln.size(1) > 100:
        ln = ln[:, torch.linspace(0, ln.size(1) - 1, 100, dtype=torch.long), :]
    cross = torch.einsum("bgh,blh->bgl", gn, ln)
    losses["L_ortho_qformer_local"] = config.orca_ortho_weight_qformer_local * (cross**2).mean()
    if layer_losses:
        losses["L_align_layerwise"] = config.orca_align_weight_local * torch.stack(layer_losses).mean()
    return losses


@pytest.mark.parametrize("local_length", [7, 375])
def test_losses_are_the_reference(local_length):
    config = make_config()
    g, l = torch.randn(2, 5, 24), torch.randn(2, local_length, 24)
    layer_losses = [torch.rand(()), torch.rand(())]
    actual = compute_orca_losses(config, g, l, None, layer_losses)
    expected = reference_losses(g, l, layer_losses, config)
    assert list(actual) == ["L_ortho_diversity", "L_ortho_qformer_local", "L_align_layerwise"]
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_losses_present_only_with_their_inputs():
    config = make_config()
    g = torch.randn(2, 5, 24)
    assert list(compute_orca_losses(config, g, None, None, [])) == ["L_ortho_diversity"]
    assert compute_orca_losses(config, None, None, None, None) == {}
    assert list(compute_orca_losses(config, None, None, None, [torch.tensor(0.5)])) == ["L_align_layerwise"]


def test_fused_losses_match():
    g = torch.randn(2, 5, 24, requires_grad=True)
    l = torch.randn(2, 130, 24, requires_grad=True)
    unfused = compute_orca_losses(make_config(), g, l)
    fused = compute_orca_losses(make_config(use_fused_orca=True), g, l)
    assert fused.keys() == unfused.keys()
    for name in unfused:
        torch.testing.assert_close(fused[name], unfused[name], rtol=1e-5, atol=1e-7)
    expected = torch.autograd.grad(sum(unfused.values()), (g, l))
    actual = torch.autograd.grad(sum(fused.values()), (g, l))
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)
    only_global = compute_orca_losses(make_config(use_fused_orca=True), g, None)
    torch.testing.assert_close(only_global["L_ortho_diversity"], unfused["L_ortho_diversity"], rtol=1e-5, atol=1e-7)


def output_with_losses(dtype: torch.dtype = torch.bfloat16) -> DeSTA25Output:
    weight = torch.ones((), requires_grad=True)
    return DeSTA25Output(
        loss=(2.0 * weight).to(dtype),
        logits=torch.randn(2, 3, 5, dtype=dtype),
        orca_losses={"L_ortho_diversity": (0.25 * weight).to(dtype), "L_ortho_qformer_local": (0.5 * weight).to(dtype)},
        audio_global=torch.randn(2, 4, 8, dtype=dtype),
    )


def accelerate_convert_to_fp32(data):
    """What accelerate's `convert_outputs_to_fp32` (Trainer, bf16 mixed precision) does to an
    output: `recursively_apply` rebuilds every mapping as type(data)({k: ...}) and every
    tuple/list as its type, casting fp16/bf16 tensors to fp32."""
    if isinstance(data, Mapping):
        return type(data)({key: accelerate_convert_to_fp32(value) for key, value in data.items()})
    if isinstance(data, (tuple, list)):
        return type(data)(accelerate_convert_to_fp32(value) for value in data)
    if isinstance(data, torch.Tensor) and data.dtype in (torch.float16, torch.bfloat16):
        return data.float()
    return data


def test_losses_survive_accelerate_fp32_conversion():
    output = output_with_losses()
    output.reference_style_losses = dict(output.orca_losses)  # how the reference attaches them
    converted = accelerate_convert_to_fp32(output)
    assert isinstance(converted, DeSTA25Output)
    assert not hasattr(converted, "reference_style_losses")  # silent-orca-losses: a plain attribute is dropped
    assert converted.orca_losses.keys() == output.orca_losses.keys()
    assert all(v.dtype == torch.float32 and v.requires_grad for v in converted.orca_losses.values())
    assert converted.audio_global.dtype == torch.float32
    assert total_training_loss(converted).item() == pytest.approx(2.75)


def test_losses_survive_a_pytree_round_trip():
    output = output_with_losses(torch.float32)
    leaves, spec = pytree.tree_flatten(output)
    assert any(leaf is output.orca_losses["L_ortho_diversity"] for leaf in leaves)
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert isinstance(rebuilt, DeSTA25Output)
    assert rebuilt.orca_losses == output.orca_losses  # same tensor objects
    total_training_loss(rebuilt).backward()


def test_total_training_loss_is_lm_plus_weighted_losses_in_order():
    output = output_with_losses(torch.float32)
    assert torch.equal(
        total_training_loss(output),
        output.loss + output.orca_losses["L_ortho_diversity"] + output.orca_losses["L_ortho_qformer_local"],
    )
    with pytest.raises(ValueError, match="labels"):
        total_training_loss(DeSTA25Output(logits=torch.zeros(1)))
