"""The random number generators' state in checkpoints, and its restoration on resume.

mmengine's Runner saves no RNG state and reseeds on resume, so a resumed run draws other
augmentations, proposal samples and drop-path masks than the uninterrupted run would have.
:class:`~swin_dense.integrations.checkpoint_hook.AtomicCheckpointHook` stores every rank's state
in ``meta['rng_state']`` (:func:`gather_rng_states`); :class:`ResumeRandomStateHook` puts it back
when the Runner resumes, so that with ``randomness=dict(seed=..., deterministic=True)`` a resumed
run repeats the uninterrupted one.

Exact repetition holds for epoch-based loops (checkpoints at epoch ends) with the data loaded in
the main process (``num_workers=0``) or by non-persistent workers: persistent workers keep their
own RNG streams across epochs, which no checkpoint holds. Iteration-based loops re-run the data
pipeline for the skipped batches after the state is restored, so their augmentations differ
after a resume.
"""
from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

if TYPE_CHECKING:
    from mmengine.runner import Runner

__all__ = ['RNG_KEY', 'ResumeRandomStateHook', 'capture_rng_state', 'gather_rng_states',
           'restore_rng_state']

#: Where the states live in a checkpoint's ``meta``.
RNG_KEY = 'rng_state'


def capture_rng_state() -> dict[str, Any]:
    """The torch (CPU and, when initialised, CUDA), numpy and Python RNG states of this process,
    as tensors and plain numbers (loadable with ``torch.load(weights_only=True)``)."""
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


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set this process's generators to ``state`` (the inverse of :func:`capture_rng_state`)."""
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'],
                         n['has_gauss'], n['gauss']))
    p = state['python']
    random.setstate((p['version'], tuple(int(v) for v in p['internal'].tolist()),
                     p['gauss_next']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def gather_rng_states() -> dict[str, Any]:
    """Every rank's state with the world size: ``dict(world_size=W, ranks=[state_0, ...])``.

    A collective in distributed runs: every rank must call it.
    """
    from mmengine.dist import all_gather_object, get_world_size
    world = get_world_size()
    state = capture_rng_state()
    states = all_gather_object(state) if world > 1 else [state]
    return dict(world_size=world, ranks=states)


@HOOKS.register_module()
class ResumeRandomStateHook(Hook):
    """Restores the RNG states saved in ``meta['rng_state']`` when the Runner resumes.

    Select it with ``custom_hooks = [dict(type='ResumeRandomStateHook')]`` (tools/train.py adds
    it). The states are read when the checkpoint is loaded for a resume (``after_load_checkpoint``)
    and set in ``before_train``, after every other hook, just before the loop continues: the
    point at which the uninterrupted run saved them (the checkpoint hook runs last after an
    epoch). ``load_from`` without resume (fine-tuning) keeps the fresh seed; a world size other
    than the saved one keeps mmengine's behaviour (reseeding only), with a warning.
    """

    priority = 'LOWEST'

    def __init__(self) -> None:
        self._pending: Optional[dict] = None

    def after_load_checkpoint(self, runner: Runner, checkpoint: dict) -> None:
        if not getattr(runner, '_resume', False):
            return
        saved = (checkpoint.get('meta') or {}).get(RNG_KEY)
        if saved is None:
            print_log('the checkpoint has no RNG state (it was not written by '
                      'AtomicCheckpointHook): the resumed run draws new random numbers',
                      logger='current', level=logging.WARNING)
            return
        self._pending = saved

    def before_train(self, runner: Runner) -> None:
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
