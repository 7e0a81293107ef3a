# UperNet + Swin V2-B, window 24: swinv2_b_ade20k.py with the ImageNet-22K 192 pre-training
# fine-tuned on ImageNet-1K at 384 (window 24 in stages 1-3, 12 in stage 4, whose 12x12 map at
# 384 shrank the window; pretrained windows [12, 12, 12, 6] as for the window-16 file: official
# swinv2_base_patch4_window12to24_192to384_22kto1k_ft.yaml). Recipe and sources as
# swinv2_b_ade20k.py; no published result. At 512x512 the stage maps (128, 64, 32, 16) are padded
# to multiples of 24 / 12: a larger attention span at a higher cost than window 16.
_base_ = ['./swinv2_b_ade20k.py']

# https://github.com/SwinTransformer/storage/releases/download/v2.0.0/swinv2_base_patch4_window12to24_192to384_22kto1k_ft.pth
checkpoint_file = 'checkpoints/swinv2_base_patch4_window12to24_192to384_22kto1k_ft.pth'
model = dict(
    backbone=dict(
        window_size=[24, 24, 24, 12],
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))
