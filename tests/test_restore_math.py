"""Restoration math (docs/restoration.md) checked against independent computations.

Pruned models are built here by slicing a dense model by hand with a structure dict in the format
channel pruning writes, so these tests do not depend on how pruning chose its channels. "Exact"
claims are checked against the *dense model's own forward pass*.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunecli.api.restore import restore_model
from prunecli.restoration.core import ProducerStats
from prunecli.restoration.lbyl import lbyl_coefficients, lbyl_system, solve_batched

torch.set_default_dtype(torch.float32)


def slice_model(dense: nn.Module, channels: dict) -> nn.Module:
    """The dense model with the kept channels of ``channels`` cut out (weights, biases, BN tensors)."""
    model = copy.deepcopy(dense)
    with torch.no_grad():
        for name, entry in channels.items():
            mod = model.get_submodule(name)
            out = entry.get("out", {}).get("kept")
            inn = entry.get("in", {}).get("kept")
            for pname in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(mod, pname, None)
                if t is None:
                    continue
                new = t.data
                if out is not None:
                    new = new[out]
                if inn is not None and pname == "weight" and new.ndim > 1:
                    new = new[:, inn]
                if isinstance(t, nn.Parameter):
                    setattr(mod, pname, nn.Parameter(new.clone()))
                else:
                    setattr(mod, pname, new.clone())
    return model.eval()


def entry(kept: list[int], dense: int, axis: str = "out") -> dict:
    return {axis: {"kept": kept, "dense": dense}}


class ConvNet(nn.Module):
    """conv1 → BN → act → conv2 (no padding, so constant channels fold exactly)."""

    def __init__(self, act: nn.Module, c1: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.act = act
        self.conv2 = nn.Conv2d(c1, 5, 3, padding=0, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.bn1(self.conv1(x))))


def _randomise_bn(bn: nn.BatchNorm2d | nn.BatchNorm1d, gen: torch.Generator) -> None:
    c = bn.num_features
    bn.weight.data = torch.rand(c, generator=gen) + 0.5
    bn.bias.data = torch.randn(c, generator=gen) * 0.2
    bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
    bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def _conv_plan(c1: int, kept: list[int]) -> dict:
    return {
        "channels": {
            "conv1": entry(kept, c1),
            "bn1": entry(kept, c1),
            "conv2": entry(kept, c1, "in"),
        }
    }


def _multiple_net(act: nn.Module) -> ConvNet:
    """Channel 3 is an exact positive multiple (after BN) of channel 0: n_3 = S·n_0."""
    gen = torch.Generator().manual_seed(0)
    net = ConvNet(act).eval()
    with torch.no_grad():
        _randomise_bn(net.bn1, gen)
        w = net.conv1.weight
        w[3] = 2.0 * w[0]
        bn = net.bn1
        sig = torch.sqrt(bn.running_var + bn.eps)
        s_big = 2.0 * bn.weight[3] * sig[0] / (sig[3] * bn.weight[0])
        bn.bias[3] = s_big * (bn.bias[0] - bn.weight[0] * bn.running_mean[0] / sig[0]) + (
            bn.weight[3] * bn.running_mean[3] / sig[3]
        )
    return net


@pytest.mark.parametrize("method", ["lbyl", "merge"])
def test_positive_multiple_restored_exactly(method: str) -> None:
    net = _multiple_net(nn.ReLU())
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    plan = _conv_plan(4, [0, 1, 2])
    pruned = slice_model(net, plan["channels"])
    params = {"lambda1": 0.0, "lambda2": 1e-12} if method == "lbyl" else {}
    with torch.no_grad():
        ref = net(x)
        plain = pruned(x)
    assert (plain - ref).abs().max() > 1e-2  # pruning alone does change the output
    report = restore_model(pruned, net, plan, method, params=params, example_input=x[:1])
    assert report.layers[method]["conv1"]["pruned"] == 1
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref, atol=1e-4, rtol=1e-4)


def test_span_restored_exactly_with_linear_activation_no_bn() -> None:
    gen = torch.Generator().manual_seed(2)
    net = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3)).eval()
    with torch.no_grad():
        w, b = net[0].weight, net[0].bias
        alpha = torch.tensor([0.5, -1.3, 0.7, 0.0])
        w[4] = alpha @ w[:4]
        b[4] = alpha @ b[:4]
    plan = {"channels": {"0": entry([0, 1, 2, 3], 5), "1": entry([0, 1, 2, 3], 5, "in")}}
    pruned = slice_model(net, plan["channels"])
    x = torch.randn(16, 6, generator=gen)
    restore_model(pruned, net, plan, "lbyl", params={"lambda2": 1e-12}, example_input=x[:1])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), atol=1e-4, rtol=1e-4)


def test_span_restored_exactly_with_linear_activation_bn() -> None:
    """Linear → BN1d → Linear: signed combination, BN scales differ; exact in math mode."""
    gen = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5), nn.Linear(5, 3)).eval()
    with torch.no_grad():
        _randomise_bn(net[1], gen)
        alpha = torch.tensor([0.5, -1.3, 0.7, 0.2], dtype=torch.float64)
        w = net[0].weight
        w[4] = (alpha @ w[:4].double()).float()
        bn = net[1]
        sig = torch.sqrt(bn.running_var.double() + bn.eps)
        a = bn.running_mean.double() - sig * bn.bias.double() / bn.weight.double()
        a4 = alpha @ a[:4]  # zero bias error: a_j = a_Pᵀ s
        bn.running_mean[4] = float(a4 + sig[4] * bn.bias[4].double() / bn.weight[4].double())
    kept = [0, 1, 2, 3]
    plan = {"channels": {"0": entry(kept, 5), "1": entry(kept, 5), "2": entry(kept, 5, "in")}}
    pruned = slice_model(net, plan["channels"])
    x = torch.randn(32, 6, generator=gen)
    restore_model(pruned, net, plan, "lbyl", params={"lambda1": 1e-3, "lambda2": 1e-12}, example_input=x[:2])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), atol=1e-4, rtol=1e-4)


def test_compat_mode_is_not_exact_on_the_same_case() -> None:
    """The reference code's conventions (σ = variance, s applied without K) break the exact identity."""
    net = _multiple_net(nn.ReLU())
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    plan = _conv_plan(4, [0, 1, 2])
    pruned = slice_model(net, plan["channels"])
    restore_model(pruned, net, plan, "lbyl", params={"lambda1": 0.0, "lambda2": 1e-12, "mode": "compat"},
                  example_input=x[:1])  # fmt: skip
    with torch.no_grad():
        assert (pruned(x) - net(x)).abs().max() > 1e-3


