"""The chunked CPU window attention, with backward passes of its own (the fast path's kernels).

What :mod:`swin_dense.ops.cpu_fast` runs in eager mode on the CPU; :mod:`swin_dense.ops.attention`
holds the same sums as plain formulas. Every function here gives the gradients of the plain
formula (the tests check them against autograd in float64), but holds only chunk-sized
temporaries, skips work the formula wastes (exponentials of masked pairs whose probability is
zero in any case) and keeps less for backward:

- :func:`chunked_window_attention`: qkv projection, attention and output projection over chunks
  of windows, forward in PyTorch's fused attention kernel, backward explicit (recomputing the
  probabilities per chunk). fp32 training and inference, and autocast inference.
- :func:`keep_probs_window_attention`: the attention and output projection keeping the
  probabilities for backward (training under autocast, or in float64).
- :func:`fused_inference_attention`: the attended values of a batch of windows in the fused
  kernel, nothing saved (inference outside the chunked paths).

:mod:`swin_dense.ops.token_attention` builds on the chunk helpers here.

Private torch ops, and why: ``torch._softmax_backward_data`` is the softmax's own backward
kernel (one fused pass, ``(g - (g * p).sum(-1)) * p``), which the explicit backward needs
because the probabilities are recomputed outside autograd; no public function computes it
without building a graph.

Shapes: ``B * nW`` windows, ``N = M * M`` tokens per window, ``h`` heads, ``d`` channels per
head, ``C = h * d``.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import gemm
from .attention import fold_mask, merge_heads

#: fp32 attention probabilities below this are set to 0. A masked pair gets exp(-100) ~ 4e-44, a
#: denormal in fp32 (0 in fp16/bf16, a normal number in fp64); denormal GEMM inputs run about 60x
#: slower on x86 CPUs, which made the attention of the boundary windows of every SW-MSA block cost
#: more than all the others. Dropping values this small changes no output digit.
PROB_FLOOR = 1e-30

#: Logits more than 80 below their row's maximum (masked pairs) are raised to that level before
#: the softmax: exp() of anything below about -87 makes denormals, on which the CPU's exp takes
#: 20-200x longer (a masked window's softmax 4-7x longer, in fp32 and in bf16/fp16, which
#: compute it in fp32). exp(-80) is a normal number, also divided by a row sum of up to 49, and
#: below PROB_FLOOR: in fp32 those probabilities still become 0 and every other one is unchanged
#: to the bit; in bf16 such a probability stays below 1e-34, in fp16 it is 0 either way.
LOGIT_FLOOR = -80.0


def _split_heads(qkv: Tensor, num_heads: int, contiguous: bool = False
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """``(B*nW, N, 3C)`` -> three ``(B*nW, h, N, d)`` views (no copy), or with ``contiguous``
    views of one head-major copy: one copy that serves every batched product of the chunked
    backward (on the strided views each product copied its operands again)."""
    BW, N, C3 = qkv.shape
    heads = qkv.view(BW, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4)
    return (heads.contiguous() if contiguous else heads).unbind(0)


def _attention_probs(q: Tensor, k: Tensor, bias: Tensor, scale: float, num_windows: int) -> Tensor:
    """``softmax(q k^T * scale + bias)``, ``(B*nW, h, N, N)``.

    The scale is applied inside the GEMM (``alpha``), so fp16 logits never exist unscaled, and
    the bias is added in place. With a shift mask folded into the bias, logits are first raised
    to at least the row maximum + :data:`LOGIT_FLOOR` (no denormals inside the softmax). In fp32,
    probabilities below :data:`PROB_FLOOR` become 0 (the other dtypes have no denormals to avoid
    there: a pass fewer, 3% of a bf16 train step).
    """
    BW, h, N, d = q.shape
    attn = q.new_empty(BW * h, N, N)
    torch.baddbmm(attn, q.reshape(BW * h, N, d), k.reshape(BW * h, N, d).transpose(1, 2),
                  beta=0, alpha=scale, out=attn)
    attn = attn.view(BW, h, N, N)
    if bias.dim() == 4:  # per-window bias: view the batch as (B, nW) and broadcast over B
        attn.view(-1, num_windows, *attn.shape[1:]).add_(bias)
    else:
        attn.add_(bias)
    if bias.dim() == 4 and attn.dtype != torch.float64:  # a shift mask is folded in
        attn.clamp_min_(attn.amax(-1, keepdim=True) + LOGIT_FLOOR)
    attn = attn.softmax(dim=-1)
    return F.threshold_(attn, PROB_FLOOR, 0.0) if attn.dtype == torch.float32 else attn


def _attention_backward(q: Tensor, k: Tensor, v: Tensor, attn: Tensor, grad_out: Tensor,
                        scale: float) -> tuple[Tensor, Tensor]:
    """Gradients of ``attn @ v`` with ``attn = softmax(q k^T * scale + bias)``.

    ``q, k, v, grad_out``: ``(B*nW, h, N, d)``; ``attn``: the probabilities. Returns the
    gradient of the qkv projection's output ``(B*nW, N, 3C)`` and that of the logits
    ``(B*nW, h, N, N)`` (which is also the bias gradient before any sum over windows).
    Contiguous inputs (``_split_heads(..., contiguous=True)``) are used as they are; strided
    views of ``qkv`` are copied here, once each.
    """
    BW, h, N, d = q.shape
    q, k, v, grad_out = (t.reshape(BW * h, N, d) for t in (q, k, v, grad_out))
    attn = attn.view(BW * h, N, N)
    grads = q.new_empty(3, BW, h, N, d)  # dq, dk, dv
    dq, dk, dv = grads.view(3, BW * h, N, d).unbind(0)
    torch.bmm(attn.transpose(1, 2), grad_out, out=dv)
    # the softmax's own backward kernel (one fused pass): the probabilities were computed
    # outside autograd, and no public function gives this gradient without building a graph
    grad_scores = torch._softmax_backward_data(
        torch.bmm(grad_out, v.transpose(1, 2)), attn, -1, attn.dtype)
    torch.baddbmm(dq, grad_scores, k, beta=0, alpha=scale, out=dq)
    torch.baddbmm(dk, grad_scores.transpose(1, 2), q, beta=0, alpha=scale, out=dk)
    return (grads.permute(1, 3, 0, 2, 4).reshape(BW, N, 3 * h * d),
            grad_scores.view(BW, h, N, N))


class _WindowAttention(torch.autograd.Function):
    """Window attention and output projection, keeping the probabilities for backward.

    For CPU training outside the chunked fp32 path: under autocast (bf16, fp16), or in float64.
    Kept for backward: ``qkv`` and the ``(B*nW, h, N, N)`` probabilities (h*N values per token,
    in the low precision under autocast); the projection's input is recomputed from them.
    Recomputing the probabilities as well (with the forward in the fused kernel) took 4% more
    time per bf16 train step of Swin-T for 3-7% less peak memory. Gradients are those of the plain
    formula; the bias gradient is summed over the batch. Works on 2-d token rows so that its
    output is no view (callers add residuals in place).
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, bias: Tensor, proj_weight: Tensor, proj_bias: Optional[Tensor],
                num_heads: int, scale: float, num_windows: int) -> Tensor:
        q, k, v = _split_heads(qkv, num_heads)
        attn = _attention_probs(q, k, bias, scale, num_windows)
        out = merge_heads(torch.matmul(attn, v))
        out = out.view(-1, out.shape[-1])
        ctx.save_for_backward(qkv, attn, proj_weight)
        ctx.args = (num_heads, scale, num_windows, bias.dim() == 4, proj_bias is not None)
        # Under autocast the projection runs in the dtype of qkv, as F.linear would.
        weight = proj_weight.to(out.dtype)
        if proj_bias is None:
            return out.mm(weight.t())
        return torch.addmm(proj_bias.to(out.dtype), out, weight.t())

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        qkv, attn, proj_weight = ctx.saved_tensors
        num_heads, scale, num_windows, per_window, has_proj_bias = ctx.args
        q, k, v = _split_heads(qkv, num_heads)
        BW, h, N, d = q.shape
        grad_y = grad_y.to(qkv.dtype)
        grad_proj_weight = grad_proj_bias = None
        if ctx.needs_input_grad[2]:
            out = merge_heads(torch.matmul(attn, v)).view(BW * N, h * d)
            grad_proj_weight = grad_y.t().mm(out).to(proj_weight.dtype)
            del out
        if has_proj_bias and ctx.needs_input_grad[3]:
            grad_proj_bias = grad_y.sum(0).to(proj_weight.dtype)
        grad_out = grad_y.mm(proj_weight.to(grad_y.dtype)).view(BW, N, h, d).transpose(1, 2)
        grad_qkv, grad_scores = _attention_backward(q, k, v, attn, grad_out, scale)
        grad_bias = None
        if ctx.needs_input_grad[1]:
            if per_window:
                grad_bias = grad_scores.view(-1, num_windows, *grad_scores.shape[1:]).sum(0)
            else:
                grad_bias = grad_scores.sum(0)
        return grad_qkv, grad_bias, grad_proj_weight, grad_proj_bias, None, None, None


