"""AtomicCheckpointHook and ResumeRandomStateHook under mmengine's Runner.

Fast, on a toy model: a crash in the middle of a save (in-process, and a SIGKILLed writer) keeps
the previous checkpoint and the ``last_checkpoint`` pointer valid, and a control shows mmengine's
own CheckpointHook loses both; the order checkpoint -> pointer -> deletion; stale temporaries
removed at the next save; an explicit ``backend_args`` kept; the RNG state saved with the
checkpoint, so that a resumed Runner repeats the uninterrupted losses exactly, and a control
without the hook that does not; importing the integrations changes nothing in mmengine or mmcv.

Slow (``-m slow``): tools/train.py on the detection demo killed with SIGKILL after its first
checkpoint, then ``--resume``: the losses after the resume equal the uninterrupted run's.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from swin_dense.checkpoint import register_mmengine_safe_globals
from swin_dense.integrations import (AtomicLocalBackend, ResumeRandomStateHook,
                                     capture_rng_state, restore_rng_state)
from swin_dense.integrations import checkpoint_hook as hook_module
from tool_runs import (DET_DEMO, DETERMINISTIC, TRAIN, logged_losses, run_to_end,
                       tiny_detector, tool_env)


class _SimulatedCrash(BaseException):
    """Stands for SIGKILL in the middle of a save (not an Exception: nothing catches it)."""


def _toy_parts():
    from mmengine.model import BaseModel
    from torch.utils.data import Dataset

    class ToyData(Dataset):
        """Random augmentation from numpy and random in the main process (num_workers=0)."""

        def __init__(self):
            g = torch.Generator().manual_seed(123)
            self.x = torch.randn(8, 4, generator=g)
            self.y = torch.randn(8, generator=g)

        def __len__(self):
            return 8

        def __getitem__(self, i):
            x = self.x[i] + torch.from_numpy(np.random.randn(4).astype(np.float32)) * 0.1
            if random.random() < 0.5:
                x = x.flip(0)
            return dict(inputs=x, targets=self.y[i])

    class ToyModel(BaseModel):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3),
                                     nn.Linear(16, 1))

        def forward(self, inputs, targets=None, mode='tensor'):
            out = self.net(inputs).squeeze(-1)
            if mode == 'loss':
                return dict(loss=F.mse_loss(out, targets))
            return out

    return ToyData, ToyModel


_RUN = [0]


def _toy_runner(work_dir: Path, max_epochs: int = 4, resume: bool = False,
                max_keep_ckpts: int = 1, crash_after_epoch: int = 0,
                checkpoint_hook: str = 'AtomicCheckpointHook', rng_hook: bool = True,
                **checkpoint_args):
    """A Runner built as tools/train.py builds one: the checkpoint hook selected by type, the
    RNG hook in custom_hooks."""
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    register_mmengine_safe_globals()  # what launch.setup_toolkit does for resume
    ToyData, ToyModel = _toy_parts()
    losses: dict = {}

    class Record(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            losses[runner.iter + 1] = outputs['loss'].item()  # 1-based, as the logs

    class Crash(Hook):
        priority = 'LOWEST'  # after the checkpoint of that epoch is written

        def after_train_epoch(self, runner):
            if runner.epoch + 1 == crash_after_epoch:
                raise _SimulatedCrash(f'killed after epoch {crash_after_epoch}')

    _RUN[0] += 1
    torch.manual_seed(0)  # the model is built here, before the Runner seeds (the tools build
    model = ToyModel()    # theirs after)
    custom_hooks = [Record(), Crash()] + ([dict(type='ResumeRandomStateHook')] if rng_hook
                                          else [])
    runner = Runner(
        model=model, work_dir=str(work_dir), experiment_name=f'toy_{os.getpid()}_{_RUN[0]}',
        train_dataloader=dict(dataset=ToyData(), sampler=dict(type='DefaultSampler', shuffle=True),
                              batch_size=2, num_workers=0, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9)),
        param_scheduler=dict(type='MultiStepLR', milestones=[2], by_epoch=True),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        default_hooks=dict(checkpoint=dict(type=checkpoint_hook, interval=1,
                                           max_keep_ckpts=max_keep_ckpts, **checkpoint_args),
                           logger=dict(type='LoggerHook', interval=100)),
        custom_hooks=custom_hooks, randomness=dict(seed=0), resume=resume,
        default_scope='mmengine', log_level='WARNING')
    return runner, losses


def _crash_in_atomic_write(monkeypatch, nth: int) -> None:
    """The nth file the hook writes gets half its bytes, then the process 'dies' (the atomic
    path: the bytes go into the temporary file)."""
    real_write = hook_module._write_bytes
    calls = [0]

    def write(path, data):
        calls[0] += 1
        if calls[0] < nth:
            return real_write(path, data)
        real_write(path, data[:len(data) // 2])
        raise _SimulatedCrash('killed mid-save')

    monkeypatch.setattr(hook_module, '_write_bytes', write)


def _crash_in_put(monkeypatch, nth: int) -> None:
    """The nth LocalBackend.put writes half its bytes to the file, then the process 'dies'
    (mmengine's own path: torch.save into memory, then put() opens the final name)."""
    from mmengine.fileio.backends.local_backend import LocalBackend
    real_put = LocalBackend.put
    calls = [0]

    def put(self, obj, filepath):
        calls[0] += 1
        if calls[0] < nth:
            return real_put(self, obj, filepath)
        with open(filepath, 'wb') as f:
            f.write(obj[:len(obj) // 2])
        raise _SimulatedCrash('killed mid-save')

    monkeypatch.setattr(LocalBackend, 'put', put)


def _complete(path: Path) -> bool:
    register_mmengine_safe_globals()  # mmengine checkpoints carry HistoryBuffer / numpy metadata
    try:
        torch.load(path, map_location='cpu', weights_only=True)
        return True
    except Exception:  # noqa: BLE001 - truncated / corrupt
        return False


# =====================================================================================
# Atomic checkpoints
# =====================================================================================
def test_crash_mid_save_keeps_the_previous_checkpoint_and_pointer(tmp_path, monkeypatch):
    runner, _ = _toy_runner(tmp_path, max_epochs=3, max_keep_ckpts=1)
    with pytest.MonkeyPatch.context() as mp:
        _crash_in_atomic_write(mp, nth=3)  # epoch 1 and its pointer saved; killed in epoch 2's
        with pytest.raises(_SimulatedCrash):
            runner.train()
    pointer = (tmp_path / 'last_checkpoint').read_text()
    assert pointer.endswith('epoch_1.pth')
    assert _complete(Path(pointer))  # kept although max_keep_ckpts=1
    assert not (tmp_path / 'epoch_2.pth').exists()
    assert not list(tmp_path.glob('.*.tmp'))  # the temporary is removed on the way out
    # and --resume continues from it
    resumed, losses = _toy_runner(tmp_path, max_epochs=3, resume=True, max_keep_ckpts=1)
    resumed.train()
    assert sorted(losses) == list(range(5, 13))
    assert sorted(p.name for p in tmp_path.glob('*.pth')) == ['epoch_3.pth']
    assert (tmp_path / 'last_checkpoint').read_text().endswith('epoch_3.pth')


def test_control_mmengine_alone_loses_the_checkpoint(tmp_path):
    """What the hook prevents: mmengine 0.10's CheckpointHook deletes epoch_1.pth before
    writing epoch_2.pth, straight to its final name; a crash then leaves only a truncated
    file, and the pointer names the deleted one."""
    runner, _ = _toy_runner(tmp_path, max_epochs=3, max_keep_ckpts=1,
                            checkpoint_hook='CheckpointHook')
    with pytest.MonkeyPatch.context() as mp:
        _crash_in_put(mp, nth=2)
        with pytest.raises(_SimulatedCrash):
            runner.train()
    assert not (tmp_path / 'epoch_1.pth').exists()
    assert (tmp_path / 'epoch_2.pth').exists() and not _complete(tmp_path / 'epoch_2.pth')
    assert (tmp_path / 'last_checkpoint').read_text().endswith('epoch_1.pth')


def test_save_order_checkpoint_then_pointer_then_deletion(tmp_path, monkeypatch):
    events = []
    real_replace, real_remove = os.replace, os.remove

    def replace(src, dst):
        events.append(('replace', Path(dst).name))
        return real_replace(src, dst)

    def remove(path):
        events.append(('remove', Path(path).name))
        return real_remove(path)

    monkeypatch.setattr(os, 'replace', replace)
    monkeypatch.setattr(os, 'remove', remove)
    runner, _ = _toy_runner(tmp_path, max_epochs=2, max_keep_ckpts=1)
    runner.train()
    assert events == [('replace', 'epoch_1.pth'), ('replace', 'last_checkpoint'),
                      ('replace', 'epoch_2.pth'), ('replace', 'last_checkpoint'),
                      ('remove', 'epoch_1.pth')]


def test_stale_temporaries_are_removed_at_the_next_save(tmp_path):
    """A killed save leaves ``.NAME.XXXX.tmp``; the next save removes those of checkpoints and
    of the pointer, and nothing else."""
    tmp_path.mkdir(exist_ok=True)
    ours = [tmp_path / '.epoch_7.pth.a1b2c3.tmp', tmp_path / '.last_checkpoint.x9y8z7.tmp']
    foreign = [tmp_path / '.notes.json.q1w2e3.tmp', tmp_path / 'notes.tmp']
    for path in ours + foreign:
        path.write_bytes(b'partial')
    runner, _ = _toy_runner(tmp_path, max_epochs=1)
    runner.train()
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in foreign)


def test_local_checkpoints_use_the_atomic_backend_unless_the_config_chooses_one(tmp_path):
    runner, _ = _toy_runner(tmp_path / 'default', max_epochs=1)
    runner.train()
    hook = next(h for h in runner.hooks if type(h).__name__ == 'AtomicCheckpointHook')
    assert isinstance(hook.file_backend, AtomicLocalBackend)
    assert hook.backend_args == dict(backend='atomic_local')
    chosen, _ = _toy_runner(tmp_path / 'chosen', max_epochs=1,
                            backend_args=dict(backend='local'))
    chosen.train()
    hook = next(h for h in chosen.hooks if type(h).__name__ == 'AtomicCheckpointHook')
    assert type(hook.file_backend).__name__ == 'LocalBackend'  # the config's choice is kept
    assert (tmp_path / 'chosen' / 'epoch_1.pth').is_file()


def test_sigkill_mid_write_leaves_the_old_file_and_a_temporary_that_is_cleaned(tmp_path):
    """A real kill: a child process writes a checkpoint atomically and is SIGKILLed halfway."""
    target = tmp_path / 'epoch_1.pth'
    torch.save({'old': torch.ones(3)}, target)
    code = textwrap.dedent(f"""
        import time
        from swin_dense.fileio import atomic_write
        def write(tmp):
            with open(tmp, 'wb') as f:
                f.write(b'x' * 1_000_000)
                f.flush()
                print('writing', flush=True)
                time.sleep(60)
        atomic_write({str(target)!r}, write)
    """)
    child = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True,
                             env=tool_env())
    try:
        assert child.stdout.readline().strip() == 'writing'
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert torch.equal(torch.load(target, weights_only=True)['old'], torch.ones(3))
    leftovers = list(tmp_path.glob('.epoch_1.pth.*.tmp'))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == 1_000_000
    runner, _ = _toy_runner(tmp_path, max_epochs=1)  # the next save cleans it
    runner.train()
    assert not leftovers[0].exists()


# =====================================================================================
# Exact resume
# =====================================================================================
def test_rng_state_roundtrip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.randn(3), random.random())
    torch.save({'meta': {'rng_state': state}}, tmp_path / 'c.pth')
    loaded = torch.load(tmp_path / 'c.pth', weights_only=True)['meta']['rng_state']
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    restore_rng_state(loaded)
    again = (torch.rand(3), np.random.randn(3), random.random())
    # the same generator state draws the same numbers: one computation, repeated
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def _uninterrupted_and_resumed(tmp_path: Path, rng_hook: bool = True) -> tuple[dict, dict]:
    """Losses of a full toy run, and of one crashed after epoch 2 and resumed (with or without
    the RNG-state hook in the resumed runner); the latter has steps 9-16."""
    full, expected = _toy_runner(tmp_path / 'full')
    full.train()
    first, _ = _toy_runner(tmp_path / 'split', crash_after_epoch=2)
    with pytest.raises(_SimulatedCrash):
        first.train()
    second, got = _toy_runner(tmp_path / 'split', resume=True, rng_hook=rng_hook)
    assert any(isinstance(h, ResumeRandomStateHook) for h in second.hooks) is rng_hook
    second.train()
    assert sorted(got) == list(range(9, 17))
    return expected, got


