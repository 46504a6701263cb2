"""``prunecli restore``: training-free restoration of a pruned checkpoint (LBYL, Neuron Merging, lstsq, bn; OBS)."""

from __future__ import annotations

from typing import Any

import typer

from prunecli.cli._build import register_command
from prunecli.cli._output import console
from prunecli.requests import RestoreRequest

EXAMPLES = [
    "prunecli restore p50.safetensors --method lbyl -o p50r.safetensors",
    "prunecli restore p50.safetensors -m lbyl -p lambda2=0.01 --data digits:train --val digits:test -o r.safetensors",
    "prunecli restore p50.safetensors --method lstsq+bn --data digits:train -o r.safetensors",
    "prunecli restore p50.safetensors --method merge --dense base.safetensors -o r.safetensors",
    "prunecli restore m70.safetensors --method obs+bn --data digits:train -o r.safetensors",
]


def summary(result: Any) -> None:
    m = result.metrics
    text = f"{m['method']}: restored {m['restored_layers']} layer(s)"
    if "recon_error_mean" in m:
        what = "layer" if "obs" in str(m["method"]) else "consumer"
        text += f", {what} error {m['recon_error_before_mean']:.4f} → {m['recon_error_mean']:.4f}"
    if "top1" in m:
        text += f", top1 {m['top1_before']:.4f} → {m['top1']:.4f}"
    console().print(text)


def register(app: typer.Typer) -> None:
    register_command(
        app, "restore", RestoreRequest, "prunecli.api.restore:restore", examples=EXAMPLES, summary=summary,
        distributed=True,  # obs shards its calibration data under torchrun; rank 0 reports
        help="Restore a pruned checkpoint without training: channel-pruned (LBYL, Neuron Merging, least squares, "
        "BN) or masked unstructured/N:M (OBS, BN).",
    )  # fmt: skip
