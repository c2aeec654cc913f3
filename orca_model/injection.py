"""Deep injection: a gated cross-attention after every decoder layer of a Hugging Face causal LM.

The reference replaces `layer.forward` on each decoder-layer instance with a closure that reads
the audio memory from attributes of the parent model. Here each layer gets a forward hook
instead, and the memory is held by an explicit `InjectionContext` that is set for the duration
of one LLM call (forward or generate) and cleared on the way out, also when the call raises.
The module tree is untouched, so the state-dict keys stay the reference's
(`llm_model.model.layers.{i}.…`, `orca_cross_attns.{i}.…`) and torch.compile traces the hooks.

Gradient checkpointing of the LLM: the injection always runs outside the checkpointed region, once
per layer call, while the memory is active. Whether a decoder layer's forward hooks fall inside
Hugging Face's checkpoint depends on the transformers version (5.17 checkpoints `Module.__call__`,
hooks included; 5.24 checkpoints `forward` only). Inside, the recomputation in the backward pass
would run after the memory is cleared and skip the injection (the reference's bug), so
`DeepInjection.keep_outside_checkpoints` wraps each layer's checkpoint function: the hook stands
down inside it and the wrapper applies the cross-attention to the checkpoint's output instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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
        audio_mask_marks_rows: whether audio_mask only marks whole rows (False outside `active`).
        transcription_positions: (batch, start, end) spans for the per-layer alignment loss.
        audio_cache: what the layers derive from the memory (rotated memory, pooled memory,
            per-layer K/V), computed by the first layer that needs it and reused by the others
            and, in generation, by every decode step: a new one per activation, unless the
            caller passes one it prepared (compiled decoding).
    """

    def __init__(self):
        self.audio: torch.Tensor | None = None
        self.audio_mask: torch.Tensor | None = None
        self.transcription_positions: Sequence[tuple[int, int, int]] | None = None
        self.audio_cache: AudioMemoryCache | None = None
        self.audio_mask_marks_rows = False
        # Set while a checkpointed decoder layer runs: its hook defers the injection to the
        # checkpoint wrapper (`_CheckpointOutsideInjection`) and records that it did.
        self.deferred: _DeferredInjection | None = None

    @contextmanager
    def active(
        self,
        audio: torch.Tensor | None,
        audio_mask: torch.Tensor | None = None,
        transcription_positions: Sequence[tuple[int, int, int]] | None = None,
        audio_mask_marks_rows: bool = False,
        audio_cache: AudioMemoryCache | None = None,
    ) -> Iterator[None]:
        """Set the memory for the body of the `with` block; cleared afterwards, even on an error.
        audio_mask_marks_rows: the mask only marks whole rows (`inputs.memory_by_row`), see
        `OrcaGatedCrossAttention.forward`. audio_cache: the cache the layers share, already
        prepared for this memory (compiled decoding's, refilled in place for each request);
        default a new, empty one."""
        if self.audio is not None:
            raise RuntimeError("InjectionContext is already active: one LLM call at a time")
        self.audio, self.audio_mask, self.transcription_positions = audio, audio_mask, transcription_positions
        self.audio_mask_marks_rows = audio_mask_marks_rows
        self.audio_cache = audio_cache if audio_cache is not None else AudioMemoryCache()
        try:
            yield
        finally:
            self.audio = self.audio_mask = self.transcription_positions = self.audio_cache = None
            self.audio_mask_marks_rows = False


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
        self.layers = layers
        self.cross_attns = cross_attns
        # Hooks and checkpoint wrappers are objects holding this injection and their module, not
        # closures: a deepcopy of the model then copies them pointing at the copy.
        self._handles = [
            layer.register_forward_hook(_InjectionHook(self, xattn))
            for layer, xattn in zip(layers, cross_attns, strict=True)
        ]

    def _apply(self, cross_attn: OrcaGatedCrossAttention, output):
        """cross_attn on a decoder layer's output (a tensor, or a tuple led by the hidden state)."""
        context = self.context
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
            audio_local_mask_marks_rows=context.audio_mask_marks_rows,
        )
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    def keep_outside_checkpoints(self) -> None:
        """Wrap the checkpoint function of every decoder layer that has one (Hugging Face sets
        `_gradient_checkpointing_func` when checkpointing is enabled) so that the injection runs
        outside the checkpoint: see the module docstring. Idempotent; a function set later (by
        enabling checkpointing again) is wrapped by the next call."""
        for layer, cross_attn in zip(self.layers, self.cross_attns, strict=True):
            checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
            if checkpoint is not None and not isinstance(checkpoint, _CheckpointOutsideInjection):
                layer._gradient_checkpointing_func = _CheckpointOutsideInjection(checkpoint, self, cross_attn)

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


class _InjectionHook:
    """The forward hook of one decoder layer: `cross_attn` on its output while the memory is
    active, unless the layer runs inside a checkpoint (then the wrapper injects, see
    `_CheckpointOutsideInjection`)."""

    def __init__(self, injection: DeepInjection, cross_attn: OrcaGatedCrossAttention):
        self.injection = injection
        self.cross_attn = cross_attn

    def __call__(self, module: nn.Module, args: tuple, output):
        context = self.injection.context
        if context.audio is None:
            return None
        if context.deferred is not None:
            context.deferred.skipped = True
            return None
        return self.injection._apply(self.cross_attn, output)


class _DeferredInjection:
    """One checkpointed layer call: whether its hook stood down (the memory was active)."""

    def __init__(self):
        self.skipped = False


class _CheckpointOutsideInjection:
    """A decoder layer's checkpoint function with the injection moved after it.

    Calls `checkpoint(function, *args)` with the layer's hooks told to stand down during every run
    of `function` (the forward and, later, the backward's recomputation), then applies the
    cross-attention to the output if the hook stood down in the forward. Where the checkpoint wraps
    `forward` only (hooks outside) the hook never runs inside, so nothing is deferred and the hook
    injects as usual.
    """

    def __init__(self, checkpoint: Callable, injection: DeepInjection, cross_attn: OrcaGatedCrossAttention):
        self.checkpoint = checkpoint
        self.injection = injection
        self.cross_attn = cross_attn

    def __call__(self, function: Callable, *args, **kwargs):
        call = _DeferredInjection()
        context = self.injection.context

        def layer_without_injection(*inner_args, **inner_kwargs):
            outer, context.deferred = context.deferred, call
            try:
                return function(*inner_args, **inner_kwargs)
            finally:
                context.deferred = outer

        output = self.checkpoint(layer_without_injection, *args, **kwargs)
        return self.injection._apply(self.cross_attn, output) if call.skipped else output
