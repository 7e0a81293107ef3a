"""The reference the checkpoint tests compare with, written without ``swin_dense.checkpoint``.

``ref_forward`` is a small Swin forward written from the official code (``layers.i.blocks.j``,
``attn.qkv``, ``mlp.fc1``, official PatchMerging concat order ``[x(0::2,0::2), x(1::2,0::2),
x(0::2,1::2), x(1::2,1::2)]``, official relative-position index formula) with the dense-prediction
windowing of the official detection code (pad bottom/right, always shift, mask on the padded
grid). Each source layout is derived here from a random official state dict (or, for whole
models, from our own state dict) by that project's own layout rules, independently of
``swin_dense.checkpoint``. The pytest fixtures ``image``, ``official`` and ``reference`` are
imported by the test modules that use them.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from swin_dense import SwinBackbone
from swin_peers import randomize

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


def to_official_order(t: torch.Tensor, axis: int) -> torch.Tensor:
    """The inverse of :func:`to_unfold_order`: official[k*C + c] = unfold[c*4 + u(k)]."""
    n = t.shape[axis]
    C = n // 4
    u_of_k = {k: u for u, k in _K_OF_U.items()}
    index = torch.tensor([c * 4 + u_of_k[k] for k in range(4) for c in range(C)])
    return t.index_select(axis, index)


def native_to_official_det(state, window: int, prefix: str = 'backbone.'):
    """A whole model's state dict with its backbone in the official detection / segmentation
    repositories' layout: ``layers.i``, ``attn.qkv``, ``mlp.fc1``, ``patch_embed.proj``,
    PatchMerging in the official concat order, the persistent ``relative_position_index``
    buffers of their attention, per-output ``norm{i}`` as they are. Other keys are unchanged."""
    out = OrderedDict()
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        k = key[len(prefix):]
        k = k.replace('patch_embed.projection.', 'patch_embed.proj.')
        k = re.sub(r'^stages\.', 'layers.', k)
        k = k.replace('.attn.w_msa.', '.attn.').replace('.ffn.layers.0.0.', '.mlp.fc1.')
        k = k.replace('.ffn.layers.1.', '.mlp.fc2.')
        if '.downsample.' in k:
            value = to_official_order(value, 1 if k.endswith('reduction.weight') else 0)
        out[prefix + k] = value
        if k.endswith('attn.relative_position_bias_table'):
            out[prefix + k.replace('relative_position_bias_table',
                                   'relative_position_index')] = _rel_index(window)
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


def randomise(module, seed=0):
    """Seeded random weights at the scales of a trained model (norms near 1, fan-in scaled
    matrices), so that a wrongly loaded tensor shows in the outputs."""
    return randomize(module, seed, gain_std=0.2, table_std=0.5)


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
