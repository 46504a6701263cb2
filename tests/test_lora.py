"""finetune-lora: B = 0 start, effective weights, merges that keep the sparsity, peft-format adapters, bad input.

Every expectation is computed independently of prunecli.lora: masks come from
``torch.nn.utils.prune``, effective weights are written out by hand (``W + (α/r)·B A``, the 1×1-conv
form for convolutions), logits of a kept adapter come from peft's own ``PeftModel.from_pretrained``
on a model rebuilt by hand from the safetensors file.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as P
from safetensors.torch import load_file
from torch import nn

import prunecli.archs  # noqa: F401  (registers improved_cnn / fc_mlp)
from prunecli import lora
from prunecli.checkpoint.manifest import Manifest


def _mlp(seed: int = 0, **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("fc_mlp", num_classes=10, **kw).eval()


def _prune_global(model: nn.Module, names: list[str], amount: float) -> None:
    """Global magnitude pruning with torch.nn.utils.prune, made permanent (the independent reference)."""
    params = [(model.get_submodule(n), "weight") for n in names]
    P.global_unstructured(params, pruning_method=P.L1Unstructured, amount=amount)
    for mod, name in params:
        P.remove(mod, name)


def _randomise_adapters(peft_model: nn.Module, seed: int = 1) -> None:
    """Non-zero B (as PEFT's own tests do), otherwise every merge test passes trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ----------------------------------------------------------------------------------------- start point


@pytest.mark.parametrize(
    ("arch", "opts"),
    [
        ("fc_mlp", lora.LoraOptions()),
        ("improved_cnn", lora.LoraOptions(targets=("features.*.conv",))),
        ("fc_mlp", lora.LoraOptions(rank=4, alpha=8, dropout=0.1)),
    ],
)
def test_lora_starts_exactly_at_the_pruned_model(arch: str, opts: lora.LoraOptions) -> None:
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10).eval()
    _prune_global(model, [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))], 0.5)
    x = torch.randn(5, *model.pretrained_cfg["input_size"])
    reference = copy.deepcopy(model)(x)
    peft_model = lora.attach_lora(model, opts).eval()
    assert torch.equal(peft_model(x), reference)  # bit-identical: B = 0
    assert all(torch.count_nonzero(p) == 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    trainable = lora.trainable_params(peft_model)
    assert trainable and all(("lora_A" in n) or ("lora_B" in n) for n in trainable)


def test_paper_a_trainable_parameter_count() -> None:
    # paper A (docs/lora.md): r = 8 on fc1 (4096→512) and fc2 (512→10): 8·(4096+512) + 8·(512+10) = 41,040.
    model = timm.create_model("improved_cnn", num_classes=10)
    peft_model = lora.attach_lora(model, lora.LoraOptions())
    assert sum(p.numel() for p in lora.trainable_params(peft_model).values()) == 8 * (4096 + 512) + 8 * (512 + 10)


def test_dora_also_starts_at_the_pruned_model() -> None:
    model = _mlp()
    _prune_global(model, ["fc1", "fc2"], 0.5)
    x = torch.randn(7, 1, 8, 8)
    ref = copy.deepcopy(model)(x)
    peft_model = lora.attach_lora(model, lora.LoraOptions(dora=True)).eval()
    torch.testing.assert_close(peft_model(x), ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- effective weights


def test_effective_weights_match_the_hand_formula_and_the_forward() -> None:
    torch.manual_seed(0)
    model = timm.create_model("improved_cnn", num_classes=10).eval()
    opts = lora.LoraOptions(rank=4, alpha=12, targets=("features.1.conv",))
    peft_model = lora.attach_lora(model, opts)
    _randomise_adapters(peft_model)
    eff = lora.effective_weights(peft_model)
    layers = lora.lora_layers(peft_model)
    for name in ("fc1", "fc2"):
        layer = layers[name]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        expect = layer.base_layer.weight + 3.0 * (b @ a)
        torch.testing.assert_close(eff[f"{name}.weight"], expect)
        x = torch.randn(3, layer.base_layer.in_features)
        torch.testing.assert_close(layer(x), F.linear(x, expect, layer.base_layer.bias), rtol=1e-5, atol=1e-5)
    conv = layers["features.1.conv"]
    a, b = conv.lora_A["default"].weight, conv.lora_B["default"].weight  # (r, C, 3, 3), (O, r, 1, 1)
    expect = conv.base_layer.weight + 3.0 * torch.einsum("or,rchw->ochw", b[:, :, 0, 0], a)
    torch.testing.assert_close(eff["features.1.conv.weight"], expect)
    x = torch.randn(2, 64, 16, 16)
    torch.testing.assert_close(conv(x), F.conv2d(x, expect, conv.base_layer.bias, padding=1), rtol=1e-4, atol=1e-4)


def test_wcr_on_effective_weights_equals_the_formula() -> None:
    from prunecli.wcr import WCR

    peft_model = lora.attach_lora(_mlp(), lora.LoraOptions())
    _randomise_adapters(peft_model)
    reg = WCR(lora.effective_weight_fns(peft_model), lam=0.5)
    expect = 0.0
    for layer in lora.lora_layers(peft_model).values():
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        w = layer.base_layer.weight.detach() + 2.0 * b @ a
        u = torch.sqrt(w.double() ** 2 + 1e-8)
        expect += 1.0 / (float(((u - u.mean()) ** 2).mean()) + 1e-8)
    value = reg()
    assert value.item() == pytest.approx(0.5 * expect, rel=1e-4)
    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.trainable_params(peft_model).values())


# ----------------------------------------------------------------------------------------- masked update


@pytest.mark.parametrize("dora", [False, True])
def test_masked_update_starts_exactly_at_the_pruned_model(dora: bool) -> None:
    model, keep = _pruned_mlp_with_masks()
    x = torch.randn(6, 1, 8, 8)
    reference = copy.deepcopy(model)(x)
    peft_model = lora.attach_lora(model, lora.LoraOptions(dora=dora))
    assert lora.mask_updates(peft_model, keep) == ["fc1.weight", "fc2.weight"]  # head carries no mask
    out = peft_model.eval()(x)
    if dora:
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(out, reference)  # (W + 0) ⊙ M = W: bit-identical


def test_masked_update_computes_the_hand_formula_for_linear_and_conv() -> None:
    torch.manual_seed(0)
    model = timm.create_model("improved_cnn", num_classes=10).eval()
    _prune_global(model, ["features.1.conv", "fc1"], 0.6)
    keep = {n: model.get_parameter(n).detach() != 0 for n in ("features.1.conv.weight", "fc1.weight")}
    peft_model = lora.attach_lora(model, lora.LoraOptions(rank=4, alpha=12, targets=("features.1.conv",)))
    _randomise_adapters(peft_model)
    assert lora.mask_updates(peft_model, keep) == ["fc1.weight", "features.1.conv.weight"]
    layers = lora.lora_layers(peft_model)
    fc1 = layers["fc1"]
    a, b, w = fc1.lora_A["default"].weight, fc1.lora_B["default"].weight, fc1.base_layer.weight
    expect = (w + 3.0 * (b @ a)) * keep["fc1.weight"]
    x = torch.randn(3, 4096)
    torch.testing.assert_close(fc1(x), F.linear(x, expect, fc1.base_layer.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora.effective_weights(peft_model)["fc1.weight"], expect)
    conv = layers["features.1.conv"]
    a, b, w = conv.lora_A["default"].weight, conv.lora_B["default"].weight, conv.base_layer.weight
    expect = (w + 3.0 * torch.einsum("or,rchw->ochw", b[:, :, 0, 0], a)) * keep["features.1.conv.weight"]
    x = torch.randn(2, 64, 16, 16)
    torch.testing.assert_close(conv(x), F.conv2d(x, expect, conv.base_layer.bias, padding=1), rtol=1e-4, atol=1e-4)
    # Unmasked layers keep peft's forward: fc2 computes W + s·B A, dense.
    fc2 = layers["fc2"]
    dense = fc2.base_layer.weight + 3.0 * fc2.lora_B["default"].weight @ fc2.lora_A["default"].weight
    x = torch.randn(3, 512)
    torch.testing.assert_close(fc2(x), F.linear(x, dense, fc2.base_layer.bias), rtol=1e-5, atol=1e-5)


def test_masked_update_runs_a_conv_subclass_own_forward() -> None:
    # timm's Conv2dSame pads in its forward ("SAME" padding, stride 2): the masked update must keep that.
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(3, 8, 3, stride=2), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 9, 9))
    _prune_global(model, ["0"], 0.5)
    keep = {"0.weight": model[0].weight.detach() != 0}
    peft_model = lora.attach_lora(model, lora.LoraOptions(rank=2, linear=False, targets=("0",)))
    _randomise_adapters(peft_model)
    assert lora.mask_updates(peft_model, keep) == ["0.weight"]
    conv = lora.lora_layers(peft_model)["0"]
    reference = copy.deepcopy(conv.base_layer)
    with torch.no_grad():
        reference.weight.copy_(lora.effective_weights(peft_model)["0.weight"])
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(conv(x), reference(x), rtol=1e-5, atol=1e-5)
    merged = lora.MERGE_MODES.get("masked")(peft_model, keep).model
    torch.testing.assert_close(merged[0](x), reference(x), rtol=1e-5, atol=1e-5)


