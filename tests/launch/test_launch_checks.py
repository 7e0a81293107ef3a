"""swin_dense.launch.checks: what a run reads must exist, the channels must fit; all before any
model or Runner is built.

Missing data (COCO, ADE20K, and the dataset types of other configs: COCO panoptic with its
evaluator files, wrapped datasets, evaluator lists), partly missing data, the layout that passes;
truncated or missing checkpoints for test and resume; in_channels against the backbone (necks,
mmseg heads, Mask2Former-style heads taking every output); a missing pretrained file.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip('mmdet')
import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402

from swin_dense import SwinBackbone, launch  # noqa: E402
from swin_dense.launch import (ChannelMismatchError, DataNotFoundError,  # noqa: E402
                               PretrainedNotFoundError)

REPO = Path(__file__).resolve().parents[2]
COCO_1X = str(REPO / 'configs' / 'mask_rcnn' / 'swin_t_coco.py')
COCO_V2 = str(REPO / 'configs' / 'mask_rcnn' / 'swinv2_t_coco.py')
ADE_CONFIG = str(REPO / 'configs' / 'upernet' / 'swin_t_ade20k.py')
ADE_ROOT = 'data/ade/ADEChallengeData2016'
OFFICIAL_T = ('https://github.com/SwinTransformer/storage/releases/download/v1.0.0/'
              'swin_tiny_patch4_window7_224.pth')


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty working directory (no data/, no checkpoints/)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def no_model_built(monkeypatch):
    """Fail the test if anything builds a Swin backbone or a Runner."""
    from mmengine.runner import Runner

    def refuse(*args, **kwargs):
        raise AssertionError('a model or runner was built before the check')
    monkeypatch.setattr(SwinBackbone, '__init__', refuse)
    monkeypatch.setattr(Runner, 'from_cfg', classmethod(refuse))
    monkeypatch.setattr(Runner, '__init__', refuse)


def _coco_layout(root: Path, splits=('train', 'val')) -> None:
    (root / 'annotations').mkdir(parents=True)
    for split in splits:
        (root / f'{split}2017').mkdir()
        (root / 'annotations' / f'instances_{split}2017.json').write_text('{}')


# ----------------------------------------------------------------------------- missing data
def test_missing_coco_is_a_clear_error_before_any_model_is_built(in_tmp, no_model_built):
    with pytest.raises(DataNotFoundError) as info:
        launch.train(COCO_1X, work_dir=str(in_tmp / 'work'))
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    # the paths expected, as given and resolved against the working directory
    for rel in ('data/coco/annotations/instances_train2017.json', 'data/coco/train2017/',
                'data/coco/annotations/instances_val2017.json', 'data/coco/val2017/'):
        assert rel in msg
    assert str(in_tmp / 'data' / 'coco' / 'annotations' / 'instances_train2017.json') in msg
    assert 'val_evaluator.ann_file' in msg
    # the layout, and how to point elsewhere
    assert 'Expected layout of COCO 2017' in msg
    assert '--cfg-options train_dataloader.dataset.data_root=' in msg
    assert 'val_evaluator.ann_file=/path/to/dataset/annotations/instances_val2017.json' in msg
    assert 'ln -s' in msg and 'data_root' in msg


def test_missing_test_data_only_names_what_test_reads(in_tmp, no_model_built):
    (in_tmp / 'ckpt.pth').write_bytes(b'')
    with pytest.raises(DataNotFoundError) as info:
        launch.test(COCO_1X, str(in_tmp / 'ckpt.pth'))
    msg = str(info.value)
    assert 'test_dataloader.dataset' in msg and 'train2017' not in msg.split('Expected')[0]


def test_partly_missing_data_names_only_the_missing_parts(in_tmp):
    _coco_layout(in_tmp / 'data' / 'coco', splits=('train',))
    cfg = launch.load_config(COCO_1X)
    with pytest.raises(DataNotFoundError) as info:
        launch.check_data(cfg, 'train')
    listed = str(info.value).split('Expected layout')[0]
    assert 'val2017/' in listed and 'instances_val2017.json' in listed
    assert 'train2017/' not in listed and 'instances_train2017.json' not in listed


def test_data_check_passes_on_the_expected_layout(in_tmp):
    _coco_layout(in_tmp / 'data' / 'coco')
    cfg = launch.load_config(COCO_1X)
    launch.check_data(cfg, 'train')
    launch.check_data(cfg, 'test')


def test_ade_layout_is_named_for_segmentation_datasets(in_tmp):
    cfg = Config(dict(default_scope='mmseg', train_dataloader=dict(dataset=dict(
        type='ADE20KDataset', data_root='data/ade/ADEChallengeData2016',
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training')))))
    with pytest.raises(DataNotFoundError) as info:
        launch.check_data(cfg, 'train')
    msg = str(info.value)
    assert 'data/ade/ADEChallengeData2016/images/training' in msg
    assert 'images/validation/' in msg and 'annotations/training/' in msg


def test_missing_ade20k_error_before_building(in_tmp, monkeypatch):
    from swin_dense.launch import runner

    def must_not_build(*args, **kwargs):
        raise AssertionError('the runner (and model) must not be built when data is missing')

    monkeypatch.setattr(runner, 'build_runner', must_not_build)
    with pytest.raises(DataNotFoundError) as info:
        launch.train(ADE_CONFIG, work_dir=str(in_tmp / 'work'))
    message = str(info.value)
    for sub in ('images/training', 'images/validation', 'annotations/training',
                'annotations/validation'):
        assert f'{ADE_ROOT}/{sub}' in message, sub
    assert 'ADEChallengeData2016.zip' in message and '--cfg-options' in message
    # the same check guards testing (it comes before the checkpoint is looked for)
    with pytest.raises(DataNotFoundError) as info:
        launch.test(ADE_CONFIG, str(in_tmp / 'missing.pth'), work_dir=str(in_tmp / 'w'))
    assert f'{ADE_ROOT}/images/validation' in str(info.value)


def _loader(dataset: dict) -> dict:
    return dict(batch_size=2, dataset=dataset)


PANOPTIC = dict(type='CocoPanopticDataset', data_root='data/coco/',
                ann_file='annotations/panoptic_train2017.json',
                data_prefix=dict(img='train2017/', seg='annotations/panoptic_train2017/'))
PANOPTIC_VAL = dict(PANOPTIC, ann_file='annotations/panoptic_val2017.json',
                    data_prefix=dict(img='val2017/', seg='annotations/panoptic_val2017/'))
PANOPTIC_EVALUATORS = [
    dict(type='CocoPanopticMetric', ann_file='data/coco/annotations/panoptic_val2017.json',
         seg_prefix='data/coco/annotations/panoptic_val2017/'),
    dict(type='CocoMetric', ann_file='data/coco/annotations/instances_val2017.json',
         metric=['bbox', 'segm'])]


def _panoptic_cfg() -> Config:
    """The dataset part of a Mask2Former panoptic config (mmdet's coco_panoptic base)."""
    return Config(dict(default_scope='mmdet', train_dataloader=_loader(PANOPTIC),
                       val_dataloader=_loader(PANOPTIC_VAL), val_cfg=dict(type='ValLoop'),
                       val_evaluator=PANOPTIC_EVALUATORS, test_dataloader=_loader(PANOPTIC_VAL),
                       test_evaluator=PANOPTIC_EVALUATORS))


def test_missing_coco_panoptic_names_its_files_and_layout(in_tmp):
    with pytest.raises(DataNotFoundError) as info:
        launch.check_data(_panoptic_cfg(), 'train')
    msg = str(info.value)
    listed = msg.split('Expected layout')[0]
    for path in ('data/coco/annotations/panoptic_train2017.json', 'data/coco/train2017/',
                 'data/coco/annotations/panoptic_train2017/',
                 'data/coco/annotations/panoptic_val2017/'):
        assert path in listed, path
    assert 'val_evaluator.0.seg_prefix' in listed and 'val_evaluator.1.ann_file' in listed
    assert 'Expected layout of COCO 2017 panoptic' in msg
    assert 'panoptic_annotations_trainval2017.zip' in msg
    assert 'val_evaluator.0.seg_prefix=/path/to/dataset/annotations/panoptic_val2017/' in msg
    # complete: passes
    root = in_tmp / 'data' / 'coco'
    for d in ('train2017', 'val2017', 'annotations/panoptic_train2017',
              'annotations/panoptic_val2017'):
        (root / d).mkdir(parents=True)
    for f in ('panoptic_train2017.json', 'panoptic_val2017.json', 'instances_val2017.json'):
        (root / 'annotations' / f).write_text('{}')
    launch.check_data(_panoptic_cfg(), 'train')
    launch.check_data(_panoptic_cfg(), 'test')


@pytest.mark.parametrize('dataset_type,scope,layout', [
    ('CocoDataset', 'mmdet', 'COCO 2017 ('),          # RetinaNet, DINO, Mask2Former instance
    ('ADE20KDataset', 'mmseg', 'ADE20K'),             # UperNet Swin-B/L, Mask2Former on ADE20K
])
def test_wrapped_datasets_of_other_configs_get_the_same_error(in_tmp, dataset_type, scope,
                                                               layout):
    """A dataset behind Repeat/Concat wrappers, as other configs write them, is found and named
    with the layout of its type."""
    leaf = dict(type=dataset_type, data_root='data/x/', ann_file='ann.json',
                data_prefix=dict(img='img/'))
    wrapped = dict(type='RepeatDataset', times=2, dataset=dict(
        type='ConcatDataset', datasets=[leaf, dict(leaf, ann_file='ann2.json')]))
    cfg = Config(dict(default_scope=scope, train_dataloader=_loader(wrapped)))
    with pytest.raises(DataNotFoundError) as info:
        launch.check_data(cfg, 'train')
    msg = str(info.value)
    assert f'train_dataloader.dataset.dataset.datasets.1 ({dataset_type}): data/x/ann2.json' in msg
    assert f'Expected layout of {layout}' in msg


def test_remote_data_is_not_checked(in_tmp):
    cfg = Config(dict(default_scope='mmdet', train_dataloader=_loader(dict(
        PANOPTIC, data_root='s3://bucket/coco/'))))
    launch.check_data(cfg, 'train')
    cfg = Config(dict(default_scope='mmdet', train_dataloader=_loader(dict(
        PANOPTIC, backend_args=dict(backend='petrel')))))
    launch.check_data(cfg, 'train')


# ----------------------------------------------------------------------------- checkpoints
def test_truncated_checkpoint_for_test_or_resume_is_a_clear_error(tmp_path):
    """tools/test.py CKPT and tools/train.py --resume CKPT check the file before building: a
    truncated torch zip archive is a ValueError naming it (mmengine would raise a RuntimeError
    from torch's zip reader after building everything)."""
    good = tmp_path / 'epoch_1.pth'
    torch.save({'state_dict': {'w': torch.zeros(100, 100)}}, good)
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    cfg = launch.load_config(str(REPO / 'configs' / 'mask_rcnn' / 'swin_t_demo.py'))
    with pytest.raises(ValueError, match='truncated.*cut.pth') as info:
        launch.apply_test_options(cfg.copy(), 'mmdet', str(cut))
    assert not isinstance(info.value, RuntimeError)
    with pytest.raises(ValueError, match='resume.*truncated'):
        launch.apply_train_options(cfg.copy(), 'mmdet', resume=str(cut))
    launch.apply_train_options(cfg.copy(), 'mmdet', resume=str(good))  # a complete file is fine
    with pytest.raises(FileNotFoundError, match='checkpoint to test'):
        launch.apply_test_options(cfg.copy(), 'mmdet', str(tmp_path / 'x.pth'))


# ----------------------------------------------------------------------------- channels
def test_neck_in_channels_must_match_the_backbone(in_tmp):
    cfg = launch.load_config(COCO_1X, {'model.neck.in_channels': [256, 512, 1024, 2048]})
    launch.setup_toolkit(cfg)
    with pytest.raises(ChannelMismatchError) as info:
        launch.check_channels(cfg)
    msg = str(info.value)
    assert 'model.neck.in_channels = [256, 512, 1024, 2048], expected [96, 192, 384, 768]' in msg
    assert '--cfg-options model.neck.in_channels=[96,192,384,768]' in msg
    launch.check_channels(launch.load_config(COCO_1X))  # the shipped config is consistent


def test_neck_follows_the_backbone_width_and_outputs(in_tmp):
    cfg = launch.load_config(COCO_1X, {'model.backbone.embed_dims': 128,
                                       'model.backbone.num_heads': [4, 8, 16, 32]})
    with pytest.raises(ChannelMismatchError, match=r'expected \[128, 256, 512, 1024\]'):
        launch.check_channels(cfg)
    cfg = launch.load_config(COCO_1X, {'model.backbone.out_indices': (1, 2, 3)})
    with pytest.raises(ChannelMismatchError, match=r'expected \[192, 384, 768\]'):
        launch.check_channels(cfg)


def _seg_cfg(aux_channels=384, decode=(96, 192, 384, 768)):
    return Config(dict(default_scope='mmseg', model=dict(
        type='EncoderDecoder', backbone=dict(type='SwinBackbone', arch='tiny'),
        decode_head=dict(type='UPerHead', in_channels=list(decode), in_index=[0, 1, 2, 3]),
        auxiliary_head=dict(type='FCNHead', in_channels=aux_channels, in_index=2))))


def test_segmentation_heads_must_match_the_outputs_they_select():
    pytest.importorskip('mmseg')
    launch.setup_toolkit(_seg_cfg())
    launch.check_channels(_seg_cfg())
    with pytest.raises(ChannelMismatchError, match=r'model.auxiliary_head.in_channels = 512, '
                                                   r'expected 384'):
        launch.check_channels(_seg_cfg(aux_channels=512))
    with pytest.raises(ChannelMismatchError, match='model.decode_head.in_channels'):
        launch.check_channels(_seg_cfg(decode=(128, 256, 512, 1024)))


def test_heads_with_a_list_and_no_in_index_take_every_output():
    """Mask2Former (mmseg decode_head, mmdet panoptic_head) lists the channels of every output
    and has no in_index."""
    for scope, key in (('mmseg', 'decode_head'), ('mmdet', 'panoptic_head')):
        pytest.importorskip(scope)

        def cfg(channels):
            return Config(dict(default_scope=scope, model=dict(
                type='Mask2Former', backbone=dict(type='SwinBackbone', arch='tiny'),
                **{key: dict(type='Mask2FormerHead', in_channels=list(channels))})))
        launch.setup_toolkit(cfg([]))
        launch.check_channels(cfg([96, 192, 384, 768]))
        with pytest.raises(ChannelMismatchError, match=rf'model.{key}.in_channels'):
            launch.check_channels(cfg([256, 512, 1024, 2048]))


# ----------------------------------------------------------------------------- pretrained
def test_missing_pretrained_file_says_where_weights_come_from(in_tmp, no_model_built):
    _coco_layout(in_tmp / 'data' / 'coco')
    with pytest.raises(PretrainedNotFoundError) as info:
        launch.train(COCO_1X, work_dir=str(in_tmp / 'work'))
    msg = str(info.value)
    assert 'checkpoints/swin_tiny_patch4_window7_224.pth' in msg
    assert OFFICIAL_T in msg
    assert 'tools/convert_checkpoint.py' in msg
    assert '--cfg-options model.backbone.init_cfg=None' in msg


def test_missing_swin_v2_weights_name_the_v2_release(in_tmp):
    cfg = launch.load_config(COCO_V2)
    with pytest.raises(PretrainedNotFoundError) as info:
        launch.check_pretrained(cfg)
    msg = str(info.value)
    assert 'releases/download/v2.0.0/swinv2_tiny_patch4_window16_256.pth' in msg
    url = launch.load_config(COCO_V2, {
        'model.backbone.init_cfg.checkpoint': 'https://example.org/swinv2.pth'})
    with pytest.raises(PretrainedNotFoundError, match='SwinV2Backbone never downloads'):
        launch.check_pretrained(url)


def test_pretrained_check_accepts_existing_files_urls_and_none(in_tmp):
    cfg = launch.load_config(COCO_1X)
    (in_tmp / 'checkpoints').mkdir()
    (in_tmp / 'checkpoints' / 'swin_tiny_patch4_window7_224.pth').write_bytes(b'x')
    launch.check_pretrained(cfg)
    launch.check_pretrained(launch.load_config(COCO_1X, {'model.backbone.init_cfg': None}))
    # SwinBackbone never downloads: a URL is named as such, with the local copy to make
    url = launch.load_config(COCO_1X, {'model.backbone.init_cfg.checkpoint': OFFICIAL_T})
    with pytest.raises(PretrainedNotFoundError, match='SwinBackbone never downloads'):
        launch.check_pretrained(url)
    # other modules' URLs (mmdet's own SwinTransformer, torchvision://...) are mmengine's
    launch.check_pretrained(launch.load_config(COCO_1X, {
        'model.backbone.init_cfg.checkpoint': OFFICIAL_T, 'model.backbone.type':
        'SwinTransformer'}))
