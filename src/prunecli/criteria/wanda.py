"""``wanda``: |W_ij| · ‖X_j‖₂, weight magnitude times the norm of its input feature (Sun et al. 2023).

``‖X_j‖₂`` is taken over every sample (and token / output position) of the calibration set. For a
convolution the input "feature" of weight ``W[o,c,u,v]`` is the im2col row ``(c,u,v)``: its squared
norm is ``Σ_{s,p} U[s,(c,u,v),p]²``, computed as the weight gradient of a one-output convolution of
``x²`` with an all-ones output gradient (zero padding contributes nothing, as in the forward pass).
Forward passes only; no gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from prunecli.criteria._base import Criterion, CriterionOutput, ScoreContext, at_least_float32
from prunecli.criteria._conv import conv_weight_stat

__all__ = ["Wanda"]


class Wanda(Criterion):
    """Pruning by weights and activations (calibration forward passes only)."""

    name = "wanda"
    requires: ClassVar[frozenset[str]] = frozenset({"data"})
    default_batches: ClassVar[int | None] = 10

    def begin(self, ctx: ScoreContext) -> None:
        self._sq: dict[str, torch.Tensor] = {}
        for layer, pname in zip(ctx.layers.values(), ctx.params, strict=True):
            self.hook(layer.register_forward_hook(self._capture(pname)))

    def _capture(self, pname: str) -> Any:
        def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = at_least_float32(args[0].detach())
            if isinstance(m, nn.Linear):
                sq = x.reshape(-1, x.shape[-1]).square().sum(0, dtype=torch.float64)
            else:  # (1, C, *k): Σ over samples and output positions of the squared im2col entries
                ones = torch.ones((out.shape[0], 1, *out.shape[2:]), dtype=x.dtype, device=x.device)
                sq = conv_weight_stat(m, x.square(), ones, out_channels=1, groups=1)[0].double()
            self._sq[pname] = self._sq[pname] + sq if pname in self._sq else sq

        return hook

    def reduce_state(self, reduce: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
        self._sq = reduce(self._sq)

    def finish(self, ctx: ScoreContext) -> CriterionOutput:
        scores = {}
        for layer, (pname, w) in zip(ctx.layers.values(), ctx.params.items(), strict=True):
            w = w.detach().double()
            sq = self._sq.get(pname)
            if sq is None:
                sq = torch.zeros(w.shape[1:], dtype=torch.float64, device=w.device)
            if isinstance(layer, nn.Linear):
                norm = sq.sqrt().unsqueeze(0)
            else:  # input channels of group gr feed output channels of group gr
                g = layer.groups
                norm = sq.sqrt().reshape(g, w.shape[1], *w.shape[2:]).repeat_interleave(w.shape[0] // g, dim=0)
            scores[pname] = (w.abs() * norm).float().cpu()
        return CriterionOutput(scores)
