"""``prunecli eval``: accuracy, loss, fidelity to a reference, latency."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from prunecli.cli._options import (
    ArchOpt,
    BatchSizeOpt,
    CkptArg,
    DataOpt,
    DeviceOpt,
    EmaOpt,
    InputSizeOpt,
    MeanOpt,
    MetricsOpt,
    NumClassesOpt,
    QuietOpt,
    SeedOpt,
    StdOpt,
    WorkersOpt,
    model_inputs,
)
from prunecli.cli._output import console, run_command

EXAMPLES = [
    "prunecli eval p50.safetensors --data digits:test",
    "prunecli eval p50.safetensors --data imagefolder:val/ --reference base.safetensors",
    "prunecli prune base.safetensors --method magnitude --ratio 0.5 -o p.safetensors | prunecli eval - --data digits",
]


def eval_cmd(
    checkpoint: CkptArg,
    data: DataOpt = "digits:test",
    reference: Annotated[
        Optional[str], typer.Option("--reference", help="Reference checkpoint: adds top-1 agreement and KL.")
    ] = None,
    benchmark: Annotated[bool, typer.Option("--benchmark", help="Add latency and throughput on the device.")] = False,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    ema: EmaOpt = False,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = 128,
    workers: WorkersOpt = 0,
    seed: SeedOpt = 0,
    metrics: MetricsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate a checkpoint: top-1, top-5, loss and samples on a data spec."""
    from prunecli.api.eval import evaluate
    from prunecli.distributed import main_only_output

    inputs, dopts, common = model_inputs(arch, num_classes, ema, input_size, mean, std)

    def summary(result: object) -> None:
        m = result.metrics  # type: ignore[attr-defined]
        extra = f", agreement {m['agreement']:.4f}, KL {m['kl']:.4f}" if "agreement" in m else ""
        console().print(f"top1 {m['top1']:.4f}  top5 {m['top5']:.4f}  loss {m['loss']:.4f}  n={m['samples']}{extra}")

    with main_only_output():
        run_command(
            "eval",
            lambda: evaluate(
                checkpoint,
                data,
                inputs=inputs,
                data_options=dopts,
                reference=reference,
                benchmark=benchmark,
                device=device,
                batch_size=batch_size,
                workers=workers,
                seed=seed,
            ),
            input=checkpoint,
            options={
                "data": data,
                "reference": reference,
                "benchmark": benchmark,
                **common,
                "batch_size": batch_size,
                "seed": seed,
            },
            metrics_file=metrics,
            quiet=quiet,
            summary=summary,
        )


def register(app: typer.Typer) -> None:
    app.command("eval", epilog="Examples:  " + "  |  ".join(EXAMPLES))(eval_cmd)
