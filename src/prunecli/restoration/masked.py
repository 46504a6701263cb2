"""Restoration of masked checkpoints (unstructured or N:M zeros listed in ``manifest.masked``).

Two registered methods apply here (:data:`prunecli.restoration.RESTORERS`, ``masked=``):

* ``obs`` — keeps every mask exactly and refits the surviving weights of each masked layer to the dense
  parent's layer output on calibration images (:func:`prunecli.reconstruction.masked.restore_masked`;
  docs/obs.md). Under ``torchrun`` each process solves from its shard of the images; the Gram matrices
  are summed over the processes, so every process ends with the same weights.
* ``bn`` — BatchNorm statistics re-estimation (:func:`prunecli.restoration.bn.reestimate_bn`), after
  ``obs`` it is OBC's statistics correction. A masked layer's output differs from the dense one, so
  ``scope=downstream`` re-estimates the BNs whose input depends on a masked layer (the BN right after a
  masked conv included); ``scope=all`` every BN.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunecli.errors import InputError

__all__ = ["MaskedContext", "restore_bn_masked", "restore_obs"]

log = logging.getLogger("prunecli.restoration")


@dataclass
class MaskedContext:
    """What a method restoring a masked checkpoint reads and fills.

    Attributes:
        pruned: the masked model (rewritten in place).
        dense: the dense parent, or None (``bn`` alone does not need it).
        masked: the masked parameter names (``manifest.masked``).
        calib: calibration input batches (every image up to the largest ``samples`` of the chain).
        device: where the passes and solves run.
        rank, world: this process's place under ``torchrun`` (0, 1 in a single process).
        shard: set by ``obs``: the calibration images this process solved from (its share under torchrun).
        layers: filled by the method: what it did (per layer for ``obs``, ``"*"`` for ``bn``).
        warnings: every warning emitted.
    """

    pruned: nn.Module
    dense: nn.Module | None
    masked: list[str]
    calib: list[torch.Tensor]
    device: torch.device
    rank: int = 0
    world: int = 1
    shard: int | None = None
    layers: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def calib_samples(self, samples: int) -> list[torch.Tensor]:
        """The first ``samples`` calibration images, as batches (the last one cut short)."""
        from prunecli.reconstruction.joint import calibration

        return calibration(self.calib, samples)

    def warn(self, message: str) -> None:
        """Records and logs ``message`` once."""
        if message not in self.warnings:
            self.warnings.append(message)
            log.warning(message)

    def changed_layers(self) -> list[str]:
        """Module names of the masked layer weights (their outputs differ from the dense model's)."""
        modules = dict(self.pruned.named_modules())
        names = {n.removesuffix(".weight") for n in self.masked if n.endswith(".weight")}
        return sorted(n for n in names if n in modules)


def restore_obs(ctx: MaskedContext, params: dict[str, Any]) -> None:
    """Refits the masked layers of ``ctx.pruned`` to ``ctx.dense`` (registered as ``obs``), masks kept.

    Params: ``damp`` (0.01), ``blocksize`` (128), ``refit`` (true: the exact per-row optimum on the mask),
    ``samples`` (128 calibration images, shared over the processes under ``torchrun``).
    """
    from prunecli.reconstruction.joint import layer_rows, obs_params, shard
    from prunecli.reconstruction.masked import restore_masked

    p = obs_params(params, params)  # resolved by the registry (defaults filled in); checked again here
    if ctx.dense is None:
        raise InputError("obs needs the dense parent model", hint="pass --dense PATH")
    batches = shard(ctx.calib_samples(int(p["samples"])), ctx.rank, ctx.world)
    report = restore_masked(ctx.pruned, ctx.dense, ctx.masked, batches, damp=float(p["damp"]),
                            blocksize=int(p["blocksize"]), device=ctx.device, refit=bool(p["refit"]))  # fmt: skip
    ctx.pruned.to("cpu")
    ctx.dense.to("cpu")
    for message in report.warnings:
        ctx.warn(f"obs: {message}")
    ctx.layers.update(layer_rows(report))
    ctx.shard = sum(len(b) for b in batches)


def restore_bn_masked(ctx: MaskedContext, params: dict[str, Any]) -> None:
    """Re-estimates the BN statistics of a masked model (registered as ``bn``; see the module docstring).

    Params as ``bn`` on a channel-pruned checkpoint: ``samples`` (2048), ``scope`` (``downstream`` of the
    masked layers, or ``all``), ``exact`` (true).
    """
    from prunecli.restoration.bn import bn_request, downstream_bns, reestimate_bn

    samples, scope, exact, norms = bn_request(params, bool(ctx.calib), ctx.pruned)
    batches = ctx.calib_samples(samples)
    names: set[str] = set(norms)
    if scope == "downstream":
        changed = ctx.changed_layers()
        ctx.pruned.to(ctx.device)
        names = downstream_bns(ctx.pruned, changed, batches[0][:1].to(ctx.device)) if changed else set()
        ctx.pruned.to("cpu")
        if not names:
            ctx.warn("bn: no BatchNorm depends on a masked layer; statistics left as they are")
    est = reestimate_bn(ctx.pruned, batches, ctx.device, names=names, exact=exact)
    ctx.layers["*"] = {
        "scope": scope,
        "bn_layers": len(est.updated),
        "bn_kept": len(norms) - len(est.updated),
        "samples": est.samples,
        "passes": est.passes,
        "exact": exact,
    }
