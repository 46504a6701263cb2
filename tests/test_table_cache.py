"""The fast path for third-party checkpoints and its layer-table cache (docs/checkpoints.md, "The layer-table cache").

References, none of them the cache's own output: the model path of the same command (forced with
``PRUNECLI_FAST_PRUNE=0``) for the bytes and the metrics; the listing, bytes and mtimes of the cache
folder for what was read and written; a spy on the model loader for whether timm rebuilt the model;
entries edited by hand (their digest recomputed here with hashlib, or not) for the stale and tampered
cases; a fresh interpreter's ``sys.modules`` for "a hit does not import timm".
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from prunecli.requests import ModelSource, PruneRequest

PRUNE = importlib.import_module("prunecli.api.prune")
LOADERS = importlib.import_module("prunecli.checkpoint.loaders")

ARCH = "test_resnet"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """The same random weights as the three third-party kinds: (path, the CKPT flags it needs)."""
    import timm
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("third_party")
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=10).eval()
    save_for_hf(model, str(root / "hf"), safe_serialization=True)
    (root / "hf" / "pytorch_model.bin").unlink(missing_ok=True)
    save_file(model.state_dict(), str(root / "bare.safetensors"))
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}  # a DDP run's names, as train.py saves them
    torch.save({"state_dict": sd, "args": argparse.Namespace(model=ARCH), "epoch": 3}, root / "train.pth.tar")
    return {
        "hf-folder": (root / "hf", {}),
        "train.py": (root / "train.pth.tar", {}),
        "bare": (root / "bare.safetensors", {"source": ModelSource(arch=ARCH, num_classes=10)}),
    }


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """XDG_CACHE_HOME in tmp_path (never the real home); returns the folder entries must appear in."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("PRUNECLI_NO_CACHE", raising=False)
    monkeypatch.setattr(logging.getLogger("prunecli"), "propagate", True)  # the CLI fixture may have cut it
    return tmp_path / "xdg" / "prunecli" / "layer-tables"


