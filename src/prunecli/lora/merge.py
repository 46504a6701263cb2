"""Ending training: the merge modes (``--merge masked|dense|none``) and merging a kept adapter."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunecli.lora.attach import lora_layers
from prunecli.registry import Registry

__all__ = ["MERGE_MODES", "MergeOutcome", "merge_adapters", "merge_kept_adapters"]


@dataclass
class MergeOutcome:
    """What a merge mode did.

    Attributes:
        model: the plain model to save (adapters merged in, or removed when kept aside).
        mode: the mode actually applied (``masked`` may fall back to ``dense``).
        masked: the tensors whose zeros are still pruning masks after the merge.
        adapter_state: for ``none``: the peft model whose adapter is saved beside the checkpoint.
        warnings: what the user should know (e.g. the fallback).
    """

    model: nn.Module
    mode: str
    masked: list[str]
    adapter_state: Any = None
    warnings: list[str] = field(default_factory=list)


MergeFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], MergeOutcome]
MERGE_MODES: Registry[MergeFn] = Registry("merge mode")


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merges every LoRA layer of ``model`` into its base layer in place and unwraps it.

    Works on a ``PeftModel`` and on a plain model with injected layers (:func:`attach_adapters`).
    Returns the plain model. peft's safe merge refuses NaN/inf results.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload(safe_merge=True)
    with torch.no_grad():
        for name, layer in list(lora_layers(model).items()):
            layer.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer.get_base_layer())
    return model


def merge_kept_adapters(model: nn.Module, masked: Iterable[str]) -> nn.Module:
    """Folds an attached adapter (:func:`attach_adapters`) into a plain model, keeping the pruning masks.

    For commands that need plain parameter names (``prune``, ``score``, ``finetune``, a new
    ``finetune-lora``) on a ``--merge none`` checkpoint: the masks are read from the base weights
    before merging and re-applied after, as ``--merge masked`` does.
    """
    layers = lora_layers(model)
    if not layers:
        return model
    keep: dict[str, torch.Tensor] = {}
    for name in sorted(set(masked)):
        mod_name = name.removesuffix(".weight")
        if name.endswith(".weight") and mod_name in layers:
            keep[name] = layers[mod_name].get_base_layer().weight.detach() != 0
    model = merge_adapters(model)
    with torch.no_grad():
        for name, k in keep.items():
            p = model.get_parameter(name)
            p.mul_(k.to(p.dtype))
    return model


@MERGE_MODES.register("masked")
def _merge_masked(peft_model: nn.Module, masks: Mapping[str, torch.Tensor]) -> MergeOutcome:
    """Merge, then multiply each masked tensor by its pruning mask: the sparsity survives exactly."""
    adapted = {f"{n}.weight" for n in lora_layers(peft_model)}
    warn: list[str] = []
    if not adapted & set(masks):
        warn.append(
            "--merge masked: no adapted layer carries a pruning mask (the checkpoint lists none for them); "
            "merged dense instead"
        )
    model = merge_adapters(peft_model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():
            params[name].mul_(keep.to(params[name].dtype))
    return MergeOutcome(model, "dense" if warn else "masked", sorted(masks), warnings=warn)


@MERGE_MODES.register("dense")
def _merge_dense(peft_model: nn.Module, masks: Mapping[str, torch.Tensor]) -> MergeOutcome:
    """Merge; the adapted layers become dense, so their masks are dropped from the manifest."""
    adapted = {f"{n}.weight" for n in lora_layers(peft_model)}
    model = merge_adapters(peft_model)
    return MergeOutcome(model, "dense", sorted(set(masks) - adapted))


@MERGE_MODES.register("none")
def _merge_none(peft_model: nn.Module, masks: Mapping[str, torch.Tensor]) -> MergeOutcome:
    """Keep the adapter beside the (untouched, still sparse) base weights, in peft's format."""
    base = peft_model.get_base_model()
    plain = _unwrapped_copy(base)
    return MergeOutcome(plain, "none", sorted(masks), adapter_state=peft_model)


def _unwrapped_copy(base: nn.Module) -> nn.Module:
    """A copy of ``base`` with every LoRA layer replaced by its base layer (adapter dropped)."""
    import copy

    clone = copy.deepcopy(base)
    for name, layer in list(lora_layers(clone).items()):
        parent_name, _, child = name.rpartition(".")
        parent = clone.get_submodule(parent_name) if parent_name else clone
        setattr(parent, child, layer.get_base_layer())
    return clone
