"""Residual streams: a pruned stream channel restored into every layer that reads it (docs/restoration.md).

The network is built by hand: a stem conv → BN writes the stream, one residual block (conv → BN → ReLU →
conv → BN) adds to it, and the stream is read by the block's first conv, a second block's first conv and
the head after global pooling. Pruned stream channel ``J`` is constructed to be an exact combination of
kept ones in *both* producers' post-BN outputs, so it is the same combination everywhere along the stream;
restoring must give back the dense model's own forward pass (the independent reference).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunecli.api.restore import restore_model
from test_restore_math import entry, slice_model

C, J = 6, 4  # stream width, the pruned stream channel
KEPT = [k for k in range(C) if k != J]
# float32 forward passes of a few hundred terms: the dense and the restored model agree to ~1e-6
# relative; 1e-4 leaves room for summation order and still fails on any missed term (they are O(0.1))
TOL = {"atol": 1e-4, "rtol": 1e-4}


class StreamNet(nn.Module):
    """stem → [block: x + bn2(conv2(relu(bn1(conv1(x)))))] → (relu?) → a reader conv, and a head after pooling."""

    def __init__(self, relu_after_add: bool) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)
        self.conv1, self.bn1 = nn.Conv2d(C, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
        self.conv2, self.bn2 = nn.Conv2d(5, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)
        self.reader, self.head2 = nn.Conv2d(C, 4, 3, padding=1), nn.Linear(4, 3)
        self.head = nn.Linear(C, 3)
        self.act = nn.ReLU() if relu_after_add else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.bn0(self.stem(x))
        s = self.act(s + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(s))))))
        return self.head(s.mean(dim=(2, 3))) + self.head2(torch.relu(self.reader(s)).mean(dim=(2, 3)))


def _randomise(net: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=gen) + 0.5
            m.bias.data = torch.randn(c, generator=gen) * 0.2
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


@torch.no_grad()
def _make_combination(conv: nn.Conv2d, bn: nn.BatchNorm2d, alpha: torch.Tensor) -> None:
    """Rewrites channel J so that its post-BN output is exactly Σ_i alpha_i · (channel KEPT[i]'s).

    Post-BN channel k is ``ŵ_k·x + b̂_k`` with ``ŵ = γ/σ·w`` and ``b̂ = β − γ/σ·μ`` (bias-free conv): set
    ``w_J = σ_J/γ_J · Σ alpha_i ŵ_i`` and ``β_J = Σ alpha_i b̂_i + γ_J μ_J / σ_J``.
    """
    sig = torch.sqrt(bn.running_var.double() + bn.eps)
    scale = bn.weight.double() / sig
    w_hat = conv.weight.double() * scale[:, None, None, None]
    b_hat = bn.bias.double() - scale * bn.running_mean.double()
    a = alpha.double()
    conv.weight[J] = (torch.einsum("i,iabc->abc", a, w_hat[KEPT]) / scale[J]).float()
    bn.bias[J] = float(a @ b_hat[KEPT] + scale[J] * bn.running_mean[J].double())


def _net(relu_after_add: bool, alpha: torch.Tensor) -> StreamNet:
    torch.manual_seed(0)
    net = StreamNet(relu_after_add).eval()
    _randomise(net, 1)
    _make_combination(net.stem, net.bn0, alpha)
    _make_combination(net.conv2, net.bn2, alpha)
    return net


def _plan() -> dict:
    """The stream pruned everywhere: both producers and their BNs, every reader's input."""
    channels = {
        "stem": entry(KEPT, C),
        "bn0": entry(KEPT, C),
        "conv2": entry(KEPT, C),
        "bn2": entry(KEPT, C),
        "conv1": entry(KEPT, C, "in"),
        "reader": entry(KEPT, C, "in"),
        "head": entry(KEPT, C, "in"),
    }
    return {"channels": channels}


def _check(net: StreamNet, method: str, params: dict, calib: list[torch.Tensor] | None = None) -> None:
    plan = _plan()
    pruned = slice_model(net, plan["channels"])
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = net(x)
        assert (pruned(x) - ref).abs().max() > 1e-2  # pruning the stream channel does change the output
    report = restore_model(pruned, net, plan, method, params=params, calib=calib, example_input=x[:1])
    (group,) = [g for g in report.groups if g["kind"] == "stream"]
    assert group["producers"] == ["stem", "conv2"] and group["restored_by"] == [method]
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref, **TOL)


def test_stream_linear_combination_restored_exactly_by_lbyl() -> None:
    """A signed combination through the add (no activation on the stream): the LBYL identity is exact."""
    _check(_net(False, torch.tensor([0.5, -1.2, 0.3, 0.8, 0.0])), "lbyl", {"lambda1": 0.0, "lambda2": 1e-12})


@pytest.mark.parametrize("method", ["lbyl", "merge"])
def test_stream_positive_multiple_restored_exactly_through_relu(method: str) -> None:
    """ReLU after the add commutes with one positive coefficient: exact for both data-free methods."""
    params = {"lambda1": 0.0, "lambda2": 1e-12} if method == "lbyl" else {}
    _check(_net(True, torch.tensor([0.0, 1.7, 0.0, 0.0, 0.0])), method, params)


def test_stream_linear_combination_restored_exactly_by_lstsq() -> None:
    """Every reader is refit on the pruned stream; the dense reader is a linear map of it, so the fit is exact."""
    net = _net(False, torch.tensor([0.5, -1.2, 0.3, 0.8, 0.0]))  # no ReLU: the readers see a linear map
    gen = torch.Generator().manual_seed(3)
    calib = [torch.randn(32, 3, 8, 8, generator=gen) for _ in range(2)]  # 64 samples > the head's 6 inputs
    _check(net, "lstsq", {"ridge": 1e-12, "samples": 64}, calib)


def test_stream_general_channel_lowers_error_with_lbyl() -> None:
    """A stream channel that is no combination of kept ones: lbyl cannot be exact, but must not hurt."""
    torch.manual_seed(0)
    net = StreamNet(False).eval()
    _randomise(net, 4)
    plan = _plan()
    pruned = slice_model(net, plan["channels"])
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = net(x)
        before = float((pruned(x) - ref).norm())
    restore_model(pruned, net, plan, "lbyl", example_input=x[:1])
    with torch.no_grad():
        assert float((pruned(x) - ref).norm()) < before
