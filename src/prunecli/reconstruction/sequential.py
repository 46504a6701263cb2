"""Layer-by-layer reconstruction of a model in forward order (docs/obs.md, "Sequential").

Each layer is solved from the inputs that the model produces *after* the layers before it have been
reconstructed, so a later layer sees, and partly absorbs, the error of the earlier ones. Memory stays
bounded: one layer's Gram matrix exists at a time and the calibration batches are streamed; no
activation outlives its batch.

Multi-process (``torchrun``): give each process its shard of the calibration batches; each layer's Gram
matrix and position count are summed over the processes before the solve, so every process computes
the same weights, equal to the one-process result up to float summation order. Every process must have
at least one batch, and the forward must call the layers in the same order on every batch.

Cost: one pass over the calibration batches per layer, each stopped at the layer (a hook raises once
the layer has seen its input), so the total is about half a forward pass of the calibration set per
layer on a chain-like network.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunecli.distributed import all_reduce_tensors, is_distributed
from prunecli.errors import InputError
from prunecli.progress import progress
from prunecli.reconstruction.hessian import GramAccumulator, supports
from prunecli.reconstruction.obs import NM, obs_prune, selector

__all__ = ["LayerResult", "ReconstructionReport", "Target", "reconstruct"]

Target = torch.Tensor | float | NM | tuple[int, int]
Forward = Callable[[nn.Module, Any, torch.device], Any]


@dataclass(frozen=True)
class LayerResult:
    """What happened to one layer.

    Attributes:
        name: module name.
        status: ``reconstructed``, ``unreached`` (the forward never called it; unchanged) or
            ``skipped`` (unsupported; unchanged, see ``note``).
        error_mask: ``‖(W − W⊙keep) X‖²`` summed over the calibration positions (plain mask, no update).
        error_obs: ``‖(W − Ŵ) X‖²`` for the reconstructed weight; ``X`` are the layer's inputs in the
            partially reconstructed model, ``W`` its weight before this call.
        positions: calibration positions (columns of ``X``) seen.
        sparsity: fraction of exact zeros in the weight afterwards.
        fallback_rows: rows (over all groups) left at the plain mask because the update was worse.
        note: why a layer was skipped.
        signal: ``‖W X‖²`` on the same inputs: ``error / signal`` is the relative error.
    """

    name: str
    status: str
    error_mask: float = 0.0
    error_obs: float = 0.0
    positions: int = 0
    sparsity: float = 0.0
    fallback_rows: int = 0
    note: str = ""
    signal: float = 0.0


@dataclass
class ReconstructionReport:
    """Per-layer results in the order solved (unreached and skipped layers last) and warnings."""

    layers: dict[str, LayerResult] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class _Stop(BaseException):
    """Raised by a hook to end a forward pass once the layer being solved has seen its inputs.

    A BaseException, so that model code catching ``Exception`` cannot swallow it and run on.
    """


def _default_forward(model: nn.Module, batch: Any, device: torch.device) -> Any:
    """Runs ``model`` on a batch: a tensor, or a (tensor, label, …) sequence as data loaders yield."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return model(x.to(device))


def _module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    mod = modules.get(name) or modules.get(name.removesuffix(".weight"))
    if mod is None or getattr(mod, "weight", None) is None:
        raise InputError(f"the model has no layer {name!r} to reconstruct")
    return mod


def _skip_reason(mod: nn.Module, target: Target) -> str:
    """Why a layer cannot be solved ('' when it can); mismatched masks are input errors instead."""
    if not supports(mod):
        return f"{type(mod).__name__} layers are not supported"
    w = mod.weight
    if isinstance(target, torch.Tensor):
        if tuple(target.shape) != tuple(w.shape):
            raise InputError(f"the mask of {tuple(target.shape)} does not match the weight {tuple(w.shape)}")
        return ""
    cols = w[0].numel()
    try:
        selector(target, cols)
    except InputError as exc:
        if isinstance(target, (NM, tuple)):
            return str(exc)
        raise
    return ""


def _first_calls(
    model: nn.Module, modules: Mapping[str, nn.Module], batch: Any, forward: Forward, device: torch.device
) -> dict[str, int]:
    """Layer name → calls in one forward pass, in the order of each layer's first call."""
    calls: dict[str, int] = {}
    handles = []
    for name, mod in modules.items():

        def count(_m: nn.Module, _a: Any, name: str = name) -> None:
            calls[name] = calls.get(name, 0) + 1

        handles.append(mod.register_forward_pre_hook(count))
    try:
        forward(model, batch, device)
    finally:
        for h in handles:
            h.remove()
    return calls


