"""From a checked config to a finished run: device adaptation, CPU distributed set-up, the
Runner, and the two entry points :func:`train` and :func:`test` that tools/train.py and
tools/test.py call (through :func:`run_tool`).

Before any model is built, :func:`train` and :func:`test` load the config and register the
toolkit (:mod:`.config`), apply the tool's options and select the crash-safe checkpoint hooks
(:mod:`.options`), build the config's demo dataset if it names one, check data, pretrained
weights and channels (:mod:`.checks`) and adapt the config to a machine without CUDA
(:func:`adapt_to_device`).
"""
from __future__ import annotations

import gc
import logging
import os.path as osp
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from .checks import check_channels, check_data, check_pretrained
from .config import load_config, prepare_demo_data, registry, setup_toolkit
from .errors import DeviceError, LaunchError
from .options import apply_test_options, apply_train_options, select_crash_safe_training

if TYPE_CHECKING:
    from mmengine.config import Config
    from mmengine.runner import Runner

__all__ = ['adapt_to_device', 'build_runner', 'run_tool', 'test', 'train']


def _log(message: str, level: int = logging.INFO) -> None:
    from mmengine.logging import print_log
    print_log(message, logger='current', level=level)


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


# =====================================================================================
# Device
# =====================================================================================
def adapt_to_device(cfg: Config, phase: str) -> None:
    """On a machine without CUDA: gloo, no cudnn benchmark, CPU DDP (SyncBN as BN); AMP training
    with ``CPUAmpOptimWrapper`` (bf16 autocast). A CUDA machine keeps the config."""
    if _cuda_available():
        return
    env = cfg.setdefault('env_cfg', {})
    env['cudnn_benchmark'] = False
    dist_cfg = env.setdefault('dist_cfg', {})
    if dist_cfg.get('backend', 'nccl') == 'nccl':
        dist_cfg['backend'] = 'gloo'
    if cfg.get('launcher', 'none') != 'none':
        wrapper = cfg.get('model_wrapper_cfg') or dict(
            type='MMDistributedDataParallel', broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
        wrapper.setdefault('device_ids', None)  # a CPU module takes no device_ids
        cfg.model_wrapper_cfg = wrapper
        _sync_bn_to_bn_on_cpu(cfg)
    optim = cfg.get('optim_wrapper')
    if phase == 'train' and isinstance(optim, dict) and optim.get('type') == 'AmpOptimWrapper':
        from ..integrations.cpu_amp import use_cpu_amp  # mmengine's AmpOptimWrapper asserts a GPU
        use_cpu_amp(cfg)


_SYNC_BN_TYPES = ('SyncBN', 'MMSyncBN')


def _sync_bn_to_bn(node: Any, where: str) -> list[str]:
    """Set ``type='BN'`` in every SyncBN norm config under ``node``; return where (in place)."""
    changed = []
    if isinstance(node, dict):
        if node.get('type') in _SYNC_BN_TYPES:
            node['type'] = 'BN'
            changed.append(where)
        for key, value in node.items():
            changed += _sync_bn_to_bn(value, f'{where}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            changed += _sync_bn_to_bn(value, f'{where}.{i}')
    return changed


def _sync_bn_to_bn_on_cpu(cfg: Config) -> None:
    """Distributed on CPU (gloo): torch's SyncBatchNorm raises on CPU tensors in training, so
    SyncBN (e.g. mmseg's UperNet heads) becomes plain BN, each process normalising over its own
    batch. A non-distributed run needs nothing: mmengine's Runner reverts SyncBN to BN itself."""
    changed = _sync_bn_to_bn(cfg.get('model'), 'model')
    if cfg.get('sync_bn', None) is not None:  # mmengine would convert BN to SyncBN
        cfg.sync_bn = None
        changed.append('sync_bn')
    if changed:
        _log('distributed run without CUDA: SyncBN cannot run on CPU, using per-process BN '
             'instead in ' + ', '.join(changed), logging.WARNING)


def _init_cpu_distributed(cfg: Config) -> None:
    """mmengine's ``init_dist`` calls ``torch.cuda.set_device``: on CPU-only machines start the
    gloo process group here, so the Runner finds it initialised."""
    launcher = cfg.get('launcher', 'none')
    if launcher == 'none' or _cuda_available():
        return
    import torch.distributed as dist
    if dist.is_initialized():
        return
    if launcher != 'pytorch':
        raise DeviceError(f'--launcher {launcher} needs CUDA GPUs; on a CPU-only machine start '
                          'processes with torchrun (tools/dist_train.sh, --launcher pytorch)')
    kwargs = {k: v for k, v in cfg.env_cfg.get('dist_cfg', {}).items() if k != 'backend'}
    if isinstance(kwargs.get('timeout'), (int, float)):
        import datetime
        kwargs['timeout'] = datetime.timedelta(seconds=kwargs['timeout'])
    dist.init_process_group(backend=cfg.env_cfg.dist_cfg.get('backend', 'gloo'), **kwargs)


# =====================================================================================
# Runner
# =====================================================================================
def build_runner(cfg: Config, toolkit: str) -> Runner:
    """As upstream: ``Runner.from_cfg``, or the toolkit's RUNNERS when ``runner_type`` is set."""
    _init_cpu_distributed(cfg)
    if 'runner_type' not in cfg:
        from mmengine.runner import Runner
        return Runner.from_cfg(cfg)
    return registry(toolkit, 'RUNNERS').build(cfg)


def train(config: str, work_dir: Optional[str] = None, amp: bool = False,
          auto_scale_lr: bool = False, resume: Optional[str] = None,
          cfg_options: Optional[dict] = None, launcher: str = 'none'):
    """What ``tools/train.py`` does; returns the trained model (``runner.train()``)."""
    cfg = load_config(config, cfg_options, launcher, work_dir)
    toolkit = setup_toolkit(cfg)
    apply_train_options(cfg, toolkit, amp=amp, auto_scale_lr=auto_scale_lr, resume=resume)
    changed = select_crash_safe_training(cfg)
    if changed:
        _log('atomic checkpoints and exact resume: ' + ', '.join(changed))
    prepare_demo_data(cfg)
    check_data(cfg, 'train')
    check_pretrained(cfg)
    check_channels(cfg)
    adapt_to_device(cfg, 'train')
    return build_runner(cfg, toolkit).train()


def test(config: str, checkpoint: str, work_dir: Optional[str] = None, out: Optional[str] = None,
         show: bool = False, show_dir: Optional[str] = None, wait_time: float = 2,
         cfg_options: Optional[dict] = None, launcher: str = 'none', tta: bool = False) -> dict:
    """What ``tools/test.py`` does; returns the metrics (``runner.test()``)."""
    cfg = load_config(config, cfg_options, launcher, work_dir)
    toolkit = setup_toolkit(cfg)
    prepare_demo_data(cfg)
    check_data(cfg, 'test')
    check_channels(cfg)  # before --tta wraps the model
    apply_test_options(cfg, toolkit, checkpoint, show=show, show_dir=show_dir,
                       wait_time=wait_time, tta=tta, out=out)
    adapt_to_device(cfg, 'test')
    runner = build_runner(cfg, toolkit)
    if show_dir and toolkit == 'mmdet':
        _paint_as_png(runner.visualizer)
    if out is not None and toolkit == 'mmdet':  # as mmdet's tools/test.py
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=out))
    return runner.test()


