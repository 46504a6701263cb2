"""``biascomp``: bias-compensated importance and the optimal bias shift of every weight (paper E).

docs/bias-compensation.md [DERIVED]. Removing ``w_ij`` changes output ``i`` of sample ``s`` by ``−w_ij x_{s,j}``; a bias
shift ``δ`` adds ``δ``. With per-sample sensitivity weights ``a_{s,i}`` (``g²`` of the sum-reduced loss's
output gradient by default; ``Σ_k J_{s,k,i}²`` with ``-p sensitivity=jacobian``):

```
δ*_ij = argmin_δ Σ_s a_{s,i} (δ − w_ij x_{s,j})² = w_ij M1_ij / A_i
I_ij  = min_δ (…)                              = w_ij² (M2_ij − M1_ij² / A_i)
A = Σ_s a_s,   M1 = Σ_s a_s x_sᵀ,   M2 = Σ_s a_s (x_s²)ᵀ        (docs/bias-compensation.md, float64 accumulators)
```

For convolutions every output position is a sample and ``M1``/``M2`` are the convolution's weight
gradient with ``a = (∂L/∂y)²`` in place of ``∂L/∂y`` (of ``x`` and ``x²``, docs/bias-compensation.md). Bias-free layers
feeding a BatchNorm are compensated through its running mean (``prune --compensate bias`` applies
it); bias-free layers without one either get a new bias (``-p missing_bias=add``, default) or are
ranked without compensation, ``I⁰ = w² M2`` (``skip``). ``A_i = 0`` gives ``δ* = 0, I = 0`` (docs/bias-compensation.md).
The shifts are stored beside the scores (``NAME::bias_shift``); each row's shifts add up exactly at
first order (docs/bias-compensation.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from prunecli.criteria._base import Criterion, CriterionOutput, ScoreContext, at_least_float32
from prunecli.criteria._conv import conv_weight_stat

__all__ = ["BiasComp", "BiasCompOptions"]

_MAX_EXACT_OUTPUTS = 16  # docs/bias-compensation.md: exact Jacobian for ≤ 16 outputs, Hutchinson otherwise


@dataclass(frozen=True)
class BiasCompOptions:
    sensitivity: Literal["loss", "jacobian", "hutchinson"] = field(
        default="loss",
        metadata={"help": "a = g² of the summed loss (one backward), Σ_k J² of the outputs (exact up to 16 "
                  "outputs, Hutchinson beyond), or a Hutchinson estimate."},
    )  # fmt: skip
    probes: int = field(default=16, metadata={"help": "Rademacher probes for the Hutchinson estimate."})
    missing_bias: Literal["add", "skip"] = field(
        default="add",
        metadata={"help": "Layers with neither bias nor BatchNorm: compensate via a new bias (add) or rank by "
                  "the uncompensated I⁰ = w²·M2 (skip)."},
    )  # fmt: skip
    precision: Literal["float32", "float64"] = field(
        default="float32",
        metadata={"help": "Per-batch products (accumulators are always float64)."},
    )

    def __post_init__(self) -> None:
        if self.probes < 1:
            raise ValueError(f"probes must be at least 1, got {self.probes}")


class BiasComp(Criterion):
    """Importance of each weight after the optimal compensation of its output's bias, plus that shift."""

    name = "biascomp"
    Options = BiasCompOptions
    requires: ClassVar[frozenset[str]] = frozenset({"data", "grads"})
    granularity = "weight"
    objective_reduction: ClassVar[Literal["mean", "sum"]] = "sum"  # per-sample a = g², exact on any shard
    sync_grads: ClassVar[bool] = False  # gradients w.r.t. layer outputs: per-sample, local to each rank

    def begin(self, ctx: ScoreContext) -> None:
        follow = ctx.followers()
        self._names = list(ctx.params)
        self._layers = list(ctx.layers.values())
        self._compensate: dict[str, str] = {}
        for (lname, layer), pname in zip(ctx.layers.items(), self._names, strict=True):
            if getattr(layer, "bias", None) is not None:
                self._compensate[pname] = "bias"
            elif follow[lname].norm:
                self._compensate[pname] = f"bn:{follow[lname].norm}"
            else:
                self._compensate[pname] = "add" if self.options.missing_bias == "add" else "none"
        # float64 accumulators, created from the first batch's products (no zero-filled buffers)
        self._A: dict[str, torch.Tensor] = {}
        self._M1: dict[str, torch.Tensor] = {}
        self._M2: dict[str, torch.Tensor] = {}
        self._x: dict[str, torch.Tensor] = {}
        self._y: dict[str, torch.Tensor] = {}
        self._a: dict[str, torch.Tensor] = {}
        self._scale = 1.0
        self._batch = 0
        self._ctx = ctx
        for (lname, layer), pname in zip(ctx.layers.items(), self._names, strict=True):
            self.hook(layer.register_forward_hook(self._capture(pname, follow[lname].inplace_after)))

    def _capture(self, pname: str, inplace_after: bool) -> Any:
        def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if not out.requires_grad:
                return None
            self._x[pname] = args[0].detach()
            self._y[pname] = out
            # the output is modified in place downstream (e.g. inplace ReLU): hand the model a copy
            # so that ∂L/∂y stays the gradient w.r.t. the pre-activation value
            return out.clone() if inplace_after else None

        return hook

    def objectives(self, logits: torch.Tensor, targets: torch.Tensor) -> Iterable[torch.Tensor]:
        logits = at_least_float32(logits)
        mode = self.options.sensitivity
        k = logits.shape[-1]
        self._scale = 1.0
        if mode == "loss":
            return [F.cross_entropy(logits, targets, reduction="sum")]
        if mode == "jacobian" and k <= _MAX_EXACT_OUTPUTS:
            return [logits[..., i].sum() for i in range(k)]
        g = torch.Generator().manual_seed(self._ctx.seed * 1_000_003 + self._batch)
        r = self.options.probes
        self._scale = 1.0 / r
        # draw the probes of the whole global batch and keep this rank's rows (rank::world_size), so a
        # torchrun run uses exactly the probes of the one-process run
        ctx = self._ctx
        rows = max(ctx.batch_rows, logits.shape[0])
        full = torch.randint(0, 2, (r, rows, *logits.shape[1:]), generator=g) * 2 - 1
        probes = full[:, ctx.rank :: ctx.world_size].to(logits)
        return [(v * logits).sum() for v in probes]

    def grad_targets(self, ctx: ScoreContext) -> Sequence[torch.Tensor]:
        self._order = [n for n in self._names if n in self._y]
        return [self._y[n] for n in self._order]

    def on_grads(self, ctx: ScoreContext, grads: Sequence[torch.Tensor | None]) -> None:
        for name, g in zip(self._order, grads, strict=True):
            if g is None:
                continue
            a = g.detach().square()
            if self._scale != 1.0:
                a.mul_(self._scale)
            if name in self._a:
                self._a[name].add_(a)
            else:
                self._a[name] = a

    def end_batch(self, ctx: ScoreContext, n: int) -> None:
        dtype = torch.float64 if self.options.precision == "float64" else torch.float32
        for name, layer in zip(self._names, self._layers, strict=True):
            a = self._a.pop(name, None)
            x = self._x.pop(name, None)
            if a is None or x is None:
                continue
            a, x = a.to(dtype), x.to(dtype)
            if isinstance(layer, nn.Linear):
                a2 = a.reshape(-1, a.shape[-1])
                xs = x.reshape(-1, x.shape[-1])
                total = a2.sum(0)
                m1, m2 = a2.t() @ xs, a2.t() @ xs.square()
            else:
                # per-batch sums in the product precision like M1/M2 (a float64 sum would first copy
                # the whole activation to float64); the running totals are float64
                total = a.sum([d for d in range(a.ndim) if d != 1])
                # two weight-gradient calls: measured faster than one call on cat([x, x²]) (oneDNN picks a
                # slow kernel for the doubled channel count; benchmarks/score.md)
                m1, m2 = conv_weight_stat(layer, x, a), conv_weight_stat(layer, x.square(), a)
            _accumulate(self._A, name, total)
            _accumulate(self._M1, name, m1)
            _accumulate(self._M2, name, m2)
        self._y.clear()
        self._x.clear()
        self._a.clear()
        self._batch += 1

    def reduce_state(self, reduce: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
        self._A, self._M1, self._M2 = reduce(self._A), reduce(self._M1), reduce(self._M2)

    def finish(self, ctx: ScoreContext) -> CriterionOutput:
        scores, shifts, notes = {}, {}, {}
        for name, w in ctx.params.items():
            w = w.detach().double()
            if name not in self._A:  # the layer never saw data (unused branch): nothing to rank by
                scores[name], shifts[name] = torch.zeros(w.shape), torch.zeros(w.shape)
                notes[name] = {"compensate": self._compensate[name]}
                continue
            A = self._A[name].reshape(-1, *([1] * (w.ndim - 1)))
            M1, M2 = self._M1[name], self._M2[name]
            live = A > 0
            inv = torch.where(live, A, torch.ones_like(A)).reciprocal_().mul_(live)  # 1/A, 0 where A = 0
            if self._compensate[name] == "none":
                imp = M2.mul(w.square())
                delta = torch.zeros_like(w)
            else:
                ratio = M1 * inv  # the sensitivity-weighted mean of the input: δ* = w·M1/A
                imp = M2.sub(M1.mul_(ratio)).clamp_min_(0).mul_(w.square())  # w²(M2 − M1²/A); M1 is spent
                delta = ratio.mul_(w)
            imp.mul_(live)
            scores[name] = imp.float().cpu()
            shifts[name] = delta.float().cpu()
            notes[name] = {"compensate": self._compensate[name]}
        self._A.clear(), self._M1.clear(), self._M2.clear()
        return CriterionOutput(scores, extras={"bias_shift": shifts}, notes=notes)


def _accumulate(acc: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """``acc[name] += value`` in float64; the first value becomes the accumulator."""
    if name in acc:
        acc[name].add_(value)
    else:
        acc[name] = value.to(torch.float64, copy=True)
