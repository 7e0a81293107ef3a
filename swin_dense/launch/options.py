"""The tools' options applied to a config, as the toolkits' own tools/train.py and test.py apply
them, and the integrations tools/train.py selects for every training run."""
from __future__ import annotations

import argparse
import logging
import warnings
from copy import deepcopy
from typing import TYPE_CHECKING, Any, Optional

from .checks import check_checkpoint_file
from .errors import LaunchError

if TYPE_CHECKING:
    from mmengine.config import Config

__all__ = ['CHECKPOINT_HOOK', 'INTEGRATIONS_MODULE', 'RNG_HOOK', 'apply_test_options',
           'apply_train_options', 'select_crash_safe_training']

#: What :func:`select_crash_safe_training` puts in a config (``swin_dense.integrations`` registers
#: the two hooks).
CHECKPOINT_HOOK = 'AtomicCheckpointHook'
RNG_HOOK = 'ResumeRandomStateHook'
INTEGRATIONS_MODULE = 'swin_dense.integrations'
_MMENGINE_CHECKPOINT_HOOKS = ('CheckpointHook', 'mmengine.CheckpointHook')


def _log(message: str, level: int = logging.INFO) -> None:
    from mmengine.logging import print_log
    print_log(message, logger='current', level=level)


def _type_name(value: Any) -> Any:
    return value.__name__ if isinstance(value, type) else value


def select_crash_safe_training(cfg: Config) -> list[str]:
    """Select atomic checkpoints and exact resume in ``cfg`` (in place); return what changed.

    - ``default_hooks.checkpoint.type``: mmengine's ``CheckpointHook`` becomes
      ``'AtomicCheckpointHook'`` (same options); no checkpoint hook or another type is kept;
    - ``custom_hooks`` gets ``dict(type='ResumeRandomStateHook')`` unless it has one;
    - ``custom_imports.imports`` gets ``'swin_dense.integrations'``, so that the config the
      Runner dumps into the work dir builds with other tools too.
    """
    changed = []
    checkpoint = (cfg.get('default_hooks') or {}).get('checkpoint')
    if isinstance(checkpoint, dict):
        kind = _type_name(checkpoint.get('type', 'CheckpointHook'))
        if kind in _MMENGINE_CHECKPOINT_HOOKS:
            checkpoint['type'] = CHECKPOINT_HOOK
            changed.append(f'default_hooks.checkpoint.type={CHECKPOINT_HOOK}')
        elif kind != CHECKPOINT_HOOK:
            _log(f'default_hooks.checkpoint is {kind}: kept, so its checkpoints are written as '
                 f'it writes them (not atomically, without RNG state unless it saves them)',
                 logging.WARNING)
    hooks = list(cfg.get('custom_hooks') or [])
    if not any(isinstance(h, dict) and _type_name(h.get('type')) == RNG_HOOK for h in hooks):
        cfg.custom_hooks = hooks + [dict(type=RNG_HOOK)]
        changed.append(f'custom_hooks+={RNG_HOOK}')
    imports = cfg.get('custom_imports') or dict(imports=[], allow_failed_imports=False)
    names = imports.get('imports', [])
    names = [names] if isinstance(names, str) else list(names)
    if INTEGRATIONS_MODULE not in names:
        imports['imports'] = names + [INTEGRATIONS_MODULE]
        cfg.custom_imports = imports
        changed.append(f'custom_imports+={INTEGRATIONS_MODULE}')
    return changed


def apply_train_options(cfg: Config, toolkit: str, amp: bool = False, auto_scale_lr: bool = False,
                        resume: Optional[str] = None) -> None:
    """``--amp``, ``--auto-scale-lr`` and ``--resume [CKPT]`` as mmdet's tools/train.py.

    ``resume='auto'`` (``--resume`` alone) resumes from the work dir's last checkpoint (a fresh
    start when there is none); any other value resumes from that file.
    """
    if amp:
        wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if wrapper == 'AmpOptimWrapper':
            _log('AMP training is already enabled in your config.', logging.WARNING)
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
        check_checkpoint_file(resume, 'checkpoint to resume from (--resume)')
        cfg.resume = True
        cfg.load_from = resume


def _has_mask_head(model: Any) -> bool:
    if isinstance(model, dict):
        return model.get('mask_head') is not None or any(
            _has_mask_head(v) for k, v in model.items() if k != 'mask_head')
    if isinstance(model, (list, tuple)):
        return any(_has_mask_head(v) for v in model)
    return False


def _mmdet_tta(cfg: Config) -> None:
    """mmdet's tools/test.py ``--tta``: its defaults when the config has no tta_model /
    tta_pipeline (that code lives in the tool script, not in the mmdet package)."""
    from mmengine import ConfigDict
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
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


def _show(cfg: Config, toolkit: str, show: bool, show_dir: Optional[str], wait_time: float) -> None:
    hooks = cfg.get('default_hooks') or {}
    if 'visualization' not in hooks:
        raise LaunchError('--show / --show-dir need a VisualizationHook in default_hooks: '
                          "visualization=dict(type='DetVisualizationHook') (mmdet) or "
                          "dict(type='SegVisualizationHook') (mmseg)")
    if toolkit == 'mmdet':  # show_dir under work_dir/TIMESTAMP/ when relative, as upstream
        from mmdet.engine.hooks import trigger_visualization_hook
        trigger_visualization_hook(cfg, argparse.Namespace(show=show, show_dir=show_dir,
                                                           wait_time=wait_time))
        return
    # mmseg's trigger_visualization_hook lives in its tool script; the same steps
    vis = hooks['visualization']
    vis['draw'] = True
    if show:
        vis['show'] = True
        vis['wait_time'] = wait_time
    if show_dir:
        vis['interval'] = 1  # every image (mmseg's hook draws every 50th by default)
        cfg.visualizer['save_dir'] = show_dir


def apply_test_options(cfg: Config, toolkit: str, checkpoint: str, show: bool = False,
                       show_dir: Optional[str] = None, wait_time: float = 2,
                       tta: bool = False, out: Optional[str] = None) -> None:
    """``CHECKPOINT``, ``--show/--show-dir/--wait-time``, ``--tta`` and (mmseg) ``--out`` as the
    toolkit's own tools/test.py; mmdet's ``--out`` (a ``DumpDetResults`` metric) is added to
    the built runner by ``swin_dense.launch.test``."""
    check_checkpoint_file(checkpoint, 'checkpoint to test')
    cfg.load_from = checkpoint
    if show or show_dir:
        _show(cfg, toolkit, show, show_dir, wait_time)
    if tta:
        if toolkit == 'mmdet':
            if _has_mask_head(cfg.get('model')):
                raise LaunchError(
                    "--tta: mmdet 3.3.0's DetTTAModel merges boxes only ('TTA of instance "
                    "segmentation does not support now'), so a model with a mask head cannot "
                    'be tested with it; test without --tta, or boxes only with --cfg-options '
                    'model.roi_head.mask_head=None test_evaluator.metric=bbox')
            _mmdet_tta(cfg)
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