class _Spy:
    """Counts model rebuilds: the model path's ``load_input`` and the cache miss's ``load_checkpoint``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.model_path = 0
        self.rebuilt = 0
        real_input, real_load = PRUNE.load_input, LOADERS.load_checkpoint

        def load_input(*a: Any, **k: Any) -> Any:
            self.model_path += 1
            return real_input(*a, **k)

        def load_checkpoint(*a: Any, **k: Any) -> Any:
            self.rebuilt += 1
            return real_load(*a, **k)

        monkeypatch.setattr(PRUNE, "load_input", load_input)
        monkeypatch.setattr(LOADERS, "load_checkpoint", load_checkpoint)


def _prune(src: Path, out: Path | str, *, fast: bool = True, **kw: Any) -> Any:
    """prune() with the fast path allowed (it then decides) or forced off (the model path, the reference)."""
    before = os.environ.get("PRUNECLI_FAST_PRUNE")
    os.environ["PRUNECLI_FAST_PRUNE"] = "1" if fast else "0"
    try:
        return PRUNE.prune(PruneRequest.build(checkpoint=str(src), output=out, **kw))
    finally:
        if before is None:
            del os.environ["PRUNECLI_FAST_PRUNE"]
        else:
            os.environ["PRUNECLI_FAST_PRUNE"] = before


def _listing(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())} if folder.is_dir() else {}


OPTIONS = [
    {"method": "magnitude", "ratio": 0.5, "scope": "global"},
    {"method": "l1", "structure": "2:4", "include_head": True},
]


@pytest.mark.parametrize("kind", ["hf-folder", "train.py", "bare"])
@pytest.mark.parametrize("opts", OPTIONS, ids=["global", "2:4"])
def test_miss_then_hit_write_the_model_paths_bytes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path, sources: dict, kind: str, opts: dict
) -> None:
    src, flags = sources[kind]
    spy = _Spy(monkeypatch)
    slow = _prune(src, tmp_path / "slow.safetensors", fast=False, **opts, **flags)
    assert (spy.model_path, _listing(cache)) == (1, {})  # the model path neither reads nor writes the cache
    miss = _prune(src, tmp_path / "miss.safetensors", **opts, **flags)
    assert (spy.model_path, spy.rebuilt) == (1, 2)  # the miss rebuilt the model once (+1: the model path's own)
    entries = _listing(cache)
    assert [n.split("-")[0] for n in entries] == [ARCH]  # one entry, named after the architecture
    hit = _prune(src, tmp_path / "hit.safetensors", **opts, **flags)
    assert (spy.model_path, spy.rebuilt) == (1, 2)  # the hit rebuilt nothing
    assert _listing(cache) == entries  # and rewrote nothing
    expect = (tmp_path / "slow.safetensors").read_bytes()  # weights, manifest, lineage, layer table
    for name, result in (("miss", miss), ("hit", hit)):
        assert (tmp_path / f"{name}.safetensors").read_bytes() == expect, name
        assert result.metrics == slow.metrics and result.sha256 == slow.sha256 == hashlib.sha256(expect).hexdigest()
    doc = json.loads(next(iter(entries.values()))[1])  # plain JSON, the documented fields
    assert set(doc) == {"format", "key", "default_cfg", "layer_table", "sha256"}
    assert doc["key"]["arch"] == ARCH and doc["layer_table"]["version"] == 1


def test_folder_output_and_scores_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path, sources: dict):
    """A scores file (read, pruned in place, not mapped) and a folder output, from a train.py file."""
    from prunecli.checkpoint.hashing import file_sha256
    from prunecli.scores import ScoresFile, save_scores

    src, _ = sources["train.py"]
    with torch.serialization.safe_globals([argparse.Namespace]):
        sd = torch.load(src, weights_only=True)["state_dict"]
    gen = torch.Generator().manual_seed(1)
    scores = {k.removeprefix("module."): torch.rand(v.shape, generator=gen) for k, v in sd.items() if v.ndim == 4}
    save_scores(tmp_path / "r.scores", ScoresFile("random", "weight", scores, checkpoint_sha256=file_sha256(src)))
    kw = {"scores": tmp_path / "r.scores", "ratio": 0.4, "scope": "global"}
    spy = _Spy(monkeypatch)
    _prune(src, f"{tmp_path / 'slow'}/", fast=False, **kw)
    _prune(src, f"{tmp_path / 'miss'}/", **kw)
    _prune(src, f"{tmp_path / 'hit'}/", **kw)
    assert (spy.model_path, spy.rebuilt) == (1, 2)
    for out in ("miss", "hit"):
        for name in ("model.safetensors", "config.json"):
            assert (tmp_path / out / name).read_bytes() == (tmp_path / "slow" / name).read_bytes(), (out, name)


def _entry(cache: Path) -> Path:
    (path,) = cache.iterdir()
    return path


def _resign(doc: dict[str, Any]) -> str:
    """An edited entry with a digest that matches (computed here: sha256 of the canonical key/cfg/table JSON)."""
    body = {k: doc[k] for k in ("key", "default_cfg", "layer_table")}
    doc["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return json.dumps(doc)


def _edits(doc: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """name → (edited entry text, the warning it must give)."""
    table = json.loads(json.dumps(doc))
    table["layer_table"]["layers"][0]["macs_per_weight"] += 1  # a plausible table, but not this model's
    copied = json.loads(json.dumps(doc))
    copied["key"]["state"] = "0" * 64  # the entry of a state with another structure, copied over this one
    shape = json.loads(json.dumps(doc))
    shape["layer_table"]["layers"][0]["shape"][0] += 1  # a table a checkpoint could not carry
    head = json.loads(json.dumps(doc))
    for row in head["layer_table"]["layers"]:
        row["head"] = not row["head"]  # contradicts pretrained_cfg['classifier']
    return {
        "tampered": (json.dumps(table), "tampered"),
        "truncated": (json.dumps(doc)[:-40], "tampered"),
        "not-json": ("\x80\x81 pickle? no", "tampered"),
        "stale-key": (_resign(copied), "stale"),
        "bad-shape": (_resign(shape), "invalid"),
        "bad-head": (_resign(head), "invalid"),
    }


@pytest.mark.parametrize("edit", ["tampered", "truncated", "not-json", "stale-key", "bad-shape", "bad-head"])
def test_bad_entries_are_rebuilt_never_trusted(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    cache: Path,
    sources: dict,
    caplog: pytest.LogCaptureFixture,
    edit: str,
) -> None:
    src, _ = sources["hf-folder"]
    kw = {"method": "magnitude", "ratio": 0.5}
    slow = _prune(src, tmp_path / "slow.safetensors", fast=False, **kw)
    _prune(src, tmp_path / "miss.safetensors", **kw)
    path = _entry(cache)
    good = path.read_bytes()
    text, why = _edits(json.loads(good))[edit]
    path.write_text(text)
    spy = _Spy(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="prunecli"):
        again = _prune(src, tmp_path / "again.safetensors", **kw)
    assert spy.rebuilt == 1  # the entry was not used: the model was rebuilt
    said = [m for m in caplog.messages if "layer-table cache" in m]
    assert len(said) == 1 and f" is {why} (" in said[0] and said[0].endswith("rebuilt"), said
    assert path.read_bytes() == good  # rewritten as the first miss wrote it
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "slow.safetensors").read_bytes()
    assert again.metrics == slow.metrics  # the edited MAC count never reached the record


def test_entry_without_a_table_sends_the_input_to_the_model_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path, sources: dict
) -> None:
    """An entry may say that no exact table exists (tied weights, no meta trace): no rebuild, the model path."""
    src, _ = sources["hf-folder"]
    kw = {"method": "magnitude", "ratio": 0.5}
    _prune(src, tmp_path / "miss.safetensors", **kw)
    path = _entry(cache)
    doc = json.loads(path.read_text())
    doc["layer_table"] = None
    path.write_text(_resign(doc))
    spy = _Spy(monkeypatch)
    _prune(src, tmp_path / "model.safetensors", **kw)
    assert (spy.model_path, spy.rebuilt) == (1, 1)  # the model path's own load only
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "miss.safetensors").read_bytes()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_no_cache_neither_reads_nor_writes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path, sources: dict, how: str
) -> None:
    src, flags = sources["bare"]
    kw = {"method": "magnitude", "ratio": 0.5, **flags}
    off = {"no_cache": True} if how == "flag" else {}
    if how == "env":
        monkeypatch.setenv("PRUNECLI_NO_CACHE", "1")
    spy = _Spy(monkeypatch)
    _prune(src, tmp_path / "a.safetensors", **kw, **off)
    assert not cache.exists() and spy.rebuilt == 1  # nothing written
    monkeypatch.delenv("PRUNECLI_NO_CACHE", raising=False)
    _prune(src, tmp_path / "b.safetensors", **kw)  # cache on: one entry
    path = _entry(cache)
    path.write_text("tampered")
    before = _listing(cache)
    if how == "env":
        monkeypatch.setenv("PRUNECLI_NO_CACHE", "1")
    _prune(src, tmp_path / "c.safetensors", **kw, **off)
    assert _listing(cache) == before and spy.rebuilt == 3  # neither read (no rebuild of it) nor written
    for name in ("b", "c"):
        assert (tmp_path / f"{name}.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()


def test_no_cache_on_the_command_line(cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sources: dict) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("PRUNECLI_NO_CACHE", raising=False)
    src, _ = sources["hf-folder"]
    r = cli("prune", src, "--method", "magnitude", "--ratio", "0.5", "--no-cache", "-o", tmp_path / "a.safetensors")
    assert r.exit_code == 0, r.stderr
    assert not (tmp_path / "xdg").exists()
    assert "no_cache" not in r.record["options"]  # not an option of the result: the bytes do not depend on it
    r = cli("prune", src, "--method", "magnitude", "--ratio", "0.5", "-o", tmp_path / "b.safetensors")
    assert r.exit_code == 0 and len(list((tmp_path / "xdg" / "prunecli" / "layer-tables").iterdir())) == 1
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_a_cache_dir_that_cannot_be_written_means_no_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sources: dict
) -> None:
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # mkdir fails, for root too
    monkeypatch.delenv("PRUNECLI_NO_CACHE", raising=False)
    src, _ = sources["hf-folder"]
    a = _prune(src, tmp_path / "a.safetensors", method="magnitude", ratio=0.5)
    b = _prune(src, tmp_path / "b.safetensors", method="magnitude", ratio=0.5, fast=False)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert a.metrics == b.metrics and (tmp_path / "file").read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "file"]  # no temp left


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from prunecli.checkpoint.table_cache import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PRUNECLI_NO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/x/y")
    assert cache_dir() == Path("/x/y/prunecli/layer-tables")
    for unset in ("", "relative/dir"):  # the XDG spec: a relative path is ignored
        monkeypatch.setenv("XDG_CACHE_HOME", unset)
        assert cache_dir() == tmp_path / ".cache" / "prunecli" / "layer-tables"
    assert cache_dir(no_cache=True) is None
    monkeypatch.setenv("PRUNECLI_NO_CACHE", "1")
    assert cache_dir() is None


def test_key_follows_what_decides_the_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path):
    """Another head width (num_classes) or input size is another entry; the same model again is not."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    for name, kw in (("a", {"num_classes": 10}), ("b", {"num_classes": 7}), ("c", {"num_classes": 10})):
        save_for_hf(timm.create_model(ARCH, **kw), str(tmp_path / name), safe_serialization=True)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["pretrained_cfg"]["input_size"] = [3, 96, 96]
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    seen = []
    for name in ("a", "b", "c", "a"):
        _prune(tmp_path / name, tmp_path / f"{name}.safetensors", method="magnitude", ratio=0.5, force=True)
        seen.append(len(list(cache.iterdir())))
    assert seen == [1, 2, 3, 3]
    tables = [json.loads(p.read_text())["layer_table"] for p in cache.iterdir()]
    assert sorted(t["input_size"][1] for t in tables) == [96, 160, 160]


