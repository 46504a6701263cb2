"""``prunecli inspect``: one JSON record with arch, params, bytes and (with --layers) exact sparsity, read
from the safetensors header without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from prunecli.checkpoint.manifest import Manifest
from prunecli.checkpoint.writer import save_checkpoint
from prunecli.models import default_pretrained_cfg

MODELS = ["test_resnet", "test_vit", "improved_cnn", "fc_mlp"]


def _model(arch: str, **kw) -> torch.nn.Module:
    import prunecli.archs  # noqa: F401

    torch.manual_seed(0)
    return timm.create_model(arch, num_classes=kw.pop("num_classes", 10), **kw).eval()


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", MODELS)
def test_params_equal_model_parameter_count(cli, tmp_path: Path, arch: str) -> None:
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    model = _model(arch)
    save_checkpoint(tmp_path / "p.safetensors", model, Manifest(arch, 10, {}, default_pretrained_cfg(arch)))
    save_file(model.state_dict(), str(tmp_path / "bare.safetensors"))
    save_for_hf(model, str(tmp_path / "hf"), safe_serialization=True)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    cases = {
        "p.safetensors": [],
        "bare.safetensors": ["--arch", arch],
        "hf": [],
        "bare.pth": ["--arch", arch],  # not a header: loads the model
    }
    for name, extra in cases.items():
        r = cli("inspect", str(tmp_path / name), *extra)
        assert r.exit_code == 0, r.stderr
        assert len(r.stdout.strip().splitlines()) == 1  # exactly one JSON record on stdout
        m = r.record["metrics"]
        assert m["params"] == _count(model), name
        assert m["arch"] == arch
        # a bare safetensors header does not say its head width (finding it would need timm)
        assert m["num_classes"] == (None if name == "bare.safetensors" else 10)
        path = tmp_path / name
        size = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
        assert m["bytes"] == size
        assert r.record["command"] == "inspect" and r.record["checkpoint"] is None


def test_layers_sparsity_is_fraction_of_zeros(cli, tmp_path: Path) -> None:
    """Zeros written at known places (including -0.0) are counted exactly, per layer and overall."""
    model = _model("test_resnet")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    known: dict[str, int] = {}
    for name, k in (("fc.weight", 37), ("conv1.0.weight", 100), ("layer1.0.conv1.weight", 1)):
        t = sd[name].view(-1)
        idx = torch.randperm(t.numel(), generator=g)[:k]
        t[idx] = 0.0
        t[idx[: k // 2]] = -0.0  # negative zero is a zero too
        known[name] = k
    sd["fc.bias"][:] = 0.0
    known["fc.bias"] = sd["fc.bias"].numel()
    save_checkpoint(tmp_path / "z.safetensors", sd, Manifest("test_resnet", 10, {}, {}))
    r = cli("inspect", str(tmp_path / "z.safetensors"), "--layers")
    assert r.exit_code == 0, r.stderr
    rows = {row["name"]: row for row in r.record["metrics"]["layers"]}
    params = dict(model.named_parameters())
    assert sorted(rows) == sorted(params)  # parameters only, no BN buffers
    for name, p in params.items():
        expect = known.get(name, 0) + (0 if name in known else int((sd[name] == 0).sum()))
        assert rows[name]["shape"] == list(p.shape)
        assert rows[name]["params"] == p.numel()
        assert rows[name]["sparsity"] == expect / p.numel(), name
    weights = [n for n, p in params.items() if p.ndim > 1]
    zeros = sum(int((sd[n] == 0).sum()) for n in weights)
    assert r.record["metrics"]["sparsity"] == pytest.approx(zeros / sum(sd[n].numel() for n in weights), abs=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_layers_sparsity_other_dtypes(cli, tmp_path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    w = torch.randn(8, 16)
    w[w.abs() < 0.5] = 0.0
    w[0, :3] = -0.0
    save_file({"fc1.weight": w.to(dtype), "fc1.bias": torch.zeros(8, dtype=dtype)}, str(tmp_path / "h.safetensors"))
    r = cli("inspect", str(tmp_path / "h.safetensors"), "--layers")
    assert r.exit_code == 0, r.stderr
    rows = {row["name"]: row for row in r.record["metrics"]["layers"]}
    assert rows["fc1.weight"]["sparsity"] == int((w == 0).sum()) / w.numel()
    assert rows["fc1.bias"]["sparsity"] == 1.0
    assert r.record["metrics"]["params"] == 8 * 16 + 8


def test_layers_from_loaded_model_agree_with_header(cli, tmp_path: Path) -> None:
    """The two inspect paths (header, loaded model) report the same layers for the same weights."""
    model = _model("fc_mlp")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["fc1.weight"][:, :10] = 0
    save_checkpoint(tmp_path / "a.safetensors", sd, Manifest("fc_mlp", 10, {}, {}))
    torch.save(sd, tmp_path / "a.pth")
    a = cli("inspect", str(tmp_path / "a.safetensors"), "--layers").record["metrics"]
    b = cli("inspect", str(tmp_path / "a.pth"), "--arch", "fc_mlp", "--layers").record["metrics"]
    assert a["layers"] == b["layers"] and a["sparsity"] == b["sparsity"] == 10 * 300 / (64 * 300 + 300 * 100 + 1000)
    assert a["params"] == b["params"]


def test_lineage_and_manifest_fields(cli, tmp_path: Path) -> None:
    from prunecli.api._common import load_input, save_output

    model = _model("fc_mlp")
    manifest = Manifest("fc_mlp", 10, {}, default_pretrained_cfg("fc_mlp"), masked=["fc1.weight"])
    save_checkpoint(tmp_path / "a.safetensors", model, manifest)
    loaded = load_input(str(tmp_path / "a.safetensors"))
    save_output(tmp_path / "b.safetensors", loaded.model, loaded, command="prune", options={"ratio": 0.5}, force=False)
    m = cli("inspect", str(tmp_path / "b.safetensors")).record["metrics"]
    assert [s["command"] for s in m["lineage"]] == ["prune"]
    assert m["masked"] == ["fc1.weight"] and m["structured"] is False and m["input_size"] == [1, 8, 8]


INSPECT_WITHOUT_TORCH = r"""
import json, sys
from prunecli.api.inspect import inspect
from prunecli.requests import InspectRequest
r = inspect(InspectRequest(checkpoint=sys.argv[1], layers=True))
from typer.testing import CliRunner
from prunecli.cli.main import app
runner = CliRunner()
assert runner.invoke(app, ["--help"]).exit_code == 0
import typer
for name in sorted(typer.main.get_command(app).commands):
    assert runner.invoke(app, [name, "--help"]).exit_code == 0, name
