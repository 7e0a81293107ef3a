# Embedded demo: UperNet + Swin-T (swin_t_ade20k.py) on a small synthetic ADE20K-style dataset
# (coloured squares, circles and triangles on a textured background; swin_dense/demo_data.py),
# trained from scratch on CPU:
#   python tools/train.py configs/upernet/swin_t_demo.py
# The data is generated into data/ade_demo on first use (the `demo_data` entry, read by
# tools/train.py and tools/test.py). Only the data, the crop, the classes, the schedule and the
# weights source differ from swin_t_ade20k.py: no ImageNet weights can be downloaded here, so the
# backbone starts from a random initialisation (init_cfg=None) with a learning rate to match.
# Model, heads, losses, optimiser type and augmentations are those of the ADE20K config.
_base_ = ['./swin_t_ade20k.py']

# ------------------------------------------------------------------ data
image_size = 64
demo_data = dict(
    kind='ade', root='data/ade_demo', num_train=400, num_val=50, image_size=image_size, seed=0)
data_root = 'data/ade_demo'
# ADE20KDataset accepts only ADE20K's own class names in its metainfo: BaseSegDataset with its
# settings (jpg images, png labels, label 0 ignored, others shifted down by one).
dataset_type = 'BaseSegDataset'
metainfo = dict(
    classes=('background', 'square', 'circle', 'triangle'),
    palette=[[120, 120, 120], [220, 60, 50], [60, 190, 75], [60, 90, 225]])
dataset_settings = dict(
    img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=True, metainfo=metainfo)
crop_size = (image_size, image_size)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(
        type='RandomResize',
        scale=(4 * image_size, image_size),
        ratio_range=(0.5, 2.0),
        keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(4 * image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
train_dataloader = dict(
    batch_size=4,
    num_workers=1,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        **dataset_settings,
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=1,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        **dataset_settings,
        pipeline=test_pipeline))
test_dataloader = val_dataloader

# ------------------------------------------------------------------ crop and classes
num_classes = len(metainfo['classes'])
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(init_cfg=None),
    decode_head=dict(num_classes=num_classes),
    auxiliary_head=dict(num_classes=num_classes),
    # for `--cfg-options model.test_cfg.mode=slide`: windows of half the image
    test_cfg=dict(mode='whole', crop_size=(image_size // 2, image_size // 2),
                  stride=(image_size // 4, image_size // 4)))

# ------------------------------------------------------------------ schedule
# 300 iterations of 4 images (6-8 minutes on 2 free CPU cores, docs/reproducing.md); from scratch, hence a
# larger learning rate than the fine-tuning 6e-5 and a short warm-up, then the same poly decay.
max_iters = 300
warmup_iters = 30
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=warmup_iters, end=max_iters,
         by_epoch=False)
]
train_cfg = dict(max_iters=max_iters, val_interval=100)
randomness = dict(seed=0)  # the figures in the README come from this seed
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=100, max_keep_ckpts=1))

# configs/mask_rcnn/swin_t_demo.py has the same file name: keep the default work dirs apart
work_dir = './work_dirs/upernet_swin_t_demo'
