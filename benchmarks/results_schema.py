"""The schema of the V1 benchmark results (``benchmarks/results/*.json``): reading and
validating a file, as :mod:`benchmarks.render` and the tests use it. The schema is described in
docs/performance.md ("Results as data")."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

SCHEMA_VERSION = 1
MODES = {'infer': 'inference', 'train': 'train step'}
AMPS = (None, 'fp16', 'bf16')
PRECISION = {None: 'fp32', 'fp16': 'fp16', 'bf16': 'bf16'}
# A given speed-up or memory ratio may differ from the one computed from the figures beside it
# by rounding only (tables give times to 3 digits and ratios from the unrounded medians).
RATIO_TOLERANCE = 0.03
DATE = re.compile(r'^\d{4}-\d{2}-\d{2}$')


class SchemaError(ValueError):
    """A results file does not follow the schema; the message names the file and the field."""



@dataclass
class Result:
    """One results file, validated; ``cases`` carry ``speedup`` and ``memory_ratio`` filled in."""

    path: Path
    data: dict

    @property
    def device_kind(self) -> str:
        return 'cuda' if self.data['machine'].get('gpu') else 'cpu'

    @property
    def amp(self) -> Optional[str]:
        return self.data['amp']

    @property
    def label(self) -> str:
        machine = self.data['machine']
        return machine.get('label') or ('GPU' if machine.get('gpu') else 'CPU')

    @property
    def column(self) -> str:
        """Short name of the run: machine label and precision, e.g. ``H100 fp16``."""
        return f'{self.label} {PRECISION[self.amp]}'

    @property
    def in_summary(self) -> bool:
        return self.data.get('summary', True)


# =====================================================================================
# Reading and validating
# =====================================================================================
def _fail(where: str, message: str) -> SchemaError:
    return SchemaError(f'{where}: {message} (the schema is in docs/performance.md, '
                       '"Results as data")')


def _number(value: Any, where: str, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, f'must be a number, got {value!r}')
    if positive and not value > 0:
        raise _fail(where, f'must be > 0, got {value!r}')
    return float(value)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f'must be a non-empty string, got {value!r}')
    return value


def _check_ratio(given: Any, computed: float, where: str, what: str) -> float:
    given = _number(given, where)
    if abs(given - computed) > RATIO_TOLERANCE * computed:
        raise _fail(where, f'{given} disagrees with {what} = {computed:.3f}')
    return given


def _range(value: Any, median: Any, where: str, median_key: str) -> None:
    """``[min, max]`` over rounds, around the median given beside it."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _fail(where, f'must be [min, max], got {value!r}')
    low, high = (_number(v, where) for v in value)
    if median is None:
        raise _fail(where, f"is given without '{median_key}'")
    if not low <= median <= high:
        raise _fail(where, f'[{low}, {high}] does not hold {median_key} = {median}')


def _validate_extras(case: dict, where: str) -> None:
    """The optional figures: ranges over rounds, onnxruntime, padding, bound, one process."""
    if case.get('onnx_s') is not None:
        _number(case['onnx_s'], f'{where}.onnx_s')
    for impl in ('mmdet', 'ours', 'onnx'):
        if case.get(f'{impl}_s_range') is not None:
            _range(case[f'{impl}_s_range'], case.get(f'{impl}_s'), f'{where}.{impl}_s_range',
                   f'{impl}_s')
    for key in ('gflop', 'bound_s'):
        if case.get(key) is not None:
            _number(case[key], f'{where}.{key}')
    share = case.get('padding_share')
    if share is not None and not 0 <= _number(share, f'{where}.padding_share',
                                              positive=False) < 1:
        raise _fail(f'{where}.padding_share', f'must be in [0, 1), got {share!r}')
    one = case.get('one_process')
    if one is not None:
        if not isinstance(one, dict) or 'mmdet_s' not in one or 'ours_s' not in one:
            raise _fail(f'{where}.one_process', f'must be {{"mmdet_s": s, "ours_s": s}}, got '
                        f'{one!r}')
        computed = (_number(one['mmdet_s'], f'{where}.one_process.mmdet_s')
                    / _number(one['ours_s'], f'{where}.one_process.ours_s'))
        if one.get('speedup') is not None:
            _check_ratio(one['speedup'], computed, f'{where}.one_process.speedup',
                         'mmdet_s / ours_s')


def _validate_case(case: Any, where: str) -> dict:
    if not isinstance(case, dict):
        raise _fail(where, f'must be an object, got {case!r}')
    for key in ('case', 'mode', 'mmdet_s', 'ours_s'):
        if key not in case:
            raise _fail(where, f"lacks the required key '{key}'")
    out = dict(case)
    _text(case['case'], f'{where}.case')
    if case['mode'] not in MODES:
        raise _fail(f'{where}.mode', f'must be one of {sorted(MODES)}, got {case["mode"]!r}')
    mmdet = _number(case['mmdet_s'], f'{where}.mmdet_s')
    ours = _number(case['ours_s'], f'{where}.ours_s')
    computed = mmdet / ours
    out['speedup'] = (_check_ratio(case['speedup'], computed, f'{where}.speedup',
                                   'mmdet_s / ours_s')
                      if case.get('speedup') is not None else computed)
    has_mib = case.get('mmdet_mib') is not None or case.get('ours_mib') is not None
    if has_mib:
        mm_mib = _number(case.get('mmdet_mib'), f'{where}.mmdet_mib')
        ours_mib = _number(case.get('ours_mib'), f'{where}.ours_mib')
        mem = ours_mib / mm_mib
        out['memory_ratio'] = (_check_ratio(case['memory_ratio'], mem, f'{where}.memory_ratio',
                                            'ours_mib / mmdet_mib')
                               if case.get('memory_ratio') is not None else mem)
    elif case.get('memory_ratio') is not None:
        out['memory_ratio'] = _number(case['memory_ratio'], f'{where}.memory_ratio')
    for key in ('max_abs_diff', 'onnx_max_abs_diff'):
        if case.get(key) is not None:
            _number(case[key], f'{where}.{key}', positive=False)
    _validate_extras(case, where)
    return out


