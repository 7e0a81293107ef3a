"""What ``tools/train.py`` and ``tools/test.py`` share: one pair of tools for mmdet and mmseg.

The tools parse their arguments (the upstream options of mmdet 3.3.0 / mmseg 1.2.2) and call
:func:`train` or :func:`test`, which run, in this order and before any model is built:

1. :func:`ensure_repo_importable` - the repository root goes on ``sys.path`` (tools work from any
   working directory, installed or not);
2. :func:`load_config` - ``Config.fromfile`` (a wrong path is a :class:`FileNotFoundError` naming
   close matches), ``--cfg-options``, launcher, work dir (CLI > config > ``./work_dirs/NAME``);
3. :func:`setup_toolkit` - the toolkit is picked from ``default_scope`` (``'mmdet'`` or
   ``'mmseg'``) and its modules are registered;
4. :func:`prepare_demo_data` - a top-level ``demo_data = dict(kind=..., root=..., ...)`` entry is
   built with :func:`swin_dense.demo_data.ensure_demo_data` when absent;
5. :func:`check_data` - every dataset the run reads (and the evaluators' annotation files) must
   exist; otherwise a :class:`DataNotFoundError` names the paths, the expected layout and how to
   point elsewhere;
6. (train) :func:`check_pretrained` - a local ``Pretrained`` checkpoint in the backbone's
   ``init_cfg`` must exist (:class:`PretrainedNotFoundError` says where the weights come from);
7. :func:`check_channels` - the neck's (or mmseg heads') ``in_channels`` must match the
   backbone's ``out_channels`` (:class:`ChannelMismatchError`);
8. :func:`adapt_to_device` - on a machine without CUDA: gloo instead of nccl, no
   ``cudnn_benchmark``, DDP without ``device_ids``, SyncBN as BN when distributed; AMP there
   trains with bf16 autocast (:mod:`swin_dense.amp`);

then apply the tool's options exactly as the upstream tools do and build the Runner
(``Runner.from_cfg``, or the toolkit's ``RUNNERS`` when the config sets ``runner_type``).
Every error raised for the user derives from :class:`LaunchError`; the tools print its message
without a traceback and exit with status 1.
"""
from __future__ import annotations

import argparse
import difflib
import gc
import logging
import os
import os.path as osp
import sys
import warnings
from copy import deepcopy
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOLKITS = ('mmdet', 'mmseg')

__all__ = [
    'ChannelMismatchError', 'ConfigNotFoundError', 'DataNotFoundError', 'LaunchError',
    'PretrainedNotFoundError', 'REPO_ROOT', 'TOOLKITS', 'UnsupportedToolkitError',
    'adapt_to_device', 'apply_test_options', 'apply_train_options', 'build_runner',
    'check_channels', 'check_data', 'check_pretrained', 'ensure_repo_importable', 'load_config',
    'prepare_demo_data', 'run_tool', 'setup_local_rank', 'setup_toolkit', 'test', 'train',
]


# =====================================================================================
# Errors
# =====================================================================================
class LaunchError(Exception):
    """A problem with the command, the config or the files it names, found before building."""


class ConfigNotFoundError(LaunchError, FileNotFoundError):
    """The config file does not exist."""


class DataNotFoundError(LaunchError, FileNotFoundError):
    """A dataset file or directory the run needs does not exist."""


class PretrainedNotFoundError(LaunchError, FileNotFoundError):
    """The pretrained weights named in the backbone's ``init_cfg`` do not exist."""


class CheckpointNotFoundError(LaunchError, FileNotFoundError):
    """The checkpoint given to test or resume does not exist."""


class CheckpointCorruptError(LaunchError, ValueError):
    """The checkpoint given to test or resume is a truncated torch zip archive."""


class ChannelMismatchError(LaunchError, ValueError):
    """The neck or head ``in_channels`` do not match the backbone's outputs."""


class UnsupportedToolkitError(LaunchError, ValueError):
    """The config's ``default_scope`` is not a toolkit these tools drive."""


class DeviceError(LaunchError, RuntimeError):
    """The requested run needs hardware this machine lacks."""


