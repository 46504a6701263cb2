"""OBS / SparseGPT reconstruction (prunecli.reconstruction) against independent computations.

References built here, in float64, without the library's solver:
* ``brute_sequential`` — the schedule by definition: for each row and each pruned column j in order,
  the OBS step with the explicit inverse of the (dampened) Gram matrix restricted to the columns j..d;
* ``lstsq_optimum`` — the best weights on the kept inputs, per row, by ``torch.linalg.lstsq``;
* the Gram matrices are checked through the layer's own forward: ``Σ_g Δ_g H_g Δ_gᵀ = ‖layer_Δ(x)‖²``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from prunecli.errors import CheckpointError, InputError
from prunecli.reconstruction import NM, GramAccumulator, dampen, obs_prune, reconstruct
from prunecli.reconstruction.masked import restore_masked
from prunecli.reconstruction.obs import row_errors, selector, sparsegpt_solve

DT = torch.float64
EPS = torch.finfo(DT).eps


def correlated_inputs(d: int, n: int, seed: int = 0) -> torch.Tensor:
    """``d × n`` inputs with unequal scales and correlated rows (so the updates matter)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=DT) * 0.4 + torch.eye(d, dtype=DT)
    return (mix @ torch.randn(d, n, generator=g, dtype=DT)) * torch.linspace(0.3, 2.0, d, dtype=DT)[:, None]


def brute_sequential(w: torch.Tensor, h_damped: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
    """Per row, per pruned column j (left to right): δ = −w_j / [H_F⁻¹]_jj · [H_F⁻¹]_j,: with F = {j, …, d−1}."""
    w = w.clone()
    d = w.shape[1]
    for i in range(w.shape[0]):
        for j in range(d):
            if prune[i, j]:
                f = torch.arange(j, d)
                hi = torch.linalg.inv(h_damped[f][:, f])
                w[i, f] -= w[i, j] / hi[0, 0] * hi[0]
                w[i, j] = 0.0
    return w


def lstsq_optimum(w: torch.Tensor, x: torch.Tensor, keep: torch.Tensor, mu: float = 0.0) -> torch.Tensor:
    """Per row: argmin over ŵ supported on the kept columns of ‖(w − ŵ) X‖² + μ‖w − ŵ‖² (μ: the dampening)."""
    d = x.shape[0]
    a = torch.cat([x, mu**0.5 * torch.eye(d, dtype=DT)], dim=1)  # (w−ŵ)A·(w−ŵ)Aᵀ = (w−ŵ)(H + μI)(w−ŵ)ᵀ
    out = torch.zeros_like(w)
    for i in range(w.shape[0]):
        k = keep[i].nonzero().flatten()
        sol = torch.linalg.lstsq(a[k].T, (w[i] @ a)[:, None]).solution.flatten()
        out[i, k] = sol
    return out


def guarded_reference(w: torch.Tensor, h: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """:func:`brute_sequential` on the dampened H, then, per row, the plain mask where that is better on H."""
    ref = brute_sequential(w, dampen(h, damp)[0], ~keep)
    masked = w * keep
    return torch.where((row_errors(w, ref, h) > row_errors(w, masked, h))[:, None], masked, ref)


def loss(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - w_hat) @ x).pow(2).sum())


