"""Recognising the layout of a Swin V2 checkpoint, and one pure mapper per layout to ours.

Ours is :class:`SwinV2Backbone`'s state dict: mmpretrain's backbone names (``stages.i.blocks.j
.attn.w_msa``, ``ffn.layers.0.0``, ``patch_embed.projection``) with PatchMerging at the END of
stage i (``stages.i.downsample``, i = 0..2) in nn.Unfold column order, ``q_bias`` / ``v_bias``
and no ``qkv.bias``, a persistent ``relative_coords_table`` per block and one ``norm{i}`` per
output. Every function here works on dicts of tensors; nothing reads files or knows the model.

================  =================================================================================
native_v2         ours, bare (a converted file) or under ``backbone.`` (detector / segmentor files).
mmpretrain_v2     mmpretrain ``SwinTransformerV2``: our names, but ``stages.i.downsample`` STARTS
                  stage i (i >= 1), so it moves to the end of stage i - 1; its reduction is in
                  Unfold order already. ``norm3`` inside the blocks (huge / giant, an extra norm
                  every 6 blocks) is refused: SwinV2Backbone has no such norm.
official_v2       microsoft/Swin-Transformer (``{'model': ...}``): ``layers.i``, ``attn.qkv``,
                  ``mlp.fc1``, ``patch_embed.proj``, ``layers.i.downsample`` at the END of stage i,
                  final ``norm``, ``head`` (1K, or 21841 classes for 22K). Stored buffers:
                  ``relative_coords_table`` (used), ``relative_position_index`` and ``attn_mask``
                  (dropped). Older releases name the position MLP ``rpe_mlp``.
timm_v2           timm ``swinv2_*``: the official names with ``layers.i.downsample`` at the START of
                  stage i (i >= 1), ``head.fc``, no buffers (all non-persistent); ``layers_i`` in
                  ``features_only`` models.
torchvision_v2    torchvision ``swin_v2_t/s/b``: ``features.0.{0,2}``, blocks ``features.{2i+1}.j``
                  (``mlp.0`` / ``mlp.3``), PatchMerging ``features.{2,4,6}``, one ``qkv.bias`` of 3C
                  whose k third torchvision zeroes at every forward: its q and v thirds become
                  ``q_bias`` / ``v_bias``, the k third is dropped (and reported).
simmim_v2         the official SimMIM pre-training files: the official names under ``encoder.``
                  (``rpe_mlp``), beside a pixel decoder and a mask token (both left out).
================  =================================================================================

PatchMerging: official, timm and torchvision concatenate the 2x2 neighbours in the order
``[x(0::2,0::2), x(1::2,0::2), x(0::2,1::2), x(1::2,1::2)]``, so their ``reduction.weight``
columns are reordered to Unfold order; the V2 norm comes AFTER the reduction (2C wide) and keeps
its order. Coordinate tables pass through unchanged: the loader reads the pretrained window from
them and rebuilds them for the model's window.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Callable, Iterable, Mapping, Optional

from torch import Tensor

from .formats import (REASON_BUFFER, SWINV2_CR_REFUSAL, Unwrapped, detect_layout, key_sample,
                      naming_family, official_or_timm, official_to_unfold_reduction, refine_format,
                      unwrap)
from .mapping import (Dialect, MappedState, map_native_family, map_official_family,
                      map_torchvision_family)

__all__ = ['FORMATS_V2', 'FORMAT_V2_DESCRIPTIONS', 'MAPPERS_V2', 'detect_v2_format',
           'detect_v2_layout', 'is_v2_state', 'refine_v2_format', 'unwrap_and_detect', 'unwrap_v2']

#: Swin V2 source layouts :func:`detect_v2_format` recognises.
FORMATS_V2 = ('native_v2', 'mmpretrain_v2', 'official_v2', 'timm_v2', 'torchvision_v2',
              'simmim_v2')

FORMAT_V2_DESCRIPTIONS = {
    'native_v2': 'swin_dense SwinV2Backbone layout (bare, or a detector / segmentor file)',
    'mmpretrain_v2': 'mmpretrain SwinTransformerV2 (downsample at the start of each stage)',
    'official_v2': 'microsoft/Swin-Transformer V2 classification checkpoint',
    'timm_v2': 'timm swinv2_* (downsample at the start of each stage, head.fc)',
    'torchvision_v2': 'torchvision.models.swin_v2_t / swin_v2_s / swin_v2_b',
    'simmim_v2': 'official SimMIM pre-training checkpoint (encoder. prefix)',
}

TABLE = 'relative_coords_table'
#: Buffers of the V2 sources that ours rebuilds from the window (the coordinate table is not one).
REBUILT_BUFFERS = ('relative_position_index', 'attn_mask')

REASON_K_BIAS = ("k third of torchvision's qkv.bias: torchvision zeroes it at every forward and "
                 'Swin V2 has no k bias, so it is dropped')
REASON_K_BIAS_BUFFER = 'zero k bias buffer (Swin V2 has no k bias)'
REASON_REORDER_V2 = ('PatchMerging reduction columns reordered from the 2x2 concat order to '
                     'nn.Unfold order (the V2 norm follows the reduction and keeps its order)')
REASON_MOVED_V2 = 'PatchMerging moved from the start of stage i + 1 to the end of stage i'
REASON_TABLE_KEPT = ("coordinate table kept from the model's arguments (the file has none): its "
                     'pretrained window is the model\'s pretrained_window_sizes')
NOTE_SIMMIM = "kept the 'encoder.' keys of a SimMIM pre-training file"


# =====================================================================================
# Unwrapping and detection
# =====================================================================================
def is_v2_state(keys: Iterable[str]) -> bool:
    """Whether backbone keys are those of a Swin V2 model (any of them, swinv2_cr included)."""
    return any(('logit_scale' in k or 'cpb_mlp' in k or 'rpe_mlp' in k or 'meta_mlp' in k)
               for k in keys)


def unwrap_v2(checkpoint: Mapping, prefix: Optional[str] = None) -> Unwrapped:
    """:func:`formats.unwrap`, plus SimMIM's ``encoder.`` prefix (its decoder is left out)."""
    unwrapped = unwrap(checkpoint, prefix)
    state = unwrapped.state
    if not any(k.startswith('encoder.') for k in state) or \
            not is_v2_state(k for k in state if k.startswith('encoder.')) or \
            is_v2_state(k for k in state if not k.startswith('encoder.')):
        return unwrapped
    kept = OrderedDict()
    for k, v in state.items():
        if k.startswith('encoder.'):
            kept[k[len('encoder.'):]] = v
        else:
            unwrapped.unused[k] = 'SimMIM decoder (pre-training only, not part of the backbone)'
    unwrapped.notes.append(NOTE_SIMMIM)
    return Unwrapped(kept, unwrapped.unused, unwrapped.notes, unwrapped.had_backbone_prefix)


