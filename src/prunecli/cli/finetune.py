"""``prunecli finetune``: full fine-tuning, or training from scratch from ``arch:NAME``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from prunecli.cli._options import (
    ArchOpt,
    BatchSizeOpt,
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

EXAMPLES = [
    "prunecli finetune arch:improved_cnn --data digits:train --val digits:test --epochs 12 -o base.safetensors",
    "prunecli finetune p50.safetensors --data imagefolder:train/ --epochs 5 --lr 1e-4 -o p50ft.safetensors",
    "prunecli finetune arch:improved_cnn --data digits:train --wcr 1e-5 -o wcr.safetensors",
]

_TRAIN = "Training"
TrainDataOpt = Annotated[
    str, typer.Option("--data", help="Training data spec (split defaults to train); see --data of eval.")
]
ValOpt = Annotated[
    Optional[str],
    typer.Option("--val", help="Validation data spec evaluated after every epoch (split defaults to test)."),
]
EpochsOpt = Annotated[int, typer.Option("--epochs", help="Passes over the training data.", rich_help_panel=_TRAIN)]
OptimizerOpt = Annotated[
    str, typer.Option("--optimizer", "--opt", help="adam, adamw or sgd (with --momentum).", rich_help_panel=_TRAIN)
]
LrOpt = Annotated[float, typer.Option("--lr", help="Peak learning rate.", rich_help_panel=_TRAIN)]
WeightDecayOpt = Annotated[
    float, typer.Option("--weight-decay", "--wd", help="Weight decay on conv/linear weights.", rich_help_panel=_TRAIN)
]
MomentumOpt = Annotated[float, typer.Option("--momentum", help="SGD momentum.", rich_help_panel=_TRAIN)]
ScheduleOpt = Annotated[
    str,
    typer.Option("--schedule", help="LR schedule per step: cosine, step (÷10 at 1/3, 2/3) or none.",
                 rich_help_panel=_TRAIN),
]  # fmt: skip
AugmentOpt = Annotated[
    bool,
    typer.Option("--augment/--no-augment", help="Random crop (padding 4) + horizontal flip, as in paper A.",
                 rich_help_panel=_TRAIN),
]  # fmt: skip
SmoothingOpt = Annotated[
    float, typer.Option("--label-smoothing", help="Cross-entropy label smoothing.", rich_help_panel=_TRAIN)
]
ClipOpt = Annotated[
    Optional[float],
    typer.Option("--clip-grad", help="Clip the gradient L2 norm to this value.", rich_help_panel=_TRAIN),
]
AmpOpt = Annotated[
    bool, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA (never on CPU).", rich_help_panel=_TRAIN)
]
MaxStepsOpt = Annotated[
    Optional[int], typer.Option("--max-steps", help="Stop after this many optimizer steps.", rich_help_panel=_TRAIN)
]
_WCR = "WCR (paper C)"
WcrOpt = Annotated[
    float,
    typer.Option("--wcr", help="λ of the Weight Concentration Regularizer Σ 1/(Var|w|+δ) (0 = off; CNNs: 1e-5).",
                 rich_help_panel=_WCR),
]  # fmt: skip
WcrEpsOpt = Annotated[float, typer.Option("--wcr-eps", help="ε in |w| ≈ sqrt(w²+ε).", rich_help_panel=_WCR)]
WcrDeltaOpt = Annotated[
    float, typer.Option("--wcr-delta", help="δ added to each layer's variance.", rich_help_panel=_WCR)
]


def finetune_cmd(
    checkpoint: CkptArg,
    output: OutputOpt,
    data: TrainDataOpt = "digits:train",
    val: ValOpt = None,
    epochs: EpochsOpt = 10,
    batch_size: BatchSizeOpt = 64,
    optimizer: OptimizerOpt = "adam",
    lr: LrOpt = 1e-3,
    weight_decay: WeightDecayOpt = 0.0,
    momentum: MomentumOpt = 0.9,
    schedule: ScheduleOpt = "cosine",
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
    """Fine-tune every weight of a checkpoint, or train one from scratch from arch:NAME.

    Pruned weights (the checkpoint's masked tensors) stay exactly zero; --wcr adds paper C's
    Weight Concentration Regularizer so that later magnitude pruning hurts less. Runs
    data-parallel under torchrun; only rank 0 writes.
    """
    from prunecli.api.finetune import finetune
    from prunecli.distributed import main_only_output

    inputs, dopts, common = model_inputs(arch, num_classes, ema, input_size, mean, std)
    train_kw = {
        "val": val, "epochs": epochs, "batch_size": batch_size, "optimizer": optimizer, "lr": lr,
        "weight_decay": weight_decay, "momentum": momentum, "schedule": schedule, "augment": augment,
        "label_smoothing": label_smoothing, "clip_grad": clip_grad, "amp": amp, "max_steps": max_steps, "wcr": wcr,
        "wcr_eps": wcr_eps, "wcr_delta": wcr_delta, "seed": seed,
    }  # fmt: skip
    options = {"data": data, **train_kw, **common, "output": str(output)}  # fmt: skip

    def summary(result: object) -> None:
        from rich.table import Table

        m = result.metrics  # type: ignore[attr-defined]
        table = Table(title=f"finetune {m['arch']} on {m['data']}", title_justify="left")
        for col in ("epoch", "train loss", "train acc", "lr", *(["val top1"] if m.get("val_top1") else [])):
            table.add_column(col, justify="right")
        for i, loss in enumerate(m["train_loss"]):
            row = [str(i + 1), f"{loss:.4f}", f"{m['train_acc_per_epoch'][i]:.4f}", f"{m['lr'][i]:.2e}"]
            if m.get("val_top1"):
                row.append(f"{m['val_top1'][i]:.4f}")
            table.add_row(*row)
        console().print(table)
        line = f"sparsity {m['sparsity_before']:.4f} → {m['sparsity_after']:.4f}"
        if m["wcr"]["lambda"] > 0:
            line += f"  WCR λ={m['wcr']['lambda']:g} λ·R={m['wcr']['value']:.4g}"
        console().print(f"{line}  ({m['train_time_s']:.1f}s)  → {result.checkpoint}")  # type: ignore[attr-defined]

    with main_only_output():
        run_command(
            "finetune",
            lambda: finetune(
                checkpoint,
                data,
                output=output,
                inputs=inputs,
                data_options=dopts,
                device=device,
                workers=workers,
                force=force,
                **train_kw,
            ),
            input=checkpoint,
            options=options,
            metrics_file=metrics,
            quiet=quiet,
            summary=summary,
        )


def register(app: typer.Typer) -> None:
    app.command("finetune", epilog="Examples:  " + "  |  ".join(EXAMPLES))(finetune_cmd)
