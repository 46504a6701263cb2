"""Shared fixtures: CPU only, offline, tiny models, a CLI runner with separate stdout/stderr."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("PRUNECLI_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PRUNECLI_NO_CACHE", "1")  # tests never write the user's layer-table cache

_REPO = Path(__file__).resolve().parents[1]
_TRACKED = pytest.StashKey[set[str] | None]()


def _changed_tracked_files() -> set[str] | None:
    """``git status`` lines of tracked files that differ from HEAD; None outside a git checkout."""
    import subprocess

    try:
        done = subprocess.run(
            ["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(done.stdout.splitlines()) if done.returncode == 0 else None


def pytest_sessionstart(session: pytest.Session) -> None:
    """Notes which tracked files were already changed (the controller only, not xdist's workers)."""
    if not hasattr(session.config, "workerinput"):
        session.config.stash[_TRACKED] = _changed_tracked_files()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fails the run when a test wrote into the repository: tests write under ``tmp_path`` only.

    A runner that rewrites ``benchmarks/zoo_coverage.md`` as a side effect once did, and the wrong
    table was committed; this check makes that a red run instead.
    """
    before = session.config.stash.get(_TRACKED, None)
    if before is None or hasattr(session.config, "workerinput"):
        return
    written = sorted((_changed_tracked_files() or set()) - before)
    if written:
        print(f"\ntracked files changed while the tests ran (a test wrote into the repository?): {written}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _torch_threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


class Cli:
    """Runs ``prunecli`` in-process; returns (exit code, parsed stdout record or None, stderr)."""

    def __init__(self) -> None:
        from typer.testing import CliRunner

        from prunecli.cli.main import app

        self.app = app
        self.runner = CliRunner()

    def __call__(self, *args: str, input: str | None = None) -> Any:
        result = self.runner.invoke(self.app, [str(a) for a in args], input=input, catch_exceptions=False)
        result.record = None
        if result.exit_code == 0 and result.stdout.strip():
            with contextlib.suppress(json.JSONDecodeError):  # `report` prints a table, not a record
                result.record = json.loads(result.stdout.strip().splitlines()[-1])
        return result


@pytest.fixture
def cli() -> Cli:
    return Cli()


@pytest.fixture
def save_model() -> Callable[..., Path]:
    """Saves a model as a self-describing prunecli checkpoint: save_model(model, path, arch, num_classes)."""

    def save(model: Any, path: Path, arch: str, num_classes: int | None = None, **model_args: Any) -> Path:
        from prunecli.checkpoint.manifest import Manifest
        from prunecli.checkpoint.writer import save_checkpoint
        from prunecli.models import default_pretrained_cfg

        manifest = Manifest(arch, num_classes or getattr(model, "num_classes", None), model_args,
                            default_pretrained_cfg(arch))  # fmt: skip
        save_checkpoint(path, model, manifest, force=True)
        return Path(path)

    return save
