"""Every Swin V2 layout maps onto SwinV2Backbone's state dict (pure functions, no backbone).

The files are those the real peer libraries wrote (tests/fixtures/v2/, see its README); the
expected names, shapes and reorder come from ``v2_layouts`` (written from the interface spec and
the peers' documented layouts, not from ``swin_dense.checkpoint``). Moving a tensor to another
name is no computation: the mapped values must be the source's, bit for bit.
"""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from swin_dense.checkpoint import (convert_state_dict, detect_format, detect_v2_format,
                                   infer_arch, read_checkpoint)
from swin_dense.checkpoint.formats_v2 import MAPPERS_V2, unwrap_v2
from swin_dense.ops.continuous_bias import coords_table
from v2_layouts import FIXTURE_FORMATS, V2, ShapeOnlyV2, source_of, spec_shapes


def mapped(name_or_checkpoint):
    checkpoint = (read_checkpoint(V2 / name_or_checkpoint) if isinstance(name_or_checkpoint, str)
                  else name_or_checkpoint)
    fmt = detect_v2_format(checkpoint)
    return fmt, MAPPERS_V2[fmt](unwrap_v2(checkpoint).state)


def flat(checkpoint: dict) -> dict:
    for key in ('model', 'state_dict'):
        if key in checkpoint:
            return checkpoint[key]
    return checkpoint


# ----------------------------------------------------------------------------- fixture files
@pytest.mark.parametrize('name', sorted(FIXTURE_FORMATS))
def test_fixture_maps_to_the_spec_layout_bit_for_bit(name):
    fmt, out = mapped(name)
    assert fmt == FIXTURE_FORMATS[name]
    source = flat(read_checkpoint(V2 / name))
    spec = spec_shapes()
    expected = OrderedDict((k, s) for k, s in spec.items() if source_of(fmt, k) is not None)
    assert set(out.tensors) == set(expected)
    for key, shape in expected.items():
        src, transform = source_of(fmt, key)
        assert tuple(out.tensors[key].shape) == shape, key
        assert torch.equal(out.tensors[key], transform(source[src])), key
    # what each layout lacks is only what the spec says it may lack
    absent = set(spec) - set(expected)
    if fmt == 'timm_v2':
        assert absent == {k for k in spec if k.startswith('norm') or k.endswith('coords_table')}
    elif fmt in ('official_v2', 'torchvision_v2'):
        assert absent == {k for k in spec if k.startswith('norm')}
    else:
        assert not absent


def test_the_reorder_is_needed_and_the_v2_norm_keeps_its_order():
    _, out = mapped('official_swinv2_w8.pth')
    source = flat(read_checkpoint(V2 / 'official_swinv2_w8.pth'))
    raw = source['layers.0.downsample.reduction.weight']
    assert not torch.equal(out.tensors['stages.0.downsample.reduction.weight'], raw)
    assert torch.equal(out.tensors['stages.0.downsample.norm.weight'],
                       source['layers.0.downsample.norm.weight'])


def test_official_tables_give_pretrained_window_8():
    checkpoint = read_checkpoint(V2 / 'official_swinv2_w8.pth')
    _, out = mapped(checkpoint)
    arch = infer_arch(out.tensors)
    assert arch['version'] == 2 and arch['window_size'] == 8
    assert arch['pretrained_window_sizes'] == (8, 8, 8, 8)
    assert (arch['embed_dims'], arch['depths'], arch['num_heads']) == (8, (2, 2, 2, 2),
                                                                       (1, 2, 4, 8))


def test_what_each_layout_leaves_out_is_reported():
    _, tv = mapped('torchvision_swinv2.pth')
    k_thirds = [k for k, r in tv.unused.items() if 'k third' in r]
    assert len(k_thirds) == 8 and all('qkv.bias[' in k for k in k_thirds)
    assert any('relative_position_index' in k for k in tv.unused)
    _, official = mapped('official_swinv2_w8.pth')
    assert any(k.endswith('attn_mask') for k in official.unused)
    assert official.unused['head.weight'] == 'classifier head (10 classes)'
    assert 'final norm' in official.unused['norm.weight']
    assert all('reordered' in official.converted[f'stages.{i}.downsample.reduction.weight']
               for i in range(3))


