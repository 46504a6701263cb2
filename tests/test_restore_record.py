"""The restore record lists every pruned group and what each method did to it; the default method follows the data.

Checkpoints are pruned by ``prune --structure channel`` (every group, residual stages too). The set of
pruned producers is computed here from the checkpoint's structure and the dense model's module types,
independently of restoration's graph walk: every one must appear in exactly one group row, and every
row must say, for each method of the chain, ``restored…`` or ``skipped: why``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

ARCHS = {
    "resnet": ("test_resnet", {}),
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from typer.testing import CliRunner

    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.cli.main import app
    from prunecli.models import default_pretrained_cfg

    tmp = tmp_path_factory.mktemp("record")
    paths: dict[str, Path] = {"tmp": tmp}
    for tag, (arch, args) in ARCHS.items():
        torch.manual_seed(0)
        model = timm.create_model(arch, num_classes=3, **args).eval()
        cfg = dict(default_pretrained_cfg(arch), input_size=(3, 32, 32))
        dense = Path(save_checkpoint(tmp / f"{tag}.safetensors", model, Manifest(arch, 3, args, cfg))[0])
        out = tmp / f"{tag}_c30.safetensors"
        prune = ["prune", str(dense), "--method", "l2", "--structure", "channel", "--ratio", "0.3", "-o", str(out)]
        r = CliRunner().invoke(app, prune, catch_exceptions=False)
        assert r.exit_code == 0, r.stderr
        paths[tag], paths[f"{tag}_dense"] = out, dense
    return paths


def _pruned_producers(ckpts: dict[str, Path], tag: str) -> set[str]:
    """Conv/linear layers whose output channels the structure prunes (independent of restoration's code)."""
    from prunecli.checkpoint.loaders import load_checkpoint

    dense = load_checkpoint(str(ckpts[f"{tag}_dense"])).model
    modules = dict(dense.named_modules())
    channels = load_checkpoint(str(ckpts[tag])).manifest.structure["channels"]
    return {
        name
        for name, e in channels.items()
        if "out" in e
        and len(e["out"]["kept"]) < e["out"]["dense"]
        and isinstance(modules.get(name), (torch.nn.Conv2d, torch.nn.Linear))
    }


@pytest.mark.parametrize(("tag", "method"), [("resnet", "lbyl+bn"), ("resnet", "merge"), ("vit", "lbyl")])
def test_record_lists_every_pruned_group(cli, ckpts: dict[str, Path], tag: str, method: str) -> None:
    out = ckpts["tmp"] / f"{tag}_{method}.safetensors"
    r = cli("restore", ckpts[tag], "--method", method, "--data", "synthetic:8", "-o", out, "--force")
    assert r.exit_code == 0, r.stderr
    groups = r.record["metrics"]["groups"]
    listed = [p for g in groups for p in g["producers"]]
    assert len(listed) == len(set(listed))  # each producer in exactly one group
    assert set(listed) == _pruned_producers(ckpts, tag)  # and none missing
    chain = method.split("+")
    for g in groups:
        assert sorted(g["methods"]) == sorted(chain), g  # (the record sorts keys)
        for m, outcome in g["methods"].items():
            assert outcome.startswith(("restored", "skipped: ")) or m == "bn", (g["group"], outcome)
        assert g["restored_by"] == [m for m in chain if g["methods"][m].startswith("restored")]
    if tag == "resnet":
        # four stages, four residual streams, each restored by the compensating method; the last conv of
        # each stage's block writes into its stage's stream (test_resnet: one block per stage)
        streams = [g for g in groups if g["kind"] == "stream"]
        assert len(streams) == 4 and all(chain[0] in g["restored_by"] for g in streams)
        last = {"layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv3", "layer4.0.conv2"}
        assert {p for g in streams for p in g["producers"]} >= last
        shortcuts = {p for p in _pruned_producers(ckpts, tag) if ".downsample." in p}  # the downsample convs
        assert len(shortcuts) == 3 and shortcuts <= {p for g in streams for p in g["producers"]}
    else:
        # a transformer's stream is read through LayerNorms: refused by lbyl, with the reason in the row
        stream = [g for g in groups if "blocks.0.mlp.fc2" in g["producers"]]
        assert len(stream) == 1 and stream[0]["methods"]["lbyl"].startswith("skipped: ")
        assert "LayerNorm" in stream[0]["methods"]["lbyl"]


@pytest.mark.parametrize(
    ("tag", "data", "expected"),
    [("resnet", True, "lstsq+bn"), ("resnet", False, "lbyl"), ("vit", True, "lstsq"), ("vit", False, "lbyl")],
)
def test_default_method_follows_the_data(cli, ckpts: dict[str, Path], tag: str, data: bool, expected: str) -> None:
    """No --method: a data-aware chain with --data (no bn without BatchNorms), lbyl without."""
    out = ckpts["tmp"] / f"{tag}_default_{int(data)}.safetensors"
    extra = ["--data", "synthetic:8"] if data else []
    r = cli("restore", ckpts[tag], *extra, "-o", out, "--force")
    assert r.exit_code == 0, r.stderr
    assert r.record["metrics"]["method"] == expected
    assert all(sorted(g["methods"]) == sorted(expected.split("+")) for g in r.record["metrics"]["groups"])


def test_default_lbyl_counts_as_restored_in_the_lineage(cli, ckpts: dict[str, Path]) -> None:
    """A default (lbyl) restore is recorded with its resolved method, so folding again is refused."""
    out = ckpts["tmp"] / "resnet_default_once.safetensors"
    assert cli("restore", ckpts["resnet"], "-o", out, "--force").exit_code == 0
    again = cli("restore", out, "--method", "lbyl", "-o", ckpts["tmp"] / "twice.safetensors")
    assert again.exit_code == 1 and "already restored" in again.stderr
