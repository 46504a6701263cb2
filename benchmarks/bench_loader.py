"""``prunecli eval`` / ``score --method taylor`` against plain timm loops over ``create_loader``, whole processes.

The benchmark writes its own JPEG image folder (``--images`` files at 288×288, 10 classes; the eval
transform resizes to 256 and centre-crops 224, as for ImageNet), then runs, interleaved and
``--repeats`` times, each side as a fresh Python process and times the process from start to exit:

* ``prunecli eval arch:MODEL --num-classes 10 --data imagefolder:DIR`` with default options (batch 128,
  the default worker count, fp32);
* the timm side: ``timm.create_model`` + ``timm.data.create_dataset`` + ``create_loader(is_training=False,
  num_workers=4)`` (timm's ``validate.py`` default worker count and batch size 256 → here the same
  batch as prunecli for a like-for-like loop), and a ``torch.no_grad`` forward loop;
* ``prunecli score arch:MODEL --method taylor --fraction 1`` (every image once, default batch 64) against
  the same timm loader with a forward + cross-entropy backward per batch (batch 64).

Throughput = images / process wall time (imports, model creation and worker start-up included on both
sides); the ratio is prunecli's over timm's. Medians over the repeats.

    OMP_NUM_THREADS= python benchmarks/bench_loader.py --images 2000 --models resnet18,resnet50 --repeats 3
    python benchmarks/bench_loader.py --small          # 128 images at 96 px, resnet18, one repeat (~1 min)

It also serves ``benchmarks/gpu_check.py``, which imports :func:`write_folder` and :func:`compare`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMM_WORKERS = 4  # timm's validate.py/train.py default for -j/--workers


def write_folder(root: Path, images: int, side: int = 288, classes: int = 10, seed: int = 0) -> Path:
    """Writes ``images`` JPEGs (``side``², quality 90) into ``classes`` sub-folders; returns ``root``.

    Smooth colour gradients plus noise: JPEG sizes close to photographs' (about 20–40 kB at 288 px),
    so decoding costs what it costs on real data.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    for i in range(images):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0, 255, 3)
        img = np.stack([a * xx + (255 - a) * yy, b * yy, c * (1 - xx)], axis=-1)
        img += rng.normal(0, 24, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=90)
    return root


def _timm_loop(model_name: str, root: str, batch: int, backward: bool, device: str, precision: str) -> None:
    """The timm side, run as its own process (``--timm-side``)."""
    import timm
    import torch
    import torch.nn.functional as F
    from timm.data import create_dataset, create_loader, resolve_data_config

    dev = torch.device(device)
    model = timm.create_model(model_name, num_classes=10).to(dev).eval()
    cfg = resolve_data_config({}, model=model)
    ds = create_dataset("", root=root)
    loader = create_loader(
        ds, input_size=cfg["input_size"], batch_size=batch, is_training=False, interpolation=cfg["interpolation"],
        mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"], num_workers=TIMM_WORKERS, device=dev,
        pin_memory=dev.type == "cuda",
    )  # fmt: skip
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    n = 0
    with torch.set_grad_enabled(backward):
        for x, y in loader:
            with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(x)
            if backward:
                model.zero_grad(set_to_none=True)
                F.cross_entropy(out.float(), y).backward()
            n += len(y)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"samples": n}))


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return wall


def sides(model: str, root: Path, task: str, *, device: str, precision: str, tmp: Path) -> dict[str, list[str]]:
    """The two commands of one comparison: ``prunecli`` (default options) and the plain timm loop."""
    py = sys.executable
    common = [f"arch:{model}", "--num-classes", "10", "--data", f"imagefolder:{root}", "--device", device,
              "--precision", precision, "--quiet"]  # fmt: skip
    if task == "eval":
        ours = [py, "-m", "prunecli", "eval", *common]
        batch, backward = 128, False  # prunecli eval's default batch
    else:
        ours = [py, "-m", "prunecli", "score", *common, "--method", "taylor", "--fraction", "1", "--force",
                "-o", str(tmp / "t.scores")]  # fmt: skip
        batch, backward = 64, True  # prunecli score's default batch
    theirs = [py, __file__, "--timm-side", model, str(root), str(batch), str(int(backward)), device, precision]
    return {"prunecli": ours, "timm": theirs}


def compare(
    model: str, root: Path, task: str, images: int, *, repeats: int = 1, device: str = "cpu", precision: str = "fp32"
) -> dict[str, float]:
    """Interleaved whole-process runs of both sides; median images/s of each and their ratio."""
    env = {**os.environ, "PRUNECLI_NO_PROGRESS": "1"}
    walls: dict[str, list[float]] = {"prunecli": [], "timm": []}
    with tempfile.TemporaryDirectory() as tmp:
        cmds = sides(model, root, task, device=device, precision=precision, tmp=Path(tmp))
        for r in range(repeats):
            order = ("prunecli", "timm") if r % 2 == 0 else ("timm", "prunecli")
            for side in order:
                walls[side].append(_timed(cmds[side], env))
    ours, theirs = (images / statistics.median(walls[s]) for s in ("prunecli", "timm"))
    return {"prunecli_ips": ours, "timm_ips": theirs, "ratio": ours / theirs,
            "prunecli_s": statistics.median(walls["prunecli"]), "timm_s": statistics.median(walls["timm"])}  # fmt: skip


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--timm-side":
        model, root, batch, backward, device, precision = sys.argv[2:8]
        _timm_loop(model, root, int(batch), bool(int(backward)), device, precision)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--side", type=int, default=288, help="side of the written JPEGs")
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--tasks", default="eval,score")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--root", type=Path, help="reuse (or write) the image folder here")
    ap.add_argument("--small", action="store_true", help="128 images at 96 px, resnet18, one repeat")
    args = ap.parse_args()
    if args.small:
        args.images, args.side, args.models, args.repeats = 128, 96, "resnet18", 1
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp) / "jpegs"
        if not (root.is_dir() and sum(1 for _ in root.rglob("*.jpg")) == args.images):
            write_folder(root, args.images, args.side)
        print(f"{args.images} JPEGs at {args.side} px in {root}; {os.cpu_count()} CPUs; device {args.device}")
        print("| model | task | prunecli img/s | timm img/s | ratio | prunecli s | timm s |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for model in args.models.split(","):
            for task in args.tasks.split(","):
                r = compare(model, root, task, args.images, repeats=args.repeats, device=args.device,
                            precision=args.precision)  # fmt: skip
                print(f"| {model} | {task} | {r['prunecli_ips']:.1f} | {r['timm_ips']:.1f} | {r['ratio']:.3f} | "
                      f"{r['prunecli_s']:.1f} | {r['timm_s']:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