def conv_gram(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    acc = GramAccumulator(conv)
    acc.add(x)
    return acc.h


# ---------------------------------------------------------------- Gram matrices through the layer's forward


def _layers() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    from timm.layers import Conv2dSame

    return [
        ("linear-tokens", nn.Linear(6, 5), (3, 4, 6)),
        ("conv", nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=2), (2, 3, 9, 8)),
        ("grouped", nn.Conv2d(4, 6, (3, 2), padding=(1, 0), groups=2), (2, 4, 7, 7)),
        ("depthwise", nn.Conv2d(3, 6, 3, padding=1, groups=3), (2, 3, 6, 6)),
        ("reflect", nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 2, 5, 6)),
        ("same", nn.Conv2d(2, 3, (2, 3), padding="same"), (2, 2, 5, 6)),
        ("timm-same", Conv2dSame(2, 3, 3, stride=2), (2, 2, 7, 6)),
        ("conv1d", nn.Conv1d(3, 4, 3, stride=2, padding=2, groups=1), (2, 3, 11)),
    ]


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch notes an internal padded copy; harmless
@pytest.mark.parametrize("case", _layers(), ids=lambda c: c[0])
def test_gram_matches_layer_forward(case: tuple[str, nn.Module, tuple[int, ...]]) -> None:
    _, layer, shape = case
    torch.manual_seed(0)
    layer = layer.double()
    x = torch.randn(*shape, dtype=DT)
    acc = GramAccumulator(layer)
    acc.add(x[:1])
    acc.add(x[1:])  # two batches sum to the Gram of all positions
    probe = copy.deepcopy(layer)
    probe.bias = None
    g = acc.h.shape[0]
    for _ in range(3):
        delta = torch.randn_like(layer.weight)
        probe.weight.data.copy_(delta)
        direct = float(probe(x).detach().pow(2).sum())
        rows = delta.reshape(g, delta.shape[0] // g, -1)
        via_h = float(sum((rows[i] @ acc.h[i] * rows[i]).sum() for i in range(g)))
        # float64 sums of O(100) products: relative rounding ~1e-14; 1e-10 leaves room, a wrong H is off by O(1)
        assert via_h == pytest.approx(direct, rel=1e-10)
    assert acc.positions == probe(x).numel() // layer.weight.shape[0]  # one position per output value of a row


# ---------------------------------------------------------------- the schedule equals the sequential OBS definition


def _check_schedule(w: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> None:
    h_damped, _ = dampen(h, 0.01)
    # the references invert submatrices of h_damped; rounding grows with its condition number
    cond = float(torch.linalg.cond(h_damped))
    assert cond < 1e6
    tol = 100 * cond * EPS * float(w.abs().max())
    ref = brute_sequential(w, h_damped, ~keep)
    for blocksize in (w.shape[1], 3, 1):  # one block; blocks not dividing d; one column per block
        got, prune = sparsegpt_solve(w, h_damped, selector(keep, w.shape[1]), blocksize=blocksize)
        assert torch.equal(prune, ~keep)
        assert torch.allclose(got, ref, rtol=0, atol=tol), (blocksize, float((got - ref).abs().max()))


def test_linear_schedule_equals_brute_force_sequential_obs() -> None:
    x = correlated_inputs(10, 200)
    w = torch.randn(6, 10, dtype=DT, generator=torch.Generator().manual_seed(1))
    keep = torch.rand(6, 10, generator=torch.Generator().manual_seed(2)) > 0.5
    _check_schedule(w, x @ x.T, keep)


def test_conv_schedule_equals_brute_force_sequential_obs() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 4, 3, padding=1).double()
    x = torch.randn(4, 2, 6, 6, dtype=DT)
    h = conv_gram(conv, x)[0]
    w = conv.weight.detach().reshape(4, -1)
    keep = torch.rand(w.shape) > 0.6
    _check_schedule(w, h, keep)
    # and the error it reports is the error of the conv's own output
    res = obs_prune(w, h, keep, blocksize=5)
    probe = copy.deepcopy(conv)
    probe.bias = None
    probe.weight.data.copy_((w - res.weight).view_as(conv.weight))
    assert res.error_obs == pytest.approx(float(probe(x).detach().pow(2).sum()), rel=1e-10)


@pytest.mark.parametrize("rows", [1, 4])
def test_solver_leaves_the_callers_tensors_unchanged(rows: int) -> None:
    """The solver works on a copy of ``W`` laid out column by column; a one-row weight's transpose is
    already contiguous, so a copy has to be asked for (it once wrote into the caller's weight)."""
    x = correlated_inputs(20, 60)
    w = torch.randn(rows, 20, dtype=DT, generator=torch.Generator().manual_seed(4))
    h = x @ x.T
    w0, h0 = w.clone(), h.clone()
    h_damped, _ = dampen(h, 0.01)
    hd0 = h_damped.clone()
    for target in (0.5, NM(2, 4), torch.rand(rows, 20, generator=torch.Generator().manual_seed(5)) > 0.5):
        sparsegpt_solve(w, h_damped, selector(target, 20), blocksize=8)
        obs_prune(w, h, target, refit=True)
        assert torch.equal(w, w0) and torch.equal(h, h0) and torch.equal(h_damped, hd0)


# ---------------------------------------------------------------- against the least-squares optimum


def test_prune_first_mask_reaches_the_damped_optimum_and_the_bound() -> None:
    """When every row's pruned columns precede its kept ones, each OBS step may update every kept weight,
    so the schedule is the exact optimum of the dampened problem. Against the undamped optimum ŵ*, with
    μ = λ·mean(diag H), z = ŵ* − w on the kept columns and A = H_KK, the excess loss is
    μ² z (A+μI)⁻¹ A (A+μI)⁻¹ zᵀ ≤ max_a μ²a/(a+μ)² ‖z‖² = (μ/4)‖z‖² (docs/obs.md)."""
    d, rows = 12, 8
    x = correlated_inputs(d, 300, seed=4)
    h = x @ x.T
    w = torch.randn(rows, d, dtype=DT, generator=torch.Generator().manual_seed(5))
    cut = torch.tensor([3, 5, 7, 2, 9, 6, 4, 8])  # row i prunes columns [0, cut_i)
    keep = torch.arange(d)[None, :] >= cut[:, None]
    damp = 0.01
    mu = damp * float(torch.diagonal(h).mean())
    res = obs_prune(w, h, keep, damp=damp, blocksize=5)
    assert res.fallback_rows == 0
    damped_opt = lstsq_optimum(w, x, keep, mu)
    assert torch.allclose(res.weight, damped_opt, rtol=0, atol=1e-9 * float(w.abs().max()))
    opt = lstsq_optimum(w, x, keep)
    l_opt, l_obs, l_mask = loss(w, opt, x), loss(w, res.weight, x), loss(w, w * keep, x)
    bound = mu / 4 * float((opt - w)[keep].pow(2).sum())
    assert l_opt - 1e-9 * l_mask <= l_obs <= l_opt + bound + 1e-9 * l_mask
    assert l_obs < l_mask
    assert res.error_obs == pytest.approx(l_obs, rel=1e-9)


def test_random_mask_between_optimum_and_plain_mask() -> None:
    x = correlated_inputs(16, 400, seed=6)
    w = torch.randn(10, 16, dtype=DT, generator=torch.Generator().manual_seed(7))
    keep = torch.rand(10, 16, generator=torch.Generator().manual_seed(8)) > 0.5
    res = obs_prune(w, x @ x.T, keep)
    opt = lstsq_optimum(w, x, keep)
    l_opt, l_obs, l_mask = loss(w, opt, x), loss(w, res.weight, x), loss(w, w * keep, x)
    assert torch.equal(res.weight != 0, keep)  # the given mask is kept exactly
    assert l_opt * (1 - 1e-9) <= l_obs <= l_mask
    assert (res.error_mask, res.error_obs) == (pytest.approx(l_mask, rel=1e-9), pytest.approx(l_obs, rel=1e-9))
    # per row, nothing beats the optimum and the guard keeps every row at or below its plain mask
    e_opt, e_obs, e_mask = (row_errors(w, v, x @ x.T) for v in (opt, res.weight, w * keep))
    assert bool((e_opt <= e_obs * (1 + 1e-9) + 1e-12).all()) and bool((e_obs <= e_mask).all())


def test_refit_is_the_dampened_least_squares_optimum() -> None:
    """``refit=True`` replaces the schedule's weights by the per-row optimum on the final mask; rows with few
    kept weights take the kept-set system, rows with few pruned ones the pruned-set OBS formula — both must
    give the least-squares solution of ``‖(w − ŵ)X‖² + μ‖w − ŵ‖²`` computed here with lstsq."""
    x = correlated_inputs(12, 300, seed=23)
    h = x @ x.T
    w = torch.randn(8, 12, dtype=DT, generator=torch.Generator().manual_seed(24))
    density = torch.linspace(0.1, 0.9, 8, dtype=DT)[:, None]  # rows from 90 % pruned to 10 % pruned
    keep = torch.rand(8, 12, generator=torch.Generator().manual_seed(25), dtype=DT) < density
    keep[:, 0] = True  # every row keeps something
    mu = 0.01 * float(torch.diagonal(h).mean())
    ref = lstsq_optimum(w, x, keep, mu)
    res = obs_prune(w, h, keep, refit=True, guard=False)
    assert torch.allclose(res.weight, ref, rtol=0, atol=1e-9 * float(w.abs().max()))
    joint = obs_prune(w, h, NM(1, 3), refit=True, guard=False)  # the mask is chosen by the schedule as before
    assert torch.equal(joint.keep, obs_prune(w, h, NM(1, 3)).keep)
    assert torch.allclose(joint.weight, lstsq_optimum(w, x, joint.keep, mu), rtol=0, atol=1e-9 * float(w.abs().max()))
    # against the schedule on the undamped H: the dampened optimum is within (μ/4)‖ŵ* − w‖²_K of the
    # undamped optimum ŵ* (see the prune-first test), which no solution on this mask can beat
    opt = lstsq_optimum(w, x, keep)
    slack = mu / 4 * float((opt - w)[keep].pow(2).sum())
    assert res.error_obs <= obs_prune(w, h, keep, guard=False).error_obs + slack


def test_guard_catches_rows_where_the_schedule_is_worse_than_the_mask() -> None:
    """Inputs x1 ≈ x2 ≈ x3, w = (1, 0, −1), prune columns 0 and 2: the mask alone leaves w·x ≈ x1 − x3 ≈ 0.
    The schedule prunes column 0 first and moves its weight onto column 1 (the best free copy of x1), then
    prunes column 2 with nothing left to its right: error ≈ ‖x3‖², far above the mask's."""
    g = torch.Generator().manual_seed(0)
    x3 = torch.randn(50, dtype=DT, generator=g)
    x2 = x3 + 1e-2 * torch.randn(50, dtype=DT, generator=g)
    x1 = x2 + 1e-3 * torch.randn(50, dtype=DT, generator=g)
    x = torch.stack([x1, x2, x3])
    w = torch.tensor([[1.0, 0.0, -1.0]], dtype=DT)
    keep = torch.tensor([[False, True, False]])
    raw = obs_prune(w, x @ x.T, keep, damp=1e-9, guard=False, refit=False)
    guarded = obs_prune(w, x @ x.T, keep, damp=1e-9)
    l_mask = loss(w, w * keep, x)
    assert loss(w, raw.weight, x) > 100 * l_mask
    assert guarded.fallback_rows == 1
    assert torch.equal(guarded.weight, w * keep)
    assert guarded.error_obs == pytest.approx(l_mask, rel=1e-9)


# ---------------------------------------------------------------- joint masks: unstructured and N:M


def test_identity_gram_reduces_to_magnitude_pruning() -> None:
    """With H ∝ I no weight compensates another and the saliency w²/U_jj² orders by |w|: OBS = magnitude."""
    w = torch.randn(7, 16, dtype=DT, generator=torch.Generator().manual_seed(9))
    h = 3.0 * torch.eye(16, dtype=DT)
    nm = obs_prune(w, h, NM(2, 4), blocksize=8)
    groups = w.abs().reshape(7, 4, 4)
    mag = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, groups.argsort(-1)[..., :2], False).reshape(7, 16)
    assert torch.equal(nm.keep, mag) and torch.equal(nm.weight, w * mag)
    un = obs_prune(w, h, 0.25, blocksize=16)  # one block: 4 smallest |w| of each row
    mag = torch.ones_like(w, dtype=torch.bool).scatter_(1, w.abs().argsort(1)[:, :4], False)
    assert torch.equal(un.keep, mag) and torch.equal(un.weight, w * mag)


