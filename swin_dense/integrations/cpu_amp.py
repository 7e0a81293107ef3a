"""Mixed-precision training on machines without a GPU: the registered ``CPUAmpOptimWrapper``.

mmengine 0.10's ``AmpOptimWrapper`` (what ``--amp`` and the ``*_amp.py`` configs select) asserts
a CUDA/NPU/MLU/MUSA device in its constructor, so on a CPU-only machine the Runner fails to build.
:class:`CPUAmpOptimWrapper` is the same wrapper for the CPU: ``torch.autocast('cpu')`` around the
forward, the loss-scaler interface and checkpoint layout of ``AmpOptimWrapper`` (it subclasses it,
so ``isinstance`` checks elsewhere still hold).

- dtype ``bfloat16`` (the default on CPU, as mmengine's own ``autocast``): bf16 has the exponent
  range of fp32, so gradients cannot underflow and no loss scaling is done (the scaler is off).
- dtype ``float16``: autocast to fp16 with dynamic loss scaling (``torch.amp.GradScaler('cpu')``).

mmcv's compiled CPU ops (``nms``, ``roi_align``, ... in ``mmcv._ext``) have fp32 kernels only and
raise on the bf16/fp16 tensors autocast produces (on CUDA they have half kernels). The wrapper
runs its forward (``optim_context``) and its backward inside :func:`mmcv_ops_in_fp32`, under
which those functions take low-precision CPU tensors as fp32 copies. That context is the one
place this package replaces another package's functions: mmcv calls its compiled functions
through module attributes, with no hook in between, and torch's autocast has no registration
for functions outside torch's dispatcher. It is scoped to the wrapper's forward and backward,
and puts mmcv's own functions back on exit.

:func:`use_cpu_amp` rewrites a config's ``AmpOptimWrapper`` to this wrapper; the tools call it
for training on machines without CUDA (a GPU machine keeps ``AmpOptimWrapper``, fp16 + scaling).
"""
from __future__ import annotations

import functools
import logging
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union

import torch
from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

if TYPE_CHECKING:
    from mmengine.config import Config

__all__ = ['CPUAmpOptimWrapper', 'mmcv_ops_in_fp32', 'use_cpu_amp']

_DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16}
_LOW = (torch.float16, torch.bfloat16)


def _cpu_dtype(dtype: Union[None, str, torch.dtype]) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f'CPU mixed precision supports dtype {sorted(_DTYPES)}, '
                             f'got {dtype!r}')
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError('CPU mixed precision supports torch.bfloat16 and torch.float16, '
                         f'got {dtype}')
    return dtype


# =====================================================================================
# mmcv's compiled ops in fp32, while the wrapper runs
# =====================================================================================
def _is_low_cpu(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == 'cpu' and value.dtype in _LOW


def _fp32_on_cpu(fn: Callable) -> Callable:
    """``fn`` (a function of ``mmcv._ext``) with low-precision CPU tensors passed as fp32
    copies; results the function wrote into such an argument are copied back into it."""
    @functools.wraps(fn)
    def call_in_fp32(*args, **kwargs):
        if not any(_is_low_cpu(a) for a in (*args, *kwargs.values())):
            return fn(*args, **kwargs)
        pairs = []

        def up(value):
            if _is_low_cpu(value):
                pairs.append((value, value.float()))
                return pairs[-1][1]
            return value

        new_args = [up(a) for a in args]
        new_kwargs = {k: up(v) for k, v in kwargs.items()}
        with torch.autocast('cpu', enabled=False):
            result = fn(*new_args, **new_kwargs)
        with torch.no_grad():
            for original, copy in pairs:
                back = copy.to(original.dtype)
                if not torch.equal(back, original):  # an output argument: write the result
                    original.copy_(back)
        return result
    return call_in_fp32


_LOCK = threading.Lock()
_ACTIVE = [0]  # nesting depth of mmcv_ops_in_fp32
_ORIGINALS: dict[str, Callable] = {}


def _compiled_mmcv_functions():
    try:
        import mmcv._ext as ext
    except ImportError:  # mmcv without compiled ops (mmcv-lite) or no mmcv: nothing to do
        return None, []
    names = [name for name in dir(ext) if not name.startswith('_')
             and callable(getattr(ext, name)) and not isinstance(getattr(ext, name), type)]
    return ext, names


@contextmanager
def mmcv_ops_in_fp32() -> Iterator[bool]:
    """While active, mmcv's compiled functions take bf16/fp16 CPU tensors (computed in fp32).

    Yields False when mmcv has no compiled ops. Nested and repeated entries are fine; mmcv's
    own functions are back once the outermost context exits, also on errors.
    """
    ext, names = _compiled_mmcv_functions()
    if ext is None:
        yield False
        return
    with _LOCK:
        if _ACTIVE[0] == 0:
            for name in names:
                _ORIGINALS[name] = getattr(ext, name)
                setattr(ext, name, _fp32_on_cpu(_ORIGINALS[name]))
        _ACTIVE[0] += 1
    try:
        yield True
    finally:
        with _LOCK:
            _ACTIVE[0] -= 1
            if _ACTIVE[0] == 0:
                for name, fn in _ORIGINALS.items():
                    setattr(ext, name, fn)
                _ORIGINALS.clear()


# =====================================================================================
# The optim wrapper
# =====================================================================================
@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(AmpOptimWrapper):
    """``AmpOptimWrapper`` for the CPU: bf16 autocast by default, fp16 with loss scaling.

    Select it with ``optim_wrapper=dict(type='CPUAmpOptimWrapper', dtype='bfloat16', ...)``.

    Args:
        loss_scale: as ``AmpOptimWrapper`` (``'dynamic'``, a float, or GradScaler kwargs); used
            with ``dtype='float16'`` only.
        dtype: ``'bfloat16'`` (default) or ``'float16'``.
        use_fsdp: accepted for compatibility; must be False.
        **kwargs: passed to ``OptimWrapper`` (optimizer, clip_grad, accumulative_counts...).
    """

    def __init__(self, loss_scale: Union[str, float, dict] = 'dynamic',
                 dtype: Union[None, str, torch.dtype] = None, use_fsdp: bool = False,
                 **kwargs: Any) -> None:
        if use_fsdp:
            raise ValueError('CPUAmpOptimWrapper does not support use_fsdp=True')
        OptimWrapper.__init__(self, **kwargs)  # AmpOptimWrapper.__init__ asserts a GPU
        self.cast_dtype = _cpu_dtype(dtype)
        self._scale_update_param = None
        scaled = self.cast_dtype == torch.float16
        if loss_scale == 'dynamic':
            scaler_kwargs: dict = {}
        elif isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool):
            self._scale_update_param = float(loss_scale)
            scaler_kwargs = dict(init_scale=float(loss_scale))
        elif isinstance(loss_scale, dict):
            scaler_kwargs = dict(loss_scale)
            scaled = scaled and scaler_kwargs.pop('enabled', True)
        else:
            raise TypeError('loss_scale must be "dynamic", a float or a dict of GradScaler '
                            f'arguments, got {loss_scale!r}')
        self.loss_scaler = torch.amp.GradScaler('cpu', enabled=scaled, **scaler_kwargs)

    def state_dict(self) -> dict:
        """As ``AmpOptimWrapper``; without ``loss_scaler`` when scaling is off (bf16), so that
        the checkpoint also resumes under ``AmpOptimWrapper`` on a GPU (a disabled scaler's
        empty state would not load there)."""
        state = super().state_dict()
        if not self.loss_scaler.is_enabled():
            state.pop('loss_scaler', None)
        return state

    @contextmanager
    def optim_context(self, model: torch.nn.Module) -> Iterator[None]:
        """``OptimWrapper``'s gradient-accumulation context, ``torch.autocast('cpu')`` and
        :func:`mmcv_ops_in_fp32`: the forward of a training step."""
        with OptimWrapper.optim_context(self, model), \
                torch.autocast('cpu', dtype=self.cast_dtype), mmcv_ops_in_fp32():
            yield

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``AmpOptimWrapper.backward`` (scaled when fp16) with :func:`mmcv_ops_in_fp32`: the
        backward of mmcv's ops meets the low-precision tensors their forward saw."""
        with mmcv_ops_in_fp32():
            super().backward(loss, **kwargs)


def use_cpu_amp(cfg: Config) -> Optional[str]:
    """Turn the config's ``AmpOptimWrapper`` into :class:`CPUAmpOptimWrapper` (in place).

    Returns the message logged, or None when the config does not use ``AmpOptimWrapper``.
    """
    optim = cfg.get('optim_wrapper')
    if not isinstance(optim, dict) or optim.get('type') != 'AmpOptimWrapper':
        return None
    dtype = _cpu_dtype(optim.get('dtype'))
    optim['type'] = 'CPUAmpOptimWrapper'
    optim['dtype'] = 'bfloat16' if dtype == torch.bfloat16 else 'float16'
    how = ('bfloat16 autocast, no loss scaling (bf16 has the range of fp32)'
           if dtype == torch.bfloat16 else 'float16 autocast with dynamic loss scaling')
    hint = "; optim_wrapper.dtype='float16' selects fp16" if dtype == torch.bfloat16 else ''
    message = ('mixed precision without CUDA: AmpOptimWrapper needs a GPU, training with '
               f'CPUAmpOptimWrapper instead: {how}{hint}')
    print_log(message, logger='current', level=logging.WARNING)
    return message
