"""Flash cross-attention (orca_kernels.flash_attention) against the PyTorch reference and the
reference module's own path, F.multi_head_attention_forward (docs/ops.md#flash_cross_attention).

Kernel tests run where the kernels run (the `triton_device` fixture of conftest.py): CPU tensors
through the interpreter under TRITON_INTERPRET=1, CUDA tensors otherwise. Shapes are small; each
listed value of B {1, 2}, Tx {1, 7, 33}, Ta {1, 13, 65}, head dim {8, 10, 16, 80}, mask / no mask
and packed (strided) / contiguous inputs appears in some case rather than in a full product. Under
the interpreter the kernels use 32-row and 32-key blocks, so Tx = 33 and Ta = 65 cover several
blocks with ragged tails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orca_kernels import _utils, dispatch, reference
from orca_kernels import flash_attention as attention
from orca_kernels.flash_attention import flash_cross_attention
from tolerances import assert_matches_truth

# (B, Tx, Ta, nh, hd, masked, packed)
CASES = [
    (1, 1, 1, 1, 8, False, False),
    (2, 7, 13, 3, 10, True, True),
    (1, 33, 65, 2, 16, True, False),
    (2, 33, 13, 2, 8, False, True),
    (2, 1, 65, 2, 10, True, True),
    (1, 7, 65, 1, 80, False, True),
    (2, 7, 1, 2, 16, False, False),
    # Head dims split into a main and a tail block (head_dim_blocks): 40 = 32 + 16, 96 = 64 + 32,
    # 80 = 64 + 16 with a mask and query rows in two blocks.
    (2, 5, 13, 2, 40, True, True),
    (1, 3, 37, 1, 96, True, False),
    (1, 40, 9, 1, 80, True, True),
]


def _case_id(case) -> str:
    B, Tx, Ta, nh, hd, masked, packed = case
    return f"B{B}-Tx{Tx}-Ta{Ta}-nh{nh}-hd{hd}" + ("-mask" if masked else "") + ("-packed" if packed else "")


@pytest.fixture
def device(triton_device):
    """The devices where the Triton kernels run in this process (conftest.TRITON_DEVICES)."""
    return triton_device


def _partial_mask(B: int, Ta: int, device) -> torch.Tensor:
    """About a third of the keys masked, never all of a batch element's."""
    mask = torch.rand(B, Ta, device=device) < 0.35
    mask[:, torch.randint(Ta, (1,)).item()] = False
    return mask


class Inputs:
    """Leaf tensors and the q, k, v views the op sees. packed: as the module makes them, q a view
    of a wider projection and k, v the two column halves of one packed [B, Ta, 2H] projection."""

    def __init__(self, B, Tx, Ta, nh, hd, dtype, device, packed):
        self.shape = (B, Tx, Ta, nh, hd)
        H = nh * hd
        if packed:
            shapes = [(B, Tx, H + 3), (B, Ta, 2 * H)]
        else:
            shapes = [(B, Tx, nh, hd), (B, Ta, nh, hd), (B, Ta, nh, hd)]
        self.packed = packed
        self.leaves = [torch.randn(s, dtype=torch.float64, device=device).to(dtype).requires_grad_() for s in shapes]

    def views(self, leaves=None):
        leaves = self.leaves if leaves is None else leaves
        if not self.packed:
            return leaves
        _, _, _, nh, hd = self.shape
        H = nh * hd
        q_proj, kv = leaves
        return (
            q_proj[..., :H].unflatten(-1, (nh, hd)),
            kv[..., :H].unflatten(-1, (nh, hd)),
            kv[..., H:].unflatten(-1, (nh, hd)),
        )

    def truth(self, mask, grad_out):
        """fp64 reference output and gradients of the leaves for upstream gradient grad_out."""
        leaves = [t.detach().double().requires_grad_() for t in self.leaves]
        out = reference.flash_cross_attention(*self.views(leaves), mask)
        return out, torch.autograd.grad(out, leaves, grad_out.double())


