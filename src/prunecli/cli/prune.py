"""``prunecli prune``: exact unstructured, N:M or channel pruning of a checkpoint."""

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
    OptDataOpt,
    OutputOpt,
    QuietOpt,
    SeedOpt,
    StdOpt,
    WorkersOpt,
    model_inputs,
)
from prunecli.cli._output import console, run_command

EXAMPLES = [
    "prunecli prune base.safetensors --method magnitude --ratio 0.5 -o p50.safetensors",
    "prunecli prune base.safetensors --scores taylor.scores --ratio 0.6 --scope global -o p60.safetensors",
    "prunecli prune base.safetensors --method magnitude --structure 2:4 -o p24.safetensors",
    "prunecli prune base.safetensors --scores bc.scores --ratio 0.7 --compensate bias -o bc70.safetensors",
    "prunecli prune base.safetensors --method magnitude --ratio 0.5 -o p.safetensors | prunecli eval - --data digits",
]

_SCORES = "Scores"
_SELECT = "Selection"
ScoresOpt = Annotated[
    Optional[str],
    typer.Option("--scores", help="Scores file of this checkpoint (prunecli score).", rich_help_panel=_SCORES),
]
MethodOpt = Annotated[
    Optional[str],
    typer.Option(
        "--method",
        "-m",
        help="Compute scores in process with this criterion instead of --scores "
        "(magnitude, taylor, snip, biascomp, …).",
        rich_help_panel=_SCORES,
    ),
]
ParamOpt = Annotated[
    Optional[list[str]],
    typer.Option("--param", "-p", help="Criterion option key=value (repeatable).", rich_help_panel=_SCORES),
]
BatchesOpt = Annotated[
    Optional[int], typer.Option("--batches", min=1, help="Calibration batches for --method.", rich_help_panel=_SCORES)
]
FractionOpt = Annotated[
    Optional[float],
    typer.Option(
        "--fraction", min=0.0, max=1.0, help="Calibration fraction of --data for --method.", rich_help_panel=_SCORES
    ),
]
RatioOpt = Annotated[
    Optional[float],
    typer.Option(
        "--ratio",
        "-r",
        help="Fraction of weights (or channels) to remove, in [0, 1); implied by N:M.",
        rich_help_panel=_SELECT,
    ),
]
StructureOpt = Annotated[
    str, typer.Option("--structure", help="unstructured, channel, or N:M (e.g. 2:4).", rich_help_panel=_SELECT)
]
ScopeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--scope",
        help="layer or global ranking. Default: global for taylor, snip, biascomp, proscore; layer otherwise.",
        rich_help_panel=_SELECT,
    ),
]
ExcludeOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--exclude",
        "-x",
        help="Glob of layers not to prune (repeatable); the classifier head is always excluded unless --include-head.",
        rich_help_panel=_SELECT,
    ),
]
IncludeHeadOpt = Annotated[
    bool, typer.Option("--include-head", help="Prune the classifier head too.", rich_help_panel=_SELECT)
]
LayerRatioOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--layer-ratio",
        help="GLOB=R: own ratio (and scope) for matching layers; repeatable, the last matching pattern wins.",
        rich_help_panel=_SELECT,
    ),
]
RoundToOpt = Annotated[
    int,
    typer.Option(
        "--round-to", min=1, help="Channel pruning: keep channel counts a multiple of N.", rich_help_panel=_SELECT
    ),
]
MinChannelsOpt = Annotated[
    int,
    typer.Option(
        "--min-channels", min=1, help="Channel pruning: keep at least N channels per layer.", rich_help_panel=_SELECT
    ),
]
CompensateOpt = Annotated[
    Optional[str],
    typer.Option(
        "--compensate", help="bias: apply paper E's optimal bias shifts (biascomp scores).", rich_help_panel=_SELECT
    ),
]
RestoreOpt = Annotated[
    Optional[str],
    typer.Option(
        "--restore", help="Channel pruning: training-free restoration afterwards (lbyl, …).", rich_help_panel=_SELECT
    ),
]
ScoreModeOpt = Annotated[
    str,
    typer.Option("--score-mode", help="Model mode while scoring for --method: eval or train.", rich_help_panel=_SCORES),
]


def _value(text: str) -> object:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _kv(items: list[str] | None) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not key=value", param_hint="--param")
        out[key.strip()] = _value(value.strip())
    return out


def prune_cmd(
    checkpoint: CkptArg,
    output: OutputOpt,
    ratio: RatioOpt = None,
    scores: ScoresOpt = None,
    method: MethodOpt = None,
    data: OptDataOpt = None,
    param: ParamOpt = None,
    batches: BatchesOpt = None,
    fraction: FractionOpt = None,
    score_mode: ScoreModeOpt = "eval",
    structure: StructureOpt = "unstructured",
    scope: ScopeOpt = None,
    exclude: ExcludeOpt = None,
    include_head: IncludeHeadOpt = False,
    layer_ratio: LayerRatioOpt = None,
    round_to: RoundToOpt = 1,
    min_channels: MinChannelsOpt = 1,
    compensate: CompensateOpt = None,
    restore: RestoreOpt = None,
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
    force: ForceOpt = False,
    metrics: MetricsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Prune a checkpoint: remove the lowest-scoring weights (exactly round(r·N) per scope) or channels.

    Unstructured and N:M pruning keep dense shapes with zeros and list the masked tensors in the
    output's metadata, so fine-tuning keeps them zero.
    """
    from prunecli.api.prune import parse_layer_ratio, prune

    inputs, dopts, common = model_inputs(arch, num_classes, ema, input_size, mean, std)
    params = _kv(param)

    def work() -> object:
        pairs = [parse_layer_ratio(t) for t in layer_ratio or []]
        return prune(
            checkpoint,
            out=output,
            ratio=ratio,
            scores=scores,
            method=method,
            data=data,
            params=params,
            batches=batches,
            fraction=fraction,
            structure=structure,
            scope=scope,
            exclude=list(exclude or []),
            include_head=include_head,
            layer_ratios=pairs,
            round_to=round_to,
            min_channels=min_channels,
            compensate=compensate,
            restore=restore,
            inputs=inputs,
            data_options=dopts,
            device=device,
            batch_size=batch_size,
            workers=workers,
            seed=seed,
            score_mode=score_mode,
            force=force,
        )

    def summary(result: object) -> None:
        m = result.metrics  # type: ignore[attr-defined]
        console().print(
            f"sparsity {m.get('sparsity', 0):.4f} (target {m.get('target_ratio', 0):g}), "
            f"params {m.get('params_nonzero', 0):,}/{m.get('params', 0):,} nonzero → {result.checkpoint}"  # type: ignore[attr-defined]
        )

    run_command(
        "prune",
        work,  # type: ignore[arg-type]
        input=checkpoint,
        options={
            "output": str(output),
            "ratio": ratio,
            "scores": scores,
            "method": method,
            "data": data,
            "param": params,
            "batches": batches,
            "fraction": fraction,
            "score_mode": score_mode,
            "structure": structure,
            "scope": scope,
            "exclude": exclude or [],
            "include_head": include_head,
            "layer_ratio": layer_ratio or [],
            "round_to": round_to,
            "min_channels": min_channels,
            "compensate": compensate,
            "restore": restore,
            **common,
            "batch_size": batch_size,
            "seed": seed,
        },
        metrics_file=metrics,
        quiet=quiet,
        summary=summary,
    )


def register(app: typer.Typer) -> None:
    app.command("prune", epilog="Examples:  " + "  |  ".join(EXAMPLES))(prune_cmd)
