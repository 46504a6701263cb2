"""Channel pruning: remove whole output channels through Torch-Pruning's dependency graph (DepGraph).

API (called by :func:`prunecli.api.prune.prune` for ``--structure channel``)::

    from prunecli.pruning.channel import prune_channels

    result = prune_channels(
        model,                       # timm model, float32, eval mode; pruned IN PLACE
        example_input=x,             # a (1, C, H, W) tensor on the model's device, for tracing
        ratio=0.3,                   # fraction of channels removed, in [0, 1)
        channel_scores=None,         # {"layer1.0.conv1.weight": Tensor[C_out]} from a channel criterion, or
        weight_scores=None,          # {"layer1.0.conv1.weight": Tensor[W.shape]} from a weight criterion
        scope="layer",               # "layer" | "global"
        layer_ratios={"layer4.*": 0.5},  # glob → ratio, overrides ``ratio`` for matching groups
        exclude=None,                # globs of modules whose OUTPUT channels stay; None = the classifier head
        round_to=None,               # kept channel counts become multiples of this
        min_channels=1,              # never keep fewer channels in a group
    )
    result.model      # the same object, pruned
    result.structure  # JSON-able; store as manifest.structure (prunecli.surgery.apply_structure reads it)
    result.metrics    # params/params_before, per-layer channels, groups, frozen modules (MACs: the caller's
                      # pruning.trace_layers/count_macs, one convention for every structure)

How it works, and the choices it makes:

* **Groups.** Torch-Pruning traces the model once and groups every set of coupled channels: a conv's
  output channels together with its BatchNorm, every consumer's input channels, residual additions
  (a whole residual stage is one group), depthwise convs, concatenations, ``Flatten→Linear`` (channel
  ``c`` of the last conv owns the contiguous block ``[c·HW, (c+1)·HW)`` of ``fc1``'s inputs), unwrapped
  parameters such as a ViT's ``pos_embed``/``cls_token``/LayerScale ``gamma``. Each group is pruned as a
  unit, so the network stays consistent. Groups are the unit of ``ratio``.
* **Scores → channel importance.** A channel criterion gives one score per output channel of a
  conv/linear weight. A weight criterion gives per-weight scores; they are reduced per output channel
  as the L1 sum of the filter's scores (all prunecli weight criteria are non-negative, so this is their
  plain sum). Without scores the criterion is magnitude: the L2 norm of each filter (``‖W[o]‖₂``).
* **Group reduction.** A group's importance per channel is the mean, over the group's conv/linear
  members whose *output* channels are in the group and that have scores, of the member's scores
  divided by that member's mean score. Dividing by the mean puts layers of different fan-in (and
  scores of different units) on one scale, which global ranking needs; with a single scored member
  (a plain conv followed by BN) the ranking is exactly that layer's. Consumers (input channels) and
  norms do not vote: a scores file scores output channels. Groups without any scored member are not
  pruned (reported as ``groups_unscored``). Implemented as :class:`ScoreImportance`, a
  ``torch_pruning`` ``Importance``.
* **Counts (METHODS §0.3).** A group of ``C`` channels keeps ``n_keep = floor(C·(1−r))``, then rounded
  down to a multiple of ``round_to`` (never below ``round_to``), then raised to ``min_channels``; the
  top-``n_keep`` channels by importance survive, ties broken towards the lower index. Grouped convs,
  GroupNorm and attention heads split a group into ``g`` equal slices (Torch-Pruning's channel groups):
  importance is averaged over the slices and the same positions are removed from each, so every slice
  keeps ``n_keep`` of ``C/g``. ``scope="global"`` ranks the channel positions of all groups together
  and keeps the top ``floor(T·(1−r))`` of the ``T`` positions; ``round_to`` and ``min_channels`` then
  apply per group. ``layer_ratios`` groups (the first pattern that matches a conv/linear member whose
  output channels are in the group) are always counted per group.
* **Attention.** timm attention modules with a fused ``qkv`` Linear and a ``num_heads`` attribute lose
  head dimensions (the same dims in every head, in q, k and v), as Torch-Pruning's ``prune_head_dims``
  does; afterwards ``head_dim`` and ``attn_dim`` are updated so ``forward`` reshapes correctly. ``scale``
  keeps its dense value ``1/sqrt(d_dense)``: the pruned logits are the surviving terms of the dense dot
  product, so the dense scale keeps them closest to the dense model. Attention modules of other shapes
  (separate q/k/v, conv attention, …) keep their internal widths; their inputs may still shrink.
* **Safety net.** After pruning, the model runs once on ``example_input``. When the forward fails
  (a module reshapes with a width it stores itself, which no tracer can see), the attempt is undone
  (tensors are swapped back, nothing is copied), every module of the failing module's class is frozen
  (no group that touches it is pruned) and pruning runs again — at most ``max_retries`` times. Frozen
  classes are reported in ``metrics["frozen"]``.

The structure (see :mod:`prunecli.surgery`) records, for every module that changed, the new tensor
shapes and changed number-valued attributes, plus ``channels``: for every pruned module
``{"out": {"kept": [...dense indices...], "dense": C}, "in": {...}}`` (only the dims that were pruned),
which ``restore`` uses to find the pruned filters in the dense parent.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from prunecli import surgery
from prunecli.errors import InputError
from prunecli.prunable import classifier_modules, match_any

__all__ = ["ChannelPruneResult", "ScoreImportance", "channel_scores_from_weights", "prune_channels"]

log = logging.getLogger("prunecli")

Scope = Literal["layer", "global"]

_F = tp.pruner.function
_OUT_FNS = (_F.prune_conv_out_channels, _F.prune_linear_out_channels, _F.prune_depthwise_conv_out_channels)
_DW_FNS = (_F.prune_depthwise_conv_out_channels, _F.prune_depthwise_conv_in_channels)
_ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
_HEAD_ATTRS = ("num_heads", "heads", "n_heads", "num_attention_heads")
_LEAF_TYPES = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Dropout,
    nn.Identity,
)


@dataclass
class ChannelPruneResult:
    """What :func:`prune_channels` returns.

    Attributes:
        model: the pruned model (the object that was passed in).
        structure: JSON-able rebuild information for ``manifest.structure``.
        metrics: params/MACs before and after, per-layer channel counts, groups pruned/skipped.
    """

    model: nn.Module
    structure: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)


def channel_scores_from_weights(weight_scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reduces per-weight scores to per-output-channel scores: the L1 sum over each filter."""
    out = {}
    for name, s in weight_scores.items():
        s = s.detach().to(torch.float64)
        out[name] = s.abs().flatten(1).sum(1) if s.ndim > 1 else s.abs()
    return out


