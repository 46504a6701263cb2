"""Data-aware restoration: refit each consumer of pruned channels by ridge least squares.

The consumers are every conv/linear layer that lost input channels — inside a block, the layers
reading a residual stream (the next blocks' first convs, the downsample convs, the head after pooling;
a transformer's ``qkv``/``fc1``/head behind their LayerNorms) and attention's ``proj`` — plus the
``qkv`` of every attention whose dimensions were pruned, whose kept rows are refit only where that
lowers the error of the attention output. This needs no dataflow graph: the channel structure says
which layers lost inputs, and a layer is fit on whatever reaches it.

On calibration images, the consumer's *pre-activation* output in the dense model (at its kept output
rows) is the target; its input in the pruned model is the regressor. Consumers are refit in forward
order, each on the inputs of the already-refit pruned model, so later layers also absorb the error
left upstream. The normal equations are accumulated batch by batch in float64 (memory ``D²`` for a
consumer with ``D`` inputs per output, ``C_in·k·k`` for a conv), and the ridge pulls towards the
current weights::

    W = argmin ‖Y − W X‖² + λ ‖W − W₀‖²,     λ = ridge · tr(XXᵀ) / D.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunecli.errors import InputError
from prunecli.restoration.core import RestoreContext
from prunecli.restoration.replay import Replay

__all__ = ["refit_consumer", "restore_lstsq"]


def _supported(mod: nn.Module) -> str | None:
    if isinstance(mod, nn.Linear):
        return None
    if type(mod).forward is not nn.Conv2d.forward:
        return f"{type(mod).__name__} computes its own padding"
    if mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        return "grouped conv, non-zero padding mode or string padding"
    return None


def _design(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows = samples (positions/tokens), columns = the consumer's fan-in (+1 for its bias)."""
    if isinstance(mod, nn.Conv2d):
        cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    rows = rows.to(torch.float64)
    if mod.bias is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=torch.float64, device=rows.device)], dim=1)
    return rows


def _targets(mod: nn.Module, y: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
    if isinstance(mod, nn.Conv2d):
        y = y if rows is None else y[:, rows]
        return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1]).to(torch.float64)
    y = y if rows is None else y[..., rows]
    return y.reshape(-1, y.shape[-1]).to(torch.float64)


def _replays(ctx: RestoreContext, batches: list[torch.Tensor]) -> tuple[Replay, Replay]:
    """Replays of the pruned and the dense model over ``batches`` (moved to ``ctx.device``)."""
    assert ctx.dense is not None
    on = [b.to(ctx.device) for b in batches]
    return Replay(ctx.pruned, on), Replay(ctx.dense, on)


