# Mask2Former (mmseg), Swin-T backbone (SwinBackbone), ADE20K semantic segmentation:
# 512x512 crops, 160k iterations, 8 GPUs x 2 images. Resolves to mmseg 1.2.2's
#   configs/mask2former/mask2former_swin-t_8xb2-160k_ade20k-512x512.py
# except the backbone type and where its ImageNet weights come from (a local file; nothing is
# downloaded). The head is mmdet's, so mmdet's models are imported as the reference does.
# Expected (mmseg metafile): mIoU 48.66.
_base_ = ['mmseg::mask2former/mask2former_swin-t_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['mmdet.models', 'swin_dense'], allow_failed_imports=False)

# The official ImageNet-1K weights (any supported format loads: official, mmseg, timm; docs/checkpoints.md):
#   https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth
pretrained = 'checkpoints/swin_tiny_patch4_window7_224.pth'
model = dict(
    backbone=dict(
        type='SwinBackbone',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
