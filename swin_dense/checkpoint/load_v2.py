"""Converting a Swin V2 checkpoint to a SwinV2Backbone's state dict, pretrained window included.

The pretrained window P of a stage (the window its position MLP was trained with) lives in the
stage's coordinate tables (``relative_coords_table``, the log-spaced offsets of the window
normalised by P), so the rules are about tables:

* a file table with the model's shape is loaded as it is (P comes with it);
* a file table of another window is replaced by the model window's coordinates normalised by the
  P read back from the file table (``pretrained_window_from_table``): the bias is a function of
  coordinates, so changing the window this way is exact;
* no table in the file (timm): the model keeps its own, built from its
  ``pretrained_window_sizes``.

The :class:`LoadReport` says, per stage, which P the tables use and where it came from; a file
P that contradicts a non-zero ``model.pretrained_window_sizes`` entry is a warning (the file
wins: its MLP was trained with it).

The loop that checks every tensor against the model is :func:`.conversion.convert_mapped`,
shared with Swin V1; what is V2's here is its :class:`_Tables` fitting.

Nothing here imports the backbone: the model is read through its ``state_dict()`` and a few
attributes (``embed_dims``, ``depths``, ``num_heads``, ``window_sizes``,
``pretrained_window_sizes``).
"""
from __future__ import annotations

import re
from collections import OrderedDict, defaultdict
from collections.abc import Mapping
from typing import Optional

import torch.nn as nn
from torch import Tensor

from ..ops.continuous_bias import coords_table, pretrained_window_from_table, table_window_size
from .conversion import (Fitting, block_tensors, convert_mapped, stem_and_depths,
                         with_variant_name)
from .formats import Unwrapped
from .formats_v2 import MAPPERS_V2, REASON_TABLE_KEPT, REBUILT_BUFFERS, TABLE
from .report import LoadReport

__all__ = ['convert_v2', 'infer_arch_v2', 'is_v2_model', 'kept_tables']

_BLOCK = re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.')


def is_v2_model(model: nn.Module) -> bool:
    """Whether ``model`` is a Swin V2 backbone (duck typing: its attributes or parameters)."""
    if hasattr(model, 'pretrained_window_sizes'):
        return True
    return any(k.endswith(('.logit_scale', '.cpb_mlp.0.weight')) for k in model.state_dict())


def _per_stage(values: list):
    """One value per stage as SwinV2Backbone takes it: an int when all agree."""
    if values and all(v == values[0] for v in values):
        return values[0]
    return tuple(values)


def infer_arch_v2(state: Mapping[str, Tensor]) -> dict:
    """SwinV2Backbone keyword arguments that fit a state dict in our V2 layout.

    Returns e.g. ``dict(arch='base', embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16,
    32), window_size=(16, 16, 16, 8), pretrained_window_sizes=(12, 12, 12, 6), patch_size=4,
    in_channels=3, mlp_ratio=4.0, version=2)``; ``window_size`` / ``pretrained_window_sizes``
    from the coordinate tables (None without tables), ``arch`` only for a published shape.
    """
    embed_dims, in_channels, patch, depths = stem_and_depths(state)
    heads: dict[int, int] = {}
    tables: dict[int, Tensor] = {}
    for stage, block, key, value in block_tensors(state):
        if key.endswith('attn.w_msa.logit_scale') and value.dim() >= 1:
            heads[stage] = value.shape[0]
        elif key.endswith(TABLE) and block == 0:
            tables[stage] = value
    stages = list(range(len(depths)))
    arch = dict(embed_dims=embed_dims, depths=depths,
                num_heads=tuple(heads.get(i, 0) for i in stages), window_size=None,
                pretrained_window_sizes=None, patch_size=patch, in_channels=in_channels,
                version=2)
    if sorted(tables) == stages:
        try:
            arch['window_size'] = _per_stage([table_window_size(tables[i]) for i in stages])
            arch['pretrained_window_sizes'] = tuple(pretrained_window_from_table(tables[i])
                                                    for i in stages)
        except ValueError:  # tables of another design: no window to report
            arch['window_size'] = arch['pretrained_window_sizes'] = None
    fc1 = state.get('stages.0.blocks.0.ffn.layers.0.0.weight')
    if fc1 is not None:
        arch['mlp_ratio'] = fc1.shape[0] / embed_dims
    return with_variant_name(arch)


def _model_arch(model: nn.Module) -> Optional[dict]:
    if not all(hasattr(model, a) for a in ('embed_dims', 'depths', 'num_heads')):
        return None
    windows = getattr(model, 'window_sizes', getattr(model, 'window_size', None))
    return with_variant_name(dict(
        embed_dims=model.embed_dims, depths=tuple(model.depths), num_heads=tuple(model.num_heads),
        window_size=_per_stage(list(windows)) if isinstance(windows, (list, tuple)) else windows,
        version=2))


