"""SwinV2Backbone against three independent Swin V2 implementations, through files they wrote.

The references (tests/fixtures/v2/, written by timm 1.0.31, torchvision 0.29.1 and mmpretrain
1.2.0 with every parameter randomised; see tests/fixtures/README.md) are loaded the way a user
loads them: the peer's own weights file through ``swin_dense.checkpoint.load_pretrained``.

- timm (``always_partition=True``): stage outputs on maps that are multiples of the window, at
  window 8, window (16, 16, 16, 8), and window 16 with pretrained windows (12, 12, 12, 6);
- mmpretrain (``pad_small_map=True``): the normalised outputs at padded sizes (200 x 328,
  37 x 61, batch 2), where the window machinery pads, rolls and masks;
- torchvision: stages 1-3 (its stage 4 skips the shift where a padded side is one window, which a
  dense backbone does not);
- float64 cases with logit scales past the clamp at log 100.
Each runs with the fast path and with the plain path (what export and compile use).
"""
from pathlib import Path

import pytest
import torch

from swin_dense import SwinV2Backbone
from swin_dense.checkpoint import load_pretrained
from swin_dense.ops import cpu_fast

FIXTURES = Path(__file__).resolve().parents[1] / 'fixtures' / 'v2'
REDUCED = dict(embed_dims=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)
#: float32: two correct implementations differ by reordered sums (the peers among themselves by
#: up to 2.1e-6 relative); float64 with heads at the clamp: 5e-13 between the peers.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.fixture(params=[True, False], ids=['fast', 'plain'])
def fast(request):
    with cpu_fast.enabled(request.param):
        yield request.param


def reference(name: str) -> dict:
    return torch.load(FIXTURES / name, weights_only=True)


def case_input(case: dict) -> torch.Tensor:
    image = reference('input.pt')['image']
    crops = [image[:, :, t:t + h, l:l + w] for t, l, h, w in case['input']['boxes']]
    return torch.cat(crops).to(dtype_of(case))


def dtype_of(case: dict) -> torch.dtype:
    return getattr(torch, str(case['dtype']).split('.')[-1])


def model_from(weights: str, case: dict, tmp_path: Path, window_size, pretrained_windows,
               drop_tables: bool = False) -> SwinV2Backbone:
    """Our backbone for a reference case: the peer's file with the case's overrides, loaded
    through load_pretrained (``drop_tables``: the peer rebuilt its coordinate tables from its
    arguments, as mmpretrain does on loading)."""
    checkpoint = torch.load(FIXTURES / weights, weights_only=True)
    state = checkpoint.get('state_dict', checkpoint)
    state = {**state, **case['state_overrides']}
    if drop_tables:
        state = {k: v for k, v in state.items() if not k.endswith('relative_coords_table')}
    path = tmp_path / 'weights.pth'
    torch.save(state, path)
    model = SwinV2Backbone(**REDUCED, window_size=window_size,
                           pretrained_window_sizes=pretrained_windows)
    load_pretrained(model, path)
    return model.eval().to(dtype_of(case))


def stage_outputs(model: SwinV2Backbone, x: torch.Tensor) -> list:
    """Each stage's output before its norm, NCHW (what timm and torchvision return)."""
    x, hw = model.embed(x)
    outs = []
    for stage in model.stages:
        x, next_hw, out, out_hw = stage(x, hw)
        outs.append(out.transpose(1, 2).reshape(out.shape[0], -1, *out_hw))
        hw = next_hw
    return outs


def assert_close(got, expected, dtype, stages=None) -> None:
    stages = range(len(expected)) if stages is None else stages
    for i in stages:
        assert got[i].shape == expected[i].shape, i
        error = (got[i] - expected[i]).abs().max() / expected[i].abs().max()
        assert error <= TOLERANCE[dtype], f'stage {i + 1}: relative error {error:.2e}'


def case_names(file: str) -> list:
    return [case['name'] for case in reference(file)['cases']]


def find_case(file: str, name: str) -> dict:
    return next(c for c in reference(file)['cases'] if c['name'] == name)


@pytest.mark.parametrize('name', case_names('timm_swinv2_ref.pt'))
def test_stage_outputs_equal_timm(name, fast, tmp_path):
    case = find_case('timm_swinv2_ref.pt', name)
    kwargs = case['kwargs']
    model = model_from('timm_swinv2.pth', case, tmp_path, kwargs['window_size'],
                       kwargs['pretrained_window_sizes'])
    with torch.no_grad():
        got = stage_outputs(model, case_input(case))
    assert_close(got, case['outputs'], dtype_of(case))


@pytest.mark.parametrize('name', case_names('mmpretrain_swinv2_ref.pt'))
def test_outputs_equal_mmpretrain_at_padded_sizes(name, fast, tmp_path):
    case = find_case('mmpretrain_swinv2_ref.pt', name)
    kwargs = case['kwargs']
    model = model_from('mmpretrain_swinv2.pth', case, tmp_path, kwargs['window_size'],
                       kwargs['pretrained_window_sizes'], drop_tables=True)
    x = case_input(case)
    with torch.no_grad():
        got, stages = model(x), stage_outputs(model, x)
    assert_close(got, case['outputs'], dtype_of(case))
    assert_close(stages, case['stage_outputs'], dtype_of(case))


@pytest.mark.parametrize('name', case_names('torchvision_swinv2_ref.pt'))
def test_torchvision_weights_give_torchvision_stages(name, fast, tmp_path):
    case = find_case('torchvision_swinv2_ref.pt', name)
    model = model_from('torchvision_swinv2.pth', case, tmp_path, 8, (0, 0, 0, 0))
    comparable = [i for i, stage in enumerate(case['stages']) if stage['same_as_pad_then_roll']]
    assert comparable == [0, 1, 2]
    with torch.no_grad():
        got = stage_outputs(model, case_input(case))
    assert_close(got, case['outputs'], dtype_of(case), comparable)


def test_the_official_file_gives_timm_outputs(fast, tmp_path):
    """The official layout of the same weights (its stored tables: window 8 pretrained at 8)."""
    case = find_case('timm_swinv2_ref.pt', 'w8/256x512')
    model = SwinV2Backbone(**REDUCED, window_size=8)
    load_pretrained(model, FIXTURES / 'official_swinv2_w8.pth')
    with torch.no_grad():
        got = stage_outputs(model.eval(), case_input(case))
    assert_close(got, case['outputs'], torch.float32)
