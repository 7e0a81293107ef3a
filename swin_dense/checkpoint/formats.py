"""Recognising the layout of a Swin checkpoint, and one pure mapper per layout to ours.

Every function here works on dicts of tensors; nothing reads files or knows the model.

Supported source layouts (:data:`FORMATS`), with what the mapping does:

=============  ====================================================================================
native         ours = mmdet 3.x / mmseg 1.x ``SwinTransformer`` (``stages.i.blocks.j.attn.w_msa``,
               ``ffn.layers.0.0``, ``patch_embed.projection``, PatchMerging in nn.Unfold order),
               which mmdet 2.x / mmseg 0.x model-zoo files also use. Bare backbone files (mmseg)
               or detector / segmentor files (``backbone.`` prefix).
mmpretrain     mmcls 0.x / mmpretrain 1.x classifiers: the native naming under ``backbone.`` plus
               ``head.fc``; same Unfold channel order; their final norm is ``norm3`` (legacy mmcls
               files: ``norm``), loaded into our ``norm3`` as mmpretrain and mmdet themselves do.
official       microsoft/Swin-Transformer classification (``{'model': ...}``): ``layers.i``,
               ``attn.qkv``, ``mlp.fc1``, ``patch_embed.proj``, ``layers.i.downsample`` at the end
               of stage i, ``norm`` (final), ``head`` (1K or 22K). PatchMerging concat order
               ``[x(0::2,0::2), x(1::2,0::2), x(0::2,1::2), x(1::2,1::2)]`` -> reordered to Unfold.
official_det   the official detection / segmentation repositories (mmdet 2.x / mmseg 0.x based):
               the official naming under ``backbone.``, trained per-output ``norm{i}``,
               ``absolute_pos_embed`` as (1, C, H, W).
timm           timm >= 0.9 ``SwinTransformer``: official naming but ``layers.i.downsample`` at the
               START of stage i (i >= 1), ``head.fc``; ``layers_i`` in ``features_only`` models.
               Its PatchMerging, ``reshape(B, H/2, 2, W/2, 2, C).permute(0, 1, 3, 4, 2, 5)``,
               yields the official order (dx-major, dy-minor), so it is reordered like official.
torchvision    ``torchvision.models.swin_t/s/b``: ``features.0.{0,2}`` patch embedding,
               ``features.{1,3,5,7}.j`` blocks (``attn.qkv``, ``mlp.0``, ``mlp.3``),
               ``features.{2,4,6}`` PatchMerging (official order), ``norm``, ``head``.
=============  ====================================================================================

Always: ``relative_position_index`` / ``attn_mask`` buffers are dropped (the model rebuilds them).

The mappers walk a naming family with :mod:`.mapping` (shared with Swin V2); what is V1's here is
the :data:`V1` dialect: its block names, its PatchMerging reorder and its absolute position
embedding.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import torch.nn as nn
from torch import Tensor

from .mapping import REASON_FINAL_NORM, REASON_HEAD  # noqa: F401  (reasons the report shows)
from .mapping import (NATIVE_BLOCK, Dialect, MappedState, map_native_family, map_official_family,
                      map_torchvision_family)

__all__ = ['FORMATS', 'FORMAT_DESCRIPTIONS', 'MAPPERS', 'MappedState', 'detect_format',
           'detect_layout', 'official_to_unfold_norm', 'official_to_unfold_reduction',
           'unwrap_state_dict']

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
REASON_REORDER = ('PatchMerging channels reordered from the official 2x2 concat order to '
                  "nn.Unfold order (mmdet's swin_converter)")

#: Why timm's ``swinv2_cr_*`` files are refused (by SwinBackbone and SwinV2Backbone alike).
SWINV2_CR_REFUSAL = (
    "this is a timm swinv2_cr_* checkpoint (meta_mlp keys), a different design from Swin V2: "
    'its position MLP reads natural-log coordinates that no pretrained window normalises and has '
    'no 16 * sigmoid, its logit scale is one value per head, its qkv has a full bias and its '
    'PatchMerging normalises before the reduction, so none of its weights mean the same thing in '
    "SwinV2Backbone. Use timm's SwinTransformerV2Cr for it, or take a Swin V2 file (the official "
    "swinv2_*_256 / 22k files, timm swinv2_*, torchvision swin_v2_t/s/b, mmpretrain "
    'SwinTransformerV2) for SwinV2Backbone')

#: Buffers of the source models that ours rebuilds instead of loading.
BUFFER_NAMES = ('relative_position_index', 'attn_mask', 'relative_coords_table')
_CONTAINER_KEYS = ('state_dict', 'model', 'module', 'state_dict_ema', 'model_ema')


# =====================================================================================
# Unwrapping: container key, DataParallel prefix, backbone prefix
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
class Unwrapped:
    """The backbone tensors of a checkpoint, what was left aside (key -> reason) and why."""

    state: 'OrderedDict[str, Tensor]'
    unused: dict
    notes: list
    had_backbone_prefix: bool


def _take_container(checkpoint: Mapping, notes: list) -> Mapping:
    for key in _CONTAINER_KEYS:  # training checkpoints: take the first container present
        value = checkpoint.get(key)
        if isinstance(value, nn.Module):
            value = value.state_dict()
        if isinstance(value, Mapping):
            others = [k for k in _CONTAINER_KEYS if k != key and _is_tensor_dict(checkpoint.get(k))]
            if others:
                notes.append(f'weights taken from {key!r}; the file also holds {others} (not used)')
            return value
    return checkpoint


def unwrap(checkpoint: Mapping, prefix: Optional[str] = None) -> Unwrapped:
    """Split a checkpoint dict into the backbone's tensors and the rest (see
    :func:`unwrap_state_dict`)."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'expected a checkpoint dict, got {type(checkpoint).__name__}')
    notes, unused = [], {}
    state = _take_container(checkpoint, notes)
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
    return Unwrapped(tensors, unused, notes, had_backbone_prefix)