# =====================================================================================
# Environment, config, toolkit
# =====================================================================================
def ensure_repo_importable() -> None:
    """Put the repository root first on ``sys.path`` and ``PYTHONPATH``.

    The tools then import this checkout's ``swin_dense`` from any working directory (and so do
    dataloader workers and ``custom_imports``), installed or not.
    """
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)
    parts = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
    if root not in parts:
        os.environ['PYTHONPATH'] = os.pathsep.join([root] + parts)


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cfg-options``, ``--launcher`` and ``--local-rank``, as both upstream tools take them."""
    from mmengine.config import DictAction
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override some settings in the used config, the key-value pair in xxx=yyy format '
        'will be merged into config file. If the value to be overwritten is a list, it should be '
        'like key="[a,b]" or key=a,b It also allows nested list/tuple values, e.g. '
        'key="[(a,b),(c,d)]" Note that the quotation marks are necessary and that no white '
        'space is allowed.')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_tool_args(parser: argparse.ArgumentParser,
                    argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the tool's arguments and export ``LOCAL_RANK`` (:func:`setup_local_rank`)."""
    args = parser.parse_args(argv)
    setup_local_rank(args.local_rank)
    return args


def setup_local_rank(local_rank: int) -> None:
    """As upstream: ``torch.distributed.launch`` passes ``--local-rank``; torchrun sets the env."""
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(local_rank)


def _config_candidates(path: str) -> list[str]:
    """Existing config files whose names are close to ``path``'s, for the not-found message."""
    p = Path(path)
    dirs = [p.parent if str(p.parent) else Path('.')]
    for base in (Path.cwd(), REPO_ROOT):
        try:
            rel = p.parent if not p.is_absolute() else p.parent.relative_to(base)
        except ValueError:
            continue
        dirs.append(base / rel)
    names: dict[str, str] = {}
    for d in dirs:
        if d.is_dir():
            for f in d.glob('*.py'):
                names.setdefault(f.name, str(f))
    if not names:  # the directory itself is wrong: look through the repository's configs
        for f in (REPO_ROOT / 'configs').rglob('*.py'):
            names.setdefault(f.name, str(f))
    close = difflib.get_close_matches(p.name, list(names), n=3, cutoff=0.5)
    return [names[n] for n in close]


def load_config(path: str, cfg_options: Optional[dict] = None, launcher: str = 'none',
                work_dir: Optional[str] = None):
    """Read a config as the upstream tools do: ``Config.fromfile``, then ``--cfg-options``,
    ``launcher`` and the work dir (CLI > ``work_dir`` in the config > ``./work_dirs/NAME``)."""
    from mmengine.config import Config

    if not osp.isfile(path):
        close = _config_candidates(path)
        hint = ('; did you mean ' + ' or '.join(close) + '?') if close else ''
        where = '' if osp.isabs(path) else f' (relative to the working directory {os.getcwd()})'
        raise ConfigNotFoundError(f'config file not found: {path}{where}{hint}')
    cfg = Config.fromfile(path)
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(path))[0])
    return cfg


def toolkit_of(cfg) -> str:
    """``'mmdet'`` or ``'mmseg'`` from the config's ``default_scope``; anything else is an error."""
    scope = cfg.get('default_scope', None)
    if scope not in TOOLKITS:
        raise UnsupportedToolkitError(
            f"config default_scope is {scope!r}; these tools drive {' and '.join(TOOLKITS)} "
            "configs only: set default_scope = 'mmdet' (detection) or 'mmseg' (segmentation), "
            "or inherit from a base config that does (e.g. mmdet::_base_/default_runtime.py)")
    return scope


def setup_toolkit(cfg) -> str:
    """Register the modules of the config's toolkit (picked from ``default_scope``); return it."""
    toolkit = toolkit_of(cfg)
    if toolkit == 'mmdet':
        from mmdet.utils import register_all_modules, setup_cache_size_limit_of_dynamo
        setup_cache_size_limit_of_dynamo()
    else:
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    _allow_mmengine_checkpoints()
    return toolkit


def _allow_mmengine_checkpoints() -> None:
    """torch >= 2.6 loads ``weights_only`` by default; mmengine's own checkpoints (resume,
    ``load_from``, test) carry HistoryBuffer / numpy metadata: allow-list exactly those types."""
    try:
        from .checkpoint import register_mmengine_safe_globals
    except ImportError:  # pragma: no cover - checkpoint.py is always shipped
        return
    register_mmengine_safe_globals()


