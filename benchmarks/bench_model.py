"""End to end: `DeSTA25AudioModel` with random weights, use_fused_orca False ("eager") vs True ("orca").

The model is built from the committed training configs (configs/orca_hybrid_*.json: 6-layer
Q-Former, K global tokens, deep injection, global tokens in the memory) around the inline LLM and
Whisper large-v3 configs of benchmarks.model_configs, with random weights: no checkpoint, no
network. Two cases per model, each timed as one call (the harness's forward-only mode, so the
"ms fwd" column is the whole step):

- model_train_step: forward under bf16 autocast on CUDA (the reference trains bf16-mixed), LM +
  ORCA losses (`total_training_loss`), backward, gradient clipping at 1.0 and an Adafactor step
  with the settings of Hugging Face Trainer's `optim="adafactor"` (the reference's optimiser);
  the "-checkpointed" providers run the same step with the LLM's gradient checkpointing on
  (the injection outside the checkpoints), for its memory and its cost in time; "orca+compiled"
  runs the fused step with every LLM decoder layer's call compiled by torch.compile (inductor),
  its forward hook included, so each graph holds the decoder layer and its injected fused
  cross-attention. The Whisper encoder, the connector, the LM head and loss, the ORCA losses and
  the optimizer stay eager. The layers of a model share their graphs (the first layer gets a
  graph of its own, as it fills the per-call audio cache), so compiling costs two graphs, forward
  and backward, whatever the depth. On the CPU it is listed but not run by default (inductor around
  the interpreted kernels takes minutes; `benchmarks.run --all-providers` runs it).
- model_generate: one request batch of B prompts, B = 1 and min(DECODE_BATCH, the shape's
  batch) (B1 and B8 at the model shapes, B1 and B2 quick): Whisper, connector, prefill of the
  prompt with its audio tokens, then DECODE_TOKENS greedy tokens per row (no autocast, as in
  inference). Both paths rotate the memory once per request; the fused one also projects each
  layer's audio K/V once, where the reference path projects it again at every step.
  "orca+compiled" decodes with `generate(compile=True)` (a static K/V cache and a compiled decode
  step, orca_model.compiled_decode); where this tree's `generate` has no such option it is a
  refused row ("not available"), and on the CPU it is listed but not run (inductor around the
  interpreted kernels). Besides the whole call ("ms fwd") and its peak memory, each row's extra
  holds `ttft_ms` (time to first token: the call's start to the first new token, timed by
  `orca_model.serving.FirstTokenClock`) and `tokens_per_s` (the tokens after the first, over the
  batch, per second of decoding), medians over the timed calls, also shown in the note column.

No fp64 reference fits at these sizes (accuracy is measured per op and per layer), so the error
column is empty. `benchmarks.run --profile` adds a torch.profiler table of the costliest kernels of
the "eager" and "orca" training steps, by model part (`profile_groups`). On the CPU, without
TRITON_INTERPRET=1, the fused model would run the reference cross-attention and losses, so only
"eager" runs there.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from unittest import mock

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, StoppingCriteriaList
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.optimization import Adafactor

from benchmarks import model_configs
from benchmarks.harness import Case, Provider, Refused, group_range, synchronize, targets_gpu
from orca_kernels import kernels_available
from orca_model import DeSTA25AudioModel, DeSTA25Config, modeling, total_training_loss
from orca_model.injection import decoder_layers
from orca_model.serving import FirstTokenClock

OPS = ("model_train_step", "model_generate")  # the case ops this suite makes (benchmarks.run --only)

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PROMPT_TOKENS = 2  # text tokens before the audio's global tokens; the rest of the T_x tokens follow them
DECODE_BATCH = 8  # model_generate: one request, and min(DECODE_BATCH, the shape's batch) served together
DECODE_TOKENS = 16
MAX_WARMUP, MAX_REPEATS = 1, 3  # a step takes up to a second: few repeats keep the GPU run short
COMPILE_ON_CPU = "torch.compile of every decoder layer around the interpreted kernels takes minutes on the CPU"
OPTIMIZER_GROUP = "optimizer (clip + Adafactor)"


@dataclass(frozen=True)
class ModelShape:
    label: str
    config_file: str  # the committed training config (configs/)
    llm_config: Callable[..., PretrainedConfig]  # a model_configs function of num_layers
    num_layers: int  # decoder layers built
    batch: int  # training batch (docs/model-shapes.md#training-configurations); generation: 1, min(DECODE_BATCH, batch)
    seq_len: int  # T_x, the prompt with its K audio tokens
    overrides: tuple[tuple[str, object], ...] = ()  # DeSTA25Config fields changed from the file

    def name(self) -> str:
        """The label, plus 'L4/36' when only 4 of the model's 36 decoder layers are built."""
        full = self.llm_config().num_hidden_layers
        return self.label if self.num_layers == full else f"{self.label} L{self.num_layers}/{full}"

    def config(self, encoder_config: PretrainedConfig, dtype: torch.dtype, use_fused_orca: bool) -> DeSTA25Config:
        return desta_config(
            self.config_file,
            self.llm_config(num_layers=self.num_layers),
            encoder_config,
            llm_dtype=str(dtype).removeprefix("torch."),
            use_fused_orca=use_fused_orca,
            **dict(self.overrides),
        )


