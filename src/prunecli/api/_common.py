"""What every subcommand shares: reading CKPT with its flags, data with its transforms, writing OUT."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunecli.requests import ModelSource, Transforms

__all__ = ["DataOptions", "InputOptions", "load_input", "save_output", "training_data", "training_setup"]


# The shared pieces of every request (:mod:`prunecli.requests`), under the names the api has used.
InputOptions = ModelSource
DataOptions = Transforms


def load_input(spec: str, opts: InputOptions | None = None):  # -> Loaded (torch import kept lazy)
    """Loads CKPT (any form in docs/checkpoints.md) with the given flags."""
    from prunecli.checkpoint.loaders import load_checkpoint

    opts = opts or InputOptions()
    return load_checkpoint(
        spec, arch=opts.arch, num_classes=opts.num_classes, ema=opts.ema, model_args=dict(opts.model_args)
    )


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
    provenance: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """Writes ``model`` with ``loaded``'s manifest (or ``manifest``) plus one lineage step.

    ``options`` is the request's JSON form (the same object as the record's ``options``);
    ``provenance`` adds what the run found rather than was asked (a scores file's digest, the dense
    parent restore used) as further keys of the lineage step.

    ``model`` may also be a mapping of tensors; ``transform`` goes to
    :func:`prunecli.checkpoint.safetensors_io.write_safetensors`.
    """
    from prunecli.checkpoint.writer import lineage_step, save_checkpoint

    base = manifest or loaded.manifest
    new = base.with_step({**lineage_step(command, options, loaded), **(provenance or {})})
    inputs = [loaded.source.path, loaded.source.weights]
    return save_checkpoint(out, model, new, force=force, inputs=inputs, transform=transform)


def training_data(req: Any, loaded: Any, augment: str, recipe: dict[str, Any]) -> tuple[Any, Any]:
    """The training and validation sets of a ``finetune``/``finetune-lora`` request.

    The augmentation the recipe proposed is resolved against the input size (``data.resolve_augment``:
    timm's transform for ImageNet-style inputs unless the user chose one) and written into the record's
    ``recipe`` block beside the reason.
    """
    from prunecli.data import data_config, load_data, resolve_augment

    tf = req.transforms
    cfg = data_config(loaded.manifest.pretrained_cfg, input_size=tf.input_size, mean=tf.mean, std=tf.std)
    augment, recipe["augment_because"] = resolve_augment(augment, cfg, explicit=req.training.augment is not None)
    recipe["augment"] = augment
    train_ds, _ = load_data(req.data, loaded, tf, default_split="train", train=True, augment=augment)
    val_ds = load_data(req.val, loaded, tf, default_split="test")[0] if req.val else None
    return train_ds, val_ds


def training_setup(req: Any, *, fresh: bool, adapters: bool = False) -> tuple[Any, dict, dict, str, Any]:
    """The training loop's configuration for a ``finetune``/``finetune-lora`` request.

    Options left at None come from the recipe (:func:`prunecli.recipes.resolve_recipe`: chosen by what
    the run starts from, ``fresh`` for an ``arch:`` model, ``adapters`` for LoRA).

    Returns:
        (TrainConfig, the resolved recipe values, the record's ``recipe`` block, the augmentation name,
        the device).
    """
    from prunecli.data import augmentation_name
    from prunecli.device import resolve_device
    from prunecli.recipes import resolve_recipe
    from prunecli.training import TrainConfig, run_precision

    t, run = req.training, req.runtime
    given = {"optimizer": t.optimizer, "lr": t.lr, "schedule": t.schedule, "warmup": t.warmup, "augment": t.augment}
    chosen, report = resolve_recipe(t.recipe, fresh=fresh, adapters=adapters, given=given)
    dev = resolve_device(run.device)
    config = TrainConfig(
        epochs=t.epochs, optimizer=chosen["optimizer"], lr=chosen["lr"], weight_decay=t.weight_decay,
        momentum=t.momentum, schedule=chosen["schedule"], label_smoothing=t.label_smoothing, clip_grad=t.clip_grad,
        max_steps=t.max_steps, precision=run_precision(run.precision, t.amp, dev), channels_last=run.channels_last,
    )  # fmt: skip
    config.validate()
    return config, chosen, report, augmentation_name(chosen["augment"]), dev
