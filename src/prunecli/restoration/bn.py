"""BatchNorm statistics re-estimation on calibration images, usable alone or after any other method.

Pruning and compensation change the distribution that reaches the BatchNorms downstream of the changed
layers while their running statistics still describe the dense model. Re-estimating them is the cheapest
data-aware repair; it does not need the dense parent.

What is estimated, and why this way:

* **The exact statistics the model sees at inference** (``exact=true``, the default). A BN in eval
  mode normalises with its running mean/variance, so the right statistics for BN ``k`` are the mean and
  unbiased variance (what PyTorch stores in ``running_var``) of its input over the calibration set,
  with every BN upstream of it in eval mode using its own re-estimated statistics. The usual shortcut
  (one train-mode forward, ``momentum=None``) differs in three ways: downstream BNs see inputs
  normalised by per-batch statistics instead of the final ones, every batch weighs the same whatever
  its size (a short last batch is over-weighted), and the variance is an average of per-batch
  variances (the spread of the batch means is lost). Here the BNs are visited in execution order; for
  each, one pass over the calibration batches (stopped at that BN) accumulates the per-channel mean and
  M2 in float64 (Chan et al.'s pairwise update). Run from the image, that costs about ``#BN / 2``
  full forward passes; each pass resumes instead from activations cached before the BN's block
  (:mod:`prunecli.restoration.replay`: the same operations on the same tensors, bit-identical
  statistics), which on a ResNet brings the prefix work down to a few full passes.
  ``exact=false`` keeps one train-mode pass (pooled float64 statistics, but per-batch normalisation
  upstream), for deep models on slow devices.
* **Only the BNs downstream of a changed layer** (``scope=downstream``, the default). A layer changed
  when it lost input channels (its output is no longer the dense one; compensation methods rewrite
  exactly these consumers). A BN whose input does not depend on any changed layer - e.g. the BN right
  after the first pruned conv, whose kept channels are computed exactly as in the dense model - already
  holds the statistics the dense model was trained and validated with; re-estimating it replaces them
  with a finite-sample estimate of the same quantity, i.e. adds noise and repairs nothing. Dependence is
  found with autograd on one input (a zero probe added to each changed layer's output; a BN depends on
  it iff its input requires grad). ``scope=all`` re-estimates every BN (e.g. to also refresh stale
  statistics of an unpruned part).
* **All the calibration data, up to** ``samples`` (default 2048). The estimate's variance falls as
  ``1/N`` and a pass is cheap, so there is no reason to use a subset of the calibration set the user
  passed; the bound only keeps the in-memory calibration list finite for large datasets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunecli.errors import InputError
from prunecli.restoration.core import RestoreContext
from prunecli.restoration.replay import Replay, Stop

__all__ = ["BNEstimate", "bn_layers", "downstream_bns", "reestimate_bn", "restore_bn"]

_SCOPES = ("downstream", "all")


@dataclass
class BNEstimate:
    """What :func:`reestimate_bn` did.

    Attributes:
        updated: names of the BN layers re-estimated, in execution order.
        passes: (partial) forward passes over the calibration batches.
        samples: calibration images used.
    """

    updated: list[str]
    passes: int
    samples: int


def bn_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Name → BatchNorm module, for every BN that keeps running statistics."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
        and m.running_var is not None
    }


def _changed_modules(model: nn.Module, plan: dict[str, dict[str, Any]]) -> list[str]:
    """Modules whose output differs from the dense model's: every non-BN module that lost input channels."""
    names = dict(model.named_modules())
    out = []
    for name, entry in plan.items():
        inp = entry.get("in")
        if inp is None or len(inp["kept"]) >= inp["dense"] or name not in names:
            continue
        if isinstance(names[name], nn.modules.batchnorm._BatchNorm):  # per-channel: kept channels unchanged
            continue
        out.append(name)
    return sorted(out)


def downstream_bns(model: nn.Module, changed: Sequence[str], x: torch.Tensor) -> set[str]:
    """The BN layers whose input depends on the output of any module in ``changed`` (autograd on ``x``).

    Each changed module's output gets a zero probe that requires grad; with every parameter frozen, a
    BN's input requires grad exactly when it is computed from a probe.
    """
    found: set[str] = set()
    probe = torch.zeros((), requires_grad=True, device=x.device)
    modules = dict(model.named_modules())
    hooks = []

    def add_probe(_m: nn.Module, _i: Any, out: Any) -> Any:
        return out + probe if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    for name in changed:
        hooks.append(modules[name].register_forward_hook(add_probe))
    for name, bn in bn_layers(model).items():
        hooks.append(
            bn.register_forward_pre_hook(lambda _m, inp, n=name: found.add(n) if inp[0].requires_grad else None)
        )
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)
    return found


class _Stats:
    """Streaming per-channel mean and M2 (sum of squared deviations) in float64 (Chan et al.)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, N·spatial)
        nb = flat.shape[1]
        if nb == 0:
            return
        mb = flat.mean(1)
        m2b = ((flat - mb[:, None]) ** 2).sum(1)
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / n)
        self.n = n


def _execution_order(model: nn.Module, norms: dict[str, nn.Module], x: torch.Tensor) -> tuple[list[str], set[str]]:
    """BN names in first-call order on ``x`` (upstream before downstream), and those called more than once."""
    calls: dict[str, int] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, _i, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
        for n, m in norms.items()
    ]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    order = list(calls)  # dicts keep insertion order: the first call of each BN
    order += sorted(set(norms) - set(order))  # never reached on x: still estimated, last
    return order, {n for n, c in calls.items() if c > 1}


def _batch_stats_pass(model: nn.Module, norms: dict[str, nn.Module], batches: Sequence[torch.Tensor]) -> None:
    """One train-mode pass; each BN's running stats become the pooled float64 statistics of its input."""
    acc = {n: _Stats() for n in norms}
    hooks = [m.register_forward_pre_hook(lambda _m, inp, n=n: acc[n].add(inp[0])) for n, m in norms.items()]
    for m in norms.values():
        m.train()
    try:
        for x in batches:
            if len(x) > 1:  # a 1-sample batch has no variance in train-mode BN
                model(x)
    finally:
        for h in hooks:
            h.remove()
        for m in norms.values():
            m.eval()
    for n, m in norms.items():
        _store(m, acc[n])


