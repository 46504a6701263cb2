"""Each criterion against an independent computation on a small model.

References are written out by hand: per-batch / per-sample autograd loops, brute-force minimisers,
explicit im2col (``F.unfold``), an explicit parameter-injection module for PROscore, and direct
formulas with Python loops. None of them calls the criterion code.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import prunecli.archs  # noqa: F401  (registers improved_cnn)
from prunecli.criteria import CRITERIA, get_criterion
from prunecli.errors import InputError, UnknownNameError
from prunecli.scoring import balanced_indices, run_criterion

CPU = torch.device("cpu")
# Tolerances. A criterion and its reference compute the same quantity along different kernel paths
# (batched vs per-sample GEMMs, im2col vs conv weight-gradient, other summation orders). In float32
# those paths differ by about u·(Σ|terms|) per sum, which relative to a sum that cancels (a hidden
# unit's pre-activation, a variance M2 − M1²/A) is unbounded: such a test passes or fails by machine.
# So the comparisons below run the model, the criterion and the reference in float64 (the criteria
# keep float64 models in float64), and the tolerance is what is left: the final rounding of the scores
# to float32 (U32 relative per rounding) plus float64 reassociation (EPS64 per term, times the sum
# of absolute terms). Where a criterion computes in float32 on purpose, the bound follows the
# operations: a float32 sum of K terms has a relative error of at most (K − 1)·U32 of Σ|terms|.
U32 = torch.finfo(torch.float32).eps / 2  # unit roundoff of float32
EPS64 = torch.finfo(torch.float64).eps


def tiny_cnn(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    m = timm.create_model("improved_cnn", widths=(4, 6, 8), hidden=12, num_classes=5)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    return m.to(dtype).eval()


def batches(
    n: int = 3, b: int = 6, shape: tuple[int, ...] = (3, 32, 32), k: int = 5, seed: int = 1,
    dtype: torch.dtype = torch.float32,
) -> list:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, *shape, generator=g).to(dtype), torch.randint(0, k, (b,), generator=g)) for _ in range(n)]


def run(model: nn.Module, method: str, data: list | None = None, **params: object):
    out, _, _ = run_criterion(model, get_criterion(method, params), data or [], device=CPU, seed=0)
    return out


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{n}.weight": m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


# ------------------------------------------------------------------------------ data-free criteria
def test_magnitude_matches_torch_norms() -> None:
    m = tiny_cnn()
    w = weights(m)
    for method, p in (("l1", 1), ("l2", 2), ("magnitude", 1)):
        s = run(m, method).scores
        c = run(m, method, granularity="channel").scores
        for name, t in w.items():
            torch.testing.assert_close(s[name], t.abs(), rtol=0, atol=0)
            ref = torch.stack([torch.norm(t[o].double(), p=p) for o in range(t.shape[0])])
            # a float32 norm of K non-negative terms: (K − 1)·U32 for the sum, U32 for each |w| or w², and
            # U32 for the root and the final rounding; the float64 reference is exact at this scale
            k = t[0].numel()
            torch.testing.assert_close(c[name].double(), ref, rtol=(k + 2) * U32, atol=0)
    with pytest.raises(InputError):
        get_criterion("l1", {"norm": "2"})


def test_random_is_seeded() -> None:
    m = tiny_cnn()
    crit = lambda: get_criterion("random")  # noqa: E731
    a = run_criterion(m, crit(), [], device=CPU, seed=3)[0].scores
    b = run_criterion(m, crit(), [], device=CPU, seed=3)[0].scores
    c = run_criterion(m, crit(), [], device=CPU, seed=4)[0].scores
    for name, t in weights(m).items():
        assert a[name].shape == t.shape
        assert torch.equal(a[name], b[name])
        assert not torch.equal(a[name], c[name])
    ch = run_criterion(m, get_criterion("random", {"granularity": "channel"}), [], device=CPU, seed=3)[0].scores
    assert all(ch[n].shape == (t.shape[0],) for n, t in weights(m).items())


def test_fpgm_is_distance_sum_by_loops() -> None:
    m = tiny_cnn()
    s = run(m, "fpgm").scores
    for name, t in weights(m).items():
        f = t.double().reshape(t.shape[0], -1).numpy()
        ref = [sum(float(np.sqrt(((f[o] - f[j]) ** 2).sum())) for j in range(len(f))) for o in range(len(f))]
        np.testing.assert_allclose(s[name].numpy(), ref, rtol=1e-5)
    s1 = run(m, "fpgm", norm=1).scores["fc2.weight"].double().numpy()
    f = m.fc2.weight.detach().double().numpy()
    np.testing.assert_allclose(s1, [np.abs(f[o] - f).sum() for o in range(len(f))], rtol=1e-5)


def test_bnscale_is_abs_gamma_with_l2_fallback() -> None:
    m = tiny_cnn()
    with torch.no_grad():
        m.features[1].bn.weight[0] = -2.0
    out = run(m, "bnscale")
    for i in range(3):
        bn_w = m.features[i].bn.weight.detach().abs()
        torch.testing.assert_close(out.scores[f"features.{i}.conv.weight"], bn_w, rtol=0, atol=0)
        assert out.notes[f"features.{i}.conv.weight"]["source"] == f"bn:features.{i}.bn"
    k = m.fc1.weight.shape[1]  # float32 L2 norm of k terms (see test_magnitude_matches_torch_norms)
    ref = m.fc1.weight.detach().double().norm(dim=1)
    torch.testing.assert_close(out.scores["fc1.weight"].double(), ref, rtol=(k + 2) * U32, atol=0)
    assert out.notes["fc1.weight"]["source"] == "l2"
    with pytest.raises(InputError, match="not followed by an affine BatchNorm"):
        run(m, "bnscale", fallback="error")


# ------------------------------------------------------------------------------ gradient criteria
def by_hand_grads(model: nn.Module, data: list) -> list[dict[str, torch.Tensor]]:
    """Per batch: gradient of the batch's mean cross-entropy w.r.t. every conv/linear weight."""
    out = []
    for x, y in data:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        out.append({f"{n}.weight": m.weight.grad.clone() for n, m in model.named_modules()
                    if isinstance(m, (nn.Conv2d, nn.Linear))})  # fmt: skip
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_taylor_matches_per_batch_autograd(granularity: str) -> None:
    m, data = tiny_cnn(torch.float64), batches(dtype=torch.float64)
    grads = by_hand_grads(copy.deepcopy(m), data)
    w = weights(m)
    for agg in ("abs_sum", "sq_mean", "abs_of_mean"):
        s = run(m, "taylor", data, agg=agg, granularity=granularity).scores
        for name, t in w.items():
            cs = [t * g[name] for g in grads]
            if granularity == "channel":
                cs = [c.reshape(c.shape[0], -1).sum(1) for c in cs]
            ref = {
                "abs_sum": sum(c.abs() for c in cs),
                "sq_mean": sum(c**2 for c in cs) / len(cs),
                "abs_of_mean": (sum(cs) / len(cs)).abs(),
            }[agg]
            # float32 accumulators (abs_sum, sq_mean) round once per batch and once more in the mean:
            # (M + 2)·U32; float64 reassociation of the signed channel sums: EPS64 per term of Σ|c|
            bound = sum(c.abs() for c in cs) if agg != "sq_mean" else sum(c**2 for c in cs)
            tol = (len(cs) + 2) * U32 * ref.abs() + 4 * t[0].numel() * EPS64 * bound
            assert ((s[name].double() - ref).abs() <= tol).all(), (agg, name)


