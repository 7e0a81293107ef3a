"""Shifted-window layout of a token map, as plain tensor functions (no ``nn.Module`` here).

Order of operations, the same as the official code, mmdet, mmseg and torchvision: zero-pad
bottom/right to a multiple of the window, cyclic shift by ``-shift`` on the padded grid, the
shift mask built on the padded grid, attention per window, reverse shift, crop. Padded tokens
are not masked as keys, exactly as in those implementations.

Two forms of the same permutation:

- :func:`partition_windows` / :func:`merge_windows`: pad, roll and partition by views, computed
  from the sizes as given (Python ints in eager, traced or symbolic sizes when a graph is
  captured). They always pad and always crop (with zero amounts where nothing is needed) and
  roll by concatenating two slices of constant extent, so one captured graph serves every
  input size; :func:`shift_mask` compares ``arange`` indices in the same way.
- :func:`windows_from_tokens` / :func:`tokens_from_windows`: one index gather each way over a
  :func:`window_layout` built once per size and cached, whose gradient is the other direction's
  gather. Eager only (the fast path): the cache and the autograd function are keyed on
  concrete sizes.

Shapes: ``B`` batch, ``H x W`` token map, ``M`` window size, ``N = M * M`` tokens per window,
``nW`` windows per image, ``C`` channels.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

#: Additive attention mask for token pairs that come from different regions of the shifted grid.
#: -100 rather than -inf: finite in fp16 (the official value, kept for identical outputs).
MASK_VALUE = -100.0

#: A size: a Python int in eager mode, a traced 0-d tensor under ``torch.jit.trace`` (and the
#: TorchScript ONNX exporter), a ``SymInt`` under ``torch.export`` / ``torch.compile``.
Size = Union[int, Tensor]


def padded_size(size: Size, multiple: int) -> Size:
    """Smallest multiple of ``multiple`` that is >= ``size`` (the ceiling multiple)."""
    # not -(-size // multiple): negative intermediates defeat inductor's range analysis of
    # symbolic sizes under torch.compile(dynamic=True)
    return (size + multiple - 1) // multiple * multiple


def roll_grid(x: Tensor, shift: int) -> Tensor:
    """``torch.roll(x, (shift, shift), (1, 2))`` on ``(B, Hp, Wp, C)`` with ``|shift| < Hp, Wp``.

    Written as two concatenations of slices of constant extent: exporters turn it into
    Slice + Concat whatever the map size (``torch.roll`` is what older ONNX exporters and
    TensorRT handle worst).
    """
    for dim in (1, 2):
        lead = (slice(None),) * dim  # roll(x, k)[i] = x[(i - k) % n]: the last k rows first
        x = torch.cat((x[lead + (slice(-shift, None),)], x[lead + (slice(None, -shift),)]), dim)
    return x


def _shift_regions(padded: Size, window_size: int, shift_size: int,
                   device: Optional[torch.device] = None) -> Tensor:
    """Region label (0, 1, 2) of each row of the padded grid: slices (0,-M), (-M,-s), (-s,None)."""
    pos = torch.arange(padded, device=device)
    return (pos >= padded - window_size).long() + (pos >= padded - shift_size).long()


def shift_mask(padded_height: Size, padded_width: Size, window_size: int, shift_size: int,
               device: Optional[torch.device] = None) -> Tensor:
    """``(nW, N, N)`` additive mask of the shifted grid: -100 between tokens of different regions.

    Regions are the slices ``(0, -M), (-M, -s), (-s, None)`` of the padded grid along each axis;
    they belong to positions of the shifted grid, i.e. to window slots. Built from index
    comparisons, so the sizes may be traced or symbolic.
    """
    M = window_size
    nh, nw = padded_height // M, padded_width // M
    region_h = _shift_regions(padded_height, M, shift_size, device).view(nh, 1, M, 1)
    region_w = _shift_regions(padded_width, M, shift_size, device).view(1, nw, 1, M)
    label = (region_h * 3 + region_w).reshape(nh * nw, M * M)
    return (label.unsqueeze(1) != label.unsqueeze(2)).float() * MASK_VALUE


def relative_position_index(window_size: int, device: Optional[torch.device] = None) -> Tensor:
    """``(N, N)`` index into the ``((2M-1)^2, heads)`` bias table for each query/key pair.

    ``index[i, j] = (y_i - y_j + M - 1) * (2M - 1) + (x_i - x_j + M - 1)``, the official formula.
    """
    M = window_size
    pos = torch.arange(M, device=device)
    ys = pos.view(M, 1).expand(M, M).reshape(-1)
    xs = pos.view(1, M).expand(M, M).reshape(-1)
    dy = ys[:, None] - ys[None, :] + (M - 1)
    dx = xs[:, None] - xs[None, :] + (M - 1)
    return dy * (2 * M - 1) + dx


def relative_position_bias(table: Tensor, window_size: int, index: Optional[Tensor] = None
                           ) -> Tensor:
    """Gather the bias table ``((2M-1)^2, h)`` into a per-head bias ``(h, N, N)``.

    ``index``: the :func:`relative_position_index` of ``window_size``, built here if not given.
    """
    N = window_size * window_size
    if index is None:
        index = relative_position_index(window_size, table.device)
    # index_select: its backward is an index_add, 1.5-4x faster than indexing's scatter-add
    return table.index_select(0, index.view(-1)).view(N, N, -1).permute(2, 0, 1).contiguous()


def partition_windows(x: Tensor, hw: tuple[Size, Size], window_size: int, shift_size: int
                      ) -> Tensor:
    """Pad, roll and partition by views: ``(B, H*W, C)`` -> ``(B * nW, N, C)``.

    Always pads (by zero where the map is a multiple of the window): no branch on the size.
    Every size is a product of the window counts ``ceil(H / M)``, ``ceil(W / M)``, so that
    symbolic shapes need no guard.
    """
    B, _, C = x.shape
    (H, W), M = hw, window_size
    nh, nw = padded_size(H, M) // M, padded_size(W, M) // M
    x = F.pad(x.view(B, H, W, C), (0, 0, 0, nw * M - W, 0, nh * M - H))
    if shift_size:
        x = roll_grid(x, -shift_size)
    x = x.view(B, nh, M, nw, M, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B * nh * nw, M * M, C)


def merge_windows(windows: Tensor, hw: tuple[Size, Size], window_size: int, shift_size: int
                  ) -> Tensor:
    """Inverse of :func:`partition_windows` (merge, roll back, crop): -> ``(B, H*W, C)``.

    The windows are put back in place as a depth-to-space of a ``(B, C * M * M, nh, nw)`` map
    (``F.pixel_shuffle``, ONNX ``DepthToSpace``): a reshape that merges ``(nh, M)`` into
    ``nh * M`` would make ``torch.export`` guard on ``nh % (M * nh) != 0``, true but beyond
    what it can prove. Always crops, as a padding by the negative amounts (of 0 where nothing
    was padded): its size is ``H`` exactly, where a slice ``[:H]`` would guard on
    ``H <= ceil(H / M) * M``.
    """
    C = windows.shape[-1]
    (H, W), M = hw, window_size
    nh, nw = padded_size(H, M) // M, padded_size(W, M) // M
    B = windows.shape[0] // (nh * nw)
    x = windows.view(B, nh, nw, M, M, C).permute(0, 5, 3, 4, 1, 2).reshape(B, C * M * M, nh, nw)
    x = F.pixel_shuffle(x, M).permute(0, 2, 3, 1)  # (B, nh * M, nw * M, C)
    if shift_size:
        x = roll_grid(x, shift_size)
    x = F.pad(x, (0, 0, 0, W - nw * M, 0, H - nh * M))
    return x.reshape(B, H * W, C)


# ---------------------------------------------------------------- index gathers (eager only)

@dataclass(frozen=True)
class WindowLayout:
    """How an ``H x W`` token map is laid out in (shifted) windows.

    Attributes:
        height, width: the token map, ``H x W``.
        window_size: ``M``.
        shift_size: cyclic shift applied before partitioning (0 for W-MSA).
        num_windows: ``nW = ceil(H / M) * ceil(W / M)``.
        gather_index: ``(nW * N,)`` source token of each window slot (0 for padding slots).
        pad_slots: ``(P,)`` the window slots that hold zero padding, or None when there are none.
        scatter_index: ``(H * W,)`` window slot of each token of the map (the inverse gather).
        mask: ``(nW, N, N)`` additive shift mask (0 or -100), or None when ``shift_size == 0``.
    """

    height: int
    width: int
    window_size: int
    shift_size: int
    num_windows: int
    gather_index: Tensor
    pad_slots: Optional[Tensor]
    scatter_index: Tensor
    mask: Optional[Tensor]

    @property
    def needs_padding(self) -> bool:
        return self.pad_slots is not None


@functools.lru_cache(maxsize=128)
def window_layout(height: int, width: int, window_size: int, shift_size: int,
                  device: torch.device) -> WindowLayout:
    """Build (once per argument tuple) the gather/scatter indices and shift mask of a token map.

    Args:
        height, width: token map ``H x W`` (Python ints: eager mode only).
        window_size: ``M``.
        shift_size: ``s`` with ``0 <= s < M``; the map is rolled by ``-s`` on the padded grid.
        device: where the index and mask tensors live.
    """
    if not 0 <= shift_size < window_size:
        raise ValueError(f'shift_size must be in [0, window_size), got {shift_size} '
                         f'with window_size {window_size}')
    M = window_size
    Hp, Wp = padded_size(height, M), padded_size(width, M)
    nh, nw = Hp // M, Wp // M
    # Slot (window row a, window col b, in-window row i, col j) sits at shifted-grid position
    # (a*M + i, b*M + j), which holds the padded-grid position ((a*M + i + s) % Hp, ...).
    rows = (torch.arange(Hp).view(nh, 1, M, 1) + shift_size) % Hp
    cols = (torch.arange(Wp).view(1, nw, 1, M) + shift_size) % Wp
    rows, cols = torch.broadcast_tensors(rows, cols)  # (nh, nw, M, M)
    inside = ((rows < height) & (cols < width)).reshape(-1)
    gather = torch.where(inside, (rows * width + cols).reshape(-1), 0)
    # Inverse: token (r, c) sits at shifted-grid position ((r - s) % Hp, (c - s) % Wp).
    r = (torch.arange(height).view(-1, 1) - shift_size) % Hp
    c = (torch.arange(width).view(1, -1) - shift_size) % Wp
    scatter = ((r // M * nw + c // M) * M + r % M) * M + c % M
    # the padding slots are the first Hp*Wp - H*W entries of a stable sort that puts the
    # outside slots first
    num_pad = Hp * Wp - height * width
    pad_slots = (torch.argsort(inside.int(), stable=True)[:num_pad].to(device)
                 if num_pad else None)

    mask = shift_mask(Hp, Wp, M, shift_size, device) if shift_size > 0 else None
    return WindowLayout(height, width, M, shift_size, nh * nw, gather.to(device), pad_slots,
                        scatter.reshape(-1).to(device), mask)


def batch_rows(index: Tensor, batch: int, num_tokens: int) -> Tensor:
    """``(B, I)``: the rows of a flattened ``(B * L, C)`` batch that ``index`` ``(I,)`` (into
    one image's ``L = num_tokens`` tokens) picks in each image."""
    return index + torch.arange(0, batch * num_tokens, num_tokens,
                                device=index.device).view(-1, 1)


def _gather_tokens(x: Tensor, index: Tensor, zero: Optional[Tensor]) -> Tensor:
    """``x[:, index]``, rows at positions ``zero`` set to 0: ``(B, L, C)`` -> ``(B, I, C)``."""
    B, L, C = x.shape
    out = x.new_empty(B, index.numel(), C)  # not a view: autograd lets callers add into it
    # one gather of rows of the flattened batch: 2-5x faster on the CPU than along dim 1
    torch.index_select(x.reshape(B * L, C), 0, batch_rows(index, B, L).view(-1),
                       out=out.view(-1, C))
    if zero is not None:
        out.index_fill_(1, zero, 0)
    return out


class _WindowPermutation(torch.autograd.Function):
    """Token map <-> windows. Every token sits in exactly one window slot and the other slots
    are zero padding, so the gradient of each direction is the other direction's gather (no
    zero-filled scatter-add, as autograd's ``index_select`` backward would do)."""

    @staticmethod
    def forward(ctx, x: Tensor, layout: WindowLayout, to_windows: bool) -> Tensor:
        ctx.layout, ctx.to_windows = layout, to_windows
        if to_windows:
            return _gather_tokens(x, layout.gather_index, layout.pad_slots)
        return _gather_tokens(x, layout.scatter_index, None)

    @staticmethod
    def backward(ctx, grad: Tensor):
        layout = ctx.layout
        grad = grad.contiguous()
        if ctx.to_windows:
            return _gather_tokens(grad, layout.scatter_index, None), None, None
        return _gather_tokens(grad, layout.gather_index, layout.pad_slots), None, None


def windows_from_tokens(x: Tensor, layout: WindowLayout) -> Tensor:
    """:func:`partition_windows` in one gather: ``(B, H*W, C)`` -> ``(B * nW, N, C)``."""
    B, L, C = x.shape
    return _WindowPermutation.apply(x, layout, True).view(B * layout.num_windows, -1, C)


def tokens_from_windows(windows: Tensor, layout: WindowLayout) -> Tensor:
    """:func:`merge_windows` (crop included) in one gather: -> ``(B, H*W, C)``."""
    C = windows.shape[-1]
    B = windows.shape[0] // layout.num_windows
    return _WindowPermutation.apply(windows.reshape(B, -1, C), layout, False)
