"""The Swin V2 reference fixtures (tests/fixtures/v2/) are complete and well formed.

They were written by the real peer libraries (timm, mmpretrain, torchvision) in a separate
environment (tools/peer_env.sh) by tests/fixtures/v2/make_v2_fixtures.py; tests/fixtures/README.md
describes them. The V2 backbone that must match them does not exist yet: these tests only check
that every file loads safely, records what it claims to (versions, constructor arguments, input,
per-stage outputs of the expected shapes) and holds randomised weights in each peer's layout.
"""
from __future__ import annotations

import hashlib
import math
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
V2 = ROOT / 'tests' / 'fixtures' / 'v2'
FILES = ('input.pt', 'manifest.pt', 'timm_swinv2.pth', 'timm_swinv2_ref.pt',
         'official_swinv2_w8.pth', 'mmpretrain_swinv2.pth', 'mmpretrain_swinv2_ref.pt',
         'torchvision_swinv2.pth', 'torchvision_swinv2_ref.pt', 'timm_swinv2_cr.pth',
         'real_width_layouts.pt')
REFS = ('timm_swinv2_ref.pt', 'mmpretrain_swinv2_ref.pt', 'torchvision_swinv2_ref.pt')
EMBED_DIM, PATCH = 8, 4
VERSIONS = dict(torch='2.14.1', torchvision='0.29.1', timm='1.0.31', mmpretrain='1.2.0',
                mmengine='0.10.7')


def load(name: str):
    return torch.load(V2 / name, map_location='cpu', weights_only=True)


def crop(image: torch.Tensor, boxes) -> torch.Tensor:
    return torch.cat([image[:, :, t:t + h, l:l + w] for t, l, h, w in boxes]).contiguous()


def stage_shape(batch: int, height: int, width: int, stage: int) -> tuple:
    """(B, C, ceil(H / stride), ceil(W / stride)) of stage ``stage`` (stride 4 * 2**stage)."""
    stride = PATCH * 2 ** stage
    return (batch, EMBED_DIM * 2 ** stage, math.ceil(height / stride), math.ceil(width / stride))


@pytest.mark.parametrize('name', FILES)
def test_every_file_loads_with_weights_only(name):
    assert load(name)


def test_total_size_stays_small():
    total = sum(p.stat().st_size for p in V2.iterdir() if p.suffix in ('.pt', '.pth',
                                                                      '.safetensors'))
    assert total < 16 * 2 ** 20, total


def test_manifest_records_versions_and_sources():
    manifest = load('manifest.pt')
    for library, version in VERSIONS.items():
        assert manifest['versions'][library].startswith(version), (library, manifest['versions'])
    assert manifest['reduced_arch'] == dict(embed_dim=8, depths=[2, 2, 2, 2],
                                            num_heads=[1, 2, 4, 8], patch_size=4, num_classes=10)
    # every cross-check between peers the script ran stayed within its tolerance
    for key, diff in manifest['cross_check_max_rel_diff'].items():
        assert diff < (1e-10 if 'fp64' in key else 1e-5), key
    assert manifest['official']['file'] == 'official_swinv2_w8.pth'
    assert manifest['swinv2_cr']['file'] == 'timm_swinv2_cr.pth'


@pytest.mark.parametrize('name', REFS)
def test_reference_cases_are_complete(name):
    ref = load(name)
    image = load('input.pt')['image']
    assert image.shape == (1, 3, 256, 512) and image.dtype == torch.float32
    meta = ref['meta']
    for field in ('library', 'model', 'weights', 'seed', 'layout', 'outputs', 'versions'):
        assert field in meta, field
    assert meta['layout'] == 'NCHW'
    assert all((V2 / w).is_file() for w in meta['weights'])
    assert meta['versions'][meta['library']].startswith(VERSIONS[meta['library']])
    assert ref['cases']
    for case in ref['cases']:
        x = crop(image, case['input']['boxes'])
        assert list(x.shape) == case['input']['shape'], case['name']
        assert hashlib.sha256(x.numpy().tobytes()).hexdigest() == case['input']['sha256']
        assert isinstance(case['kwargs'], dict) and isinstance(case['state_overrides'], dict)
        dtype = getattr(torch, case['dtype'].replace('torch.', ''))
        batch, _, height, width = x.shape
        lists = [case['outputs']] + ([case['stage_outputs']] if 'stage_outputs' in case else [])
        for outputs in lists:
            assert len(outputs) == 4, case['name']
            for stage, out in enumerate(outputs):
                assert tuple(out.shape) == stage_shape(batch, height, width, stage), case['name']
                assert out.dtype == dtype and torch.isfinite(out).all(), case['name']
        for stage, record in enumerate(case['stages']):
            assert record['map_hw'] == list(case['outputs'][stage].shape[-2:]), case['name']
            assert len(record['windows']) == len(record['shifts']) == 2  # depth 2 per stage


