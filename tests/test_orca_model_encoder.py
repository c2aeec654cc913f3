"""The frozen Whisper encoder of WhisperPerception (docs/training.md#the-frozen-encoder): the
reference's connector outputs, loss and gradients, with only the target layers run and kept, no
autograd state while frozen (and a working graph when unfrozen), the encoder-dtype option and the
offline cache of the target-layer states.

The reference runs every encoder layer and hands the connector all their outputs
(`reference_layer_outputs` below, the reference's loop); the connector reads the target layers.
Tiny random models (tests/tiny_models.py): the 4-layer Whisper (targets [0, 1, 2, 3], or [0, 2]
through `orca_target_layer_ids` so that layer 3 is after the last target) and an 8-layer one
(targets [1, 3, 5, 7]: half the layers are not read).
"""

from __future__ import annotations

import copy
import os
import weakref

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import WhisperForConditionalGeneration

from benchmarks import model_configs
from orca_model import DeSTA25AudioModel, total_training_loss
from orca_model.encoder_cache import EncoderStateCache, state_bytes
from orca_model.modeling import WhisperPerception
from tiny_models import FRAMES, MEL_BINS, desta_config, make_batch
from tolerances import (
    BF16_RESOLUTION,
    LOW_PRECISION_FACTOR,
    MODULE_RELATIVE_TOLERANCE,
    relative_error,
    relative_norm_error,
)

N = 3


@pytest.fixture(scope="module")
def whisper8(tmp_path_factory) -> str:
    """A tiny random Whisper with 8 encoder layers: the default targets are [1, 3, 5, 7]."""
    path = str(tmp_path_factory.mktemp("whisper8") / "whisper")
    with torch.random.fork_rng():
        torch.manual_seed(1)
        WhisperForConditionalGeneration(model_configs.tiny_whisper(encoder_layers=8)).save_pretrained(path)
    return path


def build(checkpoints, whisper: str | None = None, **overrides) -> DeSTA25AudioModel:
    return DeSTA25AudioModel(desta_config(checkpoints["qwen3"], whisper or checkpoints["whisper"], **overrides))


def features(seed: int = 0, n: int = N) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 100 * torch.randn(n, MEL_BINS, 2 * FRAMES, generator=generator)


def reference_layer_outputs(perception: WhisperPerception, input_features: torch.Tensor) -> list[torch.Tensor]:
    """The reference's encoder loop: conv1 + GELU, conv2 + GELU, + positional table (no cast),
    every layer, every output kept in the encoder's dtype."""
    encoder = perception.whisper
    weight = encoder.conv1.weight
    hidden = torch.nn.functional.gelu(encoder.conv1(input_features.to(dtype=weight.dtype)))
    hidden = torch.nn.functional.gelu(encoder.conv2(hidden)).permute(0, 2, 1)
    hidden = hidden + encoder.embed_positions.weight[: encoder.config.max_source_positions]
    outputs = []
    for layer in encoder.layers:
        out = layer(hidden, attention_mask=None)
        hidden = out[0] if isinstance(out, tuple) else out
        outputs.append(hidden)
    return outputs


def reference_forward(perception: WhisperPerception, input_features: torch.Tensor):
    return perception.connector(reference_layer_outputs(perception, input_features))


