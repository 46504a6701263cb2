"""Time of ``restore --method lbyl`` on a channel-pruned ResNet-50 against the time of the prune step.

A randomly initialised timm ``resnet50`` (no download; BN statistics randomised so the solve sees
non-trivial BN factors) is saved, channel-pruned by L2 filter norm at 30 % of every intra-block width
(``conv1``/``conv2`` of each bottleneck, as LBYL prunes ResNets), then restored with LBYL and with
Neuron Merging. Reported: wall time of the ``prune`` and ``restore`` library calls (each includes
loading and saving checkpoints), and, inside restore, the time of the method itself (the batched
float64 solves and consumer updates, ``restore_s``).

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_restore.py [--arch resnet50] [--ratio 0.3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    logging.getLogger("prunecli").setLevel(logging.ERROR)
    from prunecli.api.prune import prune
    from prunecli.api.restore import restore
    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg
    from prunecli.requests import PruneRequest, RestoreRequest

    torch.manual_seed(0)
    model = timm.create_model(args.arch, num_classes=1000).eval()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    tmp = Path(tempfile.mkdtemp(prefix="bench_restore_"))
    base = tmp / "base.safetensors"
    save_checkpoint(base, model, Manifest(args.arch, 1000, {}, default_pretrained_cfg(args.arch)))
    exclude = ["conv1", "layer*.conv3", "layer*.downsample.*"]
    times: dict[str, list[float]] = {"prune": [], "restore lbyl": [], "restore merge": []}
    inner: dict[str, list[float]] = {"lbyl": [], "merge": []}
    layers = 0
    for i in range(args.repeat):
        t0 = time.perf_counter()
        p = prune(
            PruneRequest.build(
                checkpoint=str(base),
                output=tmp / "p.safetensors",
                method="magnitude",
                structure="channel",
                ratio=args.ratio,
                exclude=exclude,
                device="cpu",
                force=True,
            )
        )
        times["prune"].append(time.perf_counter() - t0)
        for method in ("lbyl", "merge"):
            t0 = time.perf_counter()
            r = restore(
                RestoreRequest.build(
                    checkpoint=p.checkpoint,
                    method=method,
                    output=str(tmp / f"r_{method}.safetensors"),
                    device="cpu",
                    force=True,
                )
            )
            times[f"restore {method}"].append(time.perf_counter() - t0)
            inner[method].append(r.metrics["restore_s"][method])
            layers = r.metrics["restored_layers"]
        print(f"run {i}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "arch": args.arch,
        "ratio": args.ratio,
        "restored_layers": layers,
        "threads": torch.get_num_threads(),
        "median_s": med,
        "method_only_median_s": {k: statistics.median(v) for k, v in inner.items()},
        "restore_lbyl_over_prune": med["restore lbyl"] / med["prune"],
    }
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
