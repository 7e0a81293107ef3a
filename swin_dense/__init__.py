"""swin_dense: a Swin Transformer backbone for dense prediction with mmdet 3.x and mmseg 1.x.

Importing the package registers ``SwinBackbone`` and ``SwinV2Backbone`` in mmengine's root model
registry, which the mmdet and mmseg registries fall back to, so
``backbone=dict(type='SwinBackbone', ...)`` (or ``'SwinV2Backbone'``) builds under either default
scope. It imports torch and mmengine only (no mmcv, mmdet or mmseg).
"""
from .arch import ARCH_SETTINGS, FeatureSpec
from .backbone import SwinBackbone
from .backbone_v2 import SwinV2Backbone

__version__ = '0.1.0'
__all__ = ['ARCH_SETTINGS', 'FeatureSpec', 'SwinBackbone', 'SwinV2Backbone', '__version__']
