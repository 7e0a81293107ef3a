# UperNet + Swin V2-B (SwinV2Backbone, window 16, ImageNet-22K 192 pretraining fine-tuned on
# ImageNet-1K at 256) on ADE20K: 512x512 crops, 160k iterations, 8 GPUs x 2 images.
#
# No published result and no published recipe for this model: the Swin V2 authors released no
# segmentation code, configs or weights (the paper's ADE20K results are the unreleased
# 3-billion-parameter SwinV2-G's with UperNet, 59.9 mIoU on val, and ablations on smaller models with
# settings given in prose only), and mmseg has no Swin V2. The recipe is therefore the V1 recipe of
# the same method: configs/upernet/swin_b_ade20k_in22k.py (= mmseg
# 1.2.2's configs/swin/swin-base-patch4-window7-in22k-pre_upernet_8xb2-160k_ade20k-512x512.py,
# whose hyper-parameters are those of every mmseg Swin-B UperNet config), every key unchanged except:
#   - the backbone: Swin V2-B (embed 128, depths 2-2-18-2, heads 4-8-16-32, as V1-B) with the window
#     of its ImageNet file, 16 in stages 1-3 and 8 in stage 4 (the 256x256 fine-tune shrank stage
#     4's window to its 8x8 map), and the pretrained windows [12, 12, 12, 6] of the ImageNet-22K
#     192x192 window-12 pre-training that the fine-tune kept (its official config,
#     swinv2_base_patch4_window12to16_192to256_22kto1k_ft.yaml). At 512x512 the stage maps (128,
#     64, 32, 16) are multiples of these windows. V1's pretrain_img_size, use_abs_pos_embed (V2 has
#     no absolute position embedding), strides (always 4-2-2-2) and qk_scale (V2's cosine attention
#     has no scale) do not apply.
#   - drop_path_rate 0.3: unchanged from the V1 dense recipe (the official 22K-to-1K fine-tune used
#     0.2 for classification).
#   - weight decay: the official Swin V2 model exempts `cpb_mlp` (the position-bias MLP) and
#     `logit_scale` (the attention temperature) from weight decay by name
#     (no_weight_decay_keywords in the official swin_transformer_v2.py); they are added to the V1
#     recipe's no-decay keys. The q / v biases keep weight decay as the V1 dense recipe's qkv bias
#     does (the official classification optimiser exempts them only through its rule for every
#     bias and 1-D tensor, which the V1 dense recipes did not carry over).
# The window-24 variant (the 384x384 fine-tune): swinv2_b_ade20k_w24.py.
# A result comes from training this config (docs/model_zoo.md), e.g. on 8 GPUs x 2 images:
#   bash tools/dist_train.sh configs/upernet/swinv2_b_ade20k.py 8
# SyncBN in the heads becomes BN by itself in a non-distributed run (docs/reproducing.md).
_base_ = [
    'mmseg::swin/swin-base-patch4-window7-in22k-pre_upernet_8xb2-160k_ade20k-512x512.py'
]
custom_imports = dict(imports=['swin_dense'], allow_failed_imports=False)

# The official Swin V2-B ImageNet-22K-to-1K window-16 file (any supported format loads: official,
# timm, mmpretrain; docs/checkpoints.md):
#   https://github.com/SwinTransformer/storage/releases/download/v2.0.0/swinv2_base_patch4_window12to16_192to256_22kto1k_ft.pth
checkpoint_file = 'checkpoints/swinv2_base_patch4_window12to16_192to256_22kto1k_ft.pth'
model = dict(
    backbone=dict(
        _delete_=True,  # V1's pretrain_img_size / use_abs_pos_embed / strides / qk_scale go
        type='SwinV2Backbone',
        embed_dims=128,
        patch_size=4,
        window_size=[16, 16, 16, 8],
        pretrained_window_sizes=[12, 12, 12, 6],
        mlp_ratio=4,
        depths=[2, 2, 18, 2],
        num_heads=[4, 8, 16, 32],
        out_indices=(0, 1, 2, 3),
        qkv_bias=True,
        patch_norm=True,
        drop_rate=0.,
        attn_drop_rate=0.,
        drop_path_rate=0.3,
        act_cfg=dict(type='GELU'),
        norm_cfg=dict(type='LN', requires_grad=True),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    # the backbone's widths, as in the V1 config
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))

optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'cpb_mlp': dict(decay_mult=0.),
            'logit_scale': dict(decay_mult=0.),
        }))
