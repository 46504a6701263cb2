"""Exact unstructured pruning: remove ``k = round(r·N)`` weights per scope, ties broken by position.

A *scope* is a set of prunable weights ranked together: one layer (``--scope layer``, paper A's
``l1_unstructured``) or the union of all layers (``--scope global``, ``global_unstructured``). In each
scope exactly ``k`` weights are removed: every weight whose score is below the k-th smallest score,
plus, among the weights whose score equals it, the first ones in (layer order, flat index) order.
That is the order ``sort by (score, layer, index)`` gives, so the result is deterministic and the
achieved sparsity equals the target (docs/criteria.md).

Memory: a global scope never holds more than one layer's scores at a time. The k-th smallest score
over all layers is found by a two-pass radix select on order-preserving int32 keys of the scores
(a 65,536-bin histogram of the high 16 bits, then of the low 16 bits inside the selected bin), so
pruning a model needs only layer-sized temporaries on top of the model itself — no concatenated copy
of all scores. Scores are produced per layer by a callback (``score_of(name)``), which lets
magnitude pruning compute ``|w|`` on the fly instead of storing a second copy of the weights.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prunecli.errors import InputError
from prunecli.pruning.plan import LayerPlan, ScopePlan, UnstructuredPlan

__all__ = [
    "MagnitudeMasks",
    "Scope",
    "apply_unstructured",
    "key_value",
    "order_keys",
    "plan_scopes",
    "plan_unstructured",
    "prune_unstructured",
]

ScoreFn = Callable[[str], torch.Tensor]
MaskFn = Callable[[str, torch.Tensor], None]

_BINS = 1 << 16
_HALF = 1 << 15


@dataclass(frozen=True)
class Scope:
    """Weights ranked together, and how many of them to remove.

    Attributes:
        names: parameter names in layer order (the tie-break order between layers).
        k: number of weights to remove in the union of ``names``.
        ratio: the ratio ``k`` was derived from (reported, not used for selection).
    """

    names: tuple[str, ...]
    k: int
    ratio: float


def plan_scopes(
    sizes: Mapping[str, int],
    ratio: float,
    scope: str,
    layer_ratios: Mapping[str, float] | None = None,
) -> list[Scope]:
    """Splits the prunable weights into scopes with exact removal counts ``round(r·N)``.

    Layers with an explicit per-layer ratio (``--layer-ratio``) always form a scope of their own;
    with ``scope="global"`` the remaining layers share one scope at ``ratio``. Python's ``round``
    (half to even) is used, as ``torch.nn.utils.prune`` does, so counts match it exactly.

    Args:
        sizes: parameter name → number of weights, in layer order.
        ratio: fraction of weights to remove, in [0, 1).
        scope: ``layer`` or ``global``.
        layer_ratios: parameter name → its own ratio.

    Raises:
        InputError: a ratio outside [0, 1), an unknown scope, or a count that would remove every
            weight of a layer-scoped layer.

    Example:
        >>> plan_scopes({"a.weight": 10, "b.weight": 30}, 0.5, "global")
        [Scope(names=('a.weight', 'b.weight'), k=20, ratio=0.5)]
    """
    layer_ratios = dict(layer_ratios or {})
    for r in (ratio, *layer_ratios.values()):
        check_ratio(r)
    if scope not in ("layer", "global"):
        raise InputError(f"unknown scope {scope!r}; choose from global, layer")
    scopes: list[Scope] = []
    pooled: list[str] = []
    for name, n in sizes.items():
        if name in layer_ratios or scope == "layer":
            r = layer_ratios.get(name, ratio)
            scopes.append(Scope((name,), round(r * n), r))
        else:
            pooled.append(name)
    if pooled:
        scopes.append(Scope(tuple(pooled), round(ratio * sum(sizes[n] for n in pooled)), ratio))
    for s in scopes:
        if len(s.names) == 1 and s.k >= sizes[s.names[0]] > 0:
            raise InputError(
                f"ratio {s.ratio:g} would remove every weight of {s.names[0]!r} ({sizes[s.names[0]]} weights)",
                hint="lower the ratio for this layer (--layer-ratio) or --exclude it",
            )
    return scopes


def check_ratio(ratio: float) -> None:
    """Refuses a pruning ratio outside [0, 1)."""
    if not (0.0 <= ratio < 1.0):
        raise InputError(f"ratio {ratio:g} is outside [0, 1)", hint="pass the fraction of weights to remove, e.g. 0.5")


def order_keys(scores: torch.Tensor, name: str = "scores") -> torch.Tensor:
    """Flat int32 keys whose integer order is the float order of ``scores`` (``-0.0`` equals ``0.0``).

    The IEEE-754 bit pattern of a non-negative float, read as an integer, grows with the value; a
    negative float maps to minus its magnitude bits. Equal floats get equal keys, and the mapping
    is a handful of branch-free integer operations (no sort, no copy of the model).

    Raises:
        InputError: a score is NaN (no order exists).
    """
    bits = scores.detach().reshape(-1).to(torch.float32).view(torch.int32)
    keys = bits & 0x7FFFFFFF  # magnitude bits (a new tensor)
    if bool((keys > 0x7F800000).any()):  # above +inf's pattern: NaN
        raise InputError(f"{name} holds NaN scores", hint="recompute the scores; NaN cannot be ranked")
    sign = bits >> 31  # -1 for negative floats, 0 otherwise
    keys ^= sign
    keys -= sign  # two's complement negation where negative: key = -magnitude
    return keys


def _kth_key(keys_of: Callable[[], Iterator[torch.Tensor]], k: int) -> tuple[int, int]:
    """Radix select: (key of the k-th smallest element, 1-based; number of keys strictly below it)."""
    hist = torch.zeros(_BINS, dtype=torch.int64)
    for keys in keys_of():
        high = keys >> 16
        high += _HALF  # in [0, 65536): bincount needs non-negative values
        hist += torch.bincount(high, minlength=_BINS)
    cum = hist.cumsum(0)
    hi = int(torch.searchsorted(cum, k))
    below = int(cum[hi - 1]) if hi else 0
    hist.zero_()
    for keys in keys_of():
        inside = keys[(keys >> 16) == hi - _HALF]
        if inside.numel():
            hist += torch.bincount(inside & 0xFFFF, minlength=_BINS)
    cum = hist.cumsum(0)
    lo = int(torch.searchsorted(cum, k - below))
    below += int(cum[lo - 1]) if lo else 0
    return (hi - _HALF) * _BINS + lo, below


def _keys(name: str, weight: torch.Tensor, score_of: ScoreFn | None) -> torch.Tensor:
    """Order keys of one layer's scores; ``score_of=None`` is magnitude: the bits of ``|w|``, in one op."""
    if score_of is None:
        if weight.dtype != torch.float32:
            return order_keys(torch.abs(weight), name)
        return weight.detach().reshape(-1).view(torch.int32) & 0x7FFFFFFF
    return order_keys(_checked_scores(name, weight, score_of), name)


