"""Reading, recognising and converting Swin Transformer checkpoints for :class:`SwinBackbone`.

One entry point per use, all built on pure functions (no I/O below the reading section):

* :func:`load_pretrained` - what ``init_cfg=dict(type='Pretrained', checkpoint=PATH)`` calls:
  read, convert, load, log a :class:`LoadReport`; a partial or mismatched load is an error,
  never a silent warning (REFERENCE details 3-7).
* :func:`checkpoint_filter_fn` - timm-style pure filter: any supported checkpoint dict -> our
  state dict; :func:`convert_state_dict` returns the :class:`LoadReport` beside it.
* :func:`convert_checkpoint` - write a file in our native layout (``tools/convert_checkpoint.py``).
* :func:`read_checkpoint` - ``weights_only`` loading that still accepts what mmengine writes.

Supported source layouts (:data:`FORMATS`), with what the conversion does:

========== ================================================================================
native     ours = mmdet 3.x / mmseg 1.x ``SwinTransformer`` (``stages.i.blocks.j.attn.w_msa``,
           ``ffn.layers.0.0``, ``patch_embed.projection``, PatchMerging in nn.Unfold order).
           Bare backbone files (mmseg) or detector/segmentor files (``backbone.`` prefix).
mmpretrain mmcls 0.x / mmpretrain 1.x classifiers: the native naming under ``backbone.`` plus
           ``head.fc``; same Unfold channel order; their final norm is ``norm3`` (legacy mmcls
           files: ``norm``), loaded into our ``norm3`` as mmpretrain and mmdet themselves do.
official   microsoft/Swin-Transformer classification (``{'model': ...}``): ``layers.i``,
           ``attn.qkv``, ``mlp.fc1``, ``patch_embed.proj``, ``layers.i.downsample`` at the end of
           stage i, ``norm`` (final), ``head`` (1K or 22K). PatchMerging concat order
           ``[x(0::2,0::2), x(1::2,0::2), x(0::2,1::2), x(1::2,1::2)]`` -> reordered to Unfold.
official_det  the official detection / segmentation repos: official naming under
           ``backbone.``, trained per-output ``norm{i}``, ``absolute_pos_embed`` as (1, C, H, W).
timm       timm >= 0.9 ``SwinTransformer``: official naming but ``layers.i.downsample`` at the
           START of stage i (i >= 1), ``head.fc``; ``layers_i`` in ``features_only`` models.
           Its PatchMerging, ``reshape(B, H/2, 2, W/2, 2, C).permute(0, 1, 3, 4, 2, 5)``,
           yields the official order (dx-major, dy-minor), so it is reordered like official.
torchvision ``torchvision.models.swin_t/s/b``: ``features.0.{0,2}`` patch embedding,
           ``features.{1,3,5,7}.j`` blocks (``attn.qkv``, ``mlp.0``, ``mlp.3``),
           ``features.{2,4,6}`` PatchMerging (official order), ``norm``, ``head``.
========== ================================================================================

Always: ``relative_position_index`` / ``attn_mask`` buffers are dropped (rebuilt by the model),
``relative_position_bias_table`` is resized bicubically per head when the window differs
(as mmdet / mmseg do), ``absolute_pos_embed`` bicubically over its grid when the grid differs.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import tempfile
import warnings
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import print_log
from torch import Tensor

from .arch import ARCH_SETTINGS

__all__ = [
    'FORMATS', 'LoadReport', 'UnsafeCheckpointError', 'checkpoint_filter_fn', 'convert_checkpoint',
    'convert_state_dict', 'detect_format', 'infer_arch', 'load_pretrained', 'mmengine_safe_globals',
    'read_checkpoint', 'register_mmengine_safe_globals', 'resize_absolute_pos_embed',
    'resize_relative_position_bias_table', 'unwrap_state_dict'
]

#: Source layouts :func:`detect_format` recognises.
FORMATS = ('native', 'mmpretrain', 'official', 'official_det', 'timm', 'torchvision')

FORMAT_DESCRIPTIONS = {
    'native': 'swin_dense / mmdet 3.x / mmseg 1.x SwinTransformer layout',
    'mmpretrain': 'mmpretrain / mmcls classifier (backbone.stages..., head.fc)',
    'official': 'microsoft/Swin-Transformer classification checkpoint',
    'official_det': 'official Swin-Transformer-Object-Detection / Semantic-Segmentation checkpoint',
    'timm': 'timm >= 0.9 SwinTransformer (downsample at the start of each stage)',
    'torchvision': 'torchvision.models.swin_t / swin_s / swin_b',
}

# Reasons shown in the report (also used by the tests).
REASON_OUTPUT_NORM = 'per-output norm, new in dense backbones, starts at weight 1 bias 0'
REASON_BUFFER = 'buffer (relative_position_index / attn_mask), rebuilt by the model, never loaded'
REASON_FINAL_NORM = ('final norm of the classifier; a dense backbone normalises each output with '
                     'its own norm{i} instead')
REASON_HEAD = 'classifier head'

_BUFFER_NAMES = ('relative_position_index', 'attn_mask', 'relative_coords_table')
_CONTAINER_KEYS = ('state_dict', 'model', 'module', 'state_dict_ema', 'model_ema')


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """The file needs arbitrary code to unpickle (``weights_only=True`` refused it)."""


# =====================================================================================
# Reading
# =====================================================================================
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
    import inspect
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
    e.g. mmengine's ``Runner.resume`` / ``load_checkpoint`` (REFERENCE detail 9).
    :func:`read_checkpoint` does not need it: it allow-lists them only around its own load.
    """
    torch.serialization.add_safe_globals(mmengine_safe_globals())


