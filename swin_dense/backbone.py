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
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from mmengine.registry import MODELS
from torch import Tensor

from .arch import FeatureSpec, int_tuple, resolve_arch
from .checkpoint.load import convert_state_dict_on_load
from .layers import (PatchEmbed, PatchMerging, SwinStage, build_norm, capturing_graph,
                     tokens_to_nchw)

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
class SwinBackbone(BaseModule):
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
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError('give either init_cfg or the deprecated pretrained, not both')
            if not isinstance(pretrained, str):
                raise TypeError(f'pretrained must be a path (str) or None, got {type(pretrained)}')
            warnings.warn('pretrained is deprecated: use init_cfg=dict(type="Pretrained", '
                          'checkpoint=PATH)', DeprecationWarning)
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        self.register_load_state_dict_pre_hook(convert_state_dict_on_load)  # any layout loads

        embed_dims, depths, num_heads = resolve_arch(arch, embed_dims, depths, num_heads)
        _check_arguments(embed_dims, patch_size, window_size, depths, num_heads, strides,
                         out_indices, frozen_stages, in_channels, mlp_ratio,
                         rates=dict(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                                    drop_path_rate=drop_path_rate),
                         cfgs=dict(act_cfg=act_cfg, norm_cfg=norm_cfg))
        num_stages = len(depths)
        self.arch = arch
        self.in_channels = in_channels
        self.embed_dims = embed_dims
        self.patch_size = patch_size
        self.window_size = window_size
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

        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i in range(num_stages):
            channels = self.num_features[i]
            downsample = (PatchMerging(channels, 2 * channels, norm_cfg if patch_norm else None)
                          if i < num_stages - 1 else None)
            self.stages.append(SwinStage(
                channels, num_heads[i], int(mlp_ratio * channels), depths[i], window_size,
                qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                dpr[sum(depths[:i]):sum(depths[:i + 1])], downsample, act_cfg, norm_cfg, with_cp))
        for i in self.out_indices:
            self.add_module(f'norm{i}', build_norm(norm_cfg, self.num_features[i]))
        self._freeze_stages()

    # ------------------------------------------------------------------ interface
    def output_shape(self) -> dict[str, FeatureSpec]:
        """Channels and stride of each output, keyed ``'stage{i+1}'`` in output order."""
        return {f'stage{i + 1}': FeatureSpec(self.num_features[i], self.patch_size * 2 ** i)
                for i in self.out_indices}

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Channels of the outputs, in order (what FPN / UPerHead ``in_channels`` must be)."""
        return tuple(s.channels for s in self.output_shape().values())

    @property
    def out_strides(self) -> tuple[int, ...]:
        """Strides of the outputs relative to the input image, in order."""
        return tuple(s.stride for s in self.output_shape().values())

    @property
    def size_divisibility(self) -> int:
        """Input sides that are multiples of this give every output exactly ``side / stride``.

        Any size is accepted (it is padded inside); the detection/segmentation data
        preprocessors pad to this (``pad_size_divisor=32``) so that pyramid levels align.
        """
        return self.patch_size * 2 ** (len(self.depths) - 1)

    @property
    def padding_free_multiple(self) -> int:
        """Input sides that are multiples of this need no window padding at any stage (224)."""
        return self.size_divisibility * self.window_size

    # ------------------------------------------------------------------ train / freeze
    def train(self, mode: bool = True) -> 'SwinBackbone':
        """Set train/eval mode, keeping frozen stages in eval mode."""
        super().train(mode)
        self._freeze_stages()
        return self

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules = [self.patch_embed, self.drop_after_pos]
        for i in range(self.frozen_stages):
            modules.append(self.stages[i])
            if i in self.out_indices:
                modules.append(getattr(self, f'norm{i}'))
        return modules

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0 and self.use_abs_pos_embed:
            self.absolute_pos_embed.requires_grad = False
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

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

        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            from .checkpoint import load_pretrained  # lazy: only needed when loading
            load_pretrained(self, cfg['checkpoint'], prefix=cfg.get('prefix'))
        elif cfg is None:
            print_log(f'{type(self).__name__}: no pretrained weights (init_cfg is None), '
                      'training starts from a random initialisation', logger='current')
        else:
            raise ValueError(f"SwinBackbone supports init_cfg=dict(type='Pretrained', "
                             f'checkpoint=PATH) or None, got {cfg!r}')
        self._is_init = True

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f'SwinBackbone expects a torch.Tensor of shape (B, {self.in_channels}, '
                            f'H, W), got {type(x).__name__}')
        if x.dim() != 4:
            raise ValueError(f'SwinBackbone expects a 4-d input (B, {self.in_channels}, H, W), got '
                             f'shape {tuple(x.shape)}; add a batch dimension with x[None]')
        if not x.is_floating_point():
            raise TypeError(f'SwinBackbone expects a floating-point image (normalised), got dtype '
                            f'{x.dtype}; convert with x.float() after normalisation')
        weight = self.patch_embed.projection.weight
        if x.device != weight.device:
            raise ValueError(f'the input is on {x.device} but SwinBackbone is on {weight.device}; '
                             f'move one of them: x.to({str(weight.device)!r}) or '
                             f'model.to({str(x.device)!r})')
        if x.dtype != weight.dtype and not _autocast_enabled(x.device.type):
            raise TypeError(f'the input is {x.dtype} but SwinBackbone is {weight.dtype}; convert '
                            f'one of them (x.to({weight.dtype}) or model.to({x.dtype})), or run '
                            f"mixed precision under torch.autocast('{x.device.type}')")
        if torch.jit.is_tracing():
            return  # sizes are traced tensors here: checking their values would freeze them
        if x.shape[1] != self.in_channels:
            raise ValueError(f'SwinBackbone was built with in_channels={self.in_channels} but the '
                             f'input has {x.shape[1]} channels (shape {tuple(x.shape)}); NCHW '
                             'layout is expected')
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f'SwinBackbone got an empty image of shape {tuple(x.shape)}')

    def _warn_if_export_specialises(self, x: Tensor) -> None:
        """``torch.export`` (and the dynamo ONNX exporter built on it) treats a size that is 1
        in the example input as the constant 1: a batch of 1, and, for a side not above
        :attr:`padding_free_multiple`, the single window a side of the last stage. The graph is
        then right for such inputs only, and the ONNX exporter does not always say so; warn
        when an export with dynamic sizes starts from such an example."""
        sizes = tuple(x.shape)
        dynamic = [isinstance(s, torch.SymInt) for s in sizes]
        if not any(dynamic):
            return  # a static export: the graph is for this size only, as asked
        problems = []
        if not dynamic[0] and sizes[0] == 1:
            problems.append('batch 1')
        for name, size in (('height', sizes[2]), ('width', sizes[3])):
            # the example's value, read without adding a guard (None where torch hides it)
            example = getattr(getattr(size, 'node', None), 'hint', None)
            if isinstance(example, int) and example <= self.padding_free_multiple:
                problems.append(f'{name} {example}')
        if problems:
            pfm = self.padding_free_multiple
            warnings.warn(
                f'exporting SwinBackbone with dynamic sizes from an example with '
                f'{" and ".join(problems)}: PyTorch fixes a size that is 1 in the example '
                f'input (a batch of 1; one window a side in the last stage, for a side up to '
                f'padding_free_multiple={pfm}), and the exported graph may then fail at other '
                f'sizes. Export from an example with batch >= 2 and both sides above {pfm}, '
                f'e.g. (2, {self.in_channels}, {2 * pfm + 32}, {3 * pfm}): an ONNX graph '
                f'exported from it serves every size.')

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

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """``(B, Cin, H, W)`` -> tuple of ``(B, C_i, H_i, W_i)`` for i in ``out_indices``."""
        self._check_input(x)
        if torch.compiler.is_exporting() and not torch.compiler.is_dynamo_compiling():
            self._warn_if_export_specialises(x)
        if not torch.jit.is_tracing() and x.shape[0] == 0:
            outs = tuple(x.new_zeros(0, self.num_features[i], *self._output_hw(x.shape[-2:], i),
                                     dtype=self._output_dtype(x, i))
                         for i in self.out_indices)
            if torch.is_grad_enabled():  # keep backward (and DDP's gradient sync) working
                anchor = sum(p.view(-1)[:1].sum() * 0 for p in self.parameters() if p.requires_grad)
                if x.requires_grad:
                    anchor = anchor + x.sum() * 0
                if isinstance(anchor, Tensor):
                    outs = tuple(o + anchor.to(o.dtype) for o in outs)
            return outs
        x, hw = self.patch_embed(x)
        if self.use_abs_pos_embed:
            x = x + self._position_embedding(hw)
        x = self.drop_after_pos(x)

        outs = []
        for i, stage in enumerate(self.stages):
            x, next_hw, out, hw_out = stage(x, hw)
            if i in self.out_indices:
                out = getattr(self, f'norm{i}')(out)
                outs.append(tokens_to_nchw(out, hw_out))
            hw = next_hw
        return tuple(outs)

    def _output_dtype(self, x: Tensor, stage: int) -> torch.dtype:
        """The dtype of output ``stage`` for an input like ``x``: under autocast, what a matrix
        product followed by that stage's norm gives (the autocast dtype on the CPU; float32 on
        CUDA, whose autocast runs LayerNorm in float32), else ``x.dtype``."""
        probe = x.new_zeros(0, 1).matmul(x.new_zeros(1, self.num_features[stage]))
        return getattr(self, f'norm{stage}')(probe).dtype

    def _output_hw(self, image_hw: Sequence[int], stage: int) -> tuple[int, int]:
        h, w = (-(-s // self.patch_size) for s in image_hw)
        for _ in range(stage):
            h, w = -(-h // 2), -(-w // 2)
        return h, w


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return False


def _check_arguments(embed_dims: int, patch_size: int, window_size: int, depths: Sequence[int],
                     num_heads: Sequence[int], strides: Sequence[int], out_indices: Sequence[int],
                     frozen_stages: int, in_channels: int, mlp_ratio: float,
                     rates: Optional[dict] = None, cfgs: Optional[dict] = None) -> None:
    """Fail early, with the fix, on arguments the model cannot be built with."""
    for name, value in (rates or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f'{name} is a probability in [0, 1], got {value!r}')
    for name, value in (cfgs or {}).items():
        if not isinstance(value, dict) or 'type' not in value:
            raise TypeError(f"{name} must be a dict with a 'type', e.g. "
                            f"{dict(act_cfg=dict(type='GELU'), norm_cfg=dict(type='LN'))[name]}, "
                            f'got {value!r}')
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)):
        raise TypeError(f'mlp_ratio must be a number, got {mlp_ratio!r}')
    out_indices = int_tuple(out_indices, 'out_indices')
    strides = int_tuple(strides, 'strides')
    def positive_int(value, name):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f'{name} must be a positive int, got {value!r}')

    for value, name in ((embed_dims, 'embed_dims'), (patch_size, 'patch_size'),
                        (window_size, 'window_size'), (in_channels, 'in_channels')):
        positive_int(value, name)
    if not mlp_ratio > 0:
        raise ValueError(f'mlp_ratio must be > 0, got {mlp_ratio!r}')
    if len(depths) == 0 or len(depths) != len(num_heads):
        raise ValueError(f'depths {tuple(depths)} and num_heads {tuple(num_heads)} must be '
                         'non-empty and of the same length (one entry per stage)')
    for i, (d, h) in enumerate(zip(depths, num_heads)):
        positive_int(d, f'depths[{i}]')
        positive_int(h, f'num_heads[{i}]')
        channels = embed_dims * 2 ** i
        if channels % h:
            raise ValueError(f'stage {i} has {channels} channels, not divisible by num_heads[{i}]'
                             f'={h}; choose heads that divide embed_dims * 2**i')
    strides = tuple(strides)
    if len(strides) != len(depths):
        raise ValueError(f'strides {strides} must have one entry per stage ({len(depths)})')
    if strides[0] != patch_size:
        raise ValueError(f'strides[0]={strides[0]} must equal patch_size={patch_size} '
                         '(non-overlapping patch embedding)')
    if any(s != 2 for s in strides[1:]):
        raise ValueError(f'patch merging halves the map: strides[1:] must be 2, got {strides[1:]}')
    n = len(depths)
    if len(out_indices) == 0 or any(not isinstance(i, int) or not -n <= i < n for i in out_indices):
        raise ValueError(f'out_indices {tuple(out_indices)} must be stage indices in [0, {n})')
    if len({i % n for i in out_indices}) != len(out_indices):
        raise ValueError(f'out_indices {tuple(out_indices)} repeats a stage')
    if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= n:
        raise ValueError(f'frozen_stages must be an int in [-1, {n}], got {frozen_stages!r}')