_NATIVE_DOWNSAMPLE = re.compile(r'^stages\.(\d+)\.downsample\.')
_EXTRA_NORM = re.compile(r'^stages\.\d+\.blocks\.\d+\.norm3\.')


def _unsupported(keys: list) -> ValueError:
    return ValueError(f'not a Swin Transformer V2 checkpoint of a supported format; its keys look '
                      f'like: {key_sample(keys)}. Supported formats: {", ".join(FORMATS_V2)} '
                      '(see swin_dense/checkpoint/formats_v2.py)')


def detect_v2_layout(keys: Iterable[str]) -> str:
    """The V2 naming family of backbone keys: one of :data:`FORMATS_V2` but ``simmim_v2``.

    Raises:
        ValueError: timm swinv2_cr (another design), a Swin V1 file (names SwinBackbone), a
            mmpretrain huge / giant file (extra norms), or keys of no supported layout.
    """
    keys = list(keys)
    if any('meta_mlp' in k for k in keys):
        raise ValueError(SWINV2_CR_REFUSAL)
    if not is_v2_state(keys):
        try:
            detect_layout(keys)
        except ValueError:
            raise _unsupported(keys) from None
        raise ValueError('this is a Swin Transformer V1 checkpoint (no logit_scale / cpb_mlp '
                         'keys): SwinV2Backbone implements Swin V2 and cannot use it. Build '
                         "SwinBackbone (backbone=dict(type='SwinBackbone', ...)) for V1 files")
    family = naming_family(keys)
    if family == 'torchvision':
        return 'torchvision_v2'
    if family == 'native':
        extra = [k for k in keys if _EXTRA_NORM.match(k)]
        if extra:
            raise ValueError(
                f'this Swin V2 checkpoint has an extra norm inside the blocks ({extra[0]}, ...): '
                "mmpretrain's SwinV2 huge / giant add one every few blocks, which SwinV2Backbone "
                'does not implement (arch tiny / small / base / large only); loading it without '
                'those norms would compute something else, so it is refused')
        stages = {int(m.group(1)) for m in map(_NATIVE_DOWNSAMPLE.match, keys) if m}
        if stages and 0 not in stages:  # mmpretrain: stage 0 starts without a downsample
            return 'mmpretrain_v2'
        return 'native_v2'
    if family == 'official':
        return official_or_timm(keys) + '_v2'
    raise _unsupported(keys)


