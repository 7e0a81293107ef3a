# Mask R-CNN, Swin-T backbone (SwinBackbone), FPN, COCO, 3x schedule (36 epochs) with
# multi-scale + crop augmentation. Resolves to mmdet 3.3.0's
# configs/swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py, except the backbone type and
# where its ImageNet weights come from (a local file; nothing is downloaded).
# Expected: box AP 46.0 / mask AP 41.6 (official repo and mmdet metafile alike).
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py']
custom_imports = dict(imports=['swin_dense'], allow_failed_imports=False)

# https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth
pretrained = 'checkpoints/swin_tiny_patch4_window7_224.pth'
model = dict(
    backbone=dict(
        type='SwinBackbone',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
