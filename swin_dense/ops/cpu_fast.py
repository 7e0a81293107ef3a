"""The eager fast path, behind one switch: :func:`applies`.

The layers (:mod:`swin_dense.layers`) ask :func:`applies` once per forward and run either the
plain formulas (:mod:`swin_dense.ops.window`, :mod:`swin_dense.ops.attention`) or the functions
here. Both give the same outputs and gradients (the parity tests run both against mmdet's
Swin); the fast one is built for the CPU, where the plain formulas spend much of their time on
fresh pages of map-sized temporaries, denormal exponentials of masked pairs and GEMM rows of
padding slots. What it does, each piece under the conditions it pays in:

- CPU attention: chunks of windows with an explicit backward (fp32 training and inference,
  autocast inference), both projections on the tokens where the map is padded enough (fp32
  training), the probabilities kept for backward (training under autocast or in float64), the
  fused kernel without its math fallback (other inference):
  :mod:`swin_dense.ops.chunked_attention` and :mod:`swin_dense.ops.token_attention`; on other
  devices the plain attention;
- window partitions as one cached index gather each way (any device);
- the relative position bias cached across inference forwards until the table changes (any
  device);
- the MLP in chunks with the GELU recomputed in backward (CPU fp32 training), the GELU
  recomputed (training elsewhere, any device), the GELU in place (inference, any device);
- the block's MLP over chunks of tokens (CPU inference), and a branch that stochastic depth
  drops for the whole batch not computed at all (CPU training);
- the token map -> NCHW copy a few rows at a time (any device);
- every fp32 projection and MLP product of the CPU kernels above (forward and backward) on
  the GEMM library that is faster for its shape on this machine: :mod:`swin_dense.ops.gemm`.

It never runs while a graph is captured (``torch.jit`` trace or script, ``torch.compile``,
``torch.export``, ONNX export): its autograd functions and caches are keyed on concrete sizes.
Turn it off for the whole process with the environment variable ``SWIN_DENSE_CPU_FAST=0`` (read
at import) or ``cpu_fast.ENABLED = False``, or for a block of code with
``with cpu_fast.enabled(False): ...``.

Private torch ops, and why: ``torch.ops.aten.gelu_`` is GELU in place (``F.gelu`` has no
``inplace`` argument), which saves a map-sized buffer per block in inference;
``aten.gelu_backward`` is GELU's own backward kernel, needed because the GELU is recomputed
outside autograd (no public function computes it without building a graph).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import gemm
from .attention import capturing_graph, window_attention
from .chunked_attention import (ChunkGradients, chunked_window_attention, even_chunks,
                                fused_inference_attention, keep_probs_window_attention)
from .token_attention import (token_projections_pay, token_window_attention,
                              token_window_inference)
from .window import WindowLayout, relative_position_bias, relative_position_index


def _flag_from_environment(name: str) -> bool:
    value = os.environ.get(name, '1').strip().lower()
    if value in ('', '1', 'true', 'yes', 'on'):
        return True
    if value in ('0', 'false', 'no', 'off'):
        return False
    raise ValueError(f'{name}={value!r} is not understood: set it to 0 (plain path only) or 1 '
                     '(the fast path where it applies, the default)')


#: Whether the fast path may run at all (it still runs only where :func:`applies`).
ENABLED: bool = _flag_from_environment('SWIN_DENSE_CPU_FAST')


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Turn the fast path on or off (:data:`ENABLED`) inside a ``with`` block."""
    global ENABLED
    saved, ENABLED = ENABLED, bool(on)
    try:
        yield
    finally:
        ENABLED = saved


def applies() -> bool:
    """The switch: the fast path is on and no graph is being captured from this forward."""
    return ENABLED and not capturing_graph()


#: On CPU (fp32) the attention and the MLP run over chunks of about this many tokens (whole
#: windows), in inference and in training. Map-sized temporaries are fresh pages for every
#: block (glibc maps blocks above 32 MiB anew, which the kernel must fault in and zero);
#: chunk-sized ones are reused by the allocator. Enough rows amortise the weights, which every
#: chunk re-reads (several MiB in the late stages).
CHUNK_TOKENS = 8192


