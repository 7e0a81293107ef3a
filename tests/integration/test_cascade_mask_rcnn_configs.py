"""configs/cascade_mask_rcnn: the Swin paper's Cascade Mask R-CNN recipe (Table 2), ported to
mmdet 3.x from the official detection repository (SwinTransformer/Swin-Transformer-Object-
Detection). mmdet 3.x has no such config to compare with key for key, so the resolved values
that make the recipe are checked against a table written from the official files; each row
names the official file and key it comes from. mmdet's own 3.x ports of the same pieces (the
multi-scale + crop pipeline of its Swin Mask R-CNN 3x config, the GIoU 4conv1fc heads of its
ConvNeXt Cascade config) are a second, independent check.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip('mmdet')
from mmengine.config import Config  # noqa: E402

import swin_dense  # noqa: E402,F401  (registers SwinBackbone)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / 'configs' / 'cascade_mask_rcnn'
MMDET_CONFIGS = Path(__import__('mmdet').__file__).parent / '.mim' / 'configs'
NAMES = ('swin_t_coco_3x.py', 'swin_s_coco_3x.py', 'swin_b_coco_3x.py')

# The official files (paths in the official detection repository).
_OFFICIAL = 'configs/swin/cascade_mask_rcnn_swin_{}_patch4_window7_mstrain_480-800_giou_4conv1f' \
            '_adamw_3x_coco.py'
RECIPE = {name: _OFFICIAL.format(size)
          for name, size in zip(NAMES, ('tiny', 'small', 'base'))}
MODEL = 'configs/_base_/models/cascade_mask_rcnn_swin_fpn.py'
DATA = 'configs/_base_/datasets/coco_instance.py'
SCHEDULE = 'configs/_base_/schedules/schedule_1x.py'
RUNTIME = 'configs/_base_/default_runtime.py'
TRAIN_API = 'mmdet/apis/train.py'
README = 'README.md'
THE_RECIPE = '<recipe>'  # stands for RECIPE[name]: the three files agree on these rows

SCALES_480_800 = [(s, 1333) for s in range(480, 801, 32)]
NO_DECAY = {'absolute_pos_embed': dict(decay_mult=0.), 'relative_position_bias_table':
            dict(decay_mult=0.), 'norm': dict(decay_mult=0.)}


def _head(stds):
    return dict(type='ConvFCBBoxHead', num_shared_convs=4, num_shared_fcs=1, in_channels=256,
                conv_out_channels=256, fc_out_channels=1024, roi_feat_size=7, num_classes=80,
                bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.],
                                target_stds=stds),
                reg_class_agnostic=False, reg_decoded_bbox=True,
                norm_cfg=dict(type='SyncBN', requires_grad=True),
                loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type='GIoULoss', loss_weight=10.0))


# (resolved key, expected value, official file, official key)
COMMON = [
    # schedule: 3x = 36 epochs, lr x0.1 after 27 and 33; linear warm-up of 500 iterations
    ('train_cfg.max_epochs', 36, THE_RECIPE, 'runner.max_epochs'),
    ('train_cfg.type', 'EpochBasedTrainLoop', THE_RECIPE, 'runner.type (EpochBasedRunnerAmp)'),
    ('param_scheduler[1].type', 'MultiStepLR', SCHEDULE, "lr_config.policy='step'"),
    ('param_scheduler[1].milestones', [27, 33], THE_RECIPE, 'lr_config.step'),
    ('param_scheduler[1].gamma', 0.1, SCHEDULE, "lr_config.policy='step' (mmcv's gamma 0.1)"),
    ('param_scheduler[1].by_epoch', True, SCHEDULE, 'lr_config.step (epochs)'),
    ('param_scheduler[0].type', 'LinearLR', SCHEDULE, "lr_config.warmup='linear'"),
    ('param_scheduler[0].start_factor', 0.001, SCHEDULE, 'lr_config.warmup_ratio'),
    ('param_scheduler[0].end', 500, SCHEDULE, 'lr_config.warmup_iters'),
    ('param_scheduler[0].by_epoch', False, SCHEDULE, 'lr_config.warmup_iters (iterations)'),
    # optimizer: AdamW, no decay on position tables and norms; fp16 with dynamic loss scaling
    ('optim_wrapper.optimizer', dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999),
                                     weight_decay=0.05), THE_RECIPE, 'optimizer'),
    ('optim_wrapper.paramwise_cfg', dict(custom_keys=NO_DECAY), THE_RECIPE,
     'optimizer.paramwise_cfg'),
    ('optim_wrapper.type', 'AmpOptimWrapper', TRAIN_API,
     "optimizer_config.use_fp16=True: apex.amp.initialize(opt_level='O1')"),
    ('train_dataloader.batch_size', 2, DATA, 'data.samples_per_gpu'),
    ('auto_scale_lr.base_batch_size', 16, README, '8 GPUs x samples_per_gpu 2'),
    # data: flip, then 480-800 multi-scale, or 400-600 + crop 384-600 + 480-800
    ('train_pipeline[2]', dict(type='RandomFlip', prob=0.5), THE_RECIPE,
     "train_pipeline RandomFlip flip_ratio"),
    ('train_pipeline[3].type', 'RandomChoice', THE_RECIPE, 'train_pipeline AutoAugment.policies'),
    ('train_pipeline[3].transforms[0]',
     [dict(type='RandomChoiceResize', scales=SCALES_480_800, keep_ratio=True)], THE_RECIPE,
     "AutoAugment.policies[0]: Resize img_scale, multiscale_mode='value'"),
    ('train_pipeline[3].transforms[1]',
     [dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)],
           keep_ratio=True),
      dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600),
           allow_negative_crop=True),
      dict(type='RandomChoiceResize', scales=SCALES_480_800, keep_ratio=True)], THE_RECIPE,
     'AutoAugment.policies[1]: Resize, RandomCrop, Resize (override=True)'),
    ('test_pipeline[1]', dict(type='Resize', scale=(1333, 800), keep_ratio=True), DATA,
     'test_pipeline MultiScaleFlipAug img_scale, flip=False'),
    ('model.data_preprocessor.mean', [123.675, 116.28, 103.53], THE_RECIPE, 'img_norm_cfg.mean'),
    ('model.data_preprocessor.std', [58.395, 57.12, 57.375], THE_RECIPE, 'img_norm_cfg.std'),
    ('model.data_preprocessor.bgr_to_rgb', True, THE_RECIPE, 'img_norm_cfg.to_rgb'),
    ('model.data_preprocessor.pad_size_divisor', 32, THE_RECIPE, 'Pad size_divisor'),
    ('val_evaluator.metric', ['bbox', 'segm'], DATA, 'evaluation.metric'),
    # model: Cascade R-CNN, three stages with 4conv1fc GIoU heads
    ('model.type', 'CascadeRCNN', MODEL, 'model.type'),
    ('model.backbone.window_size', 7, THE_RECIPE, 'model.backbone.window_size'),
    ('model.backbone.use_abs_pos_embed', False, THE_RECIPE, 'model.backbone.ape'),
    ('model.backbone.patch_norm', True, THE_RECIPE, 'model.backbone.patch_norm'),
    ('model.backbone.with_cp', False, THE_RECIPE, 'model.backbone.use_checkpoint'),
    ('model.backbone.mlp_ratio', 4, MODEL, 'model.backbone.mlp_ratio'),
    ('model.backbone.qkv_bias', True, MODEL, 'model.backbone.qkv_bias'),
    ('model.backbone.qk_scale', None, MODEL, 'model.backbone.qk_scale'),
    ('model.backbone.drop_rate', 0., MODEL, 'model.backbone.drop_rate'),
    ('model.backbone.attn_drop_rate', 0., MODEL, 'model.backbone.attn_drop_rate'),
    ('model.backbone.out_indices', (0, 1, 2, 3), MODEL, 'model.backbone.out_indices'),
    ('model.neck.type', 'FPN', MODEL, 'model.neck.type'),
    ('model.neck.out_channels', 256, MODEL, 'model.neck.out_channels'),
    ('model.neck.num_outs', 5, MODEL, 'model.neck.num_outs'),
    ('model.rpn_head.anchor_generator.strides', [4, 8, 16, 32, 64], MODEL,
     'model.rpn_head.anchor_generator.strides'),
    ('model.rpn_head.loss_bbox.type', 'SmoothL1Loss', MODEL, 'model.rpn_head.loss_bbox'),
    ('model.roi_head.type', 'CascadeRoIHead', MODEL, 'model.roi_head.type'),
    ('model.roi_head.num_stages', 3, MODEL, 'model.roi_head.num_stages'),
    ('model.roi_head.stage_loss_weights', [1, 0.5, 0.25], MODEL,
     'model.roi_head.stage_loss_weights'),
    ('model.roi_head.bbox_head',
     [_head([0.1, 0.1, 0.2, 0.2]), _head([0.05, 0.05, 0.1, 0.1]),
      _head([0.033, 0.033, 0.067, 0.067])], THE_RECIPE, 'model.roi_head.bbox_head'),
    ('model.roi_head.mask_head.type', 'FCNMaskHead', MODEL, 'model.roi_head.mask_head.type'),
    ('model.roi_head.mask_head.num_convs', 4, MODEL, 'model.roi_head.mask_head.num_convs'),
    ('model.roi_head.mask_roi_extractor.roi_layer.output_size', 14, MODEL,
     'model.roi_head.mask_roi_extractor.roi_layer.output_size'),
    ('model.train_cfg.rpn_proposal.nms_pre', 2000, MODEL, 'train_cfg.rpn_proposal.nms_pre'),
    ('model.train_cfg.rpn_proposal.max_per_img', 2000, MODEL,
     'train_cfg.rpn_proposal.max_per_img'),
    ('model.test_cfg.rpn.max_per_img', 1000, MODEL, 'test_cfg.rpn.max_per_img'),
    ('model.test_cfg.rcnn', dict(score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5),
                                 max_per_img=100, mask_thr_binary=0.5), MODEL, 'test_cfg.rcnn'),
    ('default_hooks.checkpoint.interval', 1, RUNTIME, 'checkpoint_config.interval'),
] + [
    (f'model.train_cfg.rcnn[{i}].assigner.{key}', iou, MODEL,
     f'train_cfg.rcnn[{i}].assigner.{key}')
    for i, iou in enumerate((0.5, 0.6, 0.7))
    for key in ('pos_iou_thr', 'neg_iou_thr', 'min_pos_iou')
] + [
    (f'model.train_cfg.rcnn[{i}].sampler.{key}', value, MODEL,
     f'train_cfg.rcnn[{i}].sampler.{key}')
    for i in range(3) for key, value in (('num', 512), ('pos_fraction', 0.25))
]

# (embed_dims, depths, num_heads, drop_path_rate, ImageNet-1K file, detector parameters in M)
PER_MODEL = {
    'swin_t_coco_3x.py': (96, [2, 2, 6, 2], [3, 6, 12, 24], 0.2,
                          'swin_tiny_patch4_window7_224.pth', 86),
    'swin_s_coco_3x.py': (96, [2, 2, 18, 2], [3, 6, 12, 24], 0.2,
                          'swin_small_patch4_window7_224.pth', 107),
    'swin_b_coco_3x.py': (128, [2, 2, 18, 2], [4, 8, 16, 32], 0.3,
                          'swin_base_patch4_window7_224.pth', 145),
}


def _per_model_rows(name):
    embed, depths, heads, dpr, _, _ = PER_MODEL[name]
    source = RECIPE[name]
    return [
        ('model.backbone.embed_dims', embed, source, 'model.backbone.embed_dim'),
        ('model.backbone.depths', depths, source, 'model.backbone.depths'),
        ('model.backbone.num_heads', heads, source, 'model.backbone.num_heads'),
        ('model.backbone.drop_path_rate', dpr, source, 'model.backbone.drop_path_rate'),
        ('model.neck.in_channels', [embed * 2 ** i for i in range(4)], source,
         'model.neck.in_channels'),
    ]


def _get(cfg, path):
    node = cfg
    for part in path.replace('[', '.[').split('.'):
        node = node[int(part[1:-1])] if part.startswith('[') else node[part]
    return node


def _strip_scope(node):
    if isinstance(node, dict):
        return {k: _strip_scope(v) for k, v in node.items() if k != '_scope_'}
    if isinstance(node, (list, tuple)):
        return type(node)(_strip_scope(v) for v in node)
    return node


def _differences(actual, expected, path: str) -> list[str]:
    """Where ``actual`` departs from ``expected``: equal structure and values; tuples and lists
    are interchangeable (mmengine keeps what the file wrote), floats within float64 rounding
    (both sides are decimal literals, read by different files)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or actual.keys() != expected.keys():
            return [f'{path}: {actual!r}, official {expected!r}']
        return [d for k in expected for d in _differences(actual[k], expected[k], f'{path}.{k}')]
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            return [f'{path}: {actual!r}, official {expected!r}']
        return [d for i, (a, e) in enumerate(zip(actual, expected))
                for d in _differences(a, e, f'{path}[{i}]')]
    if isinstance(expected, float):
        same = isinstance(actual, (int, float)) and not isinstance(actual, bool) and \
            actual == pytest.approx(expected, rel=1e-12)
    else:
        same = type(actual) is type(expected) and actual == expected
    return [] if same else [f'{path}: {actual!r}, official {expected!r}']


