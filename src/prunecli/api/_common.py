"""What every subcommand shares: reading CKPT with its flags, data with its transforms, writing OUT."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DataOptions", "InputOptions", "load_data", "load_input", "save_output"]


@dataclass(frozen=True)
class InputOptions:
    """How to read CKPT when it does not describe itself (DESIGN §2).

    Attributes:
        arch: timm architecture of a bare state dict (or to override a train.py checkpoint's).
        num_classes: classifier width of a bare state dict, or of a fresh ``arch:`` model.
        ema: take ``state_dict_ema`` from a timm train.py checkpoint.
        model_args: extra ``timm.create_model`` keyword arguments (``arch:`` models).
    """

    arch: str | None = None
    num_classes: int | None = None
    ema: bool = False
    model_args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataOptions:
    """Transform overrides for ``--data`` (else taken from the checkpoint's pretrained_cfg)."""

    input_size: Sequence[int] | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None


def load_input(spec: str, opts: InputOptions | None = None):  # -> Loaded (torch import kept lazy)
    """Loads CKPT (any DESIGN §2 form) with the given flags."""
    from prunecli.checkpoint.loaders import load_checkpoint

    opts = opts or InputOptions()
    return load_checkpoint(
        spec, arch=opts.arch, num_classes=opts.num_classes, ema=opts.ema, model_args=dict(opts.model_args)
    )


def load_data(
    spec: str,
    loaded: Any,
    opts: DataOptions | None = None,
    *,
    default_split: str = "test",
    train: bool = False,
    augment: bool = True,
):
    """Builds ``spec`` with the checkpoint's transforms; refuses a class-count mismatch."""
    from prunecli.data import build_dataset, check_num_classes, data_config

    opts = opts or DataOptions()
    cfg = data_config(loaded.manifest.pretrained_cfg, input_size=opts.input_size, mean=opts.mean, std=opts.std)
    data = build_dataset(
        spec,
        cfg,
        default_split=default_split,
        train=train,
        augment=augment,
        num_classes=loaded.manifest.num_classes,
    )
    check_num_classes(data, _head_classes(loaded.model) or loaded.manifest.num_classes)
    return data, cfg


def _head_classes(model: Any) -> int | None:
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def save_output(
    out: str | Path,
    model: Any,
    loaded: Any,
    *,
    command: str,
    options: Mapping[str, Any],
    force: bool,
    manifest: Any = None,
    transform: Any = None,
) -> tuple[str, str]:
    """Writes ``model`` with ``loaded``'s manifest (or ``manifest``) plus one lineage step.

    ``model`` may also be a mapping of tensors; ``transform`` goes to :func:`prunecli.checkpoint.safetensors_io.write_safetensors`.
    """
    from prunecli.checkpoint.writer import lineage_step, save_checkpoint

    base = manifest or loaded.manifest
    new = base.with_step(lineage_step(command, options, loaded))
    inputs = [loaded.source.path, loaded.source.weights]
    return save_checkpoint(out, model, new, force=force, inputs=inputs, transform=transform)
