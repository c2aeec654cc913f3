"""The connector's local branch, with the Linear folded into the strided Conv1d.

The branch is mix -> Linear(D -> H) -> Conv1d(H, H_out, k, stride s, padding p) -> LayerNorm.
Nothing between the Linear and the Conv1d is nonlinear, so the two compose into one Conv1d over
the mixed encoder states:

    conv(Linear(m))[t, o] = b_conv[o] + sum_j sum_c W'[o, c, j] * m[s*t + j - p, c]
                                      + sum_j [frame s*t + j - p is inside the input] * beta[o, j]
    W'[o, c, j] = sum_h W_conv[o, h, j] * W_lin[h, c],   beta[o, j] = sum_h W_conv[o, h, j] * b_lin[h]

The bias term depends on the row: the Conv1d zero-pads the Linear's *output*, so a window that
reaches past either end of the input misses the Linear's bias for those frames. Rather than
correct the edge rows afterwards, the folded conv reads the states with one extra channel that is
1 on every frame: the conv's own zero padding then pads it with 0 exactly where the unfolded
branch pads the Linear's output, and W'[:, D, :] = beta supplies the bias on the frames that
exist. The channel count is rounded up to a multiple of 8 (zero channels) so that each frame's
row is 16-byte aligned for the GEMMs of the compiled kernel.

Cost: composing W' takes 2·k·H·H_out·C FLOPs (C = D + 1 rounded up to 8); the folded conv takes
2·B·T_out·k·C·H_out instead of the Linear's 2·B·T·D·H plus the conv's 2·B·T_out·k·H·H_out.
`fold_pays` compares the two (training counts the backward, three times each; inference with a
cached W' counts no composition) and `local_branch(fold="auto")` folds when it pays. See
docs/ops.md#local-branch-fold.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from orca_kernels.reference import LAYER_NORM_EPS
from orca_kernels.strided_conv import strided_conv1d
from orca_kernels.validation import check_backend, check_bool, check_int, check_tensor

OP = "local_branch"
FOLD_MODES = ("auto", "always", "never")
CHANNEL_ALIGNMENT = 8  # elements: 16 bytes of bf16/fp16, so every frame row starts aligned


def folded_channels(encoder_width: int) -> int:
    """Input channels of the folded conv: the D encoder channels, the bias channel, zero padding."""
    return -(-(encoder_width + 1) // CHANNEL_ALIGNMENT) * CHANNEL_ALIGNMENT


def _check_projection(op: str, proj_weight, proj_bias) -> None:
    """The Linear's weight [H, D] and bias [H] (or None)."""
    check_tensor(op, "proj_weight", proj_weight, 2)
    if proj_bias is not None:
        check_tensor(op, "proj_bias", proj_bias, 1, like=proj_weight)
        if proj_bias.shape[0] != proj_weight.shape[0]:
            raise ValueError(
                f"{op}: proj_bias has {proj_bias.shape[0]} elements but proj_weight has {proj_weight.shape[0]} rows"
            )


def fold_projection(
    proj_weight: torch.Tensor, proj_bias: torch.Tensor | None, conv_weight: torch.Tensor
) -> torch.Tensor:
    """W' [H_out, C, k] of the folded conv from the Linear's weight [H, D] and bias [H] (or None)
    and the Conv1d's weight [H_out, H, k]: channels [0, D) are W_conv·W_lin, channel D is
    W_conv·b_lin (the bias channel), the rest are zero. Differentiable in all three inputs."""
    _check_projection("fold_projection", proj_weight, proj_bias)
    check_tensor("fold_projection", "conv_weight", conv_weight, 3, like=proj_weight)
    hidden, width = proj_weight.shape
    if conv_weight.shape[1] != hidden:
        raise ValueError(
            f"fold_projection: conv_weight has {conv_weight.shape[1]} input channels but proj_weight has "
            f"{hidden} output features (proj_weight is [H, D], conv_weight [H_out, H, k])"
        )
    bias_column = proj_bias.unsqueeze(1) if proj_bias is not None else proj_weight.new_zeros(hidden, 1)
    padding = proj_weight.new_zeros(hidden, folded_channels(width) - width - 1)
    projection = torch.cat([proj_weight, bias_column, padding], dim=1)  # [H, C]
    out_channels, _, kernel_size = conv_weight.shape
    taps = conv_weight.permute(0, 2, 1).reshape(out_channels * kernel_size, hidden)  # [H_out*k, H]
    return (taps @ projection).view(out_channels, kernel_size, -1).permute(0, 2, 1)  # [H_out, C, k]