@pytest.mark.parametrize("blocksize", [128, 6, 4])
def test_nm_pattern_exact(blocksize: int) -> None:
    x = correlated_inputs(24, 300, seed=10)
    w = torch.randn(9, 24, dtype=DT, generator=torch.Generator().manual_seed(11))
    res = obs_prune(w, x @ x.T, (2, 4), blocksize=blocksize)
    zeros = (res.weight == 0).reshape(9, 6, 4).sum(-1)
    assert bool((zeros == 2).all())
    assert bool(((~res.keep).reshape(9, 6, 4).sum(-1) == 2).all())
    assert res.error_obs <= res.error_mask


def test_nm_with_dead_inputs_and_conv_layout() -> None:
    """Dead inputs (all-zero channels) cost nothing to remove on the calibration data: they are pruned
    first, the smaller |w| first, and no more of them than the pattern needs (their weights may matter on
    other inputs, e.g. padding taps at another image size)."""
    torch.manual_seed(12)
    conv = nn.Conv2d(4, 5, 2).double()  # row = 4·2·2 = 16 → four groups of 4: one per input channel
    x = torch.randn(3, 4, 5, 5, dtype=DT)
    x[:, 1] = 0.0  # channel 1 → columns 4..7, a whole group, dead
    h = conv_gram(conv, x)[0]
    h[2, :] = h[:, 2] = 0.0  # and one more dead column in group 0
    w = conv.weight.detach().reshape(5, -1)
    res = obs_prune(w, h, NM(2, 4), blocksize=8)
    assert bool(torch.isfinite(res.weight).all())
    assert bool(((res.weight == 0).reshape(5, 4, 4).sum(-1) == 2).all())
    smallest_two = w[:, 4:8].abs().argsort(1)[:, :2]  # the dead group: magnitude decides
    assert torch.equal((~res.keep[:, 4:8]).nonzero()[:, 1].view(5, 2), smallest_two.sort(1).values)
    assert bool((~res.keep[:, 2]).all())  # the dead column of group 0 is among the pruned pair
    assert torch.equal(res.weight[:, 4:8], w[:, 4:8] * res.keep[:, 4:8])  # dead weights get no update


