"""Compiled decoding: `DeSTA25AudioModel.generate(..., compile=True)` (docs/serving.md#compiled-decoding).

With Hugging Face's default dynamic cache, every decode step of `generate` runs eagerly: Python
and kernel-launch overhead, not the GPU, set the time per token. Here the tensor path of
`generate` uses transformers' own mechanism for compiled decoding instead: a `StaticCache` (the
LLM's K/V in preallocated tensors, written in place) and a `CompileConfig`. With both, transformers
runs the prefill eagerly and every decode step through `torch.compile` of the LLM's `__call__`
(`PreTrainedModel.get_compiled_call`), which takes in the decoder layers' forward hooks, so the
injected cross-attention of every layer is in the same graph (`fullgraph=True`: no graph break).
On a GPU the default mode is "reduce-overhead" (CUDA graphs); elsewhere inductor's default mode.

A compiled step is specialised to its shapes and guarded on the objects it reads, so what it sees
stays fixed from one request to the next of the same bucket:

- Buckets. The rows of a batch are padded to a power of two (1, 2, 4, 8, ...), the padding rows
  copies of row 0 without audio, reported finished from the first step (a stopping criterion) and
  dropped from the result; `num_return_sequences` multiplies the rows after that. The static
  cache holds the prompt plus the new tokens, rounded up to a power of two, at least
  `MIN_CACHE_LENGTH`. The prompt's own length needs no bucket: the prefill runs eagerly, and the
  decode step sees only the cache's length.
- Per bucket (`DecodeBucket`): the StaticCache (reset in place for each request), the audio
  memory and its keep-mask, and the `AudioMemoryCache` of the injection (rotated memory, the
  masks, each fused layer's packed K/V), prepared once per request before generation starts and
  copied into the bucket's tensors in place (`AudioMemoryCache.refill`). Those tensors are marked
  as static addresses, as transformers marks the StaticCache's, so CUDA graphs read them where
  they are: a new request changes their values, never their addresses, and so neither recompiles
  nor re-records a graph.

A request without audio uses the same graph, with a zero memory that every row masks (the
cross-attention leaves such rows unchanged, as the eager path does by not injecting). Greedy
search and sampling are compiled (transformers compiles the decode step of those only); beam
search is refused with a message pointing to `compile=False`.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import CompileConfig, StaticCache, StoppingCriteria, StoppingCriteriaList
from transformers.utils import ModelOutput

from orca_model.cross_attention import AudioMemoryCache, _same_layout, _static_copy

if TYPE_CHECKING:
    from orca_model.modeling import DeSTA25AudioModel

CALLER = "DeSTA25AudioModel.generate(compile=...)"
# The static cache's length is a power of two, at least this.
MIN_CACHE_LENGTH = 64
# Arguments that compiled decoding sets itself.
_OWN_ARGUMENTS = ("past_key_values", "cache", "cache_implementation", "compile_config")


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def bucket_rows(batch: int) -> int:
    """The rows a batch of `batch` prompts is padded to: the next power of two."""
    return _power_of_two(batch)


def bucket_cache_length(tokens: int) -> int:
    """The static cache's length for prompt + new tokens: the next power of two, at least
    MIN_CACHE_LENGTH."""
    return max(MIN_CACHE_LENGTH, _power_of_two(tokens))


def compile_config(option: bool | CompileConfig, device: torch.device) -> CompileConfig:
    """The `CompileConfig` of `compile=option`: True gives fullgraph, static shapes (one graph
    per bucket) and mode "reduce-overhead" (CUDA graphs) on a GPU, inductor's default mode
    elsewhere; a CompileConfig is used as given (copied). Either way transformers is told to
    compile on any device (it compiles on GPUs only by default)."""
    if option is True:
        config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else None)
    else:
        config = copy.copy(option)
    config._compile_all_devices = True
    return config


def check_options(option: Any, generate_kwargs: dict, generation_config, device: torch.device) -> None:
    """What compiled decoding does not run, refused before any work, each error naming the option."""
    if not isinstance(option, (bool, CompileConfig)):
        raise TypeError(f"{CALLER}: compile must be True, False or a transformers.CompileConfig, got {option!r}")
    num_beams = generate_kwargs.get("num_beams") or generation_config.num_beams or 1
    if num_beams > 1:
        raise ValueError(
            f"{CALLER}: num_beams={num_beams}: compiled decoding runs greedy search and sampling "
            "(num_return_sequences included), the strategies whose decode step transformers compiles; "
            "for beam search pass compile=False"
        )
    if generate_kwargs.get("use_cache", generation_config.use_cache) is False:
        raise ValueError(f"{CALLER}: use_cache=False: compiled decoding decodes from a static K/V cache")
    given = [name for name in _OWN_ARGUMENTS if generate_kwargs.get(name) is not None]
    if given:
        raise ValueError(
            f"{CALLER}: {', '.join(given)} cannot be passed with compile: compiled decoding sets the static cache "
            "and the compile configuration itself (pass a transformers.CompileConfig as compile=...)"
        )
    if torch.is_autocast_enabled(device.type):
        raise ValueError(
            f"{CALLER}: autocast is enabled: compiled decoding prepares the audio memory in the LLM's dtype; "
            "run the LLM in the dtype you want (config.llm_dtype) without autocast"
        )


class _PaddingRowsFinished(StoppingCriteria):
    """Reports the padding rows finished at every step, so that they never keep generation going."""

    def __init__(self, finished: torch.Tensor):
        self.finished = finished

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.finished


@dataclass
class DecodeBucket:
    """What the compiled decode step of one bucket reads, kept at fixed addresses: the static K/V
    cache, the audio memory [rows, T_a, H] and keep-mask [rows, T_a] (True = attend), and the
    injection's AudioMemoryCache. The tensors appear on the first request and are refilled in
    place by every later one."""

    rows: int
    cache_length: int
    cache: StaticCache
    memory: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    audio_cache: AudioMemoryCache = field(default_factory=AudioMemoryCache)

    def load(self, model: DeSTA25AudioModel, memory: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> None:
        """This request's memory and keep-mask into the bucket's tensors, then what every layer
        derives from them (`OrcaGatedCrossAttention.prepare_audio_cache`) into its AudioMemoryCache."""
        self.memory = _fill(self.memory, memory)
        self.keep = _fill(self.keep, keep)
        prepared = AudioMemoryCache()
        for cross_attn in model.orca_cross_attns:
            cross_attn.prepare_audio_cache(self.memory, self.keep, prepared, dtype)
        self.audio_cache.refill(prepared)


def _fill(buffer: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    if buffer is not None and _same_layout(buffer, value):
        return buffer.copy_(value)
    return _static_copy(value)


@dataclass
class CompiledDecoding:
    """A model's compiled-decoding state: its buckets, keyed by (rows, cache length, device, dtype),
    and the audio memory's length once known. Held in the model's __dict__, outside the module
    tree (`decoding_state`)."""

    buckets: dict[tuple, DecodeBucket] = field(default_factory=dict)
    memory_length: int | None = None

    def bucket(self, model: DeSTA25AudioModel, rows: int, cache_length: int, device, dtype) -> DecodeBucket:
        key = (rows, cache_length, torch.device(device), dtype)
        if key not in self.buckets:
            cache = StaticCache(config=model.llm_model.config, max_cache_len=cache_length)
            self.buckets[key] = DecodeBucket(rows, cache_length, cache)
        return self.buckets[key]


def decoding_state(model: DeSTA25AudioModel) -> CompiledDecoding:
    """The model's `CompiledDecoding`, made on first use."""
    state = model.__dict__.get("_compiled_decoding")
    if state is None:
        state = model.__dict__["_compiled_decoding"] = CompiledDecoding()
    return state


