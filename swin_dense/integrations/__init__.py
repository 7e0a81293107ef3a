"""mmengine extension points for training with swin_dense; importing this package registers them.

=========================  ===================  =================================================
registered name            registry             selected in a config by
=========================  ===================  =================================================
``AtomicCheckpointHook``   ``HOOKS``            ``default_hooks.checkpoint.type``
``ResumeRandomStateHook``  ``HOOKS``            ``custom_hooks = [dict(type=...)]``
``CPUAmpOptimWrapper``     ``OPTIM_WRAPPERS``   ``optim_wrapper.type``
``'atomic_local'``         file backends        ``backend_args=dict(backend='atomic_local')``
=========================  ===================  =================================================

tools/train.py selects the two hooks for every run and ``CPUAmpOptimWrapper`` for AMP training
without CUDA; a config read by other tools gets them with
``custom_imports = dict(imports=['swin_dense.integrations'])``. Nothing here changes mmengine's
or mmcv's own classes: the hooks and the wrapper act only where a config selects them (see
:mod:`.cpu_amp` for the one scoped replacement of mmcv's compiled functions).
Imports torch and mmengine (mmcv optionally), and from this package only ``swin_dense.fileio``.
"""
from .checkpoint_hook import ATOMIC_BACKEND, AtomicCheckpointHook, AtomicLocalBackend
from .cpu_amp import CPUAmpOptimWrapper, mmcv_ops_in_fp32, use_cpu_amp
from .rng_state import (RNG_KEY, ResumeRandomStateHook, capture_rng_state, gather_rng_states,
                        restore_rng_state)

__all__ = ['ATOMIC_BACKEND', 'AtomicCheckpointHook', 'AtomicLocalBackend', 'CPUAmpOptimWrapper',
           'RNG_KEY', 'ResumeRandomStateHook', 'capture_rng_state', 'gather_rng_states',
           'mmcv_ops_in_fp32', 'restore_rng_state', 'use_cpu_amp']
