"""One-call GPU check (``benchmarks/gpu_check.sh``): every subcommand on a timm ResNet and ViT, fp32 and bf16,
torchrun on the GPUs present, and the GPU figures of the existing benchmarks — printed as one table.

Real mode (``--device cuda``, the default) uses ResNet-50 and ViT-B/16 at 224 px with random weights and
10 classes, a JPEG folder it writes itself (256 images at 256 px) and ``synthetic`` data; it is sized to
finish in well under 8 minutes on one GPU. Without CUDA it prints one line and exits 0.
``--device cpu --tiny`` runs the same steps small (resnet10t and vit_tiny at 32 px, 16 JPEGs) so that the
logic is tested on any machine (``tests/test_gpu_check.py``).

Each step runs the real command line in this process (``prunecli.cli.main.app``), except torchrun,
which starts its own processes. The table (Markdown) has one row per step::

    | model | precision | step | status | seconds | figure |

``status`` is ``ok`` or ``FAIL`` (the figure then holds the error's first line). The last line sums up;
the exit status is 1 when any step failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEADER = "| model | precision | step | status | seconds | figure |"
RULE = "| --- | --- | --- | --- | --- | --- |"
NO_CUDA = "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check"


@dataclass(frozen=True)
class Plan:
    """What one mode runs: models at their input side, images written, sizes of each step."""

    models: tuple[tuple[str, int], ...]
    images: int
    image_side: int
    synthetic: int
    batch: int
    steps: int
    bench_batches: int


PLANS = {
    "real": Plan((("resnet50", 224), ("vit_base_patch16_224", 224)), 256, 256, 256, 64, 4, 8),
    "tiny": Plan((("resnet10t", 32), ("vit_tiny_patch16_224", 32)), 16, 40, 16, 8, 1, 2),
}


@dataclass
class Row:
    model: str
    precision: str
    step: str
    status: str
    seconds: float
    figure: str

    def line(self) -> str:
        return f"| {self.model} | {self.precision} | {self.step} | {self.status} | {self.seconds:.1f} | {self.figure} |"


def _cli(args: list[str], metrics: Path) -> dict[str, Any]:
    """Runs ``prunecli ARGS --metrics FILE`` in this process; returns its record or raises with the error line."""
    from prunecli.cli.main import app

    before = metrics.read_text().count("\n") if metrics.exists() else 0
    err = io.StringIO()
    code: Any = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            app(args=[*map(str, args), "--metrics", str(metrics), "--quiet"], prog_name="prunecli")
        except SystemExit as exc:
            code = exc.code
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    if code not in (0, None) or len(lines) <= before:
        first = next((ln for ln in err.getvalue().splitlines() if ln.strip()), f"exit {code}")
        raise RuntimeError(first.strip())
    return json.loads(lines[-1])


def _report(records: Path) -> str:
    """``prunecli report`` over every record of the check (CSV to stdout); the figure is its row count."""
    from prunecli.cli.main import app

    out, err = io.StringIO(), io.StringIO()
    code: Any = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            app(args=["report", str(records), "--format", "csv", "--quiet"], prog_name="prunecli")
        except SystemExit as exc:
            code = exc.code
    if code not in (0, None):
        raise RuntimeError(next((ln for ln in err.getvalue().splitlines() if ln.strip()), f"exit {code}"))
    return f"{max(len(out.getvalue().strip().splitlines()) - 1, 0)} rows from {records.name}"


class Check:
    """Runs the steps, collects the rows, prints the table."""

    def __init__(self, device: str, plan: Plan, work: Path) -> None:
        self.device, self.plan, self.work = device, plan, work
        self.metrics = work / "records.jsonl"
        self.rows: list[Row] = []

    def step(self, model: str, precision: str, name: str, fn: Callable[[], str]) -> bool:
        t0 = time.perf_counter()
        try:
            figure, status = fn(), "ok"
        except Exception as exc:  # one failing step must not hide the others
            figure, status = " ".join(str(exc).split())[:160].replace("|", "/") or type(exc).__name__, "FAIL"
        self.rows.append(Row(model, precision, name, status, time.perf_counter() - t0, figure))
        print(self.rows[-1].line(), flush=True)
        return status == "ok"

    def cli(self, *args: Any) -> dict[str, Any]:
        return _cli(list(args), self.metrics)


def _checkpoint(name: str, side: int, path: Path) -> Path:
    """A random-init timm model with 10 classes at ``side`` px, saved as a self-describing checkpoint."""
    import timm

    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    args = {"img_size": side} if name.startswith("vit") else {}
    model = timm.create_model(name, num_classes=10, **args)
    cfg = {**default_pretrained_cfg(name), "input_size": (3, side, side), "num_classes": 10}
    if side < 64:
        cfg["crop_pct"] = 1.0
    save_checkpoint(path, model, Manifest(name, 10, args, cfg), force=True)
    return path


@dataclass(frozen=True)
class Ctx:
    """What a step's command line is built from: the model, its files, the data and the precision."""

    name: str
    base: Path
    data: str
    prec: str
    plan: Plan
    work: Path
    device: str

    def argv(self, template: str) -> list[str]:
        """The template's words with {base}, {data}, {batch}, {steps}, {n} and output files {u50}… filled in
        (split first, so paths may hold spaces); {run} is --device, --precision and -b."""
        f = {"base": self.base, "data": self.data, "batch": self.plan.batch, "steps": self.plan.steps,
             "n": self.plan.synthetic, "device": self.device,
             "scores": self.work / f"{self.name}-{self.prec}.scores"}  # fmt: skip
        f.update({t: self.work / f"{self.name}-{self.prec}-{t}.safetensors" for t in ("u50", "c25", "r", "ft", "lora")})
        out: list[str] = []
        for word in template.split():
            run = ["--device", self.device, "--precision", self.prec, "-b", str(self.plan.batch)]
            out += run if word == "{run}" else [word.format(**f)]
        return out


