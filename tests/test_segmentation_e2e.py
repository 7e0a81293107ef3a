"""Segmentation through the tools: UperNet + SwinBackbone configs under mmseg.

Fast: the missing-ADE20K error (through tools/train.py and through launch.train, before any model
is built); SyncBN in the unedited configs trains on one CPU process (mmengine's Runner reverts it
to BN) and becomes BN for a CPU distributed run (launch.adapt_to_device).
Slow (``-m slow``): train the demo config on a tiny slice through tools/train.py, then
tools/test.py whole-image with --show-dir and --out, sliding-window, and --tta; a one-process
torchrun on CPU with the reference SyncBN.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip('mmseg')

from swin_dense import launch  # noqa: E402
from swin_dense.demo_data import ADE_DEMO_CLASSES, make_ade_demo  # noqa: E402
from tool_runs import tool_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ADE_CONFIG = REPO / 'configs' / 'upernet' / 'swin_t_ade20k.py'
DEMO_CONFIG = REPO / 'configs' / 'upernet' / 'swin_t_demo.py'
TRAIN = REPO / 'tools' / 'train.py'
TEST = REPO / 'tools' / 'test.py'


def _run(args, cwd, timeout=900, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=tool_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'{args} failed with {proc.returncode}:\n'
                             f'{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}')
    return proc


# --------------------------------------------------------------------------- missing data

ADE_ROOT = 'data/ade/ADEChallengeData2016'


def _assert_names_path_and_layout(message: str) -> None:
    assert ADE_ROOT in message
    for sub in ('images/training', 'images/validation',
                'annotations/training', 'annotations/validation'):
        assert f'{ADE_ROOT}/{sub}' in message, sub
    assert 'ADEChallengeData2016.zip' in message  # where to get it
    assert '--cfg-options' in message  # how to point elsewhere


def test_missing_ade20k_error_before_building(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def must_not_build(*args, **kwargs):
        raise AssertionError('the runner (and model) must not be built when data is missing')

    monkeypatch.setattr(launch, 'build_runner', must_not_build)
    with pytest.raises(launch.DataNotFoundError) as info:
        launch.train(str(ADE_CONFIG), work_dir=str(tmp_path / 'work'))
    _assert_names_path_and_layout(str(info.value))
    # the same check guards testing (it comes before the checkpoint is looked for)
    with pytest.raises(launch.DataNotFoundError) as info:
        launch.test(str(ADE_CONFIG), str(tmp_path / 'missing.pth'), work_dir=str(tmp_path / 'w'))
    assert f'{ADE_ROOT}/images/validation' in str(info.value)
    assert not (tmp_path / 'work').exists() or not any((tmp_path / 'work').rglob('*.pth'))


def test_missing_ade20k_through_the_tool(tmp_path):
    proc = _run([TRAIN, ADE_CONFIG, '--work-dir', tmp_path / 'work'], cwd=tmp_path,
                timeout=300, check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    _assert_names_path_and_layout(proc.stderr)
    assert 'paramwise_options' not in proc.stdout + proc.stderr  # no optimiser/model was built


# --------------------------------------------------------------------------- SyncBN


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
    monkeypatch.setattr(launch, '_cuda_available', lambda: False)
    cfg = launch.load_config(str(ADE_CONFIG))
    expected = {'model.decode_head.norm_cfg', 'model.auxiliary_head.norm_cfg'}
    assert set(_sync_bn_paths(cfg.model)) == expected
    launch.adapt_to_device(cfg, 'train')  # single process: left to mmengine's Runner
    assert set(_sync_bn_paths(cfg.model)) == expected

    cfg = launch.load_config(str(ADE_CONFIG), launcher='pytorch')
    cfg.sync_bn = 'torch'
    launch.adapt_to_device(cfg, 'train')
    assert not list(_sync_bn_paths(cfg.model))
    assert cfg.model.decode_head.norm_cfg == dict(type='BN', requires_grad=True)
    assert cfg.model.auxiliary_head.norm_cfg == dict(type='BN', requires_grad=True)
    assert cfg.get('sync_bn') is None
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'

    monkeypatch.setattr(launch, '_cuda_available', lambda: True)  # GPUs: SyncBN as configured
    cfg = launch.load_config(str(ADE_CONFIG), launcher='pytorch')
    launch.adapt_to_device(cfg, 'train')
    assert set(_sync_bn_paths(cfg.model)) == expected


@pytest.fixture(scope='module')
def tiny_ade(tmp_path_factory):
    return make_ade_demo(tmp_path_factory.mktemp('ade') / 'ade_demo', num_train=4, num_val=2,
                         image_size=64)


def test_sync_bn_trains_on_one_cpu_process(tmp_path, tiny_ade):
    """The unedited SyncBN of the reference heads: the Runner reverts it to BN and trains."""
    import torch
    from mmengine.model.utils import _BatchNormXd
    from mmengine.runner import Runner

    cfg = launch.load_config(str(DEMO_CONFIG), work_dir=str(tmp_path / 'work'))
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
    runner = Runner.from_cfg(cfg)
    model = runner.model
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    bns = [m for m in model.modules() if isinstance(m, _BatchNormXd)]
    assert bns
    before = [bn.running_mean.clone() for bn in bns]
    runner.train()
    assert all(bn.num_batches_tracked.item() == 2 for bn in bns)
    assert any(not torch.equal(b, bn.running_mean) for b, bn in zip(before, bns))
    assert runner.iter == 2


# --------------------------------------------------------------------------- end to end

TINY = ['demo_data.num_train=8', 'demo_data.num_val=4',
        'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
        'train_dataloader.persistent_workers=False',
        'val_dataloader.num_workers=0', 'val_dataloader.persistent_workers=False',
        'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False',
        'train_cfg.max_iters=4', 'train_cfg.val_interval=4',
        'default_hooks.checkpoint.interval=4', 'default_hooks.logger.interval=1']
TEST_LOADER = ['test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False',
               'demo_data.num_train=8', 'demo_data.num_val=4']
MIOU = re.compile(r'mIoU: (\d+\.\d+)')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """The demo config trained 4 iterations on 8 images through tools/train.py (cwd = tmp)."""
    cwd = tmp_path_factory.mktemp('seg_e2e')
    work = cwd / 'work'
    proc = _run([TRAIN, DEMO_CONFIG, '--work-dir', work, '--cfg-options', *TINY], cwd=cwd)
    return cwd, work, proc.stdout + proc.stderr


@pytest.mark.slow
def test_train_through_the_tool(trained):
    cwd, work, log = trained
    assert (cwd / 'data' / 'ade_demo' / '.demo_done.json').is_file()  # generated on first use
    assert len(list((cwd / 'data/ade_demo/images/training').glob('*.jpg'))) == 8
    assert (work / 'iter_4.pth').is_file()
    assert 'reverted to BatchNormXd' in log  # the reference SyncBN, single process
    assert MIOU.search(log), log[-3000:]
    for name in ADE_DEMO_CLASSES:  # the per-class table of IoUMetric
        assert re.search(rf'\|\s*{name}\s*\|', log), name


@pytest.mark.slow
def test_whole_image_with_overlays_and_label_maps(trained):
    cwd, work, _ = trained
    show, out = cwd / 'show', cwd / 'pred'
    proc = _run([TEST, DEMO_CONFIG, work / 'iter_4.pth', '--work-dir', cwd / 'test_whole',
                 '--show-dir', show, '--out', out, '--cfg-options', *TEST_LOADER], cwd=cwd)
    assert MIOU.search(proc.stdout + proc.stderr)
    overlays = sorted(show.rglob('*.png'))
    assert len(overlays) == 4, overlays
    from PIL import Image
    import numpy as np
    image = np.asarray(Image.open(overlays[0]))
    assert image.ndim == 3 and image.shape[2] == 3
    assert image.shape[1] == 2 * 64  # SegLocalVisualizer: ground truth | prediction side by side
    labels = sorted(out.rglob('*.png'))
    assert len(labels) == 4
    assert np.asarray(Image.open(labels[0])).shape == (64, 64)


@pytest.mark.slow
def test_sliding_window(trained):
    cwd, work, _ = trained
    proc = _run([TEST, DEMO_CONFIG, work / 'iter_4.pth', '--work-dir', cwd / 'test_slide',
                 '--cfg-options', *TEST_LOADER, 'model.test_cfg.mode=slide',
                 'model.test_cfg.crop_size=(32,32)', 'model.test_cfg.stride=(24,24)'], cwd=cwd)
    assert MIOU.search(proc.stdout + proc.stderr)


@pytest.mark.slow
def test_multi_scale_flip_tta(trained):
    cwd, work, _ = trained
    proc = _run([TEST, DEMO_CONFIG, work / 'iter_4.pth', '--work-dir', cwd / 'test_tta',
                 '--tta', '--cfg-options', *TEST_LOADER], cwd=cwd)
    log = proc.stdout + proc.stderr
    assert MIOU.search(log)
    assert "type='SegTTAModel'" in log  # the Runner logs the config it was built from
    assert "type='TestTimeAug'" in log


@pytest.mark.slow
def test_torchrun_on_cpu_with_sync_bn(tmp_path, tiny_ade):
    """One gloo process: torch's SyncBatchNorm would raise on CPU; launch.py makes it BN."""
    args = ['-m', 'torch.distributed.run', '--nproc_per_node=1', '--master_port=29533',
            TRAIN, DEMO_CONFIG, '--launcher', 'pytorch', '--work-dir', tmp_path / 'work',
            '--cfg-options', f'train_dataloader.dataset.data_root={tiny_ade}',
            f'val_dataloader.dataset.data_root={tiny_ade}', 'demo_data=None',
            'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
            'train_dataloader.persistent_workers=False', 'val_dataloader.num_workers=0',
            'val_dataloader.persistent_workers=False', 'train_cfg.max_iters=2',
            'train_cfg.val_interval=100', 'default_hooks.checkpoint.interval=2']
    proc = _run(args, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert 'SyncBN cannot run on CPU' in log
    assert (tmp_path / 'work' / 'iter_2.pth').is_file()
