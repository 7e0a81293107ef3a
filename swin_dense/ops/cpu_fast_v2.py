"""The eager fast path's Swin V2 pieces, behind the same switch (:func:`cpu_fast.applies`).

What the V2 layers (:mod:`swin_dense.layers_v2`) run instead of the plain formulas where the
switch is on; the same outputs and gradients:

- the continuous position bias (an MLP over the coordinate table, 16 * sigmoid, a gather)
  computed once and cached across inference forwards until a weight or the table changes;
- in inference, q and k normalised in place inside the qkv projection's output, the logit
  scale folded into q, then PyTorch's fused attention kernel (which never materialises the
  probabilities) and the output projection. No probability floor and no skipped pairs: a pair
  masked with -100 can outweigh an unmasked one in V2, whose logits reach 116;
- in fp32 CPU training without attention dropout, the normalisation in autograd and the
  attention itself in one autograd function that keeps the probabilities (the formula's
  products, softmax and gradients, no probability floor): the plain formula's fused kernel
  falls back to its math path when the bias requires grad, whose extra passes over the
  ``(B*nW, h, N, N)`` logits (the folded mask, the safe softmax's checks) this skips;
- elsewhere (other dtypes, other devices, dropout) the plain cosine attention.

The window partitions (cached index gathers), the MLP kernels and the chunked block-level MLP
are V1's (:mod:`swin_dense.ops.cpu_fast`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import gemm
from .attention import (cosine_heads, cosine_window_attention, logit_scale_factor,
                        merge_heads, norm_eps)
from .chunked_attention import fused_inference_attention
from .continuous_bias import continuous_position_bias
from .cpu_fast import cached_relative_position_index, cpu_fp32, records_grad


def continuous_bias(cache: dict, table: Tensor, hidden_weight: Tensor, hidden_bias: Tensor,
                    out_weight: Tensor, window_size: int) -> Tensor:
    """:func:`continuous_position_bias` ``(h, N, N)``, cached in ``cache`` (a dict the module
    owns and empties when it moves) while nothing trains the MLP.

    Cached in the dtype the attention runs in (bf16 under CPU bf16 autocast), until the table or
    a weight of the MLP changes (version counters and storages).
    """
    tensors = (table, hidden_weight, hidden_bias, out_weight)
    index = cached_relative_position_index(window_size, table.device)
    if records_grad(*tensors):
        cache.clear()  # what eval cached is stale once the MLP trains
        return continuous_position_bias(table, hidden_weight, hidden_bias, out_weight,
                                        window_size, index)
    dtype = hidden_weight.dtype
    if table.device.type == 'cpu' and dtype == torch.float32 and torch.is_autocast_enabled('cpu'):
        dtype = torch.get_autocast_dtype('cpu')
    key = tuple((t._version, t.data_ptr(), t.dtype) for t in tensors) + (dtype,)
    bias = cache.get(key)
    if bias is None:
        if len(cache) > 4:
            cache.clear()
        with torch.autocast(table.device.type, enabled=False):  # the MLP in the weights' dtype
            bias = continuous_position_bias(table, hidden_weight, hidden_bias, out_weight,
                                            window_size, index)
        bias = cache[key] = bias.to(dtype)
    return bias


def _normalise_in_place(qkv: Tensor, num_heads: int, logit_scale: Tensor) -> Tensor:
    """q and k of ``qkv`` ``(B*nW, N, 3C)`` replaced by their unit vectors, q times its head's
    logit scale factor: the same divisions and products as the plain formula
    (:func:`swin_dense.ops.attention.cosine_heads`), without new map-sized tensors."""
    BW, N, C3 = qkv.shape
    q, k, _ = qkv.view(BW, N, 3, num_heads, C3 // (3 * num_heads)).unbind(2)
    for t in (q, k):
        norm = torch.linalg.vector_norm(t, dim=-1, keepdim=True,
                                        dtype=torch.promote_types(t.dtype, torch.float32))
        norm.clamp_min_(norm_eps(t.dtype))
        if t.dtype == norm.dtype:
            t.div_(norm)
        else:
            t.copy_(t.float().div_(norm))
    q.mul_(logit_scale_factor(logit_scale).to(q.dtype).view(num_heads, 1))
    return qkv


class _KeptProbsAttention(torch.autograd.Function):
    """``softmax(q k^T + bias (+ mask)) v`` of windows, keeping the probabilities for backward.

    ``q, k, v``: ``(B*nW, h, N, d)`` (q already scaled: the cosine's factors are autograd's);
    ``bias``: ``(h, N, N)``; ``mask``: ``(nW, N, N)`` or None, added per window of each image.
    Returns ``(B*nW, N, h*d)``. The gradients are the formula's: the bias gets the sum over all
    windows, the mask none.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor,
                mask: Optional[Tensor]) -> Tensor:
        BW, h, N, d = q.shape
        attn = torch.matmul(q, k.transpose(-2, -1)).add_(bias)
        if mask is not None:
            attn.view(-1, mask.shape[0], h, N, N).add_(mask.unsqueeze(1))
        attn = torch.softmax(attn, dim=-1)
        ctx.save_for_backward(q, k, v, attn)
        return merge_heads(torch.matmul(attn, v))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, attn = ctx.saved_tensors
        BW, h, N, d = q.shape
        grad = grad_out.reshape(BW, N, h, d).transpose(1, 2)
        grad_v = torch.matmul(attn.transpose(-2, -1), grad)
        # the softmax's own backward kernel (one pass): the probabilities were computed outside
        # autograd
        grad_logits = torch._softmax_backward_data(torch.matmul(grad, v.transpose(-2, -1)),
                                                   attn, -1, attn.dtype)
        grad_q = torch.matmul(grad_logits, k)
        grad_k = torch.matmul(grad_logits.transpose(-2, -1), q)
        grad_bias = grad_logits.sum(0) if ctx.needs_input_grad[3] else None
        return grad_q, grad_k, grad_v, grad_bias, None


def cosine_window_msa(x: Tensor, qkv_weight: Tensor, qkv_bias: Optional[Tensor],
                      logit_scale: Tensor, bias: Tensor, proj_weight: Tensor,
                      proj_bias: Optional[Tensor], num_heads: int, mask: Optional[Tensor],
                      dropout_p: float = 0.0) -> Tensor:
    """qkv projection, scaled cosine attention and output projection of windows
    ``(B * nW, N, C)``; ``mask`` is the ``(nW, N, N)`` shift mask or None.

    Inference on the CPU: in place and in the fused kernel; fp32 CPU training: the attention
    keeping its probabilities; otherwise the plain formula.
    """
    qkv = gemm.linear(x, qkv_weight, qkv_bias)  # PyTorch's own op wherever autograd records
    if dropout_p == 0.0 and cpu_fp32(qkv) and records_grad(qkv, bias, logit_scale):
        q, k, v = cosine_heads(qkv, num_heads, logit_scale)
        return F.linear(_KeptProbsAttention.apply(q, k, v, bias, mask), proj_weight, proj_bias)
    if (dropout_p > 0.0 or x.device.type != 'cpu'
            or records_grad(qkv, bias, logit_scale, proj_weight, proj_bias)):
        return F.linear(cosine_window_attention(qkv, num_heads, logit_scale, bias, mask,
                                                dropout_p), proj_weight, proj_bias)
    folded = bias if mask is None else bias + mask.unsqueeze(1)
    qkv = _normalise_in_place(qkv, num_heads, logit_scale)
    return fused_inference_attention(qkv, folded, proj_weight.to(qkv.dtype),
                                     None if proj_bias is None else proj_bias.to(qkv.dtype),
                                     num_heads, 1.0)
