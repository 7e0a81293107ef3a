"""The Swin V2 CPU demos through tools/train.py: a few iterations on a tiny slice of the demo data
(made by the tool itself in a scratch working directory), losses finite and logged, a checkpoint
saved with the V2 backbone's parameters. Slow: ``python -m pytest -m slow tests/e2e/test_v2_demos.py``.
"""
from __future__ import annotations

import glob
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')
pytestmark = pytest.mark.slow

import swin_dense  # noqa: E402
from tool_runs import tool_env  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / 'tools' / 'train.py'
ITERATIONS = 4
# config -> --cfg-options: 8 training images, batch 2, 4 iterations, a log line per iteration,
# a checkpoint at the end, no validation
DEMOS = {
    'mask_rcnn/swinv2_t_demo.py': [
        'demo_data.num_train=8', 'demo_data.num_val=4', 'demo_data.image_size=64',
        'train_dataloader.batch_size=2', 'train_cfg.max_epochs=1',
        'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None',
        'default_hooks.logger.interval=1', 'log_processor.window_size=1'],
    'upernet/swinv2_t_demo.py': [
        'demo_data.num_train=8', 'demo_data.num_val=4',
        'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
        'train_dataloader.persistent_workers=False',
        'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None',
        f'train_cfg.max_iters={ITERATIONS}', f'train_cfg.val_interval={ITERATIONS}',
        f'default_hooks.checkpoint.interval={ITERATIONS}', 'default_hooks.logger.interval=1'],
}


@pytest.mark.skipif(not hasattr(swin_dense, 'SwinV2Backbone'),
                    reason='SwinV2Backbone is not in swin_dense yet')
@pytest.mark.parametrize('demo', sorted(DEMOS))
def test_demo_trains_a_few_iterations(demo, tmp_path):
    work = tmp_path / 'work'
    proc = subprocess.run(
        [sys.executable, str(TRAIN), str(REPO / 'configs' / demo), '--work-dir', str(work),
         '--cfg-options', *DEMOS[demo]],
        cwd=tmp_path, env=tool_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f'{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    lines = []
    for path in glob.glob(str(work / '*' / 'vis_data' / 'scalars.json')):
        lines += [json.loads(line) for line in open(path)]
    losses = [line['loss'] for line in lines if 'loss' in line]
    assert len(losses) == ITERATIONS and all(math.isfinite(v) for v in losses), losses
    checkpoints = sorted(work.glob('*.pth'))
    assert checkpoints, sorted(p.name for p in work.iterdir())
    state = torch.load(checkpoints[-1], map_location='cpu', weights_only=False)['state_dict']
    assert 'backbone.stages.0.blocks.0.attn.w_msa.logit_scale' in state  # a V2 backbone
    assert not any('relative_position_bias_table' in key for key in state)  # not V1's