def _random_system(p: int, n: int, d: int, seed: int, compat: bool = False):
    gen = torch.Generator().manual_seed(seed)
    c = 3 * p
    stats = ProducerStats(
        weight=torch.randn(c, d, generator=gen, dtype=torch.float64),
        bias=torch.zeros(c, dtype=torch.float64),
        gamma=torch.rand(c, generator=gen, dtype=torch.float64) + 0.3,
        beta=torch.randn(c, generator=gen, dtype=torch.float64) * 0.3,
        mean=torch.randn(c, generator=gen, dtype=torch.float64),
        var=torch.rand(c, generator=gen, dtype=torch.float64) + 0.5,
        eps=1e-5,
    )
    kept, pruned = list(range(0, c, 3))[:p], [i for i in range(c) if i % 3][:n]
    return stats, kept, pruned


@pytest.mark.parametrize("mode", ["math", "compat"])
@pytest.mark.parametrize(("p", "d"), [(12, 40), (20, 9)])  # p > d: G singular, λ2 makes it solvable
def test_batched_solve_equals_per_filter_linalg_solve(mode: str, p: int, d: int) -> None:
    stats, kept, pruned = _random_system(p, 15, d, seed=p + d)
    g, b, m, c, _ = lbyl_system(stats, kept, pruned, lambda1=0.3, lambda2=0.05, mode=mode)
    s, _ = solve_batched(g, b, m, c)
    for col in range(b.shape[1]):
        ref = torch.linalg.solve(g + c[col] * m, b[:, col])
        torch.testing.assert_close(s[:, col], ref, atol=1e-9, rtol=1e-7)


