"""SwinV2Backbone: the four-stage Swin Transformer V2 pyramid for mmdet and mmseg.

Swin V2 (Liu et al., CVPR 2022) as a dense backbone: scaled cosine attention with a clamped
learnable logit scale, the continuous relative position bias, res-post-norm blocks, q/v biases
(k's is zero), patch merging with the norm after the reduction. Any input size, as V1: the token
map is padded to the window, rolled, masked on the padded grid and cropped; the window never
shrinks (mmpretrain's ``pad_small_map=True`` behaviour, which the published classifiers'
small-map rules are not: they shrink the window to maps not larger than it).

Use it as ``backbone=dict(type='SwinV2Backbone', arch='tiny', window_size=[16, 16, 16, 8],
pretrained_window_sizes=[16, 16, 16, 8], init_cfg=dict(type='Pretrained', checkpoint=PATH))``.
The interface (outputs, freezing, ``output_shape()``) is :class:`~swin_dense.SwinBackbone`'s.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch.nn as nn
from mmengine.model.weight_init import trunc_normal_
from mmengine.registry import MODELS

from .arch import int_tuple, resolve_arch
from .checkpoint.load import convert_state_dict_on_load
from .layers import PatchEmbed, build_norm
from .layers_v2 import CosineWindowMSA, PatchMergingV2, SwinStageV2
from .pyramid import SwinPyramid, check_arguments, init_cfg_with_pretrained


def _per_stage(value: Union[int, Sequence[int]], name: str, num_stages: int) -> tuple[int, ...]:
    """An int for every stage, or one entry per stage."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * num_stages
    value = int_tuple(value, name)
    if len(value) != num_stages:
        raise ValueError(f'{name} must be an int or have one entry per stage ({num_stages}), '
                         f'got {value!r}')
    return value


