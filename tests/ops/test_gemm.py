"""The fast path's GEMM choice: every library gives the product within float32 rounding, and
what autograd records or what is not fp32 on the CPU stays on PyTorch's own ops."""
import pytest
import torch
import torch.nn.functional as F

from swin_dense.ops import gemm


@pytest.fixture(params=['torch', 'onednn', 'auto', 'measure'])
def gemm_mode(request):
    gemm.set_mode(request.param)
    yield request.param
    gemm.set_mode(None)


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_linear_matches_f_linear(gemm_mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 48, generator=g)
    w = torch.randn(96, 48, generator=g)
    b = torch.randn(96, generator=g)
    close(gemm.linear(x, w, b), F.linear(x, w, b))
    close(gemm.linear(x.view(3, 100, 48), w, None), F.linear(x, w).view(3, 100, 96))
    out = torch.empty(300, 96)
    assert gemm.linear_into(out, x, w, b).data_ptr() == out.data_ptr()
    close(out, F.linear(x, w, b))


def test_mm_and_addmm_on_transposed_operands(gemm_mode):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(200, 64, generator=g)
    b = torch.randn(200, 32, generator=g)
    close(gemm.mm(a.t(), b), a.t().mm(b))  # a weight gradient: a^T b
    w = torch.randn(64, 32, generator=g)
    out = torch.empty(200, 32)
    gemm.mm(a, w, out=out)
    close(out, a.mm(w))
    acc = torch.ones(64, 32)
    close(gemm.addmm_(acc, a.t(), b), torch.ones(64, 32) + a.t().mm(b))


def test_recorded_and_other_dtypes_stay_on_torch(gemm_mode):
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(4, 8, requires_grad=True)
    y = gemm.linear(x, w)
    y.sum().backward()  # autograd works: PyTorch's own op ran
    close(x.grad, w.detach().sum(0).expand(10, 8))
    xd, wd = x.detach().double(), w.detach().double()
    assert gemm.linear(xd, wd).dtype == torch.float64


def test_measure_times_each_shape_once():
    gemm.set_mode('measure')
    try:
        x, w = torch.randn(100, 16), torch.randn(24, 16)
        gemm.linear(x, w)
        gemm.linear(x[:70], w)  # 64-127 rows: the same entry
        assert len(gemm.choices()) == 1
        gemm.linear(x.t().contiguous().t(), w)  # transposed input: its own entry
        assert len(gemm.choices()) == 2
    finally:
        gemm.set_mode(None)


def test_bad_setting_says_what_to_do(monkeypatch):
    monkeypatch.setenv('SWIN_DENSE_CPU_GEMM', 'mkl')
    gemm.set_mode(None)
    try:
        with pytest.raises(ValueError, match='SWIN_DENSE_CPU_GEMM'):
            gemm.linear(torch.randn(4, 4), torch.randn(4, 4))
    finally:
        monkeypatch.delenv('SWIN_DENSE_CPU_GEMM')
        gemm.set_mode(None)
    with pytest.raises(ValueError, match='must be one of'):
        gemm.set_mode('blas')


@pytest.mark.parametrize('mode', ['torch', 'onednn'])
def test_fast_kernels_in_fp32_on_each_library_match_float64_autograd(mode):
    """The chunked attention, the token attention and the chunked MLP in fp32 with each library
    (outputs and gradients) against the same sums in float64 under autograd."""
    from swin_dense.ops import cpu_fast
    from swin_dense.ops.chunked_attention import chunked_window_attention
    from swin_dense.ops.token_attention import token_window_attention
    from swin_dense.ops.window import window_layout, windows_from_tokens, tokens_from_windows

    gemm.set_mode(mode)
    try:
        g = torch.Generator().manual_seed(2)
        H, W, M, h, d = 9, 10, 5, 2, 8
        C = h * d
        layout = window_layout(H, W, M, 2, torch.device('cpu'))
        params64 = [torch.randn(s, generator=g, dtype=torch.float64) / 4 for s in
                    [(2, H * W, C), (3 * C, C), (3 * C,), (h, M * M, M * M), (C, C), (C,),
                     (4 * C, C), (4 * C,), (C, 4 * C), (C,)]]

        def run(dtype, kind):
            ps = [p.to(dtype).requires_grad_() for p in params64]
            x, qw, qb, bias, pw, pb, w1, b1, w2, b2 = ps
            if kind == 'tokens':
                y = token_window_attention(x, layout, qw, qb, bias, pw, pb, h, d ** -0.5, 3)
            else:
                y = tokens_from_windows(chunked_window_attention(
                    windows_from_tokens(x, layout), qw, qb, bias, pw, pb, h, d ** -0.5,
                    layout.num_windows, 3, layout.mask), layout)
            y = cpu_fast.ChunkedGeluMLP.apply(y, w1, b1, w2, b2) if dtype == torch.float32 \
                else F.linear(F.gelu(F.linear(y, w1, b1)), w2, b2)
            return y, torch.autograd.grad(y.square().sum(), ps)

        for kind in ('tokens', 'windows'):
            ours, ours_grads = run(torch.float32, kind)
            ref, ref_grads = run(torch.float64, kind)
            close(ours.double(), ref.detach())
            for a, b in zip(ours_grads, ref_grads):
                torch.testing.assert_close(a.double(), b, rtol=1e-4,
                                           atol=1e-5 * b.abs().max().item())
    finally:
        gemm.set_mode(None)


def test_measuring_a_shape_leaves_the_global_random_state_alone():
    """Stochastic depth and dropout draw from the global generator: the first product of a shape
    (which measures both libraries) must not shift their draws."""
    gemm.set_mode('measure')
    try:
        x, w = torch.randn(300, 40), torch.randn(56, 40)
        torch.manual_seed(7)
        expected = torch.rand(5)
        torch.manual_seed(7)
        gemm.linear(x, w)
        assert len(gemm.choices()) == 1
        assert torch.equal(torch.rand(5), expected)  # the same generator state: the same draws
    finally:
        gemm.set_mode(None)


def test_auto_is_the_same_choice_in_every_process():
    """``auto`` decides by the CPU's vendor, never by a timing: a resumed or distributed run
    computes the same sums in every process."""
    gemm.set_mode('auto')
    try:
        x, w = torch.randn(300, 40), torch.randn(56, 40)
        gemm.linear(x, w)
        assert gemm.choices() == {}  # nothing timed
        expected = gemm.cpu_vendor() == 'AuthenticAMD' and gemm._onednn_available()
        assert gemm._use_onednn(x, w, None) == expected
    finally:
        gemm.set_mode(None)
