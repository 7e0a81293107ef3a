"""Whole detector / segmentor checkpoints load by every path, whatever their backbone's layout.

A small randomised Mask R-CNN and UperNet (the demo configs, narrowed) are written in each layout:
ours, the toolkits' model zoos (the state dict of mmdet's / mmseg's own ``SwinTransformer``, with
its ``relative_position_index`` buffers) and the official detection / segmentation repositories'
(``swin_reference.native_to_official_det``, written without ``swin_dense.checkpoint``). Each file
is loaded through mmengine's ``load_checkpoint`` (what ``load_from`` and ``tools/test.py`` use),
mmdet's ``init_detector`` and mmseg's ``init_model``: every tensor of the model must equal the
source model's (renames and channel permutations move values, they do not compute: equality is
exact). ``tools/test.py`` gives the same metrics and predictions from both file layouts.
"""
from __future__ import annotations

import copy
import json
import pickle
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from swin_dense.checkpoint import load as load_mod
from swin_reference import (SMALL, native_to_official_det, official_state_dict, randomise,
                            to_unfold_order)
from tool_runs import DET_DEMO, run_to_end, tiny_detector

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.runner import load_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SEG_DEMO = REPO / 'configs' / 'upernet' / 'swin_t_demo.py'
DET_CLASSES = ('square', 'circle', 'triangle')
#: The demo detector narrowed as the tool-run tests narrow it (SMALL backbone, thin heads).
DET_TINY = {k: DictAction._parse_iterable(v) for k, v in
            (kv.split('=', 1) for kv in tiny_detector(1)) if k.startswith('model.')}
SEG_TINY = {'model.backbone.embed_dims': 32, 'model.backbone.depths': [2, 2, 2, 2],
            'model.backbone.num_heads': [1, 2, 4, 8],
            'model.decode_head.in_channels': [32, 64, 128, 256], 'model.decode_head.channels': 32,
            'model.auxiliary_head.in_channels': 128, 'model.auxiliary_head.channels': 16}
LAYOUTS = ('native', 'toolkit_zoo', 'official_det')


@pytest.fixture(scope='module', autouse=True)
def keep_default_scope():
    """init_detector / init_model switch mmengine's default scope for the whole process: give
    the tests after this module the scope the tests before it had."""
    from mmengine.registry import DefaultScope
    before = OrderedDict(DefaultScope._instance_dict)
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(before)


def det_config(**options) -> Config:
    cfg = Config.fromfile(str(DET_DEMO))
    cfg.merge_from_dict({**DET_TINY, **options})
    return cfg


def seg_config(**options) -> Config:
    cfg = Config.fromfile(str(SEG_DEMO))
    cfg.merge_from_dict({**SEG_TINY, **options})
    return cfg


def build_detector(cfg: Config, checkpoint=None):
    from mmdet.apis import init_detector
    with warnings.catch_warnings():  # without a checkpoint: 'use COCO classes by default'
        warnings.simplefilter('ignore', UserWarning)
        return init_detector(cfg, checkpoint, device='cpu')


def build_segmentor(cfg: Config, checkpoint=None):
    from mmseg.apis import init_model
    return init_model(cfg, checkpoint, device='cpu')


def _write_layouts(folder: Path, source, toolkit_model, meta: dict) -> dict:
    """The source model's weights as files in each layout; returns layout -> path."""
    state = source.state_dict()
    missing, unexpected = toolkit_model.load_state_dict(state, strict=False)
    assert not unexpected and missing and all(k.endswith('relative_position_index')
                                              for k in missing)
    files = {'native': state, 'toolkit_zoo': toolkit_model.state_dict(),
             'official_det': native_to_official_det(state, window=7)}
    paths = {}
    for layout, weights in files.items():
        paths[layout] = folder / f'{layout}.pth'
        torch.save({'state_dict': weights, 'meta': meta}, paths[layout])
    return paths


@pytest.fixture(scope='module')
def detector_files(tmp_path_factory):
    """A randomised tiny Mask R-CNN (SwinBackbone) and its weights in each layout."""
    cfg = det_config()
    source = build_detector(cfg)
    randomise(source, seed=3)
    mmdet_cfg = copy.deepcopy(cfg)
    mmdet_cfg.model.backbone.type = 'SwinTransformer'  # mmdet's own: its model-zoo layout
    zoo = build_detector(mmdet_cfg)
    assert type(zoo.backbone).__name__ == 'SwinTransformer'
    meta = {'dataset_meta': {'classes': DET_CLASSES}}
    paths = _write_layouts(tmp_path_factory.mktemp('det'), source, zoo, meta)
    return source.state_dict(), paths


