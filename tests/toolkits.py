"""What the config tests share: the toolkits' model registries, and a holder that names a
backbone's parameters as a detector or segmentor does."""
from __future__ import annotations

from torch import nn


def toolkit_models(scope: str, set_default_scope: bool = True):
    """mmdet's or mmseg's ``MODELS`` with every module registered (``scope``: 'mmdet' or
    'mmseg'); the default scope set to it unless ``set_default_scope`` is False."""
    if set_default_scope:
        from mmengine.registry import init_default_scope
        init_default_scope(scope)
    if scope == 'mmdet':
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    else:
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    return MODELS


class BackboneHolder(nn.Module):
    """A model with only a ``backbone``: optimizer rules see the names 'backbone.*'."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
