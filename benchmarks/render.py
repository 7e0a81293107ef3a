#!/usr/bin/env python
"""Turn the benchmark results (``benchmarks/results/*.json``) into the tables of the docs.

    python benchmarks/render.py            # rewrite the marked blocks of README.md and
                                           # docs/performance.md from the JSON files
    python benchmarks/render.py --check    # exit 1 when those blocks are out of date

Each target file holds a block between ``<!-- results:NAME:begin -->`` and
``<!-- results:NAME:end -->``; only the text between the markers is rewritten, so the rendered
text is reproducible from the JSON files alone. The schema of a results file is described in
docs/performance.md ("Results as data"). Exit status: 0 done / up to date, 1 out of date
(``--check``), 2 a results file or a target file is malformed (the message says which and why).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ''):  # run as a script: benchmarks/ is not a package on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# the schema of the results files lives beside this module; validate is re-exported for tests
from benchmarks.results_schema import (  # noqa: E402,F401
    AMPS, MODES, PRECISION, Result, SchemaError, load_results, validate)
from benchmarks.v2_tables import V2SchemaError, load_v2_results, render_v2  # noqa: E402


class MarkerError(ValueError):
    """A target file lacks the begin/end markers of its rendered block."""


# =====================================================================================
# Rendering (pure: results -> text)
# =====================================================================================
def _ms(seconds: float) -> str:
    ms = seconds * 1000
    if ms >= 100:
        return f'{ms:.0f}'
    if ms >= 10:
        return f'{ms:.1f}'
    return f'{ms:.2f}'


def _speedup(case: dict) -> str:
    return f'{case["speedup"]:.2f}x'


def _memory(case: dict) -> str:
    if case.get('memory_ratio') is None:
        return ''
    if case.get('mmdet_mib') is not None:
        return f'{case["memory_ratio"]:.2f} ({case["ours_mib"]:.0f} / {case["mmdet_mib"]:.0f} MiB)'
    return f'{case["memory_ratio"]:.2f}'


def _diff(case: dict) -> str:
    if case.get('max_abs_diff') is None:
        return ''
    mantissa, exponent = f'{case["max_abs_diff"]:.1e}'.split('e')
    return f'{mantissa}e{int(exponent)}'


def _rate(gflops: float) -> str:
    return f'{gflops / 1000:.1f} TFLOP/s' if gflops >= 1000 else f'{gflops:.0f} GFLOP/s'


def _order(result: Result) -> tuple:
    """CPU before GPU, fp32 before fp16 before bf16, summary runs before the others."""
    return (result.device_kind != 'cpu', AMPS.index(result.amp), not result.in_summary,
            result.path.name)


def _machine_line(result: Result) -> str:
    d = result.data
    machine = d['machine']
    if machine.get('gpu'):
        parts = [machine['gpu'], f'host CPU: {machine["cpu"]}']
    else:
        parts = [f'CPU: {machine["cpu"]}']
    if machine.get('gpu_driver'):
        parts.append(f'driver {machine["gpu_driver"]}')
    if machine.get('notes'):
        parts.append(machine['notes'])
    parts.append(f'torch {d["torch"]}')
    build = d.get('torch_build') or {}
    if build:
        parts.append(', '.join(f'{name} {build[key]}' for key, name in (
            ('cpu_capability', 'CPU kernels'), ('blas', 'BLAS'), ('onednn', 'oneDNN'),
            ('cuda', 'CUDA')) if build.get(key)))
    if d['threads']:
        parts.append(f'{d["threads"]} threads')
    parts.append(f'Swin-{str(d.get("arch", "tiny"))[0].upper()}')
    if d.get('gemm_gflops'):
        dtype = d.get('gemm_dtype', 'float32')
        parts.append(f'{dtype} GEMM {_rate(d["gemm_gflops"])} in the same run')
    onnx = d.get('onnxruntime')
    if onnx and not onnx.get('error'):
        parts.append(f'onnxruntime {onnx.get("version")} with {onnx["threads"]} intra-op threads')
    return '; '.join(parts)


def _command(command: str) -> str:
    if command.split(' ', 1)[0] in ('python', 'bash', 'torchrun'):
        return f'Command: `{command}`.'
    return f'Method: {command}.'


def _method(data: dict) -> str:
    return f' Method: {data["method"]}.' if data.get('method') else ''


def _times(case: dict, impl: str) -> str:
    """Median ms, and the range over rounds where the file has one."""
    if case.get(f'{impl}_s') is None:
        return 'failed' if case.get(f'{impl}_error') else ''
    text = _ms(case[f'{impl}_s'])
    if case.get(f'{impl}_s_range'):
        low, high = case[f'{impl}_s_range']
        text += f' ({_ms(low)}-{_ms(high)})'
    return text


#: Columns shown only for files that have their figures: (header, key that enables it, cell).
OPTIONAL_COLUMNS: list[tuple[str, str, Callable[[dict], str]]] = [
    ('onnxruntime ms', 'onnx_s', lambda c: _times(c, 'onnx')),
    ('one-process speed-up', 'one_process',
     lambda c: f'{c["one_process"]["mmdet_s"] / c["one_process"]["ours_s"]:.2f}x'
     if c.get('one_process') else ''),
    ('padding FLOPs', 'padding_share',
     lambda c: f'{100 * c["padding_share"]:.1f}%' if c.get('padding_share') is not None else ''),
    ('GEMM bound ms (ours at)', 'bound_s',
     lambda c: f'{_ms(c["bound_s"])} ({100 * c["bound_s"] / c["ours_s"]:.0f}%)'
     if c.get('bound_s') else ''),
]


def _table(cases: list[dict]) -> list[str]:
    """The table of one results file; the optional columns appear where any row has them."""
    extra = [(name, cell) for name, key, cell in OPTIONAL_COLUMNS
             if any(c.get(key) is not None for c in cases)]
    names = (['case', 'mode', 'mmdet ms', 'ours ms', 'speed-up'] + [n for n, _ in extra]
             + ['peak memory ours / mmdet', 'max abs diff'])
    lines = ['| ' + ' | '.join(names) + ' |', '|' + '---|' * len(names)]
    for c in cases:
        cells = ([c['case'], MODES[c['mode']], _times(c, 'mmdet'), _times(c, 'ours'),
                  _speedup(c)] + [cell(c) for _, cell in extra] + [_memory(c), _diff(c)])
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


def render_tables(results: list[Result]) -> str:
    """Every results file as a section of docs/performance.md."""
    lines: list[str] = []
    for result in sorted(results, key=_order):
        d = result.data
        title = result.column + (f', {d["title"]}' if d.get('title') else '')
        lines += [f'### {title} ({d["date"]}, commit `{d["commit"]}`)', '',
                  f'{_machine_line(result)}.', '',
                  f'{_command(d["command"])}{_method(d)} Data: '
                  f'`benchmarks/results/{result.path.name}`.', '']
        lines += _table(d['cases'])
        lines.append('')
        scaling = d.get('scaling_1024_over_512')
        if scaling:
            lines += [f'time(1024x1024) / time(512x512), inference: mmdet {scaling["mmdet"]:.2f}, '
                      f'ours {scaling["ours"]:.2f} (a cost linear in the pixels gives 4.0).', '']
        for note in d.get('notes', []):
            lines += [f'- {note}']
        if d.get('notes'):
            lines.append('')
    return '\n'.join(lines).rstrip('\n')


def summary_results(results: list[Result]) -> list[Result]:
    """The newest summary run of each device kind and precision, in column order."""
    newest: dict[tuple, Result] = {}
    for result in results:
        if not result.in_summary:
            continue
        key = (result.device_kind, result.amp)
        best = newest.get(key)
        if best is None or (result.data['date'], result.path.name) > \
                (best.data['date'], best.path.name):
            newest[key] = result
    return sorted(newest.values(), key=_order)


def render_summary(results: list[Result]) -> str:
    """The README's table: speed-up and memory ratio per case of each current run."""
    columns = summary_results(results)
    if not columns:
        raise SchemaError('no results file is marked for the summary (all have "summary": false)')
    rows: list[tuple[str, str]] = []
    for result in columns:
        for c in result.data['cases']:
            if (c['case'], c['mode']) not in rows:
                rows.append((c['case'], c['mode']))
    lines = ['| case | mode | ' + ' | '.join(r.column for r in columns) + ' |',
             '|---|---|' + '---|' * len(columns)]
    for case, mode in rows:
        cells = []
        for result in columns:
            c = next((c for c in result.data['cases']
                      if (c['case'], c['mode']) == (case, mode)), None)
            if c is None:
                cells.append('-')
            elif c.get('memory_ratio') is not None:
                cells.append(f'{_speedup(c)} ({c["memory_ratio"]:.2f})')
            else:
                cells.append(_speedup(c))
        lines.append(f'| {case} | {MODES[mode]} | ' + ' | '.join(cells) + ' |')
    lines += ['', "Speed-up: mmdet's time over ours (higher is better); in brackets: peak memory, "
              "ours over mmdet's (lower is better). Swin-T, the same weights in both. Measured:"]
    groups: dict[tuple, list[Result]] = {}  # runs on the same machine and day share a line
    for result in columns:
        d = result.data
        machine = d['machine']
        where = machine['gpu'] if machine.get('gpu') else machine['cpu']
        threads = f', {d["threads"]} threads' if d['threads'] else ''
        groups.setdefault((result.label, d['date'], where, d['torch'], threads), []).append(result)
    for (label, date, where, torch_version, threads), runs in groups.items():
        commits = [r.data['commit'] for r in runs]
        if len(set(commits)) == 1:
            which = ', '.join(PRECISION[r.amp] for r in runs) + f' (commit `{commits[0]}`)'
        else:
            which = ', '.join(f'{PRECISION[r.amp]} (commit `{r.data["commit"]}`)' for r in runs)
        lines.append(f'- {label} {which}: {date}, {where}, torch {torch_version}{threads}.')
    return '\n'.join(lines)


