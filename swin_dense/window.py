"""Window attention as plain tensor functions (no ``nn.Module`` here).

Everything the shifted-window scheme needs that depends only on sizes is built once per
``(H, W, window, shift, device)`` and cached: the gather that pads, rolls and partitions a
token map in one step, its inverse with the crop folded in, the -100 shift mask, and the
relative-position index. ``window_attention`` is the attention itself (with the output
projection); ``chunked_window_attention`` adds the qkv projection and runs a chunk of windows
at a time, forward (in PyTorch's fused attention kernel) and backward (explicit, recomputing
the probabilities), for the CPU (see ``layers.CHUNK_TOKENS``); ``token_window_attention`` does
the same from and to the token map with both projections on the tokens, which skips the
padding slots' rows (CPU training on padded maps).

Order of operations, identical to the official code, mmdet, mmseg and torchvision
(REFERENCE detail 1): zero-pad bottom/right to a multiple of the window, cyclic shift by
``-shift`` on the padded grid, mask built on the padded grid, attention per window, reverse
shift, crop. Padded tokens are not masked as keys, exactly as in those implementations.

Shapes: ``B`` batch, ``H x W`` token map, ``M`` window size, ``N = M * M`` tokens per window,
``nW`` windows per image, ``h`` heads, ``d`` channels per head, ``C = h * d``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

#: Additive attention mask for token pairs that come from different regions of the shifted grid.
#: -100 rather than -inf: finite in fp16 (the official value, kept for identical outputs).
MASK_VALUE = -100.0

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


def padded_size(size: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``size``."""
    # not -(-size // multiple): negative intermediates defeat inductor's range analysis of
    # symbolic sizes under torch.compile(dynamic=True)
    return (size + multiple - 1) // multiple * multiple


def _shift_regions(padded: int, window_size: int, shift_size: int,
                   device: Optional[torch.device] = None) -> Tensor:
    """Region label (0, 1, 2) of each row of the padded grid: slices (0,-M), (-M,-s), (-s,None)."""
    pos = torch.arange(padded, device=device)
    return (pos >= padded - window_size).long() + (pos >= padded - shift_size).long()


def shift_mask(padded_height: int, padded_width: int, window_size: int, shift_size: int,
               device: Optional[torch.device] = None) -> Tensor:
    """``(nW, N, N)`` additive mask of the shifted grid: -100 between tokens of different regions.

    Regions are the slices ``(0, -M), (-M, -s), (-s, None)`` of the padded grid along each axis;
    they belong to positions of the shifted grid, i.e. to window slots.
    """
    M = window_size
    nh, nw = padded_height // M, padded_width // M
    region_h = _shift_regions(padded_height, M, shift_size, device).view(nh, 1, M, 1)
    region_w = _shift_regions(padded_width, M, shift_size, device).view(1, nw, 1, M)
    label = (region_h * 3 + region_w).reshape(nh * nw, M * M)
    return (label.unsqueeze(1) != label.unsqueeze(2)).float() * MASK_VALUE


