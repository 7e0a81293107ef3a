"""Thin modules over :mod:`swin_dense.ops`: patch embedding, window attention, block, merging,
stage.

Each forward asks the one switch, :func:`swin_dense.ops.cpu_fast.applies`, and runs either the
plain formulas (:mod:`swin_dense.ops.window`, :mod:`swin_dense.ops.attention`: the reference,
and what tracing, ``torch.export``, ONNX export, ``torch.compile`` and FLOP counters see) or the
eager fast path (:mod:`swin_dense.ops.cpu_fast`). Both give the same outputs and gradients.

Parameter names follow mmdet/mmseg's ``SwinTransformer`` (``patch_embed.projection``,
``stages.i.blocks.j.attn.w_msa.qkv``, ``ffn.layers.0.0``, ``stages.i.downsample.reduction``, ...)
so that detector and segmentor checkpoints written with the in-tree backbones load unchanged,
also through ``load_from``. PatchMerging keeps mmcv's ``nn.Unfold`` channel order
(``index = c * 4 + 2 * dy + dx``); :mod:`swin_dense.checkpoint` converts other orders.

Token maps travel as ``(B, H*W, C)`` with their ``(H, W)`` beside them: Python ints in eager
mode, traced or symbolic sizes while a graph is captured.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor

from .ops import cpu_fast
from .ops.attention import capturing_graph, window_attention
from .ops.chunked_attention import even_chunks
from .ops.window import (WindowLayout, merge_windows, padded_size, partition_windows,
                         relative_position_bias, shift_mask, tokens_from_windows, window_layout,
                         windows_from_tokens)

__all__ = ['BlockForward', 'BlockStage', 'DropPath', 'FFN', 'PatchEmbed', 'PatchMerging',
           'ShiftWindowMSA', 'ShiftedWindows', 'SwinBlock', 'SwinStage', 'WindowMSA', 'build_activation',
           'build_norm', 'capturing_graph', 'concat_2x2', 'concat_order', 'drop_path',
           'drop_path_scale', 'tokens_to_nchw']

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


def tokens_to_nchw(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """A token map ``(B, H*W, C)`` as a contiguous feature map ``(B, C, H, W)``."""
    if cpu_fast.applies():
        return cpu_fast.tokens_to_nchw(x, hw)
    B, _, C = x.shape
    return x.view(B, hw[0], hw[1], C).permute(0, 3, 1, 2).contiguous()


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
        # the plain path pads by what the sizes give (maybe 0): no branch on the size
        if not cpu_fast.applies() or H % p or W % p:
            x = F.pad(x, (0, padded_size(W, p) - W, 0, padded_size(H, p) - H))
        x = self.projection(x)
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        return x, hw


def concat_2x2(x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """Each 2x2 neighbourhood's tokens concatenated: ``(B, H*W, C)`` -> ``(B, Ho*Wo, 4C)`` with
    ``Ho, Wo = ceil(H / 2), ceil(W / 2)`` (odd sizes zero-padded bottom/right), feature
    ``(2 * dy + dx) * C + c`` (see :func:`concat_order`)."""
    B, _, C = x.shape
    H, W = hw
    Ho, Wo = (H + 1) // 2, (W + 1) // 2
    x = x.view(B, H, W, C)
    # the plain path pads by 2 * ceil(H / 2) - H (maybe 0): no branch on the size, and a
    # padded size that is 2 * Ho exactly for symbolic shapes
    if not cpu_fast.applies() or H % 2 or W % 2:
        x = F.pad(x, (0, 0, 0, 2 * Wo - W, 0, 2 * Ho - H))
    # (B, Ho, dy, Wo, dx, C) -> (B, Ho, Wo, dy, dx, C)
    x = x.view(B, Ho, 2, Wo, 2, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, Ho * Wo, 4 * C), (Ho, Wo)


def concat_order(p: Tensor) -> Tensor:
    """A parameter's last dim from the Unfold order to the concatenation order.

    Feature ``(2 * dy + dx) * C + c`` of the concatenation is Unfold feature
    ``c * 4 + 2 * dy + dx``: a transpose of the ``(C, 4)`` grid, copied by views (the gradient
    too; indexing with the permutation made a scatter-add backward).
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
        x, hw_out = concat_2x2(x, hw)
        if self.norm is not None:
            norm = self.norm
            x = F.layer_norm(x, norm.normalized_shape,
                             None if norm.weight is None else concat_order(norm.weight),
                             None if norm.bias is None else concat_order(norm.bias), norm.eps)
        return F.linear(x, concat_order(self.reduction.weight)), hw_out