@pytest.fixture(scope='module')
def segmentor_files(tmp_path_factory):
    """A randomised tiny UperNet (SwinBackbone) and its weights in each layout."""
    cfg = seg_config()
    source = build_segmentor(cfg)
    randomise(source, seed=4)
    mmseg_cfg = copy.deepcopy(cfg)
    mmseg_cfg.model.backbone.type = 'SwinTransformer'
    zoo = build_segmentor(mmseg_cfg)
    assert type(zoo.backbone).__name__ == 'SwinTransformer'
    meta = {'dataset_meta': {'classes': ('background', 'square', 'circle', 'triangle'),
                             'palette': [[0, 0, 0]] * 4}}
    paths = _write_layouts(tmp_path_factory.mktemp('seg'), source, zoo, meta)
    return source.state_dict(), paths


@pytest.fixture
def reports(monkeypatch):
    """The (message, level) of every report the load-time hook logs."""
    logged = []

    def record(msg, logger=None, level=20):
        logged.append((msg, level))

    monkeypatch.setattr(load_mod, 'print_log', record)
    return logged


def assert_same_weights(model, expected: dict) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def assert_reported(reports: list, layout: str, total: int) -> None:
    (text, level), = reports
    assert level == 20  # INFO: nothing missing
    if layout == 'native':
        assert f"SwinBackbone ('backbone.'): {total} of {total} tensors in its own layout" in text
        return
    assert text.startswith("SwinBackbone weights from the state dict loaded into the model "
                           "(keys under 'backbone.')")
    assert f'loaded: {total} of {total} backbone tensors' in text
    assert 'relative_position_index' in text and 'buffer' in text
    if layout == 'official_det':
        assert 'format: official_det' in text and 'PatchMerging channels reordered' in text
    else:
        assert 'format: native' in text and 'PatchMerging' not in text


# ----------------------------------------------------------------------------- detectors
@pytest.mark.parametrize('layout', LAYOUTS)
def test_detector_file_through_load_checkpoint(detector_files, layout, reports):
    """mmengine's loader (load_from, tools/test.py), strict: no key missing or left over."""
    source_state, paths = detector_files
    model = build_detector(det_config())
    load_checkpoint(model, str(paths[layout]), map_location='cpu', strict=True)
    assert_same_weights(model, source_state)
    assert_reported(reports, layout, len(model.backbone.state_dict()))


@pytest.mark.parametrize('layout', LAYOUTS)
def test_detector_file_through_init_detector(detector_files, layout):
    source_state, paths = detector_files
    model = build_detector(det_config(), str(paths[layout]))
    assert_same_weights(model, source_state)
    assert tuple(model.dataset_meta['classes']) == DET_CLASSES


def test_official_file_loaded_without_the_hook_stays_random(detector_files):
    """What the hook fixes: the plain loader leaves the backbone random, with only a warning."""
    source_state, paths = detector_files
    model = build_detector(det_config())
    model.backbone._load_state_dict_pre_hooks.clear()
    load_checkpoint(model, str(paths['official_det']), map_location='cpu', strict=False)
    key = 'backbone.stages.0.blocks.0.attn.w_msa.qkv.weight'
    assert not torch.equal(model.state_dict()[key], source_state[key])


def test_another_window_resizes_the_tables(detector_files, reports):
    source_state, paths = detector_files
    model = build_detector(det_config(**{'model.backbone.window_size': 12}))
    load_checkpoint(model, str(paths['official_det']), map_location='cpu', strict=True)
    key = 'backbone.stages.1.blocks.0.attn.w_msa.relative_position_bias_table'
    table = source_state[key]
    assert table.shape == (169, 2)
    expected = F.interpolate(table.T.reshape(1, 2, 13, 13), size=(23, 23), mode='bicubic',
                             align_corners=False).reshape(2, 529).T
    torch.testing.assert_close(model.state_dict()[key], expected, atol=1e-6, rtol=0)
    other = 'backbone.stages.1.blocks.0.attn.w_msa.qkv.weight'
    assert torch.equal(model.state_dict()[other], source_state[other])
    (text, _), = reports
    assert 'resized: 8' in text and 'window 7 -> 12' in text


