"""Writing and reading prunecli checkpoints: round trip, metadata, lineage, determinism, atomicity."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from prunecli.checkpoint.hashing import file_sha256
from prunecli.checkpoint.header import DTYPE_BYTES, read_header
from prunecli.checkpoint.loaders import load_checkpoint
from prunecli.checkpoint.manifest import FORMAT_VERSION, METADATA_KEY, Manifest
from prunecli.checkpoint.writer import check_output, save_checkpoint
from prunecli.errors import CheckpointError, InputError
from prunecli.models import default_pretrained_cfg


def _model(arch: str = "test_resnet", seed: int = 0, **kw) -> torch.nn.Module:
    import prunecli.archs  # noqa: F401

    torch.manual_seed(seed)
    return timm.create_model(arch, num_classes=kw.pop("num_classes", 5), **kw).eval()


def _manifest(model: torch.nn.Module, arch: str = "test_resnet", **kw) -> Manifest:
    return Manifest(arch, model.num_classes, kw, default_pretrained_cfg(arch))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit", "test_efficientnet", "improved_cnn", "fc_mlp"])
def test_round_trip_is_exact(tmp_path: Path, arch: str) -> None:
    model = _model(arch)
    out, sha = save_checkpoint(tmp_path / "m.safetensors", model, _manifest(model, arch))
    assert out == str((tmp_path / "m.safetensors").resolve())
    assert sha == _sha(tmp_path / "m.safetensors")
    loaded = load_checkpoint(out)
    a, b = model.state_dict(), loaded.model.state_dict()
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    size = (loaded.manifest.pretrained_cfg.get("input_size") or (3, 32, 32))[-3:]
    x = torch.randn(2, *size)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    assert loaded.manifest.arch == arch and loaded.sha256 == sha
    assert not any(t.is_meta for t in loaded.model.state_dict().values())


def test_model_args_survive(tmp_path: Path) -> None:
    model = _model("fc_mlp", hidden=(20, 7), bn=True, num_classes=4)
    save_checkpoint(tmp_path / "m.safetensors", model, Manifest("fc_mlp", 4, {"hidden": [20, 7], "bn": True}))
    loaded = load_checkpoint(str(tmp_path / "m.safetensors"))
    assert loaded.model.fc1.out_features == 20 and loaded.model.fc2.out_features == 7
    assert hasattr(loaded.model, "bn1") and loaded.model.head.out_features == 4


def test_metadata_is_in_the_header(tmp_path: Path) -> None:
    """The manifest lives under the header key 'prunecli' (checked with safetensors' own reader)."""
    from safetensors import safe_open

    model = _model()
    manifest = _manifest(model)
    manifest.masked = ["fc.weight", "conv1.0.weight", "fc.weight"]
    save_checkpoint(tmp_path / "m.safetensors", model, manifest)
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
        keys = sorted(fh.keys())
    doc = json.loads(meta[METADATA_KEY])
    assert doc["arch"] == "test_resnet" and doc["num_classes"] == 5 and doc["format"] == FORMAT_VERSION
    assert doc["masked"] == ["conv1.0.weight", "fc.weight"]  # sorted, deduplicated
    assert doc["pretrained_cfg"]["input_size"] == [3, 160, 160]
    assert keys == sorted(model.state_dict())


def test_save_is_deterministic(tmp_path: Path) -> None:
    model = _model()
    for name in ("a.safetensors", "b.safetensors", "c/", "d/"):
        save_checkpoint(f"{tmp_path / name.rstrip('/')}{'/' if name.endswith('/') else ''}", model, _manifest(model))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "c" / f).read_bytes() == (tmp_path / "d" / f).read_bytes()
    # a rebuilt model (different object, same weights) gives the same bytes too
    again = load_checkpoint(str(tmp_path / "a.safetensors"))
    save_checkpoint(tmp_path / "e.safetensors", again.model, again.manifest)
    assert (tmp_path / "e.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()


def test_lineage_step(tmp_path: Path) -> None:
    from prunecli.api._common import save_output

    model = _model()
    save_checkpoint(tmp_path / "base.safetensors", model, _manifest(model))
    loaded = load_checkpoint(str(tmp_path / "base.safetensors"))
    save_output(tmp_path / "p1.safetensors", loaded.model, loaded, command="prune", options={"ratio": 0.5}, force=False)
    p1 = load_checkpoint(str(tmp_path / "p1.safetensors"))
    save_output(tmp_path / "p2.safetensors", p1.model, p1, command="eval", options={}, force=False)
    lineage = load_checkpoint(str(tmp_path / "p2.safetensors")).manifest.lineage
    assert [s["command"] for s in lineage] == ["prune", "eval"]
    assert lineage[0]["options"] == {"ratio": 0.5}
    assert lineage[0]["input"] == str((tmp_path / "base.safetensors").resolve())
    assert lineage[0]["input_sha256"] == _sha(tmp_path / "base.safetensors")
    assert lineage[1]["input_sha256"] == _sha(tmp_path / "p1.safetensors")
    assert lineage[0]["versions"] == {
        "prunecli": __import__("prunecli").__version__,
        "torch": torch.__version__.split("+")[0],
        "timm": timm.__version__,
    }
    assert loaded.manifest.lineage == []  # with_step copies, never mutates the input's manifest


def test_folder_output_loads_in_timm(tmp_path: Path) -> None:
    """-o DIR/ writes a folder that timm.create_model('local-dir:DIR') reads on its own."""
    model = _model("test_vit", num_classes=3)
    out, sha = save_checkpoint(f"{tmp_path / 'vit'}/", model, _manifest(model, "test_vit"))
    assert out == str((tmp_path / "vit").resolve()) and sha == _sha(tmp_path / "vit" / "model.safetensors")
    assert sorted(p.name for p in (tmp_path / "vit").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "vit" / "config.json").read_text())
    assert config["architecture"] == "test_vit" and config["num_classes"] == 3
    theirs = timm.create_model(f"local-dir:{tmp_path / 'vit'}", pretrained=True).eval()
    ours = load_checkpoint(str(tmp_path / "vit"))
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert (theirs(x) - model(x)).abs().max().item() == 0.0
        assert torch.equal(ours.model(x), model(x))


