"""WCR study on digits (docs/wcr.md): does paper C's regulariser make one-shot magnitude pruning hurt less?

For each λ (0 = no WCR) and seed, train paper A's CNN from scratch on ``digits:train`` with
``prunecli.api.finetune`` (identical settings except ``wcr``), then prune it one-shot — no retraining —
with ``torch.nn.utils.prune.global_unstructured`` (L1, i.e. global |w| ranking) at each ratio and
evaluate top-1 on ``digits:test``. Two pruning scopes are reported: conv + linear weights (all
prunable tensors, classifier included) and conv weights only (paper C's CNN protocol, docs/wcr.md).

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/wcr_study.py                      # λ ∈ {0, 1e-5, 1e-4}, seeds 0 1
    .venv/bin/python benchmarks/wcr_study.py --lambdas 0,1e-4 --seeds 0 --epochs 15 --json out.jsonl

Prints a markdown report on stdout (the tables in ``benchmarks/wcr_study.md`` come from it).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

from prunecli.api._common import load_input
from prunecli.api.finetune import finetune
from prunecli.data import load_data, make_loader
from prunecli.evaluation import evaluate_model
from prunecli.prunable import prunable_layers
from prunecli.requests import FinetuneRequest

SCOPES = {
    "conv+linear": lambda m: isinstance(m, (nn.Conv2d, nn.Linear)),
    "conv": lambda m: isinstance(m, nn.Conv2d),
}


def one_shot(model: nn.Module, ratio: float, scope: str) -> tuple[nn.Module, float]:
    """Global magnitude pruning of ``model`` (a copy) at ``ratio`` over ``scope``; returns it and the sparsity."""
    pruned = copy.deepcopy(model)
    targets = [(m, "weight") for m in prunable_layers(pruned).values() if SCOPES[scope](m)]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=ratio)
    for m, name in targets:
        prune.remove(m, name)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
    return pruned, zeros / sum(m.weight.numel() for m, _ in targets)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lambdas", default="0,1e-5,1e-4", help="comma-separated WCR λ values (0 = without WCR)")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    ap.add_argument("--ratios", default="0.8,0.9,0.95", help="comma-separated pruning ratios")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, help="also write one JSON line per (λ, seed, scope, ratio)")
    args = ap.parse_args(argv)
    lambdas = [float(v) for v in args.lambdas.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    ratios = [float(v) for v in args.ratios.split(",")]
    dev = torch.device(args.device)

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for lam in lambdas:
            for seed in seeds:
                out = Path(tmp) / f"wcr{lam:g}-s{seed}.safetensors"
                t0 = time.perf_counter()
                res = finetune(
                    FinetuneRequest.build(
                        checkpoint="arch:improved_cnn",
                        data="digits:train",
                        output=out,
                        epochs=args.epochs,
                        lr=args.lr,
                        wcr=lam,
                        seed=seed,
                        device=args.device,
                        force=True,
                    )
                )
                loaded = load_input(str(out))
                test, _ = load_data("digits:test", loaded)
                loader = make_loader(test, batch_size=360)
                dense = evaluate_model(loaded.model, loader, dev)["top1"]
                var = res.metrics["wcr"]["var_abs"]
                print(f"λ={lam:g} seed={seed}: dense {dense:.4f} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
                base = {"lambda": lam, "seed": seed, "dense_top1": dense, "var_abs": var}
                for scope in SCOPES:
                    for ratio in ratios:
                        model, sp = one_shot(loaded.model, ratio, scope)
                        top1 = evaluate_model(model, loader, dev)["top1"]
                        rows.append({**base, "scope": scope, "ratio": ratio, "sparsity": sp, "top1": top1})
    if args.json:
        args.json.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    print(report(rows, lambdas, seeds, ratios, args))
    return 0


def report(rows: list[dict], lambdas: list[float], seeds: list[int], ratios: list[float], args) -> str:
    mean = statistics.fmean
    lines = [
        f"digits, improved_cnn, {args.epochs} epochs Adam lr {args.lr:g} cosine, crop+flip; seeds {seeds}; "
        "one-shot global L1 pruning (torch.nn.utils.prune.global_unstructured), no retraining; top-1 on digits:test "
        "(mean over seeds, min–max in brackets).",
        "",
    ]
    for scope in SCOPES:
        lines += [f"Scope: {scope} weights", ""]
        head = "| λ (WCR) | dense | " + " | ".join(f"{r:.0%}" for r in ratios) + " |"
        lines += [head, "|" + "---|" * (2 + len(ratios))]
        for lam in lambdas:
            sel = [r for r in rows if r["lambda"] == lam and r["scope"] == scope]
            dense = [r["dense_top1"] for r in sel if r["ratio"] == ratios[0]]
            cells = [f"{mean(dense):.4f}"]
            for ratio in ratios:
                v = [r["top1"] for r in sel if r["ratio"] == ratio]
                cells.append(f"{mean(v):.4f} [{min(v):.3f}–{max(v):.3f}]")
            lines.append(f"| {lam:g} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Per-layer Var(|w|) after training (mean over seeds):", ""]
    names = sorted(rows[0]["var_abs"]) if rows else []
    lines += ["| λ | " + " | ".join(names) + " |", "|" + "---|" * (1 + len(names))]
    for lam in lambdas:
        sel = [r for r in rows if r["lambda"] == lam and r["scope"] == "conv" and r["ratio"] == ratios[0]]
        lines.append(f"| {lam:g} | " + " | ".join(f"{mean(r['var_abs'][n] for r in sel):.3g}" for n in names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