def test_snip_one_batch_normalised() -> None:
    m, data = tiny_cnn(torch.float64), batches(n=2, dtype=torch.float64)
    g = by_hand_grads(copy.deepcopy(m), data[:1])[0]
    w = weights(m)
    raw = {n: (w[n] * g[n]).abs() for n in w}
    total = sum(float(r.double().sum()) for r in raw.values())
    s = run(m, "snip", data[:1]).scores
    # snip keeps w and its gradient in float32: w, g, w·g, /k and the stored score round once each
    for name in w:
        torch.testing.assert_close(s[name].double(), raw[name] / total, rtol=6 * U32, atol=0)
    assert abs(sum(float(v.double().sum()) for v in s.values()) - 1.0) < 6 * U32


# ------------------------------------------------------------------------------ biascomp (paper E)
def per_sample_output_grads(model: nn.Module, layer: nn.Module, data: list, mode: str = "loss"):
    """Per-sample (x_in, ∂ℓ_s/∂y) of ``layer`` by one forward/backward per sample (no sum trick)."""
    xs, gs = [], []
    store: dict[str, torch.Tensor] = {}

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        store["x"] = args[0].detach()
        store["y"] = out  # the model continues with a copy, so inplace ReLU cannot touch ``out``
        return out.clone()

    h = layer.register_forward_hook(hook)
    for x, y in data:
        for s in range(x.shape[0]):
            logits = model(x[s : s + 1])
            if mode == "loss":
                g = torch.autograd.grad(F.cross_entropy(logits, y[s : s + 1], reduction="sum"), store["y"])[0]
                a = g**2
            else:  # Σ_k (∂f_k/∂y)²
                a = sum(
                    torch.autograd.grad(logits[0, k], store["y"], retain_graph=True)[0] ** 2
                    for k in range(logits.shape[1])
                )
            xs.append(store["x"][0])
            gs.append(a[0])
    h.remove()
    return xs, gs


