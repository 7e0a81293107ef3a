# Demo: Mask R-CNN Swin-T (swin_t_coco.py's architecture, unchanged) on a small synthetic
# COCO-format dataset of flat-coloured shapes, trained from scratch on 2 CPU cores in minutes.
#
#   python tools/train.py configs/mask_rcnn/swin_t_demo.py          # makes the data when absent
#   python tools/test.py configs/mask_rcnn/swin_t_demo.py \
#       work_dirs/swin_t_demo/epoch_4.pth --show-dir painted         # PNGs: ground truth | result
#
# What differs from swin_t_coco.py: data, image scale, schedule, and the per-image sampling
# budgets of the RPN / RoI heads (sized for 1-4 objects per image instead of COCO's dozens).
# The backbone starts from a random initialisation (init_cfg=None): a fresh install has no
# weights, and nothing is downloaded.
_base_ = ['./swin_t_coco.py']

# ----------------------------------------------------------------------------- data
# tools/train.py and tools/test.py (swin_dense.launch) build this dataset with
# swin_dense.demo_data.ensure_demo_data(**demo_data) when it is absent, before anything else.
# Relative paths are relative to the working directory, as data_root always is.
data_root = 'data/coco_demo112/'
# 112 = 16 x 7: the token maps of stages 1-3 (28, 14, 7) tile exactly into 7x7 windows.
image_size = 112
demo_data = dict(kind='coco', root=data_root, num_train=400, num_val=50,
                 image_size=image_size, seed=0)
metainfo = dict(classes=('square', 'circle', 'triangle'),  # = demo_data.COCO_DEMO_CLASSES
                palette=[(220, 20, 60), (0, 160, 60), (30, 60, 255)])
num_classes = 3

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

model = dict(
    backbone=dict(init_cfg=None),  # from scratch: no pretrained weights on a fresh install
    roi_head=dict(bbox_head=dict(num_classes=num_classes),
                  mask_head=dict(num_classes=num_classes)),
    # sampling budgets: 100 proposals and 16 RoIs (at most 4 positive) per image for 1-4 objects
    train_cfg=dict(rpn_proposal=dict(nms_pre=500, max_per_img=100),
                   rcnn=dict(sampler=dict(num=16))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=100)))

# ----------------------------------------------------------------------------- schedule
max_epochs = 4  # 100 iterations of 4 images each; lr x0.1 for the last epoch
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[3], gamma=0.1)
]
# AdamW as swin_t_coco.py (betas, weight decay, no decay on norms and position tables), with a
# from-scratch learning rate; fused=True is torch's single-kernel AdamW (same update, faster).
optim_wrapper = dict(optimizer=dict(lr=4e-4, fused=True))
auto_scale_lr = dict(base_batch_size=4)

randomness = dict(seed=0)  # the figures in the README are reproducible

# progress display: a log line (losses, lr, eta) every 10 iterations; keep the last checkpoint
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
log_processor = dict(window_size=10)