res = runner.invoke(app, ["inspect", sys.argv[1], "--layers"])
assert res.exit_code == 0, res.output
heavy = sorted(m for m in ("torch", "timm", "torchvision", "safetensors.torch", "huggingface_hub") if m in sys.modules)
print(json.dumps({"params": r.metrics["params"], "heavy": heavy}))
"""


def test_inspect_and_help_do_not_import_torch(tmp_path: Path) -> None:
    """The header path and every command's --help stay torch- and timm-free (checked in a fresh process)."""
    model = _model("test_resnet")
    save_checkpoint(tmp_path / "a.safetensors", model, Manifest("test_resnet", 10, {}, {}))
    p = subprocess.run(
        [sys.executable, "-c", INSPECT_WITHOUT_TORCH, str(tmp_path / "a.safetensors")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert out["params"] == _count(model)


def test_cli_modules_do_not_import_torch_at_import_time() -> None:
    """Every registered command module (and the app) imports without torch: heavy imports live in functions."""
    code = (
        "import sys, prunecli.cli.main as m, typer\n"
        "cmds = sorted(typer.main.get_command(m.app).commands)\n"
        "print(cmds, sorted(x for x in ('torch', 'timm', 'torchvision', 'numpy') if x in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("[]"), p.stdout


def test_cli_modules_import_heavy_modules_only_inside_functions() -> None:
    """Static check of every cli/*.py: no module-level import of torch, timm, numpy or prunecli.api.<cmd>."""
    import ast

    import prunecli.cli

    heavy = ("torch", "timm", "torchvision", "numpy", "safetensors", "peft", "torch_pruning", "sklearn")
    for path in sorted(Path(prunecli.cli.__file__).parent.glob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in heavy, f"{path.name} imports {name} at module level"
                assert not (name.startswith("prunecli.api.") and name != "prunecli.api._common"), (
                    f"{path.name} imports {name} at module level; import it inside the command function"
                )
