"""BatchNorm statistics re-estimation on calibration images, usable alone or after any other method.

Pruning and compensation change the distribution that reaches every BatchNorm downstream while its
running statistics still describe the dense model. Re-estimating them (``momentum=None``: an exact
cumulative average over the calibration batches, everything else in eval mode so dropout stays off)
is the cheapest data-aware repair. It does not need the dense parent.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunecli.errors import InputError
from prunecli.restoration.core import RestoreContext

__all__ = ["reestimate_bn", "restore_bn"]


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> int:
    """Recomputes the running mean/variance of every BatchNorm of ``model`` on ``batches``.

    Returns:
        the number of BatchNorm layers updated.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    saved = [(m, m.momentum) for m in norms]
    model.eval().to(device)
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for x in batches:
            model(x.to(device))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.eval().to("cpu")
    return len(norms)


def restore_bn(ctx: RestoreContext, params: dict[str, Any]) -> None:
    """Re-estimates the BN statistics of ``ctx.pruned`` (registered as ``bn``)."""
    samples = int(params["samples"])
    if samples < 2:
        raise InputError("bn: samples must be >= 2")
    if not ctx.calib:
        raise InputError("bn needs calibration data", hint="pass --data SPEC (e.g. --data digits:train)")
    batches, n = [], 0
    for b in ctx.calib:
        if n >= samples:
            break
        batches.append(b[: samples - n])
        n += len(batches[-1])
    if len(batches[-1]) < 2 and len(batches) > 1:  # a 1-sample batch has no variance in train-mode BN
        batches.pop()
    updated = reestimate_bn(ctx.pruned, batches, ctx.device)
    if updated == 0:
        raise InputError("bn: the model has no BatchNorm layers to re-estimate")
    ctx.layers["*"] = {"method": "bn", "bn_layers": updated, "samples": sum(len(b) for b in batches)}