def _validate_machine_extras(machine: dict, where: str) -> None:
    flags = machine.get('cpu_flags')
    if flags is not None and (not isinstance(flags, list)
                              or not all(isinstance(f, str) for f in flags)):
        raise _fail(f'{where}.cpu_flags', f'must be a list of strings, got {flags!r}')
    caches = machine.get('caches_kib')
    if caches is not None:
        if not isinstance(caches, dict):
            raise _fail(f'{where}.caches_kib', f'must be an object, got {caches!r}')
        for name, kib in caches.items():
            _number(kib, f'{where}.caches_kib.{name}')


def validate(data: Any, where: str) -> dict:
    """Check one parsed results file against the schema; return it with derived ratios added.

    Raises:
        SchemaError: naming ``where`` (the file), the field and what is wrong.
    """
    if not isinstance(data, dict):
        raise _fail(where, f'the top level must be an object, got {type(data).__name__}')
    required = ('schema', 'date', 'commit', 'command', 'machine', 'torch', 'threads', 'amp',
                'cases')
    for key in required:
        if key not in data:
            raise _fail(where, f"lacks the required key '{key}'")
    if data['schema'] != SCHEMA_VERSION:
        raise _fail(f'{where}: schema', f'must be {SCHEMA_VERSION}, got {data["schema"]!r}')
    if not isinstance(data['date'], str) or not DATE.match(data['date']):
        raise _fail(f'{where}: date', f'must be YYYY-MM-DD, got {data["date"]!r}')
    for key in ('commit', 'command', 'torch'):
        _text(data[key], f'{where}: {key}')
    machine = data['machine']
    if not isinstance(machine, dict):
        raise _fail(f'{where}: machine', f'must be an object, got {machine!r}')
    _text(machine.get('cpu'), f'{where}: machine.cpu')
    if machine.get('gpu') is not None:
        _text(machine['gpu'], f'{where}: machine.gpu')
    _validate_machine_extras(machine, f'{where}: machine')
    if data.get('method') is not None:
        _text(data['method'], f'{where}: method')
    rounds = data.get('rounds')
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int)
                               or rounds < 1):
        raise _fail(f'{where}: rounds', f'must be a positive int or null, got {rounds!r}')
    onnx = data.get('onnxruntime')
    if onnx is not None:
        if not isinstance(onnx, dict):
            raise _fail(f'{where}: onnxruntime', f'must be an object, got {onnx!r}')
        _number(onnx.get('threads'), f'{where}: onnxruntime.threads')
        if onnx.get('error') is not None:
            _text(onnx['error'], f'{where}: onnxruntime.error')
    threads = data['threads']
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise _fail(f'{where}: threads', f'must be a positive int or null, got {threads!r}')
    if data['amp'] not in AMPS:
        raise _fail(f'{where}: amp', f'must be null, "fp16" or "bf16", got {data["amp"]!r}')
    if 'summary' in data and not isinstance(data['summary'], bool):
        raise _fail(f'{where}: summary', f'must be true or false, got {data["summary"]!r}')
    notes = data.get('notes', [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise _fail(f'{where}: notes', 'must be a list of strings')
    if data.get('gemm_gflops') is not None:
        _number(data['gemm_gflops'], f'{where}: gemm_gflops')
    scaling = data.get('scaling_1024_over_512')
    if scaling is not None:
        if not isinstance(scaling, dict) or set(scaling) != {'mmdet', 'ours'}:
            raise _fail(f'{where}: scaling_1024_over_512',
                        f'must be {{"mmdet": number, "ours": number}}, got {scaling!r}')
        for key, value in scaling.items():
            _number(value, f'{where}: scaling_1024_over_512.{key}')
    cases = data['cases']
    if not isinstance(cases, list) or not cases:
        raise _fail(f'{where}: cases', 'must be a non-empty list')
    out = dict(data)
    out['cases'] = [_validate_case(c, f'{where}: cases[{i}]') for i, c in enumerate(cases)]
    seen = set()
    for i, c in enumerate(out['cases']):
        key = (c['case'], c['mode'])
        if key in seen:
            raise _fail(f'{where}: cases[{i}]', f'repeats case {c["case"]!r} mode {c["mode"]!r}')
        seen.add(key)
    return out


def load_results(results_dir: Path) -> list[Result]:
    """Every ``*.json`` under ``results_dir``, validated, in file-name order."""
    paths = sorted(results_dir.glob('*.json'))
    if not paths:
        raise SchemaError(f'no results files (*.json) in {results_dir}')
    results = []
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding='utf-8'))
        except json.JSONDecodeError as e:
            raise SchemaError(f'{path}: not valid JSON: {e}') from e
        results.append(Result(path, validate(data, str(path))))
    return results
