# DINO (5 feature scales), Swin-L backbone (SwinBackbone, window 12, ImageNet-22K 384x384
# pretraining, gradient checkpointing), COCO detection, 12 epochs. Resolves to mmdet 3.3.0's
#   configs/dino/dino-5scale_swin-l_8xb2-12e_coco.py
# except the backbone type and where its ImageNet weights come from (a local file).
# Expected (mmdet metafile): box AP 57.2.
_base_ = ['mmdet::dino/dino-5scale_swin-l_8xb2-12e_coco.py']
custom_imports = dict(imports=['swin_dense'], allow_failed_imports=False)

# https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_large_patch4_window12_384_22k.pth
pretrained = 'checkpoints/swin_large_patch4_window12_384_22k.pth'
model = dict(
    backbone=dict(
        type='SwinBackbone',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
