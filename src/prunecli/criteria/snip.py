"""``snip``: connection sensitivity |g ⊙ θ| on one mini-batch, normalised over all layers (SNIP, paper A).

docs/criteria.md (snip) [PAPER-A eq. 4; CODE: namhoonlee/snip-public]: with a multiplicative mask ``c`` (all
ones), ``∂L/∂c_j = g_j θ_j``; ``s_j = |g_j θ_j| / Σ_k |g_k θ_k|`` over every prunable weight of the
model. One mini-batch by default; with ``--batches N`` the gradient is the mean of the N batch
gradients (one larger mini-batch), not a sum of per-batch scores (that would be ``taylor``).
Weights only, as paper A applies it (the official code also masks biases).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from prunecli.criteria._base import Criterion, CriterionOutput, ScoreContext

__all__ = ["Snip"]


class Snip(Criterion):
    """Normalised connection sensitivity from one calibration batch."""

    name = "snip"
    requires: ClassVar[frozenset[str]] = frozenset({"data", "grads"})
    default_batches: ClassVar[int | None] = 1

    def begin(self, ctx: ScoreContext) -> None:
        self._grad = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in ctx.params.items()}
        self._batches = 0

    def on_grads(self, ctx: ScoreContext, grads: Sequence[torch.Tensor | None]) -> None:
        for name, g in zip(ctx.params, grads, strict=True):
            if g is not None:
                self._grad[name].add_(g)

    def end_batch(self, ctx: ScoreContext, n: int) -> None:
        self._batches += 1

    def finish(self, ctx: ScoreContext) -> CriterionOutput:
        k = max(self._batches, 1)
        sens = {n: (w.detach().float() * self._grad[n] / k).abs() for n, w in ctx.params.items()}
        total = sum(s.double().sum() for s in sens.values())
        total = float(total) if float(total) > 0 else 1.0  # all-zero gradients: keep zeros, not NaN
        return CriterionOutput({n: (s.double() / total).float().cpu() for n, s in sens.items()})