def _run(inputs: Inputs, mask, grad_out, backend="triton"):
    out = flash_cross_attention(*inputs.views(), mask, backend=backend)
    return out, torch.autograd.grad(out, inputs.leaves, grad_out)


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(device, dtype, case, backend):
    B, Tx, Ta, nh, hd, masked, packed = case
    inputs = Inputs(B, Tx, Ta, nh, hd, dtype, device, packed)
    q, k, v = inputs.views()
    assert packed == (not q.is_contiguous() and not k.is_contiguous())
    mask = _partial_mask(B, Ta, device) if masked else None
    grad_out = torch.randn(B, Tx, nh, hd, dtype=dtype, device=device)
    out, grads = _run(inputs, mask, grad_out, backend)
    out_truth, grads_truth = inputs.truth(mask, grad_out)
    assert out.dtype == dtype and out.is_contiguous()
    assert_matches_truth(out, out_truth, name="out")
    if Ta == 1 and not packed:  # the softmax over one key is constant: dq and dk are rounding noise
        assert all(grad.abs().max() <= 1e3 * torch.finfo(dtype).eps for grad in grads[:2])
        grads, grads_truth = grads[2:], grads_truth[2:]
    for grad, grad_truth in zip(grads, grads_truth, strict=True):
        assert_matches_truth(grad, grad_truth, name="grad")


def test_longest_audio(device):
    """Ta = 1500 (47 key blocks under the interpreter), masked, packed, fp64."""
    inputs = Inputs(1, 2, 1500, 1, 8, torch.float64, device, packed=True)
    mask = _partial_mask(1, 1500, device)
    grad_out = torch.randn(1, 2, 1, 8, dtype=torch.float64, device=device)
    out, grads = _run(inputs, mask, grad_out)
    out_truth, grads_truth = inputs.truth(mask, grad_out)
    assert_matches_truth(out, out_truth, name="out")
    for grad, grad_truth in zip(grads, grads_truth, strict=True):
        assert_matches_truth(grad, grad_truth, name="grad")


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[2], CASES[1], CASES[-1]], ids=_case_id)
def test_low_precision_within_twice_reference_error(device, dtype, case, backend):
    """fp16/bf16: at most 2x the same-dtype PyTorch reference's error against fp64 (out and grads).
    On CPU bf16 dot operands are upcast under the interpreter, so the GPU run is the real bf16 check."""
    B, Tx, Ta, nh, hd, masked, packed = case
    inputs = Inputs(B, Tx, Ta, nh, hd, dtype, device, packed)
    mask = _partial_mask(B, Ta, device) if masked else None
    grad_out = torch.randn(B, Tx, nh, hd, dtype=dtype, device=device)
    out, grads = _run(inputs, mask, grad_out, backend)
    out_ref, grads_ref = _run(inputs, mask, grad_out, backend="torch")
    out_truth, grads_truth = inputs.truth(mask, grad_out)
    assert out.dtype == dtype
    assert_matches_truth(out, out_truth, same_dtype_reference=out_ref, name="out")
    for grad, grad_ref, grad_truth in zip(grads, grads_ref, grads_truth, strict=True):
        assert_matches_truth(grad, grad_truth, same_dtype_reference=grad_ref, name="grad")


