"""The per-layer solver: OBS weight updates on SparseGPT's column schedule (docs/obs.md).

A layer ``y = W x`` with weight ``W`` (``rows × cols``; a conv filter flattened to ``in/groups·kh·kw``)
and calibration inputs ``X`` is pruned to a mask and its surviving weights are moved so that
``‖(W − Ŵ) X‖²_F = Σ_rows (w − ŵ) H (w − ŵ)ᵀ`` (``H = X Xᵀ``) stays small:

1. ``H`` is dampened (``H + λ·mean(diag H)·I``) so it can be inverted; inputs that never carry signal
   (``H_jj = 0``) get ``H_jj = 1`` and are decoupled from the others.
2. ``U``, the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``), holds in its row ``j`` the inverse Hessian
   of the columns ``j..cols`` that are still free when column ``j`` is processed, so every row of ``W``
   can be updated with the same factor.
3. Columns are processed left to right in blocks; inside a block the updates touch the block only and
   the rest of the matrix receives them at the block's end in one product (lazy batch updates).
4. The mask is given (``keep``: restoration keeps it) or chosen while the columns are processed, by
   the saliency ``w² / U_jj²`` (the OBS loss of removing the weight): per row a share of each block
   (unstructured) or ``m − n`` of every group of ``m`` consecutive columns (N:M).

The schedule freezes a column once it is processed, so it is not the least-squares optimum for its
mask; in rare rows it is even worse than zeroing the weights without any update (docs/obs.md gives a
three-input example). :func:`obs_prune` therefore compares each row's error with that of the plain
mask on the undamped ``H`` and keeps the better one (``guard``), so the result is never worse than
masking on the calibration data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prunecli.errors import InputError

__all__ = ["NM", "ObsResult", "Selector", "dampen", "inverse_cholesky", "obs_prune", "row_errors", "selector"]


@dataclass(frozen=True)
class NM:
    """N:M semi-structured target: keep ``n`` of every ``m`` consecutive columns of a row."""

    n: int
    m: int


@dataclass(frozen=True)
class Selector:
    """How the columns ``[j1, j2)`` of the pruned set are decided.

    Attributes:
        segment: columns decided at once (a block for unstructured and given masks, ``m`` for N:M).
        select: ``select(w, u_diag, dead, j1, j2)`` → boolean ``rows × (j2 − j1)``, True = prune; ``w``
            are the current (already updated) weights of the segment, ``u_diag`` the factor's diagonal
            there, ``dead`` marks its inputs that carry no signal.
    """

    segment: int | None
    select: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


@dataclass(frozen=True)
class ObsResult:
    """Output of :func:`obs_prune`.

    Attributes:
        weight: the reconstructed weight, same shape and dtype as the input, exact zeros where pruned.
        keep: boolean mask (True = keep), the weight's shape.
        error_mask: ``Σ_rows (w − w⊙keep) H (w − w⊙keep)ᵀ`` — the plain mask's error on the undamped H.
        error_obs: the same for the returned weight.
        fallback_rows: rows where the OBS update was worse than the plain mask and was not applied.
        signal: ``Σ_rows w H wᵀ = ‖W X‖²``, the scale for relative errors.
    """

    weight: torch.Tensor
    keep: torch.Tensor
    error_mask: float
    error_obs: float
    fallback_rows: int
    signal: float = 0.0


def dampen(h: torch.Tensor, damp: float, *, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``H + λ·mean(diag H)·I`` with dead inputs (``H_jj = 0``) set to ``H_jj = 1``; returns (H', dead).

    The mean is over the original diagonal, dead inputs included as zeros. A dead input's row and
    column of ``H`` are zero (its activations are all zero), so after the fix it is decoupled: it
    neither receives nor gives compensation. With every input dead ``H'`` is the identity.
    ``inplace`` dampens a float64 ``h`` itself (only its diagonal changes) instead of a copy.

    Raises:
        InputError: ``damp <= 0`` (the undamped ``H`` is singular whenever there are fewer
            calibration positions than columns or two inputs are collinear).
    """
    if not damp > 0 or not math.isfinite(damp):
        raise InputError(f"damp={damp}: dampening must be a positive number", hint="e.g. -p damp=0.01")
    h = h.to(torch.float64)
    diag = torch.diagonal(h)
    dead = diag == 0
    mu = damp * float(diag.mean()) if diag.numel() else 0.0
    out = h if inplace else h.clone()
    d = torch.diagonal(out)
    d.add_(mu)
    d[dead] = 1.0
    return out, dead


