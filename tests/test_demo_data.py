"""Tests of swin_dense.demo_data: annotations against independent references (pycocotools, a
point-in-polygon rasteriser, the painted pixels), determinism, idempotency, atomicity, locking,
the CLI, and, where installed, loading through mmdet's and mmseg's datasets."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

mask_utils = pytest.importorskip('pycocotools.mask')
from pycocotools.coco import COCO  # noqa: E402

from swin_dense import demo_data  # noqa: E402
from swin_dense.demo_data import (  # noqa: E402
    ADE_DEMO_CLASSES, COCO_DEMO_CLASSES, MANIFEST_NAME, ensure_demo_data, make_ade_demo,
    make_coco_demo)

# pycocotools 2.0.x warns about numpy 2's __array__ copy keyword on every decode.
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning:pycocotools.*')

TINY = dict(num_train=6, num_val=3, image_size=64)
K_COCO = len(COCO_DEMO_CLASSES)
K_ADE = len(ADE_DEMO_CLASSES)
# The RGB channel that dominates each shape class's colour (red squares, green circles, blue
# triangles): what a look at the image says the class is.
DOMINANT_CHANNEL = {'square': 0, 'circle': 1, 'triangle': 2}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file()}


def _point_in_polygon(polygon: list[float], size: int) -> np.ndarray:
    """Even-odd rule at pixel centres: a rasteriser independent of pycocotools."""
    centres = np.arange(size) + 0.5
    x, y = np.meshgrid(centres, centres)
    inside = np.zeros((size, size), dtype=bool)
    points = np.asarray(polygon, dtype=float).reshape(-1, 2)
    for (x0, y0), (x1, y1) in zip(points, np.roll(points, -1, axis=0)):
        if y0 != y1:
            crosses = (y0 > y) != (y1 > y)
            inside ^= crosses & (x < x0 + (y - y0) * (x1 - x0) / (y1 - y0))
    return inside


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbours are all in ``mask`` (away from JPEG-blurred edges)."""
    padded = np.pad(mask, 1)
    return (mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2]
            & padded[1:-1, 2:])


def _mean_colour(image_path: Path, mask: np.ndarray) -> np.ndarray:
    return np.asarray(Image.open(image_path).convert('RGB'), dtype=float)[mask].mean(axis=0)


@pytest.fixture(scope='module')
def painted(tmp_path_factory):
    """A tiny COCO demo, with the (labels, full masks) of every painted image, in order."""
    calls = []
    original = demo_data._render_image

    def spy(rng, size, labels, masks):
        calls.append((list(labels), [m.copy() for m in masks]))
        return original(rng, size, labels, masks)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo_data, '_render_image', spy)
        root = make_coco_demo(tmp_path_factory.mktemp('coco') / 'coco', **TINY)
    return root, {'train': calls[:TINY['num_train']], 'val': calls[TINY['num_train']:]}


@pytest.fixture(scope='module')
def coco_root(painted) -> Path:
    return painted[0]


@pytest.fixture(scope='module')
def ade_root(tmp_path_factory) -> Path:
    return make_ade_demo(tmp_path_factory.mktemp('ade') / 'ade', **TINY)


def _load(coco_root: Path, split: str) -> COCO:
    return COCO(str(coco_root / 'annotations' / f'instances_{split}2017.json'))


# --------------------------------------------------------------------------- COCO


def test_coco_layout_and_categories(coco_root):
    for split, count in (('train', TINY['num_train']), ('val', TINY['num_val'])):
        coco = _load(coco_root, split)
        assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(COCO_DEMO_CLASSES)
        assert coco.getCatIds() == list(range(1, K_COCO + 1))
        assert len(coco.getImgIds()) == count
        for img in coco.loadImgs(coco.getImgIds()):
            with Image.open(coco_root / f'{split}2017' / img['file_name']) as im:
                assert im.format == 'JPEG' and im.mode == 'RGB'
                assert im.size == (img['width'], img['height']) == (64, 64)
        # every image has objects, every class occurs in every split
        assert all(coco.getAnnIds(imgIds=[i]) for i in coco.getImgIds())
        assert {a['category_id'] for a in coco.loadAnns(coco.getAnnIds())} == set(coco.getCatIds())


