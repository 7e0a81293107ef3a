"""Error measures shared by the parity, mixed-precision and CUDA tests."""
from __future__ import annotations

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against the reference ``b``: ``|a - b| / |b|`` (Frobenius)."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def grad_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Relative error of a set of gradients (by name) against the reference set, taken as
    one vector."""
    num = sum((got[n] - ref[n]).norm() ** 2 for n in ref) ** 0.5
    den = sum(ref[n].norm() ** 2 for n in ref) ** 0.5
    return (num / den).item()