def chunk_rows(tokens_per_row: int = 1) -> int:
    """How many rows of ``tokens_per_row`` tokens (a window, or one token) make one chunk."""
    return -(-CHUNK_TOKENS // tokens_per_row)


def cpu_fp32(x: Tensor) -> bool:
    """Whether the chunked CPU kernels apply: fp32 on CPU, no autocast."""
    return (x.device.type == 'cpu' and x.dtype == torch.float32
            and not torch.is_autocast_enabled('cpu'))


def cpu_autocast_inference(x: Tensor) -> bool:
    """Whether the chunked attention runs in CPU autocast's dtype: inference (no autograd) under
    autocast on the CPU, for an fp32 model. Not in training: there the chunks measured slower
    per bf16 train step than keeping the probabilities."""
    return (x.device.type == 'cpu' and torch.is_autocast_enabled('cpu')
            and not torch.is_grad_enabled()
            and x.dtype in (torch.float32, torch.get_autocast_dtype('cpu')))


def records_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd records an op on ``tensors`` (grad mode on and one requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------- attention

@functools.lru_cache(maxsize=16)
def cached_relative_position_index(window_size: int, device: torch.device) -> Tensor:
    """:func:`relative_position_index`, built once per window and device (V1's and V2's bias)."""
    return relative_position_index(window_size, device)


def relative_bias(cache: dict, table: Tensor, window_size: int) -> Tensor:
    """The relative position bias ``(h, N, N)`` of ``table``, cached in ``cache`` (a dict the
    module owns and empties when it moves) while nothing trains the table.

    Cached on the CPU in the dtype the attention runs in (bf16 under bf16 autocast), until the
    table changes (its version counter or storage). Folding the shift mask in here instead
    would make per-window biases ``(nW, h, N, N)`` that stay cached across forwards or are kept
    for backward: more peak memory for no speed.
    """
    index = cached_relative_position_index(window_size, table.device)
    if torch.is_grad_enabled() and table.requires_grad:
        cache.clear()  # what eval cached is stale once the table trains
        return relative_position_bias(table, window_size, index)
    dtype = table.dtype
    if table.device.type == 'cpu' and dtype == torch.float32 and torch.is_autocast_enabled('cpu'):
        dtype = torch.get_autocast_dtype('cpu')
    key = (table._version, table.data_ptr(), table.dtype, dtype)
    bias = cache.get(key)
    if bias is None:
        if len(cache) > 4:
            cache.clear()
        bias = cache[key] = relative_position_bias(table, window_size, index).to(dtype)
    return bias


def window_msa(x: Tensor, qkv_weight: Tensor, qkv_bias: Optional[Tensor], bias: Tensor,
               proj_weight: Tensor, proj_bias: Optional[Tensor], num_heads: int, scale: float,
               mask: Optional[Tensor], num_windows: int, dropout_p: float = 0.0) -> Tensor:
    """qkv projection, window attention and output projection of windows ``(B * nW, N, C)``.

    The chunked kernels where they apply (no attention dropout; fp32 on CPU, or CPU autocast
    inference); else, on the CPU, the attention that keeps its probabilities (training) or the
    fused kernel (inference); else the plain attention.
    """
    if dropout_p == 0.0 and cpu_fp32(x):
        return _chunked(x, qkv_weight, qkv_bias, bias, proj_weight, proj_bias, num_heads, scale,
                        mask, num_windows)
    if dropout_p == 0.0 and cpu_autocast_inference(x):
        dtype = torch.get_autocast_dtype('cpu')
        qkv_bias, proj_bias = (None if b is None else b.to(dtype) for b in (qkv_bias, proj_bias))
        with torch.autocast('cpu', enabled=False):  # cast here once, as autocast would
            return _chunked(x.to(dtype), qkv_weight.to(dtype), qkv_bias, bias.to(dtype),
                            proj_weight.to(dtype), proj_bias, num_heads, scale, mask,
                            num_windows)
    qkv = F.linear(x, qkv_weight, qkv_bias)
    if dropout_p > 0.0 or x.device.type != 'cpu':
        return F.linear(window_attention(qkv, num_heads, scale, bias, mask, dropout_p),
                        proj_weight, proj_bias)
    folded = bias if mask is None else bias + mask.unsqueeze(1)
    if records_grad(qkv, folded, proj_weight, proj_bias):
        return keep_probs_window_attention(qkv, folded, proj_weight, proj_bias, num_heads, scale,
                                           num_windows)
    return fused_inference_attention(qkv, folded, proj_weight, proj_bias, num_heads, scale)


def _chunked(x: Tensor, qkv_weight: Tensor, qkv_bias: Optional[Tensor], bias: Tensor,
             proj_weight: Tensor, proj_bias: Optional[Tensor], num_heads: int, scale: float,
             mask: Optional[Tensor], num_windows: int) -> Tensor:
    """:func:`chunked_window_attention` with chunks of :data:`CHUNK_TOKENS` tokens; the chunks
    fold the mask into the bias."""
    return chunked_window_attention(x, qkv_weight, qkv_bias, bias, proj_weight, proj_bias,
                                    num_heads, scale, num_windows, chunk_rows(x.shape[1]), mask)


def takes_tokens(x: Tensor, layout: WindowLayout, params: Sequence[Tensor], no_dropout: bool
                 ) -> bool:
    """Whether :func:`token_window_msa` applies to the tokens ``x`` ``(B, H*W, C)``: fp32 on
    the CPU (``no_dropout``: none active), training or inference, on a map padded enough for
    it to pay."""
    if not (cpu_fp32(x) and no_dropout):
        return False
    inference = not records_grad(x, *params)
    return token_projections_pay(layout, x.shape[-1], inference)


def token_window_msa(x: Tensor, layout: WindowLayout, qkv_weight: Tensor,
                     qkv_bias: Optional[Tensor], bias: Tensor, proj_weight: Tensor,
                     proj_bias: Optional[Tensor], num_heads: int, scale: float) -> Tensor:
    """The attention of the tokens ``(B, H*W, C)`` of the map ``layout`` describes, with both
    projections on the tokens: tokens out (see :func:`token_window_attention`, and
    :func:`token_window_inference` where autograd records nothing)."""
    params = (x, qkv_weight, qkv_bias, bias, proj_weight, proj_bias)
    if not records_grad(*params):
        return token_window_inference(x, layout, qkv_weight, qkv_bias, bias, proj_weight,
                                      proj_bias, num_heads, scale,
                                      chunk_rows(layout.window_size ** 2))
    return token_window_attention(x, layout, qkv_weight, qkv_bias, bias, proj_weight, proj_bias,
                                  num_heads, scale, chunk_rows(layout.window_size ** 2))


# ---------------------------------------------------------------- MLP

class _GeluLinear(torch.autograd.Function):
    """``linear(gelu(h), weight, bias)`` that saves ``h`` only and recomputes the GELU in backward.

    The MLP's hidden activations are the largest tensors a block keeps for backward (4C per
    token, twice: GELU input and output); keeping one of them cuts training memory.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """``h``: ``(L, hidden)`` -> ``(L, out)``; 2-d so that the output is no view."""
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        h, weight = ctx.saved_tensors
        grad_h = grad_weight = grad_bias = None
        # Under autocast the forward ran in h's dtype; gradients return in each input's dtype.
        if ctx.needs_input_grad[1]:
            grad_weight = grad_out.t().mm(F.gelu(h).to(grad_out.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_gelu = grad_out.mm(weight.to(grad_out.dtype)).to(h.dtype)
            # GELU's own backward kernel: the GELU was recomputed outside autograd
            grad_h = torch.ops.aten.gelu_backward(grad_gelu, h)
        return grad_h, grad_weight, grad_bias


class ChunkedGeluMLP(torch.autograd.Function):
    """``linear(gelu(linear(x, w1, b1)), w2, b2)`` over the rows of ``x``, a chunk at a time.

    For CPU training in fp32. Only the input rows ``u`` and the hidden pre-activation ``h`` are
    kept (as the plain formula's autograd would keep them, less the GELU output); every other
    temporary is chunk-sized, so it stays in cache instead of being fresh pages of a map-sized
    tensor. Weight gradients are accumulated over the chunks.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        """``x``: ``(..., C)`` -> ``(..., C_out)``, a fresh tensor (no view of one: callers add
        the residual into it in place, which on a view costs autograd two map-sized copies)."""
        u = x.reshape(-1, x.shape[-1])
        rows = u.shape[0]
        h = u.new_empty(rows, w1.shape[0])
        out = u.new_empty(*x.shape[:-1], w2.shape[0])
        out_rows = out.view(rows, -1)
        for c in even_chunks(rows, chunk_rows()):
            gemm.linear_into(h[c], u[c], w1, b1)
            gemm.linear_into(out_rows[c], F.gelu(h[c]), w2, b2)
        ctx.save_for_backward(u, h, w1, w2)
        ctx.shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        u, h, w1, w2 = ctx.saved_tensors
        need_u, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        grad_out = grad_out.reshape(u.shape[0], -1)
        grad_u = u.new_empty(ctx.shape) if need_u else None
        grad_rows = grad_u.view(u.shape) if need_u else None
        sums = ChunkGradients()
        for c in even_chunks(u.shape[0], chunk_rows()):
            if need_w2:
                sums.addmm('w2', grad_out[c].t(), F.gelu(h[c]))
            grad_h = gemm.mm(grad_out[c], w2)
            # GELU's own backward kernel (the GELU runs outside autograd here), written in
            # place through its out= variant: one chunk buffer less
            torch.ops.aten.gelu_backward.grad_input(grad_h, h[c], grad_input=grad_h)
            if need_w1:
                sums.addmm('w1', grad_h.t(), u[c])
            if need_b1:
                sums.add('b1', grad_h.sum(0))
            if need_u:
                gemm.mm(grad_h, w1, out=grad_rows[c])
        if need_b2:
            sums.add('b2', grad_out.sum(0))
        return grad_u, sums.get('w1'), sums.get('b1'), sums.get('w2'), sums.get('b2')


def gelu_mlp(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor]
             ) -> Tensor:
    """``linear(gelu(linear(x, w1, b1)), w2, b2)`` (exact GELU, no dropout): ``(..., C)`` in,
    a fresh ``(..., C_out)`` out. Inference: GELU in place; CPU fp32 training: chunked, GELU
    recomputed; training elsewhere: the GELU recomputed in backward."""
    if not torch.is_grad_enabled():
        # aten's in-place GELU (F.gelu has no inplace argument): no second hidden-size buffer
        return gemm.linear(torch.ops.aten.gelu_(gemm.linear(x, w1, b1)), w2, b2)
    if cpu_fp32(x) and b1 is not None and b2 is not None:
        return ChunkedGeluMLP.apply(x, w1, b1, w2, b2)
    h = F.linear(x, w1, b1)
    out = _GeluLinear.apply(h.reshape(-1, h.shape[-1]), w2, b2)
    return out.view(*h.shape[:-1], -1)


# ---------------------------------------------------------------- block and output

class _ZeroLink(torch.autograd.Function):
    """A scalar 0 computed from ``params``: backward gives each of them a zero gradient."""

    @staticmethod
    def forward(ctx, *params: Tensor) -> Tensor:
        ctx.specs = [(p.shape, p.dtype, p.device) for p in params]
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad: Tensor):
        return tuple(torch.zeros(shape, dtype=dtype, device=device)
                     for shape, dtype, device in ctx.specs)


def skippable_residual(x: Tensor, scale: Tensor, branch: Callable[[Tensor], Tensor],
                       params: Sequence[Tensor]) -> Tensor:
    """``x + branch(x) * scale`` for a stochastic-depth factor ``scale`` ``(B, 1, ...)`` drawn
    before the branch; ``branch`` is not called when the factor is 0 for every sample, and
    ``params`` (those of the branch that require grad) get zero gradients instead, as
    ``branch(x) * 0`` would give them (DDP sees every parameter used)."""
    if bool(scale.any()):
        return (branch(x) * scale).add_(x)
    if not params or not torch.is_grad_enabled():
        return x
    return x + _ZeroLink.apply(*params)


#: Values per block of the token-map -> NCHW copy (about 1 MiB in fp32): a transposing copy
#: done a few rows at a time stays in cache, where one over the whole map does not.
TRANSPOSE_BLOCK_NUMEL = 2 ** 18


class _TokensToNCHW(torch.autograd.Function):
    """``(B, H*W, C)`` -> contiguous ``(B, C, H, W)``, copied a block of rows at a time."""

    @staticmethod
    def forward(ctx, x: Tensor, height: int, width: int) -> Tensor:
        B, _, C = x.shape
        out = x.new_empty(B, C, height, width)
        step = max(1, TRANSPOSE_BLOCK_NUMEL // (width * C))
        for r in range(0, height, step):
            rows = x[:, r * width:(r + step) * width].view(B, -1, width, C)
            out[:, :, r:r + step].copy_(rows.permute(0, 3, 1, 2))
        ctx.hw = (height, width)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        height, width = ctx.hw
        B, C = grad.shape[:2]
        grad_x = grad.new_empty(B, height * width, C)
        step = max(1, TRANSPOSE_BLOCK_NUMEL // (width * C))
        for r in range(0, height, step):
            rows = grad_x[:, r * width:(r + step) * width].view(B, -1, width, C)
            rows.copy_(grad[:, :, r:r + step].permute(0, 2, 3, 1))
        return grad_x, None, None


def tokens_to_nchw(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """A token map ``(B, H*W, C)`` as a contiguous feature map ``(B, C, H, W)``, in blocks."""
    return _TokensToNCHW.apply(x.contiguous(), *hw)