def _memory_length(model: DeSTA25AudioModel, state: CompiledDecoding, device: torch.device) -> int:
    """T_a of the audio memory, for a batch without audio: from an earlier request, else from one
    pass of the encoder and connector over silence (once per model)."""
    if state.memory_length is None:
        whisper = model.perception.whisper
        features = torch.zeros(1, whisper.config.num_mel_bins, model.perception.num_input_frames, device=device)
        global_tokens, local_tokens = model.perception(features)
        memory, _ = model._audio_memory(global_tokens, local_tokens, [0], 1)
        state.memory_length = memory.size(1)
    return state.memory_length


def _cache_argument(llm) -> str:
    """`generate`'s name for a Cache object: `cache` from transformers 5.2x on, `past_key_values` before."""
    parameters = inspect.signature(llm.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _first_rows(output: Any, count: int) -> Any:
    """`generate`'s output without the padding rows (rows `count` and after); a returned cache
    (the bucket's, reused by the next request) is left out."""
    if isinstance(output, torch.Tensor):
        return output[:count] if output.dim() > 0 else output
    if isinstance(output, ModelOutput):
        for key, value in list(output.items()):
            output[key] = None if key in ("past_key_values", "cache") else _first_rows(value, count)
        return output
    if isinstance(output, tuple):
        return tuple(_first_rows(value, count) for value in output)
    return output


def generate(
    model: DeSTA25AudioModel,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    memory: torch.Tensor | None,
    memory_mask: torch.Tensor | None,
    option: bool | CompileConfig,
    generate_kwargs: dict,
):
    """The tensor path of `generate` after the splice, compiled: see the module docstring.
    memory [B, T_a, H] by row with its keep-mask [B, T_a] (None: every row has audio), or None
    without audio. Returns what Hugging Face `generate` returns, for the B prompts."""
    llm = model.llm_model
    device, dtype = inputs_embeds.device, inputs_embeds.dtype
    generation_config = generate_kwargs.get("generation_config") or llm.generation_config
    copies = generate_kwargs.get("num_return_sequences") or generation_config.num_return_sequences or 1
    new_tokens = generate_kwargs.get("max_new_tokens") or generation_config.max_new_tokens
    if new_tokens is None:  # from `inputs_embeds` alone, max_length counts the new tokens only
        new_tokens = generate_kwargs.get("max_length") or generation_config.max_length
    batch = inputs_embeds.size(0)
    padded = bucket_rows(batch)
    rows = padded * copies
    state = decoding_state(model)
    bucket = state.bucket(model, rows, bucket_cache_length(inputs_embeds.size(1) + new_tokens), device, dtype)

    if padded > batch:  # copies of row 0, without audio
        index = torch.cat(
            [torch.arange(batch, device=device), torch.zeros(padded - batch, dtype=torch.long, device=device)]
        )
        inputs_embeds, attention_mask = inputs_embeds[index], attention_mask[index]
    if model._injection is not None:
        if memory is None:
            length = _memory_length(model, state, device)
            memory = inputs_embeds.new_zeros(batch, length, inputs_embeds.size(2))
            keep = torch.zeros(batch, length, dtype=torch.bool, device=device)
        else:
            state.memory_length = memory.size(1)
            keep = (
                memory_mask.bool()
                if memory_mask is not None
                else torch.ones(memory.shape[:2], dtype=torch.bool, device=device)
            )
        memory = torch.cat([memory.to(dtype), memory.new_zeros(padded - batch, *memory.shape[1:], dtype=dtype)])
        keep = torch.cat([keep, keep.new_zeros(padded - batch, keep.size(1))])
        bucket.load(model, memory.repeat_interleave(copies, dim=0), keep.repeat_interleave(copies, dim=0), dtype)
    bucket.cache.reset()

    kwargs = dict(generate_kwargs)
    kwargs["compile_config"] = compile_config(option, device)
    kwargs[_cache_argument(llm)] = bucket.cache
    if padded > batch:
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        finished[batch * copies :] = True
        kwargs["stopping_criteria"] = StoppingCriteriaList(
            [*(kwargs.get("stopping_criteria") or []), _PaddingRowsFinished(finished)]
        )
    with model._injecting(bucket.memory, bucket.keep, None, audio_cache=bucket.audio_cache):
        output = llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
    return _first_rows(output, batch * copies)
