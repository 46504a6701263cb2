"""``prunecli finetune-lora``: LoRA recovery of a pruned checkpoint that keeps its sparsity (paper A).

Adapters ``(α/r)·B A`` are trained beside the frozen (pruned) weights of every Linear layer — plus
``targets`` — with :func:`prunecli.training.train`; B starts at zero, so step 0 is the pruned model.
Afterwards a merge mode from :data:`prunecli.lora.MERGE_MODES` decides what is written:
``masked`` (merge, then re-apply each masked tensor's pruning mask: the sparsity survives exactly),
``dense`` (merge; the adapted layers lose their zeros) or ``none`` (the adapter stays beside the
weights, in peft's format, in ``OUT.adapter/``; ``eval`` and peft both load it). With ``masked`` the
masked layers also *train* through their mask (:func:`prunecli.lora.mask_updates`), so the written
checkpoint is exactly the trained model; ``masked_update=False`` trains paper A's plain ``W + s·B A``
instead and loses the update's pruned positions at the merge.

Under ``torchrun --nproc-per-node N`` the run is data-parallel (DDP over the adapter parameters;
see :mod:`prunecli.distributed` for how N processes reproduce one); only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecli.api._common import DataOptions, InputOptions, load_data
from prunecli.errors import InputError
from prunecli.record import Result
from prunecli.registry import Registry

__all__ = ["TARGET_PRESETS", "finetune_lora"]

log = logging.getLogger(__name__)

# ---- which layers get adapters by default ------------------------------------------------------------
#
# Paper A adapts every Linear layer, which on its CNN covers the pruned classifier MLP. On a CNN whose
# convolutions were pruned (a ResNet: every pruned layer is a conv, the only Linear is the unpruned head)
# that set adapts nothing that lost weights, and the masked merge then has no mask to keep. "auto" adds
# the pruned layers whenever some of them are not Linear.

PresetFn = Callable[[nn.Module, list[str], int], tuple[str, bool, list[str]]]  # → (name, every Linear?, names)
TARGET_PRESETS: Registry[PresetFn] = Registry("target preset")


def _pruned_layers(model: nn.Module, manifest: Any) -> list[str]:
    """Modules that lost weights: those of masked tensors, and those channel pruning narrowed."""
    names = {n.rsplit(".", 1)[0] for n in manifest.masked if n.endswith(".weight")}
    structure = manifest.structure or {}
    names |= {m for m, diff in (structure.get("modules") or {}).items() if m and "weight" in (diff.get("params") or {})}
    modules = dict(model.named_modules())
    return [n for n in modules if n in names]  # definition order


def _adaptable(model: nn.Module, names: list[str], rank: int) -> list[str]:
    """The layers of ``names`` peft can adapt at ``rank`` and merge: Linear/Conv with one group, rank ≤ min dim."""
    kept = []
    for name in names:
        mod = model.get_submodule(name)
        if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or getattr(mod, "groups", 1) != 1:
            log.info("LoRA: pruned layer %s (%s) is not adapted (peft cannot merge it)", name, type(mod).__name__)
        elif rank > min(int(mod.weight.shape[0]), int(mod.weight[0].numel())):  # the largest rank B·A can have
            log.info("LoRA: pruned layer %s is not adapted (rank %d > its min(fan-out, fan-in))", name, rank)
        else:
            kept.append(name)
    return kept


@TARGET_PRESETS.register("auto")
def _auto(model: nn.Module, pruned: list[str], rank: int) -> tuple[str, bool, list[str]]:
    """Every Linear layer, plus the pruned layers when some pruned layer is not Linear."""
    if any(not isinstance(model.get_submodule(n), nn.Linear) for n in pruned):
        return "linear+pruned", True, _adaptable(model, pruned, rank)
    return "linear", True, []


@TARGET_PRESETS.register("linear", aliases=("paper-a",))
def _linear(model: nn.Module, pruned: list[str], rank: int) -> tuple[str, bool, list[str]]:
    """Paper A's set: every Linear layer."""
    return "linear", True, []


@TARGET_PRESETS.register("pruned")
def _pruned(model: nn.Module, pruned: list[str], rank: int) -> tuple[str, bool, list[str]]:
    """Only the layers that were pruned (masked or narrowed)."""
    return "pruned", False, _adaptable(model, pruned, rank)


@TARGET_PRESETS.register("linear+pruned")
def _linear_pruned(model: nn.Module, pruned: list[str], rank: int) -> tuple[str, bool, list[str]]:
    """Every Linear layer and every pruned layer."""
    return "linear+pruned", True, _adaptable(model, pruned, rank)


