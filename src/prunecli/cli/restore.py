"""``prunecli restore``: training-free restoration after channel pruning (LBYL, Neuron Merging, lstsq, bn)."""

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
    "prunecli restore p50.safetensors --method lbyl -o p50r.safetensors",
    "prunecli restore p50.safetensors -m lbyl -p lambda2=0.01 --data digits:train --val digits:test -o r.safetensors",
    "prunecli restore p50.safetensors --method lstsq+bn --data digits:train -o r.safetensors",
    "prunecli restore p50.safetensors --method merge --dense base.safetensors -o r.safetensors",
]

_METHODS_HELP = (
    "Restoration method: lbyl (LBYL closed form, data-free; default), merge (Neuron Merging), lstsq (ridge "
    "refit of the consumers on --data), bn (BatchNorm re-estimation on --data); join with + to chain (lbyl+bn)."
)
MethodOpt = Annotated[str, typer.Option("--method", "-m", help=_METHODS_HELP)]
DenseOpt = Annotated[
    Optional[str],
    typer.Option("--dense", help="The dense parent (default: the prune step's input in the lineage; its sha256 "
                 "must match).", show_default=False),
]  # fmt: skip
CalibOpt = Annotated[
    Optional[str],
    typer.Option("--data", help="Calibration data (split defaults to train): needed by lstsq/bn; adds per-layer "
                 "reconstruction errors.", show_default=False),
]  # fmt: skip
ValOpt = Annotated[
    Optional[str],
    typer.Option("--val", help="Evaluation data (split defaults to test): adds top-1 before and after.",
                 show_default=False),
]  # fmt: skip
ParamOpt = Annotated[
    Optional[list[str]],
    typer.Option("--param", "-p", help="Method option key=value (repeatable): lbyl lambda1, lambda2, "
                 "mode=math|compat; merge threshold, lambda, mode; lstsq ridge, samples; "
                 "bn samples (default 2048), scope=downstream|all, exact=true|false."),
]  # fmt: skip


def _params(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r} is not key=value", param_hint="--param")
        out[key.strip()] = value.strip()
    return out


def restore_cmd(
    checkpoint: CkptArg,
    output: OutputOpt,
    method: MethodOpt = "lbyl",
    dense: DenseOpt = None,
    data: CalibOpt = None,
    val: ValOpt = None,
    param: ParamOpt = None,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    ema: EmaOpt = False,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = 0,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    metrics: MetricsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Restore a channel-pruned checkpoint without training (LBYL, Neuron Merging, least squares, BN)."""
    from prunecli.api.restore import restore

    params = _params(param)
    inputs, dopts, common = model_inputs(arch, num_classes, ema, input_size, mean, std)

    def summary(result: object) -> None:
        m = result.metrics  # type: ignore[attr-defined]
        text = f"{m['method']}: restored {m['restored_layers']} layer(s)"
        if "recon_error_mean" in m:
            text += f", consumer error {m['recon_error_before_mean']:.4f} → {m['recon_error_mean']:.4f}"
        if "top1" in m:
            text += f", top1 {m['top1_before']:.4f} → {m['top1']:.4f}"
        console().print(text)

    run_command(
        "restore",
        lambda: restore(
            checkpoint,
            method=method,
            out=str(output),
            dense=dense,
            data=data,
            val=val,
            params=params,
            force=force,
            inputs=inputs,
            data_options=dopts,
            device=device,
            batch_size=batch_size,
            workers=workers,
            seed=seed,
        ),
        input=checkpoint,
        options={
            "method": method,
            "dense": dense,
            "data": data,
            "val": val,
            "params": params,
            **common,
            "batch_size": batch_size,
            "seed": seed,
            "output": str(output),
        },
        metrics_file=metrics,
        quiet=quiet,
        summary=summary,
    )


def register(app: typer.Typer) -> None:
    app.command("restore", epilog="Examples:  " + "  |  ".join(EXAMPLES))(restore_cmd)
