# Mask2Former, Swin-S backbone (SwinBackbone, depths 2-2-18-2), COCO instance segmentation,
# large-scale jitter, 50 epochs. Resolves to mmdet 3.3.0's
#   configs/mask2former/mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco.py
# except the backbone type and where its ImageNet weights come from (a local file).
# Expected (mmdet metafile): box AP 49.3 / mask AP 46.1.
_base_ = ['mmdet::mask2former/mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco.py']
custom_imports = dict(imports=['swin_dense'], allow_failed_imports=False)

# https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_small_patch4_window7_224.pth
pretrained = 'checkpoints/swin_small_patch4_window7_224.pth'
model = dict(
    backbone=dict(
        type='SwinBackbone',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
