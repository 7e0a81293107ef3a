"""Bad input fails early and clearly; unusual input works.

One table of every bad input, constructor argument and checkpoint: each raises a ValueError,
TypeError or FileNotFoundError from swin_dense with a message naming the problem, never a
RuntimeError from inside torch. Unusual inputs that must work: channels_last, non-contiguous and
float64 inputs, windows larger than every map, 2x2 and 1x1 images and empty batches in training.
(Crash-safe checkpoints and exact resume: tests/integrations/test_checkpoint_hook.py.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from swin_dense import SwinBackbone
from swin_dense.checkpoint import load_pretrained

SMALL = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7)


def small(**kwargs) -> SwinBackbone:
    torch.manual_seed(0)
    model = SwinBackbone(**{**SMALL, **kwargs})
    model.init_weights()
    return model


# =====================================================================================
# Bad input: one table, one property
# =====================================================================================
def _checkpoint_cases(tmp: Path) -> list:
    good = tmp / 'small.pth'
    torch.save({'state_dict': small().state_dict()}, good)
    cut = tmp / 'cut.pth'
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp / 'empty.pth'
    empty.write_bytes(b'')
    resnet = tmp / 'resnet.pth'
    torch.save({'conv1.weight': torch.zeros(64, 3, 7, 7), 'fc.weight': torch.zeros(10, 64)},
               resnet)
    deeper = tmp / 'deeper.pth'
    torch.save(small(depths=(2, 2, 4, 2)).state_dict(), deeper)
    wider = tmp / 'wider.pth'
    torch.save(small(embed_dims=32).state_dict(), wider)

    def load(path):
        return lambda: load_pretrained(small(), path)

    def init(path):
        return lambda: small(init_cfg=dict(type='Pretrained', checkpoint=str(path))).init_weights()

    return [
        ('missing checkpoint', load(tmp / 'nowhere.pth'), FileNotFoundError, 'nowhere.pth'),
        ('missing via init_cfg', init(tmp / 'nowhere.pth'), FileNotFoundError, 'nowhere.pth'),
        ('directory', load(tmp), ValueError, 'directory'),
        ('truncated', load(cut), ValueError, 'truncated'),
        ('empty file', load(empty), ValueError, 'empty'),
        ('non-Swin', load(resnet), ValueError, 'not a Swin'),
        ('deeper Swin', load(deeper), ValueError, 'depths'),
        ('wider Swin', load(wider), ValueError, 'embed_dims=32'),
    ]


def _cases(tmp: Path) -> list:
    model = small().eval()

    def fwd(x, m=model):
        return lambda: m(x)

    def build(**kwargs):
        return lambda: SwinBackbone(**{**SMALL, **kwargs})

    return [
        # tensors
        ('3-d input', fwd(torch.randn(3, 32, 32)), ValueError, '4-d input'),
        ('5-d input', fwd(torch.randn(1, 1, 3, 32, 32)), ValueError, '4-d input'),
        ('4 channels', fwd(torch.randn(1, 4, 32, 32)), ValueError, 'in_channels=3'),
        ('NHWC layout', fwd(torch.randn(1, 32, 32, 3)), ValueError, 'NCHW'),
        ('uint8 image', fwd(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), TypeError, 'floating'),
        ('bool image', fwd(torch.ones(1, 3, 32, 32, dtype=torch.bool)), TypeError, 'floating'),
        ('float64 into fp32', fwd(torch.randn(1, 3, 32, 32, dtype=torch.float64)), TypeError,
         r'float64.*float32.*autocast'),
        ('fp16 into fp32', fwd(torch.randn(1, 3, 32, 32).half()), TypeError, 'float16'),
        ('fp32 into fp16 model', fwd(torch.randn(1, 3, 32, 32), small().half()), TypeError,
         'float32 but SwinBackbone is torch.float16'),
        ('other device', fwd(torch.empty(1, 3, 32, 32, device='meta')), ValueError, 'meta'),
        ('numpy array', fwd(np.zeros((1, 3, 32, 32), np.float32)), TypeError, 'torch.Tensor'),
        ('0-height image', fwd(torch.randn(1, 3, 0, 32)), ValueError, 'empty image'),
        # constructor
        ('window 0', build(window_size=0), ValueError, 'window_size'),
        ('window 7.5', build(window_size=7.5), ValueError, 'window_size'),
        ('depths vs heads', build(depths=(2, 2), num_heads=(1, 2, 4)), ValueError, 'same length'),
        ('depths int', build(depths=2), TypeError, 'depths must be a list'),
        ('depths None', build(depths=None), TypeError, 'depths must be a list'),
        ('zero depth', build(depths=(2, 0, 2, 2)), ValueError, r'depths\[1\]'),
        ('embed_dims % heads', build(embed_dims=20, num_heads=(3, 6, 12, 24)), ValueError,
         'not divisible by num_heads'),
        ('out_indices int', build(out_indices=3), TypeError, 'out_indices must be a list'),
        ('out_indices 4', build(out_indices=(4,)), ValueError, 'out_indices'),
        ('out_indices empty', build(out_indices=()), ValueError, 'out_indices'),
        ('frozen_stages 5', build(frozen_stages=5), ValueError, 'frozen_stages'),
        ('frozen_stages None', build(frozen_stages=None), ValueError, 'frozen_stages'),
        ('drop_path 1.5', build(drop_path_rate=1.5), ValueError, 'drop_path_rate'),
        ('attn_drop -0.1', build(attn_drop_rate=-0.1), ValueError, 'attn_drop_rate'),
        ('mlp_ratio str', build(mlp_ratio='4'), TypeError, 'mlp_ratio'),
        ('norm_cfg None', build(norm_cfg=None), TypeError, 'norm_cfg'),
        ('norm_cfg BN', build(norm_cfg=dict(type='BN')), ValueError, 'norm_cfg'),
        ('act_cfg None', build(act_cfg=None), TypeError, 'act_cfg'),
        ('abs pos embed < patch', build(use_abs_pos_embed=True, pretrain_img_size=2), ValueError,
         'pretrain_img_size'),
        ('arch unknown', lambda: SwinBackbone(arch='huge'), ValueError, 'arch'),
        ('arch conflict', lambda: SwinBackbone(arch='tiny', embed_dims=128), ValueError,
         'embed_dims'),
        ('init_cfg kind', lambda: small(init_cfg=dict(type='Kaiming')).init_weights(), ValueError,
         'init_cfg'),
        ('unknown argument', build(window=7), TypeError, 'window'),
    ] + _checkpoint_cases(tmp)


def test_every_bad_input_is_a_clear_value_type_or_file_error(tmp_path):
    """Each case raises the stated type with a message naming the problem, and none is (or
    derives from) RuntimeError: the errors come from swin_dense's checks, not from torch."""
    failures = []
    for name, call, error, match in _cases(tmp_path):
        try:
            call()
        except Exception as e:  # noqa: BLE001 - classified below
            import re
            if isinstance(e, RuntimeError) or not isinstance(e, error) \
                    or not re.search(match, str(e)):
                failures.append(f'{name}: {type(e).__name__}: {e}')
        else:
            failures.append(f'{name}: no error')
    assert not failures, '\n'.join(failures)


