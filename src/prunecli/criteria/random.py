"""``random``: the seeded baseline every paper compares against (weights or output channels)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from prunecli.criteria._base import Criterion, CriterionOutput, ScoreContext

__all__ = ["Random", "RandomOptions"]


@dataclass(frozen=True)
class RandomOptions:
    granularity: Literal["weight", "channel"] = field(
        default="weight", metadata={"help": "Score each weight, or each output channel."}
    )


class Random(Criterion):
    """Uniform random scores from a generator seeded with ``--seed`` (same seed → same scores).

    Each parameter gets its own generator seeded from (seed, position in the model), so the scores of
    one layer do not depend on the sizes of the layers before it.
    """

    name = "random"
    Options = RandomOptions
    requires: ClassVar[frozenset[str]] = frozenset()

    def finish(self, ctx: ScoreContext) -> CriterionOutput:
        scores = {}
        for i, (name, w) in enumerate(ctx.params.items()):
            g = torch.Generator().manual_seed(ctx.seed * 1_000_003 + i)
            shape = tuple(w.shape) if self.granularity == "weight" else (w.shape[0],)
            scores[name] = torch.rand(shape, generator=g, dtype=torch.float32)
        return CriterionOutput(scores)
