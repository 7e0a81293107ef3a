"""What ``tools/train.py`` and ``tools/test.py`` share: one pair of tools for mmdet and mmseg.

The tools parse the upstream options of mmdet 3.3.0 / mmseg 1.2.2 and call :func:`train` or
:func:`test` through :func:`run_tool`. Before any model is built, these

1. read the config as the upstream tools do (:mod:`.config`: a wrong path is a
   :class:`ConfigNotFoundError` naming close matches; ``--cfg-options``, launcher, work dir) and
   register the toolkit picked from ``default_scope`` and this package's integrations;
2. apply the tool's options (:mod:`.options`); for training, select ``AtomicCheckpointHook``
   and ``ResumeRandomStateHook`` (:func:`select_crash_safe_training`);
3. build the config's ``demo_data`` dataset when absent;
4. check (:mod:`.checks`) that the data, the pretrained weights and the checkpoint exist and
   that the model's ``in_channels`` fit the backbone;
5. adapt the config to a machine without CUDA (:func:`adapt_to_device`: gloo, CPU DDP, SyncBN
   as BN when distributed, ``CPUAmpOptimWrapper`` for AMP training);

then build the Runner (:mod:`.runner`). Every error raised for the user derives from
:class:`LaunchError`; the tools print its message without a traceback and exit with status 1.
"""
from .checks import check_channels, check_checkpoint_file, check_data, check_pretrained
from .config import (TOOLKITS, add_launch_arguments, load_config, parse_tool_args,
                     prepare_demo_data, setup_local_rank, setup_toolkit, toolkit_of)
from .errors import (ChannelMismatchError, CheckpointCorruptError, CheckpointNotFoundError,
                     ConfigNotFoundError, DataNotFoundError, DeviceError, LaunchError,
                     PretrainedNotFoundError, UnsupportedToolkitError)
from .options import apply_test_options, apply_train_options, select_crash_safe_training
from .runner import adapt_to_device, build_runner, run_tool, test, train

__all__ = [
    'ChannelMismatchError', 'CheckpointCorruptError', 'CheckpointNotFoundError',
    'ConfigNotFoundError', 'DataNotFoundError', 'DeviceError', 'LaunchError',
    'PretrainedNotFoundError', 'TOOLKITS', 'UnsupportedToolkitError', 'adapt_to_device',
    'add_launch_arguments', 'apply_test_options', 'apply_train_options', 'build_runner',
    'check_channels', 'check_checkpoint_file', 'check_data', 'check_pretrained', 'load_config',
    'parse_tool_args', 'prepare_demo_data', 'run_tool', 'select_crash_safe_training',
    'setup_local_rank', 'setup_toolkit', 'test', 'toolkit_of', 'train',
]
