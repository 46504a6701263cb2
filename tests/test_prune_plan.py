"""Pruning plans and ``prune(dry_run=True)``: the plan a dry run shows is what the real run then writes.

Every check reads the written checkpoint independently (safetensors ``load_file``: zeros counted,
shapes read) and recomputes params and MACs by hand for ``improved_cnn`` at 3×32×32, whose output
positions per channel are known: 32·32, 16·16 and 8·8 for its three convs (each followed by a 2×2
pool), 1 for the two Linear layers. All counts are integers: they are compared exactly.
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from prunecli.errors import PrunecliError
from prunecli.requests import PruneRequest

PRUNE = importlib.import_module("prunecli.api.prune")

POSITIONS = {"features.0.conv": 32 * 32, "features.1.conv": 16 * 16, "features.2.conv": 8 * 8, "fc1": 1, "fc2": 1}


def _model(seed: int = 0) -> nn.Module:
    import timm

    import prunecli.archs  # noqa: F401  (registers improved_cnn)

    torch.manual_seed(seed)
    return timm.create_model("improved_cnn").eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A saved improved_cnn (with a layer table, so magnitude pruning takes the fast path) and its weights."""
    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    model = _model()
    path = tmp_path_factory.mktemp("plan") / "base.safetensors"
    save_checkpoint(path, model, Manifest("improved_cnn", 10, {}, default_pretrained_cfg("improved_cnn")))
    return path, {n: p.detach().clone() for n, p in model.named_parameters()}


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _dry_then_real(
    monkeypatch: pytest.MonkeyPatch, base: Path, tmp_path: Path, fast: bool, **kw: Any
) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """Runs the dry run (asserting it wrote nothing anywhere under tmp_path or beside the input), then the real run."""
    monkeypatch.setenv("PRUNECLI_FAST_PRUNE", "1" if fast else "0")
    out = tmp_path / "out" / "p.safetensors"
    out.parent.mkdir()
    before = _files(tmp_path), _files(base.parent)
    dry = PRUNE.prune(PruneRequest.build(checkpoint=str(base), output=out, dry_run=True, **kw))
    assert (_files(tmp_path), _files(base.parent)) == before  # no output, no temp file
    assert dry.checkpoint is None and dry.sha256 is None
    real = PRUNE.prune(PruneRequest.build(checkpoint=str(base), output=out, **kw))
    assert real.checkpoint is not None and Path(real.checkpoint) == out.resolve()
    return dry, real, _load(out)


def _check_masked(dry: Any, real: Any, written: dict[str, torch.Tensor], dense: dict[str, torch.Tensor]) -> None:
    """Per-layer removals, params and MACs of a masked plan against the written file."""
    plan = dry.metrics["plan"]
    # the dense random init has no exact zeros in the weights, so every zero there is a removed weight
    assert all(int(dense[f"{n}.weight"].count_nonzero()) == dense[f"{n}.weight"].numel() for n in POSITIONS)
    for name, layer in plan["layers"].items():
        zeros = written[name].numel() - int(written[name].count_nonzero())
        assert layer["removed"] == zeros, name
        assert layer["sparsity"] == zeros / written[name].numel()
    assert plan["params_before"] == plan["params"] == sum(t.numel() for t in dense.values())
    assert plan["params_nonzero_before"] == sum(int(t.count_nonzero()) for t in dense.values())
    assert plan["params_nonzero"] == sum(int(written[n].count_nonzero()) for n in dense)
    assert plan["macs_before"] == plan["macs"] == sum(p * dense[f"{n}.weight"].numel() for n, p in POSITIONS.items())
    assert plan["macs_nonzero"] == sum(p * int(written[f"{n}.weight"].count_nonzero()) for n, p in POSITIONS.items())
    summary = {k: v for k, v in dry.metrics.items() if k != "plan"}
    assert summary == real.metrics  # sparsity, params, params_nonzero, macs, macs_nonzero, layers, …
    for key in ("params", "params_nonzero", "macs", "macs_nonzero"):
        assert plan[key] == real.metrics[key]