def _registry(toolkit: str, name: str):
    module = __import__(f'{toolkit}.registry', fromlist=[name])
    return getattr(module, name)


# =====================================================================================
# Demo data
# =====================================================================================
def prepare_demo_data(cfg) -> Optional[Path]:
    """Build the config's ``demo_data`` dataset when absent (safe from several processes)."""
    spec = cfg.get('demo_data', None)
    if not spec:
        return None
    from .demo_data import ensure_demo_data
    spec = dict(spec)
    kind = spec.pop('kind')
    root = spec.pop('root')
    return ensure_demo_data(kind, root, **spec)


# =====================================================================================
# Data check
# =====================================================================================
_LAYOUTS = {
    'coco': ('COCO 2017 (https://cocodataset.org: train2017.zip, val2017.zip, '
             'annotations_trainval2017.zip)', [
                 'annotations/instances_train2017.json',
                 'annotations/instances_val2017.json',
                 'train2017/   (118287 images)',
                 'val2017/     (5000 images)']),
    'ade20k': ('ADE20K (ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu)', [
        'images/training/       (20210 .jpg)',
        'images/validation/     (2000 .jpg)',
        'annotations/training/  (20210 .png)',
        'annotations/validation/ (2000 .png)']),
}


def _layout_key(dataset_type: str, toolkit: str) -> Optional[str]:
    t = str(dataset_type).lower()
    if 'coco' in t:
        return 'coco'
    if 'ade' in t:
        return 'ade20k'
    return None


def _leaf_datasets(ds: Any, where: str) -> Iterator[tuple[str, dict]]:
    """The datasets that read files, through wrappers (Repeat/Concat/ClassBalanced/...)."""
    if isinstance(ds, dict):
        inner = ds.get('dataset')
        many = ds.get('datasets')
        if inner is not None:
            yield from _leaf_datasets(inner, f'{where}.dataset')
        elif many is not None:
            for i, d in enumerate(many):
                yield from _leaf_datasets(d, f'{where}.datasets.{i}')
        else:
            yield where, ds


def _is_remote(path: str) -> bool:
    return '://' in str(path)


def _join(root: Optional[str], path: str) -> str:
    if root and not osp.isabs(path) and not _is_remote(path):
        return osp.join(root, path)
    return path


def _dataset_paths(ds: dict) -> list[str]:
    """The files and directories a dataset reads, as mmengine's BaseDataset resolves them."""
    root = ds.get('data_root') or None
    paths = []
    ann_file = ds.get('ann_file')
    if ann_file:
        paths.append(_join(root, ann_file))
    prefix = ds.get('data_prefix') or {}
    if isinstance(prefix, dict):
        paths += [_join(root, v) for v in prefix.values() if isinstance(v, str) and v]
    elif isinstance(prefix, str) and prefix:
        paths.append(_join(root, prefix))
    if not paths and root:
        paths.append(root)
    return paths


def _evaluator_files(evaluator: Any) -> list[str]:
    items = evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]
    return [e['ann_file'] for e in items
            if isinstance(e, dict) and isinstance(e.get('ann_file'), str) and e.get('ann_file')]


_PHASE_LOADERS = {'train': ('train_dataloader', 'val_dataloader'), 'test': ('test_dataloader',)}
_PHASE_EVALUATORS = {'train': ('val_evaluator',), 'test': ('test_evaluator',)}


def _phase_keys(cfg, phase: str) -> tuple[list[str], list[str]]:
    loaders = list(_PHASE_LOADERS[phase])
    evaluators = list(_PHASE_EVALUATORS[phase])
    if phase == 'train' and not (cfg.get('val_cfg') and cfg.get('val_dataloader')
                                 and cfg.get('val_evaluator')):
        loaders.remove('val_dataloader')  # the Runner builds no validation loop
        evaluators = []
    return loaders, evaluators


def _fmt(path: str) -> str:
    return path if osp.isabs(path) else f'{path}  (= {osp.abspath(path)})'


