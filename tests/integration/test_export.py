"""Leaving eager PyTorch: tracing, torch.export, both ONNX exporters (run in onnxruntime) and
mmengine's FLOP counter, on the plain path that graph capture takes automatically.

The default suite uses a reduced-width Swin (every block kind, all four stages); the size sweep
with Swin-T is marked slow. Exports are made at one size and checked at sizes never seen while
exporting, padded ones and maps smaller than a window included.
"""
from __future__ import annotations

import collections
import io
import warnings

import pytest
import torch

from swin_dense import SwinBackbone
from swin_peers import NARROW, TINY, randomize

#: Where every stage has at least two windows a side: graph capture specialises a size that is
#: 1 in the example (PyTorch's 0/1 specialisation), so exports are made at a size like this one.
EXPORT_SIZE = (480, 672)
#: Sizes never used while exporting: padded ones, a map smaller than a window, a large one.
ONNX_SIZES = [(1, 801, 1333), (1, 200, 328), (1, 64, 96), (1, 1024, 1024), (2, 200, 328),
              (1, 7, 9)]
REL = 1e-4


def build(shape: dict, seed: int = 0) -> SwinBackbone:
    torch.manual_seed(seed)
    return randomize(SwinBackbone(**shape, drop_path_rate=0.0), seed).eval()