# brute_min's grid: 401 points over [min v, max v], then 5 zooms by a factor 200 (±1 step, 401 points)
GRID_RESOLUTION = 1 / 400 / 200**5


def argmin_uncertainty(a: np.ndarray, v: np.ndarray, minimum: float) -> float:
    """How far brute_min's argmin can be from the true one.

    The grid's last step, plus the flatness of the objective: near its minimum it rises only by
    A·Δ², while evaluating it in float64 errs by up to (S + 3)·EPS64 of its value, so two points
    closer than Δ = √(2·(S + 3)·EPS64·min / A) cannot be told apart.
    """
    flat = np.sqrt(2 * (len(v) + 3) * EPS64 * max(minimum, 0.0) / max(float(np.sum(a)), 1e-300))
    return GRID_RESOLUTION * float(np.ptp(v)) + float(flat)


def brute_min(a: np.ndarray, v: np.ndarray) -> tuple[float, float]:
    """argmin_δ and min of Σ_s a_s (δ − v_s)² by dense grid search + local refinement (no closed form).

    The argmin is found to within :func:`argmin_uncertainty`.
    """
    obj = lambda d: float(np.sum(a * (d - v) ** 2))  # noqa: E731
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:
        return lo, 0.0
    best = lo
    for _ in range(6):  # zoom in: 401-point grid, 6 times
        grid = np.linspace(lo, hi, 401)
        vals = [obj(d) for d in grid]
        i = int(np.argmin(vals))
        best = grid[i]
        step = grid[1] - grid[0]
        lo, hi = best - step, best + step
    return best, obj(best)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_biascomp_linear_matches_brute_force(precision: str) -> None:
    m, data = tiny_cnn(torch.float64), batches(n=2, b=5, dtype=torch.float64)
    out = run(m, "biascomp", data, precision=precision)
    ref_model = copy.deepcopy(m)
    xs, a = per_sample_output_grads(ref_model, ref_model.fc1, data)
    X = torch.stack(xs).numpy()  # (S, n)
    A2 = torch.stack(a).numpy()  # (S, m)
    W = m.fc1.weight.detach().numpy()
    rng = np.random.default_rng(0)
    # The per-batch products round a and x to the product precision (unit roundoff p) and sum S terms:
    # M1 = Σ a x and A = Σ a are off by (S + 2)·p of Σ a|x| and of A, so δ* = w·M1/A by (2S + 5)·p of
    # max|w x|; M2 and M1²/A ≤ M2 (Cauchy–Schwarz) by (2S + 4)·p of M2 each, so I = w²(M2 − M1²/A) by
    # (4S + 8)·p of I⁰ = w²·M2, the uncompensated objective. Then one rounding of the result to float32.
    S = X.shape[0]
    p = U32 if precision == "float32" else EPS64 / 2
    live = np.flatnonzero(A2.sum(0) > 0)
    dead = np.flatnonzero(A2.sum(0) == 0)
    for _ in range(12):
        i, j = int(rng.choice(live)), int(rng.integers(W.shape[1]))
        d_ref, imp_ref = brute_min(A2[:, i], W[i, j] * X[:, j])
        d = float(out.extras["bias_shift"]["fc1.weight"][i, j])
        imp = float(out.scores["fc1.weight"][i, j])
        scale = abs(W[i, j] * X[:, j]).max() + 1e-12
        i0 = float(np.sum(A2[:, i] * (W[i, j] * X[:, j]) ** 2))  # the uncompensated objective bounds the error
        grid = argmin_uncertainty(A2[:, i], W[i, j] * X[:, j], imp_ref)
        assert abs(d - d_ref) <= (2 * S + 5) * p * scale + U32 * abs(d_ref) + grid, (i, j, d, d_ref)
        assert abs(imp - imp_ref) <= (4 * S + 8) * p * i0 + U32 * abs(imp_ref), (i, j, imp, imp_ref)
    for i in dead:  # A_i = 0: no sensitivity, no shift (docs/bias-compensation.md)
        assert not out.scores["fc1.weight"][i].any() and not out.extras["bias_shift"]["fc1.weight"][i].any()
    assert out.notes["fc1.weight"]["compensate"] == "bias"


