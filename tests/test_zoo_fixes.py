"""Fixes for zoo families that failed ``--target macs=0.5`` for reasons of prunecli's (issue 16).

Each test checks against a hand-built expectation: offsets from the convs' widths, which module of a
hand-built block is an attention, and a hand-written cost curve that the real-plan search must hit.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import prunecli.depgraph as depgraph
from prunecli.pruning import budget as budget_mod
from prunecli.pruning import channel as channel_mod
from prunecli.pruning.groups import attention_modules


class _Cat(nn.Module):
    """Two convs (5 and 7 channels) concatenated on channels, then a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 5, 1), nn.Conv2d(3, 7, 1), nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


def _concats(dg: Any) -> list[Any]:
    return [n for n in dg.module2node.values() if n.type == depgraph.tp.ops.OPTYPE.CONCAT]


def test_concat_of_known_widths_is_still_index_mapped() -> None:
    dg = depgraph.build_graph(_Cat(), torch.randn(1, 3, 4, 4))
    (cat,) = _concats(dg)
    assert cat.module.offsets == [0, 5, 12]  # cumulative widths of conv a (5) and conv b (7)


def test_concat_with_an_unknown_width_no_longer_breaks_the_graph() -> None:
    """cs3darknet: a concat input whose width Torch-Pruning cannot infer crashed its ``int + None`` sum."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("cs3darknet_focus_s", pretrained=False).eval()
    dg = depgraph.build_graph(model, torch.randn(1, 3, 64, 64))
    unknown = [c for c in _concats(dg) if c.module.concat_sizes is None]
    assert unknown, "cs3darknet_focus_s should hold a concat of unknown width (the case being fixed)"
    assert all(c.module.offsets is None for c in unknown)  # left unmapped, so Torch-Pruning's pruner skips it


class _Attn(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)


class _Block(nn.Module):
    """davit's SpatialBlock: stores num_heads, its attention is a fused-qkv child."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.attn, self.mlp = 2, _Attn(8, 2), nn.Linear(8, 8)


class _Odd(nn.Module):
    """An attention of another layout: a head count but no fused qkv anywhere below it."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.q, self.k = 2, nn.Linear(8, 8), nn.Linear(8, 8)


def test_block_around_a_fused_attention_is_not_of_unknown_layout() -> None:
    model = nn.Sequential(_Block(), _Odd())
    fused, other = attention_modules(model)
    assert sorted(fused) == ["0.attn"]
    assert other == ["1"]


# --------------------------------------------------------------------------------- real-plan search


class _Model:
    """The cost model's prediction: 100·(1 − r) MACs, so it settles at r = 0.5 for a budget of 50."""

    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def dense(self, kind: str) -> int:
        return 100_000

    def cost(self, kind: str, r: float) -> int:
        return int(100_000 * (1 - r))

    def fill(self, kind: str, r: float, budget: float) -> tuple[dict, int]:
        return {}, self.cost(kind, r)


def _ghost(r: float) -> float:
    """Ghostnet-like real plans: far under at the model's ratio, non-monotone, over the budget near 1."""
    return 100_000 * (1 - 1.6 * r) if r <= 0.6 else 100_000 * (0.04 + 1.2 * (r - 0.6))


def _mamba(r: float) -> float:
    """Mambaout-like real plans: over the budget at the model's ratio (frozen modules), reachable higher up."""
    return 100_000 * (1 - 0.6 * r)


@pytest.mark.parametrize("real", [_ghost, _mamba], ids=["under", "over"])
def test_real_plan_search_lands_within_tolerance(monkeypatch: pytest.MonkeyPatch, real: Any) -> None:
    def plan(model: Any, *, ratio: float, keeps: Any = None, **_: Any) -> SimpleNamespace:
        v = int(real(ratio))
        return SimpleNamespace(macs_after=v, params_after=v, frozen=("Frozen",))

    monkeypatch.setattr(budget_mod, "ChannelCost", _Model)
    monkeypatch.setattr(channel_mod, "plan_channels", plan)
    got, budget, steps = budget_mod.plan_channels_to(nn.Identity(), "macs", "0.5")
    assert budget.absolute == 50_000
    assert 50_000 * (1 - budget_mod.TOLERANCE) <= got.macs_after <= 50_000
    assert any(s.get("planned") for s in steps)


