"""Wrapping a model with peft LoRA layers, and the weights the adapted layers compute with."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from prunecli.checkpoint.adapters import ADAPTER_NAME
from prunecli.lora.masks import mask_of
from prunecli.lora.targets import LoraOptions, select_targets

__all__ = [
    "attach_lora",
    "effective_weight_fns",
    "effective_weights",
    "lora_layers",
    "merged_weight",
    "trainable_params",
]


def attach_lora(model: nn.Module, opts: LoraOptions, targets: Sequence[str] | None = None) -> nn.Module:
    """Wraps ``model`` with peft LoRA adapters on ``targets`` (default :func:`select_targets`).

    The base model is modified in place (peft injects its layers); the returned object is the
    ``PeftModel``. Only the adapter parameters (and DoRA magnitudes) require gradients. B is
    zero-initialised, so the adapted model computes exactly what the pruned model computed.
    """
    from peft import LoraConfig, get_peft_model

    targets = list(targets) if targets is not None else select_targets(model, opts)
    config = LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        # A regex matched with re.fullmatch: exactly these module names, never a suffix match.
        target_modules="|".join(re.escape(t) for t in targets),
        use_dora=opts.dora,
        init_lora_weights=True,
        bias="none",
    )
    peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
    for name, p in peft_model.named_parameters():
        p.requires_grad_(_is_adapter_param(name))
    return peft_model


def _is_adapter_param(name: str) -> bool:
    return any(f".{k}." in f".{name}." for k in ("lora_A", "lora_B", "lora_magnitude_vector"))


def trainable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name → parameter for every parameter that requires a gradient."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Base-model module name → peft LoRA layer, for every adapted layer inside ``model``."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            out[_base_name(name)] = mod
    return out


def _base_name(name: str) -> str:
    """``base_model.model.fc1`` → ``fc1`` (peft's wrapper prefixes)."""
    return name.removeprefix("base_model.model.")


def effective_weights(model: nn.Module, only: str | None = None) -> dict[str, torch.Tensor]:
    """Base parameter name → the weight each adapted layer computes with, differentiable.

    Vanilla LoRA: ``W + (α/r)·B A`` (peft's ``get_delta_weight``, which covers conv shapes).
    DoRA: ``m / ‖W + ΔW‖_row · (W + ΔW)`` (the merged weight, with the norm not detached so that a
    regulariser sees it). A layer set up by :func:`mask_updates` multiplies this by its pruning mask.
    These are the tensors the WCR term regularises (docs/wcr.md, paper C's LoRA setting).
    """
    out: dict[str, torch.Tensor] = {}
    for name, layer in sorted(lora_layers(model).items()):
        if ADAPTER_NAME not in layer.lora_A or (only is not None and only != f"{name}.weight"):
            continue
        eff = merged_weight(layer)
        keep = mask_of(layer)
        out[f"{name}.weight"] = eff if keep is None else eff * keep
    return out


def merged_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a merge would write for one LoRA layer (before any mask), differentiable."""
    w = layer.get_base_layer().weight
    eff = w + layer.get_delta_weight(ADAPTER_NAME)
    if ADAPTER_NAME in getattr(layer, "lora_magnitude_vector", {}):
        mag = layer.lora_magnitude_vector[ADAPTER_NAME].weight
        norm = eff.flatten(1).norm(p=2, dim=1)
        eff = eff * (mag.reshape(-1) / norm).reshape(-1, *([1] * (eff.ndim - 1)))
    return eff


def effective_weight_fns(model: nn.Module) -> dict[str, Callable[[], torch.Tensor]]:
    """Like :func:`effective_weights`, one zero-argument function per layer, recomputed at each call.

    The form :class:`prunecli.wcr.WCR` takes for tensors that change every step.
    """
    names = sorted(f"{n}.weight" for n, layer in lora_layers(model).items() if ADAPTER_NAME in layer.lora_A)
    return {n: functools.partial(_one_effective, model, n) for n in names}


def _one_effective(model: nn.Module, name: str) -> torch.Tensor:
    return effective_weights(model, only=name)[name]
