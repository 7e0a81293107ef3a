"""Each supported source layout loads into SwinBackbone and gives the source model's features.

Sources: random official state dicts turned into each layout by ``swin_reference`` (written
independently of ``swin_dense.checkpoint``), and mmdet's and mmseg's real Swin models. Skipping
the PatchMerging channel reorder must break the features: the comparisons are sharp.
"""
from __future__ import annotations

import re
from collections import OrderedDict

import pytest
import torch

from swin_dense import SwinBackbone
from swin_dense.checkpoint import checkpoint_filter_fn, detect_format, load_pretrained
from swin_dense.checkpoint import formats as formats_mod
from swin_reference import (SMALL, assert_close, features, image, max_diff,  # noqa: F401
                            official, official_state_dict, official_to_mmdet, official_to_timm,
                            official_to_torchvision, randomise, ref_forward, reference,
                            small_model)


def skip_patch_merging_reorder(monkeypatch):
    """Make the loader keep the official PatchMerging channel order (a wrong load)."""
    monkeypatch.setattr(formats_mod, 'official_to_unfold_reduction', lambda w: w)
    monkeypatch.setattr(formats_mod, 'official_to_unfold_norm', lambda v: v)


# ----------------------------------------------------------------------------- per format
def test_official_1k(tmp_path, official, image, reference):
    path = tmp_path / 'swin_official.pth'
    torch.save({'model': official}, path)
    model = small_model(path)
    assert_close(features(model, image), reference)
    report = load_pretrained(small_model(), path)
    assert report.format == 'official'
    assert detect_format({'model': official}) == 'official'
    assert {'head.weight', 'head.bias', 'norm.weight', 'norm.bias'} <= set(report.unused)
    assert sorted(report.expected_missing) == sorted(f'norm{i}.{p}' for i in range(4)
                                                     for p in ('weight', 'bias'))
    text = str(report)
    assert 'per-output norm' in text and 'classifier head (1000 classes)' in text
    assert 'final norm' in text and 'PatchMerging' in text
    assert report.num_loaded == report.total - 8


def test_official_wrong_patch_merging_order_is_detected(tmp_path, official, image, reference,
                                                        monkeypatch):
    path = tmp_path / 'swin_official.pth'
    torch.save({'model': official}, path)
    monkeypatch.setattr(formats_mod, 'official_to_unfold_reduction', lambda w: w)
    monkeypatch.setattr(formats_mod, 'official_to_unfold_norm', lambda v: v)
    outs = features(small_model(path), image)
    assert_close(outs[:1], reference[:1])  # stage 0 comes before any merging
    assert max_diff(outs[1:], reference[1:]) > 1e-2


def test_official_22k_head_and_safetensors(tmp_path, image, reference):
    from safetensors.torch import save_file
    sd = official_state_dict(num_classes=21841)
    sd = {k: v for k, v in sd.items() if not k.endswith(('attn_mask', 'relative_position_index'))}
    path = tmp_path / 'swin_22k.safetensors'
    save_file(sd, str(path))
    model = small_model(path)
    assert_close(features(model, image), reference)
    report = load_pretrained(small_model(), path)
    assert 'classifier head (21841 classes)' in str(report)


def test_official_det_backbone_prefix(tmp_path, image):
    """Swin-Transformer-Object-Detection: backbone. prefix, trained norm{i}, 4-d abs pos embed."""
    sd = official_state_dict(ape_grid=(16, 16), seed=3)
    pos = sd['absolute_pos_embed'].reshape(1, 16, 16, 32).permute(0, 3, 1, 2).contiguous()
    gen = torch.Generator().manual_seed(5)
    norms = {i: (1 + 0.2 * torch.randn(32 * 2 ** i, generator=gen),
                 0.2 * torch.randn(32 * 2 ** i, generator=gen)) for i in range(4)}
    det = OrderedDict()
    for k, v in sd.items():
        if k.startswith(('head.', 'norm.')) or k.endswith('attn_mask'):
            continue
        det['backbone.' + k] = pos if k == 'absolute_pos_embed' else v
    for i, (w, b) in norms.items():
        det[f'backbone.norm{i}.weight'], det[f'backbone.norm{i}.bias'] = w, b
    det['neck.lateral_convs.0.conv.weight'] = torch.randn(8, 32, 1, 1)
    det['roi_head.bbox_head.fc_cls.weight'] = torch.randn(81, 8)
    path = tmp_path / 'mask_rcnn_swin_official.pth'
    torch.save({'state_dict': det, 'meta': {'epoch': 12}}, path)
    model = small_model(path, use_abs_pos_embed=True, pretrain_img_size=64)
    ref = ref_forward(sd, image, SMALL['depths'], SMALL['num_heads'], 7, out_norms=norms,
                      pos_grid=(16, 16))
    assert_close(features(model, image), ref)
    report = load_pretrained(small_model(use_abs_pos_embed=True, pretrain_img_size=64), path)
    assert report.format == 'official_det' and not report.missing
    assert 'neck of a detector' in str(report)


