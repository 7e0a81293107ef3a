"""Converting a checkpoint to a model's layout, and loading it, by every path.

* :func:`load_pretrained` - what ``init_cfg=dict(type='Pretrained', checkpoint=PATH)`` calls:
  read, convert, load, log a :class:`LoadReport`; a partial or mismatched load is an error,
  never a silent warning.
* :func:`checkpoint_filter_fn` - timm-style pure filter: any supported checkpoint dict -> our
  state dict; :func:`convert_state_dict` returns the :class:`LoadReport` beside it.
* :func:`convert_state_dict_on_load` - the backbone's ``load_state_dict`` pre-hook: whatever
  loads a whole detector or segmentor (mmengine's ``load_checkpoint``, hence ``load_from``,
  ``tools/test.py``, mmdet's ``init_detector``, mmseg's ``init_model``; or plain
  ``load_state_dict``) hands the backbone its slice of the state dict, which the hook converts
  in place from any supported layout, so the rest of the model loads as the toolkit does.

Always: the model's ``relative_position_bias_table`` is filled bicubically per head when the
checkpoint's window differs (as mmdet / mmseg do), ``absolute_pos_embed`` bicubically over its
grid when the grid differs.

Swin V2 models (a SwinV2Backbone, recognised by its attributes and parameter names) take the
same entry points: the V2 layouts are detected, mapped and their coordinate tables fitted by
:mod:`.formats_v2` and :mod:`.load_v2`. Both versions check the mapped tensors against the model
with the one loop of :mod:`.conversion`; V1's resizing is the :class:`_Resize` fitting here.

Nothing here imports the backbone: the model is always given, and read through its state dict
and a few attributes (``embed_dims``, ``depths``, ``num_heads``, ``window_size``,
``out_indices``, ``pos_embed_grid``).
"""
from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import print_log
from torch import Tensor

from .conversion import (Fitting, block_tensors, convert_mapped, stem_and_depths,
                         with_variant_name)
from .formats import (BUFFER_NAMES, MAPPERS, REASON_BUFFER, Unwrapped, detect_layout,
                      refine_format)
from .formats_v2 import detect_v2_layout, is_v2_state, refine_v2_format, unwrap_and_detect
from .io import read_checkpoint
from .load_v2 import convert_v2, infer_arch_v2, is_v2_model, kept_tables
from .report import LoadReport

__all__ = ['checkpoint_filter_fn', 'convert_state_dict', 'convert_state_dict_on_load',
           'infer_arch', 'load_pretrained', 'resize_absolute_pos_embed',
           'resize_relative_position_bias_table']


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
# Architecture of a (mapped) state dict, and of a model
# =====================================================================================
def infer_arch(state: Mapping[str, Tensor]) -> dict:
    """SwinBackbone keyword arguments that fit a state dict in our layout.

    Returns e.g. ``dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
    window_size=7, ...)``, plus ``'arch'`` ('tiny', ...) when the shape is a published variant.
    A Swin V2 state dict (our V2 layout) gives SwinV2Backbone's arguments instead, with
    ``version=2`` (see :func:`~swin_dense.checkpoint.load_v2.infer_arch_v2`).
    """
    if is_v2_state(state):
        return infer_arch_v2(state)
    embed_dims, in_channels, patch, depths = stem_and_depths(state)
    heads: dict[int, int] = {}
    window = None
    for stage, _, key, value in block_tensors(state):
        if key.endswith('relative_position_bias_table') and value.dim() == 2:
            heads[stage] = value.shape[1]
            window = (math.isqrt(value.shape[0]) + 1) // 2
    arch = dict(embed_dims=embed_dims, depths=depths,
                num_heads=tuple(heads.get(i, 0) for i in range(len(depths))), window_size=window,
                patch_size=patch, in_channels=in_channels,
                patch_norm='patch_embed.norm.weight' in state,
                qkv_bias='stages.0.blocks.0.attn.w_msa.qkv.bias' in state)
    fc1 = state.get('stages.0.blocks.0.ffn.layers.0.0.weight')
    if fc1 is not None:
        arch['mlp_ratio'] = fc1.shape[0] / embed_dims
    pos = state.get('absolute_pos_embed')
    arch['use_abs_pos_embed'] = pos is not None
    if pos is not None:
        side = math.isqrt(pos.shape[1])
        arch['pretrain_img_size'] = side * patch
    return with_variant_name(arch)


