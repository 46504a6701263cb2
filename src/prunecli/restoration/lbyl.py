"""LBYL — Leave Before You Leave (paper B): data-free restoration in closed form (docs/restoration.md).

Every pruned channel ``j`` of a producer leaves its information to *all* kept channels ``P``: the
coefficients ``s_j`` minimise the reconstruction error of its filter, a bias-error term and an
activation-error proxy,

    L_j(s) = ‖w_j − W_P s‖² + λ1 c_j (a_j − a_Pᵀ s)² + λ2 Σ_i (K_ji s_i)²,

whose minimiser solves ``(G + c_j M) s_j = b_j`` with ``G = W_PᵀW_P`` shared by all ``j``. The
coefficients actually folded into the consumer are ``s'_j = K_j ⊙ s_j`` (math mode) — with those, the
identity in docs/restoration.md is exact. ``mode=compat`` reproduces the authors' code (σ = running variance, a
diagonal bias term, ``s`` applied unscaled, centred FC ridge) to reproduce its published numbers.

Without BatchNorm (FC nets, a ViT's MLP) the bias is appended to each filter and the problem is a
ridge regression with ``λ = λ2`` (docs/restoration.md; ``λ1`` does not apply).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prunecli.errors import InputError
from prunecli.restoration.core import ProducerStats, RestoreContext

__all__ = ["lbyl_coefficients", "lbyl_system", "restore_lbyl", "solve_batched", "solve_per_filter"]

MODES = ("math", "compat")


def lbyl_system(
    stats: ProducerStats,
    kept: Sequence[int],
    pruned: Sequence[int],
    *,
    lambda1: float,
    lambda2: float,
    mode: str = "math",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The linear systems ``(G + c_j M) s_j = b_j`` and the factors ``K`` of docs/restoration.md.

    Returns:
        ``G`` (p×p), ``B`` (p×|J|, columns ``b_j``), ``M`` (p×p), ``c`` (|J|) and ``K`` (|J|×p, the
        factor turning ``s_j`` into the applied ``s'_j``; all ones where ``s`` is applied as is).
    """
    if mode not in MODES:
        raise InputError(f"unknown lbyl mode {mode!r}; choose from {', '.join(MODES)}")
    p_idx, j_idx = list(kept), list(pruned)
    if not stats.has_bn:
        w = torch.cat([stats.weight, stats.bias[:, None]], dim=1)  # w̃ = [w; b]
        if mode == "compat":  # sklearn Ridge(fit_intercept=True) centres every filter vector
            w = w - w.mean(dim=1, keepdim=True)
        wp, wj = w[p_idx], w[j_idx]
        g = wp @ wp.T
        b = wp @ wj.T
        m = lambda2 * torch.eye(len(p_idx), dtype=torch.float64)
        c = torch.ones(len(j_idx), dtype=torch.float64)
        return g, b, m, c, torch.ones(len(j_idx), len(p_idx), dtype=torch.float64)
    gamma, beta, mean = stats.gamma, stats.beta, stats.mean
    sigma = stats.var if mode == "compat" else torch.sqrt(stats.var + stats.eps)
    a = mean - sigma * beta / gamma  # the affine-BN shorthand (docs/restoration.md)
    wp, wj = stats.weight[p_idx], stats.weight[j_idx]
    gp, sp, ap = gamma[p_idx], sigma[p_idx], a[p_idx]
    c = (gamma[j_idx] / sigma[j_idx]) ** 2
    q = (sp / gp) ** 2
    g = wp @ wp.T
    b = wp @ wj.T + lambda1 * (c * a[j_idx])[None, :] * ap[:, None]
    if mode == "compat":
        m = lambda1 * float(ap @ ap) * torch.eye(len(p_idx), dtype=torch.float64) + lambda2 * torch.diag(q)
        k = torch.ones(len(j_idx), len(p_idx), dtype=torch.float64)
    else:
        m = lambda1 * torch.outer(ap, ap) + lambda2 * torch.diag(q)
        k = (gamma[j_idx] / sigma[j_idx])[:, None] * (sp / gp)[None, :]
    return g, b, m, c, k


