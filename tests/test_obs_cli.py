"""``prune --reconstruct obs`` and ``restore --method obs|bn|obs+bn`` on the command line (docs/obs.md).

Everything is checked against computations made here, never against the solver's own numbers:

* masks: the zero pattern read back from the written file (restore keeps it bit for bit; N:M groups are
  checked by brute force, group by group; per-layer counts against ``rows · round(p·cols)`` with ``p``
  taken from ``torch.nn.utils.prune``'s own global ranking);
* errors: each layer's output error ``‖W X − Ŵ X‖²`` recomputed with forward hooks on the calibration
  images (``F.conv2d``/``F.linear`` in float64 on the hooked inputs) is at most the plain mask's, and
  equals what the record reports (float32 forward vs the solver's float64 Gram sums: 1e-3 relative);
* BatchNorm: the re-estimated statistics equal the mean / unbiased variance of each BN's eval-mode input
  over the calibration images, recomputed with hooks.

The calibration set is the whole of ``digits:test`` (360 images; ``-p samples=100000`` keeps every one),
so the test sees the same images as the solver whatever the loader's shuffle. The network is paper A's CNN
shrunk to widths 8/16/16 and a 32-wide ``fc1`` (random init), so the file runs in well under a minute.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

CALIB = "digits:test"  # 360 images: calibration data for these tests (any split calibrates)
ALL = "samples=100000"  # every calibration image: the test and the solver see the same set
ARGS = {"widths": [8, 16, 16], "hidden": 32}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_cnn(path: Path, seed: int = 0, force: bool = False) -> Path:
    import timm

    import prunecli.archs  # noqa: F401
    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    torch.manual_seed(seed)
    model = timm.create_model("improved_cnn", num_classes=10, **ARGS)
    manifest = Manifest("improved_cnn", 10, dict(ARGS), default_pretrained_cfg("improved_cnn"))
    save_checkpoint(path, model, manifest, force=force)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base (dense), m70 (magnitude 70 %), nm24 (magnitude 2:4), ch (channel-pruned) and obs+bn restores."""
    from conftest import Cli

    cli = Cli()
    d = tmp_path_factory.mktemp("obs")
    out = {"base": _save_cnn(d / "base.safetensors")}
    steps = {
        "m70": ("prune", out["base"], "--method", "magnitude", "--ratio", "0.7"),
        "nm24": ("prune", out["base"], "--method", "magnitude", "--structure", "2:4"),
        "ch": ("prune", out["base"], "--method", "l2", "--structure", "channel", "--ratio", "0.25"),
    }
    for name, args in steps.items():
        out[name] = d / f"{name}.safetensors"
        r = cli(*args, "-o", out[name])
        assert r.exit_code == 0, r.stderr
    return out


def _load(path: Path) -> Any:
    from prunecli.checkpoint.loaders import load_checkpoint

    return load_checkpoint(str(path))


def _calib(loaded: Any) -> list[torch.Tensor]:
    from prunecli.data import load_data, make_loader

    ds, _ = load_data(CALIB, loaded)
    return [x for x, _ in make_loader(ds, batch_size=256)]


def _layer_inputs(model: torch.nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, list]:
    """Each layer's inputs over the calibration batches, hooked in eval mode."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0].detach())) for n in names]
    model.eval()
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return seen


def _output_error(mod: torch.nn.Module, delta: torch.Tensor, inputs: list[torch.Tensor]) -> float:
    """``Σ ‖Δ x‖²`` over the layer's calibration inputs (float64; the bias cancels in a difference)."""
    total = 0.0
    for x in inputs:
        x = x.double()
        if isinstance(mod, torch.nn.Conv2d):
            y = F.conv2d(x, delta.double(), None, mod.stride, mod.padding, mod.dilation, mod.groups)
        else:
            y = F.linear(x, delta.double())
        total += float((y**2).sum())
    return total


def _zero_pattern(path: Path) -> dict[str, torch.Tensor]:
    return {n: t == 0 for n, t in load_file(str(path)).items() if t.is_floating_point()}