def _ips(m: dict[str, Any], seconds: float) -> str:
    return f"{m['samples'] / seconds:.0f} img/s, workers {m['loader']['workers']}"


def _nan(m: dict[str, Any], key: str) -> float:
    v = m.get(key)
    return float("nan") if v is None else float(v)


# steps without a precision (run once per model), then the steps run for fp32 and for bf16:
# step → (command line template, figure from (metrics, seconds))
ONCE: list[tuple[str, str, Callable[[dict[str, Any], float], str]]] = [
    ("inspect", "inspect {base}", lambda m, s: f"{m.get('params', 0):,} params"),
    ("prune channel", "prune {base} -m magnitude --structure channel -r 0.25 -o {c25} --force -b {batch} "
     "--device {device}", lambda m, s: f"params {m.get('params', 0):,}"),
    ("restore", "restore {c25} --data {data} -o {r} --force -b {batch} --device {device}",
     lambda m, s: f"method {m.get('method', '?')}"),
]  # fmt: skip
STEPS: list[tuple[str, str, Callable[[dict[str, Any], float], str]]] = [
    ("eval jpeg", "eval {base} --data {data} {run}", _ips),  # {run}: --device, --precision, -b
    ("eval synthetic", "eval {base} --data synthetic:{n} {run}", _ips),
    ("score taylor", "score {base} -m taylor --data {data} --batches 2 -o {scores} --force {run}",
     lambda m, s: f"{m['samples']} samples, {m['precision']}"),
    ("prune unstructured taylor", "prune {base} -m taylor --data {data} --batches 1 -r 0.5 --scope layer -o {u50} "
     "--force {run}",
     lambda m, s: f"sparsity {_nan(m, 'sparsity'):.2f}"),
    ("finetune", "finetune {base} --data {data} --max-steps {steps} --epochs 1 -o {ft} --force {run}",
     lambda m, s: f"loss {m['train_loss'][-1]:.3f}, {m['precision']}, augment {m['recipe']['augment']}"),
    ("finetune-lora", "finetune-lora {u50} --data {data} --val {data} --max-steps {steps} --epochs 1 -o {lora} "
     "--force {run}", lambda m, s: f"top1 {_nan(m, 'top1_before'):.3f} -> {_nan(m, 'top1_after'):.3f}"),
]  # fmt: skip


def _model_steps(c: Check, name: str, side: int, folder: Path) -> None:
    base = _checkpoint(name, side, c.work / f"{name}.safetensors")
    for prec in ("-", "fp32", "bf16"):
        x = Ctx(name, base, f"imagefolder:{folder}", prec, c.plan, c.work, c.device)
        for step, template, figure in ONCE if prec == "-" else STEPS:

            def one(words: list[str] = x.argv(template), figure: Callable[..., str] = figure) -> str:
                t0 = time.perf_counter()
                metrics = c.cli(*words)["metrics"]
                return figure(metrics, time.perf_counter() - t0)

            c.step(name, prec, step, one)
    c.step(name, "bf16", "score vs bare fwd+bwd", lambda: _score_vs_bare(c, base, side))
    c.step(name, "fp32", "eval vs timm loader", lambda: _eval_vs_timm(c, base, folder))


