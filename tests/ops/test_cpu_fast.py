"""The eager fast path: its kernels against the formulas under autograd, and its switch."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from swin_dense.ops import cpu_fast
from swin_dense.ops.chunked_attention import (PROB_FLOOR, _attention_probs,
                                              chunked_window_attention, even_chunks,
                                              fused_inference_attention,
                                              keep_probs_window_attention)
from swin_dense.ops.token_attention import (token_projections_pay, token_window_attention,
                                            token_window_inference)
from swin_dense.ops.window import MASK_VALUE, window_layout
from test_window import official_merge, official_windows


def plain_attention(qkv, h, scale, bias, nW):
    """The formula with autograd's own backward: the reference for our gradients."""
    BW, N, C3 = qkv.shape
    q, k, v = qkv.view(BW, N, 3, h, -1).permute(2, 0, 3, 1, 4)
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = (attn.view(-1, nW, h, N, N) + bias).view(BW, h, N, N).softmax(-1)
    return (attn @ v).transpose(1, 2).reshape(BW, N, C3 // 3)


def test_keep_probs_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    B, nW, N, h, d = 2, 3, 49, 4, 8
    qkv = torch.randn(B * nW, N, 3 * h * d)
    bias = torch.randn(nW, h, N, N)
    weight, proj_bias = torch.randn(h * d, h * d), torch.randn(h * d)
    out = keep_probs_window_attention(qkv, bias, weight, proj_bias, h, d ** -0.5, nW)
    ref = F.linear(plain_attention(qkv, h, d ** -0.5, bias, nW), weight, proj_bias)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize('per_window', [False, True])
def test_keep_probs_attention_gradients_equal_autograd(per_window):
    torch.manual_seed(0)
    B, nW, N, h, d = 2, 3, 16, 2, 4
    f64 = dict(dtype=torch.float64, requires_grad=True)
    qkv = torch.randn(B * nW, N, 3 * h * d, **f64)
    bias = torch.randn(*((nW,) if per_window else ()), h, N, N, **f64)
    weight, proj_bias = torch.randn(h * d, h * d, **f64), torch.randn(h * d, **f64)
    inputs = (qkv, bias, weight, proj_bias)
    grad_out = torch.randn(B * nW, N, h * d, dtype=torch.float64)
    results = []
    for fn in (lambda *a: keep_probs_window_attention(a[0], a[3], a[5], a[6], a[1], a[2], a[4]),
               lambda *a: F.linear(plain_attention(*a[:5]), a[5], a[6])):
        out = fn(qkv, h, d ** -0.5, bias, nW, weight, proj_bias)
        results.append((out, *torch.autograd.grad(out, inputs, grad_out)))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # the inference form (fused kernel, nothing saved): the same numbers
        torch.testing.assert_close(
            fused_inference_attention(qkv, bias, weight, proj_bias, h, d ** -0.5),
            results[1][0], rtol=1e-10, atol=1e-12)
    # Finite differences on a tiny case, independent of any autograd formula.
    small = (qkv[:nW, :4, :6].detach().clone().requires_grad_(),
             bias[..., :1, :4, :4].detach().clone().requires_grad_(),
             weight[:2, :2].detach().clone().requires_grad_(),
             proj_bias[:2].detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(
        lambda a, b, w, c: keep_probs_window_attention(a, b, w, c, 1, 0.5, nW), small)


# chunks of part of an image, of one image, of several images (the last one shorter)
@pytest.mark.parametrize('with_mask, batch, chunk', [
    (False, 2, 4), (False, 3, 12), (True, 2, 2), (True, 3, 10), (True, 1, 99)])
def test_chunked_window_attention_equals_autograd(with_mask, batch, chunk):
    """qkv projection + attention + projection, chunked, against the formula under autograd.
    The bias: shared ``(h, N, N)``, alone or with an ``(nW, N, N)`` mask that the chunks fold in
    (the bias gradient is summed per chunk)."""
    torch.manual_seed(0)
    nW, N, h, d = 5, 16, 2, 4
    C = h * d
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(batch * nW, N, C, **f64)
    qkv_weight, qkv_bias = torch.randn(3 * C, C, **f64), torch.randn(3 * C, **f64)
    bias = torch.randn(h, N, N, **f64)
    mask = None
    folded = bias
    if with_mask:
        mask = (torch.rand(nW, N, N) < 0.3).double() * MASK_VALUE
        folded = bias + mask.unsqueeze(1)
    proj_weight, proj_bias = torch.randn(C, C, **f64), torch.randn(C, **f64)
    inputs = (x, qkv_weight, qkv_bias, bias, proj_weight, proj_bias)
    grad_out = torch.randn(batch * nW, N, C, dtype=torch.float64)
    ours = chunked_window_attention(x, qkv_weight, qkv_bias, bias, proj_weight, proj_bias, h,
                                    d ** -0.5, nW, chunk, mask)
    ref = F.linear(plain_attention(F.linear(x, qkv_weight, qkv_bias), h, d ** -0.5, folded, nW),
                   proj_weight, proj_bias)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad_out),
                    torch.autograd.grad(ref, inputs, grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the inference branch (no saved qkv) gives the same numbers
        torch.testing.assert_close(chunked_window_attention(
            x, qkv_weight, qkv_bias, bias, proj_weight, proj_bias, h, d ** -0.5, nW, chunk,
            mask), ref)


@pytest.mark.parametrize('total, step', [(10, 4), (25088, 2730), (16384, 2730), (64, 49),
                                         (7, 7), (3, 10), (1, 1), (0, 5)])
def test_even_chunks_cover_the_range_in_the_fewest_near_equal_chunks(total, step):
    chunks = list(even_chunks(total, step))
    assert len(chunks) == -(-total // step)  # as many as chunks of `step` would need
    assert [i for c in chunks for i in range(total)[c]] == list(range(total))
    sizes = [c.stop - c.start for c in chunks]
    assert all(0 < n <= step for n in sizes) and max(sizes, default=0) - min(sizes, default=0) <= 1


# a padded map, unshifted and shifted; chunks of part of an image, of whole images
@pytest.mark.parametrize('shift, batch, chunk', [(0, 2, 4), (2, 2, 3), (2, 3, 12), (3, 1, 99)])
def test_token_window_attention_equals_the_windowed_formula(shift, batch, chunk):
    """Both projections on the tokens (padding slots get the qkv bias), against the official
    order (pad, roll, partition, projections on every slot, merge, roll back, crop) under
    autograd: outputs and the gradients of the tokens, both projections and the bias (whose
    gradient includes the padding slots')."""
    torch.manual_seed(1)
    H, W, M, h, d = 9, 10, 5, 2, 3
    C = h * d
    layout = window_layout(H, W, M, shift, torch.device('cpu'))
    assert layout.needs_padding
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(batch, H * W, C, **f64)
    qkv_weight, qkv_bias = torch.randn(3 * C, C, **f64), torch.randn(3 * C, **f64)
    bias = torch.randn(h, M * M, M * M, **f64)
    proj_weight, proj_bias = torch.randn(C, C, **f64), torch.randn(C, **f64)
    inputs = (x, qkv_weight, qkv_bias, bias, proj_weight, proj_bias)
    ours = token_window_attention(x, layout, qkv_weight, qkv_bias, bias, proj_weight, proj_bias,
                                  h, d ** -0.5, chunk)
    windows, _, _ = official_windows(x, H, W, M, shift)
    folded = bias if layout.mask is None else bias + layout.mask.double().unsqueeze(1)
    ref = official_merge(F.linear(plain_attention(F.linear(windows, qkv_weight, qkv_bias), h,
                                                  d ** -0.5, folded, layout.num_windows),
                                  proj_weight, proj_bias), H, W, M, shift)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # inference: each chunk projects its real slots' tokens only
        torch.testing.assert_close(token_window_inference(
            x, layout, qkv_weight, qkv_bias, bias, proj_weight, proj_bias, h, d ** -0.5, chunk),
            ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(token_window_inference(
            x, layout, qkv_weight, None, bias, proj_weight, proj_bias, h, d ** -0.5, chunk),
            official_merge(F.linear(plain_attention(F.linear(windows, qkv_weight), h,
                                                    d ** -0.5, folded, layout.num_windows),
                                    proj_weight, proj_bias), H, W, M, shift),
            rtol=1e-10, atol=1e-12)
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad_out),
                    torch.autograd.grad(ref, inputs, grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_token_projections_pay_where_the_padding_is_wide_enough():
    cpu = torch.device('cpu')
    assert not token_projections_pay(window_layout(56, 56, 7, 3, cpu), 96)  # no padding
    assert not token_projections_pay(window_layout(128, 128, 7, 3, cpu), 96)  # 7%, C=96
    assert token_projections_pay(window_layout(64, 64, 7, 3, cpu), 192)  # 16%
    assert token_projections_pay(window_layout(16, 16, 7, 0, cpu), 768)  # 42%


def test_chunked_window_attention_takes_the_mask_apart():
    """A bias with the mask already folded in would pair chunk rows with the wrong windows."""
    x, w = torch.randn(4, 16, 8), torch.randn(24, 8)
    with pytest.raises(ValueError, match=r'\(h, N, N\) bias and the shift mask apart'):
        chunked_window_attention(x, w, None, torch.randn(4, 2, 16, 16), w[:8], None, 2, 0.5, 4, 2)


@pytest.mark.parametrize('batch', [1, 2])
@pytest.mark.parametrize('training, autocast', [(False, None), (True, None),
                                                (False, torch.bfloat16)],
                         ids=['fp32-infer', 'fp32-train', 'bf16-infer'])
def test_cpu_forward_attends_in_the_fused_kernel(training, autocast, batch):
    """On CPU the forward attends in SDPA's fused kernel, never in its math fallback (which a
    3-d mask, or one that requires grad, selects: slower than explicit attention): in fp32
    and in autocast inference. (Training under autocast keeps the probabilities for backward,
    so it attends explicitly: see ``keep_probs_window_attention``.)"""
    from swin_dense import SwinBackbone
    model = SwinBackbone(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
    model.train(training)
    with torch.profiler.profile() as prof, torch.set_grad_enabled(training), \
            torch.autocast('cpu', dtype=autocast or torch.float32, enabled=autocast is not None):
        out = model(torch.randn(batch, 3, 64, 96))
    assert out[0].dtype == (autocast or torch.float32)
    ops = {e.key for e in prof.key_averages()}
    assert 'aten::_scaled_dot_product_flash_attention_for_cpu' in ops
    assert 'aten::_scaled_dot_product_attention_math' not in ops


def test_masked_probabilities_are_zeros():
    """exp(-100) is a float32 denormal; the fast path's probabilities carry 0 instead, and every
    other probability is the plain softmax's (up to float32 rounding)."""
    torch.manual_seed(0)
    layout = window_layout(14, 14, 7, 3, torch.device('cpu'))
    q, k = torch.randn(2, layout.num_windows, 3, 49, 8).unbind(0)
    bias = torch.randn(3, 49, 49).unsqueeze(0) + layout.mask.unsqueeze(1)
    probs = _attention_probs(q, k, bias, 8 ** -0.5, layout.num_windows)
    ref = ((q @ k.transpose(-2, -1)) * 8 ** -0.5 + bias).softmax(-1)
    assert ((ref > 0) & (ref < torch.finfo(torch.float32).tiny)).any()  # the reference has them
    assert not ((probs > 0) & (probs < PROB_FLOOR)).any()
    assert (probs[ref < 1e-35] == 0).all()  # far below the floor whatever the rounding
    torch.testing.assert_close(probs, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('offset', [0.0, -300.0, 250.0])
def test_masked_logits_keep_every_probability_above_the_floor(offset):
    """Masked logits are raised before the softmax so that exp() makes no denormals; whatever
    the rows' level, each probability above PROB_FLOOR equals a plain fp32 softmax's (to the
    rounding of the sums), including masked pairs whose logit is still within reach of the
    row's maximum."""
    N = 6
    row = torch.tensor([0.0, -50.0, -68.0, -75.0, -85.0, -100.5]) + offset
    logits = torch.stack([row.roll(i) for i in range(N)])  # (N, N), every column takes each value
    bias = logits.view(1, 1, N, N)  # (nW, h, N, N): a per-window bias, as with a shift mask
    q = k = torch.zeros(1, 1, N, 4)  # q k^T = 0: the logits are the bias
    probs = _attention_probs(q, k, bias, 1.0, 1)[0, 0]
    ref = logits.softmax(-1)
    kept = ref >= PROB_FLOOR
    assert kept.sum() == 3 * N  # 0, -50 and -68 below the row maximum (exp(-68) ~ 2.9e-30)
    torch.testing.assert_close(probs[kept], ref[kept], rtol=1e-6, atol=0)
    assert (probs[~kept] == 0).all()


def test_chunked_mlp_gradients_equal_autograd(monkeypatch):
    """The CPU training MLP (chunked, GELU recomputed) against the formula under autograd."""
    monkeypatch.setattr(cpu_fast, 'CHUNK_TOKENS', 4)  # 11 rows: chunks of 3, 4, 4
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    params = (torch.randn(32, 8, **f64), torch.randn(32, **f64), torch.randn(8, 32, **f64),
              torch.randn(8, **f64))
    for shape in [(11, 8), (3, 5, 8)]:  # rows, or (B, L, C) tokens: chunks across images
        u = torch.randn(shape, **f64)
        out = cpu_fast.ChunkedGeluMLP.apply(u, *params)
        ref = F.linear(F.gelu(F.linear(u, *params[:2])), *params[2:])
        grad_out = torch.randn_like(out)
        torch.testing.assert_close(out, ref)
        assert out._base is None  # a fresh tensor: the residual is added into it in place
        for a, b in zip(torch.autograd.grad(out, (u, *params), grad_out),
                        torch.autograd.grad(ref, (u, *params), grad_out)):
            torch.testing.assert_close(a, b)
    small = (torch.randn(5, 3, **f64), torch.randn(6, 3, **f64), torch.randn(6, **f64),
             torch.randn(3, 6, **f64), torch.randn(3, **f64))  # finite differences: 2 chunks
    assert torch.autograd.gradcheck(cpu_fast.ChunkedGeluMLP.apply, small)


@pytest.mark.parametrize('grad', [False, True])
def test_gelu_mlp_equals_the_formula(grad):
    """Each form of :func:`cpu_fast.gelu_mlp` (GELU in place, chunked, GELU recomputed) gives
    the formula's outputs and gradients (float64: the chunked kernel is fp32 only, so the
    recompute path runs here; fp32 below)."""
    torch.manual_seed(0)
    w1, b1, w2, b2 = (torch.randn(32, 8), torch.randn(32), torch.randn(8, 32), torch.randn(8))
    for dtype in (torch.float32, torch.float64):
        params = [p.to(dtype).requires_grad_() for p in (w1, b1, w2, b2)]
        x = torch.randn(2, 5, 8, dtype=dtype, requires_grad=True)
        with torch.set_grad_enabled(grad):
            out = cpu_fast.gelu_mlp(x, *params)
        ref = F.linear(F.gelu(F.linear(x, *params[:2])), *params[2:])
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
        torch.testing.assert_close(out, ref.detach() if not grad else ref, **tol)
        if grad:
            for a, b in zip(torch.autograd.grad(out.sum(), (x, *params)),
                            torch.autograd.grad(ref.sum(), (x, *params))):
                torch.testing.assert_close(a, b, **tol)


def test_tokens_to_nchw_in_blocks_equals_permute(monkeypatch):
    monkeypatch.setattr(cpu_fast, 'TRANSPOSE_BLOCK_NUMEL', 2 * 7 * 3)  # blocks of 2 rows of 5
    x = torch.randn(2, 5 * 7, 3, dtype=torch.float64, requires_grad=True)
    out = cpu_fast.tokens_to_nchw(x, (5, 7))
    assert out.is_contiguous()
    assert torch.equal(out, x.view(2, 5, 7, 3).permute(0, 3, 1, 2))  # a copy: exact
    assert torch.autograd.gradcheck(lambda t: cpu_fast.tokens_to_nchw(t, (5, 7)), (x,))


def test_skippable_residual_gives_dropped_branches_zero_gradients():
    x = torch.randn(2, 3, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    calls = []

    def branch(t):
        calls.append(1)
        return t * w

    out = cpu_fast.skippable_residual(x, torch.zeros(2, 1), branch, [w])
    out.sum().backward()
    assert not calls
    assert torch.equal(w.grad, torch.zeros(3)) and torch.equal(x.grad, torch.ones(2, 3))
    out = cpu_fast.skippable_residual(x, torch.tensor([[2.0], [0.0]]), branch, [w])
    torch.testing.assert_close(out, x + x * w * torch.tensor([[2.0], [0.0]]))


# ---------------------------------------------------------------- the switch

def test_switch_context_manager_restores_the_flag():
    assert cpu_fast.ENABLED and cpu_fast.applies()
    with cpu_fast.enabled(False):
        assert not cpu_fast.applies()
        with cpu_fast.enabled(True):
            assert cpu_fast.applies()
        assert not cpu_fast.applies()
    assert cpu_fast.applies()


@pytest.mark.parametrize('value, expected', [('0', False), ('off', False), ('1', True),
                                             ('', True)])
def test_switch_reads_the_environment(value, expected):
    code = 'from swin_dense.ops import cpu_fast; print(cpu_fast.ENABLED, cpu_fast.applies())'
    env = {**os.environ, 'SWIN_DENSE_CPU_FAST': value}
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [str(expected)] * 2


def test_switch_rejects_a_value_it_does_not_know():
    code = 'import swin_dense.ops.cpu_fast'
    env = {**os.environ, 'SWIN_DENSE_CPU_FAST': 'maybe'}
    run = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert 'SWIN_DENSE_CPU_FAST' in run.stderr and 'set it to 0' in run.stderr


def test_switch_is_off_while_a_graph_is_captured():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(cpu_fast.applies())
            return x * 2

    x = torch.randn(2, 3)
    Probe()(x)
    assert seen == [True]
    seen.clear()
    torch.jit.trace(Probe(), x, check_trace=False)
    torch.export.export(Probe(), (x,))
    torch._dynamo.reset()
    torch.compile(Probe(), backend='eager')(x)
    assert seen and not any(seen)