def test_search_stays_within_lo_hi() -> None:
    b = budget_mod.Budget("macs", "0.5", 50.0, 100.0)
    tried = budget_mod.search(lambda r: 100 * (1 - r), b, lo=0.25, hi=0.75).steps
    assert all(0.25 <= s["ratio"] <= 0.75 for s in tried)


# --------------------------------------------------------------------------------- bounded groups


class _Chain(nn.Module):
    """``n`` 1x1 convs on one residual stream: the stem's group holds every one of them (2 items per conv)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for c in self.convs:
            x = x + c(x)
        return x


def test_a_group_past_the_item_bound_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from prunecli.pruning.groups import _all_groups

    model = _Chain(6)
    dg = depgraph.build_graph(model, torch.randn(1, 3, 2, 2))
    stem = dg.get_pruning_group(model.stem, depgraph.tp.prune_conv_out_channels, [0])
    assert len(stem) > 12  # stem + 6 convs' outputs and inputs, the adds
    monkeypatch.setattr(depgraph, "MAX_GROUP_ITEMS", 12)
    with pytest.raises(depgraph.GroupTooLarge):
        dg.get_pruning_group(model.stem, depgraph.tp.prune_conv_out_channels, [0])
    assert [len(g) for g in _all_groups(dg, [])] == []  # the residual stream is the only group: given up
    monkeypatch.setattr(depgraph, "MAX_GROUP_ITEMS", len(stem))
    assert [len(g) for g in _all_groups(dg, [])] == [len(stem)]


def test_a_group_past_the_index_bound_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The residual stream's group of ``_Chain(6)`` with all 4 channels: 4 indices on each of its items
    (the merged group counts one item per layer and direction; the closure adds more, at 4 each)."""
    from prunecli.pruning.groups import _all_groups

    model = _Chain(6)
    dg = depgraph.build_graph(model, torch.randn(1, 3, 2, 2))
    (group,) = list(_all_groups(dg, []))
    total = sum(len(it.idxs) for it in group)
    assert total == 4 * len(group)
    monkeypatch.setattr(depgraph, "MAX_GROUP_INDICES", total - 1)  # the closure adds at least as many
    assert list(_all_groups(dg, [])) == []
    monkeypatch.setattr(depgraph, "MAX_GROUP_INDICES", 1 << 22)
    assert len(list(_all_groups(dg, []))) == 1


def _rising(r: float) -> float:
    """Ghostnet as the zoo saw it: over the budget at the cost model's ratio (0.5) and again near 1, under between."""
    return 100_000 * (1 - 0.9 * r) if r <= 0.8 else 100_000 * (0.28 + 1.5 * (r - 0.8))


def test_over_budget_and_non_monotone_is_not_called_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    def plan(model: Any, *, ratio: float, keeps: Any = None, **_: Any) -> SimpleNamespace:
        v = int(_rising(ratio))
        return SimpleNamespace(macs_after=v, params_after=v, frozen=())

    monkeypatch.setattr(budget_mod, "ChannelCost", _Model)
    monkeypatch.setattr(channel_mod, "plan_channels", plan)
    assert _rising(1.0) > 50_000 < _rising(0.5)  # both ends over: only the middle is within the budget
    got, _, _ = budget_mod.plan_channels_to(None, "macs", "0.5")
    assert 50_000 * (1 - budget_mod.TOLERANCE) <= got.macs_after <= 50_000


# ---------------------------------------------------------------------------------------- stored split sizes


