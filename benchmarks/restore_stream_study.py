"""Restoration with every group pruned: residual streams and attention included (docs/restoration.md).

Trains a timm ResNet (``resnet10t``, 32 px) and a small ViT (``vit_tiny_patch16_224`` at 32 px, patch 8,
depth 6, width 96, 3 heads) on ``digits:train`` with ``prunecli finetune`` from ``arch:``, channel-prunes
each by L2 filter norm at 30 % and 50 % with *every* group pruned (stem, residual streams, downsample,
attention head dimensions, MLP hidden units, embedding dimensions), restores each pruned checkpoint
with every method and chain through ``prunecli restore``, and evaluates top-1 and cross-entropy on
``digits:test`` (360 images). ``lstsq``/``bn`` calibrate on ``digits:train`` (``lstsq`` 256 images,
``bn`` all 1437). The ViT has no BatchNorm: the ``bn`` columns are left out for it.

``--heads-study`` adds head-dimension vs whole-head pruning at 50 % of the attention width on a ViT
with 6 heads (``vit6h``: depth 6, width 96, head_dim 16, so 50 % is exactly 3 heads or 8 of 16
dimensions per head): the attention alone (``--ratio 0`` and ``--layer-ratio '*.attn.qkv=0.5'``), and
every group at 50 % (embedding dimensions and MLP hidden units too), each with and without ``--heads``.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/restore_stream_study.py [--out DIR] [--models resnet10t,vit6]
        [--epochs-resnet 10] [--epochs-vit 30] [--ratios 0.3,0.5] [--seed 0] [--heads-study]

Prints markdown tables (and writes ``DIR/restore_stream_study.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from prunecli.api._common import DataOptions, InputOptions
from prunecli.api.eval import evaluate
from prunecli.api.finetune import finetune
from prunecli.api.prune import prune
from prunecli.api.restore import restore
from prunecli.requests import EvalRequest, FinetuneRequest, PruneRequest, RestoreRequest

MODELS = {
    "resnet10t": {"arch": "resnet10t", "args": {}, "bn": True},
    "vit6": {
        "arch": "vit_tiny_patch16_224",
        "args": {"img_size": 32, "patch_size": 8, "depth": 6, "embed_dim": 96, "num_heads": 3},
        "bn": False,
    },
    "vit6h": {
        "arch": "vit_tiny_patch16_224",
        "args": {"img_size": 32, "patch_size": 8, "depth": 6, "embed_dim": 96, "num_heads": 6},
        "bn": False,
    },
}
# head-dimension vs whole-head pruning at 50 % of the attention width: (label, prune options)
HEAD_VARIANTS = {
    "head dims, attention only": {"ratio": 0.0, "layer_ratios": (("*.attn.qkv", 0.5),)},
    "whole heads, attention only": {"ratio": 0.0, "layer_ratios": (("*.attn.qkv", 0.5),), "heads": True},
    "head dims, every group": {"ratio": 0.5},
    "whole heads, every group": {"ratio": 0.5, "heads": True},
}
METHODS_HEADS = ("merge", "lbyl", "lstsq", "merge+lstsq", "lbyl+lstsq")
METHODS_BN = ("merge", "lbyl", "lstsq", "bn", "merge+bn", "lbyl+bn", "lstsq+bn")
METHODS_NO_BN = ("merge", "lbyl", "lstsq")
DOPTS = DataOptions(input_size=(3, 32, 32))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/prunecli_restore_stream_study")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--epochs-resnet", type=int, default=10)
    ap.add_argument("--epochs-vit", type=int, default=30)
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heads-study", action="store_true", help="only the head-dims vs whole-heads study (vit6h)")
    args = ap.parse_args()
    logging.getLogger("prunecli").setLevel(logging.ERROR)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.heads_study:
        return heads_study(out, args)
    rows = []
    for name in args.models.split(","):
        spec = MODELS[name]
        base, dense = _base(out, name, args)
        for ratio in (float(r) for r in args.ratios.split(",")):
            pruned = out / f"{name}_p{round(ratio * 100)}.safetensors"
            prune(PruneRequest.build(checkpoint=str(base), output=pruned, method="magnitude", structure="channel",
                                     ratio=ratio, transforms=DOPTS, device="cpu", force=True))  # fmt: skip
            row = {"model": name, "ratio": ratio, "dense": dense.metrics["top1"], "dense loss": dense.metrics["loss"]}
            for method in METHODS_BN if spec["bn"] else METHODS_NO_BN:
                t1 = time.perf_counter()
                req = RestoreRequest.build(checkpoint=str(pruned), method=method, data="digits:train",
                                           val="digits:test", output=str(out / "tmp.safetensors"),
                                           transforms=DOPTS, device="cpu", force=True, batch_size=128)  # fmt: skip
                r = restore(req)
                m = r.metrics
                row["prune"], row["prune loss"] = m["top1_before"], m["loss_before"]
                row[method], row[f"{method} loss"] = m["top1"], m["loss"]
                row[f"{method} s"] = round(time.perf_counter() - t1, 1)
                skipped = sum(1 for g in m["groups"] if not g["restored_by"])
                row[f"{method} groups"] = f"{len(m['groups']) - skipped}/{len(m['groups'])}"
                print(f"  {name} r={ratio} {method}: {m['top1_before']:.4f} → {m['top1']:.4f}", file=sys.stderr)
            rows.append(row)
    (out / "restore_stream_study.json").write_text(json.dumps(rows, indent=2, sort_keys=True))
    _print(rows)
    return 0


def _base(out: Path, name: str, args: argparse.Namespace) -> tuple[Path, Any]:
    """The trained base checkpoint of ``name`` (trained once, reused from ``out``) and its eval result."""
    spec = MODELS[name]
    base = out / f"{name}_base.safetensors"
    t0 = time.perf_counter()
    if not base.exists():
        finetune(
            FinetuneRequest.build(
                checkpoint=f"arch:{spec['arch']}",
                data="digits:train",
                output=base,
                epochs=args.epochs_resnet if spec["bn"] else args.epochs_vit,
                lr=1e-3,
                augment="none",
                source=InputOptions(num_classes=10, model_args=spec["args"]),
                transforms=DOPTS,
                device="cpu",
                amp=False,
                seed=args.seed,
            )
        )
    dense = evaluate(EvalRequest.build(checkpoint=str(base), data="digits:test", transforms=DOPTS, device="cpu"))
    took = time.perf_counter() - t0
    print(f"{name}: dense top1 {dense.metrics['top1']:.4f} (train {took:.0f}s)", file=sys.stderr)
    return base, dense


def heads_study(out: Path, args: argparse.Namespace) -> int:
    """Head dimensions vs whole heads at 50 % of the attention width (module docstring), on ``vit6h``."""
    base, dense = _base(out, "vit6h", args)
    rows = []
    for label, options in HEAD_VARIANTS.items():
        pruned = out / f"vit6h_{label.replace(' ', '_').replace(',', '')}.safetensors"
        p = prune(PruneRequest.build(checkpoint=str(base), output=pruned, method="magnitude", structure="channel",
                                     transforms=DOPTS, device="cpu", force=True, **options))  # fmt: skip
        heads = p.metrics.get("heads") or {}
        row = {"variant": label, "dense": dense.metrics["top1"], "dense loss": dense.metrics["loss"],
               "params": p.metrics["params"], "params_before": p.metrics["params_before"],
               "heads": sorted({v["heads"] for v in heads.values()})}  # fmt: skip
        for method in METHODS_HEADS:
            t1 = time.perf_counter()
            req = RestoreRequest.build(checkpoint=str(pruned), method=method, data="digits:train",
                                       val="digits:test", output=str(out / "tmp.safetensors"),
                                       transforms=DOPTS, device="cpu", force=True, batch_size=128)  # fmt: skip
            m = restore(req).metrics
            row["prune"], row["prune loss"] = m["top1_before"], m["loss_before"]
            row[method], row[f"{method} loss"] = m["top1"], m["loss"]
            row[f"{method} s"] = round(time.perf_counter() - t1, 1)
            skipped = sum(1 for g in m["groups"] if not g["restored_by"])
            row[f"{method} groups"] = f"{len(m['groups']) - skipped}/{len(m['groups'])}"
            print(f"  {label} {method}: {m['top1_before']:.4f} → {m['top1']:.4f}", file=sys.stderr)
        rows.append(row)
    (out / "restore_heads_study.json").write_text(json.dumps(rows, indent=2, sort_keys=True))
    cols = ["prune", *METHODS_HEADS]
    for what, suffix, fmt, scale in (("top-1 %", "", "{:.1f}", 100), ("test cross-entropy", " loss", "{:.3f}", 1)):
        print(f"\n{what} (dense {fmt.format(rows[0]['dense' + suffix] * scale)}):\n")
        print("| pruned | params | " + " | ".join(cols) + " |")
        print("|---" * (2 + len(cols)) + "|")
        for r in rows:
            cells = [fmt.format(r[c + suffix] * scale) for c in cols]
            print(f"| {r['variant']} | {r['params']:,} | " + " | ".join(cells) + " |")
    print("\ngroups restored / pruned groups (per method), seconds per restore:\n")
    for r in rows:
        parts = [f"{m} {r[m + ' groups']} {r[m + ' s']}s" for m in METHODS_HEADS]
        print(f"* {r['variant']} (heads kept {r['heads']}): " + "; ".join(parts))
    return 0


def _print(rows: list[dict]) -> None:
    cols = ["prune", *METHODS_BN]
    for what, suffix, fmt in (("top-1 %", "", "{:.1f}"), ("test cross-entropy", " loss", "{:.3f}")):
        print(f"\n{what}:\n")
        print("| model | ratio | dense | " + " | ".join(cols) + " |")
        print("|---" * (3 + len(cols)) + "|")
        for r in rows:
            scale = 100 if not suffix else 1
            cells = [fmt.format(r[c + suffix] * scale) if (c + suffix) in r else "—" for c in cols]
            dense = fmt.format(r["dense" + suffix] * scale)
            print(f"| {r['model']} | {r['ratio']:.0%} | {dense} | " + " | ".join(cells) + " |")
    print("\ngroups restored / pruned groups (per method), seconds per restore:\n")
    for r in rows:
        parts = [f"{m} {r[m + ' groups']} {r[m + ' s']}s" for m in METHODS_BN if m + " groups" in r]
        print(f"* {r['model']} {r['ratio']:.0%}: " + "; ".join(parts))


if __name__ == "__main__":
    raise SystemExit(main())
