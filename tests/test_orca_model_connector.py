"""ORCAHybridConnector: the reference's parameter names and shapes, its two branches written out
op by op, dtype handling, and the fused Conv1d path on the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.bert.modeling_bert import BertEncoder

from orca_kernels import reference
from orca_model import DeSTA25Config, ORCAHybridConnector
from orca_model.connector import qformer_config
from tiny_models import llm_config, whisper_config
from tolerances import MODULE_RELATIVE_TOLERANCE, assert_matches_truth

D, H, K, T = 32, 64, 3, 23  # encoder width, LLM width, global tokens, frames (odd: edge windows)


def make_config(**fields) -> DeSTA25Config:
    fields = {
        "connector_mode": "orca_hybrid",
        "orca_global_num_tokens": K,
        "qformer_num_hidden_layers": 2,
        "llm_config": llm_config("qwen3"),
        "encoder_config": whisper_config(),
        **fields,
    }
    return DeSTA25Config(**fields)


def encoder_states(batch: int = 2, layers: int = 4, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.randn(batch, T, D, dtype=dtype) for _ in range(layers)]


def test_parameter_names_and_shapes_are_the_reference():
    connector = ORCAHybridConnector(make_config())
    shapes = {name: tuple(p.shape) for name, p in connector.named_parameters()}
    expected = {
        **{f"global_queries.{i}": (1, K, D) for i in range(4)},
        "global_layer_weights": (K, 4),
        "global_proj.0.weight": (D,),
        "global_proj.0.bias": (D,),
        "global_proj.1.weight": (H, D),
        "global_proj.1.bias": (H,),
        "local_layer_weights": (4,),
        "local_proj_in.weight": (H, D),
        "local_proj_in.bias": (H,),
        "local_conv.weight": (H, H, 5),
        "local_conv.bias": (H,),
        "local_ln.weight": (H,),
        "local_ln.bias": (H,),
    }
    qformer = {
        f"global_qformer.{n}": tuple(p.shape) for n, p in BertEncoder(qformer_config(make_config())).named_parameters()
    }
    assert shapes == {**expected, **qformer}
    assert connector.target_layer_ids == [0, 1, 2, 3]
    assert isinstance(connector.local_conv, torch.nn.Conv1d)
    assert (connector.local_conv.stride, connector.local_conv.padding) == ((4,), (2,))
    assert torch.equal(connector.global_layer_weights, torch.zeros(K, 4))
    assert torch.equal(connector.local_layer_weights, torch.zeros(4))


def test_qformer_is_configured_as_the_reference():
    qformer = qformer_config(make_config())
    assert (qformer.num_hidden_layers, qformer.num_attention_heads, qformer.hidden_size) == (2, 2, D)
    assert qformer.add_cross_attention and qformer.is_decoder and qformer._attn_implementation == "eager"
    assert (qformer.intermediate_size, qformer.hidden_dropout_prob, qformer.layer_norm_eps) == (3072, 0.1, 1e-12)


def test_local_branch_disabled_has_no_local_parameters():
    connector = ORCAHybridConnector(make_config(orca_local_enabled=False))
    assert not any(name.startswith("local_") for name, _ in connector.named_parameters())
    global_tokens, local_tokens = connector(encoder_states())
    assert global_tokens.shape == (2, K, H) and local_tokens is None


@pytest.mark.parametrize("target_layers", [None, [1, 3]])
def test_forward_is_the_reference_computation(target_layers):
    connector = ORCAHybridConnector(make_config(orca_target_layer_ids=target_layers)).eval()
    with torch.no_grad():  # non-trivial layer weights, so the mixing is checked
        connector.global_layer_weights.normal_()
        connector.local_layer_weights.normal_()
    states = encoder_states()
    global_tokens, local_tokens = connector(states)

    chosen = [states[i] for i in connector.target_layer_ids]
    outputs = [
        connector.global_qformer(hidden_states=q.expand(2, -1, -1), encoder_hidden_states=s).last_hidden_state
        for q, s in zip(connector.global_queries, chosen, strict=True)
    ]
    mix = torch.softmax(connector.global_layer_weights, dim=-1)  # [K, L]
    mixed = sum(outputs[l] * mix[:, l, None] for l in range(len(chosen)))
    norm = connector.global_proj[0]
    expected_global = connector.global_proj[1](F.layer_norm(mixed, (D,), norm.weight, norm.bias))
    torch.testing.assert_close(global_tokens, expected_global, rtol=1e-5, atol=1e-6)

    expected_local = reference.local_branch(
        chosen,
        connector.local_layer_weights,
        connector.local_proj_in.weight,
        connector.local_proj_in.bias,
        connector.local_conv.weight,
        connector.local_conv.bias,
        connector.local_ln.weight,
        connector.local_ln.bias,
        stride=4,
    )
    assert torch.equal(local_tokens, expected_local)
    assert local_tokens.shape == (2, (T + 2 * 2 - 5) // 4 + 1, H)


def test_layer_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="reads encoder layers"):
        ORCAHybridConnector(make_config())(encoder_states(layers=3))


def test_bf16_connector_takes_fp32_states():
    connector = ORCAHybridConnector(make_config()).to(torch.bfloat16)
    global_tokens, local_tokens = connector(encoder_states())
    assert global_tokens.dtype == local_tokens.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_conv_path_matches_and_keeps_the_checkpoint_layout(dtype):
    """The fused connector loads the unfused one's checkpoint; its local tokens and conv weight
    gradient match an fp64 run of the same weights (the suite's relative tolerance: fp32 conv
    weight gradients sum B x T_out products, so two fp32 paths differ by their summation order).
    The global tokens match the fp64 truth on both paths (the fused Q-Former attends through SDPA).
    The loss is a random projection of the tokens: a sum of squares of LayerNorm outputs is
    nearly constant, and its gradient is mostly cancellation."""
    unfused = ORCAHybridConnector(make_config()).to(dtype).eval()
    fused = ORCAHybridConnector(make_config(use_fused_orca=True)).to(dtype).eval()
    fused.load_state_dict(unfused.state_dict())
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    truth_model = ORCAHybridConnector(make_config()).double().eval()
    truth_model.load_state_dict(unfused.state_dict())
    states = encoder_states(dtype=dtype)
    probe = torch.randn(2, (T + 2 * 2 - 5) // 4 + 1, H, dtype=torch.float64)
    results = []
    for connector, inputs in ((unfused, states), (fused, states), (truth_model, [s.double() for s in states])):
        connector.zero_grad()
        global_tokens, local_tokens = connector(inputs)
        (local_tokens * probe.to(local_tokens.dtype)).sum().backward()
        results.append((global_tokens.detach(), local_tokens.detach(), connector.local_conv.weight.grad.clone()))
    (unfused_global, _, _), (fused_global, fused_local, fused_grad), (truth_global, truth_local, truth_grad) = results
    # The fused Q-Former runs its attention on SDPA: the same math in another summation order.
    assert_matches_truth(fused_global, truth_global, tolerances=MODULE_RELATIVE_TOLERANCE, name="global tokens")
    assert_matches_truth(unfused_global, truth_global, tolerances=MODULE_RELATIVE_TOLERANCE, name="global tokens")
    assert_matches_truth(fused_local, truth_local, name="local tokens")
    assert_matches_truth(fused_grad, truth_grad, name="local_conv.weight gradient")


def test_fused_inference_folds_and_follows_weight_updates(monkeypatch):
    """At inference (no autograd) the fused connector folds the Linear into the Conv1d (it pays
    at these shapes), composes the folded weight once, and recomposes after an optimizer step:
    its local tokens track the unfused connector's through the update."""
    import orca_kernels.local_fold as local_fold

    calls = []
    real = local_fold.fold_projection
    monkeypatch.setattr(local_fold, "fold_projection", lambda *a: calls.append(1) or real(*a))
    unfused = ORCAHybridConnector(make_config()).double().eval()
    fused = ORCAHybridConnector(make_config(use_fused_orca=True)).double().eval()
    fused.load_state_dict(unfused.state_dict())
    states = [s.double() for s in encoder_states()]
    for step in range(2):
        with torch.no_grad():
            expected = unfused(states)[1]
            for _ in range(2):
                torch.testing.assert_close(fused(states)[1], expected, rtol=0, atol=1e-12)
        assert len(calls) == step + 1  # once per weight version
        for connector in (fused, unfused):  # the same SGD step on both
            connector.zero_grad()
            (connector(states)[1] ** 3).sum().backward()
            torch.optim.SGD(connector.parameters(), lr=0.1).step()
