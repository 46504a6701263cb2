"""Unstructured global magnitude pruning of a large timm model: time and peak memory vs. the anchors.

Jobs run in fresh processes on the same safetensors file (a randomly initialised timm model, written
first by prunecli so that it is self-describing, layer table included):

* ``io``     — the I/O limit: ``safetensors.torch.load_file`` + ``save_file`` of the same tensors;
* ``io+timm`` — the same after ``import timm`` (what any tool that builds timm models pays first);
* ``prunecli`` — ``prunecli prune CKPT --method magnitude --ratio R --scope global -o OUT``: the fast
  path (layer table, no timm, no model);
* ``prunecli-model`` — the same command with ``PRUNECLI_FAST_PRUNE=0`` (rebuilds the timm model, as
  for any input without a layer table); its output must be byte-identical to ``prunecli``'s;
* ``io-hf`` — the I/O limit of the third-party folder: ``load_file`` + ``save_file`` of its
  ``model.safetensors`` (the same weights saved by ``timm.models.save_for_hf``);
* ``prunecli-hf`` — the same pruning of that folder, second run: the fast path with the layer table
  from the cache (``XDG_CACHE_HOME`` in the workdir, filled by one run before the rounds), no timm;
* ``prunecli-hf-nocache`` — the same with ``--no-cache``: every run builds the table through timm (the
  cost of a cache miss, without writing the entry);
* ``prunecli-hf-model`` — the same with ``PRUNECLI_FAST_PRUNE=0``: the model path; its output must be
  byte-identical to ``prunecli-hf``'s and ``prunecli-hf-nocache``'s;
* ``torch``  — ``torch.nn.utils.prune.global_unstructured`` (L1) over the same weights (every
  conv/linear weight except the classifier head), ``prune.remove``, then ``save_file``.

Each process is started from a small wrapper that waits for it and reads
``getrusage(RUSAGE_CHILDREN)``: wall time (including interpreter start and ``import torch``), CPU
time (user + sys, less sensitive to other load on shared cores) and peak RSS. Finally the pruned
tensors of ``prunecli`` and ``torch`` are compared for equality.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_prune_unstructured.py --arch vit_base_patch16_224 \\
        --ratio 0.5 --workdir /tmp/bench_prune --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
PRUNECLI = Path(sys.executable).with_name("prunecli")

IO_JOB = """
import sys
from safetensors.torch import load_file, save_file
from safetensors import safe_open
with safe_open(sys.argv[1], "pt") as f:
    meta = f.metadata()
save_file(load_file(sys.argv[1]), sys.argv[2], metadata=meta)
"""

TORCH_JOB = """
import sys, json
import torch, timm
from torch import nn
from torch.nn.utils import prune
from safetensors.torch import load_file, save_file
import prunecli.archs  # noqa: F401
src, dst, arch, ratio, head = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
sd = load_file(src)
with torch.device("meta"):
    model = timm.create_model(arch, num_classes=int(sys.argv[6]))
model.load_state_dict(sd, assign=True)
del sd
layers = [(m, "weight") for n, m in model.named_modules()
          if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and n != head and m.weight.ndim > 1]
prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=ratio)
for m, name in layers:
    prune.remove(m, name)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, dst)
"""


def _measure(cmd: list[str]) -> dict[str, float]:
    """Runs ``cmd`` in a fresh wrapper process; returns wall s, cpu s and peak RSS MiB of ``cmd``."""
    out = subprocess.run([sys.executable, str(HERE), "--wrap", "--", *cmd], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _wrap(cmd: list[str]) -> None:
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(proc.returncode)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_mib": ru.ru_maxrss / 1024}))


def _make_checkpoint(arch: str, path: Path, num_classes: int, hf_folder: Path) -> tuple[int, str]:
    import timm
    import torch
    from timm.models import save_for_hf

    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=num_classes)
    save_checkpoint(path, model, Manifest(arch, num_classes, {}, default_pretrained_cfg(arch)), force=True)
    shutil.rmtree(hf_folder, ignore_errors=True)
    save_for_hf(model, str(hf_folder), safe_serialization=True)
    (hf_folder / "pytorch_model.bin").unlink(missing_ok=True)
    head = model.pretrained_cfg.get("classifier", "head")
    return sum(p.numel() for p in model.parameters()), head


def _anchor(job: str) -> str:
    """The I/O job a prune job is compared with: the load+save of the same file."""
    return "io-hf" if job.startswith("prunecli-hf") else "io"


def _same_bytes(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def _same_tensors(a: Path, b: Path) -> bool:
    """Equal tensors bit for bit (the manifests differ: lineage input, pretrained_cfg of the source)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if set(fa.keys()) != set(fb.keys()):
            return False
        for key in fa.keys():  # noqa: SIM118 (safe_open has no __iter__)
            ta, tb = fa.get_tensor(key), fb.get_tensor(key)
            if ta.shape != tb.shape or not torch.equal(
                ta.reshape(-1).view(torch.uint8), tb.reshape(-1).view(torch.uint8)
            ):
                return False
    return True


