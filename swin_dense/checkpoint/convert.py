"""Writing a checkpoint of any supported layout as a file in ours (``tools/convert_checkpoint.py``).

The target model is given, or built through mmengine's registry (``type='SwinBackbone'``, or
``type='SwinV2Backbone'`` for a Swin V2 file; importing ``swin_dense`` registers both), so this
package never imports the backbone. A Swin V2 file is written in SwinV2Backbone's layout with a
coordinate table on every block: the file's (rebuilt for the target window when it changes) or,
where the source had none, the model's, so the written file records its pretrained windows.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.registry import MODELS
from torch import Tensor

from ..arch import ARCH_SETTINGS
from ..fileio import atomic_write
from .formats import MAPPERS
from .formats_v2 import MAPPERS_V2, is_v2_state, unwrap_and_detect, unwrap_v2
from .io import read_checkpoint
from .load import convert_state_dict, infer_arch
from .load_v2 import infer_arch_v2, is_v2_model, kept_tables
from .report import LoadReport, describe_arch

__all__ = ['convert_checkpoint']

#: SwinBackbone arguments read from the source file when the target is not given in full.
_SHAPE_ARGUMENTS = ('embed_dims', 'depths', 'num_heads', 'window_size', 'patch_size',
                    'in_channels', 'patch_norm', 'qkv_bias', 'mlp_ratio', 'use_abs_pos_embed',
                    'pretrain_img_size')


#: SwinV2Backbone arguments read from a Swin V2 source file.
_V2_SHAPE_ARGUMENTS = ('embed_dims', 'depths', 'num_heads', 'window_size',
                       'pretrained_window_sizes', 'patch_size', 'in_channels', 'mlp_ratio')


def _build_backbone(kwargs: dict, name: str = 'SwinBackbone') -> nn.Module:
    if MODELS.get(name) is None:
        raise RuntimeError(f"{name} is not registered in mmengine's MODELS: import "
                           'swin_dense before converting')
    return MODELS.build(dict(type=name, **kwargs))


def _build_target(model_or_arch: Any, state: Mapping[str, Tensor], window_size: Any,
                  v2: bool = False) -> nn.Module:
    """The model to convert for: given, or a SwinBackbone (``v2``: SwinV2Backbone) shaped like
    ``state`` (V2: windows and pretrained windows from its tables), with the overrides on top."""
    if isinstance(model_or_arch, nn.Module):
        return model_or_arch
    if model_or_arch is not None and not isinstance(model_or_arch, (str, Mapping)):
        raise TypeError(f'model_or_arch must be a module, an arch name, a dict or None, '
                        f'got {type(model_or_arch).__name__}')
    kwargs: dict = {}
    try:  # start from the file's own shape (abs pos embed, mlp ratio, patch size ...)
        arch = infer_arch_v2(state) if v2 else infer_arch(state)
        names = _V2_SHAPE_ARGUMENTS if v2 else _SHAPE_ARGUMENTS
        kwargs = {k: arch[k] for k in names if arch.get(k) is not None}
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
    if not v2:
        kwargs.setdefault('strides', (kwargs.get('patch_size', 4),) + (2,) * (len(depths) - 1))
    kwargs.setdefault('out_indices', tuple(range(len(depths))))
    return _build_backbone(kwargs, 'SwinV2Backbone' if v2 else 'SwinBackbone')


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
        window_size: target window (relative-position tables are resized), when building the model;
            for Swin V2 an int or one per stage (the coordinate tables are rebuilt for it, with
            the pretrained window the source's tables give).
        prefix, trust_pickle, logger: as :func:`load_pretrained`.
    """
    src, dst = Path(src), Path(dst)
    checkpoint = read_checkpoint(src, trust_pickle=trust_pickle)
    if isinstance(model_or_arch, nn.Module):
        given = tuple(window_size) if isinstance(window_size, list) else window_size
        if window_size is not None and given not in (
                getattr(model_or_arch, 'window_size', None),
                getattr(model_or_arch, 'window_sizes', None)):
            raise ValueError('window_size is set by the model given; do not pass both')
        model = model_or_arch
    else:
        v2 = is_v2_state(unwrap_v2(checkpoint, prefix).state)
        unwrapped, fmt = unwrap_and_detect(checkpoint, prefix, v2=v2)
        mapped = (MAPPERS_V2 if v2 else MAPPERS)[fmt](unwrapped.state)
        model = _build_target(model_or_arch, mapped.tensors, window_size, v2=v2)
    state, report = convert_state_dict(checkpoint, model, prefix=prefix, source=str(src))
    report.check()
    if is_v2_model(model):
        kept = kept_tables(report, model)
        state.update(kept)
        if kept:
            report.notes.append(f'{len(kept)} coordinate tables written from the model\'s '
                                'pretrained_window_sizes (the source has none)')
    state = OrderedDict((k, v.detach().clone().contiguous()) for k, v in state.items())
    meta = {'converted_from': str(src), 'source_format': report.format,
            'converted_by': 'swin_dense.checkpoint.convert_checkpoint',
            'arch': describe_arch(report.model_arch)}

    if dst.suffix == '.safetensors':
        from safetensors.torch import save_file

        def write(tmp: str) -> None:
            save_file(dict(state), tmp, metadata=meta)
    else:
        def write(tmp: str) -> None:
            torch.save({'state_dict': state, 'meta': meta}, tmp)
    atomic_write(dst, write)
    report.notes.append(f'written to {dst} ({len(state)} tensors, native layout)')
    print_log(str(report), logger=logger)
    return report
