"""Segmentation through the tools: the UperNet + SwinBackbone demo config under mmseg.

All slow (``-m slow``): train the demo config on a tiny slice through tools/train.py, then
tools/test.py whole-image with --show-dir and --out, sliding-window, and --tta; a one-process
torchrun on CPU with the reference SyncBN (which swin_dense.launch makes BN there). The fast
checks of the segmentation configs (missing ADE20K, SyncBN) are in tests/launch/.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip('mmseg')
pytestmark = pytest.mark.slow

from swin_dense.demo_data import ADE_DEMO_CLASSES, make_ade_demo  # noqa: E402
from tool_runs import tool_env  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
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


@pytest.fixture(scope='module')
def tiny_ade(tmp_path_factory):
    return make_ade_demo(tmp_path_factory.mktemp('ade') / 'ade_demo', num_train=4, num_val=2,
                         image_size=64)


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


def test_train_through_the_tool(trained):
    cwd, work, log = trained
    assert (cwd / 'data' / 'ade_demo' / '.demo_done.json').is_file()  # generated on first use
    assert len(list((cwd / 'data/ade_demo/images/training').glob('*.jpg'))) == 8
    assert (work / 'iter_4.pth').is_file()
    assert 'reverted to BatchNormXd' in log  # the reference SyncBN, single process
    assert MIOU.search(log), log[-3000:]
    for name in ADE_DEMO_CLASSES:  # the per-class table of IoUMetric
        assert re.search(rf'\|\s*{name}\s*\|', log), name


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


def test_sliding_window(trained):
    cwd, work, _ = trained
    proc = _run([TEST, DEMO_CONFIG, work / 'iter_4.pth', '--work-dir', cwd / 'test_slide',
                 '--cfg-options', *TEST_LOADER, 'model.test_cfg.mode=slide',
                 'model.test_cfg.crop_size=(32,32)', 'model.test_cfg.stride=(24,24)'], cwd=cwd)
    assert MIOU.search(proc.stdout + proc.stderr)


def test_multi_scale_flip_tta(trained):
    cwd, work, _ = trained
    proc = _run([TEST, DEMO_CONFIG, work / 'iter_4.pth', '--work-dir', cwd / 'test_tta',
                 '--tta', '--cfg-options', *TEST_LOADER], cwd=cwd)
    log = proc.stdout + proc.stderr
    assert MIOU.search(log)
    assert "type='SegTTAModel'" in log  # the Runner logs the config it was built from
    assert "type='TestTimeAug'" in log


def test_torchrun_on_cpu_with_sync_bn(tmp_path, tiny_ade):
    """One gloo process: X"""
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