def _masked_dense(dense: nn.Module, structure: dict[str, Any]) -> nn.Module:
    """The dense model with every input channel that pruning removed from a conv/linear zeroed.

    A grouped conv's input ``c`` is read only by the outputs of its group, as column ``c mod (in/groups)``.
    Without norms that mix channels (here: BatchNorm only, or LayerNorm on a stream left whole) a removed
    channel acts only through the layers that read it, so zeroing its columns there gives the pruned
    model's output with the dense forward: its dense split sizes, its dense chunk order.
    """
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for name, dims in structure["channels"].items():
            m = modules[name]
            if "in" not in dims or not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            drop = sorted(set(range(dims["in"]["dense"])) - set(dims["in"]["kept"]))
            groups = getattr(m, "groups", 1)
            if groups == 1:
                m.weight[:, drop] = 0
                continue
            per_in, per_out = dims["in"]["dense"] // groups, m.weight.shape[0] // groups
            for c in drop:  # input c of a grouped conv is read by its group's outputs only, at c's place there
                j = c // per_in
                m.weight[j * per_out : (j + 1) * per_out, c % per_in] = 0
    return dense


def _prune_and_compare(model: nn.Module, x: torch.Tensor, **options: Any) -> tuple[Any, dict[str, Any]]:
    import copy

    dense = copy.deepcopy(model)
    plan = channel_mod.plan_channels(model, example_input=x, **options)
    structure = channel_mod.apply_channels(model, plan, example_input=x)
    with torch.no_grad():
        got, want = model(x), _masked_dense(dense, structure)(x)
    # float64 throughout: the two sums differ only by zero terms and their order (≈ 1e-15 relative)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
    return plan, structure


def test_res2net_blocks_prune_with_their_split_widths() -> None:
    """Res2Net splits conv1's output by the ``width`` it stores: the chunks now prune instead of freezing."""
    pytest.importorskip("timm")
    from timm.models.res2net import Bottle2neck
    from timm.models.resnet import ResNet

    torch.manual_seed(0)
    model = ResNet(block=Bottle2neck, layers=[1, 1, 1, 1], base_width=26, block_args={"scale": 4}, num_classes=10)
    model = model.double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    dense_widths = {n: m.width for n, m in model.named_modules() if isinstance(m, Bottle2neck)}
    plan, structure = _prune_and_compare(model, x, ratio=0.5, scope="global")
    assert plan.frozen == ()
    # the structure carries the chunk widths: a fresh dense model reshaped by it runs the pruned weights
    from prunecli import surgery

    torch.manual_seed(1)
    fresh = ResNet(block=Bottle2neck, layers=[1, 1, 1, 1], base_width=26, block_args={"scale": 4}, num_classes=10)
    fresh = surgery.apply_structure(fresh.double().eval(), structure)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, Bottle2neck)}
    for n, m in blocks.items():
        sizes = m.width if isinstance(m.width, list) else [m.width] * m.scale
        # the chunk widths, read off the layers independently of the rule: convs' inputs, then the rest of conv1
        assert sizes[:-1] == [c.weight.shape[1] for c in m.convs]
        assert sum(sizes) == m.conv1.weight.shape[0] < dense_widths[n] * m.scale


