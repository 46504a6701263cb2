"""Channel pruning (prunecli.pruning.channel) and the pickle-free rebuild (prunecli.surgery).

Every expectation is computed independently of the pruner: kept counts from ``floor(C·(1−r))``
written out in the test, kept filters from top-k of norms computed here, pruned tensors checked
against the dense tensors indexed by the recorded kept indices.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

import prunecli.archs  # noqa: F401  (registers improved_cnn, fc_mlp)
from prunecli.checkpoint.loaders import load_checkpoint
from prunecli.checkpoint.manifest import Manifest
from prunecli.checkpoint.writer import save_checkpoint
from prunecli.errors import CheckpointError, InputError
from prunecli.models import default_pretrained_cfg
from prunecli.pruning.channel import prune_channels
from prunecli.surgery import apply_structure

pytestmark = pytest.mark.xdist_group("prune_channel")


def _model(arch: str, seed: int = 0, **kwargs: object) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=10, **kwargs).eval()
    with torch.no_grad():  # non-trivial BN statistics so that BN slicing errors would show
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _input(model: nn.Module, n: int = 1, side: int | None = None) -> torch.Tensor:
    c, h, w = model.pretrained_cfg["input_size"]
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, c, side or h, side or w, generator=g)


def _cnn() -> nn.Module:
    return _model("improved_cnn")


def _mlp(hidden: tuple[int, ...], **kwargs: object) -> nn.Module:
    return _model("fc_mlp", hidden=hidden, **kwargs)


# ------------------------------------------------------------------------------------------------ counts


def test_kept_counts_are_floor_c_times_one_minus_r() -> None:
    model = _cnn()
    dense = {"features.0.conv": 64, "features.1.conv": 128, "features.2.conv": 256, "fc1": 512}
    prune_channels(model, example_input=_input(model), ratio=0.3)
    for name, c in dense.items():
        assert model.get_submodule(name).weight.shape[0] == math.floor(c * 7 / 10)  # 44, 89, 179, 358
    assert model.fc2.weight.shape == (10, math.floor(512 * 7 / 10))  # classifier excluded by default


def test_kept_count_is_exact_where_float_rounding_would_drop_one() -> None:
    # 100 · (1 − 0.29) is 70.99999999999999 in floating point; floor(C·(1−r)) is 71.
    model = _mlp((100, 50))
    prune_channels(model, example_input=_input(model), ratio=0.29)
    assert model.fc1.weight.shape[0] == 71
    assert model.fc2.weight.shape == (35, 71)  # floor(50 · 0.71) = 35


def test_round_to_rounds_kept_counts_down_to_multiples() -> None:
    model = _cnn()
    prune_channels(model, example_input=_input(model), ratio=0.3, round_to=8)
    for name, c in {"features.0.conv": 64, "features.1.conv": 128, "features.2.conv": 256, "fc1": 512}.items():
        k = math.floor(c * 0.7)
        assert model.get_submodule(name).weight.shape[0] == k - k % 8  # 40, 88, 176, 352


def test_min_channels_floor() -> None:
    model = _mlp((10, 20))
    prune_channels(model, example_input=_input(model), ratio=0.95)  # floor(10·0.05) = 0 → at least 1
    assert model.fc1.weight.shape[0] == 1
    assert model.fc2.weight.shape[0] == 1
    model = _mlp((10, 20))
    prune_channels(model, example_input=_input(model), ratio=0.95, min_channels=3)
    assert model.fc1.weight.shape[0] == 3
    assert model.fc2.weight.shape[0] == 3


def test_layer_ratios_override_by_glob() -> None:
    model = _cnn()
    prune_channels(model, example_input=_input(model), ratio=0.3, layer_ratios={"features.1.*": 0.5, "fc1": 0.0})
    assert model.features[0].conv.weight.shape[0] == 44
    assert model.features[1].conv.weight.shape[0] == 64
    assert model.fc1.weight.shape[0] == 512


def test_exclude_keeps_output_channels() -> None:
    model = _cnn()
    prune_channels(model, example_input=_input(model), ratio=0.3, exclude=["features.0.conv", "fc2"])
    assert model.features[0].conv.weight.shape[0] == 64
    assert model.features[1].conv.weight.shape == (89, 64, 3, 3)


# ------------------------------------------------------------------------------------------------ selection


def test_selection_is_top_k_by_filter_l2_norm_and_flatten_blocks_follow() -> None:
    model = _cnn()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune_channels(model, example_input=_input(model), ratio=0.3)

    def top(w: torch.Tensor, k: int) -> list[int]:
        norms = w.flatten(1).norm(dim=1)
        return sorted(torch.argsort(norms, descending=True)[:k].tolist())

    keep0 = top(dense["features.0.conv.weight"], 44)
    keep2 = top(dense["features.2.conv.weight"], 179)
    assert result.structure["channels"]["features.0.conv"]["out"]["kept"] == keep0
    torch.testing.assert_close(model.features[0].conv.weight, dense["features.0.conv.weight"][keep0], rtol=0, atol=0)
    torch.testing.assert_close(model.features[0].bn.running_var, dense["features.0.bn.running_var"][keep0])
    # Flatten → fc1: channel c of the last conv owns fc1 inputs [16c, 16c + 16) (4×4 spatial).
    keep_fc1 = top(dense["fc1.weight"], 358)
    cols = [16 * c + j for c in keep2 for j in range(16)]
    torch.testing.assert_close(model.fc1.weight, dense["fc1.weight"][keep_fc1][:, cols], rtol=0, atol=0)


def test_channel_scores_choose_the_kept_channels() -> None:
    model = _cnn()
    g = torch.Generator().manual_seed(3)
    scores = {"features.0.conv.weight": torch.rand(64, generator=g)}
    result = prune_channels(model, example_input=_input(model), ratio=0.5, channel_scores=scores)
    want = sorted(torch.argsort(scores["features.0.conv.weight"], descending=True)[:32].tolist())
    assert result.structure["channels"]["features.0.conv"]["out"]["kept"] == want
    # groups whose layers have no scores are left alone
    assert model.features[1].conv.weight.shape[0] == 128 and model.fc1.weight.shape[0] == 512
    assert result.metrics["groups_unscored"] == 3


def test_weight_scores_are_reduced_by_l1_sum_per_filter() -> None:
    model = _mlp((40, 30))
    g = torch.Generator().manual_seed(4)
    ws = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters() if n.endswith("weight")}
    result = prune_channels(model, example_input=_input(model), ratio=0.25, weight_scores=ws)
    for name, k in (("fc1", 30), ("fc2", 22)):
        per_channel = ws[f"{name}.weight"].sum(1)
        want = sorted(torch.argsort(per_channel, descending=True)[:k].tolist())
        assert result.structure["channels"][name]["out"]["kept"] == want


def test_global_scope_ranks_mean_normalised_scores_across_layers() -> None:
    model = _mlp((60, 40))
    g = torch.Generator().manual_seed(5)
    s1, s2 = torch.rand(60, generator=g) * 10, torch.rand(40, generator=g)
    scores = {"fc1.weight": s1, "fc2.weight": s2}
    result = prune_channels(model, example_input=_input(model), ratio=0.4, scope="global", channel_scores=scores)
    pooled = torch.cat([s1 / s1.mean(), s2 / s2.mean()]).double()
    keep = torch.argsort(pooled, descending=True)[: math.floor(100 * 0.6)]
    want1 = sorted(i for i in keep.tolist() if i < 60)
    want2 = sorted(i - 60 for i in keep.tolist() if i >= 60)
    assert result.structure["channels"]["fc1"]["out"]["kept"] == want1
    assert result.structure["channels"]["fc2"]["out"]["kept"] == want2


# ------------------------------------------------------------------------------------------------ transformers


def test_vit_prunes_the_same_head_dims_in_q_k_v_of_every_head() -> None:
    model = _model("test_vit")
    attn = model.blocks[0].attn
    heads, head_dim, scale = attn.num_heads, attn.head_dim, attn.scale
    result = prune_channels(model, example_input=_input(model), ratio=0.3)
    kept = result.structure["channels"]["blocks.0.attn.qkv"]["out"]["kept"]
    dim = heads * head_dim
    per = [sorted(k % head_dim for k in kept if s * dim + h * head_dim <= k < s * dim + (h + 1) * head_dim)
           for s in range(3) for h in range(heads)]  # fmt: skip
    assert all(p == per[0] for p in per) and len(per[0]) == math.floor(head_dim * 0.7)
    assert attn.num_heads == heads and attn.head_dim == len(per[0]) and attn.attn_dim == heads * len(per[0])
    assert attn.scale == scale  # dense scale kept (module docstring)
    assert model(_input(model, 2)).shape == (2, 10)


# ------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("arch", ["test_resnet", "test_convnext", "test_vit", "test_efficientnet", "improved_cnn"])
def test_structure_round_trips_through_a_saved_checkpoint(arch: str, tmp_path: object) -> None:
    model = _model(arch)
    x = _input(model, 2, side=None if arch == "improved_cnn" else 64)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = sum(p.numel() for p in model.parameters())
    result = prune_channels(model, example_input=x[:1], ratio=0.3)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 10)
    assert result.metrics["params"] == sum(p.numel() for p in model.parameters()) < params_before

    manifest = Manifest(arch, 10, {}, default_pretrained_cfg(arch), structure=result.structure)
    path, _ = save_checkpoint(tmp_path / "p.safetensors", model, manifest)  # type: ignore[operator]
    loaded = load_checkpoint(path)
    with torch.no_grad():
        y2 = loaded.model(x)
    assert float((y2 - y).abs().max()) <= 1e-5

    # The recorded kept indices locate every pruned conv/linear's weights in the dense parent.
    pruned = loaded.model.state_dict()
    for name, dims in result.structure["channels"].items():
        w = dense.get(f"{name}.weight")
        if w is None or w.ndim < 2:
            continue
        mod = loaded.model.get_submodule(name)
        if "out" in dims:
            w = w[dims["out"]["kept"]]
        if "in" in dims and getattr(mod, "groups", 1) == 1:
            w = w[:, dims["in"]["kept"]]
        torch.testing.assert_close(pruned[f"{name}.weight"], w, rtol=0, atol=0)


def test_apply_structure_refuses_unknown_modules() -> None:
    with torch.device("meta"):
        model = timm.create_model("test_resnet", num_classes=10)
    with pytest.raises(CheckpointError, match="nope"):
        apply_structure(model, {"format": 1, "modules": {"nope": {"attrs": {"x": 1}}}})
    with pytest.raises(CheckpointError, match="newer"):
        apply_structure(model, {"format": 99, "modules": {}})


# ------------------------------------------------------------------------------------------------ safety net


class _StoredWidth(nn.Module):
    """Reshapes with a width it stores itself: no tracer can see that ``width`` must follow ``conv``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.width = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        y = self.conv(x).reshape(b, self.width, h * w)
        return y.reshape(b, self.width, h, w)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = _StoredWidth()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc1(self.pool(self.block(self.stem(x))).flatten(1))))