def _compare(src: Path, a: Path, b: Path) -> dict[str, object]:
    """Where two pruned files differ, and whether each difference is a tie of |w| (torch breaks ties arbitrarily)."""
    import torch
    from safetensors import safe_open

    differ, positions, values, zeros_a, zeros_b = 0, 0, set(), 0, 0
    with safe_open(str(src), "pt") as fs, safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        for key in fb.keys():  # noqa: SIM118 (safe_open has no __iter__)
            ta, tb = fa.get_tensor(key), fb.get_tensor(key)
            if ta.is_floating_point():
                zeros_a += int(torch.count_nonzero(ta == 0))
                zeros_b += int(torch.count_nonzero(tb == 0))
            if torch.equal(ta.view(-1).view(torch.uint8), tb.view(-1).view(torch.uint8)):
                continue
            differ += 1
            where = (ta == 0) != (tb == 0)
            positions += int(where.sum())
            values |= set(fs.get_tensor(key)[where].abs().tolist())
    return {
        "bitwise_identical": differ == 0,
        "tensors_differing": differ,
        "positions_differing": positions,
        "distinct_abs_values_at_differences": sorted(values),
        "zeros_prunecli": zeros_a,
        "zeros_torch": zeros_b,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--wrap":
        _wrap(sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_base_patch16_224")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_prune_unstructured"))
    ap.add_argument("--repeat", type=int, default=1, help="runs per job; the minimum is reported")
    ap.add_argument("--skip-torch", action="store_true", help="skip the (slow, memory-hungry) torch baseline")
    ap.add_argument("--skip-model-path", action="store_true", help="skip the prunecli-model and prunecli-hf jobs")
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    src = args.workdir / f"{args.arch}.safetensors"
    hf = args.workdir / "hf"
    params, head = _make_checkpoint(args.arch, src, args.num_classes, hf)
    size_mib = src.stat().st_size / 2**20
    env_threads = os.environ.get("OMP_NUM_THREADS", "unset")

    def prune_cmd(ckpt: Path, out: str, *extra: str) -> list[str]:
        opts = ["--method", "magnitude", "--ratio", str(args.ratio), "--scope", "global", *extra]
        return [str(PRUNECLI), "prune", str(ckpt), *opts, "-o", str(args.workdir / out), "--force", "--quiet"]

    cache = ["env", f"XDG_CACHE_HOME={args.workdir / 'xdg'}", "PRUNECLI_NO_CACHE=0"]  # never the user's cache
    shutil.rmtree(args.workdir / "xdg", ignore_errors=True)
    warm = _measure([*cache, *prune_cmd(hf, "prunecli_hf_miss.safetensors")])  # the first run: a cache miss
    jobs = {
        "io": [sys.executable, "-c", IO_JOB, str(src), str(args.workdir / "io.safetensors")],
        "io+timm": [sys.executable, "-c", "import timm\n" + IO_JOB, str(src), str(args.workdir / "io.safetensors")],
        "prunecli": prune_cmd(src, "prunecli.safetensors"),
        "prunecli-model": ["env", "PRUNECLI_FAST_PRUNE=0", *prune_cmd(src, "prunecli_model.safetensors")],
        "io-hf": [sys.executable, "-c", IO_JOB, str(hf / "model.safetensors"), str(args.workdir / "io_hf.safetensors")],
        "prunecli-hf": [*cache, *prune_cmd(hf, "prunecli_hf.safetensors")],
        "prunecli-hf-nocache": [*cache, *prune_cmd(hf, "prunecli_hf_nocache.safetensors", "--no-cache")],
        "prunecli-hf-model": [*cache, "PRUNECLI_FAST_PRUNE=0", *prune_cmd(hf, "prunecli_hf_model.safetensors")],
        "torch": [
            sys.executable,
            "-c",
            TORCH_JOB,
            str(src),
            str(args.workdir / "torch.safetensors"),
            args.arch,
            str(args.ratio),
            head,
            str(args.num_classes),
        ],
    }
    if args.skip_torch:
        del jobs["torch"]
    if args.skip_model_path:
        del jobs["prunecli-model"], jobs["prunecli-hf-model"], jobs["prunecli-hf-nocache"]
    # Rounds run every job once, in turn: load on the shared machine drifts, and interleaving gives
    # each job the same conditions. Per job the minimum over rounds is reported; the ratios to io are
    # also given per round (their median is robust to one job having a lucky or unlucky round).
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in jobs}
    for _ in range(args.repeat):
        for name, cmd in jobs.items():
            runs[name].append(_measure(cmd))
    results = {name: {k: min(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    for name, res in results.items():
        print(
            f"{name:14s} wall {res['wall_s']:7.2f} s  cpu {res['cpu_s']:7.2f} s  peak {res['peak_mib']:8.1f} MiB",
            flush=True,
        )
    io, pc = results["io"], results["prunecli"]
    per_round = {
        f"{name}_vs_{_anchor(name)}_{k}_per_round": [
            round(r[f"{k}_s"] / i[f"{k}_s"], 3) for r, i in zip(rs, runs[_anchor(name)], strict=True)
        ]
        for name, rs in runs.items()
        if name.startswith("prunecli")
        for k in ("wall", "cpu")
    }
    summary = {
        "arch": args.arch,
        "params": params,
        "checkpoint_mib": round(size_mib, 1),
        "ratio": args.ratio,
        "omp_num_threads": env_threads,
        "results": results,
        "prunecli_vs_io_wall": pc["wall_s"] / io["wall_s"],
        "prunecli_vs_io_cpu": pc["cpu_s"] / io["cpu_s"],
        "prunecli_peak_over_io_mib": pc["peak_mib"] - io["peak_mib"],
        "prunecli_vs_io_timm_cpu": pc["cpu_s"] / results["io+timm"]["cpu_s"],
        "prunecli_peak_over_io_timm_mib": pc["peak_mib"] - results["io+timm"]["peak_mib"],
        "peak_budget_mib": 0.5 * size_mib,
        **per_round,
        **{f"{k.removesuffix('_per_round')}_median": statistics.median(v) for k, v in per_round.items()},
        "runs": runs,
    }
    summary["prunecli-hf-first-run (cache miss)"] = warm
    for job in ("prunecli-model", "prunecli-hf", "prunecli-hf-nocache", "prunecli-hf-model"):
        if job in results:
            anchor = results[_anchor(job)]
            summary[f"{job}_vs_{_anchor(job)}_wall"] = results[job]["wall_s"] / anchor["wall_s"]
            summary[f"{job}_vs_{_anchor(job)}_cpu"] = results[job]["cpu_s"] / anchor["cpu_s"]
            summary[f"{job}_peak_over_{_anchor(job)}_mib"] = results[job]["peak_mib"] - anchor["peak_mib"]
    hf_mib = (hf / "model.safetensors").stat().st_size / 2**20
    summary["hf_checkpoint_mib"] = round(hf_mib, 1)
    summary["hf_peak_budget_mib"] = 0.5 * hf_mib
    hf_out = args.workdir / "prunecli_hf.safetensors"
    for other in ("prunecli_hf_miss", "prunecli_hf_nocache", "prunecli_hf_model"):
        if (args.workdir / f"{other}.safetensors").exists():
            summary[f"hf_hit_equals_{other.removeprefix('prunecli_hf_')}_bytes"] = _same_bytes(
                hf_out, args.workdir / f"{other}.safetensors"
            )
    if "prunecli-model" in results:
        summary["fast_equals_model_path_bytes"] = _same_bytes(
            args.workdir / "prunecli.safetensors", args.workdir / "prunecli_model.safetensors"
        )
    if "prunecli-hf" in results:
        summary["hf_input_same_weights_as_prunecli_input"] = _same_tensors(
            args.workdir / "prunecli.safetensors", args.workdir / "prunecli_hf.safetensors"
        )
    if "torch" in results:
        summary["torch_vs_prunecli_wall"] = results["torch"]["wall_s"] / pc["wall_s"]
        summary["torch_vs_prunecli_cpu"] = results["torch"]["cpu_s"] / pc["cpu_s"]
        summary["comparison_with_torch"] = _compare(
            src, args.workdir / "prunecli.safetensors", args.workdir / "torch.safetensors"
        )
    print(json.dumps(summary, indent=2))
    if os.environ.get("BENCH_KEEP") != "1":
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
