"""Compiled decoding, `DeSTA25AudioModel.generate(..., compile=True)` (orca_model/compiled_decode.py).

On tiny random models in fp32: the same tokens as the eager path over several requests (prompt
lengths, audio, batch sizes, with and without audio), one graph per bucket and none more from one
token or one request to the next (torch._dynamo's counters), no graph break, the audio memory and
its derived tensors refilled in place for each request (a test that fails if a request decodes
with the previous request's memory), sampling with several returned sequences, and beam search
refused. Inductor on the CPU compiles slowly, so the module holds one model and compiles three
graphs in all: the reference path under `compile=True` (inductor's default mode on the CPU) for
two buckets, and the fused path (Triton interpreter), reached from chat messages, under dynamo's
eager backend. On a GPU a
further test checks that CUDA graphs are recorded once per bucket, not per request.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig

import orca_kernels
from call_counts import count_calls
from orca_kernels import reference
from orca_model import DeSTA25AudioModel
from orca_model.compiled_decode import MIN_CACHE_LENGTH, bucket_cache_length, bucket_rows, decoding_state
from tiny_models import build, make_batch, to_device

KEYS = ("input_ids", "attention_mask", "batch_features", "batch_transcription_ids", "batch_start_positions")


def make_lively(model) -> None:
    """Weights under which the tiny random model's greedy tokens vary from step to step and with
    the audio (with the checkpoint's, every row repeats one token): unit-scale token embeddings
    and output projection, and a loud injection whose gate varies per token."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        with torch.no_grad():
            for module in model.orca_cross_attns:
                module.gate_proj[2].weight.normal_()
                module.ln.weight.mul_(50)
            model.llm_model.get_input_embeddings().weight.normal_()
            model.llm_model.get_output_embeddings().weight.normal_()


def generate(model, batch, **kwargs):
    return model.generate(*(batch[key] for key in KEYS), **kwargs)


def graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    return counters["stats"]["unique_graphs"]


def without_audio(batch: dict) -> dict:
    return {**batch, "batch_features": None, "batch_transcription_ids": [], "batch_start_positions": []}


def audio_in_row_1_only(batch: dict) -> dict:
    return {
        **batch,
        "batch_features": batch["batch_features"][1:],
        "batch_transcription_ids": batch["batch_transcription_ids"][1:],
        "batch_start_positions": batch["batch_start_positions"][1:],
    }


@pytest.fixture(scope="module")
def model(checkpoints):
    # A fresh compile cache and counters: what other test modules compiled does not count.
    torch._dynamo.reset()
    counters.clear()
    model = build(checkpoints, "qwen3").eval()
    make_lively(model)
    yield model
    torch._dynamo.reset()


def test_buckets():
    assert [bucket_rows(n) for n in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 4, 8, 16]
    assert bucket_cache_length(1) == MIN_CACHE_LENGTH == 64
    assert [bucket_cache_length(n) for n in (64, 65, 300, 1024)] == [64, 128, 512, 1024]


def test_greedy_tokens_equal_eager_and_one_graph_per_bucket(model):
    """Requests of one bucket (2 rows, cache of 64): prompts of 12 and 15 tokens, with and without
    left padding, transcriptions or not, 5 to 8 new tokens, a batch without audio and one with
    audio in one row only. The first compiles the decode step once; no later token or request
    compiles anything."""
    requests = [
        (make_batch(transcription_lengths=(2, 1), seed=0), 8),
        (make_batch(length=15, seed=1, padded=False), 5),
        (without_audio(make_batch(seed=2)), 6),
        (audio_in_row_1_only(make_batch(length=14, transcription_lengths=(1, 3), seed=3)), 7),
    ]
    before = graphs()
    for index, (batch, new_tokens) in enumerate(requests):
        eager = generate(model, batch, max_new_tokens=new_tokens, do_sample=False)
        compiled = generate(model, batch, max_new_tokens=new_tokens, do_sample=False, compile=True)
        assert compiled.shape == (2, new_tokens), index
        assert torch.equal(compiled, eager), (index, compiled, eager)
        assert graphs() - before <= 1, f"request {index} compiled again"
    assert len(set(eager.flatten().tolist())) > 2, "the tokens should vary (make_lively)"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert model._injection.context.audio is None  # the context is cleared after each request
    assert list(decoding_state(model).buckets)[0][:2] == (2, 64)


def memory_of(model, batch: dict) -> torch.Tensor:
    rows = model._check_inputs(batch["input_ids"], batch["attention_mask"], None, *(batch[k] for k in KEYS[2:]))
    _, global_tokens, local_tokens, _ = model._prepare_inputs_for_llm(batch["input_ids"], *(batch[k] for k in KEYS[2:]))
    memory, _ = model._audio_memory(global_tokens, local_tokens, rows, batch["input_ids"].size(0))
    return memory


def test_each_request_decodes_with_its_own_audio(model):
    """The same prompts with other audio: the bucket's memory, its rotated copy and the static
    K/V cache are overwritten in place (same addresses), and the tokens are the new audio's. A
    compiled step that kept the previous request's memory would give the first audio's tokens."""
    first = make_batch(transcription_lengths=(2, 1), seed=4)
    second = {**first, "batch_features": make_batch(seed=5)["batch_features"]}
    eager_first = generate(model, first, max_new_tokens=6, do_sample=False)
    eager_second = generate(model, second, max_new_tokens=6, do_sample=False)
    assert not torch.equal(eager_first, eager_second), "the audio should change the tokens"

    assert torch.equal(generate(model, first, max_new_tokens=6, do_sample=False, compile=True), eager_first)
    bucket = next(b for key, b in decoding_state(model).buckets.items() if key[:2] == (2, 64))
    dtype = model.llm_model.dtype
    tensors = lambda: [bucket.memory, bucket.keep, bucket.audio_cache.rotated[dtype], *bucket.audio_cache.masks]  # noqa: E731
    addresses = [tensor.data_ptr() for tensor in tensors()] + [bucket.cache.layers[0].keys.data_ptr()]
    before = graphs()
    assert torch.equal(generate(model, second, max_new_tokens=6, do_sample=False, compile=True), eager_second)
    assert graphs() == before
    assert [tensor.data_ptr() for tensor in tensors()] + [bucket.cache.layers[0].keys.data_ptr()] == addresses
    with torch.no_grad():
        memory = memory_of(model, second)
    torch.testing.assert_close(bucket.memory, memory, rtol=0, atol=0)
    rotated = reference.audio_rope(memory, model.config.orca_audio_position_scale, model.orca_cross_attns[0].rope_theta)
    torch.testing.assert_close(bucket.audio_cache.rotated[dtype], rotated, rtol=0, atol=0)


def test_padded_batches_and_returned_sequences_share_a_bucket(model):
    """Three prompts are padded to four rows, and one or two prompts sampled with 4 or 2 returned
    sequences make four rows too: one graph for the three requests. The padding rows are dropped
    and never hold generation back (they are reported finished)."""
    before = graphs()
    batch = make_batch(batch_size=3, transcription_lengths=(1, 2, 0), seed=6)
    eager = generate(model, batch, max_new_tokens=6, do_sample=False)
    compiled = generate(model, batch, max_new_tokens=6, do_sample=False, compile=True)
    assert compiled.shape == (3, 6) and torch.equal(compiled, eager)
    assert graphs() - before == 1

    batch = make_batch(seed=7)
    torch.manual_seed(1)
    eager = generate(model, batch, max_new_tokens=5, do_sample=True, num_return_sequences=2)
    torch.manual_seed(1)
    compiled = generate(model, batch, max_new_tokens=5, do_sample=True, num_return_sequences=2, compile=True)
    assert compiled.shape == (4, 5) and torch.equal(compiled, eager)
    single = make_batch(batch_size=1, seed=8)
    sampled = generate(model, single, max_new_tokens=5, do_sample=True, num_return_sequences=4, compile=True)
    assert sampled.shape == (4, 5)
    assert graphs() - before == 1, "one graph for the 4-row bucket"


def test_unsupported_options_are_refused(model):
    batch = make_batch()
    before = graphs()
    with pytest.raises(ValueError, match=r"num_beams=2.*compile=False"):
        generate(model, batch, max_new_tokens=3, num_beams=2, compile=True)
    with pytest.raises(ValueError, match="use_cache=False"):
        generate(model, batch, max_new_tokens=3, use_cache=False, compile=True)
    with pytest.raises(ValueError, match="cache_implementation"):
        generate(model, batch, max_new_tokens=3, cache_implementation="static", compile=True)
    with pytest.raises(TypeError, match="compile must be"):
        generate(model, batch, max_new_tokens=3, compile="yes")
    assert graphs() == before
    # Beams still run eagerly.
    assert generate(model, batch, max_new_tokens=3, num_beams=2, do_sample=False).shape == (2, 3)


@pytest.mark.skipif(
    not orca_kernels.kernels_available("cpu"), reason="the fused kernels run on the CPU under TRITON_INTERPRET=1"
)
def test_chat_messages_decode_compiled_on_the_fused_path(tmp_path_factory, monkeypatch):
    """`generate(messages, compile=...)` ends in the compiled tensor path: the fused
    cross-attention (orca_kernels' ops inside the graph), each layer's K/V projected once per
    request before generation and read by the prefill and every compiled step, two requests with
    different audio on one graph. Dynamo's eager backend keeps the compile time down (the same
    code otherwise)."""
    from tiny_models import save_serving_checkpoints, serving_desta_config
    from tiny_tokenizer import LOCATOR

    checkpoints = save_serving_checkpoints(str(tmp_path_factory.mktemp("serving")), kinds=("qwen3",))
    model = DeSTA25AudioModel(serving_desta_config(checkpoints, use_fused_orca=True)).eval()
    make_lively(model)
    config = CompileConfig(backend="eager", mode=None, fullgraph=True, dynamic=False)
    calls = count_calls(orca_kernels, ["project_audio_kv"], monkeypatch.setattr)
    before = graphs()
    for seed in (9, 10):
        noise = np.random.default_rng(seed).standard_normal(8000).astype(np.float32)
        audio = {"audio": f"noise-{seed}.wav", "text": None, "waveform": 0.3 * noise}
        messages = [{"role": "user", "content": f"what is said? {LOCATOR}", "audios": [audio]}]
        options = {"max_new_tokens": 5, "do_sample": False, "transcribe": False}
        eager = model.generate(messages, **options).generated_ids
        calls["project_audio_kv"] = 0
        assert model.generate(messages, compile=config, **options).generated_ids == eager
        assert calls["project_audio_kv"] == len(model.orca_cross_attns)  # once per layer and request
    assert graphs() - before == 1
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_are_recorded_once_per_bucket(checkpoints, monkeypatch):
    """compile=True on a GPU (mode "reduce-overhead"): requests after the first replay the
    recorded CUDA graphs, none is recorded again, and the tokens are the eager path's."""
    from torch._inductor import cudagraph_trees

    recorded = []
    node_init = cudagraph_trees.CUDAGraphNode.__init__
    monkeypatch.setattr(
        cudagraph_trees.CUDAGraphNode,
        "__init__",
        lambda self, *args, **kwargs: recorded.append(1) or node_init(self, *args, **kwargs),
    )
    model = build(checkpoints, "qwen3", use_fused_orca=True).cuda().eval()
    make_lively(model)
    skips = counters["inductor"]["cudagraph_skips"]
    for index, seed in enumerate((11, 12, 13)):
        batch = to_device(make_batch(transcription_lengths=(2, 1), seed=seed), "cuda")
        eager = generate(model, batch, max_new_tokens=8, do_sample=False)
        if index == 1:
            recorded_by_first = len(recorded)
        assert torch.equal(generate(model, batch, max_new_tokens=8, do_sample=False, compile=True), eager)
    assert recorded_by_first >= 1 and len(recorded) == recorded_by_first, "a later request recorded a CUDA graph"
    assert counters["inductor"]["cudagraph_skips"] == skips, "the decode step ran without CUDA graphs"