def with_bias_channel(states: torch.Tensor) -> torch.Tensor:
    """[B, T, D] -> [B, T, C]: the states, a channel of ones, zero channels up to C."""
    batch, frames, width = states.shape
    tail = states.new_zeros(folded_channels(width) - width)
    tail[0] = 1
    return torch.cat([states, tail.expand(batch, frames, -1)], dim=-1)


def fold_pays(
    batch: int,
    frames: int,
    encoder_width: int,
    hidden: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
    padding: int,
    *,
    training: bool,
) -> bool:
    """Whether the folded branch takes fewer GEMM FLOPs than the Linear followed by the Conv1d.

    Training composes W' every step and runs the backward of every GEMM (twice the forward), so
    both sides count three times, the composition included; inference reuses a cached W' and
    counts the folded conv alone."""
    for name, value, minimum in (
        ("batch", batch, 0),
        ("frames", frames, 0),
        ("encoder_width", encoder_width, 1),
        ("hidden", hidden, 1),
        ("out_channels", out_channels, 1),
        ("kernel_size", kernel_size, 1),
        ("stride", stride, 1),
        ("padding", padding, 0),
    ):
        check_int("fold_pays", name, value, minimum)
    check_bool("fold_pays", "training", training)
    length_out = max(0, (frames + 2 * padding - kernel_size) // stride + 1)
    channels = folded_channels(encoder_width)
    unfolded = batch * frames * encoder_width * hidden + batch * length_out * kernel_size * hidden * out_channels
    folded = batch * length_out * kernel_size * channels * out_channels
    if training:
        folded += kernel_size * hidden * channels * out_channels
    return folded < unfolded


class FoldedWeightCache:
    """The folded weight W' of one module, composed once per version of its source tensors.

    A hit needs the very same tensor objects (the entry holds them, so none can be freed and its
    address reused) at the same in-place version counters: an optimizer step, `load_state_dict`
    or any in-place write invalidates it, and so does replacing a parameter. One lock covers the
    lookup and the composition, so concurrent requests compose once. During CUDA-graph capture a
    miss composes into the graph's pool and stores nothing (a replay must not hand the tensor out).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: tuple[torch.Tensor | None, ...] = ()
        self._versions: tuple[int, ...] = ()
        self._folded: torch.Tensor | None = None

    def get(self, proj_weight: torch.Tensor, proj_bias: torch.Tensor | None, conv_weight: torch.Tensor) -> torch.Tensor:
        sources = (proj_weight, proj_bias, conv_weight)
        versions = tuple(t._version if t is not None else -1 for t in sources)
        with self._lock:
            same = len(self._sources) == 3 and all(a is b for a, b in zip(self._sources, sources, strict=True))
            if same and self._versions == versions and self._folded is not None:
                return self._folded
            # In the parameters' dtype whatever autocast region the first call ran in: the conv
            # casts it for its own autocast region, so one cached weight serves both.
            with torch.no_grad(), torch.autocast(proj_weight.device.type, enabled=False):
                folded = fold_projection(proj_weight, proj_bias, conv_weight)
            capturing = proj_weight.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
            if not capturing:
                self._sources, self._versions, self._folded = sources, versions, folded
            return folded

    def __getstate__(self) -> dict:  # copies and pickles (deepcopy of a model) start empty
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def clear(self) -> None:
        with self._lock:
            self._sources, self._versions, self._folded = (), (), None


def local_branch(
    target_layer_states: Sequence[torch.Tensor],
    layer_weights: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    stride: int = 4,
    padding: int | None = None,
    eps: float = LAYER_NORM_EPS,
    *,
    fold: str = "auto",
    cache: FoldedWeightCache | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Local tokens [B, T_out, H_out] from the L encoder states [B, T, D] (cast to the Linear's
    dtype): softmax(layer_weights [L]) mix -> Linear(proj_weight [H, D], proj_bias [H]) ->
    Conv1d(conv_weight [H_out, H, k], conv_bias, stride, padding, default k//2) -> LayerNorm(eps).

    fold: "auto" folds the Linear into the conv when `fold_pays` says so, "always"/"never" force
    it. When folding without autograd (inference), `cache` (a FoldedWeightCache) keeps W' across
    calls; with autograd W' is composed in the graph, so the Linear's and the conv's weights get
    their gradients through it. The conv runs through `strided_conv1d(backend=backend)`.
    """
    check_backend(OP, backend, ("auto", "extension", "cuda", "torch"))
    if fold not in FOLD_MODES:
        raise ValueError(f"{OP}: fold must be one of {FOLD_MODES}, got {fold!r}")
    if not isinstance(target_layer_states, Sequence) or len(target_layer_states) == 0:
        raise ValueError(f"{OP}: target_layer_states must be a non-empty sequence of [B, T, D] tensors")
    _check_projection(OP, proj_weight, proj_bias)
    for i, state in enumerate(target_layer_states):
        check_tensor(OP, f"target_layer_states[{i}]", state, 3)
        if state.shape != target_layer_states[0].shape or state.shape[2] != proj_weight.shape[1]:
            raise ValueError(
                f"{OP}: target_layer_states[{i}] has shape {tuple(state.shape)}; every state must be "
                f"[B, T, {proj_weight.shape[1]}] like target_layer_states[0] {tuple(target_layer_states[0].shape)}"
            )
    check_tensor(OP, "layer_weights", layer_weights, 1)
    if layer_weights.shape[0] != len(target_layer_states):
        raise ValueError(
            f"{OP}: layer_weights has {layer_weights.shape[0]} entries for {len(target_layer_states)} target layers"
        )
    check_tensor(OP, "conv_weight", conv_weight, 3, like=proj_weight)
    if conv_weight.shape[1] != proj_weight.shape[0]:
        raise ValueError(
            f"{OP}: conv_weight has {conv_weight.shape[1]} input channels but the Linear gives {proj_weight.shape[0]}"
        )
    kernel_size = conv_weight.shape[2]
    padding = kernel_size // 2 if padding is None else padding
    check_int(OP, "stride", stride, 1)
    check_int(OP, "padding", padding, 0)

    dtype = proj_weight.dtype
    stacked = torch.stack([s.to(dtype) for s in target_layer_states], dim=0).permute(1, 2, 0, 3)  # [B, T, L, D]
    mixed = (stacked * torch.softmax(layer_weights, dim=-1).unsqueeze(-1).to(dtype)).sum(dim=2)  # [B, T, D]
    batch, frames, width = mixed.shape
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (proj_weight, proj_bias, conv_weight)
    )
    use_fold = fold == "always" or (
        fold == "auto"
        and frames + 2 * padding >= kernel_size
        and fold_pays(
            batch,
            frames,
            width,
            proj_weight.shape[0],
            conv_weight.shape[0],
            kernel_size,
            stride,
            padding,
            training=training,
        )
    )
    if use_fold:
        if training or cache is None:
            folded = fold_projection(proj_weight, proj_bias, conv_weight)
        else:
            folded = cache.get(proj_weight, proj_bias, conv_weight)
        features = strided_conv1d(with_bias_channel(mixed), folded, conv_bias, stride, padding, backend=backend)
    else:
        features = F.linear(mixed, proj_weight, proj_bias)
        features = strided_conv1d(features, conv_weight, conv_bias, stride, padding, backend=backend)
    return F.layer_norm(features, (features.shape[-1],), ln_weight, ln_bias, eps)
