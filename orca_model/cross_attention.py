"""The gated residual cross-attention injected after every LLM decoder layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import orca_kernels
from orca_kernels import reference
from orca_kernels.cross_attention import ATTENTION_BACKENDS
from orca_kernels.flash_attention import MAX_HEAD_DIM
from orca_kernels.validation import (
    check_backend,
    check_bool,
    check_finite_real,
    check_int,
    check_is_tensor,
    check_rank,
    check_rope_arguments,
)
from orca_model.config import DeSTA25Config
from orca_model.losses import layer_align_loss

MODULE = "OrcaGatedCrossAttention"


class AudioMemoryCache:
    """What every injection layer would otherwise recompute from the same audio memory: the
    rotated memory and its pooled, normalised mean (shared by all layers; kept per dtype, since
    under CUDA autocast the residual stream turns fp32 after the first layer,
    docs/reference-behaviour.md#residual-stream-turns-fp32-under-autocast), and each fused layer's
    packed K/V projection (per layer). During generation one cache serves every decode step of a
    request, so RoPE and the K/V GEMM run once per request instead of once per step and layer.

    The mask-derived tensors (the kernels' key padding mask and which rows have audio) are kept
    too, so that a decode step allocates nothing but its outputs and reads no value on the host:
    the per-token path of the injected layers is ready for CUDA-graph capture.

    Make a new cache for each audio memory (each forward in training, each request in generation):
    it is keyed by nothing but the layers that fill it. Compiled decoding
    (`orca_model.compiled_decode`) instead keeps one cache per batch bucket and refills it for each
    request with `refill`, so that its tensors keep their addresses (what a CUDA graph recorded).
    """

    def __init__(self) -> None:
        self.rotated: dict[torch.dtype, torch.Tensor] = {}
        self.pooled: dict[torch.dtype, torch.Tensor] = {}
        self.kv: dict[int, torch.Tensor] = {}
        # The rotated memory as the K/V GEMMs read it (cast once under autocast), per dtype.
        self.kv_input: dict[torch.dtype, torch.Tensor] = {}
        # (key_padding_mask [B, T_a] True = ignore, has_audio [B]) from the memory's keep-mask.
        self.masks: tuple[torch.Tensor, torch.Tensor] | None = None

    def refill(self, other: AudioMemoryCache) -> None:
        """Hold `other`'s values in this cache's own tensors, copied in place: an entry whose
        tensor has the same shape, dtype and device keeps its tensor (and address); a new entry
        (or one of another shape) gets a copy of its own, marked as a static address so that
        torch.compile's CUDA graphs read it where it is instead of copying it at every replay
        (as transformers' StaticCache marks its K/V). Entries that `other` lacks are dropped.
        The dicts change only when their keys do, so that a compiled graph's guards hold."""
        for name in ("rotated", "pooled", "kv", "kv_input"):
            mine, theirs = getattr(self, name), getattr(other, name)
            for key in [key for key in mine if key not in theirs]:
                del mine[key]
            for key, value in theirs.items():
                if key in mine and _same_layout(mine[key], value):
                    mine[key].copy_(value)
                else:
                    mine[key] = _static_copy(value)
        if other.masks is None:
            self.masks = None
        elif self.masks is not None and all(map(_same_layout, self.masks, other.masks)):
            for mine, theirs in zip(self.masks, other.masks, strict=True):
                mine.copy_(theirs)
        else:
            self.masks = tuple(_static_copy(value) for value in other.masks)


def _as_gemm_input(rotated: torch.Tensor) -> torch.Tensor:
    """The rotated memory as the K/V GEMM reads it: in an autocast region for its device, cast to
    the autocast dtype (the cast the GEMM would make), once for every layer. Under CUDA autocast the
    residual stream, hence the rotated memory, is fp32 after the first injected layer, and each
    layer's GEMM would otherwise cast it anew and keep its own copy for the backward."""
    device_type = rotated.device.type
    # (Not torch.amp.is_autocast_available: torch 2.11's dynamo cannot trace it. "meta", the one
    # device type here without autocast, is excluded by name.)
    if rotated.dtype != torch.float64 and device_type != "meta" and torch.is_autocast_enabled(device_type):
        return rotated.to(torch.get_autocast_dtype(device_type))
    return rotated


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def _static_copy(value: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `value` that torch.compile treats as a tensor at a fixed address."""
    copy = value.detach().clone(memory_format=torch.contiguous_format)
    torch._dynamo.mark_static_address(copy)
    return copy


class OrcaGatedCrossAttention(nn.Module):
    """h + σ(gate(h)) ⊙ LN(MHA(h, rope(a), rope(a))), the reference's ORCAGatedCrossAttention.

    Parameters and state-dict keys are the reference's (`cross_attn.in_proj_weight`,
    `cross_attn.in_proj_bias`, `cross_attn.out_proj.{weight,bias}`, `gate_proj.{0,2}.{weight,bias}`,
    `ln.{weight,bias}`), so checkpoints move both ways. In training mode `forward` sets
    `self.layer_align_loss` exactly as the reference does (None in eval mode).

    Args:
        hidden_size: H, the LLM width (also the RoPE width: the rotation spans all of H).
        num_heads: attention heads; head dim H / num_heads (not the LLM's own head dim).
        gate_init: bias of the gate's last Linear (its weight starts at zero).
        rope_theta: θ of the audio RoPE.
        audio_position_scale: audio token t sits at position t / scale.
        use_fused: run the fused kernels (`orca_kernels.project_audio_kv` / `attend_audio_kv`)
            where they can run (`orca_kernels.kernels_available`: CUDA, and the CPU under
            TRITON_INTERPRET=1); elsewhere the reference path. False always runs the reference
            path (the reference's own operations).
        attention_backend: the fused path's attention core, "auto" (by measurement on CUDA,
            docs/architecture.md#attention-dispatch), "sdpa" or "triton".
        config: the owning model's config (how `DeSTA25AudioModel` builds its modules). Then
            `config.use_fused_orca` and `config.orca_attention_backend`, read at every call,
            decide instead of `use_fused` and `attention_backend`, so that the model has one
            switch; pass one or the other.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        gate_init: float = 0.1,
        rope_theta: float = 10000.0,
        audio_position_scale: float = 2.5,
        use_fused: bool = False,
        *,
        attention_backend: str = "auto",
        config: DeSTA25Config | None = None,
    ):
        super().__init__()
        if config is not None and (use_fused or attention_backend != "auto"):
            raise ValueError(
                "OrcaGatedCrossAttention: pass use_fused / attention_backend or config, not both "
                "(with config, config.use_fused_orca and config.orca_attention_backend decide)"
            )
        check_backend(MODULE, attention_backend, ATTENTION_BACKENDS, "attention_backend")
        check_int(MODULE, "hidden_size", hidden_size, 1)
        check_int(MODULE, "num_heads", num_heads, 1)
        if hidden_size % num_heads:
            raise ValueError(
                f"{MODULE}: num_heads={num_heads} must divide hidden_size={hidden_size} "
                "(head dim = hidden_size / num_heads)"
            )
        check_finite_real(MODULE, "gate_init", gate_init)
        check_bool(MODULE, "use_fused", use_fused)
        # The one check of orca_kernels' RoPE arguments, under this module's argument names.
        check_rope_arguments(MODULE, audio_position_scale, rope_theta, scale_name="audio_position_scale")
        self.cross_attn = nn.MultiheadAttention(embed_dim=hidden_size, num_heads=num_heads, batch_first=True)
        gate = hidden_size // 4
        self.gate_proj = nn.Sequential(nn.Linear(hidden_size, gate), nn.GELU(), nn.Linear(gate, 1))
        nn.init.zeros_(self.gate_proj[-1].weight)
        nn.init.constant_(self.gate_proj[-1].bias, gate_init)
        self.ln = nn.LayerNorm(hidden_size)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.rope_theta = rope_theta
        self.audio_position_scale = audio_position_scale
        self.config = config
        self._use_fused = use_fused
        self._attention_backend = attention_backend
        self.layer_align_loss: torch.Tensor | None = None

    @property
    def use_fused(self) -> bool:
        """Whether `forward` takes the fused path where the kernels can run: `config.use_fused_orca`
        when built with a config, else the constructor's flag. Read-only: a model's modules follow
        its config (`DeSTA25AudioModel.set_use_fused_orca`)."""
        return self.config.use_fused_orca if self.config is not None else self._use_fused

    @property
    def attention_backend(self) -> str:
        """The fused path's attention core: `config.orca_attention_backend` when built with a
        config, else the constructor's."""
        return self.config.orca_attention_backend if self.config is not None else self._attention_backend

    def parameters_in_order(self) -> tuple[torch.Tensor, ...]:
        """The ten parameters in the order of `orca_kernels.gated_cross_attention`."""
        return (
            self.cross_attn.in_proj_weight,
            self.cross_attn.in_proj_bias,
            self.cross_attn.out_proj.weight,
            self.cross_attn.out_proj.bias,
            self.gate_proj[0].weight,
            self.gate_proj[0].bias,
            self.gate_proj[2].weight,
            self.gate_proj[2].bias,
            self.ln.weight,
            self.ln.bias,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        audio_local: torch.Tensor | None,
        audio_local_mask: torch.Tensor | None = None,
        transcription_positions: Sequence[tuple[int, int, int]] | None = None,
        audio_cache: AudioMemoryCache | None = None,
        audio_local_mask_marks_rows: bool = False,
    ) -> torch.Tensor:
        """hidden_states [B, T_x, H], audio_local [B, T_a, H] (None or T_a = 0: returned unchanged),
        audio_local_mask [B, T_a] (True = keep, the reference's convention; a row with no True is
        returned unchanged: it has no audio), transcription_positions a list of (row, start, end)
        spans for the alignment loss, audio_cache an `AudioMemoryCache` shared by the layers
        (optional). Returns [B, T_x, H].

        audio_local_mask_marks_rows: the caller knows that the mask only marks whole rows (all
        True or all False, as `inputs.memory_by_row` makes it, with zeros in the rows without
        audio). The fused path then runs the attention core without a mask (the unmasked, faster
        kernels), since those rows are returned unchanged anyway; nothing reads the mask's values
        on the host to find that out."""
        self._check_forward_inputs(hidden_states, audio_local, audio_local_mask)
        if audio_local is None or audio_local.shape[1] == 0:
            self.layer_align_loss = None
            return hidden_states
        fused_path = self._fused_path(hidden_states.device)
        cache = audio_cache if audio_cache is not None else AudioMemoryCache()
        dtype = hidden_states.dtype
        rotated, kv, masks = self._fill_audio_cache(
            audio_local, audio_local_mask, cache, dtype, hidden_states.device, fused_path
        )
        key_padding_mask, has_audio = masks if masks is not None else (None, None)
        parameters = self.parameters_in_order()
        if fused_path:
            out = orca_kernels.attend_audio_kv(
                hidden_states,
                kv,
                *parameters,
                self.num_heads,
                None if audio_local_mask_marks_rows else key_padding_mask,
                attention_backend=self.attention_backend,
            )
        else:
            out = reference.attend_rotated(hidden_states, rotated, *parameters, self.num_heads, key_padding_mask)
        if has_audio is not None:
            # A row whose memory is entirely masked has no audio: it is left as it is. (Its
            # attention is 0, but the LayerNorm and gate would still add their biases.)
            out = torch.where(has_audio[:, None, None], out, hidden_states)
        if self.training:
            self.layer_align_loss = layer_align_loss(
                hidden_states, cache.pooled[dtype], transcription_positions, has_audio
            )
        else:
            self.layer_align_loss = None
        return out

    def prepare_audio_cache(
        self,
        audio_local: torch.Tensor,
        audio_local_mask: torch.Tensor | None,
        cache: AudioMemoryCache,
        dtype: torch.dtype,
    ) -> None:
        """Fill `cache` with everything `forward` reads from it for hidden states of `dtype` on
        audio_local's device (the rotated memory, the masks, this layer's K/V on the fused path,
        the pooled memory in training), so that forward then computes nothing from the memory.
        Compiled decoding prepares each request's cache this way before generating."""
        self._check_forward_inputs(
            audio_local.new_empty(audio_local.size(0), 0, self.hidden_size, dtype=dtype), audio_local, audio_local_mask
        )
        if audio_local.shape[1] == 0:
            return
        device = audio_local.device
        self._fill_audio_cache(audio_local, audio_local_mask, cache, dtype, device, self._fused_path(device))

    def _fused_path(self, device: torch.device) -> bool:
        fused_path = self.use_fused and orca_kernels.kernels_available(device)
        head_dim = self.hidden_size // self.num_heads
        if fused_path and head_dim > MAX_HEAD_DIM:
            raise ValueError(
                f"{MODULE}: head dim {head_dim} (hidden_size / num_heads) > {MAX_HEAD_DIM} is not supported by the "
                "fused kernels; run the reference path (use_fused=False, or use_fused_orca=False in the config)"
            )
        return fused_path

    def _fill_audio_cache(
        self,
        audio_local: torch.Tensor,
        audio_local_mask: torch.Tensor | None,
        cache: AudioMemoryCache,
        dtype: torch.dtype,
        device: torch.device,
        fused_path: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """What forward derives from the memory, from `cache` where it is there, else computed and
        stored there: (rotated memory, this layer's packed K/V on the fused path else None,
        (key padding mask, has_audio) or None without a mask)."""
        if dtype not in cache.rotated:
            audio = audio_local.to(dtype=dtype, device=device)
            cache.rotated[dtype] = (
                orca_kernels.audio_rope(audio, self.audio_position_scale, self.rope_theta, backend="triton")
                if fused_path
                else reference.audio_rope(audio, self.audio_position_scale, self.rope_theta)
            )
        rotated = cache.rotated[dtype]
        masks = None
        if audio_local_mask is not None:
            if cache.masks is None:
                ignore = ~audio_local_mask.bool()
                cache.masks = (ignore, ~ignore.all(dim=1))
            masks = cache.masks
        kv = None
        if fused_path:
            if id(self) not in cache.kv:
                if dtype not in cache.kv_input:
                    cache.kv_input[dtype] = _as_gemm_input(rotated)
                cache.kv[id(self)] = orca_kernels.project_audio_kv(
                    cache.kv_input[dtype], self.cross_attn.in_proj_weight, self.cross_attn.in_proj_bias
                )
            kv = cache.kv[id(self)]
        if self.training and dtype not in cache.pooled:
            cache.pooled[dtype] = reference.pool_rotated_audio(rotated)
        return rotated, kv, masks

    def _check_forward_inputs(
        self, hidden_states: torch.Tensor, audio_local: torch.Tensor | None, audio_local_mask: torch.Tensor | None
    ) -> None:
        """Shapes that would otherwise fail deep inside MultiheadAttention (or the kernels) with an
        error that names neither tensor."""
        check_rank(MODULE, "hidden_states", hidden_states, 3, layout="[B, T, H]")
        if hidden_states.shape[2] != self.hidden_size:
            raise ValueError(
                f"{MODULE}: hidden_states has hidden size {hidden_states.shape[2]} but the module has "
                f"hidden_size={self.hidden_size}"
            )
        if audio_local is None:
            return
        check_rank(MODULE, "audio_local", audio_local, 3, layout="[B, T, H]")
        if audio_local.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"{MODULE}: hidden_states has batch size {hidden_states.shape[0]} but audio_local has batch size "
                f"{audio_local.shape[0]}; they must match (one audio memory per sequence)"
            )
        if audio_local.shape[2] != self.hidden_size:
            raise ValueError(
                f"{MODULE}: audio_local has hidden size {audio_local.shape[2]} but the module has "
                f"hidden_size={self.hidden_size}"
            )
        if audio_local_mask is None:
            return
        check_is_tensor(MODULE, "audio_local_mask", audio_local_mask)
        expected = (audio_local.shape[0], audio_local.shape[1])
        if tuple(audio_local_mask.shape) != expected:
            raise ValueError(
                f"{MODULE}: audio_local_mask has shape {tuple(audio_local_mask.shape)} but expected "
                f"[B, T_a] = {expected} (True = keep)"
            )
