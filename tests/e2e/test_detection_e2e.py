"""End to end through the tools, as subprocesses, on a tiny slice of the demo data (8 train and
4 val images of 64 px, made by the tools themselves in a scratch working directory):
tools/train.py (CocoMetric at the end of training, checkpoint), --resume, tools/test.py
(metrics, --out pickle, --show-dir PNGs), and tools/dist_train.sh with 2 torchrun processes on
CPU (gloo). All slow: run with ``python -m pytest -m slow``."""
from __future__ import annotations

import glob
import json
import pickle
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip('mmdet')
pytestmark = pytest.mark.slow

from tool_runs import tool_env  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / 'tools'
DEMO = str(REPO / 'configs' / 'mask_rcnn' / 'swin_t_demo.py')
TINY = ['demo_data.num_train=8', 'demo_data.num_val=4', 'demo_data.image_size=64',
        'default_hooks.logger.interval=1']
METRICS = ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50')


def env():
    """A fresh shell's environment, with the package importable as installed (tool_env)."""
    e = {k: v for k, v in tool_env().items() if k not in ('LOCAL_RANK', 'RANK', 'WORLD_SIZE')}
    e['PYTHON'] = sys.executable
    return e


def run(args, cwd, timeout=900):
    proc = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f'{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc


def train(cwd, work_dir, *options, epochs=1):
    return run([sys.executable, str(TOOLS / 'train.py'), DEMO, '--work-dir', str(work_dir),
                *options, '--cfg-options', *TINY, f'train_cfg.max_epochs={epochs}',
                f'train_cfg.val_interval={epochs}'], cwd)


def logs(work_dir):
    return sorted(glob.glob(str(Path(work_dir) / '*' / '*.log')))


def scalars(work_dir):
    """Every line of the run's scalars.json (losses per iteration, metrics per validation)."""
    lines = []
    for path in sorted(glob.glob(str(Path(work_dir) / '*' / 'vis_data' / 'scalars.json'))):
        lines += [json.loads(line) for line in open(path)]
    return lines


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """One epoch (2 iterations of 4 images) and a validation, from an empty directory."""
    cwd = tmp_path_factory.mktemp('e2e')
    work = cwd / 'work'
    proc = train(cwd, work)
    return cwd, work, proc


def test_train_makes_data_trains_evaluates_and_saves(trained):
    cwd, work, proc = trained
    # the demo data was generated relative to the working directory, in the COCO layout
    from mmengine.config import Config
    root = cwd / Config.fromfile(DEMO).demo_data.root  # relative: under the working directory
    assert len(list((root / 'train2017').glob('*.jpg'))) == 8
    assert len(json.loads((root / 'annotations' / 'instances_val2017.json').read_text())
               ['images']) == 4
    # trained: a log line per iteration with the Mask R-CNN losses, then CocoMetric
    log = Path(logs(work)[-1]).read_text()
    assert 'Epoch(train) [1][2/2]' in log and 'loss_mask' in log and 'eta' in log
    assert 'Evaluating bbox' in log and 'Evaluating segm' in log
    val = [s for s in scalars(work) if 'coco/bbox_mAP' in s]
    assert len(val) == 1 and all(0 <= val[0][k] <= 1 for k in METRICS)
    assert (work / 'epoch_1.pth').is_file()
    assert (work / 'last_checkpoint').read_text().strip().endswith('epoch_1.pth')


def test_resume_continues_from_the_last_checkpoint(trained, tmp_path):
    cwd, work, _ = trained
    resumed = tmp_path / 'resumed'
    shutil.copytree(work, resumed)
    train(cwd, resumed, '--resume', epochs=2)  # --resume alone: the work dir's last checkpoint
    log = Path(logs(resumed)[-1]).read_text()
    assert 'resumed epoch: 1' in log.lower() or 'Auto resumed' in log
    assert 'Epoch(train) [2][2/2]' in log and 'Epoch(train) [1]' not in log
    assert (resumed / 'epoch_2.pth').is_file()
    explicit = tmp_path / 'explicit'
    train(cwd, explicit, '--resume', str(work / 'epoch_1.pth'), epochs=2)
    log = Path(logs(explicit)[-1]).read_text()
    assert 'Epoch(train) [2][2/2]' in log and 'Epoch(train) [1]' not in log


