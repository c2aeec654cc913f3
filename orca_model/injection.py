"""Deep injection: a gated cross-attention after every decoder layer of a Hugging Face causal LM.

The reference replaces `layer.forward` on each decoder-layer instance with a closure that reads
the audio memory from attributes of the parent model. Here each layer gets a forward hook
instead, and the memory is held by an explicit `InjectionContext` that is set for the duration
of one LLM call (forward or generate) and cleared on the way out, also when the call raises.
The module tree is untouched, so the state-dict keys stay the reference's
(`llm_model.model.layers.{i}.…`, `orca_cross_attns.{i}.…`) and torch.compile traces the hooks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from orca_model.cross_attention import AudioMemoryCache, OrcaGatedCrossAttention


def decoder_layers(llm_model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM: `model.layers` (Llama, Qwen2, Qwen3, ...) or
    `transformer.h` (GPT-style), the two places the reference looks."""
    inner = getattr(llm_model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner.layers
    transformer = getattr(llm_model, "transformer", None)
    if transformer is not None and isinstance(getattr(transformer, "h", None), nn.ModuleList):
        return transformer.h
    raise ValueError(f"cannot find the decoder layers of {type(llm_model).__name__} (no model.layers or transformer.h)")


class InjectionContext:
    """The audio memory the injection hooks read during one LLM call.

    Attributes (None outside `active`):
        audio: [B, T_a, H] memory (local tokens, or global + local with `orca_global_cross_attn`).
        audio_mask: [B, T_a], True = attend (the reference's convention; always None there).
        transcription_positions: (batch, start, end) spans for the per-layer alignment loss.
        audio_cache: what the layers derive from the memory (rotated memory, pooled memory,
            per-layer K/V), computed by the first layer that needs it and reused by the others
            and, in generation, by every decode step: a new one per activation.
    """

    def __init__(self):
        self.audio: torch.Tensor | None = None
        self.audio_mask: torch.Tensor | None = None
        self.transcription_positions: Sequence[tuple[int, int, int]] | None = None
        self.audio_cache: AudioMemoryCache | None = None

    @contextmanager
    def active(
        self,
        audio: torch.Tensor | None,
        audio_mask: torch.Tensor | None = None,
        transcription_positions: Sequence[tuple[int, int, int]] | None = None,
    ) -> Iterator[None]:
        """Set the memory for the body of the `with` block; cleared afterwards, even on an error."""
        if self.audio is not None:
            raise RuntimeError("InjectionContext is already active: one LLM call at a time")
        self.audio, self.audio_mask, self.transcription_positions = audio, audio_mask, transcription_positions
        self.audio_cache = AudioMemoryCache()
        try:
            yield
        finally:
            self.audio = self.audio_mask = self.transcription_positions = self.audio_cache = None


class DeepInjection:
    """Forward hooks that apply `cross_attns[i]` to the output of `layers[i]`.

    A layer may return a tensor (transformers 5.x) or a tuple whose first element is the hidden
    state (4.x); the hook returns the same structure. Without an active memory the hooks leave
    the output untouched.
    """

    def __init__(self, layers: Sequence[nn.Module], cross_attns: Sequence[OrcaGatedCrossAttention]):
        if len(layers) != len(cross_attns):
            raise ValueError(
                f"DeepInjection: layers has {len(layers)} decoder layers but cross_attns has {len(cross_attns)} "
                "cross-attention modules; one module per layer"
            )
        self.context = InjectionContext()
        self.cross_attns = cross_attns
        self._handles = [
            layer.register_forward_hook(self._hook(xattn)) for layer, xattn in zip(layers, cross_attns, strict=True)
        ]

    def _hook(self, cross_attn: OrcaGatedCrossAttention):
        context = self.context

        def inject(module: nn.Module, args: tuple, output):
            if context.audio is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            if context.audio.size(0) != hidden.size(0):
                raise ValueError(
                    f"DeepInjection: the audio memory (InjectionContext.active(audio=...)) has batch size "
                    f"{context.audio.size(0)} but the decoder layer's "
                    f"hidden states have {hidden.size(0)}: one audio per sequence, expanded like the "
                    "inputs for beams or several returned sequences"
                )
            hidden = cross_attn(
                hidden,
                context.audio,
                audio_local_mask=context.audio_mask,
                transcription_positions=context.transcription_positions,
                audio_cache=context.audio_cache,
            )
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

        return inject

    def pop_layer_align_losses(self) -> list[torch.Tensor]:
        """The per-layer alignment losses set during the last forward (non-None only, in layer
        order), cleared on the modules, as the reference's `_collect_layer_align_losses`."""
        losses = []
        for cross_attn in self.cross_attns:
            if cross_attn.layer_align_loss is not None:
                losses.append(cross_attn.layer_align_loss)
                cross_attn.layer_align_loss = None
        return losses

    def remove(self) -> None:
        """Detach the hooks from the decoder layers."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