def _corrupt(path: Path, error: BaseException) -> ValueError:
    size = path.stat().st_size
    head = open(path, 'rb').read(4)
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
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f'reading {path} needs safetensors: pip install safetensors') from e
        try:
            return dict(load_file(str(path), device='cpu'))
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends
            raise _corrupt(path, e) from e

    if trust_pickle:
        warnings.warn(f'loading {path} with weights_only=False (trust_pickle=True): the pickle may '
                      'run arbitrary code', stacklevel=2)
        try:
            ckpt = torch.load(str(path), map_location='cpu', weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise _corrupt(path, e) from e
    else:
        try:
            with torch.serialization.safe_globals(mmengine_safe_globals()):
                ckpt = torch.load(str(path), map_location='cpu', weights_only=True)
        except pickle.UnpicklingError as e:
            if 'Weights only load failed' in str(e):
                raise _unsafe(path, e) from e
            raise _corrupt(path, e) from e
        except Exception as e:  # noqa: BLE001 - RuntimeError, OSError, EOFError, KeyError ...
            raise _corrupt(path, e) from e

    if isinstance(ckpt, nn.Module):  # a whole pickled model (trust_pickle only)
        ckpt = ckpt.state_dict()
    if not isinstance(ckpt, Mapping):
        raise ValueError(f'checkpoint {path} holds a {type(ckpt).__name__}, not a dict of tensors')
    return dict(ckpt)


# =====================================================================================
# Unwrapping and format detection (pure)
# =====================================================================================
def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, Tensor) for v in obj.values())


def _outside_reason(key: str) -> str:
    head = key.split('.', 1)[0]
    if head == 'neck':
        return 'neck of a detector / segmentor (not part of the backbone)'
    if head in ('decode_head', 'auxiliary_head'):
        return 'head of a segmentor (not part of the backbone)'
    if head.endswith('head'):
        return ('classifier head' if head == 'head'
                else 'head of a detector (not part of the backbone)')
    if head == 'data_preprocessor':
        return 'data preprocessor (not part of the backbone)'
    return 'outside the backbone'


@dataclass
class _Unwrapped:
    state: 'OrderedDict[str, Tensor]'
    unused: dict
    notes: list
    had_backbone_prefix: bool


def _unwrap(checkpoint: Mapping, prefix: Optional[str] = None) -> _Unwrapped:
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'expected a checkpoint dict, got {type(checkpoint).__name__}')
    notes, unused = [], {}
    state: Any = checkpoint
    for key in _CONTAINER_KEYS:  # training checkpoints: take the first container present
        value = checkpoint.get(key)
        if isinstance(value, nn.Module):
            value = value.state_dict()
        if isinstance(value, Mapping):
            state = value
            others = [k for k in _CONTAINER_KEYS if k != key and _is_tensor_dict(checkpoint.get(k))]
            if others:
                notes.append(f'weights taken from {key!r}; the file also holds {others} (not used)')
            break
    if not state:
        raise ValueError('the checkpoint holds no tensors (empty state dict)')
    if not _is_tensor_dict(state):
        raise ValueError('the checkpoint holds no state dict of tensors; top-level keys: '
                         f'{list(checkpoint)[:8]}')

    tensors = OrderedDict()
    for k, v in state.items():
        if isinstance(v, Tensor):
            tensors[str(k)] = v
        else:
            unused[str(k)] = f'not a tensor ({type(v).__name__})'
    if tensors and all(k.startswith('module.') for k in tensors):  # DataParallel / DDP
        tensors = OrderedDict((k[len('module.'):], v) for k, v in tensors.items())
        notes.append("stripped the 'module.' prefix (DataParallel / DDP)")

    had_backbone_prefix = False
    if prefix:
        p = prefix if prefix.endswith('.') else prefix + '.'
        kept = OrderedDict((k[len(p):], v) for k, v in tensors.items() if k.startswith(p))
        if not kept:
            raise ValueError(f'no key of the checkpoint starts with prefix {p!r}; keys look like '
                             f'{list(tensors)[:5]}')
        for k in tensors:
            if not k.startswith(p):
                unused[k] = f'outside prefix {p!r}'
        tensors = kept
        had_backbone_prefix = p == 'backbone.'
        notes.append(f'kept the keys under prefix {p!r}')
    elif any(k.startswith('backbone.') for k in tensors):
        kept = OrderedDict()
        for k, v in tensors.items():
            if k.startswith('backbone.'):
                kept[k[len('backbone.'):]] = v
            else:
                unused[k] = _outside_reason(k)
        tensors = kept
        had_backbone_prefix = True
        notes.append("kept the 'backbone.' keys of a detector / segmentor / classifier file")
    return _Unwrapped(tensors, unused, notes, had_backbone_prefix)


def unwrap_state_dict(checkpoint: Mapping,
                      prefix: Optional[str] = None) -> 'OrderedDict[str, Tensor]':
    """The backbone tensors of a checkpoint dict: container key, ``module.``, prefix removed.

    Takes ``state_dict`` / ``model`` / ``module`` / ``state_dict_ema`` (in that order of
    preference) when the dict is a training checkpoint; strips ``module.``; keeps the keys under
    ``prefix`` (mmengine's meaning) or, without one, under ``backbone.`` when there are such keys.
    """
    return _unwrap(checkpoint, prefix).state


_TV_BLOCK = re.compile(r'^features\.(\d+)\.(\d+)\.attn\.qkv\.weight$')
_NATIVE_BLOCK = re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.qkv\.weight$')
_OFFICIAL_BLOCK = re.compile(r'^layers[._](\d+)\.blocks\.(\d+)\.attn\.qkv\.weight$')
_DOWNSAMPLE = re.compile(r'^layers[._](\d+)\.downsample\.')