#: target file (relative to the repository root) -> (block name, renderer) of the V1 results;
#: docs/performance.md also gets the Swin V2 block (benchmarks/v2_tables.py)
TARGETS: dict[str, tuple[str, Callable[[list[Result]], str]]] = {
    'README.md': ('summary', render_summary),
    'docs/performance.md': ('tables', render_tables),
}
V2_TARGET = ('docs/performance.md', 'v2')


def replace_block(text: str, name: str, body: str, where: str) -> str:
    """``text`` with the lines between the ``results:NAME`` markers replaced by ``body``."""
    begin, end = f'<!-- results:{name}:begin -->', f'<!-- results:{name}:end -->'
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise MarkerError(f'{where}: needs exactly one line {begin} followed later by one line '
                          f'{end}; the rendered block goes between them')
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    note = '<!-- rendered by benchmarks/render.py from benchmarks/results/*.json: edit those -->'
    return f'{head}{begin}\n{note}\n{body}\n{end}{tail}'


def render_all(root: Path, results_dir: Optional[Path] = None) -> dict[Path, tuple[str, str]]:
    """``{target path: (current text, rendered text)}`` for every target file under ``root``."""
    results_dir = results_dir or root / 'benchmarks' / 'results'
    results = load_results(results_dir)
    out = {}
    for rel, (name, renderer) in TARGETS.items():
        path = root / rel
        if not path.is_file():
            raise MarkerError(f'{path}: target file not found (run from the repository, or pass '
                              '--root)')
        text = path.read_text(encoding='utf-8')
        new = replace_block(text, name, renderer(results), str(path))
        if rel == V2_TARGET[0] and f'<!-- results:{V2_TARGET[1]}:begin -->' in text:
            new = replace_block(new, V2_TARGET[1], render_v2(load_v2_results(results_dir / 'v2')),
                                str(path))
        out[path] = (text, new)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--check', action='store_true',
                        help='change nothing; exit 1 when a rendered block is out of date')
    parser.add_argument('--root', type=Path, default=Path(__file__).resolve().parent.parent,
                        help='repository root holding README.md and docs/ (default: this one)')
    parser.add_argument('--results', type=Path, default=None,
                        help='results directory (default: ROOT/benchmarks/results)')
    args = parser.parse_args(argv)
    try:
        rendered = render_all(args.root, args.results)
    except (SchemaError, MarkerError, V2SchemaError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    stale = [path for path, (old, new) in rendered.items() if old != new]
    if args.check:
        for path in stale:
            print(f'{path}: out of date with the results; run python benchmarks/render.py',
                  file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(rendered[path][1], encoding='utf-8')
        print(f'rewrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
