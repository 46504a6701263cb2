"""``prune --reconstruct obs`` on resnet50 and vit_base at their default input size: time and peak memory
against the bare cost floor measured in the same run (benchmarks/obs.md).

Per architecture, a randomly initialised timm model is written as a prunecli checkpoint, then these
jobs run, each in a fresh process started from a small wrapper that reads ``getrusage(RUSAGE_CHILDREN)``
(wall time including interpreter start and imports, CPU time, peak RSS):

* ``floor`` — exactly the work no reconstruction can avoid: load the checkpoint, build the calibration
  images, one forward pass of them with a hook on every conv/linear layer that adds the layer's input to
  its Gram matrix (:class:`prunecli.reconstruction.GramAccumulator`, the solver's own precision), then
  one Cholesky factorisation per layer (and group) of the dampened matrix. It also reports the memory
  terms of the bound: the RSS with the interpreter, the model and the calibration images loaded, the
  RSS growth of one plain forward pass of one batch (one batch of activations), the largest Gram matrix;
* ``obs`` — ``prunecli prune CKPT --structure unstructured -r 0.5 --method magnitude --reconstruct obs
  --data synthetic:N -p samples=N -o OUT`` (``--via cli``) or, before the CLI had it, the same work
  through the library: :func:`prunecli.reconstruction.reconstruct` with a ratio of 0.5 on every layer,
  then the checkpoint written (``--via library``).

The jobs alternate (floor, obs, floor, obs, … with ``--repeat``), so both see the same machine load;
the load average is printed with the figures. Targets (issue 17): wall(obs) ≤ 2 × wall(floor); peak
RSS(obs) ≤ 1.1 × (RSS loaded + 2 × largest Gram + one batch of activations).

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_obs.py --workdir /tmp/bench_obs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PRUNECLI = Path(sys.executable).with_name("prunecli")

WRAP = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": proc.returncode, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "peak_mib": ru.ru_maxrss / 1024, "stdout": proc.stdout[-4000:], "stderr": proc.stderr[-2000:]}))
"""

COMMON = """
import json, resource, sys, time
import torch
from prunecli.data import build_dataset
from prunecli.loading import data_config, load_model
from prunecli.prunable import prunable_layers

def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

ckpt, samples, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = rss_mib()
model = load_model(ckpt).eval()
ds = build_dataset(f"synthetic:{samples}", data_config(model), default_split="train", num_classes=1000).dataset
images = torch.stack([ds[i][0] for i in range(samples)])
calib = list(images.split(batch))
del images
loaded = rss_mib()
layers = prunable_layers(model)
"""

FLOOR_JOB = (
    COMMON
    + """
from prunecli.reconstruction import GramAccumulator, dampen
t0 = time.perf_counter()
accs = {name: GramAccumulator(mod) for name, mod in layers.items()}
handles = [mod.register_forward_pre_hook(accs[name].hook) for name, mod in layers.items()]
with torch.no_grad():
    for x in calib:
        model(x)
for h in handles:
    h.remove()
t1 = time.perf_counter()
for acc in accs.values():
    for g in range(acc.h.shape[0]):
        torch.linalg.cholesky_ex(dampen(acc.h[g], 0.01, inplace=True)[0])
t2 = time.perf_counter()
gram = max(acc.h[0].numel() * acc.h.shape[0] * 8 for acc in accs.values()) / 2**20
del accs
params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(json.dumps({"base_mib": base, "loaded_mib": loaded, "gram_mib": gram, "forward_gram_s": t1 - t0,
                  "cholesky_s": t2 - t1, "model_mib": params}))
"""
)

ACT_JOB = (
    COMMON
    + """
before = rss_mib()
with torch.no_grad():
    model(calib[0])
print(json.dumps({"act_mib": rss_mib() - before, "loaded_mib": loaded}))
"""
)

LIB_JOB = (
    COMMON
    + """
from prunecli.checkpoint.manifest import Manifest
from prunecli.checkpoint.writer import save_checkpoint
from prunecli.models import default_pretrained_cfg
from prunecli.reconstruction import reconstruct
t0 = time.perf_counter()
report = reconstruct(model, dict.fromkeys(layers, 0.5), calib)
t1 = time.perf_counter()
arch = sys.argv[5]
save_checkpoint(sys.argv[4], model, Manifest(arch, 1000, {}, default_pretrained_cfg(arch)), force=True)
done = sum(r.status == "reconstructed" for r in report.layers.values())
print(json.dumps({"reconstruct_s": t1 - t0, "layers": done}))
"""
)