def test_a_module_that_breaks_is_frozen_and_the_rest_is_pruned() -> None:
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(2, 3, 8, 8)
    result = prune_channels(model, example_input=x[:1], ratio=0.5, exclude=["head"])
    assert result.metrics["frozen"] == ["_StoredWidth"]
    assert model.block.conv.weight.shape == (8, 8, 3, 3) and model.stem.weight.shape[0] == 8
    assert model.fc1.weight.shape == (16, 8)
    assert model(x).shape == (2, 10)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_ratio_outside_unit_interval_is_refused(ratio: float) -> None:
    model = _mlp((10,))
    with pytest.raises(InputError, match="ratio"):
        prune_channels(model, example_input=_input(model), ratio=ratio)


def test_bad_options_are_refused() -> None:
    model = _mlp((10,))
    x = _input(model)
    with pytest.raises(InputError, match="scope"):
        prune_channels(model, example_input=x, ratio=0.3, scope="net")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="shape"):
        prune_channels(model, example_input=x, ratio=0.3, channel_scores={"fc1.weight": torch.ones(11)})
    with pytest.raises(InputError, match="does not have"):
        prune_channels(model, example_input=x, ratio=0.3, channel_scores={"conv9.weight": torch.ones(11)})
    with pytest.raises(InputError, match="round-to"):
        prune_channels(model, example_input=x, ratio=0.3, round_to=0)
    with pytest.raises(InputError, match="layer-ratio"):
        prune_channels(model, example_input=x, ratio=0.3, layer_ratios={"fc1": 1.0})
    assert model.fc1.weight.shape[0] == 10  # nothing was touched


def test_revert_puts_back_list_attributes_as_lists() -> None:
    """A failed pruning attempt is undone by :func:`prunecli.surgery.revert`; an attribute that model code
    keeps as a list (hiera's ``Unroll.size``) must come back as an equal list, not a tuple, and the
    snapshot must survive a second revert."""
    from prunecli.surgery import revert, snapshot

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.size = [4, 4]
            self.pair = (2, 3)

    m = torch.nn.Sequential(Holder())
    snap = snapshot(m)
    for _ in range(2):
        m[0].size.append(9)
        m[0].pair = (1, 1)
        revert(m, snap)
        assert type(m[0].size) is list and m[0].size == [4, 4]
        assert m[0].pair == (2, 3)
