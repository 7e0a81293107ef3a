"""What a load did, and why: :class:`LoadReport`, its text and the errors it raises."""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .formats import FORMAT_DESCRIPTIONS, REASON_OUTPUT_NORM
from .formats_v2 import FORMAT_V2_DESCRIPTIONS, REASON_TABLE_KEPT

__all__ = ['LoadReport', 'describe_arch']

_INDEX = re.compile(r'(?<=[._a-z])\d+(?=\.)')

#: Reasons of missing tensors that are no error: the model's own values are the right ones.
EXPECTED_MISSING_REASONS = (REASON_OUTPUT_NORM, REASON_TABLE_KEPT)


def summarise_keys(keys: list, limit: int = 6) -> list:
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


def describe_arch(arch: Optional[Mapping]) -> str:
    """``Swin-T (embed_dims=96, depths=(2, 2, 6, 2), ...)`` for an :func:`infer_arch` dict."""
    if not arch:
        return 'unknown shape'
    family = 'Swin V2-' if arch.get('version') == 2 else 'Swin-'
    name = f"{family}{arch['arch'][0].upper()} " if arch.get('arch') else ''
    return (f"{name}(embed_dims={arch.get('embed_dims')}, depths={arch.get('depths')}, "
            f"num_heads={arch.get('num_heads')}, window_size={arch.get('window_size')})")


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
        model_name: the class loaded into (``SwinBackbone`` / ``SwinV2Backbone``).
        pretrained_windows: Swin V2 only: stage -> ``dict(window, pretrained, source)``, the
            pretrained window each stage's coordinate tables use and where it came from.
        warnings: things that load but deserve a look (Swin V2: a file's pretrained window
            that contradicts the model's ``pretrained_window_sizes``).
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
    model_name: str = 'SwinBackbone'
    pretrained_windows: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    @property
    def num_loaded(self) -> int:
        return len(self.loaded)

    @property
    def expected_missing(self) -> list:
        return [k for k, r in self.missing.items() if r in EXPECTED_MISSING_REASONS]

    @property
    def unexpected_missing(self) -> list:
        return [k for k, r in self.missing.items() if r not in EXPECTED_MISSING_REASONS]

    def _arch_advice(self) -> str:
        ckpt, model = self.checkpoint_arch, self.model_arch
        text = f'the checkpoint is {describe_arch(ckpt)}; the model is {describe_arch(model)}'
        if ckpt and ckpt.get('arch') and ckpt.get('version') == 2:
            text += (f". Build {self.model_name} with arch='{ckpt['arch']}' (any window_size: "
                     'the coordinate tables are rebuilt for it)')
        elif ckpt and ckpt.get('arch'):
            text += (f". Build the backbone with arch='{ckpt['arch']}'"
                     + (f' (window_size={ckpt["window_size"]} or keep yours: tables are resized)'
                        if ckpt.get('window_size') else ''))
        elif ckpt:
            text += (f". Build the backbone with embed_dims={ckpt['embed_dims']}, "
                     f"depths={ckpt['depths']}, num_heads={ckpt['num_heads']}")
        return text

    def check(self, allow_missing: bool = False) -> None:
        """Raise ``ValueError`` unless every shape fits and the load is complete.

        ``allow_missing``: backbone tensors the checkpoint lacks are no error (a whole-model load,
        where the model's loader reports missing keys itself).
        """
        where = f'{self.source} ({self.format})'
        if self.mismatched:
            items = list(self.mismatched.items())
            shown = '; '.join(f'{k}: checkpoint {tuple(a)} vs model {tuple(b)}'
                              for k, (a, b) in items[:4])
            raise ValueError(f'checkpoint {where} does not fit this backbone: {len(items)} tensors '
                             f'differ in shape, e.g. {shown}. {self._arch_advice()}')
        if not self.loaded:
            raise ValueError(f'checkpoint {where} provided no tensor this backbone uses '
                             f'(unused: {", ".join(summarise_keys(list(self.unused), 4))})')
        if self.unexpected:
            raise ValueError(f'checkpoint {where} has {len(self.unexpected)} backbone tensors this '
                             f'model lacks, e.g. {", ".join(self.unexpected[:4])}: the depths '
                             f'differ. {self._arch_advice()}')
        if self.unexpected_missing and not allow_missing:
            keys = self.unexpected_missing
            raise ValueError(f'checkpoint {where} lacks {len(keys)} backbone tensors: '
                             f'{", ".join(summarise_keys(keys, 6))} '
                             f'({", ".join(sorted(set(self.missing[k] for k in keys)))}). '
                             f'{self._arch_advice()}')

    def __str__(self) -> str:
        described = {**FORMAT_DESCRIPTIONS, **FORMAT_V2_DESCRIPTIONS}.get(self.format, '?')
        lines = [f'{self.model_name} weights from {self.source}',
                 f'  format: {self.format} ({described})',
                 f'  loaded: {self.num_loaded} of {self.total} backbone tensors']
        lines += [f'  note: {n}' for n in self.notes]
        lines += [f'  WARNING: {w}' for w in self.warnings]
        for stage, used in sorted(self.pretrained_windows.items()):
            lines.append(f"  stage {stage}: window {used['window']}, pretrained window "
                         f"{used['pretrained']} ({used['source']})")

        def section(title: str, entries: Mapping[str, Any]) -> None:
            by_reason: dict[str, list] = OrderedDict()
            for key, reason in entries.items():
                by_reason.setdefault(str(reason), []).append(key)
            for reason, keys in by_reason.items():
                lines.append(f'  {title}: {len(keys)} - {reason}')
                lines.extend(f'      {s}' for s in summarise_keys(keys))

        section('converted', self.converted)
        if self.resized:
            lines.append(f'  resized: {len(self.resized)}')
            by_what: dict[str, list] = OrderedDict()
            for key, what in self.resized.items():
                by_what.setdefault(what, []).append(key)
            for what, keys in by_what.items():
                lines.append(f'      {", ".join(summarise_keys(keys, 2))}: {what}')
        section('missing', self.missing)
        section('unused', self.unused)
        if self.mismatched:
            section('MISMATCHED', {k: f'checkpoint {tuple(a)} vs model {tuple(b)}'
                                   for k, (a, b) in self.mismatched.items()})
        if self.unexpected:
            section('NOT IN MODEL', {k: 'backbone tensor the model lacks' for k in self.unexpected})
        return '\n'.join(lines)