def test_biascomp_conv_matches_im2col_and_brute_force() -> None:
    m, data = tiny_cnn(torch.float64), batches(n=2, b=3, dtype=torch.float64)
    out = run(m, "biascomp", data, precision="float64")
    ref_model = copy.deepcopy(m)
    conv = ref_model.features[1].conv
    xs, a = per_sample_output_grads(ref_model, conv, data)
    x = torch.stack(xs)
    a = torch.stack(a)  # (S, O, H, W)
    U = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)  # (S, K, P)
    a2 = a.reshape(a.shape[0], a.shape[1], -1)  # (S, O, P)
    A = a2.sum((0, 2))
    assert (A > 0).any()
    M1 = torch.einsum("sop,skp->ok", a2, U)
    M2 = torch.einsum("sop,skp->ok", a2, U**2)
    W = conv.weight.detach().reshape(conv.weight.shape[0], -1)
    safe = torch.where(A > 0, A, torch.ones_like(A))[:, None]  # dead channels: δ = I = 0 (docs/bias-compensation.md)
    delta = torch.where(A[:, None] > 0, W * M1 / safe, 0.0)
    imp = torch.where(A[:, None] > 0, W**2 * (M2 - M1**2 / safe), 0.0)
    name = "features.1.conv.weight"
    # float64 throughout, so what is left is the rounding of the result to float32 plus float64
    # reassociation over the n = S·P (sample, position) terms, relative to the sums of absolute terms:
    # M2 for I = w²(M2 − M1²/A) (which cancels), Σ a|x| for δ = w·M1/A
    n = a2.shape[0] * a2.shape[2]
    M1abs = torch.einsum("sop,skp->ok", a2, U.abs())
    got_imp = out.scores[name].double().reshape_as(imp)
    got_delta = out.extras["bias_shift"][name].double().reshape_as(delta)
    assert ((got_imp - imp.clamp_min(0)).abs() <= U32 * imp.abs() + 4 * n * EPS64 * W**2 * M2).all()
    tol_delta = U32 * delta.abs() + 4 * n * EPS64 * W.abs() * M1abs / safe
    assert ((got_delta - delta).abs() <= tol_delta).all()
    # and the im2col form is the minimiser over (sample, position) pairs
    o, k = int(torch.argmax(A)), 7
    v = (W[o, k] * U[:, k, :]).reshape(-1).numpy()
    ao = a2[:, o, :].reshape(-1).numpy()
    d_ref, i_ref = brute_min(ao, v)
    unc = argmin_uncertainty(ao, v, i_ref)
    assert abs(float(delta[o, k]) - d_ref) <= unc + 4 * n * EPS64 * float(abs(v).max())
    # brute_min's minimum sits at most A·unc² above the true one; both sides are float64 sums of n terms
    assert abs(float(imp[o, k]) - i_ref) <= float(A[o]) * unc**2 + 4 * n * EPS64 * float(W[o, k] ** 2 * M2[o, k])


