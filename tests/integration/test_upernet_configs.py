"""The UperNet configs against mmseg 1.2.2's reference configs, and the demo config's contract.

Each ``configs/upernet/swin_*_ade20k*.py`` must resolve to exactly the reference config shipped in
the mmseg wheel, every key but the backbone's type and where its weights come from, and build a
backbone with exactly as many parameters as mmseg's ``SwinTransformer`` from the reference dict.
The demo may change only data, crop, classes, schedule (and the weights source: from scratch).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

pytest.importorskip('mmseg')
from mmengine.config import Config  # noqa: E402

import swin_dense  # noqa: E402,F401  (registers SwinBackbone)
from swin_dense.demo_data import ADE_DEMO_CLASSES  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / 'configs' / 'upernet'
MMSEG_SWIN = Path(__import__('mmseg').__file__).parent / '.mim' / 'configs' / 'swin'

PAIRS = {
    'swin_t_ade20k.py':
        'swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
    'swin_s_ade20k.py':
        'swin-small-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
    'swin_b_ade20k.py':
        'swin-base-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
    'swin_b_ade20k_w12.py':
        'swin-base-patch4-window12-in1k-384x384-pre_upernet_8xb2-160k_ade20k-512x512.py',
    'swin_b_ade20k_in22k.py':
        'swin-base-patch4-window7-in22k-pre_upernet_8xb2-160k_ade20k-512x512.py',
    'swin_b_ade20k_w12_in22k.py':
        'swin-base-patch4-window12-in22k-384x384-pre_upernet_8xb2-160k_ade20k-512x512.py',
    'swin_l_ade20k_in22k.py':
        'swin-large-patch4-window7-in22k-pre_upernet_8xb2-160k_ade20k-512x512.py',
    'swin_l_ade20k_w12_in22k.py':
        'swin-large-patch4-window12-in22k-384x384-pre_upernet_8xb2-160k_ade20k-512x512.py',
}
EXPECTED_ARCH = {  # embed_dims, depths, num_heads, window_size, pretrain_img_size
    'swin_t_ade20k.py': (96, [2, 2, 6, 2], [3, 6, 12, 24], 7, 224),
    'swin_s_ade20k.py': (96, [2, 2, 18, 2], [3, 6, 12, 24], 7, 224),
    'swin_b_ade20k.py': (128, [2, 2, 18, 2], [4, 8, 16, 32], 7, 224),
    'swin_b_ade20k_w12.py': (128, [2, 2, 18, 2], [4, 8, 16, 32], 12, 384),
    'swin_b_ade20k_in22k.py': (128, [2, 2, 18, 2], [4, 8, 16, 32], 7, 224),
    'swin_b_ade20k_w12_in22k.py': (128, [2, 2, 18, 2], [4, 8, 16, 32], 12, 384),
    'swin_l_ade20k_in22k.py': (192, [2, 2, 18, 2], [6, 12, 24, 48], 7, 224),
    'swin_l_ade20k_w12_in22k.py': (192, [2, 2, 18, 2], [6, 12, 24, 48], 12, 384),
}
# Top-level entries that name where weights come from or what to import, nothing else.
WEIGHT_KEYS = ('checkpoint_file', 'pretrained', 'custom_imports')


def _load(path: Path) -> dict:
    return Config.fromfile(str(path)).to_dict()


def _drop_mmseg_scope(obj):
    """Remove the ``_scope_='mmseg'`` that inheriting through ``mmseg::`` stamps on every typed
    dict: it names the registry that ``default_scope='mmseg'`` selects anyway."""
    if isinstance(obj, dict):
        return {k: _drop_mmseg_scope(v) for k, v in obj.items()
                if not (k == '_scope_' and v == 'mmseg')}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_drop_mmseg_scope(v) for v in obj)
    return obj


def _strip_weights(cfg: dict) -> dict:
    assert cfg['default_scope'] == 'mmseg'
    cfg = _drop_mmseg_scope(copy.deepcopy(cfg))
    for key in WEIGHT_KEYS:
        cfg.pop(key, None)
    cfg['model'].pop('pretrained', None)
    cfg['model']['backbone'].pop('type')
    cfg['model']['backbone'].pop('init_cfg', None)
    return cfg


def _diff(a, b, path=''):
    """Paths where two nested structures differ (for a readable failure message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f'{path}.{k}: only in {"ours" if k in a else "reference"}')
            else:
                out += _diff(a[k], b[k], f'{path}.{k}')
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b) \
            and type(a) is type(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f'{path}[{i}]')]
    return [] if (a == b and type(a) is type(b)) else [f'{path}: {a!r} != {b!r}']


