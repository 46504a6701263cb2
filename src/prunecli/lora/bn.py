"""Whether BatchNorm running statistics keep updating while the adapters train (``--bn``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from prunecli.registry import Registry

__all__ = ["BN_MODES"]

BN_MODES: Registry[Callable[[nn.Module], None]] = Registry("BatchNorm mode")


@BN_MODES.register("train")
def _bn_train(model: nn.Module) -> None:
    """BatchNorm layers normalise with batch statistics and update their running statistics."""
    model.train()


@BN_MODES.register("eval")
def _bn_eval(model: nn.Module) -> None:
    """BatchNorm layers keep their running statistics (frozen); dropout stays in training mode."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
