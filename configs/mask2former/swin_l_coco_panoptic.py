# Mask2Former, Swin-L backbone (SwinBackbone, window 12, ImageNet-22K 384x384 pretraining), COCO
# panoptic segmentation, large-scale jitter, 100 epochs (737500 iterations of 16 GPUs x 1 image),
# 200 queries. Resolves to mmdet 3.3.0's
#   configs/mask2former/mask2former_swin-l-p4-w12-384-in21k_16xb1-lsj-100e_coco-panoptic.py
# except the backbone type and where its ImageNet weights come from (a local file).
# Expected (mmdet metafile): PQ 57.6, box AP 52.2 / mask AP 48.5.
_base_ = [
    'mmdet::mask2former/mask2former_swin-l-p4-w12-384-in21k_16xb1-lsj-100e_coco-panoptic.py'
]
custom_imports = dict(imports=['swin_dense'], allow_failed_imports=False)

# https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_large_patch4_window12_384_22k.pth
pretrained = 'checkpoints/swin_large_patch4_window12_384_22k.pth'
model = dict(
    backbone=dict(
        type='SwinBackbone',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
