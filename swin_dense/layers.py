"""Thin modules over :mod:`swin_dense.window`: patch embedding, window attention, block, merging, stage.

Parameter names follow mmdet/mmseg's ``SwinTransformer`` (``patch_embed.projection``,
``stages.i.blocks.j.attn.w_msa.qkv``, ``ffn.layers.0.0``, ``stages.i.downsample.reduction``, ...)
so that detector and segmentor checkpoints written with the in-tree backbones load unchanged,
also through ``load_from``. PatchMerging keeps mmcv's ``nn.Unfold`` channel order
(``index = c * 4 + 2 * dy + dx``); :mod:`swin_dense.checkpoint` converts other orders.

Token maps travel as ``(B, H*W, C)`` with their ``(H, W)`` beside them.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor

from .window import (ChunkGradients, WindowLayout, chunked_window_attention, even_chunks,
                     fold_mask, merge_windows, padded_size, partition_windows,
                     relative_position_bias, shift_mask, token_projections_pay,
                     token_window_attention, tokens_from_windows, window_attention, window_layout,
                     windows_from_tokens)

#: On CPU (fp32) the attention and the MLP run over chunks of about this many tokens (whole
#: windows), in inference and in training. Map-sized temporaries are fresh pages for every
#: block (glibc maps blocks above 32 MiB anew; about half the MLP's time at 800x1344 on a
#: 2-core CPU); chunk-sized ones are reused by the allocator. Enough rows amortise the weights,
#: which every chunk re-reads (several MiB in the late stages). Measured on Swin-T (window 7)
#: on a 2-core CPU against 2048 tokens: README, "Chunks and copies".
CHUNK_TOKENS = 8192


def _cpu_fp32(x: Tensor) -> bool:
    """Whether the chunked CPU paths apply: fp32 on CPU, no autocast, no torch.compile tracing."""
    return (x.device.type == 'cpu' and x.dtype == torch.float32
            and not torch.is_autocast_enabled('cpu') and not torch.compiler.is_compiling())


def _cpu_autocast_inference(x: Tensor) -> bool:
    """Whether the chunked attention runs in CPU autocast's dtype: inference (no autograd) under
    autocast on the CPU, for an fp32 model, no tracing. Not in training: there the chunks
    measured 6% slower per bf16 train step than the plain path."""
    return (x.device.type == 'cpu' and torch.is_autocast_enabled('cpu')
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and x.dtype in (torch.float32, torch.get_autocast_dtype('cpu')))


def _chunk_rows(tokens_per_row: int = 1) -> int:
    """How many rows of ``tokens_per_row`` tokens (a window, or one token) make one chunk."""
    return -(-CHUNK_TOKENS // tokens_per_row)

_ACTIVATIONS = {'GELU': nn.GELU, 'ReLU': nn.ReLU, 'SiLU': nn.SiLU, 'Swish': nn.SiLU,
                'LeakyReLU': nn.LeakyReLU, 'ELU': nn.ELU, 'Tanh': nn.Tanh}
_NORMS = {'LN': nn.LayerNorm, 'LayerNorm': nn.LayerNorm}


def build_norm(norm_cfg: dict, num_features: int) -> nn.Module:
    """Build a token LayerNorm from an mmcv-style config, e.g. ``dict(type='LN', eps=1e-6)``."""
    cfg = dict(norm_cfg)
    kind = cfg.pop('type', None)
    if kind not in _NORMS:
        raise ValueError(f'norm_cfg type {kind!r} is not supported by SwinBackbone; '
                         f'use one of {sorted(_NORMS)} (Swin normalises tokens with LayerNorm)')
    requires_grad = cfg.pop('requires_grad', True)
    norm = _NORMS[kind](num_features, **cfg)
    for p in norm.parameters():
        p.requires_grad = requires_grad
    return norm


def build_activation(act_cfg: dict) -> nn.Module:
    """Build an activation from an mmcv-style config, e.g. ``dict(type='GELU')``."""
    cfg = dict(act_cfg)
    kind = cfg.pop('type', None)
    if kind not in _ACTIVATIONS:
        raise ValueError(f'act_cfg type {kind!r} is not supported; use one of {sorted(_ACTIVATIONS)}')
    return _ACTIVATIONS[kind](**cfg)


def drop_path_scale(x: Tensor, drop_prob: float) -> Tensor:
    """The per-sample factor of stochastic depth for ``x``, 0 or ``1 / (1 - drop_prob)``, shaped
    ``(B, 1, ...)``: the same random draw as mmcv's ``DropPath`` makes for ``x``."""
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    return random_tensor.floor_().div_(keep_prob)


def drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Stochastic depth per sample; the same random draw as mmcv's ``DropPath``."""
    if drop_prob == 0.0 or not training:
        return x
    # One pass over x with the per-sample factor (mmcv divides, then multiplies).
    return x * drop_path_scale(x, drop_prob)


class DropPath(nn.Module):
    """Module wrapper of :func:`drop_path`."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    @property
    def active(self) -> bool:
        """Whether the forward draws (training with a non-zero rate)."""
        return self.training and self.drop_prob > 0.0

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob:.3f}'


#: Values per block of the token-map <-> NCHW copies (about 1 MiB in fp32): a transposing copy
#: done a few rows at a time stays in cache and ran 3-4x faster than one over the whole map.
_TRANSPOSE_BLOCK_NUMEL = 2 ** 18


class _TokensToNCHW(torch.autograd.Function):
    """``(B, H*W, C)`` -> contiguous ``(B, C, H, W)``, copied a block of rows at a time."""

    @staticmethod
    def forward(ctx, x: Tensor, height: int, width: int) -> Tensor:
        B, _, C = x.shape
        out = x.new_empty(B, C, height, width)
        step = max(1, _TRANSPOSE_BLOCK_NUMEL // (width * C))
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
        step = max(1, _TRANSPOSE_BLOCK_NUMEL // (width * C))
        for r in range(0, height, step):
            rows = grad_x[:, r * width:(r + step) * width].view(B, -1, width, C)
            rows.copy_(grad[:, :, r:r + step].permute(0, 2, 3, 1))
        return grad_x, None, None


def tokens_to_nchw(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """A token map ``(B, H*W, C)`` as a contiguous feature map ``(B, C, H, W)``."""
    if torch.compiler.is_compiling():
        return x.view(-1, *hw, x.shape[-1]).permute(0, 3, 1, 2).contiguous()
    return _TokensToNCHW.apply(x.contiguous(), *hw)


class PatchEmbed(nn.Module):
    """4x4 patch partition + linear embedding: ``(B, Cin, H, W)`` -> ``(B, H/p * W/p, C)``.

    The image is zero-padded bottom/right to a multiple of the patch size first.
    """

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int,
                 norm_cfg: Optional[dict]) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.projection = nn.Conv2d(in_channels, embed_dims, patch_size, stride=patch_size)
        self.norm = build_norm(norm_cfg, embed_dims) if norm_cfg is not None else None

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        p = self.patch_size
        H, W = x.shape[-2:]
        if torch.compiler.is_compiling() or H % p or W % p:  # traced: no branch on the size
            x = F.pad(x, (0, padded_size(W, p) - W, 0, padded_size(H, p) - H))
        x = self.projection(x)
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        return x, hw


def _concat_order(p: Tensor) -> Tensor:
    """A parameter's last dim from the Unfold order to the concatenation order.

    Feature ``(2 * dy + dx) * C + c`` of the concatenation is Unfold feature
    ``c * 4 + 2 * dy + dx``: a transpose of the ``(C, 4)`` grid, copied by views (the gradient
    too; indexing with the permutation made a scatter-add backward, 5 ms for stage 3's reduction).
    """
    C = p.shape[-1] // 4
    return p.view(*p.shape[:-1], C, 4).transpose(-1, -2).reshape(p.shape)


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat + LayerNorm + Linear(4C -> 2C): ``(B, H*W, C)`` -> ``(B, H/2*W/2, 2C)``.

    Odd sizes are zero-padded bottom/right. The parameters are in mmcv's ``nn.Unfold`` order of
    the 4C vector, ``index = c * 4 + 2 * dy + dx``, so mmdet/mmseg weights apply as they are.
    The tokens are concatenated in the order ``(2 * dy + dx) * C + c`` instead (runs of C
    contiguous channels: a 3-4x cheaper copy than the Unfold order's element-wise interleave),
    and the parameters are permuted to match; LayerNorm does not depend on the feature order,
    so the output is the same.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_cfg: Optional[dict]) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm = build_norm(norm_cfg, 4 * in_channels) if norm_cfg is not None else None
        self.reduction = nn.Linear(4 * in_channels, out_channels, bias=False)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        B, L, C = x.shape
        H, W = hw
        x = x.view(B, H, W, C)
        if torch.compiler.is_compiling() or H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        Ho, Wo = (H + 1) // 2, (W + 1) // 2
        # (B, Ho, dy, Wo, dx, C) -> (B, Ho, Wo, dy, dx, C)
        x = x.view(B, Ho, 2, Wo, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Ho * Wo, 4 * C)
        if self.norm is not None:
            norm = self.norm
            x = F.layer_norm(x, norm.normalized_shape,
                             None if norm.weight is None else _concat_order(norm.weight),
                             None if norm.bias is None else _concat_order(norm.bias), norm.eps)
        return F.linear(x, _concat_order(self.reduction.weight)), (Ho, Wo)


class WindowMSA(nn.Module):
    """Multi-head self-attention inside windows with a relative position bias.

    Input and output ``(B * nW, N, C)``; ``mask`` is the ``(nW, N, N)`` shift mask or None.
    """

    def __init__(self, embed_dims: int, num_heads: int, window_size: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0) -> None:
        super().__init__()
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = qk_scale or (embed_dims // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.attn_drop_rate = attn_drop_rate
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop_rate)
        self._bias_cache: dict = {}

    def relative_bias(self) -> Tensor:
        """The relative position bias ``(h, N, N)``; the attention folds the shift mask in.

        Without autograd (eval, no_grad) it is cached until the table changes, on the CPU in the
        dtype the attention runs in (bf16 under bf16 autocast). Folding the mask in here instead
        made per-window biases ``(nW, h, N, N)`` (26 MiB over Swin-T's blocks at 512x512) that
        stayed cached across eval forwards or were kept for backward: peak memory 5% (training)
        to 30% (inference) higher, for no speed.
        """
        table = self.relative_position_bias_table
        if torch.compiler.is_compiling():  # traced plainly; the cache is never read (no guards on it)
            return self._relative_bias()
        if torch.is_grad_enabled() and table.requires_grad:
            self._bias_cache.clear()  # what eval cached is stale once the table trains
            return self._relative_bias()
        dtype = table.dtype
        if (table.device.type == 'cpu' and dtype == torch.float32
                and torch.is_autocast_enabled('cpu')):
            dtype = torch.get_autocast_dtype('cpu')
        key = (table._version, table.data_ptr(), table.dtype, dtype)
        bias = self._bias_cache.get(key)
        if bias is None:
            if len(self._bias_cache) > 4:
                self._bias_cache.clear()
            bias = self._bias_cache[key] = self._relative_bias().to(dtype)
        return bias

    def _relative_bias(self) -> Tensor:
        return relative_position_bias(self.relative_position_bias_table, self.window_size)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, num_windows: int = 1) -> Tensor:
        bias = self.relative_bias()
        attn_drop = self.attn_drop_rate if self.training else 0.0
        if attn_drop == 0.0 and _cpu_fp32(x):
            x = self._chunked(x, bias, num_windows, mask)
        elif attn_drop == 0.0 and _cpu_autocast_inference(x):
            dtype = torch.get_autocast_dtype('cpu')
            with torch.autocast('cpu', enabled=False):  # cast here once, as autocast would
                x = self._chunked(x.to(dtype), bias.to(dtype), num_windows, mask)
        else:
            x = window_attention(self.qkv(x), self.num_heads, self.scale, fold_mask(bias, mask),
                                 num_windows, self.proj.weight, self.proj.bias, attn_drop)
        return self.proj_drop(x)

    def takes_tokens(self, x: Tensor, layout: WindowLayout) -> bool:
        """Whether :meth:`forward_tokens` applies to the tokens ``x`` ``(B, H*W, C)``: CPU
        training in fp32 (no dropout) on a map padded enough for it to pay."""
        return (_cpu_fp32(x) and torch.is_grad_enabled()
                and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
                and (not self.training or (self.attn_drop_rate == 0.0
                                           and self.proj_drop.p == 0.0))
                and token_projections_pay(layout, x.shape[-1]))

    def forward_tokens(self, x: Tensor, layout: WindowLayout) -> Tensor:
        """The forward on the tokens ``(B, H*W, C)`` of the map ``layout`` describes instead of
        their windows (see :func:`token_window_attention`), tokens out; no dropout."""
        qkv, proj = self.qkv, self.proj
        return token_window_attention(
            x, layout, qkv.weight, qkv.bias, self.relative_bias(), proj.weight, proj.bias,
            self.num_heads, self.scale, _chunk_rows(layout.window_size ** 2))

    def _chunked(self, x: Tensor, bias: Tensor, num_windows: int, mask: Optional[Tensor]
                 ) -> Tensor:
        """:func:`chunked_window_attention` with the parameters in the dtype of ``x``; the
        chunks fold the mask into the bias."""
        step = _chunk_rows(x.shape[1])  # windows per chunk
        qkv, proj = self.qkv, self.proj
        return chunked_window_attention(
            x, qkv.weight.to(x.dtype), None if qkv.bias is None else qkv.bias.to(x.dtype), bias,
            proj.weight.to(x.dtype), proj.bias.to(x.dtype), self.num_heads, self.scale,
            num_windows, step, mask)

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.half() invalidate the cached bias
        self._bias_cache = {}
        return super()._apply(fn, recurse)


class ShiftWindowMSA(nn.Module):
    """W-MSA (``shift_size == 0``) or SW-MSA over a token map: ``(B, H*W, C)`` -> same.

    Pads, shifts and partitions with one cached gather, attends in windows, and undoes it all
    with one gather. The shift is applied whatever the map size, as mmdet and the official
    detection code do (REFERENCE detail 2): on maps not larger than the window the shift still
    mixes the padded grid, so outputs equal the in-tree backbones' on every size.
    """

    def __init__(self, embed_dims: int, num_heads: int, window_size: int, shift_size: int = 0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.w_msa = WindowMSA(embed_dims, num_heads, window_size, qkv_bias, qk_scale,
                               attn_drop_rate, proj_drop_rate)
        self.drop = DropPath(drop_path_rate)

    def layout(self, hw: tuple[int, int], device: torch.device) -> WindowLayout:
        return window_layout(hw[0], hw[1], self.window_size, self.shift_size, device)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        return self.drop(self.attend(x, hw))

    def attend(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """The forward without stochastic depth."""
        if torch.compiler.is_compiling():
            return self._forward_traced(x, hw)
        layout = self.layout(hw, x.device)
        if self.w_msa.takes_tokens(x, layout):
            return self.w_msa.forward_tokens(x, layout)
        windows = self.w_msa(windows_from_tokens(x, layout), layout.mask, layout.num_windows)
        return tokens_from_windows(windows, layout)

    def _forward_traced(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """The same with views, rolls and a mask built in the graph: no cached index tensors, no
        branch on the size, so torch.compile(dynamic=True) makes one graph for all sizes that
        pad alike (the framework still guards on a map being a multiple of the window and on
        single-window rows or columns)."""
        M, s = self.window_size, self.shift_size
        Hp, Wp = padded_size(hw[0], M), padded_size(hw[1], M)
        mask = shift_mask(Hp, Wp, M, s, x.device) if s else None
        windows = self.w_msa(partition_windows(x, hw, M, s), mask, (Hp // M) * (Wp // M))
        return merge_windows(windows, hw, M, s)


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
            grad_h = torch.ops.aten.gelu_backward(grad_out.mm(weight.to(grad_out.dtype)).to(h.dtype), h)
        return grad_h, grad_weight, grad_bias


class _ChunkedGeluMLP(torch.autograd.Function):
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
        for c in even_chunks(rows, _chunk_rows()):
            torch.addmm(b1, u[c], w1.t(), out=h[c])
            torch.addmm(b2, F.gelu(h[c]), w2.t(), out=out_rows[c])
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
        for c in even_chunks(u.shape[0], _chunk_rows()):
            if need_w2:
                sums.addmm('w2', grad_out[c].t(), F.gelu(h[c]))
            grad_h = grad_out[c].mm(w2)  # the GELU's backward in place: one chunk buffer less
            torch.ops.aten.gelu_backward.grad_input(grad_h, h[c], grad_input=grad_h)
            if need_w1:
                sums.addmm('w1', grad_h.t(), u[c])
            if need_b1:
                sums.add('b1', grad_h.sum(0))
            if need_u:
                torch.mm(grad_h, w1, out=grad_rows[c])
        if need_b2:
            sums.add('b2', grad_out.sum(0))
        return grad_u, sums.get('w1'), sums.get('b1'), sums.get('w2'), sums.get('b2')


class FFN(nn.Module):
    """MLP ``C -> ratio*C -> C`` with activation and dropout; nesting as mmcv's FFN for key names."""

    def __init__(self, embed_dims: int, hidden_dims: int, act_cfg: dict, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, hidden_dims), build_activation(act_cfg),
                          nn.Dropout(drop_rate)),
            nn.Linear(hidden_dims, embed_dims), nn.Dropout(drop_rate))
        self.dropout_layer = DropPath(drop_path_rate)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout_layer(self.mlp(x))

    def mlp(self, x: Tensor) -> Tensor:
        """The forward without stochastic depth."""
        (fc1, act, drop), fc2, drop_out = self.layers
        plain_gelu = type(act) is nn.GELU and act.approximate == 'none'
        if plain_gelu and not torch.is_grad_enabled():  # inference: GELU in place
            return drop_out(fc2(drop(torch.ops.aten.gelu_(fc1(x)))))
        # torch.compile traces the plain layers (custom autograd functions with symbolic sizes
        # fail in dynamo; inductor fuses the GELU itself).
        fused = (plain_gelu and (drop.p == 0 or not self.training)
                 and not torch.compiler.is_compiling())
        if fused and _cpu_fp32(x) and fc1.bias is not None and fc2.bias is not None:
            return _ChunkedGeluMLP.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        if fused:
            h = fc1(x)
            out = _GeluLinear.apply(h.reshape(-1, h.shape[-1]), fc2.weight, fc2.bias)
            return out.view(*h.shape[:-1], -1)
        return self.layers(x)


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


