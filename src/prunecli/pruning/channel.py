"""Channel pruning: remove whole output channels through Torch-Pruning's dependency graph (DepGraph).

API (called by :func:`prunecli.api.prune.prune` for ``--structure channel``)::

    from prunecli.pruning.channel import apply_channels, plan_channels, prune_channels

    plan = plan_channels(
        model,                       # timm model, float32, eval mode; left as it is
        example_input=x,             # a (1, C, H, W) tensor on the model's device, for tracing
        ratio=0.3,                   # fraction of channels removed, in [0, 1)
        channel_scores=None,         # {"layer1.0.conv1.weight": Tensor[C_out]} from a channel criterion, or
        weight_scores=None,          # {"layer1.0.conv1.weight": Tensor[W.shape]} from a weight criterion
        scope="layer",               # "layer" | "global"
        layer_ratios={"layer4.*": 0.5},  # glob → ratio, overrides ``ratio`` for matching groups
        exclude=None,                # globs of modules whose OUTPUT channels stay; None = the classifier head
        round_to=None,               # kept channel counts become multiples of this
        min_channels=1,              # never keep fewer channels in a group
        heads=False,                 # attention loses whole heads (num_heads shrinks) instead of head dims
    )
    plan.groups, plan.widths_after, plan.params_after, plan.macs_after   # see prunecli.pruning.plan
    structure = apply_channels(model, plan, example_input=x)   # prunes IN PLACE; manifest.structure
    result = prune_channels(model, example_input=x, ratio=0.3)  # both, plus the metrics of a prune run

How it works — one module per step:

1. :mod:`~prunecli.pruning.importance`: scores → one importance per channel (filter L2 norm without
   scores; weight scores are summed per filter; a group's members are mean-normalised and averaged).
2. :mod:`~prunecli.pruning.groups`: the dependency groups (one per set of coupled channels), which may
   be pruned (not excluded, not frozen, scored), attention re-rooted at the output projection.
3. :mod:`~prunecli.pruning.counts`: ``floor(C·(1−r))`` per group (or a global ranking), ``round_to``,
   ``min_channels``; the top positions survive, ties to the lower index.
4. :mod:`~prunecli.pruning.apply`: the groups are pruned in order, the surviving dense indices recorded;
   :mod:`~prunecli.pruning.splits`: split sizes that blocks store follow their pruned layers.
5. :mod:`~prunecli.pruning.safety`: the pruned model must still run; a module class whose forward
   breaks is frozen and the plan is made again.

Planning therefore prunes the model once as a trial (the only way to know that the forward still
works), measures the result (widths, params, MACs) and reverts it (tensors are swapped back, nothing
is copied; the plan keeps references to the trial's pruned tensors). :func:`apply_channels` swaps the
trial's result back in when the model is still the one planned on, and otherwise rebuilds the graph
and prunes exactly the plan's groups with their recorded indices.

The structure (see :mod:`prunecli.surgery`) records, for every module that changed, the new tensor
shapes and changed number-valued attributes, plus ``channels``: for every pruned module
``{"out": {"kept": [...dense indices...], "dense": C}, "in": {...}}`` (only the dims that were pruned),
which ``restore`` uses to find the pruned filters in the dense parent.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from prunecli import surgery
from prunecli.errors import InputError
from prunecli.prunable import classifier_modules, match_any
from prunecli.pruning.apply import Applied, apply_groups, fix_attention
from prunecli.pruning.counts import keep_counts, top
from prunecli.pruning.groups import CandidateMemo, GroupSearch, attention_modules, graph_error
from prunecli.pruning.importance import (
    ROOT_TYPES,
    ScoreImportance,
    channel_scores_from_weights,
    resolve_scores,
)
from prunecli.pruning.plan import ChannelGroup, ChannelPlan
from prunecli.pruning.safety import Retries, output_shape, run_checked, with_safety_net
from prunecli.pruning.splits import fix_splits

__all__ = [
    "ChannelPruneResult",
    "ScoreImportance",
    "apply_channels",
    "channel_metrics",
    "channel_scores_from_weights",
    "plan_channels",
    "prune_channels",
]

log = logging.getLogger("prunecli")

Scope = Literal["layer", "global"]


@dataclass
class ChannelPruneResult:
    """What :func:`prune_channels` returns.

    Attributes:
        model: the pruned model (the object that was passed in).
        structure: JSON-able rebuild information for ``manifest.structure``.
        metrics: params before and after, per-layer channel counts, groups pruned/skipped.
        plan: the plan that was applied.
    """

    model: nn.Module
    structure: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    plan: ChannelPlan | None = None


def _check_options(
    ratio: float, scope: str, layer_ratios: Mapping[str, float], round_to: int | None, min_channels: int
) -> None:
    for what, r in [("--ratio", ratio), *((f"--layer-ratio {k}", v) for k, v in layer_ratios.items())]:
        if not isinstance(r, (int, float)) or not 0.0 <= float(r) < 1.0:
            raise InputError(f"{what} must be in [0, 1), got {r}", hint="0.3 removes 30 % of each layer's channels")
    if scope not in ("layer", "global"):
        raise InputError(f"unknown scope {scope!r}; choose from global, layer")
    if round_to is not None and int(round_to) < 1:
        raise InputError(f"--round-to must be a positive integer, got {round_to}")
    if int(min_channels) < 1:
        raise InputError(f"the minimum number of channels kept must be at least 1, got {min_channels}")


def _layer_widths(model: nn.Module) -> dict[str, int]:
    return {
        n: int(m.weight.shape[1 if getattr(m, "transposed", False) else 0])
        for n, m in model.named_modules()
        if isinstance(m, ROOT_TYPES) and getattr(m, "weight", None) is not None
    }


def _macs(model: nn.Module, trace: Any, numel: Mapping[str, int] | None = None) -> int:
    """MACs (:mod:`prunecli.tracing` convention) of the prunable layers, with weight sizes ``numel`` if given."""
    from prunecli.prunable import prunable_layers

    layers = prunable_layers(model)
    sizes = numel if numel is not None else {n: m.weight.numel() for n, m in layers.items()}
    return sum(trace.positions.get(n, 0) * sizes[n] for n in layers)


def _build(model: nn.Module, example_input: torch.Tensor, hook: Any = None) -> Any:
    from prunecli.depgraph import build_graph

    handle = model.register_forward_hook(hook) if hook is not None else None
    try:
        return build_graph(model, example_input)
    except Exception as exc:  # the tracer does not understand an op of this model
        raise graph_error(exc) from None
    finally:
        if handle is not None:
            handle.remove()


def plan_channels(
    model: nn.Module,
    *,
    example_input: torch.Tensor,
    ratio: float,
    channel_scores: Mapping[str, torch.Tensor] | None = None,
    weight_scores: Mapping[str, torch.Tensor] | None = None,
    scope: Scope = "layer",
    layer_ratios: Mapping[str, float] | None = None,
    exclude: Sequence[str] | None = None,
    round_to: int | None = None,
    min_channels: int = 1,
    max_retries: int = 4,
    keeps: Mapping[tuple[str, str], int] | None = None,
    heads: bool = False,
    freeze: Collection[type] = (),
    memo: CandidateMemo | None = None,
) -> ChannelPlan:
    """The channel plan of ``model`` (module docstring); the model is pruned as a trial and reverted.

    Args:
        model: the model to plan for, in eval mode; it is left as it was.
        example_input: a small batch on the model's device; traced once per attempt and run once.
        ratio: fraction of each group's channels to remove (layer scope) or of all positions (global).
        channel_scores: per-output-channel scores by parameter name (channel criteria).
        weight_scores: per-weight scores by parameter name (weight criteria), reduced per filter.
        scope: ``layer`` (each group keeps ``floor(C·(1−r))``) or ``global``.
        layer_ratios: glob → ratio for groups whose conv/linear output channels match.
        exclude: globs of modules whose output channels must stay (default: the classifier head).
        round_to: kept counts are multiples of this.
        min_channels: keep at least this many channels per group.
        max_retries: attempts after a failed forward, each freezing one more module class.
        keeps: ``(root, handler)`` → kept positions per slice, overriding the count of those groups
            (``--target``'s fill, :mod:`prunecli.pruning.budget`).
        heads: fused-qkv attention loses whole heads (``prune --heads``): its positions are heads ranked
            by their mean channel importance (:mod:`~prunecli.pruning.groups`), ``num_heads`` shrinks and
            ``head_dim`` stays; ``ratio`` is then the fraction of each attention's heads (at least one
            is kept). Other groups (MLP hidden units, the residual stream) are pruned as without it.
        freeze: module classes frozen from the start, as if the safety net had frozen them (a plan of
            the same model at another ratio did: :func:`~prunecli.pruning.budget.plan_channels_to`).
        memo: candidate groups shared by plans of the same dense model with the same options
            (:data:`~prunecli.pruning.groups.CandidateMemo`), filled as they are found.

    Raises:
        InputError: a ratio outside [0, 1), an unknown scope, scores that do not fit the model, or a
            model whose forward cannot be kept working.
    """
    layer_ratios = dict(layer_ratios or {})
    _check_options(ratio, scope, layer_ratios, round_to, min_channels)
    scores = resolve_scores(model, channel_scores, weight_scores)
    model.eval()
    module_names = [n for n, _ in model.named_modules() if n]
    patterns = list(exclude) if exclude is not None else classifier_modules(model)
    excluded = {n for n in module_names if match_any(n, patterns)}
    unmatched = sorted(p for p in patterns if not any(match_any(n, [p]) for n in module_names))
    for p in unmatched:
        log.warning("--exclude %r matches no module", p)

    from prunecli.prunable import prunable_layers
    from prunecli.tracing import trace_run

    params_before = sum(p.numel() for p in model.parameters())
    widths_before = _layer_widths(model)
    numel_before = {n: m.weight.numel() for n, m in prunable_layers(model).items()}
    search = GroupSearch(model, scores, ratio, scope, layer_ratios, excluded, heads=heads)
    dense_out: list[Any] = []  # the dense model's output shape, seen while Torch-Pruning first traces it
    traces: list[Any] = []  # layer positions, from the safety net's forward of the pruned model

    def remember(_mod: nn.Module, _args: Any, out: Any) -> None:
        dense_out.append(output_shape(out))

    def attempt(retries: Retries) -> tuple[Applied, int, dict[str, int]]:
        dg = _build(model, example_input, None if dense_out else remember)
        found = search.candidates(dg, retries.frozen_modules(model), memo)
        counts = keep_counts(found.candidates, ratio, round_to, min_channels)
        given = keeps or {}
        counts = [given.get((c.root, c.handler), k) for c, k in zip(found.candidates, counts, strict=True)]
        groups = [
            ChannelGroup(
                c.root, c.handler, c.members, c.slices, c.size, tuple(top(c.imp, keep)), c.ratio, c.block, c.attention
            )
            for c, keep in zip(found.candidates, counts, strict=True)
            if keep < c.size
        ]
        applied = apply_groups(dg, model, groups, skip=retries.bad_roots)
        fix_attention(search.attn, heads=heads)
        fix_splits(model)
        traces.append(trace_run(model, lambda: run_checked(model, example_input, dense_out[0] if dense_out else None)))
        stats = {
            "groups_planned": len(found.candidates),
            "groups_unscored": found.unscored,
            "groups_skipped": found.skipped,
            "groups_unmappable": applied.unmappable,
        }
        return applied, sum(p.numel() for p in model.parameters()), stats

    snap = surgery.snapshot(model)
    (applied, params_after, stats), retries = with_safety_net(model, attempt, max_retries, freeze)
    widths_after = _layer_widths(model)
    # channel pruning keeps every layer's output positions: one trace counts the MACs before and after
    macs_before, macs_after = _macs(model, traces[-1], numel_before), _macs(model, traces[-1])
    trial = _Trial(snap, surgery.snapshot(model), _structure(model, snap, applied))
    surgery.revert(model, snap)
    return ChannelPlan(
        groups=tuple(applied.pruned),
        widths_before=widths_before,
        widths_after={n: widths_after.get(n, w) for n, w in widths_before.items()},
        frozen=tuple(sorted(t.__name__ for t in retries.frozen_types)),
        retried_after=tuple(retries.failures),
        stats=stats,
        params_before=params_before,
        params_after=params_after,
        macs_before=macs_before,
        macs_after=macs_after,
        positions=dict(traces[-1].positions),
        notes={
            "target_ratio": ratio,
            "scope": scope,
            "criterion_reduction": "L2 filter norm" if scores is None else "scores, mean of member-mean-normalised",
            "attention_fixed": sorted(search.attn),
            "attention_kept": sorted(search.other_attn),
            "heads": heads,
            "heads_before": {n: int(m.num_heads) for n, m in sorted(search.attn.items())} if heads else {},
            "exclude": sorted(excluded),
            "exclude_unmatched": unmatched,
        },
        trial=trial,
    )


def apply_channels(model: nn.Module, plan: ChannelPlan, *, example_input: torch.Tensor) -> dict[str, Any]:
    """Prunes ``model`` in place as ``plan`` says; returns its structure (``manifest.structure``).

    When ``model`` still holds exactly the tensors it had when the plan was made, the planning trial's
    result is swapped back in (:class:`_Trial`: no second graph, no second pruning). Otherwise — another
    copy of the same dense model — the graph is rebuilt and the plan's groups are pruned with their
    recorded indices.

    Raises:
        InputError: Torch-Pruning cannot build the model's dependency graph.
        RuntimeError: a planned group does not map onto this model (it is not the planned one).
    """
    model.eval()
    trial = plan.trial
    if isinstance(trial, _Trial) and _holds(model, trial.dense):
        surgery.revert(model, trial.pruned)
        _narrow_num_features(model)
        return copy.deepcopy(trial.structure)
    attn, _ = attention_modules(model)
    snap = surgery.snapshot(model)
    dg = _build(model, example_input)
    applied = apply_groups(dg, model, plan.groups, strict=True)
    fix_attention(attn, heads=bool(plan.notes.get("heads")))
    fix_splits(model)
    structure = _structure(model, snap, applied)
    _narrow_num_features(model)
    return structure


@dataclass(frozen=True)
class _Trial:
    """The planning trial: the dense and the pruned model's tensors (references, no copies) and the structure."""

    dense: surgery.Snapshot
    pruned: surgery.Snapshot
    structure: dict[str, Any]


def _holds(model: nn.Module, snap: surgery.Snapshot) -> bool:
    """``model`` holds exactly the tensor objects and attribute values of ``snap``."""
    modules = dict(model.named_modules())
    if set(modules) != set(snap.tensors):
        return False
    now = surgery.snapshot(model)
    for name, tensors in snap.tensors.items():
        current = now.tensors[name]
        if set(current) != set(tensors) or any(current[k][1] is not t for k, (_, t) in tensors.items()):
            return False
        if now.attrs[name] != snap.attrs[name]:
            return False
    return True


def _structure(model: nn.Module, snap: surgery.Snapshot, applied: Applied) -> dict[str, Any]:
    """The structure of the pruned ``model``: shapes and attributes changed since ``snap``, and kept indices."""
    from prunecli.depgraph import ENGINE

    channels: dict[str, dict[str, Any]] = {}
    for (name, kind), kept in sorted(applied.channels.items()):
        size = applied.dense[(name, kind)]
        if len(kept) < size:
            channels.setdefault(name, {})[kind] = {"kept": kept, "dense": size}
    return {
        "format": surgery.STRUCTURE_FORMAT,
        "kind": "channel",
        "engine": ENGINE,
        "modules": surgery.diff_structure(model, snap),
        "channels": channels,
    }


