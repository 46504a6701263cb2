"""Channel pruning, step 2: how many channel positions each dependency group keeps, and which (docs/channel-pruning.md).

A group of ``C`` positions per slice keeps ``n_keep = floor(C·(1−r))``, then rounded down to a
multiple of ``round_to`` (never below ``round_to``), then raised to ``min_channels``; the
top-``n_keep`` positions by importance survive, ties broken towards the lower index. Grouped convs,
GroupNorm and attention heads split a group into ``g`` equal slices (Torch-Pruning's channel groups):
importance is averaged over the slices and the same positions are removed from each, so every slice
keeps ``n_keep`` of ``C/g``. ``scope="global"`` ranks the positions of all groups counted globally
together and keeps the top ``floor(T·(1−r))`` of the ``T`` positions; ``round_to`` and
``min_channels`` then apply per group.

A position may stand for a *block* of channels: whole-head pruning (``prune --heads``) counts an
attention's heads, each a block of ``head_dim`` channels. ``round_to`` and ``min_channels`` are about
channels, so they apply to ``kept · slices · block``: ``min_channels=1`` keeps at least one head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Counted", "keep_counts", "n_keep", "round_and_clamp", "top"]


@dataclass(frozen=True)
class Counted:
    """What counting needs of one group: positions per slice, slices, importance per position, own ratio.

    ``block``: channels per position (1; ``head_dim`` when the positions are whole attention heads).
    """

    size: int
    slices: int
    imp: torch.Tensor  # per position of one slice
    ratio: float | None  # None: counted globally
    block: int = 1

    @property
    def unit(self) -> int:
        """Channels removed together per position: the same position of every slice, each ``block`` wide."""
        return self.slices * self.block


def n_keep(channels: int, ratio: float, round_to: int | None, min_channels: int, slices: int) -> int:
    """Kept positions per slice for a group of ``channels`` positions per slice (module docstring).

    ``slices``: channels removed together per position (slices × block).
    """
    keep = math.floor(channels * (1.0 - ratio) + 1e-9)
    return round_and_clamp(keep, channels, round_to, min_channels, slices)


def round_and_clamp(keep: int, channels: int, round_to: int | None, min_channels: int, slices: int) -> int:
    """``keep`` rounded down to ``round_to`` (per all slices), raised to ``min_channels``, at most ``channels``."""
    if round_to and round_to > 1:
        step = round_to // math.gcd(round_to, slices)  # so that slices·keep is a multiple of round_to
        keep = max(keep - keep % step, min(step, channels))
    keep = max(keep, math.ceil(min_channels / slices))
    return min(keep, channels)


def top(imp: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` most important positions, ascending; ties go to the lower index."""
    order = torch.sort(-imp, stable=True).indices
    return sorted(order[:keep].tolist())


def keep_counts(groups: Sequence[Counted], ratio: float, round_to: int | None, min_channels: int) -> list[int]:
    """Kept positions per slice of every group: its own ratio, or its share of the global ranking at ``ratio``."""
    keeps = [n_keep(g.size, g.ratio, round_to, min_channels, g.unit) if g.ratio is not None else g.size for g in groups]
    pool = [i for i, g in enumerate(groups) if g.ratio is None]
    if pool:
        imps = torch.cat([groups[i].imp for i in pool])
        owner = torch.cat([torch.full((groups[i].size,), i, dtype=torch.long) for i in pool])
        total = int(imps.numel())
        keep_total = math.floor(total * (1.0 - ratio) + 1e-9)
        chosen = torch.sort(-imps, stable=True).indices[:keep_total]
        per = torch.bincount(owner[chosen], minlength=len(groups))
        for i in pool:
            g = groups[i]
            keeps[i] = round_and_clamp(int(per[i]), g.size, round_to, min_channels, g.unit)
    return keeps
