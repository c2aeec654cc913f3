"""The LM loss of training without the [tokens, vocab] logits: a chunked linear cross-entropy.

Hugging Face's causal-LM loss (`ForCausalLMLoss`) projects every position onto the vocabulary and
then takes the cross-entropy in fp32. At Qwen3's vocabulary (151,936) and the reference's batch
(32 x 300 tokens) that is 2.9 GB of bf16 logits, a 5.8 GB fp32 copy, the 5.8 GB log-softmax saved
for backward and two 5.8 GB fp32 gradients in backward. `causal_lm_loss` computes the same loss
from the final hidden state and the LM head's weight:

- only the labelled positions are projected: HF's label shift (position t predicts label t + 1,
  the last position predicts nothing), `ignore_index` (-100) left out before any GEMM;
- the rows go through the LM head in chunks of `chunk_rows` (default: `CHUNK_ELEMENTS` logits
  per chunk, 220 rows at 151,936), and each chunk's gradient is computed right away, in the
  forward: what backward keeps is the gradient of the selected hidden rows [N, H] (plus the
  weight's gradient when the weight trains), never a [N, V] tensor;
- the numbers are HF's: the logits GEMM in the dtype `F.linear` would use (autocast's when it
  is on), the cross-entropy in fp32 from those logits, the mean over the labelled tokens, or
  the sum divided by `num_items_in_batch` when it is given (HF's gradient-accumulation
  normalisation).

Pure PyTorch (two GEMMs per chunk and fp32 elementwise work), so it runs wherever the model
runs: CUDA, the CPU, with or without Triton. `FusedLinearCrossEntropyLoss` is the module the model
calls (`DeSTA25AudioModel.lm_loss`), so a profiler or a FLOP counter can attribute its work;
`linear_cross_entropy_flops` is its count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # HF's and PyTorch's
# Logits per chunk: the transient memory of one chunk is about 8 bytes per logit (the GEMM's
# output in the compute dtype, its fp32 softmax, the gradient in the compute dtype): 268 MB.
CHUNK_ELEMENTS = 2**25


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk: CHUNK_ELEMENTS logits (220 rows at vocabulary 151,936)."""
    return max(1, CHUNK_ELEMENTS // max(vocab_size, 1))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of `F.linear(hidden, weight)`'s GEMM here: autocast's where it is on for the
    device, else the operands' (which must agree, as for F.linear)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise RuntimeError(
            f"linear_cross_entropy: hidden states ({hidden.dtype}) and LM head weight ({weight.dtype}) differ in "
            "dtype and autocast is off: run under torch.autocast or cast one of them"
        )
    return hidden.dtype


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight^T, target_i) / divisor, chunk by chunk; every target is a class
    (the ignored rows were dropped before). The gradients are computed in the forward and saved
    (hidden's in the compute dtype, weight's in fp32 then the weight's dtype); backward scales
    them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor, chunk_rows):
        dtype = _compute_dtype(hidden, weight)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = hidden.size(0)
        scale = 1.0 / divisor  # fp32, as in HF's backward (inf for a zero divisor, as there)
        grad_hidden = hidden.new_empty(hidden.shape, dtype=dtype) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # What autocast does for F.linear, once for all chunks.
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, rows, chunk_rows):
                h = hidden[start : start + chunk_rows].to(dtype)
                t = targets[start : start + chunk_rows]
                logits = (h @ w.t()).float()  # [C, V]: HF's `logits.float()`
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not (need_hidden or need_weight):
                    continue
                # d(sum CE / divisor) / d logits = (softmax - one_hot) / divisor, in fp32, then
                # cast to the GEMM's dtype (the backward of `.float()`).
                grad = logits.sub_(lse[:, None]).exp_()
                grad.scatter_add_(1, t[:, None], grad.new_full((t.numel(), 1), -1.0))
                grad = grad.mul_(scale).to(dtype)
                if need_hidden:
                    grad_hidden[start : start + chunk_rows] = grad @ w
                if need_weight:
                    grad_weight += (grad.t() @ h).float()
                del logits, grad
        ctx.hidden_dtype = hidden.dtype
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total / divisor

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(ctx.hidden_dtype) * grad_output
        if grad_weight is not None:
            grad_weight = grad_weight * grad_output
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    divisor: torch.Tensor | float,
    *,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """sum over rows of CE(hidden @ weight^T, targets) / divisor without the [N, V] logits.

    hidden [N, H], weight [V, H] (the LM head's), targets [N] class ids (none ignored),
    divisor a number or a 0-dim tensor (0 gives NaN for no rows, as 0 / 0). Returns an fp32 scalar."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.size(1) != weight.size(1):
        raise ValueError(
            f"linear_cross_entropy: hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: targets must be [{hidden.size(0)}], got {tuple(targets.shape)}")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.size(0))
    if chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be at least 1, got {chunk_rows}")
    # HF divides the fp32 loss by a Python number or a tensor: the same fp32 division either way.
    divisor = torch.as_tensor(divisor, dtype=torch.float32, device=hidden.device)
    return LinearCrossEntropy.apply(hidden, weight, targets, divisor, chunk_rows)


def causal_lm_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Hugging Face's causal-LM loss (`ForCausalLMLoss` on `lm_head(hidden_states)`) without the
    logits.

    hidden_states [B, T, H]: the LLM's final (normed) hidden state, what its LM head reads;
    weight [V, H]: the LM head's weight (no bias: Qwen3 and Llama have none), read here and not
    kept (under FSDP2, call this inside the forward of the unit that holds it, while it is
    gathered: `DeSTA25AudioModel.forward` does); labels [B, T] with
    `ignore_index` where no loss is taken, shifted here as HF shifts them (position t predicts
    labels[:, t + 1]). Returns the fp32 mean over the labelled tokens, or their sum divided by
    `num_items_in_batch` when it is given; no labelled token gives NaN for the mean, as HF does.
    """
    if hidden_states.dim() != 3 or labels.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"causal_lm_loss: hidden_states must be [B, T, H] and labels [B, T], got {tuple(hidden_states.shape)} "
            f"and {tuple(labels.shape)}"
        )
    shift_labels = F.pad(labels, (0, 1), value=ignore_index)[:, 1:].reshape(-1).to(hidden_states.device)
    rows = (shift_labels != ignore_index).nonzero().squeeze(1)
    hidden = hidden_states.reshape(-1, hidden_states.size(-1)).index_select(0, rows)
    divisor = rows.numel() if num_items_in_batch is None else num_items_in_batch
    return linear_cross_entropy(hidden, weight, shift_labels.index_select(0, rows), divisor, chunk_rows=chunk_rows)


