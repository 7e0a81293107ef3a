"""tools/export.py and tools/get_flops.py over whole models built from the demo configs.

The exported graph is compared with the toolkit's own inference (mmseg's ``encode_decode``,
mmdet's ``extract_feat`` after its data preprocessor), the ONNX file with PyTorch in onnxruntime
at sizes and batches not seen when exporting, and the FLOP count with mmdet's in-tree Swin.
"""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')

from swin_dense import deploy  # noqa: E402
from swin_dense.deploy.model import AdaptiveAvgPoolAsMatmul  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SEG_DEMO = str(REPO / 'configs' / 'upernet' / 'swin_t_demo.py')
DET_DEMO = str(REPO / 'configs' / 'mask_rcnn' / 'swin_t_demo.py')

#: A narrow Swin (same blocks, fewer channels) so that exports take seconds.
TINY_BACKBONE = {'model.backbone.embed_dims': 32, 'model.backbone.depths': [2, 2, 2, 2],
                 'model.backbone.num_heads': [1, 2, 4, 8]}
TINY_SEG = {**TINY_BACKBONE, 'model.decode_head.in_channels': [32, 64, 128, 256],
            'model.decode_head.channels': 32, 'model.auxiliary_head.in_channels': 128,
            'model.auxiliary_head.channels': 16}
TINY_DET = {**TINY_BACKBONE, 'model.neck.in_channels': [32, 64, 128, 256]}


def _build(config: str, options: dict):
    cfg = deploy.load_config(config, options)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='no checkpoint given')
        model = deploy.build_model(cfg)
    return cfg, model


def _onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


needs_onnx = pytest.mark.skipif(not _onnx_available(), reason='onnx / onnxruntime not installed')


@pytest.mark.parametrize('size, out', [((16, 16), 3), ((7, 5), 6), ((2, 3), 6),
                                       ((13, 29), (3, 1)), ((1, 1), 2)])
def test_adaptive_pooling_as_matmul_equals_adaptive_pooling(size, out):
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    torch.testing.assert_close(AdaptiveAvgPoolAsMatmul(out)(x), nn.AdaptiveAvgPool2d(out)(x),
                               rtol=1e-12, atol=1e-12)


def test_segmentation_graph_equals_mmseg_inference():
    cfg, model = _build(SEG_DEMO, TINY_SEG)
    image = deploy.example_input((72, 100))
    with torch.no_grad():
        data = model.data_preprocessor(dict(inputs=[image[0]]))
        meta = dict(img_shape=(72, 100), ori_shape=(72, 100), pad_shape=(72, 100))
        want = model.encode_decode(data['inputs'], [meta])
        got, = deploy.ExportGraph(model, 'mmseg').eval()(image)
    assert got.shape == (1, 4, 72, 100)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_detection_graph_equals_the_detectors_features():
    cfg, model = _build(DET_DEMO, TINY_DET)
    image = deploy.example_input((64, 96))
    with torch.no_grad():
        data = model.data_preprocessor(dict(inputs=[image[0]]))
        want = model.extract_feat(data['inputs'])
        got = deploy.ExportGraph(model, 'mmdet').eval()(image)
    assert [tuple(g.shape) for g in got] == [(1, 256, 16, 24), (1, 256, 8, 12), (1, 256, 4, 6),
                                             (1, 256, 2, 3), (1, 256, 1, 2)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_mask2former_segmentors_are_refused_with_a_reason():
    class Head(nn.Module):
        pass

    Head.__name__ = 'Mask2FormerHead'
    model = nn.Module()
    model.decode_head = Head()
    with pytest.raises(NotImplementedError, match='Mask2FormerHead'):
        deploy.ExportGraph(model, 'mmseg')


@needs_onnx
@pytest.mark.parametrize('exporter', ['dynamo', 'torchscript'])
def test_dynamic_segmentor_export_runs_at_unseen_sizes(tmp_path, exporter):
    cfg, model = _build(SEG_DEMO, TINY_SEG)
    graph = deploy.ExportGraph(model, 'mmseg').eval()
    path = str(tmp_path / 'seg.onnx')
    deploy.export_onnx(graph, deploy.example_input((256, 256)), path, dynamic=True,
                       exporter=exporter, output_names=['logits'])
    report = deploy.graph_report(path)
    assert report['domains'] == ['ai.onnx'] and report['control_flow'] == []
    for batch, size in ((2, (100, 164)), (1, (45, 77)), (1, (32, 32))):
        inputs = deploy.example_input(size, batch=batch, seed=batch)
        for check in deploy.compare_onnx(path, graph, inputs):
            assert check.shape == (batch, 4, *size)
            assert check.rel < 1e-4, check


def test_flop_count_of_a_detector_equals_the_count_with_mmdets_swin():
    """The backbone must count what mmdet's Swin counts (the rest of the detector is shared)."""
    counts = []
    for backbone in ('SwinBackbone', 'SwinTransformer'):
        cfg, model = _build(DET_DEMO, {**TINY_DET, 'model.backbone.type': backbone})
        result = deploy.model_complexity(model, 'mmdet', (96, 128), show_table=False)
        counts.append((result['flops'], result['params']))
    (ours_flops, ours_params), (ref_flops, ref_params) = counts
    assert ours_params == ref_params
    assert abs(ours_flops - ref_flops) <= 0.01 * ref_flops, counts


@pytest.mark.slow
@needs_onnx
def test_export_tool_writes_and_checks_a_dynamic_detector(tmp_path):
    out = tmp_path / 'det.onnx'
    options = [f'{k}={v}'.replace(' ', '') for k, v in TINY_DET.items()]
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'export.py'), DET_DEMO, '--out', str(out),
         '--shape', '256', '320', '--dynamic', '--cfg-options', *options],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.is_file() and 'ok: onnxruntime equals PyTorch' in proc.stdout
    assert 'input (2, 3, 352, 480)' in proc.stdout  # checked at another size, batch 2


@pytest.mark.slow
def test_get_flops_tool_prints_the_table(tmp_path):
    options = [f'{k}={v}'.replace(' ', '') for k, v in TINY_SEG.items()]
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'get_flops.py'), SEG_DEMO, '--shape', '64',
         '--cfg-options', *options], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'Flops:' in proc.stdout and 'Params:' in proc.stdout and 'backbone' in proc.stdout