@pytest.fixture(scope='module')
def loaded():
    return {name: (_load(CONFIGS / name), _load(MMSEG_SWIN / ref)) for name, ref in PAIRS.items()}


@pytest.mark.parametrize('name', sorted(PAIRS))
def test_resolves_to_the_reference(loaded, name):
    ours, ref = loaded[name]
    assert ref['model']['backbone']['type'] == 'SwinTransformer'
    assert ours['model']['backbone']['type'] == 'SwinBackbone'
    assert ours['custom_imports'] == dict(imports=['swin_dense'], allow_failed_imports=False)
    differences = _diff(_strip_weights(ours), _strip_weights(ref))
    assert not differences, '\n'.join(differences)


@pytest.mark.parametrize('name', sorted(PAIRS))
def test_weights_come_from_a_local_file(loaded, name):
    ours, ref = loaded[name]
    init_cfg = ours['model']['backbone']['init_cfg']
    assert init_cfg['type'] == 'Pretrained'
    checkpoint = init_cfg['checkpoint']
    assert not checkpoint.startswith(('http://', 'https://')) and checkpoint.endswith('.pth')
    assert checkpoint.startswith('checkpoints/')
    assert ours['checkpoint_file'] == checkpoint  # no stale URL left in the dumped config
    assert ref['model']['backbone']['init_cfg']['checkpoint'].startswith('https://')
    embed_dims, depths, _, window, pretrain = EXPECTED_ARCH[name]
    size = {96: 'tiny' if depths[2] == 6 else 'small', 128: 'base', 192: 'large'}[embed_dims]
    pretraining = '_22k' if name.endswith('_in22k.py') else ''
    # the official file of this size, window, image size and pretraining data
    assert os.path.basename(checkpoint) == \
        f'swin_{size}_patch4_window{window}_{pretrain}{pretraining}.pth'
    # the reference reads the same weights, converted to mmseg's layout by OpenMMLab
    ref_file = os.path.basename(ref['model']['backbone']['init_cfg']['checkpoint'])
    assert ref_file.startswith(os.path.basename(checkpoint)[:-len('.pth')] + '_20')


@pytest.mark.parametrize('name', sorted(PAIRS))
def test_architecture_and_recipe(loaded, name):
    """What the issue promises, read off the resolved config (independently of the reference)."""
    cfg, _ = loaded[name]
    embed_dims, depths, heads, window, pretrain = EXPECTED_ARCH[name]
    bb = cfg['model']['backbone']
    assert (bb['embed_dims'], list(bb['depths']), list(bb['num_heads'])) == \
        (embed_dims, depths, heads)
    assert (bb['window_size'], bb['pretrain_img_size'], bb['drop_path_rate']) == \
        (window, pretrain, 0.3)
    assert bb['use_abs_pos_embed'] is False
    widths = [embed_dims * 2 ** i for i in range(4)]
    assert list(cfg['model']['decode_head']['in_channels']) == widths
    assert cfg['model']['auxiliary_head']['in_channels'] == widths[2]
    assert cfg['model']['decode_head']['num_classes'] == 150
    assert cfg['model']['decode_head']['norm_cfg']['type'] == 'SyncBN'
    opt = cfg['optim_wrapper']['optimizer']
    assert (opt['type'], opt['lr'], opt['weight_decay']) == ('AdamW', 6e-5, 0.01)
    assert cfg['train_cfg']['max_iters'] == 160000
    assert cfg['train_dataloader']['batch_size'] == 2
    assert cfg['train_dataloader']['dataset']['data_root'] == 'data/ade/ADEChallengeData2016'


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('name', sorted(PAIRS))
def test_backbone_parameter_count_equals_mmsegs(loaded, name):
    from mmengine.registry import MODELS as ROOT_MODELS
    from mmseg.models.backbones import SwinTransformer

    ours, ref = loaded[name]
    ours_cfg = dict(ours['model']['backbone'], init_cfg=None)
    ref_cfg = dict(ref['model']['backbone'], init_cfg=None)
    ref_cfg.pop('type')
    ours_model = ROOT_MODELS.build(ours_cfg)
    assert type(ours_model).__name__ == 'SwinBackbone'
    n_ours, n_ref = _count(ours_model), _count(SwinTransformer(**ref_cfg))
    assert n_ours == n_ref
    expected_millions = {96: (27, 29) if ours_cfg['depths'][2] == 6 else (48, 50),
                         128: (86, 88), 192: (194, 196)}[ours_cfg['embed_dims']]
    assert expected_millions[0] * 1e6 < n_ours < expected_millions[1] * 1e6


