"""Reading checkpoint files safely.

``.safetensors`` files hold tensors only. Every other file is a pickle, read with torch's
weights-only unpickler, which refuses anything that could run code; the data-only types that
mmengine (and timm) write beside the weights are allow-listed so their training checkpoints still
load. A file that needs more is refused with the names of what it needs and the opt-in.
"""
from __future__ import annotations

import argparse
import inspect
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Union

import torch
import torch.nn as nn

__all__ = ['UnsafeCheckpointError', 'mmengine_safe_globals', 'read_checkpoint',
           'register_mmengine_safe_globals']


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """The file needs arbitrary code to unpickle (``weights_only=True`` refused it)."""


def _numpy_safe_globals() -> list:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch and mmengine
        return []
    try:
        multiarray = np._core.multiarray  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        multiarray = np.core.multiarray
    found = [np.ndarray, np.dtype]
    # Files written under numpy 1.x name numpy.core, under 2.x numpy._core: accept both.
    for name in ('_reconstruct', 'scalar'):
        fn = getattr(multiarray, name)
        found += [(fn, f'numpy.core.multiarray.{name}'), (fn, f'numpy._core.multiarray.{name}')]
    dtypes = getattr(np, 'dtypes', None)  # numpy >= 1.25: one dtype class per type
    if dtypes is not None:
        found += [t for t in vars(dtypes).values()
                  if isinstance(t, type) and issubclass(t, np.dtype) and t is not np.dtype]
    return found


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """The only ``getattr`` a weights-only load may run: methods of mmengine's HistoryBuffer.

    ``HistoryBuffer.__getstate__`` pickles its statistics methods (``min``, ``max``, ...) as
    ``getattr(HistoryBuffer, 'min')``; nothing else is allowed.
    """
    from mmengine.logging import HistoryBuffer
    if obj is HistoryBuffer and isinstance(name, str) and not name.startswith('_'):
        value = getattr(obj, name, None)
        if inspect.isfunction(value) or inspect.ismethod(value):
            return value
    raise pickle.UnpicklingError(f'getattr({obj!r}, {name!r}) is not allowed in a weights-only '
                                 'checkpoint load')


def mmengine_safe_globals() -> list:
    """The non-tensor types mmengine 0.10.x writes into checkpoints, for ``weights_only`` loads.

    A Runner checkpoint holds ``meta`` (str/int/dict, sometimes ``ConfigDict``), ``message_hub``
    (``HistoryBuffer`` objects with numpy arrays and numpy scalars such as ``eta``), optimizer and
    scheduler state dicts. All of these are data; none can run code. Also ``argparse.Namespace``
    (timm training checkpoints keep their ``args``).
    """
    found = _numpy_safe_globals()
    found.append((_history_buffer_getattr, 'builtins.getattr'))
    try:
        from mmengine.logging.history_buffer import HistoryBuffer
        found.append(HistoryBuffer)
    except ImportError:  # pragma: no cover
        pass
    try:
        from mmengine.config.config import ConfigDict
        found.append(ConfigDict)
    except ImportError:  # pragma: no cover
        pass
    found.append(argparse.Namespace)
    return found


def register_mmengine_safe_globals() -> None:
    """Allow-list :func:`mmengine_safe_globals` process-wide (``add_safe_globals``).

    For code that calls ``torch.load`` itself with the torch >= 2.6 default ``weights_only=True``,
    e.g. mmengine's ``Runner.resume`` / ``load_checkpoint``, which would otherwise refuse the
    message hub and numpy scalars of mmengine's own checkpoints.
    :func:`read_checkpoint` does not need it: it allow-lists them only around its own load.
    """
    torch.serialization.add_safe_globals(mmengine_safe_globals())


def _corrupt(path: Path, error: BaseException) -> ValueError:
    size = path.stat().st_size
    with open(path, 'rb') as f:
        head = f.read(4)
    if size == 0:
        what = 'the file is empty'
    elif head.startswith(b'PK'):
        what = 'it is a truncated or corrupt torch zip archive'
    else:
        what = 'it is truncated, corrupt, or not a checkpoint at all'
    detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ''
    return ValueError(f'cannot read checkpoint {path} ({size} bytes): {what} '
                      f'[{type(error).__name__}{": " + detail if detail else ""}]')