def _checked_scores(name: str, weight: torch.Tensor, score_of: ScoreFn) -> torch.Tensor:
    s = score_of(name)
    if tuple(s.shape) != tuple(weight.shape):
        raise InputError(
            f"scores of {name!r} have shape {list(s.shape)}, the weight has {list(weight.shape)}",
            hint="the scores belong to another model or are channel scores; use --structure channel for those",
        )
    return s


def key_value(key: int) -> float:
    """The float whose :func:`order_keys` key is ``key`` (inverse of the key mapping, for reporting)."""
    import struct

    bits = -key if key < 0 else key
    value = struct.unpack("<f", struct.pack("<I", bits & 0x7FFFFFFF))[0]
    return -value if key < 0 else value


def plan_unstructured(
    weights: Mapping[str, torch.Tensor], score_of: ScoreFn | None, scopes: Sequence[Scope]
) -> UnstructuredPlan:
    """The exact selection of every scope (threshold, ties, per-layer counts), read-only.

    The selection is the one of the module docstring: in each scope every weight scoring below the
    k-th smallest score ``t``, then the weights scoring exactly ``t`` in (layer, index) order until
    ``k`` are taken. Magnitude pruning of float32 CPU weights (``score_of=None``) plans with the
    bit-level kernel (:func:`_magnitude_plan`), whose selection is the same.

    Raises:
        InputError: scores of the wrong shape, NaN scores, or a global selection that removes every
            weight of a layer (nothing has been modified then).
    """
    scope_plans: list[ScopePlan] = []
    layers: list[LayerPlan] = []
    kernel: dict[int, _Plan] = {}
    for i, scope in enumerate(scopes):
        if scope.k <= 0:
            scope_plans.append(ScopePlan(scope.names, scope.k, scope.ratio))
            layers += [LayerPlan(n, weights[n].numel(), 0) for n in scope.names]
            continue
        if score_of is None and all(_bits_ok(weights[n]) for n in scope.names):
            kp = kernel[i] = _magnitude_plan(weights, scope)
            t, ties = kp.threshold, kp.ties
            removed = dict(kp.removed)
            known = {n: weights[n].numel() - c for n, c in removed.items()} if kp.nonzero_known else {}
        else:
            t, ties, removed = _generic_plan(weights, score_of, scope)
            known = {}
        scope_plans.append(ScopePlan(scope.names, scope.k, scope.ratio, key_value(t), ties, t))
        layers += [LayerPlan(n, weights[n].numel(), removed[n], known.get(n)) for n in scope.names]
    return UnstructuredPlan("unstructured", tuple(scope_plans), tuple(layers), kernel=kernel)


