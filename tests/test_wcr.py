"""WCR (paper C, docs/wcr.md): the term against an independent float64 computation, its closed form,
its gradient, which tensors it covers, and that it concentrates weights during training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from prunecli.wcr import WCR, abs_variance, wcr_params, wcr_penalty

SHAPES = [(7, 5), (16, 3, 3, 3), (10, 64), (4, 4, 1, 1), (300, 100)]


def _r_numpy(arrays: list[np.ndarray], eps: float, delta: float) -> float:
    """The regulariser of docs/wcr.md written out in float64 numpy: Σ 1/(mean((u − mean u)²) + δ), u = sqrt(w² + ε)."""
    total = 0.0
    for w in arrays:
        if w.size < 2:
            continue
        u = np.sqrt(w.astype(np.float64) ** 2 + eps)
        total += 1.0 / (np.mean((u - np.mean(u)) ** 2) + delta)
    return total


@pytest.mark.parametrize("scale", [1.0, 0.05, 1e-3])
def test_penalty_matches_float64_formula(scale: float) -> None:
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(s, generator=g) * scale for s in SHAPES] + [torch.randn(1, 1, generator=g)]  # numel 1: skipped
    for eps, delta in [(1e-8, 1e-8), (1e-4, 1e-3)]:
        got = float(wcr_penalty(ws, eps, delta))
        want = _r_numpy([w.numpy() for w in ws], eps, delta)
        assert got == pytest.approx(want, rel=1e-4)


def test_closed_form_energy_and_hoyer() -> None:
    """docs/wcr.md: V = (E/n)(1 − ρ²), ρ = L1/(√n √E) = 1 − (1 − 1/√n) H with H the Hoyer sparsity."""
    g = torch.Generator().manual_seed(2)
    eps = 1e-8
    for shape in SHAPES:
        w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g)  # uneven magnitudes
        u = np.sqrt(w.double().numpy().ravel() ** 2 + eps)
        n, e, l1 = u.size, float(np.sum(u**2)), float(np.sum(u))
        rho = l1 / (np.sqrt(n) * np.sqrt(e))
        hoyer = (np.sqrt(n) - l1 / np.sqrt(e)) / (np.sqrt(n) - 1)
        assert rho == pytest.approx(1 - (1 - 1 / np.sqrt(n)) * hoyer, rel=1e-12)
        v = float(abs_variance(w, eps))
        assert v == pytest.approx(e / n * (1 - rho**2), rel=1e-4)
        assert 1 / v == pytest.approx(n / (e * (1 - (1 - (1 - 1 / np.sqrt(n)) * hoyer) ** 2)), rel=1e-4)


def test_gradient_matches_analytic_form() -> None:
    """docs/wcr.md: ∂R/∂w_k = −(V+δ)⁻² (2/n)(u_k − ū) w_k/u_k — big weights are pushed up, small ones down."""
    eps, delta = 1e-6, 1e-8
    w = (torch.randn(12, 9, generator=torch.Generator().manual_seed(3)) * 0.1).requires_grad_(True)
    wcr_penalty([w], eps, delta).backward()
    x = w.detach().double().numpy()
    u = np.sqrt(x**2 + eps)
    v = np.mean((u - u.mean()) ** 2)
    want = -((v + delta) ** -2) * (2 / u.size) * (u - u.mean()) * x / u
    np.testing.assert_allclose(w.grad.double().numpy(), want, rtol=2e-3, atol=1e-6 * np.abs(want).max())
    big = u > u.mean()
    assert np.all(np.sign(-want[big]) == np.sign(x[big]))  # descent grows |w| above the mean …
    assert np.all(np.sign(-want[~big]) == -np.sign(x[~big]))  # … and shrinks it below


def test_covers_trainable_conv_and_linear_weights_only() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 4), nn.LayerNorm(4), nn.Linear(4, 1),
        nn.Linear(1, 1),  # numel 1: skipped
    )  # fmt: skip
    model[5].weight.requires_grad_(False)
    names = set(wcr_params(model))
    assert names == {"0.weight", "3.weight"}
    assert set(wcr_params(model, lambda n, p: n.startswith("3."))) == {"3.weight"}


def test_float32_under_autocast_and_stats() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    reg = WCR.for_model(model, 1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = reg()
    assert value.dtype == torch.float32
    want = 1e-4 * _r_numpy([model[0].weight.detach().numpy(), model[2].weight.detach().numpy()], 1e-8, 1e-8)
    assert float(value.detach()) == pytest.approx(want, rel=1e-4)
    stats = reg.stats()
    assert stats["value"] == pytest.approx(want, rel=1e-4)
    assert set(stats["var_abs"]) == {"0.weight", "2.weight"}
    w = np.abs(model[0].weight.detach().double().numpy())
    assert stats["var_abs"]["0.weight"] == pytest.approx(np.var(w), rel=1e-4)


def test_training_with_wcr_raises_every_layers_variance(cli, tmp_path) -> None:
    """--wcr 1e-4 vs λ = 0, same seed and steps on digits: each layer's Var(|w|) is larger (read back from disk)."""
    from safetensors.numpy import load_file

    common = ["--data", "digits:train", "--max-steps", "12", "--batch-size", "32", "--seed", "0", "--device", "cpu"]
    runs = {}
    for lam in ("0", "1e-4"):
        out = tmp_path / f"wcr{lam}.safetensors"
        r = cli("finetune", "arch:improved_cnn", *common, "--wcr", lam, "-o", out)
        assert r.exit_code == 0, r.stderr
        assert r.record["metrics"]["steps"] == 12
        runs[lam] = load_file(str(out))
    layers = [k for k, v in runs["0"].items() if k.endswith("weight") and v.ndim > 1]
    assert len(layers) == 5  # 3 convs + fc1 + fc2
    for name in layers:
        var0 = np.var(np.abs(runs["0"][name].astype(np.float64)))
        var1 = np.var(np.abs(runs["1e-4"][name].astype(np.float64)))
        assert var1 > var0, name
    assert r.record["metrics"]["wcr"]["lambda"] == 1e-4
    assert r.record["metrics"]["wcr"]["value"] > 0
