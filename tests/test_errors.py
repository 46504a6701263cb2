"""Bad input fails with exit code 1, one ``Error:`` line (plus an optional ``Hint:``), no traceback, and
leaves nothing behind; usage errors exit 2 (docs/records.md)."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from prunecli.errors import CheckpointError, DataError, InputError, PrunecliError

ARCH = "test_resnet"


def _listing(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def assert_clean_error(r, root: Path | None = None, before: list | None = None, contains: str = "") -> str:
    """Exit 1, stdout empty, stderr = 'Error: …' (+ 'Hint: …'), no traceback, the folder unchanged."""
    assert r.exit_code == 1, (r.exit_code, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert lines and lines[0].startswith("Error: "), r.stderr
    assert len(lines) <= 2 and all(ln.startswith("Hint: ") for ln in lines[1:]), r.stderr
    assert "Traceback" not in r.stderr
    assert contains in lines[0], lines[0]
    if root is not None:
        assert _listing(root) == before, "a failed run changed or left files behind"
    return lines[0]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A valid prunecli checkpoint and a valid bare state dict to corrupt."""
    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    root = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=3).eval()
    save_checkpoint(root / "ok.safetensors", model, Manifest(ARCH, 3, {}, default_pretrained_cfg(ARCH)))
    torch.save(model.state_dict(), root / "bare.pth")
    return {"ckpt": root / "ok.safetensors", "bare": root / "bare.pth", "sd": model.state_dict()}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    return d


def _run(cli, work: Path, *args: str, contains: str = "", command: str = "eval") -> str:
    """Runs a command that must fail cleanly in ``work`` (with --metrics there, which must not appear)."""
    extra = ["--metrics", str(work / "m.jsonl")] if command in ("eval", "inspect") else []
    before = _listing(work)
    r = cli(command, *args, *extra)
    return assert_clean_error(r, work, before, contains)


# --- checkpoints -------------------------------------------------------------------------------------------


def test_missing_path(cli, work: Path) -> None:
    _run(cli, work, str(work / "nope.safetensors"), "--data", "synthetic:2", contains="no such file")
    _run(cli, work, str(work / "nope.safetensors"), command="inspect", contains="no such file")


def test_folder_without_weights(cli, work: Path) -> None:
    (work / "empty_model").mkdir()
    (work / "empty_model" / "config.json").write_text("{}")
    _run(cli, work, str(work / "empty_model"), command="inspect", contains="folder holds no weights")


@pytest.mark.parametrize("keep", [4, 200, -100])
def test_truncated_safetensors(cli, work: Path, good: dict, keep: int) -> None:
    data = good["ckpt"].read_bytes()
    bad = work / "trunc.safetensors"
    bad.write_bytes(data[:keep])  # cut inside the length field, the header, or the tensor data
    for args in ([], ["--data", "synthetic:2"]):
        line = _run(cli, work, str(bad), *args, command="eval" if args else "inspect")
        assert "truncated" in line or "shorter than 8 bytes" in line


