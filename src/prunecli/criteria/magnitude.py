"""``magnitude`` (aliases ``l1``, ``l2``): |w| per weight (paper A eq. 1), or the filter's L_p norm."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from prunecli.criteria._base import Criterion, CriterionOutput, ScoreContext

__all__ = ["Magnitude", "MagnitudeOptions"]


@dataclass(frozen=True)
class MagnitudeOptions:
    norm: Literal[1, 2] = field(
        default=1, metadata={"help": "L_p norm of a channel's filter (weights: |w| either way)."}
    )
    granularity: Literal["weight", "channel"] = field(
        default="weight", metadata={"help": "Score each weight, or each output channel (its filter's norm)."}
    )


class Magnitude(Criterion):
    """Weight magnitude: ``|w|`` per weight; per output channel ``‖W[o]‖_p`` over its whole filter.

    Weight scores are the same for ``norm=1`` and ``norm=2`` (|w| and w² rank identically); the norm
    matters for channels (L1 is Li et al. 2017's filter norm, L2 Torch-Pruning's default).
    """

    name = "magnitude"
    Options = MagnitudeOptions
    requires: ClassVar[frozenset[str]] = frozenset()
    presets: ClassVar[dict] = {"l1": {"norm": 1}, "l2": {"norm": 2}}

    def finish(self, ctx: ScoreContext) -> CriterionOutput:
        scores = {}
        for name, w in ctx.params.items():
            w = w.detach().float()
            if self.granularity == "weight":
                scores[name] = w.abs()
            else:
                scores[name] = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), ord=self.options.norm, dim=1)
        return CriterionOutput(scores)
