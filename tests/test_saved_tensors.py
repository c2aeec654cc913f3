"""What autograd keeps alive for the backward of each op: no more than the reference path keeps.

A fused op exists to save memory as well as time: its backward should recompute what is cheap
(norms, softmax probabilities, LayerNorm statistics, the gate) instead of holding activations.
`torch.autograd.graph.saved_tensors_hooks` sees every tensor autograd saves during a forward,
both from `ctx.save_for_backward` in the ops' autograd formulas and from PyTorch's own ops in the
reference. What counts is memory kept alive, so saved tensors are grouped by storage (k and v as
column views of one packed projection are one buffer, counted once, by its whole size).

Fairness: storages the caller passed in (the inputs: parameters, activations) are kept by the
caller anyway, so the bound is on the *extra* bytes, the storages autograd alone holds on to
(intermediates and outputs). An op could still hide a cost by saving an input it does not need
(keeping an upstream activation alive), so each test also names exactly which inputs and which
new buffers the op saves. fp32 on the CPU, B=2, T=37, H=64 (the kernels' paths on CUDA are the
same autograd formulas; on a GPU machine these tests run there).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import orca_kernels
from orca_kernels import _extension, reference
from orca_kernels.gated_residual import gated_residual

needs_extension = pytest.mark.skipif(not _extension.LOADED, reason="orca_kernels._C is not loaded")

B, T, H = 2, 37, 64
T_AUDIO, HEADS, GLOBAL_TOKENS = 41, 4, 8
F32 = torch.float32


@dataclasses.dataclass
class Saved:
    """The storages autograd saved during one forward: `inputs` {input index: bytes} for storages
    of the inputs, `new` [(elements, dtype, a view's shape)] for every other storage."""

    inputs: dict[int, int]
    new: list[tuple[int, torch.dtype, tuple[int, ...]]]

    @property
    def new_bytes(self) -> int:
        return sum(elements * dtype.itemsize for elements, dtype, _ in self.new)

    @property
    def total_bytes(self) -> int:
        return self.new_bytes + sum(self.inputs.values())

    def new_buffers(self) -> list[tuple[int, torch.dtype]]:
        return sorted((elements, dtype) for elements, dtype, _ in self.new)

    def describe(self) -> str:
        new = ", ".join(f"{list(shape)} {dtype}" for _, dtype, shape in self.new) or "nothing"
        return f"inputs {sorted(self.inputs)}; new: {new} ({self.new_bytes} bytes)"


def saved_by(fn, inputs) -> Saved:
    """Run fn(*inputs) on fresh leaves (floating inputs require grad) and record what autograd saves."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in inputs]
    input_storages = {
        t.untyped_storage().data_ptr(): index for index, t in enumerate(leaves) if isinstance(t, torch.Tensor)
    }
    storages: dict[int, tuple[int, torch.dtype, tuple[int, ...]]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        # The first view seen names the buffer; the bytes are the whole storage's.
        storages.setdefault(storage.data_ptr(), (storage.nbytes(), tensor.dtype, tuple(tensor.shape)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*leaves)
    saved = Saved(inputs={}, new=[])
    for pointer, (nbytes, dtype, shape) in storages.items():
        if nbytes == 0:
            continue  # an empty tensor keeps nothing alive
        if pointer in input_storages:
            saved.inputs[input_storages[pointer]] = nbytes
        else:
            saved.new.append((nbytes // dtype.itemsize, dtype, shape))
    return saved


def assert_saves(op: Saved, ref: Saved, inputs: set[int], new: list[tuple[int, torch.dtype]]) -> None:
    """The op saves exactly `inputs` (indices) and the `new` buffers [(elements, dtype)], and no
    more bytes than the reference, neither beyond the inputs nor in all."""
    assert set(op.inputs) == inputs, f"op saves {op.describe()}; expected inputs {sorted(inputs)}"
    assert op.new_buffers() == sorted(new), f"op saves {op.describe()}; expected new buffers {sorted(new)}"
    assert op.new_bytes <= ref.new_bytes, f"op: {op.describe()}\nreference: {ref.describe()}"
    assert op.total_bytes <= ref.total_bytes, f"op: {op.describe()}\nreference: {ref.describe()}"


def test_measurement_sees_intermediates_views_and_inputs():
    """The recorder itself: an intermediate a backward needs is counted (sin saves x * 2), a
    buffer saved twice through two views counts once, and a saved input is listed as an input."""
    x = torch.randn(B, T, H)

    def fn(x):
        doubled = x * 2  # mul by a constant saves nothing
        # sin saves `doubled`, cos a transposed view of it (the same storage), exp its output.
        return doubled.sin() + doubled.transpose(0, 1).cos().transpose(0, 1) + x.exp()

    saved = saved_by(fn, (x,))
    assert saved.inputs == {}
    assert saved.new_buffers() == sorted([(B * T * H, F32), (B * T * H, F32)]), saved.describe()
    saved = saved_by(torch.sin, (x,))
    assert saved.inputs == {0: x.numel() * 4} and saved.new == [], saved.describe()


# ----------------------------------------------------------------------------- the ops


@needs_extension
def test_strided_conv1d(device):
    """x and weight (both inputs), as F.conv1d saves them: no output, no im2col or transposed copy."""
    inputs = (torch.randn(B, T, H, device=device), torch.randn(H, H, 5, device=device), torch.randn(H, device=device))
    op = saved_by(lambda x, w, b: orca_kernels.strided_conv1d(x, w, b, 4, 2, backend="extension"), inputs)
    ref = saved_by(lambda x, w, b: orca_kernels.strided_conv1d(x, w, b, 4, 2, backend="torch"), inputs)
    assert_saves(op, ref, inputs={0, 1}, new=[])


ORTHO_LOSSES = {
    "ortho_losses": lambda g, l, backend: orca_kernels.ortho_losses(g, l, 16, backend=backend),
    "ortho_cross_loss": lambda g, l, backend: orca_kernels.ortho_cross_loss(g, l, 16, backend=backend),
    "ortho_diversity_loss": lambda g, l, backend: orca_kernels.ortho_diversity_loss(g, backend=backend),
}


@pytest.mark.parametrize("which", sorted(ORTHO_LOSSES))
def test_ortho_losses(triton_device, which):
    """The token tensors, the similarities of the global rows to the columns the losses use and
    the norms of the token-list entries: no normalised copies of the tokens, no gathered local
    rows. 37 local tokens sampled down to 16 exercise the gather."""
    g, l = torch.randn(B, GLOBAL_TOKENS, H, device=triton_device), torch.randn(B, T, H, device=triton_device)
    fn = ORTHO_LOSSES[which]
    op = saved_by(lambda g, l: fn(g, l, "triton"), (g, l))
    ref = saved_by(lambda g, l: fn(g, l, "torch"), (g, l))
    columns = {"ortho_losses": GLOBAL_TOKENS + 16, "ortho_cross_loss": 16, "ortho_diversity_loss": GLOBAL_TOKENS}[which]
    entries = GLOBAL_TOKENS + (0 if which == "ortho_diversity_loss" else 16)
    new = [(B * GLOBAL_TOKENS * columns, F32), (B * entries, F32)]
    assert_saves(op, ref, inputs={0} if which == "ortho_diversity_loss" else {0, 1}, new=new)


def test_audio_rope(triton_device):
    """Nothing: a rotation's backward is the inverse rotation, from the cached cos/sin table
    (the reference saves its per-call cos and sin)."""
    audio = torch.randn(B, T, H, device=triton_device)
    op = saved_by(lambda a: orca_kernels.audio_rope(a, backend="triton"), (audio,))
    ref = saved_by(lambda a: orca_kernels.audio_rope(a, backend="torch"), (audio,))
    assert_saves(op, ref, inputs=set(), new=[])


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_padding_mask"])
def test_flash_cross_attention(triton_device, masked):
    """q, k, v (and the mask), the output and the fp32 row logsumexp [B, nh, Tx]: what SDPA's
    flash backward saves, never the [Tx, Ta] probabilities. With a mask the reference also keeps
    masked copies of q, k, v and the boolean mask it builds."""
    hd = H // HEADS
    q = torch.randn(B, T, HEADS, hd, device=triton_device)
    k, v = (torch.randn(B, T_AUDIO, HEADS, hd, device=triton_device) for _ in range(2))
    mask = torch.zeros(B, T_AUDIO, dtype=torch.bool, device=triton_device)
    mask[0, 30:] = True
    mask = mask if masked else None
    op = saved_by(lambda q, k, v, m: orca_kernels.flash_cross_attention(q, k, v, m, backend="triton"), (q, k, v, mask))
    ref = saved_by(lambda q, k, v, m: orca_kernels.flash_cross_attention(q, k, v, m, backend="torch"), (q, k, v, mask))
    assert_saves(op, ref, inputs={0, 1, 2, 3} if masked else {0, 1, 2}, new=[(B * T * H, F32), (B * HEADS * T, F32)])


def test_gated_residual(triton_device):
    """attended, gate_hidden and the five small parameters, all inputs: the LayerNorm statistics,
    the normalised rows, GELU and the gate are recomputed, and the residual input hidden is not
    saved (its gradient is grad_out)."""
    gate = H // 4
    shapes = [(B, T, H), (B, T, H), (B, T, gate), (1, gate), (1,), (H,), (H,)]
    inputs = [torch.randn(s, device=triton_device) for s in shapes]
    op = saved_by(gated_residual, inputs)
    ref = saved_by(reference.gated_residual, inputs)
    assert_saves(op, ref, inputs={1, 2, 3, 4, 5, 6}, new=[])


def test_gated_cross_attention(triton_device):
    """The whole layer with a mask. New buffers, each needed by a backward: the rotated audio
    (the K/V GEMM's weight gradient), the packed K/V projection and q (attention backward), the
    attention output and its logsumexp, and the LayerNorm input `attended` and the gate's first
    GEMM output (gated_residual's recomputation). Inputs: hidden (q and gate GEMMs), the mask and
    the GEMM weights; not the audio (RoPE saves nothing) and not the biases."""
    gate = H // 4
    hidden, audio = torch.randn(B, T, H, device=triton_device), torch.randn(B, T_AUDIO, H, device=triton_device)
    shapes = [(3 * H, H), (3 * H,), (H, H), (H,), (gate, H), (gate,), (1, gate), (1,), (H,), (H,)]
    params = [0.3 * torch.randn(s, device=triton_device) for s in shapes]
    mask = torch.zeros(B, T_AUDIO, dtype=torch.bool, device=triton_device)
    mask[0, 30:] = True

    def run(backend):
        def fn(hidden, audio, mask, *params):
            return orca_kernels.gated_cross_attention(
                hidden, audio, *params, HEADS, key_padding_mask=mask, backend=backend
            )

        return saved_by(fn, (hidden, audio, mask, *params))

    op, ref = run("triton"), run("torch")
    # Input indices: 0 hidden, 2 mask, 3 in_proj_weight, 5 out_proj_weight, 7 gate_hidden_weight,
    # 9 gate_out_weight, 10 gate_out_bias, 11 ln_weight, 12 ln_bias.
    new = [
        (B * T_AUDIO * H, F32),  # rotated audio
        (B * T_AUDIO * 2 * H, F32),  # packed K/V projection (k and v are views of it)
        (B * T * H, F32),  # q projection
        (B * T * H, F32),  # attention output (also the out-projection's saved input)
        (B * HEADS * T, F32),  # logsumexp
        (B * T * H, F32),  # attended, the LayerNorm input
        (B * T * gate, F32),  # gate_hidden, the gate's first GEMM output
    ]
    assert_saves(op, ref, inputs={0, 2, 3, 5, 7, 9, 10, 11, 12}, new=new)
