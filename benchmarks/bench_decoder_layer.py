"""One LLM decoder layer with ORCA's deep injection, forward+backward, use_fused False vs True.

A Hugging Face Qwen3 / Llama decoder layer (config written inline, random weights, frozen as in
ORCA training: its input still gets gradients) whose output goes through an
`OrcaGatedCrossAttention` over the audio memory, applied by orca_model's `DeepInjection` forward
hook exactly as in `DeSTA25AudioModel`. Providers:

- "eager": use_fused=False, the reference cross-attention after HF's eager decoder layer;
- "compiled": torch.compile of that layer call, its injection hook included (one graph);
- "orca": use_fused=True, the fused cross-attention (attention core by `backend="auto"`);
- "orca+compiled": torch.compile of the fused layer call, hook and fused ops in one graph.

On the CPU, without TRITON_INTERPRET=1, the fused cross-attention would run its reference path, so
the "orca" providers are left out there; with it, "orca+compiled" is listed but not run by default
(inductor around the interpreted kernels takes minutes; `benchmarks.run --all-providers` runs it).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding

from benchmarks import model_configs
from benchmarks.bench_cross_attention import COMPILE_ON_CPU, auto_info
from benchmarks.harness import Case, Provider, targets_gpu
from orca_kernels import kernels_available
from orca_model import DeepInjection, OrcaGatedCrossAttention, rope_theta_from_config

LAYER_CLASSES = {"qwen3": (Qwen3DecoderLayer, Qwen3RotaryEmbedding), "llama": (LlamaDecoderLayer, LlamaRotaryEmbedding)}

OPS = ("decoder_layer+injection",)  # the case ops this suite makes (benchmarks.run --only)

# (label, LLM config, batch, T_x, T_a): the training shapes of docs/model-shapes.md#training-shapes
# (T_a = K global + 375 local tokens). torch.compile of a layer takes ~20 s per provider and shape
# on a GPU (a forward and a forward+backward graph): gpu_check.sh gives this suite its own time
# slot, and `benchmarks.run --shapes` picks shapes.
FULL_SHAPES = [
    ("llama3.1-8b", model_configs.llama3_1_8b, 12, 300, 383),
    ("qwen3-4b", model_configs.qwen3_4b, 12, 300, 439),
    ("qwen3-0.6b", model_configs.qwen3_0_6b, 32, 300, 439),
]
QUICK_SHAPES = [("quick", model_configs.tiny_qwen3, 2, 16, 24)]


class InjectedDecoderLayer(nn.Module):
    """`layer` (decoder layer 0 of `llm_config`) with `cross_attn` hooked after it.

    The RoPE tables of the decoder for T_x positions are computed once, as the model computes
    them once per forward for all its layers. `decoder_layer` is the hooked layer call; the
    audio memory reaches the hook through `injection.context`, set around it by `forward`.
    """

    def __init__(
        self, llm_config: PretrainedConfig, seq_len: int, use_fused: bool, dtype: torch.dtype, device: torch.device
    ):
        super().__init__()
        layer_class, rotary_class = LAYER_CLASSES[llm_config.model_type]
        with torch.device(device):  # initialised where they run: a CPU init of 8B-layer weights takes seconds
            self.layer = layer_class(llm_config, layer_idx=0)
            self.cross_attn = OrcaGatedCrossAttention(
                llm_config.hidden_size,
                llm_config.num_attention_heads,
                rope_theta=rope_theta_from_config(llm_config),
                use_fused=use_fused,
            )
            rotary = rotary_class(llm_config)
        self.to(dtype).eval()
        self.layer.requires_grad_(False)
        self.injection = DeepInjection([self.layer], [self.cross_attn])
        with torch.no_grad():
            positions = torch.arange(seq_len, device=device)[None]
            self.position_embeddings = rotary(torch.empty(0, device=device, dtype=dtype), positions)

    def decoder_layer(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T_x, H] -> [B, T_x, H]: the layer (causal SDPA), then the injection hook."""
        return self.layer(hidden, attention_mask=None, position_embeddings=self.position_embeddings)

    def forward(self, hidden: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """hidden [B, T_x, H], audio memory [B, T_a, H] -> [B, T_x, H]."""
        with self.injection.context.active(audio):
            return self.decoder_layer(hidden)


def _compiled(module: InjectedDecoderLayer):
    # The memory context stays outside the graph; compiling the layer call traces its hook.
    decoder_layer = torch.compile(module.decoder_layer)

    def run(hidden, audio):
        with module.injection.context.active(audio):
            return decoder_layer(hidden)

    return run


def _reference_fp64(eager: InjectedDecoderLayer, llm_config: PretrainedConfig, seq_len: int):
    def run(hidden, audio):
        # Built at the call, so that an fp64 copy of each layer is not held for the whole run.
        module = InjectedDecoderLayer(llm_config, seq_len, False, torch.float64, hidden.device)
        module.load_state_dict(eager.state_dict())
        return module(hidden, audio)

    return run


def cases(device: torch.device, quick: bool) -> list[Case]:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    fused_runs = targets_gpu(device) or kernels_available(device)
    compile_skip = None if targets_gpu(device) else COMPILE_ON_CPU
    result = []
    for label, make_config, batch, t_x, t_a in QUICK_SHAPES if quick else FULL_SHAPES:
        llm_config = make_config(num_layers=1)
        size, heads = llm_config.hidden_size, llm_config.num_attention_heads
        eager = InjectedDecoderLayer(llm_config, t_x, False, dtype, device)
        with torch.no_grad():
            eager.cross_attn.gate_proj[2].weight.normal_(std=0.02)  # a gate that depends on the token
        # The compiled providers last: a time budget that cuts the case keeps eager and orca.
        providers = [Provider("eager", eager)]
        compiled = [Provider("compiled", _compiled(eager))]
        parameters = list(eager.cross_attn.parameters())
        if fused_runs:
            fused = InjectedDecoderLayer(llm_config, t_x, True, dtype, device)
            fused.load_state_dict(eager.state_dict())
            providers.append(Provider("orca", fused))
            compiled.append(Provider("orca+compiled", _compiled(fused), skip_here=compile_skip))
            parameters += fused.cross_attn.parameters()
        providers += compiled

        def make_inputs(batch=batch, t_x=t_x, t_a=t_a, size=size):
            hidden = torch.randn(batch, t_x, size, device=device, dtype=dtype, requires_grad=True)
            return hidden, torch.randn(batch, t_a, size, device=device, dtype=dtype, requires_grad=True)

        result.append(
            Case(
                op="decoder_layer+injection",
                shape=f"{label} {llm_config.model_type} B{batch} Tx{t_x} H{size} h{heads} Ta{t_a}",
                dtype=dtype,
                make_inputs=make_inputs,
                providers=providers,
                reference_fp64=_reference_fp64(eager, llm_config, t_x),
                parameters=parameters,
                info=auto_info(batch, t_x, t_a, heads, size // heads, dtype, device),
            )
        )
    return result
