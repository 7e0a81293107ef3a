"""Speed and memory of SwinBackbone against mmdet's SwinTransformer, measured as users run them.

    python tools/benchmark.py            # CPU, fp32: the table, then the JSON
    python tools/benchmark.py --save     # and benchmarks/results/DATE_DEVICE_PRECISION_COMMIT.json
    python tools/benchmark.py --device cuda --amp fp16 --in-process

Headline method: each backbone alone in its own process, as a user runs it. For each case and
mode, child processes alternate (mmdet, ours, [onnxruntime,] mmdet, ours, ...) over ``--rounds``
rounds; each child builds one backbone, runs ``--warmup`` steps, times ``--repeats`` steps and
reports their median. A backbone's figure is the median over rounds, with the range (min-max)
beside it; the speed-up is mmdet's figure over ours. ``--in-process`` times both models
alternately in this one process instead (the older, quicker method: no start-up per child, but
each model's allocations change the other's time); ``--also-in-process`` adds that view as a
second figure per row. Both backbones get the same weights (ours loads the peer's state dict),
and their outputs are compared once per case.

Beside the times: the machine (CPU model, vector extensions, cores, caches; GPU and driver;
torch's build), the GEMM rate measured in the same run, the FLOPs counted by
``torch.utils.flop_counter`` on mmdet's model, the share of them spent on window padding, and
the *GEMM bound*: the FLOPs the output needs (padding excluded) over the GEMM rate, the time no
implementation of the same arithmetic can beat on this machine.

onnxruntime rows (CPU, fp32 inference; on by default where onnxruntime imports, ``--no-onnx``
to skip): our backbone exported once with dynamic batch, height and width, then timed in its
own child processes like the eager models, with ``intra_op_num_threads`` equal to the
benchmark's threads. A failed export leaves the eager rows and says why in the output and JSON.

Peak memory is measured in isolated child processes (CPU: growth of the peak RSS over the
process's state before the step; CUDA: growth of ``max_memory_allocated``), on CUDA with
``--in-process`` in the main process after a 64x64 warm-up step.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
# The measuring helpers in benchmarks/ belong to the repository, not to the installed package
# (swin_dense itself comes from the installation, as for every tool).
sys.path.append(str(REPO))

from benchmarks import onnx_rows  # noqa: E402
from benchmarks.machine import machine_record, torch_build  # noqa: E402
from benchmarks.memory import cuda_peak_growth_mib, peak_memory_in_this_process  # noqa: E402
from benchmarks.padding import backbone_flops  # noqa: E402
from benchmarks.v2_peer import V2_ARCHS  # noqa: E402

# The cases, plus 1024^2 for the scaling ratio; any 'HxW bN' may be given.
DEFAULT_CASES = ('224x224 b8', '512x512 b1', '800x1344 b1', '1024x1024 b1')
CASE_FORMAT = re.compile(r'^(\d+)x(\d+) b(\d+)$')
#: A narrow Swin for the benchmark's own tests (seconds per run instead of minutes).
TEST_ARCH = dict(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
ARCHS = ('tiny', 'small', 'base', 'large', 'test') + V2_ARCHS
IMPLS = ('mmdet', 'ours')
AMP_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}
PRECISION = {None: 'fp32', 'fp16': 'fp16', 'bf16': 'bf16'}


class ChildFailed(RuntimeError):
    """A child process of the benchmark exited with an error (the message ends with its log)."""


def parse_case(text: str) -> tuple[int, int, int]:
    """``'800x1344 b1'`` -> ``(batch, height, width)`` = ``(1, 800, 1344)``."""
    match = CASE_FORMAT.match(text.strip())
    if not match or min(int(g) for g in match.groups()) < 1:
        raise argparse.ArgumentTypeError(
            f"a case is 'HEIGHTxWIDTH bBATCH' with positive numbers, e.g. '512x512 b1'; got "
            f'{text!r}')
    h, w, batch = (int(g) for g in match.groups())
    return batch, h, w


def arch_settings(arch: str) -> dict:
    from swin_dense import ARCH_SETTINGS
    return dict(TEST_ARCH if arch == 'test' else ARCH_SETTINGS[arch])


def seeded_weights(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of mmdet's model with seeded random weights; norms and relative-position
    tables perturbed so that they are not trivial."""
    from mmdet.models.backbones import SwinTransformer
    torch.manual_seed(seed)
    peer = SwinTransformer(**arch_settings(arch))
    for name, p in peer.named_parameters():
        if p.dim() == 1 or 'relative_position_bias_table' in name:
            torch.nn.init.normal_(p, 1.0 if name.endswith('weight') else 0.0, 0.05)
    return peer.state_dict()


