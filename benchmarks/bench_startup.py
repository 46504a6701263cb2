#!/usr/bin/env python3
"""Start-up cost of the commands that must not import torch: ``prunecli --help`` and ``prunecli inspect``.

Writes a prunecli checkpoint of ``vit_base_patch16_224`` (random fp32 weights, ~346 MB) to a temporary
folder, then times whole processes (median of ``--repeat`` runs after one warm-up, so the file is in
the page cache) of:

- ``python -c pass`` (interpreter start, the floor),
- ``prunecli --help``,
- ``prunecli inspect FILE`` (header only),
- ``prunecli inspect FILE --layers`` (reads every tensor's bytes to count zeros, still without torch),
- ``python -c "import torch, timm"`` (what any torch-importing command pays before doing work).

The checkpoint is deleted afterwards (``--keep`` keeps it). Usage:

    python benchmarks/bench_startup.py [--repeat 5] [--arch vit_base_patch16_224] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_checkpoint(path: Path, arch: str) -> int:
    """A prunecli checkpoint of ``arch`` with random fp32 weights; returns its size in bytes."""
    import numpy as np
    import timm
    import torch

    from prunecli.checkpoint.manifest import METADATA_KEY, Manifest
    from prunecli.checkpoint.safetensors_io import write_safetensors
    from prunecli.models import default_pretrained_cfg

    with torch.device("meta"):  # shapes only: no initialisation cost
        model = timm.create_model(arch)
    rng = np.random.default_rng(0)
    tensors = {}
    for name, t in model.state_dict().items():
        arr = (
            rng.standard_normal(tuple(t.shape), dtype=np.float32) * 0.02 if t.is_floating_point() else np.zeros(t.shape)
        )
        tensors[name] = torch.from_numpy(np.ascontiguousarray(arr)).to(t.dtype)
    manifest = Manifest(arch, model.num_classes, {}, default_pretrained_cfg(arch))
    write_safetensors(path, tensors, {"format": "pt", METADATA_KEY: manifest.to_json()})
    return path.stat().st_size


def time_command(cmd: list[str], repeat: int) -> dict[str, float]:
    """Median / min wall time of ``cmd`` in seconds (one untimed warm-up run first)."""
    env = {**os.environ, "PRUNECLI_NO_PROGRESS": "1"}
    subprocess.run(cmd, capture_output=True, check=True, env=env)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True, env=env)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--arch", default="vit_base_patch16_224")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint (printed path)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args()

    exe = Path(sys.executable).parent / "prunecli"
    prunecli = [str(exe)] if exe.exists() else [sys.executable, "-m", "prunecli"]
    tmp = Path(tempfile.mkdtemp(prefix="prunecli-bench-"))
    ckpt = tmp / f"{args.arch}.safetensors"
    try:
        size = write_checkpoint(ckpt, args.arch)
        cases = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "prunecli --help": [*prunecli, "--help"],
            "prunecli inspect FILE": [*prunecli, "inspect", str(ckpt)],
            "prunecli inspect FILE --layers": [*prunecli, "inspect", str(ckpt), "--layers"],
            'python -c "import torch, timm"': [sys.executable, "-c", "import torch, timm"],
        }
        results = {name: time_command(cmd, args.repeat) for name, cmd in cases.items()}
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = {
        "file_bytes": size,
        "arch": args.arch,
        "repeat": args.repeat,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2, sort_keys=True))
        return 0
    print(f"{args.arch} checkpoint: {size / 1e6:.1f} MB; median of {args.repeat} runs after a warm-up\n")
    print("| command | median (s) | min (s) |")
    print("| --- | ---: | ---: |")
    for name, r in results.items():
        print(f"| `{name}` | {r['median_s']:.3f} | {r['min_s']:.3f} |")
    if args.keep:
        print(f"\ncheckpoint kept at {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
