"""Time to reach ``--target macs=0.5``: prunecli's bisection against Torch-Pruning's iterative way (issue 16).

    python benchmarks/bench_target.py [--models resnet50 vit_base_patch16_224] [--side 224]

Both in the same process, on the same random-init model (timm, num_classes=1000), one thread, CPU:

* prunecli: :func:`prunecli.pruning.budget.plan_channels_to` (global magnitude, classifier excluded; the
  ratio bisected on the plan's kept counts, no surgery per step) then :func:`apply_channels`;
* Torch-Pruning's way, as its README/issues show it: ``BasePruner(global_pruning=True,
  GroupMagnitudeImportance(p=2), pruning_ratio=0.95, iterative_steps=40)``, ``step()`` and
  ``count_ops_and_params`` after each step until the MACs are at or under half the dense model's (for
  ViTs its own recipe: ``num_heads`` given, each attention's ``head_dim``/``attn_dim`` set after each step).

Achieved MACs are given by Torch-Pruning's own counter (``tp.utils.count_ops_and_params``) for both,
so neither side is judged by its own count. Prints one JSON line per model and method.
"""

from __future__ import annotations

import argparse
import json
import time

TARGET = 0.5
TP_STEPS = 40
TP_MAX_RATIO = 0.95


def _fresh(name: str, side: int):  # -> (model, input)
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    return model, torch.randn(1, 3, side, side)


def bench(name: str, side: int) -> list[dict]:
    import torch
    import torch_pruning as tp

    from prunecli.prunable import classifier_modules
    from prunecli.pruning.budget import plan_channels_to
    from prunecli.pruning.channel import apply_channels

    rows = []
    model, x = _fresh(name, side)
    dense, _ = tp.utils.count_ops_and_params(model, x)
    t0 = time.perf_counter()
    plan, _, steps = plan_channels_to(
        model, "macs", str(TARGET), example_input=x, channel_scores=None, weight_scores=None, scope="global",
        layer_ratios={}, exclude=classifier_modules(model), round_to=None, min_channels=1,
    )  # fmt: skip
    apply_channels(model, plan, example_input=x)
    seconds = time.perf_counter() - t0
    macs, _ = tp.utils.count_ops_and_params(model, x)
    rows.append({"model": name, "method": "prunecli --target macs=0.5", "seconds": round(seconds, 2),
                 "macs_fraction_tp_counter": macs / dense, "macs_fraction_prunecli": plan.macs_after / plan.macs_before,
                 "search_steps": len(steps)})  # fmt: skip
    model, x = _fresh(name, side)
    ignored = [model.get_submodule(n) for n in classifier_modules(model)]
    t0 = time.perf_counter()
    # its ViT recipe (examples/transformers/prune_timm_vit.py): heads registered, head_dim fixed after each step
    attn = [m for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "num_heads")]
    pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=TP_MAX_RATIO, iterative_steps=TP_STEPS, ignored_layers=ignored,
                                  global_pruning=True, num_heads={m.qkv: m.num_heads for m in attn})  # fmt: skip
    n = 0
    macs = dense
    while n < TP_STEPS and macs > TARGET * dense:
        pruner.step()
        for m in attn:
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            if hasattr(m, "attn_dim"):  # timm ≥ 1.0.20 reshapes the heads' output by attn_dim
                m.attn_dim = m.head_dim * m.num_heads
        n += 1
        macs, _ = tp.utils.count_ops_and_params(model, x)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        model(x)
    rows.append({"model": name, "method": f"Torch-Pruning iterative_steps={TP_STEPS}", "seconds": round(seconds, 2),
                 "macs_fraction_tp_counter": macs / dense, "steps": n})  # fmt: skip
    return rows


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["resnet50", "vit_base_patch16_224"])
    ap.add_argument("--side", type=int, default=224)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.models:
        for row in bench(name, args.side):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
