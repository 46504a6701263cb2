"""The cached schedule of ``reconstruct`` against the uncached one (docs/obs.md, "Sequential"), and the
precision of the float32 Gram products.

The uncached path (``cache=False``) reruns the whole model up to every layer; it is the independent
reference: both must solve every layer from the inputs of the already reconstructed prefix, so they give
the same weights. Hook-based call counts show which path actually ran.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunecli.reconstruction import NM, GramAccumulator, reconstruct
from prunecli.reconstruction.hessian import BLOCK

DT = torch.float64


def _calls(module: nn.Module) -> list[int]:
    """A counter of ``module``'s calls (a forward pre-hook that stays registered)."""
    seen = [0]

    def count(_m: nn.Module, _a: object) -> None:
        seen[0] += 1

    module.register_forward_pre_hook(count)
    return seen


def _both(model: nn.Module, targets: dict[str, object], calib: list[torch.Tensor], probe: str) -> tuple:
    """Reconstructs two copies, cached and uncached; returns the models, reports and ``probe``'s call counts."""
    cached, plain = copy.deepcopy(model), copy.deepcopy(model)
    n_cached, n_plain = _calls(cached.get_submodule(probe)), _calls(plain.get_submodule(probe))
    rc = reconstruct(cached, targets, calib)
    rp = reconstruct(plain, targets, calib, cache=False)
    return cached, plain, rc, rp, n_cached[0], n_plain[0]


def _assert_same(a: nn.Module, b: nn.Module, atol: float) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(x, y, rtol=0, atol=atol), (name, float((x - y).abs().max()))


