"""The tools' command lines: tools/train.py and tools/test.py as subprocesses, the shell
launchers, and run_tool.

The tools run from an unrelated working directory with the package importable the way an
installed one is (PYTHONPATH, tool_runs.tool_env): a missing dataset (COCO, ADE20K) and a
mistyped config path end with status 1 and the message, no traceback; a Python without the
package gets a clear error too; the upstream options are accepted; the launchers build the
torchrun / srun commands and leave PYTHONPATH alone; run_tool closes a process group and frees
the run before that.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip('mmdet')

from swin_dense import launch  # noqa: E402
from swin_dense.launch import runner  # noqa: E402
from tool_runs import tool_env  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / 'tools'
COCO_1X = str(REPO / 'configs' / 'mask_rcnn' / 'swin_t_coco.py')
ADE_CONFIG = str(REPO / 'configs' / 'upernet' / 'swin_t_ade20k.py')


def env(**extra) -> dict:
    """A fresh shell's environment with the package importable (as installed)."""
    e = {k: v for k, v in tool_env().items() if k not in ('LOCAL_RANK', 'RANK', 'WORLD_SIZE')}
    e.update(extra)
    return e


def run_tool(tool: str, *args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOLS / tool), *map(str, args)], cwd=cwd,
                          env=env(), capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- the tools