def keep_probs_window_attention(qkv: Tensor, bias: Tensor, proj_weight: Tensor,
                                proj_bias: Optional[Tensor], num_heads: int, scale: float,
                                num_windows: int) -> Tensor:
    """Window attention and output projection that keeps the probabilities for backward.

    Args:
        qkv: ``(B * nW, N, 3C)``.
        bias: ``(h, N, N)``, or ``(nW, h, N, N)`` with the shift mask folded in; it broadcasts
            over the batch, never expanded.
        proj_weight, proj_bias: the output projection.
        num_heads, scale: as in the plain attention.
        num_windows: ``nW``, to view the batch as ``(B, nW)`` for a per-window bias.

    Returns:
        ``(B * nW, N, C)``, no view (callers add residuals in place).
    """
    BW, N, _ = qkv.shape
    out = _WindowAttention.apply(qkv, bias.to(qkv.dtype), proj_weight, proj_bias, num_heads,
                                 scale, num_windows)
    return out.view(BW, N, -1)


def fused_inference_attention(qkv: Tensor, bias: Tensor, proj_weight: Tensor,
                              proj_bias: Optional[Tensor], num_heads: int, scale: float
                              ) -> Tensor:
    """Inference: the attention in the fused kernel, then the output projection; arguments as
    in :func:`keep_probs_window_attention` (nothing recorded for autograd)."""
    BW, N, _ = qkv.shape
    values = attended_values(qkv, bias.to(qkv.dtype), num_heads, scale).view(BW, N, -1)
    return gemm.linear(values, proj_weight, proj_bias)


