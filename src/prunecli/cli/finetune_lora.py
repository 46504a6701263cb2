"""``prunecli finetune-lora``: LoRA recovery of a pruned checkpoint that keeps its sparsity."""

from __future__ import annotations

from typing import Any

import typer

from prunecli.cli._build import register_command
from prunecli.cli._output import console
from prunecli.requests import FinetuneLoraRequest

EXAMPLES = [
    "prunecli finetune-lora p50.safetensors --data digits:train --val digits:test -o p50lora.safetensors",
    "prunecli finetune-lora p50.safetensors --targets 'features.*.conv' --merge none -o p50a.safetensors",
    "torchrun --nproc-per-node 2 -m prunecli finetune-lora p50.safetensors --data imagefolder:train/ -o p.safetensors",
]


def summary(result: Any) -> None:
    m = result.metrics
    losses = " ".join(f"{v:.3f}" for v in m["train_loss"])
    head = f"LoRA r={m['rank']} α={m['alpha']:g} on {len(m['targets'])} layers ({m['trainable_params']} trainable)"
    console().print(f"{head}; train loss {losses}; train acc {m['train_acc']:.4f}")
    line = f"sparsity {m['sparsity_before']:.4f} → {m['sparsity_after']:.4f} (merge {m['merge']})"
    if "top1_before" in m:
        line += f"; top1 {m['top1_before']:.4f} → {m['top1_after']:.4f} ({m['lora_improvement']:+.4f})"
    console().print(f"{line}  → {result.checkpoint}")


def register(app: typer.Typer) -> None:
    register_command(
        app, "finetune-lora", FinetuneLoraRequest, "prunecli.api.finetune_lora:finetune_lora", examples=EXAMPLES,
        summary=summary, distributed=True,
        help="Recover a pruned checkpoint with LoRA adapters, keeping its sparsity (paper A).\n\n"
        "Rank-r adapters are trained beside the frozen weights of the pruned layers (convs included) and every "
        "Linear layer (see --target-preset and --targets); B starts at zero, so training starts exactly at the "
        "pruned model. --merge masked (default) writes a merged checkpoint whose pruned weights are still exactly "
        "zero. Runs data-parallel under torchrun; only rank 0 writes.",
    )  # fmt: skip