def _model_arch(model: nn.Module) -> Optional[dict]:
    if all(hasattr(model, a) for a in ('embed_dims', 'depths', 'num_heads', 'window_size')):
        return with_variant_name(dict(embed_dims=model.embed_dims, depths=tuple(model.depths),
                                      num_heads=tuple(model.num_heads),
                                      window_size=model.window_size))
    return None


def _model_grid(model: nn.Module, length: int) -> tuple:
    grid = getattr(model, 'pos_embed_grid', None)
    if grid is not None:
        return tuple(grid)
    side = math.isqrt(length)
    return side, side


# =====================================================================================
# Conversion (pure: reads the model, never changes it)
# =====================================================================================
class _Resize(Fitting):
    """V1: relative-position tables and the absolute position embedding resized to the model."""

    def __init__(self, model: nn.Module, pos_grid: Optional[tuple]):
        super().__init__(model)
        self.pos_grid = pos_grid

    def unused(self, key: str) -> str:
        if key == 'absolute_pos_embed':
            return 'absolute position embedding; the model has use_abs_pos_embed=False'
        return super().unused(key)

    def fit(self, key: str, src: str, value: Tensor, target: Tensor,
            report: LoadReport) -> Tensor:
        """``value`` resized to ``target``'s shape where a resize is defined (else unchanged)."""
        if value.shape == target.shape:
            return value
        if key.endswith('relative_position_bias_table') and value.dim() == 2 \
                and value.shape[1] == target.shape[1] \
                and math.isqrt(value.shape[0]) ** 2 == value.shape[0] \
                and math.isqrt(target.shape[0]) ** 2 == target.shape[0]:
            m1 = (math.isqrt(value.shape[0]) + 1) // 2
            m2 = (math.isqrt(target.shape[0]) + 1) // 2
            new = resize_relative_position_bias_table(value, m2)
            report.resized[key] = (f'{tuple(value.shape)} -> {tuple(new.shape)}, '
                                   f'window {m1} -> {m2}, bicubic per head')
            return new
        if key == 'absolute_pos_embed' and value.dim() == 3 and target.dim() == 3 \
                and value.shape[2] == target.shape[2]:
            src_grid = self.pos_grid or (math.isqrt(value.shape[1]),) * 2
            dst_grid = _model_grid(self.model, target.shape[1])
            if src_grid[0] * src_grid[1] == value.shape[1] and \
                    dst_grid[0] * dst_grid[1] == target.shape[1]:
                report.resized[key] = f'grid {tuple(src_grid)} -> {tuple(dst_grid)}, bicubic'
                return resize_absolute_pos_embed(value, src_grid, dst_grid)
        return value


def _convert(unwrapped: Unwrapped, fmt: str, model: nn.Module, source: str
             ) -> tuple['OrderedDict[str, Tensor]', LoadReport, dict]:
    """Map, resize and check shapes; returns (our state, report, our key -> source key)."""
    mapped = MAPPERS[fmt](unwrapped.state)
    return convert_mapped(unwrapped, fmt, mapped, model, source, rebuilt=BUFFER_NAMES,
                          fitting=_Resize(model, mapped.pos_grid), infer_arch=infer_arch,
                          model_arch=_model_arch(model), model_name='SwinBackbone')


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
    v2 = is_v2_model(model)
    unwrapped, fmt = unwrap_and_detect(checkpoint, prefix, v2=v2)
    result, report, _ = (convert_v2 if v2 else _convert)(unwrapped, fmt, model, source)
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


# =====================================================================================
# Loading a file into a backbone (init_cfg=dict(type='Pretrained', ...))
# =====================================================================================
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


