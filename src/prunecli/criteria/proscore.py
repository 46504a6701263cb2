"""``proscore``: IPPRO's PROscore, a projective-space view of one gradient step (paper D).

See docs/criteria.md. For each output channel ``i`` of a target layer with filter ``F_i`` (the BN's ``(γ_i, β_i)``
when a BatchNorm follows the conv/linear layer, else the layer's row ``W[i]`` plus ``b_i``; docs/criteria.md):

```
PROscore_i = ‖F_i − λ ∇_{F_i}L‖ / | ‖F_i‖ − λ ∂L/∂D_i |          (eq. 4)
∂L/∂D_i   = Σ_{batch, spatial} (∂L/∂ψ(x))_i · x_i                  (eq. 5, ψ(x) = Dx − D̄x + σ(x))
```

where ``x`` is the target's output (σ's input) and ``∂L/∂ψ`` the gradient arriving at σ's output — σ
being the element-wise activation that directly consumes the target's output (identity when none
does, e.g. a BN feeding a residual add). No module surgery: a forward hook clones ``x`` (σ may be in
place) and a tensor hook on σ's output accumulates ``Σ g·x`` per channel [DERIVED]. Gradients are
averaged over batches (mean gradient, so λ's meaning does not depend on the data size) [OURS], with
``λ = 0.1`` by default [OURS; the paper gives no default]. A zero filter scores 0 (prune first); a
denominator that changes sign is clamped at ``eps`` and counted (docs/criteria.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from prunecli.criteria._base import Criterion, CriterionOutput, ScoreContext
from prunecli.tracing import Follow

__all__ = ["ProScore", "ProScoreOptions"]

_LOG = logging.getLogger("prunecli")


@dataclass(frozen=True)
class ProScoreOptions:
    lambda_: float = field(
        default=0.1, metadata={"key": "lambda", "help": "Step size λ of the virtual gradient step (mean gradients)."}
    )
    eps: float = field(default=1e-12, metadata={"help": "Floor of the denominator |‖F‖ − λ ∂L/∂D|."})

    def __post_init__(self) -> None:
        if not self.lambda_ > 0 or self.lambda_ == float("inf"):
            raise ValueError(f"lambda must be a positive number, got {self.lambda_}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")


@dataclass
class _Target:
    layer: str  # prunable parameter name the score belongs to
    module: nn.Module  # BN or the layer itself
    module_name: str
    params: list[nn.Parameter]  # [γ, β] or [W, (b)]
    is_norm: bool
    channel_dim: int
    follow: Follow


class ProScore(Criterion):
    """PROscore per output channel (IPPRO); high = keep."""

    name = "proscore"
    Options = ProScoreOptions
    requires: ClassVar[frozenset[str]] = frozenset({"data", "grads"})
    granularity = "channel"

    def begin(self, ctx: ScoreContext) -> None:
        follow = ctx.followers()
        modules = dict(ctx.model.named_modules())
        self._targets: list[_Target] = []
        for (lname, layer), pname in zip(ctx.layers.items(), ctx.params, strict=True):
            f = follow[lname]
            bn = modules[f.norm] if f.norm else None
            if bn is not None and getattr(bn, "weight", None) is not None and getattr(bn, "bias", None) is not None:
                t = _Target(pname, bn, f.norm, [bn.weight, bn.bias], True, 1, f)
            else:
                params = [layer.weight] + ([layer.bias] if getattr(layer, "bias", None) is not None else [])
                dim = -1 if isinstance(layer, nn.Linear) else 1
                t = _Target(pname, layer, lname, params, False, dim, Follow(act=f.act if bn is None else None))
            self._targets.append(t)
        dev = ctx.device
        self._dD = {t.layer: torch.zeros(t.params[0].shape[0], dtype=torch.float64, device=dev) for t in self._targets}
        self._gF = {t.layer: torch.zeros_like(self._filters(t), dtype=torch.float64) for t in self._targets}
        self._batches = 0
        self._pending: dict[tuple[int, int], tuple[str, torch.Tensor, int]] = {}
        self._current: dict[int, tuple[str, torch.Tensor, int] | None] = {}
        self._register(modules)

    @staticmethod
    def _filters(t: _Target) -> torch.Tensor:
        """``F`` as a (C, N) matrix: rows (γ_i, β_i) or vec(W[i]) with b_i appended."""
        cols = [p.detach().reshape(p.shape[0], -1) for p in t.params]
        return torch.cat(cols, dim=1).double()

    def _accumulate(self, layer: str, x: torch.Tensor, dim: int) -> Any:
        def hook(g: torch.Tensor) -> None:
            dims = [d for d in range(g.ndim) if d != dim % g.ndim]
            self._dD[layer].add_((g * x).sum(dims, dtype=torch.float64))

        return hook

    def _register(self, modules: dict[str, nn.Module]) -> None:
        hooked_acts: set[str] = set()
        for t in self._targets:
            act_name = t.follow.act
            if act_name is None or not t.follow.act_owned:

                def out_hook(m: nn.Module, a: tuple, out: torch.Tensor, _t: _Target = t) -> None:
                    if not out.requires_grad:
                        return
                    x = out.detach().clone()
                    if _t.follow.act is None:  # σ = identity: ψ's output is the target's output
                        out.register_hook(self._accumulate(_t.layer, x, _t.channel_dim))
                    else:
                        self._pending[(id(out), out._version)] = (_t.layer, x, _t.channel_dim)

                self.hook(t.module.register_forward_hook(out_hook))
            if act_name is not None and act_name not in hooked_acts:
                hooked_acts.add(act_name)
                owned = {id(modules[act_name]): t} if t.follow.act_owned else {}
                self._hook_act(modules[act_name], owned)

    def _hook_act(self, act: nn.Module, owned: dict[int, _Target]) -> None:
        def pre(m: nn.Module, args: tuple) -> None:
            inp = args[0]
            if id(m) in owned:
                t = owned[id(m)]
                self._current[id(m)] = (t.layer, inp.detach().clone(), t.channel_dim)
            else:
                self._current[id(m)] = self._pending.pop((id(inp), inp._version), None)

        def post(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            entry = self._current.pop(id(m), None)
            if entry is not None and out.requires_grad:
                out.register_hook(self._accumulate(*entry))

        self.hook(act.register_forward_pre_hook(pre))
        self.hook(act.register_forward_hook(post))

    def grad_targets(self, ctx: ScoreContext) -> Sequence[torch.Tensor]:
        return [p for t in self._targets for p in t.params]

    def on_grads(self, ctx: ScoreContext, grads: Sequence[torch.Tensor | None]) -> None:
        it = iter(grads)
        for t in self._targets:
            cols = []
            for p in t.params:
                g = next(it)
                cols.append((g if g is not None else torch.zeros_like(p)).detach().reshape(p.shape[0], -1))
            self._gF[t.layer].add_(torch.cat(cols, dim=1).double())

    def end_batch(self, ctx: ScoreContext, n: int) -> None:
        self._batches += 1
        self._pending.clear()

    def reduce_state(self, reduce: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
        # ∂L/∂D comes from tensor hooks on local activations; ∂L/∂F arrives already summed (sync_grads)
        self._dD = reduce(self._dD)

    def finish(self, ctx: ScoreContext) -> CriterionOutput:
        lam, k = self.options.lambda_, max(self._batches, 1)
        scores, notes, crossed = {}, {}, 0
        for t in self._targets:
            F = self._filters(t)
            norm = torch.linalg.vector_norm(F, dim=1)
            num = torch.linalg.vector_norm(F - lam * self._gF[t.layer] / k, dim=1)
            den = norm - lam * self._dD[t.layer] / k
            score = num / den.abs().clamp_min(self.options.eps)
            score = torch.where(norm == 0, torch.zeros_like(score), score)
            n_cross = int((den < 0).sum())
            crossed += n_cross
            scores[t.layer] = score.float().cpu()
            notes[t.layer] = {
                "target": t.module_name if t.is_norm else "self",
                "act": t.follow.act or "identity",
                "crossings": n_cross,
            }
        if crossed:
            _LOG.warning(
                "proscore: %d channel(s) have λ·∂L/∂D > ‖F‖ (denominator changed sign); lower -p lambda=", crossed
            )
        return CriterionOutput(scores, notes=notes)
