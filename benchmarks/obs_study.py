"""Training-free second-order reconstruction on the digits data (benchmarks/obs_study.md, docs/obs.md).

Trains paper A's CNN (``improved_cnn``) and a timm ResNet (``resnet10t`` at 32 px) on ``digits:train``
with ``prunecli finetune`` from ``arch:``, then, at 50/70/90 % global unstructured sparsity and at 2:4,
compares on ``digits:test`` (360 images, top-1 and cross-entropy), without any training:

* ``magnitude`` — ``prune --method magnitude`` (``--scope global`` for the ratios);
* ``wanda`` — ``prune --method wanda --data digits:train`` (same scope);
* ``magnitude+bn`` — ``restore --method bn`` on magnitude's file (BatchNorm statistics re-estimated);
* ``obs`` — ``prune --method magnitude --reconstruct obs --data digits:train``: the mask chosen jointly
  with the OBS updates, per-layer ratios from magnitude's global ranking;
* ``obs+bn (joint)`` — ``restore --method bn`` on obs's file;
* ``restore obs`` — ``restore --method obs`` on magnitude's file (its mask kept, the kept weights refit
  to the dense parent);
* ``restore obs+bn`` — ``restore --method obs+bn`` on magnitude's file (OBC's statistics correction).

Every step runs through ``prunecli.api`` requests, the functions the command line calls. The solver
uses ``-p samples=N`` calibration images of ``digits:train`` (default 512), ``damp=0.01``.

Usage::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/obs_study.py [--out DIR] [--samples 512]
        [--models cnn,resnet10t] [--settings 0.5,0.7,0.9,2:4]

Prints a markdown table per model (and writes ``DIR/obs_study.json``).
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
    "cnn": {"arch": "improved_cnn", "args": {}, "epochs": 15},
    "resnet10t": {"arch": "resnet10t", "args": {}, "epochs": 10},
}
DOPTS = DataOptions(input_size=(3, 32, 32))
COLUMNS = ("magnitude", "wanda", "magnitude+bn", "obs", "obs+bn (joint)", "restore obs", "restore obs+bn")


def _eval(path: Path) -> tuple[float, float]:
    m = evaluate(EvalRequest.build(checkpoint=str(path), data="digits:test", transforms=DOPTS, device="cpu")).metrics
    return m["top1"], m["loss"]


def _prune(base: Path, out: Path, setting: str, method: str, **extra: Any) -> Path:
    shape = {"structure": setting} if ":" in setting else {"ratio": float(setting), "scope": "global"}
    prune(PruneRequest.build(checkpoint=str(base), output=out, method=method, transforms=DOPTS, device="cpu",
                             force=True, **shape, **extra))  # fmt: skip
    return out


def _restore(src: Path, out: Path, method: str, samples: int, extra: str = "") -> tuple[float, float]:
    params = {"samples": str(samples)} if "obs" in method else {}
    params.update(kv.split("=", 1) for kv in extra.split(",") if kv and "obs" in method)
    req = RestoreRequest.build(checkpoint=str(src), method=method, data="digits:train", val="digits:test",
                               output=str(out), transforms=DOPTS, device="cpu", force=True, params=params)  # fmt: skip
    m = restore(req).metrics
    return m["top1"], m["loss"]


def _base(out: Path, name: str, seed: int) -> Path:
    spec = MODELS[name]
    base = out / f"{name}_base.safetensors"
    if not base.exists():
        finetune(FinetuneRequest.build(
            checkpoint=f"arch:{spec['arch']}", data="digits:train", output=base, epochs=spec["epochs"], lr=1e-3,
            augment="none", source=InputOptions(num_classes=10, model_args=spec["args"]), transforms=DOPTS,
            device="cpu", amp=False, seed=seed))  # fmt: skip
    return base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/prunecli_obs_study")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--settings", default="0.5,0.7,0.9,2:4")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix of the json file")
    ap.add_argument("--columns", default=",".join(COLUMNS), help="the methods to run (comma-separated)")
    ap.add_argument("--restore-params", default="", help="extra -p of the restore obs columns, e.g. refit=false")
    args = ap.parse_args()
    cols = set(args.columns.split(","))
    logging.getLogger("prunecli").setLevel(logging.ERROR)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        base = _base(out, name, args.seed)
        dense = _eval(base)
        print(f"{name}: dense {dense[0]:.4f} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
        for setting in args.settings.split(","):
            tag = setting.replace(":", "of")
            row: dict[str, Any] = {"model": name, "setting": setting, "dense": dense}
            t1 = time.perf_counter()
            mag = _prune(base, out / f"{name}_{tag}_mag.safetensors", setting, "magnitude")
            row["magnitude"] = _eval(mag)
            if "wanda" in cols:
                wanda = _prune(base, out / f"{name}_{tag}_wanda.safetensors", setting, "wanda", data="digits:train")
                row["wanda"] = _eval(wanda)
            if "magnitude+bn" in cols:
                row["magnitude+bn"] = _restore(mag, out / "tmp.safetensors", "bn", args.samples)
            if cols & {"obs", "obs+bn (joint)"}:
                obs = _prune(base, out / f"{name}_{tag}_obs.safetensors", setting, "magnitude", reconstruct="obs",
                             data="digits:train", params={"samples": str(args.samples)})  # fmt: skip
                row["obs"] = _eval(obs)
                if "obs+bn (joint)" in cols:
                    row["obs+bn (joint)"] = _restore(obs, out / "tmp.safetensors", "bn", args.samples)
            for method in ("obs", "obs+bn"):
                if f"restore {method}" in cols:
                    row[f"restore {method}"] = _restore(
                        mag, out / "tmp.safetensors", method, args.samples, args.restore_params
                    )
            row["seconds"] = round(time.perf_counter() - t1, 1)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        (out / f"obs_study{args.tag}.json").write_text(json.dumps(rows, indent=1))
    _print(rows)
    return 0


def _print(rows: list[dict[str, Any]]) -> None:
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        print(f"\n{name} (dense top-1 {mine[0]['dense'][0]:.4f}, loss {mine[0]['dense'][1]:.3f}): top-1 / loss\n")
        print("| sparsity | " + " | ".join(COLUMNS) + " |")
        print("|---" * (len(COLUMNS) + 1) + "|")
        for r in mine:
            cells = [f"{r[c][0]:.4f} / {r[c][1]:.3f}" if c in r else "—" for c in COLUMNS]
            print(f"| {r['setting']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
