"""Load any checkpoint prunecli reads as a ready-to-run model, from Python.

A channel-pruned checkpoint has tensors narrower than timm's architecture, so neither
``timm.create_model(..., pretrained=True)`` nor ``load_state_dict`` can take it: the model has to be
rebuilt with the recorded shapes first (``manifest.structure``, :mod:`prunecli.surgery`). This module is
the public entry point that does that, for every input form the command line reads::

    import prunecli

    model = prunecli.load_model("p50.safetensors")        # nn.Module, eval mode, pruned or not
    transform = prunecli.create_transform(model)          # timm's eval transform for its pretrained_cfg
    logits = model(transform(img).unsqueeze(0))

The model carries ``pretrained_cfg`` as every timm model does, so ``timm.data.resolve_model_data_config``
works on it too; ``num_features`` is the width the classifier really reads (pruning narrows it).

Importing :mod:`prunecli` stays light: torch and timm load when :func:`load_model` first runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from torch import nn

    from prunecli.checkpoint.manifest import Manifest

__all__ = ["LoadedModel", "create_transform", "data_config", "folder_notes", "load_model"]


@dataclass
class LoadedModel:
    """What :func:`load_model` returns with ``with_config=True``.

    Attributes:
        model: the network, in eval mode (``model.pretrained_cfg`` set).
        data_config: timm's data config (input size, interpolation, mean, std, crop) for the model.
        transform: the eval transform built from ``data_config`` (PIL image → normalised tensor).
        manifest: the checkpoint's prunecli metadata (architecture, structure, masks, lineage).
    """

    model: nn.Module
    data_config: dict[str, Any]
    transform: Callable[[Any], Any]
    manifest: Manifest = field(repr=False)


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    ema: bool = False,
    device: str = "cpu",
    with_config: bool = False,
) -> nn.Module | LoadedModel:
    """Loads a checkpoint into a model ready for inference, whatever pruning did to its shapes.

    Args:
        path: any form the command line reads: a prunecli ``.safetensors`` file or ``-o DIR/`` folder,
            a timm Hugging Face folder, a timm ``train.py`` ``.pth.tar``, a bare state dict (with
            ``arch``), ``timm:NAME`` from the local cache, or ``arch:NAME`` (fresh weights).
        arch: the timm architecture of a bare state dict.
        num_classes: classifier width of a bare state dict or an ``arch:`` model.
        ema: take a timm ``train.py`` checkpoint's EMA weights.
        device: where to put the model (``cpu``, ``cuda``, ``cuda:1``, ``auto``).
        with_config: return a :class:`LoadedModel` (model, data config, eval transform, manifest)
            instead of the bare model.

    Returns:
        The model in eval mode, float32, with ``pretrained_cfg`` set; a LoRA adapter kept beside the
        weights (``finetune-lora --merge none``) is attached, as ``prunecli eval`` runs it.

    Raises:
        prunecli.errors.CheckpointError: unreadable, corrupt or non-fitting checkpoint.
        prunecli.errors.UnknownNameError: an unknown architecture.

    Example:
        >>> model = load_model("c30.safetensors")
        >>> model(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    from prunecli.checkpoint.loaders import load_checkpoint
    from prunecli.device import resolve_device
    from prunecli.models import pruned_num_features

    loaded = load_checkpoint(str(path), arch=arch, num_classes=num_classes, ema=ema)
    model = loaded.model
    model.pretrained_cfg = dict(loaded.manifest.pretrained_cfg)
    width = pruned_num_features(model)
    if width is not None and getattr(model, "num_features", None) not in (None, width):
        model.num_features = width  # timm's attribute still holds the dense width after channel pruning
    model = model.to(resolve_device(device)).eval()
    if not with_config:
        return model
    cfg = data_config(model)
    return LoadedModel(model, cfg, create_transform(cfg), loaded.manifest)


def data_config(
    model_or_cfg: Any,
    *,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Any]:
    """timm's data config of a loaded model (or of a ``pretrained_cfg`` dict), with optional overrides.

    The same resolution ``prunecli eval`` uses, so a transform built from it reproduces eval's numbers.
    """
    from prunecli.data import data_config as _resolve

    cfg = model_or_cfg if isinstance(model_or_cfg, dict) else getattr(model_or_cfg, "pretrained_cfg", None)
    if cfg is None:
        raise TypeError("data_config() needs a model loaded by prunecli.load_model (with pretrained_cfg) or a dict")
    return _resolve(dict(cfg), input_size=input_size, mean=mean, std=std)  # a data config resolves to itself


def create_transform(model_or_cfg: Any, *, training: bool = False) -> Callable[[Any], Any]:
    """The eval transform (resize, centre crop, normalise) for a loaded model or a data config.

    ``training=True`` gives the training transform ``finetune`` uses (random crop with padding 4).
    """
    from prunecli.data import eval_transform, train_transform

    cfg = data_config(model_or_cfg)
    return train_transform(cfg, augment="crop") if training else eval_transform(cfg)


_README = """\
# {arch} — written by prunecli

These weights have {why}. {consequence}

Load them through prunecli (installed with `pip install -e .` from its repository), which rebuilds them:

```python
import prunecli

model = prunecli.load_model("{name}")          # eval mode, ready to run
transform = prunecli.create_transform(model)  # the eval transform from pretrained_cfg
```

or from the shell: `prunecli eval {name} --data imagefolder:val/`.
The `prunecli` key of `model.safetensors`' header holds the architecture, the pruned shapes and the
lineage of every step that produced this file (`prunecli inspect {name}`).
"""


def folder_notes(manifest: Manifest, model: Any = None, name: str = ".") -> tuple[dict[str, Any], str | None]:
    """What a ``-o DIR/`` folder's ``config.json`` and ``README.md`` must say when timm cannot load it alone.

    Returns:
        (config updates, README text or None). For a checkpoint whose shapes are timm's own and which
        needs nothing beside (no kept LoRA adapter), both are empty and the folder is a plain timm
        folder. Otherwise the config gets a ``prunecli`` key (``loader``, ``reason``) and
        ``num_features`` is set to the width the classifier really reads (or dropped when unknown),
        so that config.json never claims the dense width.
    """
    reasons: list[str] = []
    if manifest.structure:
        reasons.append("channel-pruned shapes")
    if manifest.adapters:
        reasons.append("a LoRA adapter kept beside the weights")
    if not reasons:
        return {}, None
    updates: dict[str, Any] = {
        "prunecli": {
            "loader": "prunecli.load_model",
            "reason": " and ".join(reasons),
            "example": f"import prunecli; model = prunecli.load_model({name!r})",
        }
    }
    if manifest.structure:
        from prunecli.models import pruned_num_features

        width = pruned_num_features(model) if model is not None else None
        updates["num_features"] = width  # None: dropped by the writer rather than claiming the dense width
    why = " and ".join(reasons)
    load = f"`timm.create_model('local-dir:{name}', pretrained=True)`"
    consequence = (
        f"{load} and `load_state_dict` cannot load them: their tensors are narrower than the architecture timm builds."
        if manifest.structure
        else f"{load} would load the base weights without the adapter."
    )
    readme = _README.format(arch=manifest.arch, why=why, consequence=consequence, name=name)
    return updates, readme
