"""A fast subset of the zoo coverage (benchmarks/zoo_coverage.py): 22 timm architectures, 7 of them
transformers or hybrids, channel-pruned at 30 %, saved, reloaded through prunecli, compared.

The reference for "reloads correctly" is the pruned model in memory: the checkpoint is rebuilt from
the architecture name and ``manifest.structure`` only (no pickle), so equal outputs show that the
structure captured every shape and attribute the forward needs.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch

from prunecli.checkpoint.loaders import load_checkpoint
from prunecli.checkpoint.manifest import Manifest
from prunecli.checkpoint.writer import save_checkpoint
from prunecli.models import default_pretrained_cfg
from prunecli.pruning.channel import prune_channels

pytestmark = pytest.mark.xdist_group("zoo_subset")

# (architecture, input side or None for the default, transformer/hybrid)
ZOO = [
    ("test_resnet", None, False),
    ("test_byobnet", None, False),
    ("test_convnext", None, False),
    ("test_convnext2", None, False),
    ("test_efficientnet", None, False),
    ("test_efficientnet_gn", None, False),
    ("test_efficientnet_ln", None, False),
    ("test_nfnet", None, False),
    ("test_mambaout", None, False),
    ("resnet10t", 64, False),
    ("regnetx_002", 64, False),  # grouped convs
    ("mobilenetv3_small_050", 64, False),  # inverted residuals, squeeze-excite
    ("lcnet_050", 64, False),
    ("ghostnet_050", 64, False),  # concatenations
    ("dla46_c", 64, False),
    ("test_vit", None, True),
    ("test_vit2", None, True),
    ("test_vit3", None, True),  # attention pooling head
    ("test_vit4", None, True),
    ("test_vit_relpos", None, True),
    ("test_coatnet", None, True),
    ("mobilevit_xxs", 64, True),
]


def test_subset_is_large_enough() -> None:
    assert len(ZOO) >= 20 and sum(t for *_, t in ZOO) >= 6


@pytest.mark.parametrize(("arch", "side"), [(a, s) for a, s, _ in ZOO], ids=[a for a, *_ in ZOO])
def test_channel_prune_save_reload(arch: str, side: int | None, tmp_path: object) -> None:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=10).eval()
    c, h, w = model.pretrained_cfg["input_size"]
    x = torch.randn(2, c, side or h, side or w, generator=torch.Generator().manual_seed(1))
    before = sum(p.numel() for p in model.parameters())

    result = prune_channels(model, example_input=x[:1], ratio=0.3)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) < before
    structure = json.loads(json.dumps(result.structure))  # what the safetensors header will hold

    manifest = Manifest(arch, 10, {}, default_pretrained_cfg(arch), structure=structure)
    path, _ = save_checkpoint(tmp_path / "p.safetensors", model, manifest)  # type: ignore[operator]
    reloaded = load_checkpoint(path).model
    with torch.no_grad():
        y2 = reloaded(x)
    assert float((y2 - y).abs().max()) <= 1e-5


# ------------------------------------------------------------------------------------------------ meta trace


class _Block(torch.nn.Module):
    def __init__(self, cpe: torch.nn.Module) -> None:
        super().__init__()
        self.cpe, self.fc = cpe, torch.nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x + self.cpe(x))


class _SharedCpe(torch.nn.Module):
    """CoaT's layout in miniature: one conv reachable under three names and called by two blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.cpe = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.blocks = torch.nn.Sequential(_Block(self.cpe), _Block(self.cpe))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


def test_meta_trace_leaves_shared_modules_intact() -> None:
    """torch.func.functional_call leaves a module shared under several names holding meta tensors; the
    tracer must give every parameter back (the same objects) and count the shared conv once per call."""
    from prunecli.tracing import trace_layers

    model = _SharedCpe()
    before = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    trace = trace_layers(model, (3, 8, 8))
    assert trace is not None and trace.device == "meta"
    after = dict(model.named_parameters(remove_duplicate=False))
    assert all(after[n] is p and p.device.type == "cpu" for n, p in before.items())
    # stride-2 stem on 8x8 → 4x4 = 16 positions per call; the shared cpe runs twice
    assert trace.positions["stem"] == 16
    assert trace.positions["cpe"] == 2 * 16
    assert trace.positions["blocks.0.fc"] == trace.positions["blocks.1.fc"] == 16
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 8))  # still runs on CPU


