"""Speed and memory of SwinBackbone against mmdet's SwinTransformer, measured in the same run.

    python tools/benchmark.py                    # CPU, fp32: the table, then JSON
    python tools/benchmark.py --device cuda --amp fp16 --json results.json
    python tools/benchmark.py --device cuda --in-process   # minutes less (no child processes)

Both backbones get the same weights (ours loads the peer's state dict). Each case and mode is
timed in a fresh child process, so that no figure depends on which cases ran before (on the CPU
the peer's large cases move by 10-20% with the allocator state; see README "Performance"),
or all in the main process with ``--in-process`` (no start-up per case: on a GPU machine each
child spends 15-20 s importing the toolkits). Within a process, timed runs of the two alternate
(mmdet, ours, mmdet, ours, ...) so that drift on the machine hits both alike; the median is
reported. Peak memory is measured in isolated child processes (CPU: growth of the peak RSS over
the process's state before the step; CUDA: growth of ``max_memory_allocated``), on CUDA with
``--in-process`` in the main process after a 64x64 warm-up step (see
:func:`cuda_peak_memory_in_process`). Effective GFLOP/s uses
FLOPs counted by ``torch.utils.flop_counter`` on the peer, against a square fp32 GEMM timed in
the same run.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, batch, height, width): the cases, plus 1024^2 for the scaling ratio.
CASES = [('224x224 b8', 8, 224, 224), ('512x512 b1', 1, 512, 512),
         ('800x1344 b1', 1, 800, 1344), ('1024x1024 b1', 1, 1024, 1024)]
IMPLS = ('mmdet', 'ours')
AMP_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}


def build(impl: str, arch: str, device: str, seed: int = 0) -> torch.nn.Module:
    """The peer with seeded random weights, or ours loaded with the peer's weights."""
    from mmdet.models.backbones import SwinTransformer

    from swin_dense import ARCH_SETTINGS, SwinBackbone
    torch.manual_seed(seed)
    peer = SwinTransformer(**ARCH_SETTINGS[arch])
    for name, p in peer.named_parameters():  # non-trivial norms and bias tables
        if p.dim() == 1 or 'relative_position_bias_table' in name:
            torch.nn.init.normal_(p, 1.0 if name.endswith('weight') else 0.0, 0.05)
    if impl == 'mmdet':
        return peer.to(device)
    ours = SwinBackbone(arch=arch)
    state = {k: v for k, v in peer.state_dict().items() if not k.endswith('relative_position_index')}
    ours.load_state_dict(state, strict=True)
    return ours.to(device)


def sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def step_fn(model: torch.nn.Module, x: torch.Tensor, mode: str, amp: str | None
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


def time_interleaved(runs: dict[str, Callable[[], object]], repeats: int, device: str
                     ) -> dict[str, float]:
    """Median seconds of each run; runs alternate so machine drift hits all alike."""
    for _ in range(3 if device == 'cuda' else 1):  # warm-up: caches, allocator, kernel choice
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
    return {k: statistics.median(v) for k, v in times.items()}


def gemm_gflops(device: str, dtype: torch.dtype = torch.float32, size: int = 2048,
                repeats: int = 5) -> float:
    """GEMM rate of this machine in ``dtype``, measured now."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float('inf')
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def count_flops(model: torch.nn.Module, x: torch.Tensor, mode: str) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step_fn(model, x, mode, None)()
    return counter.get_total_flops()


def max_abs_diff(models: dict[str, torch.nn.Module], x: torch.Tensor, amp: str | None) -> float:
    outs = {k: step_fn(m, x, 'infer', amp)() for k, m in models.items()}
    return max((a.float() - b.float()).abs().max().item()
               for a, b in zip(outs['mmdet'], outs['ours']))


def time_case(args: argparse.Namespace, case: str, mode: str,
              models: dict[str, torch.nn.Module]) -> dict[str, float]:
    """Median seconds of each impl for one case and mode (in a fresh process by default)."""
    if args.in_process:
        return time_in_process(args, case, mode, models)
    return time_case_child(args, case, mode)


def time_in_process(args: argparse.Namespace, case: str, mode: str,
                    models: dict[str, torch.nn.Module]) -> dict[str, float]:
    batch, h, w = next(c[1:] for c in CASES if c[0] == case)
    x = torch.randn(batch, 3, h, w, device=args.device)
    runs = {k: step_fn(m, x, mode, args.amp) for k, m in models.items()}
    return time_interleaved(runs, args.repeats, args.device)


def run_child(child_args: list[str], arch: str, device: str, amp: str | None,
              env: dict[str, str] | None = None) -> str:
    """Run this script in a fresh process with ``child_args``; return its last line of output."""
    cmd = [sys.executable, __file__, *child_args, '--arch', arch, '--device', device,
           '--threads', str(torch.get_num_threads())]
    if amp:
        cmd += ['--amp', amp]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return out.strip().splitlines()[-1]


def time_case_child(args: argparse.Namespace, case: str, mode: str) -> dict[str, float]:
    """Median seconds of each impl for one case and mode, timed in a fresh process."""
    return json.loads(run_child(['--time-child', case, mode, '--repeats', str(args.repeats)],
                                args.arch, args.device, args.amp))


def peak_memory_child(impl: str, arch: str, device: str, mode: str, batch: int, h: int, w: int,
                      amp: str | None) -> float:
    """Run one step in a fresh process; return its peak memory growth in MiB."""
    # A fixed mmap threshold makes every tensor of 64 KiB or more its own mapping, returned to
    # the OS when freed, so RSS follows live memory instead of glibc's retained heap.
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536'}
    return float(run_child(['--child', impl, mode, str(batch), str(h), str(w)], arch, device,
                           amp, env))


def cuda_peak_memory_in_process(model: torch.nn.Module, mode: str, batch: int, h: int, w: int,
                                amp: str | None) -> float:
    """Peak growth of ``max_memory_allocated`` over one step, in this process, in MiB.

    ``max_memory_allocated`` counts live tensors, not the caching allocator's reserve, so the
    cases timed before do not enter it; a 64x64 step first keeps out what a process allocates
    once (the cuBLAS workspace), which a fresh child counts for both models (on an H100 its
    inference figures came out about 32 MiB above these, for both).
    """
    step_fn(model, torch.randn(1, 3, 64, 64, device='cuda'), mode, amp)()
    return cuda_peak_growth_mib(step_fn(model, torch.randn(batch, 3, h, w, device='cuda'), mode,
                                        amp))


def cuda_peak_growth_mib(run: Callable[[], object]) -> float:
    """Growth of ``max_memory_allocated`` over ``run()``, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def time_child(args: argparse.Namespace) -> None:
    """Entry point of the isolated timing run (prints the medians as JSON)."""
    import warnings
    warnings.filterwarnings('ignore')
    name, mode = args.time_child
    models = {impl: build(impl, args.arch, args.device) for impl in IMPLS}
    print(json.dumps(time_in_process(args, name, mode, models)))


def child(args: argparse.Namespace) -> None:
    """Entry point of the isolated memory run (prints MiB)."""
    impl, mode, batch, h, w = args.child
    model = build(impl, args.arch, args.device)
    x = torch.randn(int(batch), 3, int(h), int(w), device=args.device)
    run = step_fn(model, x, mode, args.amp)
    if args.device == 'cuda':
        print(cuda_peak_growth_mib(run))
    else:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
        reset_peak_rss()  # the high-water mark so far includes memory freed after the build
        base = proc_status_kib('VmRSS')
        run()
        print((proc_status_kib('VmHWM') - base) / 1024)


def proc_status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak)."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


