"""Whole-head pruning (``prune --structure channel --heads``): attention loses whole heads, not head dimensions.

Every check is against an independent computation on a tiny timm ViT (depth 2, width 64, 4 heads of 16,
32 px): heads built by hand to contribute nothing are the ones removed and the output is the dense one;
the removed heads are the lowest by the head score computed here from the weights (mean over the head's
q, k and v rows of the row's L2 norm divided by the ``qkv`` layer's mean row norm); the shapes and the
outputs survive a pickle-free reload in a fresh process; the dry run's plan is what the real run writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from prunecli.errors import InputError
from prunecli.pruning.channel import plan_channels, prune_channels

ARCH = "vit_tiny_patch16_224"
ARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 4}
DIM, HEADS, HD, DEPTH, CLASSES = 64, 4, 16, 2, 10
ATTN_ONLY = {"ratio": 0.0, "layer_ratios": {"*.attn.qkv": 0.5}}  # only the attention groups lose anything
# float32 forward of a 64-wide ViT: removing exactly-zero terms only changes the summation order (~1e-6
# relative); a head that does contribute moves the logits by O(1e-2) at this init
TOL = {"atol": 1e-5, "rtol": 1e-4}


def _vit(seed: int = 0, **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(ARCH, num_classes=CLASSES, **ARGS, **kw).eval()


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _rows(h: int, parts: tuple[int, ...] = (0, 1, 2)) -> list[int]:
    """``qkv`` output rows of head ``h`` in q (0), k (1) and v (2)."""
    return [p * DIM + h * HD + i for p in parts for i in range(HD)]


def _head_scores(qkv: nn.Linear) -> torch.Tensor:
    """The head score, computed here from the weights: mean of the rows' L2 norms over the qkv mean, per head."""
    norms = qkv.weight.detach().double().norm(dim=1)
    norms = norms / norms.mean()
    return torch.stack([norms[_rows(h)].mean() for h in range(HEADS)])