def test_biascomp_jacobian_sensitivity_and_row_additivity() -> None:
    # float64 model and reference: fc2's input is a sum over fc1's 128 inputs that can cancel, so a
    # float32 per-sample forward and the batched one differ by far more than float32's resolution of it
    m, data = tiny_cnn(torch.float64), batches(n=1, b=4, dtype=torch.float64)
    out = run(m, "biascomp", data, sensitivity="jacobian", precision="float64")
    ref_model = copy.deepcopy(m)
    xs, a = per_sample_output_grads(ref_model, ref_model.fc2, data, mode="jacobian")
    X, A2 = torch.stack(xs), torch.stack(a)
    W = m.fc2.weight.detach()
    i = 1
    d = out.extras["bias_shift"]["fc2.weight"][i].double()
    ref = W[i] * (A2[:, i] @ X) / A2[:, i].sum()
    # the shift is stored in float32 (U32) after float64 sums over the S samples (EPS64 per term)
    S = X.shape[0]
    tol = U32 * ref.abs() + 4 * S * EPS64 * W[i].abs() * (A2[:, i] @ X.abs()) / A2[:, i].sum()
    assert ((d - ref).abs() <= tol).all(), (d - ref).abs().max()
    # removing a set R of row i: the jointly optimal single shift is the sum of the individual shifts
    R = [0, 3, 5]
    v = (X[:, R] * W[i, R]).sum(1).numpy()
    d_joint, i_joint = brute_min(A2[:, i].numpy(), v)
    # the sum of |R| float32 shifts (U32 each, plus U32 per addition) against the search's resolution
    tol = (len(R) + 1) * U32 * float(d[R].abs().sum()) + argmin_uncertainty(A2[:, i].numpy(), v, i_joint)
    assert abs(float(d[R].sum()) - d_joint) <= tol


def test_biascomp_without_bias_or_bn_add_and_skip() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 7, bias=False), nn.Tanh(), nn.Linear(7, 4)).double().eval()
    data = batches(n=2, b=5, shape=(3, 2, 2), k=4, dtype=torch.float64)
    add = run(m, "biascomp", data, precision="float64")
    skip = run(m, "biascomp", data, precision="float64", missing_bias="skip")
    assert add.notes["1.weight"]["compensate"] == "add" and skip.notes["1.weight"]["compensate"] == "none"
    ref = copy.deepcopy(m)
    xs, a = per_sample_output_grads(ref, ref[1], data)
    X, A2, W = torch.stack(xs), torch.stack(a), m[1].weight.detach()
    i0 = torch.tensor(
        [[float((A2[:, i] * (W[i, j] * X[:, j]) ** 2).sum()) for j in range(12)] for i in range(7)], dtype=torch.float64
    )
    # I⁰ is a sum of S non-negative float64 terms, stored in float32: U32 plus S·EPS64, relative
    S = X.shape[0]
    torch.testing.assert_close(skip.scores["1.weight"].double(), i0, rtol=U32 + 4 * S * EPS64, atol=0)
    assert torch.count_nonzero(skip.extras["bias_shift"]["1.weight"]) == 0
    assert (add.scores["1.weight"].double() <= i0 * (1 + U32 + 4 * S * EPS64)).all()  # compensation never hurts