def test_module_path_matches_multi_head_attention(device):
    """The module's use: Q and packed K/V projections, this op, out_proj — equal to the reference's
    F.multi_head_attention_forward (key_padding_mask, need_weights=False) with batch 0 fully masked
    and batch 1 partly, in fp64, output and every gradient. The fully masked batch gives out_proj's
    bias: the attention output there is 0."""
    B, Tx, Ta, nh, hd = 2, 5, 9, 2, 8
    H = nh * hd

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)

    hidden, audio = leaf(B, Tx, H), leaf(B, Ta, H)
    w_in, b_in, w_out, b_out = leaf(3 * H, H), leaf(3 * H), leaf(H, H), leaf(H)
    mask = torch.zeros(B, Ta, dtype=torch.bool, device=device)
    mask[0] = True
    mask[1, ::3] = True
    params = (hidden, audio, w_in, b_in, w_out, b_out)

    def fused(backend):
        q = F.linear(hidden, w_in[:H], b_in[:H]).unflatten(-1, (nh, hd))
        kv = F.linear(audio, w_in[H:], b_in[H:])  # one packed GEMM, as the reference
        k, v = kv[..., :H].unflatten(-1, (nh, hd)), kv[..., H:].unflatten(-1, (nh, hd))
        out = flash_cross_attention(q, k, v, mask, backend=backend)
        return F.linear(out.flatten(2), w_out, b_out)

    expected, _ = F.multi_head_attention_forward(
        hidden.transpose(1, 0),
        audio.transpose(1, 0),
        audio.transpose(1, 0),
        H,
        nh,
        w_in,
        b_in,
        None,
        None,
        False,
        0.0,
        w_out,
        b_out,
        training=False,
        key_padding_mask=mask,
        need_weights=False,
    )
    expected = expected.transpose(1, 0)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, params, grad_out)
    assert torch.equal(expected[0], b_out.detach().expand(Tx, H))
    for backend in ("triton", "sdpa", "torch"):
        actual = fused(backend)
        grads = torch.autograd.grad(actual, params, grad_out)
        assert torch.equal(actual[0], expected[0]), backend
        assert_matches_truth(actual, expected, name=f"{backend} output")
        for grad, expected_grad, name in zip(
            grads, expected_grads, ["hidden", "audio", "w_in", "b_in", "w_out", "b_out"], strict=True
        ):
            assert_matches_truth(grad, expected_grad, name=f"{backend} grad {name}")


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fully_masked_rows_give_zero_and_no_gradient(device, dtype, backend):
    """Every key of batch 0 masked: output exactly 0 and exactly zero gradients there, no NaN
    anywhere; batch 1 (no masked key) is unaffected."""
    for Tx, Ta in [(7, 13), (1, 1)]:
        inputs = Inputs(2, Tx, Ta, 2, 8, dtype, device, packed=False)
        mask = torch.zeros(2, Ta, dtype=torch.bool, device=device)
        mask[0] = True
        grad_out = torch.randn(2, Tx, 2, 8, dtype=dtype, device=device)
        out, (dq, dk, dv) = _run(inputs, mask, grad_out, backend)
        for t in (out, dq, dk, dv):
            assert not t.isnan().any()
            assert torch.all(t[0] == 0)
        out_ref, grads_ref = _run(inputs, mask, grad_out, backend="torch")
        assert torch.all(out_ref[0] == 0) and all(torch.all(g[0] == 0) for g in grads_ref)
        out_truth, grads_truth = inputs.truth(mask, grad_out)
        reference_1 = _run(inputs, None, grad_out, backend="torch")  # batch 1 has no masked key
        checked = zip(
            (out, dq, dk, dv), (out_truth, *grads_truth), (reference_1[0], *reference_1[1]), "oqkv", strict=True
        )
        for actual, truth, ref, name in checked:
            if not (Ta == 1 and name in "qk"):  # one key: dq, dk are rounding noise
                assert_matches_truth(actual[1], truth[1], same_dtype_reference=ref[1], name=name)


def test_expanded_and_strided_upstream_gradients(device):
    """Gradients that arrive expanded (stride 0, from .sum()) or as a strided view."""
    inputs = Inputs(2, 7, 13, 2, 10, torch.float64, device, packed=True)
    mask = _partial_mask(2, 13, device)
    out = flash_cross_attention(*inputs.views(), mask, backend="triton")
    grads = torch.autograd.grad(out.sum(), inputs.leaves)
    _, grads_truth = inputs.truth(mask, torch.ones(2, 7, 2, 10, dtype=torch.float64, device=device))
    for grad, grad_truth in zip(grads, grads_truth, strict=True):
        assert_matches_truth(grad, grad_truth, name="grad from .sum()")
    wide = torch.randn(2, 7, 2, 25, dtype=torch.float64, device=device)
    grad_out = wide[..., 3:13]  # row stride 50, unit last-dim stride
    out = flash_cross_attention(*inputs.views(), mask, backend="triton")
    grads = torch.autograd.grad(out, inputs.leaves, grad_out)
    _, grads_truth = inputs.truth(mask, grad_out)
    for grad, grad_truth in zip(grads, grads_truth, strict=True):
        assert_matches_truth(grad, grad_truth, name="grad from a strided view")


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("B, Tx, Ta", [(0, 7, 13), (2, 0, 13), (2, 7, 0)], ids=["B0", "Tx0", "Ta0"])
def test_empty_dimensions(device, B, Tx, Ta, backend):
    """Empty batch and Tx = 0: empty results. Ta = 0: no key to attend to, output 0 (as SDPA
    gives) and zero gradients."""
    inputs = Inputs(B, Tx, Ta, 2, 8, torch.float32, device, packed=False)
    mask = torch.zeros(B, Ta, dtype=torch.bool, device=device)
    grad_out = torch.randn(B, Tx, 2, 8, device=device)
    for m in (None, mask):
        out, grads = _run(inputs, m, grad_out, backend)
        out_ref, grads_ref = _run(inputs, m, grad_out, backend="torch")
        assert out.shape == (B, Tx, 2, 8)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
        for grad, grad_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)