def test_timm_layout(tmp_path, official, image, reference, monkeypatch):
    timm_sd = official_to_timm(official)
    assert 'layers.0.downsample.reduction.weight' not in timm_sd
    assert detect_format(timm_sd) == 'timm'
    path = tmp_path / 'swin_timm.pth'
    torch.save(timm_sd, path)
    assert_close(features(small_model(path), image), reference)
    # timm's PatchMerging order is the official one: skipping the reorder must break it
    monkeypatch.setattr(formats_mod, 'official_to_unfold_reduction', lambda w: w)
    monkeypatch.setattr(formats_mod, 'official_to_unfold_norm', lambda v: v)
    assert max_diff(features(small_model(path), image)[1:], reference[1:]) > 1e-2


def test_timm_features_only_and_headless(official, image, reference):
    sd = {re.sub(r'^layers\.(\d+)', r'layers_\1', k): v
          for k, v in official_to_timm(official).items() if not k.startswith(('head', 'norm.'))}
    assert detect_format(sd) == 'timm'
    model = small_model()
    model.load_state_dict(checkpoint_filter_fn(sd, model), strict=False)
    assert_close(features(model, image), reference)


def test_torchvision_layout(tmp_path, official, image, reference, monkeypatch):
    tv = official_to_torchvision(official)
    assert detect_format(tv) == 'torchvision'
    path = tmp_path / 'swin_t-704ceda3.pth'
    torch.save(tv, path)
    assert_close(features(small_model(path), image), reference)
    monkeypatch.setattr(formats_mod, 'official_to_unfold_reduction', lambda w: w)
    monkeypatch.setattr(formats_mod, 'official_to_unfold_norm', lambda v: v)
    assert max_diff(features(small_model(path), image)[1:], reference[1:]) > 1e-2


def test_mmpretrain_classifier(tmp_path, official, image):
    """mmpretrain ImageClassifier: backbone.stages (Unfold order), norm3 = final norm, head.fc."""
    sd = OrderedDict(('backbone.' + k, v) for k, v in official_to_mmdet(official).items())
    sd['backbone.norm3.weight'] = official['norm.weight']
    sd['backbone.norm3.bias'] = official['norm.bias']
    sd['head.fc.weight'], sd['head.fc.bias'] = official['head.weight'], official['head.bias']
    path = tmp_path / 'swin-tiny_16xb64_in1k.pth'
    torch.save({'meta': {'epoch': 300}, 'state_dict': sd}, path)
    ref = ref_forward(official, image, SMALL['depths'], SMALL['num_heads'], 7,
                      out_norms={3: (official['norm.weight'], official['norm.bias'])})
    assert_close(features(small_model(path), image), ref)
    report = load_pretrained(small_model(), path)
    assert report.format == 'mmpretrain'
    assert sorted(report.expected_missing) == sorted(f'norm{i}.{p}' for i in range(3)
                                                     for p in ('weight', 'bias'))
    # legacy mmcls files name the final norm 'norm.': mmpretrain loads it as norm3, so do we
    legacy = OrderedDict((k.replace('backbone.norm3.', 'backbone.norm.'), v) for k, v in sd.items())
    assert detect_format(legacy) == 'mmpretrain'
    model = small_model()
    model.load_state_dict(checkpoint_filter_fn(legacy, model), strict=False)
    assert_close(features(model, image), ref)
    # the same file with the official (un-converted) merging order gives other features
    bad = OrderedDict(sd)
    for k, v in official_to_mmdet(official, reorder=False).items():
        if '.downsample.' in k:
            bad['backbone.' + k] = v
    bad_path = tmp_path / 'bad.pth'
    torch.save({'state_dict': bad}, bad_path)
    assert max_diff(features(small_model(bad_path), image)[1:], ref[1:]) > 1e-2


def test_native_bare_module_prefix(tmp_path, official, image, reference):
    sd = OrderedDict(('module.' + k, v) for k, v in official_to_mmdet(official).items())
    path = tmp_path / 'ddp.pth'
    torch.save({'state_dict': sd}, path)
    report = load_pretrained(small_model(), path)
    assert report.format == 'native'
    assert any('module.' in n for n in report.notes)
    assert_close(features(small_model(path), image), reference)


