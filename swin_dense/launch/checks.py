"""Pre-flight checks: what a run reads must exist and the model's channels must fit together.

Each check runs on the config alone, before any model or Runner is built, and raises a
:class:`~swin_dense.launch.errors.LaunchError` that names the problem and how to fix it. They
are generic over the toolkits' dataset and model configs: any dataset with ``data_root``,
``ann_file`` and ``data_prefix`` (through Repeat/Concat/ClassBalanced wrappers), any evaluator
with ``ann_file`` / ``seg_prefix``, any neck or head with list ``in_channels``.
"""
from __future__ import annotations

import os
import os.path as osp
import zipfile
from copy import deepcopy
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from .config import registry, toolkit_of
from .errors import (ChannelMismatchError, CheckpointCorruptError, CheckpointNotFoundError,
                     DataNotFoundError, PretrainedNotFoundError)

if TYPE_CHECKING:
    from mmengine.config import Config

__all__ = ['check_channels', 'check_checkpoint_file', 'check_data', 'check_pretrained']


def _is_remote(path: str) -> bool:
    return '://' in str(path)


def _fmt(path: str) -> str:
    return path if osp.isabs(path) else f'{path}  (= {osp.abspath(path)})'


# =====================================================================================
# Data
# =====================================================================================
_COCO_ZIPS = 'https://cocodataset.org: train2017.zip, val2017.zip'
_LAYOUTS = {
    'coco': (f'COCO 2017 ({_COCO_ZIPS}, annotations_trainval2017.zip)', [
        'annotations/instances_train2017.json',
        'annotations/instances_val2017.json',
        'train2017/   (118287 images)',
        'val2017/     (5000 images)']),
    'coco_panoptic': (f'COCO 2017 panoptic ({_COCO_ZIPS}, panoptic_annotations_trainval2017.zip, '
                      'whose panoptic_train2017.zip and panoptic_val2017.zip unpack into '
                      'annotations/; annotations_trainval2017.zip for the instances files)', [
                          'annotations/panoptic_train2017.json',
                          'annotations/panoptic_val2017.json',
                          'annotations/panoptic_train2017/  (118287 .png)',
                          'annotations/panoptic_val2017/    (5000 .png)',
                          'annotations/instances_val2017.json  (when boxes and masks are '
                          'evaluated too)',
                          'train2017/   (118287 images)',
                          'val2017/     (5000 images)']),
    'ade20k': ('ADE20K (ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu)', [
        'images/training/       (20210 .jpg)',
        'images/validation/     (2000 .jpg)',
        'annotations/training/  (20210 .png)',
        'annotations/validation/ (2000 .png)']),
}


def _layout_key(dataset_type: Any) -> Optional[str]:
    t = str(dataset_type).lower()
    if 'coco' in t:
        return 'coco_panoptic' if 'panoptic' in t else 'coco'
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


_EVALUATOR_INPUTS = ('ann_file', 'seg_prefix')  # files an evaluator reads (COCO, COCO panoptic)


def _evaluator_paths(evaluator: Any, key: str) -> Iterator[tuple[str, str]]:
    """``(config key, path)`` of every file an evaluator (or a list of them) reads."""
    many = isinstance(evaluator, (list, tuple))
    for i, item in enumerate(evaluator if many else [evaluator]):
        if not isinstance(item, dict) or item.get('backend_args'):
            continue
        for name in _EVALUATOR_INPUTS:
            value = item.get(name)
            if isinstance(value, str) and value:
                yield f'{key}{f".{i}" if many else ""}.{name}', value


_PHASE_LOADERS = {'train': ('train_dataloader', 'val_dataloader'), 'test': ('test_dataloader',)}
_PHASE_EVALUATORS = {'train': ('val_evaluator',), 'test': ('test_evaluator',)}