class Bottleneck(nn.Module):
    """A residual block whose sum is written in place into a child's output (``out += x``): the child's
    output object goes on to the next layer, but its value has changed, so the block is not a chain."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.act = nn.Conv2d(c, c, 3, padding=1), nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out += x
        return self.conv2(self.act(out))


def _resnet_like() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=True),  # changes its (cached) input in place: reruns must not see a modified cache
        Bottleneck(8),
        Bottleneck(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def test_residual_model_cached_equals_uncached() -> None:
    torch.manual_seed(0)
    model = _resnet_like().double().eval()
    calib = [torch.randn(4, 3, 6, 6, dtype=DT) for _ in range(3)]
    before = [x.clone() for x in calib]
    names = ["0", "2.conv1", "2.conv2", "3.conv1", "3.conv2", "6"]
    targets = dict(zip(names, [0.5, NM(2, 4), 0.7, 0.5, NM(2, 4), 0.5], strict=True))
    cached, plain, rc, rp, n_cached, n_plain = _both(model, targets, calib, "0")
    assert [r.status for r in rc.layers.values()] == ["reconstructed"] * len(names)
    assert list(rc.layers) == list(rp.layers) == names
    # float64 model, the same operations on the same inputs: equal up to rounding of a well-conditioned solve
    _assert_same(cached, plain, atol=1e-9)
    for name in names:
        assert rc.layers[name].error_obs == pytest.approx(rp.layers[name].error_obs, rel=1e-9, abs=1e-12)
    # the first layer runs 1 (the call order) + 3 batches × 6 layers uncached; cached: 1 (the recording
    # pass) + 3 (advancing the cache past it); its own Gram matrix is built from the cached chain input
    assert n_plain == 1 + 3 * len(names)
    assert n_cached == 1 + 3
    assert all(torch.equal(x, y) for x, y in zip(calib, before, strict=True))  # the batches are not touched


def test_inplace_residual_is_not_taken_for_a_chain() -> None:
    """Bottleneck's conv1 output is passed on by identity after ``out += x``; a chain built on identity
    alone would drop the residual. Its layers are solved inside the block, rerun on the cached input."""
    torch.manual_seed(1)
    model = nn.Sequential(Bottleneck(4), nn.Flatten(), nn.Linear(4 * 25, 3)).double().eval()
    calib = [torch.randn(5, 4, 5, 5, dtype=DT) for _ in range(2)]
    targets = {"0.conv1": 0.5, "0.conv2": 0.5, "2": 0.5}
    cached, plain, *_ = _both(model, targets, calib, "0.conv1")
    _assert_same(cached, plain, atol=1e-9)


def test_vit_blocks_cached_equals_uncached() -> None:
    import timm

    from prunecli.prunable import prunable_layers

    torch.manual_seed(2)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8, depth=2
    ).eval()
    calib = [torch.randn(3, 3, 32, 32) for _ in range(2)]
    names = list(prunable_layers(model))
    cached, plain, rc, _rp, n_cached, n_plain = _both(model, dict.fromkeys(names, 0.5), calib, "patch_embed.proj")
    assert [r.status for r in rc.layers.values()] == ["reconstructed"] * len(names)
    # the blocks are a chain: patch_embed runs for its own solve, the chain's capture and the head's fallback
    assert n_plain == 1 + 2 * len(names)
    assert n_cached == 1 + 3 * 2
    # float32 model: the same kernels on the same inputs; allow rounding differences of float32 GEMMs
    with torch.no_grad():
        x = torch.randn(4, 3, 32, 32)
        ref = plain(x)
        assert float((cached(x) - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


class Shared(nn.Module):
    """Two units of a chain use the same Linear: its Gram matrix needs both calls, which no single unit
    sees, so the whole model falls back to the uncached schedule."""

    def __init__(self) -> None:
        super().__init__()
        lin = nn.Linear(6, 6)
        self.body = nn.Sequential(nn.Linear(6, 6), _Apply(lin), nn.Tanh(), _Apply(lin), nn.Linear(6, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _Apply(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_layer_called_from_two_units_falls_back() -> None:
    torch.manual_seed(3)
    model = Shared().double().eval()
    calib = [torch.randn(8, 6, dtype=DT) for _ in range(2)]
    targets = {"body.0": 0.5, "body.1.lin": 0.5, "body.4": 0.5}
    cached, plain, rc, _rp, n_cached, n_plain = _both(model, targets, calib, "body.0")
    assert rc.layers["body.1.lin"].positions == 2 * 2 * 8  # both calls of both batches
    assert n_cached == n_plain == 1 + 2 * 3  # the fallback (cached, body.0 would run 1 + 2 + 2 times)
    _assert_same(cached, plain, atol=1e-9)


class Skips(nn.Module):
    """A chain whose middle unit never calls one of its layers (``skip``): unreached, left unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), _Half(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _Half(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.skip = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.used(x)) + x


def test_skipped_layer_in_a_chain() -> None:
    torch.manual_seed(4)
    model = Skips().double().eval()
    calib = [torch.randn(8, 6, dtype=DT) for _ in range(3)]
    targets = {"body.0": 0.5, "body.1.used": 0.5, "body.1.skip": 0.5, "body.2": (2, 4)}
    cached, plain, rc, rp, n_cached, n_plain = _both(model, targets, calib, "body.0")
    assert rc.layers["body.1.skip"].status == rp.layers["body.1.skip"].status == "unreached"
    assert torch.equal(cached.body[1].skip.weight, model.body[1].skip.weight)
    assert n_cached == 1 + 3 < n_plain  # recording, advancing past it; its Gram from the chain input
    _assert_same(cached, plain, atol=1e-9)


class Down(nn.Module):
    """timm's residual block layout: ``conv1`` and the ``downsample`` branch both read the block input."""

    def __init__(self, cin: int, c: int) -> None:
        super().__init__()
        self.conv1, self.act, self.conv2 = nn.Conv2d(cin, c, 3, 2, 1), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1)
        self.downsample = nn.Sequential(nn.Conv2d(cin, c, 1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        out = self.conv2(self.act(self.conv1(x)))
        return self.act(out + self.downsample(shortcut))


def test_layers_reading_the_block_input_take_it_from_the_cache() -> None:
    """``conv1`` and ``downsample.0`` read the block's input unchanged: their Gram matrices come from the
    cached block inputs, so the block runs once per batch for ``conv2`` and once to advance, where each
    of the three targets used to rerun it. The result equals the uncached schedule's, and the
    downsample's Gram matrix equals one built by hand from the block input (stride-2 1×1 patches)."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Down(4, 8), Down(8, 8), nn.Flatten(),
                          nn.Linear(8 * 16, 3)).double().eval()  # fmt: skip
    calib = [torch.randn(5, 3, 16, 16, dtype=DT) for _ in range(2)]
    names = ["0", "2.conv1", "2.conv2", "2.downsample.0", "3.conv1", "3.conv2", "3.downsample.0", "5"]
    targets = dict.fromkeys(names, 0.5)
    cached, plain, rc, _rp, n_cached, n_plain = _both(model, targets, calib, "2")
    assert n_cached == 1 + 2 * len(calib)  # recording; per batch: conv2's rerun, the advance
    assert n_plain == 1 + len(calib) * (len(names) - 1)  # every target from "2.conv1" on reruns it
    _assert_same(cached, plain, atol=1e-9)
    # the block input after the reconstructed stem, and its 1×1 stride-2 "patches": every other pixel
    with torch.no_grad():
        xs = [cached[1](cached[0](x)) for x in calib]
    cols = torch.cat([x[:, :, ::2, ::2].permute(0, 2, 3, 1).reshape(-1, 4) for x in xs])
    ref = Down(4, 8).double()
    ref.load_state_dict(model[2].state_dict())
    from prunecli.reconstruction.obs import obs_prune

    want = obs_prune(ref.downsample[0].weight.detach().reshape(8, 4), cols.T @ cols, 0.5)
    assert torch.allclose(cached[2].downsample[0].weight.reshape(8, 4), want.weight, rtol=0, atol=1e-12)
    assert rc.layers["2.downsample.0"].positions == len(cols)


class _Counted(nn.Linear):
    """A Linear that counts the times its own computation runs (a stood-in call does not run it)."""

    runs = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.runs += 1
        return super().forward(x)


class _Attn(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv, self.proj = _Counted(d, 3 * d), _Counted(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v)


class _Block(nn.Module):
    """A transformer block's layout: residual adds around an attention and an MLP, each behind a norm."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(d), _Attn(d), nn.LayerNorm(d)
        self.fc1, self.act, self.fc2 = _Counted(d, 2 * d), nn.GELU(), _Counted(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


def test_settled_calls_stand_in_for_themselves_in_later_reruns() -> None:
    """A block with four targets is rerun for three of them and advanced once. Solved calls whose outputs
    fit in the unit's budget (the size of its input: here the attention's output, not the 3× wide ``qkv``
    or the 2× wide ``fc1`` output) are kept and stand in for themselves afterwards. Counted runs of each
    layer's own computation after the recording pass, per batch, in block 0 (rerun for proj, fc1, fc2,
    then advanced): qkv 2 (proj's and fc1's reruns; afterwards the kept attention output covers it),
    proj 1, fc1 2 (fc2's rerun, the advance), fc2 1 (the advance); block 1 is not advanced (nothing
    follows). Plain reruns would run qkv four times per batch. Same weights as the uncached schedule."""
    torch.manual_seed(8)
    model = nn.Sequential(_Block(6), _Block(6)).double().eval()
    calib = [torch.randn(3, 5, 6, dtype=DT) for _ in range(2)]
    names = [f"{b}.{n}" for b in (0, 1) for n in ("attn.qkv", "attn.proj", "fc1", "fc2")]
    cached, plain, *_ = _both(model, dict.fromkeys(names, 0.5), calib, "0")
    _assert_same(cached, plain, atol=1e-9)
    per_batch = {"0.attn.qkv": 2, "0.attn.proj": 1, "0.fc1": 2, "0.fc2": 1,
                 "1.attn.qkv": 2, "1.attn.proj": 1, "1.fc1": 1, "1.fc2": 0}  # fmt: skip
    for name, n in per_batch.items():
        assert cached.get_submodule(name).runs == 1 + n * len(calib), name  # 1: the recording pass
    assert plain.get_submodule("0.attn.qkv").runs > 1 + 3 * len(calib)  # uncached: a pass per later target


class Tail(nn.Module):
    """A chain (``body``) followed by functional code that writes into the chain's output in place, then
    two layers that only a full pass reaches (the fallback), as after a ViT's blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.head, self.head2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        y.mul_(2.0)
        return self.head2(torch.tanh(self.head(y)))


def test_finished_chain_is_replayed_in_later_full_passes() -> None:
    """After ``body`` is solved, the fallback passes for ``head`` and ``head2`` get ``body``'s cached
    output (a copy each time: the forward doubles it in place) instead of rerunning it: ``body.0`` runs
    for the recording pass and once per batch to advance the cache, never again. Same weights as the
    uncached schedule, where every full pass recomputes ``body``."""
    torch.manual_seed(7)
    model = Tail().double().eval()
    calib = [torch.randn(7, 6, dtype=DT) for _ in range(3)]
    targets = {"body.0": 0.5, "body.2": 0.5, "head": 0.4, "head2": 0.4}
    cached, plain, _rc, _rp, n_cached, n_plain = _both(model, targets, calib, "body.0")
    assert n_cached == 1 + len(calib)
    assert n_plain == 1 + len(calib) * len(targets)
    _assert_same(cached, plain, atol=1e-9)
    # and the replay is gone afterwards: the model computes its own body again
    assert "forward" not in cached.body.__dict__


def test_float32_gram_within_the_stated_bound() -> None:
    """Float32 block products summed in float64: every entry within ``(k+2)·u·Σ|x_i||x_j|`` of the exact sum
    (``k`` products per float32 dot product, ``u = 2⁻²⁴``; the float64 sum adds ~1e-16, the +2 covers it)."""
    torch.manual_seed(5)
    layer = nn.Linear(12, 3)
    n = BLOCK + 1000  # two blocks, the second one partial
    x = (torch.randn(n, 12) * torch.logspace(-2, 2, 12)).float()
    acc = GramAccumulator(layer)
    acc.add(x)
    x64 = x.double()
    exact = x64.T @ x64
    bound = (BLOCK + 2) * 2.0**-24 * (x64.abs().T @ x64.abs())
    err = (acc.h[0] - exact).abs()
    assert bool((err <= bound).all())
    # the float32 path really ran: float64 products would be off by ~1e-16 of Σ|x_i||x_j|, float32 ones by ~1e-7
    assert float((err / (x64.abs().T @ x64.abs())).max()) > 1e-10
    assert acc.h.dtype == DT and acc.positions == n


@pytest.mark.parametrize("d", [5, 256, 600])
def test_inverse_cholesky_is_the_upper_factor_of_the_inverse(d: int) -> None:
    """``UᵀU = H⁻¹`` (explicit inverse) with ``U`` upper triangular and a positive diagonal, which makes it
    the unique upper Cholesky factor; 600 exercises the blocked in-place inverse and the panel flip."""
    from prunecli.reconstruction.obs import inverse_cholesky

    g = torch.Generator().manual_seed(d)
    x = torch.randn(d, 2 * d, generator=g, dtype=DT)
    h = x @ x.T + 0.1 * torch.eye(d, dtype=DT)
    u = inverse_cholesky(h)
    inv = torch.linalg.inv(h)
    cond = float(torch.linalg.cond(h))
    assert torch.equal(u, torch.triu(u)) and bool((torch.diagonal(u) > 0).all())
    # backward-stable factorisations: relative error O(d · cond · eps); 10 · d leaves room, a wrong U is off by O(1)
    tol = 10 * d * cond * torch.finfo(DT).eps * float(inv.abs().max())
    assert float((u.T @ u - inv).abs().max()) <= tol
