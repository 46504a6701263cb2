"""``prunecli finetune-lora``: LoRA recovery of a pruned checkpoint that keeps its sparsity."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from prunecli.cli._options import (
    ArchOpt,
    CkptArg,
    DeviceOpt,
    EmaOpt,
    ForceOpt,
    InputSizeOpt,
    MeanOpt,
    MetricsOpt,
    NumClassesOpt,
    OutputOpt,
    QuietOpt,
    SeedOpt,
    StdOpt,
    WorkersOpt,
    model_inputs,
)
from prunecli.cli._output import console, run_command
from prunecli.cli.finetune import (
    AmpOpt,
    AugmentOpt,
    ClipOpt,
    EpochsOpt,
    LrOpt,
    MaxStepsOpt,
    OptimizerOpt,
    SmoothingOpt,
    TrainDataOpt,
    WcrDeltaOpt,
    WcrEpsOpt,
    WeightDecayOpt,
)

EXAMPLES = [
    "prunecli finetune-lora p50.safetensors --data digits:train --val digits:test -o p50lora.safetensors",
    "prunecli finetune-lora p50.safetensors --targets 'features.*.conv' --merge none -o p50a.safetensors",
    "torchrun --nproc-per-node 2 -m prunecli finetune-lora p50.safetensors --data imagefolder:train/ -o p.safetensors",
]

_LORA = "LoRA"
BatchOpt = Annotated[
    int, typer.Option("--batch-size", "-b", min=1, help="Global batch size (split over torchrun processes).")
]
ValOpt = Annotated[
    Optional[str],
    typer.Option("--val", help="Data spec for the recovery report: top-1 before and after (split defaults to test)."),
]
RankOpt = Annotated[int, typer.Option("--rank", "-r", help="Adapter rank r.", rich_help_panel=_LORA)]
AlphaOpt = Annotated[float, typer.Option("--alpha", help="LoRA α; the update is (α/r)·B A.", rich_help_panel=_LORA)]
DropoutOpt = Annotated[float, typer.Option("--dropout", help="Dropout on the adapter input.", rich_help_panel=_LORA)]
LinearOpt = Annotated[
    bool,
    typer.Option("--linear/--no-linear", help="Adapt every Linear layer (paper A); --no-linear adapts only --targets.",
                 rich_help_panel=_LORA),
]  # fmt: skip
TargetsOpt = Annotated[
    Optional[list[str]],
    typer.Option("--targets", "-t", help="Also adapt modules matching this glob (repeatable), e.g. 'features.*.conv'.",
                 rich_help_panel=_LORA),
]  # fmt: skip
ExcludeOpt = Annotated[
    Optional[list[str]],
    typer.Option("--exclude", help="Never adapt modules matching this glob (repeatable).", rich_help_panel=_LORA),
]
DoraOpt = Annotated[bool, typer.Option("--dora", help="Weight-decomposed LoRA (DoRA).", rich_help_panel=_LORA)]
BnOpt = Annotated[
    str,
    typer.Option("--bn", help="BatchNorm while training: train (statistics update) or eval (frozen).",
                 rich_help_panel=_LORA),
]  # fmt: skip
MergeOpt = Annotated[
    str,
    typer.Option("--merge", help="masked: merge and re-apply the pruning masks (sparsity kept); dense: merge; "
                 "none: keep the adapter beside the weights in peft's format (OUT.adapter/).", rich_help_panel=_LORA),
]  # fmt: skip
MaskedUpdateOpt = Annotated[
    Optional[bool],
    typer.Option("--masked-update/--no-masked-update",
                 help="Train masked layers through their pruning mask, (W + (α/r)·B A) ⊙ M, so the merged "
                 "checkpoint is exactly the trained model. Default: on with --merge masked; "
                 "--no-masked-update trains paper A's plain W + (α/r)·B A.", rich_help_panel=_LORA),
]  # fmt: skip
ScheduleOpt = Annotated[str, typer.Option("--schedule", help="LR schedule per step: none (paper A), cosine or step.")]
WcrOpt = Annotated[
    float,
    typer.Option("--wcr", help="λ of paper C's regulariser on the adapted layers' effective weights W + (α/r)·B A.",
                 rich_help_panel="WCR (paper C)"),
]  # fmt: skip


def finetune_lora_cmd(
    checkpoint: CkptArg,
    output: OutputOpt,
    data: TrainDataOpt = "digits:train",
    val: ValOpt = None,
    rank: RankOpt = 8,
    alpha: AlphaOpt = 16.0,
    dropout: DropoutOpt = 0.0,
    linear: LinearOpt = True,
    targets: TargetsOpt = None,
    exclude: ExcludeOpt = None,
    dora: DoraOpt = False,
    bn: BnOpt = "train",
    merge: MergeOpt = "masked",
    masked_update: MaskedUpdateOpt = None,
    epochs: EpochsOpt = 10,
    batch_size: BatchOpt = 128,
    optimizer: OptimizerOpt = "adam",
    lr: LrOpt = 1e-3,
    weight_decay: WeightDecayOpt = 0.0,
    schedule: ScheduleOpt = "none",
    augment: AugmentOpt = True,
    label_smoothing: SmoothingOpt = 0.0,
    clip_grad: ClipOpt = None,
    amp: AmpOpt = True,
    max_steps: MaxStepsOpt = None,
    wcr: WcrOpt = 0.0,
    wcr_eps: WcrEpsOpt = 1e-8,
    wcr_delta: WcrDeltaOpt = 1e-8,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    ema: EmaOpt = False,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = 0,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    metrics: MetricsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Recover a pruned checkpoint with LoRA adapters, keeping its sparsity (paper A).

    Rank-r adapters are trained beside the frozen weights of every Linear layer (and --targets);
    B starts at zero, so training starts exactly at the pruned model. --merge masked (default) writes
    a merged checkpoint whose pruned weights are still exactly zero. Runs data-parallel under
    torchrun; only rank 0 writes.
    """
    from prunecli.api.finetune_lora import finetune_lora
    from prunecli.distributed import main_only_output

    inputs, dopts, common = model_inputs(arch, num_classes, ema, input_size, mean, std)
    options = {
        "data": data, "val": val, "rank": rank, "alpha": alpha, "dropout": dropout, "linear": linear,
        "targets": targets or [], "exclude": exclude or [], "dora": dora, "bn": bn, "merge": merge,
        "masked_update": masked_update, "epochs": epochs,
        "batch_size": batch_size, "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay,
        "schedule": schedule, "augment": augment, "label_smoothing": label_smoothing, "clip_grad": clip_grad,
        "amp": amp, "max_steps": max_steps, "wcr": wcr, "wcr_eps": wcr_eps, "wcr_delta": wcr_delta, **common,
        "seed": seed,
        "output": str(output),
    }  # fmt: skip

    def summary(result: object) -> None:
        m = result.metrics  # type: ignore[attr-defined]
        losses = " ".join(f"{v:.3f}" for v in m["train_loss"])
        head = f"LoRA r={m['rank']} α={m['alpha']:g} on {len(m['targets'])} layers ({m['trainable_params']} trainable)"
        console().print(f"{head}; train loss {losses}; train acc {m['train_acc']:.4f}")
        line = f"sparsity {m['sparsity_before']:.4f} → {m['sparsity_after']:.4f} (merge {m['merge']})"
        if "top1_before" in m:
            line += f"; top1 {m['top1_before']:.4f} → {m['top1_after']:.4f} ({m['lora_improvement']:+.4f})"
        console().print(f"{line}  → {result.checkpoint}")  # type: ignore[attr-defined]

    with main_only_output() as main:
        run_command(
            "finetune-lora",
            lambda: finetune_lora(
                checkpoint,
                data,
                output=output,
                inputs=inputs,
                data_options=dopts,
                val=val,
                rank=rank,
                alpha=alpha,
                dropout=dropout,
                linear=linear,
                targets=tuple(targets or ()),
                exclude=tuple(exclude or ()),
                dora=dora,
                bn=bn,
                merge=merge,
                masked_update=masked_update,
                wcr=wcr,
                wcr_eps=wcr_eps,
                wcr_delta=wcr_delta,
                epochs=epochs,
                batch_size=batch_size,
                optimizer=optimizer,
                lr=lr,
                weight_decay=weight_decay,
                schedule=schedule,
                augment=augment,
                label_smoothing=label_smoothing,
                clip_grad=clip_grad,
                amp=amp,
                max_steps=max_steps,
                device=device,
                workers=workers,
                seed=seed,
                force=force,
            ),
            input=checkpoint,
            options=options,
            metrics_file=metrics if main else None,
            quiet=quiet or not main,
            summary=summary,
        )


def register(app: typer.Typer) -> None:
    app.command("finetune-lora", epilog="Examples:  " + "  |  ".join(EXAMPLES))(finetune_lora_cmd)
