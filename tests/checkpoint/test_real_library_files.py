"""Files written by the REAL timm and torchvision load and give those libraries' features.

CI cannot install timm / torchvision beside its torch, so ``tests/fixtures/`` ships tiny models
saved by the real libraries, with the features those libraries computed (NHWC, no norm), made by
``tests/fixtures/make_fixtures.py`` (see its docstring: geometry, versions, how to regenerate).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from swin_dense.checkpoint import detect_format, load_pretrained, read_checkpoint
from swin_dense.checkpoint import formats as formats_mod
from swin_reference import TOL, assert_close, features, max_diff, small_model

FIXTURES = Path(__file__).resolve().parents[1] / 'fixtures'


def _import_or_skip(name):
    """``pytest.importorskip`` that also skips a broken install (torchvision's missing nms op)."""
    import importlib
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - ImportError, RuntimeError from C++ op registration
        pytest.skip(f'{name} not importable: {type(e).__name__}: {e}')


def _fixture(lib):
    """(input crop, reference dict) of ``tests/fixtures/{lib}_swin_ref.pt``."""
    ref = torch.load(FIXTURES / f'{lib}_swin_ref.pt', map_location='cpu', weights_only=True)
    image = torch.load(FIXTURES / 'input.pt', map_location='cpu', weights_only=True)['input']
    assert ref['meta']['library'] == lib and ref['meta']['layout'] == 'NHWC'
    h, w = ref['meta']['input_crop']
    return image[..., :h, :w], ref


def _fixture_window(meta):
    window = meta['kwargs']['window_size']
    return window if isinstance(window, int) else window[0]


def _fixture_model(path, meta):
    """SwinBackbone shaped like the fixture's model, loaded through init_cfg + init_weights()."""
    kw = meta['kwargs']
    return small_model(path, embed_dims=kw['embed_dim'], depths=tuple(kw['depths']),
                       num_heads=tuple(kw['num_heads']), window_size=_fixture_window(meta))


def _comparable_stages(meta):
    """Stages whose windowing the library did exactly as SwinBackbone (mmdet / mmseg) does.

    SwinBackbone always uses the full window and shifts every odd block by window // 2, padding
    bottom/right BEFORE the roll. timm / torchvision drop the shift where the (padded) map is
    not larger than the window, timm also clamps the window to the map, and timm rolls before
    padding (README, "Behaviour choices"). ``meta['stages']`` records what the library applied.
    """
    window = _fixture_window(meta)
    keep = []
    for i, st in enumerate(meta['stages']):
        ours = [[0, 0] if j % 2 == 0 else [window // 2] * 2 for j in range(len(st['shifts']))]
        same = st['shifts'] == ours and all(w == [window, window] for w in st['windows'])
        shifted = any(any(s) for s in st['shifts'])
        padded = any(side % window for side in st['map_hw'])
        if shifted and padded and not meta['pad_before_roll']:
            same = False
        if same:
            keep.append(i)
    return keep


def _outputs_and_stage_outputs(model, x):
    """Our outputs (after norm{i}) and the stage outputs BEFORE norm{i}, NCHW, in one forward.

    timm / torchvision have no per-output norms; the loader sets ours to weight 1, bias 0, which
    still normalises, so the raw stage outputs are taken from norm{i}'s input.
    """
    raw = {}
    hooks = [getattr(model, f'norm{i}').register_forward_pre_hook(
        lambda module, args, i=i: raw.__setitem__(i, args[0])) for i in model.out_indices]
    try:
        outs = features(model, x)
    finally:
        for hook in hooks:
            hook.remove()
    pre = [raw[i].reshape(o.shape[0], o.shape[2], o.shape[3], o.shape[1]).permute(0, 3, 1, 2)
           for i, o in zip(model.out_indices, outs)]
    return outs, pre


def _check_against_fixture(model, x, ref, compared):
    """Compared stages to <= TOL (raw and normalised); the others only load, right shapes."""
    outs, pre = _outputs_and_stage_outputs(model, x)
    refs = [r.permute(0, 3, 1, 2) for r in ref['outputs']]  # the libraries' NHWC -> NCHW
    assert [tuple(o.shape) for o in outs] == [tuple(r.shape) for r in refs]
    for i in range(len(model.out_indices)):
        norm = getattr(model, f'norm{i}')
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
        assert torch.isfinite(outs[i]).all()
    assert_close([pre[i] for i in compared], [refs[i] for i in compared])
    normed = [F.layer_norm(r.permute(0, 2, 3, 1), (r.shape[1],)).permute(0, 3, 1, 2) for r in refs]
    assert_close([outs[i] for i in compared], [normed[i] for i in compared])
    return outs, pre


def test_real_timm_file():
    """timm 1.0 file (``torch.save(model.state_dict())`` and safetensors) vs timm's own features.

    Stages 0-1 shift on 16 x 16 / 8 x 8 maps (window 4), stage 2 (map = window) has one
    unshifted block: compared. Stage 3 (map 2) is where timm clamps the window to 2 (and its
    3 x 3 table is resized to our window 4): it has to load, not to match.
    """
    x, ref = _fixture('timm')
    meta = ref['meta']
    compared = _comparable_stages(meta)
    assert compared == [0, 1, 2]
    assert meta['stages'][3]['windows'] == [[2, 2]]  # timm's clamp: why stage 3 is not compared

    pth, st = FIXTURES / 'timm_swin.pth', FIXTURES / 'timm_swin.safetensors'
    assert detect_format(read_checkpoint(pth)) == 'timm'
    assert detect_format(read_checkpoint(st)) == 'timm'
    from_pth, from_st = _fixture_model(pth, meta), _fixture_model(st, meta)
    outs, pre = _check_against_fixture(from_pth, x, ref, compared)
    outs_st, pre_st = _check_against_fixture(from_st, x, ref, compared)
    # the two files hold the same tensors: the same values load (the same copies, bit for bit),
    # and the features agree to float32 rounding (two model instances, two forward passes)
    st_state = from_st.state_dict()
    assert all(torch.equal(v, st_state[k]) for k, v in from_pth.state_dict().items())
    assert_close([*outs, *pre], [*outs_st, *pre_st])

    report = load_pretrained(_fixture_model(None, meta), st)
    assert report.format == 'timm' and not report.mismatched and not report.unexpected
    assert sorted(report.expected_missing) == sorted(f'norm{i}.{p}' for i in range(4)
                                                     for p in ('weight', 'bias'))
    assert list(report.resized) == ['stages.3.blocks.0.attn.w_msa.relative_position_bias_table']
    assert {'head.fc.weight', 'head.fc.bias', 'norm.weight', 'norm.bias'} <= set(report.unused)


def test_real_torchvision_file():
    """torchvision file vs torchvision's own ``model.features`` stage outputs, all four stages.

    The 52 x 52 input gives maps 13, 7, 4, 2: stages 0, 1 and 3 pad bottom/right to the window
    (torchvision pads before rolling, as we do) and 13 -> 7 -> 4 merge odd maps; stages 0-1
    shift, stages 2-3 have one unshifted block each (torchvision pads map 2 up to the window
    rather than clamping it).
    """
    x, ref = _fixture('torchvision')
    meta = ref['meta']
    compared = _comparable_stages(meta)
    assert compared == [0, 1, 2, 3]
    padded = [i for i, st in enumerate(meta['stages'])
              if any(side % _fixture_window(meta) for side in st['map_hw'])]
    assert padded == [0, 1, 3]

    path = FIXTURES / 'torchvision_swin.pth'
    assert detect_format(read_checkpoint(path)) == 'torchvision'
    _check_against_fixture(_fixture_model(path, meta), x, ref, compared)
    report = load_pretrained(_fixture_model(None, meta), path)
    assert report.format == 'torchvision' and not report.mismatched and not report.resized
    assert any(k.endswith('relative_position_index') for k in report.unused)


@pytest.mark.parametrize('lib', ['timm', 'torchvision'])
def test_real_library_file_detects_unconverted_patch_merging(lib, monkeypatch):
    """The fixture comparison is sharp: skipping the PatchMerging channel reorder is caught."""
    x, ref = _fixture(lib)
    monkeypatch.setattr(formats_mod, 'official_to_unfold_reduction', lambda w: w)
    monkeypatch.setattr(formats_mod, 'official_to_unfold_norm', lambda v: v)
    _, pre = _outputs_and_stage_outputs(_fixture_model(FIXTURES / f'{lib}_swin.pth', ref['meta']),
                                        x)
    refs = [r.permute(0, 3, 1, 2) for r in ref['outputs']]
    assert_close(pre[:1], refs[:1])  # stage 0 comes before any merging
    assert max_diff(pre[1:3], refs[1:3]) > 1.0


def _make_fixtures_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location('make_fixtures', FIXTURES / 'make_fixtures.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('lib', ['timm', 'torchvision'])
def test_installed_library_reproduces_fixture(lib):
    """Live path (skips without the library): the installed timm / torchvision still loads the
    shipped weights strictly and computes the shipped reference features."""
    _import_or_skip(lib)
    make = _make_fixtures_module()
    _, ref = _fixture(lib)
    build, reference = ((make.build_timm, make.timm_reference) if lib == 'timm'
                        else (make.build_torchvision, make.torchvision_reference))
    model = build()
    model.load_state_dict(torch.load(FIXTURES / f'{lib}_swin.pth', weights_only=True))
    image = torch.load(FIXTURES / 'input.pt', weights_only=True)['input']
    live = reference(model.eval(), image)
    assert live['meta']['input_crop'] == ref['meta']['input_crop']
    assert live['meta']['stages'] == ref['meta']['stages']
    assert_close(live['outputs'], ref['outputs'])