def _phase_keys(cfg: Config, phase: str) -> tuple[list[str], list[str]]:
    loaders = list(_PHASE_LOADERS[phase])
    evaluators = list(_PHASE_EVALUATORS[phase])
    if phase == 'train' and not (cfg.get('val_cfg') and cfg.get('val_dataloader')
                                 and cfg.get('val_evaluator')):
        loaders.remove('val_dataloader')  # the Runner builds no validation loop
        evaluators = []
    return loaders, evaluators


def check_data(cfg: Config, phase: str) -> None:
    """Raise :class:`DataNotFoundError` unless every dataset file the run reads exists.

    ``phase`` 'train' checks the training data and, when the config validates, the validation
    data and evaluator files; 'test' checks the test data and evaluator. Remote paths
    (``s3://``...) and datasets or evaluators with ``backend_args`` are not checked.
    """
    if phase not in _PHASE_LOADERS:
        raise ValueError(f"phase must be 'train' or 'test', got {phase!r}")
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
            layout = _layout_key(ds.get('type', ''))
            for path in _dataset_paths(ds):
                if not _is_remote(path) and not osp.exists(path):
                    missing.append((f'{where} ({ds.get("type", "?")})', path))
                    if layout:
                        layouts.setdefault(layout, ds.get('data_root') or '')
    for key in evaluators:
        for where, path in _evaluator_paths(cfg.get(key), key):
            if not _is_remote(path) and not osp.exists(path):
                missing.append((where, path))
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
                 '.dataset and the evaluators\' files, as configs/mask_rcnn/swin_t_demo.py '
                 'does: a data_root variable in a child config does not reach the values its '
                 'base config already resolved)')
    raise DataNotFoundError('\n'.join(lines))


def _override_hint(cfg: Config) -> str:
    """A ``--cfg-options`` argument list pointing every dataset and evaluator at /path/to/data/."""
    new = '/path/to/dataset/'
    parts = []
    roots = []
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg.get(key)
        if not loader or 'dataset' not in loader:
            continue
        for where, ds in _leaf_datasets(loader['dataset'], f'{key}.dataset'):
            if ds.get('data_root'):
                roots.append(ds['data_root'])
            if 'data_root' in ds and '.datasets.' not in where:
                parts.append(f'{where}.data_root={new}')
    for key in ('val_evaluator', 'test_evaluator'):
        for where, path in _evaluator_paths(cfg.get(key), key):
            for r in roots:
                if path.startswith(r):
                    path = new + path[len(r):].lstrip('/')
                    break
            else:
                path = new + osp.basename(path.rstrip('/'))
            parts.append(f'{where}={path}')
    return ' '.join(parts) if parts else 'train_dataloader.dataset.data_root=/path/to/dataset/'


# =====================================================================================
# Pretrained weights, checkpoints
# =====================================================================================
_OFFICIAL_WEIGHTS = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/'
_OFFICIAL_WEIGHTS_V2 = 'https://github.com/SwinTransformer/storage/releases/download/v2.0.0/'


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


