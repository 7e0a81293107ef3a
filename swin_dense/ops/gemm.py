"""The fast path's fp32 CPU matrix products, on the GEMM library that serves the CPU best.

PyTorch runs ``F.linear`` and ``torch.mm`` in fp32 on the CPU through its BLAS (MKL in the
official wheels). MKL picks its kernels by CPU vendor: on AMD CPUs it does not run its fastest
code paths, and on an AMD EPYC (Zen 5, AVX-512) it ran Swin's products at less than half the
rate of oneDNN's kernels, which PyTorch also ships (reachable through
``torch.ops.mkldnn._linear_pointwise``); on Intel CPUs MKL is at its best. The choice must also
be the same in every process of a machine: a training run resumed in a new process, or the
ranks of a distributed run, must compute the same sums to repeat the same losses bit for bit.
So ``SWIN_DENSE_CPU_GEMM`` (read when first needed) chooses:

- ``auto`` (the default): by the CPU's vendor, as MKL itself dispatches: oneDNN on AMD CPUs,
  PyTorch's BLAS elsewhere. Deterministic for a machine.
- ``measure``: per shape, the faster library timed once per process (the first product of a
  shape computes a random product of that shape on both, alternately; oneDNN serves it only
  if at least :data:`MIN_GAIN` faster). For trying a CPU family; two processes may then choose
  differently for a shape whose timings are close (results then differ by float32 rounding).
- ``torch`` (always PyTorch's own ``F.linear`` / ``torch.mm``) or ``onednn`` (oneDNN wherever
  it applies).

Both libraries compute the same sums in float32; only the order of the additions differs
(about 1e-6 relative). Only fp32 CPU tensors with nothing recorded for autograd (the fast
path's inference, and the forwards and backwards of its own autograd functions) go to oneDNN;
everything else is PyTorch's own op.

Private torch op, and why: ``torch.ops.mkldnn._linear_pointwise`` is oneDNN's fp32 linear
(the op ``torch.compile``'s CPU backend emits); no public function reaches oneDNN's fp32 GEMM.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

#: oneDNN serves a shape only where it took at most this fraction of PyTorch's default time
#: in the calibration: near-equal timings keep PyTorch's default.
MIN_GAIN = 0.9

#: Timed products per library in a shape's calibration (alternated, after one untimed each).
CALIBRATION_REPEATS = 3

#: Calibrations use at most this many rows (their time, not the choice, grows with them).
CALIBRATION_MAX_ROWS = 8192

_CHOICES = ('auto', 'measure', 'torch', 'onednn')
_mode: Optional[str] = None
_choice: dict[tuple, bool] = {}


def mode() -> str:
    """``'auto'``, ``'measure'``, ``'torch'`` or ``'onednn'``: from ``SWIN_DENSE_CPU_GEMM`` on
    first use."""
    global _mode
    if _mode is None:
        value = os.environ.get('SWIN_DENSE_CPU_GEMM', 'auto').strip().lower() or 'auto'
        if value not in _CHOICES:
            raise ValueError(f'SWIN_DENSE_CPU_GEMM={value!r} is not understood: set it to auto '
                             '(oneDNN on AMD CPUs, PyTorch\'s BLAS elsewhere), measure (the '
                             'faster library per shape, timed once per process), '
                             'torch (PyTorch\'s default BLAS) or onednn')
        _mode = value
    return _mode


def set_mode(value: Optional[str]) -> None:
    """Set the choice (as ``SWIN_DENSE_CPU_GEMM``; None: read the variable again) and forget
    the shapes measured so far."""
    global _mode
    if value is not None and value not in _CHOICES:
        raise ValueError(f'GEMM mode must be one of {_CHOICES}, got {value!r}')
    _mode = value
    _choice.clear()


def choices() -> dict[tuple, bool]:
    """The shapes measured in this process -> whether oneDNN serves them (a copy)."""
    return dict(_choice)


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, ...), '' where unknown."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
            for line in f:
                if line.startswith('vendor_id'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return ''


def _onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, '_linear_pointwise'))


def _onednn_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'none', [], '')


def _eligible(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """fp32 on the CPU, 2-d, nothing for autograd to record (the op has no usable backward)."""
    if x.device.type != 'cpu' or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.dim() != 2 or weight.dim() != 2 or min(x.shape) == 0 or min(weight.shape) == 0:
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.dim() != 1):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias)):
        return False
    return True


def _transposed(t: Tensor) -> bool:
    return t.stride(0) == 1 and t.stride(1) != 1


def _key(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple:
    return (x.shape[0].bit_length(), x.shape[1], weight.shape[0], _transposed(x),
            _transposed(weight), bias is not None, torch.get_num_threads())


def _layout(rows: int, cols: int, transposed: bool, generator: torch.Generator) -> Tensor:
    if transposed:
        return torch.randn(cols, rows, generator=generator).t()
    return torch.randn(rows, cols, generator=generator)


def _calibrate(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether oneDNN computes ``x @ weight.T + bias`` of these shapes and layouts faster."""
    rows = min(x.shape[0], CALIBRATION_MAX_ROWS)
    # a generator of its own: the global one's draws (dropout, stochastic depth) stay as they
    # would be without the calibration
    generator = torch.Generator().manual_seed(0)
    a = _layout(rows, x.shape[1], _transposed(x), generator)
    w = _layout(weight.shape[0], weight.shape[1], _transposed(weight), generator)
    b = None if bias is None else torch.randn(weight.shape[0], generator=generator)
    runs = {'torch': lambda: F.linear(a, w, b), 'onednn': lambda: _onednn_linear(a, w, b)}
    best = {name: float('inf') for name in runs}
    for name, run in runs.items():  # untimed: oneDNN builds its kernel for the shape here
        run()
    for _ in range(CALIBRATION_REPEATS):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best['onednn'] <= MIN_GAIN * best['torch']


def _use_onednn(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    if not _eligible(x, weight, bias):
        return False
    chosen = mode()
    if chosen == 'auto':
        return _onednn_available() and cpu_vendor() == 'AuthenticAMD'
    if chosen != 'measure':
        return chosen == 'onednn' and _onednn_available()
    key = _key(x, weight, bias)
    use = _choice.get(key)
    if use is None:
        use = _choice[key] = _onednn_available() and _calibrate(x, weight, bias)
    return use


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` ``(..., K)``, ``weight`` ``(N, K)`` (any strides),
    on the faster library for fp32 CPU tensors that autograd does not record."""
    if x.dim() != 2:
        rows = x.reshape(-1, x.shape[-1])
        if _use_onednn(rows, weight, bias):
            return _onednn_linear(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight, bias)
    if _use_onednn(x, weight, bias):
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_into(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``out[:] = x @ weight^T + bias`` on 2-d views (oneDNN writes a fresh result, copied in;
    PyTorch's own op writes ``out`` directly)."""
    if _use_onednn(x, weight, bias):
        return out.copy_(_onednn_linear(x, weight, bias))
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def mm(a: Tensor, b: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``a @ b`` for 2-d ``a`` ``(M, K)`` and ``b`` ``(K, N)`` (any strides), into ``out`` if
    given."""
    weight = b.t()
    if _use_onednn(a, weight, None):
        result = _onednn_linear(a, weight, None)
        return result if out is None else out.copy_(result)
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


def addmm_(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``acc += a @ b`` in place (2-d)."""
    weight = b.t()
    if _use_onednn(a, weight, None):
        return acc.add_(_onednn_linear(a, weight, None))
    return acc.addmm_(a, b)
