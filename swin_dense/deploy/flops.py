"""FLOPs and parameters of a detector or segmentor built from a config, counted by mmengine's
``get_model_complexity_info`` the way the toolkits' own ``get_flops.py`` call it: the model's
``tensor`` forward on a random image, with the data samples a test batch would carry."""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn as nn


def _data_samples(toolkit: str, shape: Sequence[int]) -> list:
    h, w = shape
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w),
                scale_factor=(1.0, 1.0))
    if toolkit == 'mmdet':
        from mmdet.structures import DetDataSample
        return [DetDataSample(metainfo=meta)]
    from mmseg.structures import SegDataSample
    return [SegDataSample(metainfo=meta)]


def model_complexity(model: nn.Module, toolkit: str, shape: Sequence[int],
                     show_table: bool = True) -> dict:
    """``get_model_complexity_info`` of ``model`` (built from a config, eval mode) on one
    ``(1, 3, H, W)`` image after the data preprocessor (normalisation, padding to its size
    divisor, as the toolkits' get_flops do). Returns mmengine's dict (``flops``, ``params``,
    ``flops_str``, ``params_str``, ``out_table``, ...) plus ``input_shape``."""
    from mmengine.analysis import get_model_complexity_info

    if toolkit == 'mmseg' and type(getattr(model, 'decode_head', None)).__name__ in (
            'MaskFormerHead', 'Mask2FormerHead'):
        raise NotImplementedError('FLOP counting of MaskFormer / Mask2Former segmentors is not '
                                  "supported (as in mmseg's own get_flops.py)")
    image = torch.rand(3, *shape) * 255
    data = model.data_preprocessor(dict(inputs=[image], data_samples=_data_samples(toolkit,
                                                                                   shape)))
    inputs = data['inputs']
    forward = model.forward
    try:
        model.forward = partial(forward, data_samples=data['data_samples'], mode='tensor')
        with torch.no_grad():
            result = get_model_complexity_info(model, inputs=inputs, show_table=show_table,
                                               show_arch=False)
    finally:
        model.forward = forward
    result['input_shape'] = tuple(inputs.shape[-2:])
    return result
