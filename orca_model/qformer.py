"""The Q-Former's attention (the global branch's BertEncoder, docs/ops.md#fused-q-former-attention).

The connector's BertEncoder runs BERT's own layers; only the attention computation is ours. Its
config names `QFORMER_ATTENTION`, an attention function registered with transformers'
`AttentionInterface`, which every BertSelfAttention / BertCrossAttention calls with its
projected q, k, v (`[B, heads, S, head_dim]`) and the dropout probability that BERT picks
(`attention_probs_dropout_prob` in training, 0 in eval):

- by default it is BERT's `eager_attention_forward`, the reference's computation op for op;
- when the call passes `orca_fused_attention=True` (the connector does under
  `config.use_fused_orca`, read at every call), it is `F.scaled_dot_product_attention`,
  non-causal, with the dropout inside the kernel: no softmax, probabilities or dropout mask are
  kept for the backward where SDPA has a fused kernel for the call (CUDA flash / memory-efficient
  attention; on the CPU with dropout on, SDPA itself falls back to its math kernel).

Why not `attn_implementation="sdpa"`: the Q-Former is configured `is_decoder=True` (it has
cross-attention), so BertLayer builds its self-attention with `is_causal=True`, and transformers'
`sdpa_attention_forward` applies a causal mask whenever no mask is given. The eager function
ignores `is_causal`, which is why the reference's self-attention over the queries is
bidirectional; this function never reads it either.

Passing the switch as a call keyword (it reaches the attention function through BertEncoder,
BertLayer and BertAttention's `**kwargs`, in transformers 5.17 and 5.25 alike) keeps BERT's
module calls as they are: module hooks, gradient checkpointing and per-layer FSDP wrapping see
the same calls in both paths, and the parameters and state dict are BERT's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.models.bert.modeling_bert import eager_attention_forward

# The attention implementation the connector's Q-Former config names, and the call keyword that
# selects the fused path.
QFORMER_ATTENTION = "orca_qformer"
FUSED_KEYWORD = "orca_fused_attention"


def qformer_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """BERT's attention for one Q-Former attention module. query [B, heads, Q, d], key and value
    [B, heads, S, d] (S = Q for the self-attention, T encoder frames for the cross-attention),
    an additive or boolean `attention_mask` (None in the connector). Returns (context
    [B, Q, heads, d], the probabilities or None), the attention-interface contract.

    `orca_fused_attention=True`: F.scaled_dot_product_attention, non-causal whatever the module's
    `is_causal` says, `dropout_p=dropout` (BERT passes 0 in eval) applied inside the kernel, the
    module's scaling. Otherwise BERT's eager attention, the reference."""
    fused = kwargs.pop(FUSED_KEYWORD, False)
    kwargs.pop("is_causal", None)  # never causal: the reference's eager attention ignores it
    if not fused:
        return eager_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    context = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=False, scale=scaling
    )
    # [B, heads, Q, d] -> [B, Q, heads, d]: BERT reshapes it to [B, Q, D] (a view where the kernel
    # wrote the context query-major, as SDPA's fused kernels do).
    return context.transpose(1, 2), None


AttentionInterface.register(QFORMER_ATTENTION, qformer_attention)


def projection_input(states: torch.Tensor) -> torch.Tensor:
    """Encoder states [B, T, D] as the Q-Former's K/V projections read them, prepared once for
    all of them: contiguous, and in the autocast dtype where an active autocast region would cast
    them for a Linear (a floating non-fp64 tensor on a device with autocast enabled). Whisper's
    states are stored [B, D, T] (the stem's permute carries through every layer), so each
    Linear would otherwise copy (and, under autocast, cast) its input to fold it into one GEMM,
    and autograd would keep one copy per K/V projection; this is one copy, or none where the
    states are already contiguous in that dtype (the same tensor is returned). The values are
    what each Linear would have computed on: a cast to the autocast dtype is the one autocast
    does, and a layout change changes no value."""
    dtype = states.dtype
    device_type = states.device.type
    # (Not torch.amp.is_autocast_available: torch 2.11's dynamo cannot trace it.)
    if (
        states.is_floating_point()
        and dtype != torch.float64
        and device_type != "meta"
        and torch.is_autocast_enabled(device_type)
    ):
        dtype = torch.get_autocast_dtype(device_type)
    if dtype == states.dtype:
        # (Not `.to(memory_format=torch.contiguous_format)`: for a 3-D tensor of the same dtype
        # that returns the strided tensor itself.)
        return states.contiguous()
    return states.to(dtype=dtype, memory_format=torch.contiguous_format)  # one copy: cast and layout