class ScoreImportance(tp.importance.Importance):
    """Group importance from per-output-channel scores (module docstring: "Group reduction").

    Args:
        names: module → module name (Torch-Pruning's ``DG._module2name``).
        channel_scores: parameter name (``conv.weight``) → score per output channel; None = L2 filter norms.
    """

    def __init__(self, names: Mapping[nn.Module, str], channel_scores: Mapping[str, torch.Tensor] | None) -> None:
        self.names = names
        self.scores = channel_scores

    def member_scores(self, layer: nn.Module) -> torch.Tensor | None:
        """Scores of all output channels of ``layer`` (dense order), or None when it has none."""
        if self.scores is None:
            w = layer.weight.detach()
            if getattr(layer, "transposed", False):
                w = w.transpose(0, 1)
            return w.to(torch.float64).flatten(1).norm(dim=1)
        return self.scores.get(f"{self.names.get(layer, '?')}.weight")

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        n_root = len(group[0].idxs)
        total = torch.zeros(n_root, dtype=torch.float64)
        count = torch.zeros(n_root, dtype=torch.float64)
        voted = False
        for item in group:
            dep, idxs, root_idxs = item.dep, item.idxs, item.root_idxs
            layer = dep.target.module
            if not _is_scored_member(item):
                continue
            if root_idxs is None or any(r is None for r in root_idxs):
                continue
            full = self.member_scores(layer)
            if full is None:
                continue
            full = full.to(torch.float64)
            mean = float(full.mean()) if full.numel() else 0.0
            if not math.isfinite(mean) or mean <= 0.0:
                continue  # a layer with all-zero scores carries no ranking information
            if max(idxs, default=0) >= full.numel() or max(root_idxs, default=0) >= n_root:
                raise _BadGroup(self.names.get(layer, "?"))  # Torch-Pruning mapped indices past a layer's width
            local = full[torch.as_tensor(idxs, dtype=torch.long)] / mean
            where = torch.as_tensor(root_idxs, dtype=torch.long)
            total.scatter_add_(0, where, local)
            count.scatter_add_(0, where, torch.ones_like(local))
            voted = True
        if not voted:
            return None
        return torch.where(count > 0, total / count.clamp_min(1.0), torch.zeros_like(total))