def image(batch: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def eager(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(x)


def assert_levels_close(got, expected, rel: float) -> None:
    """Every output level within ``rel`` of the level's largest value, shapes equal."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        g = torch.as_tensor(g)
        assert tuple(g.shape) == tuple(e.shape)
        assert (g - e).abs().max().item() <= rel * e.abs().max().item(), (g - e).abs().max()


@pytest.fixture(scope='module')
def narrow() -> SwinBackbone:
    return build(NARROW)


# ---------------------------------------------------------------- torch.jit.trace

def trace_and_check(model: SwinBackbone, sizes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter('error', torch.jit.TracerWarning)  # nothing frozen silently
        traced = torch.jit.trace(model, image(1, 224, 224), check_trace=False)
    for batch, h, w in sizes:
        x = image(batch, h, w, seed=h)
        with torch.no_grad():
            assert_levels_close(traced(x), eager(model, x), 1e-5)


def test_trace_at_224_runs_at_other_sizes(narrow):
    trace_and_check(narrow, [(1, 320, 448), (2, 97, 130), (1, 64, 96)])


# ---------------------------------------------------------------- torch.export

def export_with_dims(model: SwinBackbone) -> torch.export.ExportedProgram:
    # from one side above padding_free_multiple up, every stage has two windows a side or more
    side = torch.export.Dim
    low = model.padding_free_multiple + 1
    dims = {0: side('batch', min=1, max=64), 2: side('height', min=low, max=4096),
            3: side('width', min=low, max=4096)}
    return torch.export.export(model, (image(2, *EXPORT_SIZE),), dynamic_shapes={'x': dims})


def test_export_with_dims_equals_eager_at_unseen_sizes(narrow):
    program = export_with_dims(narrow)
    assert len(program.range_constraints) == 3  # batch, height and width stay symbolic
    module = program.module()
    for batch, h, w in [(1, 320, 448), (3, 301, 333), (1, 225, 900)]:
        x = image(batch, h, w, seed=w)
        assert_levels_close(module(x), eager(narrow, x), 1e-5)


@pytest.mark.parametrize('shape, names', [((1, 3, 480, 672), 'batch 1'),
                                           ((2, 3, 224, 480), 'height 224')])
def test_export_from_an_example_that_specialises_warns(narrow, shape, names):
    """A batch of 1, or a side with one window a side in the last stage, would be fixed in the
    exported graph: the export says so (made an error here, which stops it at once)."""
    dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='exporting SwinBackbone')
        with pytest.raises(UserWarning, match=f'example with {names}: .* batch >= 2'):
            torch.export.export(narrow, (image(*shape[:1], *shape[2:]),),
                                dynamic_shapes={'x': dims})


# ---------------------------------------------------------------- ONNX

onnx = pytest.importorskip('onnx', reason='onnx is not installed (pip install onnx)')
ort = pytest.importorskip('onnxruntime', reason='onnxruntime is not installed')

OUTPUTS = [f'stage{i}' for i in range(1, 5)]


def export_onnx(model: SwinBackbone, dynamo: bool):
    x = image(2, *EXPORT_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the exporters' own deprecation notes
        if dynamo:
            program = torch.onnx.export(
                model, (x,), dynamo=True, input_names=['x'], output_names=OUTPUTS,
                dynamic_shapes={'x': {0: 'batch', 2: 'height', 3: 'width'}}, verbose=False)
            return program.model_proto
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=['x'],
                          output_names=OUTPUTS, opset_version=17,
                          dynamic_axes={'x': {0: 'batch', 2: 'height', 3: 'width'}})
        return onnx.load_from_string(buffer.getvalue())


def check_onnx(proto, model: SwinBackbone, sizes) -> None:
    onnx.checker.check_model(proto, full_check=True)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]  # b, 3, h, w
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    assert {node.domain for node in proto.graph.node} <= {''}  # standard ONNX only
    assert not {'If', 'Loop', 'Scan'} & set(ops), ops
    assert not any('Attention' in op for op in ops)  # MatMul + Softmax: any runtime has them
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=['CPUExecutionProvider'])
    for batch, h, w in sizes:
        x = image(batch, h, w, seed=h + w)
        assert_levels_close(session.run(None, {'x': x.numpy()}), eager(model, x), REL)


@pytest.mark.parametrize('dynamo', [True, False], ids=['dynamo', 'torchscript'])
def test_onnx_export_runs_in_onnxruntime_at_unseen_sizes(narrow, dynamo):
    check_onnx(export_onnx(narrow, dynamo), narrow, ONNX_SIZES)


# ---------------------------------------------------------------- FLOP counting

def complexity(model: torch.nn.Module, size) -> tuple[int, int]:
    from mmengine.analysis import get_model_complexity_info

    class Wrapped(torch.nn.Module):  # mmdet's SwinTransformer.train() returns None
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    result = get_model_complexity_info(Wrapped(model), inputs=(image(1, *size),),
                                       show_table=False, show_arch=False)
    return result['flops'], result['params']


def check_complexity(shape: dict, sizes, ours: SwinBackbone | None = None
                     ) -> list[tuple[int, int]]:
    mmdet_backbones = pytest.importorskip('mmdet.models.backbones')
    ours = SwinBackbone(**shape).eval() if ours is None else ours
    peer = mmdet_backbones.SwinTransformer(**shape)
    peer.eval()
    counts = []
    for size in sizes:
        (flops, params), (peer_flops, peer_params) = complexity(ours, size), complexity(peer, size)
        assert abs(flops - peer_flops) <= 0.01 * peer_flops, (size, flops, peer_flops)
        assert params == peer_params
        counts.append((flops, params))
    return counts


def test_flops_and_parameters_equal_mmdet(narrow):
    x = image(1, 97, 130)
    before = eager(narrow, x)
    check_complexity(NARROW, [(224, 224), (800, 1344)], narrow)
    # the counter traced the plain path; the eager path gives what it gave before (the same
    # computation: bit-identical)
    assert_levels_close(eager(narrow, x), before, 0)


# ---------------------------------------------------------------- the size sweep (Swin-T)

@pytest.fixture(scope='module')
def swin_t() -> SwinBackbone:
    return build(TINY)


@pytest.mark.slow
def test_swin_t_counts_what_mmdet_counts():
    (flops_224, params), _ = check_complexity(TINY, [(224, 224), (800, 1344)])
    assert abs(flops_224 - 4.511e9) <= 0.01 * 4.511e9 and params == 27_520_698


@pytest.mark.slow
def test_swin_t_trace_sweep(swin_t):
    trace_and_check(swin_t, [(1, 320, 448), (2, 200, 328), (1, 801, 1333), (1, 64, 96),
                             (1, 1, 1)])


@pytest.mark.slow
def test_swin_t_export_sweep(swin_t):
    module = export_with_dims(swin_t).module()
    for batch, h, w in [(1, 320, 448), (2, 225, 225), (1, 801, 1333), (1, 1024, 1024)]:
        x = image(batch, h, w, seed=h)
        assert_levels_close(module(x), eager(swin_t, x), 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('dynamo', [True, False], ids=['dynamo', 'torchscript'])
def test_swin_t_onnx_sweep(swin_t, dynamo):
    check_onnx(export_onnx(swin_t, dynamo), swin_t,
               ONNX_SIZES + [(1, 512, 512), (1, 32, 1024), (4, 97, 130), (1, 1344, 800)])
