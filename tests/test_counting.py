"""prunecli.counting: one convention for params and sparsity, checked against counts written out by hand."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import prunecli.archs  # noqa: F401  (registers improved_cnn)
from prunecli.counting import TensorCount, count_model, count_state, count_tensors, is_prunable_weight


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    ).eval()


def test_counts_by_hand() -> None:
    m = _net()
    with torch.no_grad():
        m[0].weight[0] = 0.0  # 27 zeros in the conv
        m[4].weight[:, :10] = 0.0  # 50 zeros in the linear
        m[1].bias.zero_()  # 4 zeros outside the prunable weights
    conv_w, conv_b, bn, lin_w, lin_b = 4 * 3 * 9, 4, 2 * 4, 5 * 144, 5
    c = count_model(m)
    assert c.params == conv_w + conv_b + bn + lin_w + lin_b  # BN running statistics are buffers: not counted
    assert c.params_nonzero == c.params - 27 - 50 - 4
    assert (c.weights, c.weights_zero) == (conv_w + lin_w, 27 + 50)
    assert c.sparsity == (27 + 50) / (conv_w + lin_w)
    assert c.metrics() == {"params": c.params, "params_nonzero": c.params_nonzero, "sparsity": c.sparsity}
    # the same numbers from the state dict (buffers included, skipped by name) and from a header-like list
    assert count_state(m.state_dict()) == c
    listed = [TensorCount(n, tuple(t.shape), int((t == 0).sum())) for n, t in m.state_dict().items()]
    assert count_tensors(listed) == c
    assert count_model(nn.Sequential(nn.ReLU())).sparsity == 0.0


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [("test_resnet", {}), ("test_vit", {}), ("test_efficientnet", {}), ("improved_cnn", {"widths": (4, 6, 8)})],
)
def test_by_name_rule_is_the_conv_linear_set_on_timm_models(arch: str, kwargs: dict) -> None:
    """What inspect counts from a header (no model) is what prune counts on the model."""
    from prunecli.prunable import prunable_params

    m = timm.create_model(arch, num_classes=5, **kwargs)
    by_name = {n for n, p in m.named_parameters() if is_prunable_weight(n, p.shape)}
    assert by_name == set(prunable_params(m))
    assert count_state(m.state_dict()) == count_model(m)
    if arch == "test_vit":  # residual-stream tensors are parameters but not prunable weights
        assert not is_prunable_weight("cls_token", m.cls_token.shape)
        assert not is_prunable_weight("pos_embed", m.pos_embed.shape)