def check_data(cfg, phase: str) -> None:
    """Raise :class:`DataNotFoundError` unless every dataset file the run reads exists.

    ``phase`` 'train' checks the training data and, when the config validates, the validation
    data and evaluator annotation files; 'test' checks the test data and evaluator. Remote paths
    (``s3://``...) and datasets with ``backend_args`` are not checked.
    """
    if phase not in _PHASE_LOADERS:
        raise ValueError(f"phase must be 'train' or 'test', got {phase!r}")
    toolkit = cfg.get('default_scope', None)
    loaders, evaluators = _phase_keys(cfg, phase)
    missing: list[tuple[str, str]] = []
    layouts: dict[str, str] = {}
    roots: list[str] = []
    for key in loaders:
        loader = cfg.get(key)
        if not loader or 'dataset' not in loader:
            continue
        for where, ds in _leaf_datasets(loader['dataset'], f'{key}.dataset'):
            if ds.get('backend_args'):
                continue
            if ds.get('data_root'):
                roots.append(ds['data_root'])
            layout = _layout_key(ds.get('type', ''), toolkit)
            for path in _dataset_paths(ds):
                if not _is_remote(path) and not osp.exists(path):
                    missing.append((f'{where} ({ds.get("type", "?")})', path))
                    if layout:
                        layouts.setdefault(layout, ds.get('data_root') or '')
    for key in evaluators:
        for path in _evaluator_files(cfg.get(key)):
            if not _is_remote(path) and not osp.exists(path):
                missing.append((f'{key}.ann_file', path))
    if not missing:
        return

    lines = [f'dataset files not found (the {phase} run needs them; relative paths are relative '
             f'to the working directory {os.getcwd()}):']
    lines += [f'  {where}: {_fmt(path)}' for where, path in missing]
    for layout, root in layouts.items():
        title, entries = _LAYOUTS[layout]
        shown = root or '<data_root>/'
        lines.append(f'Expected layout of {title} under {shown}:')
        lines += [f'  {shown.rstrip("/")}/{e}' for e in entries]
    root = roots[0] if roots else 'data/'
    lines.append('To use data stored elsewhere, either')
    lines.append(f'  - link it into place: mkdir -p {osp.dirname(root.rstrip("/")) or "."} && '
                 f'ln -s /path/to/dataset {root.rstrip("/")}')
    lines.append('  - or override the paths: --cfg-options ' + _override_hint(cfg))
    lines.append('  - or edit data_root in the config (set data_root in train/val/test_dataloader'
                 '.dataset and the evaluators\' ann_file, as configs/mask_rcnn/swin_t_demo.py '
                 'does: a data_root variable in a child config does not reach the values its '
                 'base config already resolved)')
    raise DataNotFoundError('\n'.join(lines))


def _override_hint(cfg) -> str:
    """A ``--cfg-options`` argument list pointing every dataset and evaluator at /path/to/data/."""
    new = '/path/to/dataset/'
    parts = []
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg.get(key)
        if not loader or 'dataset' not in loader:
            continue
        for where, ds in _leaf_datasets(loader['dataset'], f'{key}.dataset'):
            if 'data_root' in ds and '.datasets.' not in where:
                parts.append(f'{where}.data_root={new}')
    for key in ('val_evaluator', 'test_evaluator'):
        ev = cfg.get(key)
        if isinstance(ev, dict) and isinstance(ev.get('ann_file'), str):
            roots = [ds.get('data_root') for loader in ('val_dataloader', 'test_dataloader')
                     for _, ds in _leaf_datasets((cfg.get(loader) or {}).get('dataset'), '')
                     if ds.get('data_root')]
            ann = ev['ann_file']
            for r in roots:
                if ann.startswith(r):
                    ann = new + ann[len(r):].lstrip('/')
                    break
            else:
                ann = new + osp.basename(ann)
            parts.append(f'{key}.ann_file={ann}')
    return ' '.join(parts) if parts else 'train_dataloader.dataset.data_root=/path/to/dataset/'


# =====================================================================================
# Pretrained weights, checkpoints
# =====================================================================================
_OFFICIAL_WEIGHTS = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/'


