"""``prunecli inspect``: describe a checkpoint (header only where possible)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from prunecli.cli._options import ArchOpt, CkptArg, MetricsOpt, QuietOpt
from prunecli.cli._output import console, run_command

EXAMPLES = [
    "prunecli inspect p50.safetensors",
    "prunecli inspect p50.safetensors --layers | jq '.metrics.layers[] | [.name, .sparsity]'",
]


def inspect(
    checkpoint: CkptArg,
    layers: Annotated[bool, typer.Option("--layers", help="Add per-layer shape, params and sparsity.")] = False,
    arch: ArchOpt = None,
    metrics: MetricsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Describe a checkpoint: architecture, parameters, bytes, lineage (and per-layer sparsity).

    Safetensors checkpoints are read from the header alone, without importing torch.
    """
    from prunecli.api.inspect import inspect as api_inspect

    def summary(result: object) -> None:
        m = result.metrics  # type: ignore[attr-defined]
        if not sys.stderr.isatty():  # before console(): importing rich costs ~40 ms of a fast command
            return
        console().print(f"{m.get('arch')}: {m['params']:,} params, {m['bytes']:,} bytes, {len(m['lineage'])} step(s)")

    run_command(
        "inspect",
        lambda: api_inspect(checkpoint, layers=layers, arch=arch),
        input=checkpoint,
        options={"layers": layers, "arch": arch},
        metrics_file=metrics,
        quiet=quiet,
        summary=summary,
    )


def register(app: typer.Typer) -> None:
    app.command("inspect", epilog="Examples:  " + "  |  ".join(EXAMPLES))(inspect)
