"""``prunecli.load_model``: every structure prunecli writes loads back to the logits of the model at write time.

Each expected output comes from a path that does not go through prunecli's loader: the in-memory model
before saving (channel pruning), plain ``torch.nn.utils.prune`` on the dense parent (unstructured), the
raw tensors loaded into a fresh timm model (N:M: dense shapes), and peft's own ``PeftModel.from_pretrained``
(a LoRA adapter kept beside the weights).

Tolerances: a reloaded model runs the same float32 kernels on the same bytes, so logits are compared
exactly (``atol=0``), except where the reference computes differently (noted at the assert).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import prunecli
import prunecli.archs  # registers improved_cnn with timm

pytestmark = pytest.mark.xdist_group("load_model")


def _model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=10).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a mis-sliced BN would show
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _x(n: int = 4, side: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1))


def _save(model: nn.Module, out: str | Path, arch: str, **manifest_fields) -> Path:
    """Saves ``model`` with prunecli's writer; ``out`` ending in '/' writes a folder."""
    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    manifest = Manifest(arch, 10, {}, default_pretrained_cfg(arch), **manifest_fields)
    path, _ = save_checkpoint(out, model, manifest, force=True)
    return Path(path)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def test_import_prunecli_stays_light() -> None:
    code = "import sys, prunecli; prunecli.load_model; prunecli.data_config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_dense_checkpoint_and_folder(tmp_path: Path) -> None:
    model = _model("improved_cnn")
    x = _x()
    want = _logits(model, x)
    for out in (tmp_path / "d.safetensors", f"{tmp_path}/d/"):
        path = _save(model, out, "improved_cnn")
        got = prunecli.load_model(path)
        assert not got.training and got.pretrained_cfg["input_size"] == [3, 32, 32]
        torch.testing.assert_close(_logits(got, x), want, rtol=0, atol=0)
    # A dense folder stays a plain timm folder: timm's own loader reads it, and it says nothing about prunecli.
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert "prunecli" not in config and not (tmp_path / "d" / "README.md").exists()
    via_timm = timm.create_model(f"local-dir:{tmp_path / 'd'}", pretrained=True)
    torch.testing.assert_close(_logits(via_timm, x), want, rtol=0, atol=0)


def test_unstructured_reloads_to_torch_prune_of_the_dense_parent(tmp_path: Path) -> None:
    """Weights zeroed by torch's own l1_unstructured, saved with their masks, reload to the same logits."""
    from torch.nn.utils import prune as tprune

    model = _model("improved_cnn")
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            tprune.l1_unstructured(mod, "weight", amount=0.5)
            tprune.remove(mod, "weight")
    masked = [n for n, p in model.named_parameters() if p.ndim > 1]
    x = _x()
    want = _logits(model, x)
    got = prunecli.load_model(_save(model, tmp_path / "p50.safetensors", "improved_cnn", masked=masked))
    torch.testing.assert_close(_logits(got, x), want, rtol=0, atol=0)
    assert float((got.fc1.weight == 0).float().mean()) == 0.5  # the zeros survived the round trip


def test_nm_reloads_to_the_model_at_write_time(tmp_path: Path) -> None:
    from prunecli.pruning.nm import prune_nm

    model = _model("improved_cnn")
    weights = {n: p.data for n, p in model.named_parameters() if p.ndim > 1}
    prune_nm(weights, None, sorted(weights), 2, 4)
    x = _x()
    want = _logits(model, x)
    got = prunecli.load_model(_save(model, tmp_path / "nm.safetensors", "improved_cnn", masked=sorted(weights)))
    torch.testing.assert_close(_logits(got, x), want, rtol=0, atol=0)
    assert float((got.fc1.weight == 0).float().mean()) == 0.5  # 2 of every 4 kept


@pytest.mark.parametrize(("arch", "side"), [("improved_cnn", 32), ("test_resnet", 64), ("test_vit", 64)])
def test_channel_pruned_file_and_folder_reload_to_the_model_at_write_time(arch: str, side: int, tmp_path: Path):
    from prunecli.pruning.channel import prune_channels

    model = _model(arch)
    x = _x(2, side)
    dense_features = model.num_features
    result = prune_channels(model, example_input=x[:1], ratio=0.5)
    want = _logits(model, x)
    width = model.get_classifier().in_features  # the width the pruned head really reads
    assert width < dense_features
    file = _save(model, tmp_path / "c.safetensors", arch, structure=result.structure)
    folder = _save(model, f"{tmp_path}/c/", arch, structure=result.structure)
    for path in (file, folder):
        got = prunecli.load_model(path)
        # Same modules, same bytes, same kernels; only the ViT's attention may pick another SDPA kernel
        # for the narrower head_dim, so allow float32 rounding of logits of size ~1 there.
        tol = 1e-5 if arch == "test_vit" else 0.0
        torch.testing.assert_close(_logits(got, x), want, rtol=0, atol=tol)
        assert got.num_features == width
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["num_features"] == width  # never the dense width timm's attribute still held
    assert config["prunecli"]["loader"] == "prunecli.load_model"
    readme = (tmp_path / "c" / "README.md").read_text()
    assert "prunecli.load_model" in readme and "channel-pruned" in readme
    with pytest.raises(RuntimeError, match="size mismatch"):  # why the README is needed
        timm.create_model(f"local-dir:{tmp_path / 'c'}", pretrained=True)


def test_with_config_gives_evals_data_config_and_transform(cli, tmp_path: Path) -> None:
    """top-1 and loss from load_model + its transform equal the CLI eval record's."""
    from prunecli.data import _digits

    path = _save(_model("improved_cnn"), tmp_path / "m.safetensors", "improved_cnn")
    loaded = prunecli.load_model(path, with_config=True)
    assert loaded.data_config == prunecli.data_config(loaded.model)
    assert tuple(loaded.data_config["input_size"]) == (3, 32, 32) and loaded.data_config["crop_pct"] == 1.0
    images, labels = _digits()["test"]
    x = torch.stack([loaded.transform(img) for img in images])
    logits = _logits(loaded.model, x)
    y = torch.tensor(labels)
    r = cli("eval", path, "--data", "digits:test", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    m = r.record["metrics"]
    assert m["top1"] == int((logits.argmax(1) == y).sum()) / len(y)
    # eval sums per-batch float32 losses in float64; one batch here: relative float32 rounding only.
    assert m["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)


def test_lora_kept_beside_matches_peft_from_pretrained(cli, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    model = _model("improved_cnn")
    with torch.no_grad():
        model.fc1.weight[model.fc1.weight.abs() < model.fc1.weight.abs().median()] = 0.0
    pruned = _save(model, tmp_path / "p.safetensors", "improved_cnn", masked=["fc1.weight"])
    out = tmp_path / "l.safetensors"
    r = cli("finetune-lora", pruned, "--merge", "none", "--max-steps", "2", "--lr", "1e-2",
            "--device", "cpu", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    user = timm.create_model("improved_cnn", num_classes=10)
    user.load_state_dict(load_file(str(out)))
    user = PeftModel.from_pretrained(user, str(tmp_path / "l.adapter")).eval()
    x = _x()
    want = _logits(user, x)
    plain = timm.create_model("improved_cnn", num_classes=10)
    plain.load_state_dict(load_file(str(out)))
    assert not torch.allclose(want, _logits(plain, x))  # the adapter changes the logits: the check bites
    torch.testing.assert_close(_logits(prunecli.load_model(out), x), want, rtol=0, atol=0)


def test_bad_path_is_a_checkpoint_error(tmp_path: Path) -> None:
    from prunecli.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no such file"):
        prunecli.load_model(tmp_path / "missing.safetensors")