def test_force_overwrites_file_and_folder(tmp_path: Path) -> None:
    a, b = _model(seed=1), _model(seed=2)
    save_checkpoint(tmp_path / "m.safetensors", a, _manifest(a))
    with pytest.raises(InputError, match="exists"):
        save_checkpoint(tmp_path / "m.safetensors", b, _manifest(b))
    save_checkpoint(tmp_path / "m.safetensors", b, _manifest(b), force=True)
    got = load_checkpoint(str(tmp_path / "m.safetensors")).model.state_dict()
    assert torch.equal(got["fc.weight"], b.state_dict()["fc.weight"])
    save_checkpoint(f"{tmp_path / 'f'}/", a, _manifest(a))
    save_checkpoint(f"{tmp_path / 'f'}/", b, _manifest(b), force=True)
    got = load_checkpoint(str(tmp_path / "f")).model.state_dict()
    assert torch.equal(got["fc.weight"], b.state_dict()["fc.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "m.safetensors"]  # no temp leftovers


def test_every_source_kind_has_a_loader() -> None:
    """The loader tables cover every kind resolve_source can return (a new kind without a row would KeyError)."""
    from prunecli.checkpoint.loaders import LOADERS, STATE_LOADERS
    from prunecli.checkpoint.sources import SourceKind

    assert set(LOADERS) == set(SourceKind)
    assert set(STATE_LOADERS) == set(SourceKind) - {SourceKind.ARCH, SourceKind.TIMM}  # these read no file


@pytest.mark.parametrize("folder", [False, True])
def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folder: bool) -> None:
    import prunecli.checkpoint.writer as writer

    model = _model()

    def boom(path, tensors, metadata):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(writer, "write_safetensors", boom)
    out = f"{tmp_path / 'out'}/" if folder else tmp_path / "out.safetensors"
    with pytest.raises(InputError, match=r"cannot write .*disk full"):  # one line naming the output, not an OSError
        save_checkpoint(out, model, _manifest(model))
    assert list(tmp_path.iterdir()) == []


def test_shared_storage_is_saved(tmp_path: Path) -> None:
    """Tied tensors (shared storage) are written as two tensors and reload tied values."""
    model = _model("fc_mlp", hidden=(10, 10), num_classes=10)
    sd = dict(model.state_dict())
    sd["fc2.weight"] = sd["fc1.weight"][:, :10]  # a view into another tensor's storage
    save_checkpoint(tmp_path / "t.safetensors", sd, Manifest("fc_mlp", 10, {"hidden": [10, 10]}))
    back = load_checkpoint(str(tmp_path / "t.safetensors")).model.state_dict()
    assert torch.equal(back["fc2.weight"], sd["fc1.weight"][:, :10])


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool]
)
def test_writer_is_read_by_safetensors(tmp_path: Path, dtype: torch.dtype) -> None:
    """write_safetensors produces files the safetensors library reads back exactly, in every dtype."""
    from safetensors import safe_open

    from prunecli.checkpoint.safetensors_io import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {
        "z": (torch.randn(3, 5, generator=g) * 4).to(dtype),
        "a.scalar": torch.tensor(3).to(dtype),
        "m.empty": torch.zeros(0, 4, dtype=dtype),
        "f32": torch.randn(7, generator=g),
        "u8": torch.arange(5, dtype=torch.uint8),
        "view": torch.arange(20, dtype=torch.float32).reshape(4, 5)[1:3],
    }
    write_safetensors(tmp_path / "w.safetensors", tensors, {"b": "2", "a": "1"})
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"a": "1", "b": "2"}
        for k, v in tensors.items():
            got = fh.get_tensor(k)
            assert got.dtype == v.dtype and torch.equal(got, v), k
    h = read_header(tmp_path / "w.safetensors")
    assert h.data_start % 8 == 0
    assert all(t.begin % int(DTYPE_BYTES[t.dtype]) == 0 for t in h.tensors)  # every tensor aligned