def _pretrained_paths(model: Any, where: str = 'model') -> Iterator[tuple[str, str, Any]]:
    """``(config key, checkpoint, owner type)`` of every ``init_cfg`` of type Pretrained."""
    if isinstance(model, dict):
        init = model.get('init_cfg')
        for i, item in enumerate(init if isinstance(init, (list, tuple)) else [init]):
            if isinstance(item, dict) and item.get('type') == 'Pretrained' \
                    and isinstance(item.get('checkpoint'), str):
                key = f'{where}.init_cfg' + (f'.{i}' if isinstance(init, (list, tuple)) else '')
                yield key, item['checkpoint'], model.get('type')
        for k, v in model.items():
            if k != 'init_cfg' and isinstance(v, (dict, list, tuple)):
                yield from _pretrained_paths(v, f'{where}.{k}')
    elif isinstance(model, (list, tuple)):
        for i, v in enumerate(model):
            yield from _pretrained_paths(v, f'{where}.{i}')


def check_pretrained(cfg) -> None:
    """Raise :class:`PretrainedNotFoundError` when a ``Pretrained`` file of the model is missing.

    SwinBackbone never downloads, so a URL in its ``init_cfg`` is an error too; other modules'
    URLs and mmengine's ``torchvision://``-style names are left to mmengine.
    """
    for key, path, owner in _pretrained_paths(cfg.get('model')):
        ours = owner == 'SwinBackbone'
        if (_is_remote(path) and not ours) or osp.exists(osp.expanduser(path)):
            continue
        name = osp.basename(path)
        if _is_remote(path):
            lines = [f'pretrained weights are a URL: {path} (set in {key}.checkpoint); '
                     'SwinBackbone never downloads. Download the file and point '
                     f'{key}.checkpoint (or the config\'s `pretrained`) at the local copy, e.g. '
                     f'mkdir -p checkpoints && wget -O checkpoints/{name} {path}']
        else:
            lines = [f'pretrained weights not found: {_fmt(path)} (set in {key}.checkpoint)']
            if name.startswith('swin_'):
                lines.append(f'The official ImageNet weights are at {_OFFICIAL_WEIGHTS}{name}; '
                             f'download that file to {path} (mkdir -p '
                             f'{osp.dirname(path) or "."} && wget -O {path} '
                             f'{_OFFICIAL_WEIGHTS}{name}).')
        lines.append('SwinBackbone reads the official, timm, torchvision, mmpretrain, mmdet and '
                     'mmseg formats as they are; tools/convert_checkpoint.py SRC DST writes any '
                     'of them in the native layout (e.g. as .safetensors).')
        lines.append(f'Point elsewhere with --cfg-options {key}.checkpoint=/path/to/'
                     f'{name or "weights.pth"}, or train from scratch (random initialisation) '
                     f'with --cfg-options {key}=None')
        raise PretrainedNotFoundError('\n'.join(lines))


def _check_checkpoint_file(path: Optional[str], what: str) -> None:
    if path and not _is_remote(path) and not osp.isfile(path):
        raise CheckpointNotFoundError(f'{what} not found: {_fmt(path)}')
    if path and not _is_remote(path):
        import zipfile
        with open(path, 'rb') as f:
            head = f.read(2)
        if head == b'PK' and not zipfile.is_zipfile(path):  # no end-of-archive record
            raise CheckpointCorruptError(
                f'{what} is a truncated torch zip archive: '
                f'{_fmt(path)} ({osp.getsize(path)} bytes); it was not completely written '
                '(checkpoints written by tools/train.py are complete or absent): use another '
                'one, e.g. the one named in the work dir\'s last_checkpoint')


# =====================================================================================
# Channels
# =====================================================================================
def _backbone_out_channels(backbone_cfg: dict, toolkit: str) -> Optional[tuple[int, ...]]:
    """Channels of the backbone's outputs, from the backbone built alone (no weights loaded);
    None when the backbone type does not say (it then is not checked)."""
    cfg = deepcopy(dict(backbone_cfg))
    cfg.pop('init_cfg', None)
    cfg.pop('pretrained', None)
    try:
        models = _registry(toolkit, 'MODELS')
        from mmengine.registry import DefaultScope
        with DefaultScope.overwrite_default_scope(toolkit):
            backbone = models.build(cfg)
    except Exception:  # noqa: BLE001 - the full build will report a broken backbone config
        return None
    out = getattr(backbone, 'out_channels', None)
    if isinstance(out, (list, tuple)) and all(isinstance(c, int) for c in out):
        return tuple(out)
    features = getattr(backbone, 'num_features', None)
    indices = getattr(backbone, 'out_indices', None)
    if isinstance(features, (list, tuple)) and isinstance(indices, (list, tuple)):
        try:
            return tuple(int(features[i]) for i in indices)
        except (IndexError, TypeError):
            return None
    return None


