"""Scoring throughput of the gradient criteria against a bare forward+backward loop (same batches).

A gradient criterion cannot be faster than one forward and one backward pass over its calibration
data, so the bare loop (``zero_grad; CE(model(x), y).backward()`` on every parameter) is the
physical limit. Each criterion runs through the real engine (``prunecli.scoring.run_criterion``:
hooks, tracing, accumulation and the final score computation included) over the same in-memory
batches; data loading is excluded from both sides. The runs are interleaved and repeated, and the
median time of each is reported (CPU: process CPU time; GPU: wall time).

    OMP_NUM_THREADS=1 python benchmarks/bench_score.py --model resnet18 --size 128 --batch 32 --batches 4 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import prunecli.archs  # noqa: F401
from prunecli.criteria import get_criterion
from prunecli.scoring import run_criterion


def bare_loop(model: torch.nn.Module, data: list) -> None:
    for x, y in data:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def bare_plus_wgrad(model: torch.nn.Module, data: list) -> None:
    """The bare loop plus one more weight-gradient-sized product per conv/linear layer.

    biascomp needs no weight gradient but two weight-gradient-sized products (``M1``, ``M2``,
    docs/bias-compensation.md), i.e. one more than the bare loop: this run is the floor of that algorithm,
    measured with the same kernels (``conv_weight_stat`` for convolutions, a GEMM for linear layers).
    """
    from prunecli.criteria._conv import conv_weight_stat
    from prunecli.prunable import prunable_layers

    handles = []

    def capture(layer: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        x = args[0].detach()

        def extra(g: torch.Tensor) -> None:
            if isinstance(layer, torch.nn.Linear):
                g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            else:
                conv_weight_stat(layer, x, g)

        out.register_hook(extra)

    for layer in prunable_layers(model).values():
        handles.append(layer.register_forward_hook(capture))
    try:
        bare_loop(model, data)
    finally:
        for h in handles:
            h.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="taylor,snip,proscore,biascomp")
    args = ap.parse_args()

    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10).to(dev).eval()
    g = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(args.batch, 3, args.size, args.size, generator=g).to(dev),
            torch.randint(0, 10, (args.batch,), generator=g).to(dev),
        )
        for _ in range(args.batches)
    ]
    images = args.batch * args.batches
    methods = args.methods.split(",")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    # CPU: process CPU time (with OMP_NUM_THREADS=1 it is the work done, and it is far less disturbed
    # than wall time by other jobs on a shared machine); GPU: wall time around synchronisations
    clock = time.perf_counter if dev.type == "cuda" else time.process_time

    def timed(fn) -> float:
        sync()
        t = clock()
        fn()
        sync()
        return clock() - t

    runs = {
        "bare": lambda: bare_loop(model, data),
        "bare+1 wgrad": lambda: bare_plus_wgrad(model, data),
        **{m: (lambda m=m: run_criterion(model, get_criterion(m), data, device=dev)) for m in methods},
    }
    bare_loop(model, data[:1])  # warm-up (allocator, oneDNN kernels)
    for m in methods:
        run_criterion(model, get_criterion(m), data[:1], device=dev)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    bare_ips = images / med["bare"]
    rows = []
    for name in runs:
        ips = images / med[name]
        rows.append({"run": name, "images_per_s": round(ips, 1), "ratio_vs_bare": round(ips / bare_ips, 3)})
    print(
        f"model={args.model} input={args.size} batch={args.batch} batches={args.batches} device={args.device} "
        f"threads={torch.get_num_threads()} clock={clock.__name__} repeats={args.repeats} torch={torch.__version__}"
    )
    print("| run | images/s | ratio vs bare fwd+bwd |\n| --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['run']} | {r['images_per_s']} | {r['ratio_vs_bare']} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