def solve_per_filter(g: torch.Tensor, b: torch.Tensor, m: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Solves each ``(G + c_j M) s_j = b_j`` on its own in float64 (the fallback; docs/restoration.md).

    ``torch.linalg.solve`` first; on a singular matrix a Cholesky factorisation with jitter
    ``1e-10·tr(A)/p``; then the least-norm least-squares solution (``p > d`` with ``λ2 = 0``).
    """
    p = g.shape[0]
    out = torch.empty(p, b.shape[1], dtype=torch.float64)
    eye = torch.eye(p, dtype=torch.float64)
    for col in range(b.shape[1]):
        a = g + c[col] * m
        rhs = b[:, col]
        s = None
        try:
            s = torch.linalg.solve(a, rhs)
        except RuntimeError:
            s = None
        if s is None or not bool(torch.isfinite(s).all()):
            jitter = 1e-10 * float(torch.trace(a)) / max(p, 1)
            factor, info = torch.linalg.cholesky_ex(a + jitter * eye)
            if int(info) == 0:
                s = torch.cholesky_solve(rhs[:, None], factor)[:, 0]
            else:
                s = torch.linalg.lstsq(a, rhs[:, None], driver="gelsd").solution[:, 0]
        out[:, col] = s
    return out


def solve_batched(
    g: torch.Tensor, b: torch.Tensor, m: torch.Tensor, c: torch.Tensor, *, tol: float = 1e-8
) -> tuple[torch.Tensor, int]:
    """Solves all ``(G + c_j M) s_j = b_j`` at once (docs/restoration.md); returns ``S`` (p×|J|) and the fallback count.

    With ``M = L Lᵀ`` (Cholesky) and ``L⁻¹ G L⁻ᵀ = U Λ Uᵀ`` (one eigendecomposition per layer),
    ``s_j = L⁻ᵀ U (Λ + c_j)⁻¹ Uᵀ L⁻¹ b_j`` is one batched matmul — no ``|J|×p×p`` tensor. Columns whose
    relative residual exceeds ``tol`` (ill-conditioned ``M``) and every column when ``M`` is not
    positive definite (``λ2 = 0``) are re-solved one by one with :func:`solve_per_filter`.
    """
    g, b, m, c = (t.to(torch.float64) for t in (g, b, m, c))
    if b.shape[1] == 0:
        return b.clone(), 0
    factor, info = torch.linalg.cholesky_ex(m)
    if int(info) != 0 or not bool(torch.isfinite(factor).all()):
        return solve_per_filter(g, b, m, c), b.shape[1]
    y = torch.linalg.solve_triangular(factor, g, upper=False)  # L⁻¹ G
    h = torch.linalg.solve_triangular(factor, y.T, upper=False)  # L⁻¹ G L⁻ᵀ
    lam, u = torch.linalg.eigh((h + h.T) / 2)
    t = u.T @ torch.linalg.solve_triangular(factor, b, upper=False)
    t = t / (lam[:, None] + c[None, :])
    s = torch.linalg.solve_triangular(factor.T, u @ t, upper=True)
    resid = (g @ s + (m @ s) * c[None, :] - b).norm(dim=0) / b.norm(dim=0).clamp_min(1e-300)
    bad = (~torch.isfinite(resid)) | (resid > tol)
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten()
        s[:, idx] = solve_per_filter(g, b[:, idx], m, c[idx])
    return s, int(bad.sum())


def lbyl_coefficients(
    stats: ProducerStats,
    kept: Sequence[int],
    pruned: Sequence[int],
    *,
    lambda1: float,
    lambda2: float,
    mode: str = "math",
) -> tuple[torch.Tensor, int]:
    """``S'`` (|J|×p) for one producer; kept channels with γ = 0 are left out of the regression."""
    kept, pruned = list(kept), list(pruned)
    usable = list(range(len(kept)))
    if stats.has_bn:
        usable = [i for i, k in enumerate(kept) if float(stats.gamma[k]) != 0.0]
    s_prime = torch.zeros(len(pruned), len(kept), dtype=torch.float64)
    if not usable or not pruned:
        return s_prime, 0
    sub = [kept[i] for i in usable]
    g, b, m, c, k = lbyl_system(stats, sub, pruned, lambda1=lambda1, lambda2=lambda2, mode=mode)
    s, fallbacks = solve_batched(g, b, m, c)
    s_prime[:, usable] = s.T * k
    return s_prime, fallbacks


def restore_lbyl(ctx: RestoreContext, params: dict[str, Any]) -> None:
    """Restores every restorable group of ``ctx`` with LBYL (registered as ``lbyl``).

    A block's producer is solved as in the paper; a residual stream jointly over its producers'
    post-norm affine maps (:meth:`RestoreContext.stream_stats`, ridge form); a fused attention per
    head into ``proj`` (:mod:`prunecli.restoration.attention`).
    """
    from prunecli.restoration.attention import compensate_attention

    lambda1, lambda2, mode = float(params["lambda1"]), float(params["lambda2"]), str(params["mode"])
    if lambda1 < 0 or lambda2 < 0:
        raise InputError("lbyl: lambda1 and lambda2 must be >= 0")
    if mode not in MODES:
        raise InputError(f"unknown lbyl mode {mode!r}; choose from {', '.join(MODES)}")
    for unit in ctx.restorable():
        pair, kept, pruned = unit.pair, unit.kept, unit.pruned
        stream = unit.group.kind == "stream"
        stats = ctx.stream_stats(unit) if stream else ctx.producer_stats(pair)
        constants = {} if stream else ctx.constant_channels(stats, pruned)
        regress = [j for j in pruned if j not in constants]
        s_sub, fallbacks = lbyl_coefficients(stats, kept, regress, lambda1=lambda1, lambda2=lambda2, mode=mode)
        s_prime = torch.zeros(len(pruned), len(kept), dtype=torch.float64)
        if regress:
            s_prime[[pruned.index(j) for j in regress]] = s_sub
        consumers = ctx.compensate(pair, kept, pruned, s_prime, constants)
        ctx.done(unit.group, "lbyl")
        ctx.layers[pair.producer] = {
            "method": "lbyl",
            "consumers": consumers,
            "kept": len(kept),
            "pruned": len(pruned),
            "activation": pair.activation,
            "bn": pair.norm is not None,
            "exact_theory": not pair.approximate and not stream,
            "constant_channels": len(constants),
            "solve_fallbacks": fallbacks,
            **({"kind": "stream", "producers": unit.group.producers} if stream else {}),
        }

    def per_head(stats: ProducerStats, kept: Sequence[int], pruned: Sequence[int]) -> tuple[torch.Tensor, int]:
        return lbyl_coefficients(stats, kept, pruned, lambda1=lambda1, lambda2=lambda2, mode=mode)

    compensate_attention(ctx, per_head, "lbyl", "solve_fallbacks")