def test_header_matches_safetensors_reader(tmp_path: Path) -> None:
    """read_header agrees with the safetensors library on names, dtypes, shapes and offsets."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    arrays = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.zeros((2, 2, 2), dtype=np.float16),
        "c": np.array([1, 2, 3], dtype=np.int64),
        "d": np.ones((0, 5), dtype=np.float32),
        "e": np.array([True, False]),
    }
    save_file(arrays, str(tmp_path / "x.safetensors"), metadata={"k": "v"})
    h = read_header(tmp_path / "x.safetensors")
    assert h.metadata == {"k": "v"} and h.file_size == (tmp_path / "x.safetensors").stat().st_size
    raw = (tmp_path / "x.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert h.data_start == 8 + n
    with safe_open(str(tmp_path / "x.safetensors"), framework="np") as fh:
        assert sorted(fh.keys()) == sorted(t.name for t in h.tensors)
        for t in h.tensors:
            arr = fh.get_tensor(t.name)
            assert tuple(arr.shape) == t.shape and t.numel == arr.size
            assert np.array_equal(
                np.frombuffer(raw[h.data_start + t.begin : h.data_start + t.end], arr.dtype), arr.ravel()
            )
    assert {t.name: t.dtype for t in h.tensors} == {"a": "F32", "b": "F16", "c": "I64", "d": "F32", "e": "BOOL"}


def test_manifest_json() -> None:
    m = Manifest("test_resnet", 10, {"drop_rate": 0.1}, {"input_size": (3, 8, 8)}, masked=["b", "a"])
    back = Manifest.from_json(m.to_json())
    assert back.arch == "test_resnet" and back.masked == ["a", "b"] and back.pretrained_cfg["input_size"] == [3, 8, 8]
    assert Manifest.from_json(json.dumps({"arch": "x", "from_the_future": 1})).arch == "x"
    with pytest.raises(CheckpointError, match="newer prunecli"):
        Manifest.from_json(json.dumps({"arch": "x", "format": FORMAT_VERSION + 1}))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Manifest.from_json("{")
    with pytest.raises(CheckpointError, match="no 'arch'"):
        Manifest.from_json("{}")
    with pytest.raises(CheckpointError, match="invalid format version"):
        Manifest.from_json(json.dumps({"arch": "x", "format": "one"}))
    step = m.with_step({"command": "x"})
    assert step.lineage == [{"command": "x"}] and m.lineage == []


def test_file_sha256_sees_changes(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"one")
    assert file_sha256(f) == hashlib.sha256(b"one").hexdigest()
    f.write_bytes(b"three")
    assert file_sha256(f) == hashlib.sha256(b"three").hexdigest()


def test_check_output_resolves(tmp_path: Path) -> None:
    assert check_output(tmp_path / "a.safetensors", force=False) == (tmp_path / "a.safetensors").resolve()
    assert check_output(f"{tmp_path / 'dir'}/", force=False) == (tmp_path / "dir").resolve()