def _narrow_num_features(model: nn.Module) -> None:
    """Sets timm's ``num_features`` to the width the classifier now reads, as rebuilding the checkpoint does.

    timm sets it once, at construction; Torch-Pruning narrows the head's input without touching it.
    :func:`prunecli.models.build_model` sets the pruned width on a rebuilt model, so the pruned model in
    memory (and the layer table saved from it) must say the same. Not part of the structure: the
    rebuild derives it.
    """
    from prunecli.models import pruned_num_features

    width = pruned_num_features(model)
    if width is not None and isinstance(getattr(model, "num_features", None), int):
        model.num_features = width


def channel_metrics(plan: ChannelPlan, model: nn.Module) -> dict[str, Any]:
    """The metrics of a channel prune run: the plan's facts and the pruned ``model``'s widths and params."""
    widths_before = dict(plan.widths_before)
    widths = _layer_widths(model)
    total_before = sum(widths_before.values())
    kept = sum(widths.get(n, w) for n, w in widths_before.items())
    notes = dict(plan.notes)
    return {
        "params_before": plan.params_before,
        "params": sum(p.numel() for p in model.parameters()),
        "target_ratio": notes["target_ratio"],
        "scope": notes["scope"],
        "criterion_reduction": notes["criterion_reduction"],
        "channels_before": total_before,
        "channels": kept,
        "channel_sparsity": 1.0 - kept / max(total_before, 1),
        "layers": {
            n: {"channels_before": widths_before[n], "channels": widths.get(n, widths_before[n])}
            for n in sorted(widths_before)
            if widths.get(n, widths_before[n]) != widths_before[n]
        },
        "groups_pruned": len(plan.groups),
        **{k: plan.stats[k] for k in ("groups_planned", "groups_unscored", "groups_skipped", "groups_unmappable")},
        "frozen": list(plan.frozen),
        "retried_after": list(plan.retried_after),
        "attention_fixed": notes["attention_fixed"],
        "attention_kept": notes["attention_kept"],
        "exclude": notes["exclude"],
        "exclude_unmatched": notes["exclude_unmatched"],
        **({"heads": _heads_now(plan, model)} if notes.get("heads") else {}),
    }