@torch.no_grad()
def refit_consumer(
    ctx: RestoreContext,
    name: str,
    batches: list[torch.Tensor],
    *,
    ridge: float,
    replays: tuple[Replay, Replay] | None = None,
) -> dict[str, float]:
    """Refits consumer ``name`` of ``ctx.pruned`` in place; returns the fit's sample count and λ.

    ``replays``: the (pruned, dense) :class:`Replay` of ``batches`` shared by a whole run, so that each
    refit resumes from cached activations instead of the image (built here when not given).
    """
    assert ctx.dense is not None
    pruned_run, dense_run = replays if replays is not None else _replays(ctx, batches)
    dmod, pmod = ctx.dense.get_submodule(name), ctx.pruned.get_submodule(name)
    out_entry = ctx.plan.get(name, {}).get("out")
    rows = list(out_entry["kept"]) if out_entry is not None else None
    w0 = pmod.weight.detach().to(torch.float64).reshape(pmod.weight.shape[0], -1)
    if pmod.bias is not None:
        w0 = torch.cat([w0, pmod.bias.detach().to(torch.float64)[:, None]], dim=1)
    w0 = w0.to(ctx.device)
    d = w0.shape[1]
    # Fewer samples than unknowns (deep layers of small images): keep the rows and solve the N×N dual
    # system instead of the D×D normal equations — the same minimiser, W = W₀ + Xᵀ(XXᵀ + λI)⁻¹(Y − XW₀).
    xs: list[torch.Tensor] | None = []
    ys: list[torch.Tensor] = []
    xtx: torch.Tensor | None = None
    xty: torch.Tensor | None = None
    n = 0
    trace = 0.0
    for b in range(len(batches)):
        x = _design(pmod, pruned_run.capture(name, b, "input"))
        y = _targets(dmod, dense_run.capture(name, b, "output"), rows)
        if y.shape[0] != x.shape[0]:
            raise RuntimeError(f"{name}: {x.shape[0]} input rows but {y.shape[0]} target rows")
        n += x.shape[0]
        trace += float((x * x).sum())
        if xs is not None and n < d:
            xs.append(x)
            ys.append(y)
            continue
        if xs is not None:  # too many rows for the dual: switch to the normal equations
            x, y = torch.cat([*xs, x]), torch.cat([*ys, y])
            xs, ys = None, []
            xtx, xty = x.T @ x, x.T @ y
            continue
        assert xtx is not None and xty is not None
        xtx += x.T @ x
        xty += x.T @ y
    lam = ridge * trace / d if trace > 0 else ridge
    if xs is not None and xs and lam > 0:
        x, y = torch.cat(xs), torch.cat(ys)
        k = x @ x.T
        k.diagonal().add_(lam)
        sol = w0.T + x.T @ torch.linalg.solve(k, y - x @ w0.T)  # (d, out)
    else:
        if xs is not None:  # λ = 0 or no rows: the normal equations, as always
            x = torch.cat(xs) if xs else torch.zeros(0, d, dtype=torch.float64, device=ctx.device)
            y = torch.cat(ys) if ys else torch.zeros(0, w0.shape[0], dtype=torch.float64, device=ctx.device)
            xtx, xty = x.T @ x, x.T @ y
        assert xtx is not None and xty is not None
        a = xtx
        a.diagonal().add_(lam)  # xtx is not used again: no D×D identity or copy
        rhs = xty + lam * w0.T
        # A = XᵀX + λI is symmetric positive definite for λ > 0: Cholesky takes half the work of LU;
        # LU remains for what Cholesky refuses (λ = 0 with a rank-deficient XᵀX, as before).
        factor, info = torch.linalg.cholesky_ex(a)
        sol = torch.cholesky_solve(rhs, factor) if int(info) == 0 else torch.linalg.solve(a, rhs)
    new = sol.T
    if pmod.bias is not None:
        pmod.bias.copy_(new[:, -1].to(pmod.bias.dtype))
        new = new[:, :-1]
    pmod.weight.copy_(new.reshape(pmod.weight.shape).to(pmod.weight.dtype))
    pruned_run.changed(name)
    return {"samples": n, "ridge_lambda": lam}


def _reads_pruned(ctx: RestoreContext) -> list[str]:
    """Conv/linear layers of the pruned model that lost input channels (the structure's ``in`` entries)."""
    out = []
    for name, entry in ctx.plan.items():
        inp = entry.get("in")
        if inp is None or len(inp["kept"]) >= inp["dense"]:
            continue
        try:
            mod = ctx.pruned.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            out.append(name)
    return out


@torch.no_grad()
def _attention_error(ctx: RestoreContext, proj: str, cols: list[int], replays: tuple[Replay, Replay]) -> float:
    """Squared error of the attention output (``proj``'s input) against the dense one at the kept dimensions."""
    err = 0.0
    pruned_run, dense_run = replays
    for b in range(len(pruned_run.batches)):
        got = pruned_run.capture(proj, b, "input").to(torch.float64)
        ref = dense_run.capture(proj, b, "input").to(torch.float64)[..., cols]
        err += float(((got - ref) ** 2).sum())
    return err