# ------------------------------------------------------------------------------ proscore (paper D)
class Psi(nn.Module):
    """ψ(x) = D x − D̄ x + σ(x) with D, D̄ explicit parameters (paper D eq. 5)."""

    def __init__(self, d0: torch.Tensor, act: nn.Module, channel_dim: int) -> None:
        super().__init__()
        self.D = nn.Parameter(d0.clone())
        self.Dbar = nn.Parameter(d0.clone())
        self.act, self.dim = act, channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[self.dim] = -1
        return self.D.view(shape) * x - self.Dbar.view(shape) * x + self.act(x)


def proscore_by_injection(model: nn.Module, targets: dict, data: list, lam: float) -> dict[str, torch.Tensor]:
    """targets: weight name → (filter params, ψ insertion (parent, attr, σ), channel dim)."""
    ref = copy.deepcopy(model)
    psis, filt = {}, {}
    mods = dict(ref.named_modules())
    for name, (fparams, (parent, attr, act), dim) in targets.items():
        ps = [dict(ref.named_parameters())[p] for p in fparams]
        F_ = torch.cat([p.detach().reshape(p.shape[0], -1) for p in ps], 1).double()
        psi = Psi(F_.norm(dim=1).float(), act, dim)
        old = getattr(mods[parent], attr)
        setattr(mods[parent], attr, psi if not isinstance(act, nn.Identity) else nn.Sequential(old, psi))
        psis[name], filt[name] = (psi, ps), F_
    with torch.no_grad():
        x0 = data[0][0]
        torch.testing.assert_close(ref(x0), model(x0))  # injection leaves the forward unchanged
    gD = {n: 0.0 for n in targets}
    gF = {n: 0.0 for n in targets}
    for x, y in data:
        loss = F.cross_entropy(ref(x), y)
        for name, (psi, ps) in psis.items():
            grads = torch.autograd.grad(loss, [psi.D, *ps], retain_graph=True)
            gD[name] = gD[name] + grads[0].double()
            gF[name] = gF[name] + torch.cat([g.reshape(g.shape[0], -1) for g in grads[1:]], 1).double()
    out = {}
    for name in targets:
        k = len(data)
        num = (filt[name] - lam * gF[name] / k).norm(dim=1)
        den = (filt[name].norm(dim=1) - lam * gD[name] / k).abs()
        out[name] = num / den
    return out


def test_proscore_matches_parameter_injection_cnn() -> None:
    m, data = tiny_cnn(), batches(n=2)
    with torch.no_grad():
        m.features[2].bn.weight[3] = 0.0  # a zero filter (γ=β=0) must score 0 (prune first)
        m.features[2].bn.bias[3] = 0.0
    targets = {
        f"features.{i}.conv.weight": (
            [f"features.{i}.bn.weight", f"features.{i}.bn.bias"], (f"features.{i}", "act", nn.ReLU()), 1
        )
        for i in range(3)
    }  # fmt: skip
    targets["fc1.weight"] = (["fc1.weight", "fc1.bias"], ("", "act", nn.ReLU()), -1)
    targets["fc2.weight"] = (["fc2.weight", "fc2.bias"], ("", "fc2", nn.Identity()), -1)
    for lam in (0.1, 1.0, 20.0):
        ref = proscore_by_injection(m, targets, data, lam)
        out = run(m, "proscore", data, **{"lambda": lam})
        for name, r in ref.items():
            r = torch.where(torch.isfinite(r), r, torch.zeros_like(r))
            if name == "features.2.conv.weight":
                r[3] = 0.0
            # compare the deviation from 1 (the λ→0 value), which is what ranks the channels
            torch.testing.assert_close(out.scores[name].double() - 1, r - 1, rtol=2e-3, atol=2e-6)
    assert float(out.scores["features.2.conv.weight"][3]) == 0.0