def test_custom_scale(device):
    inputs = Inputs(2, 7, 13, 2, 16, torch.float64, device, packed=False)
    mask = _partial_mask(2, 13, device)
    grad_out = torch.randn(2, 7, 2, 16, dtype=torch.float64, device=device)
    out = flash_cross_attention(*inputs.views(), mask, scale=0.37, backend="triton")
    grads = torch.autograd.grad(out, inputs.leaves, grad_out)
    out_ref = reference.flash_cross_attention(*inputs.views(), mask, scale=0.37)
    grads_ref = torch.autograd.grad(out_ref, inputs.leaves, grad_out)
    assert_matches_truth(out, out_ref, name="out")
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert_matches_truth(grad, grad_ref, name="grad")


def test_backward_is_deterministic(device):
    inputs = Inputs(2, 33, 65, 2, 16, torch.float16, device, packed=True)
    mask = _partial_mask(2, 65, device)
    grad_out = torch.randn(2, 33, 2, 16, dtype=torch.float16, device=device)
    first, second = _run(inputs, mask, grad_out), _run(inputs, mask, grad_out)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_gradcheck_fp64(device, backend):
    inputs = Inputs(2, 3, 5, 2, 8, torch.float64, device, packed=True)
    mask = torch.tensor([[False, True, False, False, True], [True] * 5], device=device)  # batch 1 fully masked

    def fn(*leaves):
        return flash_cross_attention(*inputs.views(leaves), mask, backend=backend)

    assert torch.autograd.gradcheck(fn, tuple(inputs.leaves), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda *leaves: flash_cross_attention(*inputs.views(leaves), backend=backend),
        tuple(inputs.leaves),
        fast_mode=True,
    )


def test_opcheck(device):
    q = torch.randn(2, 5, 2, 8, device=device, requires_grad=True)
    kv = torch.randn(2, 9, 32, device=device, requires_grad=True)
    k, v = kv[..., :16].unflatten(-1, (2, 8)), kv[..., 16:].unflatten(-1, (2, 8))
    mask = _partial_mask(2, 9, device)
    mask[1] = True
    ops = torch.ops.orca_kernels
    for m in (None, mask):
        torch.library.opcheck(ops.flash_cross_attention.default, (q, k, v, m, 0.3))
        out, lse = ops.flash_cross_attention(q.detach(), k.detach(), v.detach(), m, 0.3)
        grad_out = torch.randn_like(out)
        torch.library.opcheck(
            ops.flash_cross_attention_backward.default, (q.detach(), k.detach(), v.detach(), m, out, lse, grad_out, 0.3)
        )


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_torch_compile_fullgraph(device, backend):
    inputs = Inputs(2, 7, 13, 2, 8, torch.float32, device, packed=True)
    mask = _partial_mask(2, 13, device)

    def objective(q_proj, kv):
        out = flash_cross_attention(*inputs.views((q_proj, kv)), mask, backend=backend)
        return (out * out).sum()

    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    loss = compiled(*inputs.leaves)
    grads = torch.autograd.grad(loss, inputs.leaves)
    loss_eager = objective(*inputs.leaves)
    grads_eager = torch.autograd.grad(loss_eager, inputs.leaves)
    torch.testing.assert_close(loss, loss_eager, rtol=0, atol=0)
    for actual, expected in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model-sized shapes: GPU only (the interpreter is too slow)")
