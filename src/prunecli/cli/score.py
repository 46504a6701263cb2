"""``prunecli score``: importance scores under one criterion; ``--compare`` rank-correlates scores files."""

from __future__ import annotations

from typing import Any

import typer

from prunecli.cli._build import register_command
from prunecli.cli._output import console
from prunecli.requests import ScoreRequest

EXAMPLES = [
    "prunecli score base.safetensors --method taylor --data digits:train --batches 10 -o taylor.scores",
    "prunecli score base.safetensors --method proscore --data digits:train --fraction 0.05 -p lambda=0.01 "
    "-o pro.scores",
    "prunecli score base.safetensors --method l1 -o l1.scores",
    "prunecli score --compare taylor.scores snip.scores biascomp.scores",
]


def _methods(m: dict[str, Any]) -> None:
    for entry in m["methods"]:
        needs = "+".join(entry["requires"]) or "weights only"
        console().print(f"{entry['name']:<10} {entry['granularity']:<15} {needs:<11} {entry['help']}")
        for key, text in entry["options"].items():
            console().print(f"{'':<12}-p {key}=  {text}")


def _pairs(m: dict[str, Any]) -> None:
    fmt = lambda v: "n/a" if v is None else f"{v:+.3f}"  # noqa: E731
    for p in m["pairs"]:
        console().print(f"{p['a']}  vs  {p['b']}: overall {fmt(p['overall'])}, mean per layer {fmt(p['mean_layer'])}")


def summary(result: Any) -> None:
    m = result.metrics
    if "methods" in m:
        return _methods(m)
    if "pairs" in m:
        return _pairs(m)
    console().print(f"{m['method']} ({m['granularity']}): {len(m['layers'])} layers, {m['scored_params']} scores, "
                    f"{m['samples']} samples → {result.extra['scores']}")  # fmt: skip


def register(app: typer.Typer) -> None:
    register_command(
        app, "score", ScoreRequest, "prunecli.api.score:score", examples=EXAMPLES, summary=summary, distributed=True,
        help="Score every prunable parameter of a checkpoint with an importance criterion (higher = keep).",
    )  # fmt: skip