def test_res2next_grouped_chunks_lose_as_much_per_group() -> None:
    """Res2NeXt: each 3×3 conv reads one chunk of ``conv1``'s output in ``cardinality`` groups, so the
    group is sliced per conv group (4 chunks × 4 groups of 4 channels), not per chunk: every conv group
    keeps as many channels and nothing is frozen."""
    pytest.importorskip("timm")
    from timm.models.res2net import Bottle2neck
    from timm.models.resnet import ResNet

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        net = ResNet(block=Bottle2neck, layers=[1, 1, 1, 1], cardinality=4, base_width=4, block_args={"scale": 4})
        return net.double().eval()

    model = build(0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    plan, structure = _prune_and_compare(model, x, ratio=0.5, scope="global")
    assert plan.frozen == ()
    blocks = [m for m in model.modules() if isinstance(m, Bottle2neck)]
    assert any(m.conv1.out_channels < 4 * 4 * 4 * 2**i for i, m in enumerate(blocks))
    from prunecli import surgery

    fresh = surgery.apply_structure(build(1), structure)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_cost_model_sizes_never_go_negative() -> None:
    """A probe that removed 3 rows for one position, extrapolated to 3 removed positions of 4: 0 rows, not −5."""
    cost = object.__new__(budget_mod.ChannelCost)
    cost.shapes = {"w": (4, 3), "b": (4,)}
    cost.dims = {"w": [(0, 0, 3)], "b": [(0, 0, 1)]}
    cost.candidates = [SimpleNamespace(size=4)]
    assert cost.numel([1]) == {"w": 0, "b": 1}  # b: 4 − 1·3 = 1 row left, w: max(4 − 3·3, 0) = 0 rows


def test_blurpool_blocks_prune_and_rebuild() -> None:
    """timm's ``BlurPool2d`` stores its channel count and a kernel per channel: pruned with its conv, not
    frozen; a fresh dense model reshaped by the structure recomputes the kernel at the pruned width."""
    pytest.importorskip("timm")
    from timm.layers import BlurPool2d
    from timm.models.resnet import BasicBlock, ResNet

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        net = ResNet(block=BasicBlock, layers=[1, 1, 1, 1], aa_layer=BlurPool2d, num_classes=10)
        return net.double().eval()

    model = build(0)
    dense = {n: m.channels for n, m in model.named_modules() if isinstance(m, BlurPool2d)}
    assert len(dense) == 4 and all(dense.values())  # the stem's and those of the three strided blocks
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    plan, structure = _prune_and_compare(model, x, ratio=0.5, scope="layer")
    assert plan.frozen == ()
    kernel = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    kernel = (kernel[:, None] * kernel[None, :]) / 16  # the 3-tap binomial blur, by hand
    pruned = {n: m for n, m in model.named_modules() if isinstance(m, BlurPool2d)}
    assert all(m.channels < dense[n] for n, m in pruned.items()), {n: m.channels for n, m in pruned.items()}
    for m in pruned.values():
        assert torch.equal(m.filt, kernel.expand(m.channels, 1, 3, 3))
    from prunecli import surgery

    assert any("computed" in e for e in structure["modules"].values())
    fresh = surgery.apply_structure(build(1), structure)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def _groups_seen(model: nn.Module, x: torch.Tensor) -> list[tuple[str, list[tuple[str, str, list[int]]]]]:
    from prunecli.pruning.groups import _all_groups

    dg = depgraph.build_graph(model, x)
    names = {m: n for n, m in model.named_modules()}
    return [
        (
            names.get(g[0].dep.target.module, "?"),
            [(str(it.dep.target), it.dep.handler.__name__, sorted(int(i) for i in it.idxs)) for it in g],
        )
        for g in _all_groups(dg, [])
    ]


def test_enumeration_maps_indices_once_and_finds_the_same_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch-Pruning recomputes its index mappings at every group; enumerating prunes nothing, so once is
    enough. Checked against Torch-Pruning's own behaviour (a recomputation per group) on a ViT (a concat for
    the class token, reshapes and an unbind in attention): the same groups, same indices, same order."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    calls: list[int] = []
    update = depgraph._TP_UPDATE_MAPPING

    def counted(graph: Any) -> None:
        calls.append(1)
        update(graph)

    monkeypatch.setattr(depgraph, "_TP_UPDATE_MAPPING", counted)
    once = _groups_seen(model, x)
    assert len(calls) == 2 and len(once) > 3  # one at graph build, one for every root together
    import contextlib

    monkeypatch.setattr(depgraph, "static_widths", lambda graph: contextlib.nullcontext(graph))
    calls.clear()
    each = _groups_seen(model, x)
    assert len(calls) > len(once)
    assert once == each