def seeded(fn, *args, seed: int = 0):
    """`fn(*args)` from one random state (the Q-Former's dropout draws the same masks)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn(*args)


# ---------------------------------------------------------------------- same numbers


@pytest.mark.parametrize("layers", [None, [0, 2], [3]], ids=["all-4", "0-2", "last-only"])
def test_connector_outputs_equal_the_reference(checkpoints, layers):
    model = build(checkpoints, orca_target_layer_ids=layers).eval()
    x = features()
    with torch.no_grad():
        global_tokens, local_tokens = model.perception(x)
        expected_global, expected_local = reference_forward(model.perception, x)
    assert torch.equal(global_tokens, expected_global)
    assert torch.equal(local_tokens, expected_local)


def test_connector_outputs_equal_the_reference_with_8_layers(checkpoints, whisper8):
    model = build(checkpoints, whisper8).eval()
    assert model.perception.connector.target_layer_ids == [1, 3, 5, 7]
    x = features()
    with torch.no_grad():
        for new, old in zip(model.perception(x), reference_forward(model.perception, x), strict=True):
            assert torch.equal(new, old)


@pytest.mark.parametrize("layers", [None, [0, 2]], ids=["all-4", "0-2"])
def test_model_loss_and_gradients_equal_the_reference(checkpoints, layers):
    """Training mode (Q-Former dropout on, same seed): the LM and ORCA losses and every trainable
    parameter's gradient equal the run with the reference's encoder loop, exactly."""
    model = build(checkpoints, orca_target_layer_ids=layers).train()
    batch = make_batch(batch_size=2, transcription_lengths=(3, 2))

    def step():
        model.zero_grad(set_to_none=True)
        outputs = model(**batch)
        total = total_training_loss(outputs)
        total.backward()
        return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = seeded(step)
    lean_forward = model.perception.forward
    model.perception.forward = lambda input_features: reference_forward(model.perception, input_features)
    try:
        expected_loss, expected_grads = seeded(step)
    finally:
        model.perception.forward = lean_forward
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected_grads.keys() == set(model.trainable_parameter_names)
    for name, grad in grads.items():
        assert torch.equal(grad, expected_grads[name]), name


# ---------------------------------------------------------------------- what runs and what stays alive


def layer_calls(perception: WhisperPerception, x: torch.Tensor) -> list[int]:
    counts = [0] * len(perception.whisper.layers)
    handles = [
        layer.register_forward_hook(lambda module, args, out, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, layer in enumerate(perception.whisper.layers)
    ]
    try:
        with torch.no_grad():
            perception(x)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def test_only_layers_up_to_the_last_target_run(checkpoints, whisper8):
    assert layer_calls(build(checkpoints, orca_target_layer_ids=[0, 2]).perception, features()) == [1, 1, 1, 0]
    assert layer_calls(build(checkpoints, orca_target_layer_ids=[1]).perception, features()) == [1, 1, 0, 0]
    assert layer_calls(build(checkpoints, whisper8).perception, features()) == [1] * 8


def alive_when_the_connector_runs(perception: WhisperPerception, x: torch.Tensor, forward) -> tuple[list, list]:
    """(indices of the encoder layers whose output tensor is still alive when the connector
    starts, the entries the connector gets: None or (dtype, shape))."""
    refs: dict[int, weakref.ref] = {}
    seen: dict[str, list] = {}

    def record_output(index):
        def hook(module, args, out):
            refs[index] = weakref.ref(out[0] if isinstance(out, tuple) else out)

        return hook

    def at_connector(module, args):
        seen["alive"] = sorted(i for i, ref in refs.items() if ref() is not None)
        seen["given"] = [None if s is None else (s.dtype, tuple(s.shape)) for s in args[0]]

    handles = [layer.register_forward_hook(record_output(i)) for i, layer in enumerate(perception.whisper.layers)]
    handles.append(perception.connector.register_forward_pre_hook(at_connector))
    try:
        with torch.no_grad():
            forward(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen["alive"], seen["given"]


def test_only_the_target_layer_outputs_stay_alive(checkpoints, whisper8):
    model = build(checkpoints, whisper8).train()
    perception, x = model.perception, features()
    shape = (N, FRAMES, perception.whisper.config.d_model)
    alive, given = alive_when_the_connector_runs(perception, x, perception)
    assert alive == [1, 3, 5, 7]  # fp32 connector: the kept states are the layers' own outputs
    assert given == [None, (torch.float32, shape)] * 4
    alive, given = alive_when_the_connector_runs(perception, x, lambda x: reference_forward(perception, x))
    assert alive == list(range(8))


def test_bf16_connector_gets_bf16_states_and_no_fp32_output_stays(checkpoints, whisper8):
    """llm_dtype bfloat16: the connector is bf16 and would cast each state itself; cast as each
    target layer finishes, no fp32 layer output is alive when the connector runs."""
    model = build(checkpoints, whisper8, llm_dtype="bfloat16").train()
    perception, x = model.perception, features()
    assert perception.encoder_dtype == torch.float32  # the reference's default
    alive, given = alive_when_the_connector_runs(perception, x, perception)
    assert alive == []
    assert given == [None, (torch.bfloat16, (N, FRAMES, perception.whisper.config.d_model))] * 4
    perception.eval()
    with torch.no_grad():
        for new, old in zip(perception(x), reference_forward(perception, x), strict=True):
            assert torch.equal(new, old)


class PeakLiveBytes(TorchDispatchMode):
    """The most bytes of storages created inside the mode that were alive at once (storages are
    tracked through weak references to their Python objects, which live as long as the storage);
    storages that existed before (parameters, inputs) are not counted."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.known = {id(t.untyped_storage()) for t in existing}
        self.keep = [t.untyped_storage() for t in existing]  # so that their ids stay theirs
        self.live = self.peak = 0

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self.known.discard(key)  # the id may be reused by a later storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if id(storage) not in self.known:
                    self.known.add(id(storage))
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, id(storage), storage.nbytes())
        return out