class ResBlock(nn.Module):
    """conv-BN-ReLU(inplace)-conv-BN, shortcut added in place, then ReLU: BN2's σ is the identity."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(True)
        self.conv2, self.bn2, self.act2 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(True)
        self.head = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        x += s
        return self.head(self.act2(x).mean((2, 3)))


def test_proscore_matches_parameter_injection_residual() -> None:
    torch.manual_seed(0)
    m = ResBlock().eval()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2)
    data = batches(n=2, b=4, shape=(3, 6, 6), k=4)
    targets = {
        "conv1.weight": (["bn1.weight", "bn1.bias"], ("", "act1", nn.ReLU()), 1),
        "conv2.weight": (["bn2.weight", "bn2.bias"], ("", "bn2", nn.Identity()), 1),
        "head.weight": (["head.weight", "head.bias"], ("", "head", nn.Identity()), -1),
    }
    ref = proscore_by_injection(m, targets, data, 5.0)
    out = run(m, "proscore", data, **{"lambda": 5.0})
    for name, r in ref.items():
        torch.testing.assert_close(out.scores[name].double() - 1, r - 1, rtol=2e-3, atol=2e-6)
    assert out.notes["conv2.weight"] == {"target": "bn2", "act": "identity", "crossings": 0}


def test_proscore_lambda_to_zero_limit_is_one() -> None:
    m, data = tiny_cnn(), batches(n=1)
    out = run(m, "proscore", data, **{"lambda": 1e-9})
    for s in out.scores.values():
        torch.testing.assert_close(s, torch.ones_like(s), rtol=0, atol=1e-6)
    with pytest.raises(InputError, match="lambda must be a positive number"):
        get_criterion("proscore", {"lambda": "0"})


# ------------------------------------------------------------------------------ wanda
def test_wanda_matches_direct_formula_with_groups() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=2), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=6),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 5),
    ).double().eval()  # fmt: skip
    data = batches(n=2, b=3, shape=(4, 8, 8), dtype=torch.float64)
    s = run(m, "wanda", data).scores
    x_all = torch.cat([x for x, _ in data])
    inputs = {0: x_all, 2: m[1](m[0](x_all))}
    for idx, x in inputs.items():
        conv = m[idx]
        g = conv.groups
        cin = x.shape[1] // g
        per_out = conv.out_channels // g
        W = conv.weight.detach()
        ref = torch.empty_like(W)
        for o in range(conv.out_channels):
            gr = o // per_out
            U = F.unfold(x[:, gr * cin : (gr + 1) * cin], 3, padding=1, stride=conv.stride)  # (S, cin*9, P)
            norm = U.pow(2).sum((0, 2)).sqrt().reshape(cin, 3, 3)
            ref[o] = W[o].abs() * norm
        # float64 sums of non-negative terms (EPS64 per term), then the score rounds to float32 (U32)
        rtol = U32 + 4 * x.shape[0] * x[0].numel() * EPS64
        torch.testing.assert_close(s[f"{idx}.weight"].double(), ref, rtol=rtol, atol=0)
    xl = m[3](m[2](inputs[2]))
    ref = m[4].weight.detach().abs() * xl.norm(dim=0)[None]
    torch.testing.assert_close(s["4.weight"].double(), ref, rtol=U32 + 4 * xl.numel() * EPS64, atol=0)


# ------------------------------------------------------------------------------ registry-wide
def test_options_are_validated() -> None:
    with pytest.raises(UnknownNameError, match="unknown method 'nope'"):
        get_criterion("nope")
    with pytest.raises(UnknownNameError, match="unknown option 'foo'"):
        get_criterion("taylor", {"foo": "1"})
    with pytest.raises(InputError, match="expects a number"):
        get_criterion("proscore", {"lambda": "abc"})
    with pytest.raises(InputError, match="expects an integer"):
        get_criterion("biascomp", {"probes": "2.5"})
    with pytest.raises(InputError, match="not one of"):
        get_criterion("taylor", {"agg": "max"})
    assert get_criterion("biascomp", {"probes": "4"}).options.probes == 4


def test_balanced_sampler_takes_the_fraction_of_every_class() -> None:
    targets = [0] * 50 + [1] * 30 + [2] * 20
    idx = balanced_indices(targets, 100, 0.1, seed=0)
    counts = np.bincount([targets[i] for i in idx])
    assert counts.tolist() == [5, 3, 2] and len(set(idx)) == len(idx)
    assert idx == balanced_indices(targets, 100, 0.1, seed=0)
    assert sorted(balanced_indices(targets, 100, 1.0, seed=1)) == list(range(100))


MODELS = [("test_resnet", (3, 32, 32)), ("test_vit", (3, 160, 160)), ("improved_cnn", (3, 32, 32))]


@pytest.mark.parametrize("arch,shape", MODELS, ids=[m for m, _ in MODELS])
def test_every_criterion_scores_every_prunable_param(arch: str, shape: tuple[int, ...]) -> None:
    from prunecli.prunable import prunable_params

    torch.manual_seed(0)
    kwargs = {"widths": (8, 8, 16), "hidden": 16} if arch == "improved_cnn" else {}
    m = timm.create_model(arch, num_classes=10, **kwargs).eval()
    params = prunable_params(m)
    data = batches(n=2, b=2, shape=shape, k=10)
    for name, cls in CRITERIA.items():
        out = run(m, name, data)
        assert set(out.scores) == set(params), name
        for p, w in params.items():
            s = out.scores[p]
            assert s.shape == (w.shape if cls(cls.Options()).granularity == "weight" else w.shape[:1]), (name, p)
            assert torch.isfinite(s).all(), (name, p)


# ------------------------------------------------------------------------------ degenerate scores
def test_zero_score_warning_names_zero_gamma_and_counts_live_weights() -> None:
    from prunecli.prunable import prunable_params
    from prunecli.scoring import zero_score_warning

    torch.manual_seed(0)
    conv, bn, fc = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Linear(16, 4)
    m = nn.Sequential(conv, bn, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc).eval()
    with torch.no_grad():  # γ = 0 (a fresh timm ResNet's last BN per block), β ≠ 0 so that fc still learns
        bn.weight.zero_()
        bn.bias.fill_(0.5)
    data = batches(n=1, b=4, shape=(3, 6, 6), k=4)
    crit = get_criterion("taylor")
    out, _, _ = run_criterion(m, crit, data, device=CPU)
    # by hand: no gradient passes a γ = 0 BatchNorm, so every conv weight scores 0 and every fc weight
    # does not (fc's input is ReLU(β) = 0.5 everywhere and its output gradient is softmax − onehot ≠ 0)
    assert not out.scores["0.weight"].any() and out.scores["5.weight"].all()
    msg = zero_score_warning(crit, out.scores, prunable_params(m), m)
    n_conv, n_all = conv.weight.numel(), conv.weight.numel() + fc.weight.numel()
    assert msg is not None and f"{n_conv:,} of {n_all:,} weights" in msg and "'1'" in msg and "γ = 0" in msg
    # already-zero weights score 0 rightly (a pruned checkpoint): they are not counted
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.1)  # 90 % pruned
        bn.weight.fill_(1.0)
    l1 = get_criterion("l1")
    assert zero_score_warning(l1, run(m, "l1").scores, prunable_params(m), m) is None
    assert zero_score_warning(crit, run(m, "taylor", data).scores, prunable_params(m), m) is None