def test_closed_form_minimises_the_lbyl_objective() -> None:
    """Finite-difference gradient of L_j(s) (written out from docs/restoration.md) vanishes at the solution."""
    stats, kept, pruned = _random_system(6, 3, 27, seed=5)
    l1, l2 = 0.3, 0.05
    s_prime, _ = lbyl_coefficients(stats, kept, pruned, lambda1=l1, lambda2=l2, mode="math")
    sig = torch.sqrt(stats.var + stats.eps)
    a = stats.mean - sig * stats.beta / stats.gamma
    for r, j in enumerate(pruned):
        k = stats.gamma[j] * sig[kept] / (sig[j] * stats.gamma[kept])
        s = s_prime[r] / k  # back from s' = K ⊙ s
        cj = (stats.gamma[j] / sig[j]) ** 2

        def loss(v: torch.Tensor, j: int = j, k: torch.Tensor = k, cj: torch.Tensor = cj) -> float:
            re = ((stats.weight[j] - v @ stats.weight[kept]) ** 2).sum()
            be = l1 * cj * (a[j] - a[kept] @ v) ** 2
            return float(re + be + l2 * ((k * v) ** 2).sum())

        eye = torch.eye(len(kept), dtype=torch.float64)
        grad = torch.tensor([(loss(s + 1e-6 * e) - loss(s - 1e-6 * e)) / 2e-6 for e in eye])
        assert grad.abs().max() < 1e-5


def test_identity_of_section_2_3() -> None:
    """n_j = Σ s'_i n_i + (γ_j/σ_j)[r_j·x + (a_Pᵀ s − a_j)] for any s, with K from lbyl_system."""
    stats, kept, pruned = _random_system(5, 1, 27, seed=7)
    j = pruned[0]
    _, _, _, _, k = lbyl_system(stats, kept, [j], lambda1=0.0, lambda2=1.0, mode="math")
    gen = torch.Generator().manual_seed(8)
    s = torch.randn(len(kept), generator=gen, dtype=torch.float64)
    x = torch.randn(50, 27, generator=gen, dtype=torch.float64)
    sig = torch.sqrt(stats.var + stats.eps)
    n = stats.gamma / sig * (x @ stats.weight.T - stats.mean) + stats.beta
    a = stats.mean - sig * stats.beta / stats.gamma
    r = stats.weight[j] - s @ stats.weight[kept]
    rhs = n[:, kept] @ (k[0] * s) + stats.gamma[j] / sig[j] * (x @ r + (a[kept] @ s - a[j]))
    torch.testing.assert_close(n[:, j], rhs)


def test_zero_gamma_channel_folds_into_consumer_bias() -> None:
    """A pruned channel with γ = 0 outputs ReLU(β): added to the consumer bias, exact without padding."""
    gen = torch.Generator().manual_seed(4)
    net = ConvNet(nn.ReLU()).eval()
    with torch.no_grad():
        _randomise_bn(net.bn1, gen)
        net.bn1.weight[2] = 0.0
        net.bn1.bias[2] = 0.7
    kept = [0, 1, 3]
    plan = _conv_plan(4, kept)
    pruned = slice_model(net, plan["channels"])
    x = torch.randn(3, 3, 8, 8, generator=gen)
    # independent expectation: plain pruning misses exactly 0.7 · Σ_uv W2[:, 2]
    with torch.no_grad():
        expected_gap = 0.7 * net.conv2.weight[:, 2].sum(dim=(1, 2))
        gap = (net(x) - pruned(x)).mean(dim=(0, 2, 3))
    torch.testing.assert_close(gap, expected_gap, atol=1e-5, rtol=1e-5)
    report = restore_model(pruned, net, plan, "lbyl", params={"lambda2": 1e3}, example_input=x[:1])
    assert report.layers["lbyl"]["conv1"]["constant_channels"] == 1
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), atol=1e-5, rtol=1e-5)