def _kept_heads(structure: dict, block: int) -> list[int]:
    """Dense indices of the heads kept in ``blocks.{block}``, read from the recorded kept proj inputs."""
    kept = structure["channels"][f"blocks.{block}.attn.proj"]["in"]["kept"]
    assert len(kept) % HD == 0
    heads = sorted({k // HD for k in kept})
    assert kept == [h * HD + i for h in heads for i in range(HD)]  # whole heads, nothing else
    return heads


@pytest.mark.parametrize("qk_norm", [False, True])
def test_heads_with_zero_values_and_proj_columns_are_removed_and_the_output_is_the_dense_one(qk_norm: bool) -> None:
    """With ``qk_norm`` the per-head q/k LayerNorms (shared by all heads, non-trivial here) must stay whole."""
    model = _vit(qk_norm=qk_norm)
    zeroed = {0: (1, 3), 1: (0, 2)}  # block → the two heads built to contribute nothing
    with torch.no_grad():
        for b, heads in zeroed.items():
            attn = model.blocks[b].attn
            if qk_norm:
                attn.q_norm.weight.uniform_(0.5, 1.5)
                attn.k_norm.bias.uniform_(-0.5, 0.5)
            for h in heads:
                attn.qkv.weight[_rows(h, (2,))] = 0.0
                attn.qkv.bias[_rows(h, (2,))] = 0.0
                attn.proj.weight[:, h * HD : (h + 1) * HD] = 0.0
        x = _x()
        ref = model(x)
    result = prune_channels(model, example_input=x[:1], heads=True, **ATTN_ONLY)
    for b, heads in zeroed.items():
        attn = model.blocks[b].attn
        assert _kept_heads(result.structure, b) == sorted(set(range(HEADS)) - set(heads))
        assert (attn.num_heads, attn.head_dim, attn.attn_dim) == (2, HD, 2 * HD)
        assert attn.scale == pytest.approx(HD**-0.5)  # head_dim did not change, neither does the scale
        assert tuple(attn.qkv.weight.shape) == (3 * 2 * HD, DIM) and tuple(attn.proj.weight.shape) == (DIM, 2 * HD)
        if qk_norm:
            assert tuple(attn.q_norm.weight.shape) == tuple(attn.k_norm.bias.shape) == (HD,)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, ref, **TOL)
    # the control: removing two heads that do contribute changes the output well beyond the tolerance
    other = _vit(qk_norm=qk_norm)
    prune_channels(other, example_input=x[:1], heads=True, **ATTN_ONLY)
    with torch.no_grad():
        assert float((other(x) - ref).abs().max()) > 100 * TOL["atol"]


@pytest.mark.parametrize("seed", [0, 3])
def test_removed_heads_are_the_lowest_by_the_head_score(seed: int) -> None:
    model = _vit(seed)
    expected = {}
    for b in range(DEPTH):
        scores = _head_scores(model.blocks[b].attn.qkv)
        expected[b] = sorted(torch.topk(scores, 2).indices.tolist())
    plan = plan_channels(model, example_input=_x(1), heads=True, **ATTN_ONLY)
    assert plan.summary()["heads"] == {f"blocks.{b}.attn": {"heads_before": 4, "heads": 2} for b in range(DEPTH)}
    kept = {g.attention: list(g.kept) for g in plan.groups}
    assert kept == {f"blocks.{b}.attn": expected[b] for b in range(DEPTH)}


def test_global_scope_ranks_the_heads_of_all_attentions_together() -> None:
    model = _vit(5)
    scores = torch.cat([_head_scores(model.blocks[b].attn.qkv) for b in range(DEPTH)])
    top = set(torch.topk(scores, 4).indices.tolist())  # 4 of the 8 heads survive, wherever they are
    expected = {b: sorted(i - b * HEADS for i in top if i // HEADS == b) for b in range(DEPTH)}
    assert all(expected.values())  # this seed keeps a head in each attention (the clamp to one is not tested here)
    # only the attention groups are candidates: the stream (proj, fc2, patch embedding) and the MLPs stay
    exclude = ["head", "blocks.*.mlp.fc1", "blocks.*.attn.proj"]
    plan = plan_channels(model, example_input=_x(1), ratio=0.5, scope="global", exclude=exclude, heads=True)
    got = {b: [] for b in range(DEPTH)} | {int(g.attention.split(".")[1]): list(g.kept) for g in plan.groups}
    assert got == {b: v if len(v) < HEADS else [] for b, v in expected.items()}  # a group keeping all is not pruned
    assert all(g.attention for g in plan.groups)


def test_heads_combine_with_mlp_pruning_and_keep_at_least_one_head() -> None:
    model = _vit()
    x = _x()
    result = prune_channels(model, example_input=x[:1], ratio=0.5, heads=True)
    for blk in model.blocks:
        assert (blk.attn.num_heads, blk.attn.head_dim) == (2, HD)
        assert blk.mlp.fc1.out_features == 4 * DIM // 2  # the MLP hidden units at the same ratio
    assert model.patch_embed.proj.out_channels == DIM // 2  # and the residual stream
    with torch.no_grad():
        assert model(x).shape == (2, CLASSES)
    assert result.metrics["heads"] == {f"blocks.{b}.attn": {"heads_before": 4, "heads": 2} for b in range(DEPTH)}
    one = _vit()
    prune_channels(one, example_input=x[:1], heads=True, ratio=0.0, layer_ratios={"*.attn.qkv": 0.99})
    assert [blk.attn.num_heads for blk in one.blocks] == [1, 1]


def test_heads_on_a_cnn_is_an_error() -> None:
    """A CNN has no heads: --heads asks for something the model does not have, so it is refused, not ignored."""
    torch.manual_seed(0)
    cnn = timm.create_model("resnet10t", num_classes=CLASSES).eval()
    with pytest.raises(InputError, match="no attention"):
        plan_channels(cnn, example_input=torch.zeros(1, 3, 32, 32), ratio=0.3, heads=True)


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    tmp = tmp_path_factory.mktemp("heads")
    cfg = dict(default_pretrained_cfg(ARCH), input_size=(3, 32, 32))
    return Path(save_checkpoint(tmp / "dense.safetensors", _vit(), Manifest(ARCH, CLASSES, ARGS, cfg))[0])


def _request(dense: Path, out: Path, **kw: object) -> object:
    from prunecli.requests import PruneRequest

    return PruneRequest.build(checkpoint=str(dense), output=out, method="l2", structure="channel", heads=True, **kw)


def test_dry_run_plan_is_what_the_real_run_writes(dense_ckpt: Path, tmp_path: Path) -> None:
    from prunecli.api.prune import prune
    from prunecli.checkpoint.loaders import load_checkpoint

    out = tmp_path / "h.safetensors"
    dry = prune(_request(dense_ckpt, out, ratio=0.5, dry_run=True))
    assert not out.exists()
    real = prune(_request(dense_ckpt, out, ratio=0.5))
    plan = dry.metrics["plan"]
    assert plan["heads"] == real.metrics["heads"] == {f"blocks.{b}.attn": {"heads_before": 4, "heads": 2}
                                                       for b in range(DEPTH)}  # fmt: skip
    loaded = load_checkpoint(str(out))
    structure = loaded.manifest.structure
    for b in range(DEPTH):
        assert loaded.model.blocks[b].attn.num_heads == 2
        assert len(_kept_heads(structure, b)) == 2
    for g in plan["groups"]:  # every group the plan shows is the width the written model has
        mod = loaded.model.get_submodule(g["root"])
        width = mod.in_features if g["root"].endswith("attn.proj") else mod.weight.shape[0]
        assert width == g["kept"]


def test_reload_in_a_fresh_process_has_the_pruned_heads_and_outputs(dense_ckpt: Path, tmp_path: Path) -> None:
    """The checkpoint is rebuilt without pickle (prunecli.load_model) in a new interpreter: same heads, same output."""
    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    model, x = _vit(), _x()
    result = prune_channels(model, example_input=x[:1], ratio=0.5, heads=True)
    with torch.no_grad():
        ref = model(x)
    cfg = dict(default_pretrained_cfg(ARCH), input_size=(3, 32, 32))
    path, _ = save_checkpoint(tmp_path / "p.safetensors", model, Manifest(ARCH, CLASSES, ARGS, cfg,
                                                                          structure=result.structure))  # fmt: skip
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import json, sys, torch, prunecli\n"
        "m = prunecli.load_model(sys.argv[1])\n"
        "x = torch.load(sys.argv[2], weights_only=True)\n"
        "with torch.no_grad(): torch.save(m(x), sys.argv[3])\n"
        "print(json.dumps([[b.attn.num_heads, b.attn.head_dim, b.attn.scale] for b in m.blocks]))\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    heads = json.loads(run.stdout.strip().splitlines()[-1])
    assert heads == [[2, HD, pytest.approx(HD**-0.5)]] * DEPTH
    torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), ref, rtol=0, atol=1e-6)


def test_target_macs_with_heads(dense_ckpt: Path, tmp_path: Path) -> None:
    from prunecli.api.prune import prune

    out = tmp_path / "t.safetensors"
    r = prune(_request(dense_ckpt, out, target=("macs", "0.5")))
    assert r.metrics["macs"] <= 0.5 * r.metrics["macs_before"]
    heads = r.metrics["heads"]
    assert set(heads) == {f"blocks.{b}.attn" for b in range(DEPTH)}
    assert all(1 <= v["heads"] <= v["heads_before"] == HEADS for v in heads.values())


@torch.no_grad()
def test_restore_folds_the_removed_heads_value_bias_into_proj() -> None:
    """Heads with zero value weights but a value bias: pruning drops a constant, lbyl/merge put it back exactly.

    Softmax rows sum to one, so such a head outputs its bias at every token and adds ``W_proj[:, h] b_h``.
    """
    from prunecli.api.restore import restore_model

    x = _x()
    for method in ("lbyl", "merge"):
        dense = _vit()
        for b in range(DEPTH):
            attn = dense.blocks[b].attn
            for h in (0, 2):
                attn.qkv.weight[_rows(h, (2,))] = 0.0
                attn.qkv.bias[_rows(h, (2,))] = torch.linspace(-1.0, 1.0, HD)  # nonzero: a constant per token
            attn.qkv.weight[_rows(0, (0, 1)) + _rows(2, (0, 1))] *= 1e-3  # the lowest by the head score
        ref = dense(x)
        pruned = _vit()
        pruned.load_state_dict(dense.state_dict())
        result = prune_channels(pruned, example_input=x[:1], heads=True, **ATTN_ONLY)
        assert [_kept_heads(result.structure, b) for b in range(DEPTH)] == [[1, 3]] * DEPTH
        before = float((pruned(x) - ref).abs().max())
        assert before > 1e-2
        report = restore_model(pruned, dense, result.structure, method, example_input=x[:1])
        torch.testing.assert_close(pruned(x), ref, **TOL)
        rows = [report.layers[method][f"blocks.{b}.attn.qkv"] for b in range(DEPTH)]
        assert all(r["heads_removed"] == 2 and not r["qk_pruned"] for r in rows)


def test_lstsq_on_a_head_pruned_vit_lowers_the_error() -> None:
    from prunecli.api.restore import restore_model

    dense, pruned, x = _vit(), _vit(), _x(8)
    result = prune_channels(pruned, example_input=x[:1], heads=True, ratio=0.5)
    with torch.no_grad():
        ref = dense(x)
        before = float((pruned(x) - ref).norm())
    report = restore_model(pruned, dense, result.structure, "lstsq", params={"samples": 8}, calib=[x])
    with torch.no_grad():
        after = float((pruned(x) - ref).norm())
    assert after < before
    assert all(g["restored_by"] == ["lstsq"] for g in report.groups)


def test_restore_cli_on_a_head_pruned_checkpoint(dense_ckpt: Path, tmp_path: Path) -> None:
    """``restore`` rebuilds the head-pruned model from its checkpoint and says what it did for the heads."""
    from typer.testing import CliRunner

    from prunecli.api.prune import prune
    from prunecli.cli.main import app

    pruned, out = tmp_path / "h.safetensors", tmp_path / "r.safetensors"
    prune(_request(dense_ckpt, pruned, ratio=0.0, layer_ratios=(("*.attn.qkv", 0.5),)))
    args = ["restore", str(pruned), "--dense", str(dense_ckpt), "--method", "lbyl", "-o", str(out)]
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert "whole heads removed" in r.stderr
    metrics = json.loads(r.stdout.strip().splitlines()[0])["metrics"]
    rows = {g["group"]: g for g in metrics["groups"]}
    assert {n for n, g in rows.items() if g["kind"] == "attention"} == {f"blocks.{b}.attn.qkv" for b in range(DEPTH)}
    assert all(g["restored_by"] == ["lbyl"] for g in rows.values())


@pytest.mark.parametrize(("min_channels", "round_to", "heads"), [(1, None, 2), (40, None, 3), (1, 48, 3), (1, 32, 2)])
def test_min_channels_and_round_to_count_channels_of_whole_heads(
    min_channels: int, round_to: int | None, heads: int
) -> None:
    """Kept heads·head_dim (16 per head) is at least ``min_channels`` and a multiple of ``round_to``.

    Half of 4 heads is 2 (32 channels); 40 channels need 3 heads (48); a multiple of 48 channels is 3 heads
    (rounding 2 heads down to a multiple of 3 would give 0, and at least one step is kept); 32 is 2 heads.
    """
    plan = plan_channels(_vit(), example_input=_x(1), heads=True, min_channels=min_channels, round_to=round_to,
                         **ATTN_ONLY)  # fmt: skip
    assert {v["heads"] for v in plan.heads().values()} == {heads}
