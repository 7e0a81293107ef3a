"""Mixed precision: fp16 / bf16 autocast against fp32, and AMP training on CPU.

Model: a narrow SwinBackbone (embed_dims 16, depths 2-2-2-2, heads 1-2-4-8, window 7) with the
official random initialisation (trunc-normal 0.02), at 800x1333, the detection input size: every
stage has padded windows and shifted windows with the -100 mask. Relative error is
``||out - ref|| / ||ref||`` per output against the fp32 forward of the same weights.

On CPU, autocast runs matmuls, convolutions *and* LayerNorm / softmax in the low precision (on
CUDA LayerNorm and softmax stay fp32), and the outputs are fp16 / bf16 tensors, so these are
upper bounds of what a GPU gives. Measured on the development machine (torch 2.13, CPU):

====================  ===========================================  ==========================
                      outputs (stage 1..4)                         gradients (all parameters)
====================  ===========================================  ==========================
fp16, init weights    5.8e-4  8.2e-4  1.0e-3  1.2e-3               1.3e-3
bf16, init weights    4.4e-3  6.3e-3  7.7e-3  9.0e-3               9.7e-3 (at 800x1333)
fp16, stressed        5.9e-4  1.1e-3  2.3e-3  9.0e-3               2.5e-2
bf16, stressed        4.6e-3  8.6e-3  1.8e-2  7.1e-2               2.0e-1
====================  ===========================================  ==========================

"Stressed": qkv weights x10 and relative-position biases N(0, 2): peaked attention in which the
-100 mask decides the result (measured at 800x1333; the test runs it at 224x352, where the errors
are the same to two digits). Both dtypes stay finite there (the mask is -100, not -inf or
-1e4, and never overflows fp16); their error grows with depth because peaked softmaxes amplify
rounding, and bf16 (8 mantissa bits against fp16's 11) exceeds 1e-2 from stage 3 on. That is
bf16's resolution, not a bug: one bf16 rounding is 2**-9 = 2e-3 relative. The tests bound the
initialised model at 1e-2 for both dtypes, the stressed one for finiteness (and fp16's first
three stages at 1e-2).

Gradients: the loss is a fixed random projection of the outputs (the plain sum of LayerNorm
outputs has an almost-zero gradient, which would make relative errors meaningless); the error is
over all parameters together (single LayerNorm biases with tiny gradients have larger relative
errors, 1e-1, from cancellation).

Slow (``-m slow``): gradients at 800x1333; tools/train.py ``--amp`` on the detection demo (bf16 by
default on CPU, and fp16 with loss scaling).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from swin_dense import SwinBackbone
from swin_dense.ops.window import MASK_VALUE
from numerics import grad_error, rel
from tool_runs import DET_DEMO, TRAIN, run_to_end, tiny_detector

REPO = Path(__file__).resolve().parents[1]
NARROW = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7,
              drop_path_rate=0.0)
DET_SIZE = (800, 1333)
DTYPES = [torch.float16, torch.bfloat16]


def narrow(stress: bool = False) -> SwinBackbone:
    torch.manual_seed(0)
    model = SwinBackbone(**NARROW)
    model.init_weights()
    if stress:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith('qkv.weight'):
                    p.mul_(10)
                elif name.endswith('relative_position_bias_table'):
                    p.normal_(0, 2)
    return model


@pytest.fixture(scope='module')
def image():
    return torch.randn(1, 3, *DET_SIZE, generator=torch.Generator().manual_seed(1))


STRESS_SIZE = (224, 352)  # the stressed weights at a smaller size (800x1333 in the table above)


@pytest.fixture(scope='module')
def forwards(image):
    """fp32, fp16 and bf16 inference outputs: the initialised weights at 800x1333, the stressed
    ones at 224x352 (computed once: about 6 s on 2 CPU cores)."""
    out = {}
    small_image = image[..., :STRESS_SIZE[0], :STRESS_SIZE[1]]
    for stress, x in ((False, image), (True, small_image)):
        model = narrow(stress).eval()
        with torch.no_grad():
            out[stress, torch.float32] = model(x)
            for dtype in DTYPES:
                with torch.autocast('cpu', dtype=dtype):
                    out[stress, dtype] = model(x)
    return out


@pytest.mark.parametrize('dtype', DTYPES, ids=['fp16', 'bf16'])
def test_autocast_forward_at_detection_size_is_finite_and_close(forwards, dtype):
    ref, got = forwards[False, torch.float32], forwards[False, dtype]
    assert [o.dtype for o in got] == [dtype] * 4  # it really ran in low precision
    errors = [rel(o, r) for o, r in zip(got, ref)]
    for o, r in zip(got, ref):
        assert o.shape == r.shape
        assert torch.isfinite(o).all()
    assert max(errors) <= 1e-2, errors


@pytest.mark.parametrize('dtype', DTYPES, ids=['fp16', 'bf16'])
def test_peaked_attention_with_the_mask_stays_finite(forwards, dtype):
    ref, got = forwards[True, torch.float32], forwards[True, dtype]
    assert all(torch.isfinite(o).all() for o in got)
    errors = [rel(o, r) for o, r in zip(got, ref)]
    if dtype == torch.float16:
        assert max(errors[:3]) <= 1e-2, errors
    assert max(errors) < 0.2, errors  # close, though bf16 drifts with depth (see the docstring)


@pytest.mark.parametrize('dtype', DTYPES, ids=['fp16', 'bf16'])
def test_masked_pairs_get_no_attention_in_low_precision(dtype):
    """The shift mask inside one SW-MSA layer with large logits (std ~5, so unmasked gaps of
    ~40): in fp16/bf16 nothing overflows, masked pairs get no probability (< 1e-20; -100 keeps
    them masked as long as real logit gaps stay well below 100, in every dtype), and each row
    still sums to 1."""
    from swin_dense.ops.chunked_attention import _attention_probs
    from swin_dense.ops.window import window_layout
    layout = window_layout(14, 14, 7, 3, torch.device('cpu'))
    nW, N, h, d = layout.num_windows, 49, 2, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2 * nW, h, N, d, generator=g) * 2.5
    k = torch.randn(2 * nW, h, N, d, generator=g) * 2.5
    bias = torch.randn(h, N, N, generator=g) * 2 + layout.mask.unsqueeze(1)  # (nW, h, N, N)
    ref = _attention_probs(q, k, bias, d ** -0.5, nW)
    got = _attention_probs(q.to(dtype), k.to(dtype), bias.to(dtype), d ** -0.5, nW)
    assert torch.isfinite(got).all()
    masked = (layout.mask != 0).unsqueeze(1).expand(nW, h, N, N).repeat(2, 1, 1, 1)
    assert masked.any()
    assert got[masked].float().max() < 1e-20 and ref[masked].max() < 1e-20
    assert got[~masked].float().max() > 0.5  # peaked: some pairs take most of the attention
    torch.testing.assert_close(got.float().sum(-1), torch.ones(2 * nW, h, N), rtol=0,
                               atol=2e-2)
    assert MASK_VALUE == -100.0  # finite in fp16 (max 65504); exp(-100) = 4e-44


def _grads(model, image, dtype, projection_seed=3):
    model.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=dtype or torch.float32, enabled=dtype is not None):
        outs = model(image)
    g = torch.Generator().manual_seed(projection_seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() / o.numel() ** 0.5
               for o in outs)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_backward(size, limits):
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
    model = narrow().train()
    ref = _grads(model, image, None)
    assert sum(r.norm() for r in ref.values()) > 0
    errors = {}
    for dtype in DTYPES:
        got = _grads(model, image, dtype)
        assert all(torch.isfinite(g).all() for g in got.values()), dtype
        assert all(g.dtype == torch.float32 for g in got.values())  # fp32 master weights
        errors[dtype] = grad_error(got, ref)
        assert errors[dtype] <= limits[dtype], errors
    return errors


def test_autocast_backward_gives_finite_gradients_close_to_fp32():
    """At a smaller size (fast); 800x1333 is the slow test below."""
    _check_backward((160, 256), {torch.float16: 5e-3, torch.bfloat16: 2e-2})


@pytest.mark.slow
def test_autocast_backward_at_detection_size():
    errors = _check_backward(DET_SIZE, {torch.float16: 5e-3, torch.bfloat16: 2e-2})
    print(f'\ngradient relative error at 800x1333: fp16 {errors[torch.float16]:.2e}, '
          f'bf16 {errors[torch.bfloat16]:.2e}')


# =====================================================================================
# AMP training on a machine without a GPU
# =====================================================================================
def test_mmengine_amp_wrapper_needs_a_gpu_and_ours_trains_on_cpu():
    from mmengine.optim import AmpOptimWrapper, build_optim_wrapper

    from swin_dense.amp import CPUAmpOptimWrapper
    model = narrow().train()
    if not torch.cuda.is_available():
        with pytest.raises(AssertionError, match='only available training on gpu'):
            AmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
    image = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    for dtype, scaled in (('bfloat16', False), ('float16', True)):
        model = narrow().train()
        wrapper = build_optim_wrapper(model, dict(type='CPUAmpOptimWrapper', dtype=dtype,
                                                  optimizer=dict(type='SGD', lr=0.01)))
        assert isinstance(wrapper, CPUAmpOptimWrapper) and isinstance(wrapper, AmpOptimWrapper)
        assert wrapper.loss_scaler.is_enabled() is scaled  # bf16 needs no loss scaling
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with wrapper.optim_context(model):
            outs = model(image)
            assert outs[0].dtype == getattr(torch, dtype)
            loss = sum(o.float().pow(2).mean() for o in outs)
        wrapper.update_params(loss)
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        # fp16: the first step with the default 2**16 scale may overflow and be skipped by the
        # scaler (then the scale halves); bf16 always steps (a few LayerNorm weights of 1.0 get
        # updates below fp32's resolution there).
        if not scaled:
            assert len(changed) >= 0.8 * len(before), (len(changed), len(before))
        state = wrapper.state_dict()
        assert ('loss_scaler' in state) is scaled  # bf16: no scaler state to resume
        wrapper.load_state_dict(state)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_amp_configs_select_cpu_amp_on_cpu(monkeypatch):
    from swin_dense import launch
    monkeypatch.setattr(launch, '_cuda_available', lambda: False)
    for name in ('swin_t_coco_3x_amp.py', 'swin_s_coco_3x_amp.py'):
        cfg = launch.load_config(str(REPO / 'configs' / 'mask_rcnn' / name))
        launch.adapt_to_device(cfg, 'train')
        assert cfg.optim_wrapper.type == 'CPUAmpOptimWrapper'
        assert cfg.optim_wrapper.dtype == 'bfloat16'
    cfg = launch.load_config(str(REPO / 'configs' / 'mask_rcnn' / 'swin_t_coco_3x_amp.py'),
                             {'optim_wrapper.dtype': 'float16'})
    launch.adapt_to_device(cfg, 'train')
    assert cfg.optim_wrapper.dtype == 'float16'
    monkeypatch.setattr(launch, '_cuda_available', lambda: True)  # a GPU keeps mmengine's
    cfg = launch.load_config(str(REPO / 'configs' / 'mask_rcnn' / 'swin_t_coco_3x_amp.py'))
    launch.adapt_to_device(cfg, 'train')
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'


def test_mmcv_cpu_ops_run_in_fp32_under_autocast():
    """mmcv's nms / roi_align have fp32 CPU kernels only; Mask R-CNN under CPU autocast needs
    them to accept bf16 (and to write their bf16 outputs)."""
    ops = pytest.importorskip('mmcv.ops')
    from swin_dense.amp import mmcv_cpu_ops_in_fp32
    assert mmcv_cpu_ops_in_fp32()
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(50, 2, generator=g) * 20], 1)
    scores = torch.rand(50, generator=g)
    feats = torch.randn(1, 8, 32, 32, generator=g, requires_grad=True)
    rois = torch.tensor([[0, 2.0, 3.0, 20.0, 25.0], [0, 0.0, 0.0, 31.0, 31.0]])
    ref_keep = ops.nms(boxes, scores, 0.5)[1]
    ref_roi = ops.roi_align(feats, rois, (7, 7), 1.0, 2)
    for dtype in DTYPES:
        keep = ops.nms(boxes.to(dtype), scores.to(dtype), 0.5)[1]
        assert len(keep) > 0 and set(keep.tolist()) <= set(range(50))
        low = feats.detach().to(dtype).requires_grad_()
        out = ops.roi_align(low, rois.to(dtype), (7, 7), 1.0, 2)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref_roi, rtol=2e-2, atol=5e-2)
        out.float().sum().backward()
        assert low.grad is not None and low.grad.dtype == dtype and low.grad.abs().sum() > 0
    assert len(ref_keep) > 0


# ------------------------------------------------------------------ the AMP config on demo data
LOSS = re.compile(r'Epoch\(train\) \[1\]\[(\d)/4\].*?\sloss: (\S+)')


@pytest.mark.slow
@pytest.mark.parametrize('dtype,scaled', [('bfloat16', False), ('float16', True)])
def test_amp_training_on_the_demo_data_through_the_tool(tmp_path, dtype, scaled):
    """tools/train.py --amp (what the AMP configs add to swin_t_coco_3x: AmpOptimWrapper) on
    the Mask R-CNN demo, narrowed, four iterations on 8 demo images, in bf16 (the CPU default)
    and in fp16 with loss scaling: finite losses, a checkpoint with the scaler state."""
    work = tmp_path / 'work'
    log = run_to_end([sys.executable, str(TRAIN), str(DET_DEMO), '--amp', '--work-dir', str(work),
                      '--cfg-options', *tiny_detector(1), f'optim_wrapper.dtype={dtype}'],
                     tmp_path, timeout=1800)
    assert 'training with CPUAmpOptimWrapper' in log
    losses = [float(v) for _, v in LOSS.findall(log)]
    assert len(losses) == 4 and all(v == v and abs(v) < 1e4 for v in losses), losses
    ckpt = torch.load(work / 'epoch_1.pth', map_location='cpu', weights_only=False)
    assert bool(ckpt['optimizer'].get('loss_scaler')) is scaled
    assert all(torch.isfinite(v).all() for v in ckpt['state_dict'].values()
               if v.is_floating_point())
