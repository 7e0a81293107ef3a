"""Checkpoint loading: every supported layout gives the source model's features.

The ground truth does not come from our modules. ``ref_forward`` below is a small Swin forward
written from the official code (``layers.i.blocks.j``, ``attn.qkv``, ``mlp.fc1``, official
PatchMerging concat order ``[x(0::2,0::2), x(1::2,0::2), x(0::2,1::2), x(1::2,1::2)]``, official
relative-position index formula) with the dense-prediction windowing of the official detection
code (pad bottom/right, always shift, mask on the padded grid). Each source file is derived
from a random official state dict by that project's own layout rules, written here
independently of ``swin_dense.checkpoint``. mmdet's and mmseg's real models are sources too.
Files written by the real timm and torchvision, with the features those libraries computed, are
shipped in ``tests/fixtures/`` (made by ``tests/fixtures/make_fixtures.py``), so those formats are
checked against the real libraries without installing them.
"""
from __future__ import annotations

import math
import re
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swin_dense import SwinBackbone  # noqa: E402
from swin_dense import checkpoint as ckpt_mod  # noqa: E402
from swin_dense.checkpoint import (  # noqa: E402
    LoadReport, UnsafeCheckpointError, checkpoint_filter_fn, convert_checkpoint, convert_state_dict,
    detect_format, load_pretrained, read_checkpoint)