def _expected_head_channels(out: Sequence[int], in_index: Any) -> Any:
    if isinstance(in_index, (list, tuple)):
        return [out[i] for i in in_index]
    return out[in_index]


def check_channels(cfg) -> None:
    """Raise :class:`ChannelMismatchError` when the model's ``in_channels`` do not fit the backbone.

    Detection: ``model.neck.in_channels`` must equal the backbone's ``out_channels``.
    Segmentation without a neck: each ``decode_head`` / ``auxiliary_head`` must take the
    channels of the outputs it selects with ``in_index`` (a list for a list).
    """
    model = cfg.get('model')
    if not isinstance(model, dict) or not isinstance(model.get('backbone'), dict):
        return
    backbone = model['backbone']
    out = _backbone_out_channels(backbone, toolkit_of(cfg))
    if out is None:
        return
    problems = []
    neck = model.get('neck')
    if isinstance(neck, dict):
        if 'in_channels' in neck and isinstance(neck['in_channels'], (list, tuple)) \
                and list(neck['in_channels']) != list(out):
            problems.append(('model.neck.in_channels', list(neck['in_channels']), list(out)))
    elif neck is None:
        for key in ('decode_head', 'auxiliary_head'):
            heads = model.get(key)
            for i, head in enumerate(heads if isinstance(heads, (list, tuple)) else [heads]):
                if not isinstance(head, dict) or 'in_channels' not in head:
                    continue
                name = f'model.{key}' + (f'.{i}' if isinstance(heads, (list, tuple)) else '')
                given = head['in_channels']
                in_index = head.get('in_index', -1)
                try:
                    expected = _expected_head_channels(out, in_index)
                except (IndexError, TypeError):
                    problems.append((f'{name}.in_index', in_index,
                                     f'indices into the {len(out)} backbone outputs'))
                    continue
                given_cmp = list(given) if isinstance(given, (list, tuple)) else given
                if head.get('input_transform') == 'resize_concat' and isinstance(expected, list):
                    ok = given_cmp == expected or given_cmp == sum(expected)
                else:
                    ok = given_cmp == expected
                if not ok:
                    problems.append((f'{name}.in_channels', given_cmp, expected))
    if problems:
        kind = backbone.get('type', '?')
        lines = [f"the model's in_channels do not match its backbone: {kind} gives outputs "
                 f'with out_channels {list(out)} (embed_dims * 2**i for out_indices '
                 f'{tuple(backbone.get("out_indices", ()))})']
        for key, given, expected in problems:
            lines.append(f'  {key} = {given}, expected {expected}')
        fix = ' '.join(f'{k}={str(e).replace(" ", "")}' for k, _, e in problems
                       if not isinstance(e, str))
        if fix:
            lines.append(f'Fix the config, e.g. --cfg-options {fix}')
        raise ChannelMismatchError('\n'.join(lines))


# =====================================================================================
# Device
# =====================================================================================
def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def adapt_to_device(cfg, phase: str) -> None:
    """On a machine without CUDA: gloo, no cudnn benchmark, CPU DDP (SyncBN as BN); AMP training
    with :class:`swin_dense.amp.CPUAmpOptimWrapper` (bf16 autocast)."""
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
        from .amp import use_cpu_amp  # mmengine's AmpOptimWrapper asserts a GPU
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


def _sync_bn_to_bn_on_cpu(cfg) -> None:
    """Distributed on CPU (gloo): torch's SyncBatchNorm raises on CPU tensors in training, so
    SyncBN (e.g. mmseg's UperNet heads) becomes plain BN, each process normalising over its own
    batch. A non-distributed run needs nothing: mmengine's Runner reverts SyncBN to BN itself."""
    changed = _sync_bn_to_bn(cfg.get('model'), 'model')
    if cfg.get('sync_bn', None) is not None:  # mmengine would convert BN to SyncBN
        cfg.sync_bn = None
        changed.append('sync_bn')
    if changed:
        from mmengine.logging import print_log
        print_log('distributed run without CUDA: SyncBN cannot run on CPU, using per-process BN '
                  'instead in ' + ', '.join(changed), logger='current', level=logging.WARNING)


