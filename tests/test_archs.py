"""The papers' networks as timm models: sizes from the papers, forward equal to a hand-built network."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import prunecli.archs  # noqa: F401  (registers the models)


def test_improved_cnn_size_matches_paper_a() -> None:
    m = timm.create_model("improved_cnn")
    convs = [(3, 64), (64, 128), (128, 256)]
    by_hand = sum(i * o * 9 + o + 2 * o for i, o in convs) + (4096 * 512 + 512) + (512 * 10 + 10)
    assert sum(p.numel() for p in m.parameters()) == by_hand == 2_474_506
    running = sum(b.numel() for n, b in m.named_buffers() if not n.endswith("num_batches_tracked"))
    assert by_hand + running == 2_475_402  # paper A's count: 2,475,402 including the BN buffers
    assert (by_hand + running) * 4 / 2**20 == pytest.approx(9.44, abs=0.005)  # MiB fp32 (paper: 9.45 MB)


def test_improved_cnn_layout_and_forward_equal_hand_network() -> None:
    torch.manual_seed(0)
    m = timm.create_model("improved_cnn").eval()
    for i, c in enumerate((64, 128, 256)):
        block = m.features[i]
        assert isinstance(block.conv, nn.Conv2d) and block.conv.out_channels == c and block.conv.kernel_size == (3, 3)
        assert isinstance(block.bn, nn.BatchNorm2d) and isinstance(block.act, nn.ReLU)
        assert isinstance(block.pool, nn.MaxPool2d)
    assert (m.fc1.in_features, m.fc1.out_features, m.fc2.out_features) == (4096, 512, 10)
    assert m.drop.p == 0.5 and m.get_classifier() is m.fc2
    with torch.no_grad():  # non-trivial BN statistics
        for i in range(3):
            m.features[i].bn.running_mean.uniform_(-0.2, 0.2)
            m.features[i].bn.running_var.uniform_(0.5, 2.0)
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate(((3, 64), (64, 128), (128, 256))):
        conv, bn = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)
        conv.load_state_dict(m.features[i].conv.state_dict())
        bn.load_state_dict(m.features[i].bn.state_dict())
        layers += [conv, bn, nn.ReLU(), nn.MaxPool2d(2)]
    fc1, fc2 = nn.Linear(4096, 512), nn.Linear(512, 10)
    fc1.load_state_dict(m.fc1.state_dict())
    fc2.load_state_dict(m.fc2.state_dict())
    hand = nn.Sequential(*layers, nn.Flatten(), fc1, nn.ReLU(), nn.Dropout(0.5), fc2).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m(x), hand(x), atol=1e-5)
        assert m.forward_features(x).shape == (3, 256, 4, 4)
        assert m.forward_head(m.forward_features(x), pre_logits=True).shape == (3, 512)


def test_fc_mlp_default_is_64_300_100_10() -> None:
    torch.manual_seed(0)
    m = timm.create_model("fc_mlp").eval()
    assert [(fc.in_features, fc.out_features) for fc in (m.fc1, m.fc2, m.head)] == [(64, 300), (300, 100), (100, 10)]
    assert all(fc.bias is not None for fc in (m.fc1, m.fc2, m.head))
    assert sum(p.numel() for p in m.parameters()) == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    x = torch.randn(4, 1, 8, 8)
    h = x.flatten(1)
    for layer in (m.fc1, m.fc2):
        h = torch.relu(h @ layer.weight.T + layer.bias)
    with torch.no_grad():
        assert torch.allclose(m(x), h @ m.head.weight.T + m.head.bias, atol=1e-6)


def test_fc_mlp_options() -> None:
    m = timm.create_model("fc_mlp", hidden=(20, 30, 40), bn=True, num_classes=3, in_chans=3, img_size=4).eval()
    assert [m.fc1.in_features, m.fc1.out_features, m.fc3.out_features, m.head.out_features] == [48, 20, 40, 3]
    assert isinstance(m.bn1, nn.BatchNorm1d) and isinstance(m.bn3, nn.BatchNorm1d)
    assert m(torch.randn(2, 3, 4, 4)).shape == (2, 3)
    names = [n for n, _ in m.named_children()]
    assert names.index("bn1") == names.index("fc1") + 1  # BN right after its Linear (LBYL's layout)


@pytest.mark.parametrize("arch", ["improved_cnn", "fc_mlp"])
def test_timm_integration(arch: str) -> None:
    """Registered like timm's own: listed, pretrained_cfg for transforms, head reset, meta build."""
    from timm.data import resolve_data_config

    assert timm.is_model(arch) and arch in timm.list_models(arch)
    m = timm.create_model(arch, num_classes=10)
    cfg = resolve_data_config({}, model=m)
    assert cfg["input_size"] == ((3, 32, 32) if arch == "improved_cnn" else (1, 8, 8))
    m.reset_classifier(4)
    assert m.get_classifier().out_features == 4 and m.num_classes == 4
    m.reset_classifier(0)
    assert isinstance(m.get_classifier(), nn.Identity)
    with torch.device("meta"):
        meta = timm.create_model(arch)
    assert all(p.is_meta for p in meta.parameters())
    headless = timm.create_model(arch, num_classes=0).eval()
    size = cfg["input_size"]
    assert headless(torch.randn(2, *size)).shape == (2, headless.num_features)


def test_improved_cnn_rejects_bad_size() -> None:
    with pytest.raises(ValueError, match="divisible by 8"):
        timm.create_model("improved_cnn", img_size=30)
    assert timm.create_model("improved_cnn", img_size=64).fc1.in_features == 256 * 8 * 8
