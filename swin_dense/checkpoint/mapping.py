"""The mappers' shared walk: one pure function per naming family, for Swin V1 and V2 alike.

A source layout belongs to one of three naming families: the official one (microsoft, timm: the
``layers.i`` names), torchvision's (``features.k``) and ours (``stages.i``, also mmdet, mmseg and
mmpretrain). A family names a V1 and a V2 checkpoint the same way; what the version changes is
described by a :class:`Dialect` (how a block parameter is renamed, how a PatchMerging tensor in
the 2x2 concat order is made ours, which buffers are left out), given by :mod:`.formats` (V1) and
:mod:`.formats_v2` (V2), whose small mappers call the walks below.

Every function here works on dicts of tensors; nothing reads files or knows the model.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional

from torch import Tensor

__all__ = ['Dialect', 'MappedState', 'map_native_family', 'map_official_family',
           'map_torchvision_family']

REASON_HEAD = 'classifier head'
REASON_FINAL_NORM = ('final norm of the classifier; a dense backbone normalises each output with '
                     'its own norm{i} instead')
REASON_EARLY_MERGING = 'downsample before the first stage (unexpected)'

NATIVE_BLOCK = re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.qkv\.weight$')
OFFICIAL_MLP = {'mlp.fc1.': 'ffn.layers.0.0.', 'mlp.fc2.': 'ffn.layers.1.'}
TV_MLP = {'mlp.0.': 'ffn.layers.0.0.', 'mlp.3.': 'ffn.layers.1.'}


@dataclass
class MappedState:
    """A source state dict under our names, with where each tensor came from."""

    tensors: 'OrderedDict[str, Tensor]' = field(default_factory=OrderedDict)
    origin: dict = field(default_factory=dict)  # our key -> source key
    unused: dict = field(default_factory=dict)  # source key -> reason
    converted: dict = field(default_factory=dict)  # our key -> what was done
    pos_grid: Optional[tuple] = None  # source grid of absolute_pos_embed, when known

    def put(self, ours: str, src: str, value: Tensor) -> None:
        self.tensors[ours] = value
        self.origin[ours] = src


#: ``(out, our key, source key, value)``: put a PatchMerging tensor of a concat-order source.
MergingHandler = Callable[[MappedState, str, str, Tensor], None]
#: ``(out, source key, value)``: map a key only one version has; False when it is not one.
ExtraKeyHandler = Callable[[MappedState, str, Tensor], bool]


@dataclass(frozen=True)
class Dialect:
    """What a Swin version changes in the names and tensors of every naming family."""

    block_suffix: Callable[[str, Mapping[str, str]], Optional[str]]
    """A block parameter name (after ``blocks.j.``) and the family's MLP names -> ours, or None."""
    put_concat_merging: MergingHandler
    """A PatchMerging tensor of the official 2x2 concat order, made ours."""
    set_aside: Mapping[str, str]
    """Last name of a buffer the model rebuilds (or has no use for) -> why it is left out."""
    not_backbone: str
    """Why a key of no backbone tensor is left out."""
    extra_official_key: ExtraKeyHandler = lambda out, key, value: False
    """Official-family keys only this version has (V1: the absolute position embedding)."""


def head_reason(state: Mapping[str, Tensor]) -> Callable[[str], str]:
    for k in ('head.weight', 'head.fc.weight'):
        if k in state and state[k].dim() == 2:
            return lambda key, n=state[k].shape[0]: f'{REASON_HEAD} ({n} classes)'
    return lambda key: REASON_HEAD


def _to_place(state: Mapping[str, Tensor], dialect: Dialect,
              out: MappedState) -> Iterator[tuple[str, Tensor]]:
    """The items of ``state`` a mapper has to place: all but the keys every layout leaves out
    (the version's rebuilt buffers, classifier heads), which go to ``out.unused``."""
    head = head_reason(state)
    for key, value in state.items():
        reason = dialect.set_aside.get(key.rsplit('.', 1)[-1])
        if reason is None and key.startswith('head.'):
            reason = head(key)
        if reason is None:
            yield key, value
        else:
            out.unused[key] = reason


def _put_block(out: MappedState, key: str, stage: int, block: str, suffix: str,
               mlp: Mapping[str, str], dialect: Dialect, value: Tensor) -> None:
    ours = dialect.block_suffix(suffix, mlp)
    if ours is None:
        out.unused[key] = 'unknown block parameter'
    else:
        out.put(f'stages.{stage}.blocks.{block}.{ours}', key, value)


def _put_concat_merging(out: MappedState, key: str, stage: int, name: str, dialect: Dialect,
                        value: Tensor) -> None:
    """A concat-order PatchMerging tensor ``name`` that ends stage ``stage``."""
    if stage < 0:
        out.unused[key] = REASON_EARLY_MERGING
    else:
        dialect.put_concat_merging(out, f'stages.{stage}.downsample.{name}', key, value)


_OFFICIAL_BLOCK_KEY = re.compile(r'^layers[._](\d+)\.blocks\.(\d+)\.(.+)$')
_OFFICIAL_MERGING_KEY = re.compile(
    r'^layers[._](\d+)\.downsample\.((?:reduction|norm)\.(?:weight|bias))$')
_OUTPUT_NORM_KEY = re.compile(r'^norm\d+\.(weight|bias)$')


