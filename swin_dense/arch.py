"""The published Swin variants and the description of a backbone output.

Imports nothing from the package, so that the backbone, the checkpoint code and the tools can
all read the arch table without importing one another.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


#: embed_dims, depths, num_heads of the published variants (Liu et al. 2021, Table 1).
ARCH_SETTINGS = {
    'tiny': dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    'small': dict(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    'base': dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    'large': dict(embed_dims=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}
_ARCH_ALIASES = {'t': 'tiny', 's': 'small', 'b': 'base', 'l': 'large'}
_DEFAULT_SHAPE = ARCH_SETTINGS['tiny']


@dataclass(frozen=True)
class FeatureSpec:
    """One output of the backbone: its channels and its stride relative to the input image."""

    channels: int
    stride: int


def int_tuple(value, name: str) -> tuple:
    """A list/tuple argument as a tuple; a clear TypeError for anything else (e.g. an int)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f'{name} must be a list or tuple of ints (one per stage), got {value!r}')
    return tuple(value)


def resolve_arch(arch: Optional[str], embed_dims: int, depths: Sequence[int],
                 num_heads: Sequence[int]) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """Apply the ``arch`` shorthand; explicit non-default values must agree with it."""
    depths, num_heads = int_tuple(depths, 'depths'), int_tuple(num_heads, 'num_heads')
    if arch is None:
        return embed_dims, depths, num_heads
    if not isinstance(arch, str) or _ARCH_ALIASES.get(arch.lower(), arch.lower()) not in ARCH_SETTINGS:
        raise ValueError(f'arch must be one of {sorted(ARCH_SETTINGS)} (or t/s/b/l), got {arch!r}')
    setting = ARCH_SETTINGS[_ARCH_ALIASES.get(arch.lower(), arch.lower())]
    given = dict(embed_dims=embed_dims, depths=depths, num_heads=num_heads)
    for key, value in given.items():
        if value != _DEFAULT_SHAPE[key] and value != setting[key]:
            raise ValueError(f'arch={arch!r} sets {key}={setting[key]}, but {key}={value} was also '
                             'given; drop one of them')
    return setting['embed_dims'], setting['depths'], setting['num_heads']
