"""Replayed partial forward passes (restoration/replay.py) against plain full forward passes.

The replay resumes from cached activations; the reference is a fresh ``model(x)`` with a hook on the
layer. Same operations on the same tensors: the activations must be bit-identical, so ``torch.equal``.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from prunecli.restoration.bn import reestimate_bn
from prunecli.restoration.replay import Replay, build_chain


def _full_capture(model: nn.Module, name: str, x: torch.Tensor, want: str) -> torch.Tensor:
    box: dict[str, torch.Tensor] = {}
    mod = model.get_submodule(name)

    def keep(t: torch.Tensor) -> None:  # returns None: a hook's return value would replace the tensor
        box.setdefault("t", t.clone())

    if want == "input":
        h = mod.register_forward_pre_hook(lambda _m, a: keep(a[0]))
    else:
        h = mod.register_forward_hook(lambda _m, _a, o: keep(o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return box["t"]


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def test_chain_splits_a_resnet_into_blocks() -> None:
    chain = build_chain(_resnet(), torch.randn(1, 3, 32, 32))
    assert chain.names[:5] == ["conv1", "bn1", "act1", "maxpool", "layer1.0"]
    assert "layer4.1" in chain.names and chain.names[-1] == "fc"
    assert chain.mutates_input[chain.names.index("act1")]  # inplace ReLU: bn1's output is no cut
    assert chain.owner("layer2.0.conv2") == chain.names.index("layer2.0")


def test_replay_matches_full_forward_while_layers_change() -> None:
    model = _resnet()
    batches = [torch.randn(4, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    replay = Replay(model, batches)
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for k, name in enumerate(convs):
        for b, x in enumerate(batches):
            for want in ("input", "output"):
                assert torch.equal(replay.capture(name, b, want), _full_capture(model, name, x, want)), (name, want)
        if k % 3 == 0:  # change the layer, as a refit does: later captures must see it
            with torch.no_grad():
                model.get_submodule(name).weight.mul_(0.5)
            replay.changed(name)
    assert replay.element_calls < len(convs) * len(batches) * len(replay.chain.names) / 2  # prefixes were cached


def test_replay_of_an_earlier_layer_after_a_later_one() -> None:
    model = _resnet()
    batches = [torch.randn(2, 3, 32, 32)]
    replay = Replay(model, batches)
    replay.capture("layer3.0.conv1", 0, "input")
    with torch.no_grad():
        model.layer1[0].conv1.weight.mul_(-1)
    replay.changed("layer1.0.conv1")
    for name in ("layer1.0.conv2", "layer4.0.conv1"):
        assert torch.equal(replay.capture(name, 0, "input"), _full_capture(model, name, batches[0], "input"))


class _InplaceResidual(nn.Module):
    """Children form a chain, but an in-place add between two of them makes it no split."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.a(x))
        y += x
        return self.act(y)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(6, 6)
        self.block = _InplaceResidual()
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.pre(x)))


def test_an_inplace_residual_add_is_not_split() -> None:
    torch.manual_seed(0)
    model = _Net().eval()
    chain = build_chain(model, torch.randn(1, 6))
    assert chain.names == ["pre", "block", "head"]
    x = torch.randn(5, 6)
    replay = Replay(model, [x])
    for name in ("block.act", "head"):
        assert torch.equal(replay.capture(name, 0, "input"), _full_capture(model, name, x, "input"))


def test_no_cache_budget_still_matches() -> None:
    model = _resnet()
    batches = [torch.randn(2, 3, 32, 32)]
    replay = Replay(model, batches, budget=0)
    assert torch.equal(replay.capture("fc", 0, "input"), _full_capture(model, "fc", batches[0], "input"))
    assert replay.pos == -1


def test_exact_bn_statistics_equal_the_textbook_sequential_estimate() -> None:
    """Each BN gets mean / unbiased variance of its eval-mode input, upstream BNs already updated:
    computed here by full forward passes, one BN at a time in call order."""
    model = _resnet()
    ref = _resnet()
    batches = [torch.randn(5, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    reestimate_bn(model, batches)
    norms = [n for n, m in ref.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for name in norms:  # named_modules order is call order in a timm ResNet
        xs = torch.cat([_full_capture(ref, name, x, "input") for x in batches]).double()
        flat = xs.transpose(0, 1).reshape(xs.shape[1], -1)
        bn = ref.get_submodule(name)
        bn.running_mean.copy_(flat.mean(1).float())
        bn.running_var.copy_(flat.var(1, unbiased=True).float())
        got = model.get_submodule(name)
        torch.testing.assert_close(got.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
