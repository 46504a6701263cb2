"""Budget study (issue 16, point 3): at the same MAC budget, global threshold or one uniform ratio?

For paper A's ``improved_cnn`` and timm's ``resnet10t`` (both at 32 px on the embedded digits data),
trains a base model on ``digits:train`` with ``prunecli finetune`` (Adam, lr 1e-3, no augmentation),
channel-prunes it by L2 filter norm to ``--target macs=B`` (B = 0.5 and 0.3 of the dense MACs) with
``--scope global`` (one importance threshold over all groups) and ``--scope layer`` (one ratio for
every group), and evaluates top-1 on ``digits:test`` plain and after ``restore --method lstsq+bn``
(calibration on ``digits:train``). The library calls behind the subcommands are used.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/budget_study.py [--out DIR] [--epochs-cnn 8]
        [--epochs-resnet 15] [--models improved_cnn,resnet10t] [--budgets 0.5,0.3] [--base-from DIR]

``--base-from DIR`` takes ``DIR/<model>_base.safetensors`` when it exists (e.g. the restore study's
bases, trained the same way) instead of training. Prints a markdown table and writes
``DIR/budget_study.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from prunecli.api._common import DataOptions, InputOptions
from prunecli.api.eval import evaluate
from prunecli.api.finetune import finetune
from prunecli.api.prune import prune
from prunecli.api.restore import restore
from prunecli.requests import EvalRequest, FinetuneRequest, PruneRequest, RestoreRequest

MODELS = ("improved_cnn", "resnet10t")
BUDGETS = (0.5, 0.3)
SCOPES = ("global", "layer")
DOPTS = DataOptions(input_size=(3, 32, 32))


def _base(name: str, out: Path, epochs: int, base_from: Path | None) -> Path:
    base = out / f"{name}_base.safetensors"
    if base.exists():
        return base
    if base_from is not None and (base_from / base.name).exists():
        shutil.copyfile(base_from / base.name, base)
        return base
    finetune(
        FinetuneRequest.build(
            checkpoint=f"arch:{name}", data="digits:train", output=base, epochs=epochs, lr=1e-3, augment="none",
            source=InputOptions(num_classes=10), transforms=DOPTS, device="cpu", amp=False, seed=0,
        )
    )  # fmt: skip
    return base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/prunecli_budget_study")
    ap.add_argument("--epochs-cnn", type=int, default=8)
    ap.add_argument("--epochs-resnet", type=int, default=15)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    ap.add_argument("--base-from", type=Path, default=None)
    args = ap.parse_args()
    logging.getLogger("prunecli").setLevel(logging.ERROR)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        epochs = args.epochs_cnn if name == "improved_cnn" else args.epochs_resnet
        base = _base(name, out, epochs, args.base_from)
        dense = evaluate(EvalRequest.build(checkpoint=str(base), data="digits:test", transforms=DOPTS, device="cpu"))
        print(f"{name}: dense top1 {dense.metrics['top1']:.4f} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
        for budget in (float(b) for b in args.budgets.split(",")):
            for scope in SCOPES:
                pruned = out / f"{name}_m{round(budget * 100)}_{scope}.safetensors"
                p = prune(
                    PruneRequest.build(
                        checkpoint=str(base), output=pruned, method="l2", structure="channel", scope=scope,
                        target=("macs", f"{budget:g}"), transforms=DOPTS, device="cpu", force=True,
                    )
                ).metrics  # fmt: skip
                r = restore(
                    RestoreRequest.build(
                        checkpoint=str(pruned), method="lstsq+bn", output=str(out / "tmp.safetensors"),
                        data="digits:train", val="digits:test", transforms=DOPTS, device="cpu", force=True,
                        batch_size=128,
                    )
                ).metrics  # fmt: skip
                row = {
                    "model": name, "budget": budget, "scope": scope, "dense": dense.metrics["top1"],
                    "macs": p["achieved"]["fraction"], "params": p["params"] / p["params_before"],
                    "ratio": p["target_ratio"], "pruned": r["top1_before"], "restored": r["top1"],
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    (out / "budget_study.json").write_text(json.dumps(rows, indent=2, sort_keys=True))
    print("| model | MAC budget | scope | MACs reached | params left | dense top-1 | pruned | + lstsq+bn |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['budget']:.0%} | {r['scope']} | {r['macs']:.2%} | {r['params']:.1%} | "
              f"{r['dense']:.4f} | {r['pruned']:.4f} | {r['restored']:.4f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