# =====================================================================================
# Unusual inputs that must work
# =====================================================================================
def test_layouts_and_float64_give_the_same_features():
    model = small().eval()
    x = torch.randn(2, 3, 37, 45)
    with torch.no_grad():
        ref = model(x)
        for variant in (x.to(memory_format=torch.channels_last),
                        x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),  # strided view
                        x.transpose(2, 3).contiguous().transpose(2, 3)):
            assert not variant.is_contiguous()
            for a, b in zip(model(variant), ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        double = small().double().eval()(x.double())
    for a, b in zip(double, ref):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a.float(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('window_size', [17, 20])
def test_window_larger_than_every_map(window_size):
    """A 64x64 image gives token maps 16..2: a window larger than all of them is one padded
    window per map; the outputs are finite and have the usual shapes."""
    model = small(window_size=window_size).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert all(torch.isfinite(o).all() for o in outs)


def test_tiny_images_and_empty_batches_train(with_cp=True):
    """2x2 and 1x1 images, and an empty batch, in training mode: forward, backward, and (for the
    empty batch) gradients that exist and are zero, so that an optimizer step and DDP's
    gradient sync see every parameter."""
    model = small(with_cp=with_cp, drop_path_rate=0.1, frozen_stages=1).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for size in ((2, 2), (1, 1), (3, 5)):
        model.zero_grad(set_to_none=True)
        outs = model(torch.randn(2, 3, *size))
        sum(o.pow(2).mean() for o in outs).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    model.zero_grad(set_to_none=True)
    x = torch.randn(0, 3, 64, 48, requires_grad=True)
    outs = model(x)
    assert [tuple(o.shape) for o in outs] == [(0, 16, 16, 12), (0, 32, 8, 6), (0, 64, 4, 3),
                                             (0, 128, 2, 2)]
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None and not p.grad.any() for p in trainable)
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():  # inference: plain empty tensors, no graph
        assert all(o.grad_fn is None for o in model.eval()(torch.randn(0, 3, 8, 8)))