def test_coco_area_and_bbox_match_decoded_masks(coco_root):
    kinds = set()
    for split in ('train', 'val'):
        coco = _load(coco_root, split)
        for img_id in coco.getImgIds():
            union = np.zeros((64, 64), dtype=int)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img_id])):
                mask = coco.annToMask(ann).astype(bool)
                rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
                assert ann['area'] == mask.sum() > 0
                assert ann['bbox'] == [cols[0], rows[0], cols[-1] - cols[0] + 1,
                                       rows[-1] - rows[0] + 1]
                assert ann['iscrowd'] == 0 and 1 <= ann['category_id'] <= K_COCO
                union += mask
                seg = ann['segmentation']
                if isinstance(seg, list):
                    kinds.add('polygon')
                    ref = _point_in_polygon(seg[0], 64)
                    assert (mask & ref).sum() / (mask | ref).sum() > 0.9
                else:
                    kinds.add('rle')
                    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                    assert encoded['counts'].decode() == seg['counts']
            assert union.max() == 1  # visible parts never overlap
    assert kinds == {'polygon', 'rle'}  # both storage paths are exercised


def test_coco_annotations_are_exactly_the_visible_painted_pixels(painted):
    root, scenes = painted
    for split in ('train', 'val'):
        coco = _load(root, split)
        for img_id, (labels, full_masks) in zip(coco.getImgIds(), scenes[split]):
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
            assert [a['category_id'] - 1 for a in anns] == labels  # nothing dropped
            for i, ann in enumerate(anns):
                hidden = np.zeros_like(full_masks[i])
                for later in full_masks[i + 1:]:
                    hidden |= later
                expected = full_masks[i] & ~hidden
                np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), expected)
                assert isinstance(ann['segmentation'], list) == (not (full_masks[i] & hidden).any())


def test_coco_pixels_show_the_annotated_class(coco_root):
    for split in ('train', 'val'):
        coco = _load(coco_root, split)
        for ann in coco.loadAnns(coco.getAnnIds()):
            core = _erode(coco.annToMask(ann).astype(bool))
            if core.sum() < 5:
                continue
            img = coco.loadImgs([ann['image_id']])[0]
            colour = _mean_colour(coco_root / f'{split}2017' / img['file_name'], core)
            name = COCO_DEMO_CLASSES[ann['category_id'] - 1]
            assert colour.argmax() == DOMINANT_CHANNEL[name]


def test_visible_masks_hide_earlier_shapes():
    a = np.zeros((8, 8), dtype=bool)
    b = np.zeros((8, 8), dtype=bool)
    a[1:5, 1:5] = True
    b[3:7, 3:7] = True
    vis_a, vis_b = demo_data._visible_masks([a, b])
    expected_a = a.copy()
    expected_a[3:5, 3:5] = False
    np.testing.assert_array_equal(vis_a, expected_a)
    np.testing.assert_array_equal(vis_b, b)
    assert demo_data._visible_masks([]) == []


# --------------------------------------------------------------------------- ADE


def test_ade_layout_and_labels(ade_root):
    for split, count in (('training', TINY['num_train']), ('validation', TINY['num_val'])):
        images = sorted((ade_root / 'images' / split).iterdir())
        labels = sorted((ade_root / 'annotations' / split).iterdir())
        assert [p.stem for p in images] == [p.stem for p in labels] and len(images) == count
        seen = set()
        for image_path, label_path in zip(images, labels):
            with Image.open(label_path) as im:
                assert im.format == 'PNG' and im.mode == 'L' and im.size == (64, 64)
                label = np.asarray(im)
            assert label.min() >= 1 and label.max() <= K_ADE  # no 0: nothing is ignored
            seen |= set(np.unique(label).tolist())
            for value in range(2, K_ADE + 1):
                core = _erode(label == value)
                if core.sum() >= 5:
                    colour = _mean_colour(image_path, core)
                    assert colour.argmax() == DOMINANT_CHANNEL[ADE_DEMO_CLASSES[value - 1]]
        assert seen == set(range(1, K_ADE + 1))  # every class in every split


# --------------------------------------------------------------------------- building


@pytest.mark.parametrize('make', [make_coco_demo, make_ade_demo])
def test_deterministic_by_seed(tmp_path, make):
    first = _hashes(make(tmp_path / 'a', **TINY))
    assert first == _hashes(make(tmp_path / 'b', **TINY))
    other = _hashes(make(tmp_path / 'c', **TINY, seed=1))
    assert first.keys() == other.keys()
    assert all(first[k] != other[k] for k in first)


def test_idempotent_and_rebuilds_on_new_parameters(tmp_path):
    root = make_coco_demo(tmp_path / 'coco', **TINY)
    files = [root / MANIFEST_NAME, root / 'annotations' / 'instances_train2017.json',
             next((root / 'train2017').iterdir())]
    stamps = [p.stat().st_mtime_ns for p in files]
    assert make_coco_demo(tmp_path / 'coco', **TINY) == root
    assert [p.stat().st_mtime_ns for p in files] == stamps
    make_coco_demo(root, **{**TINY, 'num_train': 2})
    assert len(list((root / 'train2017').iterdir())) == 2
    assert json.loads((root / MANIFEST_NAME).read_text())['num_train'] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.coco.lock', 'coco']


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / 'data').mkdir()
    (tmp_path / 'data' / 'precious.txt').write_text('keep me')
    with pytest.raises(FileExistsError):
        make_coco_demo(tmp_path / 'data', **TINY)
    assert (tmp_path / 'data' / 'precious.txt').read_text() == 'keep me'