class WindowMSA(nn.Module):
    """Multi-head self-attention inside windows with a relative position bias.

    Input and output ``(B * nW, N, C)``; ``mask`` is the ``(nW, N, N)`` shift mask or None
    (windows laid out ``(B, nW)``), ``num_windows`` is ``nW``.
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
        self._bias_cache: dict = {}  # the fast path's, see cpu_fast.relative_bias

    def relative_bias(self) -> Tensor:
        """The relative position bias ``(h, N, N)``; the attention adds the shift mask."""
        table = self.relative_position_bias_table
        if cpu_fast.applies():
            return cpu_fast.relative_bias(self._bias_cache, table, self.window_size)
        return relative_position_bias(table, self.window_size)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, num_windows: int = 1) -> Tensor:
        bias = self.relative_bias()
        attn_drop = self.attn_drop_rate if self.training else 0.0
        if cpu_fast.applies():
            qkv, proj = self.qkv, self.proj
            x = cpu_fast.window_msa(x, qkv.weight, qkv.bias, bias, proj.weight, proj.bias,
                                    self.num_heads, self.scale, mask, num_windows, attn_drop)
        else:
            x = self.proj(window_attention(self.qkv(x), self.num_heads, self.scale, bias, mask,
                                           attn_drop))
        return self.proj_drop(x)

    def takes_tokens(self, x: Tensor, layout: WindowLayout) -> bool:
        """Whether :meth:`forward_tokens` applies to the tokens ``x`` ``(B, H*W, C)`` (fast
        path only): CPU training in fp32, no dropout, a map padded enough for it to pay."""
        no_dropout = not self.training or (self.attn_drop_rate == 0.0 and self.proj_drop.p == 0.0)
        return cpu_fast.takes_tokens(x, layout, list(self.parameters()), no_dropout)

    def forward_tokens(self, x: Tensor, layout: WindowLayout) -> Tensor:
        """The forward on the tokens ``(B, H*W, C)`` of the map ``layout`` describes instead of
        their windows (both projections on the tokens), tokens out; no dropout."""
        qkv, proj = self.qkv, self.proj
        return cpu_fast.token_window_msa(x, layout, qkv.weight, qkv.bias, self.relative_bias(),
                                         proj.weight, proj.bias, self.num_heads, self.scale)

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.half() invalidate the cached bias
        self._bias_cache = {}
        return super()._apply(fn, recurse)


class ShiftedWindows(nn.Module):
    """A window attention ``w_msa`` over a token map: ``(B, H*W, C)`` -> same.

    Pads bottom/right to a multiple of the window, shifts (``shift_size > 0``), partitions,
    attends in windows and undoes it all: one mechanism for both Swin versions, whose window
    attentions differ (:class:`WindowMSA` here, the cosine attention of
    :mod:`swin_dense.layers_v2`). The shift is applied whatever the map size, as mmdet, mmseg
    and mmpretrain (``pad_small_map=True``) do: on maps not larger than the window the shift
    still mixes the padded grid, and the window never shrinks.

    ``w_msa`` takes windows ``(B * nW, N, C)``, the ``(nW, N, N)`` shift mask or None and
    ``nW``; for the fast path it also has ``takes_tokens(x, layout)`` and
    ``forward_tokens(x, layout)``.
    """

    def __init__(self, w_msa: nn.Module, window_size: int, shift_size: int = 0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f'shift_size must be in [0, window_size), got {shift_size} '
                             f'with window_size {window_size}')
        self.window_size = window_size
        self.shift_size = shift_size
        self.w_msa = w_msa
        self.drop = DropPath(drop_path_rate)

    def layout(self, hw: tuple[int, int], device: torch.device) -> WindowLayout:
        """The cached index gathers of an ``H x W`` map (the fast path's)."""
        return window_layout(hw[0], hw[1], self.window_size, self.shift_size, device)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        return self.drop(self.attend(x, hw))

    def attend(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """The forward without stochastic depth."""
        if not cpu_fast.applies():
            return self.attend_plain(x, hw)
        layout = self.layout(hw, x.device)
        if self.w_msa.takes_tokens(x, layout):
            return self.w_msa.forward_tokens(x, layout)
        windows = self.w_msa(windows_from_tokens(x, layout), layout.mask, layout.num_windows)
        return tokens_from_windows(windows, layout)

    def attend_plain(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """The same with views, slices and a mask computed from the sizes: no cached index
        tensors and no branch on the size, so one captured graph serves every input size."""
        M, s = self.window_size, self.shift_size
        Hp, Wp = padded_size(hw[0], M), padded_size(hw[1], M)
        mask = shift_mask(Hp, Wp, M, s, x.device) if s else None
        windows = self.w_msa(partition_windows(x, hw, M, s), mask, (Hp // M) * (Wp // M))
        return merge_windows(windows, hw, M, s)


class ShiftWindowMSA(ShiftedWindows):
    """V1's W-MSA (``shift_size == 0``) or SW-MSA: :class:`WindowMSA` in shifted windows."""

    def __init__(self, embed_dims: int, num_heads: int, window_size: int, shift_size: int = 0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__(WindowMSA(embed_dims, num_heads, window_size, qkv_bias, qk_scale,
                                   attn_drop_rate, proj_drop_rate),
                         window_size, shift_size, drop_path_rate)


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
        no_dropout = not self.training or (drop.p == 0.0 and drop_out.p == 0.0)
        if cpu_fast.applies() and plain_gelu and no_dropout:
            return cpu_fast.gelu_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        return self.layers(x)


class BlockForward(nn.Module):
    """How a Swin block (V1 or V2) runs: its ``_forward_chunked`` in CPU inference on the fast
    path, its ``_forward`` under gradient checkpointing (``with_cp``) in training, else its
    ``_forward``."""

    with_cp: bool = False

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        if cpu_fast.applies() and self._infers_in_chunks(x):
            with torch.no_grad():
                return self._forward_chunked(x, hw)
        if self.with_cp and self.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing: works when the input needs no grad (frozen stages
            # before this one) and under DDP, unlike the reentrant variant.
            return cp.checkpoint(self._forward, x, hw, use_reentrant=False)
        return self._forward(x, hw)

    def _infers_in_chunks(self, x: Tensor) -> bool:
        """Eval on CPU with nothing to record for autograd (fast path)."""
        return (not self.training and x.device.type == 'cpu'
                and not cpu_fast.records_grad(x, *self.parameters()))


class SwinBlock(BlockForward):
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
        if not cpu_fast.applies():
            x = x + self.attn(self.norm1(x), hw)
            return x + self.ffn(self.norm2(x))
        if self._draws_first(x):
            return self._forward_drawing_first(x, hw)
        # Residuals are added into the branch outputs, which are fresh tensors that nothing else
        # holds: the same sums, one allocation fewer each.
        x = self.attn(self.norm1(x), hw).add_(x)
        return self.ffn(self.norm2(x)).add_(x)

    def _forward_chunked(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """Inference: the MLP over chunks of tokens (see ``cpu_fast.CHUNK_TOKENS``)."""
        x = self.attn(self.norm1(x), hw).add_(x)
        rows = x.view(-1, x.shape[-1])  # x is fresh: the MLP adds into it chunk by chunk
        for c in even_chunks(rows.shape[0], cpu_fast.chunk_rows()):
            rows[c].add_(self.ffn(self.norm2(rows[c])))
        return x

    def _draws_first(self, x: Tensor) -> bool:
        """Training with stochastic depth on the CPU, where nothing else in the block draws random
        numbers (no dropout), no autocast (the draw's dtype is that of ``x``)."""
        return (self.attn.drop.active and self.ffn.dropout_layer.active
                and x.device.type == 'cpu' and not torch.is_autocast_enabled('cpu')
                and self.attn.w_msa.attn_drop_rate == 0.0
                and all(m.p == 0.0 for m in self.modules() if isinstance(m, nn.Dropout)))

    def _forward_drawing_first(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """The same block with each branch's stochastic-depth factor drawn before the branch
        instead of after it: the same draws, as nothing in between draws. A branch that is
        dropped for every sample of the batch is then not computed (in training with batch 1,
        Swin-T's rates skip about one branch in twenty per step): its output would be
        multiplied by zero, and its parameters get the zero gradients that product gives them
        (DDP sees every parameter used). Unlike the product, a skipped branch does not turn a
        non-finite value of its own into NaN."""
        x = self._residual(x, self.attn.drop, lambda t: self.attn.attend(self.norm1(t), hw),
                           (self.norm1, self.attn))
        return self._residual(x, self.ffn.dropout_layer, lambda t: self.ffn.mlp(self.norm2(t)),
                              (self.norm2, self.ffn))

    @staticmethod
    def _residual(x: Tensor, drop: DropPath, branch, modules: Sequence[nn.Module]) -> Tensor:
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        return cpu_fast.skippable_residual(x, drop_path_scale(x, drop.drop_prob), branch, params)


class BlockStage(nn.Module):
    """Blocks over a token map, then an optional downsampling (PatchMerging).

    Returns ``(x_down, hw_down, x, hw)``: the input of the next stage and this stage's output.
    """

    def __init__(self, blocks: Sequence[nn.Module], downsample: Optional[nn.Module] = None
                 ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: Tensor, hw: tuple[int, int]
                ) -> tuple[Tensor, tuple[int, int], Tensor, tuple[int, int]]:
        for block in self.blocks:
            x = block(x, hw)
        if self.downsample is None:
            return x, hw, x, hw
        x_down, hw_down = self.downsample(x, hw)
        return x_down, hw_down, x, hw


class SwinStage(BlockStage):
    """``depth`` V1 blocks alternating W-MSA and SW-MSA, then an optional PatchMerging."""

    def __init__(self, embed_dims: int, num_heads: int, feedforward_channels: int, depth: int,
                 window_size: int = 7, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rates: Sequence[float] = (), downsample: Optional[PatchMerging] = None,
                 act_cfg: dict = dict(type='GELU'), norm_cfg: dict = dict(type='LN'),
                 with_cp: bool = False) -> None:
        drop_path_rates = list(drop_path_rates) or [0.0] * depth
        super().__init__([SwinBlock(embed_dims, num_heads, feedforward_channels, window_size,
                                    i % 2 == 1, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                                    drop_path_rates[i], act_cfg, norm_cfg, with_cp)
                          for i in range(depth)], downsample)
