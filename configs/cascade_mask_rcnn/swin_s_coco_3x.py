# Cascade Mask R-CNN, Swin-S backbone (SwinBackbone, depths 2-2-18-2), the Swin paper's 3x
# recipe: swin_t_coco_3x.py with the backbone of the official detection repository's
#   configs/swin/cascade_mask_rcnn_swin_small_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py
# (the rest of that file equals the Swin-T one, drop path 0.2 included).
# Expected (official detection repo README): box AP 51.9 / mask AP 45.0.
_base_ = ['./swin_t_coco_3x.py']

# https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_small_patch4_window7_224.pth
pretrained = 'checkpoints/swin_small_patch4_window7_224.pth'
model = dict(
    backbone=dict(
        depths=[2, 2, 18, 2],
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