def test_unstructured_exact_count_per_row() -> None:
    x = correlated_inputs(20, 300, seed=13)
    w = torch.randn(6, 20, dtype=DT, generator=torch.Generator().manual_seed(14))
    for ratio in (0.3, 0.7, 0.9):
        res = obs_prune(w, x @ x.T, ratio, blocksize=7)
        per_row = (~res.keep).sum(1)
        assert bool((per_row == round(ratio * 20)).all())
        assert torch.equal(res.weight == 0, ~res.keep)
        assert res.error_obs <= res.error_mask


# ---------------------------------------------------------------- dead inputs, zero Gram, bad input


def test_dead_inputs_are_decoupled_and_never_nan() -> None:
    """A dead input has a zero row/column in H: the solve on the live columns alone gives the same weights
    (with λ rescaled so that μ = λ·mean(diag H) is the same), and the dead weights are left as they are."""
    x = correlated_inputs(10, 200, seed=15)
    dead = torch.tensor([1, 6])
    x[dead] = 0.0
    live = torch.tensor([i for i in range(10) if i not in dead.tolist()])
    w = torch.randn(4, 10, dtype=DT, generator=torch.Generator().manual_seed(16))
    keep = torch.rand(4, 10, generator=torch.Generator().manual_seed(17)) > 0.5
    res = obs_prune(w, x @ x.T, keep, damp=0.01, blocksize=4)
    sub = obs_prune(w[:, live], (x @ x.T)[live][:, live], keep[:, live], damp=0.01 * 8 / 10, blocksize=4)
    assert bool(torch.isfinite(res.weight).all())
    assert torch.allclose(res.weight[:, live], sub.weight, rtol=0, atol=1e-10)
    assert torch.equal(res.weight[:, dead], (w * keep)[:, dead])