def refine_v2_format(layout: str, unwrapped: Unwrapped) -> str:
    """SimMIM files share the official naming; they are told apart by their ``encoder.``."""
    if layout == 'official_v2' and NOTE_SIMMIM in unwrapped.notes:
        return 'simmim_v2'
    return layout


def detect_v2_format(checkpoint: Mapping) -> str:
    """The layout of a Swin V2 checkpoint dict or state dict: one of :data:`FORMATS_V2`.

    Raises:
        ValueError: see :func:`detect_v2_layout`.
    """
    return unwrap_and_detect(checkpoint, v2=True)[1]


def unwrap_and_detect(checkpoint: Mapping, prefix: Optional[str] = None, *,
                      v2: bool) -> tuple[Unwrapped, str]:
    """The backbone tensors of a checkpoint dict and their format: one of :data:`FORMATS_V2`
    (``v2``) or of :data:`~.formats.FORMATS`, for the model's version.

    Raises:
        ValueError: see :func:`detect_v2_layout` / :func:`~.formats.detect_layout`.
    """
    if v2:
        unwrapped = unwrap_v2(checkpoint, prefix)
        return unwrapped, refine_v2_format(detect_v2_layout(unwrapped.state.keys()), unwrapped)
    unwrapped = unwrap(checkpoint, prefix)
    return unwrapped, refine_format(detect_layout(unwrapped.state.keys()), unwrapped)


# =====================================================================================
# Mappers
# =====================================================================================
_ATTN_NAMES = ('qkv.weight', 'q_bias', 'v_bias', 'logit_scale', TABLE)
_ATTN_PREFIXES = ('cpb_mlp.', 'proj.')


def _v2_block_suffix(suffix: str, mlp: Mapping[str, str]) -> Optional[str]:
    """A block parameter name (after ``blocks.j.`` / ``features.k.j.``) of the official family
    or torchvision -> ours; ``None`` when it is not one."""
    if suffix.startswith(('norm1.', 'norm2.')):
        return suffix
    if suffix.startswith('attn.'):
        rest = suffix[len('attn.'):]
        if rest.startswith('rpe_mlp.'):  # the name of early official releases and of SimMIM
            rest = 'cpb_mlp.' + rest[len('rpe_mlp.'):]
        if rest in _ATTN_NAMES or rest.startswith(_ATTN_PREFIXES):
            return 'attn.w_msa.' + rest
        return None
    for src, dst in mlp.items():
        if suffix.startswith(src):
            return dst + suffix[len(src):]
    return None


