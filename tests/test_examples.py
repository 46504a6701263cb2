"""The shell one-liners in examples/ run end to end on a tiny model and the digits data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PRUNECLI_NO_PROGRESS"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def hf_folder(tmp_path):
    """A third-party-style timm folder written by timm.models.save_for_hf (paper E's MLP, digits-sized)."""
    import timm

    import prunecli.archs  # noqa: F401

    model = timm.create_model("fc_mlp", num_classes=10)
    timm.models.save_for_hf(model, str(tmp_path / "mlp"))
    return tmp_path / "mlp"


def test_pipeline_sh(hf_folder, tmp_path):
    out = tmp_path / "pipe"
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "pipeline.sh"), str(hf_folder), "digits:train", "digits:test", str(out)],
        env={**_env(), "EPOCHS": "1", "RATIO": "0.5"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["command"] == "eval" and record["metrics"]["samples"] == 360
    assert Path(record["input"]).resolve() == (out / "recovered.safetensors").resolve()
    assert (out / "taylor.scores").is_file() and (out / "pruned.safetensors").is_file()


def test_loop_sh(hf_folder, tmp_path):
    out = tmp_path / "loop"
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "loop.sh"), str(hf_folder), "digits:train", "digits:test", str(out)],
        env={**_env(), "EPOCHS": "1", "RATIOS": "0.3 0.6"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["command"] for x in lines] == ["prune", "eval", "finetune-lora", "eval"] * 2
    assert "| top-1 \\ ratio |" in proc.stdout  # the report table