@pytest.mark.parametrize("target", [torch.ones(3, 8, dtype=torch.bool), 0.5, (2, 4)], ids=["mask", "ratio", "nm"])
def test_zero_gram_gives_finite_weights(target: object) -> None:
    w = torch.randn(3, 8, dtype=DT)
    res = obs_prune(w, torch.zeros(8, 8, dtype=DT), target)
    assert bool(torch.isfinite(res.weight).all()) and res.error_obs == 0.0 == res.error_mask


@pytest.mark.parametrize("damp", [0.0, -0.1, float("nan")])
def test_nonpositive_damp_refused(damp: float) -> None:
    with pytest.raises(InputError, match="damp"):
        obs_prune(torch.randn(2, 4), torch.eye(4), 0.5, damp=damp)


def test_bad_targets_refused() -> None:
    with pytest.raises(InputError, match="multiple of 4"):
        obs_prune(torch.randn(2, 6), torch.eye(6), (2, 4))
    with pytest.raises(InputError, match="does not match"):
        obs_prune(torch.randn(2, 6), torch.eye(6), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(InputError, match="sparsity"):
        obs_prune(torch.randn(2, 6), torch.eye(6), 1.0)


# ---------------------------------------------------------------- grouped and depthwise convs


def test_depthwise_conv_solved_per_group() -> None:
    """Each channel of a depthwise conv is its own layer: its Gram matrix comes from that channel's patches
    only, computed here by unfolding the channel alone."""
    torch.manual_seed(18)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, groups=3)).double()  # channel multiplier 2
    x = torch.randn(8, 3, 7, 7, dtype=DT) * torch.tensor([0.5, 1.0, 2.0], dtype=DT)[None, :, None, None]
    w = model[0].weight.detach().clone().reshape(6, 9)
    keep = torch.rand(6, 9) > 0.4
    report = reconstruct(model, {"0": keep.reshape(6, 1, 3, 3)}, [x[:3], x[3:]], blocksize=4)
    got = model[0].weight.detach().reshape(6, 9)
    err_mask = err_obs = 0.0
    for c in range(3):
        cols = nn.functional.unfold(x[:, c : c + 1], 3, padding=1).transpose(1, 2).reshape(-1, 9)
        h = cols.T @ cols
        rows = slice(2 * c, 2 * c + 2)
        ref = guarded_reference(w[rows], h, keep[rows])
        assert torch.allclose(got[rows], ref, rtol=0, atol=1e-10)
        err_mask += float(row_errors(w[rows], w[rows] * keep[rows], h).sum())
        err_obs += float(row_errors(w[rows], ref, h).sum())
    layer = report.layers["0"]
    assert layer.status == "reconstructed" and layer.positions == 8 * 49
    assert layer.error_mask == pytest.approx(err_mask, rel=1e-9)
    assert layer.error_obs == pytest.approx(err_obs, rel=1e-9)


