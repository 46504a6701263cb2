"""Each data-aware restoration method against its floor, measured in the same run (benchmarks/restore_time.md).

Case A (the issue's target case): a randomly initialised timm ``resnet50`` (BN statistics randomised so the
statistics matter), channel-pruned by L2 filter norm at 30 % with the default settings (every group
pruned: stem, residual streams, downsample, intra-block), calibrated on ``synthetic:N`` images
(prunecli's timing data source, at the checkpoint's input size). For each method, ``prunecli restore``
runs as a separate process; the record's ``restore_s`` is the method's own time inside the restore call,
the process wall time includes start-up, loading, tracing, the reconstruction-error report and saving.
In the same run, interleaved with the processes, this script measures the floors:

* ``lstsq``: ``K`` refit stages (the conv/linear layers that lost input channels), each costing one full
  forward pass of the dense and of the pruned model over the calibration set, plus the float64
  normal-equation products ``XᵀX`` and ``XᵀY`` of each refit layer (timed on one calibration batch's
  design shape and scaled by the number of batches).
* ``bn`` (exact, sequential): for each re-estimated BatchNorm, the partial forward pass of the pruned model
  from the image up to that BN, over the calibration set (timed by one instrumented pass per batch: the
  time at which each BN is reached).
* ``lstsq+bn``: the sum of the two. ``lbyl`` (data-free) is reported against one pruned forward pass.

``--uncached`` also times each data-aware method in this process with the activation cache off
(``prunecli.restoration.replay.CACHE_BYTES = 0``: every partial pass starts at the image, as before the
cache existed).

Case B (``--digits``): a timm ``resnet18`` at 32 px for the 10 digit classes (random init, randomised BN
statistics: the timing does not depend on training), 30 % channels with every group pruned, restored
through ``prunecli restore --data digits:train`` (1,437 images) with ``lstsq``, ``bn``, ``lstsq+bn``, and
one ``prunecli eval --data digits:train`` pass over the same images, interleaved, ``--repeat`` times.

Usage (the figures of benchmarks/restore_time.md)::

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/bench_restore_floor.py \\
        [--arch resnet50] [--size 224] [--images 256] [--batch-size 64] [--methods lstsq,bn,lstsq+bn,lbyl]
        [--uncached] [--digits] [--repeat 1] [--skip-a]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

CLI = [sys.executable, "-m", "prunecli"]


def _randomise_bn(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def _build(arch: str, classes: int, size: int, tmp: Path, tag: str, ratio: float) -> tuple[Path, Path]:
    """Saves a random-init ``arch`` and its channel-pruned child (every group); returns both paths."""
    from prunecli.api._common import DataOptions
    from prunecli.api.prune import prune
    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg
    from prunecli.requests import PruneRequest

    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=classes).eval()
    _randomise_bn(model, 1)
    base = tmp / f"{tag}_base.safetensors"
    save_checkpoint(base, model, Manifest(arch, classes, {}, default_pretrained_cfg(arch)))
    pruned = tmp / f"{tag}_p.safetensors"
    prune(PruneRequest.build(checkpoint=str(base), output=pruned, method="magnitude", structure="channel",
                             ratio=ratio, transforms=DataOptions(input_size=(3, size, size)), device="cpu",
                             force=True))  # fmt: skip
    return base, pruned


def _cli(args: list[str]) -> tuple[float, dict[str, Any]]:
    """Runs ``prunecli ARGS``; returns the process wall time and its JSON record."""
    t0 = time.perf_counter()
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, check=False)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"prunecli {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
    return took, json.loads(proc.stdout)


def _restore_cli(pruned: Path, method: str, data: str, size: int, bs: int, out: Path) -> tuple[float, dict[str, Any]]:
    return _cli(["restore", str(pruned), "--method", method, "--data", data, "--input-size", str(size),
                 "-b", str(bs), "-j", "0", "--device", "cpu", "-o", str(out), "-f"])  # fmt: skip


class Floors:
    """The floor measurements of one pruned checkpoint on its calibration batches (module docstring)."""

    def __init__(self, pruned_path: Path, data: str, size: int, bs: int) -> None:
        from prunecli.checkpoint.loaders import load_checkpoint
        from prunecli.data import build_dataset
        from prunecli.restoration.core import channel_plan

        loaded = load_checkpoint(str(pruned_path))
        self.pruned = loaded.model.eval()
        self.plan = channel_plan(loaded.manifest.structure)
        base = pruned_path.with_name(pruned_path.name.replace("_p.", "_base."))
        self.dense = load_checkpoint(str(base)).model.eval()
        cfg = dict(loaded.manifest.pretrained_cfg or {})
        cfg["input_size"] = (3, size, size)
        ds = build_dataset(data, cfg, default_split="train", num_classes=loaded.manifest.num_classes).dataset
        xs = torch.stack([ds[i][0] for i in range(len(ds))])
        self.batches = list(xs.split(bs))
        self.consumers = [n for n, e in self.plan.items() if "in" in e and len(e["in"]["kept"]) < e["in"]["dense"]
                          and isinstance(self.pruned.get_submodule(n), (nn.Conv2d, nn.Linear))]  # fmt: skip

    @torch.inference_mode()
    def full_pass(self, model: nn.Module) -> float:
        t0 = time.perf_counter()
        for x in self.batches:
            model(x)
        return time.perf_counter() - t0

    @torch.no_grad()
    def products(self) -> float:
        """Σ over refit layers of the float64 XᵀX + XᵀY time: one batch's shapes timed, times the batch count."""
        shapes: dict[str, tuple[int, int, int]] = {}
        hooks = []
        for name in self.consumers:
            mod = self.pruned.get_submodule(name)

            def rec(m: nn.Module, args: Any, out: torch.Tensor, name: str = name) -> None:
                if isinstance(m, nn.Conv2d):
                    d = m.in_channels * m.kernel_size[0] * m.kernel_size[1] + (m.bias is not None)
                    rows = out.shape[0] * out.shape[2] * out.shape[3]
                else:
                    d, rows = m.in_features + (m.bias is not None), out.numel() // out.shape[-1]
                shapes[name] = (rows, d, out.shape[1] if isinstance(m, nn.Conv2d) else out.shape[-1])

            hooks.append(mod.register_forward_hook(rec))
        try:
            self.pruned(self.batches[0])
        finally:
            for h in hooks:
                h.remove()
        total = 0.0
        scale = sum(len(b) for b in self.batches) / len(self.batches[0])
        for rows, d, o in shapes.values():
            x = torch.randn(rows, d, dtype=torch.float64)
            y = torch.randn(rows, o, dtype=torch.float64)
            t0 = time.perf_counter()
            _ = x.T @ x
            _ = x.T @ y
            total += (time.perf_counter() - t0) * scale
        return total

    @torch.inference_mode()
    def bn_prefixes(self) -> tuple[float, int]:
        """Σ over the BNs ``bn`` re-estimates of the time from the image to that BN, over all batches."""
        from prunecli.restoration.bn import _changed_modules, bn_layers, downstream_bns

        with torch.inference_mode(False):
            names = downstream_bns(self.pruned, _changed_modules(self.pruned, self.plan), self.batches[0][:1])
        norms = bn_layers(self.pruned)
        total = 0.0
        reached: dict[str, float] = {}
        for x in self.batches:
            reached.clear()
            hooks = [norms[n].register_forward_pre_hook(lambda _m, _i, n=n: _mark(reached, n)) for n in names]
            t0 = time.perf_counter()
            try:
                self.pruned(x)
            finally:
                for h in hooks:
                    h.remove()
            total += sum(t - t0 for t in reached.values())
        return total, len(names)


