"""Swin V2's continuous relative position bias, as plain tensor functions.

Swin V2 (Liu et al., CVPR 2022) replaces V1's learned bias table by a small MLP evaluated on the
relative coordinates of the window, log-spaced and normalised by the window the weights were
pretrained with. The bias is therefore a function of coordinates: a model pretrained with window
``P`` runs at any window ``M`` by evaluating the MLP on ``M``'s coordinates, normalised by ``P``.

- :func:`coords_table`: the ``(1, 2M-1, 2M-1, 2)`` coordinate table of window ``M`` normalised
  by the pretrained window ``P`` (the ``relative_coords_table`` buffer of the official code,
  timm, torchvision and mmpretrain), always built in float32 as they build it;
- :func:`pretrained_window_from_table`: ``P`` read back from a stored table;
- :func:`continuous_position_bias`: ``16 * sigmoid(MLP(table))`` gathered into ``(h, N, N)``.

Shapes: ``M`` window, ``N = M * M``, ``h`` heads, ``D`` hidden units of the MLP (512).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .window import relative_position_bias

#: The coordinates are scaled to [-8, 8] by the pretrained window before the log spacing.
COORDS_RANGE = 8.0

#: ``log2(1 + 8)``-style spacing divides by ``log2(8)``.
_LOG_BASE = math.log2(8)


def coords_table(window_size: int, pretrained_window_size: int = 0,
                 device: Optional[torch.device] = None) -> Tensor:
    """The log-spaced relative coordinates of a window, ``(1, 2M-1, 2M-1, 2)`` float32.

    Offsets ``-(M-1) .. M-1`` along each axis (``ij`` order), divided by ``P - 1`` (``P`` the
    pretrained window; ``P = 0`` means ``M``), times 8, then ``sign(x) * log2(1 + |x|) / 3``.
    Always computed in float32, as every published implementation stores it: a model cast to
    float64 must cast this table, not recompute it, to match them.
    """
    if window_size < 1 or pretrained_window_size < 0:
        raise ValueError(f'window_size must be >= 1 and pretrained_window_size >= 0, got '
                         f'{window_size} and {pretrained_window_size}')
    M = window_size
    offsets = torch.arange(-(M - 1), M, dtype=torch.float32, device=device)
    table = torch.stack(torch.meshgrid(offsets, offsets, indexing='ij'), dim=-1).unsqueeze(0)
    divisor = (pretrained_window_size if pretrained_window_size > 0 else M) - 1
    # a window of 1 has only the offset 0; the guard keeps it 0 instead of 0 / 0
    table = table / max(divisor, 1)
    table = table * COORDS_RANGE
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / _LOG_BASE


def table_window_size(table: Tensor) -> int:
    """The window ``M`` whose coordinates ``table`` ``(1, 2M-1, 2M-1, 2)`` holds."""
    if table.dim() != 4 or table.shape[0] != 1 or table.shape[1] != table.shape[2] \
            or table.shape[3] != 2 or table.shape[1] % 2 == 0:
        raise ValueError(f'a relative_coords_table has shape (1, 2M-1, 2M-1, 2), got '
                         f'{tuple(table.shape)}')
    return (table.shape[1] + 1) // 2


def pretrained_window_from_table(table: Tensor) -> int:
    """The pretrained window ``P`` that :func:`coords_table` used to build ``table``.

    The largest value of the table is ``t = log2(1 + 8 (M-1) / (P-1)) / 3``, so
    ``P = 1 + 8 (M-1) / (2^(3t) - 1)``; a table built with ``P = 0`` gives ``P = M``. The table
    is then rebuilt from ``(M, P)`` and compared, so that a table of another design is an error
    rather than a wrong guess.

    Raises:
        ValueError: the table is not one :func:`coords_table` builds for any integer ``P``.
    """
    M = table_window_size(table)
    if M == 1:
        return 1
    largest = float(table.detach().double().max())
    spread = 2.0 ** (3.0 * largest) - 1.0
    if not math.isfinite(spread) or spread <= 0:
        raise ValueError(f'relative_coords_table of window {M} has largest value {largest}: not '
                         'a Swin V2 coordinate table')
    estimate = 1.0 + COORDS_RANGE * (M - 1) / spread
    pretrained = round(estimate)
    rebuilt = coords_table(M, pretrained, table.device)
    if pretrained < 2 or not torch.allclose(table.detach().float(), rebuilt, rtol=1e-5,
                                            atol=1e-6):
        raise ValueError(f'relative_coords_table of window {M} is not the log-spaced table of '
                         f'any pretrained window (estimate {estimate:.3f}): not a Swin V2 table '
                         '(a swinv2_cr model or another design?)')
    return pretrained


def continuous_position_bias(table: Tensor, hidden_weight: Tensor, hidden_bias: Tensor,
                             out_weight: Tensor, window_size: int,
                             index: Optional[Tensor] = None) -> Tensor:
    """``16 * sigmoid(MLP(table))`` gathered per query/key pair: ``(h, N, N)``.

    Args:
        table: :func:`coords_table` of ``window_size``, ``(1, 2M-1, 2M-1, 2)``.
        hidden_weight, hidden_bias: ``Linear(2, D)``, ``(D, 2)`` and ``(D,)``.
        out_weight: ``Linear(D, h, bias=False)``, ``(h, D)``.
        window_size: ``M``.
        index: V1's relative position index of ``M`` (built here if not given).
    """
    hidden = F.relu(F.linear(table.reshape(-1, 2).to(hidden_weight.dtype), hidden_weight,
                             hidden_bias))
    # the sigmoid on the (2M-1)^2 table before the gather: the same values, N^2 / (2M-1)^2
    # times fewer exponentials
    per_offset = torch.sigmoid(F.linear(hidden, out_weight)) * 16
    return relative_position_bias(per_offset, window_size, index)
