"""RetinaNet, Mask2Former and DINO configs against the toolkits' reference configs.

Each config here must resolve to the reference config shipped in the mmdet 3.3.0 / mmseg 1.2.2
wheel, every key but the backbone's type, where its weights come from (the checkpoint and the
variable holding it) and the import that registers SwinBackbone. The backbone built from ours must
have the reference backbone's parameters (names and count), so that the per-parameter optimizer
rules of the reference (learning-rate and decay multipliers matched on parameter names, no decay
on norm layers) give every parameter the same learning rate and weight decay.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch.nn as nn

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')
from mmengine.config import Config  # noqa: E402

import swin_dense  # noqa: E402,F401  (registers SwinBackbone)
from config_parity import flatten  # noqa: E402
from toolkits import BackboneHolder, toolkit_models  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / 'configs'
TOOLKIT_CONFIGS = {
    name: Path(__import__(name).__file__).parent / '.mim' / 'configs' for name in ('mmdet', 'mmseg')
}

# ours -> (toolkit, reference config, the variable naming the backbone's weights)
PAIRS = {
    'retinanet/swin_t_coco.py':
        ('mmdet', 'swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py', 'pretrained'),
    'mask2former/swin_t_coco.py':
        ('mmdet', 'mask2former/mask2former_swin-t-p4-w7-224_8xb2-lsj-50e_coco.py', 'pretrained'),
    'mask2former/swin_s_coco.py':
        ('mmdet', 'mask2former/mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco.py', 'pretrained'),
    'mask2former/swin_t_coco_panoptic.py':
        ('mmdet', 'mask2former/mask2former_swin-t-p4-w7-224_8xb2-lsj-50e_coco-panoptic.py',
         'pretrained'),
    'mask2former/swin_l_coco_panoptic.py':
        ('mmdet',
         'mask2former/mask2former_swin-l-p4-w12-384-in21k_16xb1-lsj-100e_coco-panoptic.py',
         'pretrained'),
    'dino/swin_l_coco.py':
        ('mmdet', 'dino/dino-5scale_swin-l_8xb2-12e_coco.py', 'pretrained'),
    'mask2former/swin_t_ade20k.py':
        ('mmseg', 'mask2former/mask2former_swin-t_8xb2-160k_ade20k-512x512.py', 'pretrained'),
}
# What the published models are (Swin paper and the toolkits' model zoos), read off our configs
# independently of the reference: embed_dims, depths, num_heads, window, pretraining image size,
# drop path, outputs, gradient checkpointing, weights file.
ARCH = {
    'retinanet/swin_t_coco.py':
        (96, [2, 2, 6, 2], [3, 6, 12, 24], 7, 224, 0.2, (1, 2, 3), False,
         'swin_tiny_patch4_window7_224.pth'),
    'mask2former/swin_t_coco.py':
        (96, [2, 2, 6, 2], [3, 6, 12, 24], 7, 224, 0.3, (0, 1, 2, 3), False,
         'swin_tiny_patch4_window7_224.pth'),
    'mask2former/swin_s_coco.py':
        (96, [2, 2, 18, 2], [3, 6, 12, 24], 7, 224, 0.3, (0, 1, 2, 3), False,
         'swin_small_patch4_window7_224.pth'),
    'mask2former/swin_t_coco_panoptic.py':
        (96, [2, 2, 6, 2], [3, 6, 12, 24], 7, 224, 0.3, (0, 1, 2, 3), False,
         'swin_tiny_patch4_window7_224.pth'),
    'mask2former/swin_l_coco_panoptic.py':
        (192, [2, 2, 18, 2], [6, 12, 24, 48], 12, 384, 0.3, (0, 1, 2, 3), False,
         'swin_large_patch4_window12_384_22k.pth'),
    'dino/swin_l_coco.py':
        (192, [2, 2, 18, 2], [6, 12, 24, 48], 12, 384, 0.2, (0, 1, 2, 3), True,
         'swin_large_patch4_window12_384_22k.pth'),
    'mask2former/swin_t_ade20k.py':
        (96, [2, 2, 6, 2], [3, 6, 12, 24], 7, 224, 0.3, (0, 1, 2, 3), False,
         'swin_tiny_patch4_window7_224.pth'),
}
OFFICIAL = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/'
ALLOWED = {'model.backbone.type', 'model.backbone.init_cfg.checkpoint'}
NAMES = sorted(PAIRS)


def _load(name: str) -> tuple[dict, dict]:
    toolkit, ref, _ = PAIRS[name]
    return (Config.fromfile(str(CONFIGS / name)).to_dict(),
            Config.fromfile(str(TOOLKIT_CONFIGS[toolkit] / ref)).to_dict())


@pytest.fixture(scope='module')
def loaded():
    return {name: _load(name) for name in NAMES}


def _imports(cfg: dict) -> list:
    imports = cfg.get('custom_imports', {}).get('imports', [])
    return [imports] if isinstance(imports, str) else list(imports)


@pytest.mark.parametrize('name', NAMES)
def test_every_resolved_key_equals_the_reference(loaded, name):
    ours, ref = (dict(c) for c in loaded[name])
    _, _, weights_var = PAIRS[name]
    # the reference's imports (mmseg's Mask2Former imports mmdet's models), then ours
    assert _imports(ours) == _imports(ref) + ['swin_dense']
    assert ours.pop('custom_imports')['allow_failed_imports'] is False
    ref.pop('custom_imports', None)
    a, a_scopes = flatten(ours)
    b, b_scopes = flatten(ref)
    assert set(a_scopes.values()) <= {ref['default_scope']}  # the scope ours runs in anyway
    assert b_scopes == {}
    assert set(a) == set(b), (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    differing = {k for k in a if a[k] != b[k] or type(a[k]) is not type(b[k])}
    assert differing == ALLOWED | {weights_var}, \
        {k: (a[k], b[k]) for k in differing - ALLOWED - {weights_var}}
    assert (a['model.backbone.type'], b['model.backbone.type']) == \
        ('SwinBackbone', 'SwinTransformer')


@pytest.mark.parametrize('name', NAMES)
def test_weights_are_a_local_copy_of_the_references(loaded, name):
    ours, ref = loaded[name]
    toolkit, _, weights_var = PAIRS[name]
    checkpoint = ours['model']['backbone']['init_cfg']['checkpoint']
    assert ours['model']['backbone']['init_cfg']['type'] == 'Pretrained'
    assert checkpoint == ours[weights_var]  # no stale URL left in the dumped config
    assert checkpoint == 'checkpoints/' + ARCH[name][-1]  # local: nothing downloads
    ref_url = ref['model']['backbone']['init_cfg']['checkpoint']
    assert ref_url == ref[weights_var]
    if toolkit == 'mmdet':  # the official file itself
        assert ref_url == OFFICIAL + ARCH[name][-1]
    else:  # the same weights converted to mmseg's layout by OpenMMLab (dated, hashed name)
        stem = ARCH[name][-1][:-len('.pth')]
        assert re.fullmatch(re.escape(stem) + r'_\d{8}-[0-9a-f]{8}\.pth',
                            os.path.basename(ref_url)), ref_url


@pytest.mark.parametrize('name', NAMES)
def test_architecture_is_the_published_one(loaded, name):
    ours, _ = loaded[name]
    embed, depths, heads, window, pretrain, dpr, outs, with_cp, _ = ARCH[name]
    bb = ours['model']['backbone']
    assert (bb['embed_dims'], list(bb['depths']), list(bb['num_heads'])) == \
        (embed, depths, heads)
    assert (bb['window_size'], bb.get('pretrain_img_size', 224)) == (window, pretrain)
    assert (bb['drop_path_rate'], tuple(bb['out_indices']), bb['with_cp']) == \
        (dpr, outs, with_cp)
    assert not bb.get('use_abs_pos_embed', False)
    widths = [embed * 2 ** i for i in outs]
    model = ours['model']
    reader = (model.get('neck') or model.get('panoptic_head') or model['decode_head'])
    assert list(reader['in_channels']) == widths


def _per_parameter_settings(model: nn.Module, optim_wrapper: dict) -> dict:
    """``{name: (lr, weight_decay)}`` as the config's optimizer wrapper constructor sets them."""
    from mmengine.optim import build_optim_wrapper
    cfg = dict(optim_wrapper, type='OptimWrapper')  # the rules, not the precision
    optimizer = build_optim_wrapper(model, cfg).optimizer
    name_of = {id(p): n for n, p in model.named_parameters()}
    settings = {}
    for group in optimizer.param_groups:
        for p in group['params']:
            settings[name_of[id(p)]] = (group['lr'], group['weight_decay'])
    return settings