@pytest.mark.parametrize("fast", [True, False])
def test_unstructured_dry_run_is_what_the_real_run_writes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, base: tuple[Path, dict], fast: bool
) -> None:
    path, dense = base
    kw = {"method": "magnitude", "ratio": 0.6, "scope": "global", "layer_ratios": [("fc1", 0.3)]}
    dry, real, written = _dry_then_real(monkeypatch, path, tmp_path, fast, **kw)
    _check_masked(dry, real, written, dense)
    plan = dry.metrics["plan"]
    assert "fc2.weight" not in plan["layers"]  # the head is excluded
    pooled = ["features.0.conv.weight", "features.1.conv.weight", "features.2.conv.weight"]
    scopes = {tuple(s["layers"]): s for s in plan["scopes"]}
    assert set(scopes) == {("fc1.weight",), tuple(pooled)}
    # thresholds: the k-th smallest |w| of the scope, sorted independently
    for names, s in scopes.items():
        values = torch.cat([dense[n].abs().flatten() for n in names])
        n = values.numel()
        assert s["k"] == round(s["ratio"] * n)
        assert s["threshold"] == float(torch.sort(values).values[s["k"] - 1])


def test_nm_dry_run_is_what_the_real_run_writes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, base: tuple[Path, dict]
) -> None:
    path, dense = base
    dry, real, written = _dry_then_real(monkeypatch, path, tmp_path, True, method="magnitude", structure="2:4")
    _check_masked(dry, real, written, dense)
    plan = dry.metrics["plan"]
    assert plan["skipped"] == ["features.0.conv.weight"]  # 3·3·3 = 27 inputs per filter: not a multiple of 4
    for name, layer in plan["layers"].items():
        assert layer["removed"] == written[name].numel() // 2
        groups = written[name].reshape(-1, 4)  # rows are multiples of 4: groups never straddle rows
        assert bool(((groups != 0).sum(1) == 2).all())


@pytest.mark.parametrize("kw", [{"ratio": 0.3, "round_to": 4}, {"ratio": 0.5, "scope": "global"}])
def test_channel_dry_run_is_what_the_real_run_writes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, base: tuple[Path, dict], kw: dict
) -> None:
    path, dense = base
    dry, real, written = _dry_then_real(monkeypatch, path, tmp_path, False, method="magnitude", structure="channel",
                                        **kw)  # fmt: skip
    plan = dry.metrics["plan"]
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    params = {n: t for n, t in written.items() if not n.endswith(buffers)}
    assert set(params) == set(dense)
    for name, layer in plan["layers"].items():
        assert layer["channels_before"] == dense[f"{name}.weight"].shape[0]
        assert layer["channels"] == written[f"{name}.weight"].shape[0], name
    assert any(layer["channels"] < layer["channels_before"] for layer in plan["layers"].values())
    if "round_to" in kw:
        changed = [v["channels"] for v in plan["layers"].values() if v["channels"] != v["channels_before"]]
        assert all(c % kw["round_to"] == 0 for c in changed)
    assert plan["params_before"] == sum(t.numel() for t in dense.values())
    assert plan["params"] == sum(t.numel() for t in params.values()) == real.metrics["params"]
    assert plan["params_nonzero"] == sum(int(t.count_nonzero()) for t in params.values())
    assert plan["macs_before"] == sum(p * dense[f"{n}.weight"].numel() for n, p in POSITIONS.items())
    assert plan["macs"] == sum(p * written[f"{n}.weight"].numel() for n, p in POSITIONS.items())
    assert (real.metrics["macs_before"], real.metrics["macs"]) == (plan["macs_before"], plan["macs"])
    nnz_macs = sum(p * int(written[f"{n}.weight"].count_nonzero()) for n, p in POSITIONS.items())
    assert plan["macs_nonzero"] == real.metrics["macs_nonzero"] == nnz_macs
    for g in plan["groups"]:
        assert 0 < g["kept"] < g["width"]
    summary = {k: v for k, v in dry.metrics.items() if k != "plan"}
    assert summary == real.metrics


