"""Every Swin V2 fixture file loads into SwinV2Backbone, by every path a user takes.

Paths: ``load_pretrained``, ``init_cfg=dict(type='Pretrained', ...)`` + ``init_weights()``,
``model.load_state_dict`` (the backbone's load-time hook converts the file's names) and mmengine's
``load_checkpoint`` on a whole model. Each must put every tensor of the file in its place,
unchanged (a copy: compared bit for bit), with the documented reorder and the coordinate tables
chosen by the pretrained-window rules. Feature parity with the peers is tested elsewhere
(tests/integration).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from swin_dense.checkpoint import (convert_checkpoint, detect_v2_format, load_pretrained,
                                   read_checkpoint)
from swin_dense.ops.continuous_bias import coords_table
from v2_layouts import FIXTURE_FORMATS, REDUCED, V2, source_of, spec_shapes

backbone_v2 = pytest.importorskip('swin_dense.backbone_v2',
                                  reason='SwinV2Backbone is not in this checkout yet')
SwinV2Backbone = backbone_v2.SwinV2Backbone

TABLE = 'relative_coords_table'


def build(**kwargs) -> nn.Module:
    kwargs = {**REDUCED, 'window_size': 8, 'drop_path_rate': 0.0, **kwargs}
    return SwinV2Backbone(**kwargs)


def flat(checkpoint: dict) -> dict:
    for key in ('model', 'state_dict'):
        if key in checkpoint:
            return checkpoint[key]
    return checkpoint


def assert_loaded_exactly(model: nn.Module, name: str, norms_reset: bool = True) -> None:
    """Every tensor of the file in its place, unchanged; tables: the file's, or (timm) the
    model's own; per-output norms the file lacks: weight 1, bias 0 (``norms_reset``: a
    ``load_state_dict`` leaves them as they were)."""
    fmt = FIXTURE_FORMATS[name]
    source = flat(read_checkpoint(V2 / name))
    state = model.state_dict()
    assert set(spec_shapes()) == set(state)
    for key in spec_shapes():
        where = source_of(fmt, key)
        if where is not None:
            src, transform = where
            assert torch.equal(state[key], transform(source[src])), key
        elif key.endswith(TABLE):
            assert torch.equal(state[key], coords_table(8)), key
        else:
            assert key.startswith('norm')
            if not norms_reset:
                continue
            expected = 1.0 if key.endswith('weight') else 0.0
            assert torch.equal(state[key], torch.full_like(state[key], expected)), key


def scramble(model: nn.Module) -> nn.Module:
    """Fill every parameter with values no file holds (so a tensor left unloaded shows)."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.123)
    return model


# ----------------------------------------------------------------------------- the paths
@pytest.mark.parametrize('name', sorted(FIXTURE_FORMATS))
def test_load_pretrained(name):
    model = scramble(build())
    report = load_pretrained(model, V2 / name)
    assert report.format == FIXTURE_FORMATS[name]
    assert_loaded_exactly(model, name)
    assert all(report.pretrained_windows[i]['pretrained'] == 8 for i in range(4))
    assert 'stage 3: window 8, pretrained window 8' in str(report)


@pytest.mark.parametrize('name', sorted(FIXTURE_FORMATS))
def test_init_cfg_pretrained(name):
    model = scramble(build(init_cfg=dict(type='Pretrained', checkpoint=str(V2 / name))))
    model.init_weights()
    assert_loaded_exactly(model, name)


@pytest.mark.parametrize('name', sorted(FIXTURE_FORMATS))
def test_load_state_dict_converts_through_the_hook(name):
    model = scramble(build())
    source = dict(flat(read_checkpoint(V2 / name)))
    if FIXTURE_FORMATS[name] == 'mmpretrain_v2':  # the backbone alone, as mmpretrain holds it
        source = {k[len('backbone.'):]: v for k, v in source.items() if k.startswith('backbone.')}
    result = model.load_state_dict(source, strict=False)
    assert_loaded_exactly(model, name, norms_reset=False)
    # only the per-output norms a classifier file lacks; the tables timm lacks are the model's
    assert all(k.startswith('norm') for k in result.missing_keys)
    if FIXTURE_FORMATS[name] == 'mmpretrain_v2':  # nothing of a bare backbone is left over
        assert not result.unexpected_keys


class Classifier(nn.Module):
    """A whole model around the backbone, as mmengine's loaders see detectors / classifiers."""

    def __init__(self, **kwargs):
        super().__init__()
        self.backbone = build(**kwargs)
        self.head = nn.Module()
        self.head.fc = nn.Linear(64, 10)