def _score_vs_bare(c: Check, ckpt: Path, side: int) -> str:
    """bench_score.py's figure at bf16: the taylor engine over in-memory batches against the bare loop."""
    import torch
    import torch.nn.functional as F

    from prunecli.api._common import load_input
    from prunecli.criteria import get_criterion
    from prunecli.device import autocast
    from prunecli.scoring import run_criterion

    dev = torch.device(c.device)
    model = load_input(str(ckpt)).model.to(dev).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(c.plan.batch, 3, side, side, generator=g).to(dev), torch.randint(0, 10, (c.plan.batch,),
                generator=g).to(dev)) for _ in range(c.plan.bench_batches)]  # fmt: skip

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def bare() -> None:
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            with autocast(dev, "bf16"):
                out = model(x)
            F.cross_entropy(out.float(), y).backward()
        model.zero_grad(set_to_none=True)

    def engine() -> None:
        run_criterion(model, get_criterion("taylor"), batches, device=dev, precision="bf16")

    times: dict[str, list[float]] = {"bare": [], "engine": []}
    bare(), engine()  # warm-up (kernels, autotuning)
    for _ in range(3):
        for name, fn in (("bare", bare), ("engine", engine)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    ratio = statistics.median(times["bare"]) / statistics.median(times["engine"])
    ips = c.plan.batch * c.plan.bench_batches / statistics.median(times["engine"])
    return f"taylor {ips:.0f} img/s = {ratio:.2f}x the bare loop"


def _eval_vs_timm(c: Check, ckpt: Path, folder: Path) -> str:
    """bench_loader.py's figure in this process: prunecli's loader + eval against timm's create_loader loop."""
    import timm
    import torch
    from timm.data import create_dataset, create_loader

    from prunecli.api._common import load_input
    from prunecli.data import load_data
    from prunecli.evaluation import eval_loader, evaluate_model

    dev = torch.device(c.device)
    loaded = load_input(str(ckpt))
    ds, cfg = load_data(f"imagefolder:{folder}", loaded)

    def ours() -> int:
        loader = eval_loader(ds, dev, batch_size=c.plan.batch, workers=None)
        return int(evaluate_model(loaded.model, loader, dev)["samples"])

    model = loaded.model

    def theirs() -> int:
        loader = create_loader(
            create_dataset("", root=str(folder)), input_size=cfg["input_size"], batch_size=c.plan.batch,
            is_training=False, interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
            crop_pct=cfg["crop_pct"], num_workers=4, device=dev, pin_memory=dev.type == "cuda",
        )  # fmt: skip
        n = 0
        with torch.inference_mode():
            for x, _ in loader:
                model(x.to(dev))
                n += len(x)
        return n

    del timm
    walls: dict[str, list[float]] = {"prunecli": [], "timm": []}
    for _ in range(2):
        for side, fn in (("prunecli", ours), ("timm", theirs)):
            t0 = time.perf_counter()
            n = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            walls[side].append(time.perf_counter() - t0)
    ratio = min(walls["timm"]) / min(walls["prunecli"])
    return f"{n / min(walls['prunecli']):.0f} img/s = {ratio:.2f}x timm's loop"


def _torchrun(c: Check, folder: Path) -> None:
    """``torchrun`` over the GPUs present (nccl); on CPU two gloo processes."""
    import torch

    name = c.plan.models[0][0]
    ckpt = c.work / f"{name}.safetensors"
    procs = torch.cuda.device_count() if c.device.startswith("cuda") else 2
    backend = "nccl" if c.device.startswith("cuda") else "gloo"
    out = c.work / "torchrun.jsonl"

    def run() -> str:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m",
               "prunecli", "eval", str(ckpt), "--data", f"imagefolder:{folder}", "--device", c.device, "-b",
               str(c.plan.batch), "--metrics", str(out), "--quiet"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNECLI_NO_PROGRESS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if ln.startswith("Error")] or done.stderr.splitlines()[-1:]
            raise RuntimeError(lines[0] if lines else f"exit {done.returncode}")
        m = json.loads(out.read_text().splitlines()[-1])["metrics"]
        return f"{backend} x{m.get('world_size', 1)}, {m['samples']} samples, top1 {m['top1']:.3f}"

    c.step(name, "fp32", f"torchrun eval ({procs} procs)", run)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check.sh", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny models at 32 px and a few images (CPU logic test)")
    ap.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary folder)")
    args = ap.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    os.environ.setdefault("PRUNECLI_NO_PROGRESS", "1")
    plan = PLANS["tiny" if args.tiny else "real"]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_loader import write_folder

    start = time.perf_counter()
    folder = write_folder(work / "jpegs", plan.images, plan.image_side)
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    print(f"gpu_check: {'tiny' if args.tiny else 'real'} mode on {dev}; torch {torch.__version__}")
    print(HEADER)
    print(RULE, flush=True)
    c = Check(args.device, plan, work)
    for name, side in plan.models:
        _model_steps(c, name, side, folder)
    _torchrun(c, folder)
    c.step("-", "-", "report", lambda: _report(c.metrics))
    failed = sum(r.status != "ok" for r in c.rows)
    print(f"gpu_check: {len(c.rows) - failed} ok, {failed} failed in {time.perf_counter() - start:.0f} s")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
