"""Crash-safe checkpoints and exact resume for training through mmengine's Runner.

What mmengine 0.10.7 does on its own (``CheckpointHook._save_checkpoint_with_step``,
``Runner.save_checkpoint``, ``LocalBackend.put``):

- the checkpoint is written straight to its final name (``open(path, 'wb')``): a crash during the
  write leaves a truncated ``epoch_N.pth`` under the name ``--resume`` reads;
- the ``last_checkpoint`` pointer is rewritten in place (truncated, then written);
- with ``max_keep_ckpts`` the oldest checkpoint is deleted *before* the new one is written: with
  ``max_keep_ckpts=1`` a crash during the save leaves no complete checkpoint, and the pointer
  names the deleted file;
- the random number generators are not saved: a resumed run draws other augmentations, proposal
  samples and drop-path masks than the uninterrupted run would have.

:func:`install` (called by ``swin_dense.launch.train``, i.e. tools/train.py) changes that:

- local checkpoints are written to a temporary file in the same directory (``.NAME.XXXX.tmp``),
  flushed, fsynced and renamed onto the final name with ``os.replace`` (atomic), and the directory
  is fsynced: a checkpoint file is complete or absent, never partial;
- the ``last_checkpoint`` pointer is replaced the same way, after its checkpoint is complete;
- outdated checkpoints are deleted only after that; temporaries left by a crash are removed at
  the next save;
- each checkpoint's ``meta['rng_state']`` holds the torch, numpy and Python RNG states; on resume
  they are restored just before training continues (:class:`ResumeRandomStateHook`), so that with
  ``randomness=dict(seed=..., deterministic=True)`` a resumed run repeats the uninterrupted one.

Exact repetition after a resume holds for epoch-based loops (checkpoints at epoch ends) with the
data loaded in the main process (``num_workers=0``) or by non-persistent workers: persistent
workers keep their own RNG streams across epochs, which no checkpoint holds. Iteration-based loops
get the atomic writes, but mmengine re-runs the data pipeline for the skipped batches after the
RNG is restored, so their augmentations differ after a resume. In distributed runs every rank's
state is saved (gathered at the save) and each rank gets its own back when resumed with the same
number of processes.
"""
from __future__ import annotations

import glob
import logging
import os
import os.path as osp
import random
import tempfile
from typing import Any, Callable, Optional

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log

__all__ = ['ResumeRandomStateHook', 'atomic_save_checkpoint', 'atomic_write', 'capture_rng_state',
           'install', 'install_atomic_checkpoints', 'remove_stale_temporaries',
           'restore_rng_state']

TMP_SUFFIX = '.tmp'
RNG_KEY = 'rng_state'