class FusedLinearCrossEntropyLoss(nn.Module):
    """`causal_lm_loss` as a module (no parameters): what `DeSTA25AudioModel` calls for its LM loss
    in training with `use_fused_orca`, so that hooks (the profiler's groups, a FLOP counter) see
    the LM head's work under this name. `chunk_rows`: rows per chunk, None for the default."""

    def __init__(self, chunk_rows: int | None = None):
        super().__init__()
        self.chunk_rows = chunk_rows

    def forward(
        self,
        hidden_states: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        return causal_lm_loss(
            hidden_states, weight, labels, num_items_in_batch=num_items_in_batch, chunk_rows=self.chunk_rows
        )

    def extra_repr(self) -> str:
        return f"chunk_rows={self.chunk_rows}"


def linear_cross_entropy_flops(labelled_tokens: int, hidden_size: int, vocab_size: int, weight_grad: bool = False):
    """GEMM FLOPs of one training step of the fused loss (forward and backward together, all in
    the forward): the logits (2·N·H·V) and the hidden rows' gradient (2·N·H·V), plus the weight's
    gradient (2·N·H·V) when the weight trains; N = labelled tokens after the shift. HF's path
    does the same GEMMs over every position (B·T rows instead of N)."""
    return 2 * labelled_tokens * hidden_size * vocab_size * (3 if weight_grad else 2)
