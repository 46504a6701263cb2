"""Training through the pruning mask: adapted layers compute with ``(W + ΔW) ⊙ M``."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from prunecli.checkpoint.adapters import ADAPTER_NAME
from prunecli.lora.attach import lora_layers, merged_weight
from prunecli.lora.masks import MASK_ATTR, mask_of

__all__ = ["mask_updates"]

_MASKABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def mask_updates(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[str]:
    """Makes every adapted layer that carries a pruning mask compute with ``(W + ΔW) ⊙ M``.

    Paper A trains ``W + (α/r)·B A`` with a dense ``B A``; re-applying the mask after the merge then
    throws away the part of the update that fell on pruned positions, so the written checkpoint is not
    the model that was trained (at high sparsity most of the update is lost). Training through the
    mask keeps the update where it survives: the adapted layer computes with exactly the weight the
    ``masked`` merge writes, and the gradient reaching ``B`` and ``A`` sees only kept positions. With
    ``B = 0`` the layer still computes ``W ⊙ M = W``, so training starts at the pruned model.

    The layer's ``forward`` is replaced on the instance (peft's class is untouched); merging or
    unloading drops the LoRA layer and with it the replacement.

    Args:
        model: a model with peft LoRA layers (:func:`attach_lora`).
        masks: base parameter name → boolean keep-mask (:func:`masks_of`).

    Returns:
        The base parameter names now trained through their mask, sorted.
    """
    done: list[str] = []
    for name, layer in sorted(lora_layers(model).items()):
        keep = masks.get(f"{name}.weight")
        base = layer.get_base_layer()
        if keep is None or ADAPTER_NAME not in layer.lora_A or not isinstance(base, _MASKABLE):
            continue
        # A plain attribute, not a buffer: DDP would broadcast a weight-sized buffer every step.
        setattr(layer, MASK_ATTR, keep.to(torch.bool))
        layer.forward = functools.partial(_masked_forward, layer)
        done.append(f"{name}.weight")
    return done


def _masked_forward(layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``(W + ΔW) ⊙ M`` applied as the base layer would apply ``W``; dropout only on the update's input."""
    base = layer.get_base_layer()
    if layer.disable_adapters or layer.merged or ADAPTER_NAME not in layer.active_adapters:
        return base(x, *args, **kwargs)
    weight = merged_weight(layer) * mask_of(layer)
    dropout = layer.lora_dropout[ADAPTER_NAME]
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
        # W ⊙ M = W (the mask is W's own non-zero pattern), so the update alone sees the dropped input.
        return _apply(base, x, base.weight, base.bias) + _apply(base, dropout(x), weight - base.weight, None)
    return _apply(base, x, weight, base.bias)


_PLAIN_FORWARDS = frozenset({nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward})


def _apply(base: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The base layer's operation with another weight (its stride, padding, groups for convolutions)."""
    if type(base).forward in _PLAIN_FORWARDS:
        if isinstance(base, nn.Linear):
            return nn.functional.linear(x, weight, bias)
        return base._conv_forward(x, weight, bias)
    # A subclass with its own forward (timm's Conv2dSame pads first, StdConv2d standardises the weight):
    # run that forward with the weight swapped in, so the merged layer computes the same thing.
    params = {"weight": weight}
    if base.bias is not None:
        params["bias"] = bias if bias is not None else torch.zeros_like(base.bias)
    return torch.func.functional_call(base, params, (x,))
