"""Reading, recognising and converting Swin Transformer checkpoints for ``SwinBackbone`` and
``SwinV2Backbone`` (Swin V2 layouts: :mod:`.formats_v2`, :mod:`.load_v2`; the same entry points).

Weights flow one way: file -> safe read (:mod:`.io`) -> detect the layout and map the names
(:mod:`.formats`, one mapper per layout, walking its naming family with :mod:`.mapping`) ->
resize and load with a report (:mod:`.load`, through the one loop of :mod:`.conversion`;
:mod:`.report`); :mod:`.convert` writes the result as a file. The package never imports the
backbone: it reads the arch table from ``swin_dense.arch`` and is given the model (or builds it
through mmengine's registry).

Entry points:

* :func:`load_pretrained` - what ``init_cfg=dict(type='Pretrained', checkpoint=PATH)`` calls.
* :func:`convert_state_dict_on_load` - the backbone's ``load_state_dict`` pre-hook, which makes a
  whole detector / segmentor file of any supported layout load through mmengine's
  ``load_checkpoint`` (``load_from``, ``tools/test.py``, ``init_detector``, ``init_model``).
* :func:`checkpoint_filter_fn` / :func:`convert_state_dict` - pure conversion of a dict.
* :func:`convert_checkpoint` - write a file in our layout (``tools/convert_checkpoint.py``).
* :func:`read_checkpoint` - ``weights_only`` loading that still accepts what mmengine writes.
"""
from .convert import convert_checkpoint
from .formats import (FORMAT_DESCRIPTIONS, FORMATS, detect_format, official_to_unfold_norm,
                      official_to_unfold_reduction, unwrap_state_dict)
from .formats_v2 import FORMAT_V2_DESCRIPTIONS, FORMATS_V2, detect_v2_format
from .io import (UnsafeCheckpointError, mmengine_safe_globals, read_checkpoint,
                 register_mmengine_safe_globals)
from .load import (checkpoint_filter_fn, convert_state_dict, convert_state_dict_on_load,
                   infer_arch, load_pretrained, resize_absolute_pos_embed,
                   resize_relative_position_bias_table)
from .load_v2 import infer_arch_v2, is_v2_model
from .report import LoadReport

__all__ = [
    'FORMATS', 'FORMATS_V2', 'FORMAT_DESCRIPTIONS', 'FORMAT_V2_DESCRIPTIONS', 'LoadReport',
    'UnsafeCheckpointError', 'detect_v2_format', 'infer_arch_v2', 'is_v2_model',
    'checkpoint_filter_fn', 'convert_checkpoint', 'convert_state_dict',
    'convert_state_dict_on_load', 'detect_format', 'infer_arch', 'load_pretrained',
    'mmengine_safe_globals', 'official_to_unfold_norm', 'official_to_unfold_reduction',
    'read_checkpoint', 'register_mmengine_safe_globals', 'resize_absolute_pos_embed',
    'resize_relative_position_bias_table', 'unwrap_state_dict'
]