def _residual(x: Tensor, drop: DropPath, branch: Callable[[Tensor], Tensor],
              modules: Sequence[nn.Module]) -> Tensor:
    """``x + drop(branch(x))`` with the stochastic-depth factor drawn first; ``branch`` is not
    called when the factor is 0 for every sample, and the parameters of ``modules`` get zero
    gradients instead (as ``branch(x) * 0`` would give them)."""
    scale = drop_path_scale(x, drop.drop_prob)
    if bool(scale.any()):
        return (branch(x) * scale).add_(x)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if not params or not torch.is_grad_enabled():
        return x
    return x + _ZeroLink.apply(*params)


class SwinBlock(nn.Module):
    """``x + DropPath(Attn(LN(x)))`` then ``x + DropPath(MLP(LN(x)))`` on ``(B, H*W, C)``."""

    def __init__(self, embed_dims: int, num_heads: int, feedforward_channels: int,
                 window_size: int = 7, shift: bool = False, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 act_cfg: dict = dict(type='GELU'), norm_cfg: dict = dict(type='LN'),
                 with_cp: bool = False) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.norm1 = build_norm(norm_cfg, embed_dims)
        self.attn = ShiftWindowMSA(embed_dims, num_heads, window_size,
                                   window_size // 2 if shift else 0, qkv_bias, qk_scale,
                                   attn_drop_rate, drop_rate, drop_path_rate)
        self.norm2 = build_norm(norm_cfg, embed_dims)
        self.ffn = FFN(embed_dims, feedforward_channels, act_cfg, drop_rate, drop_path_rate)

    def _forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        if self._draws_first(x):
            return self._forward_drawing_first(x, hw)
        # Residuals are added into the branch outputs, which are fresh tensors that nothing else
        # holds: the same sums, one allocation fewer each.
        x = self.attn(self.norm1(x), hw).add_(x)
        return self.ffn(self.norm2(x)).add_(x)

    def _draws_first(self, x: Tensor) -> bool:
        """Training with stochastic depth on the CPU, where nothing else in the block draws random
        numbers (no dropout), no autocast (the draw's dtype is that of ``x``), no tracing."""
        return (self.attn.drop.active and self.ffn.dropout_layer.active
                and x.device.type == 'cpu' and not torch.is_autocast_enabled('cpu')
                and not torch.compiler.is_compiling()
                and self.attn.w_msa.attn_drop_rate == 0.0
                and all(m.p == 0.0 for m in self.modules() if isinstance(m, nn.Dropout)))

    def _forward_drawing_first(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """The same block with each branch's stochastic-depth factor drawn before the branch
        instead of after it: the same draws, as nothing in between draws. A branch that is
        dropped for every sample of the batch is then not computed (in training with batch 1,
        Swin-T's rates skip 1.2 of the 24 branches per step on average): its output would be
        multiplied by zero, and its parameters get the zero gradients that product gives them
        (DDP sees every parameter used). Unlike the product, a skipped branch does not turn a
        non-finite value of its own into NaN."""
        x = _residual(x, self.attn.drop, lambda t: self.attn.attend(self.norm1(t), hw),
                      (self.norm1, self.attn))
        return _residual(x, self.ffn.dropout_layer, lambda t: self.ffn.mlp(self.norm2(t)),
                         (self.norm2, self.ffn))

    def _forward_chunked(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """Inference: the same sums over chunks of tokens (see :data:`CHUNK_TOKENS`)."""
        x = self.attn(self.norm1(x), hw).add_(x)
        rows = x.view(-1, x.shape[-1])  # x is fresh: the MLP adds into it chunk by chunk
        for c in even_chunks(rows.shape[0], _chunk_rows()):
            rows[c].add_(self.ffn(self.norm2(rows[c])))
        return x

    def _chunkable(self, x: Tensor) -> bool:
        """Eval on CPU with nothing to record for autograd and no tracing."""
        return (not self.training and x.device.type == 'cpu'
                and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and (
                    x.requires_grad or any(p.requires_grad for p in self.parameters()))))

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        if self._chunkable(x):
            with torch.no_grad():
                return self._forward_chunked(x, hw)
        if self.with_cp and self.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing: works when the input needs no grad (frozen stages
            # before this one) and under DDP, unlike the reentrant variant.
            return cp.checkpoint(self._forward, x, hw, use_reentrant=False)
        return self._forward(x, hw)


class SwinStage(nn.Module):
    """``depth`` blocks alternating W-MSA and SW-MSA, then an optional PatchMerging.

    Returns ``(x_down, hw_down, x, hw)``: the input of the next stage and this stage's output.
    """

    def __init__(self, embed_dims: int, num_heads: int, feedforward_channels: int, depth: int,
                 window_size: int = 7, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rates: Sequence[float] = (), downsample: Optional[PatchMerging] = None,
                 act_cfg: dict = dict(type='GELU'), norm_cfg: dict = dict(type='LN'),
                 with_cp: bool = False) -> None:
        super().__init__()
        drop_path_rates = list(drop_path_rates) or [0.0] * depth
        self.blocks = nn.ModuleList(
            SwinBlock(embed_dims, num_heads, feedforward_channels, window_size, i % 2 == 1,
                      qkv_bias, qk_scale, drop_rate, attn_drop_rate, drop_path_rates[i],
                      act_cfg, norm_cfg, with_cp) for i in range(depth))
        self.downsample = downsample

    def forward(self, x: Tensor, hw: tuple[int, int]
                ) -> tuple[Tensor, tuple[int, int], Tensor, tuple[int, int]]:
        for block in self.blocks:
            x = block(x, hw)
        if self.downsample is None:
            return x, hw, x, hw
        x_down, hw_down = self.downsample(x, hw)
        return x_down, hw_down, x, hw
