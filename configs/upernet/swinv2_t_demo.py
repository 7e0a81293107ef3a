# Demo: swin_t_demo.py (UperNet) with a Swin V2-T backbone in place of V1's: the ONE change is the
# backbone dict below (data, heads, schedule and optimiser are the V1 demo's), plus its own work
# dir so that the two demos' checkpoints stay apart.
#
#   python tools/train.py configs/upernet/swinv2_t_demo.py
#   python tools/test.py configs/upernet/swinv2_t_demo.py work_dirs/upernet_swinv2_t_demo/iter_300.pth
#
# Window 8, Swin V2's own ImageNet window: the 64x64 crops give token maps of 16, 8 (4 and 2)
# that tile into 8x8 windows. From scratch (init_cfg=None), so there is no pretrained window to
# keep. drop_path_rate 0.3 as the UperNet recipe. The V2 no-decay keys of swinv2_b_ade20k.py
# (cpb_mlp, logit_scale) are not added: over the demo's 300 steps, decay shrinks them by under
# 0.5% (learning rate x weight decay x steps).
_base_ = ['./swin_t_demo.py']

model = dict(backbone=dict(_delete_=True, type='SwinV2Backbone', arch='tiny', window_size=8,
                           drop_path_rate=0.3, init_cfg=None))
work_dir = './work_dirs/upernet_swinv2_t_demo'
