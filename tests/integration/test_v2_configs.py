"""The Swin V2 configs against their V1 counterparts, and the V2 demos against the V1 demos.

No Swin V2 detection or segmentation recipe was ever published, so each V2 config is the V1
config of the same method with a listed set of changes: the backbone (type, windows, pretrained
windows, the V1 arguments V2 has no use for), the weights file, and two no-decay keys for V2's
own parameters. Every resolved key is compared; a change that is not listed, or a listed change
that did not happen, fails. The demos may change the backbone only.

Once ``SwinV2Backbone`` is registered, the backbones are built from the configs (windows, widths
the neck reads, parameter count, weight-decay rules on our parameter names), and each detector /
segmentor is built at a reduced width and depth (windows as configured) and takes one training
step on a tiny synthetic batch; the demo models are built as configured. The full-size step is in tests/e2e/test_zoo_one_iteration.py and
a few demo iterations through tools/train.py in tests/e2e/test_v2_demos.py (both slow).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')
from mmengine.config import Config  # noqa: E402

import swin_dense  # noqa: E402
from config_parity import flatten  # noqa: E402
from toolkits import BackboneHolder, toolkit_models  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / 'configs'
OFFICIAL_V2 = 'https://github.com/SwinTransformer/storage/releases/download/v2.0.0/'

_UPERNET_DROPPED = ('pretrain_img_size', 'use_abs_pos_embed', 'strides', 'qk_scale')
# ours -> (V1 counterpart, the variable naming the weights, V1 backbone arguments V2 drops,
#          embed_dims, depths, num_heads, windows, pretrained windows, drop path, weights file)
V2 = {
    'mask_rcnn/swinv2_t_coco.py': (
        'mask_rcnn/swin_t_coco.py', 'pretrained', ('qk_scale', 'convert_weights'),
        96, [2, 2, 6, 2], [3, 6, 12, 24], [16, 16, 16, 8], [16, 16, 16, 8], 0.2,
        'swinv2_tiny_patch4_window16_256.pth'),
    'upernet/swinv2_b_ade20k.py': (
        'upernet/swin_b_ade20k_in22k.py', 'checkpoint_file', _UPERNET_DROPPED,
        128, [2, 2, 18, 2], [4, 8, 16, 32], [16, 16, 16, 8], [12, 12, 12, 6], 0.3,
        'swinv2_base_patch4_window12to16_192to256_22kto1k_ft.pth'),
    'upernet/swinv2_b_ade20k_w24.py': (
        'upernet/swin_b_ade20k_in22k.py', 'checkpoint_file', _UPERNET_DROPPED,
        128, [2, 2, 18, 2], [4, 8, 16, 32], [24, 24, 24, 12], [12, 12, 12, 6], 0.3,
        'swinv2_base_patch4_window12to24_192to384_22kto1k_ft.pth'),
}
NAMES = sorted(V2)
# The parameters the official Swin V2 model names as exempt from weight decay
# (no_weight_decay_keywords), as they are named in SwinV2Backbone.
V2_NO_DECAY = ('cpb_mlp', 'logit_scale')
V1_NO_DECAY = ('absolute_pos_embed', 'relative_position_bias_table', 'norm')
# V2 demo -> (V1 demo, top-level keys it may set besides the backbone)
DEMOS = {
    'mask_rcnn/swinv2_t_demo.py': ('mask_rcnn/swin_t_demo.py', set()),
    'upernet/swinv2_t_demo.py': ('upernet/swin_t_demo.py', {'work_dir'}),
}


def _load(name: str) -> dict:
    return Config.fromfile(str(CONFIGS / name)).to_dict()


@pytest.fixture(scope='module')
def loaded():
    names = set(V2) | {v[0] for v in V2.values()} | set(DEMOS) | {v[0] for v in DEMOS.values()}
    return {name: _load(name) for name in names}


def _field(key: str) -> str:
    """A flattened key without list indices: 'model.backbone.window_size[2]' -> its argument."""
    return re.sub(r'\[\d+\]', '', key)


def _differences(ours: dict, theirs: dict) -> tuple[set, set, set]:
    """(fields only in ours, fields only in theirs, fields in both with another value)."""
    a, _ = flatten(ours)
    b, _ = flatten(theirs)
    changed = {_field(k) for k in set(a) & set(b)
               if a[k] != b[k] or type(a[k]) is not type(b[k])}
    return {_field(k) for k in set(a) - set(b)}, {_field(k) for k in set(b) - set(a)}, changed


def _reader_widths(model: dict) -> list:
    """The input widths of what reads the backbone: FPN's, or UperNet's decode head's."""
    return list((model.get('neck') or model['decode_head'])['in_channels'])


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize('name', NAMES)
def test_differs_from_its_v1_config_only_where_listed(loaded, name):
    v1_name, weights_var, dropped = V2[name][:3]
    ours, v1 = loaded[name], loaded[v1_name]
    only_ours, only_v1, changed = _differences(ours, v1)
    window = 'model.backbone.window_size'  # an int in V1, one per stage here
    assert only_v1 == {f'model.backbone.{arg}' for arg in dropped} | {window}
    assert only_ours == {window, 'model.backbone.pretrained_window_sizes'} | {
        f'optim_wrapper.paramwise_cfg.custom_keys.{key}.decay_mult' for key in V2_NO_DECAY}
    assert changed == {weights_var, 'model.backbone.type', 'model.backbone.init_cfg.checkpoint'}
    assert (ours['model']['backbone']['type'], v1['model']['backbone']['type']) == \
        ('SwinV2Backbone', 'SwinBackbone')