def even_chunks(total: int, step: int) -> Iterator[slice]:
    """Slices covering ``range(total)``: as few as chunks of at most ``step`` allow, of sizes
    that differ by at most 1 (no short tail: a chunk of a few rows re-reads the weights for
    little work)."""
    n = -(-total // step)
    return (slice(i * total // n, (i + 1) * total // n) for i in range(n))


def window_chunks(num_rows: int, num_windows: int, step: int):
    """``(rows, windows)`` slices: about ``step`` windows at a time (at most ``step``).

    ``rows`` indexes the ``B * nW`` windows of the batch, ``windows`` the same windows within
    their image (the rows of the shift mask). A chunk is either a run of one image's
    windows or, where an image has no more than ``step``, whole images (``windows`` is then
    all of them), so that small late-stage maps still make GEMMs of many rows.
    """
    if step >= num_windows:
        images = step // num_windows * num_windows
        for start in range(0, num_rows, images):
            yield slice(start, min(start + images, num_rows)), slice(0, num_windows)
        return
    for start in range(0, num_rows, num_windows):
        for wins in even_chunks(num_windows, step):
            yield slice(start + wins.start, start + wins.stop), wins


def linear_into(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``out[:] = x @ weight^T + bias`` on 2-d views (see :func:`gemm.linear_into`)."""
    return gemm.linear_into(out, x, weight, bias)


def chunk_probs(qkv: Tensor, bias: Tensor, num_heads: int, scale: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``q, k, v`` ``(n, h, N, d)`` (contiguous) and the probabilities of a chunk of windows
    ``(n, N, 3C)``."""
    q, k, v = _split_heads(qkv, num_heads, contiguous=True)
    return q, k, v, _attention_probs(q, k, bias, scale, bias.shape[0] if bias.dim() == 4 else 1)


def _chunk_attention(qkv: Tensor, bias: Tensor, num_heads: int, scale: float
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Attention of a chunk of windows ``(n, N, 3C)``.

    Returns ``q, k, v`` ``(n, h, N, d)`` (contiguous), the probabilities and the attended
    values ``(n*N, C)``.
    """
    q, k, v, attn = chunk_probs(qkv, bias, num_heads, scale)
    out = merge_heads(torch.matmul(attn, v))
    return q, k, v, attn, out.view(-1, out.shape[-1])


def attended_values(qkv: Tensor, bias: Tensor, num_heads: int, scale: float) -> Tensor:
    """The attended values ``(n*N, C)`` of windows ``(n, N, 3C)`` (a chunk, or a whole batch),
    for forwards that keep no probabilities: inference, and training, whose backward recomputes
    them. In PyTorch's fused CPU attention kernel (online softmax, no probabilities in memory,
    fp32 accumulation in every dtype): in fp32 0.7x the time of the explicit product and
    softmax on a chunk, 0.4x on windows where the shift mask puts exp(-100) denormals into the
    explicit softmax; under bf16 autocast Swin-T inference takes 0.8-0.9x the time."""
    q, k, v = _split_heads(qkv, num_heads)
    n, h, N, d = q.shape
    # SDPA falls back to its math path for a 3-d mask or one that requires grad (here nothing
    # is recorded: inference, or the forward of an autograd function with its own backward).
    mask = bias.detach().reshape(-1, h, N, N)
    # a per-window mask lines up with one image's windows: one call per image
    step = mask.shape[0] if mask.shape[0] > 1 else max(n, 1)
    if step >= n:  # one call; the kernel's output is laid out (n, N, h, d): a view, no copy
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).reshape(-1, h * d)
    out = qkv.new_empty(n, N, h, d)
    for i in range(0, n, step):
        rows = slice(i, i + step)
        out[rows].copy_(F.scaled_dot_product_attention(q[rows], k[rows], v[rows],
                                                       attn_mask=mask, scale=scale)
                        .transpose(1, 2))
    return out.view(-1, h * d)


def _chunked_forward(x: Tensor, qkv_weight: Tensor, qkv_bias: Optional[Tensor], bias: Tensor,
                     proj_weight: Tensor, proj_bias: Optional[Tensor], num_heads: int,
                     scale: float, num_windows: int, step: int, mask: Optional[Tensor] = None,
                     qkv: Optional[Tensor] = None) -> Tensor:
    """Forward of :func:`chunked_window_attention`; fills ``qkv`` ``(B*nW, N, 3C)`` if given."""
    BW, N, C = x.shape
    out = x.new_empty(BW, N, proj_weight.shape[0])
    for rows, wins in window_chunks(BW, num_windows, step):
        if qkv is None:
            chunk_qkv = gemm.linear(x[rows], qkv_weight, qkv_bias)
        else:
            chunk_qkv = qkv[rows]
            linear_into(chunk_qkv.view(-1, qkv.shape[-1]), x[rows].view(-1, C), qkv_weight,
                         qkv_bias)
        attended = attended_values(chunk_qkv, fold_mask(bias, mask, wins), num_heads, scale)
        linear_into(out[rows].view(-1, out.shape[-1]), attended, proj_weight, proj_bias)
    return out


def chunk_backward(q: Tensor, k: Tensor, v: Tensor, attn: Tensor, grad_attended: Tensor,
                    scale: float, sums: ChunkGradients, need_bias: bool, need_qkv_bias: bool
                    ) -> Tensor:
    """Backward of one chunk's attention from the gradient of its attended values ``(n*N, C)``.

    Adds the chunk's terms of the bias gradient (the bias is shared by all its windows and
    images) and of the qkv bias gradient (every slot's, padding slots included) to ``sums``;
    returns the gradient of the chunk's qkv ``(n*N, 3C)``.
    """
    n, h, N, d = q.shape
    grad_out = grad_attended.view(n, N, h, d).transpose(1, 2).contiguous()
    grad_qkv, grad_scores = _attention_backward(q, k, v, attn, grad_out, scale)
    if need_bias:
        sums.add('bias', grad_scores.sum(0))
    grad_qkv = grad_qkv.view(-1, grad_qkv.shape[-1])
    if need_qkv_bias:
        sums.add('qkv_b', grad_qkv.sum(0))
    return grad_qkv


class ChunkGradients:
    """Gradients summed over chunks; the first chunk's term becomes the sum (no zero fill)."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}

    def add(self, name: str, term: Tensor) -> None:
        """Add a fresh tensor (it may become the sum and be updated in place)."""
        if name in self._sums:
            self._sums[name] += term
        else:
            self._sums[name] = term

    def addmm(self, name: str, a: Tensor, b: Tensor) -> None:
        """Add ``a @ b``, into the sum's memory when there is one."""
        if name in self._sums:
            gemm.addmm_(self._sums[name], a, b)
        else:
            self._sums[name] = gemm.mm(a, b)

    def get(self, name: str) -> Optional[Tensor]:
        """The sum, or None when nothing was added (the gradient is not needed)."""
        return self._sums.get(name)


class _ChunkedWindowAttention(torch.autograd.Function):
    """qkv projection, window attention and output projection, a chunk of windows at a time.

    Forward and backward only ever hold chunk-sized temporaries (the probabilities, the
    per-head copies, the gradients of qkv), which stay in cache. Kept for backward: the input
    and ``qkv``, as the plain formula keeps them; the probabilities are recomputed per chunk.
    fp32 on CPU; weight gradients are accumulated over the chunks.
    """

    @staticmethod
    def forward(ctx, x: Tensor, qkv_weight: Tensor, qkv_bias: Optional[Tensor], bias: Tensor,
                proj_weight: Tensor, proj_bias: Optional[Tensor], num_heads: int, scale: float,
                num_windows: int, step: int, mask: Optional[Tensor]) -> Tensor:
        qkv = x.new_empty(*x.shape[:2], qkv_weight.shape[0])
        out = _chunked_forward(x, qkv_weight, qkv_bias, bias, proj_weight, proj_bias, num_heads,
                               scale, num_windows, step, mask, qkv)
        ctx.save_for_backward(x, qkv, bias, qkv_weight, proj_weight)
        ctx.mask = mask  # a cached layout tensor: nothing to save
        ctx.args = (num_heads, scale, num_windows, step, qkv_bias is not None,
                    proj_bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, qkv, bias, qkv_weight, proj_weight = ctx.saved_tensors
        num_heads, scale, num_windows, step, has_qkv_bias, has_proj_bias = ctx.args
        need_x, need_qkv_w, need_qkv_b, need_bias, need_proj_w, need_proj_b = (
            ctx.needs_input_grad[:6])
        BW, _, C = x.shape
        grad_x = torch.empty_like(x) if need_x else None
        sums = ChunkGradients()
        grad_y = grad_y.contiguous()
        for rows, wins in window_chunks(BW, num_windows, step):
            q, k, v, attn, attended = _chunk_attention(
                qkv[rows], fold_mask(bias, ctx.mask, wins), num_heads, scale)
            g = grad_y[rows].view(-1, grad_y.shape[-1])
            if need_proj_w:
                sums.addmm('proj_w', g.t(), attended)
            grad_qkv = chunk_backward(q, k, v, attn, gemm.mm(g, proj_weight), scale, sums,
                                       need_bias, has_qkv_bias and need_qkv_b)
            del attn, attended
            if need_qkv_w:
                sums.addmm('qkv_w', grad_qkv.t(), x[rows].view(-1, C))
            if need_x:
                gemm.mm(grad_qkv, qkv_weight, out=grad_x[rows].view(-1, C))
        if has_proj_bias and need_proj_b:
            sums.add('proj_b', grad_y.view(-1, grad_y.shape[-1]).sum(0))
        return (grad_x, sums.get('qkv_w'), sums.get('qkv_b'), sums.get('bias'),
                sums.get('proj_w'), sums.get('proj_b'), None, None, None, None, None)


def chunked_window_attention(x: Tensor, qkv_weight: Tensor, qkv_bias: Optional[Tensor],
                             bias: Tensor, proj_weight: Tensor, proj_bias: Optional[Tensor],
                             num_heads: int, scale: float, num_windows: int,
                             chunk_windows: int, mask: Optional[Tensor] = None) -> Tensor:
    """qkv projection, window attention and output projection over chunks of windows (CPU).

    The same sums as ``window_attention(linear(x, qkv_weight, qkv_bias), ...)``, with
    ``chunk_windows`` windows at a time so that every temporary stays in cache; differentiable.

    Args:
        x: ``(B * nW, N, C)`` windows.
        qkv_weight, qkv_bias: the qkv projection ``(3C, C)``, ``(3C,)``.
        bias: the relative position bias ``(h, N, N)``, shared by all windows.
        proj_weight, proj_bias, num_heads, scale, num_windows: as in :func:`window_attention`.
        chunk_windows: windows per chunk.
        mask: ``(nW, N, N)`` shift mask that the chunks add to the bias, or None: no per-window
            bias ``(nW, h, N, N)`` is built over the map (26 MiB over Swin-T's blocks at
            512x512), cached or kept for backward; the bias gradient is summed chunk by chunk.

    Returns:
        ``(B * nW, N, C)``.
    """
    if bias.dim() != 3:
        raise ValueError(f'chunked_window_attention takes the shared (h, N, N) bias and the '
                         f'shift mask apart (mask=...), got a bias of shape {tuple(bias.shape)}')
    x, bias = x.contiguous(), bias.to(x.dtype)
    if mask is not None:
        mask = mask.to(x.dtype)
    args = (x, qkv_weight, qkv_bias, bias, proj_weight, proj_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        return _ChunkedWindowAttention.apply(*args, num_heads, scale, num_windows, chunk_windows,
                                             mask)
    return _chunked_forward(*args, num_heads, scale, num_windows, chunk_windows, mask)
