"""N:M semi-structured pruning (``--structure 2:4``): keep n of every m consecutive input weights.

For a Linear weight ``(out, in)`` a group is ``m`` consecutive weights of one row; for a convolution
``(out, in/groups, kh, kw)`` the row is the filter flattened in PyTorch's memory order
(``in × kh × kw``), so a group is ``m`` consecutive entries of that vector — the layout NVIDIA's
2:4 sparse tensor cores and ASP use after an im2col reshape. In every group the ``m − n``
lowest-scoring weights are removed; ties are broken by position (the lower index goes first), the
same ``(score, index)`` order as unstructured pruning. Layers whose row length is not a multiple of
``m`` (e.g. a 3-channel 3×3 stem: 27) cannot be grouped and are skipped (reported, with a warning).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence

import torch

from prunecli.errors import InputError
from prunecli.pruning.plan import LayerPlan, ScopePlan, UnstructuredPlan

__all__ = ["apply_nm", "parse_nm", "plan_nm", "prune_nm"]

_LOG = logging.getLogger("prunecli")
_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(text: str) -> tuple[int, int] | None:
    """``"2:4"`` → ``(2, 4)``; None when ``text`` is not of the form N:M.

    Raises:
        InputError: N:M with ``n < 1`` or ``n >= m``.
    """
    match = _PATTERN.match(text)
    if not match:
        return None
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise InputError(f"structure {text!r}: N:M needs 1 <= N < M", hint="e.g. --structure 2:4")
    return n, m


def plan_nm(weights: Mapping[str, torch.Tensor], names: Sequence[str], n: int, m: int) -> UnstructuredPlan:
    """Which layers N:M pruning prunes and how many weights each loses (``numel·(m−n)/m``); warns on skipped ones.

    The count does not depend on the scores (every group of ``m`` loses ``m − n``); which weights go
    does, and is decided per group by :func:`apply_nm`. Each layer is its own scope.
    """
    layers: list[LayerPlan] = []
    skipped: list[str] = []
    for name in names:
        w = weights[name]
        row = w[0].numel() if w.ndim > 1 else 0
        if row == 0 or row % m:
            skipped.append(name)
            continue
        layers.append(LayerPlan(name, w.numel(), w.numel() // m * (m - n)))
    if skipped:
        _LOG.warning(
            "N:M %d:%d skipped %d layer(s) whose input length is not a multiple of %d: %s",
            n,
            m,
            len(skipped),
            m,
            ", ".join(skipped),
        )
    scopes = tuple(ScopePlan((lp.name,), lp.removed, (m - n) / m) for lp in layers)
    return UnstructuredPlan(f"{n}:{m}", scopes, tuple(layers), tuple(skipped))


def apply_nm(
    weights: Mapping[str, torch.Tensor],
    score_of: Callable[[str], torch.Tensor] | None,
    plan: UnstructuredPlan,
    *,
    on_mask: Callable[[str, torch.Tensor], None] | None = None,
) -> dict[str, int]:
    """Keeps the ``n`` highest-scoring weights of every group of ``m`` in the plan's layers, in place.

    Returns:
        parameter name → weights removed.
    """
    n, m = (int(x) for x in plan.structure.split(":"))
    removed: dict[str, int] = {}
    for lp in plan.layers:
        name, w = lp.name, weights[lp.name]
        row = w[0].numel()
        s = torch.abs(w) if score_of is None else score_of(name)
        if tuple(s.shape) != tuple(w.shape):
            raise InputError(
                f"scores of {name!r} have shape {list(s.shape)}, the weight has {list(w.shape)}",
                hint="N:M pruning needs per-weight scores",
            )
        groups = s.detach().to(torch.float32).reshape(w.shape[0], row // m, m) + 0.0  # -0.0 == 0.0
        if bool(torch.isnan(groups).any()):
            raise InputError(f"scores of {name!r} hold NaN", hint="recompute the scores")
        order = torch.sort(groups, dim=-1, stable=True).indices[..., : m - n]  # ascending, ties by index
        keep = torch.ones(groups.shape, dtype=torch.bool).scatter_(-1, order, False).view(w.shape)
        with torch.no_grad():
            w.mul_(keep)  # as torch.nn.utils.prune applies masks
        if on_mask is not None:
            on_mask(name, ~keep)
        removed[name] = order.numel()
    return removed


def prune_nm(
    weights: Mapping[str, torch.Tensor],
    score_of: Callable[[str], torch.Tensor] | None,
    names: Sequence[str],
    n: int,
    m: int,
    *,
    on_mask: Callable[[str, torch.Tensor], None] | None = None,
) -> tuple[dict[str, int], list[str]]:
    """Keeps the ``n`` highest-scoring weights of every group of ``m``, in place: :func:`plan_nm` + :func:`apply_nm`.

    Args:
        weights: parameter name → weight (modified in place).
        score_of: parameter name → scores of the weight's shape (higher = keep); None: ``|w|``.
        names: the parameters to prune, in layer order.
        n: weights kept per group.
        m: group size.
        on_mask: called as ``on_mask(name, removed)`` with the boolean mask of removed weights.

    Returns:
        (parameter name → weights removed, names skipped because their rows do not split into groups).

    Example:
        >>> prune_nm({"fc.weight": w}, lambda _: w.abs(), ["fc.weight"], 2, 4)
    """
    plan = plan_nm(weights, names, n, m)
    return apply_nm(weights, score_of, plan, on_mask=on_mask), list(plan.skipped)