@pytest.mark.parametrize('name', NAMES)
def test_published_weights_windows_and_recipe(loaded, name):
    """What the docstrings state, read off the resolved config."""
    cfg = loaded[name]
    _, weights_var, _, embed, depths, heads, windows, pretrained, dpr, weights = V2[name]
    bb = cfg['model']['backbone']
    assert (bb['embed_dims'], list(bb['depths']), list(bb['num_heads'])) == (embed, depths, heads)
    assert list(bb['window_size']) == windows
    assert list(bb['pretrained_window_sizes']) == pretrained
    assert bb['drop_path_rate'] == dpr and tuple(bb['out_indices']) == (0, 1, 2, 3)
    # a local copy of the official file: nothing downloads
    checkpoint = bb['init_cfg']['checkpoint']
    assert bb['init_cfg']['type'] == 'Pretrained'
    assert checkpoint == cfg[weights_var] == 'checkpoints/' + weights
    assert '://' not in checkpoint and not os.path.isabs(checkpoint)
    # the file was trained at the windows configured here (stage 4 at half the window: its map
    # at the training size) and names the pretraining window the table is normalised by
    match = re.fullmatch(r'swinv2_(tiny|base)_patch4_window(\d+)(?:to(\d+))?_(?:\d+to)?(\d+)'
                         r'(?:_22kto1k_ft)?\.pth', weights)
    assert match, weights
    first, second = int(match[2]), match[3]
    trained = int(second) if second else first
    assert windows == [trained] * 3 + [trained // 2]
    assert pretrained == [first] * 3 + [first // 2]
    # the config names where the official file is published
    assert OFFICIAL_V2 + weights in (CONFIGS / name).read_text()


@pytest.mark.parametrize('name', NAMES)
def test_weight_decay_is_v1s_plus_v2s_no_decay_keys(loaded, name):
    cfg, v1 = loaded[name], loaded[V2[name][0]]
    keys = cfg['optim_wrapper']['paramwise_cfg']['custom_keys']
    assert set(keys) == set(V1_NO_DECAY) | set(V2_NO_DECAY)
    assert all(rule == {'decay_mult': 0.} for rule in keys.values())
    assert cfg['optim_wrapper']['optimizer'] == v1['optim_wrapper']['optimizer']


@pytest.mark.parametrize('name', NAMES)
def test_the_neck_reads_the_backbone_widths(loaded, name):
    model = loaded[name]['model']
    bb = model['backbone']
    widths = [bb['embed_dims'] * 2 ** i for i in bb['out_indices']]
    assert _reader_widths(model) == widths
    if 'auxiliary_head' in model:  # UperNet's FCN head reads stage 3
        assert model['auxiliary_head']['in_channels'] == widths[model['auxiliary_head']['in_index']]


@pytest.mark.parametrize('demo', sorted(DEMOS))
def test_demo_changes_only_the_backbone(loaded, demo):
    v1_demo, extra = DEMOS[demo]
    only_ours, only_v1, changed = _differences(loaded[demo], loaded[v1_demo])
    touched = only_ours | only_v1 | changed
    assert {f for f in touched if not f.startswith('model.backbone.')} == extra
    bb = loaded[demo]['model']['backbone']
    assert bb['type'] == 'SwinV2Backbone' and bb['arch'] == 'tiny' and bb['init_cfg'] is None
    assert 'work_dir' not in extra or loaded[demo]['work_dir'] != loaded[v1_demo]['work_dir']
    # the window tiles the demo images' first two token maps (stride 4 and 8)
    size = loaded[demo]['demo_data']['image_size']
    assert size // 4 % bb['window_size'] == 0 and size // 8 % bb['window_size'] == 0


# ----------------------------------------------------------------------------- built
needs_v2 = pytest.mark.skipif(not hasattr(swin_dense, 'SwinV2Backbone'),
                              reason='SwinV2Backbone is not in swin_dense yet')


@needs_v2
@pytest.mark.parametrize('name', NAMES)
def test_backbone_builds_with_the_configured_windows_and_widths(loaded, name):
    cfg = loaded[name]
    backbone = toolkit_models(cfg['default_scope']).build(
        dict(cfg['model']['backbone'], init_cfg=None))  # build only: no weights are read
    assert type(backbone).__name__ == 'SwinV2Backbone'
    bb = cfg['model']['backbone']
    assert list(backbone.window_sizes) == list(bb['window_size'])
    assert list(backbone.pretrained_window_sizes) == list(bb['pretrained_window_sizes'])
    assert list(backbone.out_channels) == _reader_widths(cfg['model'])
    # the published model sizes, classification head included: V2-T 28M, V2-B 88M
    millions = sum(p.numel() for p in backbone.parameters()) / 1e6
    assert abs(millions - (28 if bb['embed_dims'] == 96 else 88)) < 1.5, millions


@needs_v2
@pytest.mark.parametrize('name', NAMES)
def test_weight_decay_rules_reach_our_parameter_names(loaded, name):
    """V2's own parameters get no decay through the config's keys; q / v biases and weights keep
    the recipe's decay; norms get none (V1's rule)."""
    from mmengine.optim import build_optim_wrapper

    cfg = loaded[name]
    small = dict(cfg['model']['backbone'], init_cfg=None, depths=[2, 2, 2, 2])
    model = BackboneHolder(toolkit_models(cfg['default_scope']).build(small))
    optimizer = build_optim_wrapper(model, dict(cfg['optim_wrapper'], type='OptimWrapper')).optimizer
    name_of = {id(p): n for n, p in model.named_parameters()}
    decay = {name_of[id(p)]: group['weight_decay']
             for group in optimizer.param_groups for p in group['params']}
    base = cfg['optim_wrapper']['optimizer']['weight_decay']
    assert decay.keys() == dict(model.named_parameters()).keys()
    for kind in V2_NO_DECAY + ('q_bias', 'v_bias', 'qkv.weight', 'norm1.weight'):
        assert any(kind in n for n in decay), f'no parameter named *{kind}*'
    for param, value in decay.items():
        exempt = any(key in param for key in V2_NO_DECAY + V1_NO_DECAY)
        assert value == (0. if exempt else base), param


def _tiny_model_cfg(cfg: Config) -> None:
    """Width 32 and two blocks per stage (windows as configured), heads to match: a step in
    seconds on a CPU; no weights are read."""
    widths = [32, 64, 128, 256]
    cfg.model.backbone.update(embed_dims=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                              init_cfg=None)
    if 'neck' in cfg.model:
        cfg.model.neck.in_channels = widths
    else:
        cfg.model.decode_head.update(in_channels=widths, channels=32)
        cfg.model.auxiliary_head.update(in_channels=widths[2], channels=32)
        cfg.model.data_preprocessor.size = (64, 64)  # mmseg pads training crops to 512


def _batch(cfg: Config, size: int = 64) -> dict:
    if cfg.default_scope == 'mmdet':
        from mmdet.testing import demo_mm_inputs
        return demo_mm_inputs(2, image_shapes=[(3, size, size), (3, size - 8, size)],
                              num_items=[3, 2], with_mask=True,
                              num_classes=cfg.model.roi_head.bbox_head.num_classes)
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size)))
        labels = torch.randint(0, cfg.model.decode_head.num_classes, (1, size, size),
                               generator=generator)
        sample.gt_sem_seg = PixelData(data=labels)
        samples.append(sample)
    images = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator)
              for _ in range(2)]
    return dict(inputs=images, data_samples=samples)


