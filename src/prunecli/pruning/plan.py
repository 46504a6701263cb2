"""Pruning plans: what a prune run will remove, as plain frozen data, computed before anything is removed.

A plan is the decision of a pruning engine separated from its execution, so it can be shown
(``prune --dry-run``), tested and serialised (:meth:`to_json`, deterministic: sorted keys, no
floats that depend on the machine beyond the scores themselves) before it is applied.

* :class:`UnstructuredPlan` (unstructured and N:M): per scope the layers ranked together, the
  number ``k`` of weights removed, the score threshold (the k-th smallest score; weights below it
  go, ties at it go in (layer, index) order) and the count removed from each layer. For N:M every
  layer is its own scope with ``k = numel·(m−n)/m`` and no threshold (the choice is per group of m).
* :class:`ChannelPlan`: the dependency groups that lose channels, each with the positions it keeps
  (dense indices per slice), the layer widths before and after, and params/MACs before and after.

``prune`` adds the parameters and MACs before and after to :meth:`summary` (``metrics.plan``); a
channel plan measures them itself (its trial run through the safety net builds the pruned shapes).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ChannelGroup", "ChannelPlan", "LayerPlan", "ScopePlan", "UnstructuredPlan"]


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [f for f in dataclasses.fields(value) if f.metadata.get("json", True)]
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf", "-inf", "nan": JSON has no such numbers
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class _Json:
    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-able builtins (dataclasses → dicts, tuples → lists)."""
        return _jsonable(self)

    def to_json(self) -> str:
        """Deterministic JSON (sorted keys, compact)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)


# ------------------------------------------------------------------------------------------------ unstructured, N:M


@dataclass(frozen=True)
class LayerPlan(_Json):
    """One pruned layer of an unstructured/N:M plan.

    Attributes:
        name: parameter name (``conv1.weight``).
        numel: weights in the layer.
        removed: weights the plan removes (zeros that the ranking puts first count too).
        nonzero: non-zero weights after pruning when the plan knows it without applying (magnitude
            pruning whose threshold is above the smallest non-zero magnitude), else None.
    """

    name: str
    numel: int
    removed: int
    nonzero: int | None = None

    @property
    def sparsity(self) -> float:
        """Fraction of the layer's weights the plan removes."""
        return self.removed / max(self.numel, 1)


@dataclass(frozen=True)
class ScopePlan(_Json):
    """Weights ranked together, their removal count and threshold.

    Attributes:
        names: parameter names in layer order (the tie-break order between layers).
        k: weights removed in the union of ``names``.
        ratio: the ratio ``k`` was derived from.
        threshold: the k-th smallest score (weights scoring below it go, then ties in (layer, index)
            order); None when ``k == 0`` or for N:M.
        ties: per layer, how many weights scoring exactly ``threshold`` it loses.
        threshold_key: ``threshold`` as its order key (:func:`prunecli.pruning.unstructured.order_keys`),
            the exact value the selection compares with.
    """

    names: tuple[str, ...]
    k: int
    ratio: float
    threshold: float | None = None
    ties: Mapping[str, int] = field(default_factory=dict)
    threshold_key: int | None = None


@dataclass(frozen=True)
class UnstructuredPlan(_Json):
    """What unstructured (or N:M) pruning removes; see the module docstring.

    Attributes:
        structure: ``unstructured`` or ``N:M``.
        scopes: the scopes in ranking order.
        layers: every pruned layer (layers skipped by N:M are absent).
        skipped: N:M layers whose rows do not split into groups of m.
        kernel: scope index → the magnitude kernel's private selection (picks per layer), so that
            applying the plan needs no second selection pass; not part of the JSON.
    """

    structure: str
    scopes: tuple[ScopePlan, ...]
    layers: tuple[LayerPlan, ...]
    skipped: tuple[str, ...] = ()
    kernel: Mapping[int, Any] = field(default_factory=dict, compare=False, repr=False, metadata={"json": False})

    @property
    def removed(self) -> dict[str, int]:
        """Parameter name → weights removed."""
        return {lp.name: lp.removed for lp in self.layers}

    def summary(self) -> dict[str, Any]:
        """The plan as ``prune --dry-run`` reports it (``metrics.plan``)."""
        return {
            "structure": self.structure,
            "layers": {
                lp.name: {"numel": lp.numel, "removed": lp.removed, "sparsity": lp.sparsity} for lp in self.layers
            },
            "scopes": [
                {"layers": list(s.names), "k": s.k, "ratio": s.ratio, "threshold": s.threshold} for s in self.scopes
            ],
            "skipped": list(self.skipped),
        }


