"""The JSON record (docs/records.md) and the terminal conventions: one sorted line on stdout, NaN → null,
exit codes 0/1/2/130, no traceback unless PRUNECLI_DEBUG=1."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from prunecli import __version__
from prunecli.cli._output import run_command
from prunecli.errors import DataError
from prunecli.record import SCHEMA, Result, dumps, jsonable, make_record


def test_jsonable() -> None:
    value = {
        "nan": float("nan"),
        "inf": -math.inf,
        "tuple": (1, 2.5),
        "set": {"b", "a"},
        "path": Path("/x/y"),
        "tensor": torch.tensor([[1.0, 2.0]]),
        "scalar": torch.tensor(3),
        "np": np.float32(0.5),
        "npint": np.int64(7),
        "arr": np.arange(3),
        1: "int key",
        "nested": [{"z": float("nan")}],
    }
    assert jsonable(value) == {
        "nan": None, "inf": None, "tuple": [1, 2.5], "set": ["a", "b"], "path": "/x/y", "tensor": [[1.0, 2.0]],
        "scalar": 3, "np": 0.5, "npint": 7, "arr": [0, 1, 2], "1": "int key", "nested": [{"z": None}],
    }  # fmt: skip


def test_dumps_is_one_sorted_line_without_nan() -> None:
    text = dumps({"b": 1, "a": {"d": float("nan"), "c": [1, 2]}})
    assert text == '{"a":{"c":[1,2],"d":null},"b":1}'
    assert "\n" not in text and "NaN" not in text


def test_make_record_has_the_contract_keys() -> None:
    result = Result(checkpoint="/abs/out.safetensors", sha256="ab" * 32, metrics={"top1": 0.5}, device="cpu",
                    extra={"scores": "/abs/s.scores"})  # fmt: skip
    rec = make_record("prune", "in.safetensors", result, {"ratio": 0.5}, 1.234567)
    assert set(rec) == {"schema", "command", "input", "checkpoint", "sha256", "options", "metrics", "device",
                        "elapsed_s", "version", "scores"}  # fmt: skip
    assert rec["schema"] == SCHEMA == "prunecli/record-v1" and rec["version"] == __version__
    assert rec["elapsed_s"] == 1.2346 and rec["options"] == {"ratio": 0.5}


def _app(work) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def run(quiet: bool = False, metrics: Path | None = None) -> None:
        run_command("demo", work, input="x", options={"quiet": quiet}, metrics_file=metrics, quiet=quiet)

    @app.command()
    def other() -> None:  # a second command keeps Typer in multi-command mode
        pass

    return app


def _invoke(work, *args: str, env: dict | None = None):
    return CliRunner().invoke(_app(work), ["run", *args], env=env or {"PRUNECLI_DEBUG": ""})


def test_run_command_success_prints_one_record(tmp_path: Path) -> None:
    r = _invoke(lambda: Result(metrics={"x": float("nan"), "y": 1}), "--metrics", str(tmp_path / "m.jsonl"))
    assert r.exit_code == 0
    assert len(r.stdout.splitlines()) == 1
    rec = json.loads(r.stdout)
    assert rec["metrics"] == {"x": None, "y": 1} and rec["command"] == "demo" and rec["input"] == "x"
    assert (tmp_path / "m.jsonl").read_text() == r.stdout


def _raise(exc: BaseException):
    def work():
        raise exc

    return work


@pytest.mark.parametrize(
    ("exc", "code", "first"),
    [
        (DataError("bad data", hint="fix it"), 1, "Error: bad data"),
        (ValueError("boom\nsecond line"), 1, "Error: demo failed: ValueError: boom"),
        (MemoryError(), 1, "Error: out of memory"),
        (KeyboardInterrupt(), 130, "Interrupted."),
    ],
)
def test_run_command_maps_errors(exc: BaseException, code: int, first: str, tmp_path: Path) -> None:
    r = _invoke(_raise(exc), "--metrics", str(tmp_path / "m.jsonl"))
    assert r.exit_code == code
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert lines[0] == first and len(lines) <= 2 and "Traceback" not in r.stderr
    assert not (tmp_path / "m.jsonl").exists()


def test_debug_reraises() -> None:
    r = _invoke(_raise(DataError("bad data")), env={"PRUNECLI_DEBUG": "1"})
    assert isinstance(r.exception, DataError)


def test_quiet_keeps_errors() -> None:
    r = _invoke(_raise(DataError("bad data")), "--quiet")
    assert r.exit_code == 1 and r.stderr.startswith("Error: bad data")


def test_version_and_module_entry_point() -> None:
    p = subprocess.run([sys.executable, "-m", "prunecli", "--version"], capture_output=True, text=True, check=False)
    assert p.returncode == 0 and p.stdout.strip() == f"prunecli {__version__}"
    p = subprocess.run([sys.executable, "-m", "prunecli"], capture_output=True, text=True, check=False)
    assert "Usage:" in p.stdout + p.stderr  # no arguments shows the help


def test_broken_pipe_is_quiet(tmp_path: Path) -> None:
    """`prunecli inspect X | head -c0`: no traceback when the reader goes away."""
    from prunecli.checkpoint.safetensors_io import write_safetensors

    write_safetensors(tmp_path / "x.safetensors", {"w": torch.zeros(2)}, {})
    p = subprocess.run(
        f"'{sys.executable}' -m prunecli inspect '{tmp_path / 'x.safetensors'}' | head -c 0",
        shell=True, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr
