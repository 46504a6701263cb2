"""The README's headline example ("Pruning your own timm checkpoint") runs as written.

The shell block is taken verbatim from README.md (the first ```sh block of that section) and run with
bash in a temporary directory holding a tiny image folder (as many classes as the block's
``--num-classes``, 2 training and 1 validation image each, 8×8 PNGs; timm's resnet18 resizes them to
its 224 px input). A ``prunecli`` wrapper first on PATH runs the real command and
logs each step's arguments, exit code and stdout record, so that the records of steps that feed a pipe
are checked too. Sparsities are checked against the written tensors, counted here with safetensors.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Pruning your own timm checkpoint"
TRAIN_PER_CLASS, VAL_PER_CLASS = 2, 1

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("readme")]


def readme_block(section: str = SECTION) -> str:
    """The first ```sh block of ``section`` in README.md (up to the next ``## `` heading)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(section + "\n")
    end = text.find("\n## ", start + len(section))
    body = text[start : end if end > 0 else len(text)]
    match = re.search(r"^```sh\n(.*?)^```$", body, flags=re.S | re.M)
    assert match, f"no ```sh block in README section {section!r}"
    return match.group(1)


def write_image_folder(root: Path, classes: int, per_class: int, seed: int) -> None:
    """``root/cK/i.png``: 8×8 RGB images whose mean colour depends on the class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256 - 20 * classes, (8, 8, 3)) + 20 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"c{c:02d}" / f"{i}.png")


def wrapper(bin_dir: Path, log: Path) -> Path:
    """A ``prunecli`` on PATH that runs the venv's and appends {argv, rc, stdout} to ``log``."""
    real = Path(sys.executable).with_name("prunecli")
    script = bin_dir / "prunecli"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f'out=$({shlex.quote(str(real))} "$@"); rc=$?\n'
        '[ -n "$out" ] && printf "%s\\n" "$out"\n'
        f'{shlex.quote(sys.executable)} -c \'import json, sys; print(json.dumps({{"argv": sys.argv[2:], '
        f'"rc": int(sys.argv[1]), "stdout": sys.stdin.read()}}))\' "$rc" "$@" <<<"$out" >> {shlex.quote(str(log))}\n'
        "exit $rc\n"
    )
    script.chmod(0o755)
    return script


def prunable_sparsity(path: Path, exclude: tuple[str, ...] = ("fc.weight",)) -> float:
    """Zero fraction over the conv/linear weights (ndim > 1) of a safetensors file, head excluded."""
    tensors = load_file(str(path))
    ws = [t for n, t in tensors.items() if n.endswith(".weight") and t.ndim > 1 and n not in exclude]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.size for w in ws)


def test_readme_headline_example_runs_as_written(tmp_path: Path) -> None:
    block = readme_block()
    classes = int(re.search(r"--num-classes (\d+)", block).group(1))  # the data the block expects
    write_image_folder(tmp_path / "train", classes, TRAIN_PER_CLASS, seed=0)
    write_image_folder(tmp_path / "val", classes, VAL_PER_CLASS, seed=1)
    (tmp_path / "bin").mkdir()
    log = tmp_path / "steps.jsonl"
    wrapper(tmp_path / "bin", log)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
               f"{os.environ.get('PATH', '')}", PRUNECLI_NO_PROGRESS="1", NO_COLOR="1")  # fmt: skip
    run = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    steps = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert run.returncode == 0, run.stderr[-3000:]
    # every prunecli line of the block ran once, in order, and exited 0 with one JSON record
    expected = [m.group(1) for m in re.finditer(r"prunecli (\S+)", block)]
    assert sorted(s["argv"][0] for s in steps) == sorted(expected)
    records = {}
    for s in steps:
        assert s["rc"] == 0, s
        rec = json.loads(s["stdout"].strip().splitlines()[-1])
        assert rec["schema"] == "prunecli/record-v1" and rec["command"] == s["argv"][0]
        records[rec["command"]] = rec
    assert "score exactly 0" not in run.stderr  # the trained model's Taylor scores are informative

    r18 = Path(records["finetune"]["checkpoint"])
    assert r18 == (tmp_path / "r18").resolve() and (r18 / "model.safetensors").is_file()
    assert (r18 / "config.json").is_file()
    assert records["inspect"]["metrics"]["arch"] == "resnet18"
    assert Path(records["score"]["scores"]).is_file()

    # prune: half of the prunable weights (head excluded), counted in the written file
    pruned = Path(records["prune"]["checkpoint"])
    assert pruned == (tmp_path / "r18-p50.safetensors").resolve()
    assert prunable_sparsity(pruned) == pytest.approx(0.5, abs=1e-6)  # round(R·N) of N ≈ 11 M weights
    assert records["prune"]["metrics"]["target_ratio"] == 0.5
    # finetune-lora read prune's record through the pipe and kept the zeros
    lora = records["finetune-lora"]
    assert lora["input"] == str(pruned)
    assert prunable_sparsity(Path(lora["checkpoint"])) == pytest.approx(0.5, abs=1e-6)
    # eval read finetune-lora's record and compared against the dense parent
    ev = records["eval"]["metrics"]
    assert records["eval"]["input"] == lora["checkpoint"]
    assert ev["samples"] == classes * VAL_PER_CLASS and 0.0 <= ev["top1"] <= 1.0 and 0.0 <= ev["agreement"] <= 1.0


def test_fresh_resnet_scores_warn_and_a_failed_pipe_step_is_named(cli, tmp_path: Path) -> None:
    """What the README example used to do: Taylor scores of a fresh timm resnet18 are almost all 0."""
    write_image_folder(tmp_path / "train", 3, 1, seed=0)
    out = tmp_path / "fresh.scores"
    r = cli("score", "arch:resnet18", "--num-classes", "3", "--method", "taylor", "--data",
            f"imagefolder:{tmp_path / 'train'}", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    # timm zero-initialises bn2 of every BasicBlock: by hand, no gradient reaches conv1/conv2 of any block
    warning = next(line for line in r.stderr.splitlines() if "score exactly 0" in line)
    assert "γ = 0" in warning and "'layer1.0.bn2'" in warning and "(prunecli finetune)" in warning
    # the next step of a pipe whose first step failed points at that failure
    r = cli("eval", "-", "--data", f"imagefolder:{tmp_path / 'train'}", input="")
    assert r.exit_code == 1
    assert "the previous step in the pipe wrote no record (it failed: see its error above)" in r.stderr
