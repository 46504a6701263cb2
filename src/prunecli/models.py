"""Rebuild a model from a manifest through timm's registry, on the meta device, then load weights.

Building on ``meta`` allocates nothing and runs no initialisers, so a checkpoint's weights are
materialised once (``load_state_dict(assign=True)``) instead of being initialised and then
overwritten. Architectures whose constructors cannot run on meta (a few call ``.item()`` on tensors)
fall back to a normal build.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import timm
import torch
from torch import nn

import prunecli.archs  # noqa: F401  (registers improved_cnn and fc_mlp with timm)
from prunecli.checkpoint.manifest import Manifest
from prunecli.errors import CheckpointError, UnknownNameError

__all__ = ["build_model", "create_fresh", "default_pretrained_cfg", "pruned_num_features", "split_arch"]

log = logging.getLogger(__name__)


def split_arch(name: str) -> tuple[str, str]:
    """Splits ``resnet18.a1_in1k`` into (``resnet18``, ``a1_in1k``); validates the architecture."""
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch[:4]}*")[:8] if len(arch) >= 3 else []
        raise UnknownNameError(
            f"unknown architecture {arch!r}",
            hint=f"similar timm names: {', '.join(close)}" if close else "see timm.list_models()",
        )
    return arch, tag


def default_pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained config for ``arch[.tag]`` as a plain dict (input size, mean/std, head name).

    Raises:
        UnknownNameError: the architecture is not registered, or it has no pretrained tag ``tag``.
    """
    arch, tag = split_arch(name)
    try:
        cfg = timm.models.get_pretrained_cfg(name if tag else arch)
    except RuntimeError:  # timm: "Invalid pretrained tag (x) for arch."
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise UnknownNameError(
            f"unknown pretrained tag {tag!r} for {arch!r}",
            hint=f"choose from {', '.join(tags)}" if tags else f"{arch!r} has no pretrained tags; drop '.{tag}'",
        ) from None
    return dict(cfg.to_dict()) if cfg is not None else {}


def _create(manifest: Manifest, *, meta: bool) -> nn.Module:
    from prunecli.checkpoint.validate import filter_model_args  # loader options and paths never reach timm

    kwargs, dropped = filter_model_args(manifest.model_args, where=manifest.arch)
    for line in dropped:
        logging.getLogger("prunecli").warning(line)
    if manifest.num_classes is not None:
        kwargs["num_classes"] = manifest.num_classes
    try:
        if meta:
            with torch.device("meta"):
                model = timm.create_model(manifest.arch, pretrained=False, **kwargs)
        else:
            model = timm.create_model(manifest.arch, pretrained=False, **kwargs)
    except TypeError as exc:
        raise CheckpointError(f"cannot build {manifest.arch!r} with model_args {kwargs}: {exc}") from None
    if manifest.pretrained_cfg:
        model.pretrained_cfg = dict(manifest.pretrained_cfg)
    if manifest.structure:
        from prunecli.surgery import apply_structure  # only structurally pruned checkpoints need it

        apply_structure(model, manifest.structure)
        width = pruned_num_features(model)
        if width is not None and isinstance(getattr(model, "num_features", None), int):
            model.num_features = width  # timm set the dense width at construction; the head reads fewer
    return model


def create_fresh(manifest: Manifest) -> nn.Module:
    """A freshly initialised model (``arch:NAME``), seeded by the caller."""
    split_arch(manifest.arch)
    return _create(manifest, meta=False)


def build_model(manifest: Manifest, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Builds ``manifest.arch`` and loads ``state_dict`` into it, strictly.

    Raises:
        UnknownNameError: the architecture is not registered with timm.
        CheckpointError: keys are missing/unexpected or a tensor's shape does not fit.
    """
    split_arch(manifest.arch)
    try:
        model = _create(manifest, meta=True)
        _load(model, state_dict, manifest, assign=True)
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:  # non-persistent buffers computed in __init__: rebuild normally
            raise _MetaUnsupported(leftover[0])
    except _MetaUnsupported as why:
        log.debug("meta build not possible for %s (%s); building normally", manifest.arch, why)
        model = _create(manifest, meta=False)
        _load(model, state_dict, manifest, assign=False)
    except (RuntimeError, NotImplementedError) as exc:
        if "meta" not in str(exc).lower():
            raise
        model = _create(manifest, meta=False)
        _load(model, state_dict, manifest, assign=False)
    return model.eval()


class _MetaUnsupported(Exception):
    pass


def _load(model: nn.Module, state_dict: Mapping[str, torch.Tensor], manifest: Manifest, *, assign: bool) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]!r}")
        raise CheckpointError(
            f"weights do not fit architecture {manifest.arch!r}: {'; '.join(parts)}",
            hint="check --arch/--num-classes, or the model_args the weights were trained with",
        )
    for name, tensor in state_dict.items():
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(tensor.shape)} in the checkpoint but "
                f"{tuple(own[name].shape)} in {manifest.arch!r}",
                hint="check --arch/--num-classes, or the model_args the weights were trained with",
            )
    model.load_state_dict(state_dict, strict=True, assign=assign)


def pruned_num_features(model: Any) -> int | None:
    """The width the classifier reads: ``in_features`` of a Linear head (``in_channels`` of a 1×1 conv head).

    timm sets ``model.num_features`` once, at construction; channel pruning narrows the head's input
    without touching it. None when the model has no single Linear/Conv classifier (or no ``get_classifier``).
    """
    from torch import nn

    get = getattr(model, "get_classifier", None)
    try:
        head = get() if callable(get) else None
    except Exception:  # a few timm heads raise when asked for a classifier they do not have
        return None
    if isinstance(head, nn.Linear):
        return int(head.in_features)
    if isinstance(head, nn.Conv2d):
        return int(head.in_channels)
    return None