def _heads_now(plan: ChannelPlan, model: nn.Module) -> dict[str, dict[str, int]]:
    """Whole-head pruning's record: attention → heads before and the ``num_heads`` the pruned model has."""
    modules = dict(model.named_modules())
    return {
        n: {"heads_before": row["heads_before"], "heads": int(modules[n].num_heads)} for n, row in plan.heads().items()
    }


def prune_channels(
    model: nn.Module,
    *,
    example_input: torch.Tensor,
    ratio: float,
    channel_scores: Mapping[str, torch.Tensor] | None = None,
    weight_scores: Mapping[str, torch.Tensor] | None = None,
    scope: Scope = "layer",
    layer_ratios: Mapping[str, float] | None = None,
    exclude: Sequence[str] | None = None,
    round_to: int | None = None,
    min_channels: int = 1,
    max_retries: int = 4,
    heads: bool = False,
) -> ChannelPruneResult:
    """Removes output channels of ``model`` in place: :func:`plan_channels`, then :func:`apply_channels`.

    Arguments as :func:`plan_channels`.

    Returns:
        The pruned model, its structure (``manifest.structure``), metrics and the plan.
    """
    plan = plan_channels(
        model,
        example_input=example_input,
        ratio=ratio,
        channel_scores=channel_scores,
        weight_scores=weight_scores,
        scope=scope,
        layer_ratios=layer_ratios,
        exclude=exclude,
        round_to=round_to,
        min_channels=min_channels,
        max_retries=max_retries,
        heads=heads,
    )
    structure = apply_channels(model, plan, example_input=example_input)
    return ChannelPruneResult(model, structure, channel_metrics(plan, model), plan)