def _generic_plan(
    weights: Mapping[str, torch.Tensor], score_of: ScoreFn | None, scope: Scope
) -> tuple[int, dict[str, int], dict[str, int]]:
    """(threshold key, ties taken per layer, removed per layer) of one scope from its order keys."""
    if len(scope.names) == 1:  # one layer: compute its keys once
        name = scope.names[0]
        keys = _keys(name, weights[name], score_of)
        t, below = _kth_key(lambda keys=keys: iter((keys,)), scope.k)
        return t, {name: scope.k - below}, {name: scope.k}

    def keys_of(names: tuple[str, ...] = scope.names) -> Iterator[torch.Tensor]:
        for n in names:
            yield _keys(n, weights[n], score_of)

    t, below = _kth_key(keys_of, scope.k)
    need = scope.k - below
    ties: dict[str, int] = {}
    removed: dict[str, int] = {}
    for name, keys in zip(scope.names, keys_of(), strict=True):
        took = min(need, int(torch.count_nonzero(keys == t))) if need > 0 else 0
        need -= took
        ties[name] = took
        removed[name] = int(torch.count_nonzero(keys < t)) + took
        if removed[name] >= keys.numel():
            raise InputError(
                f"the global selection would remove every weight of {name!r} ({keys.numel()} weights)",
                hint="lower --ratio, give this layer its own --layer-ratio, or --exclude it",
            )
    return t, ties, removed


def apply_unstructured(
    weights: Mapping[str, torch.Tensor],
    score_of: ScoreFn | None,
    plan: UnstructuredPlan,
    *,
    on_mask: MaskFn | None = None,
    nonzero: dict[str, int] | None = None,
) -> dict[str, int]:
    """Zeroes the weights ``plan`` selects, in place; returns parameter name → weights removed.

    ``score_of`` must be the one the plan was made with. Scopes planned by the magnitude kernel are
    applied by it when no ``on_mask`` callback needs the masks; every other scope removes, per layer,
    the keys below the threshold and the layer's first ``ties`` keys equal to it (same selection).
    ``nonzero`` receives the non-zero counts the plan knows (see :class:`LayerPlan`).
    """
    import numpy as np

    removed: dict[str, int] = {}
    for i, scope in enumerate(plan.scopes):
        if scope.k <= 0:
            removed.update({n: 0 for n in scope.names})
            continue
        kp = plan.kernel.get(i)
        if kp is not None and on_mask is None:
            scratch = np.empty(max(weights[n].numel() for n in scope.names), dtype=np.int32)
            for n in scope.names:
                bits = weights[n].detach().reshape(-1).numpy().view(np.int32)
                _magnitude_apply(bits, kp.start, kp.picks[n], bits, scratch)
            if nonzero is not None and kp.nonzero_known:
                nonzero.update({n: weights[n].numel() - kp.removed[n] for n in scope.names})
            removed.update(kp.removed)
            continue
        assert scope.threshold_key is not None
        for name in scope.names:
            keys = _keys(name, weights[name], score_of)
            removed[name], _ = _apply(name, weights[name], keys, scope.threshold_key, scope.ties[name], on_mask,
                                      single=True)  # fmt: skip
    return removed