def unwrap_state_dict(checkpoint: Mapping,
                      prefix: Optional[str] = None) -> 'OrderedDict[str, Tensor]':
    """The backbone tensors of a checkpoint dict: container key, ``module.``, prefix removed.

    Takes ``state_dict`` / ``model`` / ``module`` / ``state_dict_ema`` (in that order of
    preference) when the dict is a training checkpoint; strips ``module.``; keeps the keys under
    ``prefix`` (mmengine's meaning) or, without one, under ``backbone.`` when there are such keys.
    """
    return unwrap(checkpoint, prefix).state


# =====================================================================================
# Detection
# =====================================================================================
_TV_BLOCK = re.compile(r'^features\.(\d+)\.(\d+)\.attn\.qkv\.weight$')
_OFFICIAL_BLOCK = re.compile(r'^layers[._](\d+)\.blocks\.(\d+)\.attn\.qkv\.weight$')
_DOWNSAMPLE = re.compile(r'^layers[._](\d+)\.downsample\.')


def key_sample(keys: list) -> str:
    """The first few keys, to quote in an error."""
    return ', '.join(keys[:6]) + (', ...' if len(keys) > 6 else '')


def naming_family(keys: list) -> Optional[str]:
    """'torchvision', 'native' or 'official' (V1 or V2 keys, from their attention names), or
    None for keys of no Swin naming."""
    if any(_TV_BLOCK.match(k) for k in keys) and 'features.0.0.weight' in keys:
        return 'torchvision'
    if any(NATIVE_BLOCK.match(k) for k in keys):
        return 'native'
    if any(_OFFICIAL_BLOCK.match(k) for k in keys):
        return 'official'
    return None


def official_or_timm(keys: list) -> str:
    """'official' or 'timm' for keys of the official naming (V1 or V2): timm moved each
    downsample to the start of the next stage, so stage 0 has none."""
    stages = {int(m.group(1)) for m in map(_DOWNSAMPLE.match, keys) if m}
    if 0 in stages:  # official: stage 0 ends with a downsample; timm: stage 0 has none
        return 'official'
    if stages or 'head.fc.weight' in keys:
        return 'timm'
    return 'official'  # single stage: no downsample, both layouts coincide


