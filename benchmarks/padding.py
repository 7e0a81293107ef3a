"""FLOPs of a Swin backbone counted from its sizes, and the share spent on window padding.

A Swin stage pads its token map to whole windows before attention. The padded slots go through
the qkv projection, the attention (as queries) and the output projection, and are cropped
afterwards: that work is the *padding FLOPs*. The real tokens' attention over padded keys is not
counted as padding, since a padded key (the qkv bias alone) changes the real tokens' outputs.
The MLP, the patch embedding and the patch merging run on real tokens only.

Counts follow ``torch.utils.flop_counter``'s conventions (what ``tools/benchmark.py`` measures
with): a matmul of ``(m, k) x (k, n)`` is ``2 m k n`` FLOPs, biases, norms, softmax and GELU are
not counted. A train step counts the forward and the backward: each matmul's backward computes
the gradients of both of its operands (twice its forward FLOPs), except the patch embedding,
whose input (the image) needs no gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

MODES = ('infer', 'train')


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class StageFlops:
    """One stage of the backbone at one input size, for the whole batch.

    ``height``/``width``: its token map; ``padded_height``/``padded_width``: that map padded to
    whole windows. ``flops``: everything the stage counts (blocks and the patch merging after
    it); ``padding_flops``: the part spent on padded slots.
    """

    stage: int
    height: int
    width: int
    padded_height: int
    padded_width: int
    flops: int
    padding_flops: int

    @property
    def padded_slots_share(self) -> float:
        """Padded slots over real tokens, minus one (0.72 for 16x16 tokens in 21x21 slots)."""
        return self.padded_height * self.padded_width / (self.height * self.width) - 1


@dataclass(frozen=True)
class BackboneFlops:
    """FLOPs of one forward (``infer``) or forward + backward (``train``) over a batch."""

    mode: str
    embed_flops: int
    stages: tuple[StageFlops, ...]

    @property
    def total(self) -> int:
        return self.embed_flops + sum(s.flops for s in self.stages)

    @property
    def padding(self) -> int:
        return sum(s.padding_flops for s in self.stages)

    @property
    def needed(self) -> int:
        """What the output needs: the total without the padding work."""
        return self.total - self.padding

    @property
    def padding_share(self) -> float:
        return self.padding / self.total


def stage_maps(height: int, width: int, num_stages: int = 4, patch_size: int = 4,
               window_size: int = 7) -> list[tuple[int, int, int, int]]:
    """``(h, w, padded_h, padded_w)`` of each stage's token map for an ``height x width`` image.

    The patch embedding and each patch merging pad their input to a multiple of their stride
    (mmdet's ``padding='corner'``), so a map of ``h`` rows has ``ceil(h / 2)`` after merging.
    """
    h, w = _ceil_div(height, patch_size), _ceil_div(width, patch_size)
    maps = []
    for stage in range(num_stages):
        if stage:
            h, w = _ceil_div(h, 2), _ceil_div(w, 2)
        maps.append((h, w, _ceil_div(h, window_size) * window_size,
                     _ceil_div(w, window_size) * window_size))
    return maps


def backbone_flops(batch: int, height: int, width: int, mode: str = 'infer',
                   embed_dims: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                   window_size: int = 7, patch_size: int = 4, mlp_ratio: float = 4,
                   in_channels: int = 3) -> BackboneFlops:
    """FLOPs of a Swin backbone (mmdet's ``SwinTransformer`` layout) on ``(batch, 3, H, W)``.

    Per block on a stage of width ``C``, for every window slot (padded or real): qkv
    ``2 * C * 3C``, attention ``2 * 2 * window_size**2 * C`` (scores and weighted values of one
    query), output projection ``2 * C * C``; for every real token: the MLP
    ``2 * 2 * C * mlp_ratio * C``. Patch merging after stages 1-3: ``2 * 4C * 2C`` per merged
    token (no bias).
    """
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    # forward + backward: both operands of every matmul get a gradient
    factor = 3 if mode == 'train' else 1
    patch_tokens = _ceil_div(height, patch_size) * _ceil_div(width, patch_size)
    embed = 2 * batch * patch_tokens * embed_dims * in_channels * patch_size ** 2
    embed *= 2 if mode == 'train' else 1  # forward + weight gradient; the image needs none
    maps = stage_maps(height, width, len(depths), patch_size, window_size)
    stages = []
    for index, (depth, (h, w, hp, wp)) in enumerate(zip(depths, maps)):
        c = embed_dims * 2 ** index
        tokens, slots = batch * h * w, batch * hp * wp
        per_slot = 2 * c * 3 * c + 4 * window_size ** 2 * c + 2 * c * c
        per_token = 4 * c * int(mlp_ratio * c)
        blocks = depth * (slots * per_slot + tokens * per_token)
        padding = depth * (slots - tokens) * per_slot
        merge = 0
        if index + 1 < len(depths):
            merged = batch * _ceil_div(h, 2) * _ceil_div(w, 2)
            merge = 2 * merged * 4 * c * 2 * c
        stages.append(StageFlops(index + 1, h, w, hp, wp, factor * (blocks + merge),
                                 factor * padding))
    return BackboneFlops(mode, embed, tuple(stages))