def peak_bytes(module: torch.nn.Module, fn, x: torch.Tensor) -> int:
    existing = [*module.parameters(), *module.buffers(), x]
    mode = PeakLiveBytes(existing)
    with torch.no_grad(), mode:
        fn(x)
    return mode.peak


def test_peak_memory_of_the_perception_is_lower(checkpoints, whisper8):
    """8 layers, 4 read: the reference holds 8 fp32 layer outputs (and, with a bf16 connector,
    4 bf16 copies besides); the lean perception at most the 4 states in the connector's dtype
    and the running state. The drop is at least the 4 unread outputs' bytes (fp32), and with a
    bf16 connector also the 4 read ones' fp32 bytes less their bf16 copies."""
    for llm_dtype, saved_outputs in (("float32", 4), ("bfloat16", 4 + 4 - 2)):
        model = build(checkpoints, whisper8, llm_dtype=llm_dtype).eval()
        perception, x = model.perception, features(n=4)
        output_bytes = x.size(0) * FRAMES * perception.whisper.config.d_model * 4
        lean = peak_bytes(perception, perception, x)
        reference = peak_bytes(perception, lambda x, p=perception: reference_forward(p, x), x)
        assert reference - lean >= saved_outputs * output_bytes, (llm_dtype, lean, reference, output_bytes)


# ---------------------------------------------------------------------- autograd


def test_frozen_encoder_runs_without_autograd(checkpoints, whisper8):
    model = build(checkpoints, whisper8).train()
    perception, x = model.perception, features()
    assert all(not p.requires_grad for p in perception.whisper.parameters())
    grad_mode = []
    handle = perception.whisper.layers[0].register_forward_pre_hook(
        lambda module, args: grad_mode.append(torch.is_grad_enabled())
    )
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layers = perception.encoder_layer_outputs(x, [1, 3, 5, 7])
    handle.remove()
    assert grad_mode == [False] and saved == []
    kept = [s for s in layers if s is not None]
    assert len(kept) == 4 and all(s.grad_fn is None and not s.requires_grad for s in kept)
    # The connector trains on them: its graph saves the states, not the encoder's.
    global_tokens, local_tokens = perception(x)
    assert global_tokens.grad_fn is not None and local_tokens.grad_fn is not None


def saved_bytes(fn, x) -> int:
    """Bytes of the distinct storages autograd saves for backward during fn(x)."""
    storages = {}
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t,
        lambda t: t,
    ):
        fn(x)
    return sum(storages.values())


def test_saved_bytes_are_no_more_than_the_reference(checkpoints, whisper8):
    """The frozen encoder saves nothing (also in the reference: no parameter requires grad); with a
    bf16 connector the connector's saved states are the bf16 copies either way."""
    for llm_dtype in ("float32", "bfloat16"):
        perception = build(checkpoints, whisper8, llm_dtype=llm_dtype).perception.eval()
        x = features()
        lean = saved_bytes(perception, x)
        assert 0 < lean <= saved_bytes(lambda x, p=perception: reference_forward(p, x), x)


