"""``fpgm``: filter pruning via the geometric median (He et al. 2019), one score per output channel.

Filters close to the geometric median of their layer are the most replaceable by the others. FPGM
ranks filter ``o`` by ``Σ_j ‖F_o − F_j‖₂`` (its distance sum to all filters of the layer, the quantity
the geometric median minimises): the smallest sums are pruned first, so the sum is the score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from prunecli.criteria._base import Criterion, CriterionOutput, ScoreContext

__all__ = ["Fpgm", "FpgmOptions"]


@dataclass(frozen=True)
class FpgmOptions:
    norm: Literal[1, 2] = field(default=2, metadata={"help": "Distance between filters: L1 or L2 (the paper's)."})


class Fpgm(Criterion):
    """Distance of each filter to the others of its layer (data-free)."""

    name = "fpgm"
    Options = FpgmOptions
    requires: ClassVar[frozenset[str]] = frozenset()
    granularity = "channel"

    def finish(self, ctx: ScoreContext) -> CriterionOutput:
        scores = {}
        for name, w in ctx.params.items():
            f = w.detach().double().reshape(w.shape[0], -1)
            scores[name] = torch.cdist(f, f, p=float(self.options.norm)).sum(1).float().cpu()
        return CriterionOutput(scores)
