"""Digit-for-digit parity with the toolkits' own Swin (mmdet's and mmseg's ``SwinTransformer``).

Weights move from the peer into SwinBackbone the way a user moves them: a detector checkpoint
written by mmdet (keys under ``backbone.``) or a backbone file from mmseg, loaded through
``init_cfg=dict(type='Pretrained', checkpoint=PATH)`` and ``init_weights()``.
"""
import pytest
import torch

from numerics import rel
from swin_dense import SwinBackbone
from swin_dense.ops import cpu_fast
from swin_peers import ATOL, BASE, TINY, peer_and_ours

mmdet_backbones = pytest.importorskip('mmdet.models.backbones')
mmseg_backbones = pytest.importorskip('mmseg.models.backbones')


@pytest.fixture(params=[True, False], ids=['fast', 'plain'])
def fast(request):
    """The numerical tests run twice: with the eager fast path, and with the plain path only
    (what export, tracing and compile run)."""
    with cpu_fast.enabled(request.param):
        yield request.param


def assert_same_outputs(peer, ours, size, batch=2, seed=0):
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected, got = peer(x), ours(x)
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        assert (e - g).abs().max().item() <= ATOL


@pytest.fixture(scope='module')
def tiny_pair(tmp_path_factory):
    return peer_and_ours(tmp_path_factory.mktemp('tiny'), mmdet_backbones.SwinTransformer, TINY,
                         detector_file=True)


@pytest.fixture(scope='module')
def base_pair(tmp_path_factory):
    return peer_and_ours(tmp_path_factory.mktemp('base'), mmdet_backbones.SwinTransformer, BASE,
                         detector_file=True)


@pytest.mark.parametrize('size', [(224, 224), (512, 512), (511, 511), (112, 137), (800, 1333),
                                  (33, 47), (7, 7), (2, 2), (1, 1), (64, 1000)])
def test_swin_t_equals_mmdet(tiny_pair, size, fast):
    assert_same_outputs(*tiny_pair, size)


@pytest.mark.parametrize('size', [(224, 224), (511, 511), (112, 137), (2, 2), (29, 61)])
def test_swin_b_equals_mmdet(base_pair, size, fast):
    assert_same_outputs(*base_pair, size)


@pytest.mark.slow
@pytest.mark.parametrize('size', [(512, 512), (800, 1333)])
def test_swin_b_equals_mmdet_large_inputs(base_pair, size, fast):
    assert_same_outputs(*base_pair, size)


def test_parameter_count_equals_mmdet(tiny_pair, base_pair):
    for peer, ours in (tiny_pair, base_pair):
        assert sum(p.numel() for p in ours.parameters()) == sum(
            p.numel() for p in peer.parameters())


@pytest.mark.parametrize('shape,kwargs,sizes', [
    (TINY, {}, [(511, 511), (112, 137), (224, 224)]),
    (BASE, dict(window_size=12, pretrain_img_size=384), [(512, 512), (97, 130)]),
    (TINY, dict(out_indices=(1, 3), mlp_ratio=4), [(100, 100)]),
])
def test_equals_mmseg_backbone_file(tmp_path, shape, kwargs, sizes, fast):
    peer, ours = peer_and_ours(tmp_path, mmseg_backbones.SwinTransformer, shape,
                               detector_file=False, **kwargs)
    for size in sizes:
        assert_same_outputs(peer, ours, size, seed=1)


def test_absolute_position_embedding_equals_mmdet_at_pretrain_size(tmp_path, fast):
    kwargs = dict(use_abs_pos_embed=True, pretrain_img_size=224)
    peer, ours = peer_and_ours(tmp_path, mmdet_backbones.SwinTransformer, TINY, True, **kwargs)
    assert_same_outputs(peer, ours, (224, 224))


def train_gradients(model, size, seed: int, with_parameters: bool = False) -> list:
    """In train mode, the gradients of a fixed loss of the outputs: the input's, then (with
    ``with_parameters``) every parameter's that gets one, by parameter name."""
    model.train()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))
    x.requires_grad_(True)
    torch.manual_seed(7)  # the same stochastic-depth draws, in the same order
    loss = sum((o * torch.linspace(-1, 1, o.shape[-1])).sum() for o in model(x))
    loss.backward()
    if not with_parameters:
        return [x.grad]
    return [x.grad, *(p.grad for _, p in sorted(model.named_parameters()) if p.grad is not None)]


@pytest.mark.parametrize('drop_path_rate', [0.0, 0.2])
def test_train_mode_input_gradients_equal_mmdet(tmp_path, drop_path_rate, fast):
    peer, ours = peer_and_ours(tmp_path, mmdet_backbones.SwinTransformer, TINY, True,
                               drop_path_rate=drop_path_rate)
    (expected,), (got,) = (train_gradients(m, (112, 137), seed=3) for m in (peer, ours))
    assert (expected - got).abs().max().item() <= ATOL * expected.abs().max().item()


