"""configs/mask_rcnn: every resolved key equals mmdet 3.3.0's reference config, except the
backbone's type and the source of its weights; the backbone built from ours has the reference
backbone's parameter count; the demo changes only data, image scale and schedule."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip('mmdet')
from mmengine.config import Config  # noqa: E402

import mmdet  # noqa: E402
from swin_dense.demo_data import COCO_DEMO_CLASSES  # noqa: E402
from config_parity import flatten  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / 'configs' / 'mask_rcnn'
MMDET_SWIN = Path(os.path.dirname(mmdet.__file__)) / '.mim' / 'configs' / 'swin'
OFFICIAL = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/'

PAIRS = {
    'swin_t_coco.py': 'mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
    'swin_t_coco_3x.py': 'mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py',
    'swin_t_coco_3x_amp.py': 'mask-rcnn_swin-t-p4-w7_fpn_amp-ms-crop-3x_coco.py',
    'swin_s_coco_3x_amp.py': 'mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py',
}
# What may differ: the backbone type, where its weights come from (the checkpoint in init_cfg and
# the `pretrained` variable holding it), and the import that registers SwinBackbone.
ALLOWED = {'model.backbone.type', 'model.backbone.init_cfg.checkpoint', 'pretrained'}
CUSTOM_IMPORTS = {'imports': ['swin_dense'], 'allow_failed_imports': False}


def resolved(path):
    return Config.fromfile(str(path)).to_dict()


@pytest.fixture(scope='module', params=sorted(PAIRS), ids=lambda p: p[:-3])
def pair(request):
    ours = resolved(CONFIGS / request.param)
    ref = resolved(MMDET_SWIN / PAIRS[request.param])
    return request.param, ours, ref


def test_every_resolved_key_equals_the_reference(pair):
    name, ours, ref = pair
    assert ours.pop('custom_imports') == CUSTOM_IMPORTS
    a, a_scopes = flatten(ours)
    b, b_scopes = flatten(ref)
    assert set(a_scopes.values()) <= {ref['default_scope']}  # only the scope ours runs in anyway
    assert b_scopes == {}
    assert set(a) == set(b), (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    differing = {k for k in a if a[k] != b[k]}
    assert differing == ALLOWED, {k: (a[k], b[k]) for k in differing - ALLOWED}
    # the allowed differences are exactly: our backbone, a local copy of the same weights
    assert a['model.backbone.type'] == 'SwinBackbone'
    assert b['model.backbone.type'] == 'SwinTransformer'
    ckpt = a['model.backbone.init_cfg.checkpoint']
    assert ckpt == a['pretrained']
    assert '://' not in ckpt and not os.path.isabs(ckpt)  # a local path, nothing downloads
    assert b['model.backbone.init_cfg.checkpoint'] == OFFICIAL + os.path.basename(ckpt)


def test_the_hyperparameters_that_matter_are_the_published_ones(pair):
    """Spot checks against the published recipe (mmdet model zoo, Swin paper), independent of
    the reference file."""
    name, ours, _ = pair
    optim = ours['optim_wrapper']
    assert optim['optimizer'] == dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                                      weight_decay=0.05)
    assert optim['paramwise_cfg']['custom_keys'] == {
        'absolute_pos_embed': dict(decay_mult=0.), 'relative_position_bias_table':
        dict(decay_mult=0.), 'norm': dict(decay_mult=0.)}
    assert optim['type'] == ('AmpOptimWrapper' if 'amp' in name else 'OptimWrapper')
    warmup, steps = ours['param_scheduler']
    assert (warmup['type'], warmup['start_factor'], warmup['end']) == ('LinearLR', 0.001, 1000)
    epochs, milestones = (36, [27, 33]) if '3x' in name else (12, [8, 11])
    assert ours['train_cfg']['max_epochs'] == epochs and steps['milestones'] == milestones
    assert ours['train_dataloader']['batch_size'] == 2
    backbone = ours['model']['backbone']
    assert backbone['drop_path_rate'] == 0.2 and backbone['window_size'] == 7
    assert list(backbone['depths']) == ([2, 2, 18, 2] if name.startswith('swin_s') else [2, 2, 6, 2])
    assert ours['model']['neck']['in_channels'] == [96, 192, 384, 768]
    kinds = [t['type'] for t in ours['train_pipeline']]
    assert ('RandomChoice' in kinds) == ('3x' in name)


@pytest.mark.parametrize('name', sorted(PAIRS), ids=lambda p: p[:-3])
def test_backbone_has_the_reference_parameter_count(name):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    import swin_dense  # noqa: F401  (registers SwinBackbone)

    def count(cfg_path):
        backbone = Config.fromfile(str(cfg_path)).model.backbone
        backbone.init_cfg = None  # build only: no weights are read
        return sum(p.numel() for p in MODELS.build(backbone).parameters())

    ours, ref = count(CONFIGS / name), count(MMDET_SWIN / PAIRS[name])
    assert ours == ref
    # the published backbone sizes: Swin-T 28M, Swin-S 50M (classification head included)
    assert abs(ours / 1e6 - (49 if name.startswith('swin_s') else 28)) < 1.5


# ----------------------------------------------------------------------------- the demo
def _without(d, *keys):
    return {k: v for k, v in d.items() if k not in keys}


def test_demo_changes_only_data_image_scale_and_schedule():
    demo = resolved(CONFIGS / 'swin_t_demo.py')
    full = resolved(CONFIGS / 'swin_t_coco.py')
    # Architecture: the Swin-T detector of swin_t_coco.py, with heads for the demo's classes.
    assert _without(demo['model']['backbone'], 'init_cfg') == \
        _without(full['model']['backbone'], 'init_cfg')
    assert demo['model']['backbone']['init_cfg'] is None  # from scratch: nothing to download
    for key in ('type', 'data_preprocessor', 'neck', 'rpn_head'):
        assert demo['model'][key] == full['model'][key], key
    roi_demo, roi_full = demo['model']['roi_head'], full['model']['roi_head']
    assert _without(roi_demo, 'bbox_head', 'mask_head') == _without(roi_full, 'bbox_head',
                                                                     'mask_head')
    for head in ('bbox_head', 'mask_head'):
        assert roi_demo[head]['num_classes'] == len(COCO_DEMO_CLASSES)
        assert _without(roi_demo[head], 'num_classes') == _without(roi_full[head], 'num_classes')
    # Sampling budgets for 1-4 objects per image: proposals kept and RoIs sampled per image.
    budget = {'train_cfg.rpn_proposal.nms_pre', 'train_cfg.rpn_proposal.max_per_img',
              'train_cfg.rcnn.sampler.num', 'test_cfg.rpn.nms_pre', 'test_cfg.rpn.max_per_img'}
    for key in ('train_cfg', 'test_cfg'):
        a, _ = flatten(demo['model'][key], key)
        b, _ = flatten(full['model'][key], key)
        assert set(a) == set(b)
        assert {k for k in a if a[k] != b[k]} <= budget
        assert all(a[k] <= b[k] for k in a if k in budget)
    # Data: the demo's own classes, generated at the demo's data root.
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dataset = demo[loader]['dataset']
        assert tuple(dataset['metainfo']['classes']) == COCO_DEMO_CLASSES
        assert dataset['data_root'] == demo['demo_data']['root']
    assert demo['val_evaluator']['type'] == 'CocoMetric'
    assert demo['val_evaluator']['metric'] == ['bbox', 'segm']
    assert demo['val_evaluator']['ann_file'].startswith(demo['demo_data']['root'])
    assert demo['demo_data']['kind'] == 'coco'
    # What else differs from swin_t_coco.py at the top level: data, scale, schedule, display.
    changed = {k for k in set(demo) | set(full) if demo.get(k) != full.get(k)}
    assert changed <= {
        'model', 'data_root', 'demo_data', 'image_size', 'metainfo', 'num_classes',
        'train_pipeline', 'test_pipeline', 'train_dataloader', 'val_dataloader',
        'test_dataloader', 'val_evaluator', 'test_evaluator', 'max_epochs', 'train_cfg',
        'param_scheduler', 'optim_wrapper', 'auto_scale_lr', 'randomness', 'default_hooks',
        'log_processor'}
    # the optimizer is AdamW with the reference's betas, weight decay and no-decay keys
    assert _without(demo['optim_wrapper'], 'optimizer') == _without(full['optim_wrapper'],
                                                                     'optimizer')
    assert _without(demo['optim_wrapper']['optimizer'], 'lr', 'fused') == \
        _without(full['optim_wrapper']['optimizer'], 'lr')
    # a progress display: a log line with eta at least every 10 iterations
    assert demo['default_hooks']['logger']['interval'] <= 10