def check_pretrained(cfg: Config) -> None:
    """Raise :class:`PretrainedNotFoundError` when a ``Pretrained`` file of the model is missing.

    SwinBackbone never downloads, so a URL in its ``init_cfg`` is an error too; other modules'
    URLs and mmengine's ``torchvision://``-style names are left to mmengine.
    """
    for key, path, owner in _pretrained_paths(cfg.get('model')):
        ours = owner in ('SwinBackbone', 'SwinV2Backbone')
        if (_is_remote(path) and not ours) or osp.exists(osp.expanduser(path)):
            continue
        name = osp.basename(path)
        if _is_remote(path):
            lines = [f'pretrained weights are a URL: {path} (set in {key}.checkpoint); '
                     f'{owner} never downloads. Download the file and point '
                     f'{key}.checkpoint (or the config\'s `pretrained`) at the local copy, e.g. '
                     f'mkdir -p checkpoints && wget -O checkpoints/{name} {path}']
        else:
            lines = [f'pretrained weights not found: {_fmt(path)} (set in {key}.checkpoint)']
            if name.startswith('swinv2_'):
                lines.append(f'The official Swin V2 ImageNet weights are at '
                             f'{_OFFICIAL_WEIGHTS_V2}{name}; download that file to {path}.')
            elif name.startswith('swin_'):
                lines.append(f'The official ImageNet weights are at {_OFFICIAL_WEIGHTS}{name}; '
                             f'download that file to {path} (mkdir -p '
                             f'{osp.dirname(path) or "."} && wget -O {path} '
                             f'{_OFFICIAL_WEIGHTS}{name}).')
        lines.append('SwinBackbone and SwinV2Backbone read the official, timm, torchvision, '
                     'mmpretrain, mmdet and mmseg formats as they are; tools/convert_checkpoint.py SRC DST writes any '
                     'of them in the native layout (e.g. as .safetensors).')
        lines.append(f'Point elsewhere with --cfg-options {key}.checkpoint=/path/to/'
                     f'{name or "weights.pth"}, or train from scratch (random initialisation) '
                     f'with --cfg-options {key}=None')
        raise PretrainedNotFoundError('\n'.join(lines))


def check_checkpoint_file(path: Optional[str], what: str) -> None:
    """Raise unless the local checkpoint ``path`` exists and, when it is a torch zip archive,
    is complete (:class:`CheckpointNotFoundError`, :class:`CheckpointCorruptError`)."""
    if not path or _is_remote(path):
        return
    if not osp.isfile(path):
        raise CheckpointNotFoundError(f'{what} not found: {_fmt(path)}')
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
        from mmengine.registry import DefaultScope
        with DefaultScope.overwrite_default_scope(toolkit):
            backbone = registry(toolkit, 'MODELS').build(cfg)
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


#: Heads that take the backbone's outputs directly when the model has no neck: mmseg's decode
#: and auxiliary heads, mmdet's MaskFormer / Mask2Former heads.
_HEAD_KEYS = ('decode_head', 'auxiliary_head', 'panoptic_head')


def _head_problems(model: dict, out: Sequence[int]) -> list[tuple[str, Any, Any]]:
    problems = []
    for key in _HEAD_KEYS:
        heads = model.get(key)
        many = isinstance(heads, (list, tuple))
        for i, head in enumerate(heads if many else [heads]):
            if not isinstance(head, dict) or 'in_channels' not in head:
                continue
            name = f'model.{key}' + (f'.{i}' if many else '')
            given = head['in_channels']
            given_cmp = list(given) if isinstance(given, (list, tuple)) else given
            in_index = head.get('in_index')
            if in_index is None:  # a list takes every output; a number the last (mmseg default)
                in_index = list(range(len(out))) if isinstance(given_cmp, list) else -1
            try:
                expected = _expected_head_channels(out, in_index)
            except (IndexError, TypeError):
                problems.append((f'{name}.in_index', in_index,
                                 f'indices into the {len(out)} backbone outputs'))
                continue
            if head.get('input_transform') == 'resize_concat' and isinstance(expected, list):
                ok = given_cmp == expected or given_cmp == sum(expected)
            else:
                ok = given_cmp == expected
            if not ok:
                problems.append((f'{name}.in_channels', given_cmp, expected))
    return problems


def check_channels(cfg: Config) -> None:
    """Raise :class:`ChannelMismatchError` when the model's ``in_channels`` do not fit the backbone.

    With a neck (FPN, ChannelMapper...): its list ``in_channels`` must equal the backbone's
    ``out_channels``. Without one: each decode / auxiliary / panoptic head must take the
    channels of the outputs it selects with ``in_index`` (a list for a list; no ``in_index``
    with a list means every output).
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
        if isinstance(neck.get('in_channels'), (list, tuple)) \
                and list(neck['in_channels']) != list(out):
            problems.append(('model.neck.in_channels', list(neck['in_channels']), list(out)))
    elif neck is None:
        problems = _head_problems(model, out)
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