def test_user_prefix(tmp_path, official, image, reference):
    sd = OrderedDict(('model.encoder.' + k, v) for k, v in official_to_mmdet(official).items())
    sd['model.decoder.weight'] = torch.zeros(3)
    path = tmp_path / 'lightning.pth'
    torch.save({'state_dict': sd}, path)
    model = SwinBackbone(**SMALL, init_cfg=dict(type='Pretrained', checkpoint=str(path),
                                                prefix='model.encoder'))
    model.init_weights()
    assert_close(features(model.eval(), image), reference)
    with pytest.raises(ValueError, match='prefix'):
        load_pretrained(small_model(), path, prefix='nothing.here')


def test_buffers_of_another_window_are_ignored(tmp_path, image, reference):
    sd = official_state_dict(buffers_window=12)  # index / mask buffers of window 12, tables of 7
    path = tmp_path / 'buffers12.pth'
    torch.save({'model': sd}, path)
    assert_close(features(small_model(path), image), reference)


def test_non_swin_and_empty(tmp_path):
    resnet = {'conv1.weight': torch.zeros(64, 3, 7, 7), 'bn1.weight': torch.zeros(64),
              'layer1.0.conv1.weight': torch.zeros(64, 64, 1, 1),
              'fc.weight': torch.zeros(1000, 2048)}
    path = tmp_path / 'resnet50.pth'
    torch.save(resnet, path)
    with pytest.raises(ValueError, match='not a Swin Transformer checkpoint.*conv1.weight'):
        load_pretrained(small_model(), path)
    for empty in ({}, {'state_dict': {}}):
        torch.save(empty, path)
        with pytest.raises(ValueError, match='no tensors|no state dict'):
            load_pretrained(small_model(), path)
    v2 = {'features.0.0.weight': torch.zeros(32, 3, 4, 4),
          'features.1.0.attn.qkv.weight': torch.zeros(96, 32),
          'features.1.0.attn.logit_scale': torch.zeros(1, 1, 1)}
    with pytest.raises(ValueError, match='V2'):
        detect_format(v2)
    # a head-only file: detected as Swin nowhere -> error, never a silent zero load
    with pytest.raises(ValueError):
        checkpoint_filter_fn({'head.weight': torch.zeros(10, 256)}, small_model())


# ----------------------------------------------------------------------------- real projects
def _mmdet_swin():
    pytest.importorskip('mmdet')
    from mmdet.models.backbones.swin import SwinTransformer, swin_converter
    return SwinTransformer, swin_converter


def test_mmdet_detector_file(tmp_path, image):
    SwinTransformer, _ = _mmdet_swin()
    src = SwinTransformer(**SMALL, window_size=7, drop_path_rate=0.0)
    src.eval()  # (mmdet's train() returns None)
    randomise(src)
    state = OrderedDict(('backbone.' + k, v) for k, v in src.state_dict().items())
    state['neck.fpn_convs.0.conv.weight'] = torch.randn(8, 8, 3, 3)
    state['rpn_head.rpn_conv.weight'] = torch.randn(8, 8, 3, 3)
    path = tmp_path / 'mask-rcnn_swin.pth'
    torch.save({'state_dict': state,
                'meta': {'epoch': 12, 'dataset_meta': {'classes': ('a',)}}}, path)
    model = small_model(path)
    with torch.no_grad():
        assert_close(features(model, image), src(image))
    report = load_pretrained(small_model(), path)
    assert report.format == 'native' and not report.missing
    assert any('relative_position_index' in k for k in report.unused)


def test_mmseg_backbone_file(tmp_path, image):
    pytest.importorskip('mmseg')
    from mmseg.models.backbones import SwinTransformer
    src = SwinTransformer(**SMALL, window_size=7, drop_path_rate=0.0)
    src.eval()
    randomise(src, seed=4)
    path = tmp_path / 'upernet_swin_backbone.pth'
    torch.save(src.state_dict(), path)
    with torch.no_grad():
        assert_close(features(small_model(path), image), src(image))


def test_official_matches_mmdet_swin_converter(tmp_path, official, image, reference):
    """mmdet's own swin_converter + mmdet's SwinTransformer agree with our official loading."""
    SwinTransformer, swin_converter = _mmdet_swin()
    mm = SwinTransformer(**SMALL, window_size=7, drop_path_rate=0.0)
    mm.eval()
    converted = {k[len('backbone.'):]: v for k, v in swin_converter(official).items()}
    missing, unexpected = mm.load_state_dict(converted, strict=False)
    assert all(k.startswith('norm') for k in missing)
    with torch.no_grad():
        theirs = mm(image)
    assert_close(theirs, reference)  # validates ref_forward against mmdet itself
    path = tmp_path / 'official.pth'
    torch.save({'model': official}, path)
    assert_close(features(small_model(path), image), theirs)
