"""``bnscale``: |γ| of the BatchNorm that follows each layer (network slimming, Liu et al. 2017).

The BatchNorm is the one that directly consumes the layer's output (traced, see ``_trace``). Layers
with no BatchNorm after them (transformer linears, classifier heads) have no γ: by default they fall
back to the L2 norm of each output channel's filter and the stats say so (``source``); with
``-p fallback=error`` such a layer is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from prunecli.criteria._base import Criterion, CriterionOutput, ScoreContext
from prunecli.errors import InputError

__all__ = ["BnScale", "BnScaleOptions"]


@dataclass(frozen=True)
class BnScaleOptions:
    fallback: Literal["l2", "error"] = field(
        default="l2", metadata={"help": "Layers without a BatchNorm after them: filter L2 norm, or an error."}
    )


class BnScale(Criterion):
    """|γ| per output channel (data-free; one traced forward pass finds the BatchNorms)."""

    name = "bnscale"
    Options = BnScaleOptions
    requires: ClassVar[frozenset[str]] = frozenset()
    granularity = "channel"

    def finish(self, ctx: ScoreContext) -> CriterionOutput:
        follow = ctx.followers()
        modules = dict(ctx.model.named_modules())
        scores, notes = {}, {}
        for (lname, _layer), (pname, w) in zip(ctx.layers.items(), ctx.params.items(), strict=True):
            bn = modules.get(follow[lname].norm or "")
            gamma = getattr(bn, "weight", None) if bn is not None else None
            if gamma is not None:
                scores[pname] = gamma.detach().abs().float().cpu()
                notes[pname] = {"source": f"bn:{follow[lname].norm}"}
            elif self.options.fallback == "error":
                raise InputError(
                    f"bnscale: layer {lname!r} is not followed by an affine BatchNorm",
                    hint="use -p fallback=l2, or a criterion that scores every layer",
                )
            else:
                f = w.detach().float().reshape(w.shape[0], -1)
                scores[pname] = torch.linalg.vector_norm(f, dim=1).cpu()
                notes[pname] = {"source": "l2"}
        return CriterionOutput(scores, notes=notes)
