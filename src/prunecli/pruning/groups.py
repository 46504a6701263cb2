"""Channel pruning, step 3: which dependency groups exist, which may be pruned, and their importance.

Torch-Pruning (through :mod:`prunecli.depgraph`) traces the model once and groups every set of
coupled channels: a conv's output channels together with its BatchNorm, every consumer's input
channels, residual additions (a whole residual stage is one group), depthwise convs,
concatenations, ``Flatten→Linear`` (channel ``c`` of the last conv owns the contiguous block
``[c·HW, (c+1)·HW)`` of ``fc1``'s inputs), unwrapped parameters such as a ViT's
``pos_embed``/``cls_token``/LayerScale ``gamma``. Each group is pruned as a unit, so the network
stays consistent. Groups are the unit of ``ratio``.

A group is a candidate unless it touches a frozen module (safety net), removes output channels of
an excluded module (the classifier head by default) or of an attention module of unknown layout, or
has no scored member. timm attention modules with a fused ``qkv`` Linear and a ``num_heads``
attribute are re-rooted at the output projection's input, where heads are contiguous slices, so
the same head dimensions go from every head in q, k and v (Torch-Pruning's ``prune_head_dims``).
With ``heads`` (``prune --heads``) the positions of such a group are the attention's *heads* instead
(Torch-Pruning's ``prune_num_heads``): one position per head, a block of ``head_dim`` root channels,
whose importance is the mean of the group's channel importance over the head's channels — the mean,
over the head's q, k and v rows, of the criterion's channel score divided by the ``qkv`` layer's mean
score (:mod:`~prunecli.pruning.importance`). The mean, not the sum, keeps a head's score on the scale
of a channel's, so global ranking can put heads and channels in one list.
``layer_ratios`` apply to a group when a pattern matches a conv/linear member whose output
channels are in the group (the first matching pattern wins).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from prunecli.errors import InputError
from prunecli.prunable import match_any
from prunecli.pruning.counts import Counted
from prunecli.pruning.importance import ROOT_TYPES, BadGroup, ScoreImportance, is_scored_member
from prunecli.registry import class_key

__all__ = ["Candidate", "GroupSearch", "attention_modules", "is_out", "short", "under"]

log = logging.getLogger("prunecli")

_HEAD_ATTRS = ("num_heads", "heads", "n_heads", "num_attention_heads")


def short(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters) for logs and reports."""
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{exc.__class__.__name__}: {text}"


def is_out(dg: Any, item: Any) -> bool:
    """The group item removes output channels of its module."""
    return bool(dg.is_out_channel_pruning_fn(item.dep.handler))


def under(name: str, roots: Sequence[str]) -> bool:
    """``name`` is one of ``roots`` or a submodule of one."""
    return any(name == r or name.startswith(r + ".") for r in roots)