def _file_with(path: Path, tmp_path: Path, edit) -> Path:
    checkpoint = torch.load(path, weights_only=True)
    checkpoint['state_dict'] = edit(OrderedDict(checkpoint['state_dict']))
    out = tmp_path / f'edited_{path.name}'
    torch.save(checkpoint, out)
    return out


def test_unrecognised_backbone_layout_is_an_error(detector_files, tmp_path):
    _, paths = detector_files

    def resnet_backbone(state):
        out = OrderedDict((k, v) for k, v in state.items() if not k.startswith('backbone.'))
        out['backbone.conv1.weight'] = torch.zeros(64, 3, 7, 7)
        out['backbone.layer1.0.conv1.weight'] = torch.zeros(64, 64, 1, 1)
        return out

    path = _file_with(paths['native'], tmp_path, resnet_backbone)
    model = build_detector(det_config())
    with pytest.raises(ValueError, match=r"SwinBackbone cannot load the weights under "
                                         r"'backbone\.'.*keys look like: conv1\.weight"):
        load_checkpoint(model, str(path), map_location='cpu')

    def swin_v2(state):
        state['backbone.stages.0.blocks.0.attn.w_msa.logit_scale'] = torch.zeros(1, 1, 1)
        return state

    with pytest.raises(ValueError, match='V2'):
        load_checkpoint(model, str(_file_with(paths['official_det'], tmp_path, swin_v2)),
                        map_location='cpu')


def test_deeper_backbone_is_an_error_naming_the_arch(detector_files, tmp_path):
    _, paths = detector_files

    def deeper(state):  # a third block in stage 2: another variant's file
        for key in [k for k in state if k.startswith('backbone.layers.2.blocks.1.')]:
            state[key.replace('blocks.1.', 'blocks.2.')] = state[key].clone()
        return state

    model = build_detector(det_config())
    with pytest.raises(ValueError, match='depths differ.*depths=\\(2, 2, 3, 2\\)'):
        load_checkpoint(model, str(_file_with(paths['official_det'], tmp_path, deeper)),
                        map_location='cpu')


def test_missing_backbone_tensors_are_reported_loudly(detector_files, tmp_path, reports):
    source_state, paths = detector_files

    def without_block(state):
        return OrderedDict((k, v) for k, v in state.items()
                           if not k.startswith('backbone.layers.2.blocks.1.'))

    path = _file_with(paths['official_det'], tmp_path, without_block)
    model = build_detector(det_config())
    load_checkpoint(model, str(path), map_location='cpu', strict=False)
    (text, level), = reports
    assert level == 30  # WARNING
    assert 'missing' in text and 'stages.2.blocks.1' in text
    key = 'backbone.stages.0.blocks.0.attn.w_msa.qkv.weight'  # the rest loaded
    assert torch.equal(model.state_dict()[key], source_state[key])
    with pytest.raises(RuntimeError, match='missing keys'):  # strict: mmengine refuses
        load_checkpoint(build_detector(det_config()), str(path), map_location='cpu', strict=True)


def test_a_state_dict_without_backbone_keys_warns(detector_files, reports):
    source_state, _ = detector_files
    model = build_detector(det_config())
    heads_only = {k: v for k, v in source_state.items() if not k.startswith('backbone.')}
    model.load_state_dict(heads_only, strict=False)
    (text, level), = reports
    assert level == 30 and "no key under 'backbone.'" in text


def test_bare_backbone_and_wrapped_models_load_any_layout(detector_files):
    """Plain ``load_state_dict`` (strict) on the backbone alone, and on a deep copy of a model
    wrapped as DDP / mmengine's EMA wrap it (keys under ``module.``)."""
    source_state, _ = detector_files
    model = build_detector(det_config())
    backbone = {k[len('backbone.'):]: v for k, v in source_state.items()
                if k.startswith('backbone.')}
    model.backbone.load_state_dict(native_to_official_det(backbone, window=7, prefix=''))
    assert_same_weights(model.backbone, backbone)

    wrapper = torch.nn.Module()  # the model as DDP and mmengine's EMA (a deep copy) hold it
    wrapper.module = copy.deepcopy(build_detector(det_config()))
    official = native_to_official_det(source_state, window=7)
    wrapper.load_state_dict(OrderedDict(('module.' + k, v) for k, v in official.items()))
    assert_same_weights(wrapper.module, source_state)