def test_safetensors_holds_the_pth_tensors():
    _, a = mapped('timm_swinv2.pth')
    _, b = mapped('timm_swinv2.safetensors')
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_timm_features_only_and_official_rpe_mlp_and_simmim_names():
    timm = flat(read_checkpoint(V2 / 'timm_swinv2.pth'))
    features_only = {k.replace('layers.', 'layers_', 1): v for k, v in timm.items()
                     if not k.startswith(('head.', 'norm.'))}
    fmt, out = mapped(features_only)
    assert fmt == 'timm_v2'
    assert set(out.tensors) == set(mapped('timm_swinv2.pth')[1].tensors)

    official = flat(read_checkpoint(V2 / 'official_swinv2_w8.pth'))
    reference = mapped('official_swinv2_w8.pth')[1].tensors
    simmim = {'encoder.' + k.replace('cpb_mlp', 'rpe_mlp'): v for k, v in official.items()
              if not k.startswith('head.')}
    simmim['encoder.mask_token'] = torch.zeros(1, 1, 8)
    simmim['decoder.0.weight'] = torch.zeros(3 * 32 * 32, 64, 1, 1)
    fmt, out = mapped({'model': simmim})
    assert fmt == 'simmim_v2'
    assert out.tensors.keys() == reference.keys()
    assert all(torch.equal(out.tensors[k], reference[k]) for k in reference)
    assert 'mask_token' in out.unused
    early = {k.replace('cpb_mlp', 'rpe_mlp'): v for k, v in official.items()}
    fmt, out = mapped({'model': early})
    assert fmt == 'official_v2' and out.tensors.keys() == reference.keys()


# ----------------------------------------------------------------------------- refusals
def test_swinv2_cr_is_refused_by_both_backbones():
    checkpoint = read_checkpoint(V2 / 'timm_swinv2_cr.pth')
    for detect in (detect_v2_format, detect_format):
        with pytest.raises(ValueError, match=r'swinv2_cr.*different design.*SwinTransformerV2Cr'):
            detect(checkpoint)


def test_a_v1_file_names_swin_backbone_and_a_v2_file_names_swin_v2_backbone():
    v1 = {'patch_embed.proj.weight': torch.zeros(8, 3, 4, 4),
          'layers.0.blocks.0.attn.qkv.weight': torch.zeros(24, 8),
          'layers.0.blocks.0.attn.relative_position_bias_table': torch.zeros(169, 1)}
    with pytest.raises(ValueError, match=r"Swin Transformer V1 .*type='SwinBackbone'"):
        detect_v2_format({'model': v1})
    with pytest.raises(ValueError, match=r"V2 .*type='SwinV2Backbone'"):
        detect_format(read_checkpoint(V2 / 'timm_swinv2.pth'))
    with pytest.raises(ValueError, match='not a Swin Transformer V2 checkpoint.*conv1.weight'):
        detect_v2_format({'conv1.weight': torch.zeros(64, 3, 7, 7)})


def test_mmpretrain_extra_norms_of_huge_and_giant_are_refused():
    checkpoint = read_checkpoint(V2 / 'mmpretrain_swinv2.pth')
    state = dict(checkpoint['state_dict'])
    state['backbone.stages.2.blocks.1.norm3.weight'] = torch.ones(32)
    with pytest.raises(ValueError, match='extra norm.*huge / giant'):
        detect_v2_format({'state_dict': state})


# ----------------------------------------------------------------------------- real widths
def _layout_entries():
    return torch.load(V2 / 'real_width_layouts.pt', weights_only=True)['entries']


