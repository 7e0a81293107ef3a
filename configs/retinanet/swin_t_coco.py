# RetinaNet, Swin-T backbone (SwinBackbone), FPN, COCO, 1x schedule (12 epochs).
# Resolves to mmdet 3.3.0's configs/swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py, except the
# backbone type and where its ImageNet weights come from (a local file; nothing is downloaded).
# The backbone returns stages 2-4 only (out_indices=(1, 2, 3)) and FPN starts at its first
# input: a one-stage head reads no stride-4 map, and a stage output nothing reads would leave
# parameters without gradients (distributed training stops on unused parameters).
# No published result for this recipe (mmdet ships the config without weights).
_base_ = ['mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py']
custom_imports = dict(imports=['swin_dense'], allow_failed_imports=False)

# https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth
pretrained = 'checkpoints/swin_tiny_patch4_window7_224.pth'
model = dict(
    backbone=dict(
        type='SwinBackbone',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
