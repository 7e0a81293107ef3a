"""A detector or segmentor built from a config, without training-time state, for export and
counting; and the graph that gets exported (image in, features or per-class logits out).

Everything here goes through the toolkits' own registries and modules: the model is the one
``tools/test.py`` would build, with the data preprocessor's normalisation made part of the graph.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

TOOLKITS = ('mmdet', 'mmseg')


def load_config(path: str, cfg_options: Optional[dict] = None):
    """``Config.fromfile`` (importing ``custom_imports``, so ``swin_dense`` registers itself),
    then ``--cfg-options``; a clear error for a missing file or a config of another toolkit."""
    import os

    from mmengine.config import Config

    if not os.path.isfile(path):
        raise FileNotFoundError(f'config file not found: {path} (relative to {os.getcwd()})')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if cfg.get('default_scope') not in TOOLKITS:
        raise ValueError(f"{path}: default_scope is {cfg.get('default_scope')!r}; export and "
                         "FLOP counting support mmdet and mmseg configs only")
    return cfg


def build_model(cfg, checkpoint: Optional[str] = None) -> nn.Module:
    """The config's model on the CPU in eval mode, SyncBN reverted to BN.

    With ``checkpoint`` the weights come from that file through mmengine's ``load_checkpoint``
    (the path ``tools/test.py`` takes; backbone keys of the other supported layouts are
    converted on load). Without, the model keeps its random initialisation, with a warning:
    enough to check an export or count FLOPs, useless for inference. The backbone's pretrained
    ``init_cfg`` is never read: a trained checkpoint replaces it.
    """
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope

    toolkit = cfg.default_scope
    if toolkit == 'mmdet':
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    else:
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    init_default_scope(toolkit)
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    if checkpoint is None:
        warnings.warn('no checkpoint given: the model keeps its random initialisation (fine for '
                      'checking an export or counting FLOPs, useless for inference)')
    else:
        from mmengine.runner import load_checkpoint
        load_checkpoint(model, checkpoint, map_location='cpu')
    return model.eval()


class ExportGraph(nn.Module):
    """What ``tools/export.py`` exports: a float image batch ``(B, 3, H, W)`` in the pixel range
    and channel order the config's pipeline loads (0-255, BGR for mmcv's loaders), normalised as
    the model's data preprocessor does, then

    - for a segmentor (an ``EncoderDecoder`` whose decode head returns logits): per-class logits
      ``(B, num_classes, H, W)``, bilinearly resized to the input size as mmseg's inference does
      (adaptive pooling, as in UperNet's pyramid pooling, is swapped for an equivalent that
      exports at any size: :func:`replace_adaptive_pooling`);
    - for a detector: the neck's feature maps (the FPN levels, strides 4-64), or the backbone's
      when there is no neck.
    """

    def __init__(self, model: nn.Module, toolkit: str) -> None:
        super().__init__()
        replace_adaptive_pooling(model)
        self.model = model
        self.task = 'segmentation' if toolkit == 'mmseg' else 'features'
        if self.task == 'segmentation':
            head = getattr(model, 'decode_head', None)
            if head is None or type(head).__name__ in ('MaskFormerHead', 'Mask2FormerHead'):
                raise NotImplementedError(
                    f'export covers segmentors whose decode head returns per-class logits '
                    f'(UperNet, FPN heads, ...); {type(head).__name__} returns mask queries')
        pre = model.data_preprocessor
        mean, std = getattr(pre, 'mean', None), getattr(pre, 'std', None)
        self.normalise = mean is not None and getattr(pre, '_enable_normalize', True)
        self.register_buffer('mean', (mean if mean is not None else torch.zeros(3, 1, 1))
                             .reshape(1, -1, 1, 1).float().clone(), persistent=False)
        self.register_buffer('std', (std if std is not None else torch.ones(3, 1, 1))
                             .reshape(1, -1, 1, 1).float().clone(), persistent=False)
        # mmengine's ImgDataPreprocessor (mmdet) names it _channel_conversion, mmseg's
        # SegDataPreProcessor channel_conversion
        self.swap_channels = bool(getattr(pre, '_channel_conversion',
                                          getattr(pre, 'channel_conversion', False)))

    def output_names(self, num_outputs: int) -> list[str]:
        if self.task == 'segmentation':
            return ['logits']
        return [f'feat{i}' for i in range(num_outputs)]

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        """``(B, 3, H, W)`` pixels -> logits ``(B, K, H, W)`` or a tuple of feature maps."""
        if self.swap_channels:
            image = image.flip(1)
        if self.normalise:
            image = (image - self.mean) / self.std
        features = self.model.extract_feat(image)
        if self.task == 'features':
            return tuple(features)
        head = self.model.decode_head
        logits = head.forward(features)
        return (F.interpolate(logits, size=image.shape[2:], mode='bilinear',
                              align_corners=head.align_corners),)


class AdaptiveAvgPoolAsMatmul(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as two products with pooling matrices built from the input's
    (symbolic) size: the same bins (row ``i`` of ``o`` averages ``[floor(i*n/o),
    ceil((i+1)*n/o))``), in standard ONNX ops for any input size. ONNX's pooling ops take static
    kernels, so the exporters cannot express adaptive pooling whose output size does not divide
    the input (UperNet's pyramid pooling to 1, 2, 3, 6 on maps of any size)."""

    def __init__(self, output_size) -> None:
        super().__init__()
        self.output_size = ((output_size, output_size) if isinstance(output_size, int)
                            else tuple(output_size))
        if any(o is None for o in self.output_size):
            raise NotImplementedError('adaptive pooling with a None output size')

    @staticmethod
    def _matrix(n, o: int, like: Tensor) -> Tensor:
        """``(o, n)``: row i is the mean over bin i."""
        i = torch.arange(o, device=like.device).unsqueeze(1)
        j = torch.arange(n, device=like.device).unsqueeze(0)
        start = torch.div(i * n, o, rounding_mode='floor')
        end = torch.div((i + 1) * n + o - 1, o, rounding_mode='floor')
        inside = ((j >= start) & (j < end)).to(like.dtype)
        return inside / inside.sum(1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        rows = self._matrix(x.shape[-2], self.output_size[0], x)
        cols = self._matrix(x.shape[-1], self.output_size[1], x)
        return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


def replace_adaptive_pooling(model: nn.Module) -> int:
    """Swap every ``nn.AdaptiveAvgPool2d`` of ``model`` for :class:`AdaptiveAvgPoolAsMatmul`
    (same outputs); returns how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.AdaptiveAvgPool2d:
                setattr(parent, name, AdaptiveAvgPoolAsMatmul(child.output_size))
                swapped += 1
    return swapped


def example_input(shape: Sequence[int], batch: int = 1, seed: int = 0) -> Tensor:
    """A random pixel batch ``(batch, 3, H, W)`` in [0, 255]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *shape, generator=generator) * 255
