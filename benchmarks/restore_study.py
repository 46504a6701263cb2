"""Restoration study: prune vs Neuron Merging vs LBYL vs least squares (± BN re-estimation) on digits.

For each model (paper A's ``improved_cnn`` and timm's ``resnet10t`` at 32 px), trains a base model on
``digits:train`` with ``prunecli finetune`` (Adam), channel-prunes it by L2 filter norm at 30 % and 50 %
with ``prunecli prune --structure channel``, restores the pruned checkpoint with every method through
``prunecli restore`` (the library calls behind the subcommands), and evaluates top-1 on ``digits:test``.
For the ResNet only intra-block channels are pruned (``conv1`` of each basic block; stem and residual
stream kept), as in paper B: residual-stream channels are not restorable, and paper B does not prune
the stem.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/restore_study.py [--out DIR] [--epochs-cnn 8] [--epochs-resnet 15]
        [--models improved_cnn,resnet10t] [--prune-stem] [--ratios 0.3,0.5] [--seed 0] [--folds K]

``--seed`` seeds the base model's training (the base file name carries it when it is not 0), to tell
one-test-image differences from noise. ``--folds K`` replaces the fixed 80/20 split (360 test images)
by stratified K-fold cross-validation over all 1797 images: every fold trains its own base model, and
the tables pool the K test folds (every image tested once).

Prints markdown tables (and writes ``DIR/restore_study_<models>[_stem]_s<seed>[_cv<K>].json``).
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
    "improved_cnn": {"exclude": []},
    "resnet10t": {"exclude": ["conv1.*", "layer*.conv2", "layer*.downsample.*"]},
}
RATIOS = (0.3, 0.5)
METHODS = ("merge", "lbyl", "lstsq", "bn", "merge+bn", "lbyl+bn", "lstsq+bn")
LAMBDA2_SCAN = (1e-2, 1e-1, 1.0)
DOPTS = DataOptions(input_size=(3, 32, 32))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/prunecli_restore_study")
    ap.add_argument("--epochs-cnn", type=int, default=8)
    ap.add_argument("--epochs-resnet", type=int, default=15)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--prune-stem", action="store_true", help="resnet10t: also prune the deep stem's conv1.0/conv1.3")
    ap.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS))
    ap.add_argument("--seed", type=int, default=0, help="training seed of the base model")
    ap.add_argument("--folds", type=int, default=0,
                    help="K-fold cross-validation over all 1797 digits images instead of the fixed split")  # fmt: skip
    args = ap.parse_args()
    logging.getLogger("prunecli").setLevel(logging.ERROR)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ratios = [float(r) for r in args.ratios.split(",")]
    stem = "_stem" if args.prune_stem else ""
    stamp = f"{args.models.replace(',', '_')}{stem}_s{args.seed}"
    if args.folds:
        rows = []
        for k, (train, test) in enumerate(_write_folds(out / f"folds{args.folds}", args.folds)):
            fold_rows = _study(args, out / f"fold{k}", train, test, ratios)
            rows += [{**r, "fold": k} for r in fold_rows]
        (out / f"restore_study_{stamp}_cv{args.folds}.json").write_text(json.dumps(rows, indent=2, sort_keys=True))
        _print_fold_deltas(rows)
        rows = _pool_folds(rows)
    else:
        rows = _study(args, out, "digits:train", "digits:test", ratios)
        (out / f"restore_study_{stamp}.json").write_text(json.dumps(rows, indent=2, sort_keys=True))
    _print_tables(rows)
    return 0


def _study(args: argparse.Namespace, out: Path, train: str, test: str, ratios: list[float]) -> list[dict]:
    """Trains, prunes and restores every model of ``--models`` on one train/test split."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        epochs = args.epochs_cnn if name == "improved_cnn" else args.epochs_resnet
        tag = f"_s{args.seed}" if args.seed else ""
        base = out / f"{name}_base{tag}.safetensors"
        t0 = time.perf_counter()
        if not base.exists():
            finetune(
                FinetuneRequest.build(
                    checkpoint=f"arch:{name}",
                    data=train,
                    output=base,
                    epochs=epochs,
                    lr=1e-3,
                    augment="none",
                    source=InputOptions(num_classes=10),
                    transforms=DOPTS,
                    device="cpu",
                    amp=False,
                    seed=args.seed,
                )
            )
        dense_eval = evaluate(
            EvalRequest.build(checkpoint=str(base), data=test, transforms=DOPTS, device="cpu")
        ).metrics
        dense = dense_eval["top1"]
        print(f"{name}: dense top1 {dense:.4f} (train {time.perf_counter() - t0:.0f}s)", file=sys.stderr)
        for ratio in ratios:
            pruned = out / f"{name}{tag}_p{round(ratio * 100)}.safetensors"
            prune(
                PruneRequest.build(
                    checkpoint=str(base),
                    output=pruned,
                    method="magnitude",
                    structure="channel",
                    ratio=ratio,
                    exclude=_exclude(name, args.prune_stem),
                    transforms=DOPTS,
                    device="cpu",
                    force=True,
                )
            )
            row = {"model": name, "ratio": ratio, "dense": dense, "seed": args.seed, "n_test": dense_eval["samples"]}
            variants = [(m, {}) for m in METHODS] + [(f"lbyl λ2={v:g}", {"lambda2": v}) for v in LAMBDA2_SCAN]
            for label, params in variants:
                method = label.split(" ")[0]
                r = restore(
                    RestoreRequest.build(
                        checkpoint=str(pruned),
                        method=method,
                        output=str(out / "tmp.safetensors"),
                        data=train,
                        val=test,
                        params=params,
                        transforms=DOPTS,
                        device="cpu",
                        force=True,
                        batch_size=128,
                    )
                )
                m = r.metrics
                row["prune"] = m["top1_before"]
                row[label] = m["top1"]
                row[f"{label} err"] = m.get("recon_error_mean")
                row[f"{label} loss"], row["prune loss"] = m["loss"], m["loss_before"]
                row["prune err"] = m.get("recon_error_before_mean")
                row["restored_layers"] = m["restored_layers"]
                print(f"  {name} r={ratio} {label}: {m['top1_before']:.4f} → {m['top1']:.4f}", file=sys.stderr)
            rows.append(row)
    return rows


