"""Byte-identity check of the CLI's outputs across a refactor.

Runs a fixed pipeline of ``prunecli`` commands in a temporary directory (train a small base model,
score it with three criteria, prune it unstructured / 2:4 / by channels, restore, LoRA-finetune,
evaluate) and records, per command, its JSON record (minus the wall-clock timings ``elapsed_s``,
``train_time_s``, ``restore_s``) and, per file it wrote,
the sha256 of the whole file, the sha256 of every tensor's bytes and the parsed safetensors header
(``__metadata__`` values that hold JSON are parsed too, so differences are reported key by key).

Why: a refactor of the pruning code must not change what is written. Comparing whole-file digests
alone would flag an intended change of the recorded options as "checkpoint differs"; this script
says separately whether every tensor is byte-identical and which header / record keys differ.

Usage::

    python benchmarks/outputs_identity.py --save before.json [--src /path/to/other/checkout/src]
    python benchmarks/outputs_identity.py --compare before.json
    python benchmarks/outputs_identity.py --save b.json --src OLD/src --keep /tmp/b   # then, elsewhere:
    python benchmarks/outputs_identity.py --compare b.json --base /tmp/b   # same base model, later steps compared

``--src DIR`` runs ``PYTHONPATH=DIR python -m prunecli`` (a checkout other than the installed one,
e.g. a ``git worktree`` of an older commit); without it the installed ``prunecli`` of this venv runs.
Total runtime is about two minutes on two CPU cores (everything runs on CPU, one thread).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_VENV_PY = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"

# (name, arguments after `prunecli`, files it writes, extra environment). Order matters: later
# steps read earlier outputs. Every step runs on CPU with one thread, so it is deterministic.
_STEPS: list[tuple[str, list[str], list[str], dict[str, str]]] = [
    ("finetune_base", ["finetune", "arch:improved_cnn", "--num-classes", "10", "--data", "digits:train", "--epochs",
                       "1", "--batch-size", "256", "-o", "base.safetensors", "--seed", "0"], ["base.safetensors"], {}),
    ("score_magnitude", ["score", "base.safetensors", "--method", "magnitude", "-o", "mag.scores"], ["mag.scores"], {}),
    ("score_taylor", ["score", "base.safetensors", "--method", "taylor", "--data", "digits:train", "--batches", "2",
                      "-o", "taylor.scores"], ["taylor.scores"], {}),
    ("score_snip", ["score", "base.safetensors", "--method", "snip", "--data", "digits:train", "--batches", "2",
                    "-o", "snip.scores"], ["snip.scores"], {}),
    ("prune_unstructured_magnitude", ["prune", "base.safetensors", "--method", "magnitude", "--ratio", "0.5",
                                      "-o", "u50.safetensors"], ["u50.safetensors"], {}),
    ("prune_unstructured_magnitude_modelpath", ["prune", "base.safetensors", "--method", "magnitude", "--ratio", "0.5",
                                                "-o", "u50m.safetensors"], ["u50m.safetensors"],
     {"PRUNECLI_FAST_PRUNE": "0"}),
    ("prune_unstructured_taylor_scores", ["prune", "base.safetensors", "--scores", "taylor.scores", "--ratio", "0.6",
                                          "-o", "u60t.safetensors"], ["u60t.safetensors"], {}),
    ("prune_unstructured_snip_method", ["prune", "base.safetensors", "--method", "snip", "--data", "digits:train",
                                        "--batches", "2", "--ratio", "0.4", "--layer-ratio", "conv*=0.2",
                                        "-o", "u40s.safetensors"], ["u40s.safetensors"], {}),
    ("prune_nm_magnitude", ["prune", "base.safetensors", "--method", "magnitude", "--structure", "2:4",
                            "-o", "nm.safetensors"], ["nm.safetensors"], {}),
    ("prune_nm_snip_scores", ["prune", "base.safetensors", "--scores", "snip.scores", "--structure", "2:4",
                              "-o", "nm_snip.safetensors"], ["nm_snip.safetensors"], {}),
    ("prune_channel_taylor_scores", ["prune", "base.safetensors", "--scores", "taylor.scores", "--structure",
                                     "channel", "--ratio", "0.3", "-o", "ch_t.safetensors"], ["ch_t.safetensors"], {}),
    ("prune_channel_magnitude_method", ["prune", "base.safetensors", "--method", "magnitude", "--structure", "channel",
                                        "--ratio", "0.3", "--round-to", "2", "-o", "ch_m.safetensors"],
     ["ch_m.safetensors"], {}),
    ("prune_channel_snip_method_global", ["prune", "base.safetensors", "--method", "snip", "--data", "digits:train",
                                          "--batches", "2", "--structure", "channel", "--ratio", "0.4",
                                          "--restore", "lbyl", "-o", "ch_s.safetensors"], ["ch_s.safetensors"], {}),
    ("restore_lbyl", ["restore", "ch_m.safetensors", "--method", "lbyl", "-o", "r_lbyl.safetensors"],
     ["r_lbyl.safetensors"], {}),
    ("restore_lstsq", ["restore", "ch_t.safetensors", "--method", "lstsq", "--data", "digits:train",
                       "-o", "r_lstsq.safetensors"], ["r_lstsq.safetensors"], {}),
    ("finetune_lora", ["finetune-lora", "u50.safetensors", "--data", "digits:train", "--epochs", "1", "--max-steps",
                       "3", "--batch-size", "64", "-o", "lora.safetensors"], ["lora.safetensors"], {}),
    ("eval", ["eval", "nm.safetensors", "--data", "digits:test"], [], {}),
]  # fmt: skip

# Wall-clock timings differ from run to run; they are dropped from records and lineage alike.
_DROP = {"elapsed_s", "train_time_s", "restore_s"}


def _command(src: str | None) -> list[str]:
    if src:
        return [str(_VENV_PY), "-m", "prunecli"]
    return [str(_VENV_PY.parent / "prunecli")]


def _env(src: str | None, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # PYTHONHASHSEED: set iteration order reaches some JSON metadata (same content, other key order)
    env.update(OMP_NUM_THREADS="1", PRUNECLI_NO_PROGRESS="1", CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0")
    env.pop("PRUNECLI_FAST_PRUNE", None)
    env.update(extra)
    if src:
        env["PYTHONPATH"] = src
    return env


def _scrub(value: Any, tmp: str) -> Any:
    """Replaces the temp dir's path by ``$TMP`` (runs in different dirs must compare equal) and drops elapsed_s."""
    if isinstance(value, dict):
        return {k: _scrub(v, tmp) for k, v in value.items() if k not in _DROP}
    if isinstance(value, list):
        return [_scrub(v, tmp) for v in value]
    if isinstance(value, str):
        return value.replace(tmp, "$TMP")
    return value


def _read_safetensors(path: Path, tmp: str) -> dict[str, Any]:
    """sha256 of the file, of every tensor's bytes, and the header with JSON metadata values parsed."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    meta = header.pop("__metadata__", {}) or {}
    parsed_meta: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            parsed_meta[k] = json.loads(v)
        except (TypeError, ValueError):
            parsed_meta[k] = v
    tensors = {
        name: hashlib.sha256(data[info["data_offsets"][0] : info["data_offsets"][1]]).hexdigest()
        for name, info in sorted(header.items())
    }
    return {
        "sha256": hashlib.sha256(raw).hexdigest(),
        "tensors_sha256": tensors,
        "header": _scrub({"tensors": header, "__metadata__": parsed_meta}, tmp),
    }


def run_all(src: str | None, keep: Path | None = None, base: Path | None = None) -> dict[str, Any]:
    """Runs every step in a fresh temp dir; returns the manifest.

    ``keep``: copy every output file there. ``base``: take ``base.safetensors`` from that directory (a
    ``keep`` of another run) instead of training it, so that a change of training elsewhere does not
    hide what the later steps do with the same input.
    """
    if src:
        check = subprocess.run(
            [*_command(src)[:1], "-c", "import prunecli; print(prunecli.__file__)"],
            env=_env(src, {}),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not Path(check).resolve().is_relative_to(Path(src).resolve()):
            sys.exit(f"Error: PYTHONPATH={src} imports prunecli from {check}")
        print(f"prunecli from {check}", file=sys.stderr)
    manifest: dict[str, Any] = {"src": src, "steps": {}}
    with tempfile.TemporaryDirectory(prefix="prunecli-identity-") as tmp:
        for name, args, outputs, extra in _STEPS:
            t0 = time.perf_counter()
            if base is not None and outputs == ["base.safetensors"]:
                shutil.copyfile(base / "base.safetensors", Path(tmp) / "base.safetensors")
                files = {"base.safetensors": _read_safetensors(Path(tmp) / "base.safetensors", tmp)}
                manifest["steps"][name] = {"args": args, "env": extra, "record": None, "files": files}
                continue
            proc = subprocess.run(
                [*_command(src), *args, "--device", "cpu"],
                cwd=tmp,
                env=_env(src, extra),
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                sys.exit(f"Error: step {name} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
            record = _scrub(json.loads(proc.stdout), tmp)
            files = {f: _read_safetensors(Path(tmp) / f, tmp) for f in outputs}
            manifest["steps"][name] = {"args": args, "env": extra, "record": record, "files": files}
            print(f"{name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for _, _, outputs, _ in _STEPS:
                for f in outputs:
                    shutil.copyfile(Path(tmp) / f, keep / f)
    return manifest


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the keys whose values differ (added/removed keys included)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            path = f"{prefix}.{k}" if prefix else str(k)
            if k not in a:
                out.append(f"{path} (added)")
            elif k not in b:
                out.append(f"{path} (removed)")
            else:
                out += _diff(a[k], b[k], path)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _diff(x, y, f"{prefix}[{i}]")]
    return [] if a == b else [prefix or "(value)"]


def compare(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Prints, per step, whether files are byte-identical and records equal; True when everything is."""
    all_same = True
    tensors_same = True
    for name, old in before["steps"].items():
        new = after["steps"].get(name)
        if new is None:
            print(f"{name}: MISSING in the new run")
            all_same = False
            continue
        lines: list[str] = []
        if new["record"] is None:
            lines.append("  (not run: base.safetensors reused with --base)")
        for f, of in old["files"].items():
            nf = new["files"].get(f)
            if nf is None:
                lines.append(f"  {f}: not written")
                continue
            if of["sha256"] == nf["sha256"]:
                lines.append(f"  {f}: byte-identical")
                continue
            bad = _diff(of["tensors_sha256"], nf["tensors_sha256"])
            tensors_same &= not bad
            lines.append(f"  {f}: file differs; tensors {'IDENTICAL' if not bad else 'DIFFER: ' + ', '.join(bad)}")
            for key in _diff(of["header"], nf["header"]):
                lines.append(f"    header key differs: {key}")
        rec = _diff(old["record"], new["record"]) if new["record"] is not None else []
        lines.append("  record: equal (except timings)" if not rec else "  record keys differ: " + ", ".join(rec))
        same = all("byte-identical" in ln or "equal" in ln or "not run" in ln for ln in lines)
        all_same &= same
        print(f"{name}: {'SAME' if same else 'DIFFERS'}")
        print("\n".join(lines))
    print(f"\nall tensors byte-identical: {tensors_same}; everything identical: {all_same}")
    return all_same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", metavar="FILE", help="write the manifest of this run")
    mode.add_argument("--compare", metavar="FILE", help="rerun and compare with a saved manifest")
    parser.add_argument("--src", help="run prunecli from this src dir (PYTHONPATH) instead of the installed one")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="also copy every output file into DIR")
    parser.add_argument("--base", type=Path, metavar="DIR",
                        help="reuse DIR/base.safetensors (from --keep) instead of training the base model")  # fmt: skip
    args = parser.parse_args()
    manifest = run_all(args.src, args.keep, args.base)
    if args.save:
        Path(args.save).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        print(f"wrote {args.save}", file=sys.stderr)
    else:
        sys.exit(0 if compare(json.loads(Path(args.compare).read_text()), manifest) else 1)


if __name__ == "__main__":
    main()
