"""Data-aware restoration: refit each consumer of pruned channels by ridge least squares.

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

__all__ = ["refit_consumer", "restore_lstsq"]


class _Stop(Exception):
    """Raised by a hook once the wanted activation is captured: the rest of the forward is not needed."""


def _supported(mod: nn.Module) -> str | None:
    if isinstance(mod, nn.Linear):
        return None
    if type(mod).forward is not nn.Conv2d.forward:
        return f"{type(mod).__name__} computes its own padding"
    if mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        return "grouped conv, non-zero padding mode or string padding"
    return None


def _capture(model: nn.Module, name: str, x: torch.Tensor, *, want: str) -> torch.Tensor:
    box: dict[str, torch.Tensor] = {}
    mod = model.get_submodule(name)

    def pre(_m: nn.Module, args: tuple[Any, ...]) -> None:
        box["t"] = args[0].detach()
        raise _Stop

    def post(_m: nn.Module, _a: tuple[Any, ...], out: torch.Tensor) -> None:
        box["t"] = out.detach()
        raise _Stop

    hook = mod.register_forward_pre_hook(pre) if want == "input" else mod.register_forward_hook(post)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        hook.remove()
    if "t" not in box:
        raise RuntimeError(f"{name} was not reached by the forward pass")
    return box["t"]


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


@torch.no_grad()
def refit_consumer(ctx: RestoreContext, name: str, batches: list[torch.Tensor], *, ridge: float) -> dict[str, float]:
    """Refits consumer ``name`` of ``ctx.pruned`` in place; returns the fit's sample count and λ."""
    assert ctx.dense is not None
    dmod, pmod = ctx.dense.get_submodule(name), ctx.pruned.get_submodule(name)
    out_entry = ctx.plan.get(name, {}).get("out")
    rows = list(out_entry["kept"]) if out_entry is not None else None
    w0 = pmod.weight.detach().to(torch.float64).reshape(pmod.weight.shape[0], -1)
    if pmod.bias is not None:
        w0 = torch.cat([w0, pmod.bias.detach().to(torch.float64)[:, None]], dim=1)
    w0 = w0.to(ctx.device)
    d = w0.shape[1]
    xtx = torch.zeros(d, d, dtype=torch.float64, device=ctx.device)
    xty = torch.zeros(d, w0.shape[0], dtype=torch.float64, device=ctx.device)
    n = 0
    for xb in batches:
        xb = xb.to(ctx.device)
        x = _design(pmod, _capture(ctx.pruned, name, xb, want="input"))
        y = _targets(dmod, _capture(ctx.dense, name, xb, want="output"), rows)
        if y.shape[0] != x.shape[0]:
            raise RuntimeError(f"{name}: {x.shape[0]} input rows but {y.shape[0]} target rows")
        xtx += x.T @ x
        xty += x.T @ y
        n += x.shape[0]
    lam = ridge * float(torch.trace(xtx)) / d if float(torch.trace(xtx)) > 0 else ridge
    a = xtx + lam * torch.eye(d, dtype=torch.float64, device=ctx.device)
    sol = torch.linalg.solve(a, xty + lam * w0.T)  # (d, out)
    new = sol.T
    if pmod.bias is not None:
        pmod.bias.copy_(new[:, -1].to(pmod.bias.dtype))
        new = new[:, :-1]
    pmod.weight.copy_(new.reshape(pmod.weight.shape).to(pmod.weight.dtype))
    return {"samples": n, "ridge_lambda": lam}


def restore_lstsq(ctx: RestoreContext, params: dict[str, Any]) -> None:
    """Refits every consumer of a restorable pruned producer (registered as ``lstsq``)."""
    ridge, samples = float(params["ridge"]), int(params["samples"])
    if ridge < 0:
        raise InputError("lstsq: ridge must be >= 0")
    if not ctx.calib:
        raise InputError("lstsq needs calibration data", hint="pass --data SPEC (e.g. --data digits:train)")
    batches = ctx.calib_samples(samples)
    assert ctx.pairs is not None
    owner: dict[str, str] = {}
    for pair, kept, pruned in ctx.restorable():
        for cons in pair.consumers:
            owner.setdefault(cons.name, pair.producer)
        ctx.layers[pair.producer] = {
            "method": "lstsq",
            "consumers": [c.name for c in pair.consumers],
            "kept": len(kept),
            "pruned": len(pruned),
            "activation": pair.activation,
        }
    order = {n: i for i, n in enumerate(ctx.pairs.order)}
    ctx.pruned.eval().to(ctx.device)
    ctx.dense.eval().to(ctx.device)
    try:
        for name in sorted(owner, key=lambda n: order.get(n, len(order))):
            why = _supported(ctx.pruned.get_submodule(name))
            if why:
                ctx.warn(f"{name}: not refit by lstsq ({why})")
                continue
            info = refit_consumer(ctx, name, batches, ridge=ridge)
            ctx.layers[owner[name]].setdefault("fit", {})[name] = info
    finally:
        ctx.pruned.to("cpu")
        ctx.dense.to("cpu")
