"""``taylor``: first-order Taylor importance |w·∂L/∂w| over mini-batches (paper A; Molchanov 2017/2019).

docs/criteria.md (taylor). With ``c_k = θ ⊙ g_k`` the contribution of mini-batch ``k`` (``g_k`` the gradient
of the batch's mean cross-entropy), for each weight (or, for channels, ``c_k[o] = Σ_{s∈W[o]} θ_s g_{k,s}``,
the group Taylor of the whole filter):

* ``abs_sum`` (paper A eq. 3, default): ``Σ_k |c_k|``  [PAPER-A, M = 10 batches];
* ``sq_mean`` (Molchanov 2019, NVlabs method 0 / group variant): ``(1/M) Σ_k c_k²``;
* ``abs_of_mean``: ``|(1/M) Σ_k c_k|`` = ``|θ ⊙ ḡ|`` (for weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from prunecli.criteria._base import Criterion, CriterionOutput, ScoreContext

__all__ = ["Taylor", "TaylorOptions"]


@dataclass(frozen=True)
class TaylorOptions:
    agg: Literal["abs_sum", "sq_mean", "abs_of_mean"] = field(
        default="abs_sum",
        metadata={"help": "Across batches: Σ|θg| (paper A), mean (θg)² (Molchanov 2019), or |θ·mean g|."},
    )
    granularity: Literal["weight", "channel"] = field(
        default="weight", metadata={"help": "Score each weight, or each output channel (group Taylor)."}
    )


class Taylor(Criterion):
    """First-order Taylor importance accumulated over the calibration batches (default 10, paper A)."""

    name = "taylor"
    Options = TaylorOptions
    requires: ClassVar[frozenset[str]] = frozenset({"data", "grads"})
    default_batches: ClassVar[int | None] = 10

    def begin(self, ctx: ScoreContext) -> None:
        # signed sums cancel: float64 for abs_of_mean; sums of non-negative terms are fine in float32
        dtype = torch.float64 if self.options.agg == "abs_of_mean" else torch.float32
        self._acc = {}
        for name, w in ctx.params.items():
            shape = w.shape if self.granularity == "weight" else w.shape[:1]
            self._acc[name] = torch.zeros(shape, dtype=dtype, device=w.device)
        self._batches = 0

    def on_grads(self, ctx: ScoreContext, grads: Sequence[torch.Tensor | None]) -> None:
        agg = self.options.agg
        for (name, w), g in zip(ctx.params.items(), grads, strict=True):
            if g is None:
                continue
            c = w.detach() * g
            if self.granularity == "channel":
                c = c.reshape(c.shape[0], -1).sum(1)
            acc = self._acc[name]
            if agg == "abs_sum":
                acc.add_(c.abs())
            elif agg == "sq_mean":
                acc.add_(c.square())
            else:
                acc.add_(c.to(acc.dtype))

    def end_batch(self, ctx: ScoreContext, n: int) -> None:
        self._batches += 1

    def finish(self, ctx: ScoreContext) -> CriterionOutput:
        k = max(self._batches, 1)
        agg = self.options.agg
        scores = {}
        for name, acc in self._acc.items():
            if agg == "abs_sum":
                scores[name] = acc
            elif agg == "sq_mean":
                scores[name] = acc / k
            else:
                scores[name] = (acc / k).abs()
        return CriterionOutput({n: s.float().cpu() for n, s in scores.items()})