def test_masked_update_gradients_equal_autograd_of_the_hand_formula() -> None:
    model, keep = _pruned_mlp_with_masks()
    peft_model = lora.attach_lora(model, lora.LoraOptions())
    _randomise_adapters(peft_model)
    lora.mask_updates(peft_model, keep)
    fc1 = lora.lora_layers(peft_model)["fc1"]
    x = torch.randn(5, 64)
    (fc1(x) ** 2).sum().backward()
    a = fc1.lora_A["default"].weight.detach().clone().requires_grad_(True)
    b = fc1.lora_B["default"].weight.detach().clone().requires_grad_(True)
    w = fc1.base_layer.weight.detach()
    (F.linear(x, (w + 2.0 * b @ a) * keep["fc1.weight"], fc1.base_layer.bias.detach()) ** 2).sum().backward()
    torch.testing.assert_close(fc1.lora_A["default"].weight.grad, a.grad)
    torch.testing.assert_close(fc1.lora_B["default"].weight.grad, b.grad)
    # Kept positions only: the update's gradient is zero wherever the weight is pruned.
    g = torch.autograd.functional.jacobian(lambda d: (F.linear(x, (w + d) * keep["fc1.weight"]) ** 2).sum(),
                                           torch.zeros_like(w))  # fmt: skip
    assert torch.count_nonzero(g[~keep["fc1.weight"]]) == 0


