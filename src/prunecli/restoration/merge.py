"""Neuron Merging (Kim et al., NeurIPS 2020): the one-to-one baseline LBYL is compared with (docs/restoration.md).

Each pruned channel ``j`` is merged into the *single* most similar kept channel ``i`` with a positive
scale (so it commutes with ReLU); below a cosine threshold it is simply dropped.

* Without BN (FC nets with biases): compare ``w̃ = [w; b]``, pick ``argmax cos``, scale
  ``‖w̃_j‖ / ‖w̃_i‖``.
* With BN: score every candidate by ``λ·(1 − cos) + (1 − λ)·B̂_i`` where ``B_i`` is the bias mismatch
  left by the merge (min–max normalised over candidates); apply the merged scale
  ``S_i = s_i·K_ji`` (math mode, exact when ``w_j = s_i w_i``). ``mode=compat`` uses the reference
  code's inverted BN ratio and σ = running variance, to reproduce NM's published numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prunecli.errors import InputError
from prunecli.restoration.core import ProducerStats, RestoreContext

__all__ = ["merge_coefficients", "restore_merge"]

MODES = ("math", "compat")


def merge_coefficients(
    stats: ProducerStats,
    kept: Sequence[int],
    pruned: Sequence[int],
    *,
    threshold: float,
    lam: float,
    mode: str = "math",
) -> tuple[torch.Tensor, int]:
    """``S'`` (|J|×p, one non-zero per merged row) and the number of channels merged."""
    kept, pruned = list(kept), list(pruned)
    s_prime = torch.zeros(len(pruned), len(kept), dtype=torch.float64)
    if not kept or not pruned:
        return s_prime, 0
    w = stats.weight if stats.has_bn else torch.cat([stats.weight, stats.bias[:, None]], dim=1)
    norms = w.norm(dim=1).clamp_min(1e-300)
    cos = (w[pruned] @ w[kept].T) / (norms[pruned][:, None] * norms[kept][None, :])
    ratio = norms[pruned][:, None] / norms[kept][None, :]  # s_i = ‖w_j‖ / ‖w_i‖
    if not stats.has_bn:
        best = cos.argmax(dim=1)
        rows = torch.arange(len(pruned))
        ok = cos[rows, best] >= threshold
        s_prime[rows[ok], best[ok]] = ratio[rows[ok], best[ok]]
        return s_prime, int(ok.sum())
    gamma, beta, mean = stats.gamma, stats.beta, stats.mean
    sigma = stats.var if mode == "compat" else torch.sqrt(stats.var + stats.eps)
    safe_gamma = torch.where(gamma == 0, torch.full_like(gamma, 1e-300), gamma)
    a = mean - sigma * beta / safe_gamma
    gj, sj, aj = (t[pruned][:, None] for t in (gamma, sigma, a))
    gi, si, ai = (t[kept][None, :] for t in (safe_gamma, sigma, a))
    if mode == "compat":
        scale = ratio * (gi / gj) * (sj / si)
        bias = (gi / si * (ratio * aj - ai)).abs() / scale
    else:
        scale = ratio * gj * si / (sj * gi)  # = s_i · K_ji
        bias = (gj / sj * (ratio * ai - aj)).abs() / scale.abs()
    lo, hi = bias.min(dim=1, keepdim=True).values, bias.max(dim=1, keepdim=True).values
    bias_n = (bias - lo) / (hi - lo).clamp_min(1e-300)
    score = lam * (1 - cos) + (1 - lam) * bias_n
    score = torch.where(torch.isfinite(score), score, torch.full_like(score, float("inf")))
    best = score.argmin(dim=1)
    rows = torch.arange(len(pruned))
    ok = (cos[rows, best] >= threshold) & torch.isfinite(scale[rows, best])
    s_prime[rows[ok], best[ok]] = scale[rows[ok], best[ok]]
    return s_prime, int(ok.sum())


def restore_merge(ctx: RestoreContext, params: dict[str, Any]) -> None:
    """Restores every restorable group of ``ctx`` with Neuron Merging (registered as ``merge``).

    A residual stream is matched on its producers' stacked post-norm affine maps
    (:meth:`RestoreContext.stream_stats`), a fused attention per head (only within a head).
    """
    from prunecli.restoration.attention import compensate_attention

    mode, lam = str(params["mode"]), float(params["lambda"])
    if mode not in MODES:
        raise InputError(f"unknown merge mode {mode!r}; choose from {', '.join(MODES)}")
    if not 0.0 <= lam <= 1.0:
        raise InputError(f"merge: lambda must lie in [0, 1], got {lam}")
    t = params["threshold"]
    for unit in ctx.restorable():
        pair, kept, pruned = unit.pair, unit.kept, unit.pruned
        stream = unit.group.kind == "stream"
        stats = ctx.stream_stats(unit) if stream else ctx.producer_stats(pair)
        # NM's defaults: t = 0.1 for conv+BN, 0.45 for FC layers with biases (scripts/*.sh); a stream of
        # BN-normalised producers is compared on its post-norm maps, as conv+BN
        with_bn = stats.has_bn or (stream and any(m.norm is not None for m in unit.members))
        threshold = float(t) if t is not None else (0.1 if with_bn else 0.45)
        constants = {} if stream else ctx.constant_channels(stats, pruned)
        regress = [j for j in pruned if j not in constants]
        s_sub, merged = merge_coefficients(stats, kept, regress, threshold=threshold, lam=lam, mode=mode)
        s_prime = torch.zeros(len(pruned), len(kept), dtype=torch.float64)
        if regress:
            s_prime[[pruned.index(j) for j in regress]] = s_sub
        consumers = ctx.compensate(pair, kept, pruned, s_prime, constants)
        ctx.done(unit.group, "merge")
        ctx.layers[pair.producer] = {
            "method": "merge",
            "consumers": consumers,
            "kept": len(kept),
            "pruned": len(pruned),
            "merged": merged,
            "threshold": threshold,
            "activation": pair.activation,
            "bn": pair.norm is not None,
            "exact_theory": not pair.approximate and not stream,
            "constant_channels": len(constants),
            **({"kind": "stream", "producers": unit.group.producers} if stream else {}),
        }
    threshold = float(t) if t is not None else 0.45  # the value path has no BN: NM's FC default

    def per_head(stats: ProducerStats, kept: Sequence[int], pruned: Sequence[int]) -> tuple[torch.Tensor, int]:
        return merge_coefficients(stats, kept, pruned, threshold=threshold, lam=lam, mode=mode)

    compensate_attention(ctx, per_head, "merge", "merged")
