"""``prunecli finetune``: full fine-tuning, or training from scratch from ``arch:NAME``."""

from __future__ import annotations

from typing import Any

import typer

from prunecli.cli._build import register_command
from prunecli.cli._output import console
from prunecli.requests import FinetuneRequest

EXAMPLES = [
    "prunecli finetune arch:improved_cnn --data digits:train --val digits:test --epochs 12 -o base.safetensors",
    "prunecli finetune p50.safetensors --data imagefolder:train/ --epochs 5 -o p50ft.safetensors",
    "prunecli finetune arch:improved_cnn --data digits:train --wcr 1e-5 -o wcr.safetensors",
]


def summary(result: Any) -> None:
    from rich.table import Table

    m = result.metrics
    table = Table(title=f"finetune {m['arch']} on {m['data']} ({m['recipe']['name']} recipe)", title_justify="left")
    for col in ("epoch", "train loss", "train acc", "lr", *(["val top1"] if m.get("val_top1") else [])):
        table.add_column(col, justify="right")
    for i, loss in enumerate(m["train_loss"]):
        row = [str(i + 1), f"{loss:.4f}", f"{m['train_acc_per_epoch'][i]:.4f}", f"{m['lr'][i]:.2e}"]
        if m.get("val_top1"):
            row.append(f"{m['val_top1'][i]:.4f}")
        table.add_row(*row)
    console().print(table)
    line = f"sparsity {m['sparsity_before']:.4f} → {m['sparsity_after']:.4f}"
    if "wcr" in m:
        line += f"  WCR λ={m['wcr']['lambda']:g} λ·R={m['wcr']['value']:.4g}"
    console().print(f"{line}  ({m['train_time_s']:.1f}s)  → {result.checkpoint}")


def register(app: typer.Typer) -> None:
    register_command(
        app, "finetune", FinetuneRequest, "prunecli.api.finetune:finetune", examples=EXAMPLES, summary=summary,
        distributed=True,
        help="Fine-tune every weight of a checkpoint, or train one from scratch from arch:NAME.\n\n"
        "Pruned weights (the checkpoint's masked tensors) stay exactly zero. The training defaults come from a "
        "recipe chosen by what the run starts from (--recipe): paper A's from-scratch recipe for arch: models, a "
        "gentler fine-tuning recipe for trained checkpoints; the record's metrics.recipe says which. --wcr adds "
        "paper C's Weight Concentration Regularizer. Runs data-parallel under torchrun; only rank 0 writes.",
    )  # fmt: skip