def _write_folds(root: Path, k: int) -> list[tuple[str, str]]:
    """Writes the 1797 digits images (prunecli's 32×32 rendering) as K stratified train/test image folders.

    The fixed 80/20 split has 360 test images, so one image is 0.28 points; K-fold cross-validation
    tests every image once (seeded ``StratifiedKFold``, ``random_state=0``) and pools the K test sets.
    """
    from sklearn.model_selection import StratifiedKFold

    from prunecli.data import _digits

    parts = _digits()
    images = parts["train"][0] + parts["test"][0]
    labels = parts["train"][1] + parts["test"][1]
    specs = []
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=0).split(images, labels)
    for i, (tr, te) in enumerate(folds):
        for split, ids in (("train", tr), ("test", te)):
            d = root / f"fold{i}" / split
            if not d.exists():
                tmp = d.with_name(split + ".tmp")
                for j in ids:
                    (tmp / str(labels[j])).mkdir(parents=True, exist_ok=True)
                    images[j].save(tmp / str(labels[j]) / f"{j:04d}.png")
                tmp.rename(d)
        specs.append((f"imagefolder:{root / f'fold{i}' / 'train'}", f"imagefolder:{root / f'fold{i}' / 'test'}"))
    return specs


def _pool_folds(rows: list[dict]) -> list[dict]:
    """Pools the folds of each (model, ratio): accuracies and losses weighted by test-fold size."""
    pooled: dict[tuple[str, float], dict] = {}
    for r in rows:
        key = (r["model"], r["ratio"])
        acc = pooled.setdefault(key, {"model": r["model"], "ratio": r["ratio"], "n_test": 0, "_sum": {}})
        n = r["n_test"]
        acc["n_test"] += n
        for k, v in r.items():
            if isinstance(v, float) and k != "ratio":
                acc["_sum"][k] = acc["_sum"].get(k, 0.0) + v * n
    out = []
    for acc in pooled.values():
        sums = acc.pop("_sum")
        out.append({**acc, **{k: v / acc["n_test"] for k, v in sums.items()}})
    return out


