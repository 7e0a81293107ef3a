"""The CUDA paths (SDPA attention, autocast) against mmdet's Swin on the same GPU.

Skipped where no GPU is present (CI has none); on a GPU machine:

    python -m pytest tests/test_cuda.py -v -s

fp32 here means fp32: TF32 is switched off for matrix products and convolutions, for both
models alike (PyTorch allows it in cuDNN convolutions by default, which would put ~1e-3 into
the patch embedding of both). Under autocast the two models round differently, so each is
compared with the fp32 forward of the same weights, and ours must stay as close to it as the
peer does.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from swin_dense import SwinBackbone
from numerics import grad_error, rel
from swin_peers import ATOL, TINY, peer_and_ours

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
mmdet_backbones = pytest.importorskip('mmdet.models.backbones')
DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cuda_pair(tmp_path, **kwargs):
    peer, ours = peer_and_ours(tmp_path, mmdet_backbones.SwinTransformer, TINY, True, **kwargs)
    return peer.cuda(), ours.cuda()


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
    return cuda_pair(tmp_path_factory.mktemp('cuda'))


def image(batch: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed)).cuda()


def grads(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None = None,
          seed: int = 7) -> dict[str, torch.Tensor]:
    """Train-mode gradients of a fixed random projection of the outputs: the input's under
    ``'input'``, every parameter's by name."""
    model.train()
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same stochastic-depth draws, in the same order
    with torch.autocast('cuda', dtype=dtype or torch.float32, enabled=dtype is not None):
        outs = model(x)
    g = torch.Generator(device='cuda').manual_seed(3)
    loss = sum((o.float() * torch.randn(o.shape, generator=g, device='cuda')).sum()
               / o.numel() ** 0.5 for o in outs)
    loss.backward()
    model.eval()
    return {'input': x.grad, **{n: p.grad for n, p in model.named_parameters()
                                if p.grad is not None}}


@pytest.mark.parametrize('batch', [1, 2])  # one image: the per-window bias without a copy
@pytest.mark.parametrize('size', [(224, 224), (511, 511), (112, 137), (800, 1333), (7, 7),
                                  (1, 1)])
def test_fp32_outputs_equal_mmdet(pair, size, batch):
    peer, ours = pair
    x = image(batch, size, seed=0)
    with torch.no_grad():
        expected, got = peer(x), ours(x)
    for e, g in zip(expected, got, strict=True):
        assert e.shape == g.shape and g.is_cuda
        assert (e - g).abs().max().item() <= ATOL


@pytest.mark.parametrize('drop_path_rate,batch', [(0.0, 1), (0.0, 2), (0.2, 2)])
def test_fp32_train_gradients_equal_mmdet(tmp_path, drop_path_rate, batch):
    peer, ours = cuda_pair(tmp_path, drop_path_rate=drop_path_rate)
    x = image(batch, (112, 137), seed=3)
    expected, got = grads(peer, x), grads(ours, x)
    assert expected.keys() == got.keys() and len(got) > 100
    for name, e in expected.items():
        assert (e - got[name]).abs().max().item() <= ATOL * max(e.abs().max().item(), 1), name


def test_moved_to_the_gpu_after_a_cpu_run(tmp_path):
    """The eval bias cache filled on the CPU must not follow the model to the GPU."""
    peer, ours = peer_and_ours(tmp_path, mmdet_backbones.SwinTransformer, TINY, True)
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        on_cpu = ours(x)
        ours.cuda()
        on_gpu = ours(x.cuda())
    for c, g in zip(on_cpu, on_gpu, strict=True):
        assert g.is_cuda and (c - g.cpu()).abs().max().item() <= ATOL


