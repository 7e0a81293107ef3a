"""The modules of swin_dense.layers: each against its formula or mmcv's brick, with the fast
path on and off."""
import pytest
import torch

from swin_dense import SwinBackbone
from swin_dense.layers import FFN, DropPath, PatchMerging, ShiftWindowMSA, SwinBlock
from swin_dense.ops import cpu_fast

SMALL = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7)


def small(**kwargs):
    torch.manual_seed(0)
    model = SwinBackbone(**{**SMALL, **kwargs})
    model.init_weights()
    return model


@pytest.fixture(params=[True, False], ids=['fast', 'plain'])
def fast(request):
    with cpu_fast.enabled(request.param):
        yield request.param


def test_ffn_gradients_equal_autograd(fast):
    """The fast path recomputes the GELU in backward; both paths give autograd's gradients."""
    torch.manual_seed(0)
    ffn = FFN(8, 32, dict(type='GELU')).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    out = ffn(x)
    grads = torch.autograd.grad(out.sum() * 3, [x, *ffn.parameters()])
    ref_out = ffn.layers[1](torch.nn.functional.gelu(ffn.layers[0][0](x)))
    ref = torch.autograd.grad(ref_out.sum() * 3, [x, *ffn.parameters()])
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(ffn, (x[:1, :2],))


def test_drop_path_draws_equal_mmcv():
    from mmcv.cnn.bricks.drop import DropPath as MmcvDropPath
    x = torch.randn(16, 50, 8)
    outs = []
    for module in (MmcvDropPath(0.3), DropPath(0.3)):
        torch.manual_seed(1)
        outs.append(module.train()(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=0)
    dropped = outs[1].flatten(1).abs().sum(1) == 0
    assert 0 < dropped.sum() < 16  # some samples dropped, some kept


@pytest.mark.parametrize('autocast', [None, torch.bfloat16], ids=['fp32', 'bf16'])
def test_eval_bias_cache_follows_the_table(autocast):
    """The relative bias cached across eval forwards: the outputs of the path without it (grad
    enabled), in the dtype the attention runs in, and rebuilt when the table changes in place."""
    model = small().eval()
    w_msa = model.stages[0].blocks[1].attn.w_msa  # an SW-MSA block (bias and mask)
    with torch.no_grad():  # an attention branch that counts beside the residual
        w_msa.proj.weight.mul_(30)
    x = torch.randn(1, 3, 75, 101)
    ctx = dict(device_type='cpu', dtype=autocast or torch.float32, enabled=autocast is not None)
    # under bf16 autocast, inference attends in chunks and the grad-enabled path in one batch:
    # the same sums, which bf16 GEMMs may round differently
    # in fp32 the two are different computations too (chunked inference, the training path's
    # kernels): equal up to float32 rounding
    tol = dict(rtol=1e-5, atol=1e-5) if autocast is None else dict(rtol=0, atol=0.05)

    def forward(grad):
        with torch.set_grad_enabled(grad), torch.autocast(**ctx):
            return [o.detach().float() for o in model(x)]

    uncached = forward(True)
    cached, again = forward(False), forward(False)  # fills the cache, reads it
    for a, b, c in zip(cached, again, uncached):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same computation: bit-identical
        torch.testing.assert_close(a, c, **tol)
    assert {t.dtype for t in w_msa._bias_cache.values()} == {autocast or torch.float32}
    with torch.no_grad():  # in place, as load_state_dict does; a change far above `tol`
        w_msa.relative_position_bias_table.normal_(0, 5)
    changed = forward(False)
    assert (changed[0] - cached[0]).abs().max() > 0.2  # 0.67 when written
    for a, c in zip(changed, forward(True)):
        torch.testing.assert_close(a, c, **tol)


@pytest.mark.parametrize('hw', [(9, 13), (14, 14), (3, 5)])
@pytest.mark.parametrize('shift', [False, True])
def test_plain_window_path_equals_the_cached_gathers(hw, shift):
    """What graph capture runs (views, slices, a mask from the sizes) against the fast path's
    cached gathers: outputs and gradients."""
    torch.manual_seed(0)
    attn = ShiftWindowMSA(8, 2, 7, 3 if shift else 0).double()
    torch.nn.init.normal_(attn.w_msa.relative_position_bias_table, std=0.5)
    x = torch.randn(2, hw[0] * hw[1], 8, dtype=torch.float64, requires_grad=True)
    out = attn(x, hw)
    with cpu_fast.enabled(False):
        plain = attn(x, hw)
    torch.testing.assert_close(plain, out)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(plain, (x, *attn.parameters()), grad),
                    torch.autograd.grad(out, (x, *attn.parameters()), grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('training', [False, True])
@pytest.mark.parametrize('hw', [(9, 13), (14, 14)])
def test_block_paths_agree(training, hw):
    """A whole block (stochastic depth off: the paths would draw in another order), fast against
    plain, in float32: outputs and gradients equal up to float32 rounding."""
    torch.manual_seed(0)
    block = SwinBlock(16, 2, 64, 7, shift=True).train(training)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, hw[0] * hw[1], 16, requires_grad=True)
    results = []
    for on in (True, False):
        with cpu_fast.enabled(on), torch.set_grad_enabled(training):
            out = block(x, hw)
        params = (x, *block.parameters())
        grads = torch.autograd.grad(out.square().sum(), params) if training else ()
        results.append((out.detach(), *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('hw', [(6, 8), (7, 9), (1, 1)])
def test_patch_merging_equals_mmcv_unfold(hw, fast):
    # Ours concatenates in (dy, dx, c) order and permutes the Unfold-order parameters to match.
    from mmcv.cnn.bricks.transformer import PatchMerging as MmcvPatchMerging
    torch.manual_seed(0)
    peer = MmcvPatchMerging(6, 12, stride=2, norm_cfg=dict(type='LN'))
    for p in peer.norm.parameters():
        torch.nn.init.normal_(p)
    ours = PatchMerging(6, 12, dict(type='LN'))
    ours.load_state_dict(peer.state_dict())
    x = torch.randn(2, hw[0] * hw[1], 6, requires_grad=True)
    out, out_hw = ours(x, hw)
    ref, ref_hw = peer(x, hw)
    assert out_hw == tuple(ref_hw)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, *ours.parameters()), grad),
                    torch.autograd.grad(ref, (x, *peer.parameters()), grad)):
        torch.testing.assert_close(a, b)