# ------------------------------------------------------------------------------------------------ channels


@dataclass(frozen=True)
class ChannelGroup(_Json):
    """One dependency group that loses channels.

    Attributes:
        root: module name of the group's root (the conv/linear, or the parameter, it is built from).
        handler: ``out`` (the root's output channels) or ``in`` (its input channels: attention groups
            are rooted at the output projection's input, where heads are contiguous).
        members: conv/linear modules whose output channels are in the group.
        slices: equal slices the group splits into (grouped convs, GroupNorm, attention heads); the
            same positions are removed from each.
        width: positions per slice before pruning.
        kept: positions kept in every slice (dense indices, ascending).
        ratio: the group's own ratio (layer scope or ``--layer-ratio``), None when counted globally.
        block: root channels per position: 1, or ``head_dim`` when the positions are whole attention
            heads (``prune --heads``; ``width`` is then the head count and ``kept`` the heads kept).
        attention: the attention module whose heads the positions are (whole-head pruning), else "".
    """

    root: str
    handler: str
    members: tuple[str, ...]
    slices: int
    width: int
    kept: tuple[int, ...]
    ratio: float | None
    block: int = 1
    attention: str = ""

    @property
    def removed_indices(self) -> list[int]:
        """Indices of the root dimension removed (over all slices), as Torch-Pruning takes them.

        Position ``p`` of slice ``s`` is root channels ``[(s·width + p)·block, (s·width + p + 1)·block)``.
        """
        kept = set(self.kept)
        drop = [i for i in range(self.width) if i not in kept]
        b = self.block
        return [(s * self.width + i) * b + j for s in range(self.slices) for i in drop for j in range(b)]

    @property
    def channels(self) -> int:
        """Root channels before pruning (all slices)."""
        return self.width * self.slices * self.block

    @property
    def channels_kept(self) -> int:
        """Root channels kept (all slices)."""
        return len(self.kept) * self.slices * self.block


@dataclass(frozen=True)
class ChannelPlan(_Json):
    """What channel pruning removes; see the module docstring.

    Attributes:
        groups: the groups that lose channels, in pruning order.
        widths_before, widths_after: conv/linear module → output channels (all layers / those that change).
        frozen: module classes frozen by the safety net (no group touching them is pruned).
        retried_after: the forward failures that made the safety net retry.
        stats: ``groups_planned``, ``groups_unscored``, ``groups_skipped``, ``groups_unmappable``.
        params_before, params_after, macs_before, macs_after: of the dense and the pruned model (the
            pruned model's zeros are the dense model's zeros in the kept weights, so the ``*_nonzero``
            counts of a real run come from the written tensors).
        positions: prunable module → output positions per channel for one sample (MACs = Σ positions ·
            weight size; channel pruning does not change them).
        notes: report-only facts of the planning (target ratio, scope, score reduction, attention
            modules fixed or kept, the modules excluded and the exclude globs that matched nothing).
        trial: the planning trial's pruned tensors (references), which :func:`apply_channels` swaps in
            when the model is unchanged; not part of the JSON.
    """

    groups: tuple[ChannelGroup, ...]
    widths_before: Mapping[str, int]
    widths_after: Mapping[str, int]
    frozen: tuple[str, ...] = ()
    retried_after: tuple[str, ...] = ()
    stats: Mapping[str, int] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    positions: Mapping[str, int] = field(default_factory=dict)
    notes: Mapping[str, Any] = field(default_factory=dict)
    trial: Any = field(default=None, compare=False, repr=False, metadata={"json": False})

    def heads(self) -> dict[str, dict[str, int]]:
        """Whole-head pruning: attention module → heads before and kept (every attention, pruned or not)."""
        out = {name: {"heads_before": n, "heads": n} for name, n in self.notes.get("heads_before", {}).items()}
        for g in self.groups:
            if g.attention:
                out[g.attention] = {"heads_before": g.width, "heads": len(g.kept)}
        return dict(sorted(out.items()))

    def summary(self) -> dict[str, Any]:
        """The plan as ``prune --dry-run`` reports it (``metrics.plan``)."""
        return {
            "structure": "channel",
            "layers": {
                n: {"channels_before": w, "channels": self.widths_after[n]}
                for n, w in sorted(self.widths_before.items())
                if n in self.widths_after
            },
            "groups": [
                {"root": g.root, "members": list(g.members), "width": g.channels, "kept": g.channels_kept}
                for g in self.groups
            ],
            **({"heads": self.heads()} if self.notes.get("heads") else {}),
            "params_before": self.params_before,
            "params": self.params_after,
            "macs_before": self.macs_before,
            "macs": self.macs_after,
        }