def prune_unstructured(
    weights: Mapping[str, torch.Tensor],
    score_of: ScoreFn | None,
    scopes: Sequence[Scope],
    *,
    on_mask: MaskFn | None = None,
    nonzero: dict[str, int] | None = None,
) -> dict[str, int]:
    """Zeroes exactly ``scope.k`` lowest-scoring weights in every scope, in place.

    :func:`plan_unstructured` then :func:`apply_unstructured`.

    Args:
        weights: parameter name → weight tensor (modified in place).
        score_of: parameter name → score tensor of the weight's shape (higher = keep); called a few
            times per layer, so it may compute scores on the fly. None ranks by magnitude ``|w|``
            (read from the float32 weights' bits; the weights must be finite, as loaded checkpoints are).
        scopes: from :func:`plan_scopes`.
        on_mask: called as ``on_mask(name, removed)`` with the boolean mask of the weights removed
            from that layer (e.g. to apply bias compensation).
        nonzero: if given, receives ``name → weights != 0 after pruning`` for the layers where the
            selection knows it without another pass (magnitude pruning whose threshold is above the
            smallest non-zero magnitudes: every kept weight is then non-zero).

    Returns:
        parameter name → number of weights removed.

    Raises:
        InputError: scores of the wrong shape, NaN scores, or a global selection that removes every
            weight of a layer (raised while planning: the weights are untouched then).

    Example:
        >>> w = {"fc.weight": model.fc.weight.data}
        >>> scopes = plan_scopes({"fc.weight": w["fc.weight"].numel()}, 0.5, "layer")
        >>> prune_unstructured(w, lambda n: w[n].abs(), scopes)
    """
    plan = plan_unstructured(weights, score_of, scopes)
    return apply_unstructured(weights, score_of, plan, on_mask=on_mask, nonzero=nonzero)


def _apply(
    name: str,
    weight: torch.Tensor,
    keys: torch.Tensor,
    t: int,
    ties: int,
    on_mask: MaskFn | None,
    *,
    single: bool,
) -> tuple[int, int]:
    """Removes keys < t and the first ``ties`` keys == t; returns (removed, ties taken).

    The weight is multiplied by the keep mask, exactly as ``torch.nn.utils.prune`` does (so a removed
    negative weight becomes ``-0.0`` there and here); ``masked_fill_`` and ``count_nonzero`` on floats
    are branchy on CPU and several times slower on unpredictable masks.
    """
    took = 0
    if ties > 0:
        keep = keys > t
        eq = (keys == t).nonzero().squeeze(1)
        keep[eq[ties:]] = True  # ties beyond the first ``ties`` (in flat order) stay
        took = min(ties, eq.numel())
    else:
        keep = keys >= t
    count = weight.numel() - int(torch.count_nonzero(keep))
    if count >= weight.numel() and not single:
        raise InputError(
            f"the global selection would remove every weight of {name!r} ({weight.numel()} weights)",
            hint="lower --ratio, give this layer its own --layer-ratio, or --exclude it",
        )
    keep = keep.view(weight.shape)
    with torch.no_grad():
        weight.mul_(keep)
    if on_mask is not None:
        on_mask(name, ~keep)
    return count, took


# --------------------------------------------------------------------------- magnitude on the weights' bits


def _bits_ok(weight: torch.Tensor) -> bool:
    """The magnitude kernel reads and writes the float32 bits in place (little-endian, contiguous, CPU)."""
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.is_contiguous() and _LITTLE_ENDIAN