def test_dry_run_still_validates_the_output_path(tmp_path: Path, base: tuple[Path, dict]) -> None:
    path, _ = base
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"x")
    with pytest.raises(PrunecliError, match="exists"):
        PRUNE.prune(PruneRequest.build(checkpoint=str(path), output=out, method="magnitude", ratio=0.5, dry_run=True))
    assert out.read_bytes() == b"x"


def test_plans_serialise_deterministically(base: tuple[Path, dict]) -> None:
    from prunecli.pruning.nm import plan_nm
    from prunecli.pruning.unstructured import plan_scopes, plan_unstructured

    _, dense = base
    weights = {f"{n}.weight": dense[f"{n}.weight"].clone() for n in POSITIONS}
    scopes = plan_scopes({n: t.numel() for n, t in weights.items()}, 0.5, "global")
    a, b = plan_unstructured(weights, None, scopes), plan_unstructured(weights, None, scopes)
    assert a.to_json() == b.to_json()
    doc = json.loads(a.to_json())
    assert [s["k"] for s in doc["scopes"]] == [round(0.5 * sum(t.numel() for t in weights.values()))]
    assert "kernel" not in doc  # the kernel's private selection is not part of the plan's data
    assert sum(lp["removed"] for lp in doc["layers"]) == doc["scopes"][0]["k"]
    # generic scores (not the magnitude kernel) give the same selection, hence the same plan data; only
    # the kernel knows the non-zero counts without applying (no zero weight is kept: numel − removed)
    generic = json.loads(plan_unstructured(weights, lambda n: weights[n].abs(), scopes).to_json())
    assert all(lp["nonzero"] == lp["numel"] - lp["removed"] for lp in doc["layers"])
    for lp in [*doc["layers"], *generic["layers"]]:
        lp.pop("nonzero")
    assert generic == doc
    nm = json.loads(plan_nm(weights, list(weights), 2, 4).to_json())
    assert nm["skipped"] == ["features.0.conv.weight"] and nm["structure"] == "2:4"


def test_channel_plan_leaves_the_model_untouched() -> None:
    from prunecli.pruning.channel import apply_channels, plan_channels

    model = _model(1)
    twin = copy.deepcopy(model)  # the same dense model in other tensors: apply rebuilds the graph for it
    x = torch.randn(1, 3, 32, 32)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_channels(model, example_input=x, ratio=0.4)
    state = model.state_dict()
    assert set(state) == set(dense) and all(torch.equal(state[k], dense[k]) for k in dense)
    assert json.loads(plan.to_json()) == json.loads(plan.to_json())
    structure = apply_channels(model, plan, example_input=x)  # swaps the planning trial's result in
    assert apply_channels(twin, plan, example_input=x) == structure  # prunes the plan's groups anew
    pruned, rebuilt = model.state_dict(), twin.state_dict()
    assert set(pruned) == set(rebuilt) and all(torch.equal(pruned[k], rebuilt[k]) for k in pruned)
    checked = 0
    for g in plan.groups:  # the plan's kept positions are the dense filters that survive
        for member in g.members:
            w, pruned = dense[f"{member}.weight"], model.get_submodule(member).weight
            assert pruned.shape[0] == len(g.kept) < w.shape[0]
            if pruned.shape[1:] == w.shape[1:]:  # its inputs were not pruned: rows compare exactly
                torch.testing.assert_close(pruned, w[list(g.kept)], rtol=0, atol=0)
                checked += 1
    assert checked >= 1  # features.0.conv reads the 3 image channels
    assert plan.params_after == sum(p.numel() for p in model.parameters())
