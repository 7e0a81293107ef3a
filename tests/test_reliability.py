"""Reliability: bad input fails early and clearly; crash-safe checkpoints; exact resume.

Fast: one table of every bad input, argument and checkpoint (each error a ValueError, TypeError or
FileNotFoundError raised by swin_dense, never a RuntimeError from inside torch); unusual inputs
that must work (channels_last, non-contiguous, float64 model, windows larger than the map, 2x2
images and empty batches in training); atomic checkpoint saves under mmengine's Runner (a crash
mid-save, simulated in-process and by SIGKILL of a writer, keeps the previous checkpoint and the
``last_checkpoint`` pointer valid); RNG state saved with the checkpoint so that a resumed Runner
repeats the uninterrupted losses exactly, and a control showing mmengine alone does not.

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

from swin_dense import SwinBackbone
from swin_dense import resume as rs
from swin_dense.checkpoint import load_pretrained, register_mmengine_safe_globals
from tool_runs import (DET_DEMO, DETERMINISTIC, TRAIN, logged_losses, run_to_end,
                       tiny_detector, tool_env)

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7)


def small(**kwargs) -> SwinBackbone:
    torch.manual_seed(0)
    model = SwinBackbone(**{**SMALL, **kwargs})
    model.init_weights()
    return model


# =====================================================================================
# Bad input: one table, one property
# =====================================================================================
def _checkpoint_cases(tmp: Path) -> list:
    good = tmp / 'small.pth'
    torch.save({'state_dict': small().state_dict()}, good)
    cut = tmp / 'cut.pth'
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp / 'empty.pth'
    empty.write_bytes(b'')
    resnet = tmp / 'resnet.pth'
    torch.save({'conv1.weight': torch.zeros(64, 3, 7, 7), 'fc.weight': torch.zeros(10, 64)},
               resnet)
    deeper = tmp / 'deeper.pth'
    torch.save(small(depths=(2, 2, 4, 2)).state_dict(), deeper)
    wider = tmp / 'wider.pth'
    torch.save(small(embed_dims=32).state_dict(), wider)

    def load(path):
        return lambda: load_pretrained(small(), path)

    def init(path):
        return lambda: small(init_cfg=dict(type='Pretrained', checkpoint=str(path))).init_weights()

    return [
        ('missing checkpoint', load(tmp / 'nowhere.pth'), FileNotFoundError, 'nowhere.pth'),
        ('missing via init_cfg', init(tmp / 'nowhere.pth'), FileNotFoundError, 'nowhere.pth'),
        ('directory', load(tmp), ValueError, 'directory'),
        ('truncated', load(cut), ValueError, 'truncated'),
        ('empty file', load(empty), ValueError, 'empty'),
        ('non-Swin', load(resnet), ValueError, 'not a Swin'),
        ('deeper Swin', load(deeper), ValueError, 'depths'),
        ('wider Swin', load(wider), ValueError, 'embed_dims=32'),
    ]


def _cases(tmp: Path) -> list:
    model = small().eval()

    def fwd(x, m=model):
        return lambda: m(x)

    def build(**kwargs):
        return lambda: SwinBackbone(**{**SMALL, **kwargs})

    return [
        # tensors
        ('3-d input', fwd(torch.randn(3, 32, 32)), ValueError, '4-d input'),
        ('5-d input', fwd(torch.randn(1, 1, 3, 32, 32)), ValueError, '4-d input'),
        ('4 channels', fwd(torch.randn(1, 4, 32, 32)), ValueError, 'in_channels=3'),
        ('NHWC layout', fwd(torch.randn(1, 32, 32, 3)), ValueError, 'NCHW'),
        ('uint8 image', fwd(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), TypeError, 'floating'),
        ('bool image', fwd(torch.ones(1, 3, 32, 32, dtype=torch.bool)), TypeError, 'floating'),
        ('float64 into fp32', fwd(torch.randn(1, 3, 32, 32, dtype=torch.float64)), TypeError,
         r'float64.*float32.*autocast'),
        ('fp16 into fp32', fwd(torch.randn(1, 3, 32, 32).half()), TypeError, 'float16'),
        ('fp32 into fp16 model', fwd(torch.randn(1, 3, 32, 32), small().half()), TypeError,
         'float32 but SwinBackbone is torch.float16'),
        ('other device', fwd(torch.empty(1, 3, 32, 32, device='meta')), ValueError, 'meta'),
        ('numpy array', fwd(np.zeros((1, 3, 32, 32), np.float32)), TypeError, 'torch.Tensor'),
        ('0-height image', fwd(torch.randn(1, 3, 0, 32)), ValueError, 'empty image'),
        # constructor
        ('window 0', build(window_size=0), ValueError, 'window_size'),
        ('window 7.5', build(window_size=7.5), ValueError, 'window_size'),
        ('depths vs heads', build(depths=(2, 2), num_heads=(1, 2, 4)), ValueError, 'same length'),
        ('depths int', build(depths=2), TypeError, 'depths must be a list'),
        ('depths None', build(depths=None), TypeError, 'depths must be a list'),
        ('zero depth', build(depths=(2, 0, 2, 2)), ValueError, r'depths\[1\]'),
        ('embed_dims % heads', build(embed_dims=20, num_heads=(3, 6, 12, 24)), ValueError,
         'not divisible by num_heads'),
        ('out_indices int', build(out_indices=3), TypeError, 'out_indices must be a list'),
        ('out_indices 4', build(out_indices=(4,)), ValueError, 'out_indices'),
        ('out_indices empty', build(out_indices=()), ValueError, 'out_indices'),
        ('frozen_stages 5', build(frozen_stages=5), ValueError, 'frozen_stages'),
        ('frozen_stages None', build(frozen_stages=None), ValueError, 'frozen_stages'),
        ('drop_path 1.5', build(drop_path_rate=1.5), ValueError, 'drop_path_rate'),
        ('attn_drop -0.1', build(attn_drop_rate=-0.1), ValueError, 'attn_drop_rate'),
        ('mlp_ratio str', build(mlp_ratio='4'), TypeError, 'mlp_ratio'),
        ('norm_cfg None', build(norm_cfg=None), TypeError, 'norm_cfg'),
        ('norm_cfg BN', build(norm_cfg=dict(type='BN')), ValueError, 'norm_cfg'),
        ('act_cfg None', build(act_cfg=None), TypeError, 'act_cfg'),
        ('abs pos embed < patch', build(use_abs_pos_embed=True, pretrain_img_size=2), ValueError,
         'pretrain_img_size'),
        ('arch unknown', lambda: SwinBackbone(arch='huge'), ValueError, 'arch'),
        ('arch conflict', lambda: SwinBackbone(arch='tiny', embed_dims=128), ValueError,
         'embed_dims'),
        ('init_cfg kind', lambda: small(init_cfg=dict(type='Kaiming')).init_weights(), ValueError,
         'init_cfg'),
        ('unknown argument', build(window=7), TypeError, 'window'),
    ] + _checkpoint_cases(tmp)


def test_every_bad_input_is_a_clear_value_type_or_file_error(tmp_path):
    """Each case raises the stated type with a message naming the problem, and none is (or
    derives from) RuntimeError: the errors come from swin_dense's checks, not from torch."""
    failures = []
    for name, call, error, match in _cases(tmp_path):
        try:
            call()
        except Exception as e:  # noqa: BLE001 - classified below
            import re
            if isinstance(e, RuntimeError) or not isinstance(e, error) \
                    or not re.search(match, str(e)):
                failures.append(f'{name}: {type(e).__name__}: {e}')
        else:
            failures.append(f'{name}: no error')
    assert not failures, '\n'.join(failures)


