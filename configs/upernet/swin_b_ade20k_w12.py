# UperNet + Swin-B (window 12, ImageNet-1K 384x384 pretraining) on ADE20K:
# 512x512 crops, 160k iterations, 8 GPUs x 2 images. Resolves to mmseg 1.2.2's
#   configs/swin/swin-base-patch4-window12-in1k-384x384-pre_upernet_8xb2-160k_ade20k-512x512.py
# except the backbone type and where its ImageNet weights come from (a local file; nothing is
# downloaded). SyncBN in the heads becomes BN by itself in a non-distributed run (docs/reproducing.md).
# Expected mIoU, single-scale / multi-scale + flip: 48.35 / 49.65 (mmseg metafile).
_base_ = [
    'mmseg::swin/swin-base-patch4-window12-in1k-384x384-pre_upernet_8xb2-160k_ade20k-512x512.py'
]
custom_imports = dict(imports=['swin_dense'], allow_failed_imports=False)

# The official ImageNet weights (any supported format loads: official, mmseg, timm; docs/checkpoints.md):
#   https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_base_patch4_window12_384.pth
checkpoint_file = 'checkpoints/swin_base_patch4_window12_384.pth'
model = dict(
    backbone=dict(
        type='SwinBackbone',
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))
