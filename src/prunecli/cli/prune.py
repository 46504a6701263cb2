"""``prunecli prune``: exact unstructured, N:M or channel pruning of a checkpoint."""

from __future__ import annotations

from typing import Any

import typer

from prunecli.cli._build import register_command
from prunecli.cli._output import console
from prunecli.requests import PruneRequest

EXAMPLES = [
    "prunecli prune base.safetensors --method magnitude --ratio 0.5 -o p50.safetensors",
    "prunecli prune base.safetensors --scores taylor.scores --ratio 0.6 --scope global -o p60.safetensors",
    "prunecli prune base.safetensors --method magnitude --structure 2:4 -o p24.safetensors",
    "prunecli prune base.safetensors --scores bc.scores --ratio 0.7 --compensate bias -o bc70.safetensors",
    "prunecli prune base.safetensors --method l2 --structure channel --ratio 0.3 --dry-run -o c30.safetensors",
    "prunecli prune base.safetensors --method l2 --structure channel --target macs=0.5 -o m50.safetensors",
    "prunecli prune base.safetensors --method magnitude --ratio 0.7 --reconstruct obs --data digits:train "
    "-o obs70.safetensors",
    "prunecli prune base.safetensors --method magnitude --ratio 0.5 -o p.safetensors | prunecli eval - --data digits",
]


def summary(result: Any) -> None:
    m = result.metrics
    where = "plan only, nothing written" if result.checkpoint is None else f"→ {result.checkpoint}"
    if m.get("structure") == "channel":
        heads = m.get("heads") or {}
        kept = (f"; heads {sum(h['heads_before'] for h in heads.values())} → {sum(h['heads'] for h in heads.values())}"
                if heads else "")  # fmt: skip
        console().print(f"channels: {m.get('channel_ratio', 0):g} of each pruned group removed{kept}; params "
                        f"{m.get('params_before', 0):,} → {m.get('params', 0):,} ({m.get('params_removed', 0):.1%} "
                        f"removed), MACs {m.get('macs_before', 0):,} → {m.get('macs', 0):,}  {where}")  # fmt: skip
        return
    console().print(f"removed {m.get('selected_sparsity', 0):.4f} of the selected weights (target "
                    f"{m.get('target_sparsity', 0):g}); sparsity {m.get('sparsity', 0):.4f} of all prunable weights, "
                    f"params {m.get('params_nonzero', 0):,}/{m.get('params', 0):,} nonzero  {where}")  # fmt: skip


def register(app: typer.Typer) -> None:
    register_command(
        app, "prune", PruneRequest, "prunecli.api.prune:prune", examples=EXAMPLES, summary=summary,
        distributed=True,  # --reconstruct obs shards its calibration data under torchrun; rank 0 reports
        help="Prune a checkpoint: remove the lowest-scoring weights (exactly round(r·N) per scope) or channels.\n\n"
        "Unstructured and N:M pruning keep dense shapes with zeros and list the masked tensors in the output's "
        "metadata, so fine-tuning keeps them zero. --dry-run prints the plan and writes nothing.",
    )  # fmt: skip
