"""``prunecli finetune`` and the shared training loop: determinism, masks, the loop against a hand-written
reference, schedules, records, and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

FAST = ["--data", "digits:train", "--device", "cpu", "--augment", "none"]


def _manifest(path):
    from prunecli.checkpoint.header import read_header

    return json.loads(read_header(path).metadata["prunecli"])


def _accuracy(path, data: str = "digits:test") -> float:
    """Top-1 by a plain loop (independent of prunecli.evaluation)."""
    from prunecli.api._common import load_input
    from prunecli.data import load_data, make_loader

    loaded = load_input(str(path))
    ds, _ = load_data(data, loaded)
    model = loaded.model.eval()
    correct = 0
    with torch.no_grad():
        for xs, ys in make_loader(ds, batch_size=1):  # one image at a time, normalised as eval's loader does
            correct += int(model(xs).argmax(1).item() == int(ys))
    return correct / len(ds.dataset)


# ---- the CLI ---------------------------------------------------------------------------------------


def test_same_seed_gives_identical_checkpoint_bytes(cli, tmp_path) -> None:
    """Augmentation, shuffling, dropout and initialisation all seeded: the files are byte-identical."""
    args = [
        "arch:fc_mlp",
        "--data",
        "digits:train",
        "--device",
        "cpu",
        "--epochs",
        "2",
        "--max-steps",
        "30",
        "--seed",
        "3",
    ]
    outs = []
    for name in ("a", "b", "c"):
        seed = ["--seed", "4"] if name == "c" else []
        r = cli("finetune", *args, *seed, "-o", tmp_path / f"{name}.safetensors")
        assert r.exit_code == 0, r.stderr
        outs.append((tmp_path / f"{name}.safetensors").read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]  # the seed matters, so the equality above is not vacuous


def test_trains_from_arch_and_records_per_epoch_metrics(cli, tmp_path) -> None:
    out = tmp_path / "m.safetensors"
    r = cli("finetune", "arch:fc_mlp", *FAST, "--epochs", "3", "--val", "digits:test", "--lr", "3e-3", "-o", out)
    assert r.exit_code == 0, r.stderr
    m = r.record["metrics"]
    assert len(m["train_loss"]) == 3 and len(m["val_top1"]) == 3 and len(m["lr"]) == 3
    assert m["train_loss"][-1] < m["train_loss"][0]
    assert 0 <= m["train_acc"] <= 1 and m["steps"] == 3 * (1437 // 64)
    assert m["val_top1_final"] == pytest.approx(_accuracy(out))  # the last validation = the saved weights
    assert m["val_top1_final"] > 0.8
    assert m["sparsity_before"] == m["sparsity_after"] == 0.0
    man = _manifest(out)
    assert man["arch"] == "fc_mlp" and man["num_classes"] == 10
    assert man["lineage"][-1]["command"] == "finetune" and man["lineage"][-1]["options"]["epochs"] == 3
    assert r.record["checkpoint"] == str(out) and r.record["sha256"]


def test_num_classes_for_arch_and_class_mismatch(cli, tmp_path) -> None:
    r = cli("finetune", "arch:fc_mlp", "--num-classes", "5", *FAST, "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 1 and "Error:" in r.stderr and "classes" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()
    r = cli("finetune", "arch:fc_mlp", *FAST, "--val", "synthetic:8", "--num-classes", "10", "--epochs", "1",
            "-o", tmp_path / "y.safetensors")  # fmt: skip
    assert r.exit_code == 0, r.stderr  # synthetic draws labels for the model's head


@pytest.mark.parametrize(
    "args, needle, code",
    [
        (["--epochs", "0"], "--epochs", 2),  # invalid values: usage errors, found before anything is loaded
        (["--lr", "-0.1"], "--lr", 2),
        (["--optimizer", "lion"], "unknown optimizer 'lion'", 1),  # names: checked against the registries
        (["--schedule", "poly"], "unknown schedule", 1),
        (["--wcr", "-1"], "--wcr", 2),
        (["--label-smoothing", "1.5"], "--label-smoothing", 2),
        (["--data", "nosuch:x"], "unknown data spec", 1),
    ],
)
def test_bad_input_is_a_clear_error(cli, tmp_path, args, needle, code) -> None:
    out = tmp_path / "bad.safetensors"
    r = cli("finetune", "arch:fc_mlp", *FAST, *args, "-o", out)
    assert r.exit_code == code, r.stderr
    assert r.stderr.startswith("Error:") and needle in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_existing_output_needs_force(cli, tmp_path) -> None:
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep")
    r = cli("finetune", "arch:fc_mlp", *FAST, "--max-steps", "1", "-o", out)
    assert r.exit_code == 1 and "--force" in r.stderr and out.read_bytes() == b"keep"
    r = cli("finetune", "arch:fc_mlp", *FAST, "--max-steps", "1", "-o", out, "--force")
    assert r.exit_code == 0, r.stderr


# ---- masks -----------------------------------------------------------------------------------------


def _masked_copy(src, dst, save_model, *, mark: bool = True) -> dict[str, np.ndarray]:
    """Zeroes a random half of every conv/linear weight of ``src`` and saves it (marked as masked)."""
    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint

    man = Manifest.from_json(json.dumps(_manifest(src)))
    from prunecli.api._common import load_input

    model = load_input(str(src)).model
    g = torch.Generator().manual_seed(0)
    zeros = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                drop = torch.randperm(p.numel(), generator=g)[: p.numel() // 2]
                p.view(-1)[drop] = 0.0
                zeros[name] = (p == 0).numpy().copy()
    man.masked = sorted(zeros) if mark else []
    save_checkpoint(dst, model, man, force=True)
    return zeros


def test_masked_zeros_survive_adamw_with_weight_decay_and_accuracy_recovers(cli, tmp_path, save_model) -> None:
    from safetensors.numpy import load_file

    base = tmp_path / "base.safetensors"
    assert cli("finetune", "arch:fc_mlp", *FAST, "--epochs", "3", "--lr", "3e-3", "-o", base).exit_code == 0
    pruned = tmp_path / "pruned.safetensors"
    zeros = _masked_copy(base, pruned, save_model)
    acc_pruned = _accuracy(pruned)

    out = tmp_path / "ft.safetensors"
    r = cli("finetune", pruned, *FAST, "--epochs", "2", "--optimizer", "adamw", "--weight-decay", "0.05",
            "--lr", "3e-3", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    after = load_file(str(out))
    for name, z in zeros.items():
        assert np.all(after[name][z] == 0), name  # every pruned weight is still exactly zero
        assert np.count_nonzero(after[name][~z]) == (~z).sum()  # the kept ones trained
        assert np.all(np.signbit(after[name][z]) == 0)  # +0.0, not -0.0
    m = r.record["metrics"]
    n_zero = sum(int(z.sum()) for z in zeros.values())
    n_all = sum(z.size for z in zeros.values())
    assert m["sparsity_before"] == pytest.approx(n_zero / n_all) == pytest.approx(m["sparsity_after"])
    assert m["masked"] == sorted(zeros) and m["masked_sparsity_after"] == pytest.approx(n_zero / n_all)
    assert _manifest(out)["masked"] == sorted(zeros)  # the masks travel on
    assert _accuracy(out) > acc_pruned + 0.05


def test_unmarked_zeros_do_move(cli, tmp_path, save_model) -> None:
    """Control for the test above: without manifest.masked the optimizer does move the zeros."""
    from safetensors.numpy import load_file

    src = tmp_path / "fresh.safetensors"
    assert cli("finetune", "arch:fc_mlp", *FAST, "--max-steps", "1", "-o", src).exit_code == 0
    plain = tmp_path / "plain.safetensors"
    zeros = _masked_copy(src, plain, save_model, mark=False)
    out = tmp_path / "o.safetensors"
    assert cli("finetune", plain, *FAST, "--max-steps", "3", "-o", out).exit_code == 0
    after = load_file(str(out))
    assert any(np.count_nonzero(after[n][z]) > 0 for n, z in zeros.items())


def test_masks_kept_on_conv_net_with_sgd_momentum(cli, tmp_path, save_model) -> None:
    from safetensors.numpy import load_file

    src = tmp_path / "cnn.safetensors"
    assert cli("finetune", "arch:improved_cnn", *FAST, "--max-steps", "1", "-o", src).exit_code == 0
    pruned = tmp_path / "cnn_p.safetensors"
    zeros = _masked_copy(src, pruned, save_model)
    assert any(v.ndim == 4 for v in zeros.values())
    out = tmp_path / "cnn_ft.safetensors"
    r = cli("finetune", pruned, *FAST, "--max-steps", "3", "--batch-size", "32", "--optimizer", "sgd",
            "--lr", "0.05", "--weight-decay", "1e-3", "--wcr", "1e-5", "--clip-grad", "1", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    after = load_file(str(out))
    for name, z in zeros.items():
        assert np.all(after[name][z] == 0), name


def test_masks_unknown_name_is_a_checkpoint_error() -> None:
    from prunecli.errors import CheckpointError
    from prunecli.masks import Masks

    with pytest.raises(CheckpointError, match="no such parameter"):
        Masks.from_manifest(nn.Linear(2, 2), ["nope.weight"])


# ---- the library loop ------------------------------------------------------------------------------


def test_loop_equals_a_hand_written_reference_loop() -> None:
    """SGD+momentum, weight decay on ndim>1 only, label smoothing, an extra loss and clipping, against plain torch."""
    from prunecli.training import TrainConfig, train

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(5)]
    cfg = TrainConfig(epochs=2, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.01, schedule="none",
                      label_smoothing=0.1, clip_grad=0.5)  # fmt: skip

    model = make()
    result = train(model, batches, torch.device("cpu"), cfg, extra_loss=lambda: 1e-3 * model[0].weight.pow(2).sum())

    ref = make()
    decay = [p for p in ref.parameters() if p.ndim > 1]
    other = [p for p in ref.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9)  # fmt: skip
    losses = []
    for _ in range(2):
        total = 0.0
        for x, y in batches:
            loss = nn.functional.cross_entropy(ref(x), y, label_smoothing=0.1)
            opt.zero_grad()
            (loss + 1e-3 * ref[0].weight.pow(2).sum()).backward()
            nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5)
            opt.step()
            total += float(loss.detach()) * len(y)
        losses.append(total / 40)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert result.metrics()["train_loss"] == pytest.approx(losses, rel=1e-5)
    assert result.steps == 10 and len(result.metrics()["extra_loss"]) == 2


def test_trainable_filter_freezes_the_rest_and_restores_flags() -> None:
    from prunecli.training import TrainConfig, train

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(3)]
    train(model, batches, torch.device("cpu"), TrainConfig(epochs=1), trainable=lambda n, p: n.startswith("2."))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (not n.startswith("2.")), n
        assert p.requires_grad


@pytest.mark.parametrize("schedule", ["cosine", "step", "none"])
def test_schedules_follow_their_formula(schedule: str, monkeypatch) -> None:
    """The LR the loop used at each step matches the closed-form schedule."""
    from prunecli.training import TrainConfig, train

    model = nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(4)]
    seen: list[float] = []
    opt_step = torch.optim.Adam.step

    def spy(self, *a, **k):  # records the LR of every optimizer step
        seen.append(self.param_groups[0]["lr"])
        return opt_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    train(model, batches, torch.device("cpu"), TrainConfig(epochs=3, lr=0.01, schedule=schedule))
    total = 12
    formula = {
        "cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t / total)),
        "step": lambda t: 1.0 if t < 4 else (0.1 if t < 8 else 0.01),
        "none": lambda t: 1.0,
    }[schedule]
    assert seen == pytest.approx([0.01 * formula(t) for t in range(total)], rel=1e-9)


def test_diverging_run_is_an_input_error() -> None:
    from prunecli.errors import InputError
    from prunecli.training import TrainConfig, train

    model = nn.Linear(3, 2)
    batches = [(torch.full((4, 3), float("nan")), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(InputError, match="diverged"):
        train(model, batches, torch.device("cpu"), TrainConfig(epochs=1))


# ---- torchrun --------------------------------------------------------------------------------------


def test_two_gloo_processes_match_one_process(cli, tmp_path) -> None:
    """torchrun with 2 CPU processes × batch 64 trains like one process × batch 128 (no per-process randomness:
    no augmentation, an MLP without dropout or BatchNorm), and only rank 0 writes and prints."""
    import os
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    common = ["--data", "digits:train", "--val", "digits:test", "--epochs", "2", "--batch-size", "128", "--lr", "1e-2",
              "--augment", "none", "--device", "cpu", "--wcr", "1e-6", "--weight-decay", "1e-4"]  # fmt: skip
    one = cli("finetune", "arch:fc_mlp", *common, "-o", tmp_path / "one.safetensors")
    assert one.exit_code == 0, one.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNECLI_NO_PROGRESS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "prunecli", "finetune", "arch:fc_mlp", *common,
           "-o", str(tmp_path / "two.safetensors")]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [ln for ln in run.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1  # only rank 0 prints the record
    a, b = one.record["metrics"], json.loads(lines[0])["metrics"]
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert a["steps"] == b["steps"] == 2 * (1437 // 128)
    for key in ("train_loss", "train_acc_per_epoch", "wcr_per_epoch"):
        assert b[key] == pytest.approx(a[key], rel=1e-4), key
    w1, w2 = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-3, atol=1e-4)


def test_help_lists_every_registered_optimizer_and_schedule(cli) -> None:
    from prunecli.training import OPTIMIZERS, SCHEDULES

    r = cli("finetune", "--help")
    assert r.exit_code == 0
    text = " ".join(r.stdout.split())
    for name in [*OPTIMIZERS.names(), *SCHEDULES.names()]:
        assert name in text, name


# ---- recipes: defaults chosen by what a run starts from ---------------------------------------------


def _finetune(spec, out, **kw):
    """The library call with its defaults (the CLI builds the same request from its options)."""
    from prunecli.api.finetune import finetune
    from prunecli.requests import FinetuneRequest

    return finetune(
        FinetuneRequest.build(
            checkpoint=str(spec), data="digits:train", output=str(out), device="cpu", force=True, **kw
        )
    )


def test_warmup_then_schedule_follow_their_formula(monkeypatch) -> None:
    from prunecli.training import TrainConfig, train

    model = nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(5)]
    seen: list[float] = []
    opt_step = torch.optim.Adam.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return opt_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    train(model, batches, torch.device("cpu"), TrainConfig(epochs=2, lr=0.01, schedule="cosine", warmup_steps=3))
    # 3 warm-up steps at 1/4, 2/4, 3/4 of the peak, then a cosine over the remaining 7 steps from the peak.
    expect = [0.25, 0.5, 0.75] + [0.5 * (1 + math.cos(math.pi * t / 7)) for t in range(7)]
    assert seen == pytest.approx([0.01 * f for f in expect], rel=1e-9)


def test_arch_start_takes_the_scratch_recipe_and_reports_every_default(tmp_path) -> None:
    m = _finetune("arch:fc_mlp", tmp_path / "a.safetensors", max_steps=2).metrics
    assert m["recipe"]["name"] == "scratch" and m["recipe"]["chosen_because"] == "fresh arch: model"
    assert (m["recipe"]["optimizer"], m["recipe"]["lr"], m["recipe"]["schedule"]) == ("adam", 1e-3, "cosine")
    assert (m["recipe"]["augment"], m["recipe"]["warmup_steps"], m["recipe"]["set_by_user"]) == ("crop-flip", 0, [])
    assert "wcr" not in m  # WCR off: no regulariser block in the record
    m = _finetune("arch:fc_mlp", tmp_path / "b.safetensors", max_steps=2, lr=3e-3, wcr=1e-6).metrics
    assert m["recipe"]["lr"] == 3e-3 and m["recipe"]["set_by_user"] == ["lr"]
    assert m["wcr"]["lambda"] == 1e-6 and m["wcr"]["layers"] == 3  # fc1, fc2, head


def test_default_finetune_of_a_trained_model_keeps_its_accuracy(tmp_path) -> None:
    """One default epoch on the training split costs at most one point of test top-1; the from-scratch
    recipe (paper A: Adam 1e-3 at once, crop + flip) at the same setting costs more, so the check can fail."""
    base = tmp_path / "base.safetensors"
    _finetune("arch:improved_cnn", base, epochs=4, recipe="scratch", augment="crop")
    acc = _accuracy(base)
    assert acc > 0.95  # a trained model, else "keeps its accuracy" says little

    r = _finetune(base, tmp_path / "ft.safetensors", epochs=1)
    assert r.metrics["recipe"]["name"] == "finetune" and r.metrics["recipe"]["chosen_because"] == "trained checkpoint"
    assert r.metrics["recipe"]["lr"] == 1e-4 and r.metrics["recipe"]["warmup_steps"] == 3  # ceil(0.1 · 22 steps)
    assert _accuracy(tmp_path / "ft.safetensors") >= acc - 0.01

    _finetune(base, tmp_path / "old.safetensors", epochs=1, recipe="scratch")
    assert _accuracy(tmp_path / "old.safetensors") < acc - 0.01


def test_bad_recipe_and_warmup_are_clear_errors(tmp_path) -> None:
    from prunecli.errors import PrunecliError

    with pytest.raises(PrunecliError, match="--recipe: unknown value 'fast'"):
        _finetune("arch:fc_mlp", tmp_path / "x.safetensors", recipe="fast")
    with pytest.raises(PrunecliError, match="--warmup"):
        _finetune("arch:fc_mlp", tmp_path / "x.safetensors", warmup=1.5)
    with pytest.raises(PrunecliError, match="unknown augmentation"):
        _finetune("arch:fc_mlp", tmp_path / "x.safetensors", augment="mixup")
    assert not (tmp_path / "x.safetensors").exists()


# ---- finetune-lora defaults: the pruned layers get adapters ----------------------------------------


def _pruned_resnet(tmp_path, masked_pattern: str = "conv"):
    """timm's test_resnet with half of every conv weight zeroed and recorded as masked (the head stays dense)."""
    import timm

    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).eval()
    masked = []
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Conv2d) and masked_pattern in name:
                w = mod.weight
                w[w.abs() < w.abs().flatten().median()] = 0.0
                masked.append(f"{name}.weight")
    path = tmp_path / "r.safetensors"
    save_checkpoint(path, model, Manifest("test_resnet", 10, {}, default_pretrained_cfg("test_resnet"), masked=masked))
    return path, [m.removesuffix(".weight") for m in masked]