def _model_pretrained_window(model: nn.Module, stage: int) -> int:
    """The model's ``pretrained_window_sizes[stage]`` (0: its own window); 0 when unknown."""
    given = getattr(model, 'pretrained_window_sizes', None)
    try:
        return int(given[stage]) if given is not None else 0
    except (IndexError, TypeError, ValueError):
        return 0


class _Tables(Fitting):
    """What happened to each block's coordinate table: (stage, window, P, source)."""

    def __init__(self, model: nn.Module, source: str):
        super().__init__(model)
        self.source = source
        self.used: dict[int, set] = defaultdict(set)

    def fit(self, key: str, src: str, value: Tensor, target: Tensor,
            report: LoadReport) -> Tensor:
        """A file's coordinate table, rebuilt for the model's window when it differs."""
        if not key.endswith(TABLE):
            return value
        stage = int(_BLOCK.match(key).group(1))
        if value.dim() != 4 or target.dim() != 4:
            return value  # a shape error, reported as a mismatch by the caller
        try:
            pretrained = pretrained_window_from_table(value)
            window, file_window = table_window_size(target), table_window_size(value)
        except ValueError as error:
            raise ValueError(f'checkpoint {self.source}: {src}: {error}. Nothing was loaded'
                             ) from error
        if value.shape == target.shape:
            where = 'file table'
        else:
            value = coords_table(window, pretrained)
            where = f'file table of window {file_window}, rebuilt for window {window}'
            report.resized[key] = (f'window {file_window} -> {window}: the coordinates of window '
                                   f'{window} normalised by the pretrained window {pretrained} '
                                   'read from the file table')
        self.used[stage].add((window, pretrained, where))
        given = _model_pretrained_window(self.model, stage)
        if given and given != pretrained:
            report.warnings.append(
                f'stage {stage}: the file was trained with pretrained window {pretrained} (its '
                f'coordinate tables say so), the model was given pretrained_window_sizes[{stage}]'
                f'={given}; the file\'s {pretrained} is used, as its position MLP needs it')
        return value

    def missing(self, key: str, target: Tensor) -> Optional[str]:
        """A table the file lacks: the model keeps its own (recorded, and expected)."""
        if not key.endswith(TABLE):
            return None
        stage = int(_BLOCK.match(key).group(1))
        self.used[stage].add((table_window_size(target), pretrained_window_from_table(target),
                              "model's pretrained_window_sizes: the file has no coordinate "
                              'tables'))
        return REASON_TABLE_KEPT

    def finish(self, report: LoadReport) -> None:
        """Per stage, the pretrained window its tables use and where it came from."""
        for stage, used in sorted(self.used.items()):
            window, pretrained, where = sorted(used)[0]
            report.pretrained_windows[stage] = dict(window=window, pretrained=pretrained,
                                                    source=where)
            if len({(w, p) for w, p, _ in used}) > 1:
                report.warnings.append(f'stage {stage}: its blocks use different pretrained '
                                       f'windows: {sorted({p for _, p, _ in used})}')
        # the same warning once per stage, not once per block
        report.warnings[:] = list(OrderedDict.fromkeys(report.warnings))


def convert_v2(unwrapped: Unwrapped, fmt: str, model: nn.Module, source: str
               ) -> tuple['OrderedDict[str, Tensor]', LoadReport, dict]:
    """Map a V2 checkpoint to ``model``'s layout, fit the coordinate tables, check shapes.

    Returns (our state, report, our key -> source key). Coordinate tables follow the rules of
    this module; tables the file lacks are not in the result (the model keeps its own: listed
    as expected-missing with :data:`REASON_TABLE_KEPT`).

    Raises:
        ValueError: a file table that is not a Swin V2 coordinate table.
    """
    return convert_mapped(unwrapped, fmt, MAPPERS_V2[fmt](unwrapped.state), model, source,
                          rebuilt=REBUILT_BUFFERS, fitting=_Tables(model, str(source)),
                          infer_arch=infer_arch_v2, model_arch=_model_arch(model),
                          model_name=type(model).__name__)


def kept_tables(report: LoadReport, model: nn.Module) -> 'OrderedDict[str, Tensor]':
    """The model's own coordinate tables that a load kept (the file had none), to write them
    into a converted file so that it records the pretrained window."""
    own = model.state_dict()
    return OrderedDict((k, own[k]) for k, r in report.missing.items() if r == REASON_TABLE_KEPT)
