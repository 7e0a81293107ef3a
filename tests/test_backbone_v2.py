"""SwinV2Backbone on its own: shapes, interface, freezing, the logit-scale clamp, low precision,
gradients of both paths, window changes, errors. Parity with the peers:
tests/integration/test_v2_parity.py; export and FLOPs: tests/integration/test_v2_export.py."""
import math
from pathlib import Path

import pytest
import torch

from swin_dense import SwinV2Backbone
from swin_dense.ops import cpu_fast
from swin_dense.ops.continuous_bias import (continuous_position_bias, coords_table,
                                            pretrained_window_from_table)
from numerics import rel
from swin_peers import randomize

FIXTURES = Path(__file__).resolve().parent / 'fixtures' / 'v2'
SMALL = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=8,
             drop_path_rate=0.0)


def small(seed: int = 0, **kwargs) -> SwinV2Backbone:
    """A randomised model: every parameter, the res-post-norms and logit scales included (left
    at their initial values, the blocks would be close to identities)."""
    model = SwinV2Backbone(**{**SMALL, **kwargs})
    randomize(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('logit_scale'):
                p.uniform_(1.0, 3.0, generator=torch.Generator().manual_seed(seed))
    return model


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize('size', [(256, 256), (200, 328), (37, 61), (33, 65), (2, 2), (1, 1)])
def test_pyramid_shapes_for_any_size(size):
    model = small().eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, *size))
    for out, spec in zip(outs, model.output_shape().values()):
        assert out.shape == (2, spec.channels, *(-(-s // spec.stride) for s in size))
        assert torch.isfinite(out).all()


def test_interface_describes_outputs():
    model = SwinV2Backbone(arch='base', out_indices=(1, 3), window_size=[16, 16, 16, 8],
                           pretrained_window_sizes=[12, 12, 12, 6])
    assert model.out_channels == (256, 1024) and model.out_strides == (8, 32)
    assert list(model.output_shape()) == ['stage2', 'stage4']
    assert model.size_divisibility == 32
    assert model.padding_free_multiple == 256  # 4*16, 8*16, 16*16, 32*8
    assert model.window_sizes == (16, 16, 16, 8)
    assert model.stage_pretrained_windows() == (12, 12, 12, 6)
    assert [s.blocks[0].attn.window_size for s in model.stages] == [16, 16, 16, 8]


def test_padding_free_multiple_means_no_padding():
    model = small(window_size=[16, 16, 16, 8])
    side = model.padding_free_multiple
    for i, stage in enumerate(model.stages):
        layout = stage.blocks[0].attn.layout((side // 4 // 2 ** i,) * 2, torch.device('cpu'))
        assert not layout.needs_padding


def test_published_parameter_counts():
    """The official V2-T / V2-B classifiers' parameters (their layouts, written from the real
    files' shapes in tests/fixtures/v2/real_width_layouts.pt) less the head; their final norm
    and our one output norm have the same size."""
    layouts = torch.load(FIXTURES / 'real_width_layouts.pt', weights_only=True)['entries']
    for arch, name in (('tiny', 'official/swinv2_tiny_patch4_window8_256'),
                       ('base', 'official/swinv2_base_patch4_window12to16_192to256_22kto1k_ft')):
        entry = layouts[name]
        published = sum(math.prod(shape) for key, shape in zip(entry['keys'], entry['shapes'])
                        if not key.startswith('head.') and key.rsplit('.', 1)[-1]
                        not in ('relative_coords_table', 'relative_position_index', 'attn_mask'))
        model = SwinV2Backbone(arch=arch, out_indices=(3,))
        assert sum(p.numel() for p in model.parameters()) == published


def test_empty_batch():
    model = small().eval()
    outs = model(torch.randn(0, 3, 64, 48))
    assert [tuple(o.shape) for o in outs] == [(0, 16, 16, 12), (0, 32, 8, 6), (0, 64, 4, 3),
                                             (0, 128, 2, 2)]


def test_the_pretrained_window_comes_from_the_arguments():
    model = SwinV2Backbone(**{**SMALL, 'window_size': [16, 16, 16, 8]},
                           pretrained_window_sizes=[12, 12, 12, 6])
    table = model.stages[3].blocks[1].attn.w_msa.relative_coords_table
    assert torch.equal(table, coords_table(8, 6))  # the same function, the same arguments
    assert SwinV2Backbone(**SMALL).stage_pretrained_windows() == (8, 8, 8, 8)


def test_a_window_change_is_exact_by_construction():
    """Window 16 with pretrained window 8 evaluates the bias MLP on window 8's coordinates for
    the offsets both windows have: the window-8 bias is a sub-block of the window-16 one."""
    g = torch.Generator().manual_seed(0)
    w1, b1, w2 = torch.randn(512, 2, generator=g), torch.randn(512, generator=g), \
        torch.randn(3, 512, generator=g) / 20
    small_bias = continuous_position_bias(coords_table(8), w1, b1, w2, 8)
    large_bias = continuous_position_bias(coords_table(16, 8), w1, b1, w2, 16)
    # tokens of the top-left 8 x 8 corner of a 16 x 16 window
    corner = (torch.arange(8).view(8, 1) * 16 + torch.arange(8)).reshape(-1)
    assert relative(large_bias[:, corner][:, :, corner], small_bias) < 1e-6
    assert pretrained_window_from_table(coords_table(16, 8)) == 8


def test_logit_scale_is_clamped_at_log_100():
    model = small().eval()
    x = torch.randn(1, 3, 96, 64)
    attn = model.stages[0].blocks[0].attn.w_msa
    with torch.no_grad():
        attn.logit_scale.fill_(math.log(100.0))
        at_clamp = model(x)
        attn.logit_scale.fill_(math.log(200.0))
        past_clamp = model(x)
    # the clamp gives the same factor: the same computation, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(at_clamp, past_clamp))
    model.train()
    sum(o.sum() for o in model(x)).backward()
    assert torch.count_nonzero(attn.logit_scale.grad) == 0
    other = model.stages[0].blocks[1].attn.w_msa.logit_scale.grad
    assert torch.count_nonzero(other) > 0


@pytest.mark.parametrize('fast', [True, False], ids=['fast', 'plain'])
def test_fast_and_plain_paths_give_the_same_outputs_and_gradients(fast):
    reference = small(seed=3).train()
    model = small(seed=3).train()
    x = torch.randn(2, 3, 75, 90, generator=torch.Generator().manual_seed(1))
    with cpu_fast.enabled(False):
        expected = reference(x)
        sum((o * o).mean() for o in expected).backward()
    with cpu_fast.enabled(fast):
        got = model(x)
        sum((o * o).mean() for o in got).backward()
        model.eval()
        with torch.no_grad():
            inferred = model(x)
    for e, g, i in zip(expected, got, inferred):
        assert relative(g, e) < 1e-5 and relative(i.detach(), e.detach()) < 1e-5
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert relative(p.grad, q.grad) < 1e-4, name


def test_with_cp_gives_the_same_gradients():
    x = torch.randn(1, 3, 64, 80)
    grads = []
    for with_cp in (False, True):
        model = small(seed=5, with_cp=with_cp).train()
        sum(o.sum() for o in model(x)).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert relative(b, a) < 1e-5


@pytest.mark.parametrize('frozen', [0, 2])
def test_frozen_stages_get_no_grad_and_stay_in_eval(frozen):
    model = small(frozen_stages=frozen).train()
    sum(o.sum() for o in model(torch.randn(1, 3, 64, 64))).backward()
    assert model.patch_embed.projection.weight.grad is None
    assert not model.patch_embed.training
    for i, stage in enumerate(model.stages):
        grads = [p.grad is not None for p in stage.parameters()]
        assert not any(grads) if i < frozen else all(grads)


@pytest.mark.parametrize('fast', [True, False], ids=['fast', 'plain'])
def test_float16_at_padded_sizes_is_finite(fast):
    """Zero padding tokens have k = 0 (k has no bias): normalising them in float16, whose eps
    is 0, would give 0 / 0."""
    model = small().eval()
    x = torch.randn(1, 3, 200, 328)
    with torch.no_grad():
        expected = model(x)
        with cpu_fast.enabled(fast):
            got = model.half()(x.half())
    for e, g in zip(expected, got):
        assert torch.isfinite(g).all()
        assert rel(g, e) < 1e-2


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_cpu_autocast_forward_and_backward(dtype):
    model = small().train()
    x = torch.randn(1, 3, 72, 104)
    expected = model(x)
    with torch.autocast('cpu', dtype=dtype):
        got = model(x)
        loss = sum(o.float().pow(2).mean() for o in got)
    loss.backward()
    for e, g in zip(expected, got):
        assert g.dtype == dtype and torch.isfinite(g).all()
        # Frobenius; bf16 keeps 8 bits, and the logit scales (up to 20 here) multiply the
        # rounding of the cosines: 1% after stage 1, about 3% after stage 4 on both paths
        assert rel(g, e.detach()) < (5e-2 if dtype == torch.bfloat16 else 1e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_the_bias_cache_follows_the_weights():
    """Inference caches the position bias; changing a weight of its MLP must not serve the old
    one."""
    model = small().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.stages[0].blocks[0].attn.w_msa.cpb_mlp[2].weight.mul_(2)
        after = model(x)
        with cpu_fast.enabled(False):
            plain = model(x)
    assert relative(after[0], before[0]) > 1e-3
    assert relative(after[0], plain[0]) < 1e-5


def test_registered_and_built_from_config():
    from mmengine.registry import MODELS
    model = MODELS.build(dict(type='SwinV2Backbone', arch='tiny', window_size=[16, 16, 16, 8]))
    assert isinstance(model, SwinV2Backbone) and model.out_channels == (96, 192, 384, 768)


@pytest.mark.parametrize('kwargs, match', [
    (dict(window_size=[8, 8]), 'one entry per stage'),
    (dict(window_size=0), 'window_size must be a positive int'),
    (dict(pretrained_window_sizes=[8, 8, 8]), 'one entry per stage'),
    (dict(pretrained_window_sizes=[8, -1, 8, 8]), r'pretrained_window_sizes\[1\]'),
    (dict(arch='huge'), 'arch must be one of'),
    (dict(out_indices=(4,)), 'out_indices'),
    (dict(drop_path_rate=2), 'probability'),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SwinV2Backbone(**{**SMALL, **kwargs})


def test_bad_input_is_a_clear_error():
    model = small()
    with pytest.raises(ValueError, match='SwinV2Backbone expects a 4-d input'):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match='in_channels=3'):
        model(torch.randn(1, 4, 64, 64))
