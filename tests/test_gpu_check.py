"""``benchmarks/gpu_check.sh``: without CUDA one line and exit 0; ``--device cpu --tiny`` runs every step of the
real check small and prints one well-formed table (checked here against the CLI's own command list)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
ENV = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PRUNECLI_NO_PROGRESS": "1"}


def test_without_cuda_one_line_and_exit_0() -> None:
    done = subprocess.run([str(SCRIPT)], env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check"
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> subprocess.CompletedProcess:
    work = tmp_path_factory.mktemp("gpu_check")
    return subprocess.run([str(SCRIPT), "--device", "cpu", "--tiny", "--workdir", str(work)], env=ENV,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def _rows(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    start = lines.index("| model | precision | step | status | seconds | figure |")
    assert lines[start + 1] == "| --- | --- | --- | --- | --- | --- |"
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        assert line.endswith(" |") and line.count(" | ") == 5, line  # six cells, none holding a bar
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def test_tiny_cpu_run_prints_one_complete_table(tiny) -> None:
    from prunecli.cli.main import COMMANDS

    assert tiny.returncode == 0, tiny.stdout[-3000:] + tiny.stderr[-3000:]
    rows = _rows(tiny.stdout)
    for model, precision, step, status, seconds, figure in rows:
        assert status == "ok", (model, precision, step, figure)
        assert precision in ("-", "fp32", "bf16") and re.fullmatch(r"\d+\.\d", seconds) and figure
    models = {r[0] for r in rows} - {"-"}
    assert models == {"resnet10t", "vit_tiny_patch16_224"}
    steps = {r[2].split()[0] for r in rows}
    assert set(COMMANDS) <= steps | {"torchrun"}, set(COMMANDS) - steps  # every subcommand ran
    for model in models:  # the commands that take --precision ran in both precisions, and said so
        for command in ("eval", "score", "finetune", "finetune-lora"):
            ran = {r[1] for r in rows if r[0] == model and r[2].split()[0] == command}
            assert ran == {"fp32", "bf16"}, (model, command, ran)
        score = {r[1]: r[5] for r in rows if r[0] == model and r[2] == "score taylor"}
        assert score["bf16"].endswith("bf16") and score["fp32"].endswith("fp32")
    torchrun = [r for r in rows if r[2].startswith("torchrun")]
    assert len(torchrun) == 1 and torchrun[0][5].startswith("gloo x2")
    figures = {r[2] for r in rows}
    assert {"score vs bare fwd+bwd", "eval vs timm loader"} <= figures
    last = tiny.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"gpu_check: {len(rows)} ok, 0 failed in \d+ s", last), last