SMALL = dict(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
TOL = 1e-5


# ----------------------------------------------------------------------------- reference
def _rel_index(M: int) -> torch.Tensor:
    """The official relative_position_index, (M*M, M*M)."""
    coords = torch.stack(torch.meshgrid([torch.arange(M), torch.arange(M)], indexing='ij'))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += M - 1
    rel[:, :, 1] += M - 1
    rel[:, :, 0] *= 2 * M - 1
    return rel.sum(-1)


def _shift_mask(Hp: int, Wp: int, M: int, s: int) -> torch.Tensor:
    img = torch.zeros(1, Hp, Wp, 1)
    cnt = 0
    for h in (slice(0, -M), slice(-M, -s), slice(-s, None)):
        for w in (slice(0, -M), slice(-M, -s), slice(-s, None)):
            img[:, h, w, :] = cnt
            cnt += 1
    win = img.view(1, Hp // M, M, Wp // M, M, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, M * M)
    mask = win.unsqueeze(1) - win.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _attention(sd, p, x, H, W, heads, M, shift):
    B, L, C = x.shape
    x = F.layer_norm(x, (C,), sd[p + 'norm1.weight'], sd[p + 'norm1.bias']).view(B, H, W, C)
    pad_r, pad_b = (M - W % M) % M, (M - H % M) % M
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    Hp, Wp = x.shape[1:3]
    if shift:
        x = torch.roll(x, (-shift, -shift), (1, 2))
    win = x.view(B, Hp // M, M, Wp // M, M, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, M * M, C)
    Bw, N, _ = win.shape
    qkv = F.linear(win, sd[p + 'attn.qkv.weight'], sd[p + 'attn.qkv.bias'])
    q, k, v = qkv.reshape(Bw, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    attn = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)
    table = sd[p + 'attn.relative_position_bias_table']
    attn = attn + table[_rel_index(M).view(-1)].view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
    if shift:
        mask = _shift_mask(Hp, Wp, M, shift)
        nW = mask.shape[0]
        attn = (attn.view(Bw // nW, nW, heads, N, N) + mask[None, :, None]).view(-1, heads, N, N)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(Bw, N, C)
    out = F.linear(out, sd[p + 'attn.proj.weight'], sd[p + 'attn.proj.bias'])
    out = out.view(B, Hp // M, Wp // M, M, M, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    return out[:, :H, :W, :].reshape(B, H * W, C)


def ref_forward(sd, x, depths, num_heads, window, out_norms=None, pos_grid=None):
    """Dense Swin forward straight from an OFFICIAL-layout state dict.

    ``out_norms``: {stage: (weight, bias)}; stages not in it use LayerNorm with weight 1 bias 0.
    """
    out_norms = out_norms or {}
    w = sd['patch_embed.proj.weight']
    p = w.shape[-1]
    H0, W0 = x.shape[-2:]
    x = F.pad(x, (0, (p - W0 % p) % p, 0, (p - H0 % p) % p))
    x = F.conv2d(x, w, sd['patch_embed.proj.bias'], stride=p)
    B, C, H, W = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = F.layer_norm(x, (C,), sd['patch_embed.norm.weight'], sd['patch_embed.norm.bias'])
    if 'absolute_pos_embed' in sd:  # added after the patch norm
        pos = sd['absolute_pos_embed']
        if pos.dim() == 3:
            gh, gw = pos_grid
            pos = pos.reshape(1, gh, gw, C).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(H, W), mode='bicubic', align_corners=False)
        x = x + pos.flatten(2).transpose(1, 2)
    outs = []
    for i, depth in enumerate(depths):
        for j in range(depth):
            pre = f'layers.{i}.blocks.{j}.'
            x = x + _attention(sd, pre, x, H, W, num_heads[i], window, window // 2 if j % 2 else 0)
            y = F.layer_norm(x, (C,), sd[pre + 'norm2.weight'], sd[pre + 'norm2.bias'])
            y = F.linear(F.gelu(F.linear(y, sd[pre + 'mlp.fc1.weight'], sd[pre + 'mlp.fc1.bias'])),
                         sd[pre + 'mlp.fc2.weight'], sd[pre + 'mlp.fc2.bias'])
            x = x + y
        nw, nb = out_norms.get(i, (None, None))
        outs.append(F.layer_norm(x, (C,), nw, nb).view(B, H, W, C).permute(0, 3, 1, 2))
        d = f'layers.{i}.downsample.'
        if d + 'reduction.weight' in sd:
            g = x.view(B, H, W, C)
            g = F.pad(g, (0, 0, 0, W % 2, 0, H % 2))
            g = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]],
                          -1)  # the official concat order
            H, W = g.shape[1:3]
            g = F.layer_norm(g.reshape(B, H * W, 4 * C), (4 * C,), sd[d + 'norm.weight'],
                             sd[d + 'norm.bias'])
            x = F.linear(g, sd[d + 'reduction.weight'])
            C = x.shape[-1]
    return outs


def official_state_dict(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window=7,
                        num_classes=1000, ape_grid=None, buffers_window=None, seed=0, fill=None):
    """Random weights laid out exactly as microsoft/Swin-Transformer saves them ({'model': sd})."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=None, base=0.0):
        if fill is not None:
            return torch.zeros(()).expand(*shape)  # tiny on disk: shapes only
        scale = scale if scale is not None else 1.0 / math.sqrt(shape[-1])
        return base + scale * torch.randn(*shape, generator=gen)

    sd = OrderedDict()
    C = embed_dims
    sd['patch_embed.proj.weight'] = rnd(C, 3, 4, 4, scale=0.2)
    sd['patch_embed.proj.bias'] = rnd(C, scale=0.1)
    sd['patch_embed.norm.weight'] = rnd(C, scale=0.2, base=1.0)
    sd['patch_embed.norm.bias'] = rnd(C, scale=0.2)
    if ape_grid is not None:
        sd['absolute_pos_embed'] = rnd(1, ape_grid[0] * ape_grid[1], C, scale=0.5)
    Mb = buffers_window or window
    for i, depth in enumerate(depths):
        Ci, h = C * 2 ** i, num_heads[i]
        for j in range(depth):
            p = f'layers.{i}.blocks.{j}.'
            sd[p + 'norm1.weight'] = rnd(Ci, scale=0.2, base=1.0)
            sd[p + 'norm1.bias'] = rnd(Ci, scale=0.2)
            sd[p + 'attn.relative_position_bias_table'] = rnd((2 * window - 1) ** 2, h, scale=1.0)
            sd[p + 'attn.relative_position_index'] = _rel_index(Mb)
            sd[p + 'attn.qkv.weight'] = rnd(3 * Ci, Ci)
            sd[p + 'attn.qkv.bias'] = rnd(3 * Ci, scale=0.1)
            sd[p + 'attn.proj.weight'] = rnd(Ci, Ci)
            sd[p + 'attn.proj.bias'] = rnd(Ci, scale=0.1)
            sd[p + 'norm2.weight'] = rnd(Ci, scale=0.2, base=1.0)
            sd[p + 'norm2.bias'] = rnd(Ci, scale=0.2)
            sd[p + 'mlp.fc1.weight'] = rnd(4 * Ci, Ci)
            sd[p + 'mlp.fc1.bias'] = rnd(4 * Ci, scale=0.1)
            sd[p + 'mlp.fc2.weight'] = rnd(Ci, 4 * Ci)
            sd[p + 'mlp.fc2.bias'] = rnd(Ci, scale=0.1)
            if j % 2:  # the classification code keeps the shift mask of its 224 input as a buffer
                side = max(1, 56 // 2 ** i // Mb)
                sd[p + 'attn_mask'] = torch.zeros(side * side, Mb * Mb, Mb * Mb)
        if i < len(depths) - 1:
            p = f'layers.{i}.downsample.'
            sd[p + 'reduction.weight'] = rnd(2 * Ci, 4 * Ci)
            sd[p + 'norm.weight'] = rnd(4 * Ci, scale=0.3, base=1.0)
            sd[p + 'norm.bias'] = rnd(4 * Ci, scale=0.3)
    Cl = C * 2 ** (len(depths) - 1)
    sd['norm.weight'] = rnd(Cl, scale=0.2, base=1.0)
    sd['norm.bias'] = rnd(Cl, scale=0.2)
    sd['head.weight'] = rnd(num_classes, Cl)
    sd['head.bias'] = rnd(num_classes, scale=0.1)
    return sd


# --------------------------------------------- source layouts, derived here from the official one
_K_OF_U = {0: 0, 1: 2, 2: 1, 3: 3}  # Unfold slot u = 2*dy + dx  <-  official block k = dy + 2*dx


def to_unfold_order(t: torch.Tensor, axis: int) -> torch.Tensor:
    """Explicit index form: unfold[c*4 + u] = official[k(u)*C + c] along ``axis``."""
    n = t.shape[axis]
    C = n // 4
    index = torch.tensor([_K_OF_U[u] * C + c for c in range(C) for u in range(4)])
    return t.index_select(axis, index)


def official_to_mmdet(sd, reorder=True):
    """microsoft layout -> mmdet 3 / mmseg 1 layout (stages, w_msa, ffn.layers, projection)."""
    out = OrderedDict()
    for k, v in sd.items():
        if k.startswith('head') or k.startswith('norm.') or k.endswith('attn_mask'):
            continue
        n = k.replace('patch_embed.proj.', 'patch_embed.projection.')
        n = re.sub(r'^layers\.', 'stages.', n)
        n = n.replace('.attn.', '.attn.w_msa.').replace('.mlp.fc1.', '.ffn.layers.0.0.')
        n = n.replace('.mlp.fc2.', '.ffn.layers.1.')
        if '.downsample.' in k and reorder:
            v = to_unfold_order(v, 1 if k.endswith('reduction.weight') else 0)
        out[n] = v
    return out


def official_to_timm(sd):
    """timm >= 0.9 checkpoint_filter_fn, inverted: downsample of layer i -> layer i+1, head.fc."""
    out = OrderedDict()
    for k, v in sd.items():
        if k.endswith(('relative_position_index', 'attn_mask')):
            continue  # non-persistent buffers in timm >= 0.9
        m = re.match(r'^layers\.(\d+)\.downsample\.(.*)$', k)
        if m:
            k = f'layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}'
        out[k.replace('head.', 'head.fc.')] = v
    return out


def official_to_torchvision(sd):
    """torchvision.models.swin_t naming: features.{0, 2i+1, 2i+2}, mlp.0 / mlp.3, flat index."""
    out = OrderedDict()
    for k, v in sd.items():
        if k.endswith('attn_mask'):
            continue
        if k.startswith('patch_embed.'):
            n = {'proj.weight': 'features.0.0.weight', 'proj.bias': 'features.0.0.bias',
                 'norm.weight': 'features.0.2.weight', 'norm.bias': 'features.0.2.bias'}[k[12:]]
        elif m := re.match(r'^layers\.(\d+)\.blocks\.(\d+)\.(.*)$', k):
            rest = m.group(3).replace('mlp.fc1.', 'mlp.0.').replace('mlp.fc2.', 'mlp.3.')
            if rest.endswith('relative_position_index'):
                v = v.flatten()
            n = f'features.{2 * int(m.group(1)) + 1}.{m.group(2)}.{rest}'
        elif m := re.match(r'^layers\.(\d+)\.downsample\.(.*)$', k):
            n = f'features.{2 * int(m.group(1)) + 2}.{m.group(2)}'
        else:
            n = k  # norm.*, head.*
        out[n] = v
    return out


# ----------------------------------------------------------------------------- helpers
def small_model(tmp_file=None, **kw) -> SwinBackbone:
    cfg = dict(SMALL, window_size=7, drop_path_rate=0.0)
    cfg.update(kw)
    init_cfg = dict(type='Pretrained', checkpoint=str(tmp_file)) if tmp_file else None
    model = SwinBackbone(init_cfg=init_cfg, **cfg)
    if tmp_file:  # the path under test: init_cfg -> init_weights -> load_pretrained
        model.init_weights()
    return model.eval()


def features(model, x):
    with torch.no_grad():
        return model(x)


def assert_close(outs, refs, tol=TOL):
    assert len(outs) == len(refs)
    for i, (a, b) in enumerate(zip(outs, refs)):
        assert a.shape == b.shape, (i, a.shape, b.shape)
        err = (a - b).abs().max().item()
        assert err <= tol, f'output {i}: max abs diff {err}'


def max_diff(outs, refs):
    return max((a - b).abs().max().item() for a, b in zip(outs, refs))


@pytest.fixture(scope='module')
def image():
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope='module')
def official():
    return official_state_dict()


@pytest.fixture(scope='module')
def reference(official, image):
    with torch.no_grad():
        return ref_forward(official, image, SMALL['depths'], SMALL['num_heads'], 7)


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
    monkeypatch.setattr(ckpt_mod, 'official_to_unfold_reduction', lambda w: w)
    monkeypatch.setattr(ckpt_mod, 'official_to_unfold_norm', lambda v: v)
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
    monkeypatch.setattr(ckpt_mod, 'official_to_unfold_reduction', lambda w: w)
    monkeypatch.setattr(ckpt_mod, 'official_to_unfold_norm', lambda v: v)
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
    monkeypatch.setattr(ckpt_mod, 'official_to_unfold_reduction', lambda w: w)
    monkeypatch.setattr(ckpt_mod, 'official_to_unfold_norm', lambda v: v)
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


def test_buffers_of_another_window_are_ignored(tmp_path, image, reference):
    sd = official_state_dict(buffers_window=12)  # index / mask buffers of window 12, tables of 7
    path = tmp_path / 'buffers12.pth'
    torch.save({'model': sd}, path)
    assert_close(features(small_model(path), image), reference)


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


def test_truncated_and_missing_file(tmp_path, official):
    path = tmp_path / 'full.pth'
    torch.save({'model': official}, path)
    data = path.read_bytes()
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r'cut\.pth.*truncated'):
        read_checkpoint(cut)
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        read_checkpoint(tmp_path / 'nowhere.pth')
    model = SwinBackbone(**SMALL, init_cfg=dict(type='Pretrained',
                                                checkpoint=str(tmp_path / 'nowhere.pth')))
    with pytest.raises(FileNotFoundError):
        model.init_weights()


class Arbitrary:
    """Stands for any class a pickle could instantiate."""

    def __init__(self):
        self.payload = 'not tensor data'


def test_arbitrary_pickle_refused_unless_trusted(tmp_path, official, image, reference):
    path = tmp_path / 'legacy.pth'
    torch.save({'model': official, 'config': Arbitrary()}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_pretrained(small_model(), path)
    msg = str(info.value)
    assert 'Arbitrary' in msg and 'legacy.pth' in msg and 'trust_pickle=True' in msg
    assert isinstance(info.value, ValueError)
    with pytest.warns(UserWarning, match='arbitrary code'):
        report = load_pretrained(small_model(), path, trust_pickle=True)
    assert report.format == 'official'
    # the opt-in through init_cfg
    model = SwinBackbone(**SMALL, drop_path_rate=0.0,
                         init_cfg=dict(type='Pretrained', checkpoint=str(path), trust_pickle=True))
    with pytest.warns(UserWarning):
        model.init_weights()
    assert_close(features(model.eval(), image), reference)


def test_mmengine_runner_checkpoint_loads_weights_only(tmp_path, image):
    """A real mmengine Runner checkpoint: meta, message_hub (HistoryBuffer), optimizer state."""
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Detector(BaseModel):
        def __init__(self):
            super().__init__()
            self.backbone = SwinBackbone(**SMALL, drop_path_rate=0.0)
            self.neck = torch.nn.Linear(256, 4)

        def forward(self, inputs, data_samples=None, mode='tensor'):
            out = self.neck(self.backbone(inputs)[-1].mean((2, 3)))
            return dict(loss=out.pow(2).mean()) if mode == 'loss' else out

    class Data(torch.utils.data.Dataset):
        metainfo = dict(classes=('a', 'b'))

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return dict(inputs=torch.randn(3, 32, 32))

    runner = Runner(
        model=Detector(), work_dir=str(tmp_path / 'work'),
        train_dataloader=dict(dataset=Data(), sampler=dict(type='DefaultSampler', shuffle=False),
                              batch_size=2, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05)),
        param_scheduler=[dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=2)],
        train_cfg=dict(by_epoch=True, max_epochs=1),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1), logger=None),
        randomness=dict(seed=0), default_scope=None)
    runner.train()
    path = tmp_path / 'work' / 'epoch_1.pth'
    raw = read_checkpoint(path)  # weights_only, with mmengine's data types allow-listed
    assert {'meta', 'message_hub', 'optimizer', 'param_schedulers'} <= set(raw)
    model = SwinBackbone(**SMALL, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    trained = runner.model.backbone.eval()
    for k, v in trained.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    report = load_pretrained(SwinBackbone(**SMALL), path)
    assert report.format == 'native' and not report.missing  # own norms are trained and loaded
    # mmengine's own loader (resume) with torch's weights_only default, once registered
    from mmengine.runner.checkpoint import _load_checkpoint
    saved = torch.serialization.get_safe_globals()
    try:
        ckpt_mod.register_mmengine_safe_globals()
        assert 'message_hub' in _load_checkpoint(str(path), map_location='cpu')
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


# ----------------------------------------------------------------------------- conversion
@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_convert_checkpoint_roundtrip(tmp_path, official, image, reference, suffix):
    src = tmp_path / 'official.pth'
    torch.save({'model': official}, src)
    dst = tmp_path / f'native{suffix}'
    report = convert_checkpoint(src, dst)  # architecture inferred from the file
    assert report.format == 'official' and dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]
    assert detect_format(read_checkpoint(dst)) == 'native'
    assert_close(features(small_model(dst), image), reference)
    again = load_pretrained(small_model(), dst)
    assert again.format == 'native' and len(again.expected_missing) == 8


def test_cli(tmp_path, official, capsys):
    import subprocess
    src = tmp_path / 'timm.pth'
    torch.save(official_to_timm(official), src)
    dst = tmp_path / 'out' / 'w12.pth'
    tool = Path(__file__).resolve().parents[1] / 'tools' / 'convert_checkpoint.py'
    run = subprocess.run([sys.executable, str(tool), str(src), str(dst), '--window-size', '12'],
                         capture_output=True, text=True, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert 'format: timm' in run.stdout and 'window 7 -> 12' in run.stdout
    sd = read_checkpoint(dst)['state_dict']
    assert sd['stages.0.blocks.0.attn.w_msa.relative_position_bias_table'].shape == (529, 1)
    sys.path.insert(0, str(tool.parent))
    try:
        import convert_checkpoint as cli
    finally:
        sys.path.remove(str(tool.parent))
    assert cli.main([str(tmp_path / 'none.pth'), str(dst)]) == 1
    assert 'none.pth' in capsys.readouterr().err


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


# ----------------------------------------------------------------------------- real projects
def _mmdet_swin():
    pytest.importorskip('mmdet')
    from mmdet.models.backbones.swin import SwinTransformer, swin_converter
    return SwinTransformer, swin_converter


def _randomise(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith('relative_position_bias_table'):
                p.copy_(0.5 * noise)
            elif p.dim() >= 2:  # linear / conv weights, fan-in scaled
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith('weight'):  # norms
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def test_mmdet_detector_file(tmp_path, image):
    SwinTransformer, _ = _mmdet_swin()
    src = SwinTransformer(**SMALL, window_size=7, drop_path_rate=0.0)
    src.eval()  # (mmdet's train() returns None)
    _randomise(src)
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
    _randomise(src, seed=4)
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


# ------------------------------------------------ files written by the REAL timm / torchvision
# CI cannot install timm / torchvision beside its torch, so tests/fixtures/ ships tiny models
# saved by the real libraries, with the features those libraries computed (NHWC, no norm), made
# by tests/fixtures/make_fixtures.py (see its docstring: geometry, versions, how to regenerate).
FIXTURES = Path(__file__).resolve().parent / 'fixtures'


def _import_or_skip(name):
    """``pytest.importorskip`` that also skips a broken install (torchvision's missing nms op)."""
    import importlib
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - ImportError, RuntimeError from C++ op registration
        pytest.skip(f'{name} not importable: {type(e).__name__}: {e}')


def _fixture(lib):
    """(input crop, reference dict) of ``tests/fixtures/{lib}_swin_ref.pt``."""
    ref = torch.load(FIXTURES / f'{lib}_swin_ref.pt', map_location='cpu', weights_only=True)
    image = torch.load(FIXTURES / 'input.pt', map_location='cpu', weights_only=True)['input']
    assert ref['meta']['library'] == lib and ref['meta']['layout'] == 'NHWC'
    h, w = ref['meta']['input_crop']
    return image[..., :h, :w], ref


def _fixture_window(meta):
    window = meta['kwargs']['window_size']
    return window if isinstance(window, int) else window[0]


def _fixture_model(path, meta):
    """SwinBackbone shaped like the fixture's model, loaded through init_cfg + init_weights()."""
    kw = meta['kwargs']
    return small_model(path, embed_dims=kw['embed_dim'], depths=tuple(kw['depths']),
                       num_heads=tuple(kw['num_heads']), window_size=_fixture_window(meta))


def _comparable_stages(meta):
    """Stages whose windowing the library did exactly as SwinBackbone (mmdet / mmseg) does.

    SwinBackbone always uses the full window and shifts every odd block by window // 2, padding
    bottom/right BEFORE the roll. timm / torchvision drop the shift where the (padded) map is
    not larger than the window, timm also clamps the window to the map, and timm rolls before
    padding (README, "Behaviour choices"). ``meta['stages']`` records what the library applied.
    """
    window = _fixture_window(meta)
    keep = []
    for i, st in enumerate(meta['stages']):
        ours = [[0, 0] if j % 2 == 0 else [window // 2] * 2 for j in range(len(st['shifts']))]
        same = st['shifts'] == ours and all(w == [window, window] for w in st['windows'])
        shifted = any(any(s) for s in st['shifts'])
        padded = any(side % window for side in st['map_hw'])
        if shifted and padded and not meta['pad_before_roll']:
            same = False
        if same:
            keep.append(i)
    return keep


def _outputs_and_stage_outputs(model, x):
    """Our outputs (after norm{i}) and the stage outputs BEFORE norm{i}, NCHW, in one forward.

    timm / torchvision have no per-output norms; the loader sets ours to weight 1, bias 0, which
    still normalises, so the raw stage outputs are taken from norm{i}'s input.
    """
    raw = {}
    hooks = [getattr(model, f'norm{i}').register_forward_pre_hook(
        lambda module, args, i=i: raw.__setitem__(i, args[0])) for i in model.out_indices]
    try:
        outs = features(model, x)
    finally:
        for hook in hooks:
            hook.remove()
    pre = [raw[i].reshape(o.shape[0], o.shape[2], o.shape[3], o.shape[1]).permute(0, 3, 1, 2)
           for i, o in zip(model.out_indices, outs)]
    return outs, pre


def _check_against_fixture(model, x, ref, compared):
    """Compared stages to <= TOL (raw and normalised); the others only load, right shapes."""
    outs, pre = _outputs_and_stage_outputs(model, x)
    refs = [r.permute(0, 3, 1, 2) for r in ref['outputs']]  # the libraries' NHWC -> NCHW
    assert [tuple(o.shape) for o in outs] == [tuple(r.shape) for r in refs]
    for i in range(len(model.out_indices)):
        norm = getattr(model, f'norm{i}')
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
        assert torch.isfinite(outs[i]).all()
    assert_close([pre[i] for i in compared], [refs[i] for i in compared])
    normed = [F.layer_norm(r.permute(0, 2, 3, 1), (r.shape[1],)).permute(0, 3, 1, 2) for r in refs]
    assert_close([outs[i] for i in compared], [normed[i] for i in compared])
    return outs, pre


def test_real_timm_file():
    """timm 1.0 file (``torch.save(model.state_dict())`` and safetensors) vs timm's own features.

    Stages 0-1 shift on 16 x 16 / 8 x 8 maps (window 4), stage 2 (map = window) has one
    unshifted block: compared. Stage 3 (map 2) is where timm clamps the window to 2 (and its
    3 x 3 table is resized to our window 4): it has to load, not to match.
    """
    x, ref = _fixture('timm')
    meta = ref['meta']
    compared = _comparable_stages(meta)
    assert compared == [0, 1, 2]
    assert meta['stages'][3]['windows'] == [[2, 2]]  # timm's clamp: why stage 3 is not compared

    pth, st = FIXTURES / 'timm_swin.pth', FIXTURES / 'timm_swin.safetensors'
    assert detect_format(read_checkpoint(pth)) == 'timm'
    assert detect_format(read_checkpoint(st)) == 'timm'
    outs, pre = _check_against_fixture(_fixture_model(pth, meta), x, ref, compared)
    outs_st, pre_st = _check_against_fixture(_fixture_model(st, meta), x, ref, compared)
    assert all(torch.equal(a, b) for a, b in zip([*outs, *pre], [*outs_st, *pre_st]))

    report = load_pretrained(_fixture_model(None, meta), st)
    assert report.format == 'timm' and not report.mismatched and not report.unexpected
    assert sorted(report.expected_missing) == sorted(f'norm{i}.{p}' for i in range(4)
                                                     for p in ('weight', 'bias'))
    assert list(report.resized) == ['stages.3.blocks.0.attn.w_msa.relative_position_bias_table']
    assert {'head.fc.weight', 'head.fc.bias', 'norm.weight', 'norm.bias'} <= set(report.unused)


def test_real_torchvision_file():
    """torchvision file vs torchvision's own ``model.features`` stage outputs, all four stages.

    The 52 x 52 input gives maps 13, 7, 4, 2: stages 0, 1 and 3 pad bottom/right to the window
    (torchvision pads before rolling, as we do) and 13 -> 7 -> 4 merge odd maps; stages 0-1
    shift, stages 2-3 have one unshifted block each (torchvision pads map 2 up to the window
    rather than clamping it).
    """
    x, ref = _fixture('torchvision')
    meta = ref['meta']
    compared = _comparable_stages(meta)
    assert compared == [0, 1, 2, 3]
    padded = [i for i, st in enumerate(meta['stages'])
              if any(side % _fixture_window(meta) for side in st['map_hw'])]
    assert padded == [0, 1, 3]

    path = FIXTURES / 'torchvision_swin.pth'
    assert detect_format(read_checkpoint(path)) == 'torchvision'
    _check_against_fixture(_fixture_model(path, meta), x, ref, compared)
    report = load_pretrained(_fixture_model(None, meta), path)
    assert report.format == 'torchvision' and not report.mismatched and not report.resized
    assert any(k.endswith('relative_position_index') for k in report.unused)


@pytest.mark.parametrize('lib', ['timm', 'torchvision'])
def test_real_library_file_detects_unconverted_patch_merging(lib, monkeypatch):
    """The fixture comparison is sharp: skipping the PatchMerging channel reorder is caught."""
    x, ref = _fixture(lib)
    monkeypatch.setattr(ckpt_mod, 'official_to_unfold_reduction', lambda w: w)
    monkeypatch.setattr(ckpt_mod, 'official_to_unfold_norm', lambda v: v)
    _, pre = _outputs_and_stage_outputs(_fixture_model(FIXTURES / f'{lib}_swin.pth', ref['meta']),
                                        x)
    refs = [r.permute(0, 3, 1, 2) for r in ref['outputs']]
    assert_close(pre[:1], refs[:1])  # stage 0 comes before any merging
    assert max_diff(pre[1:3], refs[1:3]) > 1.0


def _make_fixtures_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location('make_fixtures', FIXTURES / 'make_fixtures.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('lib', ['timm', 'torchvision'])
def test_installed_library_reproduces_fixture(lib):
    """Live path (skips without the library): the installed timm / torchvision still loads the
    shipped weights strictly and computes the shipped reference features."""
    _import_or_skip(lib)
    make = _make_fixtures_module()
    _, ref = _fixture(lib)
    build, reference = ((make.build_timm, make.timm_reference) if lib == 'timm'
                        else (make.build_torchvision, make.torchvision_reference))
    model = build()
    model.load_state_dict(torch.load(FIXTURES / f'{lib}_swin.pth', weights_only=True))
    image = torch.load(FIXTURES / 'input.pt', weights_only=True)['input']
    live = reference(model.eval(), image)
    assert live['meta']['input_crop'] == ref['meta']['input_crop']
    assert live['meta']['stages'] == ref['meta']['stages']
    assert_close(live['outputs'], ref['outputs'])


def test_report_is_a_dataclass_with_readable_text(official):
    _, report = convert_state_dict({'model': official}, small_model(), source='x.pth')
    assert isinstance(report, LoadReport)
    text = str(report)
    assert text.splitlines()[0] == 'SwinBackbone weights from x.pth'
    assert 'buffer' in text and 'x layers.*.blocks.*.attn.relative_position_index' in text


def test_a_url_is_refused_not_downloaded():
    from swin_dense.checkpoint import read_checkpoint
    with pytest.raises(ValueError, match='never downloads'):
        read_checkpoint('https://example.invalid/swin_tiny_patch4_window7_224.pth')
