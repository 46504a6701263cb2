"""``prunecli inspect``: describe a checkpoint (header only where possible)."""

from __future__ import annotations

import sys
from typing import Any

import typer

from prunecli.cli._build import register_command
from prunecli.requests import InspectRequest

EXAMPLES = [
    "prunecli inspect p50.safetensors",
    "prunecli inspect p50.safetensors --layers | jq '.metrics.layers[] | [.name, .sparsity]'",
]


def summary(result: Any) -> None:
    m = result.metrics
    if not sys.stderr.isatty():  # before console(): importing rich costs ~40 ms of a fast command
        return
    from prunecli.cli._output import console

    console().print(f"{m.get('arch')}: {m['params']:,} params, {m['bytes']:,} bytes, {len(m['lineage'])} step(s)")


def register(app: typer.Typer) -> None:
    register_command(
        app, "inspect", InspectRequest, "prunecli.api.inspect:inspect", examples=EXAMPLES, summary=summary,
        help="Describe a checkpoint: architecture, parameters, bytes, lineage (and per-layer sparsity).\n\n"
        "Safetensors checkpoints are read from the header alone, without importing torch.",
    )  # fmt: skip