# ------------------------------------------------------------------------------------------------ input checks


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


def _resolve_scores(
    model: nn.Module,
    channel_scores: Mapping[str, torch.Tensor] | None,
    weight_scores: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor] | None:
    if channel_scores is not None and weight_scores is not None:
        raise InputError("give channel scores or weight scores, not both")
    if channel_scores is None and weight_scores is None:
        return None
    params = dict(model.named_parameters())
    given = channel_scores if channel_scores is not None else weight_scores
    assert given is not None
    for name, s in given.items():
        p = params.get(name)
        if p is None:
            raise InputError(f"scores name parameter {name!r}, which the model does not have",
                             hint="the scores file belongs to another architecture")  # fmt: skip
        want = tuple(p.shape) if weight_scores is not None else (int(p.shape[0]),)
        if tuple(s.shape) != want:
            kind = "weight" if weight_scores is not None else "channel"
            raise InputError(f"{kind} scores of {name!r} have shape {tuple(s.shape)}, expected {want}")
        if not bool(torch.isfinite(s).all()):
            raise InputError(f"scores of {name!r} hold NaN or infinite values")
    if weight_scores is not None:
        return channel_scores_from_weights(weight_scores)
    return {k: v.detach().to(torch.float64) for k, v in given.items()}


# ------------------------------------------------------------------------------------------------ counting


def _n_keep(channels: int, ratio: float, round_to: int | None, min_channels: int, slices: int) -> int:
    """Kept positions per slice for a group of ``channels`` positions per slice (module docstring: Counts)."""
    keep = math.floor(channels * (1.0 - ratio) + 1e-9)
    return _round_and_clamp(keep, channels, round_to, min_channels, slices)


def _round_and_clamp(keep: int, channels: int, round_to: int | None, min_channels: int, slices: int) -> int:
    if round_to and round_to > 1:
        step = round_to // math.gcd(round_to, slices)  # so that slices·keep is a multiple of round_to
        keep = max(keep - keep % step, min(step, channels))
    keep = max(keep, math.ceil(min_channels / slices))
    return min(keep, channels)


