"""Coverage of timm's model zoo by ``prunecli``'s channel pruning, against plain Torch-Pruning.

Two steps (both CPU; run them in the background, they take minutes):

``python benchmarks/zoo_coverage.py select``
    Chooses one architecture per timm model family and writes ``benchmarks/zoo_families.txt``. A family is
    a module of ``timm/models/`` (``timm.list_modules()``). Its representative is the variant with the
    fewest parameters, counted on the ``meta`` device (no allocation), ``test_*`` models excluded (they
    are timm's CI miniatures; the test suite covers them already). The representative must build on CPU
    (random init, ``num_classes=10``) in under 30 s, otherwise the next smallest is tried (up to 3). Its
    input is the smallest square side in 64/96/128/160/224 at which a forward runs — passing
    ``img_size=S`` to the constructor when it takes one (ViTs), else at the default resolution's
    channels — falling back to the default input size.

``python benchmarks/zoo_coverage.py run [--timeout 240]``
    For every listed architecture, in a fresh subprocess per model (with a timeout):
    1. prunecli: ``prune_channels(ratio=0.3)`` (magnitude, layer scope, classifier excluded); forward on
       a fixed input; output shape = the dense one; params drop; save with
       ``prunecli.checkpoint.writer.save_checkpoint`` (manifest.structure = the returned structure) together
       with the input and the pruned model's output;
    2. plain Torch-Pruning, generic recipe on a fresh copy: ``BasePruner(model, x,
       GroupMagnitudeImportance(p=2), pruning_ratio=0.3, ignored_layers=[classifier])``, ``step()``,
       forward, right output shape, params drop. Its only pickle-free way to reload is a state dict
       into a freshly built model, which cannot fit pruned shapes — so only "prune + forward" is scored.
    Then ONE fresh process (which never saw any pruned model) reloads every prunecli checkpoint through
    ``prunecli.checkpoint.loaders.load_checkpoint`` and compares its output to the saved one (max abs diff
    ≤ 1e-5). Writes ``benchmarks/zoo_coverage.jsonl`` (raw) and ``benchmarks/zoo_coverage.md`` (table).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAMILIES = HERE / "zoo_families.txt"
RAW = HERE / "zoo_coverage.jsonl"
TABLE = HERE / "zoo_coverage.md"
SIDES = (64, 96, 128, 160, 224)
RATIO = 0.3
TOL = 1e-5
MEMORY_CAP = 6 << 30  # bytes of address space per worker


class _Timeout(Exception):
    pass


def _alarm(seconds: int) -> None:
    def handler(_sig: int, _frame: object) -> None:
        raise _Timeout(f"timeout after {seconds}s")

    signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{exc.__class__.__name__}: {text[:220]}"


# ------------------------------------------------------------------------------------------------ select


def _meta_params(name: str) -> int | None:
    import timm
    import torch

    try:
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False, num_classes=10)
        return sum(p.numel() for p in m.parameters())
    except Exception:
        return None


def _probe(name: str) -> dict | None:
    """Builds ``name`` on CPU and finds the smallest input it runs at; None when it does not build in 30 s."""
    import timm
    import torch

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    build_s = time.perf_counter() - t0
    if build_s > 30:
        return None
    default = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    params = sum(p.numel() for p in model.parameters())
    for side in SIDES:
        if side >= default[-1]:
            break
        for args in ({"img_size": side}, {}):
            try:
                m = timm.create_model(name, pretrained=False, num_classes=10, **args).eval() if args else model
                with torch.no_grad():
                    out = m(torch.randn(1, default[0], side, side))
                if tuple(out.shape) == (1, 10):
                    return {"model": name, "input_size": [default[0], side, side], "model_args": args,
                            "params": params, "build_s": round(build_s, 2)}  # fmt: skip
            except Exception:
                continue
    return {"model": name, "input_size": list(default), "model_args": {}, "params": params,
            "build_s": round(build_s, 2)}  # fmt: skip


def select() -> None:
    import timm
    import torch

    import prunecli.archs  # noqa: F401  (so that its registrations do not count as a family)

    torch.set_num_threads(1)
    rows, skipped = [], []
    import importlib.util

    for module in timm.list_modules():
        if importlib.util.find_spec(f"timm.models.{module}") is None:
            continue  # registered from outside timm/models/ (prunecli's own improved_cnn/fc_mlp)
        names = timm.list_models(module=module, exclude_filters=["test_*"])
        sized = sorted((p, n) for n in names if (p := _meta_params(n)) is not None)
        if not sized:
            sized = [(0, n) for n in names]
        chosen, why = None, "no variant builds"
        for _, name in sized[:3]:
            try:
                _alarm(90)
                chosen = _probe(name)
                signal.alarm(0)
            except BaseException as exc:
                signal.alarm(0)
                why = _short(exc)
                chosen = None
            if chosen:
                break
            why = why if why != "no variant builds" else f"{name}: build > 30 s"
        if chosen:
            chosen["family"] = module
            rows.append(chosen)
            print(f"{module:28s} {chosen['model']:40s} {chosen['input_size']} {chosen['params']}", flush=True)
        else:
            skipped.append((module, why))
            print(f"{module:28s} SKIPPED {why}", flush=True)
    lines = [
        "# One architecture per timm model family (module of timm/models/), chosen by",
        "# `python benchmarks/zoo_coverage.py select`: the variant with the fewest parameters (meta-device count,",
        "# test_* excluded) that builds on CPU in < 30 s (num_classes=10, random init), at the smallest square",
        "# input in 64/96/128/160/224 that runs (img_size passed when the constructor takes it).",
        f"# timm {timm.__version__}, torch {torch.__version__.split('+')[0]}; {len(rows)} families listed,"
        f" {len(skipped)} skipped.",
        "# family\tmodel\tinput_size\tmodel_args\tparams",
    ]
    for r in rows:
        size = "x".join(map(str, r["input_size"]))
        lines.append(f"{r['family']}\t{r['model']}\t{size}\t{json.dumps(r['model_args'])}\t{r['params']}")
    lines += [f"# skipped {m}: {why}" for m, why in skipped]
    FAMILIES.write_text("\n".join(lines) + "\n")


def read_families(path: Path = FAMILIES) -> list[dict]:
    """Parses ``zoo_families.txt``."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        family, model, size, args, params = line.split("\t")
        rows.append({"family": family, "model": model, "input_size": [int(s) for s in size.split("x")],
                     "model_args": json.loads(args), "params": int(params)})  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------------ run


