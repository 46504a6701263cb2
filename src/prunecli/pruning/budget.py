"""Pruning to a budget (``prune --target macs=…|params=…|latency=…``): the ratio is searched for, not given.

Every engine's cost — MACs or parameters after pruning — is a non-increasing step function of its
ratio (a larger ratio never keeps a channel or a weight that a smaller one removes: layer scope keeps
``floor(C·(1−r))`` per group, global scope the top ``floor(T·(1−r))`` of one ranking, unstructured the
top ``N − round(r·N)`` per scope). :func:`search` bisects the ratio for the smallest one whose plan is
at or under the budget, so the achieved value is the closest at-or-under value the plan can give;
``--round-to``/``--min-channels`` may make it coarser, which the caller reports.

Channel plans are costed without model surgery per step (:class:`ChannelCost`): the dependency groups
are found once, each is probed once (one position removed per slice, the parameter shapes compared,
reverted), which gives every parameter dimension as ``dense − δ·(removed positions of its group)``.
A plan's parameters are then ``Σ Π dims`` and its MACs ``Σ positions · numel(weight)`` over the
prunable layers (:mod:`prunecli.tracing`'s convention), computed from the kept counts alone.

``latency`` bisects the MAC budget, measuring the pruned model at each step with the same harness as
``eval --benchmark`` (warm-up, median of repeated runs, the thread count fixed by the run); the clock
is injectable (:data:`Clock`) so that the search is tested deterministically.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunecli.errors import InputError

if TYPE_CHECKING:
    from prunecli.pruning.groups import CandidateMemo

__all__ = [
    "Budget",
    "ChannelCost",
    "Clock",
    "Search",
    "measure_latency",
    "plan_channels_to",
    "resolve_budget",
    "search",
]

log = logging.getLogger("prunecli")

Clock = Callable[[], float]
"""Seconds, monotonic (``time.perf_counter``); tests inject a fake one."""

CLOCK: Clock = time.perf_counter
"""The clock :func:`measure_latency` reads when none is passed (tests replace it with a fake one)."""

TOLERANCE = 0.01
"""The achieved value should be within this fraction under the target (issue 16); coarser is reported."""

_UNIT_NAMES = {"macs": "MACs", "params": "parameters", "latency": "latency"}


@dataclass(frozen=True)
class Budget:
    """A resolved ``--target``: its kind, the value as given, the absolute amount, and the dense model's."""

    kind: str
    value: str
    absolute: float
    dense: float

    def record(self) -> dict[str, Any]:
        """The record's ``target``: kind, value as given, absolute amount, fraction of dense."""
        return {
            "kind": self.kind,
            "value": self.value,
            "absolute": self.absolute,
            "fraction": self.absolute / self.dense,
        }

    def achieved(self, value: float) -> dict[str, Any]:
        """The record's ``achieved``: absolute and as a fraction of the dense model's."""
        return {"absolute": value, "fraction": value / self.dense if self.dense else 0.0}


def resolve_budget(kind: str, value: str, dense: float) -> Budget:
    """The budget of ``--target KIND=VALUE`` for a dense model whose amount of ``kind`` is ``dense``.

    Raises:
        InputError: an absolute amount at or above the dense model's (nothing to prune).
    """
    from prunecli.requests import target_amount

    amount, fraction = target_amount(kind, value)
    absolute = amount * dense if fraction else amount
    if absolute >= dense:
        raise InputError(
            f"--target {kind}={value} is not below the dense model's {_fmt(dense)} {_UNIT_NAMES[kind]}",
            hint=f"e.g. --target {kind}=0.5 for half of it",
        )
    return Budget(kind, value, absolute, dense)


