# Demo: swin_t_demo.py with a Swin V2-T backbone in place of V1's: the ONE change is the backbone
# dict below (data, heads, schedule and optimiser are the V1 demo's).
#
#   python tools/train.py configs/mask_rcnn/swinv2_t_demo.py        # -> work_dirs/swinv2_t_demo/
#   python tools/test.py configs/mask_rcnn/swinv2_t_demo.py work_dirs/swinv2_t_demo/epoch_4.pth
#
# Window 7 as the V1 demo: the 112x112 images give token maps of 28, 14, 7 (and 4) that tile into
# 7x7 windows. From scratch (init_cfg=None), so there is no pretrained window to keep
# (pretrained_window_sizes stays 0: each stage's own window). The V2 no-decay keys of
# swinv2_t_coco.py (cpb_mlp, logit_scale) are not added: over the demo's 400 steps, decay shrinks
# them by under 1% (learning rate x weight decay x steps).
_base_ = ['./swin_t_demo.py']

model = dict(backbone=dict(_delete_=True, type='SwinV2Backbone', arch='tiny', window_size=7,
                           drop_path_rate=0.2, init_cfg=None))