def test_unfrozen_encoder_builds_its_graph(checkpoints):
    """whisper.requires_grad_(True): the encoder records its graph and its parameters get the
    reference's gradients; the layer after the last target gets none, as in the reference (its
    output is unused there)."""
    model = build(checkpoints, orca_target_layer_ids=[0, 2]).eval()
    perception, x = model.perception, features()
    perception.whisper.requires_grad_(True)

    def grads(forward):
        perception.zero_grad(set_to_none=True)
        global_tokens, local_tokens = forward(x)
        (global_tokens.square().mean() + local_tokens.square().mean()).backward()
        return {n: None if p.grad is None else p.grad.clone() for n, p in perception.whisper.named_parameters()}

    layers = perception.encoder_layer_outputs(x, [0, 2])
    assert layers[0].grad_fn is not None and layers[2].grad_fn is not None
    lean = grads(perception)
    reference = grads(lambda x: reference_forward(perception, x))
    assert lean.keys() == reference.keys()
    for name, grad in lean.items():
        if name.startswith("layers.3.") or name == "layer_norm.weight" or name == "layer_norm.bias":
            assert grad is None and reference[name] is None, name
        else:
            assert grad is not None and torch.equal(grad, reference[name]), name


def test_features_that_require_grad_get_the_reference_gradient(checkpoints):
    perception = build(checkpoints).perception.eval()

    def grad(forward):
        x = features().requires_grad_(True)
        global_tokens, local_tokens = forward(x)
        (global_tokens.sum() + local_tokens.sum()).backward()
        return x.grad

    assert torch.equal(grad(perception), grad(lambda x: reference_forward(perception, x)))


def test_autocast_keeps_the_reference_fp32_residual_stream(checkpoints):
    """Under bf16 autocast the convs return bf16 and the reference adds the fp32 positional table
    without a cast, so its residual stream (every layer's input and output) is fp32."""
    perception = build(checkpoints).perception.eval()
    x = features()
    dtypes = []
    handles = [
        layer.register_forward_pre_hook(lambda module, args: dtypes.append(args[0].dtype))
        for layer in perception.whisper.layers
    ]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layers = perception.encoder_layer_outputs(x)
        expected = reference_layer_outputs(perception, x)
    for handle in handles:
        handle.remove()
    assert dtypes == [torch.float32] * 8  # both runs
    assert all(torch.equal(a, b) for a, b in zip(layers, expected, strict=True))


# ---------------------------------------------------------------------- encoder dtype