def test_classification_file_through_a_backbone_load(tmp_path):
    """A classification file handed to the backbone's own load_state_dict: converted; its head
    and final norm stay in the dict, so a strict load names them."""
    from swin_dense import SwinBackbone
    official = official_state_dict()
    model = SwinBackbone(**SMALL, window_size=7)
    with pytest.raises(RuntimeError, match='Unexpected key.*head.weight'):
        model.load_state_dict(official)
    model.load_state_dict(official, strict=False)
    weight = model.stages[0].downsample.reduction.weight
    assert torch.equal(weight, to_unfold_order(official['layers.0.downsample.reduction.weight'], 1))


# ----------------------------------------------------------------------------- segmentors
@pytest.mark.parametrize('layout', LAYOUTS)
def test_segmentor_file_through_init_model(segmentor_files, layout):
    source_state, paths = segmentor_files
    model = build_segmentor(seg_config(), str(paths[layout]))
    assert_same_weights(model, source_state)
    assert model.dataset_meta['classes'][1] == 'square'


@pytest.mark.parametrize('layout', LAYOUTS)
def test_segmentor_file_through_load_checkpoint(segmentor_files, layout, reports):
    source_state, paths = segmentor_files
    model = build_segmentor(seg_config())
    load_checkpoint(model, str(paths[layout]), map_location='cpu', strict=True)
    assert_same_weights(model, source_state)
    assert_reported(reports, layout, len(model.backbone.state_dict()))


# ----------------------------------------------------------------------------- tools/test.py
TEST_TOOL = REPO / 'tools' / 'test.py'
TOOL_OPTIONS = ['demo_data.num_train=4', 'demo_data.num_val=4', 'demo_data.image_size=64',
                'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False',
                *[kv for kv in tiny_detector(1) if kv.startswith('model.')]]


def _test_tool(cwd: Path, checkpoint: Path, name: str) -> tuple[dict, list, str]:
    work, out = cwd / f'work_{name}', cwd / f'{name}.pkl'
    log = run_to_end([sys.executable, str(TEST_TOOL), str(DET_DEMO), str(checkpoint),
                      '--work-dir', str(work), '--out', str(out), '--cfg-options', *TOOL_OPTIONS],
                     cwd=cwd)
    run = sorted(p for p in work.iterdir() if p.is_dir())[-1]
    metrics = json.loads((run / f'{run.name}.json').read_text())
    return metrics, pickle.loads(out.read_bytes()), log


@pytest.mark.slow
def test_test_tool_gives_the_source_models_metrics_from_an_official_file(detector_files,
                                                                         tmp_path):
    """The native file is the source model; the official-layout file of the same weights gives
    the same metrics and predictions through tools/test.py (subprocesses), and says so."""
    source_state, paths = detector_files
    total = sum(k.startswith('backbone.') for k in source_state)
    native, native_preds, native_log = _test_tool(tmp_path, paths['native'], 'native')
    official, official_preds, official_log = _test_tool(tmp_path, paths['official_det'],
                                                        'official')
    assert 'format: official_det' in official_log and f'loaded: {total} of {total}' in official_log
    assert 'tensors in its own layout' in native_log
    for log in (native_log, official_log):
        assert 'missing keys' not in log and 'unexpected key' not in log
    scores = {k: v for k, v in native.items() if k.startswith('coco/')}  # (not the timings)
    assert 'coco/bbox_mAP' in scores and 'coco/segm_mAP' in scores
    for key, value in scores.items():
        assert official[key] == pytest.approx(value, abs=1e-3), key
    assert len(native_preds) == len(official_preds) == 4
    assert sum(len(p['pred_instances']['scores']) for p in native_preds) > 0
    for a, b in zip(native_preds, official_preds):
        a, b = a['pred_instances'], b['pred_instances']
        assert torch.equal(a['labels'], b['labels'])
        torch.testing.assert_close(a['scores'], b['scores'], atol=1e-5, rtol=0)
        torch.testing.assert_close(a['bboxes'], b['bboxes'], atol=1e-3, rtol=0)