def test_depthwise_consumer_is_refused_and_the_rest_restored() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
            self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
            self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dw(torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))))

    net = Net().eval()
    kept = [0, 2, 3, 5]
    conv2 = {**entry(kept, 6), **entry(kept, 6, "in")}
    plan = {"channels": {"conv1": entry(kept, 6), "bn1": entry(kept, 6), "conv2": conv2, "bn2": entry(kept, 6),
                         "dw": entry(kept, 6)}}  # fmt: skip
    pruned = slice_model(net, plan["channels"])
    pruned.dw.groups = 4
    before = pruned.conv2.weight.detach().clone()
    report = restore_model(pruned, net, plan, "lbyl", example_input=torch.randn(1, 3, 8, 8))
    assert "depthwise" in report.refused["conv2"]
    assert any("conv2" in w and "depthwise" in w for w in report.warnings)
    assert "conv1" in report.layers["lbyl"]
    assert not torch.equal(before, pruned.conv2.weight)  # conv1's channels were folded into conv2


def test_lstsq_equals_independent_least_squares() -> None:
    gen = torch.Generator().manual_seed(9)
    net = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 4)).eval()
    kept = [0, 1, 3, 4, 6, 8]
    plan = {"channels": {"0": entry(kept, 10), "2": entry(kept, 10, "in")}}
    pruned = slice_model(net, plan["channels"])
    x = torch.randn(200, 8, generator=gen)
    with torch.no_grad():
        feats = torch.relu(pruned[0](x)).double()
        design = torch.cat([feats, torch.ones(200, 1, dtype=torch.float64)], 1)
        target = net(x).double()
        sol = torch.linalg.lstsq(design, target).solution  # (7, 4)
    restore_model(pruned, net, plan, "lstsq", params={"ridge": 1e-12, "samples": 200}, calib=[x[:100], x[100:]])
    torch.testing.assert_close(pruned[2].weight.double(), sol[:-1].T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pruned[2].bias.double(), sol[-1], atol=1e-4, rtol=1e-4)


def test_lstsq_with_fewer_samples_than_inputs_equals_the_explicit_ridge_solution() -> None:
    """5 samples, 31 unknowns per output: the refit takes the N×N dual path; the reference is the primal
    ridge formula with an explicit inverse, ``W = (XᵀX + λI)⁻¹(XᵀY + λW₀)``, λ = ridge·tr(XᵀX)/D."""
    gen = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(8, 40), nn.ReLU(), nn.Linear(40, 4)).eval()
    kept = list(range(0, 40, 4)) + list(range(1, 40, 2))
    kept = sorted(set(kept))[:30]
    plan = {"channels": {"0": entry(kept, 40), "2": entry(kept, 40, "in")}}
    pruned = slice_model(net, plan["channels"])
    x = torch.randn(5, 8, generator=gen)
    ridge = 0.05
    with torch.no_grad():
        feats = torch.relu(pruned[0](x)).double()
        design = torch.cat([feats, torch.ones(5, 1, dtype=torch.float64)], 1)  # (5, 31)
        target = net(x).double()
        w0 = torch.cat([pruned[2].weight.double(), pruned[2].bias.double()[:, None]], 1)  # (4, 31)
        d = design.shape[1]
        lam = ridge * float((design**2).sum()) / d
        ref = torch.linalg.inv(design.T @ design + lam * torch.eye(d, dtype=torch.float64)) @ (
            design.T @ target + lam * w0.T
        )
    restore_model(pruned, net, plan, "lstsq", params={"ridge": ridge, "samples": 5}, calib=[x[:2], x[2:]])
    # float32 weights at the end: the stored result is exact to float32 rounding of values of size ~1
    torch.testing.assert_close(pruned[2].weight.double(), ref[:-1].T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pruned[2].bias.double(), ref[-1], atol=1e-5, rtol=1e-5)
