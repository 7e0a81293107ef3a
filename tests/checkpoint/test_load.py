"""Loading with a report: resizing to the model's window and grid, and the errors that name the
keys and the right ``arch`` instead of loading part of a checkpoint."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from swin_dense import SwinBackbone
from swin_dense.checkpoint import (LoadReport, checkpoint_filter_fn, convert_state_dict,
                                   load_pretrained)
from swin_reference import (assert_close, features, image, official,  # noqa: F401
                            official_state_dict, ref_forward, small_model)


# ----------------------------------------------------------------------------- resizing
def test_window_7_to_12_resize(tmp_path, official):
    path = tmp_path / 'w7.pth'
    torch.save({'model': official}, path)  # its index / mask buffers are window 7
    model = small_model(path, window_size=12)
    key = 'stages.1.blocks.0.attn.w_msa.relative_position_bias_table'
    table = official['layers.1.blocks.0.attn.relative_position_bias_table']
    assert table.shape == (169, 2) and model.state_dict()[key].shape == (529, 2)
    expected = F.interpolate(table.T.reshape(1, 2, 13, 13), size=(23, 23), mode='bicubic')
    expected = expected.reshape(2, 529).T
    assert torch.allclose(model.state_dict()[key], expected, atol=1e-6)
    report = load_pretrained(small_model(window_size=12), path)
    assert len(report.resized) == 8 and 'window 7 -> 12' in str(report)
    features(model, torch.randn(1, 3, 64, 64))  # runs


def test_absolute_pos_embed_resize(tmp_path, image):
    sd = official_state_dict(ape_grid=(16, 16), seed=7)
    path = tmp_path / 'ape.pth'
    torch.save({'model': sd}, path)
    model = small_model(path, use_abs_pos_embed=True, pretrain_img_size=96)  # grid 24 x 24
    pos = sd['absolute_pos_embed'].reshape(1, 16, 16, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(pos, size=(24, 24), mode='bicubic', align_corners=False)
    assert torch.allclose(model.absolute_pos_embed, expected.flatten(2).transpose(1, 2), atol=1e-6)


# ----------------------------------------------------------------------------- errors
def test_swin_b_into_swin_t_names_keys_and_arch(tmp_path):
    sd = official_state_dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                             fill=0.0)  # expanded zeros: Swin-B shapes, a few KB on disk
    path = tmp_path / 'swin_base_patch4_window7_224.pth'
    torch.save({'model': sd}, path)
    model = SwinBackbone(arch='tiny', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError) as info:
        model.init_weights()
    msg = str(info.value)
    assert 'patch_embed.projection.weight' in msg
    assert '(128, 3, 4, 4)' in msg and '(96, 3, 4, 4)' in msg
    assert "arch='base'" in msg


def test_depth_mismatch_is_an_error(official):
    model = SwinBackbone(embed_dims=32, depths=(2, 2, 1, 2), num_heads=(1, 2, 4, 8))
    with pytest.raises(ValueError, match='depths differ'):
        checkpoint_filter_fn({'model': official}, model)


def test_missing_backbone_tensors_are_an_error(official):
    sd = {k: v for k, v in official.items() if 'layers.2.blocks.1.' not in k}
    with pytest.raises(ValueError, match=r'lacks \d+ backbone tensors.*stages\.2\.blocks\.1'):
        checkpoint_filter_fn(sd, small_model())


# ----------------------------------------------------------------------------- report
def test_swin_t_shaped_official(tmp_path):
    sd = official_state_dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), seed=11)
    path = tmp_path / 'swin_tiny_patch4_window7_224.pth'
    torch.save({'model': sd}, path)
    model = SwinBackbone(arch='tiny', drop_path_rate=0.0).eval()
    report = load_pretrained(model, path)  # (init_weights' random init of 28M params is slow)
    assert report.num_loaded == 169 and report.total == 177
    x = torch.randn(1, 3, 36, 60)  # odd token maps (9 x 15): padding and odd-size merging
    ref = ref_forward(sd, x, (2, 2, 6, 2), (3, 6, 12, 24), 7)
    assert_close(features(model, x), ref, tol=2e-5)


def test_report_is_a_dataclass_with_readable_text(official):
    _, report = convert_state_dict({'model': official}, small_model(), source='x.pth')
    assert isinstance(report, LoadReport)
    text = str(report)
    assert text.splitlines()[0] == 'SwinBackbone weights from x.pth'
    assert 'buffer' in text and 'x layers.*.blocks.*.attn.relative_position_index' in text