def test_truncated_checkpoint_for_test_or_resume_is_a_clear_error(tmp_path):
    """tools/test.py CKPT and tools/train.py --resume CKPT check the file before building: a
    truncated torch zip archive is a ValueError naming it (mmengine would raise a RuntimeError
    from torch's zip reader after building everything)."""
    from swin_dense import launch
    good = tmp_path / 'epoch_1.pth'
    torch.save({'state_dict': small().state_dict()}, good)
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    cfg = launch.load_config(str(REPO / 'configs' / 'mask_rcnn' / 'swin_t_demo.py'))
    with pytest.raises(ValueError, match='truncated.*cut.pth') as info:
        launch.apply_test_options(cfg.copy(), 'mmdet', str(cut))
    assert not isinstance(info.value, RuntimeError)
    with pytest.raises(ValueError, match='resume.*truncated'):
        launch.apply_train_options(cfg.copy(), 'mmdet', resume=str(cut))
    launch.apply_train_options(cfg.copy(), 'mmdet', resume=str(good))  # a complete file is fine


# =====================================================================================
# Unusual inputs that must work
# =====================================================================================
def test_layouts_and_float64_give_the_same_features():
    model = small().eval()
    x = torch.randn(2, 3, 37, 45)
    with torch.no_grad():
        ref = model(x)
        for variant in (x.to(memory_format=torch.channels_last),
                        x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),  # strided view
                        x.transpose(2, 3).contiguous().transpose(2, 3)):
            assert not variant.is_contiguous()
            for a, b in zip(model(variant), ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        double = small().double().eval()(x.double())
    for a, b in zip(double, ref):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a.float(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('window_size', [17, 20])
def test_window_larger_than_every_map(window_size):
    """A 64x64 image gives token maps 16..2: a window larger than all of them is one padded
    window per map; the outputs are finite and have the usual shapes."""
    model = small(window_size=window_size).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert all(torch.isfinite(o).all() for o in outs)


def test_tiny_images_and_empty_batches_train(with_cp=True):
    """2x2 and 1x1 images, and an empty batch, in training mode: forward, backward, and (for the
    empty batch) gradients that exist and are zero, so that an optimizer step and DDP's
    gradient sync see every parameter."""
    model = small(with_cp=with_cp, drop_path_rate=0.1, frozen_stages=1).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for size in ((2, 2), (1, 1), (3, 5)):
        model.zero_grad(set_to_none=True)
        outs = model(torch.randn(2, 3, *size))
        sum(o.pow(2).mean() for o in outs).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    model.zero_grad(set_to_none=True)
    x = torch.randn(0, 3, 64, 48, requires_grad=True)
    outs = model(x)
    assert [tuple(o.shape) for o in outs] == [(0, 16, 16, 12), (0, 32, 8, 6), (0, 64, 4, 3),
                                             (0, 128, 2, 2)]
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None and not p.grad.any() for p in trainable)
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():  # inference: plain empty tensors, no graph
        assert all(o.grad_fn is None for o in model.eval()(torch.randn(0, 3, 8, 8)))


# =====================================================================================
# Atomic checkpoints and exact resume under mmengine's Runner (a toy model: fast)
# =====================================================================================
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
                max_keep_ckpts: int = 1, crash_after_epoch: int = 0):
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

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
    runner = Runner(
        model=model, work_dir=str(work_dir), experiment_name=f'toy_{os.getpid()}_{_RUN[0]}',
        train_dataloader=dict(dataset=ToyData(), sampler=dict(type='DefaultSampler', shuffle=True),
                              batch_size=2, num_workers=0, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9)),
        param_scheduler=dict(type='MultiStepLR', milestones=[2], by_epoch=True),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1,
                                           max_keep_ckpts=max_keep_ckpts),
                           logger=dict(type='LoggerHook', interval=100)),
        custom_hooks=[Record(), Crash()], randomness=dict(seed=0), resume=resume,
        default_scope='mmengine', log_level='WARNING')
    return runner, losses


