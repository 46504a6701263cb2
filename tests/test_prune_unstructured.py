"""Unstructured and N:M pruning against independent references.

References: ``torch.nn.utils.prune`` (l1_unstructured per layer, global_unstructured), brute-force
Python sorts by (score, layer, index), brute-force loops over N:M groups, a hand-computed MAC count,
and the closed form of paper E's bias shifts computed here from captured activations/gradients.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune

from prunecli.errors import InputError
from prunecli.pruning.nm import parse_nm, prune_nm
from prunecli.pruning.unstructured import Scope, order_keys, plan_scopes, prune_unstructured
from prunecli.requests import PruneRequest


def _model(arch: str, seed: int = 0, **kw: object) -> nn.Module:
    import timm

    import prunecli.archs  # noqa: F401  (registers improved_cnn, fc_mlp)

    torch.manual_seed(seed)
    return timm.create_model(arch, **kw).eval()


def _prunable(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _no_tie_at(values: torch.Tensor, k: int) -> bool:
    """True when the k-th and (k+1)-th smallest values differ (so every exact top-k agrees)."""
    if k <= 0 or k >= values.numel():
        return True
    two = torch.topk(values.flatten(), k + 1, largest=False).values
    return bool(two[k - 1] != two[k])


# --------------------------------------------------------------------------- torch.nn.utils.prune parity


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.77])
def test_layer_scope_matches_l1_unstructured(tmp_path: Path, save_model, ratio: float) -> None:
    from prunecli.api.prune import prune

    model = _model("test_resnet", num_classes=10)
    src = save_model(model, tmp_path / "m.safetensors", "test_resnet", 10)
    prune(
        PruneRequest.build(
            checkpoint=str(src), method="magnitude", ratio=ratio, include_head=True, output=tmp_path / "p.safetensors"
        )
    )
    ours = _load_weights(tmp_path / "p.safetensors")
    for name, mod in _prunable(model).items():
        assert _no_tie_at(mod.weight.detach().abs(), round(ratio * mod.weight.numel())), name
        tprune.l1_unstructured(mod, "weight", amount=ratio)
        tprune.remove(mod, "weight")
        # bit for bit, signed zeros included: both multiply the weight by the 0/1 mask
        assert torch.equal(ours[f"{name}.weight"].view(torch.int32), mod.weight.detach().view(torch.int32)), name
        assert int((ours[f"{name}.weight"] == 0).sum()) == round(ratio * mod.weight.numel())
    for name, t in model.state_dict().items():  # everything else untouched
        if not name.endswith(".weight") or name.removesuffix(".weight") not in _prunable(model):
            assert torch.equal(ours[name], t), name


@pytest.mark.parametrize(("arch", "kw"), [("test_resnet", {"num_classes": 10}), ("improved_cnn", {})])
def test_global_scope_matches_global_unstructured(tmp_path: Path, save_model, arch: str, kw: dict) -> None:
    from prunecli.api.prune import prune

    ratio = 0.6
    model = _model(arch, seed=1, **kw)
    src = save_model(model, tmp_path / "m.safetensors", arch, 10)
    result = prune(
        PruneRequest.build(
            checkpoint=str(src), method="magnitude", ratio=ratio, scope="global", output=tmp_path / "p.safetensors"
        )
    )
    ours = _load_weights(tmp_path / "p.safetensors")
    head = {"fc", "fc2", "head"}
    layers = {n: m for n, m in _prunable(model).items() if n not in head}
    everything = torch.cat([m.weight.detach().abs().flatten() for m in layers.values()])
    k = round(ratio * everything.numel())
    assert _no_tie_at(everything, k)
    tprune.global_unstructured([(m, "weight") for m in layers.values()], tprune.L1Unstructured, amount=ratio)
    for name, mod in layers.items():
        tprune.remove(mod, "weight")
        assert torch.equal(ours[f"{name}.weight"].view(torch.int32), mod.weight.detach().view(torch.int32)), name
    assert sum(int((ours[f"{n}.weight"] == 0).sum()) for n in layers) == k
    assert result.metrics["selected_sparsity"] == k / everything.numel()
    assert result.metrics["scope"] == "global"


# --------------------------------------------------------------------------- exact counts and tie-breaking


def test_plan_counts_use_round_half_even() -> None:
    scopes = plan_scopes({"a.weight": 10, "b.weight": 6, "c.weight": 14}, 0.25, "layer")
    assert [s.k for s in scopes] == [round(2.5), round(1.5), round(3.5)] == [2, 2, 4]
    (pooled,) = plan_scopes({"a.weight": 10, "b.weight": 6}, 0.25, "global")
    assert pooled.k == 4 and pooled.names == ("a.weight", "b.weight")
    mixed = plan_scopes({"a.weight": 10, "b.weight": 6, "c.weight": 8}, 0.5, "global", {"b.weight": 0.0})
    assert [(s.names, s.k) for s in mixed] == [(("b.weight",), 0), (("a.weight", "c.weight"), 9)]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, math.nan])
def test_ratio_outside_unit_interval(bad: float) -> None:
    with pytest.raises(InputError, match="outside"):
        plan_scopes({"a.weight": 10}, bad, "layer")


def test_ratio_that_empties_a_layer() -> None:
    with pytest.raises(InputError, match="every weight"):
        plan_scopes({"a.weight": 1000, "b.weight": 2}, 0.8, "layer")  # round(1.6) = 2 of 2


def _brute_force(scores: dict[str, torch.Tensor], k: int) -> set[tuple[str, int]]:
    order = list(scores)
    flat = [(float(v), order.index(n), i) for n, s in scores.items() for i, v in enumerate(s.flatten().tolist())]
    flat.sort()
    return {(order[li], i) for _, li, i in flat[:k]}


@pytest.mark.parametrize("seed", range(4))
def test_global_ties_broken_by_layer_then_index(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (7, 5), "b.weight": (4, 3, 2, 2), "c.weight": (9, 1)}
    # few distinct values (many exact ties), negatives, signed zeros and large magnitudes
    palette = torch.tensor([-3e38, -2.5, -0.0, 0.0, 1e-30, 1.0, 1.0, 7.5, math.inf])
    scores = {n: palette[torch.randint(len(palette), s, generator=gen)] for n, s in shapes.items()}
    total = sum(s.numel() for s in scores.values())
    for k in (1, total // 3, total // 2, total - 5):
        weights = {n: torch.ones(s) for n, s in shapes.items()}
        expect = _brute_force(scores, k)
        scope = Scope(tuple(shapes), k, k / total)
        if any(sum(1 for e in expect if e[0] == n) == w.numel() for n, w in weights.items()):
            with pytest.raises(InputError, match="every weight"):
                prune_unstructured(weights, scores.__getitem__, [scope])
            continue
        prune_unstructured(weights, scores.__getitem__, [scope])
        got = {(n, i) for n, w in weights.items() for i in (w.flatten() == 0).nonzero().flatten().tolist()}
        assert got == expect, k


def test_layer_scope_ties_broken_by_index() -> None:
    w = {"a.weight": torch.ones(4, 6)}
    scores = torch.tensor([2.0, 1.0, 1.0, 3.0, 1.0, 1.0] * 4).view(4, 6)
    prune_unstructured(w, lambda _: scores, plan_scopes({"a.weight": 24}, 0.4, "layer"))  # k = round(9.6) = 10
    # 16 weights tie at score 1.0; the 10 with the lowest flat indices go
    assert (w["a.weight"].flatten() == 0).nonzero().flatten().tolist() == [1, 2, 4, 5, 7, 8, 10, 11, 13, 14]


def test_order_keys_preserve_float_order() -> None:
    values = torch.tensor([-math.inf, -3e38, -1.0, -1e-40, -0.0, 0.0, 1e-40, 1.0, 3e38, math.inf])
    keys = order_keys(values)
    assert keys.dtype == torch.int32
    assert keys.tolist() == sorted(keys.tolist())
    assert keys[4] == keys[5]  # -0.0 == 0.0
    assert len(set(keys.tolist())) == len(values) - 1
    with pytest.raises(InputError, match="NaN"):
        order_keys(torch.tensor([1.0, math.nan]))


def test_global_selection_that_empties_a_layer_is_refused() -> None:
    weights = {"a.weight": torch.full((10,), 5.0), "b.weight": torch.full((4,), 0.1)}
    scopes = plan_scopes({"a.weight": 10, "b.weight": 4}, 0.5, "global")
    with pytest.raises(InputError, match=r"every weight of 'b\.weight'"):
        prune_unstructured(weights, lambda n: weights[n].abs(), scopes)


def test_scores_of_wrong_shape_are_refused() -> None:
    weights = {"a.weight": torch.ones(3, 4)}
    with pytest.raises(InputError, match="shape"):
        prune_unstructured(weights, lambda _: torch.ones(3), plan_scopes({"a.weight": 12}, 0.5, "layer"))


# --------------------------------------------------------------------------- N:M


def _nm_brute(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows = scores.reshape(scores.shape[0], -1).tolist()
    keep = []
    for row in rows:
        out = []
        for g in range(0, len(row), m):
            group = row[g : g + m]
            order = sorted(range(m), key=lambda j: (group[j], j))  # ascending, ties: lower index first
            drop = set(order[: m - n])
            out += [j not in drop for j in range(m)]
        keep.append(out)
    return torch.tensor(keep).view(scores.shape)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8)])
def test_nm_matches_brute_force(n: int, m: int) -> None:
    gen = torch.Generator().manual_seed(n * 10 + m)
    shapes = {
        "lin.weight": (6, 16),
        "conv.weight": (5, 8, 3, 3) if m != 8 else (5, 8, 2, 2),
        "odd.weight": (4, 3, 3, 3),
    }
    scores = {k: torch.randint(0, 4, s, generator=gen).float() for k, s in shapes.items()}  # many ties
    weights = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    dense = {k: w.clone() for k, w in weights.items()}
    removed, skipped = prune_nm(weights, scores.__getitem__, list(shapes), n, m)
    assert skipped == ["odd.weight"] and torch.equal(weights["odd.weight"], dense["odd.weight"])
    for k in ("lin.weight", "conv.weight"):
        keep = _nm_brute(scores[k], n, m)
        assert torch.equal(weights[k], torch.where(keep, dense[k], torch.zeros(())))
        assert removed[k] == weights[k].numel() * (m - n) // m


def test_parse_nm() -> None:
    assert parse_nm("2:4") == (2, 4) and parse_nm(" 1 : 8 ") == (1, 8) and parse_nm("channel") is None
    for bad in ("0:4", "4:4", "5:4"):
        with pytest.raises(InputError):
            parse_nm(bad)


def test_nm_end_to_end(tmp_path: Path, save_model) -> None:
    from prunecli.api.prune import prune

    model = _model("improved_cnn", seed=3)
    src = save_model(model, tmp_path / "m.safetensors", "improved_cnn", 10)
    res = prune(
        PruneRequest.build(checkpoint=str(src), method="magnitude", structure="2:4", output=tmp_path / "p.safetensors")
    )
    ours = _load_weights(tmp_path / "p.safetensors")
    assert res.metrics["nm_skipped"] == ["features.0.conv.weight"]  # 3·3·3 = 27 inputs per filter
    for name in ("features.1.conv", "features.2.conv", "fc1"):
        w = model.get_submodule(name).weight.detach()
        keep = _nm_brute(w.abs(), 2, 4)
        assert torch.equal(ours[f"{name}.weight"], torch.where(keep, w, torch.zeros(())))
    assert res.metrics["selected_sparsity"] == 0.5 and res.metrics["target_ratio"] == 0.5


# --------------------------------------------------------------------------- MACs and metrics


def test_macs_and_storage_metrics(tmp_path: Path, save_model) -> None:
    from prunecli.api.prune import prune
    from prunecli.checkpoint.loaders import load_checkpoint

    model = _model("improved_cnn", seed=4)
    src = save_model(model, tmp_path / "m.safetensors", "improved_cnn", 10)
    res = prune(
        PruneRequest.build(checkpoint=str(src), method="magnitude", ratio=0.4, output=tmp_path / "p.safetensors")
    )
    m = res.metrics
    # hand count at 3×32×32: positions × (out · in · kh · kw) for the convs, in·out for the linears
    positions = {"features.0.conv": 32 * 32, "features.1.conv": 16 * 16, "features.2.conv": 8 * 8, "fc1": 1, "fc2": 1}
    ours = _load_weights(tmp_path / "p.safetensors")
    assert m["macs"] == 32 * 32 * 64 * 27 + 16 * 16 * 128 * 576 + 8 * 8 * 256 * 1152 + 4096 * 512 + 512 * 10
    assert m["macs_nonzero"] == sum(p * int(ours[f"{n}.weight"].count_nonzero()) for n, p in positions.items())
    assert m["params"] == sum(t.numel() for n, t in model.named_parameters())
    assert m["params_nonzero"] == sum(int(ours[n].count_nonzero()) for n, _ in model.named_parameters())
    loaded = load_checkpoint(str(tmp_path / "p.safetensors"))
    masked = [f"{n}.weight" for n in positions if n != "fc2"]
    assert loaded.manifest.masked == sorted(masked)
    expect = sum(
        math.ceil(t.numel() / 8) + 4 * int(t.count_nonzero()) if n in masked else t.numel() * t.element_size()
        for n, t in ours.items()
    )
    assert m["bitmask_bytes"] == expect
    assert m["layers"]["fc2.weight"] == 0.0
    assert all(m["layers"][n] == round(0.4 * ours[n].numel()) / ours[n].numel() for n in masked)
    assert loaded.manifest.lineage[-1]["command"] == "prune"


def test_same_inputs_same_bytes(tmp_path: Path, save_model) -> None:
    from prunecli.api.prune import prune

    src = save_model(_model("fc_mlp", seed=5), tmp_path / "m.safetensors", "fc_mlp", 10)
    a = prune(
        PruneRequest.build(
            checkpoint=str(src), method="magnitude", ratio=0.5, scope="global", output=tmp_path / "a.safetensors"
        )
    )
    b = prune(
        PruneRequest.build(
            checkpoint=str(src), method="magnitude", ratio=0.5, scope="global", output=tmp_path / "b.safetensors"
        )
    )
    assert a.sha256 == b.sha256


# --------------------------------------------------------------------------- bias compensation (paper E)


def _digits_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from prunecli.data import build_dataset, data_config, make_loader
    from prunecli.models import default_pretrained_cfg

    cfg = data_config(default_pretrained_cfg("fc_mlp"))
    ds = build_dataset(f"digits:{split}", cfg, default_split="test", train=False, augment=False, num_classes=10)
    (x, y), *_ = list(make_loader(ds, batch_size=len(ds.dataset)))  # one batch: normalised as the commands see it
    return x, y


def _closed_form_biascomp(model: nn.Module, x: torch.Tensor, names: list[str]) -> tuple[dict, dict]:
    """Paper E (docs/bias-compensation.md), output-Jacobian sensitivity a_si = Σ_k (∂f_k(x_s)/∂y_si)²:
    δ* = W·M1/A, I = W²(M2 − M1²/A) with A = Σ_s a, M1 = aᵀX, M2 = aᵀX², accumulated in float64."""
    acts: dict[str, torch.Tensor] = {}
    sens: dict[str, torch.Tensor] = {}
    hooks = []
    for n in names:

        def fwd(_m, inp, out, n=n):
            acts[n] = inp[0].detach().double()
            out.register_hook(lambda g, n=n: sens.__setitem__(n, sens.get(n, 0) + g.detach().double() ** 2))

        hooks.append(model.get_submodule(n).register_forward_hook(fwd))
    model.eval()
    for k in range(10):  # one backward pass per output
        model(x)[:, k].sum().backward()
    for h in hooks:
        h.remove()
    scores, shifts = {}, {}
    for n in names:
        w = model.get_submodule(n).weight.detach().double()
        big_a = sens[n].sum(0)
        m1 = sens[n].T @ acts[n]
        m2 = sens[n].T @ acts[n] ** 2
        safe = torch.where(big_a > 0, big_a, torch.ones_like(big_a))[:, None]
        shifts[f"{n}.weight"] = torch.where(big_a[:, None] > 0, w * m1 / safe, 0.0).float()
        scores[f"{n}.weight"] = (w**2 * (m2 - m1**2 / safe)).clamp_min(0).float()
    return scores, shifts


@pytest.fixture(scope="module")
def digits_mlp() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    train, test = _digits_tensors("train"), _digits_tensors("test")
    model = _model("fc_mlp", seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(400):
        idx = torch.randint(len(train[0]), (128,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(train[0][idx]), train[1][idx]).backward()
        opt.step()
    return model.eval(), train, test


def test_bias_compensation_lowers_loss(tmp_path: Path, save_model, digits_mlp) -> None:
    from prunecli.api.prune import prune
    from prunecli.checkpoint.loaders import load_checkpoint
    from prunecli.scores import ScoresFile, save_scores

    model, train, test = digits_mlp
    src = save_model(model, tmp_path / "m.safetensors", "fc_mlp", 10)
    base = load_checkpoint(str(src))
    scores, shifts = _closed_form_biascomp(base.model, train[0], ["fc1", "fc2"])  # the head stays (default)
    sf = ScoresFile("biascomp", "weight", scores, {"bias_shift": shifts}, checkpoint_sha256=base.sha256)
    save_scores(tmp_path / "bc.scores", sf)

    def test_loss(path: Path) -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(load_checkpoint(str(path)).model(test[0]), test[1]))

    dense = test_loss(src)
    for ratio in (0.5, 0.7, 0.8):
        kw = dict(scores=str(tmp_path / "bc.scores"), ratio=ratio)  # biascomp → global scope by default
        plain = prune(PruneRequest.build(checkpoint=str(src), output=tmp_path / f"plain{ratio}.safetensors", **kw))
        comp = prune(
            PruneRequest.build(
                checkpoint=str(src), output=tmp_path / f"comp{ratio}.safetensors", compensate="bias", **kw
            )
        )
        a, b = (
            _load_weights(tmp_path / f"plain{ratio}.safetensors"),
            _load_weights(tmp_path / f"comp{ratio}.safetensors"),
        )
        for n in scores:  # same weights removed; only the biases differ
            assert torch.equal(a[n], b[n])
            removed = (a[n] == 0) & (base.model.get_submodule(n.removesuffix(".weight")).weight.detach() != 0)
            expect = base.model.get_submodule(n.removesuffix(".weight")).bias.detach().double() + (
                shifts[n].double() * removed
            ).sum(1)
            assert torch.allclose(b[n.replace(".weight", ".bias")].double(), expect, atol=1e-6)
        assert comp.metrics["compensated"]["bias"] == sorted(scores)
        assert plain.metrics["scope"] == "global"
        assert plain.metrics["selected_sparsity"] == comp.metrics["selected_sparsity"] == round(ratio * 49200) / 49200
        lp, lc = test_loss(tmp_path / f"plain{ratio}.safetensors"), test_loss(tmp_path / f"comp{ratio}.safetensors")
        assert lc < lp, (ratio, dense, lp, lc)


def test_bias_shift_folds_into_following_batchnorm() -> None:
    """A bias-free conv followed by BN: running_mean −= δ equals adding δ to the conv output (eval)."""
    from prunecli.pruning.compensate import BiasCompensation
    from prunecli.tracing import trace_layers

    model = _model("test_resnet", seed=6, num_classes=10)
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    trace = trace_layers(model, (3, 64, 64))
    assert trace.bn_after["conv1.0"] == "conv1.1" and trace.bn_after["layer1.0.conv1"] == "layer1.0.bn1"
    conv = model.get_submodule("layer1.0.conv1")
    assert conv.bias is None
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(conv.weight.shape, generator=gen)
    removed = torch.rand(conv.weight.shape, generator=gen) < 0.5
    shift = (delta * removed).flatten(1).sum(1)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    handle = conv.register_forward_hook(lambda _m, _i, out: out + shift[None, :, None, None])
    with torch.no_grad():
        reference = model(x)
    handle.remove()
    layers = {"layer1.0.conv1.weight": conv}
    comp = BiasCompensation(layers, {"layer1.0.conv1.weight": delta}, trace.bn_after, dict(model.named_modules()))
    comp("layer1.0.conv1.weight", removed)
    with torch.no_grad():
        assert torch.allclose(model(x), reference, atol=1e-5)
    assert comp.summary()["running_mean"] == {"layer1.0.conv1.weight": "layer1.0.bn1"}


def test_compensation_skips_layers_without_bias_or_bn(caplog) -> None:
    from prunecli.pruning.compensate import BiasCompensation
    from prunecli.tracing import trace_layers

    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.LayerNorm(3))
    trace = trace_layers(model, (4,))
    comp = BiasCompensation(
        {"0.weight": model[0]}, {"0.weight": torch.ones(3, 4)}, trace.bn_after, dict(model.named_modules())
    )
    before = model.state_dict()
    comp("0.weight", torch.ones(3, 4, dtype=torch.bool))
    assert comp.summary()["skipped"] == ["0.weight"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "neither a bias nor a following BatchNorm" in caplog.text


def test_random_pick_of_scopes_is_exact() -> None:
    """Achieved count == round(r·N) for many random sizes/ratios, both scopes (independent of torch)."""
    rnd = random.Random(0)
    for _ in range(30):
        sizes = {f"l{i}.weight": rnd.randint(3, 300) for i in range(rnd.randint(1, 5))}
        ratio = rnd.choice([0.1, 0.25, 0.5, 0.33, 0.6])
        scope = rnd.choice(["layer", "global"])
        weights = {n: torch.randn(s) for n, s in sizes.items()}
        try:
            scopes = plan_scopes(sizes, ratio, scope)
            prune_unstructured(weights, lambda n, w=weights: w[n].abs(), scopes)
        except InputError:
            continue
        if scope == "layer":
            assert all(int((weights[n] == 0).sum()) == round(ratio * s) for n, s in sizes.items())
        else:
            assert sum(int((w == 0).sum()) for w in weights.values()) == round(ratio * sum(sizes.values()))