@pytest.fixture(scope='module')
def resolved():
    return {name: _strip_scope(Config.fromfile(str(CONFIGS / name)).to_dict()) for name in NAMES}


@pytest.mark.parametrize('name', NAMES)
def test_resolved_values_are_the_official_recipe(resolved, name):
    cfg = resolved[name]
    wrong = []
    for key, expected, source, official_key in COMMON + _per_model_rows(name):
        source = RECIPE[name] if source is THE_RECIPE else source
        wrong += [f'{d} ({source}: {official_key})'
                  for d in _differences(_get(cfg, key), expected, key)]
    assert not wrong, '\n'.join(wrong)


@pytest.mark.parametrize('name', NAMES)
def test_the_rest_is_mmdets_cascade_mask_rcnn(resolved, name):
    """What the recipe leaves alone comes from mmdet's Cascade Mask R-CNN (its dataset, test
    pipeline, RPN, RoI extractors and loss weights), and the data match in every loader."""
    cfg = resolved[name]
    base = _strip_scope(Config.fromfile(
        str(MMDET_CONFIGS / 'cascade_rcnn' / 'cascade-mask-rcnn_r50_fpn_1x_coco.py')).to_dict())
    for key in ('rpn_head', 'data_preprocessor'):
        assert cfg['model'][key] == base['model'][key], key
    roi, base_roi = cfg['model']['roi_head'], base['model']['roi_head']
    assert {k: v for k, v in roi.items() if k != 'bbox_head'} == \
        {k: v for k, v in base_roi.items() if k != 'bbox_head'}
    assert cfg['model']['train_cfg'] == base['model']['train_cfg']
    assert cfg['model']['test_cfg'] == base['model']['test_cfg']
    for key in ('test_pipeline', 'val_dataloader', 'test_dataloader', 'val_evaluator',
                'test_evaluator', 'default_hooks', 'auto_scale_lr', 'val_cfg', 'test_cfg'):
        assert cfg[key] == base[key], key
    assert cfg['train_dataloader']['dataset']['pipeline'] == cfg['train_pipeline']
    assert {k: v for k, v in cfg['train_dataloader']['dataset'].items() if k != 'pipeline'} == \
        {k: v for k, v in base['train_dataloader']['dataset'].items() if k != 'pipeline'}
    # mixed precision with dynamic loss scaling (AmpOptimWrapper's default), no gradient clip
    assert cfg['optim_wrapper'].get('loss_scale', 'dynamic') == 'dynamic'
    assert cfg['optim_wrapper'].get('clip_grad') is None