def test_test_tool_evaluates_dumps_and_paints(trained):
    cwd, work, _ = trained
    out = cwd / 'preds.pkl'
    test_work = cwd / 'test_work'
    run([sys.executable, str(TOOLS / 'test.py'), DEMO, str(work / 'epoch_1.pth'),
         '--work-dir', str(test_work), '--out', str(out), '--show-dir', 'painted',
         '--cfg-options', *TINY], cwd)
    # metrics: in the log and in the run's JSON
    runs = sorted(p for p in test_work.iterdir() if p.is_dir())
    metrics = json.loads((runs[-1] / f'{runs[-1].name}.json').read_text())
    assert all(0 <= metrics[k] <= 1 for k in METRICS)
    assert 'coco/segm_mAP' in Path(logs(test_work)[-1]).read_text()
    # predictions: one per val image, with boxes, labels, scores and masks
    preds = pickle.loads(out.read_bytes())
    assert len(preds) == 4
    assert {'bboxes', 'labels', 'scores', 'masks'} <= set(preds[0]['pred_instances'])
    # painted images: PNGs under WORK_DIR/TIMESTAMP/painted, one per val image
    pngs = sorted((runs[-1] / 'painted').glob('*.png'))
    assert len(pngs) == 4
    from PIL import Image
    assert Image.open(pngs[0]).size == (2 * 64, 64)  # ground truth | prediction, side by side


def test_tta_runs_on_boxes(trained):
    """mmdet 3.3.0's DetTTAModel merges boxes only: test the detector without its mask head."""
    cwd, work, _ = trained
    run([sys.executable, str(TOOLS / 'test.py'), DEMO, str(work / 'epoch_1.pth'), '--tta',
         '--work-dir', str(cwd / 'tta_work'), '--cfg-options', *TINY,
         'model.roi_head.mask_head=None', 'test_evaluator.metric=bbox'], cwd)
    runs = sorted(p for p in (cwd / 'tta_work').iterdir() if p.is_dir())
    assert 'coco/bbox_mAP' in json.loads((runs[-1] / f'{runs[-1].name}.json').read_text())


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_torchrun_processes_on_cpu_train_and_write_one_checkpoint(tmp_path):
    work = tmp_path / 'work'
    e = env()
    e['PORT'] = str(free_port())
    proc = subprocess.run(
        ['bash', str(TOOLS / 'dist_train.sh'), DEMO, '2', '--work-dir', str(work),
         '--cfg-options', *TINY, 'train_cfg.max_epochs=2', 'train_cfg.val_interval=2',
         'log_level=DEBUG'],  # DEBUG: mmengine writes one log file per rank
        cwd=tmp_path, env=e, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank_logs = {r: glob.glob(str(work / '*' / f'*rank{r}.log')) for r in (0, 1)}
    assert all(len(v) == 1 for v in rank_logs.values()), rank_logs
    for r, (path,) in rank_logs.items():
        text = Path(path).read_text()
        # each rank trained its half of the 8 images: 1 iteration of 4 per epoch, 2 epochs
        assert 'Epoch(train) [1][1/1]' in text and 'Epoch(train) [2][1/1]' in text, r
        assert 'loss_mask' in text
    first_loss = {r: re.search(r'Epoch\(train\) \[1\]\[1/1\].*? loss: ([0-9.]+)',
                               Path(p).read_text()).group(1) for r, (p,) in rank_logs.items()}
    assert first_loss[0] != first_loss[1]  # different images on each rank
    rank0 = Path(rank_logs[0][0]).read_text()
    assert "'world_size': 2" in rank0 or 'world_size: 2' in rank0 or 'GPU number: 2' in rank0
    assert 'coco/bbox_mAP' in rank0  # distributed validation gathered on gloo
    checkpoints = sorted(p.name for p in work.glob('*.pth'))
    assert checkpoints == ['epoch_2.pth']  # written once, by rank 0 (demo keeps the last one)
