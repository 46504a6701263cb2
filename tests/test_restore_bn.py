"""``restore --method bn``: BatchNorm re-estimation checked against statistics computed by hand in float64.

The network is conv0 → BN0 → ReLU → conv1 → BN1 → ReLU → conv2 → BN2 → ReLU → conv3 → BN3 → ReLU →
pool → fc, with conv1's output channels pruned (so conv2 lost input channels). BN0 and BN1 see exactly
the dense model's values (BN1's kept channels are computed as before); BN2 and BN3 are downstream of
the changed conv2. The reference statistics are the mean and unbiased variance over *all* calibration
images of each BN's eval-mode input, with the BNs upstream already re-estimated, computed on a float64
copy layer by layer with the BN formula written out here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunecli.api.restore import restore_model

KEPT = [0, 2, 3, 5]  # conv1 / BN1 output channels kept (of 6)
PLAN = {
    "channels": {
        "conv1": {"out": {"kept": KEPT, "dense": 6}},
        "bn1": {"out": {"kept": KEPT, "dense": 6}},
        "conv2": {"in": {"kept": KEPT, "dense": 6}},
    }
}
BNS = ("bn0", "bn1", "bn2", "bn3")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        widths = [3, 4, 6, 5, 4]
        for i in range(4):
            setattr(self, f"conv{i}", nn.Conv2d(widths[i], widths[i + 1], 3, padding=1, bias=i % 2 == 0))
            setattr(self, f"bn{i}", nn.BatchNorm2d(widths[i + 1]))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(4):
            x = torch.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return self.fc(x.mean((2, 3)))


def _pruned() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the conv/fc initialisation
    net = Net()
    with torch.no_grad():
        for name in BNS:  # statistics far from the data's, so a re-estimate is visible
            bn = net.get_submodule(name)
            c = bn.num_features
            bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=gen) * 0.3)
            bn.running_mean.copy_(torch.randn(c, generator=gen))
            bn.running_var.copy_(torch.rand(c, generator=gen) * 3 + 0.2)
        net.conv1.weight = nn.Parameter(net.conv1.weight[KEPT].clone())
        for t in ("weight", "bias", "running_mean", "running_var"):
            val = getattr(net.bn1, t)[KEPT].clone()
            setattr(net.bn1, t, nn.Parameter(val) if t in ("weight", "bias") else val)
        net.bn1.num_features = len(KEPT)
        net.conv2.weight = nn.Parameter(net.conv2.weight[:, KEPT].clone())
    return net.eval()


def _hand_stats(net: nn.Module, x: torch.Tensor, reestimate: set[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Eval-mode forward in float64, BN by BN; the BNs in ``reestimate`` take the statistics of their input."""
    m = copy.deepcopy(net).double()
    h = x.double()
    out = {}
    with torch.no_grad():
        for i in range(4):
            z = m.get_submodule(f"conv{i}")(h)
            bn = m.get_submodule(f"bn{i}")
            if f"bn{i}" in reestimate:
                mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=True)
            else:
                mean, var = bn.running_mean, bn.running_var
            out[f"bn{i}"] = (mean, var)
            norm = (z - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps)
            h = torch.relu(norm * bn.weight[:, None, None] + bn.bias[:, None, None])
    return out


def _data(sizes: tuple[int, ...]) -> list[torch.Tensor]:
    x = torch.randn(sum(sizes), 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    return list(torch.split(x, list(sizes)))


def _assert_stats(net: nn.Module, ref: dict[str, tuple[torch.Tensor, torch.Tensor]], names: tuple[str, ...]) -> None:
    for n in names:
        bn = net.get_submodule(n)
        torch.testing.assert_close(bn.running_mean.double(), ref[n][0], rtol=1e-4, atol=1e-5, msg=n)
        torch.testing.assert_close(bn.running_var.double(), ref[n][1], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize(("scope", "changed"), [("downstream", ("bn2", "bn3")), ("all", BNS)])
def test_exact_statistics_over_all_calibration_images(scope: str, changed: tuple[str, ...]) -> None:
    net = _pruned()
    before = copy.deepcopy(net)
    batches = _data((50, 37, 1))  # unequal sizes, a 1-image batch: per-batch averaging would be biased
    ref = _hand_stats(before, torch.cat(batches), set(changed))
    rep = restore_model(net, None, PLAN, "bn", params={"scope": scope}, calib=batches)
    _assert_stats(net, ref, BNS)
    for n in set(BNS) - set(changed):  # untouched, bit for bit
        assert torch.equal(net.get_submodule(n).running_mean, before.get_submodule(n).running_mean)
        assert torch.equal(net.get_submodule(n).running_var, before.get_submodule(n).running_var)
    info = rep.layers["bn"]["*"]
    assert info["bn_layers"] == len(changed) and info["bn_kept"] == 4 - len(changed) and info["samples"] == 88
    assert not net.training


def test_samples_caps_the_calibration_images() -> None:
    net = _pruned()
    batches = _data((50, 37))
    ref = _hand_stats(net, torch.cat(batches)[:60], {"bn2", "bn3"})
    restore_model(net, None, PLAN, "bn", params={"samples": 60}, calib=batches)
    _assert_stats(net, ref, BNS)


def test_single_pass_pools_exactly_but_normalises_per_batch_upstream() -> None:
    net = _pruned()
    # batches from different distributions (as an unshuffled, class-sorted loader gives): per-batch
    # normalisation upstream removes their differences, the eval-mode model does not
    batches = [b * scale for b, scale in zip(_data((50, 37, 3)), (0.2, 1.0, 5.0), strict=True)]
    ref = _hand_stats(net, torch.cat(batches), {"bn2", "bn3"})
    restore_model(net, None, PLAN, "bn", params={"exact": "false"}, calib=batches)
    # bn2's input does not depend on a re-estimated BN: pooled statistics over unequal batches are exact
    _assert_stats(net, ref, ("bn0", "bn1", "bn2"))
    # bn3's input was normalised by bn2's per-batch statistics in the train-mode pass: not the eval input
    assert not torch.allclose(net.bn3.running_var.double(), ref["bn3"][1], rtol=0.05)


def test_no_batchnorm_downstream_leaves_statistics_and_warns() -> None:
    net = _pruned()
    before = copy.deepcopy(net)
    plan = {
        "channels": {"conv3": {"out": {"kept": [0, 1, 3], "dense": 4}}, "fc": {"in": {"kept": [0, 1, 3], "dense": 4}}}
    }
    with torch.no_grad():
        net.conv3.weight = nn.Parameter(net.conv3.weight[[0, 1, 3]].clone())
        for t in ("weight", "bias", "running_mean", "running_var"):
            val = getattr(net.bn3, t)[[0, 1, 3]].clone()
            setattr(net.bn3, t, nn.Parameter(val) if t in ("weight", "bias") else val)
        net.fc.weight = nn.Parameter(net.fc.weight[:, [0, 1, 3]].clone())
    rep = restore_model(net, None, plan, "bn", calib=_data((20,)))
    assert rep.layers["bn"]["*"]["bn_layers"] == 0
    assert any("no BatchNorm depends" in w for w in rep.warnings)
    for n in ("bn0", "bn1", "bn2"):
        assert torch.equal(net.get_submodule(n).running_var, before.get_submodule(n).running_var)


def test_bad_scope_is_refused() -> None:
    from prunecli.errors import InputError

    with pytest.raises(InputError, match="scope"):
        restore_model(_pruned(), None, PLAN, "bn", params={"scope": "some"}, calib=_data((8,)))
