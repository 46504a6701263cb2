"""``restore`` on a ViT pruned by ``prune --structure channel``: what it supports is restored, the rest warned.

A channel-pruned ViT's structure lists, besides layers, the parameters pruned with the residual stream
(``cls_token``, ``pos_embed``) and its LayerNorms. Restore must treat those as what they are (not
modules). With ``lbyl`` it restores the MLP hidden units (fc1 → GELU → fc2) and attention's value
dimensions (``qkv`` → ``proj``, per head; approximate, since the pruned q/k dimensions change the
attention weights), and refuses, with one warning per reason in user terms, the residual-stream
producers (attention ``proj``, ``mlp.fc2``, the patch embedding), which only ``lstsq`` refits.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

ARCH, ARGS, CLASSES = "vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, 3
DEPTH = ARGS["depth"]
# Torch-Pruning's node names (``_ElementWiseOp_18(AddBackward0)``) and autograd's must not reach users
INTERNALS = re.compile(r"_\w*Op_\d+|Backward\d")


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    tmp = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=CLASSES, **ARGS).eval()
    cfg = dict(default_pretrained_cfg(ARCH), input_size=(3, ARGS["img_size"], ARGS["img_size"]))
    dense = Path(save_checkpoint(tmp / "dense.safetensors", model, Manifest(ARCH, CLASSES, ARGS, cfg))[0])
    return {"tmp": tmp, "dense": dense}


@pytest.fixture(scope="module")
def pruned(vit: dict[str, Path]) -> Path:
    from typer.testing import CliRunner

    from prunecli.cli.main import app

    out = vit["tmp"] / "c30.safetensors"
    args = ["prune", str(vit["dense"]), "--method", "l2", "--structure", "channel", "--ratio", "0.3", "-o", str(out)]
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    return out


def _channels(path: Path) -> dict:
    from prunecli.checkpoint.loaders import load_checkpoint

    return load_checkpoint(str(path)).manifest.structure["channels"]


@pytest.mark.parametrize("with_dense", [False, True])
def test_restore_channel_pruned_vit(cli, vit: dict[str, Path], pruned: Path, with_dense: bool) -> None:
    channels = _channels(pruned)
    # the case that crashed: the structure names parameters of the residual stream, not modules
    assert {"cls_token", f"blocks.{DEPTH - 1}.mlp.fc1"} <= set(channels)
    out = vit["tmp"] / f"r{int(with_dense)}.safetensors"
    extra = ["--dense", vit["dense"]] if with_dense else []
    # --method lbyl: with --data the default is the data-aware chain (test_restore_record.py)
    r = cli("restore", pruned, *extra, "--method", "lbyl", "--data", "synthetic:8", "-o", out, "--force")
    assert r.exit_code == 0, r.stderr
    m = r.record["metrics"]

    # restored: the MLP hidden units of every block, into that block's fc2, and the value dims into proj
    rows = {row["producer"]: row["consumers"] for row in m["layers"]}
    mlp = {f"blocks.{b}.mlp.fc1": [f"blocks.{b}.mlp.fc2"] for b in range(DEPTH)}
    assert rows == {**mlp, **{f"blocks.{b}.attn.qkv": [f"blocks.{b}.attn.proj"] for b in range(DEPTH)}}
    assert m["restored_layers"] == 2 * DEPTH

    # refused, each named: residual-stream producers; attention's qkv is restored (value dims), not refused
    residual = [f"blocks.{b}.{n}" for b in range(DEPTH) for n in ("attn.proj", "mlp.fc2")]
    assert set(residual) <= set(m["refused"])
    assert all("residual" in m["refused"][n] for n in residual)
    assert not any(f"blocks.{b}.attn.qkv" in m["refused"] for b in range(DEPTH))
    # one warning per reason, naming the layers; no Torch-Pruning or autograd internals anywhere
    warnings = m["warnings"]
    assert any("blocks.0.attn.proj" in w and "residual" in w for w in warnings)
    assert any("blocks.0.attn.qkv" in w and "query/key" in w and "approximate" in w for w in warnings)
    assert any("blocks.0.mlp.fc1" in w and "gelu" in w for w in warnings)
    assert len(warnings) == len(set(warnings)) <= 4
    for text in (*warnings, *m["refused"].values(), r.stderr):
        assert not INTERNALS.search(text), text

    # only the consumers of restored units changed: every fc2 and attention proj weight, nothing else
    before, after = load_file(str(pruned)), load_file(str(out))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"blocks.{b}.{n}.weight" for b in range(DEPTH) for n in ("mlp.fc2", "attn.proj")}


def test_restore_vit_mlp_reconstruction_improves(vit: dict[str, Path], pruned: Path, tmp_path: Path) -> None:
    """By hand: fc2's output of block 0 on the same images, against the dense one at the kept rows."""
    from prunecli.api.restore import restore_model
    from prunecli.checkpoint.loaders import load_checkpoint

    dense = load_checkpoint(str(vit["dense"])).model.eval()
    loaded = load_checkpoint(str(pruned))
    model = loaded.model.eval()
    x = torch.randn(8, 3, ARGS["img_size"], ARGS["img_size"], generator=torch.Generator().manual_seed(1))

    def fc2_out(net: torch.nn.Module) -> torch.Tensor:
        got: dict[str, torch.Tensor] = {}

        def keep(_m: torch.nn.Module, _i: tuple, o: torch.Tensor) -> None:
            got["y"] = o.detach().double()

        h = net.blocks[0].mlp.fc2.register_forward_hook(keep)
        with torch.no_grad():
            net(x)
        h.remove()
        return got["y"]

    kept_rows = loaded.manifest.structure["channels"]["blocks.0.mlp.fc2"]["out"]["kept"]
    ref = fc2_out(dense)[..., kept_rows]
    err_before = float((fc2_out(model) - ref).norm() / ref.norm())
    restore_model(model, dense, loaded.manifest.structure, "lbyl", example_input=x[:1])
    err_after = float((fc2_out(model) - ref).norm() / ref.norm())
    assert err_after < err_before