# ---------------------------------------------------------------- sequential over a model


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c2 = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c2(torch.relu(self.dw(torch.relu(self.c1(x))))))
        return self.fc(y.mean((2, 3)))


def _magnitude(model: nn.Module, names: list[str], ratio: float) -> nn.Module:
    """Per-row magnitude masking (the same per-row count as the OBS target), no update."""
    model = copy.deepcopy(model)
    for name in names:
        w = model.get_submodule(name).weight.data
        rows = w.reshape(w.shape[0], -1)
        k = round(ratio * rows.shape[1])
        rows.scatter_(1, rows.abs().argsort(1)[:, :k], 0.0)
    return model


def _output_error(dense: nn.Module, pruned: nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float((dense(b) - pruned(b)).pow(2).sum()) for b in batches)


@pytest.mark.parametrize(
    ("make", "shape", "names"),
    [(Mlp, (16,), ["fc1", "fc2"]), (ConvNet, (3, 8, 8), ["c1", "dw", "c2", "fc"])],
    ids=["mlp", "convnet"],
)
def test_sequential_beats_magnitude_masking(make: type[nn.Module], shape: tuple[int, ...], names: list[str]) -> None:
    torch.manual_seed(19)
    dense = make().double().eval()
    mix = torch.randn(shape[0], shape[0], dtype=DT) + torch.eye(shape[0], dtype=DT)  # correlated inputs
    calib = [torch.einsum("ij,bj...->bi...", mix, torch.randn(16, *shape, dtype=DT)) for _ in range(4)]
    held_out = [torch.einsum("ij,bj...->bi...", mix, torch.randn(16, *shape, dtype=DT)) for _ in range(2)]
    ratio = 0.5
    obs = copy.deepcopy(dense)
    report = reconstruct(obs, dict.fromkeys(names, ratio), calib)
    assert [n for n, r in report.layers.items() if r.status == "reconstructed"] == names  # forward order
    mag = _magnitude(dense, names, ratio)
    for name in names:
        w = obs.get_submodule(name).weight
        assert int((w == 0).sum()) == w.shape[0] * round(ratio * w[0].numel())
        assert report.layers[name].error_obs <= report.layers[name].error_mask
    for batches in (calib, held_out):
        assert _output_error(dense, obs, batches) < 0.8 * _output_error(dense, mag, batches)
    again = copy.deepcopy(dense)
    reconstruct(again, dict.fromkeys(names, ratio), calib)
    assert all(torch.equal(a, b) for a, b in zip(obs.state_dict().values(), again.state_dict().values(), strict=True))


