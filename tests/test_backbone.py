"""SwinBackbone on its own: shapes, interface, freezing, checkpointing, position embedding, errors."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from swin_dense import ARCH_SETTINGS, SwinBackbone

SMALL = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7)


def small(**kwargs):
    torch.manual_seed(0)
    model = SwinBackbone(**{**SMALL, **kwargs})
    model.init_weights()
    return model


@pytest.mark.parametrize('size', [(224, 224), (511, 511), (112, 137), (33, 65), (2, 2), (1, 1)])
def test_pyramid_shapes_for_any_size(size):
    model = small().eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, *size))
    assert isinstance(outs, tuple) and len(outs) == 4
    for out, spec in zip(outs, model.output_shape().values()):
        # Padding inside the model: each level is ceil(side / stride).
        expected = tuple(-(-s // spec.stride) for s in size)
        assert out.shape == (2, spec.channels, *expected)
        assert torch.isfinite(out).all()


def test_interface_describes_outputs():
    model = SwinBackbone(arch='base', out_indices=(1, 3), window_size=12)
    assert model.out_channels == (256, 1024)
    assert model.out_strides == (8, 32)
    assert list(model.output_shape()) == ['stage2', 'stage4']
    assert model.size_divisibility == 32
    assert model.padding_free_multiple == 32 * 12


def test_padding_free_multiple_means_no_padding():
    model = small()
    side = model.padding_free_multiple
    for i, stage in enumerate(model.stages):
        layout = stage.blocks[0].attn.layout((side // 4 // 2 ** i,) * 2, torch.device('cpu'))
        assert not layout.needs_padding


def test_empty_batch():
    model = small().eval()
    outs = model(torch.randn(0, 3, 64, 48))
    assert [tuple(o.shape) for o in outs] == [(0, 16, 16, 12), (0, 32, 8, 6), (0, 64, 4, 3),
                                             (0, 128, 2, 2)]


@pytest.mark.parametrize('amp', [None, torch.bfloat16, torch.float16])
def test_empty_batch_has_the_dtype_of_a_full_one(amp):
    """Under CPU autocast a batch of one comes out in the autocast dtype; so must an empty one."""
    model = small().eval()
    autocast = torch.autocast('cpu', dtype=amp or torch.bfloat16, enabled=amp is not None)
    with torch.no_grad(), autocast:
        full = model(torch.randn(1, 3, 64, 48))
        empty = model(torch.randn(0, 3, 64, 48))
    assert [o.dtype for o in empty] == [o.dtype for o in full] == [amp or torch.float32] * 4


@pytest.mark.parametrize('arch', ['tiny', 'small', 'base', 'large', 'T', 'b'])
def test_arch_shorthand(arch):
    model = SwinBackbone(arch=arch)
    name = {'t': 'tiny', 'b': 'base'}.get(arch.lower(), arch)
    setting = ARCH_SETTINGS[name]
    assert model.embed_dims == setting['embed_dims']
    assert model.depths == setting['depths'] and model.num_heads == setting['num_heads']
    assert [len(s.blocks) for s in model.stages] == list(setting['depths'])
    assert model.stages[2].blocks[0].attn.w_msa.num_heads == setting['num_heads'][2]


def test_published_parameter_counts():
    # Liu et al.: backbone + 1000-class head = 28M (T), 50M (S), 88M (B) at 224.
    for arch, published in (('tiny', 28.3e6), ('small', 49.6e6), ('base', 87.8e6)):
        model = SwinBackbone(arch=arch)
        c = model.num_features[-1]
        # Our per-output norms replace the classifier's final norm; add the 1000-way head back.
        n = sum(p.numel() for p in model.parameters()) - sum(
            p.numel() for i in range(3) for p in getattr(model, f'norm{i}').parameters())
        assert abs(n + c * 1000 + 1000 - published) / published < 0.01, (arch, n)


def test_arch_conflict_is_an_error():
    with pytest.raises(ValueError, match='arch'):
        SwinBackbone(arch='base', embed_dims=192)
    with pytest.raises(ValueError, match='arch must be one of'):
        SwinBackbone(arch='huge')


def test_stochastic_depth_schedule():
    model = SwinBackbone(arch='tiny', drop_path_rate=0.3)
    rates = [b.attn.drop.drop_prob for s in model.stages for b in s.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 12).tolist())
    assert [b.ffn.dropout_layer.drop_prob for s in model.stages for b in s.blocks] == rates


def test_shift_alternates():
    model = SwinBackbone(arch='tiny')
    assert [b.attn.shift_size for b in model.stages[2].blocks] == [0, 3, 0, 3, 0, 3]


@pytest.mark.parametrize('frozen', [0, 1, 2, 4])
def test_frozen_stages_get_no_grad_and_stay_in_eval(frozen):
    model = small(frozen_stages=frozen, drop_rate=0.1)
    assert model.train() is model
    frozen_modules = [model.patch_embed] + [model.stages[i] for i in range(frozen)] + [
        getattr(model, f'norm{i}') for i in range(frozen)]
    for module in frozen_modules:
        assert all(not m.training for m in module.modules())
    assert model.drop_after_pos.training is False
    live = [model.stages[i] for i in range(frozen, 4)]
    for module in live:
        assert all(m.training for m in module.modules())

    x = torch.randn(1, 3, 64, 64)
    loss = sum(o.sum() for o in model(x))
    if frozen == 4:
        assert not loss.requires_grad and not any(p.requires_grad for p in model.parameters())
        return
    loss.backward()
    for module in frozen_modules:
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    for module in live:
        assert all(p.grad is not None for p in module.parameters())


def test_with_cp_gives_the_same_gradients():
    x = torch.randn(2, 3, 60, 50, requires_grad=True)
    results = []
    for with_cp in (False, True):
        model = small(with_cp=with_cp, drop_path_rate=0.2).train()
        torch.manual_seed(1)
        loss = sum((o ** 2).mean() for o in model(x))
        x.grad = None
        loss.backward()
        results.append((loss.detach(), x.grad.clone(),
                        [p.grad.clone() for p in model.parameters()]))
    (l0, g0, p0), (l1, g1, p1) = results
    torch.testing.assert_close(l0, l1, rtol=0, atol=1e-6)
    torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-7)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_with_cp_under_frozen_stages():
    # The reentrant checkpoint of the in-tree backbones yields no grads here.
    model = small(with_cp=True, frozen_stages=1).train()
    sum(o.sum() for o in model(torch.randn(1, 3, 64, 64))).backward()
    assert all(p.grad is not None for p in model.stages[1].parameters())


def test_absolute_position_embedding_is_resized():
    model = small(use_abs_pos_embed=True, pretrain_img_size=64).eval()
    assert model.absolute_pos_embed.shape == (1, 16 * 16, 16)
    grid = model.absolute_pos_embed.detach().transpose(1, 2).reshape(1, 16, 16, 16)
    resized = model._position_embedding((20, 12))
    expected = F.interpolate(grid, size=(20, 12), mode='bicubic', align_corners=False)
    torch.testing.assert_close(resized, expected.flatten(2).transpose(1, 2))
    assert model._position_embedding((16, 16)) is model.absolute_pos_embed
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 80, 48))
    assert outs[0].shape == (1, 16, 20, 12)


def test_absolute_position_embedding_in_a_traced_graph():
    """Captured graphs always resize the embedding (no branch on the grid): traced at the
    pretraining grid, the graph serves other grids, and at the pretraining grid the resize is
    the identity."""
    model = small(use_abs_pos_embed=True, pretrain_img_size=64).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.absolute_pos_embed)
        traced = torch.jit.trace(model, torch.randn(1, 3, 64, 64), check_trace=False)
        for size in [(64, 64), (80, 48)]:
            x = torch.randn(1, 3, *size)
            for got, ref in zip(traced(x), model(x)):
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_registered_in_mmengine_and_builds_from_config():
    from mmengine.registry import MODELS
    model = MODELS.build(dict(type='SwinBackbone', arch='tiny', out_indices=(3,)))
    assert isinstance(model, SwinBackbone) and model.out_channels == (768,)


def test_import_pulls_in_no_toolkit():
    code = ('import sys, swin_dense; bad = [m for m in ("mmcv", "mmdet", "mmseg") '
            'if m in sys.modules]; assert not bad, bad')
    subprocess.run([sys.executable, '-c', code], check=True)


@pytest.mark.parametrize('x,error,match', [
    (torch.randn(3, 64, 64), ValueError, '4-d input'),
    (torch.randn(1, 4, 64, 64), ValueError, 'in_channels=3'),
    (torch.randint(0, 255, (1, 3, 64, 64)), TypeError, 'floating-point'),
    (torch.randn(1, 3, 0, 64), ValueError, 'empty image'),
    ([1, 2, 3], TypeError, 'torch.Tensor'),
])
def test_bad_input_is_a_clear_error(x, error, match):
    with pytest.raises(error, match=match):
        small()(x)


@pytest.mark.parametrize('kwargs,match', [
    (dict(depths=(2, 2), num_heads=(3, 6, 12, 24)), 'same length'),
    (dict(embed_dims=100), 'not divisible by num_heads'),
    (dict(window_size=0), 'window_size'),
    (dict(out_indices=(4,)), 'out_indices'),
    (dict(out_indices=(1, 1)), 'repeats'),
    (dict(frozen_stages=5), 'frozen_stages'),
    (dict(strides=(4, 2, 2)), 'one entry per stage'),
    (dict(patch_size=2), 'strides\\[0\\]'),
    (dict(norm_cfg=dict(type='BN')), 'norm_cfg'),
    (dict(act_cfg=dict(type='Mish2')), 'act_cfg'),
    (dict(init_cfg=dict(type='Pretrained', checkpoint='x'), pretrained='y'), 'not both'),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SwinBackbone(**kwargs)


@pytest.mark.parametrize('with_cp', [False, True])
def test_ddp_trains_while_stochastic_depth_skips_branches(tmp_path, with_cp):
    """A branch dropped for the whole batch is not computed, yet its parameters still get
    gradients: DDP (find_unused_parameters=False) would otherwise stop at the next step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0,
                            world_size=1)
    try:
        model = DistributedDataParallel(small(drop_path_rate=0.6, with_cp=with_cp).train())
        torch.manual_seed(3)
        for _ in range(4):
            sum(o.mean() for o in model(torch.randn(1, 3, 64, 64))).backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_torch_compile_makes_one_graph_for_sizes_of_a_class():
    # dynamic=True: sizes that pad alike at every stage share one graph (a new size is no
    # recompile); outputs and gradients equal eager's. aot_eager: the traced graph, no codegen.
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)

    model = small(drop_path_rate=0.0).train()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    graphs_per_size = []
    for size in [(256, 320), (320, 384), (288, 416)]:  # every stage padded, >= 2 windows a side
        x = torch.randn(1, 3, *size)
        ref = model(x)
        out = compiled(x)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        grads = [torch.autograd.grad(sum(o.square().sum() for o in outs), model.parameters())
                 for outs in (out, ref)]
        # fp32 rounding, relative to each gradient's scale: eager attends in the fused kernel
        # (online softmax) and the traced graph in the explicit one; either is ~1e-3 of the
        # scale from a float64 run on the small late-stage gradients (sums over many pixels).
        worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*grads))
        assert worst <= 5e-3, worst
        graphs_per_size.append(len(graphs))
    assert graphs and graphs_per_size == [len(graphs)] * 3  # nothing compiled after the first size