def _detect_layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(('logit_scale' in k or 'cpb_mlp' in k) for k in keys):
        raise ValueError('this is a Swin Transformer V2 checkpoint (logit_scale / cpb_mlp keys); '
                         'SwinBackbone implements Swin V1 and cannot use it')
    if any(_TV_BLOCK.match(k) for k in keys) and 'features.0.0.weight' in keys:
        return 'torchvision'
    if any(_NATIVE_BLOCK.match(k) for k in keys):
        return 'native'
    if any(_OFFICIAL_BLOCK.match(k) for k in keys):
        stages = {int(m.group(1)) for m in map(_DOWNSAMPLE.match, keys) if m}
        if 0 in stages:  # official: stage 0 ends with a downsample; timm: stage 0 has none
            return 'official'
        if stages or 'head.fc.weight' in keys:
            return 'timm'
        return 'official'  # single stage: no downsample, both layouts coincide
    sample = ', '.join(keys[:6]) + (', ...' if len(keys) > 6 else '')
    raise ValueError(f'not a Swin Transformer checkpoint of a supported format; its keys look '
                     f'like: {sample}. Supported formats: {", ".join(FORMATS)} '
                     '(see swin_dense/checkpoint.py)')


def _refine_format(layout: str, unwrapped: _Unwrapped) -> str:
    if layout == 'official' and unwrapped.had_backbone_prefix:
        return 'official_det'
    if layout == 'native':
        keys = unwrapped.state.keys()
        classifier = any(k.startswith('head.') for k in unwrapped.unused)
        dense = any(k.split('.', 1)[0] in ('neck', 'decode_head', 'auxiliary_head', 'rpn_head',
                                            'roi_head', 'bbox_head') for k in unwrapped.unused)
        if (unwrapped.had_backbone_prefix and classifier and not dense) or 'norm.weight' in keys:
            return 'mmpretrain'
    return layout


def detect_format(state_dict: Mapping) -> str:
    """The layout of a checkpoint dict or state dict: one of :data:`FORMATS`.

    Raises:
        ValueError: not a Swin V1 checkpoint of a supported layout; lists a few of its keys.
    """
    unwrapped = _unwrap(state_dict)
    return _refine_format(_detect_layout(unwrapped.state.keys()), unwrapped)


# =====================================================================================
# Mapping, one pure function per source layout: src state -> (ours, unused, converted)
# =====================================================================================
def official_to_unfold_reduction(weight: Tensor) -> Tensor:
    """PatchMerging ``reduction.weight`` (out, 4C): official concat order -> nn.Unfold order.

    Official input index ``k * C + c`` with ``k = dy + 2 * dx``; Unfold ``c * 4 + 2 * dy + dx``.
    Same as mmdet's ``swin_converter``: ``reshape(out, 4, C)[:, [0, 2, 1, 3]]`` then transpose.
    """
    out_ch, in_ch = weight.shape
    return weight.reshape(out_ch, 4, in_ch // 4)[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(
        out_ch, in_ch)