_LITTLE_ENDIAN = sys.byteorder == "little"


@dataclass(frozen=True)
class _Plan:
    """Which weights of one scope magnitude pruning removes (see :func:`_magnitude_plan`)."""

    start: int
    picks: dict[str, Any]  # layer → flat indices (numpy int64) removed from the threshold bin
    removed: dict[str, int]
    nonzero_known: bool
    threshold: int  # the k-th smallest key
    ties: dict[str, int]  # layer → weights of key == threshold removed


def _magnitude_plan(weights: Mapping[str, torch.Tensor], scope: Scope) -> _Plan:
    """The exact magnitude selection of one scope in two read-only passes; same selection as the generic path.

    The key of a weight is the bit pattern of ``|w|`` (``bits & 0x7FFFFFFF``), as in :func:`_keys`.

    1. A 32,768-bin histogram of the keys' high 16 bits, read straight from the upper int16 half of
       each float (no key tensor) → the bin ``hb`` holding the k-th smallest key, and the number
       ``below`` of keys in lower bins. Every weight whose key is below ``start = hb << 16`` goes.
    2. Per layer, with int32 numpy operations (several times faster than the same torch ops here):
       ``d = key − start``; the weights of bin ``hb`` (``0 <= d < 65536``, one unsigned compare) are
       collected with their low 16 bits, and the weights with ``d < 0`` counted.

    Finally the ``k − below`` smallest collected weights in (low bits, layer, index) order — a
    stable sort of the collected low bits, collected in layer and index order — are picked too. That
    is the order of the generic path: every key below the k-th smallest, then ties by position.

    When ``hb > 0`` every kept key is at least ``1 << 16`` (not zero) and every zero weight (key 0)
    is removed, so a layer keeps exactly ``numel − removed`` non-zero weights (``nonzero_known``).

    Raises:
        InputError: a scope of several layers would lose every weight of one of them.
    """
    import numpy as np

    names = scope.names
    flats = {n: weights[n].detach().reshape(-1) for n in names}
    # One scratch buffer per kind, sized for the largest layer: per-layer temporaries would be fresh
    # allocations (page faults) every time.
    size = max(f.numel() for f in flats.values())
    scratch16 = torch.empty(size, dtype=torch.int16)
    hist = torch.zeros(_HALF, dtype=torch.int64)
    for n in names:
        if flats[n].numel():
            high = scratch16[: flats[n].numel()]  # high halves of the floats: sign + 15 key bits
            torch.bitwise_and(flats[n].view(torch.int16)[1::2], 0x7FFF, out=high)
            hist += torch.bincount(high, minlength=_HALF)
    del scratch16
    cum = hist.cumsum(0)
    hb = int(torch.searchsorted(cum, scope.k))
    below = int(cum[hb - 1]) if hb else 0
    start = hb << 16
    scratch32 = np.empty(size, dtype=np.int32)
    flags = np.empty(size, dtype=np.bool_)
    removed: dict[str, int] = {}
    found: list[tuple[str, np.ndarray, np.ndarray]] = []  # layer, flat indices in bin hb, their low 16 bits
    for n in names:
        bits = flats[n].numpy().view(np.int32)
        d = np.bitwise_and(bits, 0x7FFFFFFF, out=scratch32[: bits.size])
        np.subtract(d, start, out=d)
        idx = np.flatnonzero(np.less(d.view(np.uint32), 1 << 16, out=flags[: bits.size]))
        found.append((n, idx, d[idx].astype(np.uint16)))
        removed[n] = int(np.count_nonzero(np.less(d, 0, out=flags[: bits.size])))
    picks = {n: np.empty(0, dtype=np.int64) for n in names}
    ties = {n: 0 for n in names}
    need = scope.k - below  # >= 1: bin hb holds the k-th smallest key
    lows = np.concatenate([f[2] for f in found])
    order = np.argsort(lows, kind="stable")[:need]  # stable: ties stay in (layer, index) order
    t_low = int(lows[order[-1]])
    chosen = np.sort(order)
    offsets = np.cumsum([0] + [len(f[1]) for f in found])
    bounds = np.searchsorted(chosen, offsets)
    for i, (n, idx, low) in enumerate(found):
        local = chosen[bounds[i] : bounds[i + 1]] - offsets[i]
        picks[n] = idx[local]
        removed[n] += int(picks[n].size)
        ties[n] = int(np.count_nonzero(low[local] == t_low))
    if len(names) > 1:
        for n in names:
            if removed[n] >= flats[n].numel():
                raise InputError(
                    f"the global selection would remove every weight of {n!r} ({flats[n].numel()} weights)",
                    hint="lower --ratio, give this layer its own --layer-ratio, or --exclude it",
                )
    return _Plan(start, picks, removed, hb > 0, start + t_low, ties)