def test_masked_update_dropout_only_on_the_update_input() -> None:
    model, keep = _pruned_mlp_with_masks()
    peft_model = lora.attach_lora(model, lora.LoraOptions(dropout=0.3))
    _randomise_adapters(peft_model)
    lora.mask_updates(peft_model, keep)
    fc1 = lora.lora_layers(peft_model)["fc1"].train()
    x = torch.randn(4, 64)
    torch.manual_seed(5)
    got = fc1(x)
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.3, training=True)
    w, bias = fc1.base_layer.weight, fc1.base_layer.bias
    update = (2.0 * fc1.lora_B["default"].weight @ fc1.lora_A["default"].weight) * keep["fc1.weight"]
    torch.testing.assert_close(got, F.linear(x, w, bias) + F.linear(dropped, update), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_masked_update_merged_checkpoint_is_the_trained_model(dora: bool) -> None:
    x = torch.randn(8, 1, 8, 8)
    outputs = {}
    for through_mask in (True, False):
        model, keep = _pruned_mlp_with_masks()
        peft_model = lora.attach_lora(model, lora.LoraOptions(dora=dora))
        _randomise_adapters(peft_model)
        if through_mask:
            lora.mask_updates(peft_model, keep)
        trained = peft_model.eval()(x).detach()
        merged = lora.MERGE_MODES.get("masked")(peft_model, keep).model.eval()
        for name, k in keep.items():
            assert torch.equal(merged.get_parameter(name) != 0, k)
        outputs[through_mask] = (trained, merged(x).detach())
    torch.testing.assert_close(outputs[True][1], outputs[True][0], rtol=1e-5, atol=1e-5)
    assert (outputs[False][1] - outputs[False][0]).abs().max() > 1e-2  # paper A's plain update loses part of itself


# ----------------------------------------------------------------------------------------- merges


def _pruned_mlp_with_masks() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = _mlp()
    _prune_global(model, ["fc1", "fc2"], 0.7)
    keep = {n: model.get_parameter(n).detach() != 0 for n in ("fc1.weight", "fc2.weight")}
    return model, keep


def test_masked_merge_keeps_every_pruned_zero_and_adds_the_update_elsewhere() -> None:
    model, keep = _pruned_mlp_with_masks()
    peft_model = lora.attach_lora(model, lora.LoraOptions())
    _randomise_adapters(peft_model)
    expect = {k: v.detach().clone() for k, v in lora.effective_weights(peft_model).items()}
    outcome = lora.MERGE_MODES.get("masked")(peft_model, lora.masks_of(_pruned_mlp_with_masks()[0], keep))
    merged = outcome.model
    assert outcome.mode == "masked" and outcome.masked == ["fc1.weight", "fc2.weight"]
    assert not lora.lora_layers(merged)
    for name, k in keep.items():
        w = merged.get_parameter(name)
        assert torch.equal(w != 0, k)  # exactly the pruning mask of torch.nn.utils.prune
        torch.testing.assert_close(w, expect[name] * k)
    torch.testing.assert_close(merged.get_parameter("head.weight"), expect["head.weight"])  # unmasked: dense merge


def test_dense_merge_drops_masks_of_adapted_layers() -> None:
    model, keep = _pruned_mlp_with_masks()
    peft_model = lora.attach_lora(model, lora.LoraOptions(exclude=("fc2",)))
    _randomise_adapters(peft_model)
    expect = {k: v.detach().clone() for k, v in lora.effective_weights(peft_model).items()}
    outcome = lora.MERGE_MODES.get("dense")(peft_model, keep)
    assert outcome.masked == ["fc2.weight"]  # fc2 was not adapted: its zeros are still masks
    torch.testing.assert_close(outcome.model.get_parameter("fc1.weight"), expect["fc1.weight"])
    assert torch.count_nonzero(outcome.model.get_parameter("fc1.weight")) > keep["fc1.weight"].sum()


def test_masked_merge_without_masks_falls_back_to_dense() -> None:
    peft_model = lora.attach_lora(_mlp(), lora.LoraOptions())
    outcome = lora.MERGE_MODES.get("masked")(peft_model, {})
    assert outcome.mode == "dense" and outcome.warnings


# ----------------------------------------------------------------------------------------- target selection


def test_targets_default_to_every_linear_and_globs_add_and_remove() -> None:
    model = timm.create_model("improved_cnn", num_classes=10)
    assert lora.select_targets(model, lora.LoraOptions()) == ["fc1", "fc2"]
    got = lora.select_targets(model, lora.LoraOptions(targets=("features.*.conv",), exclude=("fc2",)))
    assert got == ["features.0.conv", "features.1.conv", "features.2.conv", "fc1"]
    assert lora.select_targets(model, lora.LoraOptions(linear=False, targets=("fc2",))) == ["fc2"]


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (lora.LoraOptions(rank=0), "--rank must be at least 1"),
        (lora.LoraOptions(rank=11), "larger than layer 'head'"),  # head is 100→10
        (lora.LoraOptions(targets=("nothing.*",)), "matches no module"),
        (lora.LoraOptions(exclude=("nope",)), "matches no module"),
        (lora.LoraOptions(targets=("act1",)), "is a ReLU"),
        (lora.LoraOptions(linear=False), "no layer to adapt"),
    ],
)
def test_bad_lora_options_are_refused(opts: lora.LoraOptions, message: str) -> None:
    from prunecli.errors import InputError

    with pytest.raises(InputError, match=message):
        lora.select_targets(_mlp(), opts)


