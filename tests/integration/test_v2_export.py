"""SwinV2Backbone leaves eager PyTorch as V1 does: torch.jit.trace, torch.export with symbolic
sizes, both ONNX exporters (run in onnxruntime at sizes never seen while exporting) and
mmengine's FLOP counter, at a reduced width with the published window pattern (16, 16, 16, 8)
and pretrained windows (12, 12, 12, 6). The helpers are V1's (test_export.py)."""
from __future__ import annotations

import collections

import pytest
import torch

from swin_dense import SwinV2Backbone
from swin_peers import randomize
from test_export import (EXPORT_SIZE, ONNX_SIZES, assert_levels_close, check_onnx, complexity,
                         eager, export_onnx, export_with_dims, image)

NARROW_V2 = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                 window_size=[16, 16, 16, 8], pretrained_window_sizes=[12, 12, 12, 6],
                 drop_path_rate=0.0)


@pytest.fixture(scope='module')
def narrow_v2() -> SwinV2Backbone:
    model = randomize(SwinV2Backbone(**NARROW_V2), 0)
    with torch.no_grad():  # logit scales spread over [1, 3]; one head past the clamp
        for i, (name, p) in enumerate(n for n in model.named_parameters()
                                      if n[0].endswith('logit_scale')):
            p.copy_(torch.linspace(1.0, 3.0, p.numel()).view_as(p) + (2.0 if i == 0 else 0.0))
    return model.eval()


def test_trace_runs_at_other_sizes(narrow_v2):
    traced = torch.jit.trace(narrow_v2, image(1, 256, 256), check_trace=False)
    for batch, h, w in [(1, 320, 448), (2, 97, 130), (1, 64, 96), (1, 7, 9)]:
        x = image(batch, h, w, seed=h)
        with torch.no_grad():
            assert_levels_close(traced(x), eager(narrow_v2, x), 1e-5)


def test_export_with_dims_equals_eager_at_unseen_sizes(narrow_v2):
    program = export_with_dims(narrow_v2)
    assert len(program.range_constraints) == 3
    module = program.module()
    for batch, h, w in [(1, 320, 448), (3, 301, 333), (1, 257, 900)]:
        x = image(batch, h, w, seed=w)
        assert_levels_close(module(x), eager(narrow_v2, x), 1e-5)


@pytest.mark.parametrize('dynamo', [pytest.param(True, marks=pytest.mark.slow), False],
                         ids=['dynamo', 'torchscript'])  # dynamo: about a minute on 2 cores
def test_onnx_export_runs_in_onnxruntime_at_unseen_sizes(narrow_v2, dynamo):
    pytest.importorskip('onnxruntime')
    proto = export_onnx(narrow_v2, dynamo)
    check_onnx(proto, narrow_v2, ONNX_SIZES)
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    # the bias MLP was folded or runs as plain ops; the cosine normalisation is plain algebra
    assert ops['Softmax'] == sum(NARROW_V2['depths'])


def test_flop_count_covers_every_product():
    """mmengine's counter (what tools/get_flops.py reports) on the traced plain path: at least
    the multiply-adds of every projection, attention product, MLP, merging and bias MLP of
    the window grid, and not much more (norms and element-wise ops)."""
    model = SwinV2Backbone(**NARROW_V2).eval()
    h, w = EXPORT_SIZE
    flops, params = complexity(model, (h, w))
    assert params == sum(p.numel() for p in model.parameters())
    expected = 3 * 16 * model.embed_dims * (h // 4) * (w // 4)  # patch embedding
    hh, ww = h // 4, w // 4
    for i, stage in enumerate(model.stages):
        C, M = model.num_features[i], model.window_sizes[i]
        slots = -(-hh // M) * M * -(-ww // M) * M  # the padded grid: projections run on it
        for _ in stage.blocks:
            expected += slots * C * 4 * C + 2 * slots * M * M * C + hh * ww * 8 * C * C
            expected += (2 * M - 1) ** 2 * 512 * (2 + model.num_heads[i])
        if stage.downsample is not None:
            hh, ww = -(-hh // 2), -(-ww // 2)
            expected += hh * ww * 4 * C * 2 * C
    assert expected <= flops <= 1.05 * expected, (flops, expected)