@TARGET_PRESETS.register("none")
def _none(model: nn.Module, pruned: list[str], rank: int) -> tuple[str, bool, list[str]]:
    """Nothing but the ``targets`` globs."""
    return "none", False, []


def _check(wcr: float, wcr_eps: float, wcr_delta: float, batch_size: int) -> None:
    if not math.isfinite(wcr) or wcr < 0:
        raise InputError(f"--wcr must be >= 0, got {wcr}")
    if not math.isfinite(wcr_eps) or wcr_eps <= 0:
        raise InputError(f"--wcr-eps must be positive, got {wcr_eps}")
    if not math.isfinite(wcr_delta) or wcr_delta <= 0:
        raise InputError(f"--wcr-delta must be positive, got {wcr_delta}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be positive, got {batch_size}")


def _prunable_sparsity(model: Any, names: list[str]) -> float:
    from prunecli.masks import sparsity

    params = dict(model.named_parameters())
    return sparsity(params[n] for n in names if n in params)


def finetune_lora(
    spec: str,
    data: str = "digits:train",
    *,
    output: str | Path,
    inputs: InputOptions | None = None,
    data_options: DataOptions | None = None,
    val: str | None = None,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    linear: bool = True,
    target_preset: str = "auto",
    targets: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    dora: bool = False,
    bn: str = "train",
    merge: str = "masked",
    masked_update: bool | None = None,
    wcr: float = 0.0,
    wcr_eps: float = 1e-8,
    wcr_delta: float = 1e-8,
    epochs: int = 10,
    batch_size: int = 128,
    recipe: str = "auto",
    optimizer: str | None = None,
    lr: float | None = None,
    weight_decay: float = 0.0,
    schedule: str | None = None,
    warmup: float | None = None,
    augment: bool | str | None = None,
    label_smoothing: float = 0.0,
    clip_grad: float | None = None,
    amp: bool = True,
    max_steps: int | None = None,
    device: str = "auto",
    workers: int = 0,
    seed: int = 0,
    force: bool = False,
) -> Result:
    """Trains LoRA adapters on a (pruned) checkpoint and writes the recovered model to ``output``.

    Args:
        spec: CKPT (any DESIGN §2 form), typically the output of ``prune``.
        data: training data spec; the split defaults to ``train``.
        output: the checkpoint to write (``.safetensors`` or ``DIR/``).
        inputs: how to read CKPT when it does not describe itself.
        data_options: input size / mean / std overrides.
        val: data spec for the recovery report: accuracy before and after (split defaults to ``test``).
        rank: adapter rank r (paper A: 8); at least 1 and at most min(fan-out, fan-in) of each layer.
        alpha: LoRA α; the update is scaled by α/r (paper A: 16).
        dropout: dropout on the adapter input (paper A: 0).
        linear: False adapts only ``targets`` (the same as ``target_preset="none"``).
        target_preset: the layers adapted besides ``targets`` (:data:`TARGET_PRESETS`): ``auto`` (default)
            adapts every Linear layer plus every pruned layer whenever some pruned layer is not Linear
            (a pruned CNN's convs), else every Linear layer; ``linear`` is paper A's set (every Linear
            layer); ``pruned`` the pruned layers only; ``none`` nothing but ``targets``.
        targets: extra module globs to adapt, e.g. ``features.*.conv``.
        exclude: module globs never adapted.
        dora: weight-decomposed LoRA (peft ``use_dora``).
        bn: ``train`` (BatchNorm running statistics update while training) or ``eval`` (frozen).
        merge: ``masked``, ``dense`` or ``none`` (see the module docstring). ``masked`` on a checkpoint
            whose adapted layers carry no pruning mask falls back to ``dense`` with a warning (there is
            no sparsity to keep; the record says ``merge: dense`` and ``merge_requested: masked``).
        wcr: λ of paper C's regulariser on the adapted layers' effective weights W + (α/r)·B A (0 = off).
        wcr_eps: ε of the smooth absolute value.
        wcr_delta: δ added to each layer's variance.
        epochs: passes over the training data (paper A: 10).
        batch_size: global training batch (paper A: 128); split evenly over torchrun processes.
        recipe: where ``optimizer``, ``lr``, ``schedule``, ``warmup`` and ``augment`` come from when left
            at None (:data:`prunecli.recipes.RECIPES`): ``auto`` takes ``lora`` for a trained checkpoint
            (Adam 1e-3, constant, 10 % warm-up, crop without flip) and ``lora-paper`` (paper A exactly:
            constant 1e-3 from step 0, crop + flip) for an ``arch:`` model.
        optimizer: ``adam`` (paper A), ``adamw`` or ``sgd``; None: from the recipe.
        lr: learning rate (paper A: 1e-3); None: from the recipe.
        weight_decay: weight decay on the adapter matrices.
        schedule: ``none`` (paper A: constant), ``cosine`` or ``step``; None: from the recipe.
        warmup: fraction of the steps spent warming the LR up linearly, in [0, 1); None: from the recipe.
        augment: ``crop-flip`` (paper A), ``crop`` or ``none``; None: from the recipe.
        label_smoothing: cross-entropy label smoothing.
        clip_grad: clip the gradient norm to this value.
        amp: mixed precision on CUDA (ignored on CPU).
        max_steps: stop after this many optimizer steps.
        device: ``auto``, ``cpu``, ``cuda[:i]`` (under torchrun: this process's GPU).
        workers: DataLoader worker processes.
        seed: seeds adapter initialisation, shuffling, augmentation and dropout.
        force: overwrite an existing ``output`` (and its adapter folder).

    Returns:
        A Result whose metrics hold per-epoch ``train_loss``, final ``train_acc``,
        ``trainable_params``, ``targets`` (and ``target_preset``, ``pruned_layers``), ``recipe`` (every
        resolved training default and where it came from), ``sparsity_before``/``sparsity_after`` over all prunable
        weights (head included), ``masked_sparsity_before``/``_after`` over the masked tensors (what
        ``prune`` reports as ``sparsity`` with its default head exclusion), ``merge``, and with
        ``val``: ``top1_before``, ``top1_after``, ``lora_improvement``
        (after − before, paper A's metric) and ``top1_unmerged`` (the adapted model before merging).

    Raises:
        InputError: bad rank, a target glob that matches nothing, bad hyper-parameters or output.

    Example:
        >>> finetune_lora("p50.safetensors", "digits:train", output="p50lora.safetensors", val="digits:test")
    """
    from prunecli import distributed as D
    from prunecli import lora
    from prunecli.checkpoint.loaders import load_checkpoint
    from prunecli.checkpoint.sources import SourceKind, resolve_source
    from prunecli.checkpoint.writer import check_output
    from prunecli.data import augmentation_name, make_loader
    from prunecli.device import describe, resolve_device, seed_everything
    from prunecli.evaluation import evaluate_sharded
    from prunecli.prunable import prunable_params
    from prunecli.recipes import resolve_recipe, warmup_steps
    from prunecli.training import TrainConfig, train
    from prunecli.wcr import WCR

    source = resolve_source(spec)
    given = {"optimizer": optimizer, "lr": lr, "schedule": schedule, "warmup": warmup, "augment": augment}
    chosen_recipe, recipe_report = resolve_recipe(
        recipe, fresh=source.kind is SourceKind.ARCH, adapters=True, given=given
    )
    optimizer, lr, schedule = chosen_recipe["optimizer"], chosen_recipe["lr"], chosen_recipe["schedule"]
    augment = recipe_report["augment"] = augmentation_name(chosen_recipe["augment"])
    config = TrainConfig(
        epochs=epochs, optimizer=optimizer, lr=lr, weight_decay=weight_decay, schedule=schedule,
        label_smoothing=label_smoothing, clip_grad=clip_grad, amp=amp, max_steps=max_steps,
    )  # fmt: skip
    config.validate()
    _check(wcr, wcr_eps, wcr_delta, batch_size)
    preset = TARGET_PRESETS.canonical(target_preset if linear else "none")
    merge_fn = lora.MERGE_MODES.get(merge)
    merge = lora.MERGE_MODES.canonical(merge)
    if masked_update is None:
        masked_update = merge == "masked"
    elif masked_update and merge != "masked":
        raise InputError(
            f"--masked-update needs --merge masked (got --merge {merge})",
            hint="--merge dense and none keep the whole update; drop --masked-update",
        )
    lora.BN_MODES.canonical(bn)
    opts = lora.LoraOptions(rank, alpha, dropout, linear, tuple(targets), tuple(exclude), dora, bn)

    out_path = check_output(output, force=force, inputs=[source.path, source.weights])  # fail before any work
    adapter_dir = lora.adapter_dir_for(output) if merge == "none" else None
    if adapter_dir is not None and adapter_dir.exists() and not force:
        raise InputError(f"adapter folder {str(adapter_dir)!r} exists", hint="pass --force to overwrite it")
    dev = resolve_device(device)
    ctx = D.init(dev)
    if batch_size % ctx.world_size:
        raise InputError(f"--batch-size {batch_size} is not divisible by the {ctx.world_size} torchrun processes")

    seed_everything(seed)
    o = inputs or InputOptions()
    loaded = load_checkpoint(
        spec, arch=o.arch, num_classes=o.num_classes, ema=o.ema, model_args=dict(o.model_args), source=source
    )
    # A --merge none checkpoint: fold its adapter in (masks kept) before training a new one.
    model = lora.merge_kept_adapters(loaded.model, loaded.manifest.masked)
    prunable = sorted(prunable_params(model))
    masks = lora.masks_of(model, loaded.manifest.masked)
    sparsity_before = _prunable_sparsity(model, prunable)
    masked_before = _prunable_sparsity(model, sorted(masks))
    train_ds, _ = load_data(data, loaded, data_options, default_split="train", train=True, augment=augment)
    val_ds = load_data(val, loaded, data_options, default_split="test")[0] if val else None
    eval_bs = max(batch_size, 256)

    metrics: dict[str, Any] = {}
    if val_ds is not None:
        before = evaluate_sharded(model, val_ds, dev, batch_size=eval_bs, workers=workers)
        metrics.update(top1_before=before["top1"], loss_before=before["loss"])

    pruned_layers = _pruned_layers(model, loaded.manifest)
    preset, adapt_linear, preset_targets = TARGET_PRESETS.get(preset)(model, pruned_layers, rank)
    opts = dataclasses.replace(opts, linear=adapt_linear, targets=(*preset_targets, *opts.targets))
    chosen = lora.select_targets(model, opts)
    peft_model = lora.attach_lora(model, opts, chosen)
    through_mask = lora.mask_updates(peft_model, masks) if masked_update else []
    n_trainable = sum(p.numel() for p in lora.trainable_params(peft_model).values())
    trainee = D.wrap_ddp(_BnMode(peft_model, bn), dev)
    n = len(train_ds.dataset)
    sampler = D.ShardSampler(
        n, shuffle=True, seed=seed, rank=ctx.rank, world_size=ctx.world_size, global_batch=batch_size,
        drop_last=n > batch_size,  # equal shards per step (DDP == one process); no size-1 BatchNorm batches
    )  # fmt: skip
    loader = make_loader(train_ds, batch_size=batch_size // ctx.world_size, workers=workers, sampler=sampler)
    total_steps = min(len(loader) * epochs, max_steps or len(loader) * epochs)
    config = dataclasses.replace(config, warmup_steps=warmup_steps(chosen_recipe["warmup"], total_steps))
    recipe_report["warmup_steps"] = config.warmup_steps
    reg = WCR(lora.effective_weight_fns(peft_model), wcr, wcr_eps, wcr_delta) if wcr > 0 else None

    start = time.perf_counter()
    result = train(trainee, loader, dev, config, extra_loss=reg)
    train_time = time.perf_counter() - start
    D.sync_buffers(peft_model)
    tm = result.metrics()
    for key in ("train_loss", "train_acc_per_epoch", "extra_loss"):  # equal shards: the mean over ranks is global
        if key in tm:
            tm[key] = D.mean_over_ranks(tm[key])
    tm["train_acc"] = tm["train_acc_per_epoch"][-1] if tm["train_acc_per_epoch"] else float("nan")
    if "extra_loss" in tm:
        tm["wcr_per_epoch"] = tm.pop("extra_loss")
    metrics.update(tm)
    if reg is not None:
        stats = reg.stats()
        metrics["wcr"] = {k: stats[k] for k in ("lambda", "eps", "delta", "R", "value", "layers", "var_abs")}

    if val_ds is not None:
        unmerged = evaluate_sharded(peft_model, val_ds, dev, batch_size=eval_bs, workers=workers)
        metrics["top1_unmerged"] = unmerged["top1"]
    peft_model.to("cpu")
    outcome = merge_fn(peft_model, {k: v.cpu() for k, v in masks.items()})
    for w in outcome.warnings:
        lora.log.warning(w)
    final = outcome.model.eval()
    metrics["sparsity_after"] = _prunable_sparsity(final, prunable)
    metrics["masked_sparsity_before"] = masked_before  # over the tensors the checkpoint lists as masked
    metrics["masked_sparsity_after"] = _prunable_sparsity(final, sorted(masks))
    if outcome.adapter_state is not None:
        eff = {k: v.detach() for k, v in lora.effective_weights(outcome.adapter_state).items()}
        metrics["sparsity_effective"] = _effective_sparsity(final, prunable, eff)
    if val_ds is not None:
        if outcome.adapter_state is None:
            after = evaluate_sharded(final, val_ds, dev, batch_size=eval_bs, workers=workers)["top1"]
        else:
            after = metrics["top1_unmerged"]  # the written checkpoint evaluates with its adapter attached
        metrics.update(top1_after=after, lora_improvement=after - metrics["top1_before"])
        final.to("cpu")

    metrics.update(
        {
            "data": data,
            "val": val,
            "arch": loaded.manifest.arch,
            "targets": chosen,
            "target_preset": preset,
            "pruned_layers": pruned_layers,
            "recipe": recipe_report,
            "rank": rank,
            "alpha": alpha,
            "scale": opts.scale,
            "dora": dora,
            "bn": bn,
            "trainable_params": n_trainable,
            "merge": outcome.mode,
            "merge_requested": merge,
            "masked_update": bool(through_mask),
            "masked_update_layers": through_mask,
            "masked": outcome.masked,
            "sparsity_before": sparsity_before,
            "sparsity_lost": max(0.0, sparsity_before - metrics["sparsity_after"]),
            "train_samples": n,
            "train_time_s": round(train_time, 3),
            "world_size": ctx.world_size,
        }
    )
    lineage_options = {
        "data": data, "val": val, "rank": rank, "alpha": alpha, "dropout": dropout, "linear": linear,
        "target_preset": preset, "recipe": recipe_report["name"], "warmup": chosen_recipe["warmup"],
        "warmup_steps": config.warmup_steps, "targets": list(targets), "exclude": list(exclude), "dora": dora,
        "bn": bn, "merge": merge, "masked_update": masked_update, "wcr": wcr,
        "wcr_eps": wcr_eps, "wcr_delta": wcr_delta, "epochs": epochs, "batch_size": batch_size, "optimizer": optimizer,
        "lr": lr, "weight_decay": weight_decay, "schedule": schedule, "augment": augment,
        "label_smoothing": label_smoothing, "clip_grad": clip_grad, "amp": amp, "max_steps": max_steps, "seed": seed,
        "world_size": ctx.world_size,
    }  # fmt: skip
    written: tuple[str | None, str | None] = (None, None)
    if ctx.is_main:
        written = _write(output, out_path, final, loaded, outcome, adapter_dir, lineage_options, force)
    written = D.broadcast_object(written)
    if outcome.adapter_state is not None and adapter_dir is not None:
        metrics["adapter"] = str(adapter_dir)
    return Result(checkpoint=written[0], sha256=written[1], metrics=metrics, device=describe(dev))


def _write(
    output: str | Path,
    out_path: Path,
    model: Any,
    loaded: Any,
    outcome: Any,
    adapter_dir: Path | None,
    options: dict[str, Any],
    force: bool,
) -> tuple[str, str]:
    """Rank 0: the checkpoint (and for ``--merge none`` the adapter folder beside it), all or nothing."""
    import dataclasses
    import shutil

    from prunecli import lora
    from prunecli.api._common import save_output

    manifest = dataclasses.replace(loaded.manifest, masked=list(outcome.masked), adapters=None)
    staged = None
    if outcome.adapter_state is not None and adapter_dir is not None:
        staged, meta = lora.stage_adapter(outcome.adapter_state, out_path.parent)
        base = out_path if adapter_dir.parent == out_path else out_path.parent
        manifest.adapters = {**meta, "path": str(adapter_dir.relative_to(base))}
    try:
        path, sha = save_output(output, model, loaded, command="finetune-lora", options=options, force=force,
                                manifest=manifest)  # fmt: skip
        if staged is not None and adapter_dir is not None:
            lora.commit_adapter(staged, adapter_dir)
    except BaseException:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    return path, sha


def _effective_sparsity(model: Any, names: list[str], effective: dict[str, Any]) -> float:
    """Sparsity of the weights the model with its adapter computes with (adapted layers are dense)."""
    from prunecli.masks import sparsity

    params = dict(model.named_parameters())
    return sparsity(effective.get(n, params[n]) for n in names if n in params)


class _BnMode(nn.Module):
    """Keeps ``--bn`` in force whenever the training loop switches the model to train mode."""

    def __init__(self, model: nn.Module, bn: str) -> None:
        super().__init__()
        self.model = model
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def train(self, mode: bool = True) -> _BnMode:
        from prunecli.lora import BN_MODES

        super().train(mode)
        if mode:
            BN_MODES.get(self.bn)(self.model)
        return self
