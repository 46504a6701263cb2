"""Restoration with every group pruned: residual streams and attention included (docs/restoration.md).

Trains a timm ResNet (``resnet10t``, 32 px) and a small ViT (``vit_tiny_patch16_224`` at 32 px, patch 8,
depth 6, width 96, 3 heads) on ``digits:train`` with ``prunecli finetune`` from ``arch:``, channel-prunes
each by L2 filter norm at 30 % and 50 % with *every* group pruned (stem, residual streams, downsample,
attention head dimensions, MLP hidden units, embedding dimensions), restores each pruned checkpoint
with every method and chain through ``prunecli restore``, and evaluates top-1 and cross-entropy on
``digits:test`` (360 images). ``lstsq``/``bn`` calibrate on ``digits:train`` (``lstsq`` 256 images,
``bn`` all 1437). The ViT has no BatchNorm: the ``bn`` columns are left out for it. Whole-head
pruning is not part of this study (``prune`` removes head dimensions, the same ones in every head).

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/restore_stream_study.py [--out DIR] [--models resnet10t,vit6]
        [--epochs-resnet 10] [--epochs-vit 30] [--ratios 0.3,0.5] [--seed 0]

Prints markdown tables (and writes ``DIR/restore_stream_study.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

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
}
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
    args = ap.parse_args()
    logging.getLogger("prunecli").setLevel(logging.ERROR)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
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
