"""``tools/benchmark.py --arch v2-tiny``: SwinV2Backbone against mmpretrain's SwinTransformerV2.

mmpretrain imports only in an environment with a torchvision whose operators load (see
docs/performance.md, "Swin V2"); run the tool with that environment's python and this
repository on ``PYTHONPATH``. The peer is built as a dense backbone: ``pad_small_map=True``
(pad to the window, never shrink it: our semantics), every stage out, no stochastic depth, the
window per stage as ours. Both models get the same weights: mmpretrain's seeded state dict,
every parameter randomised (norms, logit scales, the bias MLP), which ours loads through
:func:`swin_dense.checkpoint.load_pretrained` as it loads any mmpretrain file. Outputs are
compared once per case (maximum relative error over the four outputs).

The timing protocol is V1's (one backbone per process, processes alternated over rounds, the
median of each process's median step, the min-max over rounds); the results file has V1's
machine record and header but names the peer ``mmpretrain`` (``mmpretrain_s``, ``speedup`` =
mmpretrain / ours), and lives in ``benchmarks/results/v2/`` (the V1 tables do not render it).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import torch

#: ``--arch`` values this module serves (``v2-test``: a narrow model for the tool's tests).
V2_ARCHS = ('v2-tiny', 'v2-small', 'v2-base', 'v2-test')
IMPLS = ('mmpretrain', 'ours')
#: The window per stage of the published 256-pixel window-16 models (the last stage's map is
#: 8 x 8 at 256 pixels).
WINDOWS = (16, 16, 16, 8)
TEST_ARCH = dict(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
#: Buffers that mmpretrain rebuilds from its arguments instead of loading.
REBUILT = ('relative_coords_table', 'relative_position_index')
RESULTS_DIR = Path(__file__).resolve().parent / 'results' / 'v2'


def is_v2(arch: str) -> bool:
    return arch in V2_ARCHS


def base_arch(arch: str) -> str:
    """``'v2-tiny'`` -> ``'tiny'``."""
    if not is_v2(arch):
        raise ValueError(f'not a Swin V2 benchmark arch: {arch!r}; one of {V2_ARCHS}')
    return arch[len('v2-'):]


def peer_kwargs(arch: str) -> dict:
    """mmpretrain ``SwinTransformerV2`` arguments with our dense-backbone semantics."""
    name = base_arch(arch)
    peer_arch = (dict(TEST_ARCH, depths=list(TEST_ARCH['depths']),
                      num_heads=list(TEST_ARCH['num_heads']), extra_norm_every_n_blocks=0)
                 if name == 'test' else name)
    return dict(arch=peer_arch, window_size=list(WINDOWS), pretrained_window_sizes=[0] * 4,
                pad_small_map=True, out_indices=(0, 1, 2, 3), drop_path_rate=0.0)


def our_kwargs(arch: str) -> dict:
    """``SwinV2Backbone`` arguments equal to :func:`peer_kwargs`'s."""
    name = base_arch(arch)
    kwargs = dict(TEST_ARCH) if name == 'test' else dict(arch=name)
    return dict(kwargs, window_size=list(WINDOWS), pretrained_window_sizes=(0,) * 4,
                out_indices=(0, 1, 2, 3), drop_path_rate=0.0)


def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random and not trivial: weights of norms near 1, their biases, the q/v
    biases and the logit scales spread around their init, matrices seeded normal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith('logit_scale'):
                p.copy_(p + 0.3 * noise)
            elif p.dim() == 1:
                p.copy_((1.0 if name.endswith('weight') else 0.0) + 0.05 * noise)  # norms
            else:
                p.copy_(noise * (0.5 / max(1, p.shape[-1])) ** 0.5)
    return model