# =====================================================================================
# Atomic files
# =====================================================================================
def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Write ``path`` all or nothing: ``write(f)`` fills a temporary file in the same directory,
    which is fsynced and renamed onto ``path``. On any error (or a crash) ``path`` keeps its
    previous content; the temporary is removed on errors and by :func:`remove_stale_temporaries`
    after a crash."""
    path = os.fspath(path)
    directory = osp.dirname(osp.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.', suffix=TMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def remove_stale_temporaries(directory: str) -> list[str]:
    """Delete the temporaries :func:`atomic_write` leaves when the process is killed mid-write."""
    removed = []
    for tmp in glob.glob(osp.join(glob.escape(directory), f'.*{TMP_SUFFIX}')):
        name = osp.basename(tmp)[1:-len(TMP_SUFFIX)].rsplit('.', 1)[0]  # .NAME.XXXX.tmp -> NAME
        if name.endswith('.pth') or name == 'last_checkpoint':
            try:
                os.unlink(tmp)
                removed.append(tmp)
            except OSError:  # pragma: no cover - already gone
                pass
    return removed


def _is_local(filename: str, backend_args: Optional[dict]) -> bool:
    from mmengine.fileio import LocalBackend, get_file_backend
    if '://' in str(filename):
        return False
    return isinstance(get_file_backend(filename, backend_args=backend_args), LocalBackend)


_ORIGINAL_SAVE: Optional[Callable] = None  # mmengine's save_checkpoint, set by install
_ORIGINAL_HOOK_SAVE: Optional[Callable] = None  # mmengine's CheckpointHook._save_checkpoint_with_step


def atomic_save_checkpoint(checkpoint: dict, filename: str, file_client_args: Optional[dict] = None,
                           backend_args: Optional[dict] = None) -> None:
    """``mmengine.runner.save_checkpoint`` with an atomic write for local files (remote backends,
    e.g. ``s3://`` or ``pavi://``, are passed to mmengine's own function)."""
    if file_client_args is None and _is_local(filename, backend_args):
        atomic_write(filename, lambda f: torch.save(checkpoint, f))
        return
    original = _ORIGINAL_SAVE
    if original is None:  # pragma: no cover - install() sets it
        from mmengine.runner.checkpoint import save_checkpoint as original
    original(checkpoint, filename, file_client_args=file_client_args, backend_args=backend_args)


# =====================================================================================
# Random state
# =====================================================================================
def capture_rng_state() -> dict:
    """The torch (CPU and CUDA), numpy and Python RNG states, as plain tensors / ints (loadable
    with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = dict(
        torch=torch.get_rng_state(),
        numpy=dict(kind=str(kind), keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                   has_gauss=int(has_gauss), gauss=float(gauss)),
        python=dict(version=int(version), internal=torch.tensor(internal, dtype=torch.int64),
                    gauss_next=gauss_next))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'],
                         n['has_gauss'], n['gauss']))
    p = state['python']
    random.setstate((p['version'], tuple(int(v) for v in p['internal'].tolist()), p['gauss_next']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _gather_rng_states() -> dict:
    """Every rank's RNG state (collective: all ranks must call it), with the world size."""
    from mmengine.dist import all_gather_object, get_world_size
    world = get_world_size()
    state = capture_rng_state()
    states = all_gather_object(state) if world > 1 else [state]
    return dict(world_size=world, ranks=states)


class ResumeRandomStateHook(Hook):
    """Restores the RNG states saved in ``meta['rng_state']`` when the Runner resumes.

    The states are read when the checkpoint is loaded for a resume (``after_load_checkpoint``),
    and set in ``before_train``, after every other hook, just before the loop continues: the
    point at which the uninterrupted run saved them (the checkpoint hook runs last after an
    epoch). A world size other than the saved one keeps mmengine's behaviour (reseeding only).
    """

    priority = 'LOWEST'

    def __init__(self) -> None:
        self._pending: Optional[dict] = None

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not getattr(runner, '_resume', False):
            return  # load_from (fine-tuning): keep the fresh seed
        saved = (checkpoint.get('meta') or {}).get(RNG_KEY)
        if saved is None:
            print_log('the checkpoint has no RNG state (not written by swin_dense tools): the '
                      'resumed run draws new random numbers', logger='current',
                      level=logging.WARNING)
            return
        self._pending = saved

    def before_train(self, runner) -> None:
        if self._pending is None:
            return
        from mmengine.dist import get_rank, get_world_size
        saved, self._pending = self._pending, None
        if saved.get('world_size') != get_world_size():
            print_log(f"RNG state saved with {saved.get('world_size')} processes, resuming with "
                      f'{get_world_size()}: not restored', logger='current',
                      level=logging.WARNING)
            return
        restore_rng_state(saved['ranks'][get_rank()])
        print_log('restored the RNG states (torch, numpy, random) saved with the checkpoint',
                  logger='current')


# =====================================================================================
# The CheckpointHook save, reordered
# =====================================================================================
def _remove_path(backend, path: str) -> None:
    if backend.isfile(path):
        backend.remove(path)
    elif backend.isdir(path):  # checkpoints saved by deepspeed are directories
        backend.rmtree(path)


def _save_checkpoint_with_step(self, runner, step, meta):
    """``CheckpointHook._save_checkpoint_with_step`` of mmengine 0.10.7, crash-safe.

    Same bookkeeping (``keep_ckpt_ids``, ``last_ckpt`` in the message hub, what is saved and by
    which rank); different order: RNG states gathered into ``meta``, checkpoint written
    atomically, then the ``last_checkpoint`` pointer replaced atomically, then outdated
    checkpoints deleted.
    """
    from mmengine.dist import is_main_process

    outdated = []
    if self.max_keep_ckpts > 0:
        if len(self.keep_ckpt_ids) > 0 and self.keep_ckpt_ids[-1] == step:
            pass
        else:
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                outdated.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))

    ckpt_filename = self.filename_tmpl.format(step)
    self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
    runner.message_hub.update_info('last_ckpt', self.last_ckpt)

    meta = dict(meta or {})
    meta[RNG_KEY] = _gather_rng_states()  # collective: every rank runs this method
    if is_main_process():
        remove_stale_temporaries(runner.work_dir)  # the pointer's
        if _is_local(self.out_dir, self.backend_args) and self.out_dir != runner.work_dir:
            remove_stale_temporaries(self.out_dir)
    runner.save_checkpoint(
        self.out_dir,
        ckpt_filename,
        self.file_client_args,
        save_optimizer=self.save_optimizer,
        save_param_scheduler=self.save_param_scheduler,
        meta=meta,
        by_epoch=self.by_epoch,
        backend_args=self.backend_args,
        **self.args)

    if not is_main_process():
        return
    text = str(self.last_ckpt)
    atomic_write(osp.join(runner.work_dir, 'last_checkpoint'), lambda f: f.write(text.encode()))
    for old in outdated:
        path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old))
        if path != self.last_ckpt:
            _remove_path(self.file_backend, path)