# ------------------------------------------------------------------------------------------------ the runner


def _runner():  # -> module
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo_coverage.py"
    spec = importlib.util.spec_from_file_location("zoo_coverage", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_runner_records_each_family_in_place(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A family's row replaces its earlier row (ratio-run rows included) and new families are appended."""
    zoo = _runner()
    raw = tmp_path / "zoo.jsonl"
    raw.write_text(json.dumps({"model": "a", "family": "fa", "ratio": 0.3}) + "\n")
    monkeypatch.setattr(zoo, "RAW", raw)
    monkeypatch.setattr(zoo, "TABLE", tmp_path / "zoo.md")  # _record rewrites the table: never the repository's
    zoo._record({"model": "b", "family": "fb", "target_run": True})
    rows = zoo._record({"model": "a", "family": "fa", "target_run": True, "macs50_pruned": True})
    assert [r["model"] for r in rows] == ["a", "b"]
    assert [json.loads(line) for line in raw.read_text().splitlines()] == rows
    assert all(zoo._target_row(r) for r in rows) and not zoo._target_row({"model": "c", "ratio": 0.3})
    listed = len(zoo.read_families())  # rows a, b are not among the listed families
    assert f"0/{listed} of all listed families pass" in (tmp_path / "zoo.md").read_text()


def test_runner_skips_recorded_families_unless_redo(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    zoo = _runner()
    families = tmp_path / "families.txt"
    families.write_text("# family\tmodel\tinput_size\tmodel_args\tparams\n"
                        'fa\tresnet10t\t3x64x64\t{}\t1\nfb\tregnetx_002\t3x64x64\t{}\t1\n')  # fmt: skip
    raw = tmp_path / "zoo.jsonl"
    raw.write_text(json.dumps({"model": "resnet10t", "family": "fa", "target_run": True}) + "\n")
    ran: list[str] = []

    def fake(row, _outdir, _timeout, _tp_timeout):  # type: ignore[no-untyped-def]
        ran.append(row["model"])
        return {"model": row["model"], "family": row["family"], "input_size": row["input_size"], "target_run": True}

    monkeypatch.setattr(zoo, "FAMILIES", families)
    monkeypatch.setattr(zoo, "RAW", raw)
    monkeypatch.setattr(zoo, "TABLE", tmp_path / "zoo.md")
    monkeypatch.setattr(zoo, "run_family", fake)
    monkeypatch.setenv("ZOO_OUT", str(tmp_path / "out"))
    zoo.run(1, 1, None, redo=False)
    assert ran == ["regnetx_002"]
    zoo.run(1, 1, ["fa"], redo=True)
    assert ran == ["regnetx_002", "resnet10t"]
    table = (tmp_path / "zoo.md").read_text()
    assert "0/2 of all listed families pass" in table and "Not run: 0 of the 2 listed" in table
    assert "| fa | resnet10t | 64x64 (default 176x176) |" in table


def test_runner_time_limit_is_cpu_time(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The limit counts the worker's CPU seconds (importing torch alone takes more than one), so a loaded
    machine slows a family down without failing it; the wall-clock backstop is set far out here."""
    zoo = _runner()
    monkeypatch.setattr(zoo, "WALL_FACTOR", 600)
    row = {"family": "resnet", "model": "resnet10t", "input_size": [3, 64, 64], "model_args": {}, "params": 1}
    printed, why = zoo._worker(["_prune", json.dumps(row), str(tmp_path)], 1)
    assert printed == [] and why == "timeout after 1 CPU-seconds"