def build(impl: str, arch: str, device: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """mmdet's ``SwinTransformer`` or our ``SwinBackbone``, loaded with ``state``."""
    if impl == 'mmdet':
        from mmdet.models.backbones import SwinTransformer
        model = SwinTransformer(**arch_settings(arch))
        model.load_state_dict(state, strict=True)
    else:
        from swin_dense import SwinBackbone
        model = SwinBackbone(**arch_settings(arch))
        model.load_state_dict({k: v for k, v in state.items()
                               if not k.endswith('relative_position_index')}, strict=True)
    return model.to(device)


def case_input(batch: int, h: int, w: int, device: str, seed: int = 1) -> torch.Tensor:
    """The same image batch in every process."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, h, w, generator=generator).to(device)


def sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def step_fn(model: torch.nn.Module, x: torch.Tensor, mode: str, amp: Optional[str]
            ) -> Callable[[], object]:
    """One inference (eval, no_grad) or one train step (train, forward + backward)."""
    dtype = AMP_DTYPES.get(amp or '')
    device_type = x.device.type

    def autocast():
        return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)

    if mode == 'infer':
        model.eval()

        def run():
            with torch.no_grad(), autocast():
                return model(x)
    else:
        model.train()

        def run():
            with autocast():
                loss = sum(o.float().square().mean() for o in model(x))
            loss.backward()
            model.zero_grad(set_to_none=True)
    return run


def time_interleaved(runs: dict[str, Callable[[], object]], repeats: int, warmup: int,
                     device: str) -> dict[str, list[float]]:
    """Seconds of each timed call of each run; the runs alternate so machine drift hits all
    alike. One run alone gives the steps of one backbone in its own process."""
    for _ in range(warmup):  # caches, allocator, kernel choice, first-use calibration
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def gemm_gflops(device: str, dtype: torch.dtype = torch.float32, size: int = 2048,
                repeats: int = 5) -> float:
    """GEMM rate of this machine in ``dtype``, measured now (best of ``repeats``, over a square
    product and one shaped like Swin's MLP): on the CPU in fp32 the faster of PyTorch's BLAS and
    oneDNN (the two libraries the fast path chooses between, see ``swin_dense.ops.gemm``)."""
    # a square product, and one shaped like Swin's MLP (many tokens, few channels), on which
    # the libraries' rates differ most
    shapes = [(size, size, size), (4 * size, size // 4 * 3 // 2, size // 4 * 6)]
    best_rate = 0.0
    for rows, inner, cols in shapes:
        a = torch.randn(rows, inner, device=device, dtype=dtype)
        b = torch.randn(inner, cols, device=device, dtype=dtype)
        products = [lambda: torch.mm(a, b)]
        if device == 'cpu' and dtype == torch.float32 and torch.backends.mkldnn.is_available():
            weight = b.t().contiguous()
            products.append(lambda: torch.ops.mkldnn._linear_pointwise(
                a, weight, None, 'none', [], ''))
        for product in products:
            product()
            for _ in range(repeats):
                sync(device)
                start = time.perf_counter()
                product()
                sync(device)
                best_rate = max(best_rate, 2 * rows * inner * cols
                                / (time.perf_counter() - start) / 1e9)
    return best_rate


def count_flops(model: torch.nn.Module, x: torch.Tensor, mode: str) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step_fn(model, x, mode, None)()
    return counter.get_total_flops()


def max_abs_diff(models: dict[str, torch.nn.Module], x: torch.Tensor, amp: Optional[str]
                 ) -> float:
    outs = {k: step_fn(m, x, 'infer', amp)() for k, m in models.items()}
    return max((a.float() - b.float()).abs().max().item()
               for a, b in zip(outs['mmdet'], outs['ours']))


# =====================================================================================
# Child processes
# =====================================================================================
def run_child(child_args: list[str], args: argparse.Namespace,
              env: Optional[dict[str, str]] = None) -> str:
    """Run this script in a fresh process with ``child_args``; return its last line of output.

    Raises:
        ChildFailed: the child exited with an error; the message ends with its output.
    """
    cmd = [sys.executable, __file__, *child_args, '--arch', args.arch, '--device', args.device,
           '--threads', str(torch.get_num_threads())]
    if args.amp:
        cmd += ['--amp', args.amp]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        log = (proc.stdout + proc.stderr).strip()[-3000:]
        raise ChildFailed(f'{shlex.join(cmd[1:])} exited with {proc.returncode}:\n{log}')
    return lines[-1]


def time_child(args: argparse.Namespace) -> None:
    """Entry point of one timing process: one implementation, one case, one mode; prints
    ``{"median": s, "steps": [s, ...]}``."""
    impl, case, mode = args.time_child
    batch, h, w = parse_case(case)
    x = case_input(batch, h, w, args.device)
    if impl == 'onnx':
        run = onnx_rows.runner(onnx_rows.session(args.onnx_file, torch.get_num_threads()), x)
    else:
        state = torch.load(args.weights, map_location='cpu', weights_only=True)
        run = step_fn(build(impl, args.arch, args.device, state), x, mode, args.amp)
    steps = time_interleaved({impl: run}, args.repeats, args.warmup, args.device)[impl]
    print(json.dumps(dict(median=statistics.median(steps), steps=steps)))


def memory_child(args: argparse.Namespace) -> None:
    """Entry point of one memory process: prints the peak memory growth of one step in MiB."""
    impl, mode, case = args.child
    state = torch.load(args.weights, map_location='cpu', weights_only=True)
    model = build(impl, args.arch, args.device, state)
    run = step_fn(model, case_input(*parse_case(case), args.device), mode, args.amp)
    print(cuda_peak_growth_mib(run) if args.device == 'cuda' else
          peak_memory_in_this_process(run))


def time_separate(args: argparse.Namespace, case: str, mode: str, impls: list[str],
                  files: dict[str, str]) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Per implementation, the median step of each round's process; and per implementation
    whose child failed (onnxruntime only: the others raise), the reason."""
    medians: dict[str, list[float]] = {impl: [] for impl in impls}
    failed: dict[str, str] = {}
    for _ in range(args.rounds):
        for impl in impls:
            if impl in failed:
                continue
            child_args = ['--time-child', impl, case, mode, '--repeats', str(args.repeats),
                          '--warmup', str(args.warmup), '--weights', files['weights']]
            if impl == 'onnx':
                child_args += ['--onnx-file', files['onnx']]
            try:
                medians[impl].append(json.loads(run_child(child_args, args))['median'])
            except ChildFailed as error:
                if impl != 'onnx':
                    raise
                failed[impl] = str(error).strip().splitlines()[-1][:300]
    return {k: v for k, v in medians.items() if v}, failed


def peak_memory(args: argparse.Namespace, models: dict[str, torch.nn.Module], case: str,
                mode: str, weights: str) -> dict[str, float]:
    """Peak memory growth of one step of each implementation, in MiB."""
    if args.in_process and args.device == 'cuda':
        from benchmarks.memory import cuda_peak_memory_in_process
        batch, h, w = parse_case(case)
        return {impl: cuda_peak_memory_in_process(
            step_fn(model, torch.randn(1, 3, 64, 64, device='cuda'), mode, args.amp),
            step_fn(model, case_input(batch, h, w, 'cuda'), mode, args.amp))
            for impl, model in models.items()}
    # A fixed mmap threshold makes every tensor of 64 KiB or more its own mapping, returned to
    # the OS when freed, so RSS follows live memory instead of glibc's retained heap.
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536'}
    return {impl: float(run_child(['--child', impl, mode, case, '--weights', weights], args,
                                  env)) for impl in IMPLS}


# =====================================================================================
# One case and mode
# =====================================================================================
def _sig(value: float, digits: int = 5) -> float:
    return float(f'{value:.{digits}g}')


def measure(args: argparse.Namespace, case: str, mode: str, models: dict[str, torch.nn.Module],
            files: dict[str, str], onnx_session, gemm: float, diffs: dict) -> dict:
    """One row of the results: times, FLOPs and the bound, memory, differences."""
    batch, h, w = parse_case(case)
    x = case_input(batch, h, w, args.device)
    row: dict = dict(case=case, mode=mode)
    with_onnx = mode == 'infer' and onnx_session is not None and 'onnx_error' not in diffs
    if mode == 'infer' and 'onnx_error' in diffs:
        row['onnx_error'] = diffs['onnx_error']
    if args.in_process:
        runs = {k: step_fn(m, x, mode, args.amp) for k, m in models.items()}
        if with_onnx:
            runs['onnx'] = onnx_rows.runner(onnx_session, x)
        steps = time_interleaved(runs, args.repeats, args.warmup, args.device)
        for impl, times in steps.items():
            row[f'{impl}_s'] = _sig(statistics.median(times))
    else:
        impls = list(IMPLS) + (['onnx'] if with_onnx else [])
        medians, failed = time_separate(args, case, mode, impls, files)
        for impl, values in medians.items():
            row[f'{impl}_s'] = _sig(statistics.median(values))
            row[f'{impl}_s_range'] = [_sig(min(values)), _sig(max(values))]
        if 'onnx' in failed:
            row['onnx_error'] = failed['onnx']
    row['speedup'] = row['mmdet_s'] / row['ours_s']
    if args.also_in_process:
        runs = {k: step_fn(m, x, mode, args.amp) for k, m in models.items()}
        one = {k: statistics.median(v) for k, v in
               time_interleaved(runs, args.repeats, args.warmup, args.device).items()}
        row['one_process'] = dict(mmdet_s=_sig(one['mmdet']), ours_s=_sig(one['ours']),
                                  speedup=one['mmdet'] / one['ours'])
    flops = count_flops(models['mmdet'], x, mode)
    settings = arch_settings(args.arch)
    counted = backbone_flops(batch, h, w, mode, settings['embed_dims'], settings['depths'])
    if abs(counted.total - flops) > 0.01 * flops:
        print(f'warning: {case} {mode}: the padding arithmetic counts {counted.total / 1e9:.2f} '
              f'GFLOP, flop_counter {flops / 1e9:.2f}; the padding share is approximate',
              file=sys.stderr)
    needed = flops * (1 - counted.padding_share)
    row.update(gflop=_sig(flops / 1e9), padding_share=_sig(counted.padding_share, 4),
               bound_s=_sig(needed / (gemm * 1e9)),
               mmdet_gflops=_sig(flops / row['mmdet_s'] / 1e9, 4),
               ours_gflops=_sig(flops / row['ours_s'] / 1e9, 4))
    if mode == 'infer':
        row['max_abs_diff'] = diffs['ours']
        if 'onnx' in diffs and 'onnx_s' in row:
            row['onnx_max_abs_diff'] = diffs['onnx']
    if not args.no_memory:
        mem = peak_memory(args, models, case, mode, files['weights'])
        row.update(mmdet_mib=_sig(mem['mmdet'], 4), ours_mib=_sig(mem['ours'], 4))
        if mem['mmdet'] > 0 and mem['ours'] > 0:
            row['memory_ratio'] = mem['ours'] / mem['mmdet']
    return row


# =====================================================================================
# The run
# =====================================================================================
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        choices=['cpu', 'cuda'])
    parser.add_argument('--amp', choices=sorted(AMP_DTYPES), default=None,
                        help='autocast dtype (the GEMM rate and the bound are then in it)')
    parser.add_argument('--arch', default='tiny', choices=ARCHS,
                        help="Swin variant ('test': a narrow model for the tool's own tests); "
                             "'v2-*': SwinV2Backbone against mmpretrain's SwinTransformerV2 "
                             "(run with a python where mmpretrain imports, see "
                             "docs/performance.md)")
    parser.add_argument('--rounds', type=int, default=3,
                        help='processes per implementation, case and mode (alternated)')
    parser.add_argument('--repeats', type=int, default=7, help='timed steps per process')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps first')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads, and onnxruntime intra-op threads')
    parser.add_argument('--cases', nargs='+', default=list(DEFAULT_CASES), metavar='CASE',
                        help="'HEIGHTxWIDTH bBATCH', e.g. '800x1344 b1'")
    parser.add_argument('--modes', nargs='+', default=['infer', 'train'],
                        choices=['infer', 'train'])
    parser.add_argument('--onnx', action=argparse.BooleanOptionalAction, default=None,
                        help='onnxruntime rows (default: on for CPU fp32 where onnxruntime '
                             'imports)')
    parser.add_argument('--no-memory', action='store_true', help='skip the memory runs')
    parser.add_argument('--in-process', action='store_true',
                        help='time both models alternately in this one process instead of one '
                             'process each (quicker; each model then changes the other\'s time)')
    parser.add_argument('--also-in-process', action='store_true',
                        help='add the one-process alternation as a second figure per row')
    parser.add_argument('--label', default=None,
                        help="short machine name for the results file and tables (default: "
                             "'CPU' or the GPU's model)")
    parser.add_argument('--json', type=Path, default=None, help='write the results file here')
    parser.add_argument('--save', action='store_true',
                        help='write it to benchmarks/results/DATE_DEVICE_PRECISION_COMMIT.json')
    parser.add_argument('--child', nargs=3, help=argparse.SUPPRESS)
    parser.add_argument('--time-child', nargs=3, help=argparse.SUPPRESS)
    parser.add_argument('--weights', help=argparse.SUPPRESS)
    parser.add_argument('--onnx-file', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for case in args.cases:
        try:
            parse_case(case)
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
    for name in ('rounds', 'repeats'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1')
    if args.warmup < 0:
        parser.error('--warmup must be 0 or more')
    if args.onnx and not onnx_rows.available():
        parser.error('--onnx needs onnxruntime, onnx and onnxscript (pip install '
                     "'swin_dense[export]')")
    if args.onnx and (args.device != 'cpu' or args.amp):
        parser.error('--onnx times the CPU execution provider in fp32: drop --device cuda / '
                     '--amp, or --onnx')
    if args.onnx is None:
        args.onnx = (onnx_rows.available() and args.device == 'cpu' and not args.amp
                     and args.arch not in V2_ARCHS)
    args.onnx = args.onnx and 'infer' in args.modes
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    # fp32 means fp32 on CUDA too: no TF32 (cuDNN convolutions allow it by default), for both.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.arch in V2_ARCHS:
        from types import SimpleNamespace

        from benchmarks import v2_peer
        return v2_peer.main(args, argv, SimpleNamespace(
            case_input=case_input, parse_case=parse_case, step_fn=step_fn, run_child=run_child,
            time_interleaved=time_interleaved, gemm_gflops=gemm_gflops))
    if args.child:
        memory_child(args)
        return {}
    if args.time_child:
        time_child(args)
        return {}
    import warnings
    warnings.filterwarnings('ignore')
    from benchmarks import report

    # Under autocast the matmuls run in its dtype, so the bound is against that dtype's rate.
    gemm_dtype = AMP_DTYPES.get(args.amp or '', torch.float32)
    gemm = gemm_gflops(args.device, gemm_dtype)
    results = report.header(args, argv, machine_record(args.device, args.label), torch_build(),
                            gemm, str(gemm_dtype).replace('torch.', ''))
    with tempfile.TemporaryDirectory(prefix='swin_benchmark_') as tmp:
        files = {'weights': os.path.join(tmp, 'weights.pt')}
        state = seeded_weights(args.arch)
        torch.save(state, files['weights'])
        models = {impl: build(impl, args.arch, args.device, state) for impl in IMPLS}
        onnx_session = None
        if args.onnx:
            onnx_session = report.prepare_onnx(results, models['ours'], tmp, files)
        for line in report.header_text(results):
            print(line)
        report.print_columns()
        for case in args.cases:
            x = case_input(*parse_case(case), args.device)
            diffs = {'ours': max_abs_diff(models, x, args.amp)}
            if onnx_session is not None:
                try:
                    diffs['onnx'] = onnx_rows.max_abs_diff(onnx_session, models['ours'], x)
                except Exception as error:  # this size fails in onnxruntime: no row, the reason
                    diffs['onnx_error'] = f'{type(error).__name__}: {error}'[:300]
            for mode in args.modes:
                row = measure(args, case, mode, models, files, onnx_session, gemm, diffs)
                results['cases'].append(row)
                report.print_row(row)
    return report.finish(results, args)


if __name__ == '__main__':
    main()
