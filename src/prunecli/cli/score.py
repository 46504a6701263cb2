"""``prunecli score``: importance scores under one criterion; ``--compare`` rank-correlates scores files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from prunecli.cli._options import (
    ArchOpt,
    BatchSizeOpt,
    DeviceOpt,
    EmaOpt,
    ForceOpt,
    InputSizeOpt,
    MeanOpt,
    MetricsOpt,
    NumClassesOpt,
    OptDataOpt,
    QuietOpt,
    SeedOpt,
    StdOpt,
    WorkersOpt,
    model_inputs,
)
from prunecli.cli._output import console, run_command

# kept in sync with prunecli.criteria.CRITERIA by tests/test_score_cli.py (no torch import for --help)
METHODS_HELP = (
    "Criterion: random, magnitude (aliases l1, l2), taylor, snip, proscore, biascomp, wanda, fpgm, bnscale. "
    "--list-methods shows their options."
)
EXAMPLES = [
    "prunecli score base.safetensors --method taylor --data digits:train --batches 10 -o taylor.scores",
    "prunecli score base.safetensors --method proscore --data digits:train --fraction 0.05 -p lambda=0.01 "
    "-o pro.scores",
    "prunecli score base.safetensors --method l1 -o l1.scores",
    "prunecli score --compare taylor.scores snip.scores biascomp.scores",
]

PathsArg = Annotated[
    Optional[list[str]],
    typer.Argument(
        metavar="CKPT | SCORES...",
        help="Checkpoint to score (any form eval takes, '-' for the previous step's record); with --compare, "
        "two or more scores files.",
        show_default=False,
    ),
]
MethodOpt = Annotated[Optional[str], typer.Option("--method", "-m", help=METHODS_HELP, show_default=False)]
BatchesOpt = Annotated[
    Optional[int],
    typer.Option("--batches", help="Calibration batches (default: the method's own).", show_default=False),
]
FractionOpt = Annotated[
    Optional[float],
    typer.Option(
        "--fraction", help="Class-balanced fraction of the data in (0, 1] (paper D App. E).", show_default=False
    ),
]
ParamOpt = Annotated[
    Optional[list[str]],
    typer.Option("-p", "--param", metavar="KEY=VALUE", help="Criterion option, repeatable (e.g. -p agg=sq_mean).",
                 show_default=False),
]  # fmt: skip
ScoreModeOpt = Annotated[
    str, typer.Option("--score-mode", help="Model mode while scoring: eval, or train (paper reproduction).")
]
CompareOpt = Annotated[
    bool, typer.Option("--compare", help="Spearman rank correlation of the given scores files, per layer and overall.")
]
ListOpt = Annotated[bool, typer.Option("--list-methods", help="List the criteria, their needs and options, and exit.")]
ScoresOutOpt = Annotated[
    Optional[Path], typer.Option("-o", "--output", help="Scores file to write (safetensors).", show_default=False)
]


def score_cmd(
    paths: PathsArg = None,
    method: MethodOpt = None,
    data: OptDataOpt = None,
    batches: BatchesOpt = None,
    fraction: FractionOpt = None,
    param: ParamOpt = None,
    score_mode: ScoreModeOpt = "eval",
    compare: CompareOpt = False,
    list_methods: ListOpt = False,
    output: ScoresOutOpt = None,
    force: ForceOpt = False,
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
    metrics: MetricsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score every prunable parameter of a checkpoint with an importance criterion (higher = keep)."""
    from prunecli.errors import InputError
    from prunecli.record import Result

    paths = list(paths or [])

    if list_methods:

        def listing() -> Result:
            from prunecli.criteria import list_criteria

            return Result(metrics={"methods": list_criteria()})

        def show(result: Result) -> None:
            for m in result.metrics["methods"]:
                needs = "+".join(m["requires"]) or "weights only"
                console().print(f"{m['name']:<10} {m['granularity']:<15} {needs:<11} {m['help']}")
                for key, text in m["options"].items():
                    console().print(f"{'':<12}-p {key}=  {text}")

        run_command("score", listing, input=None, options={"list_methods": True}, metrics_file=metrics, quiet=quiet,
                    summary=show)  # fmt: skip
        return

    if compare:
        from prunecli.api.score import compare as compare_fn

        def show_pairs(result: Result) -> None:
            for p in result.metrics["pairs"]:
                fmt = lambda v: "n/a" if v is None else f"{v:+.3f}"  # noqa: E731
                console().print(f"{p['a']}  vs  {p['b']}: overall {fmt(p['overall'])}, "
                                f"mean per layer {fmt(p['mean_layer'])}")  # fmt: skip

        run_command("score", lambda: compare_fn(paths), input=None, options={"compare": paths},
                    metrics_file=metrics, quiet=quiet, summary=show_pairs)  # fmt: skip
        return

    inputs, dopts, common = model_inputs(arch, num_classes, ema, input_size, mean, std)
    checkpoint = paths[0] if len(paths) == 1 else None

    def work() -> Result:
        from prunecli.api.score import parse_params, score

        if checkpoint is None:
            raise InputError(
                f"score takes one checkpoint, got {len(paths)}", hint="pass --compare to compare scores files"
            )
        if not method:
            raise InputError("score needs --method", hint="e.g. --method taylor; --list-methods lists them")
        return score(
            checkpoint, method, out=output, force=force, data=data, batches=batches, fraction=fraction,
            params=parse_params(param), inputs=inputs, data_options=dopts, device=device, batch_size=batch_size,
            workers=workers, seed=seed, score_mode=score_mode,
        )  # fmt: skip

    def summary(result: Result) -> None:
        m = result.metrics
        console().print(f"{m['method']} ({m['granularity']}): {len(m['layers'])} layers, "
                        f"{m['scored_params']} scores, {m['samples']} samples → {result.extra['scores']}")  # fmt: skip

    from prunecli.distributed import main_only_output

    with main_only_output():
        run_command(
            "score",
            work,
            input=checkpoint,
            options={"method": method, "data": data, "batches": batches, "fraction": fraction, "params": param or [],
                     "score_mode": score_mode, **common, "batch_size": batch_size, "seed": seed},
            metrics_file=metrics,
            quiet=quiet,
            summary=summary,
        )  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("score", epilog="Examples:  " + "  |  ".join(EXAMPLES))(score_cmd)