def inverse_cholesky(h_damped: torch.Tensor) -> torch.Tensor:
    """Upper ``U`` with ``H⁻¹ = UᵀU``: row ``j`` scaled by ``1/U_jj`` is row ``j`` of the inverse of ``H[j:, j:]``.

    Computed without forming ``H⁻¹``: with ``J`` the order-reversing permutation and ``C`` the lower
    Cholesky factor of ``J H J``, ``H = K Kᵀ`` with ``K = J C J`` upper triangular, so ``H⁻¹ = K⁻ᵀ K⁻¹`` and
    ``U = K⁻¹ = J C⁻¹ J``. One factorisation and one triangular inverse (``2d³/3`` flops) instead of a
    factorisation, an inverse and a second factorisation (``4d³/3``); everything happens in one ``d × d``
    buffer besides ``H`` (plus one ``d/2 × d/2`` block for the triangular solves, 256-row panels for the flip).

    Raises:
        InputError: the dampened matrix is not positive definite (non-finite activations).
    """
    if not bool(torch.isfinite(h_damped).all()):
        raise InputError("the calibration activations hold NaN or inf", hint="check the model and the data")
    work = torch.flip(h_damped, (0, 1))
    info = torch.empty((), dtype=torch.int32, device=h_damped.device)
    torch.linalg.cholesky_ex(work, out=(work, info))
    if int(info) != 0:
        raise InputError("the dampened Gram matrix is not positive definite", hint="raise -p damp")
    _invert_lower(work)
    _flip_both(work)
    return work


_PANEL = 256  # the order at which the triangular inverse stops recursing; rows per panel of the flip


def _invert_lower(c: torch.Tensor) -> None:
    """Inverts a lower-triangular matrix in place: ``[[A, 0], [B, D]]⁻¹ = [[A⁻¹, 0], [−D⁻¹ B A⁻¹, D⁻¹]]``.

    ``B`` is replaced first, by two triangular solves with the *uninverted* ``A`` and ``D`` (``(n/2)³``
    flops each, where products with the inverted halves would cost twice that), then both halves are
    inverted recursively: ``n³/3`` flops in all, LAPACK's ``trtri`` count. Temporaries: one ``n/2 × n/2``
    block at the top level.
    """
    n = c.shape[0]
    if n <= _PANEL:
        eye = torch.eye(n, dtype=c.dtype, device=c.device)
        c.copy_(torch.linalg.solve_triangular(c, eye, upper=False))
        return
    k = n // 2
    a, b, d = c[:k, :k], c[k:, :k], c[k:, k:]
    x = torch.linalg.solve_triangular(d, b, upper=False)  # D⁻¹ B
    b.copy_(torch.linalg.solve_triangular(a, x, upper=False, left=False).neg_())  # −D⁻¹ B A⁻¹
    del x
    _invert_lower(a)
    _invert_lower(d)