def test_mmengine_load_checkpoint_of_a_whole_model(tmp_path):
    from mmengine.runner import load_checkpoint
    model = Classifier()
    scramble(model.backbone)
    load_checkpoint(model, str(V2 / 'mmpretrain_swinv2.pth'), map_location='cpu')
    assert_loaded_exactly(model.backbone, 'mmpretrain_swinv2.pth')
    source = read_checkpoint(V2 / 'mmpretrain_swinv2.pth')['state_dict']
    assert torch.equal(model.head.fc.weight, source['head.fc.weight'])

    # an official file under backbone. (a detector whose backbone kept the official names)
    official = flat(read_checkpoint(V2 / 'official_swinv2_w8.pth'))
    whole = {'backbone.' + k: v for k, v in official.items() if not k.startswith('head.')}
    path = tmp_path / 'detector.pth'
    torch.save({'state_dict': whole, 'meta': {'epoch': 1}}, path)
    model = Classifier()
    scramble(model.backbone)
    load_checkpoint(model, str(path), map_location='cpu')
    state = model.backbone.state_dict()
    for key in spec_shapes():
        where = source_of('official_v2', key)
        if where is not None:
            assert torch.equal(state[key], where[1](official[where[0]])), key


# ----------------------------------------------------------------------------- window rules
def test_window_16_model_from_the_window_8_file():
    model = build(window_size=[16, 16, 16, 8])
    report = load_pretrained(model, V2 / 'official_swinv2_w8.pth')
    state = model.state_dict()
    for i in range(3):
        assert torch.equal(state[f'stages.{i}.blocks.1.attn.w_msa.{TABLE}'], coords_table(16, 8))
        assert report.pretrained_windows[i]['pretrained'] == 8
    assert report.pretrained_windows[3]['source'] == 'file table'
    assert not report.warnings


def test_timm_file_keeps_the_models_pretrained_windows():
    model = build(window_size=[16, 16, 16, 8], pretrained_window_sizes=[12, 12, 12, 6])
    report = load_pretrained(model, V2 / 'timm_swinv2.pth')
    assert torch.equal(model.state_dict()[f'stages.0.blocks.0.attn.w_msa.{TABLE}'],
                       coords_table(16, 12))
    assert [report.pretrained_windows[i]['pretrained'] for i in range(4)] == [12, 12, 12, 6]


def test_contradicting_pretrained_window_is_a_warning():
    model = build(window_size=[16, 16, 16, 8], pretrained_window_sizes=[12, 12, 12, 6])
    report = load_pretrained(model, V2 / 'official_swinv2_w8.pth')
    assert len(report.warnings) == 4
    assert torch.equal(model.state_dict()[f'stages.0.blocks.0.attn.w_msa.{TABLE}'],
                       coords_table(16, 8))


def test_torchvision_k_bias_is_reported():
    report = load_pretrained(build(), V2 / 'torchvision_swinv2.pth')
    k_thirds = [k for k, r in report.unused.items() if r.startswith('k third')]
    assert len(k_thirds) == 8


# ----------------------------------------------------------------------------- refusals
def test_refused_files_change_nothing(tmp_path):
    from swin_reference import official_state_dict
    v1 = tmp_path / 'swin_v1.pth'
    torch.save({'model': official_state_dict()}, v1)
    model = scramble(build())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for path, match in ((v1, r"V1.*type='SwinBackbone'"),
                        (V2 / 'timm_swinv2_cr.pth', 'swinv2_cr.*SwinTransformerV2Cr')):
        with pytest.raises(ValueError, match=match):
            load_pretrained(model, path)
        with pytest.raises(ValueError, match=match):
            model.load_state_dict(flat(read_checkpoint(path)), strict=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_another_arch_names_it():
    model = build(embed_dims=16)
    with pytest.raises(ValueError, match='differ in shape'):
        load_pretrained(model, V2 / 'timm_swinv2.pth')


# ----------------------------------------------------------------------------- converting
@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_convert_writes_our_layout_with_every_table(tmp_path, suffix):
    dst = tmp_path / f'native{suffix}'
    report = convert_checkpoint(V2 / 'timm_swinv2.pth', dst, window_size=[16, 16, 16, 8])
    assert report.format == 'timm_v2'
    written = read_checkpoint(dst)
    assert detect_v2_format(written) == 'native_v2'
    state = flat(written)
    tables = [k for k in state if k.endswith(TABLE)]
    assert len(tables) == 8 and state[tables[0]].shape == (1, 31, 31, 2)
    model = scramble(build(window_size=[16, 16, 16, 8]))
    again = load_pretrained(model, dst)
    assert again.format == 'native_v2'
    assert all(w['source'] == 'file table' for w in again.pretrained_windows.values())


def test_cli_converts_a_v2_file_with_one_window_per_stage(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from tool_runs import tool_env
    tool = Path(__file__).resolve().parents[2] / 'tools' / 'convert_checkpoint.py'
    dst = tmp_path / 'swinv2_w16.pth'
    run = subprocess.run([sys.executable, str(tool), str(V2 / 'official_swinv2_w8.pth'), str(dst),
                          '--window-size', '16,16,16,8'], capture_output=True, text=True,
                         cwd=str(tmp_path), env=tool_env())
    assert run.returncode == 0, run.stderr
    assert 'format: official_v2' in run.stdout
    assert 'stage 0: window 16, pretrained window 8' in run.stdout
    state = read_checkpoint(dst)['state_dict']
    assert torch.equal(state[f'stages.0.blocks.0.attn.w_msa.{TABLE}'], coords_table(16, 8))