@pytest.fixture
def patched():
    """install_atomic_checkpoints() applied (it stays for the session, as in the tools)."""
    register_mmengine_safe_globals()  # what launch.setup_toolkit does for resume
    assert rs.install_atomic_checkpoints()
    yield


@pytest.fixture
def unpatched(monkeypatch):
    """mmengine's own checkpoint saving, for the control experiments."""
    import mmengine.hooks.checkpoint_hook as hook_module
    import mmengine.runner.runner as runner_module
    register_mmengine_safe_globals()
    rs.install_atomic_checkpoints()  # so that the originals are known
    monkeypatch.setattr(runner_module, 'save_checkpoint', rs._ORIGINAL_SAVE)
    monkeypatch.setattr(hook_module.CheckpointHook, '_save_checkpoint_with_step',
                        rs._ORIGINAL_HOOK_SAVE)
    yield


def _crash_in_torch_save(monkeypatch, nth: int) -> None:
    """The nth torch.save writes half a checkpoint into its file, then the process 'dies'
    (the patched path: torch.save writes into the temporary file)."""
    real_save = torch.save
    calls = [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] < nth:
            return real_save(obj, f, *args, **kwargs)
        import io
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        f.flush()
        raise _SimulatedCrash('killed mid-save')

    monkeypatch.setattr(torch, 'save', save)


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