@pytest.mark.parametrize("hd", [64, 80, 128])
@pytest.mark.parametrize("Tx", [300, 1])
def test_model_shapes_bf16_on_gpu(hd, Tx):
    """bf16 at the model's lengths (Ta = 383, Tx = 300 training / 1 decode) and head dims, within
    2x of the bf16 reference's error (SDPA on the same GPU), output and gradients."""
    device = torch.device("cuda")
    inputs = Inputs(2, Tx, 383, 4, hd, torch.bfloat16, device, packed=True)
    grad_out = torch.randn(2, Tx, 4, hd, dtype=torch.bfloat16, device=device)
    out, grads = _run(inputs, None, grad_out)
    out_ref, grads_ref = _run(inputs, None, grad_out, backend="torch")
    out_truth, grads_truth = inputs.truth(None, grad_out)
    assert_matches_truth(out, out_truth, same_dtype_reference=out_ref, name="out")
    for grad, grad_ref, grad_truth in zip(grads, grads_ref, grads_truth, strict=True):
        assert_matches_truth(grad, grad_truth, same_dtype_reference=grad_ref, name="grad")


def test_head_dim_blocks():
    """Head dims that are not a power of two run as main + tail blocks where that is narrower."""
    from orca_kernels.flash_attention import head_dim_blocks

    expected = {8: (16, 0), 16: (16, 0), 24: (32, 0), 40: (32, 16), 64: (64, 0), 72: (64, 16), 80: (64, 16)}
    expected |= {96: (64, 32), 112: (128, 0), 128: (128, 0), 160: (128, 32), 200: (256, 0), 256: (256, 0)}
    for head_dim, blocks in expected.items():
        assert head_dim_blocks(head_dim) == blocks, head_dim
        main, tail = blocks
        assert main + tail >= head_dim and (tail == 0 or main < head_dim)


def test_decode_splits_fill_the_gpu(monkeypatch):
    """Flash-decoding's rule on a 132-SM card (4 persistent programs per SM): one clip of Llama's
    32 heads over 383 keys in 64-key blocks splits into all 6 blocks; 8 clips (256 programs)
    already fill it; a prefill never splits."""
    from orca_kernels import flash_attention as attention

    monkeypatch.setattr(attention, "KERNELS_INTERPRETED", False)
    monkeypatch.setattr(attention._utils, "persistent_programs", lambda device: 4 * 132)
    cuda = torch.device("cuda")
    assert attention.decode_splits(32, 1, 383, 64, cuda) == (6, 64)
    assert attention.decode_splits(4 * 32, 1, 383, 64, cuda) == (2, 192)
    assert attention.decode_splits(8 * 32, 1, 383, 64, cuda) == (1, 384)
    assert attention.decode_splits(32, 300, 383, 64, cuda) == (1, 383)
    assert attention.decode_splits(32, 1, 40, 64, cuda) == (1, 40)
    # One-warp programs (a split head dim): four times as many programs per SM.
    assert attention.decode_splits(4 * 32, 1, 383, 64, cuda, num_warps=1) == (6, 64)


# ----------------------------------------------------------------------------- errors and backends


def _qkv(device="cpu"):
    return tuple(torch.randn(2, length, 2, 8, device=device) for length in (5, 9, 9))