@MODELS.register_module()
class SwinV2Backbone(SwinPyramid):
    """Swin Transformer V2 backbone returning a pyramid of NCHW maps.

    Input ``(B, in_channels, H, W)`` of any size; output, for each ``i`` in ``out_indices``,
    ``(B, embed_dims * 2**i, ceil(H / 4 / 2**i), ceil(W / 4 / 2**i))``, after that stage's
    ``norm{i}``.

    Args:
        arch: 'tiny', 'small', 'base' or 'large' (or 't', 's', 'b', 'l'): sets ``embed_dims``,
            ``depths`` and ``num_heads`` (V1's table). Explicit values that contradict it are an
            error.
        in_channels: input image channels.
        embed_dims: channels ``C`` of stage 1; stage i has ``C * 2**i``.
        patch_size: patch partition size (4).
        window_size: attention window, an int or one per stage (the published window-16
            classifiers ran ``[16, 16, 16, 8]``: stage 4's map was 8 x 8 at 256).
        pretrained_window_sizes: per stage, the window the weights were pretrained with, which
            normalises the position bias coordinates (0: the stage's own window). A checkpoint
            that stores coordinate tables (official, mmpretrain, torchvision and our files)
            brings its own; the loader reports which one is used.
        mlp_ratio: hidden width of the MLP relative to ``C``.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        out_indices: stages whose outputs are returned.
        qkv_bias: learnable q and v biases (k has none).
        patch_norm: LayerNorm after the patch embedding and after each patch-merging reduction.
        drop_rate: dropout after the patch embedding, in the MLP and after attention.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
        act_cfg: MLP activation, e.g. ``dict(type='GELU')``.
        norm_cfg: normalisation, ``dict(type='LN')``.
        with_cp: gradient checkpointing per block.
        frozen_stages: stages to freeze (-1: none; 0: patch embedding; i: also stages 1..i and
            their output norms).
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` loads weights of any supported
            Swin V2 format through :func:`swin_dense.checkpoint.load_pretrained`.
        pretrained: deprecated path to weights; use ``init_cfg``.
    """

    def __init__(self,
                 arch: Optional[str] = None,
                 in_channels: int = 3,
                 embed_dims: int = 96,
                 patch_size: int = 4,
                 window_size: Union[int, Sequence[int]] = 8,
                 pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0),
                 mlp_ratio: float = 4,
                 depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24),
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 qkv_bias: bool = True,
                 patch_norm: bool = True,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.2,
                 act_cfg: dict = dict(type='GELU'),
                 norm_cfg: dict = dict(type='LN'),
                 with_cp: bool = False,
                 frozen_stages: int = -1,
                 init_cfg: Optional[Union[dict, list]] = None,
                 pretrained: Optional[str] = None) -> None:
        super().__init__(init_cfg=init_cfg_with_pretrained(init_cfg, pretrained))
        self.register_load_state_dict_pre_hook(convert_state_dict_on_load)  # any layout loads

        embed_dims, depths, num_heads = resolve_arch(arch, embed_dims, depths, num_heads)
        num_stages = len(depths)
        window_sizes = _per_stage(window_size, 'window_size', num_stages)
        pretrained_window_sizes = _per_stage(pretrained_window_sizes, 'pretrained_window_sizes',
                                             num_stages)
        check_arguments(embed_dims, patch_size, window_sizes, depths, num_heads,
                        (patch_size,) + (2,) * (num_stages - 1), out_indices, frozen_stages,
                        in_channels, mlp_ratio,
                        rates=dict(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                                   drop_path_rate=drop_path_rate),
                        cfgs=dict(act_cfg=act_cfg, norm_cfg=norm_cfg))
        for i, p in enumerate(pretrained_window_sizes):
            if not isinstance(p, int) or isinstance(p, bool) or p < 0:
                raise ValueError(f'pretrained_window_sizes[{i}] must be an int >= 0 (0: the '
                                 f"stage's own window), got {p!r}")
        self.arch = arch
        self.in_channels = in_channels
        self.embed_dims = embed_dims
        self.patch_size = patch_size
        self.window_sizes = window_sizes
        self.pretrained_window_sizes = pretrained_window_sizes
        self.depths = tuple(depths)
        self.num_heads = tuple(num_heads)
        self.out_indices = tuple(sorted(i % num_stages for i in out_indices))
        self.frozen_stages = frozen_stages
        self.num_features = [embed_dims * 2 ** i for i in range(num_stages)]

        self.patch_embed = PatchEmbed(in_channels, embed_dims, patch_size,
                                      norm_cfg if patch_norm else None)
        self.drop_after_pos = nn.Dropout(p=drop_rate)
        merging_norm = norm_cfg if patch_norm else None
        self.stages = self.build_stages(
            drop_path_rate,
            lambda i, rates, downsample: SwinStageV2(
                self.num_features[i], num_heads[i], int(mlp_ratio * self.num_features[i]),
                depths[i], window_sizes[i], pretrained_window_sizes[i], qkv_bias, drop_rate,
                attn_drop_rate, rates, downsample, act_cfg, norm_cfg, with_cp),
            lambda channels: PatchMergingV2(channels, 2 * channels, merging_norm))
        for i in self.out_indices:
            self.add_module(f'norm{i}', build_norm(norm_cfg, self.num_features[i]))
        self._freeze_stages()

    @property
    def window_size(self) -> int:
        """The largest window of the stages (V1's single ``window_size``)."""
        return max(self.window_sizes)

    def stage_pretrained_windows(self) -> tuple[int, ...]:
        """Per stage, the pretrained window its coordinate tables hold now (after loading)."""
        return tuple(stage.blocks[0].attn.w_msa.pretrained_window_size for stage in self.stages)

    def init_weights(self) -> None:
        """Random init (trunc-normal 0.02 linears, LayerNorm weight 1 and bias 0, logit scale
        log 10, zero q/v biases), then load ``init_cfg`` weights."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, CosineWindowMSA):
                nn.init.constant_(module.logit_scale, math.log(10.0))
                if module.q_bias is not None:
                    nn.init.zeros_(module.q_bias)
                    nn.init.zeros_(module.v_bias)

        self.load_init_cfg()
