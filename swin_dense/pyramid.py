"""What SwinBackbone and SwinV2Backbone share: the backbone interface, freezing, input checks
and the forward over the stages.

A subclass builds ``patch_embed``, ``drop_after_pos``, ``stages`` (each returning
``(x_down, hw_down, x, hw)``) and one ``norm{i}`` per output index, sets the attributes read
here (``in_channels``, ``patch_size``, ``depths``, ``window_sizes``, ``num_features``,
``out_indices``, ``frozen_stages``, ``use_abs_pos_embed``) and may override :meth:`embed`.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import Tensor

from .arch import FeatureSpec, int_tuple
from .layers import tokens_to_nchw


class SwinPyramid(BaseModule):
    """Base of the Swin backbones: image ``(B, Cin, H, W)`` in, a tuple of NCHW maps out."""

    in_channels: int
    patch_size: int
    depths: tuple
    window_sizes: tuple
    num_features: list
    out_indices: tuple
    frozen_stages: int
    use_abs_pos_embed: bool = False

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
        """Input sides that are multiples of this need no window padding at any stage: the
        least common multiple of ``patch_size * 2**i * window_sizes[i]`` over the stages and
        :attr:`size_divisibility` (224 for Swin-T with window 7; 256 for windows
        (16, 16, 16, 8))."""
        multiple = self.size_divisibility
        for i, window in enumerate(self.window_sizes):
            multiple = math.lcm(multiple, self.patch_size * 2 ** i * window)
        return multiple

    def build_stages(self, drop_path_rate: float,
                     stage: Callable[[int, list, Optional[nn.Module]], nn.Module],
                     merging: Callable[[int], nn.Module]) -> nn.ModuleList:
        """The stages: ``stage(i, drop_path_rates, downsample)`` for each, with stochastic depth
        rising linearly from 0 to ``drop_path_rate`` over all blocks and ``merging(channels)``
        after every stage but the last."""
        rates = torch.linspace(0, drop_path_rate, sum(self.depths)).tolist()
        stages, start = nn.ModuleList(), 0
        for i, depth in enumerate(self.depths):
            last = i == len(self.depths) - 1
            stages.append(stage(i, rates[start:start + depth],
                                None if last else merging(self.num_features[i])))
            start += depth
        return stages

    # ------------------------------------------------------------------ train / freeze
    def train(self, mode: bool = True) -> 'SwinPyramid':
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

    def load_init_cfg(self) -> None:
        """Load the ``init_cfg`` weights (``dict(type='Pretrained', checkpoint=PATH)``) through
        :func:`swin_dense.checkpoint.load_pretrained`, or say that training starts from the
        random initialisation (``init_cfg=None``)."""
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            from .checkpoint import load_pretrained  # lazy: only needed when loading
            load_pretrained(self, cfg['checkpoint'], prefix=cfg.get('prefix'))
        elif cfg is None:
            print_log(f'{type(self).__name__}: no pretrained weights (init_cfg is None), '
                      'training starts from a random initialisation', logger='current')
        else:
            raise ValueError(f"{type(self).__name__} supports init_cfg=dict(type='Pretrained', "
                             f'checkpoint=PATH) or None, got {cfg!r}')
        self._is_init = True

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f'{name} expects a torch.Tensor of shape (B, {self.in_channels}, '
                            f'H, W), got {type(x).__name__}')
        if x.dim() != 4:
            raise ValueError(f'{name} expects a 4-d input (B, {self.in_channels}, H, W), got '
                             f'shape {tuple(x.shape)}; add a batch dimension with x[None]')
        if not x.is_floating_point():
            raise TypeError(f'{name} expects a floating-point image (normalised), got dtype '
                            f'{x.dtype}; convert with x.float() after normalisation')
        weight = self.patch_embed.projection.weight
        if x.device != weight.device:
            raise ValueError(f'the input is on {x.device} but {name} is on {weight.device}; '
                             f'move one of them: x.to({str(weight.device)!r}) or '
                             f'model.to({str(x.device)!r})')
        if x.dtype != weight.dtype and not autocast_enabled(x.device.type):
            raise TypeError(f'the input is {x.dtype} but {name} is {weight.dtype}; convert '
                            f'one of them (x.to({weight.dtype}) or model.to({x.dtype})), or run '
                            f"mixed precision under torch.autocast('{x.device.type}')")
        if torch.jit.is_tracing():
            return  # sizes are traced tensors here: checking their values would freeze them
        if x.shape[1] != self.in_channels:
            raise ValueError(f'{name} was built with in_channels={self.in_channels} but the '
                             f'input has {x.shape[1]} channels (shape {tuple(x.shape)}); NCHW '
                             'layout is expected')
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f'{name} got an empty image of shape {tuple(x.shape)}')

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
                f'exporting {type(self).__name__} with dynamic sizes from an example with '
                f'{" and ".join(problems)}: PyTorch fixes a size that is 1 in the example '
                f'input (a batch of 1; one window a side in the last stage, for a side up to '
                f'padding_free_multiple={pfm}), and the exported graph may then fail at other '
                f'sizes. Export from an example with batch >= 2 and both sides above {pfm}, '
                f'e.g. (2, {self.in_channels}, {2 * pfm + 32}, {3 * pfm}): an ONNX graph '
                f'exported from it serves every size.')

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
        x, hw = self.embed(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x, next_hw, out, hw_out = stage(x, hw)
            if i in self.out_indices:
                out = getattr(self, f'norm{i}')(out)
                outs.append(tokens_to_nchw(out, hw_out))
            hw = next_hw
        return tuple(outs)

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """The image as the token map ``(B, H/p * W/p, C)`` the first stage takes, and its size."""
        x, hw = self.patch_embed(x)
        return self.drop_after_pos(x), hw

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



def init_cfg_with_pretrained(init_cfg: Optional[dict], pretrained: Optional[str]
                             ) -> Optional[dict]:
    """``init_cfg``, or the deprecated ``pretrained`` path as a ``Pretrained`` init_cfg."""
    if pretrained is None:
        return init_cfg
    if init_cfg is not None:
        raise ValueError('give either init_cfg or the deprecated pretrained, not both')
    if not isinstance(pretrained, str):
        raise TypeError(f'pretrained must be a path (str) or None, got {type(pretrained)}')
    warnings.warn('pretrained is deprecated: use init_cfg=dict(type="Pretrained", '
                  'checkpoint=PATH)', DeprecationWarning)
    return dict(type='Pretrained', checkpoint=pretrained)


def autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return False


def check_arguments(embed_dims: int, patch_size: int, window_sizes: Sequence[int],
                    depths: Sequence[int],
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
                        (in_channels, 'in_channels')):
        positive_int(value, name)
    if len(window_sizes) != len(depths):
        raise ValueError(f'window_size {tuple(window_sizes)} must be an int or have one entry per '
                         f'stage ({len(depths)})')
    for i, window in enumerate(window_sizes):
        positive_int(window, 'window_size' if len(set(window_sizes)) == 1
                     else f'window_size[{i}]')
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