@pytest.mark.parametrize(
    "make_args, error, match",
    [
        (lambda q, k, v: (q[0], k, v, None), ValueError, "q must have 4 dimensions"),
        (lambda q, k, v: (q, k[0], v, None), ValueError, "k must have 4 dimensions"),
        (lambda q, k, v: (q, k, v.flatten(2), None), ValueError, "v must have 4 dimensions"),
        (lambda q, k, v: (q.int(), k, v, None), ValueError, "q has dtype torch.int32"),
        (lambda q, k, v: (q, k.double(), v, None), ValueError, "k has dtype torch.float64"),
        (lambda q, k, v: (q, k, v.half(), None), ValueError, "v has dtype torch.float16"),
        (lambda q, k, v: (q, k.to("meta"), v, None), ValueError, "k is on meta"),
        (lambda q, k, v: (q, k[:1], v[:1], None), ValueError, "k has batch size 1"),
        (lambda q, k, v: (q, k[:, :, :1], v[:, :, :1], None), ValueError, "k has number of heads 1"),
        (lambda q, k, v: (q, k[..., :4], v[..., :4], None), ValueError, "k has head dim 4"),
        (lambda q, k, v: (q, k, v[:, :3], None), ValueError, "v has shape"),
        (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0], None), ValueError, "q has head dim 0"),
        (lambda q, k, v: (q, k, v, torch.zeros(2, 9)), ValueError, "key_padding_mask must have dtype torch.bool"),
        (
            lambda q, k, v: (q, k, v, torch.zeros(2, 5, dtype=torch.bool)),
            ValueError,
            r"key_padding_mask has shape \(2, 5\)",
        ),
        (lambda q, k, v: (q, k, v, torch.zeros(9, dtype=torch.bool)), ValueError, r"key_padding_mask has shape \(9,\)"),
        (
            lambda q, k, v: (q, k, v, torch.zeros(2, 9, dtype=torch.bool, device="meta")),
            ValueError,
            "key_padding_mask is on meta",
        ),
        (lambda q, k, v: (q, k, v, [[False] * 9] * 2), TypeError, "key_padding_mask must be a torch.Tensor"),
        (lambda q, k, v: (q.numpy(), k, v, None), TypeError, "q must be a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "sdpa", "torch"])
def test_bad_inputs_name_the_argument(make_args, error, match, backend):
    with pytest.raises(error, match=match):
        flash_cross_attention(*make_args(*_qkv()), backend=backend)


@pytest.mark.parametrize(
    "scale, error, match",
    [(float("nan"), ValueError, "scale must be finite"), ("0.1", TypeError, "scale must be a float")],
)
def test_bad_scale(scale, error, match):
    with pytest.raises(error, match=match):
        flash_cross_attention(*_qkv(), scale=scale)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'sdpa', 'triton', 'torch'"):
        flash_cross_attention(*_qkv(), backend="cuda")


def test_head_dim_past_kernel_limit(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_utils, "KERNELS_INTERPRETED", True)
    q = torch.randn(1, 2, 1, 264)
    with pytest.raises(ValueError, match="head dim 264 > 256"):
        flash_cross_attention(q, q, q, backend="triton")
    assert flash_cross_attention(q, q, q, backend="torch").shape == q.shape


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_utils, "KERNELS_INTERPRETED", False)
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
        flash_cross_attention(*_qkv(), backend="triton")
    q, k, v = _qkv()  # auto without the interpreter: the reference, bit for bit
    mask = _partial_mask(2, 9, "cpu")
    assert torch.equal(flash_cross_attention(q, k, v, mask), reference.flash_cross_attention(q, k, v, mask))


def test_interpreter_set_after_import_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_utils, "KERNELS_INTERPRETED", False)
    with pytest.raises(RuntimeError, match="set it before the import"):
        flash_cross_attention(*_qkv())


def test_auto_uses_the_kernels_where_they_run(monkeypatch, device):
    def fail(*args, **kwargs):
        raise AssertionError("the reference ran instead of the Triton kernels")

    monkeypatch.setattr(reference, "flash_cross_attention", fail)
    flash_cross_attention(*_qkv(device))
    with pytest.raises(AssertionError, match="the reference ran"):
        flash_cross_attention(*_qkv(device), backend="torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the dispatch of auto on CUDA")
@pytest.mark.parametrize("picked", ["sdpa", "triton"])
def test_auto_on_cuda_runs_what_the_dispatch_picks(monkeypatch, picked):
    """auto on CUDA runs what orca_kernels.dispatch picks (never the reference)."""
    ran = []
    sdpa = attention._sdpa_attention
    monkeypatch.setattr(attention, "_sdpa_attention", lambda *a: ran.append("sdpa") or sdpa(*a))
    monkeypatch.setattr(attention, "_attention_op", lambda *a: ran.append("triton") or (a[0].clone(), None))
    monkeypatch.setattr(dispatch, "attention_backend", lambda *a: picked)
    flash_cross_attention(*_qkv("cuda"))
    assert ran == [picked]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("Ta", [5, 13], ids=["Ta5", "Ta13"])
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_non_finite_query_gives_nan_on_both_backends(device, dtype, masked, bad, Ta, backend):
    """A NaN or ±inf in one query row: the kernel's output row is NaN, and so is the reference's
    (torch 2.14's CPU SDPA without a mask returns 0 there when Ta < 8, hiding the bad input).
    Every other row, and the NaN pattern of the gradients, agree between the backends."""
    B, Tx, nh, hd = 2, 7, 2, 8
    inputs = Inputs(B, Tx, Ta, nh, hd, dtype, device, packed=False)
    with torch.no_grad():
        inputs.leaves[0][0, 3, 1, 5] = bad
    mask = _partial_mask(B, Ta, device) if masked else None
    grad_out = torch.randn(B, Tx, nh, hd, dtype=dtype, device=device)
    kernel = _run(inputs, mask, grad_out, backend)
    torch_backend = _run(inputs, mask, grad_out, backend="torch")
    out = torch_backend[0]
    assert out[0, 3, 1].isnan().all(), "the reference hid a non-finite query"
    assert kernel[0][0, 3, 1].isnan().all()
    assert not out[0, 3, 0].isnan().any() and not out[1].isnan().any()  # only that row and head
    for name, actual, expected in zip(
        "oqkv", kernel[:1] + kernel[1], torch_backend[:1] + torch_backend[1], strict=True
    ):
        assert torch.equal(actual.isnan(), expected.isnan()), name
        torch.testing.assert_close(actual, expected, equal_nan=True, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_finite_inputs_are_unchanged_by_the_nan_check(masked):
    """The reference adds exactly 0 to rows with a finite query: bit for bit SDPA's result."""
    q, k, v = _qkv()
    mask = _partial_mask(2, 9, "cpu") if masked else None
    keep = None if mask is None else ~mask[:, None, None, :]
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep)
    assert torch.equal(reference.flash_cross_attention(q, k, v, mask), expected.transpose(1, 2))