def test_sequential_uses_the_reconstructed_prefix_and_warns_on_unreached() -> None:
    torch.manual_seed(20)
    dense = Mlp().double()
    calib = [torch.randn(32, 16, dtype=DT) for _ in range(3)]
    model = copy.deepcopy(dense).train()
    before = model.unused.weight.detach().clone()
    pairs = [(x, torch.zeros(len(x), dtype=torch.long)) for x in calib]  # (image, label) as loaders yield
    report = reconstruct(model, {"fc1": (2, 4), "fc2.weight": 0.6, "unused": 0.5}, pairs, blocksize=8)
    assert model.training  # the training flag is given back
    assert report.layers["unused"].status == "unreached" and torch.equal(model.unused.weight, before)
    assert any("unused" in msg for msg in report.warnings)
    # fc2's Gram matrix must come from the already reconstructed fc1: recompute it that way, independently
    x2 = torch.cat([torch.relu(model.fc1(b)) for b in calib]).detach()
    h2 = x2.T @ x2
    w2 = dense.fc2.weight.detach()
    expect = float(row_errors(w2, model.fc2.weight.detach(), h2).sum())
    assert report.layers["fc2.weight"].error_obs == pytest.approx(expect, rel=1e-9)
    assert report.layers["fc2.weight"].signal == pytest.approx(float((x2 @ w2.T).pow(2).sum()), rel=1e-9)
    assert report.layers["fc2.weight"].positions == 96


def test_sequential_bad_input() -> None:
    model = Mlp()
    with pytest.raises(InputError, match="re-iterable"):
        reconstruct(model, {"fc1": 0.5}, iter([torch.randn(2, 16)]))
    with pytest.raises(InputError, match="no layer"):
        reconstruct(model, {"nope": 0.5}, [torch.randn(2, 16)])
    with pytest.raises(InputError, match="damp"):
        reconstruct(model, {"fc1": 0.5}, [torch.randn(2, 16)], damp=0.0)
    with pytest.raises(InputError, match="no calibration"):
        reconstruct(model, {"fc1": 0.5}, [])
    report = reconstruct(model, {"fc1": (2, 3)}, [torch.randn(2, 16)])  # 16 columns: no groups of 3
    assert report.layers["fc1"].status == "skipped" and report.warnings


# ---------------------------------------------------------------- a masked checkpoint against its dense parent


def test_restore_masked_keeps_the_mask_and_fits_the_dense_parent() -> None:
    torch.manual_seed(21)
    dense = Mlp().double().eval()
    mix = torch.randn(16, 16, dtype=DT) + torch.eye(16, dtype=DT)
    calib = [torch.randn(32, 16, dtype=DT) @ mix for _ in range(3)]
    pruned = _magnitude(dense, ["fc1", "fc2", "unused"], 0.5)
    with torch.no_grad():  # as if fine-tuned after pruning: the refit must start from the parent, not these
        for name in ("fc1", "fc2"):
            w = pruned.get_submodule(name).weight
            w.mul_(1.5)
    keep = {n: pruned.get_submodule(n).weight.detach() != 0 for n in ("fc1", "fc2", "unused")}
    unused_before = pruned.unused.weight.detach().clone()
    report = restore_masked(pruned, dense, ["fc1.weight", "fc2.weight", "unused.weight"], calib)
    for name, k in keep.items():
        assert torch.equal(pruned.get_submodule(name).weight.detach() != 0, k)
    assert report.layers["unused"].status == "unreached" and torch.equal(pruned.unused.weight, unused_before)
    # fc1 sees the calibration inputs themselves: its refit is the parent's weight refitted on the kept inputs
    # (least squares with the dampening), or the plain mask in rows where that is better on the undamped H
    x1 = torch.cat(calib).T
    w1, h1 = dense.fc1.weight.detach(), x1 @ x1.T
    opt = lstsq_optimum(w1, x1, keep["fc1"], 0.01 * float(torch.diagonal(h1).mean()))
    masked = w1 * keep["fc1"]
    ref = torch.where((row_errors(w1, opt, h1) > row_errors(w1, masked, h1))[:, None], masked, opt)
    assert torch.allclose(pruned.fc1.weight.detach(), ref, rtol=0, atol=1e-9)
    schedule_only = _magnitude(dense, ["fc1", "fc2"], 0.5)
    restore_masked(schedule_only, dense, ["fc1.weight", "fc2.weight"], calib, refit=False)
    assert torch.allclose(schedule_only.fc1.weight.detach(), guarded_reference(w1, h1, keep["fc1"]), atol=1e-9)
    masked_only = _magnitude(dense, ["fc1", "fc2"], 0.5)
    assert _output_error(dense, pruned, calib) < _output_error(dense, masked_only, calib)


