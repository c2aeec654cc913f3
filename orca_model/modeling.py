"""DeSTA25AudioModel: frozen Whisper encoder + ORCAHybridConnector + frozen LLM with deep injection."""

from __future__ import annotations

import inspect
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Protocol

import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, WhisperModel

from orca_kernels.validation import check_bool
from orca_model import compiled_decode
from orca_model.config import DeSTA25Config
from orca_model.connector import ORCAHybridConnector
from orca_model.cross_attention import AudioMemoryCache, OrcaGatedCrossAttention
from orca_model.injection import DeepInjection, decoder_layers
from orca_model.inputs import check_batch_inputs, memory_by_row
from orca_model.lm_loss import FusedLinearCrossEntropyLoss
from orca_model.losses import DeSTA25Output, compute_orca_losses

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"  # the reference's checkpoint file: trainable parameters only
LEGACY_CROSS_ATTN_PREFIX = "ocar_cross_attns"  # key prefix of older reference checkpoints
CROSS_ATTN_PREFIX = "orca_cross_attns"


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # `dtype=` from transformers 4.56 on (5.x defaults to the checkpoint's dtype without it);
    # `torch_dtype=` before.
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


# The reference's LoRA on the LLM (`use_lora=True`): rank 16, alpha 16, dropout 0.1 on the query,
# key and value projections of every attention layer.
LORA_SETTINGS = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj"]}