def _meta_state(entry: dict) -> 'OrderedDict[str, torch.Tensor]':
    """The entry's keys and shapes as meta tensors (no memory); coordinate tables with values:
    the recorded ones (official), else the peer's own construction (window M, normalised by M)."""
    tables = {t['stage']: t['table'] for t in entry.get('tables', [])}
    state = OrderedDict()
    for key, shape, dtype in zip(entry['keys'], entry['shapes'], entry['dtypes']):
        if key.endswith('relative_coords_table'):
            stage = int(key.split('.')[1]) if key.startswith(('layers.', 'stages.')) \
                else (int(key.split('.')[1]) - 1) // 2
            state[key] = tables.get(stage, coords_table((shape[1] + 1) // 2))
        else:
            state[key] = torch.empty(shape, dtype=getattr(torch, dtype), device='meta')
    return state


REAL = {'timm/swinv2_tiny_window8_256': ('timm_v2', 'tiny'),
        'timm/swinv2_base_window12to16_192to256': ('timm_v2', 'base'),
        'torchvision/swin_v2_t': ('torchvision_v2', 'tiny'),
        'official/swinv2_tiny_patch4_window8_256': ('official_v2', 'tiny'),
        'official/swinv2_tiny_patch4_window16_256': ('official_v2', 'tiny'),
        'official/swinv2_base_patch4_window12_192_22k': ('official_v2', 'base'),
        'official/swinv2_base_patch4_window12to16_192to256_22kto1k_ft': ('official_v2', 'base'),
        'official/swinv2_base_patch4_window12to24_192to384_22kto1k_ft': ('official_v2', 'base'),
        'mmpretrain/SwinTransformerV2(arch=tiny)': ('mmpretrain_v2', 'tiny')}


def test_every_real_width_layout_is_listed():
    assert set(_layout_entries()) == set(REAL)


@pytest.mark.parametrize('name', sorted(REAL))
def test_real_width_layout_detects_maps_and_infers_its_arch(name):
    entry = _layout_entries()[name]
    state = _meta_state(entry)
    checkpoint = {'model': state} if name.startswith('official/') else state
    fmt, out = mapped(checkpoint)
    assert fmt == REAL[name][0]
    arch = infer_arch(out.tensors)
    assert arch['arch'] == REAL[name][1] and arch['version'] == 2
    spec = spec_shapes(arch['embed_dims'], arch['depths'], arch['num_heads'],
                       windows=arch['window_size'] or 8)
    expected = {k: s for k, s in spec.items() if source_of(fmt, k) is not None}
    assert {k: tuple(v.shape) for k, v in out.tensors.items()} == expected
    if entry.get('tables'):
        windows = [t['window'] for t in entry['tables']]
        pretrained = [t['pretrained_window'] or t['window'] for t in entry['tables']]
        assert arch['pretrained_window_sizes'] == tuple(pretrained)
        assert arch['window_size'] in (windows[0], tuple(windows))
    if name.endswith('22k'):
        assert 'classifier head (21841 classes)' in out.unused.values()


def test_real_width_conversion_reports_windows_and_22k_head():
    """The 12to16 fine-tune into a window-16 model at real width (shapes only)."""
    entry = _layout_entries()['official/swinv2_base_patch4_window12to16_192to256_22kto1k_ft']
    model = ShapeOnlyV2(windows=(16, 16, 16, 8), pretrained_window_sizes=(12, 12, 12, 6),
                        embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    state, report = convert_state_dict({'model': _meta_state(entry)}, model)
    report.check()
    assert report.format == 'official_v2' and not report.warnings and not report.resized
    assert [report.pretrained_windows[i]['pretrained'] for i in range(4)] == [12, 12, 12, 6]
    assert all(w['source'] == 'file table' for w in report.pretrained_windows.values())
    assert report.checkpoint_arch['arch'] == 'base'
    assert 'classifier head (1000 classes)' in report.unused.values()


# ----------------------------------------------------------------------------- table rules
def test_same_window_tables_load_as_they_are():
    state, report = convert_state_dict(read_checkpoint(V2 / 'official_swinv2_w8.pth'),
                                       ShapeOnlyV2())
    report.check()
    source = flat(read_checkpoint(V2 / 'official_swinv2_w8.pth'))
    key = 'stages.2.blocks.1.attn.w_msa.relative_coords_table'
    assert torch.equal(state[key], source['layers.2.blocks.1.attn.relative_coords_table'])
    assert report.pretrained_windows[2] == dict(window=8, pretrained=8, source='file table')
    assert sorted(report.expected_missing) == sorted(f'norm{i}.{p}' for i in range(4)
                                                     for p in ('weight', 'bias'))
    assert not report.unexpected_missing and not report.warnings


def test_window_16_model_from_the_window_8_file_rebuilds_the_tables_with_p8():
    model = ShapeOnlyV2(windows=(16, 16, 16, 8))
    state, report = convert_state_dict(read_checkpoint(V2 / 'official_swinv2_w8.pth'), model)
    report.check()
    for i in range(3):
        table = state[f'stages.{i}.blocks.0.attn.w_msa.relative_coords_table']
        assert table.shape == (1, 31, 31, 2)
        assert torch.equal(table, coords_table(16, 8))
        assert report.pretrained_windows[i]['pretrained'] == 8
        assert 'rebuilt for window 16' in report.pretrained_windows[i]['source']
    assert report.pretrained_windows[3] == dict(window=8, pretrained=8, source='file table')
    assert len(report.resized) == 6
    text = str(report)
    assert 'stage 0: window 16, pretrained window 8' in text and 'window 8 -> 16' in text


def test_files_without_tables_keep_the_models_pretrained_windows():
    model = ShapeOnlyV2(windows=(16, 16, 16, 8), pretrained_window_sizes=(12, 12, 12, 6))
    state, report = convert_state_dict(read_checkpoint(V2 / 'timm_swinv2.pth'), model)
    report.check()  # the kept tables are no error
    assert not any(k.endswith('relative_coords_table') for k in state)
    kept = [k for k in report.expected_missing if k.endswith('relative_coords_table')]
    assert len(kept) == 8
    assert [report.pretrained_windows[i]['pretrained'] for i in range(4)] == [12, 12, 12, 6]
    assert "model's pretrained_window_sizes" in report.pretrained_windows[0]['source']


def test_a_file_window_that_contradicts_the_arguments_is_a_warning():
    model = ShapeOnlyV2(windows=(16, 16, 16, 8), pretrained_window_sizes=(12, 12, 12, 0))
    state, report = convert_state_dict(read_checkpoint(V2 / 'official_swinv2_w8.pth'), model)
    report.check()
    assert len(report.warnings) == 3  # stages 0-2, once each; stage 3 was given 0
    assert all('pretrained_window_sizes' in w and 'file\'s 8 is used' in w
               for w in report.warnings)
    assert 'WARNING: stage 0' in str(report)
    assert torch.equal(state['stages.0.blocks.1.attn.w_msa.relative_coords_table'],
                       coords_table(16, 8))


def test_torchvision_k_bias_is_reported_and_tables_give_p_equal_m():
    state, report = convert_state_dict(read_checkpoint(V2 / 'torchvision_swinv2.pth'),
                                       ShapeOnlyV2())
    report.check()
    assert "k third of torchvision's qkv.bias" in str(report)
    assert report.unused['features.1.0.attn.qkv.bias[8:16]'].startswith('k third')
    assert all(report.pretrained_windows[i]['pretrained'] == 8 for i in range(4))


def test_a_table_of_another_design_stops_the_load():
    checkpoint = read_checkpoint(V2 / 'official_swinv2_w8.pth')
    state = dict(checkpoint['model'])
    state['layers.1.blocks.0.attn.relative_coords_table'] = torch.rand(1, 15, 15, 2)
    with pytest.raises(ValueError, match=r'layers\.1\.blocks\.0.*not .*Swin V2 table.*Nothing '
                                         r'was loaded'):
        convert_state_dict({'model': state}, ShapeOnlyV2())


def test_v1_backbone_given_a_v2_file_names_swin_v2_backbone():
    from swin_reference import small_model
    with pytest.raises(ValueError, match='SwinV2Backbone'):
        convert_state_dict(read_checkpoint(V2 / 'mmpretrain_swinv2.pth'), small_model())
