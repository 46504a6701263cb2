"""Step time of finetune-lora against a plain training step of the same model and batch.

One optimizer step = forward, cross-entropy (+ the WCR term where named), backward, Adam step —
the body of :func:`prunecli.training.train` without the data loader, timed with the same code for
every variant on a fixed batch:

The model is pruned first (50 % global magnitude over every conv/linear weight but the head, with
``torch.nn.utils.prune``), as finetune-lora's inputs are; the dense kernels cost the same either way.

- ``plain``: full fine-tuning (every parameter trainable) — the anchor "bare forward/backward loop";
- ``lora``: finetune-lora's default: paper A's LoRA (rank 8, α 16, every Linear layer; everything
  else frozen) via peft, with the masked layers trained through their mask, ``(W + (α/r)·B A) ⊙ M``;
- ``lora plain-update``: the same with ``--no-masked-update`` (paper A's factorised ``W x + s·B(A x)``);
- ``lora+conv`` / ``lora+conv plain-update``: LoRA also on the convolutions (``--targets 'features.*.conv'``);
- ``lora+wcr``: the default LoRA with ``--wcr 1e-5`` on the effective weights;
- ``lora masked-merge``: the one-off cost of ``--merge masked`` at the end of a run (not per step).

Usage:
    python benchmarks/bench_lora_step.py [--arch improved_cnn] [--batch 128] [--iters 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as P
from torch import nn

import prunecli.archs  # noqa: F401
from prunecli import lora
from prunecli.wcr import WCR


def _step_fn(
    model: nn.Module, extra: Callable[[], torch.Tensor] | None
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3, foreach=True)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(model(x), y)
        if extra is not None:
            loss = loss + extra()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _time(fn: Callable[[], None], iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="improved_cnn")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    base = timm.create_model(args.arch, num_classes=10)
    head = base.pretrained_cfg.get("classifier", "head")
    layers = [(m, "weight") for n, m in base.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n != head]
    P.global_unstructured(layers, pruning_method=P.L1Unstructured, amount=0.5)
    for mod, name in layers:
        P.remove(mod, name)
    masks = {n: p.detach() != 0 for n, p in base.named_parameters() if p.ndim > 1 and not n.startswith(head + ".")}
    x = torch.randn(args.batch, *base.pretrained_cfg["input_size"], device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    variants: dict[str, tuple[nn.Module, Callable[[], torch.Tensor] | None]] = {}
    plain = copy.deepcopy(base).to(dev).train()
    variants["plain"] = (plain, None)
    conv = lora.LoraOptions(targets=("features.*.conv",))
    for name, opts, wcr, through_mask in (
        ("lora", lora.LoraOptions(), 0.0, True),
        ("lora plain-update", lora.LoraOptions(), 0.0, False),
        ("lora+conv", conv, 0.0, True),
        ("lora+conv plain-update", conv, 0.0, False),
        ("lora+wcr", lora.LoraOptions(), 1e-5, True),
    ):
        pm = lora.attach_lora(copy.deepcopy(base), opts)
        if through_mask:
            lora.mask_updates(pm, masks)
        pm = pm.to(dev).train()
        variants[name] = (pm, WCR(lora.effective_weight_fns(pm), wcr) if wcr else None)

    # Round-robin: one step of each variant in turn, so load on a shared machine hits all alike.
    steps = {name: _step_fn(model, extra) for name, (model, extra) in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.iters + 3):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(x, y)
            sync()
            if i >= 3:  # warm-up
                times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["plain"])
    rows = []
    for name, (model, _) in variants.items():
        t = statistics.median(times[name])
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append((name, t * 1e3, t / ref, trainable))

    pm = lora.attach_lora(copy.deepcopy(base), lora.LoraOptions())

    def merge() -> None:
        lora.MERGE_MODES.get("masked")(copy.deepcopy(pm), masks)

    t_merge = _time(merge, max(3, args.iters // 4), warmup=1)
    print(f"# {args.arch}, batch {args.batch}, {args.device}, {args.threads} thread(s), median of {args.iters} steps")
    print("| variant | step (ms) | × plain | trainable params |")
    print("|---|---|---|---|")
    for name, ms, ratio, n in rows:
        print(f"| {name} | {ms:.1f} | {ratio:.2f} | {n:,} |")
    print(f"\n--merge masked once at the end (deepcopy included): {t_merge * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
