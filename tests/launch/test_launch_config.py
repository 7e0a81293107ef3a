"""swin_dense.launch: reading the config, the tools' options, what tools/train.py selects, and
the adaptation to a machine without CUDA.

A mistyped config path, toolkit dispatch, the demo data made before the data check, the train
and test options as the upstream tools apply them, the crash-safe hooks selected in the config
(and built by the Runner from it), gloo / CPU DDP / SyncBN as BN on CPU, a GPU machine keeping
the config, SyncBN in the unedited configs training on one CPU process.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip('mmdet')
from mmengine.config import Config  # noqa: E402

from swin_dense import launch  # noqa: E402
from swin_dense.launch import (ConfigNotFoundError, LaunchError,  # noqa: E402
                               UnsupportedToolkitError, runner)

REPO = Path(__file__).resolve().parents[2]
COCO_1X = str(REPO / 'configs' / 'mask_rcnn' / 'swin_t_coco.py')
AMP_3X = str(REPO / 'configs' / 'mask_rcnn' / 'swin_t_coco_3x_amp.py')
DET_DEMO = str(REPO / 'configs' / 'mask_rcnn' / 'swin_t_demo.py')
ADE_CONFIG = str(REPO / 'configs' / 'upernet' / 'swin_t_ade20k.py')
SEG_DEMO = str(REPO / 'configs' / 'upernet' / 'swin_t_demo.py')


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------- config
def test_typoed_config_path_names_close_matches(in_tmp):
    with pytest.raises(ConfigNotFoundError) as info:
        launch.load_config(str(REPO / 'configs' / 'mask_rcnn' / 'swin_t_coco_1x.py'))
    assert isinstance(info.value, FileNotFoundError)
    assert 'config file not found' in str(info.value)
    assert 'swin_t_coco.py' in str(info.value)


def test_toolkit_follows_default_scope():
    assert launch.toolkit_of(Config(dict(default_scope='mmdet'))) == 'mmdet'
    assert launch.toolkit_of(Config(dict(default_scope='mmseg'))) == 'mmseg'
    for scope in ('mmpretrain', None):
        with pytest.raises(UnsupportedToolkitError, match="default_scope is"):
            launch.toolkit_of(Config(dict(default_scope=scope)))


def test_demo_data_is_made_before_the_data_check(in_tmp):
    cfg = Config(dict(default_scope='mmdet', demo_data=dict(
        kind='coco', root='data/tiny/', num_train=2, num_val=1, image_size=32)))
    root = launch.prepare_demo_data(cfg)
    assert root == in_tmp / 'data' / 'tiny'
    assert (root / 'annotations' / 'instances_val2017.json').is_file()
    assert launch.prepare_demo_data(Config(dict(default_scope='mmdet'))) is None


# ----------------------------------------------------------------------------- options
def test_train_options_follow_upstream(tmp_path):
    cfg = launch.load_config(COCO_1X)
    assert cfg.work_dir == os.path.join('./work_dirs', 'swin_t_coco')
    assert launch.load_config(COCO_1X, work_dir='w').work_dir == 'w'
    launch.apply_train_options(cfg, 'mmdet', amp=True, auto_scale_lr=True, resume='auto')
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.loss_scale == 'dynamic'
    assert cfg.auto_scale_lr.enable is True and cfg.auto_scale_lr.base_batch_size == 16
    assert cfg.resume is True and cfg.load_from is None  # --resume alone: the work dir's last
    ckpt = tmp_path / 'epoch_3.pth'
    ckpt.write_bytes(b'')
    launch.apply_train_options(cfg, 'mmdet', resume=str(ckpt))
    assert cfg.resume is True and cfg.load_from == str(ckpt)
    with pytest.raises(FileNotFoundError, match='resume'):
        launch.apply_train_options(cfg, 'mmdet', resume=str(tmp_path / 'nope.pth'))
    no_scale = Config(dict(default_scope='mmseg', optim_wrapper=dict(type='OptimWrapper')))
    with pytest.raises(LaunchError, match='auto_scale_lr'):
        launch.apply_train_options(no_scale, 'mmseg', auto_scale_lr=True)


def test_test_options_follow_upstream(tmp_path):
    ckpt = tmp_path / 'm.pth'
    ckpt.write_bytes(b'')
    with pytest.raises(LaunchError, match='DetTTAModel merges boxes only'):
        launch.apply_test_options(launch.load_config(COCO_1X), 'mmdet', str(ckpt), tta=True)
    cfg = launch.load_config(COCO_1X, {'model.roi_head.mask_head': None})  # Faster R-CNN
    launch.apply_test_options(cfg, 'mmdet', str(ckpt), show_dir='vis', tta=True, out='p.pkl')
    assert cfg.load_from == str(ckpt)
    vis = cfg.default_hooks.visualization
    assert vis.draw is True and vis.test_out_dir == 'vis'
    assert cfg.model.type == 'DetTTAModel' and cfg.model.module.type == 'MaskRCNN'
    assert cfg.test_dataloader.dataset.pipeline[-1].type == 'TestTimeAug'
    shown = launch.load_config(COCO_1X)
    launch.apply_test_options(shown, 'mmdet', str(ckpt), show=True, wait_time=0.5)
    assert shown.default_hooks.visualization.show is True
    assert shown.default_hooks.visualization.wait_time == 0.5
    with pytest.raises(LaunchError, match='.pkl'):
        launch.apply_test_options(launch.load_config(COCO_1X), 'mmdet', str(ckpt), out='p.json')
    no_vis = launch.load_config(COCO_1X, {'default_hooks.visualization': None})
    no_vis.default_hooks.pop('visualization')
    with pytest.raises(LaunchError, match='VisualizationHook'):
        launch.apply_test_options(no_vis, 'mmdet', str(ckpt), show_dir='vis')

    seg = Config(dict(default_scope='mmseg', model=dict(type='EncoderDecoder'),
                      default_hooks=dict(visualization=dict(type='SegVisualizationHook')),
                      visualizer=dict(type='SegLocalVisualizer'),
                      test_evaluator=dict(type='IoUMetric'),
                      test_dataloader=dict(dataset=dict(pipeline=[])),
                      tta_model=dict(type='SegTTAModel'), tta_pipeline=[dict(type='X')]))
    launch.apply_test_options(seg, 'mmseg', str(ckpt), show_dir='vis', tta=True, out='preds')
    assert seg.default_hooks.visualization.draw is True
    assert seg.default_hooks.visualization.interval == 1
    assert seg.visualizer.save_dir == 'vis'
    assert seg.model.type == 'SegTTAModel' and seg.model.module.type == 'EncoderDecoder'
    assert seg.test_evaluator.output_dir == 'preds' and seg.test_evaluator.keep_results is True


# ----------------------------------------------------------------------------- crash-safe hooks
def test_training_configs_select_the_crash_safe_hooks():
    cfg = launch.load_config(COCO_1X)
    changed = launch.select_crash_safe_training(cfg)
    assert cfg.default_hooks.checkpoint.type == 'AtomicCheckpointHook'
    assert cfg.default_hooks.checkpoint.interval == 1  # the config's options are kept
    assert dict(type='ResumeRandomStateHook') in cfg.custom_hooks
    assert cfg.custom_imports.imports == ['swin_dense', 'swin_dense.integrations']
    assert len(changed) == 3
    assert launch.select_crash_safe_training(cfg) == []  # idempotent
    assert [h['type'] for h in cfg.custom_hooks].count('ResumeRandomStateHook') == 1
    # no checkpoint hook, or another type: kept as it is
    none = Config(dict(default_hooks=dict(checkpoint=None)))
    launch.select_crash_safe_training(none)
    assert none.default_hooks.checkpoint is None
    other = Config(dict(default_hooks=dict(checkpoint=dict(type='MyCheckpointHook'))))
    launch.select_crash_safe_training(other)
    assert other.default_hooks.checkpoint.type == 'MyCheckpointHook'
    assert other.custom_imports.imports == ['swin_dense.integrations']


def test_the_runner_builds_the_selected_hooks(tmp_path):
    """The dumped config names the hooks, and a Runner built from it has them: the tools pass
    nothing to the Runner beyond its config."""
    from mmengine.runner import Runner

    from swin_dense.integrations import AtomicCheckpointHook, ResumeRandomStateHook
    cfg = launch.load_config(SEG_DEMO, work_dir=str(tmp_path / 'work'),
                             cfg_options={'demo_data': None})
    launch.setup_toolkit(cfg)
    launch.select_crash_safe_training(cfg)
    built = Runner.from_cfg(cfg)
    kinds = {type(h) for h in built.hooks}
    assert AtomicCheckpointHook in kinds and ResumeRandomStateHook in kinds
    assert "type='AtomicCheckpointHook'" in built.cfg.pretty_text
    assert "'swin_dense.integrations'" in built.cfg.pretty_text


# ----------------------------------------------------------------------------- device
def test_cpu_machines_get_gloo_and_no_cudnn_benchmark(monkeypatch):
    monkeypatch.setattr(runner, '_cuda_available', lambda: False)
    cfg = launch.load_config(COCO_1X, {'env_cfg.cudnn_benchmark': True}, launcher='pytorch')
    launch.adapt_to_device(cfg, 'train')
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.env_cfg.cudnn_benchmark is False
    assert cfg.model_wrapper_cfg.device_ids is None  # DDP of a CPU module
    amp = launch.load_config(AMP_3X)
    launch.adapt_to_device(amp, 'test')  # testing an AMP config on CPU leaves it as it is
    assert amp.optim_wrapper.type == 'AmpOptimWrapper'
    launch.adapt_to_device(amp, 'train')  # AmpOptimWrapper asserts a GPU: bf16 autocast on CPU
    assert amp.optim_wrapper.type == 'CPUAmpOptimWrapper'
    assert amp.optim_wrapper.dtype == 'bfloat16'


def test_gpu_machines_keep_the_config(monkeypatch):
    monkeypatch.setattr(runner, '_cuda_available', lambda: True)
    cfg = launch.load_config(COCO_1X, launcher='pytorch')
    launch.adapt_to_device(cfg, 'train')
    assert cfg.env_cfg.dist_cfg.backend == 'nccl' and 'model_wrapper_cfg' not in cfg


def test_cpu_launchers_other_than_torchrun_are_a_clear_error(monkeypatch):
    monkeypatch.setattr(runner, '_cuda_available', lambda: False)
    cfg = launch.load_config(COCO_1X, launcher='slurm')
    with pytest.raises(launch.DeviceError, match='torchrun'):
        launch.build_runner(cfg, 'mmdet')


def _sync_bn_paths(node, where='model'):
    if isinstance(node, dict):
        if node.get('type') == 'SyncBN':
            yield where
        for k, v in node.items():
            yield from _sync_bn_paths(v, f'{where}.{k}')
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _sync_bn_paths(v, f'{where}.{i}')


def test_sync_bn_config_becomes_bn_only_for_cpu_distributed(monkeypatch):
    pytest.importorskip('mmseg')
    monkeypatch.setattr(runner, '_cuda_available', lambda: False)
    cfg = launch.load_config(ADE_CONFIG)
    expected = {'model.decode_head.norm_cfg', 'model.auxiliary_head.norm_cfg'}
    assert set(_sync_bn_paths(cfg.model)) == expected
    launch.adapt_to_device(cfg, 'train')  # single process: left to mmengine's Runner
    assert set(_sync_bn_paths(cfg.model)) == expected

    cfg = launch.load_config(ADE_CONFIG, launcher='pytorch')
    cfg.sync_bn = 'torch'
    launch.adapt_to_device(cfg, 'train')
    assert not list(_sync_bn_paths(cfg.model))
    assert cfg.model.decode_head.norm_cfg == dict(type='BN', requires_grad=True)
    assert cfg.model.auxiliary_head.norm_cfg == dict(type='BN', requires_grad=True)
    assert cfg.get('sync_bn') is None
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'

    monkeypatch.setattr(runner, '_cuda_available', lambda: True)  # GPUs: SyncBN as configured
    cfg = launch.load_config(ADE_CONFIG, launcher='pytorch')
    launch.adapt_to_device(cfg, 'train')
    assert set(_sync_bn_paths(cfg.model)) == expected


def test_sync_bn_trains_on_one_cpu_process(tmp_path):
    """The unedited SyncBN of the reference heads: the Runner reverts it to BN and trains."""
    pytest.importorskip('mmseg')
    import torch
    from mmengine.model.utils import _BatchNormXd
    from mmengine.runner import Runner

    from swin_dense.demo_data import make_ade_demo
    tiny_ade = make_ade_demo(tmp_path / 'ade_demo', num_train=4, num_val=2, image_size=64)
    cfg = launch.load_config(SEG_DEMO, work_dir=str(tmp_path / 'work'))
    launch.setup_toolkit(cfg)
    assert cfg.model.decode_head.norm_cfg.type == 'SyncBN'
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[key].dataset.data_root = str(tiny_ade)
        cfg[key].num_workers = 0
        cfg[key].persistent_workers = False
    cfg.train_dataloader.batch_size = 2
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=2, val_interval=100)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=100)
    # narrower heads (the norm layers stay SyncBN) keep this test quick
    cfg.model.decode_head.channels = 32
    cfg.model.auxiliary_head.channels = 16
    launch.adapt_to_device(cfg, 'train')
    built = Runner.from_cfg(cfg)
    model = built.model
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    bns = [m for m in model.modules() if isinstance(m, _BatchNormXd)]
    assert bns
    before = [bn.running_mean.clone() for bn in bns]
    built.train()
    assert all(bn.num_batches_tracked.item() == 2 for bn in bns)
    assert any(not torch.equal(b, bn.running_mean) for b, bn in zip(before, bns))
    assert built.iter == 2