def _run_ok(cli: Any, *args: Any) -> dict[str, Any]:
    r = cli(*args)
    assert r.exit_code == 0, r.stderr
    return r.record


# ------------------------------------------------------------------------------------------------ restore


def test_restore_obs_keeps_the_mask_and_lowers_each_layer_error(cli, ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "r.safetensors"
    before = _sha(ckpts["m70"])
    rec = _run_ok(cli, "restore", ckpts["m70"], "--method", "obs", "--data", CALIB, "-p", ALL, "-o", out)
    m = rec["metrics"]
    assert _sha(ckpts["m70"]) == before  # the input is not touched
    masked = _load(ckpts["m70"]).manifest.masked
    restored = _load(out)
    assert restored.manifest.masked == masked  # the output is still a masked checkpoint
    zin, zout = _zero_pattern(ckpts["m70"]), _zero_pattern(out)
    for name in masked:
        assert torch.equal(zin[name], zout[name]), name  # the exact mask, entry by entry
    tin, tout = load_file(str(ckpts["m70"])), load_file(str(out))
    for name in tin:  # obs changes masked weights only (biases, BN, the head stay)
        if name not in masked:
            assert torch.equal(tin[name], tout[name]), name
    assert any(not torch.equal(tin[n], tout[n]) for n in masked)
    assert rec["metrics"]["method"] == "obs" and m["restored_layers"] == len(masked) == len(m["reconstructed"])
    step = restored.manifest.lineage[-1]
    assert step["command"] == "restore" and step["dense_sha256"] == _sha(ckpts["base"])

    # the error of every masked layer, recomputed with hooks on the restored model's inputs (the solver's
    # inputs: the layers before it are final), against the dense parent's weights
    dense = _load(ckpts["base"]).model
    layers = [n.removesuffix(".weight") for n in masked]
    inputs = _layer_inputs(restored.model, layers, _calib(restored))
    rows = {r["layer"]: r for r in m["layers"]}
    dmods, rmods = dict(dense.named_modules()), dict(restored.model.named_modules())
    for name in layers:
        w = dmods[name].weight.detach()
        keep = ~zin[f"{name}.weight"]
        signal = _output_error(dmods[name], w, inputs[name])
        err_mask = _output_error(dmods[name], w - w * keep, inputs[name]) / signal
        err_obs = _output_error(dmods[name], w - rmods[name].weight.detach(), inputs[name]) / signal
        assert err_obs <= err_mask, (name, err_obs, err_mask)
        assert err_obs < 0.5 * err_mask, (name, err_obs, err_mask)  # the refit does real work here
        assert rows[name]["error_mask"] == pytest.approx(err_mask, rel=1e-3, abs=1e-7), name
        assert rows[name]["error_obs"] == pytest.approx(err_obs, rel=1e-3, abs=1e-7), name


def test_restore_obs_on_nm_keeps_the_pattern_group_by_group(cli, ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "r.safetensors"
    args = ("restore", ckpts["nm24"], "--method", "obs", "--data", "digits:train")
    rec = _run_ok(cli, *args, "-o", out)
    again = _run_ok(cli, *args, "-o", tmp_path / "r2.safetensors")
    assert again["sha256"] == rec["sha256"] == _sha(out)  # same inputs, same bytes
    zin, tout = _zero_pattern(ckpts["nm24"]), load_file(str(out))
    masked = _load(ckpts["nm24"]).manifest.masked
    assert masked
    for name in masked:
        w = tout[name]
        assert torch.equal(zin[name], w == 0), name
        flat = w.reshape(w.shape[0], -1)
        for row in flat:  # brute force: every group of 4 consecutive weights keeps at most 2
            for g in range(0, len(row), 4):
                assert int((row[g : g + 4] != 0).sum()) <= 2


def test_restore_bn_and_obs_bn_on_a_masked_checkpoint(cli, ckpts: dict[str, Path], tmp_path: Path) -> None:
    """bn alone leaves every weight and re-estimates each BN to its input's statistics; obs+bn does both."""
    for method in ("bn", "obs+bn"):
        out = tmp_path / f"{method}.safetensors"
        rec = _run_ok(cli, "restore", ckpts["m70"], "--method", method, "--data", CALIB, "-p", ALL, "-o", out)
        tin, tout = load_file(str(ckpts["m70"])), load_file(str(out))
        masked = _load(ckpts["m70"]).manifest.masked
        for name in masked:
            assert torch.equal(tin[name] == 0, tout[name] == 0)
            if method == "bn":
                assert torch.equal(tin[name], tout[name])
        restored = _load(out)
        bns = [n for n, mod in restored.model.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)]
        inputs = _layer_inputs(restored.model, bns, _calib(restored))
        mods = dict(restored.model.named_modules())
        for name in bns:  # every BN is downstream of a masked conv
            x = torch.cat(inputs[name]).double().transpose(0, 1).reshape(mods[name].num_features, -1)
            torch.testing.assert_close(mods[name].running_mean.double(), x.mean(1), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(mods[name].running_var.double(), x.var(1), rtol=1e-4, atol=1e-6)
        bn_row = next(r for r in rec["metrics"]["layers"] if r["method"] == "bn")
        assert bn_row["bn_layers"] == len(bns)


def test_restore_without_method_on_a_masked_checkpoint_is_obs_bn(cli, ckpts: dict[str, Path], tmp_path: Path) -> None:
    rec = _run_ok(cli, "restore", ckpts["m70"], "--data", "digits:train", "-o", tmp_path / "r.safetensors")
    assert rec["metrics"]["method"] == "obs+bn"


# ------------------------------------------------------------------------------------------------ prune


def _expected_zeros(weight: torch.Tensor, ratio: float) -> int:
    """The solver removes round(p·cols) of every row (a conv row is one filter)."""
    return weight.shape[0] * round(ratio * weight[0].numel())


def test_prune_reconstruct_global_scope_follows_the_criterion_ranking(
    cli, ckpts: dict[str, Path], tmp_path: Path
) -> None:
    """Per-layer ratios from torch.nn.utils.prune's global L1 ranking; counts and errors from the file."""
    import torch.nn.utils.prune as P

    out = tmp_path / "o.safetensors"
    rec = _run_ok(cli, "prune", ckpts["base"], "--method", "magnitude", "--ratio", "0.6", "--scope", "global",
                  "--reconstruct", "obs", "--data", CALIB, "-p", ALL, "-o", out)  # fmt: skip
    m = rec["metrics"]
    dense = _load(ckpts["base"]).model
    ref = _load(ckpts["base"]).model
    names = [n for n, mod in ref.named_modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
    names.remove("fc2")  # the head is excluded
    mods = dict(ref.named_modules())
    P.global_unstructured([(mods[n], "weight") for n in names], pruning_method=P.L1Unstructured, amount=0.6)
    tout = load_file(str(out))
    zeros = 0
    for n in names:
        ratio = float((mods[n].weight == 0).sum()) / mods[n].weight.numel()
        got = int((tout[f"{n}.weight"] == 0).sum())
        assert got == _expected_zeros(mods[n].weight, ratio), n
        assert m["layers"][f"{n}.weight"] == got / tout[f"{n}.weight"].numel()
        zeros += got
    prunable = sum(tout[f"{n}.weight"].numel() for n in names)
    assert m["selected_sparsity"] == zeros / prunable and m["prunable"] == prunable
    assert torch.equal(tout["fc2.weight"], dense.fc2.weight)
    assert sorted(_load(out).manifest.masked) == sorted(f"{n}.weight" for n in names)

    # each layer's error (dense weight vs written one, on the inputs of the reconstructed prefix) is at most
    # that of the same mask without the update, and matches the record
    pruned = _load(out).model
    inputs = _layer_inputs(pruned, names, _calib(_load(out)))
    pmods, dmods = dict(pruned.named_modules()), dict(dense.named_modules())
    rows = m["reconstruct"]["layers"]
    for n in names:
        w, w_hat = dmods[n].weight.detach(), pmods[n].weight.detach()
        signal = _output_error(dmods[n], w, inputs[n])
        err_mask = _output_error(dmods[n], w - w * (w_hat != 0), inputs[n]) / signal
        err_obs = _output_error(dmods[n], w - w_hat, inputs[n]) / signal
        assert err_obs <= err_mask, n
        assert rows[n]["status"] == "reconstructed"
        assert rows[n]["error_obs"] == pytest.approx(err_obs, rel=1e-3, abs=1e-7), n
        assert rows[n]["error_mask"] == pytest.approx(err_mask, rel=1e-3, abs=1e-7), n


def test_prune_reconstruct_nm_brute_force_and_layer_ratio(cli, ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "nm.safetensors"
    rec = _run_ok(cli, "prune", ckpts["base"], "--method", "wanda", "--structure", "2:4", "--reconstruct", "obs",
                  "--data", "digits:train", "-o", out)  # fmt: skip
    tout = load_file(str(out))
    m = rec["metrics"]
    assert m["nm_skipped"] == ["features.0.conv.weight"]  # 27 inputs per filter: no groups of 4
    for name in ("features.1.conv.weight", "features.2.conv.weight", "fc1.weight"):
        flat = tout[name].reshape(tout[name].shape[0], -1)
        for row in flat:
            for g in range(0, len(row), 4):
                assert int((row[g : g + 4] == 0).sum()) == 2, name  # exactly n of m kept (random weights)
        assert m["layers"][name] == 0.5 and m["reconstruct"]["layers"][name.removesuffix(".weight")]["target"] == "2:4"
    dense = load_file(str(ckpts["base"]))
    assert torch.equal(tout["features.0.conv.weight"], dense["features.0.conv.weight"])

    out2 = tmp_path / "lr.safetensors"
    rec = _run_ok(cli, "prune", ckpts["base"], "--method", "magnitude", "--ratio", "0.5", "--layer-ratio",
                  "fc1=0.9", "--exclude", "features.0.*", "--reconstruct", "obs", "--data", "digits:train",
                  "-o", out2)  # fmt: skip
    t2 = load_file(str(out2))
    fc1 = t2["fc1.weight"]
    assert int((fc1 == 0).sum()) == _expected_zeros(fc1, round(0.9 * fc1.numel()) / fc1.numel())
    assert int((t2["features.1.conv.weight"] == 0).sum()) == _expected_zeros(t2["features.1.conv.weight"], 0.5)
    assert torch.equal(t2["features.0.conv.weight"], dense["features.0.conv.weight"])
    assert rec["metrics"]["excluded"] == ["features.0.conv.weight", "fc2.weight"]


def test_prune_reconstruct_dry_run_writes_nothing(cli, ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "dry.safetensors"
    rec = _run_ok(cli, "prune", ckpts["base"], "--method", "magnitude", "--ratio", "0.7", "--reconstruct", "obs",
                  "--data", "digits:train", "--dry-run", "-o", out)  # fmt: skip
    assert not out.exists() and rec["checkpoint"] is None
    r = rec["metrics"]["reconstruct"]
    assert r["solved"] is False and "plan" in rec["metrics"]
    weights = load_file(str(ckpts["base"]))
    for n, removed in r["removed_by_solver"].items():
        assert removed == _expected_zeros(weights[f"{n}.weight"], rec["metrics"]["plan"]["layers"][f"{n}.weight"]
                                          ["sparsity"])  # fmt: skip


# ------------------------------------------------------------------------------------------------ unreached layers


class _AuxNet(torch.nn.Module):
    """A small conv net with an auxiliary Linear (``aux``) that its forward never calls."""

    def __init__(self, num_classes: int = 10, **_: Any) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.fc1 = torch.nn.Linear(128, 32)
        self.aux = torch.nn.Linear(128, 32)  # e.g. a training-only head
        self.head = torch.nn.Linear(32, num_classes)

    def get_classifier(self) -> torch.nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv(x))).flatten(1)
        return self.head(torch.relu(self.fc1(x)))


def _register_aux_net() -> None:
    import sys

    from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

    mod = sys.modules[__name__]
    if getattr(mod, "default_cfgs", None) is not None:
        return
    cfg = {"url": "", "num_classes": 10, "input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bilinear",
           "mean": (0.5,) * 3, "std": (0.5,) * 3, "first_conv": "conv", "classifier": "head"}  # fmt: skip
    mod.default_cfgs = generate_default_cfgs({"obs_test_aux_net.untrained": cfg})  # type: ignore[attr-defined]

    def obs_test_aux_net(pretrained: bool = False, **kwargs: Any) -> _AuxNet:
        return build_model_with_cfg(_AuxNet, "obs_test_aux_net", pretrained, **kwargs)

    obs_test_aux_net.__module__ = __name__
    register_model(obs_test_aux_net)


def test_unreached_layer_is_warned_and_gets_the_plain_mask(cli, save_model, tmp_path: Path) -> None:
    """prune: ``aux`` (never called) gets the criterion's mask (= torch's l1_unstructured), status unreached;
    restore: it keeps the checkpoint's weights; both records warn about it."""
    import torch.nn.utils.prune as P

    import prunecli.archs  # noqa: F401

    _register_aux_net()
    torch.manual_seed(0)
    base = save_model(_AuxNet(), tmp_path / "aux.safetensors", "obs_test_aux_net", 10)
    out = tmp_path / "o.safetensors"
    rec = _run_ok(cli, "prune", base, "--method", "magnitude", "--ratio", "0.5", "--reconstruct", "obs",
                  "--data", CALIB, "-o", out)  # fmt: skip
    rc = rec["metrics"]["reconstruct"]
    assert rc["layers"]["aux"]["status"] == "unreached" and any("aux" in w for w in rc["warnings"])
    assert rc["layers"]["fc1"]["status"] == "reconstructed"
    ref = _load(base).model
    P.l1_unstructured(ref.aux, "weight", amount=0.5)
    assert torch.equal(load_file(str(out))["aux.weight"], ref.aux.weight.detach())
    assert "aux.weight" in _load(out).manifest.masked

    masked = tmp_path / "m.safetensors"
    _run_ok(cli, "prune", base, "--method", "magnitude", "--ratio", "0.5", "-o", masked)
    restored = tmp_path / "r.safetensors"
    rec = _run_ok(cli, "restore", masked, "--method", "obs", "--data", CALIB, "-o", restored)
    rows = {r["layer"]: r for r in rec["metrics"]["layers"]}
    assert rows["aux"]["status"] == "unreached" and any("aux" in w for w in rec["metrics"]["warnings"])
    assert rec["metrics"]["reconstructed"] == ["conv", "fc1"]
    assert torch.equal(load_file(str(restored))["aux.weight"], load_file(str(masked))["aux.weight"])


# ------------------------------------------------------------------------------------------------ bad input


def _missing_parent(d: Path, cli: Any) -> Path:
    """A masked checkpoint whose dense parent (recorded in the lineage) was deleted."""
    parent = _save_cnn(d / "gone.safetensors", seed=3)
    out = d / "orphan.safetensors"
    assert cli("prune", parent, "--method", "magnitude", "--ratio", "0.5", "-o", out).exit_code == 0
    parent.unlink()
    return out


def _modified_parent(d: Path, cli: Any) -> Path:
    """A masked checkpoint whose dense parent was rewritten after pruning (another sha256)."""
    parent = _save_cnn(d / "changed.safetensors", seed=4)
    out = d / "child.safetensors"
    assert cli("prune", parent, "--method", "magnitude", "--ratio", "0.5", "-o", out).exit_code == 0
    _save_cnn(parent, seed=5, force=True)
    return out


# case → (command, input (fixture key or builder), extra args, message)
BAD: dict[str, tuple[str, Any, tuple[str, ...], str]] = {
    "prune_no_data": ("prune", "base", ("--method", "magnitude", "--ratio", "0.5", "--reconstruct", "obs"),
                      "needs calibration data"),
    "prune_damp_zero": ("prune", "base", ("--method", "magnitude", "--ratio", "0.5", "--reconstruct", "obs",
                                          "--data", "digits:train", "-p", "damp=0"), "damp=0"),
    "prune_damp_negative": ("prune", "base", ("--method", "magnitude", "--structure", "2:4", "--reconstruct", "obs",
                                              "--data", "digits:train", "-p", "damp=-0.1"), "damp=-0.1"),
    "prune_blocksize": ("prune", "base", ("--method", "magnitude", "--ratio", "0.5", "--reconstruct", "obs",
                                          "--data", "digits:train", "-p", "blocksize=0"), "blocksize=0"),
    "prune_unknown_key": ("prune", "base", ("--method", "magnitude", "--ratio", "0.5", "--reconstruct", "obs",
                                            "--data", "digits:train", "-p", "lambda=1"), "unknown -p key 'lambda'"),
    "prune_restore_obs": ("prune", "base", ("--method", "l2", "--structure", "channel", "--ratio", "0.3",
                                            "--restore", "obs"), "not masked"),
    "restore_no_data": ("restore", "m70", ("--method", "obs"), "obs needs calibration data"),
    "restore_obs_bn_no_data": ("restore", "m70", ("--method", "obs+bn"), "needs calibration data"),
    "restore_dense": ("restore", "base", ("--method", "obs", "--data", "digits:train"), "no masked weights"),
    "restore_channel": ("restore", "ch", ("--method", "obs", "--data", "digits:train"), "not masked"),
    "restore_missing_parent": ("restore", _missing_parent, ("--method", "obs", "--data", "digits:train"),
                               "does not exist"),
    "restore_modified_parent": ("restore", _modified_parent, ("--method", "obs", "--data", "digits:train"),
                                "sha256"),
    "restore_wrong_dense": ("restore", "m70", ("--method", "obs", "--data", "digits:train", "--dense", "ch"),
                            "sha256"),
    "restore_damp_zero": ("restore", "m70", ("--method", "obs", "--data", "digits:train", "-p", "damp=0"), "damp=0"),
    "restore_damp_negative": ("restore", "m70", ("--method", "obs+bn", "--data", "digits:train", "-p", "damp=-1"),
                              "damp=-1"),
    "restore_blocksize": ("restore", "m70", ("--method", "obs", "--data", "digits:train", "-p", "blocksize=0"),
                          "blocksize=0"),
    "restore_lbyl_on_masked": ("restore", "m70", ("--method", "lbyl",), "not channel-pruned"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_error_nothing_written(cli, ckpts: dict[str, Path], tmp_path: Path, case: str) -> None:
    command, source, extra, message = BAD[case]
    src = source(tmp_path, cli) if callable(source) else ckpts[source]
    extra = tuple(str(ckpts[a]) if a in ckpts else a for a in extra)  # --dense KEY → a fixture's path
    out = tmp_path / "out" / "x.safetensors"
    out.parent.mkdir()
    listing = sorted(p.name for p in src.parent.iterdir())
    digest = _sha(src)
    r = cli(command, src, *extra, "-o", out)
    assert r.exit_code == 1, (r.exit_code, r.stdout, r.stderr)
    assert r.stderr.startswith("Error:") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""
    assert list(out.parent.iterdir()) == []  # nothing written, not even a temporary file
    assert _sha(src) == digest and sorted(p.name for p in src.parent.iterdir()) == listing


# ------------------------------------------------------------------------------------------------ README


def _readme_obs_lines() -> list[str]:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    lines = (ln.strip().strip("`") for ln in readme.splitlines())
    return [ln for ln in lines if ln.startswith("prunecli ") and re.search(r"--reconstruct obs|--method obs", ln)]


def test_readme_obs_examples_run(cli, ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's obs examples (prune and restore sections) run on a tiny base.safetensors."""
    lines = _readme_obs_lines()
    assert len(lines) >= 2, lines
    shutil.copy(ckpts["base"], tmp_path / "base.safetensors")
    monkeypatch.chdir(tmp_path)
    assert cli("prune", "base.safetensors", "--method", "magnitude", "--ratio", "0.5", "-o", "p50.safetensors")\
        .exit_code == 0  # fmt: skip
    for line in lines:
        args = shlex.split(line.split("|")[0])[1:]
        r = cli(*args)
        assert r.exit_code == 0, (line, r.stderr)
        assert json.loads(r.stdout.strip().splitlines()[-1])["checkpoint"]