def test_header_not_json(cli, work: Path) -> None:
    raw = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'  # cut JSON
    (work / "badjson.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    _run(cli, work, str(work / "badjson.safetensors"), command="inspect", contains="header is not valid JSON")
    raw = b"\xff\xfe not utf8"
    (work / "binary.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    _run(cli, work, str(work / "binary.safetensors"), command="inspect", contains="header is not valid JSON")


def test_header_offsets_past_end(cli, work: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (work / "past.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    _run(cli, work, str(work / "past.safetensors"), command="inspect", contains="ends at byte 16")
    _run(cli, work, str(work / "past.safetensors"), "--arch", ARCH, "--data", "synthetic:2", contains="ends at byte 16")


def test_header_offsets_do_not_fit_shape(cli, work: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (work / "short.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    _run(cli, work, str(work / "short.safetensors"), command="inspect", contains="its shape needs 16")


def test_shape_does_not_fit_architecture(cli, work: Path, good: dict) -> None:
    sd = dict(good["sd"])
    sd["conv1.0.weight"] = torch.zeros(16, 3, 5, 5)
    torch.save(sd, work / "wrongshape.pth")
    line = _run(cli, work, str(work / "wrongshape.pth"), "--arch", ARCH, "--data", "synthetic:2")
    assert "'conv1.0.weight' has shape (16, 3, 5, 5)" in line
    _run(cli, work, str(work / "wrongshape.pth"), "--arch", "test_vit", command="inspect",
         contains="weights do not fit architecture 'test_vit'")  # fmt: skip


class Evil:
    """Unpickling this would run a shell command; weights_only loading must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Custom:
    """A harmless custom class: still not allowlisted."""

    def __init__(self) -> None:
        self.value = 3


@pytest.mark.parametrize("payload", ["evil", "custom"])
def test_pickle_with_non_allowlisted_global(cli, work: Path, good: dict, payload: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    obj = Evil(str(marker)) if payload == "evil" else Custom()
    with (work / "unsafe.pth").open("wb") as fh:
        torch.save({"state_dict": good["sd"], "extra": obj}, fh, pickle_module=pickle)
    line = _run(cli, work, str(work / "unsafe.pth"), "--arch", ARCH, "--data", "synthetic:2",
                contains="refused to unpickle")  # fmt: skip
    assert ("posix.system" in line or "os.system" in line) if payload == "evil" else "Custom" in line
    assert not marker.exists()


def test_not_a_torch_file(cli, work: Path) -> None:
    (work / "junk.pth").write_bytes(b"this is not a checkpoint")
    _run(cli, work, str(work / "junk.pth"), "--arch", ARCH, command="inspect", contains="not a readable torch")


def test_unknown_architecture(cli, work: Path, good: dict) -> None:
    _run(cli, work, str(good["bare"]), "--arch", "no_such_net", command="inspect",
         contains="unknown architecture 'no_such_net'")  # fmt: skip
    _run(cli, work, "arch:no_such_net", command="inspect", contains="unknown architecture 'no_such_net'")
    _run(cli, work, "arch:resnet18.no_such_tag", command="inspect", contains="unknown pretrained tag")


def test_bare_state_dict_without_arch(cli, work: Path, good: dict) -> None:
    _run(cli, work, str(good["bare"]), command="inspect", contains="does not say its architecture")


def test_nan_weights(cli, work: Path, good: dict) -> None:
    sd = {k: v.clone() for k, v in good["sd"].items()}
    sd["fc.weight"][0, 0] = float("nan")
    save_file(sd, str(work / "nan.safetensors"))
    _run(cli, work, str(work / "nan.safetensors"), "--arch", ARCH, "--data", "synthetic:2",
         contains="'fc.weight' holds NaN or infinite values")  # fmt: skip
    sd["fc.weight"][0, 0] = float("inf")
    torch.save(sd, work / "inf.pth")
    _run(cli, work, str(work / "inf.pth"), "--arch", ARCH, "--data", "synthetic:2", contains="NaN or infinite")


# --- data --------------------------------------------------------------------------------------------------


def test_unknown_data_spec(cli, work: Path, good: dict) -> None:
    line = _run(cli, work, str(good["ckpt"]), "--data", "nosuchdata:x", contains="unknown data spec 'nosuchdata:x'")
    assert line


def test_empty_image_folder(cli, work: Path, good: dict) -> None:
    (work / "imgs").mkdir()
    _run(cli, work, str(good["ckpt"]), "--data", f"imagefolder:{work / 'imgs'}", contains="holds no images")
    for c in "abc":
        (work / "imgs" / c).mkdir()
    _run(cli, work, str(good["ckpt"]), "--data", f"imagefolder:{work / 'imgs'}", contains="holds no images")


def test_image_folder_class_count_mismatch(cli, work: Path, good: dict) -> None:
    for c in "ab":
        (work / "imgs" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(work / "imgs" / c / "x.png")
    _run(cli, work, str(good["ckpt"]), "--data", f"imagefolder:{work / 'imgs'}", contains="has 2 classes")


def test_bad_device(cli, work: Path, good: dict) -> None:
    """An invalid option value is a usage error: exit 2, one line, nothing written."""
    before = _listing(work)
    r = cli("eval", str(good["ckpt"]), "--data", "synthetic:2", "--device", "tpu", "--metrics", str(work / "m.jsonl"))
    assert r.exit_code == 2 and r.stdout == "" and _listing(work) == before
    assert r.stderr.strip() == "Error: invalid value for --device: 'tpu' is not auto, cpu, cuda or cuda:N"


# --- outputs -------------------------------------------------------------------------------------------------


def _loaded(path: Path):
    from prunecli.api._common import load_input

    return load_input(str(path))


def test_save_output_refuses_existing_without_force(good: dict, work: Path) -> None:
    from prunecli.api._common import save_output

    loaded = _loaded(good["ckpt"])
    out = work / "out.safetensors"
    out.write_bytes(b"precious")
    before = _listing(work)
    with pytest.raises(InputError, match="exists") as info:
        save_output(out, loaded.model, loaded, command="test", options={}, force=False)
    assert info.value.hint and "--force" in info.value.hint
    assert _listing(work) == before and out.read_bytes() == b"precious"
    path, _ = save_output(out, loaded.model, loaded, command="test", options={}, force=True)
    assert path == str(out.resolve()) and out.read_bytes() != b"precious"
    assert sorted(p.name for p in work.iterdir()) == ["out.safetensors"]  # no temp files left


@pytest.mark.parametrize("force", [False, True])
def test_save_output_refuses_input_as_output(good: dict, work: Path, force: bool) -> None:
    from prunecli.api._common import save_output

    ckpt = work / "in.safetensors"
    ckpt.write_bytes(good["ckpt"].read_bytes())
    loaded = _loaded(ckpt)
    before = _listing(work)
    os.chdir(work)  # a relative spelling of the same file is still the input
    for out in (ckpt, Path("in.safetensors"), Path("./sub/../in.safetensors")):
        with pytest.raises(InputError, match="is the input checkpoint"):
            save_output(out, loaded.model, loaded, command="test", options={}, force=force)
    assert _listing(work) == before


def test_save_checkpoint_folder_input_as_output(good: dict, work: Path) -> None:
    from prunecli.checkpoint.writer import save_checkpoint

    loaded = _loaded(good["ckpt"])
    save_checkpoint(f"{work / 'folder'}/", loaded.model, loaded.manifest)
    folder = _loaded(work / "folder")
    for out in (work / "folder", f"{work / 'folder'}/", work / "folder" / "model.safetensors"):
        with pytest.raises(InputError):
            save_checkpoint(out, folder.model, folder.manifest, force=True,
                            inputs=[folder.source.path, folder.source.weights])  # fmt: skip


@pytest.mark.parametrize("out", ["model.pth", "model", "no_such_dir/m.safetensors"])
def test_check_output_rejects_bad_paths(work: Path, out: str) -> None:
    from prunecli.checkpoint.writer import check_output

    with pytest.raises(InputError):
        check_output(work / out, force=False)


def _writer_args(name: str, ckpt: Path, out: Path) -> list[str] | None:
    """Minimal arguments of each subcommand that writes a checkpoint (if it exists in the tree)."""
    table = {
        "prune": ["prune", str(ckpt), "--method", "magnitude", "--ratio", "0.5", "-o", str(out)],
        "finetune": ["finetune", str(ckpt), "--data", "synthetic:4", "--epochs", "1", "-o", str(out)],
        "finetune-lora": ["finetune-lora", str(ckpt), "--data", "synthetic:4", "--epochs", "1", "-o", str(out)],
        "restore": ["restore", str(ckpt), "--method", "bn", "--data", "synthetic:4", "-o", str(out)],
    }
    return table.get(name)


def _registered(cli) -> set[str]:
    import typer

    return set(typer.main.get_command(cli.app).commands)


@pytest.mark.parametrize("name", ["prune", "finetune", "finetune-lora", "restore"])
def test_cli_writer_refuses_existing_output_and_input(cli, good: dict, work: Path, name: str) -> None:
    if name not in _registered(cli):
        pytest.skip(f"{name} is not in this tree yet")
    ckpt = work / "in.safetensors"
    ckpt.write_bytes(good["ckpt"].read_bytes())
    out = work / "out.safetensors"
    out.write_bytes(b"precious")
    before = _listing(work)
    assert_clean_error(cli(*_writer_args(name, ckpt, out)), work, before, contains="exists")
    assert_clean_error(cli(*_writer_args(name, ckpt, ckpt), "--force"), work, before, contains="is the input")


# --- usage errors and the real process ------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["eval", "x", "--no-such-option"], ["inspect"], ["no-such-command"]])
def test_usage_errors_exit_2(cli, args: list[str]) -> None:
    r = cli(*args)
    assert r.exit_code == 2
    assert r.stdout == ""
    assert "Traceback" not in r.stderr


def test_real_process_error_and_debug(tmp_path: Path) -> None:
    """In a real process: exit 1 and one line without PRUNECLI_DEBUG; the traceback with it."""
    env = {**os.environ, "PRUNECLI_DEBUG": ""}
    cmd = [sys.executable, "-m", "prunecli", "inspect", str(tmp_path / "missing.safetensors")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip() == f"Error: {tmp_path / 'missing.safetensors'}: no such file or directory"
    p = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PRUNECLI_DEBUG": "1"}, check=False)
    assert p.returncode != 0 and "Traceback" in p.stderr and "CheckpointError" in p.stderr


def test_errors_are_one_hierarchy() -> None:
    """Library callers can catch every input error with one except clause."""
    for cls in (CheckpointError, DataError, InputError):
        assert issubclass(cls, PrunecliError)
