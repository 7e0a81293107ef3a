"""Window attention from and to the token map with both projections on the tokens (a kernel of
the fast path, with its own backward).

For fp32 on the CPU, on maps that need window padding: a padding slot is a zero token, so its
qkv is the qkv bias and its output is cropped; projecting the tokens instead of the window
slots saves the padding's GEMM rows (in training three times: forward and backward; in
inference once, :func:`token_window_inference`). The attention itself runs a chunk of windows
at a time as in :mod:`swin_dense.ops.chunked_attention`.

Shapes: ``B`` images of ``L = H * W`` tokens, ``nW`` windows of ``N = M * M`` slots each,
``C`` channels.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import gemm
from .attention import fold_mask
from .chunked_attention import (ChunkGradients, attended_values, chunk_backward, chunk_probs,
                                linear_into, window_chunks)
from .window import WindowLayout, batch_rows


#: Training on the CPU runs the qkv and output projections on the tokens instead of the window
#: slots (see :func:`token_window_attention`) where ``padding slots * C >= this * slots``: where
#: the padding's GEMM rows (8C^2 flops each, three times: forward and backward) cost more than
#: the extra copies (about 8C values per slot). Measured on Swin-T at 512x512 (2-core CPU): no
#: gain on stage 1 (7% padding, C=96), a gain on stages 3-4 (16% and 42%, C=384, 768).
TOKEN_PROJECTIONS_MIN_PAD_CHANNELS = 20


#: The same threshold for inference (:func:`token_window_inference`), where the projections
#: run once instead of three times but the token path's extra copies (the qkv rows of every
#: slot gathered per chunk) are the same.
INFERENCE_MIN_PAD_CHANNELS = 20


def token_projections_pay(layout: WindowLayout, channels: int, inference: bool = False) -> bool:
    """Whether :func:`token_window_attention` (``inference``: :func:`token_window_inference`)
    saves time over projecting on the windows."""
    if layout.pad_slots is None:
        return False
    slots = layout.num_windows * layout.window_size ** 2
    threshold = INFERENCE_MIN_PAD_CHANNELS if inference else TOKEN_PROJECTIONS_MIN_PAD_CHANNELS
    return layout.pad_slots.numel() * channels >= threshold * slots


def _slot_rows(layout: WindowLayout, batch: int, num_tokens: int) -> Tensor:
    """``(B * nW * N,)`` token row (of ``B * L`` rows) of every window slot; the padding slots
    point at one extra row ``B * L``."""
    index = batch_rows(layout.gather_index, batch, num_tokens)
    if layout.pad_slots is not None:
        index[:, layout.pad_slots] = batch * num_tokens
    return index.view(-1)


class _TokenWindowAttention(torch.autograd.Function):
    """Window attention with both projections on the token rows, for CPU training in fp32
    where the map needs padding: ``(B, H*W, C)`` tokens in, tokens out.

    A padding slot is a zero token, so its qkv is the qkv bias, and its output is cropped. The
    qkv projection runs on the ``B * L`` tokens only (plus one row holding the bias); each chunk
    of windows gathers its slots' rows, attends, and scatters the real slots' attended values
    back to the token rows (the padding slots' to one extra row, dropped); the output projection
    runs on the tokens. Backward does the same in reverse: the output gradient is projected on
    the tokens and gathered per chunk (zero for the padding slots), each chunk's qkv gradient is
    scattered to the token rows (the padding slots' count for the qkv bias gradient only), and
    the qkv weight and input gradients are two GEMMs over the tokens. Kept for backward: the
    tokens, their qkv and their attended values (the output projection's input, as mmdet keeps
    it); the probabilities are recomputed per chunk.
    """

    @staticmethod
    def forward(ctx, x: Tensor, qkv_weight: Tensor, qkv_bias: Optional[Tensor], bias: Tensor,
                proj_weight: Tensor, proj_bias: Optional[Tensor], layout: WindowLayout,
                num_heads: int, scale: float, step: int) -> Tensor:
        B, L, C = x.shape
        rows, N, nW = B * L, layout.window_size ** 2, layout.num_windows
        qkv = x.new_empty(rows + 1, qkv_weight.shape[0])
        linear_into(qkv[:rows], x.view(rows, C), qkv_weight, qkv_bias)
        qkv[rows] = 0.0 if qkv_bias is None else qkv_bias
        index = _slot_rows(layout, B, L)
        attended = x.new_empty(rows + 1, qkv_weight.shape[0] // 3)
        for wrows, wins in window_chunks(B * nW, nW, step):
            slots = index[wrows.start * N:wrows.stop * N]
            chunk = qkv.index_select(0, slots).view(-1, N, qkv.shape[-1])
            attended.index_copy_(0, slots, attended_values(
                chunk, fold_mask(bias, layout.mask, wins), num_heads, scale))
        attended = attended[:rows]
        out = x.new_empty(B, L, proj_weight.shape[0])
        linear_into(out.view(rows, -1), attended, proj_weight, proj_bias)
        ctx.save_for_backward(x, qkv, attended, index, bias, qkv_weight, proj_weight)
        ctx.layout = layout  # cached size-dependent tensors: nothing to save
        ctx.args = (num_heads, scale, step, qkv_bias is not None, proj_bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, qkv, attended, index, bias, qkv_weight, proj_weight = ctx.saved_tensors
        layout = ctx.layout
        num_heads, scale, step, has_qkv_bias, has_proj_bias = ctx.args
        need_x, need_qkv_w, need_qkv_b, need_bias, need_proj_w, need_proj_b = (
            ctx.needs_input_grad[:6])
        B, L, C = x.shape
        rows, N, nW = B * L, layout.window_size ** 2, layout.num_windows
        grad_y = grad_y.reshape(rows, -1)
        sums = ChunkGradients()
        if need_proj_w:
            sums.addmm('proj_w', grad_y.t(), attended)
        if has_proj_bias and need_proj_b:
            sums.add('proj_b', grad_y.sum(0))
        grad_attended = grad_y.new_empty(rows + 1, attended.shape[1])
        gemm.mm(grad_y, proj_weight, out=grad_attended[:rows])
        grad_attended[rows] = 0.0  # the padding slots' outputs are cropped
        grad_qkv = qkv.new_empty(qkv.shape)  # row `rows` collects the padding slots' (unused)
        for wrows, wins in window_chunks(B * nW, nW, step):
            slots = index[wrows.start * N:wrows.stop * N]
            q, k, v, attn = chunk_probs(qkv.index_select(0, slots).view(-1, N, qkv.shape[-1]),
                                         fold_mask(bias, layout.mask, wins), num_heads, scale)
            grad_chunk = chunk_backward(q, k, v, attn, grad_attended.index_select(0, slots),
                                         scale, sums, need_bias, has_qkv_bias and need_qkv_b)
            del attn
            grad_qkv.index_copy_(0, slots, grad_chunk)
        grad_qkv = grad_qkv[:rows]
        grad_x = gemm.mm(grad_qkv, qkv_weight).view(B, L, C) if need_x else None
        if need_qkv_w:
            sums.addmm('qkv_w', grad_qkv.t(), x.view(rows, C))
        return (grad_x, sums.get('qkv_w'), sums.get('qkv_b'), sums.get('bias'),
                sums.get('proj_w'), sums.get('proj_b'), None, None, None, None)


def token_window_attention(x: Tensor, layout: WindowLayout, qkv_weight: Tensor,
                           qkv_bias: Optional[Tensor], bias: Tensor, proj_weight: Tensor,
                           proj_bias: Optional[Tensor], num_heads: int, scale: float,
                           chunk_windows: int) -> Tensor:
    """``tokens_from_windows(chunked_window_attention(windows_from_tokens(x, layout), ...))``
    with both projections on the tokens, none on the padding slots: CPU training.

    Args:
        x: ``(B, H*W, C)`` tokens of the map that ``layout`` describes.
        bias: the relative position bias ``(h, N, N)``; the layout's shift mask is added per
            chunk.
        other arguments: as in :func:`chunked_window_attention`.

    Returns:
        ``(B, H*W, C)`` tokens.
    """
    x, bias = x.contiguous(), bias.to(x.dtype)
    return _TokenWindowAttention.apply(x, qkv_weight, qkv_bias, bias, proj_weight, proj_bias,
                                       layout, num_heads, scale, chunk_windows)


def token_window_inference(x: Tensor, layout: WindowLayout, qkv_weight: Tensor,
                           qkv_bias: Optional[Tensor], bias: Tensor, proj_weight: Tensor,
                           proj_bias: Optional[Tensor], num_heads: int, scale: float,
                           chunk_windows: int) -> Tensor:
    """Inference form of :func:`token_window_attention` (nothing recorded for autograd).

    Each chunk of windows projects the tokens of its real slots only, places their qkv in its
    window slots and fills the padding slots' with the qkv bias (the projection of a zero
    token), attends, and scatters the real slots' attended values back to the token rows; the
    output projection runs on the tokens. Every qkv buffer is chunk-sized. ``(B, H*W, C)`` in
    and out; arguments as there."""
    B, L, C = x.shape
    rows, N, nW = B * L, layout.window_size ** 2, layout.num_windows
    x, bias = x.contiguous().view(rows, C), bias.to(x.dtype)
    index = _slot_rows(layout, B, L)
    fill = 0.0 if qkv_bias is None else qkv_bias.to(x.dtype)
    attended = x.new_empty(rows + 1, qkv_weight.shape[0] // 3)
    for wrows, wins in window_chunks(B * nW, nW, chunk_windows):
        slots = index[wrows.start * N:wrows.stop * N]
        is_pad = slots == rows
        real = (~is_pad).nonzero().view(-1)
        chunk = x.new_empty(slots.numel(), qkv_weight.shape[0])
        chunk.index_copy_(0, real, gemm.linear(x.index_select(0, slots[real]), qkv_weight,
                                               qkv_bias))
        chunk[is_pad] = fill
        attended.index_copy_(0, slots, attended_values(
            chunk.view(-1, N, chunk.shape[1]), fold_mask(bias, layout.mask, wins), num_heads,
            scale))
    return gemm.linear(attended[:rows], proj_weight, proj_bias).view(B, L, -1)