def test_reference_cases_cover_the_promised_settings():
    timm_names = [c['name'] for c in load('timm_swinv2_ref.pt')['cases']]
    mmp_cases = load('mmpretrain_swinv2_ref.pt')['cases']
    for prefix in ('w8/', 'w16/', 'w16_pws12/', 'w8_clamp_fp64/'):
        assert any(n.startswith(prefix) for n in timm_names), prefix
    for case in load('timm_swinv2_ref.pt')['cases']:  # timm in its dense setting, on maps
        assert case['kwargs']['always_partition'] is True  # that are multiples of the window
        assert case['kwargs']['strict_img_size'] is False
        for record in case['stages']:
            height, width = record['map_hw']
            assert all(height % wh == 0 and width % ww == 0 for wh, ww in record['windows'])
    assert all(c['kwargs']['pad_small_map'] for c in mmp_cases)
    needs_padding = [c['name'] for c in mmp_cases for r in c['stages']
                     if any(r['map_hw'][0] % wh or r['map_hw'][1] % ww for wh, ww in r['windows'])]
    assert needs_padding  # mmpretrain is the reference where stage maps are not multiples
    tv_cases = load('torchvision_swinv2_ref.pt')['cases']
    for case in tv_cases:
        flags = [r['same_as_pad_then_roll'] for r in case['stages']]
        assert flags[0] and flags == sorted(flags, reverse=True), case['name']


def test_weights_are_randomised_in_each_peer_layout():
    timm = load('timm_swinv2.pth')
    assert 'layers.1.downsample.reduction.weight' in timm
    assert not any(k.startswith('layers.0.downsample') for k in timm)
    assert not any(k.endswith(('relative_coords_table', 'relative_position_index', 'attn_mask'))
                   for k in timm)  # timm keeps them as non-persistent buffers
    for key in ('layers.0.blocks.0.norm1.weight', 'layers.3.blocks.1.norm2.weight'):
        assert timm[key].std() > 0.05 and (timm[key] - 1).abs().max() > 0.05  # not 0, not 1
    scales = torch.cat([v.flatten() for k, v in timm.items() if k.endswith('logit_scale')])
    assert scales.min() >= 1.0 and scales.max() <= 3.0 and scales.std() > 0.2
    assert all(timm[k].abs().max() > 0 for k in timm if k.endswith(('q_bias', 'v_bias')))

    from safetensors.torch import load_file
    safetensors = load_file(str(V2 / 'timm_swinv2.safetensors'))
    assert safetensors.keys() == timm.keys()
    assert all(torch.equal(safetensors[k], timm[k]) for k in timm)  # the same tensors, saved twice

    official = load('official_swinv2_w8.pth')['model']
    assert 'layers.0.downsample.reduction.weight' in official and 'head.weight' in official
    assert torch.equal(official['layers.0.downsample.reduction.weight'],
                       timm['layers.1.downsample.reduction.weight'])  # a renaming, same values
    masks = sorted(k for k in official if k.endswith('attn_mask'))
    assert masks == [f'layers.{i}.blocks.1.attn_mask' for i in range(3)]  # stage 4: one window
    assert official['layers.0.blocks.0.attn.relative_coords_table'].shape == (1, 15, 15, 2)

    mmp = load('mmpretrain_swinv2.pth')['state_dict']
    assert 'backbone.stages.1.downsample.reduction.weight' in mmp
    assert 'backbone.stages.0.blocks.0.attn.w_msa.q_bias' in mmp and 'head.fc.weight' in mmp
    assert 'backbone.stages.0.blocks.0.ffn.layers.0.0.weight' in mmp

    tv = load('torchvision_swinv2.pth')
    qkv_bias = tv['features.1.0.attn.qkv.bias']
    assert qkv_bias[8:16].abs().max() > 0  # the k third is random: torchvision zeroes it itself
    assert 'features.2.reduction.weight' in tv and tv['features.2.norm.weight'].shape == (16,)

    cr = load('timm_swinv2_cr.pth')
    assert any('meta_mlp' in k for k in cr) and not any('cpb_mlp' in k for k in cr)


def test_clamp_cases_put_heads_past_the_clamp():
    for name in ('timm_swinv2_ref.pt', 'mmpretrain_swinv2_ref.pt'):
        clamp = [c for c in load(name)['cases'] if 'clamp' in c['name']]
        assert clamp, name
        for case in clamp:
            assert case['dtype'] == 'torch.float64'
            scales = torch.cat([v.flatten() for v in case['state_overrides'].values()])
            assert (scales > math.log(100)).any() and (scales < math.log(100)).any()


def test_real_width_layouts_record_official_tables():
    layouts = load('real_width_layouts.pt')['entries']
    for name in ('timm/swinv2_tiny_window8_256', 'torchvision/swin_v2_t',
                 'mmpretrain/SwinTransformerV2(arch=tiny)',
                 'official/swinv2_base_patch4_window12to16_192to256_22kto1k_ft'):
        assert name in layouts, name
    for name, record in layouts.items():
        assert len(record['keys']) == len(record['shapes']) == len(record['dtypes']), name
        for stage in record.get('tables', []):
            window, pws, table = stage['window'], stage['pretrained_window'], stage['table']
            assert table.shape == (1, 2 * window - 1, 2 * window - 1, 2), name
            # the pretrained window comes back from the table's largest value t:
            # pws = 1 + 8 (M - 1) / (2^(3t) - 1); pws 0 means "normalised by the window itself"
            t = float(table.max())
            inferred = 1 + 8 * (window - 1) / (2 ** (3 * t) - 1)
            assert round(inferred) == (pws or window) and abs(inferred - round(inferred)) < 1e-3


def test_peer_env_script_parses():
    subprocess.run(['bash', '-n', str(ROOT / 'tools' / 'peer_env.sh')], check=True)