def _top(imp: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` most important positions; ties go to the lower index."""
    order = torch.sort(-imp, stable=True).indices
    return sorted(order[:keep].tolist())


# ------------------------------------------------------------------------------------------------ the pruner


@dataclass
class _Plan:
    root: nn.Module
    handler: Any
    size: int  # positions per slice
    slices: int
    imp: torch.Tensor  # per position of one slice
    ratio: float | None  # None: counted globally
    name: str


class _BadGroup(Exception):
    pass


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{exc.__class__.__name__}: {text}"


class _ForwardBroken(Exception):
    def __init__(self, stack: list[str], error: str, group_root: str | None = None) -> None:
        super().__init__(error)
        self.stack = stack
        self.error = error
        self.group_root = group_root  # set when Torch-Pruning itself failed while pruning this group


def _attention_modules(model: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """(fused-qkv attention modules by name, names of other modules that hold a head count)."""
    fused, other = {}, []
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
            other.append(name)
    return fused, other


def _all_groups(dg: Any, ignored: Sequence[nn.Module]) -> Any:
    """Torch-Pruning's ``DependencyGraph.get_all_groups``, except that a root whose group cannot be
    built (its index mapping raises on some op chains) is skipped instead of ending the enumeration."""
    ignored_set = {id(m) for m in [*ignored, *dg.IGNORED_LAYERS_IN_TRACING]}
    visited: set[int] = set()
    for m in list(dg.module2node):
        if id(m) in ignored_set or id(m) in visited or not isinstance(m, _ROOT_TYPES):
            continue
        pruner = dg.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            continue
        try:
            group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
        except Exception as exc:  # Torch-Pruning internals; the group is just not pruned
            log.debug("cannot build the group of %s: %s", dg._module2name.get(m, "?"), _short(exc))
            visited.add(id(m))
            continue
        outs = [it.dep.target.module for it in group if dg.is_out_channel_pruning_fn(it.dep.handler)]
        visited.update(id(o) for o in outs)
        if not any(id(o) in ignored_set for o in outs):
            yield group


def _shape(out: Any) -> Any:
    """Shape of a model output (nested for tuples/lists/dicts of tensors)."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return tuple(_shape(o) for o in out)
    if isinstance(out, dict):
        return tuple((k, _shape(v)) for k, v in sorted(out.items()))
    return None


def _is_out(dg: Any, item: Any) -> bool:
    return bool(dg.is_out_channel_pruning_fn(item.dep.handler))


def _is_scored_member(item: Any) -> bool:
    """A conv/linear whose output channels are in the group: the members whose scores vote."""
    return item.dep.handler in _OUT_FNS and isinstance(item.dep.target.module, _ROOT_TYPES)


def _under(name: str, roots: Sequence[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


class _Pruner:
    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        scores: dict[str, torch.Tensor] | None,
        ratio: float,
        scope: Scope,
        layer_ratios: Mapping[str, float],
        excluded: set[str],
        round_to: int | None,
        min_channels: int,
    ) -> None:
        self.model, self.x, self.scores = model, example_input, scores
        self.ratio, self.scope, self.layer_ratios = ratio, scope, dict(layer_ratios)
        self.excluded, self.round_to, self.min_channels = excluded, round_to, min_channels
        self.names = {m: n for n, m in model.named_modules()}
        self.attn, self.other_attn = _attention_modules(model)
        self.output_shape: Any = None  # of the dense model, seen while Torch-Pruning traces it

    def _remember_output(self, _mod: nn.Module, _args: Any, out: Any) -> None:
        self.output_shape = _shape(out)

    def run(self, frozen: Sequence[str], bad_roots: Sequence[str] = ()) -> dict[str, Any]:
        """One attempt: build the graph, plan every group, prune; returns channel bookkeeping."""
        model = self.model
        num_heads = {m.qkv: int(m.num_heads) for m in self.attn.values()}
        hook = model.register_forward_hook(self._remember_output) if self.output_shape is None else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Torch-Pruning warns about every unwrapped parameter
                dg = tp.DependencyGraph().build_dependency(model, example_inputs=self.x, verbose=False)
        except Exception as exc:  # the tracer does not understand an op of this model
            raise InputError(
                f"Torch-Pruning cannot build the dependency graph of this model ({_short(exc)})",
                hint="prune it unstructured (--structure unstructured) instead",
            ) from None
        finally:
            if hook is not None:
                hook.remove()
        param_names = {p: n for n, p in model.named_parameters()}

        in_groups: dict[nn.Module, int] = {}
        out_groups: dict[nn.Module, int] = dict(num_heads)
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
        ignored = [m for n, m in model.named_modules() if n and (n in self.excluded or _under(n, [*frozen, *keep_out]))]
        importance = ScoreImportance(self.names, self.scores)
        plans: list[_Plan] = []
        unscored = skipped = 0
        for group in _all_groups(dg, ignored):
            if num_heads and any(_is_out(dg, it) and it.dep.target.module in num_heads for it in group):
                group = self._reroot_attention(dg, group)
            if group is None or not self._allowed(dg, group, member_name, frozen, keep_out):
                skipped += 1
                continue
            try:
                imp = importance(group)
            except _BadGroup:
                skipped += 1
                continue
            if imp is None:
                unscored += 1
                continue
            slices = max(
                [out_groups.get(it.dep.target.module, 1) for it in group if _is_out(dg, it)]
                + [in_groups.get(it.dep.target.module, 1) for it in group if not _is_out(dg, it)]
            )
            if len(imp) % slices or len(imp) // slices <= 1:
                skipped += 1
                continue
            out_names = [self.names[it.dep.target.module] for it in group if _is_scored_member(it)]
            root = group[0].dep.target.module
            size = len(imp) // slices
            dim_imp = imp.view(slices, -1).mean(0)
            ratio = self._group_ratio(out_names)
            plans.append(_Plan(root, group[0].dep.handler, size, slices, dim_imp, ratio, self.names.get(root, "?")))

        keeps = self._counts(plans)
        channels: dict[tuple[str, str], list[int]] = {}
        dense: dict[tuple[str, str], int] = {}
        pruned_groups = unmappable = 0
        for plan, keep in zip(plans, keeps, strict=True):
            if keep >= plan.size:
                continue
            if plan.name in bad_roots:
                unmappable += 1
                continue
            kept = set(_top(plan.imp, keep))
            drop_one = [i for i in range(plan.size) if i not in kept]
            idxs = [i + s * plan.size for s in range(plan.slices) for i in drop_one]
            try:  # building the pruning group modifies nothing: a failure here just skips the group
                group = dg.get_pruning_group(plan.root, plan.handler, idxs)
                ok = dg.check_pruning_group(group)
            except Exception as exc:  # Torch-Pruning's index mapping fails on some op chains
                log.debug("cannot map the channels of group %s: %s", plan.name, _short(exc))
                unmappable += 1
                continue
            if not ok:
                continue
            try:
                companions = self._record(dg, group, member_name, channels, dense)
                group.prune()
                _prune_companions(companions)
            except Exception as exc:  # failed half-way: undo everything, retry without this group
                raise _ForwardBroken([plan.name], _short(exc), group_root=plan.name) from None
            pruned_groups += 1
        self._fix_attention()
        return {
            "channels": channels,
            "dense": dense,
            "groups_pruned": pruned_groups,
            "groups_planned": len(plans),
            "groups_unscored": unscored,
            "groups_skipped": skipped,
            "groups_unmappable": unmappable,
        }

    def _allowed(self, dg: Any, group: Any, member_name: Any, frozen: Sequence[str], keep_out: Sequence[str]) -> bool:
        for it in group:
            name = member_name(it.dep.target.module)
            if not name:
                continue
            if _under(name, frozen):
                return False
            if _is_out(dg, it) and (name in self.excluded or _under(name, keep_out)):
                return False
        return True

    def _reroot_attention(self, dg: Any, group: Any) -> Any:
        """Roots an attention group at the output projection's input, where heads are contiguous slices."""
        down = None
        for item in group:
            if isinstance(item.dep.target.module, _ROOT_TYPES) and dg.is_in_channel_pruning_fn(item.dep.handler):
                down = item
        if down is None:
            return None
        return dg.get_pruning_group(down.dep.target.module, down.dep.handler, down.idxs)

    def _group_ratio(self, out_names: Sequence[str]) -> float | None:
        for pattern, r in self.layer_ratios.items():
            if any(match_any(n, [pattern]) for n in out_names):
                return float(r)
        return self.ratio if self.scope == "layer" else None

    def _counts(self, plans: Sequence[_Plan]) -> list[int]:
        keeps = [
            _n_keep(p.size, p.ratio, self.round_to, self.min_channels, p.slices) if p.ratio is not None else p.size
            for p in plans
        ]
        pool = [i for i, p in enumerate(plans) if p.ratio is None]
        if pool:
            imps = torch.cat([plans[i].imp for i in pool])
            owner = torch.cat([torch.full((plans[i].size,), i, dtype=torch.long) for i in pool])
            total = int(imps.numel())
            keep_total = math.floor(total * (1.0 - self.ratio) + 1e-9)
            chosen = torch.sort(-imps, stable=True).indices[:keep_total]
            per = torch.bincount(owner[chosen], minlength=len(plans))
            for i in pool:
                p = plans[i]
                keeps[i] = _round_and_clamp(int(per[i]), p.size, self.round_to, self.min_channels, p.slices)
        return keeps

    def _record(self, dg: Any, group: Any, member_name: Any, channels: dict, dense: dict) -> list:
        """Maps each pruned dim's current indices back to dense indices (kept lists for restore).

        Returns the conv/linear layers whose output channels this group removes, with the positions kept
        and the width before, so that :func:`_prune_companions` can slice their extra per-channel tensors.
        """
        done: set[tuple[str, str]] = set()
        companions = []
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            if not isinstance(module, (nn.Module, nn.Parameter)) or isinstance(module, nn.Sequential):
                continue
            name = member_name(module)
            if not name and module is not self.model:
                continue
            if not (isinstance(module, nn.Parameter) or any(True for _ in module.parameters(recurse=False))):
                continue
            kinds = ["out", "in"] if handler in _DW_FNS else ["out" if dg.is_out_channel_pruning_fn(handler) else "in"]
            for kind in kinds:
                key = (name, kind)
                if key in done:
                    continue
                done.add(key)
                if key not in channels:
                    size = self._dim_size(dg, module, kind)
                    if size is None:
                        continue
                    channels[key] = list(range(size))
                    dense[key] = size
                current = channels[key]
                drop = set(int(i) for i in item.idxs)
                channels[key] = [c for j, c in enumerate(current) if j not in drop]
                if kind == "out" and isinstance(module, _ROOT_TYPES):
                    keep = [j for j in range(len(current)) if j not in drop]
                    companions.append((module, keep, len(current)))
        return companions

    @staticmethod
    def _dim_size(dg: Any, module: Any, kind: str) -> int | None:
        try:
            return dg.get_out_channels(module) if kind == "out" else dg.get_in_channels(module)
        except Exception:  # pruners of exotic layers may not know their width
            return None

    def _fix_attention(self) -> None:
        for m in self.attn.values():
            heads = int(m.num_heads)
            head_dim = m.qkv.out_features // (3 * heads)
            if isinstance(getattr(m, "head_dim", None), int):
                m.head_dim = head_dim
            if isinstance(getattr(m, "attn_dim", None), int):
                m.attn_dim = heads * head_dim


def _prune_companions(companions: Sequence[tuple[nn.Module, list[int], int]]) -> None:
    """Slices the extra per-output-channel tensors of pruned conv/linear subclasses.

    Torch-Pruning slices ``weight`` and ``bias``; subclasses may own more tensors indexed by output
    channel (timm's ``ScaledStdConv2d.gain``, shape ``[C_out, 1, 1, 1]``). Any other direct parameter or
    buffer whose first dimension equals the layer's width before pruning is sliced the same way.
    """
    for module, keep, width in companions:
        index = torch.as_tensor(keep, dtype=torch.long)
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if name in ("weight", "bias") or t is None or t.ndim == 0 or t.shape[0] != width:
                    continue
                new = torch.index_select(t.detach(), 0, index.to(t.device))
                store[name] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new


def _stack_forward(model: nn.Module, x: torch.Tensor) -> Any:
    """Runs ``model(x)``; on failure raises :class:`_ForwardBroken` with the stack of module names.

    (A forward on ``meta`` tensors would compute nothing, but on CPU its Python decompositions of
    batch_norm & co. cost more than the real forward of the pruned model.)
    """
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []

    def pre(mod: nn.Module, _args: Any) -> None:
        stack.append(names.get(id(mod), "?"))

    def post(mod: nn.Module, _args: Any, _out: Any) -> None:
        if stack:
            stack.pop()

    handles = [
        nn.modules.module.register_module_forward_pre_hook(pre),
        nn.modules.module.register_module_forward_hook(post),
    ]
    try:
        with torch.no_grad():
            return model(x)
    except Exception as exc:  # any failure of a user model's forward
        raise _ForwardBroken(list(stack), _short(exc)) from None
    finally:
        for h in handles:
            h.remove()


def _culprit(model: nn.Module, stack: Sequence[str], frozen_types: set[type]) -> type | None:
    """The module class to freeze after a failed forward: the innermost non-leaf module not yet frozen."""
    modules = dict(model.named_modules())
    for name in reversed(stack):
        mod = modules.get(name)
        if mod is None or name == "" or type(mod) in frozen_types:
            continue
        if type(mod).__module__.startswith("torch.nn") or type(mod) in _LEAF_TYPES:
            continue  # torch's own layers are pruned correctly; the cause is the custom module around them
        return type(mod)
    return None


def _layer_widths(model: nn.Module) -> dict[str, int]:
    return {
        n: int(m.weight.shape[1 if getattr(m, "transposed", False) else 0])
        for n, m in model.named_modules()
        if isinstance(m, _ROOT_TYPES) and getattr(m, "weight", None) is not None
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
) -> ChannelPruneResult:
    """Removes output channels of ``model`` in place (see the module docstring for every rule).

    Args:
        model: the model to prune, in eval mode.
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

    Returns:
        The pruned model, its structure (``manifest.structure``) and metrics.

    Raises:
        InputError: a ratio outside [0, 1), an unknown scope, scores that do not fit the model, or a
            model whose forward cannot be kept working.
    """
    layer_ratios = dict(layer_ratios or {})
    _check_options(ratio, scope, layer_ratios, round_to, min_channels)
    scores = _resolve_scores(model, channel_scores, weight_scores)
    model.eval()
    module_names = [n for n, _ in model.named_modules() if n]
    patterns = list(exclude) if exclude is not None else classifier_modules(model)
    excluded = {n for n in module_names if match_any(n, patterns)}
    unmatched = sorted(p for p in patterns if not any(match_any(n, [p]) for n in module_names))
    for p in unmatched:
        log.warning("--exclude %r matches no module", p)

    params_before = sum(p.numel() for p in model.parameters())
    widths_before = _layer_widths(model)
    snap = surgery.snapshot(model)
    pruner = _Pruner(model, example_input, scores, ratio, scope, layer_ratios, excluded, round_to, min_channels)

    frozen_types: set[type] = set()
    bad_roots: list[str] = []
    failures: list[str] = []
    for _attempt in range(max_retries + 1):
        frozen = [n for n, m in model.named_modules() if n and type(m) in frozen_types]
        try:
            book = pruner.run(frozen, bad_roots)
            out = _stack_forward(model, example_input)
            if pruner.output_shape is not None and _shape(out) != pruner.output_shape:
                raise _ForwardBroken([], f"output shape {_shape(out)} != {pruner.output_shape}")
            break
        except _ForwardBroken as broken:
            surgery.revert(model, snap)
            where = broken.stack[-1] if broken.stack else "?"
            failures.append(f"{where}: {broken.error}")
            if broken.group_root is not None:
                log.info("Torch-Pruning failed on the group of %s (%s); leaving it", where, broken.error)
                bad_roots.append(broken.group_root)
                continue
            culprit = _culprit(model, broken.stack, frozen_types)
            if culprit is None:
                raise InputError(
                    f"channel pruning breaks the model's forward in {where!r} ({broken.error})",
                    hint="exclude that module with --exclude, or prune unstructured",
                ) from None
            log.info("channel pruning broke %s (%s); freezing %s", where, broken.error, culprit.__name__)
            frozen_types.add(culprit)
    else:
        raise InputError(
            f"channel pruning keeps breaking the model's forward after {max_retries} retries ({failures[-1]})",
            hint="exclude the failing modules with --exclude",
        )

    modules = surgery.diff_structure(model, snap)
    channels: dict[str, dict[str, Any]] = {}
    for (name, kind), kept in sorted(book["channels"].items()):
        size = book["dense"][(name, kind)]
        if len(kept) < size:
            channels.setdefault(name, {})[kind] = {"kept": kept, "dense": size}
    structure = {
        "format": surgery.STRUCTURE_FORMAT,
        "kind": "channel",
        "engine": f"torch-pruning {tp.__version__}" if hasattr(tp, "__version__") else "torch-pruning",
        "modules": modules,
        "channels": channels,
    }
    widths = _layer_widths(model)
    params = sum(p.numel() for p in model.parameters())
    layers = {
        n: {"channels_before": widths_before[n], "channels": widths.get(n, widths_before[n])}
        for n in sorted(widths_before)
        if widths.get(n, widths_before[n]) != widths_before[n]
    }
    total_before = sum(widths_before.values())
    metrics = {
        "params_before": params_before,
        "params": params,
        "target_ratio": ratio,
        "scope": scope,
        "criterion_reduction": "L2 filter norm" if scores is None else "scores, mean of member-mean-normalised",
        "channels_before": total_before,
        "channels": sum(widths.get(n, w) for n, w in widths_before.items()),
        "channel_sparsity": 1.0 - sum(widths.get(n, w) for n, w in widths_before.items()) / max(total_before, 1),
        "layers": layers,
        "groups_pruned": book["groups_pruned"],
        "groups_planned": book["groups_planned"],
        "groups_unscored": book["groups_unscored"],
        "groups_skipped": book["groups_skipped"],
        "groups_unmappable": book["groups_unmappable"],
        "frozen": sorted(t.__name__ for t in frozen_types),
        "retried_after": failures,
        "attention_fixed": sorted(pruner.attn),
        "attention_kept": sorted(pruner.other_attn),
        "exclude": sorted(excluded),
        "exclude_unmatched": unmatched,
    }
    return ChannelPruneResult(model, structure, metrics)