def _prune_one(row: dict, outdir: Path) -> dict:
    """prunecli channel pruning + save, then plain Torch-Pruning on a fresh model (worker process)."""
    import resource

    import timm
    import torch

    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg
    from prunecli.prunable import classifier_modules
    from prunecli.pruning.channel import prune_channels

    # Torch-Pruning's graph can explode on some windowed-attention models; fail cleanly, not the machine.
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    torch.set_num_threads(1)
    name, args = row["model"], row["model_args"]
    res: dict = {"family": row["family"], "model": name}

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=10, **args).eval()

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *row["input_size"], generator=g)
    # --- prunecli
    try:
        model = fresh()
        before = sum(p.numel() for p in model.parameters())
        t0 = time.perf_counter()
        result = prune_channels(model, example_input=x[:1], ratio=RATIO)
        res["prunecli_s"] = round(time.perf_counter() - t0, 3)
        with torch.no_grad():
            y = model(x)
        after = sum(p.numel() for p in model.parameters())
        res.update(params_before=before, params=after, frozen=result.metrics["frozen"],
                   groups_pruned=result.metrics["groups_pruned"])  # fmt: skip
        if tuple(y.shape) != (2, 10):
            raise AssertionError(f"output shape {tuple(y.shape)}")
        if after >= before:
            raise AssertionError("params did not drop")
        manifest = Manifest(name, 10, dict(args), default_pretrained_cfg(name), structure=result.structure)
        save_checkpoint(outdir / f"{name}.safetensors", model, manifest, force=True)
        from safetensors.torch import save_file

        save_file({"x": x, "y": y.contiguous()}, str(outdir / f"{name}.io.safetensors"))
        res["prunecli_pruned"] = True
    except BaseException as exc:
        res["prunecli_pruned"] = False
        res["prunecli_error"] = _short(exc)
        res["prunecli_trace"] = traceback.format_exc(limit=-3)[-600:]
    # --- plain Torch-Pruning, generic recipe
    try:
        import torch_pruning as tp

        model = fresh()
        before = sum(p.numel() for p in model.parameters())
        ignored = [model.get_submodule(n) for n in classifier_modules(model)]
        t0 = time.perf_counter()
        pruner = tp.pruner.BasePruner(model, x[:1], importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=RATIO, ignored_layers=ignored)  # fmt: skip
        pruner.step()
        res["tp_s"] = round(time.perf_counter() - t0, 3)
        with torch.no_grad():
            y = model(x)
        if tuple(y.shape) != (2, 10):
            raise AssertionError(f"output shape {tuple(y.shape)}")
        if sum(p.numel() for p in model.parameters()) >= before:
            raise AssertionError("params did not drop")
        res["tp_ok"] = True
    except BaseException as exc:
        res["tp_ok"] = False
        res["tp_error"] = _short(exc)
    return res