def test_branches_dropped_by_stochastic_depth_equal_mmdet(tmp_path, monkeypatch, fast):
    """With batch 1 the fast path does not compute a branch that stochastic depth drops;
    outputs, the input's gradient and every parameter's gradient (zeros for the dropped
    branches, never None) are still mmdet's, who computes the branch and multiplies it by zero
    (as the plain path does)."""
    from swin_dense.layers import FFN, ShiftWindowMSA
    calls = {'attn': 0, 'ffn': 0}
    for cls, name, key in ((ShiftWindowMSA, 'attend', 'attn'), (FFN, 'mlp', 'ffn')):
        def counted(self, *args, _method=getattr(cls, name), _key=key):
            calls[_key] += 1
            return _method(self, *args)
        monkeypatch.setattr(cls, name, counted)
    peer, ours = peer_and_ours(tmp_path, mmdet_backbones.SwinTransformer, TINY, True,
                               drop_path_rate=0.6)
    size = (97, 130)
    results = []
    for model in (peer, ours):
        model.train()
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
        x.requires_grad_(True)
        torch.manual_seed(11)
        outs = model(x)
        sum((o * torch.linspace(-1, 1, o.shape[-1])).sum() for o in outs).backward()
        results.append((outs, x.grad, dict(model.named_parameters())))
    (expected_outs, expected_x, expected_params), (outs, grad_x, params) = results
    blocks = sum(TINY['depths'])
    if fast:  # some skipped, some not
        assert 0 < calls['attn'] < blocks and 0 < calls['ffn'] < blocks
    else:
        assert calls['attn'] == calls['ffn'] == blocks
    for e, g in zip(expected_outs, outs):
        assert (e - g).abs().max().item() <= ATOL * max(e.abs().max().item(), 1)
    assert (expected_x - grad_x).abs().max().item() <= ATOL * expected_x.abs().max().item()
    zero_grads = 0
    for name, p in params.items():
        expected = expected_params[name].grad
        assert p.grad is not None and expected is not None, name
        assert (expected - p.grad).abs().max().item() <= ATOL * max(expected.abs().max().item(),
                                                                   1), name
        zero_grads += bool((expected == 0).all())
    assert zero_grads > 0  # the dropped branches' parameters (zeros in mmdet too)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_autocast_error_equals_mmdet(tmp_path, dtype, fast):
    """Under CPU autocast, outputs and gradients (input and parameters together) stray from each
    model's own fp32 results no further than mmdet's do: our low-precision paths (chunked
    inference, training that keeps the probabilities) add no error of their own. (Measured:
    within 3% of mmdet's, 6e-3..1.2e-2 in bf16, 8e-4..1.5e-3 in fp16.)"""
    peer, ours = peer_and_ours(tmp_path, mmdet_backbones.SwinTransformer, TINY, True,
                               drop_path_rate=0.0)
    size = (96, 137)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))

    def gradients(model, autocast):
        with torch.autocast('cpu', dtype=dtype, enabled=autocast):
            grads = train_gradients(model, size, seed=5, with_parameters=True)
        model.zero_grad(set_to_none=True)
        return torch.cat([g.flatten() for g in grads])

    errors = {}
    for name, model in (('mmdet', peer), ('ours', ours)):
        model.eval()
        with torch.no_grad():
            ref = model(x)
            with torch.autocast('cpu', dtype=dtype):
                low = model(x)
        errors[name] = [*(rel(o, r) for o, r in zip(low, ref)),
                        rel(gradients(model, True), gradients(model, False))]
    assert all(e > 0 for e in errors['mmdet'])  # it really ran in low precision
    for ours_error, peer_error in zip(errors['ours'], errors['mmdet']):
        assert ours_error <= 1.25 * peer_error, errors


def test_small_chunks_equal_mmdet(tmp_path, monkeypatch):
    """The fast path runs the attention and MLP in chunks; many small ones change nothing."""
    monkeypatch.setattr(cpu_fast, 'CHUNK_TOKENS', 3 * 49)  # 3 windows, 147 rows per chunk
    peer, ours = peer_and_ours(tmp_path, mmdet_backbones.SwinTransformer, TINY, True,
                               drop_path_rate=0.0)
    assert_same_outputs(peer, ours, (112, 137))
    expected, got = (train_gradients(m, (97, 130), seed=5, with_parameters=True)
                     for m in (peer, ours))
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert (e - g).abs().max().item() <= ATOL * max(e.abs().max().item(), 1)


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_builds_under_each_default_scope(scope):
    from mmengine.registry import DefaultScope
    registry = {'mmdet': 'mmdet.registry', 'mmseg': 'mmseg.registry'}[scope]
    MODELS = __import__(registry, fromlist=['MODELS']).MODELS
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(dict(type='SwinBackbone', arch='tiny'))
    assert isinstance(model, SwinBackbone)


def test_mmdet_config_works_after_changing_only_the_type():
    from mmdet.registry import MODELS
    cfg = dict(type='SwinTransformer', embed_dims=96, depths=[2, 2, 6, 2],
               num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4, qkv_bias=True,
               qk_scale=None, drop_rate=0., attn_drop_rate=0., drop_path_rate=0.2,
               patch_norm=True, out_indices=(0, 1, 2, 3), with_cp=False, convert_weights=True,
               init_cfg=None)
    peer = MODELS.build(cfg)
    ours = MODELS.build({**cfg, 'type': 'SwinBackbone'})
    assert [k for k in ours.state_dict()] == [
        k for k in peer.state_dict() if not k.endswith('relative_position_index')]


def test_swin_b_file_into_swin_t_is_an_error(tmp_path):
    peer = mmdet_backbones.SwinTransformer(**BASE)
    path = tmp_path / 'base.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in peer.state_dict().items()}}, path)
    ours = SwinBackbone(**TINY, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError, match='shape'):
        ours.init_weights()


def test_file_without_backbone_weights_is_an_error(tmp_path):
    path = tmp_path / 'neck_only.pth'
    torch.save({'state_dict': {'neck.fpn_convs.0.conv.weight': torch.zeros(256, 256, 3, 3)}}, path)
    ours = SwinBackbone(**TINY, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError):
        ours.init_weights()
