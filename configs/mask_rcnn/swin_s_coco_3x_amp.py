# Mask R-CNN, Swin-S backbone (depths 2-2-18-2), 3x multi-scale + crop, mixed precision.
# Resolves to mmdet 3.3.0's configs/swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py,
# except the backbone type and where its ImageNet weights come from.
# Expected: box AP 48.2 / mask AP 43.2 (mmdet metafile), 48.5 / 43.3 (official repo README).
_base_ = ['./swin_t_coco_3x_amp.py']

# https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_small_patch4_window7_224.pth
pretrained = 'checkpoints/swin_small_patch4_window7_224.pth'
model = dict(
    backbone=dict(
        depths=[2, 2, 18, 2],
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
