"""Channel pruning, step 4: remove a plan's channels through the dependency graph, recording what survived.

Groups are pruned one after the other in plan order (their root positions are disjoint, so the
dense indices of the plan stay valid for every group). For every pruned dimension the dense
indices that survive are recorded — ``channels[(module, "out"|"in")]`` — which ``restore`` uses to
find the pruned filters in the dense parent (``manifest.structure["channels"]``).

Torch-Pruning slices ``weight`` and ``bias``; subclasses may own more tensors indexed by output
channel (timm's ``ScaledStdConv2d.gain``, shape ``[C_out, 1, 1, 1]``): any other direct parameter or
buffer whose first dimension equals the layer's width before pruning is sliced the same way. Fused
attention modules get their ``head_dim``/``attn_dim`` updated so ``forward`` reshapes correctly;
``scale`` keeps its dense value ``1/sqrt(d_dense)`` (the pruned logits are the surviving terms of the
dense dot product, so the dense scale keeps them closest to the dense model). Whole-head pruning
(``prune --heads``) lowers ``num_heads`` instead and leaves ``head_dim`` and ``scale`` as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunecli.depgraph import DW_FNS
from prunecli.pruning.groups import short
from prunecli.pruning.importance import ROOT_TYPES
from prunecli.pruning.plan import ChannelGroup

__all__ = ["Applied", "GroupFailed", "apply_groups", "fix_attention"]

log = logging.getLogger("prunecli")


class GroupFailed(Exception):
    """Torch-Pruning failed half-way through pruning a group: the model must be reverted."""

    def __init__(self, root: str, error: str) -> None:
        super().__init__(error)
        self.root = root
        self.error = error


@dataclass
class Applied:
    """What :func:`apply_groups` did: the groups pruned, those that could not be mapped, and the kept indices."""

    pruned: list[ChannelGroup] = field(default_factory=list)
    unmappable: int = 0
    channels: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    dense: dict[tuple[str, str], int] = field(default_factory=dict)


def apply_groups(
    dg: Any, model: nn.Module, groups: Sequence[ChannelGroup], *, skip: Sequence[str] = (), strict: bool = False
) -> Applied:
    """Prunes ``groups`` of ``model`` in order through ``dg`` (built from ``model`` as it is now).

    Args:
        skip: roots whose group made Torch-Pruning fail in an earlier attempt (counted as unmappable).
        strict: every group must map (applying a plan that a trial run already mapped); otherwise a
            group whose indices Torch-Pruning cannot map, or whose check fails, is left out.

    Raises:
        GroupFailed: Torch-Pruning failed while modifying the model (revert it).
        RuntimeError: ``strict`` and a group did not map.
    """
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    param_names = {p: n for n, p in model.named_parameters()}

    def member_name(module: Any) -> str:
        return param_names.get(module, "") if isinstance(module, nn.Parameter) else names.get(module, "")

    done = Applied()
    for group_plan in groups:
        if group_plan.root in skip:
            done.unmappable += 1
            continue
        root = modules[group_plan.root]
        pruner = dg.get_pruner_of_module(root)
        handler = pruner.prune_out_channels if group_plan.handler == "out" else pruner.prune_in_channels
        try:  # building the pruning group modifies nothing: a failure here just skips the group
            group = dg.get_pruning_group(root, handler, group_plan.removed_indices)
            if group_plan.attention:
                _keep_head_norms(group, modules[group_plan.attention])
            ok = dg.check_pruning_group(group)
        except Exception as exc:  # Torch-Pruning's index mapping fails on some op chains
            if strict:
                raise RuntimeError(f"the plan's group {group_plan.root} no longer maps: {short(exc)}") from None
            log.debug("cannot map the channels of group %s: %s", group_plan.root, short(exc))
            done.unmappable += 1
            continue
        if not ok:
            if strict:
                raise RuntimeError(f"the plan's group {group_plan.root} fails Torch-Pruning's check")
            continue
        try:
            companions = _record(dg, model, group, member_name, done.channels, done.dense)
            group.prune()
            _prune_companions(companions)
        except Exception as exc:  # failed half-way: undo everything, retry without this group
            raise GroupFailed(group_plan.root, short(exc)) from None
        done.pruned.append(group_plan)
    return done


def _keep_head_norms(group: Any, attn: nn.Module) -> None:
    """Whole-head pruning: the per-head norms (``q_norm``/``k_norm``, over ``head_dim``) lose nothing.

    They normalise each head's ``head_dim`` features with weights shared by all heads; Torch-Pruning maps a
    removed head's channels onto them as if they were head dimensions (which would remove all of them).
    The head's features go, the shared norm stays: its items are dropped from the group.
    """
    norms = {id(m) for n in ("q_norm", "k_norm") if isinstance(m := getattr(attn, n, None), nn.Module)}
    if norms:
        group._group = [item for item in group._group if id(item.dep.target.module) not in norms]


def _record(dg: Any, model: nn.Module, group: Any, member_name: Any, channels: dict, dense: dict) -> list:
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
        if not name and module is not model:
            continue
        if not (isinstance(module, nn.Parameter) or any(True for _ in module.parameters(recurse=False))):
            continue
        kinds = ["out", "in"] if handler in DW_FNS else ["out" if dg.is_out_channel_pruning_fn(handler) else "in"]
        for kind in kinds:
            key = (name, kind)
            if key in done:
                continue
            done.add(key)
            if key not in channels:
                size = _dim_size(dg, module, kind)
                if size is None:
                    continue
                channels[key] = list(range(size))
                dense[key] = size
            current = channels[key]
            drop = set(int(i) for i in item.idxs)
            channels[key] = [c for j, c in enumerate(current) if j not in drop]
            if kind == "out" and isinstance(module, ROOT_TYPES):
                keep = [j for j in range(len(current)) if j not in drop]
                companions.append((module, keep, len(current)))
    return companions


def _dim_size(dg: Any, module: Any, kind: str) -> int | None:
    try:
        return dg.get_out_channels(module) if kind == "out" else dg.get_in_channels(module)
    except Exception:  # pruners of exotic layers may not know their width
        return None


def _prune_companions(companions: Sequence[tuple[nn.Module, list[int], int]]) -> None:
    """Slices the extra per-output-channel tensors of pruned conv/linear subclasses (module docstring)."""
    for module, keep, width in companions:
        index = torch.as_tensor(keep, dtype=torch.long)
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if name in ("weight", "bias") or t is None or t.ndim == 0 or t.shape[0] != width:
                    continue
                new = torch.index_select(t.detach(), 0, index.to(t.device))
                store[name] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new


def fix_attention(attn: Mapping[str, nn.Module], *, heads: bool = False) -> None:
    """Updates the head attributes of fused-qkv attention modules to their pruned ``qkv`` width.

    Head-dimension pruning keeps ``num_heads`` and narrows ``head_dim``; whole-head pruning (``heads``)
    keeps ``head_dim`` and lowers ``num_heads``. ``attn_dim`` is their product either way; ``scale``
    is left as it is (whole heads: ``head_dim`` and so ``head_dim^-0.5`` do not change).
    """
    for m in attn.values():
        if heads:
            head_dim = int(m.head_dim) if isinstance(getattr(m, "head_dim", None), int) else None
            if head_dim is None:  # a layout without head_dim: its dense width split by the dense head count
                continue
            m.num_heads = m.qkv.out_features // (3 * head_dim)
            if isinstance(getattr(m, "attn_dim", None), int):
                m.attn_dim = m.num_heads * head_dim
            continue
        heads_n = int(m.num_heads)
        head_dim = m.qkv.out_features // (3 * heads_n)
        if isinstance(getattr(m, "head_dim", None), int):
            m.head_dim = head_dim
        if isinstance(getattr(m, "attn_dim", None), int):
            m.attn_dim = heads_n * head_dim