def map_official_family(state: Mapping[str, Tensor], dialect: Dialect,
                        downsample_offset: int) -> MappedState:
    """The microsoft naming: ``layers.i`` (timm ``features_only``: ``layers_i``), ``attn.qkv``,
    ``mlp.fc1``, ``patch_embed.proj``.

    ``downsample_offset`` is the stage a ``layers.i.downsample`` belongs to, relative to ``i``:
    0 where it ends stage i (official), -1 where it starts it (timm).
    """
    out = MappedState()
    for key, value in _to_place(state, dialect, out):
        if key.startswith('patch_embed.'):
            out.put(key.replace('patch_embed.proj.', 'patch_embed.projection.'), key, value)
        elif m := _OFFICIAL_BLOCK_KEY.match(key):
            _put_block(out, key, int(m.group(1)), m.group(2), m.group(3), OFFICIAL_MLP, dialect,
                       value)
        elif m := _OFFICIAL_MERGING_KEY.match(key):
            _put_concat_merging(out, key, int(m.group(1)) + downsample_offset, m.group(2),
                                dialect, value)
        elif _OUTPUT_NORM_KEY.match(key):  # the detection repository's per-output norms
            out.put(key, key, value)
        elif key.startswith('norm.'):
            out.unused[key] = REASON_FINAL_NORM
        elif not dialect.extra_official_key(out, key, value):
            out.unused[key] = dialect.not_backbone
    return out


_TV_PATCH_EMBED = {'0.weight': 'patch_embed.projection.weight',
                   '0.bias': 'patch_embed.projection.bias',
                   '2.weight': 'patch_embed.norm.weight', '2.bias': 'patch_embed.norm.bias'}
_TV_FEATURE = re.compile(r'^features\.(\d+)\.(.+)$')
#: ``(out, source key, stage, block, value)``: torchvision's fused ``attn.qkv.bias``.
QkvBiasHandler = Callable[[MappedState, str, int, str, Tensor], None]


def map_torchvision_family(state: Mapping[str, Tensor], dialect: Dialect,
                           put_qkv_bias: Optional[QkvBiasHandler] = None) -> MappedState:
    """``features.0`` patch embedding, ``features.{2i+1}`` stage i, ``features.{2i+2}`` merging.

    ``put_qkv_bias`` maps a block's ``attn.qkv.bias`` when the version does not keep it whole.
    """
    out = MappedState()
    for key, value in _to_place(state, dialect, out):
        m = _TV_FEATURE.match(key)
        if m is None:
            out.unused[key] = REASON_FINAL_NORM if key.startswith('norm.') else dialect.not_backbone
            continue
        index, rest = int(m.group(1)), m.group(2)
        if index == 0:  # Sequential(Conv2d, Permute, LayerNorm)
            if rest in _TV_PATCH_EMBED:
                out.put(_TV_PATCH_EMBED[rest], key, value)
            else:
                out.unused[key] = dialect.not_backbone
        elif index % 2 == 1:  # stage (index - 1) // 2: a Sequential of blocks
            block, _, suffix = rest.partition('.')
            stage = (index - 1) // 2
            if not block.isdigit():
                out.unused[key] = 'unknown block parameter'
            elif suffix == 'attn.qkv.bias' and put_qkv_bias is not None:
                put_qkv_bias(out, key, stage, block, value)
            else:
                _put_block(out, key, stage, block, suffix, TV_MLP, dialect, value)
        elif rest in ('reduction.weight', 'norm.weight', 'norm.bias'):  # ends stage index//2 - 1
            _put_concat_merging(out, key, index // 2 - 1, rest, dialect, value)
        else:
            out.unused[key] = 'unknown PatchMerging parameter'
    return out


_NATIVE_MERGING_KEY = re.compile(r'^stages\.(\d+)\.downsample\.(.+)$')


def map_native_family(state: Mapping[str, Tensor], dialect: Dialect, *,
                      downsample_offset: int = 0, moved_reason: str = '',
                      legacy_final_norm: bool = False) -> MappedState:
    """Our naming (mmdet, mmseg, mmpretrain): names and channel order already match.

    ``downsample_offset`` -1: ``stages.i.downsample`` starts stage i (mmpretrain's V2) and moves
    to the end of stage i - 1 (``moved_reason`` says so). ``legacy_final_norm``: a final
    ``norm.`` (mmcls < 0.21) is loaded as the last stage's ``norm{last}``, as mmpretrain does.
    """
    out = MappedState()
    last = max((int(m.group(1)) for m in map(NATIVE_BLOCK.match, state) if m), default=0)
    for key, value in _to_place(state, dialect, out):
        m = _NATIVE_MERGING_KEY.match(key)
        if m and downsample_offset:
            stage = int(m.group(1)) + downsample_offset
            if stage < 0:
                out.unused[key] = REASON_EARLY_MERGING
            else:
                ours = f'stages.{stage}.downsample.{m.group(2)}'
                out.put(ours, key, value)
                out.converted[ours] = moved_reason
        elif key.startswith('norm.') and legacy_final_norm:
            ours = f'norm{last}.' + key[len('norm.'):]
            out.put(ours, key, value)
            out.converted[ours] = (f"legacy mmcls final norm 'norm.' loaded as norm{last}, "
                                   'as mmpretrain does')
        elif key.startswith('norm.'):
            out.unused[key] = REASON_FINAL_NORM
        else:
            out.put(key, key, value)
    return out