def _crash_on_third_image(monkeypatch):
    original = demo_data._save_jpeg
    calls = []

    def flaky(pixels, path):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError('simulated crash')
        original(pixels, path)

    monkeypatch.setattr(demo_data, '_save_jpeg', flaky)


@pytest.mark.parametrize('make', [make_coco_demo, make_ade_demo])
def test_crash_leaves_nothing(tmp_path, monkeypatch, make):
    _crash_on_third_image(monkeypatch)
    with pytest.raises(RuntimeError, match='simulated crash'):
        make(tmp_path / 'demo', **TINY)
    assert [p.name for p in tmp_path.iterdir()] == ['.demo.lock']  # no root, no temporary dir


def test_crash_keeps_the_previous_dataset(tmp_path, monkeypatch):
    root = make_coco_demo(tmp_path / 'coco', **TINY)
    before = _hashes(root)
    _crash_on_third_image(monkeypatch)
    with pytest.raises(RuntimeError, match='simulated crash'):
        make_coco_demo(root, **TINY, seed=1)
    assert _hashes(root) == before


def _build_in_child(root: str, log: str) -> None:
    original = demo_data._build_coco

    def logged(out, *args):
        with open(log, 'a') as f:
            f.write('build\n')
        original(out, *args)

    demo_data._build_coco = logged
    make_coco_demo(root, **TINY)


def test_concurrent_processes_build_once(tmp_path):
    ctx = multiprocessing.get_context('fork')
    root, log = tmp_path / 'coco', tmp_path / 'builds.log'
    procs = [ctx.Process(target=_build_in_child, args=(str(root), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text() == 'build\n'
    assert len(list((root / 'train2017').iterdir())) == TINY['num_train']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.coco.lock', 'builds.log', 'coco']


def test_ensure_demo_data_dispatch_and_errors(tmp_path):
    root = ensure_demo_data('ade', tmp_path / 'ade', **TINY)
    assert json.loads((root / MANIFEST_NAME).read_text())['kind'] == 'ade'
    with pytest.raises(ValueError, match="'ade', 'coco'"):
        ensure_demo_data('voc', tmp_path / 'voc')
    with pytest.raises(ValueError, match='image_size'):
        ensure_demo_data('coco', tmp_path / 'coco', image_size=16)
    assert not (tmp_path / 'coco').exists()


def test_cli(tmp_path, capsys):
    root = tmp_path / 'cli'
    args = ['coco', str(root), '--num-train', '2', '--num-val', '1', '--image-size', '48',
            '--seed', '3']
    assert demo_data.main(args) == 0
    assert capsys.readouterr().out.strip() == str(root)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert (manifest['num_train'], manifest['num_val'], manifest['image_size'],
            manifest['seed']) == (2, 1, 48, 3)


# --------------------------------------------------------------------------- mmdet / mmseg


def test_loads_in_mmdet_coco_dataset(coco_root):
    datasets = pytest.importorskip('mmdet.datasets')
    dataset = datasets.CocoDataset(
        data_root=str(coco_root), ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/'), metainfo=dict(classes=COCO_DEMO_CLASSES),
        filter_cfg=None, pipeline=[])
    assert len(dataset) == TINY['num_train']
    coco = _load(coco_root, 'train')
    info = dataset.get_data_info(0)
    assert len(info['instances']) == len(coco.getAnnIds(imgIds=[info['img_id']]))


def test_loads_in_mmseg_with_ade20k_settings(ade_root):
    datasets = pytest.importorskip('mmseg.datasets')
    # ADE20KDataset only accepts class names among ADE20K's own 150 in `metainfo`, so the demo
    # classes go through BaseSegDataset with exactly ADE20KDataset's settings.
    dataset = datasets.BaseSegDataset(
        data_root=str(ade_root), img_suffix='.jpg', seg_map_suffix='.png',
        reduce_zero_label=True, metainfo=dict(classes=ADE_DEMO_CLASSES),
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=[])
    assert len(dataset) == TINY['num_val']
    from mmseg.datasets.transforms import LoadAnnotations
    seg = LoadAnnotations()(dataset.get_data_info(0))['gt_seg_map']
    assert set(np.unique(seg).tolist()) <= set(range(K_ADE))  # nothing ignored after reduction
