"""mmdet's Swin beside ours: the weights moved the way a user moves them (shared by the parity,
export and CUDA tests)."""
from __future__ import annotations

import torch

from swin_dense import SwinBackbone

TINY = dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
BASE = dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
#: A reduced-width Swin with every block kind (W-MSA and SW-MSA in each stage): export tests.
NARROW = dict(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
ATOL = 1e-5


def randomize(model: torch.nn.Module, seed: int = 0, gain_std: float = 0.1,
              table_std: float = 0.1) -> torch.nn.Module:
    """Non-trivial weights everywhere (LayerNorm gains, biases and bias tables included), at the
    scales of a trained model, so that a wrongly loaded or computed tensor shows in the outputs:
    gains ``1 + gain_std * noise``, bias tables ``table_std * noise``, biases ``0.1 * noise``,
    matrices fan-in scaled."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and name.endswith('weight'):  # LayerNorm gains
                p.copy_(1 + gain_std * noise)
            elif 'relative_position_bias_table' in name:
                p.copy_(table_std * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:  # fan-in scaled, so activations stay O(1) through all blocks
                p.copy_(noise * (p[0].numel()) ** -0.5)
    return model


def peer_and_ours(tmp_path, peer_cls, shape, detector_file: bool, **kwargs):
    """Build a randomised peer, save it as the toolkit saves it, load into SwinBackbone."""
    peer = randomize(peer_cls(**shape, **kwargs))
    peer.eval()  # the in-tree train() returns None, so no chaining
    state = peer.state_dict()
    if detector_file:  # what mmdet's Runner writes for a whole detector
        ckpt = {'meta': {'mmdet_version': '3.3.0'},
                'state_dict': {**{f'backbone.{k}': v for k, v in state.items()},
                               'neck.lateral_convs.0.conv.weight': torch.zeros(256, 96, 1, 1)}}
    else:  # an mmseg backbone-only file
        ckpt = state
    path = tmp_path / 'peer.pth'
    torch.save(ckpt, path)
    ours = SwinBackbone(**shape, **kwargs, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    ours.init_weights()
    return peer, ours.eval()