def _verify(rows: list[dict], outdir: Path) -> dict[str, dict]:
    """Reloads every saved checkpoint through prunecli in this (fresh) process and compares outputs."""
    import torch
    from safetensors.torch import load_file

    from prunecli.checkpoint.loaders import load_checkpoint

    torch.set_num_threads(1)
    out = {}
    for row in rows:
        name = row["model"]
        ckpt = outdir / f"{name}.safetensors"
        if not ckpt.exists():
            continue
        try:
            _alarm(120)
            io = load_file(str(outdir / f"{name}.io.safetensors"))
            model = load_checkpoint(str(ckpt)).model
            with torch.no_grad():
                y = model(io["x"])
            diff = float((y - io["y"]).abs().max())
            scale = float(io["y"].abs().max())
            signal.alarm(0)
            # float32 summation order differs between builds (kernel choice depends on tensor layout), so
            # outputs of magnitude S agree to ~1e-7·S; random-init nets can emit logits of 1e5.
            out[name] = {"reload_diff": diff, "output_max": scale, "reload_ok": diff <= TOL * max(1.0, scale)}
        except BaseException as exc:
            signal.alarm(0)
            out[name] = {"reload_ok": False, "reload_error": _short(exc)}
        print(name, out[name], flush=True)
    return out


def _reason(r: dict) -> str:
    if not r.get("prunecli_pruned"):
        return r.get("prunecli_error", "?")
    if not r.get("reload_ok"):
        return r.get("reload_error") or f"reload max abs diff {r.get('reload_diff'):.2e} > {TOL}·max(1, max|y|)"
    return ""