def _flip_both(m: torch.Tensor) -> None:
    """``m ← J m J`` (rows and columns reversed) in place, swapping mirrored panels of rows."""
    n = m.shape[0]
    for i in range(0, n // 2, _PANEL):
        b = min(_PANEL, n // 2 - i)
        top = m[i : i + b].flip((0, 1)).clone()
        m[i : i + b] = m[n - i - b : n - i].flip((0, 1))
        m[n - i - b : n - i] = top
    if n % 2:
        m[n // 2] = m[n // 2].flip(0).clone()


def row_errors(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-row ``(w − ŵ) H (w − ŵ)ᵀ`` = ``‖(w − ŵ) X‖²`` for every row, computed in ``h``'s dtype (float64 out)."""
    delta = (w - w_hat).to(h.dtype)
    return ((delta @ h) * delta).sum(dim=1).to(torch.float64).clamp_min(0.0)


def _given(keep: torch.Tensor) -> Selector:
    prune = ~keep.to(torch.bool)
    return Selector(None, lambda w, u, dead, j1, j2: prune[:, j1:j2].to(w.device))


def _unstructured(ratio: float, cols: int) -> Selector:
    """Per row, ``round(ratio·j2) − round(ratio·j1)`` weights of ``[j1, j2)``: ``round(ratio·cols)`` in all.

    ``round`` is Python's (half to even), the count unstructured pruning uses for ``round(r·N)``.
    """

    def select(w: torch.Tensor, u_diag: torch.Tensor, dead: torch.Tensor, j1: int, j2: int) -> torch.Tensor:
        return _smallest(w, u_diag, dead, round(ratio * j2) - round(ratio * j1))

    if not 0.0 <= ratio < 1.0:
        raise InputError(f"sparsity {ratio}: must be in [0, 1)")
    return Selector(None, select)


def _nm(n: int, m: int, cols: int) -> Selector:
    if not 1 <= n < m:
        raise InputError(f"N:M {n}:{m}: needs 1 <= N < M")
    if cols % m:
        raise InputError(f"N:M {n}:{m}: the row length {cols} is not a multiple of {m}")
    return Selector(m, lambda w, u, dead, j1, j2: _smallest(w, u, dead, m - n))


def _smallest(w: torch.Tensor, u_diag: torch.Tensor, dead: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` least salient weights of every row.

    Order: dead inputs first (removing them costs nothing on the calibration data), among them the
    smaller ``|w|`` first; then the live inputs by the OBS saliency ``w² / U_jj²``. Ties: the lower
    column goes first (both sorts are stable).
    """
    out = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    if k > 0:
        w2 = w.pow(2)
        key = torch.where(dead[None, :], w2, w2 / u_diag.pow(2)[None, :])
        order = torch.sort(key, dim=1, stable=True).indices
        if bool(dead.any()):  # dead inputs first, each group keeping its order (a stable sort on liveness)
            order = order.gather(1, torch.sort((~dead)[order].to(torch.int8), dim=1, stable=True).indices)
        out.scatter_(1, order[:, :k], True)
    return out


# target type → selector factory ``(target, cols) → Selector``
_SELECTORS: dict[type, Callable[[object, int], Selector]] = {
    torch.Tensor: lambda t, cols: _given(t),  # type: ignore[arg-type]
    float: lambda t, cols: _unstructured(float(t), cols),  # type: ignore[arg-type]
    int: lambda t, cols: _unstructured(float(t), cols),  # type: ignore[arg-type]
    NM: lambda t, cols: _nm(t.n, t.m, cols),  # type: ignore[attr-defined]
    tuple: lambda t, cols: _nm(int(t[0]), int(t[1]), cols),  # type: ignore[index]
}


def selector(target: torch.Tensor | float | NM | tuple[int, int], cols: int) -> Selector:
    """The selector for a target: a keep mask (Tensor), a per-row sparsity (float) or N:M (``NM``/``(n, m)``).

    Raises:
        InputError: an unknown target type or an invalid value.
    """
    for kind, make in _SELECTORS.items():
        if isinstance(target, kind) and not isinstance(target, bool):
            return make(target, cols)
    raise InputError(f"reconstruction target {target!r}: expected a keep mask, a sparsity or (n, m)")


def sparsegpt_solve(
    w: torch.Tensor,
    h_damped: torch.Tensor,
    sel: Selector,
    *,
    blocksize: int = 128,
    dead: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw schedule (no guard): returns (Ŵ in float64, prune mask).

    Args:
        w: ``rows × cols`` weight.
        h_damped: dampened ``cols × cols`` Gram matrix (see :func:`dampen`).
        sel: how the mask is decided.
        blocksize: columns per lazy-update block; for N:M rounded down to a multiple of ``m``.
        dead: inputs without signal (from :func:`dampen`), pruned first when the mask is chosen here.
    """
    rows, cols = w.shape
    if blocksize < 1:
        raise InputError(f"blocksize={blocksize}: must be >= 1")
    if sel.segment:
        blocksize = max(sel.segment, blocksize // sel.segment * sel.segment)  # a group never spans two blocks
    u = inverse_cholesky(h_damped)
    u_diag = torch.diagonal(u)
    if dead is None:
        dead = torch.zeros(cols, dtype=torch.bool, device=w.device)
    # the columns of W as contiguous rows: every per-column step reads and writes one contiguous vector
    wt = torch.empty((cols, rows), dtype=torch.float64, device=w.device).copy_(w.t())  # a copy: w is the caller's
    prune = torch.zeros((cols, rows), dtype=torch.bool, device=w.device)
    for j1 in range(0, cols, blocksize):
        j2 = min(j1 + blocksize, cols)
        w1 = wt[j1:j2]  # a view: the block is updated in place
        u1 = u[j1:j2, j1:j2]
        err = torch.zeros_like(w1)
        gone = torch.zeros_like(w1)  # 1.0 where pruned, so the column steps multiply instead of select
        seg = sel.segment or (j2 - j1)
        sub = _sub_block(seg)
        for b1 in range(0, j2 - j1, sub):
            b2 = min(b1 + sub, j2 - j1)
            for k in range(b1, b2):
                if k % seg == 0:  # a segment starts: decide it on its current (updated) weights
                    s1, s2 = j1 + k, min(j1 + k + seg, j2)
                    p = sel.select(w1[k : k + s2 - s1].t(), u_diag[s1:s2], dead[s1:s2], s1, s2)
                    prune[s1:s2] = p.t()
                    gone[k : k + s2 - s1] = p.t()
                torch.mul(w1[k], gone[k], out=err[k]).div_(u1[k, k])
                w1[k + 1 : b2].addr_(u1[k, k + 1 : b2], err[k], alpha=-1)
                w1[k].addcmul_(w1[k], gone[k], value=-1)  # w − w = +0 exactly where pruned
            if b2 < j2 - j1:  # the sub-block's updates reach the rest of the block at once
                w1[b2:].addmm_(u1[b1:b2, b2:].t(), err[b1:b2], alpha=-1)
        wt[j2:].addmm_(u[j1:j2, j2:].t(), err, alpha=-1)
    return wt.t(), prune.t()


_SUB = 16  # columns per inner lazy-update step inside a block


def _sub_block(segment: int) -> int:
    """Columns updated one by one before their batch reaches the rest of the block: whole segments,
    about ``_SUB`` columns. Per column the update then touches ``rows × _SUB`` entries instead of
    ``rows × blocksize``; the rest of the block gets the same updates as one product (same arithmetic up
    to rounding). A segment longer than ``_SUB`` (unstructured, a given mask) is decided once at its
    start, as before, and its columns still move in sub-blocks."""
    return max(segment, _SUB // segment * segment) if segment <= _SUB else _SUB


def exact_refit(w: torch.Tensor, h_damped: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per row, the optimum of the dampened problem on the kept columns: ``ŵ_K = w H'_{:,K} (H'_KK)⁻¹``.

    Two equivalent closed forms, per row the cheaper one: with ``|K| ≤ |M|`` solve the kept system
    ``H'_KK ŵ_Kᵀ = (w H')_Kᵀ``; otherwise remove the pruned set at once with the OBS formula for several
    weights, ``δ = −w_M [H'⁻¹]_MM⁻¹ [H'⁻¹]_M,:`` (a ``|M| × |M|`` system). Cost ``Σ_rows min(|K|, |M|)³/3``
    plus one inverse.
    """
    w = w.to(torch.float64)
    out = torch.zeros_like(w)
    hinv: torch.Tensor | None = None
    target = w @ h_damped
    for i in range(w.shape[0]):
        k = keep[i].nonzero().flatten()
        m = (~keep[i]).nonzero().flatten()
        if len(m) == 0:
            out[i] = w[i]
        elif len(k) <= len(m):
            if len(k):  # both systems are principal submatrices of SPD matrices: Cholesky, half LU's cost
                out[i, k] = _spd_solve(h_damped[k][:, k], target[i, k])
        else:
            if hinv is None:
                hinv = torch.cholesky_inverse(torch.linalg.cholesky(h_damped))
            lam = _spd_solve(hinv[m][:, m], w[i, m])
            out[i] = w[i] - lam @ hinv[m]
            out[i, m] = 0.0
    return out


def _spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cholesky_solve(b[:, None], torch.linalg.cholesky(a)).flatten()


def obs_prune(
    w: torch.Tensor,
    h: torch.Tensor,
    target: torch.Tensor | float | NM | tuple[int, int],
    *,
    damp: float = 0.01,
    blocksize: int = 128,
    guard: bool = True,
    refit: bool = False,
    overwrite: bool = False,
) -> ObsResult:
    """Prunes one weight matrix to ``target`` and updates the kept weights against ``H``.

    Args:
        w: ``rows × cols`` weight (any float dtype; the solve runs in float64 on ``w``'s device).
        h: ``cols × cols`` Gram matrix of the layer's inputs (sum or mean over the calibration positions:
            the result does not depend on the scale, the dampening is relative).
        target: keep mask (bool, ``w``'s shape; kept exactly), per-row sparsity in ``[0, 1)``, or N:M.
        damp: relative dampening λ > 0.
        blocksize: columns per lazy-update block (does not change the result for a given mask).
        guard: fall back to the plain mask in rows where the update is worse on the undamped ``H``.
        overwrite: a float64 ``h`` on ``w``'s device is dampened in place and its diagonal put back
            afterwards (same values, one ``d × d`` copy less: the sequential pass owns its ``H``).

    Returns:
        the reconstructed weight, its mask and the errors before/after.

    Example:
        >>> res = obs_prune(layer.weight.detach(), gram, NM(2, 4))
    """
    if w.ndim != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise InputError(f"weight {list(w.shape)} and Gram matrix {list(h.shape)} do not match")
    if isinstance(target, torch.Tensor) and target.shape != w.shape:
        raise InputError(f"mask {list(target.shape)} does not match the weight {list(w.shape)}")
    sel = selector(target, w.shape[1])
    h64 = h.to(device=w.device, dtype=torch.float64)
    inplace = overwrite and h64.data_ptr() == h.data_ptr()
    diag = torch.diagonal(h64).clone() if inplace else None
    h_damped, dead = dampen(h64, damp, inplace=inplace)
    w64 = w.to(torch.float64)
    w_hat, prune = sparsegpt_solve(w64, h_damped, sel, blocksize=blocksize, dead=dead.to(w.device))
    keep = ~prune
    if refit:
        w_hat = exact_refit(w64, h_damped, keep)
    if diag is not None:  # dampening changed only the diagonal: the undamped H again, exactly
        torch.diagonal(h64).copy_(diag)
    masked = torch.where(keep, w64, 0.0)
    # the errors are reported and compared, not solved with: in a lower-precision layer's own float32
    # (d·u ≤ 2e-4 relative for d = 3072, typically ~1e-6; about 2.4× faster than float64), else float64
    he = h64 if w.dtype == torch.float64 else h64.to(torch.float32)
    err_mask = row_errors(w64, masked, he)
    err_obs = row_errors(w64, w_hat, he)
    worse = err_obs > err_mask if guard else torch.zeros_like(err_obs, dtype=torch.bool)
    w_hat = torch.where(worse[:, None], masked, w_hat)
    err_obs = torch.where(worse, err_mask, err_obs)
    return ObsResult(
        weight=w_hat.to(w.dtype),
        keep=keep,
        error_mask=float(err_mask.sum()),
        error_obs=float(err_obs.sum()),
        fallback_rows=int(worse.sum()),
        signal=float(row_errors(w64, torch.zeros_like(w64), he).sum()),
    )
