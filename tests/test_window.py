"""The functional window core against a direct transcription of the official algorithm."""
import pytest
import torch
import torch.nn.functional as F

from swin_dense.window import (MASK_VALUE, PROB_FLOOR, _attention_probs,
                               chunked_window_attention, even_chunks, merge_windows,
                               partition_windows, relative_position_bias,
                               relative_position_index, shift_mask,
                               token_projections_pay, token_window_attention,
                               tokens_from_windows, window_attention, window_layout,
                               windows_from_tokens)


def official_windows(x, H, W, M, s):
    """pad -> roll(-s) -> partition, written out step by step as in the official code."""
    B, L, C = x.shape
    x = x.view(B, H, W, C)
    x = F.pad(x, (0, 0, 0, (M - W % M) % M, 0, (M - H % M) % M))
    Hp, Wp = x.shape[1:3]
    if s:
        x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
    x = x.view(B, Hp // M, M, Wp // M, M, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, M * M, C), Hp, Wp


def official_merge(windows, H, W, M, s):
    """The official inverse, step by step: reverse partition, roll back by +s, crop."""
    Hp, Wp = -(-H // M) * M, -(-W // M) * M
    B, C = windows.shape[0] // (Hp // M * (Wp // M)), windows.shape[-1]
    y = windows.view(B, Hp // M, Wp // M, M, M, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    return torch.roll(y, shifts=(s, s), dims=(1, 2))[:, :H, :W].reshape(B, H * W, C)


def official_mask(Hp, Wp, M, s):
    """The official slice-based construction of the SW-MSA mask."""
    img_mask = torch.zeros(1, Hp, Wp, 1)
    cnt = 0
    for h in (slice(0, -M), slice(-M, -s), slice(-s, None)):
        for w in (slice(0, -M), slice(-M, -s), slice(-s, None)):
            img_mask[:, h, w, :] = cnt
            cnt += 1
    win = img_mask.view(1, Hp // M, M, Wp // M, M, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, M * M)
    mask = win.unsqueeze(1) - win.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


SIZES = [(1, 1), (2, 3), (7, 7), (8, 13), (14, 14), (28, 35), (17, 9), (56, 56)]


@pytest.mark.parametrize('M', [7, 12, 4])
@pytest.mark.parametrize('H,W', SIZES)
def test_gather_equals_pad_roll_partition(H, W, M):
    x = torch.randn(2, H * W, 5)
    for s in (0, M // 2):
        layout = window_layout(H, W, M, s, torch.device('cpu'))
        ref, Hp, Wp = official_windows(x, H, W, M, s)
        assert torch.equal(windows_from_tokens(x, layout), ref)
        assert torch.equal(partition_windows(x, (H, W), M, s), ref)  # the traced variant
        assert layout.num_windows == (Hp // M) * (Wp // M)


@pytest.mark.parametrize('H,W', SIZES)
def test_scatter_inverts_gather_with_crop(H, W):
    M = 7
    x = torch.randn(3, H * W, 4)
    for s in (0, 3):
        layout = window_layout(H, W, M, s, torch.device('cpu'))
        assert torch.equal(tokens_from_windows(windows_from_tokens(x, layout), layout), x)
        assert torch.equal(official_merge(official_windows(x, H, W, M, s)[0], H, W, M, s), x)
        # Any windows (padding slots not zero): both inverses read the same slots.
        w = torch.randn(3 * layout.num_windows, M * M, 4)
        y = official_merge(w, H, W, M, s)
        assert torch.equal(merge_windows(w, (H, W), M, s), y)
        assert torch.equal(tokens_from_windows(w, layout), y)


@pytest.mark.parametrize('M', [7, 12])
@pytest.mark.parametrize('H,W', SIZES)
def test_shift_mask_equals_official_slices(H, W, M):
    s = M // 2
    layout = window_layout(H, W, M, s, torch.device('cpu'))
    Hp, Wp = -(-H // M) * M, -(-W // M) * M
    assert torch.equal(layout.mask, official_mask(Hp, Wp, M, s))
    assert torch.equal(shift_mask(Hp, Wp, M, s), official_mask(Hp, Wp, M, s))
    assert set(layout.mask.unique().tolist()) <= {0.0, MASK_VALUE}
    assert window_layout(H, W, M, 0, torch.device('cpu')).mask is None


def test_shift_mask_hand_case():
    # 4x4 map, window 4, shift 2: one window; rows/cols split into regions {0,1} and {2,3}
    # after the shift, so token (0,0) may attend only to tokens in rows 0-1 and cols 0-1.
    layout = window_layout(4, 4, 4, 2, torch.device('cpu'))
    allowed = (layout.mask[0, 0] == 0).view(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(allowed, expected)


def test_layout_is_cached_per_size():
    a = window_layout(10, 11, 7, 3, torch.device('cpu'))
    assert window_layout(10, 11, 7, 3, torch.device('cpu')) is a
    assert window_layout(10, 12, 7, 3, torch.device('cpu')) is not a


def test_bad_shift_is_a_clear_error():
    with pytest.raises(ValueError, match='shift_size'):
        window_layout(8, 8, 7, 7, torch.device('cpu'))


@pytest.mark.parametrize('M', [2, 7, 12])
def test_relative_position_index_formula(M):
    index = relative_position_index(M, torch.device('cpu'))
    for i in range(M * M):
        for j in range(0, M * M, 5):
            yi, xi, yj, xj = i // M, i % M, j // M, j % M
            assert index[i, j] == (yi - yj + M - 1) * (2 * M - 1) + (xi - xj + M - 1)
    assert index.max() == (2 * M - 1) ** 2 - 1 and index.min() == 0


def test_relative_position_bias_shape_and_values():
    M, h = 7, 3
    table = torch.randn((2 * M - 1) ** 2, h)
    bias = relative_position_bias(table, M)
    assert bias.shape == (h, M * M, M * M)
    # The diagonal is the zero offset, the centre of the table.
    centre = (M - 1) * (2 * M - 1) + (M - 1)
    assert torch.equal(bias[:, 5, 5], table[centre])


@pytest.mark.parametrize('shift', [0, 3])
def test_partition_gradients(shift):
    """Each direction's backward is the other direction's gather: check by finite differences."""
    layout = window_layout(9, 11, 7, shift, torch.device('cpu'))  # padded to 14 x 14
    x = torch.randn(2, 9 * 11, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: windows_from_tokens(t, layout), (x,))
    w = torch.randn(2 * layout.num_windows, 49, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tokens_from_windows(t, layout), (w,))


def test_window_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    B, nW, N, h, d = 2, 3, 49, 4, 8
    qkv = torch.randn(B * nW, N, 3 * h * d)
    bias = torch.randn(nW, h, N, N)
    weight, proj_bias = torch.randn(h * d, h * d), torch.randn(h * d)
    out = window_attention(qkv, h, d ** -0.5, bias, nW, weight, proj_bias)
    q, k, v = qkv.view(B * nW, N, 3, h, d).permute(2, 0, 3, 1, 4)
    attn = (q * d ** -0.5) @ k.transpose(-2, -1)
    attn = attn.view(B, nW, h, N, N) + bias.unsqueeze(0)
    ref = (attn.view(-1, h, N, N).softmax(-1) @ v).transpose(1, 2).reshape(B * nW, N, h * d)
    torch.testing.assert_close(out, F.linear(ref, weight, proj_bias), rtol=0, atol=1e-4)


def plain_attention(qkv, h, scale, bias, nW):
    """The formula with autograd's own backward: the reference for our gradients."""
    BW, N, C3 = qkv.shape
    q, k, v = qkv.view(BW, N, 3, h, -1).permute(2, 0, 3, 1, 4)
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = (attn.view(-1, nW, h, N, N) + bias).view(BW, h, N, N).softmax(-1)
    return (attn @ v).transpose(1, 2).reshape(BW, N, C3 // 3)


@pytest.mark.parametrize('per_window', [False, True])
def test_window_attention_gradients_equal_autograd(per_window):
    torch.manual_seed(0)
    B, nW, N, h, d = 2, 3, 16, 2, 4
    f64 = dict(dtype=torch.float64, requires_grad=True)
    qkv = torch.randn(B * nW, N, 3 * h * d, **f64)
    bias = torch.randn(*((nW,) if per_window else ()), h, N, N, **f64)
    weight, proj_bias = torch.randn(h * d, h * d, **f64), torch.randn(h * d, **f64)
    inputs = (qkv, bias, weight, proj_bias)
    grad_out = torch.randn(B * nW, N, h * d, dtype=torch.float64)
    results = []
    for fn in (window_attention,
               lambda *a: F.linear(plain_attention(*a[:5]), a[5], a[6])):
        out = fn(qkv, h, d ** -0.5, bias, nW, weight, proj_bias)
        results.append((out, *torch.autograd.grad(out, inputs, grad_out)))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # the inference branch (fused kernel, nothing saved): the same numbers
        torch.testing.assert_close(window_attention(qkv, h, d ** -0.5, bias, nW, weight, proj_bias),
                                   results[1][0], rtol=1e-10, atol=1e-12)
    # Finite differences on a tiny case, independent of any autograd formula.
    small = (qkv[:nW, :4, :6].detach().clone().requires_grad_(),
             bias[..., :1, :4, :4].detach().clone().requires_grad_(),
             weight[:2, :2].detach().clone().requires_grad_(),
             proj_bias[:2].detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(
        lambda a, b, w, c: window_attention(a, 1, 0.5, b, nW, w, c), small)


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
    so it attends explicitly: see ``window._WindowAttention``.)"""
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


def test_masked_probabilities_are_exact_zeros():
    """exp(-100) is a float32 denormal; the probabilities carry 0 instead (no output changes)."""
    torch.manual_seed(0)
    layout = window_layout(14, 14, 7, 3, torch.device('cpu'))
    q, k = torch.randn(2, layout.num_windows, 3, 49, 8).unbind(0)
    bias = torch.randn(3, 49, 49).unsqueeze(0) + layout.mask.unsqueeze(1)
    probs = _attention_probs(q, k, bias, 8 ** -0.5, layout.num_windows)
    ref = ((q @ k.transpose(-2, -1)) * 8 ** -0.5 + bias).softmax(-1)
    assert ((ref > 0) & (ref < torch.finfo(torch.float32).tiny)).any()  # the reference has them
    assert not ((probs > 0) & (probs < PROB_FLOOR)).any()
    assert torch.equal(probs[ref >= PROB_FLOOR], ref[ref >= PROB_FLOOR])


@pytest.mark.parametrize('offset', [0.0, -300.0, 250.0])
def test_masked_logits_keep_every_probability_above_the_floor(offset):
    """Masked logits are raised before the softmax so that exp() makes no denormals; whatever
    the rows' level, each probability above PROB_FLOOR equals a plain fp32 softmax's to the bit,
    including masked pairs whose logit is still within reach of the row's maximum."""
    N = 6
    row = torch.tensor([0.0, -50.0, -68.0, -75.0, -85.0, -100.5]) + offset
    logits = torch.stack([row.roll(i) for i in range(N)])  # (N, N), every column takes each value
    bias = logits.view(1, 1, N, N)  # (nW, h, N, N): a per-window bias, as with a shift mask
    q = k = torch.zeros(1, 1, N, 4)  # q k^T = 0: the logits are the bias
    probs = _attention_probs(q, k, bias, 1.0, 1)[0, 0]
    ref = logits.softmax(-1)
    kept = ref >= PROB_FLOOR
    assert kept.sum() == 3 * N  # 0, -50 and -68 below the row maximum (exp(-68) ~ 2.9e-30)
    assert torch.equal(probs[kept], ref[kept])
    assert (probs[~kept] == 0).all()


@pytest.mark.parametrize('B', [1, 2])
@pytest.mark.parametrize('per_window', [False, True])
def test_sdpa_path_equals_formula(per_window, B):
    from swin_dense.window import _sdpa_window_attention
    torch.manual_seed(0)
    nW, N, h, d = 3, 49, 3, 8
    qkv = torch.randn(B * nW, N, 3 * h * d)
    bias = torch.randn(*((nW,) if per_window else ()), h, N, N)
    torch.testing.assert_close(_sdpa_window_attention(qkv, h, d ** -0.5, bias, nW, 0.0),
                               plain_attention(qkv, h, d ** -0.5, bias, nW), rtol=0, atol=1e-5)
