"""The plain window attention: the reference formula, and what graph capture runs.

Tracing (``torch.jit.trace``, and through it the TorchScript ONNX exporter and the FLOP counters
of mmengine / fvcore), ``torch.export`` (and the dynamo ONNX exporter) and ``torch.compile`` run
these functions, as does eager mode wherever the fast path (:mod:`swin_dense.ops.cpu_fast`)
does not apply. Nothing here keeps state, caches on sizes or defines its own backward.

Two formulations of the same sums:

- :func:`explicit_window_attention`: ``softmax(q k^T * scale + bias (+ mask)) v`` with matrix
  products, mmdet's formula step by step. Exported graphs use it: it becomes MatMul, Add and
  Softmax in ONNX (no attention operator that a runtime may lack), and FLOP counters that read
  traced graphs count its two products.
- :func:`fused_window_attention`: the same through ``scaled_dot_product_attention``, which
  never materialises the probabilities on CUDA (and takes the bias gradient there). Eager mode
  and ``torch.compile`` use it.

Shapes: ``B * nW`` windows, ``N`` tokens per window, ``h`` heads, ``d`` channels per head,
``C = h * d``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def capturing_graph() -> bool:
    """Whether a graph is being captured from this forward: ``torch.jit`` trace or script,
    ``torch.compile`` or ``torch.export`` (both exporters of ``torch.onnx`` included)."""
    return (torch.jit.is_tracing() or torch.jit.is_scripting()
            or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export())


def exporting() -> bool:
    """Whether the graph being captured leaves PyTorch (or is read op by op): ``torch.jit``
    trace or script, ``torch.export``, ONNX export. ``torch.compile`` alone is not."""
    return (torch.jit.is_tracing() or torch.jit.is_scripting()
            or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export())


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(B*nW, N, 3C)`` -> three ``(B*nW, h, N, d)`` views (no copy)."""
    BW, N, C3 = qkv.shape
    return qkv.view(BW, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(x: Tensor) -> Tensor:
    """``(B*nW, h, N, d)`` -> ``(B*nW, N, h*d)``."""
    BW, h, N, d = x.shape
    return x.transpose(1, 2).reshape(BW, N, -1)


def fold_mask(bias: Tensor, mask: Optional[Tensor], windows: slice = slice(None)) -> Tensor:
    """The attention bias of ``windows`` (all by default): the shared ``(h, N, N)`` bias, plus
    those rows of an ``(nW, N, N)`` shift mask, ``(n, h, N, N)``; the bias alone if no mask."""
    return bias if mask is None else bias + mask[windows].unsqueeze(1)


def explicit_window_attention(qkv: Tensor, num_heads: int, scale: float, bias: Tensor,
                              mask: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """Window attention written out with matrix products (mmdet's order of operations).

    Args:
        qkv: ``(B * nW, N, 3 * C)``, the output of the qkv projection.
        num_heads: ``h``.
        scale: multiplier of ``q`` (``d ** -0.5`` unless overridden).
        bias: the relative position bias ``(h, N, N)``, shared by every window.
        mask: the ``(nW, N, N)`` shift mask, or None; windows are laid out ``(B, nW)``.
        dropout_p: dropout on the probabilities (0 in eval).

    Returns:
        ``(B * nW, N, C)``, before the output projection.
    """
    q, k, v = split_heads(qkv, num_heads)
    N = qkv.shape[1]
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn + bias.to(attn.dtype).unsqueeze(0)
    if mask is not None:
        # the batch viewed as (B, nW): the mask broadcasts over images, never expanded
        nW = mask.shape[0]
        attn = attn.view(-1, nW, num_heads, N, N) + mask.to(attn.dtype).unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, N, N)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, dropout_p)
    return merge_heads(attn @ v)


def fused_window_attention(qkv: Tensor, num_heads: int, scale: float, bias: Tensor,
                           mask: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """:func:`explicit_window_attention` through ``scaled_dot_product_attention``.

    The bias broadcasts, never expanded over the batch: ``(1, h, N, N)`` over ``B * nW``
    windows; with a shift mask, ``(nW, h, N, N)`` for one image, or ``(1, nW * h, N, N)`` with
    a batch of several viewed as ``(B, nW * h)`` (which takes a copy of ``qkv``).
    """
    BW, N, C3 = qkv.shape
    bias = fold_mask(bias, mask).to(qkv.dtype)
    one_image = mask is not None and not torch.compiler.is_compiling() and BW == mask.shape[0]
    if mask is None or one_image:
        q, k, v = split_heads(qkv, num_heads)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.unsqueeze(0) if mask is None else bias,
            dropout_p=dropout_p, scale=scale)
        return merge_heads(out)
    nW, d = mask.shape[0], C3 // (3 * num_heads)
    qkv = qkv.view(-1, nW, N, 3, num_heads, d).permute(3, 0, 1, 4, 2, 5)
    q, k, v = qkv.reshape(3, -1, nW * num_heads, N, d).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(1, -1, N, N),
                                         dropout_p=dropout_p, scale=scale)
    return out.view(-1, nW, num_heads, N, d).permute(0, 1, 3, 2, 4).reshape(BW, N, -1)


def window_attention(qkv: Tensor, num_heads: int, scale: float, bias: Tensor,
                     mask: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """Multi-head self-attention inside each window, before the output projection.

    :func:`explicit_window_attention` while exporting (see :func:`exporting`), else
    :func:`fused_window_attention`; arguments and result as there.
    """
    if exporting():
        return explicit_window_attention(qkv, num_heads, scale, bias, mask, dropout_p)
    return fused_window_attention(qkv, num_heads, scale, bias, mask, dropout_p)
