"""Swin V2's modules (Liu et al., CVPR 2022): cosine window attention with the continuous
position bias, the res-post-norm block and patch merging with the norm after the reduction.

The window machinery is V1's (:class:`swin_dense.layers.ShiftedWindows`: pad bottom/right,
roll, mask on the padded grid, crop; the window never shrinks), the MLP is V1's
:class:`~swin_dense.layers.FFN`, the stage is :class:`~swin_dense.layers.BlockStage`. As in
V1, each forward asks :func:`swin_dense.ops.cpu_fast.applies` and runs the plain formulas
(:func:`swin_dense.ops.attention.cosine_window_attention`, what export and compile see) or the
fast path (:mod:`swin_dense.ops.cpu_fast_v2`).

Parameter names are mmpretrain's ``SwinTransformerV2`` (``attn.w_msa.{qkv, q_bias, v_bias,
logit_scale, cpb_mlp, proj}``, ``ffn.layers``, ``norm1``/``norm2``), with PatchMerging at the end
of a stage as in our V1; the reduction's columns are in ``nn.Unfold`` order as mmpretrain and
our V1 keep them. Each attention stores its ``relative_coords_table``: the table records the
window the weights were pretrained with (see :mod:`swin_dense.ops.continuous_bias`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import (FFN, BlockForward, BlockStage, DropPath, ShiftedWindows, build_norm,
                     concat_2x2, concat_order)
from .ops import cpu_fast, cpu_fast_v2
from .ops.attention import cosine_window_attention
from .ops.chunked_attention import even_chunks
from .ops.continuous_bias import (continuous_position_bias, coords_table,
                                  pretrained_window_from_table)

__all__ = ['CosineWindowMSA', 'PatchMergingV2', 'ShiftWindowMSAV2', 'SwinBlockV2',
           'SwinStageV2']

#: Hidden units of the continuous position bias MLP (all published models).
CPB_HIDDEN = 512


class CosineWindowMSA(nn.Module):
    """Scaled cosine attention in windows with the continuous relative position bias.

    Input and output ``(B * nW, N, C)``; ``mask`` is the ``(nW, N, N)`` shift mask or None.
    ``qkv`` has no bias parameter: q and v have their own (``q_bias``, ``v_bias``), k's is zero.

    Args:
        pretrained_window_size: the window the weights were pretrained with (0: this one); it
            normalises the coordinate table. Loading a checkpoint that stores its tables
            replaces it by the checkpoint's (see :mod:`swin_dense.checkpoint`).
    """

    def __init__(self, embed_dims: int, num_heads: int, window_size: int,
                 pretrained_window_size: int = 0, qkv_bias: bool = True,
                 attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0) -> None:
        super().__init__()
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(embed_dims))
            self.v_bias = nn.Parameter(torch.zeros(embed_dims))
        else:
            self.q_bias = self.v_bias = None
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, CPB_HIDDEN), nn.ReLU(inplace=True),
                                     nn.Linear(CPB_HIDDEN, num_heads, bias=False))
        self.register_buffer('relative_coords_table',
                             coords_table(window_size, pretrained_window_size))
        self.attn_drop_rate = attn_drop_rate
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop_rate)
        self._bias_cache: dict = {}  # the fast path's, see cpu_fast_v2.continuous_bias

    @property
    def pretrained_window_size(self) -> int:
        """The pretrained window that the stored coordinate table was built with."""
        return pretrained_window_from_table(self.relative_coords_table)

    def qkv_bias(self) -> Optional[Tensor]:
        """``cat(q_bias, 0, v_bias)`` ``(3C,)``, or None without biases."""
        if self.q_bias is None:
            return None
        return torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))

    def relative_bias(self) -> Tensor:
        """The continuous position bias ``(h, N, N)``; the attention adds the shift mask."""
        hidden, _, out = self.cpb_mlp
        args = (self.relative_coords_table, hidden.weight, hidden.bias, out.weight)
        if cpu_fast.applies():
            return cpu_fast_v2.continuous_bias(self._bias_cache, *args, self.window_size)
        return continuous_position_bias(*args, self.window_size)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, num_windows: int = 1) -> Tensor:
        bias = self.relative_bias()
        attn_drop = self.attn_drop_rate if self.training else 0.0
        if cpu_fast.applies():
            x = cpu_fast_v2.cosine_window_msa(x, self.qkv.weight, self.qkv_bias(),
                                              self.logit_scale, bias, self.proj.weight,
                                              self.proj.bias, self.num_heads, mask, attn_drop)
        else:
            qkv = F.linear(x, self.qkv.weight, self.qkv_bias())
            x = self.proj(cosine_window_attention(qkv, self.num_heads, self.logit_scale, bias,
                                                  mask, attn_drop))
        return self.proj_drop(x)

    def takes_tokens(self, x: Tensor, layout) -> bool:
        """The token-projection path of V1's fast path has no cosine form: windows always."""
        return False

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.half() invalidate the cached bias
        self._bias_cache = {}
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f'embed_dims={self.embed_dims}, num_heads={self.num_heads}, '
                f'window_size={self.window_size}, '
                f'pretrained_window_size={self.pretrained_window_size}')


