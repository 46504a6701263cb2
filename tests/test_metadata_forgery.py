"""prunecli's own metadata is input: a forged field is refused by name, and no value changes.

Each case takes a real prunecli checkpoint, rewrites only its ``prunecli`` metadata with the safetensors
library (an independent writer: the tensors are byte-identical), and runs a command on it. The
refusal must be one ``Error:`` line naming the field, exit 1, no output file. The control case (the
same rewrite with the metadata unchanged) must succeed, so the refusals are caused by the forged field
and not by the rewrite; its BatchNorm buffers must equal the input's, bit for bit.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ARCH = "test_resnet"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import timm

    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=10).eval()
    path = tmp_path_factory.mktemp("forge") / "base.safetensors"
    save_checkpoint(path, model, Manifest(ARCH, 10, {}, default_pretrained_cfg(ARCH)))
    return path


def _manifest(path: Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["prunecli"])


def _forge(base: Path, out: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    doc = copy.deepcopy(_manifest(base))
    edit(doc)
    save_file(load_file(str(base)), str(out), metadata={"format": "pt", "prunecli": json.dumps(doc)})
    return out


def _first(doc: dict[str, Any], pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    return next(e for e in doc["layer_table"]["layers"] if pred(e))


def _bn_as_layer(doc: dict[str, Any]) -> None:
    """A BatchNorm buffer listed as a prunable linear weight (same digest: names and shapes are unchanged)."""
    var = next(b for b in doc["layer_table"]["buffers"] if b.endswith("running_var"))
    shape = [len(_TENSORS[var])]
    doc["layer_table"]["layers"].append(
        {"name": var, "kind": "linear", "shape": shape, "head": False, "macs_per_weight": 1}
    )


def _bn_weight_as_conv(doc: dict[str, Any]) -> None:
    w = "bn1.weight"
    doc["layer_table"]["layers"].insert(
        0, {"name": w, "kind": "conv", "shape": [len(_TENSORS[w])], "head": False, "macs_per_weight": 1}
    )


def _linear_kind_on_conv(doc: dict[str, Any]) -> None:
    _first(doc, lambda e: e["kind"] == "conv")["kind"] = "linear"  # a 4-D tensor cannot be a Linear weight


def _head_unmarked(doc: dict[str, Any]) -> None:
    _first(doc, lambda e: e["head"])["head"] = False  # the classifier would be pruned


def _missing_layer(doc: dict[str, Any]) -> None:
    _first(doc, lambda e: True)["name"] = "nowhere.weight"


def _structure_shape(doc: dict[str, Any]) -> None:
    doc["structure"] = {"format": 1, "kind": "channel", "modules": {"conv1.0": {"params": {"weight": [3, 3, 3, 3]}}}}


def _structure_attr(doc: dict[str, Any]) -> None:
    c = list(_TENSORS["conv1.0.weight"].shape)
    entry = {"params": {"weight": c}, "attrs": {"out_channels": c[0] + 7}}
    doc["structure"] = {"format": 1, "kind": "channel", "modules": {"conv1.0": entry}}


def _structure_private_attr(doc: dict[str, Any]) -> None:
    doc["structure"] = {"format": 1, "kind": "channel", "modules": {"conv1.0": {"attrs": {"_forward_hooks": 1}}}}


def _computed(shape: Any, name: str = "filt") -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["structure"] = {"format": 1, "kind": "channel", "modules": {"conv1.0": {"computed": {name: shape}}}}

    return edit


def _masked_buffer(doc: dict[str, Any]) -> None:
    doc["masked"] = [next(b for b in doc["layer_table"]["buffers"] if b.endswith("running_mean"))]


def _masked_missing(doc: dict[str, Any]) -> None:
    doc["masked"] = ["fc.nothing"]


def _masked_bias(doc: dict[str, Any]) -> None:
    doc["masked"] = ["fc.bias"]


def _adapter_escape(doc: dict[str, Any]) -> None:
    doc["layer_table"] = None
    doc["adapters"] = {"format": "peft", "path": "../../elsewhere", "sha256": "0" * 64}


def _adapter_absolute(doc: dict[str, Any]) -> None:
    doc["layer_table"] = None
    doc["adapters"] = {"format": "peft", "path": "/tmp/adapter", "sha256": "0" * 64}


def _adapter_sha(doc: dict[str, Any]) -> None:
    doc["layer_table"] = None
    doc["adapters"] = {"format": "peft", "path": "base.adapter", "sha256": "not-a-digest"}


def _lineage_sha(doc: dict[str, Any]) -> None:
    doc["lineage"] = [{"command": "prune", "input": "dense.safetensors", "input_sha256": ["x"]}]


# case → (edit, the field the one-line error must name)
CASES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "layer table: BatchNorm buffer as a layer": (_bn_as_layer, "layer_table.layers["),
    "layer table: 1-D BatchNorm weight as a conv": (_bn_weight_as_conv, "layer_table.layers[0]"),
    "layer table: kind against shape": (_linear_kind_on_conv, "layer_table.layers["),
    "layer table: head flag against the classifier": (_head_unmarked, "layer_table.layers["),
    "layer table: a name not in the file": (_missing_layer, "layer_table.layers[0]"),
    "structure: shape against the file": (_structure_shape, "structure.modules['conv1.0']"),
    "structure: attribute against the shape": (_structure_attr, "structure.modules['conv1.0']"),
    "structure: a private attribute": (_structure_private_attr, "structure.modules['conv1.0']"),
    "structure: a computed buffer of 2**40 elements": (_computed([1 << 20, 1 << 20]), "structure.modules['conv1.0']"),
    "structure: a computed buffer of negative size": (_computed([-1, 3]), "structure.modules['conv1.0']"),
    "structure: a computed buffer that is a file tensor": (_computed([3], "weight"), "structure.modules['conv1.0']"),
    "structure: a computed buffer's private name": (_computed([3], "_buffers"), "structure.modules['conv1.0']"),
    "masked: a buffer": (_masked_buffer, "'masked'"),
    "masked: a missing tensor": (_masked_missing, "'masked'"),
    "masked: a 1-D tensor": (_masked_bias, "'masked'"),
    "adapters: path outside the folder": (_adapter_escape, "adapters.path"),
    "adapters: absolute path": (_adapter_absolute, "adapters.path"),
    "adapters: digest": (_adapter_sha, "adapters.sha256"),
    "lineage: input digest": (_lineage_sha, "lineage[0].input_sha256"),
    "pretrained_cfg: a list": (lambda doc: doc.update(pretrained_cfg=["classifier"]), "'pretrained_cfg'"),
    "num_classes: a string": (lambda doc: doc.update(num_classes="10"), "'num_classes'"),
}

_TENSORS: dict[str, torch.Tensor] = {}


@pytest.fixture(autouse=True)
def _tensors(base: Path) -> None:
    if not _TENSORS:
        _TENSORS.update(load_file(str(base)))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", ["prune", "inspect"])
def test_forged_field_is_refused_by_name(cli: Any, base: Path, tmp_path: Path, case: str, command: str) -> None:
    edit, field = CASES[case]
    forged = _forge(base, tmp_path / "forged.safetensors", edit)
    before = forged.read_bytes()
    out = tmp_path / "out.safetensors"
    args = {
        "prune": ["prune", forged, "--method", "magnitude", "--ratio", "0.5", "-o", out],
        "inspect": ["inspect", forged, "--layers"],
    }[command]
    result = cli(*args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, result.stderr
    assert lines[0].startswith("Error: ") and field in lines[0] and "prunecli metadata" in lines[0], lines
    assert "Traceback" not in result.stderr and not result.stdout.strip()
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["forged.safetensors"]
    assert forged.read_bytes() == before


@pytest.mark.parametrize("fast", ["1", "0"])
def test_unforged_rewrite_prunes_and_keeps_buffers(
    cli: Any, base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast: str
) -> None:
    """The control: the same rewrite without a forged field passes (fast and model path), and pruning
    changes no BatchNorm buffer or bias — only conv/linear weights lose values."""
    monkeypatch.setenv("PRUNECLI_FAST_PRUNE", fast)
    same = _forge(base, tmp_path / "same.safetensors", lambda doc: None)
    out = tmp_path / "out.safetensors"
    result = cli("prune", same, "--method", "magnitude", "--ratio", "0.5", "-o", out)
    assert result.exit_code == 0, result.stderr
    before, after = load_file(str(same)), load_file(str(out))
    weights = {e["name"] for e in _manifest(base)["layer_table"]["layers"]}
    for name, t in before.items():
        if name in weights:
            kept = after[name] != 0
            assert torch.equal(after[name][kept], t[kept])  # pruning only zeroes
        else:
            assert torch.equal(after[name], t), name  # buffers, biases, norms: bit-identical
    assert any(not torch.equal(after[n], before[n]) for n in weights)  # the run did prune


_EVIL_ARGS = ("checkpoint_path", "pretrained_cfg_overlay", "features_only")


@pytest.mark.parametrize("where", ["folder config.json", "prunecli manifest"])
def test_model_args_loader_options_never_reach_timm(
    cli: Any, base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """``model_args`` naming a checkpoint_path / pretrained_cfg_overlay / pretrained / features_only — in a
    timm folder's config.json or in a prunecli manifest: each ignored with a warning naming it, and
    timm.create_model is called without them (recorded by a wrapper around it)."""
    import prunecli.models as models

    target = tmp_path / "evil.pth"
    torch.save({"x": torch.zeros(1)}, target)
    evil = {"checkpoint_path": str(target), "pretrained_cfg_overlay": {"file": str(target)}, "pretrained": True,
            "features_only": True, "drop_rate": 0.0}  # fmt: skip
    if where == "folder config.json":  # a timm folder without prunecli metadata: config.json is what is read
        ckpt = tmp_path / "model"
        ckpt.mkdir()
        save_file(load_file(str(base)), str(ckpt / "model.safetensors"), metadata={"format": "pt"})
        doc = _manifest(base)
        config = {"architecture": ARCH, "num_classes": 10, "pretrained_cfg": doc["pretrained_cfg"], "model_args": evil}
        (ckpt / "config.json").write_text(json.dumps(config))
    else:
        ckpt = _forge(base, tmp_path / "forged.safetensors", lambda doc: doc.update(model_args=evil))
    calls: list[dict[str, Any]] = []
    real = models.timm.create_model

    def spy(name: str, **kw: Any) -> Any:
        calls.append(kw)
        return real(name, **kw)

    monkeypatch.setattr(models.timm, "create_model", spy)
    result = cli("eval", ckpt, "--data", "synthetic:4")
    assert result.exit_code == 0, result.stderr
    for key in _EVIL_ARGS:
        assert f"'{key}' ignored" in result.stderr, result.stderr
    assert calls and all(not (set(_EVIL_ARGS) & set(kw)) and kw.get("pretrained") is False for kw in calls)
    assert all(kw.get("drop_rate") == 0.0 for kw in calls)  # an architecture argument still passes


def test_filter_model_args_table() -> None:
    from prunecli.checkpoint.validate import filter_model_args

    kept, dropped = filter_model_args(
        {"drop_path_rate": 0.1, "act_layer": "gelu", "checkpoint_path": "x", "global_pool": "/etc/passwd",
         "cache_dir": "c", "img_size": [32, 32], "num_classes": 10},
        where="a",
    )  # fmt: skip
    assert kept == {"drop_path_rate": 0.1, "act_layer": "gelu", "img_size": [32, 32], "num_classes": 10}
    assert len(dropped) == 3 and all(line.startswith("a: model_args '") for line in dropped)


@pytest.mark.parametrize(
    ("config", "says"),
    [([1, 2], "config.json is not a JSON object"), ({"architecture": ARCH, "model_args": [1]}, "'model_args'")],
)
def test_folder_config_of_the_wrong_kind_is_refused(
    cli: Any, base: Path, tmp_path: Path, config: Any, says: str
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(load_file(str(base)), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    result = cli("eval", folder, "--data", "synthetic:2")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and lines[0].startswith("Error: ") and says in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "AttributeError" not in result.stderr  # words, not a class name
