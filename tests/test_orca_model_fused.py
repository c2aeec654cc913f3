"""`use_fused_orca=True` against `False` on the same weights, for the whole DeSTA25AudioModel
(tiny random Whisper + Qwen3 / Llama checkpoints loaded with from_pretrained): fp32 parity of the
logits, losses and gradients; bf16 autocast (how users train) against an fp32 run; checkpoints
moving between the two modes; the one switch flipping every fused part at once; fused generation
with its per-request audio K/V cache; the example script's `--use-fused-orca`.

The fused kernels run on CUDA, and on the CPU under TRITON_INTERPRET=1 (set before importing
orca_kernels): these tests run on the `triton_device` of conftest.py and are skipped where there
is none. The tests that compare numbers also check that the fused ops really ran (counted
calls), so that a silent fallback to the reference cannot pass for parity.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen3ForCausalLM, WhisperForConditionalGeneration

import orca_kernels
from call_counts import count_calls
from orca_kernels import reference
from orca_model import DeSTA25AudioModel, OrcaGatedCrossAttention, total_training_loss
from tiny_models import build, llm_config, make_batch, to_device, whisper_config
from tolerances import MODEL_RELATIVE_TOLERANCE, assert_no_worse_than_unfused, relative_error

NUM_LAYERS = 2  # decoder layers of the tiny LLMs: one injected cross-attention each
LENGTH = 10  # prompt tokens: short, the interpreter's cost grows with the rows
ORCA_LOSSES = {"L_ortho_diversity", "L_ortho_qformer_local", "L_align_layerwise"}
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_tiny.py"


@pytest.fixture(autouse=True)
def _fp32_without_tf32():
    """fp32 parity needs fp32 convolutions and GEMMs: on a GPU, cuDNN's TF32 (on by default)
    would give the unfused Conv1d errors of ~1e-3. (Plain assignment, not monkeypatch: the
    matmul flag is a computed attribute that monkeypatch cannot always restore.)"""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(params=["qwen3", "llama"])
def kind(request):
    return request.param


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts of the fused ops' public entry points, which orca_model calls like any user: the
    connector's Conv1d, the one fused ortho call per forward, and the per-layer audio K/V
    projection (once per layer and request)."""
    return count_calls(orca_kernels, ["local_branch", "ortho_losses", "project_audio_kv"], monkeypatch.setattr)