def official_to_unfold_norm(vector: Tensor) -> Tensor:
    """PatchMerging ``norm.weight`` / ``norm.bias`` (4C,): official order -> nn.Unfold order."""
    in_ch = vector.shape[0]
    return vector.reshape(4, in_ch // 4)[[0, 2, 1, 3], :].transpose(0, 1).reshape(in_ch)


def _reorder_merging(our_key: str, value: Tensor) -> Tensor:
    if our_key.endswith('reduction.weight'):
        return official_to_unfold_reduction(value)
    return official_to_unfold_norm(value)


_REASON_REORDER = ('PatchMerging channels reordered from the official 2x2 concat order to '
                   "nn.Unfold order (mmdet's swin_converter)")


def _block_suffix(suffix: str, mlp: Mapping[str, str]) -> Optional[str]:
    """Map a block parameter name (after ``blocks.j.``) of the official family to ours."""
    if suffix.startswith(('norm1.', 'norm2.')):
        return suffix
    for name in ('qkv.', 'proj.', 'relative_position_bias_table'):
        if suffix.startswith('attn.' + name):
            return 'attn.w_msa.' + suffix[len('attn.'):]
    for src, dst in mlp.items():
        if suffix.startswith(src):
            return dst + suffix[len(src):]
    return None


_OFFICIAL_MLP = {'mlp.fc1.': 'ffn.layers.0.0.', 'mlp.fc2.': 'ffn.layers.1.'}
_TV_MLP = {'mlp.0.': 'ffn.layers.0.0.', 'mlp.3.': 'ffn.layers.1.'}


@dataclass
class _Mapped:
    tensors: 'OrderedDict[str, Tensor]' = field(default_factory=OrderedDict)
    origin: dict = field(default_factory=dict)  # our key -> source key
    unused: dict = field(default_factory=dict)  # source key -> reason
    converted: dict = field(default_factory=dict)  # our key -> what was done
    pos_grid: Optional[tuple] = None  # source grid of absolute_pos_embed, when known

    def put(self, ours: str, src: str, value: Tensor) -> None:
        self.tensors[ours] = value
        self.origin[ours] = src


def _common(key: str, out: _Mapped, head_classes: Callable[[str], str]) -> bool:
    """Keys handled the same in every layout: buffers and classifier heads."""
    if key.rsplit('.', 1)[-1] in _BUFFER_NAMES:
        out.unused[key] = REASON_BUFFER
        return True
    if key.startswith('head.'):
        out.unused[key] = head_classes(key)
        return True
    return False


def _head_reason(state: Mapping[str, Tensor]) -> Callable[[str], str]:
    for k in ('head.weight', 'head.fc.weight'):
        if k in state and state[k].dim() == 2:
            return lambda key, n=state[k].shape[0]: f'{REASON_HEAD} ({n} classes)'
    return lambda key: REASON_HEAD


def _from_official(state: Mapping[str, Tensor], downsample_offset: int = 0) -> _Mapped:
    """Official / official_det (``downsample_offset=0``) and timm (``downsample_offset=-1``)."""
    out, head = _Mapped(), _head_reason(state)
    block = re.compile(r'^layers[._](\d+)\.blocks\.(\d+)\.(.+)$')
    down = re.compile(r'^layers[._](\d+)\.downsample\.((?:reduction|norm)\.(?:weight|bias))$')
    for key, value in state.items():
        if _common(key, out, head):
            continue
        if key.startswith('patch_embed.'):
            out.put(key.replace('patch_embed.proj.', 'patch_embed.projection.'), key, value)
        elif key == 'absolute_pos_embed':
            if value.dim() == 4:  # official_det: (1, C, H, W)
                out.pos_grid = tuple(value.shape[2:])
                value = value.flatten(2).transpose(1, 2)
            out.put(key, key, value)
        elif m := block.match(key):
            suffix = _block_suffix(m.group(3), _OFFICIAL_MLP)
            if suffix is None:
                out.unused[key] = 'unknown block parameter'
            else:
                out.put(f'stages.{m.group(1)}.blocks.{m.group(2)}.{suffix}', key, value)
        elif m := down.match(key):
            stage = int(m.group(1)) + downsample_offset
            ours = f'stages.{stage}.downsample.{m.group(2)}'
            if stage < 0:
                out.unused[key] = 'downsample before the first stage (unexpected)'
                continue
            out.put(ours, key, _reorder_merging(ours, value))
            out.converted[ours] = _REASON_REORDER
        elif re.match(r'^norm\d+\.(weight|bias)$', key):  # official_det per-output norms
            out.put(key, key, value)
        elif key.startswith('norm.'):
            out.unused[key] = REASON_FINAL_NORM
        else:
            out.unused[key] = 'not a Swin backbone tensor'
    return out


def _from_timm(state: Mapping[str, Tensor]) -> _Mapped:
    """timm >= 0.9: ``layers.i.downsample`` (i >= 1) belongs to the end of our stage i - 1."""
    return _from_official(state, downsample_offset=-1)


def _from_torchvision(state: Mapping[str, Tensor]) -> _Mapped:
    out, head = _Mapped(), _head_reason(state)
    pattern = re.compile(r'^features\.(\d+)\.(.+)$')
    for key, value in state.items():
        if _common(key, out, head):
            continue
        m = pattern.match(key)
        if m is None:
            out.unused[key] = (REASON_FINAL_NORM if key.startswith('norm.')
                               else 'not a Swin backbone tensor')
            continue
        index, rest = int(m.group(1)), m.group(2)
        if index == 0:  # Sequential(Conv2d, Permute, LayerNorm)
            names = {'0.weight': 'patch_embed.projection.weight',
                     '0.bias': 'patch_embed.projection.bias',
                     '2.weight': 'patch_embed.norm.weight', '2.bias': 'patch_embed.norm.bias'}
            if rest in names:
                out.put(names[rest], key, value)
            else:
                out.unused[key] = 'not a Swin backbone tensor'
        elif index % 2 == 1:  # stage (index - 1) // 2: Sequential of blocks
            j, _, suffix = rest.partition('.')
            ours = _block_suffix(suffix, _TV_MLP) if j.isdigit() else None
            if ours is None:
                out.unused[key] = 'unknown block parameter'
            else:
                out.put(f'stages.{(index - 1) // 2}.blocks.{j}.{ours}', key, value)
        else:  # PatchMerging after stage index // 2 - 1
            if rest not in ('reduction.weight', 'norm.weight', 'norm.bias'):
                out.unused[key] = 'unknown PatchMerging parameter'
                continue
            ours = f'stages.{index // 2 - 1}.downsample.{rest}'
            out.put(ours, key, _reorder_merging(ours, value))
            out.converted[ours] = _REASON_REORDER
    return out


def _from_native(state: Mapping[str, Tensor], legacy_final_norm: bool = False) -> _Mapped:
    """Ours / mmdet / mmseg / mmpretrain: names and channel order already match."""
    out, head = _Mapped(), _head_reason(state)
    last = max((int(m.group(1)) for m in map(_NATIVE_BLOCK.match, state) if m), default=0)
    for key, value in state.items():
        if _common(key, out, head):
            continue
        if key.startswith('norm.') and legacy_final_norm:  # mmcls < 0.21: norm -> norm{last}
            ours = f'norm{last}.' + key[len('norm.'):]
            out.put(ours, key, value)
            out.converted[ours] = (f"legacy mmcls final norm 'norm.' loaded as norm{last}, "
                                   'as mmpretrain does')
        elif key.startswith('norm.'):
            out.unused[key] = REASON_FINAL_NORM
        else:
            out.put(key, key, value)
    return out


def _from_mmpretrain(state: Mapping[str, Tensor]) -> _Mapped:
    return _from_native(state, legacy_final_norm=True)


_MAPPERS: dict[str, Callable[[Mapping[str, Tensor]], _Mapped]] = {
    'native': _from_native, 'mmpretrain': _from_mmpretrain, 'official': _from_official,
    'official_det': _from_official, 'timm': _from_timm, 'torchvision': _from_torchvision,
}


# =====================================================================================
# Resizing (pure)
# =====================================================================================
def resize_relative_position_bias_table(table: Tensor, window_size: int) -> Tensor:
    """``((2M-1)^2, heads)`` -> ``((2W-1)^2, heads)``, bicubic per head, as mmdet / mmseg.

    ``F.interpolate(table.T.reshape(1, heads, S1, S1), size=(S2, S2), mode='bicubic')``.
    """
    length, heads = table.shape
    s1, s2 = math.isqrt(length), 2 * window_size - 1
    if s1 * s1 != length:
        raise ValueError(f'relative_position_bias_table of shape {tuple(table.shape)} is not a '
                         'square (2M-1)^2 table')
    if s1 == s2:
        return table
    grid = table.float().transpose(0, 1).reshape(1, heads, s1, s1)
    grid = F.interpolate(grid, size=(s2, s2), mode='bicubic', align_corners=False)
    return grid.reshape(heads, s2 * s2).transpose(0, 1).contiguous().to(table.dtype)


def resize_absolute_pos_embed(pos: Tensor, src_grid: tuple, dst_grid: tuple) -> Tensor:
    """``(1, Hs*Ws, C)`` -> ``(1, Hd*Wd, C)``, bicubic over the grid (as mmpretrain)."""
    _, length, channels = pos.shape
    if src_grid[0] * src_grid[1] != length:
        raise ValueError(f'absolute_pos_embed {tuple(pos.shape)} does not hold a {src_grid} grid')
    if tuple(src_grid) == tuple(dst_grid):
        return pos
    grid = pos.float().reshape(1, *src_grid, channels).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(dst_grid), mode='bicubic', align_corners=False)
    return grid.flatten(2).transpose(1, 2).contiguous().to(pos.dtype)


