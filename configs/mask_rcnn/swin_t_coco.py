# Mask R-CNN, Swin-T backbone (SwinBackbone), FPN, COCO, 1x schedule (12 epochs).
# Resolves to mmdet 3.3.0's configs/swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py, except the
# backbone type and where its ImageNet weights come from (a local file; nothing is downloaded).
# Expected: box AP 42.7 / mask AP 39.3 (mmdet metafile), 43.7 / 39.8 (official repo README).
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py']
custom_imports = dict(imports=['swin_dense'], allow_failed_imports=False)

# The official ImageNet-1K Swin-T file (any supported format loads; docs/checkpoints.md):
# https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth
pretrained = 'checkpoints/swin_tiny_patch4_window7_224.pth'
model = dict(
    backbone=dict(
        type='SwinBackbone',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