# Qwen3-0.6B is built whole. The two big LLMs keep their real width, heads and vocabulary but only
# 4 decoder layers: whole, with the suite's two models of a shape alive at once, they would not fit
# the suite's GPU time budget (a few minutes for every suite), nor an 80 GB card for Llama-3.1-8B.
FULL_SHAPES = [
    ModelShape("qwen3-0.6b", "orca_hybrid_qwen3_0.6b.json", model_configs.qwen3_0_6b, 28, 32, 300),
    ModelShape("qwen3-4b", "orca_hybrid_qwen3_4b.json", model_configs.qwen3_4b, 4, 12, 300),
    ModelShape("llama3.1-8b", "orca_hybrid_llama3.1_8b.json", model_configs.llama3_1_8b, 4, 12, 300),
]
QUICK_SHAPES = [
    ModelShape(
        "quick",
        "orca_hybrid_qwen3_0.6b.json",
        model_configs.tiny_qwen3,
        2,
        2,
        12,
        overrides=(("qformer_num_hidden_layers", 1), ("orca_global_num_tokens", 4)),
    )
]


def desta_config(
    config_file: str, llm_config: PretrainedConfig, encoder_config: PretrainedConfig, **overrides
) -> DeSTA25Config:
    """The committed training config with the given sub-configs (so nothing is fetched)."""
    with open(os.path.join(CONFIGS, config_file)) as f:
        fields = json.load(f)
    fields.update(overrides)
    return DeSTA25Config(**fields, llm_config=llm_config, encoder_config=encoder_config)


@contextmanager
def random_weights(config: DeSTA25Config) -> Iterator[None]:
    """DeSTA25AudioModel loads its LLM and Whisper with `from_pretrained`; within this block they are
    built from `config`'s sub-configs with random weights instead (of Whisper only the encoder,
    all the model keeps: the decoder would be built and dropped for nothing)."""

    def whisper(model_id, **kwargs):
        encoder = WhisperEncoder._from_config(config.encoder_config, **kwargs)
        return SimpleNamespace(get_encoder=lambda: encoder)

    def llm(model_id, config, **kwargs):
        return AutoModelForCausalLM.from_config(config, **kwargs)

    with (
        mock.patch.object(modeling, "AutoModelForCausalLM", SimpleNamespace(from_pretrained=llm)),
        mock.patch.object(modeling, "WhisperModel", SimpleNamespace(from_pretrained=whisper)),
    ):
        yield


class ModelPair:
    """The eager and the fused model of one shape (same seed: same weights), each with its
    Adafactor. Loading another shape frees the previous pair first, so the suite holds the
    models of one shape at a time."""

    def __init__(self, device: torch.device, dtype: torch.dtype, encoder_config: PretrainedConfig):
        self.device, self.dtype, self.encoder_config = device, dtype, encoder_config
        self.shape: ModelShape | None = None
        self.models: dict[bool, tuple[DeSTA25AudioModel, Adafactor]] = {}
        self.compiled_layers: dict[bool, CompiledLayers] = {}

    def load(self, shape: ModelShape) -> None:
        if shape == self.shape:
            return
        self.shape, self.models, self.compiled_layers = None, {}, {}
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        for fused in (False, True):
            torch.manual_seed(0)
            config = shape.config(self.encoder_config, self.dtype, fused)
            with torch.device(self.device), random_weights(config):
                model = DeSTA25AudioModel(config)
            # Trainer's optim="adafactor": no relative step or parameter scaling, the given lr.
            optimizer = Adafactor(
                [p for p in model.parameters() if p.requires_grad],
                lr=1e-4,
                weight_decay=0.01,
                scale_parameter=False,
                relative_step=False,
            )
            self.models[fused] = model, optimizer
            self.compiled_layers[fused] = CompiledLayers(model)
        self.shape = shape

    def batch(self, shape: ModelShape, rows: int, labels: bool) -> list[torch.Tensor]:
        """Loads `shape`, then a batch of `rows` prompts: input_ids [rows, T_x] (PROMPT_TOKENS text
        tokens, K placeholders that the audio's global tokens replace, text; random, no padding),
        attention_mask, Whisper features [rows, n_mels, 2·frames] and, with `labels`, the labels
        (the text after the audio, as a response would be)."""
        self.load(shape)
        llm_config = self.models[False][0].config.llm_config
        num_tokens = self.models[False][0].config.orca_global_num_tokens
        frames = self.encoder_config.max_source_positions
        input_ids = torch.randint(3, llm_config.vocab_size, (rows, shape.seq_len), device=self.device)
        features = torch.randn(rows, self.encoder_config.num_mel_bins, 2 * frames, device=self.device)
        batch = [input_ids, torch.ones_like(input_ids), features]
        if labels:
            prompt = torch.arange(shape.seq_len, device=self.device) < PROMPT_TOKENS + num_tokens
            batch.append(input_ids.masked_fill(prompt, -100))
        return batch


