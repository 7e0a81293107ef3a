"""What the tests that run tools/train.py in a subprocess share.

The detection demo config narrowed to a few seconds per iteration on 2 CPU cores (the same
modules: Swin, FPN, RPN, RoI heads), the subprocess environment, and the losses the runs log.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / 'tools' / 'train.py'
DET_DEMO = REPO / 'configs' / 'mask_rcnn' / 'swin_t_demo.py'

#: Seeded and deterministic, for runs whose losses are compared step by step.
DETERMINISTIC = ['randomness.seed=0', 'randomness.deterministic=True']


def tiny_detector(max_epochs: int, *extra: str) -> list[str]:
    """``--cfg-options`` for DET_DEMO: 8 images, batch 2 (4 iterations per epoch in one
    process), no validation, a checkpoint every epoch, a log line every iteration with no
    smoothing, and a narrower model. ``extra`` options are appended."""
    return [
        'demo_data.num_train=8', 'demo_data.num_val=4',
        'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
        'train_dataloader.persistent_workers=False',
        'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None',
        'test_cfg=None', 'test_dataloader=None', 'test_evaluator=None',
        f'train_cfg.max_epochs={max_epochs}', 'default_hooks.checkpoint.interval=1',
        'default_hooks.logger.interval=1', 'log_processor.window_size=1',
        'model.backbone.embed_dims=32', 'model.backbone.depths=[2,2,2,2]',
        'model.backbone.num_heads=[1,2,4,8]', 'model.neck.in_channels=[32,64,128,256]',
        'model.neck.out_channels=64', 'model.rpn_head.in_channels=64',
        'model.rpn_head.feat_channels=64', 'model.roi_head.bbox_roi_extractor.out_channels=64',
        'model.roi_head.bbox_head.in_channels=64', 'model.roi_head.bbox_head.fc_out_channels=128',
        'model.roi_head.mask_roi_extractor.out_channels=64',
        'model.roi_head.mask_head.in_channels=64', 'model.roi_head.mask_head.conv_out_channels=64',
        'model.train_cfg.rcnn.sampler.num=64', *extra,
    ]


def tool_env(threads: int | None = None) -> dict:
    """This environment with the package (the repository root) and the tests' helpers (tests/)
    on PYTHONPATH, as an installed package would be; ``threads`` forces OMP_NUM_THREADS
    (default: 2 unless already set)."""
    env = dict(os.environ)
    first = [str(REPO), str(REPO / 'tests')]
    env['PYTHONPATH'] = os.pathsep.join(first + [p for p in env.get('PYTHONPATH', '').split(
        os.pathsep) if p and p not in first])
    if threads is None:
        env.setdefault('OMP_NUM_THREADS', '2')
    else:
        env['OMP_NUM_THREADS'] = str(threads)
    return env


def run_to_end(args: list, cwd: Path, threads: int | None = None, timeout: float = 1200) -> str:
    """Run ``args`` in ``cwd`` with :func:`tool_env`; it must exit 0. Returns stdout + stderr."""
    proc = subprocess.run(args, cwd=cwd, env=tool_env(threads), capture_output=True, text=True,
                          timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def logged_losses(work: Path) -> dict[int, dict[str, float]]:
    """step -> the loss values of that iteration, from every run's vis_data/scalars.json."""
    out = {}
    for scalars in sorted(work.glob('*/vis_data/scalars.json')):
        for line in scalars.read_text().splitlines():
            row = json.loads(line)
            if 'loss' in row:
                out[row['step']] = {k: v for k, v in row.items() if k.startswith('loss')}
    return out
