"""Pruning masks of adapted layers: read from the plain model, and kept on the adapted layer.

The attribute :data:`MASK_ATTR` is set by :func:`prunecli.lora.masked_update.mask_updates` and read by
:func:`prunecli.lora.attach.effective_weights` and the masked forward, so it lives here, below both.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["MASK_ATTR", "mask_of", "masks_of"]

MASK_ATTR = "_prunecli_keep"


def masks_of(model: nn.Module, masked: Iterable[str]) -> dict[str, torch.Tensor]:
    """Parameter name → boolean keep-mask (``param != 0``) for the tensors listed in ``masked``.

    Names are those of the plain (unwrapped) model: take the masks before attaching adapters.
    """
    params = dict(model.named_parameters())
    return {n: params[n].detach() != 0 for n in sorted(set(masked)) if n in params}


def mask_of(layer: nn.Module) -> torch.Tensor | None:
    """The layer's keep-mask on its weight's device (moved once, then cached), or None.

    Set by :func:`prunecli.lora.masked_update.mask_updates`.
    """
    keep = getattr(layer, MASK_ATTR, None)
    if keep is None:
        return None
    device = layer.get_base_layer().weight.device
    if keep.device != device:
        keep = keep.to(device)
        setattr(layer, MASK_ATTR, keep)
    return keep