class _MatmulReshape(nn.Module):
    """shvit's single-head attention in small: a matmul's output reshaped back to a feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.qkv, self.proj = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 12, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        b, _, h, w = x.shape
        x1, x2 = torch.split(x, [4, 4], dim=1)
        q, k, v = (t.flatten(2) for t in torch.split(self.qkv(x1), [4, 4, 4], dim=1))
        attn = (q.transpose(-2, -1) @ k).softmax(-1)
        return self.proj(torch.cat([(v @ attn.transpose(-2, -1)).reshape(b, 4, h, w), x2], dim=1))


def test_a_reshape_of_inferred_width_zero_no_longer_breaks_the_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch-Pruning infers width 0 for the matmul's output and divides by it; the reshape is left unmapped."""
    from torch_pruning.dependency import index_mapping

    x = torch.randn(1, 3, 4, 4)
    monkeypatch.setattr(index_mapping, "update_reshape_index_mapping", depgraph._TP_RESHAPE_MAPPING)
    with pytest.raises(ZeroDivisionError):
        depgraph.build_graph(_MatmulReshape(), x)
    monkeypatch.undo()
    dg = depgraph.build_graph(_MatmulReshape(), x)
    assert dg.get_pruning_group(dg.model.proj, depgraph.tp.prune_conv_out_channels, [0])


class _TiedHeads(nn.Module):
    """A residual stream of 12 channels through DaViT's channel attention (3 heads of C // 3 dimensions)."""

    def __init__(self) -> None:
        from timm.models.davit import ChannelAttention

        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(8, 12), ChannelAttention(12, num_heads=3), nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.inp(x)
        return self.out(s + self.attn(s))


def test_heads_tied_to_the_stream_shrink_with_it() -> None:
    """The attention's head width is its input's width over num_heads: its q/k/v dimensions go with the
    stream channels of the same index, as many in every head, and nothing is frozen."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _TiedHeads().eval()
    x = torch.randn(2, 7, 8)
    plan = channel_mod.plan_channels(model, example_input=x, ratio=0.5, scope="layer", exclude=["out"])
    structure = channel_mod.apply_channels(model, plan, example_input=x)
    assert plan.frozen == ()
    kept = structure["channels"]["inp"]["out"]["kept"]
    assert len(kept) < 12 and len(kept) % 3 == 0
    assert [sum(1 for c in kept if c // 4 == h) for h in range(3)] == [len(kept) // 3] * 3  # equal per head
    qkv = structure["channels"]["attn.qkv"]["out"]["kept"]
    assert qkv == [*kept, *(12 + c for c in kept), *(24 + c for c in kept)]  # q, k, v: the stream's indices
    assert structure["channels"]["attn.proj"]["in"]["kept"] == kept == structure["channels"]["out"]["in"]["kept"]
    with torch.no_grad():
        assert model(x).shape == (2, 7, 5)


def test_window_attention_tied_heads_keep_their_root() -> None:
    """DaViT's window attention reads the stream through padded window reshapes (8×8 into 3×3 windows);
    rerooting the stream group at ``proj``'s input (as for other attention) made Torch-Pruning map more
    head dimensions than stream channels. The stream group keeps its root: nothing frozen, and every
    attention's ``qkv`` is three times its input's width, a multiple of its head count."""
    pytest.importorskip("timm")
    from timm.models.davit import DaVit

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        net = DaVit(depths=(1, 1), embed_dims=(24, 48), num_heads=(3, 6), window_size=3, num_classes=5)
        return net.double().eval()

    model = build(0)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    plan = channel_mod.plan_channels(model, example_input=x, ratio=0.5, scope="global", exclude=["head.fc"])
    structure = channel_mod.apply_channels(model, plan, example_input=x)
    assert plan.frozen == ()
    attns = [m for n, m in model.named_modules() if n.endswith(".attn")]
    assert len(attns) == 4
    for attn in attns:
        width = attn.proj.out_features
        assert attn.qkv.in_features == width and attn.qkv.out_features == 3 * width
        assert width % attn.num_heads == 0
    assert any(attn.proj.out_features < 24 for attn in attns[:2])
    from prunecli import surgery

    fresh = surgery.apply_structure(build(1), structure)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_a_concat_whose_width_inference_fails_is_left_unmapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch-Pruning's width inference reads past a split's recorded sizes on gemma4_vit (``IndexError``)
    after recording the concat's input widths: the concat is then left as its own early return leaves
    it (sizes, no offsets) and the graph is built."""

    def failing(graph: Any, cat_node: Any) -> None:
        cat_node.module.concat_sizes = [5, 7]
        raise IndexError("list index out of range")

    monkeypatch.setattr(depgraph, "_TP_CONCAT_MAPPING", failing)
    dg = depgraph.build_graph(_Cat(), torch.randn(1, 3, 4, 4))
    (cat,) = _concats(dg)
    assert cat.module.concat_sizes == [5, 7] and cat.module.offsets in (None, [])


