# Cascade Mask R-CNN, Swin-T backbone (SwinBackbone), FPN, COCO, 3x schedule (36 epochs), the
# recipe of the Swin paper's Table 2: multi-scale training (shorter side 480-800) with a random
# crop, GIoU box loss, 4conv1fc box heads, AdamW, mixed precision.
# Ported to mmdet 3.x from the official detection repository (github.com/SwinTransformer/
# Swin-Transformer-Object-Detection), configs/swin/
#   cascade_mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py
# and its bases (_base_/models/cascade_mask_rcnn_swin_fpn.py, _base_/datasets/coco_instance.py,
# _base_/schedules/schedule_1x.py, _base_/default_runtime.py). mmdet 3.x has no such config;
# this one starts from mmdet's Cascade Mask R-CNN R-50 1x and changes what the recipe says.
# Expected (official detection repo README): box AP 50.4 / mask AP 43.7.
_base_ = ['mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py']
custom_imports = dict(imports=['swin_dense'], allow_failed_imports=False)

# The official ImageNet-1K Swin-T file (the official recipe passes it as model.pretrained):
# https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth
pretrained = 'checkpoints/swin_tiny_patch4_window7_224.pth'

# ----------------------------------------------------------------------------- model
# Backbone: the official base's Swin (embed_dim 96, ape False, patch_norm True, all four stages
# out, no checkpointing) under mmdet's argument names.
model = dict(
    backbone=dict(
        _delete_=True,
        type='SwinBackbone',
        embed_dims=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.,
        attn_drop_rate=0.,
        drop_path_rate=0.2,
        use_abs_pos_embed=False,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]),
    # Three 4conv1fc heads (4 shared 3x3 convs with SyncBN, then one fc), class-specific box
    # regression on decoded boxes with GIoU loss x10; the cascade's IoU thresholds and target
    # stds are the base's. SyncBN becomes BN by itself in a non-distributed run.
    roi_head=dict(bbox_head=[
        dict(
            type='ConvFCBBoxHead',
            num_shared_convs=4,
            num_shared_fcs=1,
            in_channels=256,
            conv_out_channels=256,
            fc_out_channels=1024,
            roi_feat_size=7,
            num_classes=80,
            bbox_coder=dict(
                type='DeltaXYWHBBoxCoder',
                target_means=[0., 0., 0., 0.],
                target_stds=target_stds),
            reg_class_agnostic=False,
            reg_decoded_bbox=True,
            norm_cfg=dict(type='SyncBN', requires_grad=True),
            loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type='GIoULoss', loss_weight=10.0))
        for target_stds in ([0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1],
                            [0.033, 0.033, 0.067, 0.067])
    ]))

# ----------------------------------------------------------------------------- data
# Horizontal flip, then one of: a resize to a random shorter side in 480..800 (step 32, longer
# side at most 1333); or a resize to 400/500/600, a random crop of 384-600 px per side, and the
# same 480..800 resize. (The augmentation of DETR and Sparse R-CNN.)
multi_scales = [(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333), (640, 1333),
                (672, 1333), (704, 1333), (736, 1333), (768, 1333), (800, 1333)]
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[
            [dict(type='RandomChoiceResize', scales=multi_scales, keep_ratio=True)],
            [
                dict(type='RandomChoiceResize',
                     scales=[(400, 1333), (500, 1333), (600, 1333)],
                     keep_ratio=True),
                dict(type='RandomCrop',
                     crop_type='absolute_range',
                     crop_size=(384, 600),
                     allow_negative_crop=True),
                dict(type='RandomChoiceResize', scales=multi_scales, keep_ratio=True),
            ],
        ]),
    dict(type='PackDetInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

# ----------------------------------------------------------------------------- schedule
# 36 epochs, lr x0.1 after epochs 27 and 33; the base's linear warm-up (500 iterations from
# 0.001 x lr) is the official schedule's too.
max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33],
         gamma=0.1)
]

# AdamW, lr 1e-4 for 16 images per batch, weight decay 0.05 except on norms and position
# tables; mixed precision (the official recipe trains with apex O1 and dynamic loss scaling).
optim_wrapper = dict(
    type='AmpOptimWrapper',
    optimizer=dict(
        _delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
