"""Mixed-precision training on machines without a GPU.

mmengine 0.10.7's ``AmpOptimWrapper`` (what ``--amp`` and the ``*_amp.py`` configs select) asserts
a CUDA/NPU/MLU/MUSA device in its constructor, so on a CPU-only machine the Runner fails to build.
:class:`CPUAmpOptimWrapper` is the same wrapper for the CPU: ``torch.autocast('cpu')`` around the
forward, the loss-scaler interface and checkpoint layout of ``AmpOptimWrapper`` (it subclasses it,
so ``isinstance`` checks elsewhere still hold).

- dtype ``bfloat16`` (the default on CPU, as mmengine's own ``autocast``): bf16 has the exponent
  range of fp32, so gradients cannot underflow and no loss scaling is done (the scaler is disabled).
- dtype ``float16``: autocast to fp16 with dynamic loss scaling (``torch.amp.GradScaler('cpu')``).

mmcv's compiled CPU ops (``nms``, ``roi_align``, ... of ``mmcv._ext``) have fp32 kernels only and
raise on bf16/fp16 tensors, which autocast produces (on CUDA they have half kernels). While a
:class:`CPUAmpOptimWrapper` exists, those functions run in fp32 on CPU: low-precision arguments are
copied to fp32 and results written into low-precision output arguments are copied back.

:func:`use_cpu_amp` rewrites a config's ``AmpOptimWrapper`` to it; ``swin_dense.launch`` calls it
for training on machines without CUDA (a GPU machine keeps ``AmpOptimWrapper``, fp16 + scaling).
"""
from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from typing import Optional, Union

import torch
from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

__all__ = ['CPUAmpOptimWrapper', 'mmcv_cpu_ops_in_fp32', 'use_cpu_amp']

_DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16}


def _cpu_dtype(dtype: Union[None, str, torch.dtype]) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f'CPU mixed precision supports dtype {sorted(_DTYPES)}, got {dtype!r}')
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f'CPU mixed precision supports torch.bfloat16 and torch.float16, '
                         f'got {dtype}')
    return dtype


_LOW = (torch.float16, torch.bfloat16)


def _is_low_cpu(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == 'cpu' and value.dtype in _LOW


def _fp32_on_cpu(fn):
    """Run ``fn`` (an mmcv ``_ext`` function) with low-precision CPU tensors as fp32 copies;
    copy results back into output arguments it filled (inputs are left untouched)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
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
    wrapper._swin_dense_fp32 = True  # type: ignore[attr-defined]
    return wrapper


def mmcv_cpu_ops_in_fp32() -> bool:
    """Wrap the functions of ``mmcv._ext`` with :func:`_fp32_on_cpu` (idempotent); False when
    mmcv has no compiled ops."""
    try:
        import mmcv._ext as ext
    except ImportError:
        return False
    for name in dir(ext):
        fn = getattr(ext, name)
        if name.startswith('_') or not callable(fn) or isinstance(fn, type) \
                or getattr(fn, '_swin_dense_fp32', False):
            continue
        setattr(ext, name, _fp32_on_cpu(fn))
    return True


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(AmpOptimWrapper):
    """``AmpOptimWrapper`` for the CPU: bf16 autocast by default, fp16 with loss scaling.

    Args:
        loss_scale: as ``AmpOptimWrapper`` (``'dynamic'``, a float, or GradScaler kwargs); used
            with ``dtype='float16'`` only.
        dtype: ``'bfloat16'`` (default) or ``'float16'``.
        use_fsdp: accepted for compatibility; must be False.
        **kwargs: passed to ``OptimWrapper`` (optimizer, clip_grad, accumulative_counts...).
    """

    def __init__(self, loss_scale: Union[str, float, dict] = 'dynamic',
                 dtype: Union[None, str, torch.dtype] = None, use_fsdp: bool = False,
                 **kwargs) -> None:
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
        mmcv_cpu_ops_in_fp32()

    def state_dict(self) -> dict:
        """As ``AmpOptimWrapper``; without ``loss_scaler`` when scaling is off (bf16), so that
        the checkpoint also resumes under ``AmpOptimWrapper`` on a GPU (a disabled scaler's
        empty state would not load there)."""
        state = super().state_dict()
        if not self.loss_scaler.is_enabled():
            state.pop('loss_scaler', None)
        return state

    @contextmanager
    def optim_context(self, model: torch.nn.Module):
        """Gradient-accumulation context of ``OptimWrapper`` plus ``torch.autocast('cpu')``."""
        with OptimWrapper.optim_context(self, model), \
                torch.autocast('cpu', dtype=self.cast_dtype):
            yield


def use_cpu_amp(cfg) -> Optional[str]:
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
