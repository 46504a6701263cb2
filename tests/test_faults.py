"""What a hostile or broken environment does to a run: one row per fault, the same assertions for each.

Every row asserts the exit code, exactly one ``Error:`` line on stderr (a ``Hint:`` line may follow it)
or none for a run that must succeed, no traceback, no temporary (``*.tmp``) or replaced-file backup
(``*.old``) and no partial output left anywhere under the test folder, and every input byte-identical.

How each fault is made (real where the machine allows it):

- full disk: a 64 KiB tmpfs mounted for the row (root); skipped where ``mount`` is refused;
- read-only output folder: a tmpfs mounted read-only (``chmod`` would not do: root ignores mode bits);
- vanishing output folder: the folder is removed after the output checks passed and just before the
  temporary file is created (a wrapper around the writer's last step before it);
- ``--metrics`` on a full disk: ``os.write`` monkeypatched to fail with ENOSPC (in-process: it is the
  call that appends the record; the checkpoint's own writes go through file objects);
- symlinks, ``/dev/zero``, a FIFO and a 1 GiB sparse file with a small lying header are real files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

ARCH = "test_resnet"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import timm

    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=10).eval()
    path = tmp_path_factory.mktemp("faults") / "base.safetensors"
    save_checkpoint(path, model, Manifest(ARCH, 10, {}, default_pretrained_cfg(ARCH)))
    return path


@contextlib.contextmanager
def _tmpfs(where: Path, options: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()[:80]})")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@dataclass
class Case:
    """One row: ``setup(tmp, base, monkeypatch, stack)`` returns the command line and the inputs to keep."""

    setup: Callable[..., tuple[list[Any], list[Path]]]
    code: int
    says: str = ""  # a phrase the Error: line must contain
    outputs: list[str] = field(default_factory=lambda: ["out.safetensors"])  # paths that must not exist after
    check: Callable[[Path], None] | None = None  # further checks on the test folder


def _prune(src: Any, out: Any, *extra: Any) -> list[Any]:
    return ["prune", src, "--method", "magnitude", "--ratio", "0.5", "-o", out, *extra]


def _full_disk(tmp: Path, base: Path, mp: pytest.MonkeyPatch, stack: contextlib.ExitStack) -> Any:
    disk = stack.enter_context(_tmpfs(tmp / "full", "size=64k"))
    return _prune(base, disk / "out.safetensors"), [base]


def _read_only(tmp: Path, base: Path, mp: pytest.MonkeyPatch, stack: contextlib.ExitStack) -> Any:
    disk = stack.enter_context(_tmpfs(tmp / "ro", "ro,size=64k"))
    return _prune(base, disk / "out.safetensors"), [base]


def _vanishing(tmp: Path, base: Path, mp: pytest.MonkeyPatch, stack: contextlib.ExitStack) -> Any:
    import prunecli.checkpoint.writer as writer

    (tmp / "gone").mkdir()
    real = writer._drop_cached_pages

    def vanish(path: Path) -> None:
        shutil.rmtree(path.parent)  # the folder disappears after check_output, before the temporary file
        real(path)

    mp.setattr(writer, "_drop_cached_pages", vanish)
    mp.setenv("PRUNECLI_FAST_PRUNE", "0")  # the model path saves through save_checkpoint
    return _prune(base, tmp / "gone" / "out.safetensors"), [base]


def _symlinked_input(tmp: Path, base: Path, mp: pytest.MonkeyPatch, stack: contextlib.ExitStack) -> Any:
    (tmp / "link.safetensors").symlink_to(base)
    return _prune(tmp / "link.safetensors", tmp / "out.safetensors"), [base, tmp / "link.safetensors"]


def _symlinked_out_dir(tmp: Path, base: Path, mp: pytest.MonkeyPatch, stack: contextlib.ExitStack) -> Any:
    (tmp / "real").mkdir()
    (tmp / "linkdir").symlink_to(tmp / "real")
    return _prune(base, tmp / "linkdir" / "out.safetensors"), [base]


def _out_symlink_to_file(tmp: Path, base: Path, mp: pytest.MonkeyPatch, stack: contextlib.ExitStack) -> Any:
    (tmp / "victim.safetensors").write_text("keep me\n")
    (tmp / "out.safetensors").symlink_to(tmp / "victim.safetensors")
    return _prune(base, tmp / "out.safetensors"), [base, tmp / "victim.safetensors", tmp / "out.safetensors"]


def _dev_zero(tmp: Path, base: Path, mp: pytest.MonkeyPatch, stack: contextlib.ExitStack) -> Any:
    return _prune("/dev/zero", tmp / "out.safetensors"), []


def _fifo(tmp: Path, base: Path, mp: pytest.MonkeyPatch, stack: contextlib.ExitStack) -> Any:
    os.mkfifo(tmp / "pipe.safetensors")
    return _prune(tmp / "pipe.safetensors", tmp / "out.safetensors"), []


def _sparse_liar(tmp: Path, base: Path, mp: pytest.MonkeyPatch, stack: contextlib.ExitStack) -> Any:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path = tmp / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    os.truncate(path, 1 << 30)  # 1 GiB, a hole: the header claims 16 bytes of data
    return ["inspect", path, "--layers"], [path]


def _metrics_no_dir(tmp: Path, base: Path, mp: pytest.MonkeyPatch, stack: contextlib.ExitStack) -> Any:
    return _prune(base, tmp / "out.safetensors", "--metrics", tmp / "nodir" / "m.jsonl"), [base]


def _metrics_is_dir(tmp: Path, base: Path, mp: pytest.MonkeyPatch, stack: contextlib.ExitStack) -> Any:
    (tmp / "m.jsonl").mkdir()
    return _prune(base, tmp / "out.safetensors", "--metrics", tmp / "m.jsonl"), [base]


def _enospc_on_write(mp: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    mp.setattr(os, "write", full)


def _metrics_full(tmp: Path, base: Path, mp: pytest.MonkeyPatch, stack: contextlib.ExitStack) -> Any:
    (tmp / "m.jsonl").write_text('{"earlier": "record"}\n')
    _enospc_on_write(mp)
    return _prune(base, tmp / "out.safetensors", "--metrics", tmp / "m.jsonl"), [base, tmp / "m.jsonl"]


def _metrics_full_force(tmp: Path, base: Path, mp: pytest.MonkeyPatch, stack: contextlib.ExitStack) -> Any:
    (tmp / "out.safetensors").write_bytes(b"the output of an earlier run")
    (tmp / "m.jsonl").write_text("")
    _enospc_on_write(mp)
    cmd = _prune(base, tmp / "out.safetensors", "--force", "--metrics", tmp / "m.jsonl")
    return cmd, [base, tmp / "m.jsonl", tmp / "out.safetensors"]  # the replaced output comes back intact


def _folder_missing_parent(tmp: Path, base: Path, mp: pytest.MonkeyPatch, stack: contextlib.ExitStack) -> Any:
    return _prune(base, f"{tmp}/nodir/out/"), [base]


def _scores_read_only(tmp: Path, base: Path, mp: pytest.MonkeyPatch, stack: contextlib.ExitStack) -> Any:
    disk = stack.enter_context(_tmpfs(tmp / "ro", "ro,size=64k"))
    return ["score", base, "--method", "magnitude", "-o", disk / "s.safetensors"], [base]


def _scores_lacks_method(tmp: Path, base: Path, mp: pytest.MonkeyPatch, stack: contextlib.ExitStack) -> Any:
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.ones(10, 4)}, str(tmp / "s.safetensors"),
              metadata={"prunecli_scores": json.dumps({"granularity": "weight"})})  # fmt: skip
    return ["prune", base, "--scores", tmp / "s.safetensors", "--ratio", "0.5", "-o", tmp / "out.safetensors"], [
        base,
        tmp / "s.safetensors",
    ]


def _stdin_list(tmp: Path, base: Path, mp: pytest.MonkeyPatch, stack: contextlib.ExitStack) -> Any:
    return _prune("-", tmp / "out.safetensors"), [base]


def _corrupt_images(tmp: Path, base: Path, mp: pytest.MonkeyPatch, stack: contextlib.ExitStack) -> Any:
    for c in range(10):  # ten classes, as the checkpoint's head has
        (tmp / "imgs" / f"c{c}").mkdir(parents=True)
        (tmp / "imgs" / f"c{c}" / "x.jpg").write_bytes(b"not a jpeg")
    return ["eval", base, "--data", f"imagefolder:{tmp / 'imgs'}"], [base, tmp / "imgs" / "c0" / "x.jpg"]


def _written(name: str) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        hits = list(tmp.rglob(name))
        assert len(hits) == 1 and hits[0].stat().st_size > 1000, hits

    return check


CASES: dict[str, Case] = {
    "full disk": Case(_full_disk, 1, "No space left on device", ["full/out.safetensors"]),
    "read-only output folder": Case(_read_only, 1, "Read-only file system", ["ro/out.safetensors"]),
    "vanishing output folder": Case(_vanishing, 1, "cannot write", ["gone"]),
    "symlinked input": Case(_symlinked_input, 0, outputs=[], check=_written("out.safetensors")),
    "symlinked output folder": Case(_symlinked_out_dir, 0, outputs=[], check=_written("out.safetensors")),
    "output is a symlink to a file": Case(_out_symlink_to_file, 1, "exists", outputs=[]),
    "/dev/zero as input": Case(_dev_zero, 1, "not a regular file"),
    "FIFO as input": Case(_fifo, 1, "not a regular file"),
    "1 GiB sparse file, lying header": Case(_sparse_liar, 1, "huge.safetensors", outputs=[]),
    "--metrics folder missing": Case(_metrics_no_dir, 1, "--metrics"),
    "--metrics is a folder": Case(_metrics_is_dir, 1, "--metrics"),
    "--metrics on a full disk": Case(_metrics_full, 1, "No space left on device"),
    "--metrics full, --force output": Case(_metrics_full_force, 1, "No space left on device", outputs=[]),
    "-o DIR/ under a missing folder": Case(_folder_missing_parent, 1, "does not exist", ["nodir"]),
    "scores file to a read-only folder": Case(_scores_read_only, 1, "Read-only file system", ["ro/s.safetensors"]),
    "scores file without 'method'": Case(_scores_lacks_method, 1, "no 'method'"),
    "a JSON list on stdin": Case(_stdin_list, 1, "not a prunecli JSON record"),
    "a corrupt image in an imagefolder": Case(_corrupt_images, 1, "not a readable image", outputs=[]),
}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else f"link:{os.readlink(path)}"


@pytest.mark.parametrize("name", list(CASES))
def test_fault(cli: Any, base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    case = CASES[name]
    work = tmp_path / "w"
    work.mkdir()
    with contextlib.ExitStack() as stack:
        args, inputs = case.setup(work, base, monkeypatch, stack)
        before = {p: _digest(p) for p in inputs}
        result = cli(*args, input="[1, 2]\n" if "-" in args else None)
        monkeypatch.undo()  # os.write back before anything below writes
        err = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
        assert result.exit_code == case.code, result.stderr
        assert "Traceback" not in result.stderr
        if case.code == 0:
            assert not [ln for ln in err if ln.startswith("Error:")], err
            assert json.loads(result.stdout.strip().splitlines()[-1])["checkpoint"]
        else:
            assert len(err) in (1, 2) and err[0].startswith("Error: ") and case.says in err[0], err
            assert len(err) == 1 or err[1].startswith("Hint: "), err
            assert not result.stdout.strip()
        leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".old")) or ".tmp" in p.name]
        assert not leftovers, leftovers
        for rel in case.outputs:
            assert not (work / rel).exists(), rel
        assert {p: _digest(p) for p in inputs} == before
        if case.check is not None:
            case.check(work)


def test_describe_names_the_input_problem() -> None:
    """Library exceptions about the input read as words, also when a DataLoader worker re-raised them."""
    from prunecli.cli._output import _describe

    assert _describe(ZeroDivisionError("division by zero")).startswith("the data holds no usable samples")
    wrapped = RuntimeError(
        "Caught UnidentifiedImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        "PIL.UnidentifiedImageError: cannot identify image file <_io.BufferedReader name='/d/c0/x.jpg'>"
    )
    assert _describe(wrapped) == "a file of the data is not a readable image (cannot identify image file '/d/c0/x.jpg')"
    assert _describe(ValueError("something else")) is None  # not an input problem we can name: the generic line