# ----------------------------------------------------------------------------------------- the command


@pytest.fixture
def pruned_mlp(tmp_path: Path) -> Path:
    """A trained-for-a-moment fc_mlp (with BatchNorm) pruned 50 % globally, saved with its masked tensors."""
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    model = _mlp(bn=True)
    _prune_global(model, ["fc1", "fc2"], 0.5)
    path = tmp_path / "p50.safetensors"
    save_checkpoint(path, model, Manifest("fc_mlp", 10, {"bn": True}, default_pretrained_cfg("fc_mlp"),
                                          masked=["fc1.weight", "fc2.weight"]))  # fmt: skip
    return path


def _sparsity(path: Path, names: list[str]) -> float:
    sd = load_file(str(path))
    return sum(int((sd[n] == 0).sum()) for n in names) / sum(sd[n].numel() for n in names)


def test_cli_masked_keeps_sparsity_exactly_and_reports_recovery(cli, pruned_mlp: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora.safetensors"
    r = cli("finetune-lora", pruned_mlp, "--data", "digits:train", "--val", "digits:test", "--epochs", "2",
            "--lr", "1e-2", "--device", "cpu", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    m = r.record["metrics"]
    before, after = load_file(str(pruned_mlp)), load_file(str(out))
    for name in ("fc1.weight", "fc2.weight"):
        assert torch.equal(after[name] != 0, before[name] != 0)  # same zeros, exactly
    assert not torch.equal(after["fc1.weight"], before["fc1.weight"])  # and the kept weights did train
    prunable = ["fc1.weight", "fc2.weight", "head.weight"]
    assert m["sparsity_after"] == m["sparsity_before"] == _sparsity(pruned_mlp, prunable)
    assert m["masked_sparsity_after"] == m["masked_sparsity_before"] == 0.5  # round(0.5·49,200) zeros exactly
    assert m["trainable_params"] == 8 * (64 + 300) + 8 * (300 + 100) + 8 * (100 + 10)
    assert len(m["train_loss"]) == 2 and 0 <= m["train_acc"] <= 1
    assert m["lora_improvement"] == pytest.approx(m["top1_after"] - m["top1_before"])
    assert m["merge"] == "masked" and m["targets"] == ["fc1", "fc2", "head"]
    assert m["masked_update"] is True and m["masked_update_layers"] == ["fc1.weight", "fc2.weight"]
    assert m["top1_unmerged"] == m["top1_after"]  # trained through the mask: the written model is the trained one
    header = json.loads(__import__("prunecli.checkpoint.header", fromlist=["x"]).read_header(out).metadata["prunecli"])
    assert header["masked"] == ["fc1.weight", "fc2.weight"] and header["adapters"] is None
    assert header["lineage"][-1]["command"] == "finetune-lora"


def test_cli_bn_eval_freezes_running_statistics(cli, pruned_mlp: Path, tmp_path: Path) -> None:
    before = load_file(str(pruned_mlp))
    for mode, frozen in (("eval", True), ("train", False)):
        out = tmp_path / f"{mode}.safetensors"
        r = cli("finetune-lora", pruned_mlp, "--bn", mode, "--max-steps", "2", "--device", "cpu", "-o", out)
        assert r.exit_code == 0, r.stderr
        after = load_file(str(out))
        assert torch.equal(after["bn1.running_mean"], before["bn1.running_mean"]) is frozen


def test_cli_merge_none_adapter_loads_with_peft_to_the_same_logits_as_eval(
    cli, pruned_mlp: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    from prunecli.api._common import load_input
    from prunecli.data import load_data, make_loader

    out = tmp_path / "kept.safetensors"
    r = cli("finetune-lora", pruned_mlp, "--merge", "none", "--max-steps", "3", "--lr", "1e-2", "--device", "cpu",
            "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    folder = tmp_path / "kept.adapter"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert r.record["metrics"]["sparsity_after"] == r.record["metrics"]["sparsity_before"]  # base untouched
    assert r.record["metrics"]["sparsity_effective"] < r.record["metrics"]["sparsity_before"]

    # A peft user: rebuild the base by hand from the weights, then load the adapter with peft.
    base = timm.create_model("fc_mlp", num_classes=10, bn=True)
    base.load_state_dict(load_file(str(out)))
    plain = copy.deepcopy(base).eval()
    user = PeftModel.from_pretrained(base.eval(), str(folder)).eval()

    loaded = load_input(str(out))  # what prunecli eval builds
    data, _ = load_data("digits:test", loaded)
    x, y = next(iter(make_loader(data, batch_size=360)))
    with torch.no_grad():
        expect, got = user(x), loaded.model(x)
    assert not torch.allclose(expect, plain(x))  # the adapter does change the logits
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    r = cli("eval", out, "--data", "digits:test", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert r.record["metrics"]["top1"] == pytest.approx(float((expect.argmax(1) == y).float().mean()))
    assert r.record["metrics"]["loss"] == pytest.approx(float(F.cross_entropy(expect, y)), rel=1e-5)


def test_cli_masked_on_a_checkpoint_without_masks_warns_and_merges_dense(cli, save_model, tmp_path: Path) -> None:
    src = save_model(_mlp(), tmp_path / "dense.safetensors", "fc_mlp", 10)
    r = cli("finetune-lora", src, "--max-steps", "1", "--device", "cpu", "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 0, r.stderr
    assert r.record["metrics"]["merge"] == "dense" and r.record["metrics"]["merge_requested"] == "masked"
    assert "Warning:" in r.stderr and "merged dense" in r.stderr


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["--rank", "0"], "--rank: 0 is below 1", 2),  # invalid values and conflicts: usage errors
        (["--rank", "11"], "larger than layer 'head'", 1),  # what only the model can tell: bad input
        (["--targets", "conv*"], "matches no module", 1),
        (["--merge", "sideways"], "unknown merge mode", 1),
        (["--bn", "maybe"], "unknown BatchNorm mode", 1),
        (["--wcr", "-1"], "--wcr: -1.0 is below 0", 2),
        (["--masked-update", "--merge", "none"], "--masked-update needs --merge masked", 2),
    ],
)
def test_cli_bad_input_exits_without_output(cli, pruned_mlp: Path, tmp_path: Path, args: list[str], message: str,
                                            code: int):  # fmt: skip
    out = tmp_path / "bad.safetensors"
    r = cli("finetune-lora", pruned_mlp, *args, "--max-steps", "1", "--device", "cpu", "-o", out)
    assert r.exit_code == code, r.stderr
    assert r.stderr.startswith("Error: ") and message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not (tmp_path / "bad.adapter").exists()


def test_cli_no_masked_update_trains_paper_a_plain_update(cli, pruned_mlp: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain.safetensors"
    r = cli("finetune-lora", pruned_mlp, "--no-masked-update", "--max-steps", "3", "--lr", "1e-2", "--device", "cpu",
            "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    m = r.record["metrics"]
    assert m["masked_update"] is False and m["masked_update_layers"] == [] and m["merge"] == "masked"
    before, after = load_file(str(pruned_mlp)), load_file(str(out))
    assert torch.equal(after["fc1.weight"] != 0, before["fc1.weight"] != 0)  # the merge still re-masks