@functools.lru_cache(maxsize=128)
def window_layout(height: int, width: int, window_size: int, shift_size: int,
                  device: torch.device) -> WindowLayout:
    """Build (once per argument tuple) the gather/scatter indices and shift mask of a token map.

    Args:
        height, width: token map ``H x W``.
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
    # No data-dependent shapes anywhere (torch.compile traces this): the padding slots are the
    # first Hp*Wp - H*W entries of a stable sort that puts the outside slots first.
    num_pad = Hp * Wp - height * width
    pad_slots = (torch.argsort(inside.int(), stable=True)[:num_pad].to(device)
                 if num_pad else None)

    mask = shift_mask(Hp, Wp, M, shift_size, device) if shift_size > 0 else None
    return WindowLayout(height, width, M, shift_size, nh * nw, gather.to(device), pad_slots,
                        scatter.reshape(-1).to(device), mask)


@functools.lru_cache(maxsize=16)
def relative_position_index(window_size: int, device: torch.device) -> Tensor:
    """``(N, N)`` index into the ``((2M-1)^2, heads)`` bias table for each query/key pair.

    ``index[i, j] = (y_i - y_j + M - 1) * (2M - 1) + (x_i - x_j + M - 1)``, the official formula.
    """
    M = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(M), torch.arange(M), indexing='ij')).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (M - 1)  # (2, N, N)
    return (rel[0] * (2 * M - 1) + rel[1]).to(device)


def relative_position_bias(table: Tensor, window_size: int) -> Tensor:
    """Gather the bias table ``((2M-1)^2, h)`` into a per-head bias ``(h, N, N)``."""
    N = window_size * window_size
    # traced, the index is built in the graph (dynamo does not honour lru_cache)
    build = (relative_position_index.__wrapped__ if torch.compiler.is_compiling()
             else relative_position_index)
    index = build(window_size, table.device)
    # index_select: its backward is an index_add, 1.5-4x faster than indexing's scatter-add
    return table.index_select(0, index.view(-1)).view(N, N, -1).permute(2, 0, 1).contiguous()


def _batch_rows(index: Tensor, batch: int, num_tokens: int) -> Tensor:
    """``(B, I)``: the rows of a flattened ``(B * L, C)`` batch that ``index`` ``(I,)`` (into
    one image's ``L = num_tokens`` tokens) picks in each image."""
    return index + torch.arange(0, batch * num_tokens, num_tokens,
                                device=index.device).view(-1, 1)


def _gather_tokens(x: Tensor, index: Tensor, zero: Optional[Tensor]) -> Tensor:
    """``x[:, index]``, rows at positions ``zero`` set to 0: ``(B, L, C)`` -> ``(B, I, C)``."""
    B, L, C = x.shape
    out = x.new_empty(B, index.numel(), C)  # not a view: autograd lets callers add into it
    # one gather of rows of the flattened batch: 2-5x faster on the CPU than along dim 1
    torch.index_select(x.reshape(B * L, C), 0, _batch_rows(index, B, L).view(-1),
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
    """Pad, roll and partition in one gather: ``(B, H*W, C)`` -> ``(B * nW, N, C)``."""
    B, L, C = x.shape
    return _WindowPermutation.apply(x, layout, True).view(B * layout.num_windows, -1, C)


def tokens_from_windows(windows: Tensor, layout: WindowLayout) -> Tensor:
    """Inverse of :func:`windows_from_tokens` with the crop folded in: -> ``(B, H*W, C)``."""
    C = windows.shape[-1]
    B = windows.shape[0] // layout.num_windows
    return _WindowPermutation.apply(windows.reshape(B, -1, C), layout, False)


def partition_windows(x: Tensor, hw: tuple[int, int], window_size: int, shift_size: int
                      ) -> Tensor:
    """The plain formula of :func:`windows_from_tokens` (pad, roll, partition by views).

    ``(B, H*W, C)`` -> ``(B * nW, N, C)``. No index tensors: this is what torch.compile traces,
    so that with symbolic sizes one graph serves all input sizes that pad alike.
    """
    B, _, C = x.shape
    (H, W), M = hw, window_size
    Hp, Wp = padded_size(H, M), padded_size(W, M)
    x = F.pad(x.view(B, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H))
    if shift_size:
        x = torch.roll(x, (-shift_size, -shift_size), (1, 2))
    nh, nw = Hp // M, Wp // M
    out = x.new_empty(B * nh * nw, M * M, C)
    out.view(B, nh, nw, M, M, C).copy_(x.view(B, nh, M, nw, M, C).permute(0, 1, 3, 2, 4, 5))
    return out


def merge_windows(windows: Tensor, hw: tuple[int, int], window_size: int, shift_size: int
                  ) -> Tensor:
    """Inverse of :func:`partition_windows` (merge, roll back, crop): -> ``(B, H*W, C)``."""
    C = windows.shape[-1]
    (H, W), M = hw, window_size
    Hp, Wp = padded_size(H, M), padded_size(W, M)
    nh, nw = Hp // M, Wp // M
    B = windows.shape[0] // (nh * nw)
    x = windows.new_empty(B, Hp, Wp, C)
    x.view(B, nh, M, nw, M, C).copy_(windows.view(B, nh, nw, M, M, C).permute(0, 1, 3, 2, 4, 5))
    if shift_size:
        x = torch.roll(x, (shift_size, shift_size), (1, 2))
    out = x.new_empty(B, H * W, C)
    out.view(B, H, W, C).copy_(x[:, :H, :W])
    return out


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


def _merge_heads(x: Tensor) -> Tensor:
    """``(B*nW, h, N, d)`` -> ``(B*nW, N, h*d)``."""
    BW, h, N, d = x.shape
    return x.transpose(1, 2).reshape(BW, N, h * d)


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
        out = _merge_heads(torch.matmul(attn, v))
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
            out = _merge_heads(torch.matmul(attn, v)).view(BW * N, h * d)
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


def window_attention(qkv: Tensor, num_heads: int, scale: float, bias: Tensor,
                     num_windows: int, proj_weight: Tensor, proj_bias: Optional[Tensor] = None,
                     dropout_p: float = 0.0) -> Tensor:
    """Multi-head self-attention inside each window, followed by the output projection.

    Args:
        qkv: ``(B * nW, N, 3 * C)``, the output of the qkv projection.
        num_heads: ``h``.
        scale: multiplier of ``q @ k^T`` (``d ** -0.5`` unless overridden).
        bias: additive attention bias, ``(h, N, N)`` (W-MSA) or ``(nW, h, N, N)`` with the shift
            mask folded in (SW-MSA); it broadcasts over the batch, never expanded.
        num_windows: ``nW``, to view the batch as ``(B, nW)`` for a per-window bias.
        proj_weight, proj_bias: the output projection ``(C, C)``, ``(C,)``.
        dropout_p: attention dropout probability (0 in eval).

    Returns:
        ``(B * nW, N, C)``.
    """
    BW, N, C3 = qkv.shape
    bias = bias.to(qkv.dtype)
    if dropout_p > 0.0 or qkv.is_cuda or torch.compiler.is_compiling():
        out = _sdpa_window_attention(qkv, num_heads, scale, bias, num_windows, dropout_p)
        return F.linear(out, proj_weight, proj_bias)
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (qkv, bias, proj_weight, proj_bias)):
        out = _WindowAttention.apply(qkv, bias, proj_weight, proj_bias, num_heads, scale,
                                     num_windows)
        return out.view(BW, N, -1)
    return F.linear(_attended(qkv, bias, num_heads, scale).view(BW, N, -1), proj_weight,
                    proj_bias)


def even_chunks(total: int, step: int) -> Iterator[slice]:
    """Slices covering ``range(total)``: as few as chunks of at most ``step`` allow, of sizes
    that differ by at most 1 (no short tail: a chunk of a few rows re-reads the weights for
    little work)."""
    n = -(-total // step)
    return (slice(i * total // n, (i + 1) * total // n) for i in range(n))


def _window_chunks(num_rows: int, num_windows: int, step: int):
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


def fold_mask(bias: Tensor, mask: Optional[Tensor], windows: slice = slice(None)) -> Tensor:
    """The attention bias of ``windows`` (all by default): the shared ``(h, N, N)`` bias, plus
    those rows of an ``(nW, N, N)`` shift mask, ``(n, h, N, N)``; the bias alone if no mask.
    The chunked CPU attention folds it chunk by chunk instead of once over the map."""
    return bias if mask is None else bias + mask[windows].unsqueeze(1)


def _linear_into(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``out[:] = x @ weight^T + bias`` on 2-d views, without a temporary."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _chunk_probs(qkv: Tensor, bias: Tensor, num_heads: int, scale: float
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
    q, k, v, attn = _chunk_probs(qkv, bias, num_heads, scale)
    out = _merge_heads(torch.matmul(attn, v))
    return q, k, v, attn, out.view(-1, out.shape[-1])


def _attended(qkv: Tensor, bias: Tensor, num_heads: int, scale: float) -> Tensor:
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
    for rows, wins in _window_chunks(BW, num_windows, step):
        if qkv is None:
            chunk_qkv = F.linear(x[rows], qkv_weight, qkv_bias)
        else:
            chunk_qkv = qkv[rows]
            _linear_into(chunk_qkv.view(-1, qkv.shape[-1]), x[rows].view(-1, C), qkv_weight,
                         qkv_bias)
        attended = _attended(chunk_qkv, fold_mask(bias, mask, wins), num_heads, scale)
        _linear_into(out[rows].view(-1, out.shape[-1]), attended, proj_weight, proj_bias)
    return out


def _chunk_backward(q: Tensor, k: Tensor, v: Tensor, attn: Tensor, grad_attended: Tensor,
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
            self._sums[name].addmm_(a, b)
        else:
            self._sums[name] = a.mm(b)

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
        for rows, wins in _window_chunks(BW, num_windows, step):
            q, k, v, attn, attended = _chunk_attention(
                qkv[rows], fold_mask(bias, ctx.mask, wins), num_heads, scale)
            g = grad_y[rows].view(-1, grad_y.shape[-1])
            if need_proj_w:
                sums.addmm('proj_w', g.t(), attended)
            grad_qkv = _chunk_backward(q, k, v, attn, g.mm(proj_weight), scale, sums, need_bias,
                                       has_qkv_bias and need_qkv_b)
            del attn, attended
            if need_qkv_w:
                sums.addmm('qkv_w', grad_qkv.t(), x[rows].view(-1, C))
            if need_x:
                torch.mm(grad_qkv, qkv_weight, out=grad_x[rows].view(-1, C))
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


#: Training on the CPU runs the qkv and output projections on the tokens instead of the window
#: slots (see :func:`token_window_attention`) where ``padding slots * C >= this * slots``: where
#: the padding's GEMM rows (8C^2 flops each, three times: forward and backward) cost more than
#: the extra copies (about 8C values per slot). Measured on Swin-T at 512x512 (2-core CPU): no
#: gain on stage 1 (7% padding, C=96), a gain on stages 3-4 (16% and 42%, C=384, 768).
TOKEN_PROJECTIONS_MIN_PAD_CHANNELS = 20


def token_projections_pay(layout: WindowLayout, channels: int) -> bool:
    """Whether :func:`token_window_attention` saves time over projecting on the windows."""
    if layout.pad_slots is None:
        return False
    slots = layout.num_windows * layout.window_size ** 2
    return layout.pad_slots.numel() * channels >= TOKEN_PROJECTIONS_MIN_PAD_CHANNELS * slots


def _slot_rows(layout: WindowLayout, batch: int, num_tokens: int) -> Tensor:
    """``(B * nW * N,)`` token row (of ``B * L`` rows) of every window slot; the padding slots
    point at one extra row ``B * L``."""
    index = _batch_rows(layout.gather_index, batch, num_tokens)
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
        _linear_into(qkv[:rows], x.view(rows, C), qkv_weight, qkv_bias)
        qkv[rows] = 0.0 if qkv_bias is None else qkv_bias
        index = _slot_rows(layout, B, L)
        attended = x.new_empty(rows + 1, qkv_weight.shape[0] // 3)
        for wrows, wins in _window_chunks(B * nW, nW, step):
            slots = index[wrows.start * N:wrows.stop * N]
            chunk = qkv.index_select(0, slots).view(-1, N, qkv.shape[-1])
            attended.index_copy_(0, slots, _attended(chunk, fold_mask(bias, layout.mask, wins),
                                                     num_heads, scale))
        attended = attended[:rows]
        out = x.new_empty(B, L, proj_weight.shape[0])
        _linear_into(out.view(rows, -1), attended, proj_weight, proj_bias)
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
        torch.mm(grad_y, proj_weight, out=grad_attended[:rows])
        grad_attended[rows] = 0.0  # the padding slots' outputs are cropped
        grad_qkv = qkv.new_empty(qkv.shape)  # row `rows` collects the padding slots' (unused)
        for wrows, wins in _window_chunks(B * nW, nW, step):
            slots = index[wrows.start * N:wrows.stop * N]
            q, k, v, attn = _chunk_probs(qkv.index_select(0, slots).view(-1, N, qkv.shape[-1]),
                                         fold_mask(bias, layout.mask, wins), num_heads, scale)
            grad_chunk = _chunk_backward(q, k, v, attn, grad_attended.index_select(0, slots),
                                         scale, sums, need_bias, has_qkv_bias and need_qkv_b)
            del attn
            grad_qkv.index_copy_(0, slots, grad_chunk)
        grad_qkv = grad_qkv[:rows]
        grad_x = grad_qkv.mm(qkv_weight).view(B, L, C) if need_x else None
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


def _sdpa_window_attention(qkv: Tensor, num_heads: int, scale: float, bias: Tensor,
                           num_windows: int, dropout_p: float) -> Tensor:
    """The same attention (without the projection) through ``scaled_dot_product_attention``.

    Used for attention dropout; on CUDA, where the fused kernels take the bias (with its
    gradient) and never materialise the probabilities; and under torch.compile (differentiable
    without a custom autograd function, which dynamo does not trace with symbolic sizes). The
    bias broadcasts, never expanded over the batch: ``(1, h, N, N)`` over ``B * nW`` windows;
    per window, ``(nW, h, N, N)`` as it is for one image, or ``(1, nW * h, N, N)`` with a
    batch of several viewed as ``(B, nW * h)`` (which takes a copy of ``qkv``). Returns
    ``(B * nW, N, C)``.
    """
    BW, N, C3 = qkv.shape
    if bias.dim() == 3 or BW == num_windows:
        q, k, v = _split_heads(qkv, num_heads)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.unsqueeze(0) if bias.dim() == 3 else bias,
            dropout_p=dropout_p, scale=scale)
        return _merge_heads(out)
    B, d = BW // num_windows, C3 // (3 * num_heads)
    qkv = qkv.view(B, num_windows, N, 3, num_heads, d).permute(3, 0, 1, 4, 2, 5)
    q, k, v = qkv.reshape(3, B, num_windows * num_heads, N, d).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(1, -1, N, N),
                                         dropout_p=dropout_p, scale=scale)
    return out.view(B, num_windows, num_heads, N, d).permute(0, 1, 3, 2, 4).reshape(BW, N, -1)