def _fmt(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{unit}"
    return f"{x:.4g}"


@dataclass
class Search:
    """The result of :func:`search`: the ratio, its cost, and every step tried (``{"ratio", "value"}``)."""

    ratio: float
    value: float
    steps: list[dict[str, Any]] = field(default_factory=list)


def search(
    cost: Callable[[float], float],
    budget: Budget,
    *,
    lo: float = 0.0,
    hi: float = 1.0 - 1e-9,
    iters: int = 48,
    close: float = 0.0,
    what: str = "",
) -> Search:
    """The smallest ratio in ``[lo, hi]`` whose ``cost`` is at or under ``budget.absolute`` (bisection).

    ``cost`` must not increase with the ratio (module docstring). Stops after ``iters`` halvings, or
    as soon as a feasible cost is within ``close`` (a fraction) under the budget.

    Raises:
        InputError: even ``hi`` (everything prunable removed, down to ``--min-channels``) is over the
            budget; the message names the smallest reachable value.
    """
    steps: list[dict[str, Any]] = []

    def step(r: float) -> float:
        value = float(cost(r))
        steps.append({"ratio": r, "value": value})
        return value

    top = step(hi)
    if top > budget.absolute:
        frac = top / budget.dense
        raise InputError(
            f"--target {budget.kind}={budget.value} is unreachable{what}: the smallest reachable is "
            f"{_fmt(top)} {_UNIT_NAMES[budget.kind]} ({frac:.1%} of dense)",
            hint="frozen, excluded and unprunable layers stay; raise the target or --exclude fewer layers",
        )
    best, best_value = hi, top
    for _ in range(iters):
        if close and best_value >= budget.absolute * (1 - close):
            break
        mid = (lo + best) / 2
        value = step(mid)
        if value <= budget.absolute:
            best, best_value = mid, value
        else:
            lo = mid
    return Search(best, best_value, steps)


# ------------------------------------------------------------------------------------------------ channels


class ChannelCost:
    """Params and MACs of a channel plan from its kept counts alone (module docstring).

    Args: as :func:`prunecli.pruning.channel.plan_channels` (``exclude``: module names or globs whose
    output channels stay; ``layer_ratios``: globs with their own fixed ratio; ``freeze``: module classes
    whose groups are left out, as the safety net leaves them; ``memo``: candidates shared with the plans).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        example_input: torch.Tensor,
        channel_scores: Mapping[str, torch.Tensor] | None,
        weight_scores: Mapping[str, torch.Tensor] | None,
        scope: str,
        layer_ratios: Mapping[str, float],
        exclude: Sequence[str],
        round_to: int | None,
        min_channels: int,
        heads: bool = False,
        freeze: Collection[type] = (),
        memo: CandidateMemo | None = None,
    ) -> None:
        from prunecli import surgery
        from prunecli.prunable import match_any, prunable_layers
        from prunecli.pruning.apply import GroupFailed, apply_groups
        from prunecli.pruning.channel import _build
        from prunecli.pruning.groups import GroupSearch
        from prunecli.pruning.importance import resolve_scores
        from prunecli.pruning.plan import ChannelGroup
        from prunecli.tracing import trace_layers

        model.eval()
        self.scope, self.round_to, self.min_channels = scope, round_to, min_channels
        scores = resolve_scores(model, channel_scores, weight_scores)
        names = [n for n, _ in model.named_modules() if n]
        excluded = {n for n in names if match_any(n, list(exclude))}
        dg = _build(model, example_input)
        # scope "global" marks the groups without a --layer-ratio (ratio None); layer scope fills in r per step
        frozen = [n for n, m in model.named_modules() if n and type(m) in freeze]
        found = GroupSearch(model, scores, 0.0, "global", layer_ratios, excluded, heads=heads).candidates(
            dg, frozen, memo
        )
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.dims: dict[str, list[tuple[int, int, int]]] = {}  # param → (dim, group, δ per removed position)
        # every candidate stays in the ranking, as in the plan (its global threshold counts all of them); a group
        # whose probe fails or removes nothing changes no parameter here, so it costs nothing and is not filled
        self.candidates = list(found.candidates)
        self.live: set[int] = set()
        snap = surgery.snapshot(model)
        for gi, c in enumerate(found.candidates):
            probe = ChannelGroup(
                c.root, c.handler, c.members, c.slices, c.size, tuple(range(1, c.size)), None, c.block, c.attention
            )
            try:
                applied = apply_groups(dg, model, [probe])
            except GroupFailed:
                applied = None
            if applied is not None and applied.pruned:
                self.live.add(gi)
                for n, p in model.named_parameters():
                    for d, (a, b) in enumerate(zip(self.shapes[n], p.shape, strict=True)):
                        if a != b:
                            self.dims.setdefault(n, []).append((d, gi, a - b))
            surgery.revert(model, snap)
        trace = trace_layers(model, tuple(example_input.shape[1:]))
        positions = trace.positions if trace is not None else {}
        self.macs_of = {f"{n}.weight": positions.get(n, 0) for n in prunable_layers(model)}

    def keeps(self, ratio: float) -> list[int]:
        """Kept positions per slice of every candidate group at ``ratio`` (as the plan counts them)."""
        from dataclasses import replace

        from prunecli.pruning.counts import keep_counts

        groups = self.candidates
        if self.scope == "layer":
            groups = [replace(c, ratio=ratio) if c.ratio is None else c for c in groups]
        return keep_counts(groups, ratio, self.round_to, self.min_channels)

    def _size(self, name: str, keeps: Sequence[int]) -> int:
        dims = list(self.shapes[name])
        for d, gi, delta in self.dims.get(name, ()):
            dims[d] -= delta * (self.candidates[gi].size - keeps[gi])
        # a probe's per-position delta extrapolates linearly; where a group does not shrink a dim linearly
        # (mambaout's fc1 group, coupled through a split) it overshot to negative sizes: no dim is under 0
        return math.prod(max(s, 0) for s in dims)

    def numel(self, keeps: Sequence[int]) -> dict[str, int]:
        """Parameter name → its size with ``keeps`` kept positions per group."""
        return {n: self._size(n, keeps) for n in self.shapes}

    def _weight(self, kind: str, name: str) -> int:
        return 1 if kind == "params" else self.macs_of.get(name, 0)

    def cost(self, kind: str, ratio: float) -> int:
        """``params`` (all parameters) or ``macs`` (prunable layers) of the plan at ``ratio``."""
        return self.amount(kind, self.keeps(ratio))

    def amount(self, kind: str, keeps: Sequence[int]) -> int:
        """``params`` or ``macs`` with ``keeps`` kept positions per group."""
        sizes = self.numel(keeps)
        return sum(self._weight(kind, n) * k for n, k in sizes.items())

    def fill(self, kind: str, ratio: float, budget: float) -> tuple[dict[tuple[str, str], int], int]:
        """Channels added back to the plan at ``ratio`` while the budget allows: (root, handler) → kept, amount.

        One threshold (or one uniform ratio) moves in steps as large as its widest group's channel —
        a ViT's residual stream is one group, so its next channel is percents of the model. The slack
        under the budget is filled with the next channels that fit: in the global ranking's order
        (global scope), or for the groups nearest to their next channel first (layer scope). Groups
        with their own ``--layer-ratio`` are left as asked.
        """
        keeps = self.keeps(ratio)
        current = self.amount(kind, keeps)
        touched: dict[int, list[str]] = {}
        for n, entries in self.dims.items():
            for _, gi, _ in entries:
                touched.setdefault(gi, []).append(n)
        free = [i for i, c in enumerate(self.candidates) if c.ratio is None]
        live = [i for i in free if i in self.live]
        if self.scope == "global":
            imps = torch.cat([self.candidates[i].imp for i in free]) if free else torch.zeros(0)
            owner = [i for i in free for _ in range(self.candidates[i].size)]
            order = [owner[j] for j in torch.sort(-imps, stable=True).indices.tolist()]
        else:
            rest = {i: self.candidates[i].size * (1.0 - ratio) % 1.0 for i in live}
            ranked = sorted(live, key=lambda i: -rest[i])  # round robin: one channel per group per pass
            order = ranked * max((self.candidates[i].size for i in free), default=0)
        seen = [0] * len(keeps)
        dead: set[int] = set()
        changed: dict[tuple[str, str], int] = {}
        for gi in order:
            seen[gi] += 1
            c = self.candidates[gi]
            step = self.round_to // math.gcd(self.round_to, c.unit) if self.round_to and self.round_to > 1 else 1
            behind = self.scope == "global" and seen[gi] <= keeps[gi]  # a position the threshold already keeps
            if gi not in self.live or gi in dead or behind or keeps[gi] + step > c.size:
                continue
            trial = [*keeps]
            trial[gi] += step
            names = touched.get(gi, [])
            delta = sum(self._weight(kind, n) * (self._size(n, trial) - self._size(n, keeps)) for n in names)
            if current + delta <= budget:  # a group's next channel only grows as others grow: a miss is final
                keeps, current = trial, current + delta
                changed[(c.root, c.handler)] = keeps[gi]
            else:
                dead.add(gi)
            if len(dead) == len(live):
                break
        return changed, current

    def dense(self, kind: str) -> int:
        """The dense model's amount of ``kind``."""
        sizes = {n: math.prod(s) for n, s in self.shapes.items()}
        return sum(sizes.values()) if kind == "params" else sum(p * sizes[n] for n, p in self.macs_of.items())


def plan_channels_to(
    model: nn.Module, kind: str, value: str, **options: Any
) -> tuple[Any, Budget, list[dict[str, Any]]]:
    """The channel plan of ``model`` at ``--target KIND=VALUE`` (``macs`` or ``params``): (plan, budget, steps).

    ``options``: the keyword arguments of :func:`~prunecli.pruning.channel.plan_channels` other than
    ``ratio`` and ``keeps``. The ratio is bisected on :class:`ChannelCost` (no surgery per step), the
    slack is filled (:meth:`ChannelCost.fill`), and the model is planned once.

    The cost model cannot see the safety net: a module class whose forward breaks once pruned is frozen
    by the real plan, and its groups keep every channel. When the real plan then misses the budget —
    over it, or under it by more than :data:`TOLERANCE` where the cost model was within it — the cost
    model is built again with those classes frozen from the start, and the search repeated on it: the
    frozen part is accounted for at the price of one more cost model, not of a trial pruning per step.
    Every plan shares one enumeration of the groups per frozen set
    (:data:`~prunecli.pruning.groups.CandidateMemo`): Torch-Pruning's group closure is most of a plan's time.

    Only should that still miss, or the target be unreachable with those classes frozen (a class need
    not break at every ratio: resnest's ``SplitAttn`` does at some), is the search repeated on real
    plans (each one a trial pruning): above the cost model's ratio when the plan is over, below it
    when under. Real plans need not shrink as the ratio grows (a frozen class takes back every channel
    of its groups; ghostnet: 21 % of the MACs at 0.5, 52 % at 0.99), so the search stays on the side
    of the ratio that the miss points to rather than bisecting all of ``[0, 1)``. The plan's
    ``notes["target_ratio"]`` is the ratio found.

    Raises:
        InputError: the target is unreachable (names the smallest reachable value) or not below the dense model.
    """
    from prunecli.pruning.channel import plan_channels

    options = {**options, "memo": {}}  # one enumeration of the groups per frozen set, for every plan below
    cost = ChannelCost(model, **options)
    budget = resolve_budget(kind, value, cost.dense(kind))
    plan, ratio, predicted, steps = _plan_on_cost(model, cost, kind, budget, options)
    if _missed(_amount(plan, kind), predicted, budget) and plan.frozen:
        log.info("the safety net froze %s: costing the plan again with their groups left out", ", ".join(plan.frozen))
        freeze = {type(m) for m in model.modules() if type(m).__name__ in plan.frozen}
        try:
            refrozen = ChannelCost(model, freeze=freeze, **options)
            plan, ratio, predicted, more = _plan_on_cost(model, refrozen, kind, budget, {**options, "freeze": freeze})
            steps += [{**s, "frozen": True} for s in more]
        except InputError:  # unreachable with the class frozen, but it need not break at every ratio
            log.info("the target is unreachable with %s frozen at every ratio", ", ".join(plan.frozen))
    achieved = _amount(plan, kind)
    if _missed(achieved, predicted, budget):
        log.warning(
            "the real plan (%s %s) differs from the cost model's (%s)%s: searching again on real plans",
            _fmt(achieved),
            _UNIT_NAMES[kind],
            _fmt(predicted),
            f"; the safety net froze {', '.join(plan.frozen)}" if plan.frozen else "",
        )

        def real(r: float) -> int:
            return _amount(plan_channels(model, ratio=r, **options), kind)

        over = achieved > budget.absolute
        side = {"lo": ratio, "hi": _feasible_above(real, budget, ratio)} if over else {"hi": ratio}
        again = search(real, budget, iters=12, close=TOLERANCE / 2, what=" once the safety net froze modules", **side)
        steps += [{**s, "planned": True} for s in again.steps]
        plan = plan_channels(model, ratio=again.ratio, **options)
    return plan, budget, steps


def _plan_on_cost(
    model: nn.Module, cost: ChannelCost, kind: str, budget: Budget, options: Mapping[str, Any]
) -> tuple[Any, float, float, list[dict[str, Any]]]:
    """The plan at the ratio (plus the fill) that ``cost`` puts at the budget: (plan, ratio, predicted value, steps)."""
    from prunecli.pruning.channel import plan_channels

    found = search(lambda r: cost.cost(kind, r), budget)
    keeps, filled = cost.fill(kind, found.ratio, budget.absolute)
    if keeps:
        found.steps.append({"ratio": found.ratio, "value": filled, "filled": len(keeps)})
    plan = plan_channels(model, ratio=found.ratio, keeps=keeps, **options)
    return plan, found.ratio, (filled if keeps else found.value), found.steps


def _missed(achieved: float, predicted: float, budget: Budget) -> bool:
    """The real plan is over the budget, or under it by more than :data:`TOLERANCE` where the cost model was not."""
    floor = budget.absolute * (1 - TOLERANCE)
    return achieved > budget.absolute or achieved < floor <= predicted


def _feasible_above(real: Callable[[float], float], budget: Budget, lo: float, points: int = 8) -> float:
    """A ratio above ``lo`` whose real plan is within the budget: the top of ``[lo, 1)``, else the first of a grid.

    Real plans are not monotone in the ratio (:func:`plan_channels_to`): where the top is over the budget
    (ghostnet: 52 % of the MACs at 0.99, 21 % at 0.5), the ratios ``lo + (1 − lo)·k/points`` are tried in
    order and the first within the budget bounds the bisection. None within it: the top, which
    :func:`search` then reports as unreachable.
    """
    top = 1.0 - 1e-9
    if real(top) <= budget.absolute:
        return top
    for k in range(1, points):
        r = lo + (1.0 - lo) * k / points
        if real(r) <= budget.absolute:
            return r
    return top


def _amount(plan: Any, kind: str) -> int:
    return int(plan.macs_after if kind == "macs" else plan.params_after)


# ------------------------------------------------------------------------------------------------ latency


def measure_latency(
    model: nn.Module,
    input_size: Sequence[int],
    device: torch.device,
    *,
    batch_size: int,
    warmup: int = 3,
    iters: int = 10,
    clock: Clock | None = None,
) -> dict[str, float]:
    """Median and spread of one batch's latency: ``eval --benchmark``'s harness with an injectable clock.

    As :func:`prunecli.evaluation.benchmark_model`: random inputs, ``warmup`` untimed runs, then the
    median of ``iters`` timed runs, the GPU synchronised around each. Returns ``latency_ms`` (median),
    ``spread_ms`` (max − min of the timed runs) and ``iters``.
    """
    from prunecli.device import input_to, model_to

    clock = clock or CLOCK
    model_to(model.eval(), device)
    x = input_to(torch.randn(batch_size, *input_size), device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        sync()
        for _ in range(iters):
            t0 = clock()
            model(x)
            sync()
            times.append(clock() - t0)
    times.sort()
    return {"latency_ms": times[len(times) // 2] * 1e3, "spread_ms": (times[-1] - times[0]) * 1e3, "iters": iters}