def _magnitude_apply(src: Any, start: int, picks: Any, out: Any, scratch: Any) -> None:
    """``out`` = the int32 bits ``src`` with every weight of key < ``start`` and the ``picks`` removed.

    A removed weight keeps only its sign bit: exactly what multiplying by a 0/1 mask gives (``-0.0``
    included). ``out`` may be ``src`` (in place); ``scratch`` is an int32 buffer of at least its size.
    """
    import numpy as np

    d = np.bitwise_and(src, 0x7FFFFFFF, out=scratch[: src.size])
    np.subtract(d, start, out=d)
    np.right_shift(d, 31, out=d)  # -1 where removed, 0 where kept
    np.bitwise_and(d, 0x7FFFFFFF, out=d)
    np.invert(d, out=d)  # 0x80000000 where removed, all ones where kept
    np.bitwise_and(src, d, out=out)
    if picks.size:
        out[picks] &= np.int32(-0x80000000)


class MagnitudeMasks:
    """Magnitude pruning planned on read-only weights and applied while they are written out.

    For inputs that are memory-mapped straight from the checkpoint file (``prune``'s fast path): the
    weights are never modified in place, so the file's pages are never copied; each pruned tensor is
    masked into a scratch buffer just before it is written (:meth:`transform`). The bytes are those
    :func:`prune_unstructured` produces in place (same plan, same masking code).
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], plans: Sequence[_Plan]) -> None:
        self._plans = {n: p for p in plans for n in p.picks}
        self.removed = {n: c for p in plans for n, c in p.removed.items()}
        self.nonzero = {n: weights[n].numel() - c for p in plans if p.nonzero_known for n, c in p.removed.items()}
        size = max((weights[n].numel() for n in self._plans), default=0)
        # two output buffers: the writer hashes one while the next tensor is masked into the other
        self._out = (torch.empty(size, dtype=torch.int32), torch.empty(size, dtype=torch.int32))
        self._work = torch.empty(size, dtype=torch.int32)
        self._turn = 0

    @classmethod
    def from_plan(cls, weights: Mapping[str, torch.Tensor], plan: UnstructuredPlan) -> MagnitudeMasks | None:
        """The masks of a magnitude plan; None when a scope was not planned by the kernel, or a layer's
        non-zero count would need the masked weights (see ``nonzero``)."""
        plans = []
        for i, scope in enumerate(plan.scopes):
            if scope.k > 0:
                if i not in plan.kernel:
                    return None
                plans.append(plan.kernel[i])
        if not all(p.nonzero_known for p in plans):
            return None
        return cls(weights, plans)

    def transform(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Tensor name → function giving its masked version to write.

        The result lives in one of two buffers used in turn: it stays valid until the next-but-one
        call (the writer must finish hashing it before then).
        """
        return {n: functools.partial(self._masked, n) for n in self._plans}

    def _masked(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        import numpy as np

        plan = self._plans[name]
        out = self._out[self._turn][: tensor.numel()]
        self._turn ^= 1
        src = tensor.detach().reshape(-1).numpy().view(np.int32)
        _magnitude_apply(src, plan.start, plan.picks[name], out.numpy(), self._work.numpy())
        return out.view(torch.float32).view(tensor.shape)