class ShiftWindowMSAV2(ShiftedWindows):
    """V2's W-MSA / SW-MSA: :class:`CosineWindowMSA` in V1's shifted windows. No stochastic
    depth here: V2 applies it after the post-norm (:class:`SwinBlockV2`)."""

    def __init__(self, embed_dims: int, num_heads: int, window_size: int, shift_size: int = 0,
                 pretrained_window_size: int = 0, qkv_bias: bool = True,
                 attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0) -> None:
        super().__init__(CosineWindowMSA(embed_dims, num_heads, window_size,
                                         pretrained_window_size, qkv_bias, attn_drop_rate,
                                         proj_drop_rate),
                         window_size, shift_size)


class SwinBlockV2(BlockForward):
    """Res-post-norm block on ``(B, H*W, C)``: ``x + DropPath(LN(Attn(x)))`` then
    ``x + DropPath(LN(MLP(x)))`` (no norm before the branches)."""

    def __init__(self, embed_dims: int, num_heads: int, feedforward_channels: int,
                 window_size: int = 8, shift: bool = False, pretrained_window_size: int = 0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, act_cfg: dict = dict(type='GELU'),
                 norm_cfg: dict = dict(type='LN'), with_cp: bool = False) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.attn = ShiftWindowMSAV2(embed_dims, num_heads, window_size,
                                     window_size // 2 if shift else 0, pretrained_window_size,
                                     qkv_bias, attn_drop_rate, drop_rate)
        self.norm1 = build_norm(norm_cfg, embed_dims)
        self.ffn = FFN(embed_dims, feedforward_channels, act_cfg, drop_rate)
        self.norm2 = build_norm(norm_cfg, embed_dims)
        self.drop_path = DropPath(drop_path_rate)

    def _forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        x = x + self.drop_path(self.norm1(self.attn.attend(x, hw)))
        return x + self.drop_path(self.norm2(self.ffn.mlp(x)))

    def _forward_chunked(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """Inference: residuals added in place, the MLP and its norm over chunks of tokens."""
        x = self.norm1(self.attn.attend(x, hw)).add_(x)
        rows = x.view(-1, x.shape[-1])  # x is fresh: the MLP adds into it chunk by chunk
        for c in even_chunks(rows.shape[0], cpu_fast.chunk_rows()):
            rows[c].add_(self.norm2(self.ffn.mlp(rows[c])))
        return x


class PatchMergingV2(nn.Module):
    """2x2 neighbourhood concat + Linear(4C -> 2C) + LayerNorm(2C):
    ``(B, H*W, C)`` -> ``(B, ceil(H/2) * ceil(W/2), 2C)``; odd sizes zero-padded bottom/right.

    The reduction's columns are stored in ``nn.Unfold`` order (``c * 4 + 2 * dy + dx``) as in
    mmpretrain and our V1; the norm comes after the reduction, so it needs no reordering.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_cfg: Optional[dict]) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.reduction = nn.Linear(4 * in_channels, out_channels, bias=False)
        self.norm = build_norm(norm_cfg, out_channels) if norm_cfg is not None else None

    def forward(self, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        x, hw_out = concat_2x2(x, hw)
        x = F.linear(x, concat_order(self.reduction.weight))
        return (self.norm(x) if self.norm is not None else x), hw_out


class SwinStageV2(BlockStage):
    """``depth`` V2 blocks alternating W-MSA and SW-MSA, then an optional PatchMergingV2."""

    def __init__(self, embed_dims: int, num_heads: int, feedforward_channels: int, depth: int,
                 window_size: int = 8, pretrained_window_size: int = 0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rates: Sequence[float] = (),
                 downsample: Optional[PatchMergingV2] = None, act_cfg: dict = dict(type='GELU'),
                 norm_cfg: dict = dict(type='LN'), with_cp: bool = False) -> None:
        drop_path_rates = list(drop_path_rates) or [0.0] * depth
        super().__init__([SwinBlockV2(embed_dims, num_heads, feedforward_channels, window_size,
                                      i % 2 == 1, pretrained_window_size, qkv_bias, drop_rate,
                                      attn_drop_rate, drop_path_rates[i], act_cfg, norm_cfg,
                                      with_cp)
                          for i in range(depth)], downsample)