@pytest.mark.parametrize("backend", ["triton", "sdpa", "torch"])
def test_fully_masked_row_stays_zero_with_a_nan_query(triton_device, backend):
    """Fully masked rows are 0 with zero gradients whatever the query holds, on both backends."""
    q, k, v = (t.to(triton_device).requires_grad_() for t in _qkv())
    with torch.no_grad():
        q[0, 1, 0, 2] = float("nan")
    mask = torch.zeros(2, 9, dtype=torch.bool, device=triton_device)
    mask[0] = True
    out = flash_cross_attention(q, k, v, mask, backend=backend)
    assert torch.all(out[0] == 0) and not out[1].isnan().any()
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(torch.all(g[0] == 0) for g in grads)


@pytest.mark.parametrize("backend", ["triton", "sdpa", "torch"])
def test_fully_masked_batch_with_nan_keys_and_values_stays_zero(triton_device, backend):
    """NaN and inf in the keys and values of a fully masked batch element: still 0 with zero
    gradients there (the kernels select rather than multiply by 0), and the other element clean."""
    q, k, v = (t.to(triton_device).requires_grad_() for t in _qkv())
    with torch.no_grad():
        k[0, 4, 1, 0] = float("nan")
        v[0, 2, 0, 3] = float("inf")
        q[0, 0, 0, 0] = float("nan")
    mask = torch.zeros(2, 9, dtype=torch.bool, device=triton_device)
    mask[0] = True
    out = flash_cross_attention(q, k, v, mask, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.all(out[0] == 0) and all(torch.all(g[0] == 0) for g in grads)
    assert all(not t[1].isnan().any() for t in (out, *grads))


@pytest.mark.parametrize("bad", [float("-inf"), float("inf")], ids=["-inf", "inf"])
def test_an_infinite_query_with_unmasked_keys_is_nan_not_empty(triton_device, bad):
    """-inf in q can make every unmasked score -inf (a softmax sum of 0): the row is NaN, as the
    reference gives for a non-finite query, not the 0 of a fully masked row."""
    q, k, v = _qkv(triton_device)
    k = k.abs()  # every q·k of the bad element is then -inf (or +inf)
    q[0, 1, 0] = 0.0
    q[0, 1, 0, 2] = bad
    mask = torch.zeros(2, 9, dtype=torch.bool, device=triton_device)
    mask[0, :4] = True
    for backend in ("triton", "sdpa", "torch"):
        out = flash_cross_attention(q, k, v, mask, backend=backend)
        assert out[0, 1, 0].isnan().all(), backend
        assert not out[0, 0].isnan().any() and not out[1].isnan().any(), backend


@pytest.mark.parametrize("backend", ["triton", "sdpa", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_padded_key_reaches_nothing(triton_device, backend, dtype, bad):
    """NaN or inf in the k and v of padded keys (a batch element partly padded, Ta spanning two
    key blocks): the output and dq, dk, dv equal those of the same call with zeros there, bit for
    bit, and the padded keys' dk and dv are exactly 0."""
    B, Tx, Ta, nh, hd = 2, 7, 40, 2, 8
    inputs = Inputs(B, Tx, Ta, nh, hd, dtype, triton_device, packed=False)
    mask = _partial_mask(B, Ta, triton_device)
    grad_out = torch.randn(B, Tx, nh, hd, dtype=dtype, device=triton_device)
    with torch.no_grad():
        for leaf in inputs.leaves[1:]:
            leaf.masked_fill_(mask[:, :, None, None], 0)
    clean = _run(inputs, mask, grad_out, backend)
    with torch.no_grad():
        for leaf in inputs.leaves[1:]:
            leaf.masked_fill_(mask[:, :, None, None], bad)
    dirty = _run(inputs, mask, grad_out, backend)
    for name, actual, expected in zip("oqkv", (dirty[0], *dirty[1]), (clean[0], *clean[1]), strict=True):
        assert torch.equal(actual, expected), name
    for grad in dirty[1][1:]:
        assert torch.all(grad[mask] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_backend_matches_the_kernels_at_head_dim_80(triton_device, dtype):
    """Head dim 80 (Qwen3-4B): the vendor path and the Triton kernels agree with each other and
    with the fp64 truth, masked, on packed views."""
    inputs = Inputs(2, 9, 21, 2, 80, dtype, triton_device, packed=True)
    mask = _partial_mask(2, 21, triton_device)
    grad_out = torch.randn(2, 9, 2, 80, dtype=dtype, device=triton_device)
    sdpa, kernels = _run(inputs, mask, grad_out, "sdpa"), _run(inputs, mask, grad_out, "triton")
    reference_run = _run(inputs, mask, grad_out, "torch")
    out_truth, grads_truth = inputs.truth(mask, grad_out)
    for run in (sdpa, kernels):
        assert_matches_truth(run[0], out_truth, same_dtype_reference=reference_run[0], name="out")
        for grad, grad_ref, grad_truth in zip(run[1], reference_run[1], grads_truth, strict=True):
            assert_matches_truth(grad, grad_truth, same_dtype_reference=grad_ref, name="grad")


def test_sdpa_backend_runs_without_the_interpreter(monkeypatch):
    """backend="sdpa" is plain PyTorch: it runs on CPU tensors whether or not the Triton kernels can."""
    monkeypatch.setattr(_utils, "KERNELS_INTERPRETED", False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv()
    torch.testing.assert_close(
        flash_cross_attention(q, k, v, backend="sdpa"), reference.flash_cross_attention(q, k, v), rtol=0, atol=0
    )


@pytest.mark.parametrize("hd", [16, 40], ids=["hd16", "hd40-tail"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_one_pass_and_two_kernel_backwards_match_the_truth(triton_device, hd, masked):
    """Both backward layouts, forced, in fp64 against the truth: several key blocks (Ta = 70, three
    under the interpreter) and query blocks, a tail of the head dim (40 = 32 + 16), a fully masked
    batch element. Past the one-pass kernel's head widths, forcing it is an error."""
    B, Tx, Ta, nh = 3, 40, 70, 2
    inputs = Inputs(B, Tx, Ta, nh, hd, torch.float64, triton_device, packed=True)
    mask = None
    if masked:
        mask = _partial_mask(B, Ta, triton_device)
        mask[2] = True
    q, k, v = inputs.views()
    grad_out = torch.randn(B, Tx, nh, hd, dtype=torch.float64, device=triton_device)
    scale = hd**-0.5
    out, lse = attention._forward(q, k, v, mask, scale)
    _, grads_truth = inputs.truth(mask, grad_out)
    for one_pass in (True, False):
        grads = attention._backward(q, k, v, mask, out, lse, grad_out, scale, one_pass=one_pass)
        leaves = [t.detach().requires_grad_() for t in inputs.leaves]
        leaf_grads = torch.autograd.grad(inputs.views(leaves), leaves, grads)
        for grad, truth in zip(leaf_grads, grads_truth, strict=True):
            assert_matches_truth(grad, truth, name=f"one_pass={one_pass}")
    wide = torch.zeros(1, 2, 1, 80, dtype=torch.float64, device=triton_device)
    with pytest.raises(ValueError, match="one-pass backward takes head widths up to 64, got head dim 80"):
        attention._backward(wide, wide, wide, None, wide, torch.zeros(1, 1, 2), wide, 1.0, one_pass=True)
