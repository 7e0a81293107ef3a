"""CPU mixed precision: CPUAmpOptimWrapper and mmcv's compiled ops in fp32, only where it runs.

Fast: mmengine's AmpOptimWrapper refuses a CPU-only machine and ours trains there (bf16 without
loss scaling, fp16 with it; the checkpoint state of each); the AMP configs select it on CPU and
keep mmengine's on a GPU; mmcv's nms and roi_align take bf16/fp16 inside ``mmcv_ops_in_fp32``
(forward and backward) and are mmcv's own, refusing low precision, outside it; a training step
of a model with an mmcv op through the wrapper, after which mmcv is as it was.

Slow (``-m slow``): tools/train.py ``--amp`` on the detection demo (bf16 by default on CPU, and
fp16 with loss scaling).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from swin_dense import SwinBackbone
from swin_dense.integrations import CPUAmpOptimWrapper, mmcv_ops_in_fp32
from tool_runs import DET_DEMO, TRAIN, run_to_end, tiny_detector

REPO = Path(__file__).resolve().parents[2]
NARROW = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7,
              drop_path_rate=0.0)
DTYPES = [torch.float16, torch.bfloat16]


def narrow() -> SwinBackbone:
    torch.manual_seed(0)
    model = SwinBackbone(**NARROW)
    model.init_weights()
    return model


# =====================================================================================
# The optim wrapper
# =====================================================================================
def test_mmengine_amp_wrapper_needs_a_gpu_and_ours_trains_on_cpu():
    from mmengine.optim import AmpOptimWrapper, build_optim_wrapper

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
    from swin_dense.launch import runner
    monkeypatch.setattr(runner, '_cuda_available', lambda: False)
    for name in ('swin_t_coco_3x_amp.py', 'swin_s_coco_3x_amp.py'):
        cfg = launch.load_config(str(REPO / 'configs' / 'mask_rcnn' / name))
        launch.adapt_to_device(cfg, 'train')
        assert cfg.optim_wrapper.type == 'CPUAmpOptimWrapper'
        assert cfg.optim_wrapper.dtype == 'bfloat16'
    cfg = launch.load_config(str(REPO / 'configs' / 'mask_rcnn' / 'swin_t_coco_3x_amp.py'),
                             {'optim_wrapper.dtype': 'float16'})
    launch.adapt_to_device(cfg, 'train')
    assert cfg.optim_wrapper.dtype == 'float16'
    monkeypatch.setattr(runner, '_cuda_available', lambda: True)  # a GPU keeps mmengine's
    cfg = launch.load_config(str(REPO / 'configs' / 'mask_rcnn' / 'swin_t_coco_3x_amp.py'))
    launch.adapt_to_device(cfg, 'train')
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'


def test_wrapper_rejects_unsupported_settings():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match='bfloat16'):
        CPUAmpOptimWrapper(dtype='float64', optimizer=torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match='use_fsdp'):
        CPUAmpOptimWrapper(use_fsdp=True, optimizer=torch.optim.SGD(params, lr=0.1))


# =====================================================================================
# mmcv's compiled ops in fp32, scoped
# =====================================================================================
def _boxes_and_features():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(50, 2, generator=g) * 20], 1)
    scores = torch.rand(50, generator=g)
    feats = torch.randn(1, 8, 32, 32, generator=g)
    rois = torch.tensor([[0, 2.0, 3.0, 20.0, 25.0], [0, 0.0, 0.0, 31.0, 31.0]])
    return boxes, scores, feats, rois


def _ext_functions() -> dict:
    import mmcv._ext as ext
    return {name: getattr(ext, name) for name in dir(ext) if not name.startswith('_')}


def test_mmcv_ops_take_low_precision_inside_the_context_only():
    """nms and roi_align (forward and backward) on bf16/fp16 inside ``mmcv_ops_in_fp32``, close
    to fp32; outside it mmcv's own functions, which refuse bf16 as they always did."""
    ops = pytest.importorskip('mmcv.ops')
    own = _ext_functions()
    boxes, scores, feats, rois = _boxes_and_features()
    ref_keep = ops.nms(boxes, scores, 0.5)[1]
    ref_roi = ops.roi_align(feats, rois, (7, 7), 1.0, 2)
    for dtype in DTYPES:
        with mmcv_ops_in_fp32() as active:
            assert active
            keep = ops.nms(boxes.to(dtype), scores.to(dtype), 0.5)[1]
            low = feats.to(dtype).requires_grad_()
            out = ops.roi_align(low, rois.to(dtype), (7, 7), 1.0, 2)
            out.float().sum().backward()
        assert len(keep) > 0 and set(keep.tolist()) <= set(range(50))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref_roi, rtol=2e-2, atol=5e-2)
        assert low.grad is not None and low.grad.dtype == dtype and low.grad.abs().sum() > 0
        assert _ext_functions() == own  # mmcv's own functions are back
    with pytest.raises(NotImplementedError, match='BFloat16'):  # mmcv 2.1's CPU kernels
        ops.roi_align(feats.bfloat16(), rois.bfloat16(), (7, 7), 1.0, 2)
    assert len(ref_keep) > 0


def test_context_nests_and_restores_on_errors():
    pytest.importorskip('mmcv.ops')
    own = _ext_functions()
    with pytest.raises(KeyError):
        with mmcv_ops_in_fp32():
            inside = _ext_functions()
            assert inside.keys() == own.keys() and inside != own
            with mmcv_ops_in_fp32():
                assert _ext_functions() == inside  # nested: the same replacements
            assert _ext_functions() == inside  # still active for the outer one
            raise KeyError('boom')
    assert _ext_functions() == own


def test_training_step_with_an_mmcv_op_through_the_wrapper():
    """A model whose forward runs mmcv's RoIAlign on autocast features: one step of
    ``optim_context`` + ``update_params`` in bf16 and in fp16 (forward and backward through the
    op), leaving mmcv's functions as they were."""
    ops = pytest.importorskip('mmcv.ops')
    from mmengine.optim import build_optim_wrapper
    own = _ext_functions()
    _, _, feats, rois = _boxes_and_features()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.roi = ops.RoIAlign((7, 7), 1.0, 2)
            self.head = torch.nn.Linear(8 * 49, 1)

        def forward(self, x, boxes):
            pooled = self.roi(self.conv(x), boxes)
            return self.head(pooled.flatten(1))

    for dtype in ('bfloat16', 'float16'):
        torch.manual_seed(0)
        net = Net()
        wrapper = build_optim_wrapper(net, dict(type='CPUAmpOptimWrapper', dtype=dtype,
                                                loss_scale=dict(init_scale=1.0),
                                                optimizer=dict(type='SGD', lr=0.1)))
        before = net.conv.weight.detach().clone()
        with wrapper.optim_context(net):
            out = net(feats, rois)
            assert out.dtype == getattr(torch, dtype)
            loss = out.float().pow(2).mean()
        wrapper.update_params(loss)
        assert net.conv.weight.grad is None or torch.isfinite(net.conv.weight.grad).all()
        assert not torch.equal(net.conv.weight, before)  # the gradient went through RoIAlign
        assert _ext_functions() == own


# =====================================================================================
# Slow: the AMP config on demo data, through the tool
# =====================================================================================
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