def install_atomic_checkpoints() -> bool:
    """Patch mmengine (process-wide, idempotent) for atomic checkpoint saves; True when done.

    Patched: the ``save_checkpoint`` that ``Runner.save_checkpoint`` and ``CheckpointHook`` call,
    and ``CheckpointHook._save_checkpoint_with_step`` (checked against mmengine 0.10.x; another
    version keeps its own hook and gets only the atomic file write).
    """
    global _ORIGINAL_SAVE, _ORIGINAL_HOOK_SAVE
    import mmengine
    import mmengine.hooks.checkpoint_hook as hook_module
    import mmengine.runner as runner_pkg
    import mmengine.runner.checkpoint as checkpoint_module
    import mmengine.runner.runner as runner_module

    if getattr(runner_module.save_checkpoint, '_swin_dense_atomic', False):
        return True
    if _ORIGINAL_SAVE is None:
        _ORIGINAL_SAVE = checkpoint_module.save_checkpoint
    atomic_save_checkpoint._swin_dense_atomic = True  # type: ignore[attr-defined]
    for module in (runner_module, hook_module, runner_pkg, checkpoint_module):
        if hasattr(module, 'save_checkpoint'):
            module.save_checkpoint = atomic_save_checkpoint
    cls = hook_module.CheckpointHook
    if mmengine.__version__.startswith('0.10.') and hasattr(cls, '_save_checkpoint_with_step'):
        if _ORIGINAL_HOOK_SAVE is None:
            _ORIGINAL_HOOK_SAVE = cls._save_checkpoint_with_step
        cls._save_checkpoint_with_step = _save_checkpoint_with_step
        return True
    print_log(f'mmengine {mmengine.__version__}: CheckpointHook left as it is (atomic file writes '
              'only; the pointer and the deletion order are those of mmengine)',
              logger='current', level=logging.WARNING)
    return False


def install(runner) -> None:
    """Make ``runner``'s checkpoints crash-safe and its resume exact (see the module docstring)."""
    install_atomic_checkpoints()
    if not any(isinstance(h, ResumeRandomStateHook) for h in runner.hooks):
        runner.register_hook(ResumeRandomStateHook())