# =====================================================================================
# Loading a whole model: the backbone's load_state_dict pre-hook
# =====================================================================================
def _in_own_layout(local: Mapping[str, Any], own: Mapping[str, Tensor]) -> bool:
    return all(isinstance(v, Tensor) and k in own and own[k].shape == v.shape
               for k, v in local.items())


def _layout_of_slice(local: Mapping[str, Any], own: Mapping[str, Tensor], prefix: str,
                     name: str, v2: bool) -> str:
    try:
        return detect_v2_layout(local.keys()) if v2 else detect_layout(local.keys())
    except ValueError as error:
        if all(k in own or k.rsplit('.', 1)[-1] in BUFFER_NAMES for k in local):
            # a partial state dict in our naming (no attention weights in it)
            return 'native_v2' if v2 else 'native'
        where = f'under {prefix!r}' if prefix else 'given'
        raise ValueError(
            f'{name} cannot load the weights {where}: {error}. Loading stopped here: the '
            'backbone would otherwise keep its current (random) weights') from error


def convert_state_dict_on_load(module: nn.Module, state_dict: dict, prefix: str,
                               local_metadata: dict, strict: bool, missing_keys: list,
                               unexpected_keys: list, error_msgs: list) -> None:
    """``load_state_dict`` pre-hook of SwinBackbone and SwinV2Backbone: convert the backbone's
    slice of ``state_dict`` in place.

    ``state_dict`` holds the backbone's keys under ``prefix`` (``'backbone.'`` in a detector,
    ``''`` when the backbone itself is loaded). Keys already in the model's layout and shapes
    pass untouched. Otherwise the layout is detected and the keys are renamed, PatchMerging
    channels reordered, rebuilt buffers dropped and relative-position tables / the absolute
    position embedding resized, and a :class:`LoadReport` is logged. Source keys the model has no
    place for stay in ``state_dict`` under their names, so the loader lists them as unexpected.

    Raises:
        ValueError: the slice is in no supported layout, or in a supported one whose shapes or
            depths do not fit the model (names the right ``arch``). Backbone tensors the slice
            lacks are no error here: the loader reports missing keys as it always does.
    """
    cls_name = type(module).__name__
    keys = [k for k in state_dict if k.startswith(prefix)]
    if not keys:
        print_log(f'{cls_name}: the state dict being loaded holds no key under {prefix!r}; the '
                  'backbone keeps its current weights', logger='current', level=logging.WARNING)
        return
    local = OrderedDict((k[len(prefix):], state_dict[k]) for k in keys)
    own = module.state_dict()
    if _in_own_layout(local, own):
        if prefix:  # a whole-model load (a bare backbone load is logged by its caller)
            print_log(f'{cls_name} ({prefix!r}): {len(local)} of {len(own)} tensors in its own '
                      'layout, loaded as they are', logger='current')
        return

    v2 = is_v2_model(module)
    layout = _layout_of_slice(local, own, prefix, cls_name, v2)
    unwrapped = Unwrapped(local, {}, [], had_backbone_prefix=bool(prefix))
    source = (f'the state dict loaded into the model (keys under {prefix!r})' if prefix
              else 'the state dict given to load_state_dict')
    fmt = (refine_v2_format if v2 else refine_format)(layout, unwrapped)
    state, report, origin = (convert_v2 if v2 else _convert)(unwrapped, fmt, module, source)
    report.check(allow_missing=True)

    consumed = {origin[k] for k in state}
    for key in keys:
        name = key[len(prefix):]
        if name in consumed or report.unused.get(name) == REASON_BUFFER:
            del state_dict[key]
    for key, value in state.items():
        state_dict[prefix + key] = value
    if v2:  # tables the file lacks: the model's own (its pretrained windows), not missing keys
        for key, value in kept_tables(report, module).items():
            state_dict[prefix + key] = value
    if report.missing:
        report.notes.append('tensors the state dict lacks keep their current values (the loader '
                            'lists them as missing keys)')
    print_log(str(report), logger='current',
              level=logging.WARNING if report.unexpected_missing else logging.INFO)