def build_pair(checkpoints, kind, device, **overrides) -> tuple[DeSTA25AudioModel, DeSTA25AudioModel]:
    """(unfused, fused) with the same weights. The trainable ones are moved off their
    initialisation so that every parameter shapes the outputs (the gate's last Linear starts at
    zero, which would cut gate_proj.0 off the gradient) and the audio changes the tokens."""
    unfused = build(checkpoints, kind, **overrides)
    with torch.no_grad():
        for param in unfused.parameters():
            if param.requires_grad:
                param.add_(0.02 * torch.randn_like(param))
        for module in unfused.orca_cross_attns:
            module.gate_proj[2].weight.normal_(std=0.5)
            module.ln.weight.mul_(4)
    fused = build(checkpoints, kind, use_fused_orca=True, **overrides)
    result = fused.load_state_dict(unfused.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    return unfused.to(device), fused.to(device)


def train_step(model: DeSTA25AudioModel, batch: dict, *, autocast: bool = False):
    """A training forward (LM + ORCA losses) and backward -> (outputs, {name: grad} of the
    trainable parameters). Reseeded first: the Q-Former's dropout then draws the same masks in
    every model."""
    model.train()
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    torch.manual_seed(1234)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        outputs = model(**batch)
        loss = total_training_loss(outputs)
    loss.backward()
    return outputs, {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def assert_model_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.dtype == expected.dtype, f"{name}: {actual.dtype} != {expected.dtype}"
    error = relative_error(actual, expected)
    assert error <= MODEL_RELATIVE_TOLERANCE[torch.float32], f"{name}: relative error {error:.3e}"


def test_fused_matches_unfused_in_fp32(checkpoints, kind, triton_device, fused_calls):
    unfused, fused = build_pair(checkpoints, kind, triton_device)
    batch = to_device(make_batch(length=LENGTH, transcription_lengths=(2, 1)), triton_device)  # spans: alignment loss
    want, want_grads = train_step(unfused, batch)
    assert fused_calls == {"local_branch": 0, "ortho_losses": 0, "project_audio_kv": 0}
    got, got_grads = train_step(fused, batch)
    assert fused_calls == {"local_branch": 1, "ortho_losses": 1, "project_audio_kv": NUM_LAYERS}

    # In training the fused model's LM loss needs no logits (orca_model.lm_loss): none are
    # returned; the LM head's input, the final hidden states, stands in for them.
    assert got.logits is None and want.logits is not None
    assert_model_close(got.hidden_states[-1], want.hidden_states[-1], "final hidden states")
    assert_model_close(got.loss, want.loss, "LM loss")
    assert set(got.orca_losses) == set(want.orca_losses) == ORCA_LOSSES
    for name in ORCA_LOSSES:
        assert_model_close(got.orca_losses[name], want.orca_losses[name], name)
    assert list(got_grads) == list(want_grads) == fused.trainable_parameter_names
    for name, grad in got_grads.items():
        assert grad is not None and want_grads[name] is not None, name
        if name.endswith("key.bias"):
            # A key bias adds the same score to every key of a query: its gradient is zero up to
            # rounding, and a relative error of rounding noise means nothing.
            scale = got_grads[name.replace("key.bias", "query.bias")].abs().max()
            assert grad.abs().max() <= 1e-5 * scale and want_grads[name].abs().max() <= 1e-5 * scale, name
            continue
        assert grad.abs().sum() > 0, f"{name} gets no gradient"
        assert_model_close(grad, want_grads[name], f"grad {name}")


def gradient_groups(names: list[str]) -> dict[str, list[str]]:
    """Trainable parameters by component: each cross-attention layer, the connector's global
    branch (queries, Q-Former, projection) and its local branch."""
    groups: dict[str, list[str]] = {}
    for name in names:
        if name.startswith("orca_cross_attns."):
            group = ".".join(name.split(".")[:2])
        else:
            group = "local branch" if name.startswith("perception.connector.local_") else "global branch"
        groups.setdefault(group, []).append(name)
    return groups


def record_layer_dtypes(model: DeSTA25AudioModel) -> list[torch.dtype]:
    dtypes: list[torch.dtype] = []
    for module in model.orca_cross_attns:
        module.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    return dtypes


def test_bf16_autocast_agrees_with_unfused(checkpoints, triton_device, fused_calls):
    """How users train: the LLM, connector and cross-attention in bf16 (the configs' llm_dtype,
    docs/reference-behaviour.md#bf16-parameters-without-master-weights) under bf16 autocast. The
    fused model gives the unfused model's dtypes everywhere (audio tokens, each injected layer's
    output -- the residual stream, docs/reference-behaviour.md#residual-stream-turns-fp32-under-autocast
    --, logits, every ORCA loss, every gradient) and, against an fp32 run of the same weights
    without autocast, is no further off than the unfused model (tolerances.BF16_RESOLUTION).
    Qwen3 only, to keep the interpreter's time down: the fused layers do not depend on the LLM.

    Under the interpreter (CPU CI) bf16 dot operands are upcast to fp32, so the attention's
    probabilities enter P·V unrounded, as they do not on a GPU; the GPU run of this test is the
    full bf16 check."""
    kind = "qwen3"
    unfused, fused = build_pair(checkpoints, kind, triton_device, llm_dtype="bfloat16")
    truth_model = build(checkpoints, kind)  # fp32
    truth_model.load_state_dict(unfused.state_dict())  # bf16 values, exact in fp32
    truth_model.llm_model.load_state_dict(unfused.llm_model.state_dict())
    truth_model.to(triton_device)
    for model in (unfused, fused, truth_model):
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # about numerics; a GPU draws other masks for bf16 than for fp32 tensors
    batch = to_device(make_batch(length=LENGTH, transcription_lengths=(2, 1)), triton_device)
    layer_dtypes = {"unfused": record_layer_dtypes(unfused), "fused": record_layer_dtypes(fused)}

    truth, truth_grads = train_step(truth_model, batch)
    want, want_grads = train_step(unfused, batch, autocast=True)
    got, got_grads = train_step(fused, batch, autocast=True)
    assert fused_calls == {"local_branch": 1, "ortho_losses": 1, "project_audio_kv": NUM_LAYERS}

    assert len(layer_dtypes["fused"]) == NUM_LAYERS
    assert layer_dtypes["fused"] == layer_dtypes["unfused"]
    for field in ("audio_global", "audio_local", "loss"):
        assert getattr(got, field).dtype == getattr(want, field).dtype, field
    assert got.logits is None  # the fused LM loss in training (orca_model.lm_loss)
    got_hidden, want_hidden, truth_hidden = (out.hidden_states[-1] for out in (got, want, truth))
    assert got_hidden.dtype == want_hidden.dtype
    assert set(got.orca_losses) == set(want.orca_losses) == ORCA_LOSSES
    assert {k: v.dtype for k, v in got.orca_losses.items()} == {k: v.dtype for k, v in want.orca_losses.items()}
    assert {k: v.dtype for k, v in got_grads.items()} == {k: v.dtype for k, v in want_grads.items()}

    assert_no_worse_than_unfused(got_hidden, want_hidden, truth_hidden, name="final hidden states")
    assert_no_worse_than_unfused(got.loss, want.loss, truth.loss, name="LM loss")
    for name in ORCA_LOSSES:
        assert_no_worse_than_unfused(got.orca_losses[name], want.orca_losses[name], truth.orca_losses[name], name=name)
    for group, names in gradient_groups(fused.trainable_parameter_names).items():
        assert all(torch.isfinite(got_grads[name]).all() for name in names), group
        a, b, t = (
            torch.cat([grads[name].flatten().double() for name in names])
            for grads in (got_grads, want_grads, truth_grads)
        )
        assert_no_worse_than_unfused(a, b, t, name=f"gradients of the {group}")


def eval_outputs(model: DeSTA25AudioModel, batch: dict):
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    return out.logits, out.orca_losses


def test_checkpoints_move_between_fused_and_unfused(checkpoints, triton_device, tmp_path, fused_calls):
    """A checkpoint saved in one mode loads in the other with no missing or unexpected keys,
    the same tensors and the same outputs (within the fp32 model tolerance)."""
    unfused, fused = build_pair(checkpoints, "qwen3", triton_device)
    batch = to_device(make_batch(length=LENGTH, transcription_lengths=(2, 0)), triton_device)
    assert list(fused.state_dict()) == list(unfused.state_dict())
    for source, target_fused in ((fused, False), (unfused, True)):
        directory = tmp_path / ("from_fused" if source is fused else "from_unfused")
        source.save_pretrained(directory)
        loaded = DeSTA25AudioModel.from_pretrained(directory, use_fused_orca=target_fused).to(triton_device)
        assert loaded.config.use_fused_orca is target_fused
        assert all(module.use_fused is target_fused for module in loaded.orca_cross_attns)
        result = loaded.load_state_dict(source.state_dict())  # from_pretrained loads strictly too
        assert result.missing_keys == [] and result.unexpected_keys == []
        loaded_state = loaded.state_dict()
        assert list(loaded_state) == list(source.state_dict())
        for key, value in source.state_dict().items():
            assert torch.equal(loaded_state[key], value), key
        calls_before = fused_calls["project_audio_kv"]
        logits, losses = eval_outputs(loaded, batch)
        want_logits, want_losses = eval_outputs(source, batch)
        assert fused_calls["project_audio_kv"] == calls_before + NUM_LAYERS  # exactly one of the two ran fused
        assert_model_close(logits, want_logits, "logits")
        assert set(losses) == set(want_losses) == {"L_ortho_diversity", "L_ortho_qformer_local"}
        for name in losses:
            assert_model_close(losses[name], want_losses[name], name)


@pytest.fixture
def paths_taken(monkeypatch):
    """Which path each fused part takes: `paths_taken(model, batch)` runs one eval forward and
    returns {part: [paths]}, part "connector", "cross_attn {i}" or "losses", path "fused" or
    "reference". Every part's two entry points are spied on, so a part that ran neither or both
    shows up too."""
    seen: list[tuple[str, str]] = []
    model_parts: dict[int, str] = {}

    def spy(module, name, path, part_of):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen.append((part_of(*args), path))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    # The cross-attention ops take the module's in_proj_weight third, after the hidden states and memory.
    by_in_proj = lambda hidden, memory, in_proj_weight, *rest: model_parts[id(in_proj_weight)]
    spy(orca_kernels, "local_branch", "fused", lambda *args: "connector")
    spy(orca_kernels, "attend_audio_kv", "fused", by_in_proj)
    spy(reference, "attend_rotated", "reference", by_in_proj)
    spy(orca_kernels, "ortho_losses", "fused", lambda *args: "losses")
    spy(reference, "ortho_cross_loss", "reference", lambda *args: "losses")

    def run(model: DeSTA25AudioModel, batch: dict) -> dict[str, list[str]]:
        model_parts.clear()
        for i, module in enumerate(model.orca_cross_attns):
            model_parts[id(module.cross_attn.in_proj_weight)] = f"cross_attn {i}"
        seen.clear()
        # The unfused Conv1d is the module itself; the fused path only reads its parameters.
        conv = model.perception.connector.local_conv
        handle = conv.register_forward_hook(lambda *args: seen.append(("connector", "reference")))
        try:
            eval_outputs(model, batch)
        finally:
            handle.remove()
        paths: dict[str, list[str]] = {}
        for part, path in seen:
            paths.setdefault(part, []).append(path)
        return paths

    return run


def set_by_method(model: DeSTA25AudioModel, enabled: bool) -> None:
    model.set_use_fused_orca(enabled)


def set_config_field(model: DeSTA25AudioModel, enabled: bool) -> None:
    model.config.use_fused_orca = enabled


@pytest.mark.parametrize("switch", [set_by_method, set_config_field], ids=["set_use_fused_orca", "config field"])
@pytest.mark.parametrize("built_fused", [False, True], ids=["built unfused", "built fused"])
def test_one_switch_flips_every_fused_part(checkpoints, triton_device, paths_taken, switch, built_fused):
    """The model's one switch, flipped after construction either way (by `set_use_fused_orca` or
    by assigning `config.use_fused_orca`), moves every fused part at once -- the connector's
    Conv1d, each cross-attention module, the ORCA losses -- and each takes exactly one path."""
    model = build(checkpoints, "qwen3", use_fused_orca=built_fused).to(triton_device)
    batch = to_device(make_batch(length=LENGTH), triton_device)
    parts = ["connector", *(f"cross_attn {i}" for i in range(NUM_LAYERS)), "losses"]
    for enabled in (not built_fused, built_fused):
        switch(model, enabled)
        assert model.config.use_fused_orca is enabled
        assert all(module.use_fused is enabled for module in model.orca_cross_attns)
        path = "fused" if enabled else "reference"
        assert paths_taken(model, batch) == {part: [path] for part in parts}, f"use_fused_orca={enabled}"


def test_a_models_parts_have_no_switch_of_their_own(checkpoints):
    """The config is the only switch: the parts share the model's config, a module's `use_fused`
    cannot be set apart from it, and the method refuses a non-bool (a truthy string would
    otherwise read as True)."""
    model = build(checkpoints, "qwen3")
    assert model.perception.connector.config is model.config
    assert all(module.config is model.config for module in model.orca_cross_attns)
    with pytest.raises(AttributeError):
        model.orca_cross_attns[0].use_fused = True
    with pytest.raises(TypeError, match="enabled must be a bool"):
        model.set_use_fused_orca("False")
    assert model.config.use_fused_orca is False
    with pytest.raises(ValueError, match="use_fused / attention_backend or config, not both"):
        OrcaGatedCrossAttention(64, 4, use_fused=True, config=model.config)
    with pytest.raises(ValueError, match="use_fused / attention_backend or config, not both"):
        OrcaGatedCrossAttention(64, 4, attention_backend="sdpa", config=model.config)
    with pytest.raises(AttributeError):
        model.orca_cross_attns[0].attention_backend = "triton"
    model.config.orca_attention_backend = "sdpa"
    assert all(module.attention_backend == "sdpa" for module in model.orca_cross_attns)
    with pytest.raises(ValueError, match="attention_backend must be one of 'auto', 'sdpa', 'triton'"):
        OrcaGatedCrossAttention(64, 4, attention_backend="cudnn")


def generate(model: DeSTA25AudioModel, batch: dict, **kwargs) -> torch.Tensor:
    keys = ("input_ids", "attention_mask", "batch_features", "batch_transcription_ids", "batch_start_positions")
    return model.generate(*(batch[key] for key in keys), **kwargs)


def test_fused_greedy_generation(checkpoints, triton_device, fused_calls):
    """Greedy generation in fused mode: with the LLM's KV cache equals without it and equals the
    unfused model's tokens; the audio K/V projection runs once per layer per request (not per
    decode step), with and without the LLM's cache. (Both LLMs generate in
    test_orca_model_modeling.py; the fused layers do not depend on the LLM.)"""
    unfused, fused = build_pair(checkpoints, "qwen3", triton_device)
    batch = to_device(make_batch(length=LENGTH, transcription_lengths=(2, 1)), triton_device)
    steps = 3
    cached = generate(fused.eval(), batch, max_new_tokens=steps, do_sample=False, use_cache=True)
    assert fused_calls["project_audio_kv"] == NUM_LAYERS
    uncached = generate(fused, batch, max_new_tokens=steps, do_sample=False, use_cache=False)
    assert fused_calls["project_audio_kv"] == 2 * NUM_LAYERS
    assert cached.shape == (2, steps)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, generate(unfused.eval(), batch, max_new_tokens=steps, do_sample=False))
    assert fused_calls["project_audio_kv"] == 2 * NUM_LAYERS  # the unfused model projects on its own
    assert fused._injection.context.audio is None


def load_example():
    spec = importlib.util.spec_from_file_location("train_tiny_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_trains_with_fused_kernels(triton_device, fused_calls, monkeypatch, capsys):
    """examples/train_tiny.py --use-fused-orca runs (one step here; it runs on the CPU, where the
    fused ops need the interpreter)."""
    if triton_device.type != "cpu":
        pytest.skip("the example runs on the CPU")
    example = load_example()
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--use-fused-orca", "--steps", "1", "--batch-size", "2"])
    example.main()
    printed = capsys.readouterr().out
    assert "use_fused_orca=True" in printed
    step_lines = [line for line in printed.splitlines() if line.startswith("step")]
    assert len(step_lines) == 1 and "L_ortho_diversity" in step_lines[0] and "nan" not in step_lines[0]
    assert fused_calls == {"local_branch": 1, "ortho_losses": 1, "project_audio_kv": NUM_LAYERS}


def readme_model_example() -> str:
    """The python block of README.md's "Using it" section that sets use_fused_orca."""
    section = (ROOT / "README.md").read_text().split("## Using it", 1)[1].split("\n## ", 1)[0]
    blocks = [block for block in re.findall(r"```python\n(.*?)```", section, re.S) if "use_fused_orca" in block]
    assert len(blocks) == 1, "README's Using it section should hold one use_fused_orca example"
    return blocks[0]


def test_readme_model_example_runs(tmp_path, monkeypatch):
    """README's example runs as written: its config file is one of configs/, and tiny random
    checkpoints stand in at the config's hub ids (transformers loads an existing local directory
    of that name instead of the hub)."""
    code = readme_model_example()
    (config_path,) = re.findall(r'"(configs/[^"]+\.json)"', code)
    fields = json.loads((ROOT / config_path).read_text())
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / config_path, tmp_path / config_path)
    WhisperForConditionalGeneration(whisper_config()).save_pretrained(tmp_path / fields["encoder_model_id"])
    Qwen3ForCausalLM(llm_config("qwen3")).save_pretrained(tmp_path / fields["llm_model_id"])
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert isinstance(model, DeSTA25AudioModel) and model.config.use_fused_orca
    assert all(module.use_fused for module in model.orca_cross_attns)
    assert model.config.orca_global_num_tokens == fields["orca_global_num_tokens"] == 64
    assert model.llm_model.dtype == torch.bfloat16
