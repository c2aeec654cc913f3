"""The per-token path of the injected cross-attention is ready for CUDA graphs.

After the first step of a request has filled the AudioMemoryCache, a decode step (one query
row per sequence) must not read a value on the host (`.item()`, `bool(tensor)`, `nonzero`, ...:
each one synchronises with the GPU and breaks graph capture), must not recompute anything from
the memory (RoPE, the K/V projection, the mask-derived tensors), and must give what the
uncached module gives. On a CPU the host reads are found with a dispatch mode that records every
operator whose result is read on the host; on a GPU one decode step is captured in a CUDA graph
and replayed.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import orca_kernels
from call_counts import count_calls
from orca_model.cross_attention import AudioMemoryCache, OrcaGatedCrossAttention

HIDDEN, HEADS, AUDIO_LENGTH, BATCH = 32, 4, 9, 3

# Operators that read a tensor's value on the host (or size their output by it), i.e. a device
# synchronisation on CUDA.
HOST_READS = {
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::is_nonzero",
    "aten::nonzero",
    "aten::masked_select",
    "aten::equal",
    "aten::allclose",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::unique_dim",
    "aten::repeat_interleave",
}


class HostReadRecorder(TorchDispatchMode):
    """Records the host-reading operators dispatched inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in HOST_READS:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_the_recorder_sees_host_reads():
    x = torch.ones(3)
    with HostReadRecorder() as recorder:
        x.sum().item()
        bool(x[0])
        x.nonzero()
        (x > 0).any().item()
    assert len(recorder.seen) == 4, recorder.seen


def make_request(device, dtype=torch.float32, use_fused=True):
    """A module, an audio memory [B, T_a, H] and its keep-mask, where row 1 has no audio."""
    torch.manual_seed(0)
    module = OrcaGatedCrossAttention(HIDDEN, HEADS, rope_theta=1e6, use_fused=use_fused).to(device, dtype).eval()
    audio = torch.randn(BATCH, AUDIO_LENGTH, HIDDEN, device=device, dtype=dtype)
    keep = torch.ones(BATCH, AUDIO_LENGTH, dtype=torch.bool, device=device)
    keep[0, 6:] = False
    keep[1] = False
    return module, audio, keep


@pytest.mark.parametrize("use_fused", [True, False])
def test_decode_steps_read_nothing_on_the_host(triton_device, use_fused, monkeypatch):
    module, audio, keep = make_request(triton_device, use_fused=use_fused)
    cache = AudioMemoryCache()
    prompt = torch.randn(BATCH, 5, HIDDEN, device=triton_device)
    with torch.no_grad():
        module(prompt, audio, keep, audio_cache=cache)  # the prefill fills the cache
        calls = count_calls(orca_kernels, ["audio_rope", "project_audio_kv"], monkeypatch.setattr)
        steps = []
        for step in range(3):
            token = torch.randn(BATCH, 1, HIDDEN, device=triton_device)
            with HostReadRecorder() as recorder:
                steps.append((token, module(token, audio, keep, audio_cache=cache)))
            assert recorder.seen == [], f"decode step {step} read tensors on the host: {recorder.seen}"
        assert calls == {"audio_rope": 0, "project_audio_kv": 0}, "a decode step recomputed the memory"
        for token, out in steps:
            torch.testing.assert_close(out, module(token, audio, keep), rtol=0, atol=0)  # an uncached step
            torch.testing.assert_close(out[1], token[1], rtol=0, atol=0)  # no audio: unchanged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_captures_in_a_cuda_graph(dtype):
    """One decode step captured after the prefill and warm-up, replayed on new tokens: the
    replay equals the eager step on the same token."""
    device = torch.device("cuda")
    module, audio, keep = make_request(device, dtype)
    cache = AudioMemoryCache()
    static_token = torch.randn(BATCH, 1, HIDDEN, device=device, dtype=dtype)
    with torch.no_grad():
        module(torch.randn(BATCH, 5, HIDDEN, device=device, dtype=dtype), audio, keep, audio_cache=cache)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles and autotunes outside the capture
            for _ in range(2):
                module(static_token, audio, keep, audio_cache=cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = module(static_token, audio, keep, audio_cache=cache)
        for _ in range(3):
            token = torch.randn(BATCH, 1, HIDDEN, device=device, dtype=dtype)
            static_token.copy_(token)
            graph.replay()
            torch.testing.assert_close(static_out, module(token, audio, keep, audio_cache=cache), rtol=0, atol=0)