@pytest.mark.parametrize('dtype', DTYPES, ids=['fp16', 'bf16'])
def test_autocast_forward_as_close_to_fp32_as_mmdet(pair, dtype):
    peer, ours = pair
    x = image(1, (800, 1333), seed=1)
    with torch.no_grad():
        ref = ours(x)
        with torch.autocast('cuda', dtype=dtype):
            got, expected = ours(x), peer(x)
    for g, e, r in zip(got, expected, ref, strict=True):
        assert g.dtype == e.dtype and torch.isfinite(g).all()
        assert rel(g, r) <= max(1.5 * rel(e, r), 1e-3), (rel(g, r), rel(e, r))
    print(f'\n{dtype}: relative error to fp32, ours / mmdet: ' + ', '.join(
        f'{rel(g, r):.1e}/{rel(e, r):.1e}' for g, e, r in zip(got, expected, ref)))


@pytest.mark.parametrize('dtype', DTYPES, ids=['fp16', 'bf16'])
def test_autocast_gradients_as_close_to_fp32_as_mmdet(tmp_path, dtype):
    peer, ours = cuda_pair(tmp_path, drop_path_rate=0.0)
    x = image(1, (224, 352), seed=2)
    ref = grads(ours, x)
    got, expected = grads(ours, x, dtype), grads(peer, x, dtype)
    assert all(torch.isfinite(g).all() for g in got.values())
    assert all(got[n].dtype == torch.float32 for n in got if n != 'input')  # fp32 master weights
    ours_error, mmdet_error = grad_error(got, ref), grad_error(expected, ref)
    assert ours_error <= max(1.5 * mmdet_error, 1e-3), (ours_error, mmdet_error)
    print(f'\n{dtype}: gradient relative error to fp32, ours {ours_error:.1e}, '
          f'mmdet {mmdet_error:.1e}')


def test_half_model_runs_and_stays_close(pair):
    """``model.half()`` with an fp16 image (deployment without autocast)."""
    peer, ours = pair
    x = image(1, (224, 320), seed=5)
    with torch.no_grad():
        ref = ours(x)
        half = SwinBackbone(**TINY).cuda().eval()
        half.load_state_dict(ours.state_dict())
        got = half.half()(x.half())
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == torch.float16 and torch.isfinite(g).all()
        assert rel(g, r) <= 1e-2


@pytest.mark.parametrize('dtype', [None, torch.float16], ids=['fp32', 'fp16'])
def test_inference_peak_memory_not_above_mmdet(tmp_path, dtype):
    """Peak GPU memory of an inference at 512x512: ours attends without the probabilities and
    keeps no per-window bias between forwards. Both first run a small image, so that neither
    pays for what the process allocates once (the cuBLAS workspace)."""
    peer, ours = cuda_pair(tmp_path)
    x = image(1, (512, 512), seed=6)

    def infer(model: torch.nn.Module, inputs: torch.Tensor) -> None:
        with torch.no_grad(), torch.autocast('cuda', dtype=dtype or torch.float32,
                                             enabled=dtype is not None):
            model(inputs)

    peaks = {}
    for name, model in (('mmdet', peer), ('ours', ours)):
        infer(model, image(1, (64, 64), seed=7))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        infer(model, x)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
    print(f'\n{dtype}: inference peak MiB, ours {peaks["ours"] / 2**20:.1f}, '
          f'mmdet {peaks["mmdet"] / 2**20:.1f}')
    assert peaks['ours'] <= peaks['mmdet'], peaks


def test_benchmark_in_process_measures_memory_in_its_own_process(monkeypatch):
    """``tools/benchmark.py --device cuda --in-process`` measures peak memory without child
    processes (each spends 15-20 s importing the toolkits on a GPU machine); both figures come out
    and ours is not above mmdet's, inference and train step."""
    path = Path(__file__).resolve().parents[1] / 'tools' / 'benchmark.py'
    spec = importlib.util.spec_from_file_location('swin_dense_benchmark', path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)

    def no_child(*args, **kwargs):
        raise AssertionError(f'a child process was started: {args}')

    monkeypatch.setattr(benchmark, 'run_child', no_child)
    result = benchmark.main(['--device', 'cuda', '--in-process', '--cases', '512x512 b1',
                             '--repeats', '1'])
    assert [row['mode'] for row in result['cases']] == ['infer', 'train']
    for row in result['cases']:
        assert 0 < row['ours_mib'] <= row['mmdet_mib'], row
