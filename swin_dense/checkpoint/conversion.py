"""The conversion loop both Swin versions share: mapped tensors checked against the model.

:func:`convert_mapped` takes a checkpoint already mapped to our names (:mod:`.mapping`), keeps
what the model has a place for, fits what a version knows how to fit (V1: the relative-position
tables and the absolute position embedding, in :mod:`.load`; V2: the coordinate tables, in
:mod:`.load_v2`, through a :class:`Fitting`), and writes down in a :class:`LoadReport` what was
left out, resized, mismatched or missing, and why.

Nothing here imports the backbone: the model is read through its ``state_dict()`` and a few
attributes.
"""
from __future__ import annotations

import re
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Mapping
from typing import Callable, Iterable, Optional

import torch.nn as nn
from torch import Tensor

from ..arch import ARCH_SETTINGS
from .formats import REASON_OUTPUT_NORM, Unwrapped
from .mapping import MappedState
from .report import LoadReport

__all__ = ['Fitting', 'block_tensors', 'convert_mapped', 'stem_and_depths', 'unused_reason',
           'with_variant_name']


_BLOCK_KEY = re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.')


def block_tensors(state: Mapping[str, Tensor]) -> Iterator[tuple[int, int, str, Tensor]]:
    """``(stage, block, key, value)`` of every block tensor of a state dict in our layout."""
    for key, value in state.items():
        m = _BLOCK_KEY.match(key)
        if m:
            yield int(m.group(1)), int(m.group(2)), key, value


def stem_and_depths(state: Mapping[str, Tensor]) -> tuple[int, int, int, tuple]:
    """``(embed_dims, in_channels, patch_size, depths)`` of a state dict in our layout.

    Raises:
        ValueError: no patch embedding, or stages that are not 0, 1, ... in order.
    """
    proj = state.get('patch_embed.projection.weight')
    if proj is None or proj.dim() != 4:
        raise ValueError('cannot infer the architecture: no patch_embed.projection.weight')
    embed_dims, in_channels, patch, _ = proj.shape
    depth: dict[int, int] = defaultdict(int)
    for stage, block, _, _ in block_tensors(state):
        depth[stage] = max(depth[stage], block + 1)
    stages = sorted(depth)
    if not stages or stages != list(range(len(stages))):
        raise ValueError(f'cannot infer the architecture: stages {stages}')
    return int(embed_dims), int(in_channels), int(patch), tuple(depth[i] for i in stages)


def with_variant_name(arch: dict) -> dict:
    """``arch`` with ``'arch'`` ('tiny', ...) added when its shape is a published variant."""
    for name, setting in ARCH_SETTINGS.items():
        if (setting['embed_dims'], tuple(setting['depths']), tuple(setting['num_heads'])) == \
                (arch['embed_dims'], tuple(arch['depths']), tuple(arch['num_heads'])):
            arch['arch'] = name
            break
    return arch


def unused_reason(key: str, model: nn.Module) -> str:
    """Why a mapped tensor the model has no place for is left out."""
    if re.match(r'^norm\d+\.', key):
        return (f'per-output norm of an output this model does not produce '
                f'(out_indices={getattr(model, "out_indices", None)})')
    if key.startswith(('stages.', 'patch_embed.')):
        return 'backbone tensor the model lacks (different depths?)'
    return 'not a tensor of this model'


class Fitting:
    """What a version does to file tensors beyond renaming: the hooks of :func:`convert_mapped`.

    The defaults fit nothing; :mod:`.load` and :mod:`.load_v2` override them.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def unused(self, key: str) -> str:
        """Why the mapped tensor ``key``, which the model lacks, is left out."""
        return unused_reason(key, self.model)

    def fit(self, key: str, src: str, value: Tensor, target: Tensor,
            report: LoadReport) -> Tensor:
        """``value`` (from source key ``src``) made to fit ``target`` where the version can."""
        return value

    def missing(self, key: str, target: Tensor) -> Optional[str]:
        """Why a model tensor the file lacks is missing, or None for the general reason."""
        return None

    def finish(self, report: LoadReport) -> None:
        """Add what the fitting learnt over all tensors to the report."""


def convert_mapped(unwrapped: Unwrapped, fmt: str, mapped: MappedState, model: nn.Module,
                   source: str, *, rebuilt: Iterable[str], fitting: Fitting,
                   infer_arch: Callable[[Mapping[str, Tensor]], dict],
                   model_arch: Optional[dict], model_name: str
                   ) -> tuple['OrderedDict[str, Tensor]', LoadReport, dict]:
    """Check mapped tensors against ``model``; returns (our state, report, our key -> source key).

    Args:
        unwrapped, fmt, mapped: the checkpoint, its format and its tensors under our names.
        model: the target backbone (read only).
        source: name of the checkpoint, for the report.
        rebuilt: last names of the model's buffers that are never loaded.
        fitting: the version's resizing and reasons.
        infer_arch: the version's ``infer_arch`` (the report names the file's shape with it).
        model_arch, model_name: the model's shape and class, for the report.
    """
    rebuilt = tuple(rebuilt)
    report = LoadReport(source=str(source), format=fmt, notes=list(unwrapped.notes),
                        unused=dict(unwrapped.unused), converted=dict(mapped.converted),
                        model_name=model_name)
    report.unused.update(mapped.unused)
    try:
        report.checkpoint_arch = infer_arch(mapped.tensors)
    except ValueError:
        report.checkpoint_arch = None
    report.model_arch = model_arch

    targets = OrderedDict((k, v) for k, v in model.state_dict().items()
                          if k.rsplit('.', 1)[-1] not in rebuilt)
    report.total = len(targets)
    result = OrderedDict()
    for key, value in mapped.tensors.items():
        src = mapped.origin[key]
        if key not in targets:
            report.unused[src] = fitting.unused(key)
            if key.startswith(('stages.', 'patch_embed.')):
                report.unexpected.append(key)
            report.converted.pop(key, None)
            continue
        target = targets[key]
        value = fitting.fit(key, src, value, target, report)
        if value.shape != target.shape:
            report.mismatched[key] = (tuple(value.shape), tuple(target.shape))
            report.unused[src] = 'shape does not fit the model'
            report.converted.pop(key, None)
            continue
        result[key] = value
        report.loaded.append(key)

    for key, target in targets.items():
        if key in result or key in report.mismatched:
            continue
        if re.match(r'^norm\d+\.(weight|bias)$', key):
            report.missing[key] = REASON_OUTPUT_NORM
        else:
            report.missing[key] = (fitting.missing(key, target)
                                   or 'backbone tensor absent from the checkpoint')
    fitting.finish(report)
    return result, report, mapped.origin