# =====================================================================================
# Architecture of a (mapped) state dict
# =====================================================================================
def infer_arch(state: Mapping[str, Tensor]) -> dict:
    """SwinBackbone keyword arguments that fit a state dict in our layout.

    Returns e.g. ``dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
    window_size=7, ...)``, plus ``'arch'`` ('tiny', ...) when the shape is a published variant.
    """
    proj = state.get('patch_embed.projection.weight')
    if proj is None or proj.dim() != 4:
        raise ValueError('cannot infer the architecture: no patch_embed.projection.weight')
    embed_dims, in_channels, patch, _ = proj.shape
    depth: dict[int, int] = defaultdict(int)
    heads: dict[int, int] = {}
    window = None
    for key, value in state.items():
        m = re.match(r'^stages\.(\d+)\.blocks\.(\d+)\.', key)
        if not m:
            continue
        i, j = int(m.group(1)), int(m.group(2))
        depth[i] = max(depth[i], j + 1)
        if key.endswith('relative_position_bias_table') and value.dim() == 2:
            heads[i] = value.shape[1]
            window = (math.isqrt(value.shape[0]) + 1) // 2
    stages = sorted(depth)
    if not stages or stages != list(range(len(stages))):
        raise ValueError(f'cannot infer the architecture: stages {stages}')
    arch = dict(embed_dims=int(embed_dims), depths=tuple(depth[i] for i in stages),
                num_heads=tuple(heads.get(i, 0) for i in stages), window_size=window,
                patch_size=int(patch), in_channels=int(in_channels),
                patch_norm='patch_embed.norm.weight' in state,
                qkv_bias='stages.0.blocks.0.attn.w_msa.qkv.bias' in state)
    fc1 = state.get('stages.0.blocks.0.ffn.layers.0.0.weight')
    if fc1 is not None:
        arch['mlp_ratio'] = fc1.shape[0] / embed_dims
    pos = state.get('absolute_pos_embed')
    arch['use_abs_pos_embed'] = pos is not None
    if pos is not None:
        side = math.isqrt(pos.shape[1])
        arch['pretrain_img_size'] = side * int(patch)
    for name, setting in ARCH_SETTINGS.items():
        if (setting['embed_dims'], tuple(setting['depths']), tuple(setting['num_heads'])) == \
                (arch['embed_dims'], arch['depths'], arch['num_heads']):
            arch['arch'] = name
    return arch


def _describe_arch(arch: Optional[Mapping]) -> str:
    if not arch:
        return 'unknown shape'
    name = f"Swin-{arch['arch'][0].upper()} " if arch.get('arch') else ''
    return (f"{name}(embed_dims={arch.get('embed_dims')}, depths={arch.get('depths')}, "
            f"num_heads={arch.get('num_heads')}, window_size={arch.get('window_size')})")


def _model_arch(model: nn.Module) -> Optional[dict]:
    if all(hasattr(model, a) for a in ('embed_dims', 'depths', 'num_heads', 'window_size')):
        arch = dict(embed_dims=model.embed_dims, depths=tuple(model.depths),
                    num_heads=tuple(model.num_heads), window_size=model.window_size)
        for name, setting in ARCH_SETTINGS.items():
            if (setting['embed_dims'], tuple(setting['depths']), tuple(setting['num_heads'])) == \
                    (arch['embed_dims'], arch['depths'], arch['num_heads']):
                arch['arch'] = name
        return arch
    return None


# =====================================================================================
# The report
# =====================================================================================
_INDEX = re.compile(r'(?<=[._a-z])\d+(?=\.)')


def _summarise(keys: list, limit: int = 6) -> list:
    """Group keys that differ only in their indices: ``8 x stages.*.blocks.*.attn...``."""
    groups: dict[str, list] = OrderedDict()
    for k in keys:
        groups.setdefault(_INDEX.sub('*', k), []).append(k)
    lines = []
    for pattern, members in groups.items():
        if len(members) == 1:
            lines.append(members[0])
        elif pattern.count('*') == 1:  # e.g. norm{0,1,2,3}.weight
            values = ','.join(_INDEX.search(k).group(0) for k in members)
            lines.append(pattern.replace('*', '{' + values + '}'))
        else:
            lines.append(f'{len(members)} x {pattern}')
    if len(lines) > limit:
        lines = lines[:limit] + [f'... ({len(lines) - limit} more patterns)']
    return lines