def seeded_peer_state(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of mmpretrain's model with every parameter randomised."""
    from mmpretrain.models.backbones import SwinTransformerV2
    torch.manual_seed(seed)
    return randomise_(SwinTransformerV2(**peer_kwargs(arch)), seed).state_dict()


def build(impl: str, arch: str, device: str, weights: str) -> torch.nn.Module:
    """mmpretrain's model or ours, with the weights of the file ``weights`` (mmpretrain's
    layout)."""
    if impl == 'mmpretrain':
        from mmpretrain.models.backbones import SwinTransformerV2
        model = SwinTransformerV2(**peer_kwargs(arch))
        # its load hook drops the coordinate tables and indices: it rebuilds them from its
        # arguments, so only those may be missing
        with _quiet_mmengine():
            missing, unexpected = model.load_state_dict(
                torch.load(weights, map_location='cpu', weights_only=True), strict=False)
        missing = [k for k in missing if not k.endswith(REBUILT)]
        if missing or unexpected:
            raise RuntimeError(f'mmpretrain did not load the weights: missing {missing}, '
                               f'unexpected {unexpected}')
    elif impl == 'ours':
        from swin_dense import SwinV2Backbone
        from swin_dense.checkpoint import load_pretrained
        model = SwinV2Backbone(**our_kwargs(arch))
        load_pretrained(model, weights, logger='silent')
    else:
        raise ValueError(f'no implementation {impl!r}; one of {IMPLS}')
    return model.to(device)


def _quiet_mmengine():
    """mmpretrain logs a line per load about the tables it drops: silenced."""
    import contextlib
    import logging

    @contextlib.contextmanager
    def quiet():
        from mmengine.logging import MMLogger
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            logger.setLevel(level)
    return quiet()


def max_relative_error(ours: Sequence[torch.Tensor], peer: Sequence[torch.Tensor]) -> float:
    """Max over outputs of ``max|ours - peer| / max|peer|``.

    Raises:
        ValueError: the outputs differ in number or shape.
    """
    if len(ours) != len(peer):
        raise ValueError(f'{len(ours)} outputs against {len(peer)}')
    errors = []
    for i, (a, b) in enumerate(zip(ours, peer)):
        if a.shape != b.shape:
            raise ValueError(f'output {i}: shape {tuple(a.shape)} against {tuple(b.shape)}')
        errors.append(((a.float() - b.float()).abs().max()
                       / b.float().abs().max().clamp_min(1e-30)).item())
    return max(errors)


def summarise(medians: dict[str, list[float]]) -> dict:
    """One row's times from each implementation's per-round medians (seconds)."""
    row: dict = {}
    for impl, values in medians.items():
        row[f'{impl}_s'] = float(f'{statistics.median(values):.5g}')
        row[f'{impl}_s_range'] = [float(f'{min(values):.5g}'), float(f'{max(values):.5g}')]
    row['speedup'] = row['mmpretrain_s'] / row['ours_s']
    return row


def method_text(args: argparse.Namespace) -> str:
    return (f'separate processes, alternated (mmpretrain, ours), {args.rounds} round(s): each '
            f'process builds one backbone, runs {args.warmup} warm-up step(s) and times '
            f'{args.repeats}; a figure is the median over rounds of each process\'s median '
            'step, the range its min-max over rounds')


def default_path(results: dict) -> Path:
    device = re.sub(r'[^a-z0-9]+', '-', results['machine']['label'].lower()).strip('-')
    return RESULTS_DIR / (f"{results['date']}_{device or 'machine'}_fp32_{results['arch']}_"
                          f"{results['commit']}.json")


# =====================================================================================
# The run (tool: the helpers of tools/benchmark.py, see its dispatch)
# =====================================================================================
def time_child(args: argparse.Namespace, tool: SimpleNamespace) -> None:
    impl, case, mode = args.time_child
    x = tool.case_input(*tool.parse_case(case), args.device)
    run = tool.step_fn(build(impl, args.arch, args.device, args.weights), x, mode, None)
    steps = tool.time_interleaved({impl: run}, args.repeats, args.warmup, args.device)[impl]
    print(json.dumps(dict(median=statistics.median(steps), steps=steps)))


def main(args: argparse.Namespace, argv: Optional[list[str]], tool: SimpleNamespace) -> dict:
    """The V2 benchmark: the table on stdout, then the JSON (``--save``: also to
    :data:`RESULTS_DIR`)."""
    if args.amp or args.onnx or args.in_process or args.also_in_process or args.child:
        raise SystemExit('--arch v2-*: fp32, separate processes only (no --amp, --onnx, '
                         '--in-process, memory)')
    if args.time_child:
        time_child(args, tool)
        return {}
    import warnings
    warnings.filterwarnings('ignore')
    from benchmarks import report
    from benchmarks.machine import header_lines, machine_record, torch_build
    from swin_dense.fileio import atomic_write

    results = report.header(args, argv, machine_record(args.device, args.label), torch_build(),
                            tool.gemm_gflops(args.device), 'float32')
    results.update(method=method_text(args), peer='mmpretrain SwinTransformerV2',
                   peer_kwargs=peer_kwargs(args.arch),
                   load_average=list(os.getloadavg()), in_process=False)
    for line in header_lines(results['machine'], results['torch_build'], results['threads']):
        print(line)
    print(f"# Swin {args.arch} against mmpretrain, commit {results['commit']}; load average "
          f"{' '.join(f'{v:.2f}' for v in results['load_average'])}")
    print(f'{"case":<14}{"mode":<7}{"mmpretrain ms":<22}{"ours ms":<22}{"speed-up":<10}'
          'max rel err', flush=True)
    with tempfile.TemporaryDirectory(prefix='swin_v2_benchmark_') as tmp:
        weights = os.path.join(tmp, 'weights.pt')
        torch.save(seeded_peer_state(args.arch), weights)
        models = {impl: build(impl, args.arch, args.device, weights) for impl in IMPLS}
        for case in args.cases:
            x = tool.case_input(*tool.parse_case(case), args.device)
            outs = {k: tool.step_fn(m, x, 'infer', None)() for k, m in models.items()}
            error = max_relative_error(outs['ours'], outs['mmpretrain'])
            for mode in args.modes:
                medians: dict[str, list[float]] = {impl: [] for impl in IMPLS}
                for _ in range(args.rounds):
                    for impl in IMPLS:
                        line = tool.run_child(['--time-child', impl, case, mode, '--repeats',
                                               str(args.repeats), '--warmup', str(args.warmup),
                                               '--weights', weights], args)
                        medians[impl].append(json.loads(line)['median'])
                row = dict(case=case, mode=mode, **summarise(medians), max_rel_error=error)
                results['cases'].append(row)
                ms = {k: f"{row[f'{k}_s'] * 1e3:.0f} ({row[f'{k}_s_range'][0] * 1e3:.0f}-"
                         f"{row[f'{k}_s_range'][1] * 1e3:.0f})" for k in IMPLS}
                print(f"{case:<14}{mode:<7}{ms['mmpretrain']:<22}{ms['ours']:<22}"
                      f"{row['speedup']:<10.2f}{error:.1e}", flush=True)
    results['load_average_after'] = list(os.getloadavg())
    if not results['notes']:
        del results['notes']
    text = json.dumps(results, indent=1) + '\n'
    print(text, end='')
    targets = ([args.json] if args.json else []) + ([default_path(results)] if args.save else [])
    for path in targets:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp_path: Path(tmp_path).write_text(text, encoding='utf-8'))
        print(f'wrote {path}', file=sys.stderr)
    return results