def _init_cpu_distributed(cfg) -> None:
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
# Tool options (as the upstream tools apply them)
# =====================================================================================
def apply_train_options(cfg, toolkit: str, amp: bool = False, auto_scale_lr: bool = False,
                        resume: Optional[str] = None) -> None:
    """``--amp``, ``--auto-scale-lr`` and ``--resume [CKPT]`` as mmdet's tools/train.py.

    ``resume='auto'`` (``--resume`` alone) resumes from the work dir's last checkpoint (a fresh
    start when there is none); any other value resumes from that file.
    """
    if amp:
        wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if wrapper == 'AmpOptimWrapper':
            from mmengine.logging import print_log
            print_log('AMP training is already enabled in your config.', logger='current',
                      level=logging.WARNING)
        else:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
    if auto_scale_lr:
        scale = cfg.get('auto_scale_lr', None)
        if not scale or 'enable' not in scale or 'base_batch_size' not in scale:
            raise LaunchError(
                '--auto-scale-lr needs auto_scale_lr = dict(enable=False, base_batch_size=N) in '
                'the config (N: the total batch size its learning rate was set for, e.g. 16 = '
                '8 GPUs x 2 images)')
        cfg.auto_scale_lr.enable = True
    if resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif resume is not None:
        _check_checkpoint_file(resume, 'checkpoint to resume from (--resume)')
        cfg.resume = True
        cfg.load_from = resume


def _has_mask_head(model: Any) -> bool:
    if isinstance(model, dict):
        return model.get('mask_head') is not None or any(
            _has_mask_head(v) for k, v in model.items() if k != 'mask_head')
    if isinstance(model, (list, tuple)):
        return any(_has_mask_head(v) for v in model)
    return False


def _default_tta(cfg) -> None:
    """mmdet's tools/test.py defaults when the config has no tta_model / tta_pipeline."""
    if 'tta_model' not in cfg:
        warnings.warn('Cannot find ``tta_model`` in config, we will set it as default.')
        cfg.tta_model = dict(type='DetTTAModel',
                             tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5),
                                          max_per_img=100))
    if 'tta_pipeline' not in cfg:
        warnings.warn('Cannot find ``tta_pipeline`` in config, we will set it as default.')
        test_data_cfg = cfg.test_dataloader.dataset
        while 'dataset' in test_data_cfg:
            test_data_cfg = test_data_cfg['dataset']
        cfg.tta_pipeline = deepcopy(test_data_cfg.pipeline)
        cfg.tta_pipeline[-1] = dict(
            type='TestTimeAug',
            transforms=[[dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)],
                        [dict(type='PackDetInputs',
                              meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                         'scale_factor', 'flip', 'flip_direction'))]])


def apply_test_options(cfg, toolkit: str, checkpoint: str, show: bool = False,
                       show_dir: Optional[str] = None, wait_time: float = 2,
                       tta: bool = False, out: Optional[str] = None) -> None:
    """``CHECKPOINT``, ``--show/--show-dir/--wait-time``, ``--tta`` and (mmseg) ``--out`` as the
    toolkit's own tools/test.py; mmdet's ``--out`` is added to the built runner by :func:`test`."""
    from mmengine import ConfigDict
    _check_checkpoint_file(checkpoint, 'checkpoint to test')
    cfg.load_from = checkpoint
    if show or show_dir:
        hooks = cfg.get('default_hooks') or {}
        if 'visualization' not in hooks:
            raise LaunchError('--show / --show-dir need a VisualizationHook in default_hooks: '
                              "visualization=dict(type='DetVisualizationHook') (mmdet) or "
                              "dict(type='SegVisualizationHook') (mmseg)")
        vis = hooks['visualization']
        vis['draw'] = True
        if show:
            vis['show'] = True
            vis['wait_time'] = wait_time
        if show_dir:
            if toolkit == 'mmdet':  # under work_dir/TIMESTAMP/ when relative, as upstream
                vis['test_out_dir'] = show_dir
            else:
                vis['interval'] = 1  # every image (mmseg's hook draws every 50th by default)
                cfg.visualizer['save_dir'] = show_dir
    if tta:
        if toolkit == 'mmdet':
            if _has_mask_head(cfg.get('model')):
                raise LaunchError(
                    "--tta: mmdet 3.3.0's DetTTAModel merges boxes only ('TTA of instance "
                    "segmentation does not support now'), so a model with a mask head cannot "
                    'be tested with it; test without --tta, or boxes only with --cfg-options '
                    'model.roi_head.mask_head=None test_evaluator.metric=bbox')
            _default_tta(cfg)
            cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
            cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        else:
            if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
                raise LaunchError('--tta needs tta_model and tta_pipeline in the config (mmseg '
                                  'base configs of the dataset define them)')
            cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
            cfg.tta_model.module = cfg.model
            cfg.model = cfg.tta_model
    if out is not None:
        if toolkit == 'mmdet':
            if not out.endswith(('.pkl', '.pickle')):
                raise LaunchError(f'--out must name a .pkl or .pickle file, got {out}')
        else:  # mmseg: a directory for the predicted label maps
            cfg.test_evaluator['output_dir'] = out
            cfg.test_evaluator['keep_results'] = True


