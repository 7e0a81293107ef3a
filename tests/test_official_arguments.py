"""A backbone written with the official detection repository's argument names builds the same
model as with mmdet's names, with a warning naming mmdet's argument; a typo is an error."""
from __future__ import annotations

import pytest
import torch

from swin_dense import SwinBackbone

#: The backbone of the official repository's mask_rcnn_swin_tiny config (window 7, 1K 224).
OFFICIAL_TINY = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                     mlp_ratio=4., qkv_bias=True, qk_scale=None, drop_rate=0.,
                     attn_drop_rate=0., drop_path_rate=0.2, ape=False, patch_norm=True,
                     out_indices=(0, 1, 2, 3), use_checkpoint=False)


def test_official_names_build_the_model_mmdets_names_build():
    with pytest.warns(FutureWarning) as caught:
        official = SwinBackbone(**OFFICIAL_TINY, norm_layer=torch.nn.LayerNorm).eval()
    messages = ' '.join(str(w.message) for w in caught)
    for old, new in (('embed_dim', 'embed_dims'), ('ape', 'use_abs_pos_embed'),
                     ('use_checkpoint', 'with_cp'), ('norm_layer', "norm_cfg=dict(type='LN')")):
        assert old in messages and new in messages
    ours = SwinBackbone(arch='tiny', drop_path_rate=0.2).eval()
    ours.load_state_dict(official.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for a, b in zip(official(x), ours(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # one computation, run twice


def test_official_names_build_through_the_registry():
    from mmengine.registry import MODELS
    with pytest.warns(FutureWarning):
        model = MODELS.build(dict(type='SwinBackbone', embed_dim=128, depths=[2, 2, 18, 2],
                                  num_heads=[4, 8, 16, 32], in_chans=3, use_checkpoint=True))
    assert model.embed_dims == 128 and model.in_channels == 3
    assert all(block.with_cp for stage in model.stages for block in stage.blocks)


def test_contradicting_and_unknown_names_fail_with_the_fix():
    with pytest.raises(ValueError, match='give only embed_dims'):
        SwinBackbone(embed_dim=128, embed_dims=192)
    with pytest.raises(TypeError, match="did you mean embed_dims"):
        SwinBackbone(embeddims=96)
    with pytest.raises(ValueError, match='norm_cfg'):
        SwinBackbone(norm_layer=torch.nn.BatchNorm2d)
