"""The Swin V2 tables of docs/performance.md, from ``benchmarks/results/v2/*.json``.

Written by ``tools/benchmark.py --arch v2-*`` (SwinV2Backbone against mmpretrain's
``SwinTransformerV2``); ``benchmarks/render.py`` calls :func:`render_v2` for the ``v2`` block.
A file holds the V1 fields that apply (``date``, ``commit``, ``command``, ``method``,
``machine``, ``torch``, ``threads``, ``arch``) plus ``peer``, ``peer_kwargs``, ``load_average``
(before) and ``load_average_after``, and ``cases`` with ``mmpretrain_s``, ``ours_s`` (their
``_range``), ``speedup`` and ``max_rel_error``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODES = {'infer': 'inference', 'train': 'train step'}
REQUIRED = ('date', 'commit', 'command', 'machine', 'torch', 'threads', 'arch', 'cases')
CASE_REQUIRED = ('case', 'mode', 'mmpretrain_s', 'ours_s', 'speedup')


class V2SchemaError(ValueError):
    """A V2 results file lacks a field; the message names the file and the field."""


def load_v2_results(directory: Path) -> list[tuple[Path, dict]]:
    """Every ``*.json`` of ``directory`` (none: an empty list), checked, in file-name order."""
    results = []
    for path in sorted(directory.glob('*.json')):
        data = json.loads(path.read_text(encoding='utf-8'))
        for key in REQUIRED:
            if key not in data:
                raise V2SchemaError(f'{path}: missing field {key!r}')
        for i, case in enumerate(data['cases']):
            for key in CASE_REQUIRED:
                if key not in case:
                    raise V2SchemaError(f'{path}: cases[{i}] misses {key!r}')
            computed = case['mmpretrain_s'] / case['ours_s']
            if abs(case['speedup'] - computed) > 0.03 * computed:
                raise V2SchemaError(f'{path}: cases[{i}].speedup {case["speedup"]} is not '
                                    f'mmpretrain_s / ours_s = {computed:.3f}')
        results.append((path, data))
    return results


def _ms(seconds: float) -> str:
    return f'{seconds * 1000:.0f}'


def _times(case: dict, impl: str) -> str:
    text = _ms(case[f'{impl}_s'])
    low_high = case.get(f'{impl}_s_range')
    if not low_high or low_high[0] == low_high[1]:  # one round: no range to show
        return text
    return text + f' ({_ms(low_high[0])}-{_ms(low_high[1])})'


def _load(values: Any) -> str:
    return '/'.join(f'{v:.1f}' for v in values) if values else 'not recorded'


def render_v2(results: list[tuple[Path, dict]]) -> str:
    """One section per results file: the machine, the command, the load, the table."""
    if not results:
        return 'No Swin V2 results yet: run the command above.'
    lines = []
    for path, d in sorted(results, key=lambda r: (r[1]['date'], r[0].name), reverse=True):
        machine = d['machine']
        size = d['arch'].split('-')[-1][:1].upper()
        lines += [f'### Swin V2-{size}, CPU fp32 ({d["date"]}, commit `{d["commit"]}`)', '',
                  f'CPU: {machine["cpu"]}; torch {d["torch"]}; {d["threads"]} threads; load '
                  f'average (1/5/15 min) {_load(d.get("load_average"))} before, '
                  f'{_load(d.get("load_average_after"))} after.', '',
                  f'Command: `{d["command"]}`. Data: `benchmarks/results/v2/{path.name}`.', '',
                  '| case | mode | mmpretrain ms | ours ms | speed-up | max rel. error |',
                  '|---|---|---|---|---|---|']
        for c in d['cases']:
            error = c.get('max_rel_error')
            lines.append(f'| {c["case"]} | {MODES.get(c["mode"], c["mode"])} | '
                         f'{_times(c, "mmpretrain")} | {_times(c, "ours")} | '
                         f'{c["speedup"]:.2f}x | {"" if error is None else f"{error:.1e}"} |')
        lines.append('')
    return '\n'.join(lines).rstrip('\n')
