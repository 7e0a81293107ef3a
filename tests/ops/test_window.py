"""The window layout against a direct transcription of the official algorithm.

Partitions, merges, rolls and gathers only move values (never compute one), so both forms of
the permutation must equal the official steps exactly: ``torch.equal`` states that claim. The
mask takes the values 0 and -100 only, the bias is a gather of the table: exact as well.
"""
import pytest
import torch
import torch.nn.functional as F

from swin_dense.ops.window import (MASK_VALUE, merge_windows, partition_windows,
                                   relative_position_bias, relative_position_index, roll_grid,
                                   shift_mask, tokens_from_windows, window_layout,
                                   windows_from_tokens)


def official_windows(x, H, W, M, s):
    """pad -> roll(-s) -> partition, written out step by step as in the official code."""
    B, L, C = x.shape
    x = x.view(B, H, W, C)
    x = F.pad(x, (0, 0, 0, (M - W % M) % M, 0, (M - H % M) % M))
    Hp, Wp = x.shape[1:3]
    if s:
        x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
    x = x.view(B, Hp // M, M, Wp // M, M, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, M * M, C), Hp, Wp


def official_merge(windows, H, W, M, s):
    """The official inverse, step by step: reverse partition, roll back by +s, crop."""
    Hp, Wp = -(-H // M) * M, -(-W // M) * M
    B, C = windows.shape[0] // (Hp // M * (Wp // M)), windows.shape[-1]
    y = windows.view(B, Hp // M, Wp // M, M, M, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    return torch.roll(y, shifts=(s, s), dims=(1, 2))[:, :H, :W].reshape(B, H * W, C)


def official_mask(Hp, Wp, M, s):
    """The official slice-based construction of the SW-MSA mask."""
    img_mask = torch.zeros(1, Hp, Wp, 1)
    cnt = 0
    for h in (slice(0, -M), slice(-M, -s), slice(-s, None)):
        for w in (slice(0, -M), slice(-M, -s), slice(-s, None)):
            img_mask[:, h, w, :] = cnt
            cnt += 1
    win = img_mask.view(1, Hp // M, M, Wp // M, M, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, M * M)
    mask = win.unsqueeze(1) - win.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


SIZES = [(1, 1), (2, 3), (7, 7), (8, 13), (14, 14), (28, 35), (17, 9), (56, 56)]


@pytest.mark.parametrize('M', [7, 12, 4])
@pytest.mark.parametrize('H,W', SIZES)
def test_gather_equals_pad_roll_partition(H, W, M):
    x = torch.randn(2, H * W, 5)
    for s in (0, M // 2):
        layout = window_layout(H, W, M, s, torch.device('cpu'))
        ref, Hp, Wp = official_windows(x, H, W, M, s)
        assert torch.equal(windows_from_tokens(x, layout), ref)
        assert torch.equal(partition_windows(x, (H, W), M, s), ref)  # the plain form
        assert layout.num_windows == (Hp // M) * (Wp // M)


@pytest.mark.parametrize('H,W', SIZES)
def test_scatter_inverts_gather_with_crop(H, W):
    M = 7
    x = torch.randn(3, H * W, 4)
    for s in (0, 3):
        layout = window_layout(H, W, M, s, torch.device('cpu'))
        assert torch.equal(tokens_from_windows(windows_from_tokens(x, layout), layout), x)
        assert torch.equal(official_merge(official_windows(x, H, W, M, s)[0], H, W, M, s), x)
        # Any windows (padding slots not zero): both inverses read the same slots.
        w = torch.randn(3 * layout.num_windows, M * M, 4)
        y = official_merge(w, H, W, M, s)
        assert torch.equal(merge_windows(w, (H, W), M, s), y)
        assert torch.equal(tokens_from_windows(w, layout), y)


@pytest.mark.parametrize('M', [7, 12])
@pytest.mark.parametrize('H,W', SIZES)
def test_shift_mask_equals_official_slices(H, W, M):
    s = M // 2
    layout = window_layout(H, W, M, s, torch.device('cpu'))
    Hp, Wp = -(-H // M) * M, -(-W // M) * M
    assert torch.equal(layout.mask, official_mask(Hp, Wp, M, s))
    assert torch.equal(shift_mask(Hp, Wp, M, s), official_mask(Hp, Wp, M, s))
    assert set(layout.mask.unique().tolist()) <= {0.0, MASK_VALUE}
    assert window_layout(H, W, M, 0, torch.device('cpu')).mask is None


def test_shift_mask_hand_case():
    # 4x4 map, window 4, shift 2: one window; rows/cols split into regions {0,1} and {2,3}
    # after the shift, so token (0,0) may attend only to tokens in rows 0-1 and cols 0-1.
    layout = window_layout(4, 4, 4, 2, torch.device('cpu'))
    allowed = (layout.mask[0, 0] == 0).view(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(allowed, expected)


def test_layout_is_cached_per_size():
    a = window_layout(10, 11, 7, 3, torch.device('cpu'))
    assert window_layout(10, 11, 7, 3, torch.device('cpu')) is a
    assert window_layout(10, 12, 7, 3, torch.device('cpu')) is not a


def test_bad_shift_is_a_clear_error():
    with pytest.raises(ValueError, match='shift_size'):
        window_layout(8, 8, 7, 7, torch.device('cpu'))


@pytest.mark.parametrize('M', [2, 7, 12])
def test_relative_position_index_formula(M):
    index = relative_position_index(M, torch.device('cpu'))
    ref = torch.stack(torch.meshgrid(torch.arange(M), torch.arange(M), indexing='ij')).flatten(1)
    rel = ref[:, :, None] - ref[:, None, :] + (M - 1)  # the official construction
    assert torch.equal(index, rel[0] * (2 * M - 1) + rel[1])
    for i in range(M * M):
        for j in range(0, M * M, 5):
            yi, xi, yj, xj = i // M, i % M, j // M, j % M
            assert index[i, j] == (yi - yj + M - 1) * (2 * M - 1) + (xi - xj + M - 1)
    assert index.max() == (2 * M - 1) ** 2 - 1 and index.min() == 0


def test_relative_position_bias_shape_and_values():
    M, h = 7, 3
    table = torch.randn((2 * M - 1) ** 2, h)
    bias = relative_position_bias(table, M)
    assert bias.shape == (h, M * M, M * M)
    # The diagonal is the zero offset, the centre of the table.
    centre = (M - 1) * (2 * M - 1) + (M - 1)
    assert torch.equal(bias[:, 5, 5], table[centre])


@pytest.mark.parametrize('shift', [0, 3])
def test_partition_gradients(shift):
    """Each direction's backward is the other direction's gather: check by finite differences."""
    layout = window_layout(9, 11, 7, shift, torch.device('cpu'))  # padded to 14 x 14
    x = torch.randn(2, 9 * 11, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: windows_from_tokens(t, layout), (x,))
    w = torch.randn(2 * layout.num_windows, 49, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tokens_from_windows(t, layout), (w,))


@pytest.mark.parametrize('shift', [1, 3, -1, -3])
def test_roll_grid_equals_torch_roll(shift):
    x = torch.randn(2, 9, 11, 3)
    assert torch.equal(roll_grid(x, shift), torch.roll(x, (shift, shift), (1, 2)))


@pytest.mark.parametrize('shift', [0, 3])
def test_plain_partition_gradients(shift):
    """The plain form's gradients are autograd's own (pad, slices, pixel shuffle): the same as
    the gathers' by finite differences, crop included."""
    x = torch.randn(2, 9 * 11, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: partition_windows(t, (9, 11), 7, shift), (x,))
    w = torch.randn(2 * 4, 49, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: merge_windows(t, (9, 11), 7, shift), (w,))


def test_plain_forms_follow_traced_sizes():
    """Traced at one size, the plain partition and merge serve another (sizes come from the
    input, nothing is frozen into the graph), including one that needs no padding."""
    def round_trip(x, y):
        hw = (y.shape[0], y.shape[1])
        windows = partition_windows(x, hw, 7, 3)
        mask = shift_mask((hw[0] + 6) // 7 * 7, (hw[1] + 6) // 7 * 7, 7, 3)
        return merge_windows(windows * 2, hw, 7, 3), mask

    traced = torch.jit.trace(round_trip, (torch.randn(2, 9 * 11, 3), torch.empty(9, 11)))
    for H, W in [(14, 21), (3, 30), (1, 1)]:
        x = torch.randn(3, H * W, 3)
        out, mask = traced(x, torch.empty(H, W))
        assert torch.equal(out, x * 2)
        assert torch.equal(mask, window_layout(H, W, 7, 3, torch.device('cpu')).mask)