def _lora(spec, out, **kw):
    """finetune-lora through the library, one step on synthetic data (what is adapted is the question here)."""
    from prunecli.api.finetune_lora import finetune_lora
    from prunecli.requests import FinetuneLoraRequest

    req = FinetuneLoraRequest.build(checkpoint=str(spec), data="synthetic:8", output=str(out), device="cpu",
                                    force=True, max_steps=1, batch_size=4, **kw)  # fmt: skip
    return finetune_lora(req)


def test_lora_default_targets_cover_pruned_convs_and_keep_their_sparsity(tmp_path) -> None:
    from safetensors.torch import load_file

    path, convs = _pruned_resnet(tmp_path)
    r = _lora(path, tmp_path / "auto.safetensors", lr=1e-2)
    m = r.metrics
    assert m["target_preset"] == "linear+pruned" and m["pruned_layers"] == convs
    assert m["targets"] == [*convs, "fc"]  # every pruned conv plus paper A's Linear head, in module order
    assert m["merge"] == "masked" and m["masked_update_layers"] == [f"{c}.weight" for c in convs]
    before, after = load_file(str(path)), load_file(str(tmp_path / "auto.safetensors"))
    for name in convs:  # every pruned conv kept its zeros exactly through the masked merge
        assert torch.equal(after[f"{name}.weight"] == 0, before[f"{name}.weight"] == 0), name
    assert any(not torch.equal(after[f"{c}.weight"], before[f"{c}.weight"]) for c in convs)  # and they trained
    assert m["recipe"]["name"] == "lora" and m["recipe"]["warmup_steps"] == 1