def _gram(
    model: nn.Module,
    mod: nn.Module,
    calls: int,
    calib: Iterable[Any],
    forward: Forward,
    device: torch.device,
) -> GramAccumulator:
    """The layer's Gram matrix over all calibration batches; each forward stops after the layer's last call."""
    acc = GramAccumulator(mod, device)
    seen = [0]

    def hook(m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        acc.hook(m, args)
        seen[0] += 1
        if seen[0] >= calls:
            raise _Stop

    handle = mod.register_forward_pre_hook(hook)
    try:
        for batch in calib:
            seen[0] = 0
            with contextlib.suppress(_Stop):
                forward(model, batch, device)
    finally:
        handle.remove()
    if is_distributed():  # each rank saw its shard of the batches: the one-process H is the sum
        summed = all_reduce_tensors({"h": acc.h, "positions": torch.tensor(acc.positions, device=acc.h.device)})
        acc.h, acc.positions = summed["h"], int(summed["positions"])
    return acc


def _solve_layer(
    name: str,
    mod: nn.Module,
    target: Target,
    acc: GramAccumulator,
    *,
    damp: float,
    blocksize: int,
    guard: bool,
    refit: bool,
) -> LayerResult:
    """Solves every group of the layer and writes the weight back in place."""
    w = mod.weight.detach()
    groups = acc.h.shape[0]
    w2 = w.reshape(w.shape[0], -1)
    rows = w2.shape[0] // groups
    keep = (target != 0).reshape(w2.shape) if isinstance(target, torch.Tensor) else None
    out = torch.empty_like(w2)
    err_mask = err_obs = signal = 0.0
    fallback = 0
    for g in range(groups):
        sl = slice(g * rows, (g + 1) * rows)
        tgt = keep[sl].to(w.device) if keep is not None else target
        res = obs_prune(w2[sl], acc.h[g].to(w.device), tgt, damp=damp, blocksize=blocksize, guard=guard, refit=refit)
        out[sl] = res.weight
        err_mask += res.error_mask
        err_obs += res.error_obs
        fallback += res.fallback_rows
        signal += res.signal
    with torch.no_grad():
        mod.weight.copy_(out.view_as(mod.weight))
    sparsity = float((out == 0).sum()) / max(1, out.numel())
    return LayerResult(name, "reconstructed", err_mask, err_obs, acc.positions, sparsity, fallback, signal=signal)


def reconstruct(
    model: nn.Module,
    layers: Mapping[str, Target],
    calib: Iterable[Any],
    *,
    damp: float = 0.01,
    blocksize: int = 128,
    device: torch.device | str | None = None,
    forward: Forward | None = None,
    guard: bool = True,
    refit: bool = False,
) -> ReconstructionReport:
    """Prunes and reconstructs ``layers`` of ``model`` in place, in forward order, from calibration batches.

    Args:
        model: the model (dense for a joint mask; for a given mask, the dense parent whose outputs the
            masked layers should reproduce). Run in eval mode; its training flag is restored.
        layers: module name → target: a keep mask (tensor of the weight's shape, kept where ``!= 0``),
            a per-row sparsity in ``[0, 1)``, or N:M as ``NM(n, m)`` / ``(n, m)``.
        calib: re-iterable calibration batches (a DataLoader; tensors or (tensor, label) pairs). It is
            iterated once per layer, so it must yield the same batches each time.
        damp: relative dampening λ > 0 of the Gram matrices.
        blocksize: columns per lazy-update block.
        device: where the forward passes and the solves run (default: the model's device); the model
            is moved there and back.
        forward: ``forward(model, batch, device)``; default: ``model(batch[0])`` or ``model(batch)``.
        guard: per row, keep the plain mask where the update does worse on the calibration data.

    Returns:
        per-layer errors before/after, statuses and warnings (layers the forward never reaches are left
        unchanged and warned about).

    Raises:
        InputError: ``damp <= 0``, an unknown layer, a mask of the wrong shape, a one-shot iterator,
            or no calibration batches.

    Example:
        >>> report = reconstruct(model, {"fc1": 0.5, "fc2": (2, 4)}, loader)
    """
    if not damp > 0:
        raise InputError(f"damp={damp}: dampening must be a positive number", hint="e.g. -p damp=0.01")
    if iter(calib) is calib:
        raise InputError("the calibration batches must be re-iterable (a DataLoader or a list), not an iterator")
    forward = forward or _default_forward
    modules = {name: _module(model, name) for name in layers}
    report = ReconstructionReport()
    todo: dict[str, nn.Module] = {}
    for name, mod in modules.items():
        reason = _skip_reason(mod, layers[name])
        if reason:
            report.layers[name] = LayerResult(name, "skipped", note=reason)
            report.warnings.append(f"{name}: skipped, {reason}")
        else:
            todo[name] = mod
    first = next(iter(calib), None)
    if first is None:
        raise InputError("no calibration batches")
    params = list(model.parameters())
    home = params[0].device if params else torch.device("cpu")
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.no_grad():
            calls = _first_calls(model, todo, first, forward, device)
            for name in progress(list(calls), total=len(calls), description="obs reconstruction"):
                acc = _gram(model, todo[name], calls[name], calib, forward, device)
                report.layers[name] = _solve_layer(
                    name, todo[name], layers[name], acc, damp=damp, blocksize=blocksize, guard=guard, refit=refit
                )
    finally:
        model.train(was_training)
        model.to(home)
    for name in todo:
        if name not in calls:
            report.layers[name] = LayerResult(name, "unreached", note="the forward pass never calls it")
            report.warnings.append(f"{name}: the forward pass never reaches it; left unchanged")
    return report
