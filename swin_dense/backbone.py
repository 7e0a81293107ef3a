"""SwinBackbone: the four-stage Swin Transformer pyramid for mmdet and mmseg.

A drop-in for mmdet's / mmseg's ``SwinTransformer``: same constructor arguments with the same
meanings and defaults, same parameter names, same outputs up to float32 rounding (see
``tests/integration/test_parity.py``). Use it as
``backbone=dict(type='SwinBackbone', arch='tiny', ...)``.

The forward runs the plain formulas whenever a graph is captured (``torch.jit.trace``,
``torch.export``, ONNX export, ``torch.compile``, the FLOP counters that trace) and the eager
fast path otherwise; ``SWIN_DENSE_CPU_FAST=0`` or ``swin_dense.ops.cpu_fast.enabled(False)``
turns the fast path off (see :mod:`swin_dense.ops.cpu_fast`).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model.weight_init import trunc_normal_
from mmengine.registry import MODELS
from torch import Tensor

from .arch import resolve_arch
from .checkpoint.load import convert_state_dict_on_load
from .layers import PatchEmbed, PatchMerging, SwinStage, build_norm, capturing_graph
from .pyramid import SwinPyramid, check_arguments, init_cfg_with_pretrained

#: Arguments of the official detection / segmentation repositories' ``SwinTransformer`` whose
#: meaning is ours under another name (the other official arguments share our names).
OFFICIAL_ARGUMENT_NAMES = {'embed_dim': 'embed_dims', 'in_chans': 'in_channels',
                           'ape': 'use_abs_pos_embed', 'use_checkpoint': 'with_cp'}


def _rename_official_arguments(given: dict, ours: dict) -> dict:
    """Map the official repositories' argument names to ours, with a deprecation warning each
    (a FutureWarning: shown by default, as users are the audience).

    ``norm_layer`` is accepted when it is LayerNorm (our ``norm_cfg`` default); any other
    unknown name is a TypeError that suggests the closest argument, so a typo in a config fails
    before the model is built. A renamed argument that contradicts ours is an error.
    """
    import difflib
    import inspect

    renamed = {}
    for name, value in given.items():
        if name == 'norm_layer':
            if value in ('LN', 'LayerNorm') or getattr(value, '__name__', '') == 'LayerNorm':
                warnings.warn("norm_layer is the official repository's argument: LayerNorm is "
                              "SwinBackbone's default (norm_cfg=dict(type='LN'))", FutureWarning)
                continue
            raise ValueError(f'norm_layer={value!r} is not LayerNorm; SwinBackbone takes '
                             "norm_cfg=dict(type='LN', eps=...) instead")
        if name not in OFFICIAL_ARGUMENT_NAMES:
            known = list(inspect.signature(SwinBackbone.__init__).parameters)[1:-1]
            close = difflib.get_close_matches(name, known + list(OFFICIAL_ARGUMENT_NAMES), n=2)
            hint = f'; did you mean {" or ".join(close)}?' if close else ''
            raise TypeError(f'SwinBackbone got an unexpected argument {name!r}{hint}')
        ours_name = OFFICIAL_ARGUMENT_NAMES[name]
        default = inspect.signature(SwinBackbone.__init__).parameters[ours_name].default
        if ours[ours_name] != default and ours[ours_name] != value:
            raise ValueError(f'{name}={value!r} (official name) and {ours_name}='
                             f'{ours[ours_name]!r} disagree; give only {ours_name}')
        warnings.warn(f"{name} is the official repository's name: SwinBackbone (as mmdet's "
                      f'SwinTransformer) calls it {ours_name}', FutureWarning)
        renamed[ours_name] = value
    return renamed


def _pair(value: Union[int, Sequence[int]], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    value = tuple(value)
    if len(value) == 1:
        return value[0], value[0]
    if len(value) != 2:
        raise ValueError(f'{name} must be an int or a pair (h, w), got {value!r}')
    return value


@MODELS.register_module()
class SwinBackbone(SwinPyramid):
    """Swin Transformer backbone (Liu et al., ICCV 2021) returning a pyramid of NCHW maps.

    Input ``(B, in_channels, H, W)`` of any size (padded bottom/right where needed); output a
    tuple with, for each ``i`` in ``out_indices``, ``(B, embed_dims * 2**i, ceil(H / 4 / 2**i),
    ceil(W / 4 / 2**i))``. :meth:`output_shape`, :attr:`size_divisibility` and
    :attr:`padding_free_multiple` describe the interface.

    Args:
        arch: 'tiny', 'small', 'base' or 'large' (or 't', 's', 'b', 'l'): sets ``embed_dims``,
            ``depths`` and ``num_heads``. Explicit values that contradict it are an error.
        pretrain_img_size: image size of the pretraining, sizes ``absolute_pos_embed``.
        in_channels: input image channels.
        embed_dims: channels ``C`` of stage 1; stage i has ``C * 2**i``.
        patch_size: patch partition size (4); must equal ``strides[0]``.
        window_size: attention window ``M``.
        mlp_ratio: hidden width of the MLP relative to ``C``.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        strides: patch-embed stride, then the merging strides (must be 2).
        out_indices: stages whose outputs are returned.
        qkv_bias: learnable bias on q, k, v.
        qk_scale: overrides ``head_dims ** -0.5``.
        patch_norm: LayerNorm after patch embedding and in patch merging.
        drop_rate: dropout after the position embedding, in the MLP and after attention.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
        use_abs_pos_embed: add a learned absolute position embedding (resized bicubically when
            the token grid differs from the pretraining one).
        act_cfg: MLP activation, e.g. ``dict(type='GELU')``.
        norm_cfg: normalisation, ``dict(type='LN')``.
        with_cp: gradient checkpointing per block (same gradients, less memory).
        pretrained: deprecated path to weights; use ``init_cfg``.
        convert_weights: accepted for compatibility with mmdet and ignored: the checkpoint format
            is detected from the file.
        frozen_stages: stages to freeze (-1: none; 0: patch embedding; i: also stages 1..i and
            their output norms). Frozen parts get no gradients and stay in eval mode.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` loads weights of any supported
            format through :func:`swin_dense.checkpoint.load_pretrained`.
        official_arguments: the official detection repository's names, accepted with a
            deprecation warning: ``embed_dim``, ``in_chans``, ``ape``, ``use_checkpoint``,
            ``norm_layer`` (LayerNorm only); ``pretrained``, ``patch_norm`` and the others
            share our names. Any other name is an error that suggests the closest one.
    """

    def __init__(self,
                 arch: Optional[str] = None,
                 pretrain_img_size: Union[int, Sequence[int]] = 224,
                 in_channels: int = 3,
                 embed_dims: int = 96,
                 patch_size: int = 4,
                 window_size: int = 7,
                 mlp_ratio: float = 4,
                 depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24),
                 strides: Sequence[int] = (4, 2, 2, 2),
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 patch_norm: bool = True,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 use_abs_pos_embed: bool = False,
                 act_cfg: dict = dict(type='GELU'),
                 norm_cfg: dict = dict(type='LN'),
                 with_cp: bool = False,
                 pretrained: Optional[str] = None,
                 convert_weights: bool = False,
                 frozen_stages: int = -1,
                 init_cfg: Optional[Union[dict, list]] = None,
                 **official_arguments) -> None:
        if official_arguments:  # a config pasted from the official Swin detection repository
            renamed = _rename_official_arguments(official_arguments, dict(
                in_channels=in_channels, embed_dims=embed_dims,
                use_abs_pos_embed=use_abs_pos_embed, with_cp=with_cp))
            in_channels = renamed.get('in_channels', in_channels)
            embed_dims = renamed.get('embed_dims', embed_dims)
            use_abs_pos_embed = renamed.get('use_abs_pos_embed', use_abs_pos_embed)
            with_cp = renamed.get('with_cp', with_cp)
        super().__init__(init_cfg=init_cfg_with_pretrained(init_cfg, pretrained))
        self.register_load_state_dict_pre_hook(convert_state_dict_on_load)  # any layout loads

        embed_dims, depths, num_heads = resolve_arch(arch, embed_dims, depths, num_heads)
        check_arguments(embed_dims, patch_size, (window_size,) * len(depths), depths, num_heads,
                        strides, out_indices, frozen_stages, in_channels, mlp_ratio,
                        rates=dict(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                                   drop_path_rate=drop_path_rate),
                        cfgs=dict(act_cfg=act_cfg, norm_cfg=norm_cfg))
        num_stages = len(depths)
        self.arch = arch
        self.in_channels = in_channels
        self.embed_dims = embed_dims
        self.patch_size = patch_size
        self.window_size = window_size
        self.window_sizes = (window_size,) * num_stages
        self.depths = tuple(depths)
        self.num_heads = tuple(num_heads)
        self.out_indices = tuple(sorted(i % num_stages for i in out_indices))
        self.frozen_stages = frozen_stages
        self.use_abs_pos_embed = use_abs_pos_embed
        self.convert_weights = convert_weights
        self.pretrain_img_size = _pair(pretrain_img_size, 'pretrain_img_size')
        self.num_features = [embed_dims * 2 ** i for i in range(num_stages)]

        self.patch_embed = PatchEmbed(in_channels, embed_dims, patch_size,
                                      norm_cfg if patch_norm else None)
        if use_abs_pos_embed:
            grid = (self.pretrain_img_size[0] // patch_size, self.pretrain_img_size[1] // patch_size)
            if min(grid) < 1:
                raise ValueError(f'pretrain_img_size {self.pretrain_img_size} is smaller than '
                                 f'patch_size={patch_size}: use_abs_pos_embed needs at least one '
                                 'patch (the image size the weights were pretrained at, e.g. 224)')
            self.pos_embed_grid = grid
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dims))
        self.drop_after_pos = nn.Dropout(p=drop_rate)

        merging_norm = norm_cfg if patch_norm else None
        self.stages = self.build_stages(
            drop_path_rate,
            lambda i, rates, downsample: SwinStage(
                self.num_features[i], num_heads[i], int(mlp_ratio * self.num_features[i]),
                depths[i], window_size, qkv_bias, qk_scale, drop_rate, attn_drop_rate, rates,
                downsample, act_cfg, norm_cfg, with_cp),
            lambda channels: PatchMerging(channels, 2 * channels, merging_norm))
        for i in self.out_indices:
            self.add_module(f'norm{i}', build_norm(norm_cfg, self.num_features[i]))
        self._freeze_stages()

    # ------------------------------------------------------------------ weights
    def init_weights(self) -> None:
        """Random init as the official code (trunc-normal 0.02), then load ``init_cfg`` weights."""
        if self.use_abs_pos_embed:
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith('relative_position_bias_table'):
                trunc_normal_(param, std=0.02)

        self.load_init_cfg()

    def _position_embedding(self, hw: tuple[int, int]) -> Tensor:
        """``(1, H*W, C)`` absolute embedding, bicubically resized from the pretraining grid."""
        pos = self.absolute_pos_embed
        # captured graphs always resize (to the same size it is the identity): no branch on hw
        if not capturing_graph() and tuple(hw) == self.pos_embed_grid:
            return pos
        gh, gw = self.pos_embed_grid
        pos = pos.transpose(1, 2).reshape(1, -1, gh, gw)
        pos = F.interpolate(pos, size=hw, mode='bicubic', align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch embedding, plus the absolute position embedding where there is one."""
        x, hw = self.patch_embed(x)
        if self.use_abs_pos_embed:
            x = x + self._position_embedding(hw)
        return self.drop_after_pos(x), hw