def _paint_as_png(visualizer) -> None:
    """mmdet's DetVisualizationHook names each painted image after its input (``.jpg`` for
    COCO): this run's visualizer writes them as lossless PNG instead, same name otherwise, so
    drawn edges stay crisp. Only the instance this Runner built is changed."""
    paint = visualizer.add_datasample

    def add_datasample(name, image, *args, out_file=None, **kwargs):
        if out_file is not None:
            out_file = osp.splitext(out_file)[0] + '.png'
        return paint(name, image, *args, out_file=out_file, **kwargs)
    visualizer.add_datasample = add_datasample


def run_tool(main: Callable[[Optional[Iterable[str]]], Any],
             argv: Optional[Iterable[str]] = None) -> int:
    """Run a tool's ``main``; a :class:`LaunchError` prints its message (no traceback), exit 1.

    A process group the run started is closed here, not left to the interpreter's teardown.
    The run's objects are collected first: the Runner, its hooks and the DDP wrapper sit in
    reference cycles, so without a collection DDP's reducer (which holds the gloo group and
    its worker threads) lived on past ``destroy_process_group`` until the interpreter's
    finalization, where a finished two-process CPU training could end in SIGABRT
    ("terminate called without an active exception").
    """
    error = None
    try:
        main(argv)
    except LaunchError as e:
        error = str(e)  # leaving the block drops the traceback, which holds the run's frames
    gc.collect()
    if error is not None:
        print(f'error: {error}', file=sys.stderr)
        _close_process_group(wait_for_others=False)
        return 1
    _close_process_group(wait_for_others=True)
    return 0


def _close_process_group(wait_for_others: bool) -> None:
    """Destroy the default process group, if any; after a barrier when every rank got here."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait_for_others:
        dist.barrier()
    dist.destroy_process_group()