def _put_concat_merging(out: MappedState, ours: str, src: str, value: Tensor) -> None:
    """V2 PatchMerging: only the reduction is reordered (the norm follows it, 2C wide)."""
    if ours.endswith('reduction.weight'):
        out.put(ours, src, official_to_unfold_reduction(value))
        out.converted[ours] = REASON_REORDER_V2
    else:
        out.put(ours, src, value)


def _put_mask_token(out: MappedState, key: str, value: Tensor) -> bool:
    if key != 'mask_token':
        return False
    out.unused[key] = 'SimMIM mask token (pre-training only)'
    return True


#: What Swin V2 changes in the naming families (see :mod:`.mapping`); its coordinate tables pass
#: through (the loader fits them), a zero ``k_bias`` buffer is left out.
V2 = Dialect(block_suffix=_v2_block_suffix, put_concat_merging=_put_concat_merging,
             set_aside={**{name: REASON_BUFFER for name in REBUILT_BUFFERS},
                        'k_bias': REASON_K_BIAS_BUFFER},
             not_backbone='not a Swin V2 backbone tensor', extra_official_key=_put_mask_token)


def map_official_v2(state: Mapping[str, Tensor]) -> MappedState:
    """microsoft/Swin-Transformer V2: downsample at the end of its stage."""
    return map_official_family(state, V2, downsample_offset=0)


def map_simmim_v2(state: Mapping[str, Tensor]) -> MappedState:
    """SimMIM pre-training (``encoder.`` already removed): the official naming."""
    return map_official_family(state, V2, downsample_offset=0)


def map_timm_v2(state: Mapping[str, Tensor]) -> MappedState:
    """timm ``swinv2_*``: ``layers.i.downsample`` (i >= 1) ends our stage i - 1."""
    return map_official_family(state, V2, downsample_offset=-1)


def _split_tv_qkv_bias(out: MappedState, key: str, stage: int, block: str, bias: Tensor) -> None:
    """torchvision's ``qkv.bias`` (3C): q and v thirds -> ``q_bias`` / ``v_bias``; k dropped."""
    if bias.dim() != 1 or bias.shape[0] % 3:
        out.unused[key] = 'qkv.bias of an unexpected shape'
        return
    width = bias.shape[0] // 3
    base = f'stages.{stage}.blocks.{block}.attn.w_msa.'
    out.put(base + 'q_bias', key, bias[:width])
    out.put(base + 'v_bias', key, bias[2 * width:])
    out.converted[base + 'q_bias'] = "first third of torchvision's qkv.bias"
    out.converted[base + 'v_bias'] = "last third of torchvision's qkv.bias"
    out.unused[f'{key}[{width}:{2 * width}]'] = REASON_K_BIAS


def map_torchvision_v2(state: Mapping[str, Tensor]) -> MappedState:
    """``features.0`` patch embedding, ``features.{2i+1}`` stage i, ``features.{2i+2}`` merging;
    the fused ``qkv.bias`` is split into ``q_bias`` / ``v_bias``."""
    return map_torchvision_family(state, V2, put_qkv_bias=_split_tv_qkv_bias)


def map_native_v2(state: Mapping[str, Tensor]) -> MappedState:
    """Ours: names and order already match; rebuilt buffers and heads are left out."""
    return map_native_family(state, V2)


def map_mmpretrain_v2(state: Mapping[str, Tensor]) -> MappedState:
    """mmpretrain ``SwinTransformerV2``: ``stages.i.downsample`` (i >= 1) ends our stage i - 1."""
    return map_native_family(state, V2, downsample_offset=-1, moved_reason=REASON_MOVED_V2)


#: The mapper of each V2 format.
MAPPERS_V2: dict[str, Callable[[Mapping[str, Tensor]], MappedState]] = {
    'native_v2': map_native_v2, 'mmpretrain_v2': map_mmpretrain_v2,
    'official_v2': map_official_v2, 'timm_v2': map_timm_v2,
    'torchvision_v2': map_torchvision_v2, 'simmim_v2': map_simmim_v2,
}
