# Mask2Former, Swin-T backbone (SwinBackbone), COCO instance segmentation, large-scale jitter,
# 50 epochs (368750 iterations of 8 GPUs x 2 images). Resolves to mmdet 3.3.0's
#   configs/mask2former/mask2former_swin-t-p4-w7-224_8xb2-lsj-50e_coco.py
# except the backbone type and where its ImageNet weights come from (a local file; nothing is
# downloaded). The per-parameter rules of the optimizer (backbone lr x0.1, no decay on norms and
# position tables) name parameters as SwinBackbone names them too.
# Expected (mmdet metafile): box AP 47.7 / mask AP 44.7.
_base_ = ['mmdet::mask2former/mask2former_swin-t-p4-w7-224_8xb2-lsj-50e_coco.py']
custom_imports = dict(imports=['swin_dense'], allow_failed_imports=False)

# https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth
pretrained = 'checkpoints/swin_tiny_patch4_window7_224.pth'
model = dict(
    backbone=dict(
        type='SwinBackbone',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
