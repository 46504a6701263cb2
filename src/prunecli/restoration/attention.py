"""Attention: pruned value dimensions of a fused ``qkv`` compensated per head in ``proj`` (docs/restoration.md).

In timm's attention (ViT, DeiT, EVA, BEiT, …) head ``h`` outputs ``o_h = A_h V_h`` with ``V_h = X W_vh + b_vh``
and ``proj`` reads the heads' outputs concatenated. For *fixed* attention weights ``A_h`` the value path
is linear, and ``A_h`` mixes tokens, never dimensions: if a pruned value dimension ``j`` of head ``h``
is a combination of the head's kept ones, ``w_j = Σ_i s_i w_i`` (``i`` in the same head), then
``o_hj − b_j = Σ_i s_i (o_hi − b_i)`` for every token, and adding ``s_i`` times ``proj``'s column ``j`` to
its column ``i`` gives back the dense ``proj`` output up to a constant. The constant is exact too: each
row of ``A_h`` sums to one, so a value bias reaches ``proj`` unchanged, and ``(b_j − Σ_i s_i b_i)`` times
column ``j`` is added to ``proj``'s bias. So each head is one ridge regression of the value *weights*
(LBYL's form without BatchNorm, or a Neuron-Merging match) on the head's own kept dimensions; with
isotropic inputs the error left is ``‖w_j − Σ s_i w_i‖²·tr(A_hᵀA_h)``, never more than pruning's.

What this cannot compensate: the pruned *query/key* dimensions (channel pruning removes the same
dimensions from q, k and v) drop terms of the attention logits ``q·k``, which changes ``A_h`` itself,
through a softmax; no change of ``proj`` undoes that. They are exact only when the pruned q/k terms are
zero. ``lstsq`` refits ``proj`` (and ``qkv``'s kept rows where that lowers the attention output error)
on calibration data instead.

Whole heads (``prune --heads``): a removed head takes its q, k and v rows with it, so the kept heads'
attention weights are the dense ones (nothing of theirs is approximate), and there is nothing *within*
the head left to rebuild its value dimensions from. Another head cannot stand in for it either: its
output is mixed by its own attention weights, not the removed head's. What can be compensated without
data is the removed head's value *bias*: ``A_h (1 b_hᵀ) = 1 b_hᵀ`` for any softmax weights, so its
contribution through ``proj`` is the constant ``W_proj[:, h] b_h``, folded into ``proj``'s bias exactly
(the same fold as for pruned value dimensions, with no kept dimensions to combine). What the head
computed from the tokens is lost; ``lstsq`` refits ``proj`` on the kept heads' outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from prunecli.restoration.core import ProducerStats, RestoreContext, _layer_list
from prunecli.restoration.graph import AttentionSpec, Consumer, Group, Pair

__all__ = ["compensate_attention", "compensate_values", "value_split"]

# coefficients of one head: (stats of the value rows, kept, pruned) → S' (|pruned| × |kept|) and a count
Coefficients = Callable[[ProducerStats, Sequence[int], Sequence[int]], tuple[torch.Tensor, int]]


def value_split(spec: AttentionSpec, kept_qkv: Sequence[int]) -> tuple[list[int], list[int], bool]:
    """Kept and pruned value dimensions (indices into ``proj``'s input) and whether q/k lost dimensions in a
    head that is not removed whole (those change the attention weights of a head that still runs).

    ``qkv``'s outputs are q, k, v, each ``num_heads × head_dim`` head-major: value dimension ``d`` of
    head ``h`` is output ``2C + h·head_dim + d`` and ``proj`` input ``h·head_dim + d`` (``C`` the width).
    """
    width = spec.num_heads * spec.head_dim
    kept_v = [k - 2 * width for k in kept_qkv if k >= 2 * width]
    pruned_v = sorted(set(range(width)) - set(kept_v))
    gone = set(removed_heads(spec, kept_qkv))
    kept_qk = sum(1 for k in kept_qkv if k < 2 * width)
    qk_pruned = kept_qk < 2 * width - 2 * spec.head_dim * len(gone)
    return kept_v, pruned_v, qk_pruned


def removed_heads(spec: AttentionSpec, kept_qkv: Sequence[int]) -> list[int]:
    """Heads whose q, k and v rows are all pruned (whole-head pruning), in dense numbering."""
    kept = set(kept_qkv)
    width, d = spec.num_heads * spec.head_dim, spec.head_dim
    return [
        h
        for h in range(spec.num_heads)
        if not any(part * width + h * d + i in kept for part in range(3) for i in range(d))
    ]


def compensate_values(ctx: RestoreContext, group: Group, kept_qkv: Sequence[int], coefficients: Coefficients,
                      method: str, count_key: str) -> dict[str, object]:  # fmt: skip
    """Folds each head's pruned value dimensions into ``proj``; returns the record row.

    ``coefficients`` is the method's per-head solver (LBYL's ridge, Neuron Merging's match); its count
    (solver fallbacks, channels merged) is summed over heads under ``count_key``.
    """
    assert ctx.dense is not None and group.attention is not None
    spec = group.attention
    kept_v, pruned_v, qk_pruned = value_split(spec, kept_qkv)
    gone = removed_heads(spec, kept_qkv)
    qkv = ctx.dense.get_submodule(spec.qkv)
    width = spec.num_heads * spec.head_dim
    w = qkv.weight.detach().to(torch.float64).cpu()[2 * width :]
    b = qkv.bias.detach().to(torch.float64).cpu()[2 * width :] if qkv.bias is not None else torch.zeros(width)
    # the regression is on the weights only: the value bias reaches proj unchanged (softmax rows sum to
    # one, so A·(b·1) = b·1), and what the kept dims do not carry of it is folded into proj's bias exactly
    stats = ProducerStats(w, torch.zeros(width, dtype=torch.float64))
    s_prime = torch.zeros(len(pruned_v), len(kept_v), dtype=torch.float64)
    count = 0
    for h in range(spec.num_heads):
        lo, hi = h * spec.head_dim, (h + 1) * spec.head_dim
        rows = [r for r, j in enumerate(pruned_v) if lo <= j < hi]
        cols = [c for c, i in enumerate(kept_v) if lo <= i < hi]
        if not rows or not cols:
            continue  # a head with nothing pruned, or all of it pruned: nothing to combine within it
        s_head, n = coefficients(stats, [kept_v[c] for c in cols], [pruned_v[r] for r in rows])
        s_prime[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = s_head
        count += n
    pair = Pair(spec.qkv, consumers=[Consumer(spec.proj, 1)])
    consumers = ctx.compensate(pair, kept_v, pruned_v, s_prime) if pruned_v else []
    if pruned_v:
        residual = b.to(torch.float64)[pruned_v] - s_prime @ b.to(torch.float64)[kept_v]  # per pruned dim
        proj = ctx.dense.get_submodule(spec.proj)
        rows = ctx.plan.get(spec.proj, {}).get("out", {}).get("kept") or list(range(proj.out_features))
        shift = proj.weight.detach().to(torch.float64).cpu()[rows][:, pruned_v] @ residual
        with torch.no_grad():
            ctx.add_bias(spec.proj, ctx.pruned.get_submodule(spec.proj), shift)
    ctx.done(group, method)
    return {"method": method, "consumers": consumers, "kept": len(kept_v), "pruned": len(pruned_v),
            "heads": spec.num_heads, "heads_removed": len(gone), "kind": "attention", count_key: count,
            "qk_pruned": qk_pruned,
            "exact_theory": not qk_pruned and not gone}  # fmt: skip


def compensate_attention(ctx: RestoreContext, coefficients: Coefficients, method: str, count_key: str) -> None:
    """:func:`compensate_values` for every pruned attention of ``ctx``; one warning for all q/k losses."""
    approximate, headless = [], []
    for group, kept_qkv in ctx.attention_units():
        row = compensate_values(ctx, group, kept_qkv, coefficients, method, count_key)
        ctx.layers[group.producers[0]] = row
        if row["heads_removed"]:
            headless.append(group.producers[0])
        if row["qk_pruned"]:
            approximate.append(group.producers[0])
    if headless:
        ctx.warn(f"{_layer_list(headless)}: whole heads removed: only their value bias is compensated (a "
                 "constant, in proj's bias); what they computed from the tokens is lost (lstsq refits proj on "
                 "data)")  # fmt: skip
    if approximate:
        ctx.warn(f"{_layer_list(approximate)}: restoration is approximate (pruned query/key dimensions change the "
                 "attention weights; only value dimensions are compensated, in proj)")  # fmt: skip
