"""``prunecli eval``: accuracy, loss, fidelity to a reference, latency."""

from __future__ import annotations

from typing import Any

import typer

from prunecli.cli._build import register_command
from prunecli.cli._output import console
from prunecli.requests import EvalRequest

EXAMPLES = [
    "prunecli eval p50.safetensors --data digits:test",
    "prunecli eval p50.safetensors --data imagefolder:val/ --reference base.safetensors",
    "prunecli prune base.safetensors --method magnitude --ratio 0.5 -o p.safetensors | prunecli eval - --data digits",
]


def summary(result: Any) -> None:
    m = result.metrics
    extra = f", agreement {m['agreement']:.4f}, KL {m['kl']:.4f}" if "agreement" in m else ""
    console().print(f"top1 {m['top1']:.4f}  top5 {m['top5']:.4f}  loss {m['loss']:.4f}  n={m['samples']}{extra}")


def register(app: typer.Typer) -> None:
    register_command(
        app, "eval", EvalRequest, "prunecli.api.eval:evaluate", examples=EXAMPLES, summary=summary, distributed=True,
        help="Evaluate a checkpoint: top-1, top-5, loss and samples on a data spec.",
    )  # fmt: skip
