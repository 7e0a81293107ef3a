# Mask R-CNN, Swin V2-T backbone (SwinV2Backbone, window 16), FPN, COCO, 1x schedule (12 epochs).
#
# No published result and no published recipe for this model: the Swin V2 authors released no
# detection code, configs or weights (the paper's COCO results are the unreleased 3-billion-parameter
# SwinV2-G's with HTC++, 63.1 / 54.4 box / mask AP, and ablations on smaller models with settings
# given in prose only), and mmdet has no Swin V2. The recipe is therefore the V1 recipe of the same
# method: configs/mask_rcnn/swin_t_coco.py (= mmdet 3.3.0's
# configs/swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py), every key unchanged except:
#   - the backbone: Swin V2-T (embed 96, depths 2-2-6-2, heads 3-6-12-24, as V1-T) with the window
#     of its ImageNet file, 16 in stages 1-3 and 8 in stage 4 (the official training at 256x256
#     shrank stage 4's window to its 8x8 map), and that file's pretrained windows, the same
#     [16, 16, 16, 8]: they normalise the continuous position bias's coordinates as in pretraining.
#     V1's qk_scale (V2's cosine attention has no scale) and convert_weights (the loader
#     recognises formats by itself) do not apply.
#   - drop_path_rate 0.2: unchanged; V1-T's dense recipe and the official V2-T ImageNet config
#     (swinv2_tiny_patch4_window16_256.yaml) both use 0.2.
#   - weight decay: the official Swin V2 model exempts `cpb_mlp` (the position-bias MLP) and
#     `logit_scale` (the attention temperature) from weight decay by name
#     (no_weight_decay_keywords in the official swin_transformer_v2.py); they are added to the V1
#     recipe's no-decay keys. The V1 keys stay (they match no V2 parameter but `norm`). The q / v
#     biases keep weight decay as the V1 dense recipe's qkv bias does: the official
#     classification optimiser exempts them only through its rule for every bias and 1-D tensor,
#     a rule the V1 dense recipes did not carry over.
# A result comes from training this config (docs/model_zoo.md), e.g. on 8 GPUs x 2 images:
#   bash tools/dist_train.sh configs/mask_rcnn/swinv2_t_coco.py 8
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py']
custom_imports = dict(imports=['swin_dense'], allow_failed_imports=False)

# The official Swin V2-T ImageNet-1K 256x256 window-16 file (any supported format loads:
# official, timm, mmpretrain; docs/checkpoints.md):
# https://github.com/SwinTransformer/storage/releases/download/v2.0.0/swinv2_tiny_patch4_window16_256.pth
pretrained = 'checkpoints/swinv2_tiny_patch4_window16_256.pth'
model = dict(
    backbone=dict(
        _delete_=True,  # V1's qk_scale / convert_weights are not V2 arguments
        type='SwinV2Backbone',
        embed_dims=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=[16, 16, 16, 8],
        pretrained_window_sizes=[16, 16, 16, 8],
        mlp_ratio=4,
        qkv_bias=True,
        drop_rate=0.,
        attn_drop_rate=0.,
        drop_path_rate=0.2,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))  # the backbone's widths, as in the V1 config

optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'cpb_mlp': dict(decay_mult=0.),
            'logit_scale': dict(decay_mult=0.),
        }))
