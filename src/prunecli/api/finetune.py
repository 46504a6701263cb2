"""``prunecli finetune``: full fine-tuning of a checkpoint, or training from scratch from ``arch:NAME``.

Pruning masks recorded in the checkpoint (``manifest.masked``) are kept exactly through every step,
and ``wcr`` adds paper C's Weight Concentration Regularizer (METHODS §3.1) to the loss. The loop is
:func:`prunecli.training.train`, shared with ``finetune-lora``. Under ``torchrun`` each process
trains on its shard of every global batch (DDP, :mod:`prunecli.distributed`); only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from prunecli.api._common import DataOptions, InputOptions, load_data, save_output
from prunecli.errors import InputError
from prunecli.record import Result

__all__ = ["finetune"]


def _check_wcr(lam: float, eps: float, delta: float) -> None:
    if not math.isfinite(lam) or lam < 0:
        raise InputError(f"--wcr must be >= 0, got {lam}")
    if not math.isfinite(eps) or eps <= 0:
        raise InputError(f"--wcr-eps must be positive, got {eps}", hint="it keeps sqrt(w²+ε) differentiable at 0")
    if not math.isfinite(delta) or delta <= 0:
        raise InputError(f"--wcr-delta must be positive, got {delta}")


def _load(spec: str, source: Any, inputs: InputOptions | None) -> Any:
    """``load_input`` on an already-resolved source (``-`` reads stdin only once)."""
    from prunecli.checkpoint.loaders import load_checkpoint

    o = inputs or InputOptions()
    return load_checkpoint(
        spec, arch=o.arch, num_classes=o.num_classes, ema=o.ema, model_args=dict(o.model_args), source=source
    )


def finetune(
    spec: str,
    data: str = "digits:train",
    *,
    output: str | Path,
    inputs: InputOptions | None = None,
    data_options: DataOptions | None = None,
    val: str | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    recipe: str = "auto",
    optimizer: str | None = None,
    lr: float | None = None,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    schedule: str | None = None,
    warmup: float | None = None,
    augment: bool | str | None = None,
    label_smoothing: float = 0.0,
    clip_grad: float | None = None,
    amp: bool = True,
    wcr: float = 0.0,
    wcr_eps: float = 1e-8,
    wcr_delta: float = 1e-8,
    max_steps: int | None = None,
    device: str = "auto",
    workers: int = 0,
    seed: int = 0,
    force: bool = False,
) -> Result:
    """Trains every parameter of CKPT on ``data`` and writes the result to ``output``.

    Args:
        spec: CKPT (any DESIGN §2 form); ``arch:NAME`` trains a freshly initialised model.
        data: training data spec; the split defaults to ``train``.
        output: the checkpoint to write (``.safetensors`` or ``DIR/``).
        inputs: how to read CKPT (``num_classes`` sets the head of an ``arch:`` model).
        data_options: input size / mean / std overrides.
        val: a data spec evaluated after every epoch (split defaults to ``test``).
        epochs: passes over the training data.
        batch_size: training (and validation) batch size.
        recipe: where ``optimizer``, ``lr``, ``schedule``, ``warmup`` and ``augment`` come from when
            left at None (:data:`prunecli.recipes.RECIPES`): ``auto`` takes ``scratch`` (paper A: Adam
            1e-3, cosine, crop + flip) for an ``arch:`` model and ``finetune`` (Adam 1e-4, 10 % warm-up,
            cosine, crop only) for a trained checkpoint, which the from-scratch recipe damages.
        optimizer: ``adam``, ``adamw`` or ``sgd`` (with ``momentum``); None: from the recipe.
        lr: peak learning rate; None: from the recipe.
        weight_decay: weight decay on conv/linear weights (not biases or norms).
        momentum: SGD momentum.
        schedule: ``cosine``, ``step`` (÷10 at 1/3 and 2/3) or ``none``, after the warm-up; None: from the recipe.
        warmup: fraction of the optimizer steps spent warming the LR up linearly, in [0, 1); None: from the recipe.
        augment: ``crop-flip`` (paper A), ``crop`` or ``none`` (True/False: crop-flip/none); None: from the recipe.
        label_smoothing: cross-entropy label smoothing.
        clip_grad: clip the gradient norm to this value.
        amp: mixed precision on CUDA (ignored on CPU).
        wcr: λ of the Weight Concentration Regularizer (0 = off).
        wcr_eps: ε of the smooth absolute value sqrt(w²+ε).
        wcr_delta: δ added to each layer's variance.
        max_steps: stop after this many optimizer steps (quick runs, tests).
        device: ``auto``, ``cpu``, ``cuda[:i]``.
        workers: DataLoader worker processes.
        seed: seeds initialisation (``arch:``), shuffling, augmentation and dropout.
        force: overwrite an existing ``output``.

    Returns:
        A Result whose metrics hold per-epoch ``train_loss``, final ``train_acc``, ``val_top1`` per
        epoch (with ``val``), ``sparsity_before``/``sparsity_after`` over the prunable weights, the
        masked tensors' sparsity, ``recipe`` (every resolved training default and where it came
        from), and with ``wcr > 0`` the ``wcr`` block (λ, R, λ·R, per-layer Var(|w|)).

    Raises:
        InputError: invalid hyper-parameters or output path.
        DataError: the data's classes do not fit the model's head.

    Example:
        >>> finetune("arch:improved_cnn", "digits:train", output="base.safetensors", val="digits:test", epochs=12)
    """
    from prunecli import distributed as D
    from prunecli.checkpoint.sources import SourceKind, resolve_source
    from prunecli.checkpoint.writer import check_output
    from prunecli.data import augmentation_name, make_loader
    from prunecli.device import describe, resolve_device, seed_everything
    from prunecli.masks import Masks, sparsity
    from prunecli.prunable import prunable_params
    from prunecli.recipes import resolve_recipe, warmup_steps
    from prunecli.training import TrainConfig, train
    from prunecli.wcr import WCR

    source = resolve_source(spec)
    given = {"optimizer": optimizer, "lr": lr, "schedule": schedule, "warmup": warmup, "augment": augment}
    chosen, recipe_report = resolve_recipe(recipe, fresh=source.kind is SourceKind.ARCH, given=given)
    optimizer, lr, schedule, augment = chosen["optimizer"], chosen["lr"], chosen["schedule"], chosen["augment"]
    augment = recipe_report["augment"] = augmentation_name(augment)
    config = TrainConfig(
        epochs=epochs, optimizer=optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum, schedule=schedule,
        label_smoothing=label_smoothing, clip_grad=clip_grad, amp=amp, max_steps=max_steps,
    )  # fmt: skip
    config.validate()
    _check_wcr(wcr, wcr_eps, wcr_delta)
    if batch_size < 1:
        raise InputError(f"--batch-size must be positive, got {batch_size}")
    check_output(output, force=force, inputs=[source.path, source.weights])  # fail before any work
    dev = resolve_device(device)
    seed_everything(seed)  # before load_input: an arch: model is initialised there
    loaded = _load(spec, source, inputs)
    train_ds, _ = load_data(data, loaded, data_options, default_split="train", train=True, augment=augment)
    val_ds = load_data(val, loaded, data_options, default_split="test")[0] if val else None

    model = loaded.model
    masks = Masks.from_manifest(model, loaded.manifest.masked)
    prunable = prunable_params(model)
    sparsity_before = sparsity(prunable.values())
    masked_before = masks.sparsity() if masks else None
    reg = WCR.for_model(model, wcr, eps=wcr_eps, delta=wcr_delta)

    # One seeded permutation per epoch, sharded over torchrun processes: N processes × B/N = one process × B.
    ctx = D.init(dev)
    if batch_size % ctx.world_size:
        raise InputError(f"--batch-size {batch_size} is not divisible by the {ctx.world_size} torchrun processes")
    n = len(train_ds.dataset)
    sampler = D.ShardSampler(
        n, shuffle=True, seed=seed, rank=ctx.rank, world_size=ctx.world_size, global_batch=batch_size,
        drop_last=n > batch_size,  # equal shards per step; no size-1 BatchNorm batches (timm's train.py drops too)
    )  # fmt: skip
    loader = make_loader(train_ds, batch_size=batch_size // ctx.world_size, workers=workers, sampler=sampler)
    val_loader = make_loader(val_ds, batch_size=max(batch_size, 256), workers=workers) if val_ds else None
    total_steps = min(len(loader) * epochs, max_steps or len(loader) * epochs)
    config = dataclasses.replace(config, warmup_steps=warmup_steps(chosen["warmup"], total_steps))
    recipe_report["warmup_steps"] = config.warmup_steps
    start = time.perf_counter()
    result = train(
        D.wrap_ddp(model, dev), loader, dev, config, extra_loss=reg if wcr > 0 else None, masks=masks or None,
        val_loader=val_loader,
    )  # fmt: skip
    train_time = time.perf_counter() - start
    D.sync_buffers(model)  # rank 0's BatchNorm statistics are the ones written
    model.to("cpu")

    metrics: dict[str, Any] = result.metrics()
    for key in ("train_loss", "train_acc_per_epoch", "extra_loss"):  # equal shards: the mean over ranks is global
        if key in metrics:
            metrics[key] = D.mean_over_ranks(metrics[key])
    metrics["train_acc"] = metrics["train_acc_per_epoch"][-1]
    if "extra_loss" in metrics:
        metrics["wcr_per_epoch"] = metrics.pop("extra_loss")
    metrics.update(
        {
            "data": data,
            "val": val,
            "arch": loaded.manifest.arch,
            "train_samples": len(train_ds.dataset),
            "train_time_s": round(train_time, 3),
            "world_size": ctx.world_size,
            "sparsity_before": sparsity_before,
            "sparsity_after": sparsity(prunable.values()),
            "masked": masks.names(),
            "masked_sparsity_before": masked_before,
            "masked_sparsity_after": masks.sparsity() if masks else None,
            "recipe": recipe_report,
        }
    )
    if wcr > 0:  # the block (λ, R, per-layer variances) only describes a run that used the regulariser
        metrics["wcr"] = reg.stats()
    if result.epochs and result.epochs[-1].val is not None:
        metrics["val_top1_final"] = result.epochs[-1].val["top1"]
    lineage_options = {
        "data": data, "val": val, "epochs": epochs, "batch_size": batch_size, "recipe": recipe_report["name"],
        "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, "momentum": momentum, "schedule": schedule,
        "warmup": chosen["warmup"], "warmup_steps": config.warmup_steps, "augment": augment,
        "label_smoothing": label_smoothing, "clip_grad": clip_grad, "amp": amp, "wcr": wcr, "wcr_eps": wcr_eps,
        "wcr_delta": wcr_delta, "max_steps": max_steps, "seed": seed,
    }  # fmt: skip
    written: tuple[str | None, str | None] = (None, None)
    if ctx.is_main:  # under torchrun only rank 0 writes
        written = save_output(output, model, loaded, command="finetune", options=lineage_options, force=force)
    path, sha = D.broadcast_object(written)
    return Result(checkpoint=path, sha256=sha, metrics=metrics, device=describe(dev))