def test_missing_data_through_the_tool_from_another_directory(tmp_path):
    """Exit status 1, the message on stderr, no traceback, no work dir (no Runner was built)."""
    proc = run_tool('train.py', COCO_1X, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    # (a library's warnings may come first on stderr)
    assert '\nerror: dataset files not found' in '\n' + proc.stderr
    assert 'Traceback' not in proc.stderr
    assert 'data/coco/annotations/instances_train2017.json' in proc.stderr
    assert not (tmp_path / 'work_dirs').exists()


def test_missing_ade20k_through_the_tool(tmp_path):
    proc = run_tool('train.py', ADE_CONFIG, '--work-dir', tmp_path / 'work', cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    assert 'data/ade/ADEChallengeData2016/images/training' in proc.stderr
    assert 'ADEChallengeData2016.zip' in proc.stderr and '--cfg-options' in proc.stderr
    assert 'paramwise_options' not in proc.stdout + proc.stderr  # no optimiser/model was built


def test_typoed_relative_config_path_through_the_tool(tmp_path):
    proc = run_tool('test.py', 'configs/mask_rcnn/swin_t_dem.py', 'x.pth', cwd=tmp_path)
    assert proc.returncode == 1
    assert 'config file not found: configs/mask_rcnn/swin_t_dem.py' in proc.stderr
    assert str(tmp_path) in proc.stderr and 'swin_t_demo.py' in proc.stderr


def test_tools_without_the_package_say_how_to_install_it(tmp_path):
    bare = {k: v for k, v in env().items() if k != 'PYTHONPATH'}
    for tool in ('train.py', 'test.py'):
        # -S: no site-packages, where an installed swin_dense would be found
        proc = subprocess.run([sys.executable, '-S', str(TOOLS / tool), '--help'], cwd=tmp_path,
                              env=bare, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert 'swin_dense is not importable' in proc.stderr and 'pip install -e .' in proc.stderr
        assert 'Traceback' not in proc.stderr


def test_tools_do_not_edit_sys_path():
    for tool in ('train.py', 'test.py'):
        text = (TOOLS / tool).read_text()
        assert 'sys.path' not in text and 'PYTHONPATH' in text  # only in the install hint


def test_tools_accept_the_upstream_options(tmp_path):
    for tool, expected in (('train.py', ['--work-dir', '--amp', '--resume', '--auto-scale-lr',
                                         '--cfg-options', '--launcher']),
                           ('test.py', ['--work-dir', '--out', '--show', '--show-dir',
                                        '--wait-time', '--cfg-options', '--launcher', '--tta'])):
        proc = run_tool(tool, '--help', cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        for option in expected:
            assert option in proc.stdout, (tool, option)
        assert '{none,pytorch,slurm,mpi}' in proc.stdout


# ----------------------------------------------------------------------------- launchers
@pytest.fixture
def fake_python(tmp_path):
    """A PYTHON that records its arguments and PYTHONPATH instead of starting torchrun."""
    script = tmp_path / 'fake_python'
    script.write_text('#!/bin/sh\necho "PYTHONPATH=$PYTHONPATH"\necho "ARGS $*"\n')
    script.chmod(0o755)
    return str(script)


def test_dist_train_runs_torchrun_from_any_directory(tmp_path, fake_python):
    e = env(PYTHON=fake_python, NNODES='2', NODE_RANK='1', MASTER_ADDR='10.1.2.3',
            PORT='29511', PYTHONPATH='/somewhere')
    proc = subprocess.run(['bash', str(TOOLS / 'dist_train.sh'), 'cfg.py', '8', '--amp',
                           '--work-dir', 'w'], cwd=tmp_path, env=e, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == 'PYTHONPATH=/somewhere'  # the installed package: PYTHONPATH left alone
    assert out[1] == (f'ARGS -m torch.distributed.run --nnodes=2 --node_rank=1 '
                      f'--master_addr=10.1.2.3 --nproc_per_node=8 --master_port=29511 '
                      f'{TOOLS}/train.py cfg.py --launcher pytorch --amp --work-dir w')


def test_dist_test_defaults(tmp_path, fake_python):
    proc = subprocess.run(['bash', str(TOOLS / 'dist_test.sh'), 'cfg.py', 'm.pth', '2', '--tta'],
                          cwd=tmp_path, env=env(PYTHON=fake_python), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == (
        f'ARGS -m torch.distributed.run --nnodes=1 --node_rank=0 --master_addr=127.0.0.1 '
        f'--nproc_per_node=2 --master_port=29500 {TOOLS}/test.py cfg.py m.pth '
        f'--launcher pytorch --tta')


def test_launchers_print_usage_without_arguments(tmp_path):
    for script in ('dist_train.sh', 'dist_test.sh', 'slurm_train.sh', 'slurm_test.sh'):
        proc = subprocess.run(['bash', str(TOOLS / script)], cwd=tmp_path, env=env(),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and 'usage:' in proc.stderr, script


def test_slurm_train_runs_srun_with_the_tool(tmp_path):
    fake = tmp_path / 'srun'
    fake.write_text('#!/bin/sh\necho "SRUN $*"\n')
    fake.chmod(0o755)
    e = env(PATH=f'{tmp_path}:{os.environ["PATH"]}', GPUS='16')
    proc = subprocess.run(['bash', str(TOOLS / 'slurm_train.sh'), 'part', 'job', 'cfg.py', 'wd',
                           '--amp'], cwd=tmp_path, env=e, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = [s for s in proc.stdout.splitlines() if s.startswith('SRUN')][0]
    assert '-p part --job-name=job --gres=gpu:8 --ntasks=16 --ntasks-per-node=8' in line
    assert f'{TOOLS}/train.py cfg.py --work-dir=wd --launcher=slurm --amp' in line


# ----------------------------------------------------------------------------- run_tool
@pytest.mark.parametrize('fails', [False, True])
def test_run_tool_closes_the_process_group(tmp_path, fails):
    """The tools close a process group the run started, also when the run ends in a LaunchError."""
    import torch.distributed as dist

    def main(argv):
        dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0,
                                world_size=1)
        if fails:
            raise launch.LaunchError('no data')

    assert not dist.is_initialized()
    assert launch.run_tool(main, []) == (1 if fails else 0)
    assert not dist.is_initialized()


@pytest.mark.parametrize('fails', [False, True])
def test_run_tool_frees_the_run_before_closing_the_process_group(monkeypatch, fails):
    """The Runner, its hooks and DDP sit in reference cycles; DDP's reducer holds the gloo group
    and its threads. They must be gone before the group is closed, not at interpreter teardown
    (SIGABRT there). Automatic collection is off here, so only run_tool's own one counts."""
    import gc
    import weakref

    class Run:  # stands for the Runner: an object in a reference cycle
        pass

    runs = []

    def main(argv):
        run = Run()
        run.self = run
        runs.append(weakref.ref(run))
        if fails:
            raise launch.LaunchError('no data')

    freed = []
    monkeypatch.setattr(runner, '_close_process_group',
                        lambda wait_for_others: freed.append(runs[0]() is None))
    enabled = gc.isenabled()
    gc.disable()
    try:
        assert launch.run_tool(main, []) == (1 if fails else 0)
    finally:
        if enabled:
            gc.enable()
    assert freed == [True]