def _store(bn: nn.Module, s: _Stats) -> None:
    if s.mean is None or s.n < 2:
        return
    bn.running_mean.copy_(s.mean.to(bn.running_mean.dtype))
    bn.running_var.copy_((s.m2 / (s.n - 1)).to(bn.running_var.dtype))  # unbiased, as PyTorch stores it


@torch.no_grad()
def reestimate_bn(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    device: torch.device | str = "cpu",
    *,
    names: Iterable[str] | None = None,
    exact: bool = True,
) -> BNEstimate:
    """Sets the running mean/variance of the BN layers ``names`` (default: all) from ``batches``.

    Args:
        model: rewritten in place; left in eval mode on CPU.
        batches: calibration input batches.
        device: where the passes run.
        names: the BN layers to re-estimate; the others keep their statistics.
        exact: True: each BN gets the exact mean / unbiased variance of its *eval-mode* input over all
            ``batches``, every BN upstream of it already re-estimated (one pass per BN, in execution
            order, each stopped at that BN: about ``#BN / 2`` forward passes in all). False: one
            train-mode pass; the statistics are pooled exactly over the batches but each BN's input was
            normalised upstream with per-batch statistics, which is close only for large batches.

    Returns:
        the layers updated, the passes run and the images used.
    """
    dev = torch.device(device)
    everything = bn_layers(model)
    wanted = set(everything) if names is None else set(names) & set(everything)
    samples = sum(len(b) for b in batches)
    if not wanted or not batches:
        return BNEstimate([], 0, samples)
    model.eval().to(dev)
    batches = [b.to(dev) for b in batches]
    norms = {n: everything[n] for n in sorted(wanted)}
    try:
        order, shared = _execution_order(model, norms, batches[0][:1])
        if not exact:
            _batch_stats_pass(model, norms, batches)
            return BNEstimate(order, 1, samples)
        replay = Replay(model, batches)
        for name in order:
            acc = _Stats()

            def record(_m: nn.Module, inp: Any, acc: _Stats = acc, stop: bool = name not in shared) -> None:
                acc.add(inp[0])
                if stop:  # nothing after this BN matters for its statistics
                    raise Stop

            hook = norms[name].register_forward_pre_hook(record)
            try:
                for b in range(len(batches)):
                    replay.forward_to(name, b, whole=name in shared)
            finally:
                hook.remove()
            _store(norms[name], acc)
            replay.changed(name)
        return BNEstimate(order, len(order), samples)
    finally:
        model.eval().to("cpu")


def bn_request(params: dict[str, Any], has_calib: bool, model: nn.Module) -> tuple[int, str, bool, dict[str, Any]]:
    """``bn``'s parameters checked before any work, for channel-pruned and masked checkpoints alike.

    Returns:
        ``samples``, ``scope``, ``exact`` and the model's BatchNorm layers.

    Raises:
        InputError: fewer than 2 samples, an unknown scope, no calibration data, or no BatchNorm.
    """
    samples = int(params["samples"])
    scope = str(params.get("scope", "downstream"))
    exact = bool(params.get("exact", True))
    if samples < 2:
        raise InputError("bn: samples must be >= 2")
    if scope not in _SCOPES:
        raise InputError(f"bn: unknown scope {scope!r}; choose from {', '.join(_SCOPES)}")
    if not has_calib:
        raise InputError("bn needs calibration data", hint="pass --data SPEC (e.g. --data digits:train)")
    norms = bn_layers(model)
    if not norms:
        raise InputError("bn: the model has no BatchNorm layers to re-estimate")
    return samples, scope, exact, norms


def restore_bn(ctx: RestoreContext, params: dict[str, Any]) -> None:
    """Re-estimates the BN statistics of ``ctx.pruned`` (registered as ``bn``).

    Params: ``samples`` (calibration images, default 2048: all of a small calibration set), ``scope``
    (``downstream`` of the changed layers, default, or ``all``).
    """
    samples, scope, exact, norms = bn_request(params, bool(ctx.calib), ctx.pruned)
    batches = ctx.calib_samples(samples)
    names: set[str] = set(norms)
    if scope == "downstream":
        changed = _changed_modules(ctx.pruned, ctx.plan)
        x = batches[0][:1].to(ctx.device)
        ctx.pruned.to(ctx.device)
        names = downstream_bns(ctx.pruned, changed, x) if changed else set()
        ctx.pruned.to("cpu")
        if not names:
            ctx.warn("bn: no BatchNorm depends on a layer that lost input channels; statistics left as they are")
    est = reestimate_bn(ctx.pruned, batches, ctx.device, names=names, exact=exact)
    ctx.layers["*"] = {
        "method": "bn",
        "scope": scope,
        "bn_layers": len(est.updated),
        "bn_kept": len(norms) - len(est.updated),
        "samples": est.samples,
        "passes": est.passes,
        "exact": exact,
    }
