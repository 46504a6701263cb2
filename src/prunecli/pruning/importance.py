"""Channel pruning, step 1: scores → one importance per channel position of a dependency group.

* A channel criterion gives one score per output channel of a conv/linear weight. A weight
  criterion gives per-weight scores; they are reduced per output channel as the L1 sum of the
  filter's scores (:func:`channel_scores_from_weights`; all prunecli weight criteria are
  non-negative, so this is their plain sum). Without scores the criterion is magnitude: the L2 norm
  of each filter (``‖W[o]‖₂``).
* A group's importance per channel is the mean, over the group's conv/linear members whose *output*
  channels are in the group and that have scores, of the member's scores divided by that member's
  mean score (:class:`ScoreImportance`). Dividing by the mean puts layers of different fan-in (and
  scores of different units) on one scale, which global ranking needs; with a single scored member
  (a plain conv followed by BN) the ranking is exactly that layer's. Consumers (input channels) and
  norms do not vote: a scores file scores output channels. A group without any scored member has no
  importance (None: it is not pruned, reported as ``groups_unscored``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from prunecli.depgraph import OUT_FNS, Importance
from prunecli.errors import InputError

__all__ = [
    "ROOT_TYPES",
    "BadGroup",
    "ScoreImportance",
    "channel_scores_from_weights",
    "is_scored_member",
    "resolve_scores",
]

ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
"""Layers whose output channels are pruned (and that root dependency groups)."""


class BadGroup(Exception):
    """Torch-Pruning mapped a group's indices past a member's width: the group is skipped."""


def is_scored_member(item: Any) -> bool:
    """A conv/linear whose output channels are in the group: the members whose scores vote."""
    return item.dep.handler in OUT_FNS and isinstance(item.dep.target.module, ROOT_TYPES)


def channel_scores_from_weights(weight_scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reduces per-weight scores to per-output-channel scores: the L1 sum over each filter."""
    out = {}
    for name, s in weight_scores.items():
        s = s.detach().to(torch.float64)
        out[name] = s.abs().flatten(1).sum(1) if s.ndim > 1 else s.abs()
    return out


def resolve_scores(
    model: nn.Module,
    channel_scores: Mapping[str, torch.Tensor] | None,
    weight_scores: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor] | None:
    """Checks the given scores against ``model`` and returns float64 per-output-channel scores (None: magnitude).

    Raises:
        InputError: both kinds given, a name the model does not have, a wrong shape, or non-finite scores.
    """
    if channel_scores is not None and weight_scores is not None:
        raise InputError("give channel scores or weight scores, not both")
    if channel_scores is None and weight_scores is None:
        return None
    params = dict(model.named_parameters())
    given = channel_scores if channel_scores is not None else weight_scores
    assert given is not None
    for name, s in given.items():
        p = params.get(name)
        if p is None:
            raise InputError(f"scores name parameter {name!r}, which the model does not have",
                             hint="the scores file belongs to another architecture")  # fmt: skip
        want = tuple(p.shape) if weight_scores is not None else (int(p.shape[0]),)
        if tuple(s.shape) != want:
            kind = "weight" if weight_scores is not None else "channel"
            raise InputError(f"{kind} scores of {name!r} have shape {tuple(s.shape)}, expected {want}")
        if not bool(torch.isfinite(s).all()):
            raise InputError(f"scores of {name!r} hold NaN or infinite values")
    if weight_scores is not None:
        return channel_scores_from_weights(weight_scores)
    return {k: v.detach().to(torch.float64) for k, v in given.items()}


class ScoreImportance(Importance):
    """Group importance from per-output-channel scores (module docstring).

    Args:
        names: module → module name (Torch-Pruning's ``DG._module2name``).
        channel_scores: parameter name (``conv.weight``) → score per output channel; None = L2 filter norms.
    """

    def __init__(self, names: Mapping[nn.Module, str], channel_scores: Mapping[str, torch.Tensor] | None) -> None:
        self.names = names
        self.scores = channel_scores

    def member_scores(self, layer: nn.Module) -> torch.Tensor | None:
        """Scores of all output channels of ``layer`` (dense order), or None when it has none."""
        if self.scores is None:
            w = layer.weight.detach()
            if getattr(layer, "transposed", False):
                w = w.transpose(0, 1)
            return w.to(torch.float64).flatten(1).norm(dim=1)
        return self.scores.get(f"{self.names.get(layer, '?')}.weight")

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        n_root = len(group[0].idxs)
        total = torch.zeros(n_root, dtype=torch.float64)
        count = torch.zeros(n_root, dtype=torch.float64)
        voted = False
        for item in group:
            idxs, root_idxs = item.idxs, item.root_idxs
            layer = item.dep.target.module
            if not is_scored_member(item):
                continue
            if root_idxs is None or any(r is None for r in root_idxs):
                continue
            full = self.member_scores(layer)
            if full is None:
                continue
            full = full.to(torch.float64)
            mean = float(full.mean()) if full.numel() else 0.0
            if not math.isfinite(mean) or mean <= 0.0:
                continue  # a layer with all-zero scores carries no ranking information
            if max(idxs, default=0) >= full.numel() or max(root_idxs, default=0) >= n_root:
                raise BadGroup(self.names.get(layer, "?"))  # Torch-Pruning mapped indices past a layer's width
            local = full[torch.as_tensor(idxs, dtype=torch.long)] / mean
            where = torch.as_tensor(root_idxs, dtype=torch.long)
            total.scatter_add_(0, where, local)
            count.scatter_add_(0, where, torch.ones_like(local))
            voted = True
        if not voted:
            return None
        return torch.where(count > 0, total / count.clamp_min(1.0), torch.zeros_like(total))