def _counts(row: dict) -> tuple[dict[str, int], str]:
    """Correct test images per method, and ``bn``'s change after prune / merge / lbyl / lstsq."""
    n = row["n_test"]
    c = {k: round(row[k] * n) for k in ("dense", "prune", *METHODS)}
    delta = [c["bn"] - c["prune"], *(c[f"{m}+bn"] - c[m] for m in ("merge", "lbyl", "lstsq"))]
    return c, " / ".join(f"{d:+d}" for d in delta)


def _print_fold_deltas(rows: list[dict]) -> None:
    """Per fold: correct test images of each method and what ``bn`` after it changes (before pooling)."""
    print("Per fold: correct test images, and the change from `bn` after prune / merge / lbyl / lstsq:")
    print("| model | ratio | fold | n_test | dense | prune | merge | lbyl | lstsq | bn after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, delta = _counts(r)
        cells = " | ".join(str(c[k]) for k in ("dense", "prune", "merge", "lbyl", "lstsq"))
        print(f"| {r['model']} | {r['ratio']:.0%} | {r['fold']} | {r['n_test']} | {cells} | {delta} |")
    print()


def _print_tables(rows: list[dict]) -> None:
    cols = ["prune", *METHODS]
    print("| model | ratio | dense | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for row in rows:
        cells = [f"{100 * row[c]:.1f}" for c in cols]
        print(f"| {row['model']} | {row['ratio']:.0%} | {100 * row['dense']:.1f} | " + " | ".join(cells) + " |")
    print()
    print("Correct test images (of n_test), and what `bn` after each method changes:")
    print("| model | ratio | n_test | dense | " + " | ".join(cols) + " | bn after prune/merge/lbyl/lstsq |")
    print("|---|---|---|---|" + "---|" * len(cols) + "---|")
    for row in rows:
        c, delta = _counts(row)
        print(f"| {row['model']} | {row['ratio']:.0%} | {row['n_test']} | "
              + " | ".join(str(c[k]) for k in ["dense", *cols]) + f" | {delta} |")  # fmt: skip
    print()
    print("Test cross-entropy (lower is better):")
    print("| model | ratio | prune | " + " | ".join(METHODS) + " |")
    print("|---|---|---|" + "---|" * len(METHODS))
    for row in rows:
        cells = [f"{row[f'{c} loss']:.3f}" for c in ("prune", *METHODS)]
        print(f"| {row['model']} | {row['ratio']:.0%} | " + " | ".join(cells) + " |")
    print()
    print("Consumer reconstruction error (mean relative error of restored consumers' pre-activations, 4 batches):")
    print("| model | ratio | prune | merge | lbyl | lstsq | " + " | ".join(f"lbyl λ2={v:g}" for v in LAMBDA2_SCAN)
          + " |")  # fmt: skip
    print("|---|---|---|---|---|---|" + "---|" * len(LAMBDA2_SCAN))
    for row in rows:
        keys = ["prune err", "merge err", "lbyl err", "lstsq err", *[f"lbyl λ2={v:g} err" for v in LAMBDA2_SCAN]]
        print(f"| {row['model']} | {row['ratio']:.0%} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    print()
    print("LBYL λ2 scan (top-1 %, λ1 = 1e-5):")
    print("| model | ratio | λ2=2e-3 (default) | " + " | ".join(f"λ2={v:g}" for v in LAMBDA2_SCAN) + " |")
    print("|---|---|---|" + "---|" * len(LAMBDA2_SCAN))
    for row in rows:
        cells = [f"{100 * row['lbyl']:.1f}"] + [f"{100 * row[f'lbyl λ2={v:g}']:.1f}" for v in LAMBDA2_SCAN]
        print(f"| {row['model']} | {row['ratio']:.0%} | " + " | ".join(cells) + " |")


def _exclude(name: str, prune_stem: bool) -> list[str]:
    if prune_stem and name == "resnet10t":
        return ["conv1.6", "layer*.conv2", "layer*.downsample.*"]
    return MODELS[name]["exclude"]


if __name__ == "__main__":
    raise SystemExit(main())
