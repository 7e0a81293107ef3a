# Cascade Mask R-CNN, Swin-B backbone (SwinBackbone, embed_dims 128, depths 2-2-18-2), the Swin
# paper's 3x recipe: swin_t_coco_3x.py with the backbone of the official detection repository's
#   configs/swin/cascade_mask_rcnn_swin_base_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py
# (ImageNet-1K 224 weights, drop path 0.3; the rest of that file equals the Swin-T one).
# Expected (official detection repo README): box AP 51.9 / mask AP 45.0.
_base_ = ['./swin_t_coco_3x.py']

# https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_base_patch4_window7_224.pth
pretrained = 'checkpoints/swin_base_patch4_window7_224.pth'
model = dict(
    backbone=dict(
        embed_dims=128,
        depths=[2, 2, 18, 2],
        num_heads=[4, 8, 16, 32],
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[128, 256, 512, 1024]))