def _with_lora(llm_model: nn.Module) -> nn.Module:
    """The LLM with peft's LoRA layers injected in place (the reference keeps the bare model,
    `get_peft_model(...).base_model.model`, so the parameter names are the LLM's with peft's
    `base_layer` / `lora_A.default` / `lora_B.default` inside the projections)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("DeSTA25AudioModel: use_lora=True needs peft: pip install 'orca-kernels[train]'") from error
    return get_peft_model(llm_model, LoraConfig(**LORA_SETTINGS)).base_model.model


class ChatPipeline(Protocol):
    """What `DeSTA25AudioModel.generate(messages)` runs, and where the defaults of the model's
    `processor`, `vad` and `transcriber` come from: the chat front end (audio files, VAD, ASR,
    chat template, then the tensor path of `generate`).

    The model core defines only this protocol and never imports a front end: the front end
    depends on the model, not the other way round. The `orca_model` package registers its own on
    import (`register_chat_pipeline`, with a loader that imports it on first use; docs/serving.md).
    """

    def generate(self, model: DeSTA25AudioModel, messages: Any, **kwargs) -> Any:
        """`model.generate(messages, **kwargs)`."""

    def default_processor(self, config: DeSTA25Config, checkpoint_directory: str | None) -> Any:
        """The processor of a model built from `config` (and read from `checkpoint_directory`, if any)."""

    def default_vad(self) -> Callable[..., Any] | None:
        """The voice-activity check of a new model."""

    def default_transcriber(self, model: DeSTA25AudioModel) -> Callable[..., Any]:
        """The ASR of `model`."""


_chat_pipeline_loader: Callable[[], ChatPipeline] | None = None
_chat_pipeline: ChatPipeline | None = None


def register_chat_pipeline(loader: Callable[[], ChatPipeline]) -> None:
    """Make `loader()` (called on first use, then kept) the `ChatPipeline` of every model."""
    global _chat_pipeline_loader, _chat_pipeline
    if not callable(loader):
        raise TypeError(f"register_chat_pipeline: loader must be a callable returning a ChatPipeline, got {loader!r}")
    _chat_pipeline_loader, _chat_pipeline = loader, None


def chat_pipeline() -> ChatPipeline:
    """The registered `ChatPipeline`, loaded on first use."""
    global _chat_pipeline
    if _chat_pipeline is None:
        if _chat_pipeline_loader is None:
            raise RuntimeError(
                "DeSTA25AudioModel: no chat pipeline is registered for generate(messages); importing the orca_model "
                "package registers its own, or call orca_model.modeling.register_chat_pipeline(loader)"
            )
        _chat_pipeline = _chat_pipeline_loader()
    return _chat_pipeline


class WhisperPerception(nn.Module):
    """`perception`: the frozen Whisper encoder (`whisper`) and the connector (`connector`).

    The encoder runs as in the reference: conv1 + GELU, conv2 + GELU, positional embedding, then
    the encoder layers without attention mask, dropout or the final layer norm. Whisper is loaded
    in fp32 (the reference loads it without a dtype, which under transformers 4.x means fp32).

    Lean, with the reference's numbers (docs/training.md#the-frozen-encoder):

    - only the outputs of the connector's target layers (`config.target_layer_ids()`) are kept,
      each cast to the connector's dtype and device as soon as it exists; the layers after the
      last target layer do not run (the reference runs them, and never reads their outputs);
    - while no encoder parameter (and not the features) requires grad, the encoder runs under
      `torch.no_grad()`; unfreeze it (`whisper.requires_grad_(True)`) and it builds its graph;
    - `config.encoder_dtype` is the dtype of Whisper's weights: "float32" is the reference's; "bfloat16" and
      "float16" halve the encoder's memory and run in that dtype, outside autocast (an fp32
      encoder follows the caller's autocast, as the reference's does); they are an explicit choice,
      as they move the states further from the reference's (bf16 clearly, fp16 a little);
    - `forward(encoder_states=...)` takes the target layers' states precomputed
      (`orca_model.encoder_cache`) instead of running the encoder.
    """

    def __init__(self, config: DeSTA25Config):
        super().__init__()
        self.config = config
        whisper = WhisperModel.from_pretrained(config.encoder_model_id, **_dtype_kwargs(torch.float32))
        self.whisper = whisper.get_encoder()
        self.connector = ORCAHybridConnector(config)
        # transformers 4.x encoder layers require `layer_head_mask`; 5.x has none.
        self._layer_head_mask = "layer_head_mask" in inspect.signature(self.whisper.layers[0].forward).parameters
        self.whisper.to(dtype=getattr(torch, config.encoder_dtype))

    @property
    def encoder_dtype(self) -> torch.dtype:
        """The dtype of Whisper's weights (fp32, the reference's, unless `set_encoder_dtype` changed it)."""
        return self.whisper.conv1.weight.dtype

    def set_encoder_dtype(self, dtype: str | torch.dtype) -> None:
        """Set `config.encoder_dtype` (checked there: one of ENCODER_DTYPES, a name or a torch
        dtype) and cast Whisper's weights to it. The features are cast to it at each call; the kept
        states go to the connector's dtype."""
        self.config.encoder_dtype = str(dtype).removeprefix("torch.")
        self.whisper.to(dtype=getattr(torch, self.config.encoder_dtype))

    @property
    def num_input_frames(self) -> int:
        """The mel frames the encoder takes (3000 for Whisper): its positions times its conv strides."""
        encoder = self.whisper
        return encoder.config.max_source_positions * encoder.conv1.stride[0] * encoder.conv2.stride[0]

    def encoder_layer_outputs(
        self,
        input_features: torch.Tensor,
        layer_ids: Sequence[int] | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> list[torch.Tensor | None]:
        """input_features [N, n_mels, 2·max_source_positions] (30 s: 3000 frames) -> one entry per
        encoder layer: for the layers in `layer_ids` (default: every layer) its output
        [N, max_source_positions, D], cast to `dtype` and moved to `device` (when given) as soon as
        it exists; None for the others. Layers after the last of `layer_ids` do not run, and no
        other layer's output outlives the next layer's call, so what stays alive is the kept
        outputs and the running state. Runs under torch.no_grad() unless an encoder parameter or
        the features require grad (then autograd records it as usual)."""
        encoder = self.whisper
        num_layers = len(encoder.layers)
        keep = set(range(num_layers) if layer_ids is None else layer_ids)
        if any(not 0 <= index < num_layers for index in keep):
            raise ValueError(
                f"WhisperPerception: layer_ids must be encoder layer indices in [0, {num_layers}), got {layer_ids}"
            )
        if input_features.shape[-1] != self.num_input_frames:
            raise ValueError(
                f"WhisperPerception: input_features has {input_features.shape[-1]} frames but the Whisper encoder "
                f"takes {self.num_input_frames}: pad the features to {self.num_input_frames} frames"
            )
        # A frozen encoder on features without grad records nothing; no_grad makes that explicit
        # (and skips autograd's bookkeeping) without changing a number.
        needs_graph = input_features.requires_grad or any(p.requires_grad for p in encoder.parameters())
        # An fp32 encoder follows the caller's autocast, as the reference's does; a bf16 / fp16
        # one runs in its own dtype (CPU autocast cannot mix fp32 states with fp16 LayerNorm weights).
        weight = encoder.conv1.weight
        own_dtype = weight.dtype != torch.float32
        outputs: list[torch.Tensor | None] = [None] * num_layers
        with (
            nullcontext() if needs_graph else torch.no_grad(),
            torch.autocast(weight.device.type, enabled=False) if own_dtype else nullcontext(),
        ):
            hidden = nn.functional.gelu(encoder.conv1(input_features.to(dtype=weight.dtype, device=weight.device)))
            hidden = nn.functional.gelu(encoder.conv2(hidden)).permute(0, 2, 1)
            # Added without a cast, as the reference (and transformers' encoder) does: under CUDA
            # autocast the convs return bf16 and the fp32 table makes the residual stream fp32.
            hidden = hidden + encoder.embed_positions.weight[: encoder.config.max_source_positions]
            extra = {"layer_head_mask": None} if self._layer_head_mask else {}
            for index, layer in enumerate(encoder.layers[: max(keep, default=-1) + 1]):
                out = layer(hidden, attention_mask=None, **extra)
                hidden = out[0] if isinstance(out, tuple) else out
                if index in keep:
                    outputs[index] = hidden.to(dtype=dtype, device=device)
        return outputs

    def _states_as_layer_outputs(self, encoder_states: Sequence[torch.Tensor] | torch.Tensor) -> list:
        """Precomputed target-layer states (a sequence of L tensors [N, T, D] in target-layer
        order, or one [L, N, T, D]) -> the per-layer list the connector reads."""
        layer_ids = self.connector.target_layer_ids
        encoder = self.whisper
        expected = (encoder.config.max_source_positions, encoder.config.d_model)
        states = list(encoder_states.unbind(0) if isinstance(encoder_states, torch.Tensor) else encoder_states)
        shapes = [tuple(s.shape) for s in states]
        if len(states) != len(layer_ids) or len(set(shapes)) != 1 or len(shapes[0]) != 3 or shapes[0][1:] != expected:
            raise ValueError(
                f"WhisperPerception: encoder_states must be {len(layer_ids)} states (target layers {layer_ids}) "
                f"of one shape [N, {expected[0]}, {expected[1]}], got {shapes}"
            )
        outputs: list[torch.Tensor | None] = [None] * len(encoder.layers)
        for index, state in zip(layer_ids, states, strict=True):
            outputs[index] = state
        return outputs

    def forward(
        self,
        input_features: torch.Tensor | None = None,
        encoder_states: Sequence[torch.Tensor] | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_features [N, n_mels, frames] -> (global tokens [N, K, H], local tokens [N, T_l, H] or None).

        `encoder_states` instead of the features: the target layers' outputs computed before
        (`orca_model.encoder_cache`), L tensors [N, T, D] or one [L, N, T, D]; the encoder does not
        run. Exactly one of the two is given."""
        if (input_features is None) == (encoder_states is None):
            raise ValueError("WhisperPerception: pass exactly one of input_features and encoder_states")
        if encoder_states is not None:
            return self.connector(self._states_as_layer_outputs(encoder_states))
        # The connector casts each state to its weights' dtype and device; done here, as each
        # target layer's output appears, the encoder-dtype copies are never all alive at once.
        weight = self.connector.global_proj[1].weight
        layers = self.encoder_layer_outputs(
            input_features, self.connector.target_layer_ids, dtype=weight.dtype, device=weight.device
        )
        return self.connector(layers)


class DeSTA25AudioModel(nn.Module):
    """The reference's DeSTA25AudioModel in ORCAHybrid mode (docs/architecture.md#model-package).

    Modules (the reference's names, so trainable state-dict keys match): `llm_model` (frozen,
    loaded with `from_pretrained` in `config.llm_dtype`), `perception.whisper` (frozen encoder),
    `perception.connector`, and `orca_cross_attns` (one `OrcaGatedCrossAttention` per decoder
    layer, applied after it through forward hooks). The connector and the cross-attention
    modules are cast to the LLM's dtype and device, as in the reference.

    Differences from the reference, each a deliberate fix (docs/reference-behaviour.md, section
    named in brackets): the ORCA losses are a field of the output (silent-orca-losses), θ is read
    under transformers 5.x too (rope-theta-under-transformers-5), `num_beams` /
    `num_return_sequences` > 1 work in `generate` (batch-alignment-and-beam-search), and LLM
    gradient checkpointing, which the reference silently breaks (gradient-checkpointing), keeps
    the injection (it runs outside the checkpoints). `use_lora=True` puts the reference's LoRA
    (`LORA_SETTINGS`) on the LLM. Whisper is loaded in fp32 explicitly, the
    LLM in `config.llm_dtype` (the reference hardcodes bf16). `generate` takes the prepared
    tensors (the reference's `_generate_step`) or, as the reference's `generate`, chat messages
    with audio files (the registered `ChatPipeline`: VAD, Whisper ASR, chat template;
    docs/serving.md), with `processor`, `vad` and `transcriber` as settable attributes.
    `config.use_fused_orca` swaps in the fused ops and, in training, the LM loss without logits
    (`lm_loss`; `forward` then returns no logits) and changes nothing else; every fused part reads
    it at each call, so `set_use_fused_orca` (or assigning the config field) switches the whole
    model at once.
    """

    # forward takes **kwargs only to ignore collator extras, as the reference does. It honours an
    # explicit `num_items_in_batch` (HF's sum / count LM loss), but the Trainer is not to pass it:
    # the ORCA losses are per-batch means, so the Trainer scales the total loss for gradient
    # accumulation (the reference's objective).
    accepts_loss_kwargs = False

    def __init__(self, config: DeSTA25Config):
        super().__init__()
        if config.connector_mode != "orca_hybrid":
            raise NotImplementedError(
                f"DeSTA25AudioModel builds the ORCAHybrid model (connector_mode='orca_hybrid'); got "
                f"connector_mode={config.connector_mode!r}"
            )
        self.config = config
        llm_dtype = getattr(torch, config.llm_dtype)
        logger.info("Loading the LLM from %s", config.llm_model_id)
        self.llm_model = AutoModelForCausalLM.from_pretrained(
            config.llm_model_id, config=config.llm_config, **_dtype_kwargs(llm_dtype)
        )
        if config.use_lora:
            self.llm_model = _with_lora(self.llm_model)
        logger.info("Loading the audio encoder from %s", config.encoder_model_id)
        self.perception = WhisperPerception(config)

        self._injection: DeepInjection | None = None
        if config.orca_deep_injection_enabled:
            llm_config = config.llm_config
            rope_theta = config.audio_rope_theta()
            self.orca_cross_attns = nn.ModuleList(
                OrcaGatedCrossAttention(
                    llm_config.hidden_size,
                    llm_config.num_attention_heads,
                    gate_init=config.orca_gate_init,
                    rope_theta=rope_theta,
                    audio_position_scale=config.orca_audio_position_scale,
                    config=config,
                )
                for _ in range(llm_config.num_hidden_layers)
            )
            self._injection = DeepInjection(decoder_layers(self.llm_model), self.orca_cross_attns)
            self.orca_cross_attns.to(dtype=self.llm_model.dtype, device=self.llm_model.device)
        self.perception.connector.to(dtype=self.llm_model.dtype, device=self.llm_model.device)
        # The LM loss of training with use_fused_orca (no parameters: no state-dict key).
        self.lm_loss = FusedLinearCrossEntropyLoss()
        self.configure_trainable_parameters()

    def set_use_fused_orca(self, enabled: bool) -> None:
        """Run the fused ops (True) or the reference's (False) from the next call on, in every part
        at once: the connector's Conv1d, each cross-attention module and the ORCA losses. They all
        read `config.use_fused_orca` at each call, so this equals assigning it; here the value is
        checked."""
        check_bool("set_use_fused_orca", "enabled", enabled)
        self.config.use_fused_orca = enabled

    # ------------------------------------------------------------------ parameters and checkpoints

    def configure_trainable_parameters(self) -> None:
        """Freeze the LLM (except its LoRA weights with `use_lora`) and the encoder; everything
        else (connector, cross-attention) trains. Sets `trainable_parameter_names`. The LoRA rule
        is the reference's: an LLM parameter trains when "lora" is in its name."""
        frozen = set()
        for name, param in self.llm_model.named_parameters():
            if "lora" not in name:
                param.requires_grad = False
                frozen.add(id(param))
        for param in self.perception.whisper.parameters():
            param.requires_grad = False
            frozen.add(id(param))
        self.trainable_parameter_names = []
        for name, param in self.named_parameters():
            if id(param) not in frozen:
                param.requires_grad = True
                self.trainable_parameter_names.append(name)

    def _trainable_keys(self, prefix: str = "") -> set[str]:
        return {prefix + name for name, param in self.named_parameters() if param.requires_grad}

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        """The trainable parameters only (what the reference saves as model.safetensors)."""
        keys = self._trainable_keys(prefix)
        full = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        out = OrderedDict() if destination is None else destination
        out.update((key, value) for key, value in full.items() if key in keys)
        return out

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Load a trainable-only checkpoint (ours or the reference's; `ocar_cross_attns.*` keys of
        older reference checkpoints map to `orca_cross_attns.*`). Missing keys are the trainable
        parameters the checkpoint lacks (frozen ones come from the pretrained models); with
        `strict`, missing or unexpected keys raise."""
        legacy = LEGACY_CROSS_ATTN_PREFIX
        renamed = OrderedDict(
            (CROSS_ATTN_PREFIX + key[len(legacy) :] if key.startswith(legacy) else key, value)
            for key, value in state_dict.items()
        )
        result = super().load_state_dict(renamed, strict=False, assign=assign)
        trainable = self._trainable_keys()
        missing = [key for key in result.missing_keys if key in trainable]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"Error loading a DeSTA25AudioModel checkpoint: missing keys {missing}, unexpected keys "
                f"{result.unexpected_keys}"
            )
        # torch's own named tuple, without the frozen parameters among the missing keys.
        return result._replace(missing_keys=missing)

    def save_pretrained(
        self, directory: str | os.PathLike, state_dict: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """config.json and model.safetensors (trainable parameters), the reference's layout.
        `state_dict`: the weights to write instead of this model's (a Trainer passes the full
        state dict it gathered across processes); only the trainable keys are kept."""
        os.makedirs(directory, exist_ok=True)
        self.config.save_pretrained(directory)
        if state_dict is None:
            state_dict = self.state_dict()
        trainable = self._trainable_keys()
        weights = {k: v.detach().contiguous() for k, v in state_dict.items() if k in trainable}
        save_file(weights, os.path.join(directory, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **config_overrides) -> DeSTA25AudioModel:
        """Build the model from a saved config (LLM and encoder from their ids) and load the
        trainable weights; `config_overrides` set config fields, e.g. `use_fused_orca=True`."""
        config = DeSTA25Config.from_pretrained(directory, **config_overrides)
        model = cls(config)
        model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_NAME)))
        # Where `processor` looks first: a trainer's checkpoint holds the processor's files.
        model.__dict__["_checkpoint_directory"] = os.fspath(directory)
        return model

    # ------------------------------------------------------------------ inputs

    def _prepare_inputs_for_llm(
        self,
        input_ids: torch.Tensor,
        batch_features: torch.Tensor,
        batch_transcription_ids: Sequence[torch.Tensor],
        batch_start_positions: Sequence[tuple[int, int]],
        batch_encoder_states: Sequence[torch.Tensor] | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, list[tuple[int, int, int]] | None]:
        """The reference's splicing: the prompt's embeddings with, for audio i at
        batch_start_positions[i] = (row, start), positions [start, start + K) replaced by its
        global tokens and the next len(transcription) positions by the transcription's
        embeddings (computed without gradient).

        Returns (inputs_embeds [B, T_x, H], global tokens [N, K, H], local tokens [N, T_l, H],
        transcription spans (row, start, end)); no audio gives (embeddings, None, None, None).
        """
        embed_tokens = self.llm_model.get_input_embeddings()
        if len(batch_start_positions) == 0:
            return embed_tokens(input_ids), None, None, None
        device = embed_tokens.weight.device
        with torch.no_grad():
            transcriptions = [embed_tokens(ids.squeeze(0).to(device)) for ids in batch_transcription_ids]
        if batch_encoder_states is not None:  # precomputed (orca_model.encoder_cache): the encoder does not run
            global_tokens, local_tokens = self.perception(encoder_states=[s.to(device) for s in batch_encoder_states])
        else:
            global_tokens, local_tokens = self.perception(batch_features.to(device))
        num_tokens = self.config.orca_global_num_tokens

        inputs_embeds = embed_tokens(input_ids)
        spans, rows, positions = [], [], []
        for index, (row, start) in enumerate(batch_start_positions):
            end = start + num_tokens + transcriptions[index].size(0)
            spans.append((row, start + num_tokens, end))
            rows += [row] * (end - start)
            positions += range(start, end)
        # Out of place: with gradient checkpointing's input-gradient hook the embeddings are a
        # leaf that requires grad, which an in-place write into a view of would fail.
        audio_embeddings = torch.cat([torch.cat(pair) for pair in zip(global_tokens, transcriptions, strict=True)])
        index = (torch.tensor(rows, device=device), torch.tensor(positions, device=device))
        inputs_embeds = inputs_embeds.index_put(index, audio_embeddings.to(inputs_embeds.dtype))
        return inputs_embeds, global_tokens, local_tokens, spans

    def _check_inputs(
        self, input_ids, attention_mask, labels, batch_features, transcriptions, positions, encoder_states=None
    ) -> list[int]:
        """`inputs.check_batch_inputs` with this model's sizes; the row of each audio."""
        return check_batch_inputs(
            input_ids,
            attention_mask,
            labels,
            batch_features,
            transcriptions,
            positions,
            num_global_tokens=self.config.orca_global_num_tokens,
            num_mel_bins=self.perception.whisper.config.num_mel_bins,
            num_frames=self.perception.num_input_frames,
            batch_encoder_states=encoder_states,
        )

    def _audio_memory(
        self, global_tokens: torch.Tensor | None, local_tokens: torch.Tensor | None, rows: Sequence[int], batch: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The cross-attention memory by row ([B, T_a, H], keep mask [B, T_a] or None,
        `inputs.memory_by_row`): the local tokens, or with `orca_global_cross_attn` cat(global,
        local) along T (whichever exists)."""
        if self._injection is None:
            return None, None
        memory = local_tokens
        if self.config.orca_global_cross_attn:
            if global_tokens is not None and local_tokens is not None:
                memory = torch.cat([global_tokens, local_tokens], dim=1)
            else:
                memory = global_tokens if global_tokens is not None else local_tokens
        return memory_by_row(memory, rows, batch) if memory is not None else (None, None)

    @contextmanager
    def _injecting(
        self,
        memory: torch.Tensor | None,
        memory_mask: torch.Tensor | None,
        transcription_positions: Sequence[tuple[int, int, int]] | None,
        audio_cache: AudioMemoryCache | None = None,
    ) -> Iterator[None]:
        if self._injection is None:
            yield
            return
        try:
            active = memory is not None
            context = self._injection.context
            # The memory comes from `memory_by_row`: its mask marks whole rows only.
            with (
                context.active(
                    memory, memory_mask, transcription_positions, audio_mask_marks_rows=True, audio_cache=audio_cache
                )
                if active
                else nullcontext()
            ):
                yield
        finally:
            # A failed forward must not leave per-layer losses behind for the next one.
            self._injection.pop_layer_align_losses()

    # ------------------------------------------------------------------ forward and generation

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        batch_features: torch.Tensor | None,
        batch_transcription_ids: Sequence[torch.Tensor],
        batch_start_positions: Sequence[tuple[int, int]],
        labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        batch_encoder_states: Sequence[torch.Tensor] | torch.Tensor | None = None,
        **kwargs,
    ) -> DeSTA25Output:
        """The reference's forward.

        Args:
            input_ids [B, T_x], attention_mask [B, T_x] (left padding), labels [B, T_x] (-100 =
                ignored): the prompt with K + len(transcription) placeholder tokens per audio.
            batch_features [N, n_mels, 3000]: Whisper features, one row per audio.
            batch_transcription_ids: N tensors [1, L_i] or [L_i] (may be empty).
            batch_start_positions: N (row, start) pairs, where each audio's tokens begin.
            num_items_in_batch: the LM loss is the sum over the labelled tokens divided by it
                (Hugging Face's gradient-accumulation normalisation) instead of their mean.
            batch_encoder_states: instead of batch_features (then None), the frozen encoder's
                target-layer states computed before, L tensors [N, T, D] or one [L, N, T, D]
                (`orca_model.encoder_cache.EncoderStateCache.get_batch`): the encoder does not
                run, the rest of the step is the same (multi-epoch training on cached states).
            kwargs: ignored (collator extras), as in the reference.

        Returns a `DeSTA25Output` with the LM loss, logits, hidden states and `orca_losses`. In
        training with `use_fused_orca` and labels, the LM loss is `self.lm_loss`'s, computed from
        the final hidden state without the [B·T_x, vocab] logits (`orca_model.lm_loss`), and
        `logits` is None; evaluation, generation and `use_fused_orca=False` return the logits and
        the LLM's own loss.
        """
        if self._injection is not None and self.training:
            # Checkpointing may have been enabled on the LLM directly since the last call.
            self._injection.keep_outside_checkpoints()
        rows = self._check_inputs(
            input_ids,
            attention_mask,
            labels,
            batch_features,
            batch_transcription_ids,
            batch_start_positions,
            batch_encoder_states,
        )
        inputs_embeds, global_tokens, local_tokens, spans = self._prepare_inputs_for_llm(
            input_ids, batch_features, batch_transcription_ids, batch_start_positions, batch_encoder_states
        )
        memory, memory_mask = self._audio_memory(global_tokens, local_tokens, rows, input_ids.size(0))
        layer_losses: list[torch.Tensor] = []
        fused_lm_loss = labels is not None and self.training and self.config.use_fused_orca
        with self._injecting(memory, memory_mask, spans):
            outputs = self.llm_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                output_hidden_states=True,
                **self._llm_loss_inputs(labels, num_items_in_batch, fused_lm_loss, inputs_embeds.device),
            )
            if self._injection is not None:
                layer_losses = self._injection.pop_layer_align_losses()
        fields = dict(outputs)
        if fused_lm_loss:
            fields["logits"] = None
            fields["loss"] = self.lm_loss(
                outputs.hidden_states[-1], self.llm_model.get_output_embeddings().weight, labels, num_items_in_batch
            )
        text_hidden = outputs.hidden_states[-1] if outputs.hidden_states else None
        return DeSTA25Output(
            **fields,
            orca_losses=self.compute_orca_losses(global_tokens, local_tokens, text_hidden, layer_losses),
            audio_global=global_tokens,
            audio_local=local_tokens,
        )

    @staticmethod
    def _llm_loss_inputs(
        labels: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | None,
        fused_lm_loss: bool,
        device: torch.device,
    ) -> dict:
        """The LLM call's loss arguments. For the fused LM loss: no labels and an empty
        `logits_to_keep` (the LM head projects no position; `forward` computes the loss from the
        final hidden state, which is the LM head's input: transformers ties `hidden_states[-1]`
        to it). Otherwise the labels and `num_items_in_batch`, for the LLM's own loss."""
        if fused_lm_loss:
            return {"logits_to_keep": torch.empty(0, dtype=torch.long, device=device)}
        extra = {} if num_items_in_batch is None or labels is None else {"num_items_in_batch": num_items_in_batch}
        return {"labels": labels, **extra}

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Checkpoint the LLM's decoder layers (what `TrainingArguments(gradient_checkpointing=True)`
        calls); the injected cross-attention runs outside the checkpoints and sees the audio memory
        (docs/reference-behaviour.md#gradient-checkpointing). kwargs go to the LLM's own method
        (`every_n_layers`, `offload` where the transformers version has them)."""
        llm, options = self.llm_model, activation_checkpointing_kwargs
        # transformers 5.24 names it activation checkpointing (the old name warns); 5.17 and 4.x gradient.
        if hasattr(llm, "activation_checkpointing_enable"):
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, **kwargs)
        if self._injection is not None:
            self._injection.keep_outside_checkpoints()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """The older name of `activation_checkpointing_enable` (transformers 5.17's Trainer calls it)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        """Stop checkpointing the LLM's decoder layers."""
        llm = self.llm_model
        (getattr(llm, "activation_checkpointing_disable", None) or llm.gradient_checkpointing_disable)()

    gradient_checkpointing_disable = activation_checkpointing_disable

    def compute_orca_losses(
        self,
        global_tokens: torch.Tensor | None,
        local_tokens: torch.Tensor | None,
        text_hidden: torch.Tensor | None,
        layer_align_losses: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The reference method's signature around `orca_model.compute_orca_losses`."""
        return compute_orca_losses(self.config, global_tokens, local_tokens, text_hidden, layer_align_losses)

    # ------------------------------------------------------------------ chat: generate(messages)
    # Held in the instance's __dict__, outside the module tree: none of them is a parameter, a
    # state-dict entry or moved by `.to()`. Their defaults come from the registered ChatPipeline.

    @property
    def processor(self):
        """The `DeSTA25Processor` of `generate(messages)`: the one assigned, else the pipeline's
        default, made on first use: loaded from the directory `from_pretrained` read when it holds
        the processor's files (a trainer saves them), else built from the config
        (`DeSTA25Processor.from_config`: the tokenizer of `llm_model_id`, the feature extractor of
        `encoder_model_id`)."""
        processor = self.__dict__.get("_processor")
        if processor is None:
            directory = self.__dict__.get("_checkpoint_directory")
            processor = chat_pipeline().default_processor(self.config, directory)
            self.__dict__["_processor"] = processor
        return processor

    @processor.setter
    def processor(self, processor) -> None:
        self.__dict__["_processor"] = processor

    @property
    def vad(self):
        """The voice-activity check of `generate(messages)`: a callable (16 kHz float32 waveform
        [samples]) -> truthy when it holds speech, run on each audio that has no given text; no
        speech gives the transcription " ". Default: the pipeline's (`EnergyVAD()`, offline,
        energy-based, -40 dBFS); None transcribes every such audio. Assign a plain callable, not a
        Module."""
        if "_vad" not in self.__dict__:
            self.__dict__["_vad"] = chat_pipeline().default_vad()
        return self.__dict__["_vad"]

    @vad.setter
    def vad(self, vad) -> None:
        if vad is not None and not callable(vad):
            raise TypeError(f"DeSTA25AudioModel.vad must be a callable waveform -> bool or None, got {vad!r}")
        self.__dict__["_vad"] = vad

    @property
    def transcriber(self):
        """The ASR of `generate(messages)`: a callable (Whisper features [N, n_mels, frames]) -> N
        texts. Default: the pipeline's (a `WhisperTranscriber` of `encoder_model_id` on this
        model's encoder: the Whisper decoder loaded on first use, no second encoder)."""
        if "_transcriber" not in self.__dict__:
            self.__dict__["_transcriber"] = chat_pipeline().default_transcriber(self)
        return self.__dict__["_transcriber"]

    @transcriber.setter
    def transcriber(self, transcriber) -> None:
        if not callable(transcriber):
            raise TypeError(f"DeSTA25AudioModel.transcriber must be a callable features -> texts, got {transcriber!r}")
        self.__dict__["_transcriber"] = transcriber

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | list | None = None,
        attention_mask: torch.Tensor | None = None,
        batch_features: torch.Tensor | None = None,
        batch_transcription_ids: Sequence[torch.Tensor] | None = None,
        batch_start_positions: Sequence[tuple[int, int]] | None = None,
        *,
        messages: list | None = None,
        **generate_kwargs,
    ):
        """Generation, from prepared tensors or from chat messages.

        **From chat messages** (the reference's `generate(messages)`): `model.generate(messages)`
        or `model.generate(messages=...)`, one conversation (a list of
        `{"role", "content", "audios": [{"audio": path, "text": optional}]}` dicts, one audio per
        `<|AUDIO|>` marker of the content) or a batch (a list of conversations, each with at most
        one audio), run by the registered `ChatPipeline`. Returns a `GenerationOutput` (text,
        audios: (path, transcription), generated_ids; `stats`: where the time went). Sampling
        follows the reference's defaults, do_sample=True, temperature 0.7, top_p 0.9,
        max_new_tokens 512, each overridable; further keywords:
        `transcribe=False` (no VAD or ASR: audios without text get no transcription, as in
        training), `audio_tags=False` (the training prompt, without the reference generate's
        `<start_audio>`/`<end_audio>` tags), and any Hugging Face `generate` option. Whisper ASR,
        VAD and the processor are `transcriber`, `vad` and `processor` (docs/serving.md).

        **From tensors** (the reference's `_generate_step`): the five inputs of `forward` without
        labels; generate_kwargs go to Hugging Face `generate` (max_new_tokens, do_sample,
        num_beams, num_return_sequences, ...) and default to the LLM's own generation config, not
        to the reference's sampling defaults. Generation expands each prompt max(num_beams,
        num_return_sequences) times (repeat_interleave); the audio memory is expanded the same
        way, which is what makes beams and several returned sequences work (the reference
        crashes there). Returns the generated ids [B · num_return_sequences, new tokens].

        **Compiled decoding**, both paths: `compile=True` (or a `transformers.CompileConfig`)
        decodes from a static K/V cache with a compiled decode step (transformers'
        `StaticCache` + `compile_config`; CUDA graphs on a GPU), batches padded to buckets and
        the audio memory kept in fixed per-bucket buffers, so that requests of one bucket reuse
        one graph (`orca_model.compiled_decode`, docs/serving.md#compiled-decoding). Greedy search
        and sampling; beam search needs compile=False.

        Both paths run the same code from here on: the audio memory by row (with its mask) and one
        audio K/V cache per request batch.
        """
        if messages is not None or isinstance(input_ids, (list, tuple)):
            tensors = (attention_mask, batch_features, batch_transcription_ids, batch_start_positions)
            if (messages is not None and input_ids is not None) or any(value is not None for value in tensors):
                raise TypeError(
                    "DeSTA25AudioModel.generate: chat messages come alone (positionally or as messages=), "
                    "without tensor inputs"
                )
            return chat_pipeline().generate(self, input_ids if messages is None else messages, **generate_kwargs)
        missing = [
            name
            for name, value in (
                ("input_ids", input_ids),
                ("attention_mask", attention_mask),
                ("batch_start_positions", batch_start_positions),
                ("batch_transcription_ids", batch_transcription_ids),
            )
            if value is None
        ]
        if missing:
            raise TypeError(
                f"DeSTA25AudioModel.generate: missing {missing}: pass the prepared tensors (input_ids, attention_mask, "
                "batch_features, batch_transcription_ids, batch_start_positions) or chat messages"
            )
        compile_option = generate_kwargs.pop("compile", None)
        compile_option = False if compile_option is None else compile_option
        if compile_option is not False:
            generation_config = generate_kwargs.get("generation_config") or self.llm_model.generation_config
            compiled_decode.check_options(compile_option, generate_kwargs, generation_config, input_ids.device)
        rows = self._check_inputs(
            input_ids, attention_mask, None, batch_features, batch_transcription_ids, batch_start_positions
        )
        inputs_embeds, global_tokens, local_tokens, _ = self._prepare_inputs_for_llm(
            input_ids, batch_features, batch_transcription_ids, batch_start_positions
        )
        memory, memory_mask = self._audio_memory(global_tokens, local_tokens, rows, input_ids.size(0))
        if compile_option is not False:
            return compiled_decode.generate(
                self, inputs_embeds, attention_mask, memory, memory_mask, compile_option, generate_kwargs
            )
        if memory is not None:
            generation_config = generate_kwargs.get("generation_config") or self.llm_model.generation_config
            num_beams = generate_kwargs.get("num_beams") or generation_config.num_beams or 1
            num_sequences = generate_kwargs.get("num_return_sequences") or generation_config.num_return_sequences or 1
            copies = max(num_beams, num_sequences)
            memory = memory.repeat_interleave(copies, dim=0)
            memory_mask = memory_mask.repeat_interleave(copies, dim=0) if memory_mask is not None else None
        # No transcription spans: they index the unexpanded batch, and the alignment loss is
        # only for training.
        with self._injecting(memory, memory_mask, None):
            return self.llm_model.generate(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
            )