# --------------------------------------------------------------------------- demo


@pytest.fixture(scope='module')
def demo():
    return _load(CONFIGS / 'swin_t_demo.py'), _load(CONFIGS / 'swin_t_ade20k.py')


def test_demo_resolves_and_names_the_demo_data(demo):
    cfg, _ = demo
    assert cfg['demo_data']['kind'] == 'ade'
    root = cfg['demo_data']['root']
    assert not os.path.isabs(root)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dataset = cfg[loader]['dataset']
        assert dataset['data_root'] == root
        assert dataset['type'] == 'BaseSegDataset'
        # exactly ADE20KDataset's settings, with the demo's class names
        assert (dataset['img_suffix'], dataset['seg_map_suffix'], dataset['reduce_zero_label']) \
            == ('.jpg', '.png', True)
        assert tuple(dataset['metainfo']['classes']) == ADE_DEMO_CLASSES
        assert len(dataset['metainfo']['palette']) == len(ADE_DEMO_CLASSES)
    assert cfg['model']['decode_head']['num_classes'] == len(ADE_DEMO_CLASSES)
    assert cfg['model']['auxiliary_head']['num_classes'] == len(ADE_DEMO_CLASSES)
    assert cfg['model']['backbone']['init_cfg'] is None
    assert cfg['val_evaluator']['type'] == 'IoUMetric'
    assert cfg['work_dir'] != './work_dirs/swin_t_demo'  # the detection demo's default
    size = cfg['demo_data']['image_size']
    assert tuple(cfg['model']['data_preprocessor']['size']) == (size, size)


def test_demo_changes_only_data_crop_classes_and_schedule(demo):
    """Everything that is not data, crop, classes, schedule (or the weights source) is inherited."""
    demo_cfg, base = copy.deepcopy(demo)
    allowed_top = {'demo_data', 'image_size', 'data_root', 'dataset_type', 'metainfo',
                   'dataset_settings', 'crop_size', 'num_classes', 'max_iters', 'warmup_iters',
                   'train_pipeline', 'test_pipeline', 'train_dataloader', 'val_dataloader',
                   'test_dataloader', 'optim_wrapper', 'param_scheduler', 'train_cfg',
                   'default_hooks', 'model', 'work_dir', 'randomness'}
    for key in set(demo_cfg) | set(base):
        if key not in allowed_top:
            assert demo_cfg.get(key) == base.get(key), key
    # model: only the crop size, the class count, the weights and test-time crop settings
    dm, bm = demo_cfg['model'], base['model']
    assert dm['data_preprocessor'].pop('size') != bm['data_preprocessor'].pop('size')
    for head in ('decode_head', 'auxiliary_head'):
        dm[head].pop('num_classes'), bm[head].pop('num_classes')
    dm['backbone'].pop('init_cfg'), bm['backbone'].pop('init_cfg')
    assert dm.pop('test_cfg')['mode'] == bm.pop('test_cfg')['mode'] == 'whole'
    assert dm == bm
    # optimiser: only the learning rate; the same parameter-wise decay rules
    do, bo = demo_cfg['optim_wrapper'], base['optim_wrapper']
    do['optimizer'].pop('lr'), bo['optimizer'].pop('lr')
    assert do == bo
    # pipelines: the same transforms in the same order, only scales and crop sizes differ
    for loader, pipeline in (('train_dataloader', 'train_pipeline'),
                             ('val_dataloader', 'test_pipeline')):
        assert [t['type'] for t in demo_cfg[pipeline]] == [t['type'] for t in base[pipeline]]
        assert demo_cfg[loader]['dataset']['pipeline'] == demo_cfg[pipeline]
    assert [t['type'] for t in demo_cfg['tta_pipeline'][1]['transforms'][0]] == \
        ['Resize'] * 6
    # schedule: iterations, warm-up then poly decay as the reference
    assert [s['type'] for s in demo_cfg['param_scheduler']] == ['LinearLR', 'PolyLR']
    assert demo_cfg['param_scheduler'][-1]['end'] == demo_cfg['train_cfg']['max_iters']
    assert demo_cfg['train_cfg']['type'] == 'IterBasedTrainLoop'
