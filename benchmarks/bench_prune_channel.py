"""Channel pruning wall time: ``prunecli.pruning.channel.prune_channels`` against plain Torch-Pruning.

Same model (random init, eval, CPU), same input, same criterion (L2 filter magnitude), same ratio,
layer scope, classifier excluded. Plain Torch-Pruning is its documented recipe::

    pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=r, ignored_layers=[classifier], num_heads={qkv: heads})
    pruner.step()

prunecli's time includes everything it returns: the dense forward (reference output shape), the graph,
scoring, pruning, the forward check, the structure diff and params/MAC counts before and after. Each
side runs ``--repeats`` times on a freshly built model (alternating); the median is reported. Target:
prunecli ≤ 1.2× plain Torch-Pruning.

    python benchmarks/bench_prune_channel.py --models resnet50 vit_small_patch16_224 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import timm
import torch
import torch_pruning as tp

import prunecli.archs  # noqa: F401
from prunecli.prunable import classifier_modules
from prunecli.pruning.channel import prune_channels


def _fresh(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=1000).eval()


def _plain(model: torch.nn.Module, x: torch.Tensor, ratio: float) -> None:
    ignored = [model.get_submodule(n) for n in classifier_modules(model)]
    heads = {m.qkv: m.num_heads for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "num_heads")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(
            model,
            x,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=ignored,
            num_heads=heads,
        )
        pruner.step()


def bench(name: str, side: int, ratio: float, repeats: int) -> dict:
    x = torch.randn(1, 3, side, side)
    times: dict[str, list[float]] = {"prunecli": [], "torch_pruning": []}
    params: dict[str, int] = {}
    for _ in range(repeats):
        for which in ("torch_pruning", "prunecli"):
            model = _fresh(name)
            t0 = time.perf_counter()
            if which == "prunecli":
                prune_channels(model, example_input=x, ratio=ratio)
            else:
                _plain(model, x, ratio)
            times[which].append(time.perf_counter() - t0)
            params[which] = sum(p.numel() for p in model.parameters())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "input": side,
        "ratio": ratio,
        "params_dense": sum(p.numel() for p in _fresh(name).parameters()),
        "params_prunecli": params["prunecli"],
        "params_torch_pruning": params["torch_pruning"],
        "prunecli_s": round(med["prunecli"], 3),
        "torch_pruning_s": round(med["torch_pruning"], 3),
        "ratio_to_torch_pruning": round(med["prunecli"] / med["torch_pruning"], 3),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50", "vit_small_patch16_224", "convnext_tiny"])
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for name in args.models:
        print(json.dumps(bench(name, args.side, args.ratio, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