def _mark(reached: dict[str, float], name: str) -> None:
    """The first time ``name`` is reached (returns None: a pre-hook's return value would replace the input)."""
    reached.setdefault(name, time.perf_counter())


def _uncached(floors: Floors, method: str) -> float:
    """The method's own time in this process with the activation cache off (every pass from the image)."""
    import copy

    from prunecli.api.restore import restore_model
    from prunecli.restoration import replay

    saved = replay.CACHE_BYTES
    replay.CACHE_BYTES = 0
    try:
        model = copy.deepcopy(floors.pruned)
        structure = {"channels": floors.plan}
        rep = restore_model(model, floors.dense, structure, method, calib=floors.batches, device="cpu")
        return float(sum(rep.seconds.values()))
    finally:
        replay.CACHE_BYTES = saved


def case_a(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    _base, pruned = _build(args.arch, 1000, args.size, tmp, "a", args.ratio)
    data = f"synthetic:{args.images}"
    floors = Floors(pruned, data, args.size, args.batch_size)
    k = len(floors.consumers)
    out: dict[str, Any] = {"refit_stages": k, "methods": {}}
    t_dense, t_pruned = [], []
    prod = bn_pre = 0.0
    n_bn = 0
    for method in args.methods.split(","):
        t_dense.append(floors.full_pass(floors.dense))
        t_pruned.append(floors.full_pass(floors.pruned))
        if "lstsq" in method and not prod:
            prod = floors.products()
        if "bn" in method and not bn_pre:
            bn_pre, n_bn = floors.bn_prefixes()
        wall, rec = _restore_cli(pruned, method, data, args.size, args.batch_size, tmp / "r.safetensors")
        own = float(sum(rec["metrics"]["restore_s"].values()))
        row = {"process_s": round(wall, 1), "method_s": round(own, 1), "method_split_s": rec["metrics"]["restore_s"]}
        if args.uncached and method != "lbyl":
            row["uncached_method_s"] = round(_uncached(floors, method), 1)
        out["methods"][method] = row
        print(f"{method}: method {own:.1f}s, process {wall:.1f}s", file=sys.stderr, flush=True)
    td, tp = statistics.median(t_dense), statistics.median(t_pruned)
    floor_lstsq = k * (td + tp) + prod
    floor = {"lstsq": floor_lstsq, "bn": bn_pre, "lstsq+bn": floor_lstsq + bn_pre, "lbyl": tp}
    for method, row in out["methods"].items():
        row["floor_s"] = round(floor[method], 1)
        row["method_over_floor"] = round(row["method_s"] / floor[method], 3)
        row["process_over_floor"] = round(row["process_s"] / floor[method], 3)
    out.update({"dense_pass_s": round(td, 2), "pruned_pass_s": round(tp, 2), "products_s": round(prod, 1),
                "bn_prefixes_s": round(bn_pre, 1), "bn_reestimated": n_bn})  # fmt: skip
    return out


def case_b(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    _base, pruned = _build("resnet18", 10, 32, tmp, "b", 0.3)
    times: dict[str, list[float]] = {"eval": [], "lstsq": [], "bn": [], "lstsq+bn": []}
    own: dict[str, list[float]] = {m: [] for m in times if m != "eval"}
    for _ in range(args.repeat):
        for method in times:
            if method == "eval":
                wall, _rec = _cli(["eval", str(pruned), "--data", "digits:train", "--input-size", "32",
                                   "-j", "0", "--device", "cpu"])  # fmt: skip
            else:
                wall, rec = _restore_cli(pruned, method, "digits:train", 32, 64, tmp / "rb.safetensors")
                own[method].append(float(sum(rec["metrics"]["restore_s"].values())))
            times[method].append(wall)
            print(f"digits {method}: {wall:.1f}s", file=sys.stderr, flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    return {
        "process_s": {m: round(v, 1) for m, v in med.items()},
        "method_s": {m: round(statistics.median(v), 1) for m, v in own.items()},
        "process_over_eval": {m: round(v / med["eval"], 2) for m, v in med.items() if m != "eval"},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--methods", default="lstsq,bn,lstsq+bn,lbyl")
    ap.add_argument("--uncached", action="store_true")
    ap.add_argument("--digits", action="store_true")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    logging.getLogger("prunecli").setLevel(logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="bench_restore_floor_"))
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}
    t0 = time.perf_counter()
    if not args.skip_a:
        result["resnet"] = {"arch": args.arch, "size": args.size, "images": args.images, **case_a(args, tmp)}
    if args.digits:
        result["digits"] = case_b(args, tmp)
    result["loadavg_end"] = os.getloadavg()
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