@pytest.mark.parametrize('name', NAMES)
def test_backbone_has_the_reference_parameters_and_optimizer_settings(loaded, name):
    ours, ref = loaded[name]
    models = toolkit_models(PAIRS[name][0], set_default_scope=False)
    built = {}
    for key, cfg in (('ours', ours), ('ref', ref)):
        backbone = models.build(dict(cfg['model']['backbone'], init_cfg=None))  # no weights read
        built[key] = BackboneHolder(backbone)
    assert type(built['ours'].backbone).__name__ == 'SwinBackbone'
    shapes = {key: {n: tuple(p.shape) for n, p in m.named_parameters()}
              for key, m in built.items()}
    assert shapes['ours'] == shapes['ref']  # same names, same shapes, so the same count
    ours_settings = _per_parameter_settings(built['ours'], ours['optim_wrapper'])
    ref_settings = _per_parameter_settings(built['ref'], ref['optim_wrapper'])
    assert ours_settings.keys() == ref_settings.keys()
    for param, (lr, decay) in ours_settings.items():
        assert (lr, decay) == pytest.approx(ref_settings[param], rel=1e-12), param
    # the reference's rules took effect on our parameter names
    custom_keys = ours['optim_wrapper'].get('paramwise_cfg', {}).get('custom_keys', {})
    base_lr = ours['optim_wrapper']['optimizer']['lr']
    if 'backbone' in custom_keys:  # Mask2Former, DINO: the backbone learns 10x slower
        lr_mult = custom_keys['backbone']['lr_mult']
        assert all(lr == pytest.approx(base_lr * lr_mult) for lr, _ in ours_settings.values())
    if 'relative_position_bias_table' in custom_keys:  # Mask2Former: no decay on these, norms
        assert all(ours_settings[n][1] == 0 for n in ours_settings
                   if 'relative_position_bias_table' in n or '.norm' in n)


def test_retinanet_backbone_parameters_all_reach_the_loss():
    """RetinaNet's FPN reads stages 2-4 (out_indices=(1, 2, 3), start_level=0): every backbone
    parameter that trains must get a gradient, or distributed training stops on unused
    parameters. (A norm on a stage output that FPN skips would be one; none is built.)"""
    import torch

    cfg = Config.fromfile(str(CONFIGS / 'retinanet' / 'swin_t_coco.py'))
    models = toolkit_models('mmdet', set_default_scope=False)
    torch.manual_seed(0)
    backbone = models.build(dict(cfg.model.backbone, init_cfg=None))
    neck = models.build(cfg.model.neck)
    outs = neck(backbone(torch.randn(1, 3, 64, 64)))
    assert len(outs) == cfg.model.neck.num_outs
    sum(out.mean() for out in outs).backward()
    trained = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert trained and [n for n in trained if backbone.get_parameter(n).grad is None] == []
    assert not any(n.startswith('norm0.') for n in trained)  # stage 1's output is not built
