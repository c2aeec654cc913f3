"""ORCAHybridConnector: Whisper layer outputs -> global tokens (Q-Former) and local tokens (Conv1d)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEncoder

import orca_kernels
from orca_model.config import DeSTA25Config
from orca_model.qformer import FUSED_KEYWORD, QFORMER_ATTENTION, projection_input


def qformer_config(config: DeSTA25Config) -> BertConfig:
    """The global branch's Q-Former config, as the reference builds it: BertConfig defaults
    (intermediate 3072, dropout 0.1, LayerNorm eps 1e-12, exact GELU) with the encoder's width
    and head count, `qformer_num_hidden_layers` layers, cross-attention on, eager attention (so
    `is_decoder=True` adds no causal mask when the encoder is called directly)."""
    qformer = BertConfig()
    qformer.num_hidden_layers = config.qformer_num_hidden_layers
    qformer.num_attention_heads = config.encoder_config.encoder_attention_heads
    qformer.hidden_size = config.encoder_config.d_model
    qformer.add_cross_attention = True
    qformer.is_decoder = True
    qformer._attn_implementation = "eager"
    return qformer


class ORCAHybridConnector(nn.Module):
    """The reference's ORCAHybridConnector (docs/ops.md#connector), parameter for parameter.

    Global branch: per target layer l, a learnable query set `global_queries[l]` [1, K, D] runs
    through one shared BertEncoder `global_qformer` over that layer's states [B, T, D]; the L
    results are mixed per token with softmax(`global_layer_weights` [K, L]) and projected by
    `global_proj` (LayerNorm(D), Linear(D -> H)) to global tokens [B, K, H]. The Q-Former's
    attention is BERT's eager attention; while `config.use_fused_orca` is set, it is
    non-causal F.scaled_dot_product_attention with the dropout inside the kernel, on the same
    BERT modules and parameters, and each layer's states are made contiguous once for all the
    K/V projections (orca_model/qformer.py).

    Local branch (when `orca_local_enabled`): softmax(`local_layer_weights` [L]) mixes the L
    layers, `local_proj_in` (Linear D -> H), `local_conv` (Conv1d(H, H, k, stride s, padding
    k//2)), `local_ln` (LayerNorm(H)) give local tokens [B, T_l, H], T_l = (T + 2·(k//2) − k)//s + 1.
    While `config.use_fused_orca` is set (read at every call, so flipping it takes effect at once)
    the branch runs through `orca_kernels.local_branch` on the channels-last activations, with the
    same parameters: the Linear is folded into the Conv1d when that takes fewer FLOPs (composed in
    the autograd graph in training, cached per weight version at inference; docs/ops.md).
    """

    def __init__(self, config: DeSTA25Config):
        super().__init__()
        self.config = config
        self.target_layer_ids = config.target_layer_ids()
        num_layers = len(self.target_layer_ids)
        d_encoder = config.encoder_config.d_model
        d_llm = config.llm_config.hidden_size
        num_tokens = config.orca_global_num_tokens

        # Created in the reference's order, so that one seed gives the reference's initial weights.
        self.global_queries = nn.ParameterList(
            [nn.Parameter(torch.randn(1, num_tokens, d_encoder)) for _ in range(num_layers)]
        )
        self.global_layer_weights = nn.Parameter(torch.zeros(num_tokens, num_layers, dtype=torch.float))
        qformer = qformer_config(config)
        # BERT's eager attention unless a call asks for the fused one (orca_model/qformer.py).
        qformer._attn_implementation = QFORMER_ATTENTION
        self.global_qformer = BertEncoder(qformer)
        self.global_proj = nn.Sequential(nn.LayerNorm(d_encoder), nn.Linear(d_encoder, d_llm))

        self.local_enabled = config.orca_local_enabled
        if self.local_enabled:
            kernel_size = config.orca_local_kernel_size
            self.local_layer_weights = nn.Parameter(torch.zeros(num_layers, dtype=torch.float))
            self.local_proj_in = nn.Linear(d_encoder, d_llm)
            self.local_conv = nn.Conv1d(
                d_llm, d_llm, kernel_size, stride=config.orca_local_downsample, padding=kernel_size // 2
            )
            self.local_ln = nn.LayerNorm(d_llm)
            # The folded Linear·Conv1d weight for inference (not a parameter: checkpoints stay the reference's).
            self._fold_cache = orca_kernels.FoldedWeightCache()

    def forward(self, encoder_hidden_states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """encoder_hidden_states: the output of every encoder layer, each [B, T, D] (the
        connector picks `target_layer_ids`). Returns (global_tokens [B, K, H], local_tokens
        [B, T_l, H] or None when the local branch is off), in the connector's dtype."""
        if len(encoder_hidden_states) <= self.target_layer_ids[-1]:
            raise ValueError(
                f"ORCAHybridConnector reads encoder layers {self.target_layer_ids} but got "
                f"{len(encoder_hidden_states)} layer outputs"
            )
        weight = self.global_proj[1].weight
        states = [encoder_hidden_states[i].to(dtype=weight.dtype, device=weight.device) for i in self.target_layer_ids]
        batch_size = states[0].size(0)

        fused = self.config.use_fused_orca
        # Fused: SDPA in every Q-Former attention, and each layer's states made contiguous (and
        # cast to the autocast dtype) once for its 2 x qformer_num_hidden_layers K/V projections.
        qformer_states = [projection_input(state) for state in states] if fused else states
        fused_call = {FUSED_KEYWORD: True} if fused else {}
        outputs = []
        for queries, state in zip(self.global_queries, qformer_states, strict=True):
            queries = queries.expand(batch_size, -1, -1).to(dtype=weight.dtype, device=weight.device)
            if fused:  # one copy for the first layer's Q, K and V projections (and its residual)
                queries = queries.contiguous()
            outputs.append(
                self.global_qformer(hidden_states=queries, encoder_hidden_states=state, **fused_call).last_hidden_state
            )
        stacked = torch.stack(outputs, dim=0).permute(1, 2, 0, 3)  # [B, K, L, D]
        mix = torch.softmax(self.global_layer_weights, dim=-1).unsqueeze(-1)  # [K, L, 1]
        global_tokens = self.global_proj((stacked * mix).sum(dim=2))

        if not self.local_enabled:
            return global_tokens, None
        if self.config.use_fused_orca:
            local_tokens = orca_kernels.local_branch(
                states,
                self.local_layer_weights,
                self.local_proj_in.weight,
                self.local_proj_in.bias,
                self.local_conv.weight,
                self.local_conv.bias,
                self.local_ln.weight,
                self.local_ln.bias,
                stride=self.local_conv.stride[0],
                padding=self.local_conv.padding[0],
                eps=self.local_ln.eps,
                cache=self._fold_cache,
            )
            return global_tokens, local_tokens
        layers = torch.stack(states, dim=0).permute(1, 2, 0, 3)  # [B, T, L, D]
        local_mix = torch.softmax(self.local_layer_weights, dim=-1).unsqueeze(-1)
        local_mix = local_mix.to(dtype=weight.dtype, device=weight.device)
        features = self.local_proj_in((layers * local_mix).sum(dim=2))  # [B, T, H]
        features = self.local_conv(features.transpose(1, 2)).transpose(1, 2)
        return global_tokens, self.local_ln(features)