def test_resumed_runner_repeats_the_uninterrupted_losses(tmp_path):
    expected, got = _uninterrupted_and_resumed(tmp_path)
    assert got == {i: expected[i] for i in got}  # the same computation: bit for bit


def test_control_without_the_rng_hook_the_losses_differ(tmp_path):
    """Why the RNG state is restored: mmengine's resume alone (it reseeds) continues with other
    dropout masks and augmentations."""
    expected, got = _uninterrupted_and_resumed(tmp_path, rng_hook=False)
    assert any(got[i] != expected[i] for i in got)


# =====================================================================================
# Extension points, not patches
# =====================================================================================
def test_importing_the_integrations_changes_nothing_in_mmengine_or_mmcv():
    """In a fresh process: the identities of mmengine's checkpoint functions, CheckpointHook's
    methods and every function of mmcv._ext are the same before and after importing
    swin_dense.integrations and swin_dense.launch and registering both toolkits."""
    code = textwrap.dedent("""
        import mmengine.hooks.checkpoint_hook as hook_module
        import mmengine.runner as runner_pkg
        import mmengine.runner.checkpoint as checkpoint_module
        import mmengine.runner.runner as runner_module
        from mmengine.hooks import CheckpointHook
        from mmengine.optim import AmpOptimWrapper
        import mmcv._ext as ext

        def snapshot():
            out = {f'{m.__name__}.save_checkpoint': id(getattr(m, 'save_checkpoint', None))
                   for m in (hook_module, runner_pkg, checkpoint_module, runner_module)}
            out.update({f'CheckpointHook.{k}': id(v) for k, v in vars(CheckpointHook).items()})
            out.update({f'AmpOptimWrapper.{k}': id(v) for k, v in vars(AmpOptimWrapper).items()})
            out.update({f'ext.{k}': id(getattr(ext, k)) for k in dir(ext)})
            return out

        before = snapshot()
        import swin_dense.integrations
        from swin_dense import launch
        from mmengine.config import Config
        for scope in ('mmdet', 'mmseg'):
            launch.setup_toolkit(Config(dict(default_scope=scope)))
        after = snapshot()
        changed = sorted(k for k in before if before[k] != after.get(k))
        print('CHANGED', changed)
    """)
    proc = subprocess.run([sys.executable, '-c', code], env=tool_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'CHANGED []' in proc.stdout, proc.stdout[-3000:]


# =====================================================================================
# Slow: SIGKILL a real demo training through tools/train.py, then --resume
# =====================================================================================
# The demo config, tiny and deterministic, keeping one checkpoint.
TINY_DET = tiny_detector(3, 'default_hooks.checkpoint.max_keep_ckpts=1', *DETERMINISTIC)
ITERS_PER_EPOCH = 4


def _train_args(work: Path, *extra) -> list:
    return [sys.executable, str(TRAIN), str(DET_DEMO), '--work-dir', str(work), *extra,
            '--cfg-options', *TINY_DET]


@pytest.mark.slow
def test_sigkill_then_resume_repeats_the_uninterrupted_losses(tmp_path):
    total = 3 * ITERS_PER_EPOCH
    full = tmp_path / 'full'
    run_to_end(_train_args(full), tmp_path)
    expected = logged_losses(full)
    assert sorted(expected) == list(range(1, total + 1))

    work = tmp_path / 'crashed'
    log_path = tmp_path / 'crashed.log'
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(_train_args(work), cwd=tmp_path, env=tool_env(), stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 900
            pointer = work / 'last_checkpoint'
            while time.time() < deadline and proc.poll() is None:
                # killed once epoch 1 is checkpointed and an iteration of epoch 2 is done (it
                # is lost: the resumed run must redo it from the checkpoint)
                if pointer.exists() and pointer.read_text().endswith('epoch_1.pth') \
                        and 'Epoch(train) [2][1/' in log_path.read_text():
                    break
                time.sleep(0.2)
            assert proc.poll() is None, log_path.read_text()[-3000:]
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (work / 'epoch_3.pth').exists()  # killed mid-run
    for ckpt in work.glob('*.pth'):  # whatever exists is complete
        assert _complete(ckpt), ckpt
    before = logged_losses(work)
    assert ITERS_PER_EPOCH < max(before) < total  # some of epoch 2 was done, then lost

    log = run_to_end(_train_args(work, '--resume'), tmp_path)
    assert 'restored the RNG states' in log
    assert 'resumed epoch: 1, iter: 4' in log
    after = {step: v for step, v in logged_losses(work).items() if step > ITERS_PER_EPOCH}
    assert sorted(after) == list(range(ITERS_PER_EPOCH + 1, total + 1))
    # Exact: the same arithmetic in the same order (deterministic settings, one process).
    for step, values in after.items():
        assert values == expected[step], (step, values, expected[step])