def test_a_hit_does_not_import_timm(tmp_path: Path, sources: dict) -> None:
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['prunecli', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('prunecli', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'timm', 'torchvision'}), file=sys.stderr)\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "PRUNECLI_FAST_PRUNE": "1"}
    env.pop("PRUNECLI_NO_CACHE", None)
    src, _ = sources["hf-folder"]
    seen = []
    for run in ("miss", "hit"):
        out = tmp_path / f"{run}.safetensors"
        args = ["prune", str(src), "--method", "magnitude", "--ratio", "0.5", "-o", str(out)]
        cmd = [sys.executable, "-c", probe, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        seen.append(proc.stderr.strip().splitlines()[-1])
    assert seen[0] != "[]" and "timm" in seen[0]  # the miss builds the table through timm
    assert seen[1] == "[]"  # the hit does not
    assert (tmp_path / "miss.safetensors").read_bytes() == (tmp_path / "hit.safetensors").read_bytes()


def test_bad_weights_are_refused_as_the_model_path_refuses_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path, sources: dict
) -> None:
    """NaN weights on a cache hit (an entry of the same structure exists): the model path's error, no output."""
    from safetensors.torch import load_file, save_file

    from prunecli.errors import CheckpointError

    src, flags = sources["bare"]
    _prune(src, tmp_path / "good.safetensors", method="magnitude", ratio=0.5, **flags)  # fills the cache
    entries = _listing(cache)
    sd = load_file(str(src))
    sd["fc.weight"][0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    messages = []
    for fast in (True, False):
        with pytest.raises(CheckpointError, match="NaN or infinite") as err:
            _prune(tmp_path / "nan.safetensors", tmp_path / "o.safetensors", fast=fast, method="magnitude", ratio=0.5,
                   **flags)  # fmt: skip
        messages.append(str(err.value))
    assert messages[0] == messages[1] and not (tmp_path / "o.safetensors").exists()
    assert _listing(cache) == entries  # same structure: the same entry, read and left as it was
