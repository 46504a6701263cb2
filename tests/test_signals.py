"""SIGINT and SIGTERM at any instant of a run: exit 130/143, one line, nothing left — or a finished run.

A real ``prune`` runs in a subprocess (``python -m prunecli``, the console entry's code path) and gets
the signal after k·Δ for a range of k: from before the interpreter has started up, through the
imports of typer, torch and safetensors, the work, the temporary file and the rename, to after the
run ended. Each outcome must be one of:

- exit 0: the run finished first; the output is complete (it loads, and its sha256 is the record's)
  and the record is on stdout;
- exit 130 (SIGINT) / 143 (SIGTERM): exactly one line ("Interrupted." / "Terminated."), nothing on
  stdout, no output and no temporary file;
- the signal came while CPython itself was starting, before the first line of prunecli ran: killed by
  the signal's default action (returncode −signum) or CPython's own start-up KeyboardInterrupt
  ("Could not import runpy module", exit 1), with nothing written and no prunecli frame on stderr.
  prunecli cannot act before its first line; nothing of the run exists yet.

Never a traceback from prunecli, never a partial file. The input stays byte-identical throughout.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from prunecli.checkpoint import transaction

ARCH = "test_resnet"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import timm

    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=10).eval()
    path = tmp_path_factory.mktemp("signals") / "base.safetensors"
    save_checkpoint(path, model, Manifest(ARCH, 10, {}, default_pretrained_cfg(ARCH)))
    return path


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", "PRUNECLI_NO_PROGRESS": "1"}


def _run(base: Path, folder: Path, sig: int | None, delay: float) -> tuple[int, str, str, float]:
    """Runs one prune in ``folder``; sends ``sig`` after ``delay`` s. Returns (returncode, stdout, stderr, wall s)."""
    cmd = [sys.executable, "-m", "prunecli", "prune", str(base), "--method", "magnitude", "--ratio", "0.5",
           "-o", str(folder / "out.safetensors"), "--metrics", str(folder / "m.jsonl")]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), text=True)
    if sig is not None:
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err, time.monotonic() - start


def _check(base: Path, folder: Path, sig: int, rc: int, out: str, err: str) -> str:
    """Asserts the outcome is one of the three allowed (module docstring); returns its class."""
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.endswith((".tmp", ".old"))], names
    if rc == 0:
        record = json.loads(out.strip().splitlines()[-1])
        data = (folder / "out.safetensors").read_bytes()
        assert hashlib.sha256(data).hexdigest() == record["sha256"]
        assert load_file(str(folder / "out.safetensors"))  # complete: the library reads every tensor
        assert json.loads((folder / "m.jsonl").read_text().strip()) == record  # the --metrics line is the record
        assert "Traceback" not in err
        return "finished"
    assert not out.strip() and "out.safetensors" not in names, (names, out)
    assert not (folder / "m.jsonl").exists() or not (folder / "m.jsonl").read_text(), names  # no record appended
    handled = any(ln.strip() == line for _, line in transaction.SIGNALS.values() for ln in err.splitlines())
    own_error = any(ln.startswith("Error: ") for ln in err.splitlines())  # prunecli's one-line errors
    if rc in (-sig, 1) and not handled and not own_error:
        # CPython was still starting (its default action, or its own KeyboardInterrupt while importing
        # runpy/site or the first lines of the prunecli package, before cli/main.py installs the handlers;
        # during `site` it prints "Fatal Python error: init_import_site" and a traceback whose lines may
        # end in "…Error: …"): nothing of the run existed yet, as the checks above assert
        return "CPython start-up"
    code, line = transaction.SIGNALS[sig]
    assert rc == code, (rc, err)
    assert err.strip().splitlines() == [line], err
    return "interrupted"


@pytest.mark.slow
def test_signal_at_any_instant_leaves_nothing_or_a_finished_run(base: Path, tmp_path: Path) -> None:
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    (tmp_path / "probe").mkdir()
    rc, _, err, wall = _run(base, tmp_path / "probe", None, 0.0)  # how long a whole run takes here
    assert rc == 0, err
    # Δ = wall/6 spreads 7 points over the measured run (the last one past its end); three more fall into
    # CPython's start-up and the imports.
    delays = [0.0, 0.02, 0.1] + [wall * k / 6 for k in range(1, 8)]
    jobs = [(i, [signal.SIGINT, signal.SIGTERM][i % 2], d) for i, d in enumerate(delays)]
    for i, *_ in jobs:
        (tmp_path / f"run{i}").mkdir()

    def one(job: tuple[int, int, float]) -> tuple[float, str]:
        i, sig, delay = job
        rc, out, err = _run(base, tmp_path / f"run{i}", sig, delay)[:3]
        return delay, _check(base, tmp_path / f"run{i}", sig, rc, out, err)

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(one, jobs))
    kinds = {kind for _, kind in outcomes}
    assert "interrupted" in kinds, outcomes  # the handlers ran: not every run finished before its signal
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest


@pytest.fixture
def handlers() -> Any:
    """prunecli's handlers installed in this process for one test; the previous ones and state restored."""
    old = {s: signal.getsignal(s) for s in transaction.SIGNALS}
    saved = transaction._state
    transaction._state = transaction._State()
    transaction.install_signal_handlers()
    transaction.resume()
    transaction.begin()
    yield
    transaction._state = saved
    for s, h in old.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_the_temporary_is_created_removes_it(handlers: Any, tmp_path: Path, sig: int) -> None:
    """The signal lands between mkstemp and the registration that removes the file (the window of the
    issue): it is raised only once the file is registered, and the rollback removes it."""

    def make() -> tuple[int, str]:
        made = tempfile.mkstemp(suffix=".tmp", dir=tmp_path)
        os.kill(os.getpid(), sig)  # delivered now; the handler runs at the next bytecode, inside the deferral
        return made

    with pytest.raises(transaction.Interrupted) as info:
        fd, _ = transaction.temporary(make)
        os.close(fd)  # never reached: the signal is raised when temporary() ends its deferral
    assert info.value.exit_code == transaction.SIGNALS[sig][0]
    assert len(list(tmp_path.iterdir())) == 1  # the file exists, and is registered ...
    transaction.rollback()
    assert list(tmp_path.iterdir()) == []  # ... so the rollback removes it


def test_swallowed_signal_still_ends_the_run(handlers: Any, tmp_path: Path) -> None:
    """A SIGINT that library code swallows (a bare except during an import) is raised before the commit,
    and what the run had published is undone, the file it replaced restored."""
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    tmp = transaction.temporary(lambda: tempfile.mkstemp(dir=tmp_path)[1])
    Path(tmp).write_bytes(b"new")
    try:
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(10))  # a few bytecodes for the handler to run in
    except BaseException:  # what a careless library does
        pass
    transaction.publish(tmp, out)
    with pytest.raises(transaction.Interrupted):
        transaction.check()
    transaction.rollback()
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