def _layer_call(layer: torch.nn.Module, *args, **kwargs):
    """A decoder layer's call with its hooks (the injected cross-attention): what one compiled
    graph holds. `_call_impl` is what `nn.Module.compile` compiles; calling the module itself here
    would come back to its compiled call."""
    return layer._call_impl(*args, **kwargs)


class CompiledLayers:
    """torch.compile of every LLM decoder layer's call of one model (what `nn.Module.compile` sets,
    through `_layer_call` so that the hooks are traced into the layer's graph), switched on only
    inside `active()`: the same model serves the eager providers."""

    def __init__(self, model: DeSTA25AudioModel):
        self.layers = list(decoder_layers(model.llm_model))
        self.compiled = [torch.compile(functools.partial(_layer_call, layer)) for layer in self.layers]

    @contextmanager
    def active(self) -> Iterator[None]:
        for layer, compiled in zip(self.layers, self.compiled, strict=True):
            layer._compiled_call_impl = compiled
        try:
            yield
        finally:
            for layer in self.layers:
                layer._compiled_call_impl = None


def profile_groups(model: DeSTA25AudioModel) -> list[tuple[str, list[torch.nn.Module]]]:
    """The model's parts for the profiler table (harness.profile_kernels; the innermost wins): the
    rest of the model's forward (prompt splicing, ORCA losses), the Whisper encoder, the Q-Former,
    the rest of the connector (global projection, local branch), the LLM's CausalLM wrapper (LM
    head and LM loss), its decoder stack (embeddings, layers, final norm), the injected
    cross-attention. The optimizer has its range in the step (OPTIMIZER_GROUP)."""
    connector = model.perception.connector
    llm = model.llm_model
    groups = [
        ("DeSTA glue + ORCA losses", [model]),
        ("encoder (Whisper)", [model.perception]),
        ("connector (global proj, local branch)", [connector]),
        ("Q-Former", [connector.global_qformer]),
        ("LM head + loss", [llm]),
        ("LLM layers", [getattr(llm, "model", None) or llm]),
    ]
    cross_attns = getattr(model, "orca_cross_attns", None)
    if cross_attns is not None:
        groups.append(("injected cross-attention", list(cross_attns)))
    return groups


def _audio(rows: int) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Empty transcriptions (as in training) and the audio's start (row, PROMPT_TOKENS) per row."""
    return [torch.zeros(1, 0, dtype=torch.long)] * rows, [(row, PROMPT_TOKENS) for row in range(rows)]


def _train_step(pair: ModelPair, fused: bool, rows: int, checkpointing: bool = False, compiled: bool = False):
    transcriptions, starts = _audio(rows)

    def step(input_ids, attention_mask, features, labels):
        """One optimiser step on the batch; returns the loss of its forward."""
        model, optimizer = pair.models[fused]
        model.train()
        # The pair's models serve both variants: set the LLM's checkpointing for this one.
        if checkpointing:
            model.gradient_checkpointing_enable()
        else:
            model.gradient_checkpointing_disable()
        autocast = torch.autocast(pair.device.type, dtype=torch.bfloat16, enabled=pair.device.type == "cuda")
        with ExitStack() as stack:
            if compiled:
                stack.enter_context(pair.compiled_layers[fused].active())
            stack.enter_context(torch.enable_grad())  # the harness calls forward-only providers under no_grad
            with autocast:
                outputs = model(input_ids, attention_mask, features, transcriptions, starts, labels=labels)
                loss = total_training_loss(outputs)
            loss.backward()
            with group_range(OPTIMIZER_GROUP):
                torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


class Generation:
    """A model_generate provider: greedy generation of DECODE_TOKENS tokens per row on the pair's
    eager or fused model (`compiled`: with `generate(compile=True)`), each call timed by a
    `FirstTokenClock`; `stats()` reports the medians of its time to first token and of its tokens
    per second after the first, over the calls after the first (which compiles, where it does)."""

    def __init__(self, pair: ModelPair, fused: bool, rows: int, compiled: bool = False):
        self.pair, self.fused, self.rows, self.compiled = pair, fused, rows, compiled
        self.samples: list[tuple[float, float]] = []  # (time to first token in ms, tokens per second)

    def __call__(self, input_ids, attention_mask, features):
        """-> ids [rows, DECODE_TOKENS]."""
        model = self.pair.models[self.fused][0].eval()
        transcriptions, starts = _audio(self.rows)
        clock = FirstTokenClock()
        options = {"compile": True} if self.compiled else {}
        begin = time.perf_counter()
        try:
            ids = model.generate(
                input_ids,
                attention_mask,
                features,
                transcriptions,
                starts,
                max_new_tokens=DECODE_TOKENS,
                min_new_tokens=DECODE_TOKENS,
                do_sample=False,
                pad_token_id=0,
                stopping_criteria=StoppingCriteriaList([clock]),
                **options,
            )
        except (TypeError, ValueError) as error:
            # A tree whose generate has no compile option: Python or Hugging Face (its model_kwargs
            # check) refuses the keyword 'compile' by name.
            if self.compiled and "'compile'" in str(error):
                raise Refused(
                    f"not available: this tree's DeSTA25AudioModel.generate has no compile option ({error})"
                ) from error
            raise
        synchronize(self.pair.device)
        end = time.perf_counter()
        first = clock.first if clock.first is not None else end
        self.samples.append((1e3 * (first - begin), self.rows * (DECODE_TOKENS - 1) / max(end - first, 1e-9)))
        return ids

    def stats(self) -> dict:
        samples = self.samples[1:] or self.samples
        if not samples:
            return {}
        ttft = statistics.median(ttft for ttft, _ in samples)
        rate = statistics.median(rate for _, rate in samples)
        return {"ttft_ms": ttft, "tokens_per_s": rate, "note": f"ttft {ttft:.3g} ms, {rate:.4g} tok/s"}


def cases(device: torch.device, quick: bool) -> list[Case]:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    encoder_config = model_configs.tiny_whisper() if quick else model_configs.whisper_large_v3()
    pair = ModelPair(device, dtype, encoder_config)
    fused_runs = targets_gpu(device) or kernels_available(device)
    runs = [(False, "eager")] + ([(True, "orca")] if fused_runs else [])
    compile_skip = None if targets_gpu(device) else COMPILE_ON_CPU

    def train_providers(shape: ModelShape) -> list[Provider]:
        providers = [Provider(name, _train_step(pair, fused, shape.batch)) for fused, name in runs]
        if fused_runs:
            step = _train_step(pair, True, shape.batch, compiled=True)
            providers.append(Provider("orca+compiled", step, skip_here=compile_skip))
        providers += [
            Provider(f"{name}-checkpointed", _train_step(pair, fused, shape.batch, checkpointing=True))
            for fused, name in runs
        ]
        return providers

    def generate_providers(rows: int) -> list[Provider]:
        generations = [(name, Generation(pair, fused, rows)) for fused, name in runs]
        providers = [Provider(name, generation, stats=generation.stats) for name, generation in generations]
        if fused_runs:
            compiled = Generation(pair, True, rows, compiled=True)
            providers.append(Provider("orca+compiled", compiled, skip_here=compile_skip, stats=compiled.stats))
        return providers

    def train_profile_groups(provider: str):
        """The eager and orca steps are profiled (run.py --profile), on the models loaded then."""
        fused = {"eager": False, "orca": True}.get(provider)
        if fused is None or fused not in pair.models:
            return None
        return profile_groups(pair.models[fused][0])

    local_tokens = (encoder_config.max_source_positions + 2 * 2 - 5) // 4 + 1  # Conv1d k5, s4, padding 2
    result = []
    for shape in QUICK_SHAPES if quick else FULL_SHAPES:
        memory = shape.config(encoder_config, dtype, False).orca_global_num_tokens + local_tokens  # T_a
        result.append(
            Case(
                op="model_train_step",
                shape=f"{shape.name()} B{shape.batch} Tx{shape.seq_len} Ta{memory} fwd+bwd+Adafactor",
                dtype=dtype,
                make_inputs=lambda shape=shape: pair.batch(shape, shape.batch, labels=True),
                providers=train_providers(shape),
                reference_fp64=None,
                backward=False,
                max_warmup=MAX_WARMUP,
                max_repeats=MAX_REPEATS,
                profile_groups=train_profile_groups,
            )
        )
        for rows in (1, min(DECODE_BATCH, shape.batch)):
            result.append(
                Case(
                    op="model_generate",
                    shape=f"{shape.name()} B{rows} Tx{shape.seq_len} Ta{memory} +{DECODE_TOKENS} tokens",
                    dtype=dtype,
                    make_inputs=lambda shape=shape, rows=rows: pair.batch(shape, rows, labels=False),
                    providers=generate_providers(rows),
                    reference_fp64=None,
                    backward=False,
                    max_warmup=MAX_WARMUP,
                    max_repeats=MAX_REPEATS,
                )
            )
    return result