class _SubSampled(nn.Module):
    """A 16-channel stream on a 4×4 grid through Twins' global sub-sampled attention (2 heads, sr 2)."""

    def __init__(self) -> None:
        from timm.models.twins import GlobalSubSampleAttn

        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.attn = GlobalSubSampleAttn(16, num_heads=2, sr_ratio=2)
        self.out = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.inp(x)
        return self.out(s + self.attn(s, (4, 4)))


def test_subsampled_attention_ties_q_sr_and_proj_to_the_stream() -> None:
    """Twins' ``GlobalSubSampleAttn`` reshapes ``q``, ``kv`` and the ``sr`` conv's output by its input's
    width: ``q``, ``sr`` and ``proj`` keep the stream's channel indices, ``kv`` twice, every head as many."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _SubSampled().double().eval()
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    plan = channel_mod.plan_channels(model, example_input=x, ratio=0.5, scope="global", exclude=["out"])
    structure = channel_mod.apply_channels(model, plan, example_input=x)
    assert plan.frozen == ()
    ch = structure["channels"]
    kept = ch["inp"]["out"]["kept"]
    assert 0 < len(kept) < 16
    assert [sum(1 for c in kept if c // 8 == h) for h in range(2)] == [len(kept) // 2] * 2  # equal per head
    for layer in ("attn.q", "attn.sr", "attn.proj"):
        assert ch[layer]["out"]["kept"] == kept, layer
    assert ch["attn.kv"]["out"]["kept"] == [*kept, *(16 + c for c in kept)]
    assert model.attn.q.out_features == model.attn.sr.out_channels == model.attn.proj.out_features == len(kept)
    with torch.no_grad():
        assert model(x).shape == (2, 16, 5)


class _Grouped(nn.Module):
    """A 16-channel stream on a 4×4 grid through Twins' locally grouped attention (2×2 windows, 2 heads)."""

    def __init__(self) -> None:
        from timm.models.twins import LocallyGroupedAttn

        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(8, 16), LocallyGroupedAttn(16, num_heads=2, ws=2), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.inp(x)
        return self.out(s + self.attn(s, (4, 4)))


def test_an_expand_with_repeat_zero_is_left_unmapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention over 5-D windows expands a 5-D tensor, which Torch-Pruning maps as grouped-query heads
    with ``repeat = 0`` here: every group through it divided by zero and the stream stayed whole."""
    pytest.importorskip("timm")
    from torch_pruning.dependency import index_mapping

    torch.manual_seed(0)
    x = torch.randn(1, 16, 8)
    model = _Grouped().eval()
    monkeypatch.setattr(index_mapping, "update_expand_index_mapping", depgraph._TP_EXPAND_MAPPING)
    dg = depgraph.build_graph(model, x)
    if not any(n.type == depgraph.tp.ops.OPTYPE.EXPAND for n in dg.module2node.values()):
        pytest.skip("this torch's attention does not expand a 5-D tensor on CPU")
    with pytest.raises(ZeroDivisionError):
        dg.get_pruning_group(model.inp, depgraph.tp.prune_linear_out_channels, [0])
    monkeypatch.undo()
    plan = channel_mod.plan_channels(model, example_input=x, ratio=0.5, scope="global", exclude=["out"])
    channel_mod.apply_channels(model, plan, example_input=x)
    assert plan.frozen == () and model.inp.out_features < 16
    assert model.attn.qkv.out_features == 3 * model.inp.out_features and model.inp.out_features % 2 == 0