@needs_v2
@pytest.mark.parametrize('demo', sorted(DEMOS))
def test_demo_model_builds_with_a_v2_tiny_backbone(demo):
    """As configured (full size, from scratch); its iterations are in tests/e2e/test_v2_demos.py."""
    cfg = Config.fromfile(str(CONFIGS / demo))
    model = toolkit_models(cfg.default_scope).build(cfg.model)
    backbone = model.backbone
    assert type(backbone).__name__ == 'SwinV2Backbone'
    assert (backbone.embed_dims, tuple(backbone.depths)) == (96, (2, 2, 6, 2))
    assert set(backbone.window_sizes) == {cfg.model.backbone.window_size}
    assert list(backbone.out_channels) == _reader_widths(cfg.model)


@needs_v2
@pytest.mark.parametrize('name', NAMES)
def test_model_builds_and_takes_one_training_step(name):
    from mmengine.model import revert_sync_batchnorm
    from mmengine.optim import build_optim_wrapper

    cfg = Config.fromfile(str(CONFIGS / name))
    _tiny_model_cfg(cfg)
    torch.manual_seed(0)
    model = revert_sync_batchnorm(toolkit_models(cfg.default_scope).build(cfg.model))
    model.init_weights()
    assert type(model.backbone).__name__ == 'SwinV2Backbone'
    optim_wrapper = build_optim_wrapper(model, dict(cfg.optim_wrapper, type='OptimWrapper'))
    model.train()
    data = model.data_preprocessor(_batch(cfg), True)
    loss, log_vars = model.parse_losses(model(**data, mode='loss'))
    assert torch.isfinite(loss) and loss.item() > 0, log_vars
    optim_wrapper.backward(loss)
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == [], f'parameters without a gradient (DDP would stop): {unused[:10]}'
    probe = model.backbone.get_parameter('stages.0.blocks.0.attn.w_msa.logit_scale')
    before = probe.detach().clone()
    optim_wrapper.step()
    assert (probe.detach() - before).abs().max() > 0  # V2's own parameters are trained