def detect_layout(keys: Iterable[str]) -> str:
    """The naming family of backbone keys: native, official, timm or torchvision.

    Raises:
        ValueError: a Swin V2 checkpoint, or keys of no supported layout (a few are quoted).
    """
    keys = list(keys)
    if any('meta_mlp' in k for k in keys):
        raise ValueError(SWINV2_CR_REFUSAL)
    if any(('logit_scale' in k or 'cpb_mlp' in k or 'rpe_mlp' in k) for k in keys):
        raise ValueError('this is a Swin Transformer V2 checkpoint (logit_scale / cpb_mlp keys); '
                         "SwinBackbone implements Swin V1 and cannot use it: build "
                         "SwinV2Backbone (backbone=dict(type='SwinV2Backbone', ...)) for V2 files")
    family = naming_family(keys)
    if family == 'official':
        return official_or_timm(keys)
    if family is not None:
        return family
    raise ValueError(f'not a Swin Transformer checkpoint of a supported format; its keys look '
                     f'like: {key_sample(keys)}. Supported formats: {", ".join(FORMATS)} '
                     '(see swin_dense/checkpoint/formats.py)')


def refine_format(layout: str, unwrapped: Unwrapped) -> str:
    """Tell apart the formats that share a naming family, from what surrounds the backbone."""
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
    unwrapped = unwrap(state_dict)
    return refine_format(detect_layout(unwrapped.state.keys()), unwrapped)


# =====================================================================================
# PatchMerging channel order
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


def _put_concat_merging(out: MappedState, ours: str, src: str, value: Tensor) -> None:
    """V1 PatchMerging (norm BEFORE the reduction, 4C wide): every tensor is reordered."""
    if ours.endswith('reduction.weight'):
        value = official_to_unfold_reduction(value)
    else:
        value = official_to_unfold_norm(value)
    out.put(ours, src, value)
    out.converted[ours] = REASON_REORDER


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


def _put_absolute_pos_embed(out: MappedState, key: str, value: Tensor) -> bool:
    if key != 'absolute_pos_embed':
        return False
    if value.dim() == 4:  # the detection repository: (1, C, H, W)
        out.pos_grid = tuple(value.shape[2:])
        value = value.flatten(2).transpose(1, 2)
    out.put(key, key, value)
    return True


#: What Swin V1 changes in the naming families (see :mod:`.mapping`).
V1 = Dialect(block_suffix=_block_suffix, put_concat_merging=_put_concat_merging,
             set_aside={name: REASON_BUFFER for name in BUFFER_NAMES},
             not_backbone='not a Swin backbone tensor',
             extra_official_key=_put_absolute_pos_embed)


# =====================================================================================
# Mappers: one pure function per source layout, source state -> MappedState (our names)
# =====================================================================================
def map_official(state: Mapping[str, Tensor]) -> MappedState:
    """microsoft/Swin-Transformer classification: downsample at the end of its stage."""
    return map_official_family(state, V1, downsample_offset=0)


def map_official_det(state: Mapping[str, Tensor]) -> MappedState:
    """The official detection / segmentation repositories: the classification naming, plus
    per-output ``norm{i}`` and a (1, C, H, W) ``absolute_pos_embed``."""
    return map_official_family(state, V1, downsample_offset=0)


def map_timm(state: Mapping[str, Tensor]) -> MappedState:
    """timm >= 0.9: ``layers.i.downsample`` (i >= 1) belongs to the end of our stage i - 1."""
    return map_official_family(state, V1, downsample_offset=-1)


def map_torchvision(state: Mapping[str, Tensor]) -> MappedState:
    """``features.0`` patch embedding, ``features.{2i+1}`` stage i, ``features.{2i+2}`` merging."""
    return map_torchvision_family(state, V1)


def map_native(state: Mapping[str, Tensor]) -> MappedState:
    """Ours / mmdet / mmseg: names and channel order already match; buffers are dropped."""
    return map_native_family(state, V1)


def map_mmpretrain(state: Mapping[str, Tensor]) -> MappedState:
    """mmpretrain / mmcls: the native naming; a legacy final ``norm.`` becomes ``norm{last}``."""
    return map_native_family(state, V1, legacy_final_norm=True)


#: The mapper of each format.
MAPPERS: dict[str, Callable[[Mapping[str, Tensor]], MappedState]] = {
    'native': map_native, 'mmpretrain': map_mmpretrain, 'official': map_official,
    'official_det': map_official_det, 'timm': map_timm, 'torchvision': map_torchvision,
}