def test_restore_masked_bad_input_changes_nothing() -> None:
    dense, pruned = Mlp(), _magnitude(Mlp(), ["fc1"], 0.5)
    before = copy.deepcopy(pruned.state_dict())
    calib = [torch.randn(4, 16)]
    with pytest.raises(InputError, match="no masked weights"):
        restore_masked(pruned, dense, [], calib)
    with pytest.raises(InputError, match="damp"):
        restore_masked(pruned, dense, ["fc1.weight"], calib, damp=0.0)
    dense.fc1 = nn.Linear(16, 31)
    with pytest.raises(CheckpointError, match="dense parent"):
        restore_masked(pruned, dense, ["fc1.weight"], calib)
    with pytest.raises(InputError, match="re-iterable"):
        restore_masked(pruned, Mlp(), ["fc1.weight"], iter(calib))
    assert all(torch.equal(a, b) for a, b in zip(before.values(), pruned.state_dict().values(), strict=True))


def _magnitude_nm(model: nn.Module, names: list[str], n: int, m: int) -> nn.Module:
    model = copy.deepcopy(model)
    for name in names:
        w = model.get_submodule(name).weight.data
        groups = w.reshape(w.shape[0], -1, m)
        groups.scatter_(-1, groups.abs().argsort(-1)[..., : m - n], 0.0)
    return model


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        ("resnet18", {"channels": (16, 32, 32, 64), "stem_width": 16, "zero_init_last": False}),
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}),
    ],
    ids=["resnet18", "vit"],
)
def test_timm_models_two_four(arch: str, kwargs: dict[str, object]) -> None:
    """Real architectures (skip connections, BatchNorm, attention): every reachable layer gets an exact
    2:4 pattern, and the model's output stays closer to the dense one than magnitude 2:4 does."""
    import timm

    from prunecli.prunable import prunable_layers

    torch.manual_seed(22)
    dense = timm.create_model(arch, pretrained=False, num_classes=5, **kwargs).eval()
    calib = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    names = [n for n, mod in prunable_layers(dense).items() if mod.weight[0].numel() % 4 == 0]
    model = copy.deepcopy(dense)
    report = reconstruct(model, dict.fromkeys(names, NM(2, 4)), calib)
    assert [r.status for r in report.layers.values()] == ["reconstructed"] * len(names)
    for name in names:
        zeros = (model.get_submodule(name).weight.reshape(-1, 4) == 0).sum(-1)
        assert bool((zeros == 2).all())
        assert report.layers[name].error_obs <= report.layers[name].error_mask
    mag = _magnitude_nm(dense, names, 2, 4)
    assert _output_error(dense, model, calib) < _output_error(dense, mag, calib)


_DDP_WORKER = """
import sys, torch, torch.distributed as dist
from prunecli.reconstruction import reconstruct
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).double()
batches = [torch.randn(8, 16, dtype=torch.float64) for _ in range(6)]
reconstruct(model, {"0": 0.5, "2": (2, 4)}, batches[rank::world])
if rank == 0:
    torch.save(model.state_dict(), sys.argv[1])
dist.destroy_process_group()
"""


def test_two_processes_give_the_one_process_weights(tmp_path: Path) -> None:
    """Under torchrun each rank reconstructs from its shard; the Gram matrices are summed before the solve."""
    import os
    import socket
    import subprocess
    import sys

    script, out = tmp_path / "worker.py", tmp_path / "ddp.pt"
    script.write_text(_DDP_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(script), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).double()
    batches = [torch.randn(8, 16, dtype=DT) for _ in range(6)]
    reconstruct(model, {"0": 0.5, "2": (2, 4)}, batches)
    ddp = torch.load(out)
    for name, value in model.state_dict().items():
        assert torch.equal(ddp[name] != 0, value != 0), name  # the same masks
        # the Gram sums differ only in summation order (relative ~1e-16 · batches); through a solve with a
        # condition number well under 1e6 that stays far below 1e-8
        assert torch.allclose(ddp[name], value, rtol=0, atol=1e-8), name
