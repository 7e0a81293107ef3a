"""The plain window attention: both formulations against the formula, and which one a captured
graph holds."""
import pytest
import torch
import torch.nn.functional as F

from swin_dense.ops.attention import (capturing_graph, explicit_window_attention, exporting,
                                      fold_mask, fused_window_attention, window_attention)
from swin_dense.ops.window import MASK_VALUE

FORMS = [explicit_window_attention, fused_window_attention]


def formula(qkv, h, scale, bias, mask=None):
    """mmdet's formula, written out with its own reshapes."""
    BW, N, C3 = qkv.shape
    q, k, v = qkv.view(BW, N, 3, h, -1).permute(2, 0, 3, 1, 4)
    attn = (q * scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        attn = (attn.view(BW // nW, nW, h, N, N) + mask.unsqueeze(1).unsqueeze(0)).view(BW, h, N, N)
    return (attn.softmax(-1) @ v).transpose(1, 2).reshape(BW, N, C3 // 3)


def random_mask(nW, N, generator=None):
    return (torch.rand(nW, N, N, generator=generator) < 0.3).double() * MASK_VALUE


@pytest.mark.parametrize('form', FORMS, ids=['explicit', 'fused'])
@pytest.mark.parametrize('batch', [1, 2])
@pytest.mark.parametrize('with_mask', [False, True])
def test_forms_equal_the_formula(form, batch, with_mask):
    g = torch.Generator().manual_seed(0)
    nW, N, h, d = 3, 49, 3, 8
    qkv = torch.randn(batch * nW, N, 3 * h * d, generator=g)
    bias = torch.randn(h, N, N, generator=g)
    mask = random_mask(nW, N, g).float() if with_mask else None
    torch.testing.assert_close(form(qkv, h, d ** -0.5, bias, mask),
                               formula(qkv, h, d ** -0.5, bias, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('form', FORMS, ids=['explicit', 'fused'])
@pytest.mark.parametrize('with_mask', [False, True])
def test_gradients_equal_the_formula(form, with_mask):
    """float64, every input that takes a gradient (the bias table's gradient flows through the
    bias); finite differences on a tiny case as well."""
    g = torch.Generator().manual_seed(1)
    nW, N, h, d = 2, 16, 2, 4
    f64 = dict(dtype=torch.float64, requires_grad=True)
    qkv = torch.randn(2 * nW, N, 3 * h * d, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(h, N, N, generator=g, dtype=torch.float64).requires_grad_()
    mask = random_mask(nW, N, g) if with_mask else None
    grad_out = torch.randn(2 * nW, N, h * d, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(form(qkv, h, 0.5, bias, mask), (qkv, bias), grad_out)
    ref = torch.autograd.grad(formula(qkv, h, 0.5, bias, mask), (qkv, bias), grad_out)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    small = (torch.randn(nW, 4, 6, **f64), torch.randn(1, 4, 4, **f64))
    small_mask = None if mask is None else mask[:, :4, :4]
    assert torch.autograd.gradcheck(lambda a, b: form(a, 1, 0.5, b, small_mask), small)


def test_fold_mask_adds_the_rows_of_the_windows():
    bias, mask = torch.randn(2, 4, 4), random_mask(3, 4).float()
    torch.testing.assert_close(fold_mask(bias, mask), bias.unsqueeze(0) + mask.unsqueeze(1),
                               rtol=0, atol=0)
    torch.testing.assert_close(fold_mask(bias, mask, slice(1, 2)),
                               bias.unsqueeze(0) + mask[1:2].unsqueeze(1), rtol=0, atol=0)
    assert fold_mask(bias, None) is bias


def test_eager_is_neither_capturing_nor_exporting():
    assert not capturing_graph() and not exporting()


def test_traced_graphs_hold_the_explicit_products():
    """Under tracing (what the FLOP counters and the TorchScript ONNX exporter read) the two
    products are matmuls and the softmax is explicit; eager attends in the fused kernel."""
    qkv, bias, mask = torch.randn(4, 16, 24), torch.randn(2, 16, 16), random_mask(2, 16).float()
    seen = []

    def attend(a, b, m):
        seen.append((capturing_graph(), exporting()))
        return window_attention(a, 2, 0.5, b, m)

    graph = torch.jit.trace(attend, (qkv, bias, mask)).graph
    kinds = {node.kind() for node in graph.nodes()}
    assert {'aten::matmul', 'aten::softmax'} <= kinds
    assert not any('scaled_dot_product' in k for k in kinds)
    assert seen[0] == (True, True)


def test_compile_captures_without_exporting():
    seen = []

    def attend(a, b):
        seen.append((capturing_graph(), exporting()))
        return window_attention(a, 2, 0.5, b)

    torch._dynamo.reset()
    torch.compile(attend, backend='eager', fullgraph=True)(torch.randn(4, 16, 24),
                                                           torch.randn(2, 16, 16))
    assert seen == [(True, False)]


def test_export_is_exporting():
    seen = []

    class Attend(torch.nn.Module):
        def forward(self, a, b):
            seen.append((capturing_graph(), exporting()))
            return window_attention(a, 2, 0.5, b)

    program = torch.export.export(Attend(), (torch.randn(4, 16, 24), torch.randn(2, 16, 16)))
    assert seen and all(s == (True, True) for s in seen)
    ops = {str(n.target) for n in program.graph.nodes if n.op == 'call_function'}
    assert not any('scaled_dot_product' in op for op in ops)


def test_dropout_draws_on_the_probabilities():
    """Attention dropout in training: some probabilities dropped, the rest rescaled (the fused
    kernel draws its own mask, so only the statistics are comparable)."""
    torch.manual_seed(0)
    qkv = torch.randn(6, 16, 24)
    bias = torch.zeros(2, 16, 16)
    out = fused_window_attention(qkv, 2, 0.5, bias, None, dropout_p=0.5)
    ref = formula(qkv, 2, 0.5, bias)
    assert out.shape == ref.shape and not torch.allclose(out, ref)
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.5