def _run(cmd: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", WRAP, *cmd], capture_output=True, text=True, env=env, check=True)
    res = json.loads(out.stdout)
    if res["rc"] != 0:
        raise SystemExit(f"job failed ({' '.join(cmd[:3])} …): {res['stderr'][-1500:]}")
    return res


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def _make_checkpoint(arch: str, path: Path) -> None:
    import timm
    import torch

    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=1000)
    save_checkpoint(path, model, Manifest(arch, 1000, {}, default_pretrained_cfg(arch)), force=True)


def _via(choice: str) -> str:
    """``cli`` once ``prune --reconstruct obs`` is committed (its wiring lives in reconstruction/joint.py)."""
    if choice != "auto":
        return choice
    cmd = ["git", "log", "--oneline", "-1", "--", "src/prunecli/reconstruction/joint.py"]
    log = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1])
    return "cli" if log.stdout.strip() else "library"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["resnet50", "vit_base_patch16_224"])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=128, help="calibration batch size (prune's default)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--via", choices=["auto", "cli", "library"], default="auto")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_obs"))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PRUNECLI_NO_PROGRESS": "1"}
    via = _via(args.via)
    load = Path("/proc/loadavg").read_text().strip()
    print(f"via {via}; threads {env.get('OMP_NUM_THREADS', 'default')}; loadavg {load}")
    rows = []
    for arch in args.arch:
        ckpt = args.workdir / f"{arch}.safetensors"
        out = args.workdir / f"{arch}-obs.safetensors"
        _make_checkpoint(arch, ckpt)
        common = [str(ckpt), str(args.samples), str(args.batch_size)]
        act = _last_json(_run([sys.executable, "-c", ACT_JOB, *common], env)["stdout"])
        floors, obs = [], []
        for _ in range(args.repeat):
            res = _run([sys.executable, "-c", FLOOR_JOB, *common], env)
            floors.append({**res, **_last_json(res["stdout"])})
            if via == "cli":
                cmd = [str(PRUNECLI), "prune", str(ckpt), "--structure", "unstructured", "-r", "0.5",
                       "--method", "magnitude", "--reconstruct", "obs", "--data", f"synthetic:{args.samples}",
                       "-p", f"samples={args.samples}", "--batch-size", str(args.batch_size), "-o", str(out),
                       "--force"]  # fmt: skip
            else:
                cmd = [sys.executable, "-c", LIB_JOB, *common, str(out), arch]
            res = _run(cmd, env)
            obs.append({**res, **_last_json(res["stdout"])})
        f, o = min(floors, key=lambda r: r["wall_s"]), min(obs, key=lambda r: r["wall_s"])
        bound = 1.1 * (f["loaded_mib"] + 2 * f["gram_mib"] + act["act_mib"])
        row = {
            "arch": arch, "samples": args.samples, "via": via,
            "floor_wall_s": round(f["wall_s"], 1), "floor_cpu_s": round(f["cpu_s"], 1),
            "floor_forward_gram_s": round(f["forward_gram_s"], 1), "floor_cholesky_s": round(f["cholesky_s"], 1),
            "obs_wall_s": round(o["wall_s"], 1), "obs_cpu_s": round(o["cpu_s"], 1),
            "wall_ratio": round(o["wall_s"] / f["wall_s"], 2), "cpu_ratio": round(o["cpu_s"] / f["cpu_s"], 2),
            "obs_peak_mib": round(o["peak_mib"]), "bound_mib": round(bound),
            "mem_ratio": round(o["peak_mib"] / bound, 2),
            "terms_mib": {"interpreter": round(f["base_mib"]), "loaded": round(f["loaded_mib"]),
                          "model_params": round(f["model_mib"]), "largest_gram": round(f["gram_mib"]),
                          "one_batch_activations": round(act["act_mib"])},
            "floor_peak_mib": round(f["peak_mib"]), "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.workdir / "bench_obs.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