def test_crash_mid_save_keeps_the_previous_checkpoint_and_pointer(tmp_path, patched):
    runner, _ = _toy_runner(tmp_path, max_epochs=3, max_keep_ckpts=1)
    with pytest.MonkeyPatch.context() as mp:
        _crash_in_torch_save(mp, nth=2)  # epoch 1 saved, killed while saving epoch 2
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


def test_control_mmengine_alone_loses_the_checkpoint(tmp_path, unpatched):
    """What the patch prevents: mmengine 0.10.7 deletes epoch_1.pth before writing epoch_2.pth,
    straight to its final name; a crash then leaves only a truncated file, and the pointer
    names the deleted one."""
    runner, _ = _toy_runner(tmp_path, max_epochs=3, max_keep_ckpts=1)
    with pytest.MonkeyPatch.context() as mp:
        _crash_in_put(mp, nth=2)
        with pytest.raises(_SimulatedCrash):
            runner.train()
    assert not (tmp_path / 'epoch_1.pth').exists()
    assert (tmp_path / 'epoch_2.pth').exists() and not _complete(tmp_path / 'epoch_2.pth')
    assert (tmp_path / 'last_checkpoint').read_text().endswith('epoch_1.pth')


def test_save_order_checkpoint_then_pointer_then_deletion(tmp_path, patched, monkeypatch):
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


def test_sigkill_mid_write_leaves_the_old_file_and_a_temporary_that_is_cleaned(tmp_path):
    """A real kill: a child process writes a checkpoint atomically and is SIGKILLed halfway."""
    target = tmp_path / 'epoch_1.pth'
    torch.save({'old': torch.ones(3)}, target)
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from swin_dense.resume import atomic_write
        def write(f):
            f.write(b'x' * 1_000_000)
            f.flush()
            print('writing', flush=True)
            time.sleep(60)
        atomic_write({str(target)!r}, write)
    """)
    child = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == 'writing'
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert torch.equal(torch.load(target, weights_only=True)['old'], torch.ones(3))
    leftovers = list(tmp_path.glob('.epoch_1.pth.*.tmp'))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == 1_000_000
    (tmp_path / 'notes.tmp').write_text('not ours')
    assert rs.remove_stale_temporaries(str(tmp_path)) == [str(leftovers[0])]
    assert (tmp_path / 'notes.tmp').exists()


def test_rng_state_roundtrip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # a cached gaussian in numpy's state
    state = rs.capture_rng_state()
    expected = (torch.rand(3), np.random.randn(3), random.random())
    torch.save({'meta': {'rng_state': state}}, tmp_path / 'c.pth')
    loaded = torch.load(tmp_path / 'c.pth', weights_only=True)['meta']['rng_state']
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    rs.restore_rng_state(loaded)
    again = (torch.rand(3), np.random.randn(3), random.random())
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
    second, got = _toy_runner(tmp_path / 'split', resume=True)
    if not rng_hook:
        second._hooks = [h for h in second._hooks if not isinstance(h, rs.ResumeRandomStateHook)]
    second.train()
    assert sorted(got) == list(range(9, 17))
    return expected, got


def test_resumed_runner_repeats_the_uninterrupted_losses(tmp_path, patched):
    expected, got = _uninterrupted_and_resumed(tmp_path)
    assert got == {i: expected[i] for i in got}  # bit for bit


def test_control_without_the_rng_state_the_losses_differ(tmp_path, patched):
    """Why the RNG state is saved: mmengine's resume alone (the hook not registered; mmengine
    reseeds) continues with other dropout masks and augmentations."""
    expected, got = _uninterrupted_and_resumed(tmp_path, rng_hook=False)
    assert any(got[i] != expected[i] for i in got)


@pytest.fixture(autouse=True)
def _register_rng_hook(monkeypatch):
    """The toy runners get what tools/train.py gives the real ones: swin_dense.resume.install."""
    from mmengine.runner import Runner
    original = Runner.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.register_hook(rs.ResumeRandomStateHook())

    monkeypatch.setattr(Runner, '__init__', init)


# =====================================================================================
# Slow: SIGKILL a real demo training through tools/train.py, then --resume
# =====================================================================================
# The demo config, tiny and deterministic, keeping one checkpoint: about three minutes for the
# three runs on 2 CPU cores.
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