@dataclass
class LoadReport:
    """What loading a checkpoint into a SwinBackbone did, and why.

    Attributes:
        source: the file (or ``'<state_dict>'``).
        format: the detected layout, one of :data:`FORMATS`.
        loaded: our keys that received a tensor from the checkpoint.
        total: tensors of the model's state dict (the backbone).
        missing: our keys the checkpoint does not provide -> reason.
        unused: checkpoint keys not loaded -> reason.
        resized: our keys resized to the model's shape -> what was done.
        converted: our keys whose values were transformed (channel order) -> what was done.
        mismatched: our keys whose shapes cannot be made to fit -> (checkpoint shape, model shape).
        unexpected: our keys the checkpoint has and the model lacks (other stages/blocks).
        notes: other remarks (container key used, prefixes stripped, ...).
        checkpoint_arch / model_arch: shapes (see :func:`infer_arch`), for error messages.
    """

    source: str
    format: str
    loaded: list = field(default_factory=list)
    total: int = 0
    missing: dict = field(default_factory=dict)
    unused: dict = field(default_factory=dict)
    resized: dict = field(default_factory=dict)
    converted: dict = field(default_factory=dict)
    mismatched: dict = field(default_factory=dict)
    unexpected: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    checkpoint_arch: Optional[dict] = None
    model_arch: Optional[dict] = None

    @property
    def num_loaded(self) -> int:
        return len(self.loaded)

    @property
    def expected_missing(self) -> list:
        return [k for k, r in self.missing.items() if r == REASON_OUTPUT_NORM]

    @property
    def unexpected_missing(self) -> list:
        return [k for k, r in self.missing.items() if r != REASON_OUTPUT_NORM]

    def _arch_advice(self) -> str:
        ckpt, model = self.checkpoint_arch, self.model_arch
        text = f'the checkpoint is {_describe_arch(ckpt)}; the model is {_describe_arch(model)}'
        if ckpt and ckpt.get('arch'):
            text += (f". Build the backbone with arch='{ckpt['arch']}'"
                     + (f' (window_size={ckpt["window_size"]} or keep yours: tables are resized)'
                        if ckpt.get('window_size') else ''))
        elif ckpt:
            text += (f". Build the backbone with embed_dims={ckpt['embed_dims']}, "
                     f"depths={ckpt['depths']}, num_heads={ckpt['num_heads']}")
        return text

    def check(self) -> None:
        """Raise ``ValueError`` unless the load is complete and every shape fits."""
        where = f'{self.source} ({self.format})'
        if self.mismatched:
            items = list(self.mismatched.items())
            shown = '; '.join(f'{k}: checkpoint {tuple(a)} vs model {tuple(b)}'
                              for k, (a, b) in items[:4])
            raise ValueError(f'checkpoint {where} does not fit this backbone: {len(items)} tensors '
                             f'differ in shape, e.g. {shown}. {self._arch_advice()}')
        if not self.loaded:
            raise ValueError(f'checkpoint {where} provided no tensor this backbone uses '
                             f'(unused: {", ".join(_summarise(list(self.unused), 4))})')
        if self.unexpected:
            raise ValueError(f'checkpoint {where} has {len(self.unexpected)} backbone tensors this '
                             f'model lacks, e.g. {", ".join(self.unexpected[:4])}: the depths '
                             f'differ. {self._arch_advice()}')
        if self.unexpected_missing:
            keys = self.unexpected_missing
            raise ValueError(f'checkpoint {where} lacks {len(keys)} backbone tensors: '
                             f'{", ".join(_summarise(keys, 6))} '
                             f'({", ".join(sorted(set(self.missing[k] for k in keys)))}). '
                             f'{self._arch_advice()}')

    def __str__(self) -> str:
        lines = [f'SwinBackbone weights from {self.source}',
                 f'  format: {self.format} ({FORMAT_DESCRIPTIONS.get(self.format, "?")})',
                 f'  loaded: {self.num_loaded} of {self.total} backbone tensors']
        lines += [f'  note: {n}' for n in self.notes]

        def section(title: str, entries: Mapping[str, Any]) -> None:
            by_reason: dict[str, list] = OrderedDict()
            for key, reason in entries.items():
                by_reason.setdefault(str(reason), []).append(key)
            for reason, keys in by_reason.items():
                lines.append(f'  {title}: {len(keys)} - {reason}')
                lines.extend(f'      {s}' for s in _summarise(keys))

        section('converted', self.converted)
        if self.resized:
            lines.append(f'  resized: {len(self.resized)}')
            by_what: dict[str, list] = OrderedDict()
            for key, what in self.resized.items():
                by_what.setdefault(what, []).append(key)
            for what, keys in by_what.items():
                lines.append(f'      {", ".join(_summarise(keys, 2))}: {what}')
        section('missing', self.missing)
        section('unused', self.unused)
        if self.mismatched:
            section('MISMATCHED', {k: f'checkpoint {tuple(a)} vs model {tuple(b)}'
                                   for k, (a, b) in self.mismatched.items()})
        if self.unexpected:
            section('NOT IN MODEL', {k: 'backbone tensor the model lacks' for k in self.unexpected})
        return '\n'.join(lines)


# =====================================================================================
# Public entry points
# =====================================================================================
def _model_grid(model: nn.Module, length: int) -> tuple:
    grid = getattr(model, 'pos_embed_grid', None)
    if grid is not None:
        return tuple(grid)
    side = math.isqrt(length)
    return side, side