def reset_peak_rss() -> None:
    """Reset the peak RSS to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        choices=['cpu', 'cuda'])
    parser.add_argument('--amp', choices=sorted(AMP_DTYPES), default=None,
                        help='autocast dtype (on CPU bf16 is fast where the CPU has AMX or '
                        'AVX512-BF16: the GEMM rate printed is in this dtype)')
    parser.add_argument('--arch', default='tiny', choices=['tiny', 'small', 'base', 'large'])
    parser.add_argument('--repeats', type=int, default=5, help='timed runs per impl and case')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--cases', nargs='+', default=[c[0] for c in CASES],
                        choices=[c[0] for c in CASES], metavar='CASE')
    parser.add_argument('--modes', nargs='+', default=['infer', 'train'],
                        choices=['infer', 'train'])
    parser.add_argument('--no-memory', action='store_true', help='skip the memory runs')
    parser.add_argument('--in-process', action='store_true',
                        help='time every case in this process, and on CUDA measure memory in it '
                             'too (no child start-up per case: fits a short GPU session; on the '
                             'CPU the peer then depends on the cases before, see README '
                             '"Performance")')
    parser.add_argument('--json', type=Path, default=None, help='also write the results here')
    parser.add_argument('--child', nargs=5, help=argparse.SUPPRESS)
    parser.add_argument('--time-child', nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # fp32 means fp32 on CUDA too: no TF32 (cuDNN convolutions allow it by default), for both.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return {}
    if args.time_child:
        time_child(args)
        return {}

    import warnings
    warnings.filterwarnings('ignore')
    device = args.device
    models = {impl: build(impl, args.arch, device) for impl in IMPLS}
    # Under autocast the matmuls run in its dtype (on CPUs with AMX bf16 GEMMs are several
    # times faster than fp32 ones), so %GEMM is against that dtype's rate.
    gemm_dtype = AMP_DTYPES.get(args.amp or '', torch.float32)
    gemm = gemm_gflops(device, gemm_dtype)
    results = dict(
        device=torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or
        platform.machine(),
        threads=torch.get_num_threads(), torch=torch.__version__, arch=args.arch, amp=args.amp,
        repeats=args.repeats, in_process=args.in_process, gemm_gflops=round(gemm, 1),
        gemm_dtype=str(gemm_dtype).replace('torch.', ''), cases=[])
    for name, batch, h, w in CASES:
        if name not in args.cases:
            continue
        x = torch.randn(batch, 3, h, w, device=device)
        diff = max_abs_diff(models, x, args.amp)
        for mode in args.modes:
            times = time_case(args, name, mode, models)
            flops = count_flops(models['mmdet'], x, mode)
            row = dict(case=name, mode=mode, mmdet_s=times['mmdet'], ours_s=times['ours'],
                       speedup=times['mmdet'] / times['ours'], gflop=flops / 1e9,
                       mmdet_gflops=flops / times['mmdet'] / 1e9,
                       ours_gflops=flops / times['ours'] / 1e9, max_abs_diff=diff)
            if not args.no_memory:
                if args.in_process and device == 'cuda':
                    mem = {impl: cuda_peak_memory_in_process(model, mode, batch, h, w, args.amp)
                           for impl, model in models.items()}
                else:  # on the CPU, in-process RSS would follow glibc's retained heap
                    mem = {impl: peak_memory_child(impl, args.arch, device, mode, batch, h, w,
                                                   args.amp)
                           for impl in IMPLS}
                row.update(mmdet_mib=mem['mmdet'], ours_mib=mem['ours'],
                           memory_ratio=mem['ours'] / mem['mmdet'] if mem['mmdet'] > 0 else None)
            results['cases'].append(row)
            print_row(row, gemm, first=len(results['cases']) == 1, results=results)
    infer = {r['case']: r for r in results['cases'] if r['mode'] == 'infer'}
    if '512x512 b1' in infer and '1024x1024 b1' in infer:
        results['scaling_1024_over_512'] = {
            impl: infer['1024x1024 b1'][f'{impl}_s'] / infer['512x512 b1'][f'{impl}_s']
            for impl in IMPLS}
        print('time(1024^2) / time(512^2), inference (linear cost gives 4.0): ' + ', '.join(
            f'{k} {v:.2f}' for k, v in results['scaling_1024_over_512'].items()))
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def print_row(row: dict, gemm: float, first: bool, results: dict) -> None:
    if first:
        print(f"# {results['device']}, {results['threads']} threads, torch {results['torch']}, "
              f"Swin-{results['arch'][0].upper()}, amp={results['amp']}, "
              f"{results['gemm_dtype']} GEMM {gemm:.0f} GFLOP/s (fp32: no TF32), "
              f"median of {results['repeats']}")
        print(f"{'case':<14}{'mode':<7}{'mmdet s':>9}{'ours s':>9}{'speedup':>9}"
              f"{'GFLOP/s mm/ours':>17}{'%GEMM ours':>11}{'mem MiB mm/ours':>17}{'mem ratio':>10}"
              f"{'max|diff|':>11}")
    mem = f"{'-':>17}{'-':>10}"
    if row.get('memory_ratio') is not None:
        mem = f"{row['mmdet_mib']:>8.0f}/{row['ours_mib']:<8.0f}{row['memory_ratio']:>10.2f}"
    print(f"{row['case']:<14}{row['mode']:<7}{row['mmdet_s']:>9.3f}{row['ours_s']:>9.3f}"
          f"{row['speedup']:>8.2f}x{row['mmdet_gflops']:>9.0f}/{row['ours_gflops']:<7.0f}"
          f"{100 * row['ours_gflops'] / gemm:>10.0f}%{mem}{row['max_abs_diff']:>11.1e}", flush=True)


if __name__ == '__main__':
    main()
