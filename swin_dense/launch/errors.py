"""The errors the tools report to the user: each says what is wrong and what to do.

Every one derives from :class:`LaunchError`; ``run_tool`` prints its message without a traceback
and exits with status 1. Each also derives from the built-in error of its kind
(``FileNotFoundError``, ``ValueError``, ...), so callers can catch either.
"""
from __future__ import annotations

__all__ = ['ChannelMismatchError', 'CheckpointCorruptError', 'CheckpointNotFoundError',
           'ConfigNotFoundError', 'DataNotFoundError', 'DeviceError', 'LaunchError',
           'PretrainedNotFoundError', 'UnsupportedToolkitError']


class LaunchError(Exception):
    """A problem with the command, the config or the files it names, found before building."""


class ConfigNotFoundError(LaunchError, FileNotFoundError):
    """The config file does not exist."""


class DataNotFoundError(LaunchError, FileNotFoundError):
    """A dataset file or directory the run needs does not exist."""


class PretrainedNotFoundError(LaunchError, FileNotFoundError):
    """The pretrained weights named in the backbone's ``init_cfg`` do not exist."""


class CheckpointNotFoundError(LaunchError, FileNotFoundError):
    """The checkpoint given to test or resume does not exist."""


class CheckpointCorruptError(LaunchError, ValueError):
    """The checkpoint given to test or resume is a truncated torch zip archive."""


class ChannelMismatchError(LaunchError, ValueError):
    """The neck or head ``in_channels`` do not match the backbone's outputs."""


class UnsupportedToolkitError(LaunchError, ValueError):
    """The config's ``default_scope`` is not a toolkit these tools drive."""


class DeviceError(LaunchError, RuntimeError):
    """The requested run needs hardware this machine lacks."""
