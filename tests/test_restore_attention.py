"""Attention: pruned value dimensions of timm's fused ``qkv`` compensated per head in ``proj``.

One timm ``Attention`` (fused qkv with bias, 3 heads of 4 dimensions) loses one dimension per head — a
different one in each head, from q, k and v alike, as channel pruning removes them. The pruned query rows
are zero, so the attention logits (and weights) are the dense ones; the pruned value row of each head is
then either an exact combination of the head's kept value rows (restoring must give back the dense
model's own forward pass) or a random row (restoring must lower the output error).
"""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Attention
from torch import nn

from prunecli.api.restore import restore_model
from test_restore_math import slice_model

DIM, HEADS = 12, 3
HD = DIM // HEADS
PRUNED_DIM = {0: 1, 1: 3, 2: 0}  # head → its pruned dimension (a different one per head)
# float32 forward of a 12-wide attention: the restored and the dense model agree to ~1e-6; any missed
# value term moves the output by O(0.1)
TOL = {"atol": 1e-4, "rtol": 1e-4}


class AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Attention(DIM, num_heads=HEADS, qkv_bias=True)
        self.attn.fused_attn = False  # sdpa scales by the *pruned* head_dim; the module keeps the dense scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


def _rows(part: int) -> list[int]:
    """qkv output rows of the pruned dimensions in q (0), k (1) or v (2)."""
    return [part * DIM + h * HD + d for h, d in PRUNED_DIM.items()]


@torch.no_grad()
def _net(combination: bool, multiple: bool = False) -> AttnNet:
    """``combination``: each pruned value row = Σ alpha_i · kept row i of its head (``multiple``: one alpha > 0)."""
    torch.manual_seed(0)
    net = AttnNet().eval()
    qkv = net.attn.qkv
    for r in _rows(0):  # zero query rows: the pruned q·k terms vanish, the attention weights are the dense ones
        qkv.weight[r] = 0.0
        qkv.bias[r] = 0.0
    if combination:
        gen = torch.Generator().manual_seed(1)
        for h, d in PRUNED_DIM.items():
            kept = [2 * DIM + h * HD + i for i in range(HD) if i != d]
            alpha = torch.randn(len(kept), generator=gen)
            if multiple:
                alpha = torch.tensor([1.7] + [0.0] * (len(kept) - 1))
            qkv.weight[2 * DIM + h * HD + d] = alpha @ qkv.weight[kept]
            qkv.bias[2 * DIM + h * HD + d] = alpha @ qkv.bias[kept]
    return net


def _plan() -> dict:
    gone = set(_rows(0) + _rows(1) + _rows(2))
    kept_qkv = [i for i in range(3 * DIM) if i not in gone]
    kept_v = [i - 2 * DIM for i in kept_qkv if i >= 2 * DIM]
    return {"channels": {"attn.qkv": {"out": {"kept": kept_qkv, "dense": 3 * DIM}},
                         "attn.proj": {"in": {"kept": kept_v, "dense": DIM}}}}  # fmt: skip


def _pruned(net: AttnNet, plan: dict) -> AttnNet:
    pruned = slice_model(net, plan["channels"])
    pruned.attn.head_dim = HD - 1  # what channel pruning sets (forward reshapes by it)
    if isinstance(getattr(pruned.attn, "attn_dim", None), int):
        pruned.attn.attn_dim = HEADS * (HD - 1)
    return pruned


def _x() -> torch.Tensor:
    return torch.randn(4, 7, DIM, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(("method", "multiple"), [("lbyl", False), ("merge", True)])
def test_value_combination_restored_exactly(method: str, multiple: bool) -> None:
    """lbyl: any combination within the head; merge (one kept dimension per pruned one): a positive multiple."""
    net, plan = _net(combination=True, multiple=multiple), _plan()
    pruned, x = _pruned(net, plan), _x()
    with torch.no_grad():
        ref = net(x)
        assert (pruned(x) - ref).abs().max() > 1e-2  # pruning does change the output
    params = {"lambda2": 1e-12} if method == "lbyl" else {}
    report = restore_model(pruned, net, plan, method, params=params, example_input=x[:1])
    (group,) = report.groups
    assert group["kind"] == "attention" and group["restored_by"] == [method]
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref, **TOL)


def test_value_dims_not_in_the_span_lower_the_error() -> None:
    net, plan = _net(combination=False), _plan()
    pruned, x = _pruned(net, plan), _x()
    with torch.no_grad():
        ref = net(x)
        before = float((pruned(x) - ref).norm())
    restore_model(pruned, net, plan, "lbyl", example_input=x[:1])
    with torch.no_grad():
        after = float((pruned(x) - ref).norm())
    assert 0 < after < before


def test_compensation_stays_within_each_head() -> None:
    """A pruned value dimension is rebuilt from its own head's kept dims only."""
    net, plan = _net(combination=True), _plan()
    pruned = _pruned(net, plan)
    before = pruned.attn.proj.weight.detach().clone()
    restore_model(pruned, net, plan, "lbyl", params={"lambda2": 1e-12}, example_input=_x()[:1])
    changed = (pruned.attn.proj.weight != before).any(dim=0)
    kept_v = plan["channels"]["attn.proj"]["in"]["kept"]
    heads_changed = {kept_v[c] // HD for c in torch.nonzero(changed).flatten().tolist()}
    assert heads_changed == set(PRUNED_DIM)  # every head that lost a dimension, and each only in itself
    # independent check of the first head: proj's new columns = dense columns + V_j · alpha, alpha the least
    # squares fit of the pruned value weights by the kept ones (the bias goes to proj's bias)
    qkv_w = net.attn.qkv.weight.double()
    d = PRUNED_DIM[0]
    kept_rows = [2 * DIM + i for i in range(HD) if i != d]
    alpha = torch.linalg.lstsq(qkv_w[kept_rows].T, qkv_w[2 * DIM + d][:, None]).solution[:, 0]
    dense_proj = net.attn.proj.weight.double()
    expected = dense_proj[:, [i for i in range(HD) if i != d]] + dense_proj[:, [d]] * alpha[None, :]
    torch.testing.assert_close(pruned.attn.proj.weight[:, : HD - 1].double(), expected, atol=1e-5, rtol=1e-5)


def test_lstsq_refits_proj_on_the_attention_output() -> None:
    """lstsq on a random (non-combination) value row: the refit proj lowers the output error on the same data."""
    net, plan = _net(combination=False), _plan()
    pruned = _pruned(net, plan)
    gen = torch.Generator().manual_seed(4)
    calib = [torch.randn(8, 7, DIM, generator=gen) for _ in range(2)]
    x = torch.cat(calib)
    with torch.no_grad():
        ref = net(x)
        before = float((pruned(x) - ref).norm())
    report = restore_model(pruned, net, plan, "lstsq", params={"samples": 16}, calib=calib)
    with torch.no_grad():
        after = float((pruned(x) - ref).norm())
    assert after < 0.5 * before
    assert report.groups[0]["restored_by"] == ["lstsq"]
