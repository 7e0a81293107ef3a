"""Checkpoints that are complete or absent: a registered ``CheckpointHook`` subclass.

What mmengine 0.10's ``CheckpointHook`` does on its own:

- the checkpoint is written straight to its final name (``open(path, 'wb')``): a crash during
  the write leaves a truncated ``epoch_N.pth`` under the name ``--resume`` reads;
- the ``last_checkpoint`` pointer is rewritten in place (truncated, then written);
- with ``max_keep_ckpts`` the oldest checkpoint is deleted *before* the new one is written: with
  ``max_keep_ckpts=1`` a crash during the save leaves no complete checkpoint, and the pointer
  names the deleted file;
- the random number generators are not saved.

:class:`AtomicCheckpointHook` (``default_hooks.checkpoint.type='AtomicCheckpointHook'``, which
tools/train.py selects) keeps every option of ``CheckpointHook`` and changes that:

- local files go through the file backend ``'atomic_local'`` (:class:`AtomicLocalBackend`):
  written beside their final name, made durable and renamed onto it
  (:func:`swin_dense.fileio.atomic_write`), so a checkpoint is complete or absent;
- the ``last_checkpoint`` pointer is replaced the same way, after its checkpoint is complete;
- outdated checkpoints are deleted only after that; temporaries left by a killed process are
  removed before the next save;
- ``meta['rng_state']`` holds every rank's RNG states
  (:func:`~swin_dense.integrations.rng_state.gather_rng_states`), which
  :class:`~swin_dense.integrations.rng_state.ResumeRandomStateHook` restores on resume.

An ``out_dir`` on remote storage (``s3://...``) or an explicit ``backend_args`` keeps mmengine's
backend for the checkpoint files. The order of the steps lives in mmengine's private
``CheckpointHook._save_checkpoint_with_step``, which this subclass overrides: mmengine has no
public hook between "decide the file name" and "write it" (checked against mmengine 0.10.x).
"""
from __future__ import annotations

import logging
import os.path as osp
import re
from typing import TYPE_CHECKING, Any, Optional

from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend, get_file_backend, register_backend
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

from ..fileio import atomic_write, remove_stale_temporaries
from .rng_state import RNG_KEY, gather_rng_states

if TYPE_CHECKING:
    from mmengine.runner import Runner

__all__ = ['ATOMIC_BACKEND', 'AtomicCheckpointHook', 'AtomicLocalBackend']

#: The name of :class:`AtomicLocalBackend` in mmengine's file-backend registry.
ATOMIC_BACKEND = 'atomic_local'
POINTER = 'last_checkpoint'


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, 'wb') as f:
        f.write(data)


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend whose writes are all or nothing.

    ``put`` / ``put_text`` fill a temporary file beside ``filepath`` and rename it onto it
    (:func:`swin_dense.fileio.atomic_write`); reading, listing and removing are
    ``LocalBackend``'s. Select it with ``backend_args=dict(backend='atomic_local')``.
    """

    def put(self, obj: bytes, filepath) -> None:
        atomic_write(filepath, lambda tmp: _write_bytes(tmp, obj))

    def put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
        self.put(obj.encode(encoding), filepath)


# force: re-importing this module (e.g. importlib.reload) registers the same name again
register_backend(ATOMIC_BACKEND, AtomicLocalBackend, force=True)


def _is_local(path: str) -> bool:
    return isinstance(get_file_backend(path), LocalBackend)


def _remove_path(backend, path: str) -> None:
    if backend.isfile(path):
        backend.remove(path)
    elif backend.isdir(path):  # checkpoints saved by deepspeed are directories
        backend.rmtree(path)


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` with crash-safe saves and the RNG states (see the module docstring).

    Args:
        *args, **kwargs: those of mmengine's ``CheckpointHook`` (interval, by_epoch,
            max_keep_ckpts, out_dir, save_best, ...).
        save_rng_state: store every rank's RNG states in ``meta['rng_state']`` (default True).
    """

    def __init__(self, *args: Any, save_rng_state: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.save_rng_state = save_rng_state
        # the user chose no storage: local checkpoints may use the atomic backend
        self._choose_backend = self.backend_args is None and self.file_client_args is None
        if not callable(getattr(CheckpointHook, '_save_checkpoint_with_step', None)):
            print_log('this mmengine has no CheckpointHook._save_checkpoint_with_step: '
                      'AtomicCheckpointHook keeps atomic file writes only (no RNG state, '
                      "mmengine's order of pointer and deletions)", logger='current',
                      level=logging.WARNING)

    def before_train(self, runner: Runner) -> None:
        out_dir = runner.work_dir if self.out_dir is None else self.out_dir
        if self._choose_backend and _is_local(out_dir):
            self.backend_args = dict(backend=ATOMIC_BACKEND)
        super().before_train(runner)

    def _is_checkpoint_name(self, name: str) -> bool:
        """Whether a temporary's destination ``name`` is one this hook writes."""
        numbered = re.escape(self.filename_tmpl).replace(r'\{\}', r'\d+')
        return (name == POINTER or name.endswith('.pth')
                or re.fullmatch(f'(best_.*)?{numbered}', name) is not None)

    def _remove_stale_temporaries(self, runner: Runner) -> None:
        remove_stale_temporaries(runner.work_dir, self._is_checkpoint_name)  # the pointer's
        if self.out_dir != runner.work_dir and _is_local(self.out_dir):
            remove_stale_temporaries(self.out_dir, self._is_checkpoint_name)

    def _save_checkpoint_with_step(self, runner: Runner, step: int,
                                   meta: Optional[dict]) -> None:
        """mmengine 0.10's bookkeeping (``keep_ckpt_ids``, ``last_ckpt`` in the message hub,
        what is saved and by which rank) in a crash-safe order: RNG states gathered into
        ``meta``, the checkpoint written, then the pointer replaced, then outdated checkpoints
        deleted."""
        outdated = []
        if self.max_keep_ckpts > 0:
            # _save_checkpoint and _save_best_checkpoint may both save the same step
            if not (len(self.keep_ckpt_ids) > 0 and self.keep_ckpt_ids[-1] == step):
                if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                    outdated.append(self.keep_ckpt_ids.popleft())
                self.keep_ckpt_ids.append(step)
                runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))

        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)

        meta = dict(meta or {})
        if self.save_rng_state:
            meta[RNG_KEY] = gather_rng_states()  # a collective: every rank runs this method
        if is_main_process():
            self._remove_stale_temporaries(runner)
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
        atomic_write(osp.join(runner.work_dir, POINTER),
                     lambda tmp: _write_bytes(tmp, text.encode()))
        for old in outdated:
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old))
            if path != self.last_ckpt:
                _remove_path(self.file_backend, path)