def restore_lstsq(ctx: RestoreContext, params: dict[str, Any]) -> None:
    """Refits every layer reading pruned channels, in forward order (registered as ``lstsq``)."""
    ridge, samples = float(params["ridge"]), int(params["samples"])
    if ridge < 0:
        raise InputError("lstsq: ridge must be >= 0")
    if not ctx.calib:
        raise InputError("lstsq needs calibration data", hint="pass --data SPEC (e.g. --data digits:train)")
    batches = ctx.calib_samples(samples)
    assert ctx.pairs is not None and ctx.dense is not None
    units = ctx.restorable(quiet=True)
    attention = {g.attention.qkv: (g, kept) for g, kept in ctx.attention_units() if g.attention is not None}
    targets = set(_reads_pruned(ctx)) | set(attention)
    order = {n: i for i, n in enumerate(ctx.pairs.order)}
    ctx.pruned.eval().to(ctx.device)
    ctx.dense.eval().to(ctx.device)
    replays = _replays(ctx, batches)
    fits: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    try:
        for name in sorted(targets, key=lambda n: (order.get(n, len(order)), n)):
            why = _supported(ctx.pruned.get_submodule(name))
            if why:
                ctx.warn(f"{name}: not refit by lstsq ({why})")
                failed[name] = why
                continue
            if name not in attention:
                fits[name] = refit_consumer(ctx, name, batches, ridge=ridge, replays=replays)
                continue
            spec = attention[name][0].attention
            cols = ctx.plan.get(spec.proj, {}).get("in", {}).get("kept") or list(range(spec.num_heads * spec.head_dim))
            mod = ctx.pruned.get_submodule(name)
            saved = [t.detach().clone() for t in (mod.weight, mod.bias) if t is not None]
            before = _attention_error(ctx, spec.proj, cols, replays)
            info = refit_consumer(ctx, name, batches, ridge=ridge, replays=replays)
            after = _attention_error(ctx, spec.proj, cols, replays)
            info = {**info, "attention_error_before": before, "attention_error_after": after}
            info["kept_fit"] = after < before
            if not after < before:  # the q/k rows act through a softmax: a better fit of qkv can be worse
                with torch.no_grad():
                    for t, old in zip((t for t in (mod.weight, mod.bias) if t is not None), saved, strict=True):
                        t.copy_(old)
                replays[0].changed(name)
            fits[name] = info
    finally:
        ctx.pruned.to("cpu")
        ctx.dense.to("cpu")
    for unit in units:
        names = [c.name for c in unit.pair.consumers]
        bad = [n for n in names if n in failed]
        if bad:
            ctx.skip(unit.group, f"consumer {bad[0]} not refit ({failed[bad[0]]})")
            continue
        ctx.done(unit.group, "lstsq")
        ctx.layers[unit.pair.producer] = {"method": "lstsq", "consumers": names, "kept": len(unit.kept),
                                          "pruned": len(unit.pruned), "activation": unit.pair.activation,
                                          "producers": unit.group.producers,
                                          "fit": {n: fits[n] for n in names if n in fits}}  # fmt: skip
    covered = {n for u in units for n in u.group.producers}
    for group in ctx.pairs.groups:
        if group.producers[0] in covered:
            continue
        if group.kind == "attention" and group.attention is not None:
            spec = group.attention
            bad = [n for n in (spec.qkv, spec.proj) if n in failed]
            if bad:
                ctx.skip(group, f"{bad[0]} not refit ({failed[bad[0]]})")
                continue
            if group.producers[0] in attention:
                ctx.done(group, "lstsq")
                ctx.layers[spec.qkv] = {"method": "lstsq", "kind": "attention", "consumers": [spec.proj],
                                        "fit": {n: fits[n] for n in (spec.qkv, spec.proj) if n in fits}}  # fmt: skip
            continue
        if group.reason is not None and "no conv/linear consumer" in group.reason:
            continue  # nothing reads the channels (a pruned head): the caller records it as such
        if group.reason is not None and failed:
            ctx.skip(group, f"some layer reading pruned channels was not refit ({next(iter(failed))})")
            continue
        if group.reason is not None:  # e.g. a transformer's stream: its readers are refit all the same
            ctx.done(group, "lstsq", "restored: every layer reading pruned channels refit")
    extra = sorted(set(fits) - {c for row in ctx.layers.values() for c in row.get("fit", {})})
    if extra:
        ctx.layers["*"] = {"method": "lstsq", "consumers": extra, "fit": {n: fits[n] for n in extra}}
