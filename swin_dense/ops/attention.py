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

import math
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
    return _explicit(*split_heads(qkv, num_heads), scale, bias, mask, dropout_p)


def _explicit(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor,
              mask: Optional[Tensor], dropout_p: float) -> Tensor:
    """:func:`explicit_window_attention` on heads ``(B*nW, h, N, d)`` -> ``(B*nW, N, C)``."""
    num_heads, N = q.shape[1], q.shape[2]
    attn = (q * scale if scale != 1.0 else q) @ k.transpose(-2, -1)
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
    if mask is None or _one_image(BW, mask):
        return _fused(*split_heads(qkv, num_heads), scale, bias, mask, dropout_p)
    nW, d = mask.shape[0], C3 // (3 * num_heads)
    qkv = qkv.view(-1, nW, N, 3, num_heads, d).permute(3, 0, 1, 4, 2, 5)
    q, k, v = qkv.reshape(3, -1, nW * num_heads, N, d).unbind(0)
    return _fused_per_window(q, k, v, scale, bias, mask, dropout_p, BW)


def _one_image(num_rows: int, mask: Tensor) -> bool:
    return not torch.compiler.is_compiling() and num_rows == mask.shape[0]


def _fused(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor, mask: Optional[Tensor],
           dropout_p: float) -> Tensor:
    """The fused kernel on heads ``(B*nW, h, N, d)``, without a mask or for one image."""
    bias = fold_mask(bias, mask).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0) if mask is None
                                         else bias, dropout_p=dropout_p, scale=scale)
    return merge_heads(out)


def _fused_per_window(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor, mask: Tensor,
                      dropout_p: float, num_rows: int) -> Tensor:
    """The fused kernel on heads viewed ``(B, nW * h, N, d)``: the per-window bias
    ``(nW, h, N, N)`` broadcasts over the images."""
    nW, N = mask.shape[0], mask.shape[1]
    num_heads = q.shape[1] // nW
    bias = fold_mask(bias, mask).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(1, -1, N, N),
                                         dropout_p=dropout_p, scale=scale)
    return out.view(-1, nW, num_heads, N, q.shape[-1]).permute(0, 1, 3, 2, 4).reshape(
        num_rows, N, -1)


def window_attention(qkv: Tensor, num_heads: int, scale: float, bias: Tensor,
                     mask: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """Multi-head self-attention inside each window, before the output projection.

    :func:`explicit_window_attention` while exporting (see :func:`exporting`), else
    :func:`fused_window_attention`; arguments and result as there.
    """
    if exporting():
        return explicit_window_attention(qkv, num_heads, scale, bias, mask, dropout_p)
    return fused_window_attention(qkv, num_heads, scale, bias, mask, dropout_p)


# ---------------------------------------------------------------- Swin V2: cosine attention

#: Swin V2 clamps the learnable logit scale at log(100): cosines are multiplied by at most 100.
MAX_LOGIT_SCALE = math.log(100.0)


def unit_rows(x: Tensor) -> Tensor:
    """``x / max(||x||, 1e-12)`` along the last dim (``F.normalize``), computed in float32 for
    float16 inputs: there the eps is 0, and a zero row (a padding token: V2 pads the residual
    stream with zeros and k has no bias) would give 0 / 0 = NaN."""
    if x.dtype == torch.float16:
        return F.normalize(x.float(), dim=-1).to(x.dtype)
    return F.normalize(x, dim=-1)


def logit_scale_factor(logit_scale: Tensor) -> Tensor:
    """``exp(min(logit_scale, log 100))``, ``(h, 1, 1)``: the multiplier of each head's cosines
    (no gradient past the clamp)."""
    return torch.clamp(logit_scale, max=MAX_LOGIT_SCALE).exp()


def cosine_heads(qkv: Tensor, num_heads: int, logit_scale: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Swin V2's q and k: unit vectors, the head's logit scale folded into q, so that
    ``q k^T`` is the scaled cosine. ``(B*nW, N, 3C)`` -> three ``(B*nW, h, N, d)``."""
    q, k, v = split_heads(qkv, num_heads)
    q = unit_rows(q) * logit_scale_factor(logit_scale).to(q.dtype)
    return q, unit_rows(k), v


def cosine_window_attention(qkv: Tensor, num_heads: int, logit_scale: Tensor, bias: Tensor,
                            mask: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """Swin V2's scaled cosine attention inside each window, before the output projection:
    ``softmax(cos(q, k) * exp(min(logit_scale, log 100)) + bias (+ mask)) v``.

    Arguments as :func:`window_attention`, with ``logit_scale`` ``(h, 1, 1)`` instead of
    ``scale``; ``bias`` is the continuous position bias ``(h, N, N)``. Matrix products while
    exporting, the fused kernel otherwise. The shift mask's -100 is not negligible here
    (logits reach 116 = 100 + 16), so every masked pair is computed as the formula says.
    """
    BW = qkv.shape[0]
    q, k, v = cosine_heads(qkv, num_heads, logit_scale)
    if exporting():
        return _explicit(q, k, v, 1.0, bias, mask, dropout_p)
    if mask is None or _one_image(BW, mask):
        return _fused(q, k, v, 1.0, bias, mask, dropout_p)
    nW = mask.shape[0]
    q, k, v = (t.reshape(-1, nW * num_heads, *t.shape[2:]) for t in (q, k, v))
    return _fused_per_window(q, k, v, 1.0, bias, mask, dropout_p, BW)