def test_encoder_dtype_option(checkpoints):
    assert build(checkpoints).perception.encoder_dtype == torch.float32
    model = build(checkpoints, encoder_dtype="bfloat16")  # the config field
    assert {p.dtype for p in model.perception.whisper.parameters()} == {torch.bfloat16}
    perception = WhisperPerception(model.config)
    perception.set_encoder_dtype(torch.float16)
    assert perception.encoder_dtype == torch.float16 and model.config.encoder_dtype == "float16"
    perception.set_encoder_dtype("float32")
    assert {p.dtype for p in perception.whisper.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="encoder_dtype must be one of"):
        perception.set_encoder_dtype(torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_encoder_runs_in_its_own_dtype_under_autocast(checkpoints, dtype):
    """A bf16 / fp16 encoder ignores the caller's autocast (CPU autocast would otherwise feed fp16
    LayerNorm weights fp32 states and fail): the same states with and without it."""
    perception = build(checkpoints, encoder_dtype=str(dtype).removeprefix("torch.")).perception.eval()
    x = features()
    with torch.no_grad():
        plain = perception.encoder_layer_outputs(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = perception.encoder_layer_outputs(x)
    assert all(a.dtype == dtype and torch.equal(a, b) for a, b in zip(autocast, plain, strict=True))


def test_low_precision_encoder_states_against_fp64(checkpoints, whisper8):
    """The measurement behind the default (docs/training.md#the-frozen-encoder), on the 8-layer
    model: the states a bf16 connector reads, against an fp64 run. The reference (fp32 encoder)
    is off by the final bf16 rounding alone; a bf16 encoder is within the bf16 chain rule
    (LOW_PRECISION_FACTOR x BF16_RESOLUTION) here but clearly further off, so it is an option,
    not the default; an fp16 encoder stays within 2x the reference's error."""
    perception = build(checkpoints, whisper8, llm_dtype="bfloat16").perception.eval()
    ids = perception.connector.target_layer_ids
    x = features()
    truth_perception = copy.deepcopy(perception)
    truth_perception.whisper.double()
    truth = truth_perception.encoder_layer_outputs(x.double(), ids)

    def errors(dtype):
        perception.set_encoder_dtype(dtype)
        states = perception.encoder_layer_outputs(x, ids, dtype=torch.bfloat16)
        return [relative_norm_error(states[i], truth[i]) for i in ids]

    reference, bf16, fp16 = errors("float32"), errors("bfloat16"), errors("float16")
    assert max(reference) <= BF16_RESOLUTION / 2
    assert max(bf16) <= LOW_PRECISION_FACTOR * BF16_RESOLUTION
    assert min(b / r for b, r in zip(bf16, reference, strict=True)) > LOW_PRECISION_FACTOR
    assert max(f / r for f, r in zip(fp16, reference, strict=True)) <= LOW_PRECISION_FACTOR


# ---------------------------------------------------------------------- cached states


@pytest.mark.parametrize("llm_dtype", ["float32", "bfloat16"])
def test_cached_states_give_the_same_outputs(checkpoints, whisper8, tmp_path, llm_dtype):
    """Stored in the connector's dtype, the cached states are bit for bit what the connector reads
    from a run on the features (the same batch: a matmul's rounding may depend on the batch size).
    The connector's outputs then agree to rounding: the live states have the encoder's memory
    layout (time fastest, from the permuted conv output), the loaded ones are contiguous, and a
    GEMM may round differently on each."""
    perception = build(checkpoints, whisper8, llm_dtype=llm_dtype).perception.eval()
    cache = EncoderStateCache.for_perception(tmp_path / "cache", perception)
    assert cache.dtype == getattr(torch, llm_dtype)
    x = features(n=5)
    keys = [f"audio/{i}.wav" for i in range(5)]
    assert cache.fill(perception, zip(keys, x, strict=True), batch_size=5) == 5
    states = cache.get_batch(keys)
    num_layers, d_model = len(perception.connector.target_layer_ids), perception.whisper.config.d_model
    assert states.shape == (num_layers, 5, FRAMES, d_model) and states.dtype == cache.dtype
    size = state_bytes(num_layers, FRAMES, d_model, cache.dtype)
    assert size <= os.path.getsize(cache.path(keys[0])) <= size + 1024
    with torch.no_grad():
        ids = perception.connector.target_layer_ids
        live = perception.encoder_layer_outputs(x, ids, dtype=cache.dtype)
        bits = torch.int16 if cache.dtype == torch.bfloat16 else torch.int32
        for state, index in zip(states, ids, strict=True):
            assert torch.equal(state.view(bits), live[index].view(bits))
        cached = perception(encoder_states=states)
        for new, old in zip(cached, perception(x), strict=True):
            if llm_dtype == "float32":
                assert relative_error(new, old) <= MODULE_RELATIVE_TOLERANCE[torch.float32]
            else:
                assert relative_norm_error(new, old) <= BF16_RESOLUTION
        # A list of L states [N, T, D] works as the stacked tensor does.
        for new, old in zip(perception(encoder_states=list(states)), cached, strict=True):
            assert torch.equal(new, old)


def test_a_training_step_on_cached_states(checkpoints, tmp_path):
    """The model trains on cached states (batch_encoder_states instead of batch_features): the
    encoder does not run, and the loss and every trainable gradient are those of the step on the
    features. Both inputs at once, or states for another number of audios, are refused."""
    model = build(checkpoints).train()
    model.perception.eval()  # no Q-Former dropout: the two steps must draw the same
    batch = make_batch(transcription_lengths=(2, 1))
    cache = EncoderStateCache.for_perception(tmp_path, model.perception)
    keys = ["a.wav", "b.wav"]
    cache.fill(model.perception, zip(keys, batch["batch_features"], strict=True))

    def step(**inputs):
        model.zero_grad(set_to_none=True)
        total_training_loss(model(**inputs)).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    want = step(**batch)
    calls = []
    hook = model.perception.whisper.conv1.register_forward_hook(lambda *args: calls.append(1))
    got = step(**{**batch, "batch_features": None, "batch_encoder_states": cache.get_batch(keys)})
    hook.remove()
    assert calls == [] and got.keys() == want.keys()
    for name, grad in got.items():
        if name.endswith("key.bias"):  # the same score added to every key: zero up to rounding
            assert grad.abs().max() <= 1e-5 * got[name.replace("key.bias", "query.bias")].abs().max(), name
            continue
        assert relative_error(grad, want[name]) <= MODULE_RELATIVE_TOLERANCE[torch.float32], name
    with pytest.raises(ValueError, match="pass batch_features or batch_encoder_states, not both"):
        model(**{**batch, "batch_encoder_states": cache.get_batch(keys)})
    with pytest.raises(ValueError, match="batch_encoder_states 1: one of each per audio"):
        model(**{**batch, "batch_features": None, "batch_encoder_states": cache.get_batch(keys[:1])})


def test_cache_fill_skips_what_is_cached(checkpoints, tmp_path):
    perception = build(checkpoints).perception.eval()
    cache = EncoderStateCache.for_perception(tmp_path, perception)
    x = features(n=5)
    keys = [f"{i}.wav" for i in range(5)]
    assert cache.fill(perception, zip(keys[:3], x[:3], strict=True), batch_size=2) == 3
    first = os.path.getmtime(cache.path(keys[0]))
    assert cache.fill(perception, zip(keys, x, strict=True), batch_size=2) == 2
    assert os.path.getmtime(cache.path(keys[0])) == first and all(key in cache for key in keys)
    assert cache.fill(perception, zip(keys, x, strict=True), overwrite=True) == 5


def test_cache_refuses_states_of_another_encoder(checkpoints, tmp_path):
    perception = build(checkpoints).perception
    cache = EncoderStateCache.for_perception(tmp_path, perception)
    cache.fill(perception, [("a.wav", features(n=1)[0])])
    other = EncoderStateCache(tmp_path, encoder_model_id="other", layer_ids=[0, 1, 2, 3], dtype=torch.float32)
    with pytest.raises(ValueError, match="holds states of"):
        other.get("a.wav")
    save_file({"states": torch.zeros(4, FRAMES, 32)}, cache.path("b.wav"))  # no metadata
    with pytest.raises(ValueError, match="holds states of"):
        cache.get("b.wav")
    with pytest.raises(KeyError, match="no states for"):
        cache.get("c.wav")
    with pytest.raises(ValueError, match=r"states must be \[4, T, D\]"):
        cache.put("d.wav", torch.zeros(3, FRAMES, 32))


def test_forward_checks_its_inputs(checkpoints):
    perception = build(checkpoints).perception
    x = features()
    with pytest.raises(ValueError, match="exactly one of"):
        perception(x, encoder_states=[x])
    with pytest.raises(ValueError, match="exactly one of"):
        perception()
    with pytest.raises(ValueError, match=r"4 states \(target layers \[0, 1, 2, 3\]\)"):
        perception(encoder_states=torch.zeros(3, N, FRAMES, 32))
    with pytest.raises(ValueError, match="of one shape"):
        perception(encoder_states=[torch.zeros(N, FRAMES, 32)] * 3 + [torch.zeros(N + 1, FRAMES, 32)])
    with pytest.raises(ValueError, match="layer_ids must be encoder layer indices"):
        perception.encoder_layer_outputs(x, [4])
    with pytest.raises(ValueError, match="pad the features"):
        perception(x[..., :-2])


def test_large_v3_disk_cost():
    """The figure of docs/training.md: 4 layers x 1500 frames x 1280 x 2 bytes per 30 s clip."""
    assert state_bytes(4, 1500, 1280, torch.bfloat16) == 15_360_000