@pytest.mark.parametrize('name', NAMES)
def test_mmdets_own_ports_of_the_same_pieces_agree(resolved, name):
    cfg = resolved[name]
    swin_3x = _strip_scope(Config.fromfile(
        str(MMDET_CONFIGS / 'swin' / 'mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py')).to_dict())
    convnext = _strip_scope(Config.fromfile(str(
        MMDET_CONFIGS / 'convnext' /
        'cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'),
        import_custom_modules=False).to_dict())  # read only: its backbone needs mmpretrain
    assert cfg['train_pipeline'] == swin_3x['train_pipeline']
    assert cfg['optim_wrapper']['paramwise_cfg'] == swin_3x['optim_wrapper']['paramwise_cfg']
    assert cfg['optim_wrapper']['optimizer'] == swin_3x['optim_wrapper']['optimizer']
    assert cfg['model']['roi_head']['bbox_head'] == convnext['model']['roi_head']['bbox_head']
    assert cfg['param_scheduler'][1] == swin_3x['param_scheduler'][1]


@pytest.mark.parametrize('name', NAMES)
def test_weights_and_size(resolved, name):
    cfg = resolved[name]
    _, _, _, _, weights, millions = PER_MODEL[name]
    init_cfg = cfg['model']['backbone']['init_cfg']
    assert init_cfg == dict(type='Pretrained', checkpoint='checkpoints/' + weights)
    assert cfg['pretrained'] == init_cfg['checkpoint']
    assert cfg['custom_imports'] == dict(imports=['swin_dense'], allow_failed_imports=False)
    # the whole detector has the official README's parameter count (#params, rounded to 1M)
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    model_cfg = Config.fromfile(str(CONFIGS / name)).model
    model_cfg.backbone.init_cfg = None  # build only: no weights are read
    model = MODELS.build(model_cfg)
    assert type(model.backbone).__name__ == 'SwinBackbone'
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions
