"""``prunecli restore`` on timm models and through the CLI: exactness on real architectures, records, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import prunecli.archs  # noqa: F401  (registers improved_cnn)
from prunecli.api.restore import restore_model
from prunecli.requests import PruneRequest
from test_restore_math import entry, slice_model


def _randomise_bns(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=gen) + 0.5
            m.bias.data = torch.randn(c, generator=gen) * 0.2
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def _make_multiple(conv: nn.Conv2d, bn: nn.BatchNorm2d, j: int, i: int, factor: float) -> None:
    """Rewrites channel j so that after BN it is exactly a positive multiple of channel i."""
    with torch.no_grad():
        conv.weight[j] = factor * conv.weight[i]
        sig = torch.sqrt(bn.running_var + bn.eps)
        s_big = factor * bn.weight[j] * sig[i] / (sig[j] * bn.weight[i])
        bn.bias[j] = s_big * (bn.bias[i] - bn.weight[i] * bn.running_mean[i] / sig[i]) + (
            bn.weight[j] * bn.running_mean[j] / sig[j]
        )


def _block_plan(prefix_pairs: list[tuple[str, str, str, int, int]]) -> dict:
    channels: dict = {}
    for producer, norm, consumer, width, pruned in prefix_pairs:
        kept = [k for k in range(width) if k != pruned]
        channels[producer] = {**channels.get(producer, {}), **entry(kept, width)}
        channels[norm] = entry(kept, width)
        channels[consumer] = {**channels.get(consumer, {}), **entry(kept, width, "in")}
    return {"channels": channels}


@pytest.mark.parametrize("method", ["lbyl", "merge"])
def test_timm_resnet_intra_block_channels_restored_exactly(method: str) -> None:
    torch.manual_seed(0)
    dense = timm.create_model("test_resnet", num_classes=10).eval()
    _randomise_bns(dense, 1)
    _make_multiple(dense.layer1[0].conv1, dense.layer1[0].bn1, 5, 1, 2.0)  # basic block conv1 → conv2
    _make_multiple(dense.layer3[0].conv1, dense.layer3[0].bn1, 4, 0, 0.5)  # bottleneck conv1 → conv2
    _make_multiple(dense.layer3[0].conv2, dense.layer3[0].bn2, 7, 2, 1.5)  # bottleneck conv2 → conv3
    plan = _block_plan([
        ("layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2", 32, 5),
        ("layer3.0.conv1", "layer3.0.bn1", "layer3.0.conv2", 48, 4),
        ("layer3.0.conv2", "layer3.0.bn2", "layer3.0.conv3", 48, 7),
    ])  # fmt: skip
    pruned = slice_model(dense, plan["channels"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, plain = dense(x), pruned(x)
    assert (plain - ref).abs().max() > 1e-3
    params = {"lambda1": 0.0, "lambda2": 1e-12} if method == "lbyl" else {}
    report = restore_model(pruned, dense, plan, method, params=params, example_input=x[:1])
    assert sorted(report.layers[method]) == ["layer1.0.conv1", "layer3.0.conv1", "layer3.0.conv2"]
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref, atol=1e-4, rtol=1e-4)


def test_vit_mlp_hidden_unit_restored_with_warning() -> None:
    """A hidden unit duplicating a kept one (same weights and bias) is restored exactly despite GELU.

    mlp_ratio=1 keeps p = 63 kept units below the filter dimension d = 65 (else the solution is not unique).
    """
    torch.manual_seed(0)
    dense = timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8, mlp_ratio=1.0).eval()
    fc1 = dense.blocks[0].mlp.fc1
    with torch.no_grad():
        fc1.weight[10] = fc1.weight[3]
        fc1.bias[10] = fc1.bias[3]
    width = fc1.out_features
    kept = [k for k in range(width) if k != 10]
    plan = {"channels": {"blocks.0.mlp.fc1": entry(kept, width), "blocks.0.mlp.fc2": entry(kept, width, "in")}}
    pruned = slice_model(dense, plan["channels"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    report = restore_model(pruned, dense, plan, "lbyl", params={"lambda2": 1e-12}, example_input=x[:1])
    assert any("gelu" in w for w in report.warnings)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), dense(x), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- CLI, on a checkpoint pruned by `prune`


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from prunecli.api.prune import prune
    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    tmp = tmp_path_factory.mktemp("restore")
    torch.manual_seed(0)
    paths = {}
    for tag, seed in (("base", 1), ("other", 2)):
        model = timm.create_model("improved_cnn", num_classes=10, widths=(8, 16, 16), hidden=32).eval()
        _randomise_bns(model, seed)
        manifest = Manifest("improved_cnn", 10, {"widths": [8, 16, 16], "hidden": 32},
                            default_pretrained_cfg("improved_cnn"))  # fmt: skip
        paths[tag] = Path(save_checkpoint(tmp / f"{tag}.safetensors", model, manifest)[0])
    paths["p50"] = Path(
        prune(
            PruneRequest.build(
                checkpoint=str(paths["base"]),
                output=str(tmp / "p50.safetensors"),
                method="magnitude",
                structure="channel",
                ratio=0.5,
            )
        ).checkpoint
    )
    paths["unstructured"] = Path(
        prune(
            PruneRequest.build(
                checkpoint=str(paths["base"]), output=str(tmp / "u50.safetensors"), method="magnitude", ratio=0.5
            )
        ).checkpoint
    )
    paths["tmp"] = tmp
    return paths


def test_cli_restore_lbyl_record_and_reload(cli, ckpts: dict[str, Path]) -> None:
    from prunecli.checkpoint.hashing import file_sha256
    from prunecli.checkpoint.loaders import load_checkpoint

    out = ckpts["tmp"] / "r.safetensors"
    r = cli("restore", ckpts["p50"], "--method", "lbyl", "--data", "digits:train", "--val", "digits:test",
            "-b", "128", "-o", out, "--force")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    m = r.record["metrics"]
    assert m["method"] == "lbyl" and m["restored_layers"] == 4  # 3 convs + fc1; fc2 is the head
    by_producer = {row["producer"]: row for row in m["layers"]}
    assert by_producer["features.2.conv"]["consumers"] == ["fc1"]  # flatten → linear blocks
    assert all("recon_error" in row and "recon_error_before" in row for row in m["layers"])
    assert "top1" in m and "top1_before" in m
    restored, pruned = load_checkpoint(str(out)), load_checkpoint(str(ckpts["p50"]))
    assert restored.manifest.lineage[-1]["command"] == "restore"
    assert restored.manifest.lineage[-1]["dense_sha256"] == file_sha256(ckpts["base"])
    assert restored.manifest.structure == pruned.manifest.structure
    assert not torch.equal(restored.model.fc1.weight, pruned.model.fc1.weight)
    assert torch.equal(restored.model.features[0].conv.weight, pruned.model.features[0].conv.weight)  # producers
    # restoring the restored checkpoint again would fold the channels twice
    again = cli("restore", out, "--method", "lbyl", "-o", ckpts["tmp"] / "rr.safetensors")
    assert again.exit_code == 1 and "already restored" in again.stderr


@pytest.mark.parametrize("method", ["merge", "lstsq", "bn", "lbyl+bn"])
def test_cli_other_methods_run(cli, ckpts: dict[str, Path], method: str) -> None:
    out = ckpts["tmp"] / f"{method}.safetensors"
    r = cli("restore", ckpts["p50"], "--method", method, "--data", "digits:train", "-p", "samples=128",
            "-o", out, "--force") if method != "merge" else cli("restore", ckpts["p50"], "-m", method, "-o", out,
                                                                "--force")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert r.record["metrics"]["method"] == method


def test_cli_errors(cli, ckpts: dict[str, Path]) -> None:
    out = ckpts["tmp"] / "bad.safetensors"
    cases = [
        (("restore", ckpts["base"], "-o", out), "not channel-pruned"),
        (("restore", ckpts["unstructured"], "-o", out), "not channel-pruned"),
        (("restore", ckpts["p50"], "--dense", ckpts["other"], "-o", out), "sha256"),
        (("restore", ckpts["p50"], "--method", "lstsq", "-o", out), "needs calibration data"),
        (("restore", ckpts["p50"], "--method", "bn", "-o", out), "needs calibration data"),
        (("restore", ckpts["p50"], "-p", "lambda3=1", "-o", out), "unknown -p key 'lambda3'"),
        (("restore", ckpts["p50"], "--method", "magic", "-o", out), "unknown restoration method"),
    ]
    for args, text in cases:
        r = cli(*args)
        assert r.exit_code == 1, (args, r.stdout)
        assert r.stderr.startswith("Error:") and text in r.stderr, (args, r.stderr)
        assert not out.exists()


def test_cli_dense_moved_needs_dense_flag(cli, ckpts: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from prunecli.api.prune import prune

    base = tmp_path / "base.safetensors"
    shutil.copy(ckpts["base"], base)
    p = prune(
        PruneRequest.build(
            checkpoint=str(base),
            output=str(tmp_path / "p.safetensors"),
            method="magnitude",
            structure="channel",
            ratio=0.3,
        )
    )
    base.rename(tmp_path / "moved.safetensors")
    r = cli("restore", p.checkpoint, "-o", tmp_path / "r.safetensors")
    assert r.exit_code == 1 and "--dense" in r.stderr
    r = cli("restore", p.checkpoint, "--dense", tmp_path / "moved.safetensors", "-o", tmp_path / "r.safetensors")
    assert r.exit_code == 0, r.stderr
