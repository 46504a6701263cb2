"""Which parameters are prunable: one definition shared by score, prune, finetune and restore.

Prunable = the ``weight`` of every convolution and Linear layer (``ndim > 1``), timm's subclasses
included (``Conv2dSame``, ``timm.layers.Linear``, ViT ``qkv``/``proj``/``fc1``/``fc2``). Biases and
normalisation parameters are never pruned (docs/criteria.md). The classifier head is prunable but
excluded from ``prune`` by default (README.md, Subcommands ``--exclude``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

__all__ = ["PRUNABLE_TYPES", "classifier_modules", "match_any", "prunable_layers", "prunable_params"]

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name → conv/linear module with a weight of ndim > 1, in definition order."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, PRUNABLE_TYPES) and getattr(mod, "weight", None) is not None and mod.weight.ndim > 1
    }


def prunable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameter name (``layer.weight``) → the weight of every prunable layer."""
    return {f"{name}.weight": mod.weight for name, mod in prunable_layers(model).items()}


def classifier_modules(model: nn.Module) -> list[str]:
    """Names of the classifier head's prunable modules (timm ``pretrained_cfg['classifier']``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head = cfg.get("classifier")
    names = [head] if isinstance(head, str) else list(head or [])
    layers = prunable_layers(model)
    found = [n for n in names if n in layers]
    if found:
        return found
    if hasattr(model, "get_classifier"):
        clf = model.get_classifier()
        found = [n for n, m in layers.items() if m is clf]
        if found:
            return found
    return [list(layers)[-1]] if layers else []


def match_any(name: str, patterns: Iterable[str]) -> bool:
    """True when ``name`` (a module or parameter name) matches one of the shell-style globs."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.removesuffix(".weight"), p) for p in patterns)