def test_lora_linear_preset_is_paper_a_and_adapts_only_the_head(tmp_path) -> None:
    path, _ = _pruned_resnet(tmp_path)
    m = _lora(path, tmp_path / "lin.safetensors", target_preset="linear").metrics
    assert m["target_preset"] == "linear" and m["targets"] == ["fc"]
    assert m["merge"] == "dense" and m["merge_requested"] == "masked"  # the head carries no mask
    m = _lora(path, tmp_path / "pr.safetensors", target_preset="pruned", rank=2).metrics
    assert m["targets"] == m["pruned_layers"] and "fc" not in m["targets"]


def test_lora_on_a_linear_only_pruned_model_keeps_paper_a_default(tmp_path) -> None:
    import timm

    import prunecli.archs  # noqa: F401  (fc_mlp)
    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    torch.manual_seed(0)
    model = timm.create_model("fc_mlp", num_classes=10)
    with torch.no_grad():
        model.fc1.weight[model.fc1.weight.abs() < model.fc1.weight.abs().median()] = 0.0
    path = tmp_path / "mlp.safetensors"
    save_checkpoint(path, model, Manifest("fc_mlp", 10, {}, default_pretrained_cfg("fc_mlp"), masked=["fc1.weight"]))
    m = _lora(path, tmp_path / "o.safetensors").metrics
    assert m["target_preset"] == "linear" and m["targets"] == [n for n, x in model.named_modules()
                                                                if isinstance(x, nn.Linear)]  # fmt: skip


def test_cli_prints_no_wcr_block_when_wcr_is_off(cli, tmp_path) -> None:
    """Neither the record nor the terminal summary mentions WCR unless --wcr is given (and both do with it)."""
    out = tmp_path / "m.safetensors"
    r = cli("finetune", "arch:fc_mlp", "--data", "digits:train", "--device", "cpu", "--max-steps", "1", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "wcr" not in r.record["metrics"] and "WCR" not in r.stderr
    assert r.record["metrics"]["recipe"]["name"] == "scratch"
    r = cli("finetune", "arch:fc_mlp", "--data", "digits:train", "--device", "cpu", "--max-steps", "1", "--wcr", "1e-6",
            "-o", out, "--force")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert r.record["metrics"]["wcr"]["lambda"] == 1e-6 and "WCR λ=1e-06" in r.stderr