# =====================================================================================
# Runner
# =====================================================================================
def build_runner(cfg, toolkit: str):
    """As upstream: ``Runner.from_cfg``, or the toolkit's RUNNERS when ``runner_type`` is set."""
    _init_cpu_distributed(cfg)
    if 'runner_type' not in cfg:
        from mmengine.runner import Runner
        return Runner.from_cfg(cfg)
    return _registry(toolkit, 'RUNNERS').build(cfg)


def train(config: str, work_dir: Optional[str] = None, amp: bool = False,
          auto_scale_lr: bool = False, resume: Optional[str] = None,
          cfg_options: Optional[dict] = None, launcher: str = 'none'):
    """What ``tools/train.py`` does; returns the trained model (``runner.train()``)."""
    ensure_repo_importable()
    cfg = load_config(config, cfg_options, launcher, work_dir)
    toolkit = setup_toolkit(cfg)
    apply_train_options(cfg, toolkit, amp=amp, auto_scale_lr=auto_scale_lr, resume=resume)
    prepare_demo_data(cfg)
    check_data(cfg, 'train')
    check_pretrained(cfg)
    check_channels(cfg)
    adapt_to_device(cfg, 'train')
    runner = build_runner(cfg, toolkit)
    from .resume import install as install_crash_safe_resume
    install_crash_safe_resume(runner)  # atomic checkpoints, RNG state saved and restored
    return runner.train()


def test(config: str, checkpoint: str, work_dir: Optional[str] = None, out: Optional[str] = None,
         show: bool = False, show_dir: Optional[str] = None, wait_time: float = 2,
         cfg_options: Optional[dict] = None, launcher: str = 'none', tta: bool = False) -> dict:
    """What ``tools/test.py`` does; returns the metrics (``runner.test()``)."""
    ensure_repo_importable()
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
    if out is not None and toolkit == 'mmdet':
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=out))
    return runner.test()


def _paint_as_png(visualizer) -> None:
    """mmdet's DetVisualizationHook names each painted image after its input (``.jpg`` for
    COCO): write it as lossless PNG instead, same name otherwise, so drawn edges stay crisp."""
    paint = visualizer.add_datasample

    def add_datasample(name, image, *args, out_file=None, **kwargs):
        if out_file is not None:
            out_file = osp.splitext(out_file)[0] + '.png'
        return paint(name, image, *args, out_file=out_file, **kwargs)
    visualizer.add_datasample = add_datasample


def run_tool(main, argv: Optional[Iterable[str]] = None) -> int:
    """Run a tool's ``main``; a :class:`LaunchError` prints its message (no traceback), exit 1.

    A process group the run started is closed here, not left to the interpreter's teardown.
    The run's objects are collected first: the Runner, its hooks and the DDP wrapper sit in
    reference cycles, so without a collection DDP's reducer (which holds the gloo group and
    its worker threads) lived on past ``destroy_process_group`` until the interpreter's
    finalization, where a finished two-process CPU training ended in SIGABRT ("terminate
    called without an active exception") about once in 20-40 runs.
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