def convert_state_dict(checkpoint: Mapping, model: nn.Module, prefix: Optional[str] = None,
                       source: str = '<state_dict>'
                       ) -> tuple['OrderedDict[str, Tensor]', LoadReport]:
    """Pure conversion of any supported checkpoint dict to ``model``'s layout, with its report.

    Unwraps, detects the format, maps names, converts PatchMerging channel order, drops buffers,
    heads and the final norm, resizes relative-position tables and the absolute position
    embedding to the model, and keeps only keys the model has. Does not raise on an incomplete
    result: call ``report.check()`` (as :func:`load_pretrained` does) for that.

    Args:
        checkpoint: a whole checkpoint dict or a state dict.
        model: the target backbone (read only: its ``state_dict()`` shapes and attributes).
        prefix: keep only the keys under this prefix (e.g. ``'backbone.'``), as mmengine does.
        source: name of the checkpoint, for the report.
    """
    unwrapped = _unwrap(checkpoint, prefix)
    fmt = _refine_format(_detect_layout(unwrapped.state.keys()), unwrapped)
    mapped = _MAPPERS[fmt](unwrapped.state)

    report = LoadReport(source=str(source), format=fmt, notes=list(unwrapped.notes),
                        unused=dict(unwrapped.unused), converted=dict(mapped.converted))
    report.unused.update(mapped.unused)
    try:
        report.checkpoint_arch = infer_arch(mapped.tensors)
    except ValueError:
        report.checkpoint_arch = None
    report.model_arch = _model_arch(model)

    targets = OrderedDict((k, v) for k, v in model.state_dict().items()
                          if k.rsplit('.', 1)[-1] not in _BUFFER_NAMES)
    report.total = len(targets)
    out_indices = getattr(model, 'out_indices', None)
    result = OrderedDict()
    for key, value in mapped.tensors.items():
        src = mapped.origin[key]
        if key not in targets:
            if re.match(r'^norm\d+\.', key):
                report.unused[src] = (f'per-output norm of an output this model does not produce '
                                      f'(out_indices={out_indices})')
            elif key == 'absolute_pos_embed':
                report.unused[src] = ('absolute position embedding; the model has '
                                      'use_abs_pos_embed=False')
            elif key.startswith(('stages.', 'patch_embed.')):
                report.unexpected.append(key)
                report.unused[src] = 'backbone tensor the model lacks (different depths?)'
            else:
                report.unused[src] = 'not a tensor of this model'
            report.converted.pop(key, None)
            continue
        target = targets[key]
        if value.shape != target.shape:
            if key.endswith('relative_position_bias_table') and value.dim() == 2 \
                    and value.shape[1] == target.shape[1] \
                    and math.isqrt(value.shape[0]) ** 2 == value.shape[0] \
                    and math.isqrt(target.shape[0]) ** 2 == target.shape[0]:
                m1 = (math.isqrt(value.shape[0]) + 1) // 2
                m2 = (math.isqrt(target.shape[0]) + 1) // 2
                new = resize_relative_position_bias_table(value, m2)
                report.resized[key] = (f'{tuple(value.shape)} -> {tuple(new.shape)}, '
                                       f'window {m1} -> {m2}, bicubic per head')
                value = new
            elif key == 'absolute_pos_embed' and value.dim() == 3 and target.dim() == 3 \
                    and value.shape[2] == target.shape[2]:
                src_grid = mapped.pos_grid or (math.isqrt(value.shape[1]),) * 2
                dst_grid = _model_grid(model, target.shape[1])
                if src_grid[0] * src_grid[1] == value.shape[1] and \
                        dst_grid[0] * dst_grid[1] == target.shape[1]:
                    new = resize_absolute_pos_embed(value, src_grid, dst_grid)
                    report.resized[key] = (f'grid {tuple(src_grid)} -> {tuple(dst_grid)}, '
                                           'bicubic')
                    value = new
        if value.shape != target.shape:
            report.mismatched[key] = (tuple(value.shape), tuple(target.shape))
            report.unused[src] = 'shape does not fit the model'
            report.converted.pop(key, None)
            continue
        result[key] = value
        report.loaded.append(key)

    for key in targets:
        if key in result or key in report.mismatched:
            continue
        if re.match(r'^norm\d+\.(weight|bias)$', key):
            report.missing[key] = REASON_OUTPUT_NORM
        else:
            report.missing[key] = 'backbone tensor absent from the checkpoint'
    return result, report


def checkpoint_filter_fn(state_dict: Mapping, model: nn.Module, *, prefix: Optional[str] = None,
                         strict: bool = True) -> 'OrderedDict[str, Tensor]':
    """timm-style pure filter: a checkpoint dict of any supported format -> ``model``'s state dict.

    The result holds only keys the model has, with the model's shapes; load it with
    ``model.load_state_dict(result, strict=False)`` (per-output norms may be absent).
    :func:`convert_state_dict` returns the :class:`LoadReport` (what was dropped and why).

    Raises:
        ValueError: unknown format; and with ``strict`` (default) whatever
            :meth:`LoadReport.check` refuses (nothing loaded, shape mismatch, missing tensors).
    """
    result, report = convert_state_dict(state_dict, model, prefix=prefix)
    if strict:
        report.check()
    return result


def _trust_from_init_cfg(model: nn.Module) -> bool:
    cfg = getattr(model, 'init_cfg', None)
    return bool(isinstance(cfg, Mapping) and cfg.get('type') == 'Pretrained'
                and cfg.get('trust_pickle', False))


