"""What tools/benchmark.py prints and writes: the header with the machine, one line per row,
and the results file (the schema of docs/performance.md, "Results as data", checked by
benchmarks/render.py before it is written)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from benchmarks import onnx_rows
from benchmarks.machine import header_lines

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / 'benchmarks' / 'results'
PRECISION = {None: 'fp32', 'fp16': 'fp16', 'bf16': 'bf16'}
#: Any size: the export has dynamic batch, height and width (not square, so that height and
#: width are not unified while tracing).
ONNX_EXAMPLE = (1, 3, 224, 320)


def git_commit(repo: Path = REPO) -> str:
    """Short hash of the code measured, ``-dirty`` when tracked files differ from it."""
    def git(*cmd: str) -> Optional[str]:
        try:
            done = subprocess.run(['git', '-C', str(repo), *cmd], capture_output=True,
                                  text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    head = git('rev-parse', '--short=7', 'HEAD')
    if not head:
        return 'unknown'
    return head + ('-dirty' if git('status', '--porcelain', '--untracked-files=no') else '')


def _count(n: int, thing: str) -> str:
    return f'{n} {thing}' + ('' if n == 1 else 's')


def method_text(args: argparse.Namespace) -> str:
    """The timing protocol in words (the results file's ``method``)."""
    order = 'mmdet, ours' + (', onnxruntime' if args.onnx else '')
    repeats, warmup = _count(args.repeats, 'step'), _count(args.warmup, 'warm-up step')
    if args.in_process:
        text = (f'both backbones{" and onnxruntime" if args.onnx else ""} in one process, '
                f'alternated ({order}), median of {repeats} after {warmup} each')
        if args.onnx:
            text += " (onnxruntime's threads told not to spin between runs)"
    else:
        text = (f'separate processes, alternated ({order}), {_count(args.rounds, "round")}: '
                f'each process builds one backbone, runs {warmup} and times {repeats}; a '
                "figure is the median over rounds of each process's median step, the range "
                'its min-max over rounds')
    if args.also_in_process:
        text += f'; "one process": both backbones alternated in one process, median of {repeats}'
    return text


def header(args: argparse.Namespace, argv: Optional[list[str]], machine: dict,
           build: dict, gemm_gflops: float, gemm_dtype: str) -> dict:
    """The results file without its measured figures."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = ' '.join(['python tools/benchmark.py', shlex.join(argv)]).strip()
    return dict(schema=1, date=datetime.date.today().isoformat(), commit=git_commit(),
                command=command, method=method_text(args), machine=machine,
                torch=torch.__version__, torch_build=build, threads=torch.get_num_threads(),
                arch=args.arch, amp=args.amp, rounds=None if args.in_process else args.rounds,
                repeats=args.repeats, warmup=args.warmup, in_process=args.in_process,
                gemm_gflops=round(gemm_gflops, 1), gemm_dtype=gemm_dtype, cases=[], notes=[])


def prepare_onnx(results: dict, model: torch.nn.Module, tmp: str, files: dict):
    """Export ``model`` for the onnxruntime rows and open a session on it; ``None`` (and the
    reason in ``results``) when that fails."""
    path = os.path.join(tmp, 'ours.onnx')
    threads = torch.get_num_threads()
    info = dict(version=onnx_rows.version(), threads=threads, exporter=onnx_rows.EXPORTER,
                error=None)
    results['onnxruntime'] = info
    start = time.perf_counter()
    error = onnx_rows.export(model, torch.randn(*ONNX_EXAMPLE), path)
    info['export_s'] = round(time.perf_counter() - start, 1)
    session = None
    if error is None:
        try:
            # shares this process with the eager models (diffs, --in-process timing)
            session = onnx_rows.session(path, threads, spinning=False)
        except Exception as failure:  # a file onnxruntime rejects: no rows, the reason kept
            error = f'onnxruntime could not load the exported model ({failure})'
    if error is not None:
        info['error'] = error
        results['notes'].append(f'No onnxruntime rows: {error}.')
        return None
    files['onnx'] = path
    return session


def header_text(results: dict) -> list[str]:
    lines = header_lines(results['machine'], results['torch_build'], results['threads'])
    lines.append(f"# Swin {results['arch']}, amp={results['amp']}, {results['gemm_dtype']} GEMM "
                 f"{results['gemm_gflops']:.0f} GFLOP/s now (no TF32); commit "
                 f"{results['commit']}")
    lines.append(f"# method: {results['method']}")
    onnx = results.get('onnxruntime')
    if onnx:
        state = (f"no rows: {onnx['error']}" if onnx['error'] else
                 f"{onnx['exporter']} export in {onnx['export_s']:.0f} s")
        lines.append(f"# onnxruntime {onnx['version']}, {onnx['threads']} intra-op threads: "
                     f'{state}')
    lines.append('# padding: share of the FLOPs spent on window padding; bound: the FLOPs the '
                 'output needs over the GEMM rate; % of bound: bound / ours')
    return lines


COLUMNS = (('case', 14), ('mode', 6), ('mmdet ms', 20), ('ours ms', 20), ('speed-up', 16),
           ('onnxrt ms', 20), ('padding', 8), ('bound ms', 9), ('% of bound', 11),
           ('MiB mmdet/ours', 16), ('max|diff|', 10))


def print_columns() -> None:
    print(''.join(f'{name:<{width}}' for name, width in COLUMNS))


def _ms(row: dict, impl: str) -> str:
    if f'{impl}_s' not in row:
        return 'failed' if row.get(f'{impl}_error') else '-'

    def ms(seconds: float) -> str:
        value = seconds * 1000
        return f'{value:.1f}' if value < 100 else f'{value:.0f}'
    text = ms(row[f'{impl}_s'])
    if f'{impl}_s_range' in row:
        low, high = row[f'{impl}_s_range']
        text += f' ({ms(low)}-{ms(high)})'
    return text


def print_row(row: dict) -> None:
    speedup = f"{row['speedup']:.2f}x"
    if 'one_process' in row:
        speedup += f" ({row['one_process']['speedup']:.2f}x)"
    mem = (f"{row['mmdet_mib']:.0f}/{row['ours_mib']:.0f}" if 'ours_mib' in row else '-')
    cells = [row['case'], row['mode'], _ms(row, 'mmdet'), _ms(row, 'ours'), speedup,
             _ms(row, 'onnx') if row['mode'] == 'infer' else '', f"{row['padding_share']:.1%}",
             f"{row['bound_s'] * 1000:.0f}", f"{row['bound_s'] / row['ours_s']:.0%}", mem,
             f"{row['max_abs_diff']:.1e}" if 'max_abs_diff' in row else '']
    print(''.join(f'{cell:<{width}}' for cell, (_, width) in zip(cells, COLUMNS)), flush=True)
    if row.get('onnx_error'):
        print(f"  onnxruntime failed: {row['onnx_error']}", flush=True)


def default_path(results: dict) -> Path:
    """``benchmarks/results/DATE_DEVICE_PRECISION_COMMIT.json``; DEVICE from the machine
    label (``cpu``, ``h100``, ...)."""
    device = re.sub(r'[^a-z0-9]+', '-', results['machine']['label'].lower()).strip('-')
    return RESULTS_DIR / (f"{results['date']}_{device or 'machine'}_"
                          f"{PRECISION[results['amp']]}_{results['commit']}.json")


def finish(results: dict, args: argparse.Namespace) -> dict:
    """Add the scaling figure, check the file against the schema, print it and write it."""
    from benchmarks.render import validate
    from swin_dense.fileio import atomic_write

    infer = {r['case']: r for r in results['cases'] if r['mode'] == 'infer'}
    if '512x512 b1' in infer and '1024x1024 b1' in infer:
        results['scaling_1024_over_512'] = {
            impl: infer['1024x1024 b1'][f'{impl}_s'] / infer['512x512 b1'][f'{impl}_s']
            for impl in ('mmdet', 'ours')}
        print('time(1024^2) / time(512^2), inference (linear cost gives 4.0): ' + ', '.join(
            f'{k} {v:.2f}' for k, v in results['scaling_1024_over_512'].items()))
    if not results['notes']:
        del results['notes']
    validate(results, 'the results of this run')
    text = json.dumps(results, indent=1) + '\n'
    print(text, end='')
    targets = ([args.json] if args.json else []) + ([default_path(results)] if args.save else [])
    for path in targets:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))
        print(f'wrote {path}', file=sys.stderr)
    if args.save and results['commit'].endswith('-dirty'):
        print('warning: the tree has uncommitted changes; the commit in the file name is not '
              'the code measured', file=sys.stderr)
    return results
