"""What the Swin V2 checkpoint tests compare with, written without ``swin_dense.checkpoint``.

- :func:`spec_shapes`: SwinV2Backbone's state dict (key -> shape) as the interface spec lists it;
- :func:`source_of`: where each of our keys comes from in each peer's file, from the peers'
  documented layouts (tests/fixtures/README.md), and what is done to it;
- :func:`concat_to_unfold`: the PatchMerging column reorder, written element by element;
- :class:`ShapeOnlyV2`: a module that has SwinV2Backbone's state dict and attributes, enough for
  the pure conversion (which reads only those), before the backbone exists.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

from swin_dense.ops.continuous_bias import coords_table

V2 = Path(__file__).resolve().parents[1] / 'fixtures' / 'v2'
REDUCED = dict(embed_dims=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
FIXTURE_FORMATS = {'official_swinv2_w8.pth': 'official_v2', 'timm_swinv2.pth': 'timm_v2',
                   'timm_swinv2.safetensors': 'timm_v2', 'mmpretrain_swinv2.pth': 'mmpretrain_v2',
                   'torchvision_swinv2.pth': 'torchvision_v2'}


def spec_shapes(embed_dims: int = 8, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), windows=8,
                mlp_ratio: int = 4, hidden: int = 512) -> 'OrderedDict[str, tuple]':
    """Our V2 layout (the interface spec's table): key -> shape."""
    windows = (windows,) * len(depths) if isinstance(windows, int) else tuple(windows)
    out = OrderedDict()
    out['patch_embed.projection.weight'] = (embed_dims, 3, 4, 4)
    for name in ('patch_embed.projection.bias', 'patch_embed.norm.weight', 'patch_embed.norm.bias'):
        out[name] = (embed_dims,)
    for i, (depth, heads, window) in enumerate(zip(depths, num_heads, windows)):
        c = embed_dims * 2 ** i
        for j in range(depth):
            a = f'stages.{i}.blocks.{j}.attn.w_msa.'
            out[a + 'qkv.weight'] = (3 * c, c)
            out[a + 'q_bias'] = out[a + 'v_bias'] = (c,)
            out[a + 'logit_scale'] = (heads, 1, 1)
            out[a + 'cpb_mlp.0.weight'] = (hidden, 2)
            out[a + 'cpb_mlp.0.bias'] = (hidden,)
            out[a + 'cpb_mlp.2.weight'] = (heads, hidden)
            out[a + 'relative_coords_table'] = (1, 2 * window - 1, 2 * window - 1, 2)
            out[a + 'proj.weight'] = (c, c)
            out[a + 'proj.bias'] = (c,)
            b = f'stages.{i}.blocks.{j}.'
            for norm in ('norm1', 'norm2'):
                out[f'{b}{norm}.weight'] = out[f'{b}{norm}.bias'] = (c,)
            out[b + 'ffn.layers.0.0.weight'] = (mlp_ratio * c, c)
            out[b + 'ffn.layers.0.0.bias'] = (mlp_ratio * c,)
            out[b + 'ffn.layers.1.weight'] = (c, mlp_ratio * c)
            out[b + 'ffn.layers.1.bias'] = (c,)
        if i < len(depths) - 1:
            out[f'stages.{i}.downsample.reduction.weight'] = (2 * c, 4 * c)
            out[f'stages.{i}.downsample.norm.weight'] = (2 * c,)
            out[f'stages.{i}.downsample.norm.bias'] = (2 * c,)
    for i in range(len(depths)):
        out[f'norm{i}.weight'] = out[f'norm{i}.bias'] = (embed_dims * 2 ** i,)
    return out


def concat_to_unfold(weight: torch.Tensor) -> torch.Tensor:
    """Reduction columns from the concat order (column ``k * C + c``, neighbour ``k = dy + 2 dx``)
    to nn.Unfold's (column ``c * 4 + 2 dy + dx``), one column at a time."""
    channels = weight.shape[1] // 4
    out = torch.empty_like(weight)
    for c in range(channels):
        for dy in (0, 1):
            for dx in (0, 1):
                out[:, c * 4 + 2 * dy + dx] = weight[:, (dy + 2 * dx) * channels + c]
    return out


_OFFICIAL_BLOCK = {'ffn.layers.0.0.': 'mlp.fc1.', 'ffn.layers.1.': 'mlp.fc2.',
                   'attn.w_msa.': 'attn.', 'norm1.': 'norm1.', 'norm2.': 'norm2.'}
_TV_BLOCK = {'ffn.layers.0.0.': 'mlp.0.', 'ffn.layers.1.': 'mlp.3.', 'attn.w_msa.': 'attn.',
             'norm1.': 'norm1.', 'norm2.': 'norm2.'}


def _rename(rest: str, table: dict) -> str:
    for ours, theirs in table.items():
        if rest.startswith(ours):
            return theirs + rest[len(ours):]
    raise KeyError(rest)


def source_of(fmt: str, key: str):
    """``(source key, transform)`` of our ``key`` in a ``fmt`` file (transform: a function of
    the source tensor), or None where that layout has no such tensor."""
    same = (lambda t: t)
    if fmt in ('native_v2', 'mmpretrain_v2'):
        prefix = 'backbone.' if fmt == 'mmpretrain_v2' else ''
        m = re.match(r'^stages\.(\d+)\.downsample\.(.+)$', key)
        if m and fmt == 'mmpretrain_v2':  # mmpretrain: the downsample starts the next stage
            return f'{prefix}stages.{int(m.group(1)) + 1}.downsample.{m.group(2)}', same
        return prefix + key, same
    if key.startswith('norm'):
        return None  # no per-output norms in the classifier layouts
    if fmt in ('official_v2', 'timm_v2'):
        if key.startswith('patch_embed.'):
            return key.replace('projection', 'proj'), same
        m = re.match(r'^stages\.(\d+)\.downsample\.(.+)$', key)
        if m:
            i = int(m.group(1)) + (1 if fmt == 'timm_v2' else 0)
            reorder = concat_to_unfold if m.group(2) == 'reduction.weight' else same
            return f'layers.{i}.downsample.{m.group(2)}', reorder
        if key.endswith('relative_coords_table') and fmt == 'timm_v2':
            return None  # non-persistent in timm
        m = re.match(r'^stages\.(\d+)\.blocks\.(\d+)\.(.+)$', key)
        return f'layers.{m.group(1)}.blocks.{m.group(2)}.{_rename(m.group(3), _OFFICIAL_BLOCK)}', same
    if fmt == 'torchvision_v2':
        patch = {'patch_embed.projection.weight': 'features.0.0.weight',
                 'patch_embed.projection.bias': 'features.0.0.bias',
                 'patch_embed.norm.weight': 'features.0.2.weight',
                 'patch_embed.norm.bias': 'features.0.2.bias'}
        if key in patch:
            return patch[key], same
        m = re.match(r'^stages\.(\d+)\.downsample\.(.+)$', key)
        if m:
            reorder = concat_to_unfold if m.group(2) == 'reduction.weight' else same
            return f'features.{2 * int(m.group(1)) + 2}.{m.group(2)}', reorder
        m = re.match(r'^stages\.(\d+)\.blocks\.(\d+)\.(.+)$', key)
        base = f'features.{2 * int(m.group(1)) + 1}.{m.group(2)}.'
        if m.group(3).endswith(('q_bias', 'v_bias')):
            third = 0 if m.group(3).endswith('q_bias') else 2
            return base + 'attn.qkv.bias', (lambda t, k=third: t.reshape(3, -1)[k])
        return base + _rename(m.group(3), _TV_BLOCK), same
    raise ValueError(fmt)


class ShapeOnlyV2(nn.Module):
    """SwinV2Backbone's state dict (spec shapes, tables from ``coords_table``) and attributes,
    without any computation: what the pure conversion reads from a model."""

    def __init__(self, windows=8, pretrained_window_sizes=(0, 0, 0, 0), **arch):
        super().__init__()
        arch = {**REDUCED, **arch}
        self.embed_dims, self.depths, self.num_heads = (arch['embed_dims'], arch['depths'],
                                                        arch['num_heads'])
        self.window_sizes = (windows,) * 4 if isinstance(windows, int) else tuple(windows)
        self.pretrained_window_sizes = tuple(pretrained_window_sizes)
        self.out_indices = (0, 1, 2, 3)
        self._state = OrderedDict()
        for key, shape in spec_shapes(windows=self.window_sizes, **arch).items():
            if key.endswith('relative_coords_table'):
                i = int(key.split('.')[1])
                self._state[key] = coords_table(self.window_sizes[i],
                                                self.pretrained_window_sizes[i])
            else:
                self._state[key] = torch.zeros(shape)

    def state_dict(self, *args, **kwargs):  # noqa: D102 - read-only view for the converter
        return OrderedDict(self._state)