def load_pretrained(model: nn.Module, path: Union[str, os.PathLike], prefix: Optional[str] = None,
                    trust_pickle: Optional[bool] = None, logger: Any = 'current') -> LoadReport:
    """Load a checkpoint file of any supported format into ``model`` and log the report.

    Per-output norms the file lacks are set to weight 1, bias 0.

    Args:
        model: a SwinBackbone (or a module with the same parameter names).
        path: the checkpoint, a local file.
        prefix: keep only the keys under this prefix (mmengine's ``prefix`` of ``Pretrained``).
        trust_pickle: allow arbitrary pickled objects (trusted legacy files only). ``None`` reads
            ``model.init_cfg['trust_pickle']`` (``init_cfg=dict(type='Pretrained', checkpoint=...,
            trust_pickle=True)``), else False.
        logger: mmengine ``print_log`` logger.

    Raises:
        FileNotFoundError, UnsafeCheckpointError, ValueError: see :func:`read_checkpoint`; and
        ValueError (naming the keys and the right ``arch``) when nothing would load, a shape does
        not fit, or backbone tensors other than the per-output norms are missing.
    """
    if trust_pickle is None:
        trust_pickle = _trust_from_init_cfg(model)
    checkpoint = read_checkpoint(path, trust_pickle=trust_pickle)
    state, report = convert_state_dict(checkpoint, model, prefix=prefix, source=str(path))
    report.check()
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:  # convert_state_dict keeps model keys only: a bug if it happens
        raise RuntimeError(f'unexpected keys after conversion: {result.unexpected_keys[:5]}')
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in report.expected_missing:
            if key in params:
                params[key].fill_(1.0 if key.endswith('weight') else 0.0)
    print_log(str(report), logger=logger)
    return report


def _atomic_write(dst: Path, write: Callable[[str], None]) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{dst.name}.', suffix='.tmp', dir=str(dst.parent))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename durable
        dir_fd = os.open(str(dst.parent), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - e.g. platforms without directory fsync
        pass


def _build_target(model_or_arch: Any, state: Mapping[str, Tensor],
                  window_size: Optional[int]) -> nn.Module:
    """The model to convert for: given, or a SwinBackbone shaped like ``state`` with overrides."""
    from .backbone import SwinBackbone
    if isinstance(model_or_arch, nn.Module):
        return model_or_arch
    if model_or_arch is not None and not isinstance(model_or_arch, (str, Mapping)):
        raise TypeError(f'model_or_arch must be a module, an arch name, a dict or None, '
                        f'got {type(model_or_arch).__name__}')
    kwargs: dict = {}
    try:  # start from the file's own shape (abs pos embed, mlp ratio, patch size ...)
        arch = infer_arch(state)
        kwargs = {k: arch[k] for k in ('embed_dims', 'depths', 'num_heads', 'window_size',
                                       'patch_size', 'in_channels', 'patch_norm', 'qkv_bias',
                                       'mlp_ratio', 'use_abs_pos_embed', 'pretrain_img_size')
                  if arch.get(k) is not None}
    except ValueError:
        if model_or_arch is None:
            raise
    explicit = (dict(arch=model_or_arch) if isinstance(model_or_arch, str)
                else dict(model_or_arch or {}))
    if 'arch' in explicit:  # the variant defines these; a different file then fails with advice
        for k in ('embed_dims', 'depths', 'num_heads'):
            kwargs.pop(k, None)
    kwargs.update(explicit)
    if window_size is not None:
        kwargs['window_size'] = window_size
    depths = kwargs.get('depths') or ARCH_SETTINGS.get(kwargs.get('arch', 'tiny'), {}).get(
        'depths', (2, 2, 6, 2))
    kwargs.setdefault('strides', (kwargs.get('patch_size', 4),) + (2,) * (len(depths) - 1))
    kwargs.setdefault('out_indices', tuple(range(len(depths))))
    return SwinBackbone(**kwargs)


def convert_checkpoint(src: Union[str, os.PathLike], dst: Union[str, os.PathLike],
                       model_or_arch: Any = None, *, window_size: Optional[int] = None,
                       prefix: Optional[str] = None, trust_pickle: bool = False,
                       logger: Any = 'current') -> LoadReport:
    """Convert ``src`` (any supported format) to our native layout at ``dst``, atomically.

    ``dst`` ending in ``.safetensors`` gets a safetensors file, anything else a torch file
    ``{'state_dict': {...}, 'meta': {...}}`` (plain strings only: loads with ``weights_only``).
    Keys are bare (``stages.0...``, as mmseg backbone files); per-output norms the source lacks
    are not written, so a later load reports them again.

    Args:
        src, dst: source and destination files.
        model_or_arch: the target SwinBackbone, an arch name ('tiny', ...), a dict of
            SwinBackbone kwargs, or None to take the shape from ``src``.
        window_size: target window (relative-position tables are resized), when building the model.
        prefix, trust_pickle, logger: as :func:`load_pretrained`.
    """
    src, dst = Path(src), Path(dst)
    checkpoint = read_checkpoint(src, trust_pickle=trust_pickle)
    if isinstance(model_or_arch, nn.Module):
        if window_size is not None and getattr(model_or_arch, 'window_size', None) != window_size:
            raise ValueError('window_size is set by the model given; do not pass both')
        model = model_or_arch
    else:
        unwrapped = _unwrap(checkpoint, prefix)
        fmt = _refine_format(_detect_layout(unwrapped.state.keys()), unwrapped)
        model = _build_target(model_or_arch, _MAPPERS[fmt](unwrapped.state).tensors, window_size)
    state, report = convert_state_dict(checkpoint, model, prefix=prefix, source=str(src))
    report.check()
    state = OrderedDict((k, v.detach().clone().contiguous()) for k, v in state.items())
    meta = {'converted_from': str(src), 'source_format': report.format,
            'converted_by': 'swin_dense.checkpoint.convert_checkpoint',
            'arch': _describe_arch(report.model_arch)}

    if dst.suffix == '.safetensors':
        from safetensors.torch import save_file

        def write(tmp: str) -> None:
            save_file(dict(state), tmp, metadata=meta)
    else:
        def write(tmp: str) -> None:
            torch.save({'state_dict': state, 'meta': meta}, tmp)
    _atomic_write(dst, write)
    report.notes.append(f'written to {dst} ({len(state)} tensors, native layout)')
    print_log(str(report), logger=logger)
    return report