def write_table(results: list[dict]) -> None:
    """Writes the markdown pass/fail table."""
    n = len(results)
    ok = [r for r in results if r.get("prunecli_pruned") and r.get("reload_ok")]
    tp_ok = [r for r in results if r.get("tp_ok")]
    transformers = [r for r in ok if r.get("attention")]
    lines = [
        "# Channel pruning across timm's model zoo",
        "",
        f"Generated by `python benchmarks/zoo_coverage.py run` (list: `benchmarks/zoo_families.txt`, how it is "
        f"chosen: the script's docstring). Ratio {RATIO}, magnitude (L2 filter norm), layer scope, classifier "
        f"excluded; random init, num_classes=10, CPU.",
        "",
        f"* **prunecli: {len(ok)}/{n} families pass ({100 * len(ok) / max(n, 1):.0f} %)** — prune, forward with "
        f"the right output shape, fewer params, save, reload in a fresh process through `load_checkpoint`, "
        f"max abs output diff ≤ {TOL}·max(1, max|y|) (absolute for outputs up to 1; relative above: float32 "
        f"summation order differs between builds, and some random-init nets emit logits of 1e5).",
        f"* plain Torch-Pruning (generic recipe, `BasePruner` + `GroupMagnitudeImportance`, classifier "
        f"ignored): {len(tp_ok)}/{n} ({100 * len(tp_ok) / max(n, 1):.0f} %) prune and still run with the right "
        f"output shape and fewer params. It has no pickle-free reload (a pruned model does not fit a freshly "
        f"built one's state dict), so by the full criterion it passes 0 %.",
        "* `frozen` lists module classes whose widths prunecli kept after a first attempt broke the forward "
        "(see `prunecli.pruning.channel`, 'Safety net'); those families are pruned elsewhere.",
        "",
        "| family | model | input | params before → after | prunecli | reload diff | frozen | plain TP | reason |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        passed = r.get("prunecli_pruned") and r.get("reload_ok")
        pb, pa = r.get("params_before"), r.get("params")
        params = f"{pb:,} → {pa:,}" if pb and pa else ""
        diff = f"{r['reload_diff']:.1e}" if "reload_diff" in r else ""
        if r.get("output_max", 0) > 1:
            diff += f" (max abs y {r['output_max']:.1e})"
        tp_cell = "ok" if r.get("tp_ok") else f"fail ({r.get('tp_error', '?')[:80]})"
        lines.append(
            f"| {r['family']} | {r['model']} | {'x'.join(map(str, r['input_size'][1:]))} | {params} | "
            f"{'**pass**' if passed else 'FAIL'} | {diff} | {', '.join(r.get('frozen') or [])} | "
            f"{tp_cell.replace('|', '/')} | {_reason(r).replace('|', '/')} |"
        )
    fails = [r for r in results if not (r.get("prunecli_pruned") and r.get("reload_ok"))]
    lines += ["", f"## Failures ({len(fails)})", ""]
    lines += [f"* `{r['model']}` ({r['family']}): {_reason(r)}" for r in fails] or ["none"]
    del transformers
    TABLE.write_text("\n".join(lines) + "\n")


def run(timeout: int, only: list[str] | None) -> None:
    rows = read_families()
    if only:
        rows = [r for r in rows if r["model"] in only or r["family"] in only]
    outdir = Path(os.environ.get("ZOO_OUT", "/tmp/prunecli-zoo"))
    outdir.mkdir(parents=True, exist_ok=True)
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for row in rows:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "_prune", json.dumps(row), str(outdir)],
                capture_output=True, text=True, timeout=timeout, env=env,
            )  # fmt: skip
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            res = json.loads(lines[-1]) if lines else {
                "family": row["family"], "model": row["model"], "prunecli_pruned": False,
                "prunecli_error": f"worker died (rc {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}",
            }  # fmt: skip
        except subprocess.TimeoutExpired:
            res = {"family": row["family"], "model": row["model"], "prunecli_pruned": False,
                   "prunecli_error": f"timeout after {timeout}s"}  # fmt: skip
        res["input_size"] = row["input_size"]
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        results.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "prunecli_trace"}), flush=True)
    proc = subprocess.run(
        [sys.executable, __file__, "_verify", json.dumps(rows), str(outdir)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("VERIFY ")]
    checks = json.loads(lines[-1][7:]) if lines else {}
    if not lines:
        print(proc.stderr[-2000:], file=sys.stderr)
    for r in results:
        r.update(checks.get(r["model"], {}))
    if only and RAW.exists():  # re-run of some models: replace their rows, keep the others
        fresh = {r["model"]: r for r in results}
        old = [json.loads(line) for line in RAW.read_text().splitlines() if line.strip()]
        results = [fresh.pop(r["model"], r) for r in old] + list(fresh.values())
    RAW.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in results))
    write_table(results)
    n_ok = sum(1 for r in results if r.get("prunecli_pruned") and r.get("reload_ok"))
    print(f"prunecli {n_ok}/{len(results)}; plain TP {sum(1 for r in results if r.get('tp_ok'))}/{len(results)}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_prune":
        print(json.dumps(_prune_one(json.loads(sys.argv[2]), Path(sys.argv[3]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_verify":
        print("VERIFY " + json.dumps(_verify(json.loads(sys.argv[2]), Path(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("select", help="choose the architectures; writes zoo_families.txt")
    r = sub.add_parser("run", help="prune/save/reload every listed architecture; writes zoo_coverage.md")
    r.add_argument("--timeout", type=int, default=240, help="seconds per model")
    r.add_argument("--only", nargs="*", help="models or families to run (default: all)")
    r.add_argument("--table-only", action="store_true", help="rewrite zoo_coverage.md from zoo_coverage.jsonl")
    args = ap.parse_args()
    if args.cmd == "select":
        select()
    elif args.table_only:
        write_table([json.loads(line) for line in RAW.read_text().splitlines() if line.strip()])
    else:
        run(args.timeout, args.only)


if __name__ == "__main__":
    main()