def _unsafe(path: Path, error: BaseException) -> UnsafeCheckpointError:
    try:
        offending = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        allowed = set()
        for g in mmengine_safe_globals():
            allowed.add(g[1] if isinstance(g, tuple) else f'{g.__module__}.{g.__qualname__}')
        offending = [g for g in offending if g not in allowed]
    except Exception:  # noqa: BLE001 - only used to improve the message
        offending = []
    if not offending:
        match = re.search(r'GLOBAL (\S+) was not an allowed global', str(error))
        offending = [match.group(1)] if match else []
    what = (f'needs {", ".join(offending)}' if offending
            else f'was refused by the weights-only unpickler ({str(error).splitlines()[-1][:200]})')
    return UnsafeCheckpointError(
        f'checkpoint {path} is not plain tensor data: unpickling it {what}, which could run '
        'arbitrary code, so it was refused. If you trust the file, opt in with '
        "trust_pickle=True (init_cfg=dict(type='Pretrained', checkpoint=..., trust_pickle=True), "
        'or --trust-pickle for tools/convert_checkpoint.py); or convert it once, on a trusted '
        'machine, with tools/convert_checkpoint.py --trust-pickle SRC DST.safetensors')


def _read_safetensors(path: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f'reading {path} needs safetensors: pip install safetensors') from e
    try:
        return dict(load_file(str(path), device='cpu'))
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends
        raise _corrupt(path, e) from e


def _read_pickle(path: Path, trust_pickle: bool) -> Any:
    if trust_pickle:
        warnings.warn(f'loading {path} with weights_only=False (trust_pickle=True): the pickle may '
                      'run arbitrary code', stacklevel=3)
        try:
            return torch.load(str(path), map_location='cpu', weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise _corrupt(path, e) from e
    try:
        with torch.serialization.safe_globals(mmengine_safe_globals()):
            return torch.load(str(path), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'Weights only load failed' in str(e):
            raise _unsafe(path, e) from e
        raise _corrupt(path, e) from e
    except Exception as e:  # noqa: BLE001 - RuntimeError, OSError, EOFError, KeyError ...
        raise _corrupt(path, e) from e


def read_checkpoint(path: Union[str, os.PathLike], trust_pickle: bool = False) -> dict:
    """Read a checkpoint file into a dict, safely.

    ``.safetensors`` files load with safetensors. Other files load with
    ``torch.load(map_location='cpu', weights_only=True)`` plus the data-only types mmengine
    writes (:func:`mmengine_safe_globals`), so mmengine training checkpoints load without
    executing pickled code. Nothing is downloaded: a URL is an error that says so.

    Args:
        path: the checkpoint file.
        trust_pickle: load with ``weights_only=False`` (arbitrary code!), for trusted legacy files.

    Raises:
        FileNotFoundError: no file at ``path``.
        UnsafeCheckpointError: (a ``ValueError``) the pickle needs arbitrary code and
            ``trust_pickle`` is False; names the offending globals and the opt-in.
        ValueError: the file is truncated, corrupt, or not a checkpoint.
    """
    if isinstance(path, str) and '://' in path:
        raise ValueError(f'{path} is a URL: swin_dense never downloads. Download the file '
                         'yourself and point init_cfg.checkpoint (or the config\'s `pretrained`) '
                         'at the local path')
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f'checkpoint file not found: {path} (relative paths start at the working directory '
            f'{Path.cwd()}). Point init_cfg.checkpoint at a local file, or train from scratch with '
            f'init_cfg=None')
    if path.is_dir():
        raise ValueError(f'checkpoint path {path} is a directory, not a checkpoint file')

    if path.suffix == '.safetensors':
        return _read_safetensors(path)
    ckpt = _read_pickle(path, trust_pickle)
    if isinstance(ckpt, nn.Module):  # a whole pickled model (trust_pickle only)
        ckpt = ckpt.state_dict()
    if not isinstance(ckpt, Mapping):
        raise ValueError(f'checkpoint {path} holds a {type(ckpt).__name__}, not a dict of tensors')
    return dict(ckpt)