def attention_modules(model: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """(fused-qkv attention modules by name, names of other modules that hold a head count).

    A module that holds a head count but contains a fused-qkv attention (davit's ``SpatialBlock`` stores
    ``num_heads`` for its ``WindowAttention`` child) is a block around a handled attention, not an
    attention of unknown layout: counting it as one would keep every output channel under it, MLPs included.
    """
    fused, holders = {}, []
    for name, m in model.named_modules():
        heads = next((getattr(m, a) for a in _HEAD_ATTRS if isinstance(getattr(m, a, None), int)), None)
        if heads is None or isinstance(heads, bool) or heads < 1:
            continue
        qkv = getattr(m, "qkv", None)
        if (
            isinstance(qkv, nn.Linear)
            and isinstance(getattr(m, "num_heads", None), int)
            and qkv.out_features % (3 * heads) == 0
        ):
            fused[name] = m
        else:
            holders.append(name)
    from prunecli.depgraph import TIED_HEADS

    modules = dict(model.named_modules())
    other = [
        n
        for n in holders
        if not any(n == "" or f.startswith(n + ".") for f in fused) and class_key(modules[n]) not in TIED_HEADS
    ]
    return fused, other


def _all_groups(dg: Any, ignored: Sequence[nn.Module]) -> Iterator[Any]:
    """Torch-Pruning's ``DependencyGraph.get_all_groups``, except that a root whose group cannot be
    built (its index mapping raises on some op chains) is skipped instead of ending the enumeration, and
    that the index mappings are computed once for all roots (:func:`prunecli.depgraph.static_widths`)."""
    from prunecli.depgraph import GroupTooLarge, static_widths

    ignored_set = {id(m) for m in [*ignored, *dg.IGNORED_LAYERS_IN_TRACING]}
    visited: set[int] = set()
    with static_widths(dg):  # nothing is pruned while the groups are enumerated
        for m in list(dg.module2node):
            if id(m) in ignored_set or id(m) in visited or not isinstance(m, ROOT_TYPES):
                continue
            pruner = dg.get_pruner_of_module(m)
            if pruner is None or pruner.get_out_channels(m) is None:
                continue
            try:
                group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
            except Exception as exc:  # Torch-Pruning internals; the group is just not pruned
                say = log.warning if isinstance(exc, GroupTooLarge) else log.debug
                say("cannot build the group of %s, its channels stay: %s", dg._module2name.get(m, "?"), short(exc))
                visited.add(id(m))
                continue
            outs = [it.dep.target.module for it in group if dg.is_out_channel_pruning_fn(it.dep.handler)]
            visited.update(id(o) for o in outs)
            if not any(id(o) in ignored_set for o in outs):
                yield group


def _slices(dg: Any, group: Any, n: int, in_groups: Mapping[Any, int], out_groups: Mapping[Any, int]) -> int:
    """Equal slices of a group's ``n`` positions, so that every grouped member loses as much per group (0: none).

    A member with ``g`` channel groups (a grouped conv, GroupNorm, attention heads) that sees the whole
    group — or copies of it, as ``qkv`` does — cuts it into ``g`` slices. One that sees only a
    contiguous part of it (a chunk of a split: Res2NeXt's grouped 3×3 convs each read a quarter of
    ``conv1``'s output) has groups of its own width ``size / g`` in the group's channel units. Slices
    are as wide as the largest width that divides all of these.
    """
    widths = []
    for it in group:
        module, out = it.dep.target.module, is_out(dg, it)
        g = (out_groups if out else in_groups).get(module, 1)
        if g <= 1:
            continue
        if len(it.idxs) >= n:
            if n % g:
                return 0
            widths.append(n // g)
            continue
        pruner = dg.get_pruner_of_module(module)
        size = pruner.get_out_channels(module) if out else pruner.get_in_channels(module)
        if not isinstance(size, int) or size % g:
            return 0
        widths.append(size // g)
    if not widths:
        return 1
    width = math.gcd(*widths)
    return n // width if n % width == 0 else 0


@dataclass(frozen=True)
class Candidate(Counted):
    """A group that may lose channels: its root (module name and handler kind) and scored members."""

    root: str = ""
    handler: str = "out"
    members: tuple[str, ...] = ()
    attention: str = ""  # whole-head pruning: the attention module whose heads the positions are


@dataclass(frozen=True)
class Found:
    """Result of :meth:`GroupSearch.candidates`: the candidates in graph order, and what was left out."""

    candidates: list[Candidate]
    unscored: int
    skipped: int


CandidateMemo = dict[tuple[str, ...], Found]
"""What :meth:`GroupSearch.candidates` found for one dense model, by frozen module names.

Candidates are plain data (names, importances), independent of the graph object they were found in,
so plans of the same dense model with the same scores and options (a ``--target`` search) share them.
A group's ``ratio`` is stored as its ``--layer-ratio`` or None, and layer scope's ratio is filled in
per plan.
"""


class GroupSearch:
    """Finds the candidate groups of one dependency graph (module docstring).

    Args:
        model: the model the graph was built from.
        scores: per-output-channel scores (None: filter L2 norms).
        ratio, scope, layer_ratios: the counting options (a group's own ratio, or None when counted globally).
        excluded: module names whose output channels stay.
        heads: fused-qkv attention groups count whole heads (module docstring), not head dimensions.

    Raises:
        InputError: ``heads`` on a model without fused-qkv attention (a CNN): nothing to remove heads from,
            and pruning channels instead would not be what was asked.
    """

    def __init__(
        self,
        model: nn.Module,
        scores: Mapping[str, torch.Tensor] | None,
        ratio: float,
        scope: str,
        layer_ratios: Mapping[str, float],
        excluded: set[str],
        heads: bool = False,
    ) -> None:
        self.model, self.scores = model, scores
        self.ratio, self.scope, self.layer_ratios, self.excluded = ratio, scope, dict(layer_ratios), excluded
        self.names = {m: n for n, m in model.named_modules()}
        self.attn, self.other_attn = attention_modules(model)
        self.heads = heads
        if heads and not self.attn:
            other = f" (its attention {self.other_attn[0]!r} has another layout)" if self.other_attn else ""
            raise InputError(
                f"--heads: the model has no attention with a fused qkv and num_heads to remove heads from{other}",
                hint="drop --heads to prune its channels",
            )
        self.proj_of = {m.proj: n for n, m in self.attn.items() if isinstance(getattr(m, "proj", None), nn.Module)}

    def candidates(self, dg: Any, frozen: Sequence[str], memo: CandidateMemo | None = None) -> Found:
        """Every prunable group of ``dg`` with its importance; frozen modules are touched by none.

        ``memo``: candidates found before for the same dense model and options (:data:`CandidateMemo`);
        Torch-Pruning's group closure is most of a plan's time, and a search plans the same model many times.
        """
        key = tuple(frozen)
        found = memo.get(key) if memo is not None else None
        if found is None:
            found = self._find(dg, frozen)
            if memo is not None:
                memo[key] = found
        if self.scope != "layer":
            return found
        counted = [c if c.ratio is not None else replace(c, ratio=self.ratio) for c in found.candidates]
        return Found(counted, found.unscored, found.skipped)

    def _find(self, dg: Any, frozen: Sequence[str]) -> Found:
        """:meth:`candidates` without the memo; a group's ``ratio`` is its ``--layer-ratio`` or None."""
        model = self.model
        from prunecli.depgraph import tied_heads

        num_heads = {m.qkv: int(m.num_heads) for m in self.attn.values()}
        ties = tied_heads(model)
        tied = {getattr(m, "proj", None) for m in ties}
        param_names = {p: n for n, p in model.named_parameters()}
        in_groups: dict[nn.Module, int] = {}
        out_groups: dict[nn.Module, int] = {**num_heads, **dict(ties.values())}
        for m in model.modules():
            pruner = dg.get_pruner_of_module(m)
            if pruner is None or (isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.out_channels):
                continue
            if (g := pruner.get_in_channel_groups(m)) > 1:
                in_groups[m] = g
            if (g := pruner.get_out_channel_groups(m)) > 1:
                out_groups.setdefault(m, g)

        def member_name(module: Any) -> str:
            return param_names.get(module, "") if isinstance(module, nn.Parameter) else self.names.get(module, "")

        # frozen (after a broken forward): no group may touch the module, in or out;
        # attention of unknown layout and excluded modules: their output channels stay.
        keep_out = [*self.other_attn]
        ignored = [m for n, m in model.named_modules() if n and (n in self.excluded or under(n, [*frozen, *keep_out]))]
        importance = ScoreImportance(self.names, self.scores)
        found: list[Candidate] = []
        unscored = skipped = 0
        for group in _all_groups(dg, ignored):
            handler = "out"
            if (
                num_heads
                and any(is_out(dg, it) and it.dep.target.module in num_heads for it in group)
                and not any(is_out(dg, it) and it.dep.target.module in tied for it in group)
            ):  # a stream group that holds tied heads (depgraph.TIED_HEADS) keeps its root: heads are its slices
                group = self._reroot_attention(dg, group)
                handler = "in"
            if group is None or not self._allowed(dg, group, member_name, frozen, keep_out):
                skipped += 1
                continue
            try:
                imp = importance(group)
            except BadGroup:
                skipped += 1
                continue
            if imp is None:
                unscored += 1
                continue
            out_names = tuple(self.names[it.dep.target.module] for it in group if is_scored_member(it))
            root = group[0].dep.target.module
            if handler == "in" and self.heads:
                head = self._heads(root, imp, out_names)
                if head is None:
                    skipped += 1
                else:
                    found.append(head)
                continue
            slices = _slices(dg, group, len(imp), in_groups, out_groups)
            if not slices or len(imp) % slices or len(imp) // slices <= 1:
                skipped += 1
                continue
            size = len(imp) // slices
            found.append(
                Candidate(
                    size=size,
                    slices=slices,
                    imp=imp.view(slices, -1).mean(0),
                    ratio=self._group_ratio(out_names),
                    root=self.names.get(root, "?"),
                    handler=handler,
                    members=out_names,
                )
            )
        return Found(found, unscored, skipped)

    def _heads(self, root: nn.Module, imp: torch.Tensor, out_names: tuple[str, ...]) -> Candidate | None:
        """The whole-head candidate of an attention group rooted at ``proj``'s input (None: not head-prunable)."""
        name = self.proj_of.get(root)
        if name is None:
            return None
        attn = self.attn[name]
        heads = int(attn.num_heads)
        if heads <= 1 or len(imp) % heads or getattr(attn, "head_dim", None) != len(imp) // heads:
            # one head cannot be removed (one is always kept); without a head_dim attribute that forward
            # reads, a smaller num_heads would change the width of every head instead of their count
            return None
        return Candidate(
            size=heads,
            slices=1,
            imp=imp.view(heads, -1).mean(1),
            ratio=self._group_ratio(out_names),
            block=len(imp) // heads,
            root=self.names.get(root, "?"),
            handler="in",
            members=out_names,
            attention=name,
        )

    def _allowed(self, dg: Any, group: Any, member_name: Any, frozen: Sequence[str], keep_out: Sequence[str]) -> bool:
        for it in group:
            name = member_name(it.dep.target.module)
            if not name:
                continue
            if under(name, frozen):
                return False
            if is_out(dg, it) and (name in self.excluded or under(name, keep_out)):
                return False
        return True

    def _reroot_attention(self, dg: Any, group: Any) -> Any:
        """Roots an attention group at the output projection's input, where heads are contiguous slices."""
        down = None
        for item in group:
            if isinstance(item.dep.target.module, ROOT_TYPES) and dg.is_in_channel_pruning_fn(item.dep.handler):
                down = item
        if down is None:
            return None
        return dg.get_pruning_group(down.dep.target.module, down.dep.handler, down.idxs)

    def _group_ratio(self, out_names: Sequence[str]) -> float | None:
        for pattern, r in self.layer_ratios.items():
            if any(match_any(n, [pattern]) for n in out_names):
                return float(r)
        return None


def graph_error(exc: BaseException) -> InputError:
    """The error for a model whose dependency graph Torch-Pruning cannot build."""
    return InputError(
        f"Torch-Pruning cannot build the dependency graph of this model ({short(exc)})",
        hint="prune it unstructured (--structure unstructured) instead",
    )
