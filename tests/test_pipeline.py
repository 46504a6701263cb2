"""The data pipeline at real scale (issue 18): the default worker rule, ``--workers 0``, seeded workers,
``--precision`` on CPU (bf16 runs, the record says so, numbers within a bf16 bound), ``--channels-last``,
and ``--augment`` with its input-size default rule — each against an expectation computed here."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

FAST = ["--device", "cpu", "--max-steps", "3", "-b", "32", "--quiet"]


def _cpus() -> int:
    """Usable CPUs, read independently of prunecli.data."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---- workers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "local", "expected"),
    [(1, 1, 0), (2, 1, 2), (3, 1, 3), (16, 1, 8), (64, 1, 8), (16, 4, 4), (6, 4, 0), (8, 2, 4), (12, 8, 0)],
)
def test_default_worker_rule_table(cpus: int, local: int, expected: int) -> None:
    """min(8, cpus // processes), 0 below 2 per process: the table is the README's rule, written out by hand."""
    from prunecli.data import default_workers

    assert default_workers(cpus, local) == expected


def test_default_workers_reads_affinity_and_local_world_size(monkeypatch) -> None:
    import prunecli.data as data

    monkeypatch.setattr(data, "usable_cpus", lambda: 12)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert data.default_workers() == 6
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert data.default_workers() == 8


def test_make_loader_settings_like_timm() -> None:
    """workers=None → the rule capped by the batch count; workers persist; pinned memory only for CUDA."""
    from prunecli.data import LoadedData, make_loader

    ds = LoadedData(torch.utils.data.TensorDataset(torch.zeros(10, 2), torch.zeros(10)), 2, None, None)  # type: ignore[arg-type]
    per_proc = _cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    rule = min(8, per_proc) if per_proc >= 2 else 0
    auto = make_loader(ds, batch_size=4, workers=None)  # 3 batches
    assert auto.num_workers == min(rule, 3)
    assert auto.persistent_workers == (auto.num_workers > 0)
    zero = make_loader(ds, batch_size=4, workers=0)
    assert zero.num_workers == 0 and not zero.persistent_workers and not zero.pin_memory
    two = make_loader(ds, batch_size=4, workers=2, device="cuda")  # constructing needs no GPU
    assert two.num_workers == 2 and two.persistent_workers and two.pin_memory
    assert [y.tolist() for _, y in make_loader(ds, batch_size=4, workers=2)] == [[0.0] * 4, [0.0] * 4, [0.0] * 2]


def test_eval_default_and_zero_workers_same_metrics(cli) -> None:
    """The record names the worker count; 0 and the default give identical metrics (same order, same math)."""
    base = ["eval", "arch:fc_mlp", "--data", "digits:test", "--device", "cpu", "-b", "128", "--quiet"]
    auto = cli(*base)
    zero = cli(*base, "--workers", "0")
    assert auto.exit_code == 0 and zero.exit_code == 0, auto.stderr + zero.stderr
    per_proc = _cpus()
    rule = min(8, per_proc) if per_proc >= 2 else 0
    assert auto.record["metrics"]["loader"] == {"workers": min(rule, math.ceil(360 / 128)), "pin_memory": False}
    assert zero.record["metrics"]["loader"]["workers"] == 0
    for key in ("top1", "top5", "loss", "samples"):
        assert auto.record["metrics"][key] == zero.record["metrics"][key], key
    assert auto.record["metrics"]["precision"] == "fp32"


# ---- determinism with workers ------------------------------------------------------------------------


def _finetune_sha(cli, out, *extra: str) -> str:
    r = cli("finetune", "arch:fc_mlp", "-o", out, "--data", "digits:train", "--force", *FAST, *extra)
    assert r.exit_code == 0, r.stderr
    return r.record["sha256"]


def test_same_checkpoint_with_workers_0_and_2(cli, tmp_path) -> None:
    """The sampler fixes the data order, the transform draws nothing: workers change nothing, to the byte."""
    a = _finetune_sha(cli, tmp_path / "a.safetensors", "--augment", "none", "--workers", "0")
    b = _finetune_sha(cli, tmp_path / "b.safetensors", "--augment", "none", "--workers", "2")
    assert a == b


def test_seeded_workers_reproduce_random_augmentation(cli, tmp_path) -> None:
    """Random crops drawn in 2 seeded workers: two runs give the same bytes; another seed does not."""
    a = _finetune_sha(cli, tmp_path / "a.safetensors", "--augment", "crop-flip", "--workers", "2")
    b = _finetune_sha(cli, tmp_path / "b.safetensors", "--augment", "crop-flip", "--workers", "2")
    c = _finetune_sha(cli, tmp_path / "c.safetensors", "--augment", "crop-flip", "--workers", "2", "--seed", "1")
    assert a == b != c


# ---- precision ---------------------------------------------------------------------------------------

U_BF16 = 2.0**-8  # bfloat16 unit roundoff: 8 significant bits, round to nearest


def _abs_network_bound(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A first-order bound on |logits_bf16 − logits_fp32| for a Linear/ReLU stack under CPU autocast.

    Each Linear rounds its input, weight and bias to bf16 and its output back to bf16 (relative error
    ≤ u each) and accumulates in float32 (error ~2^-24·K, negligible); ReLU is 1-Lipschitz. Running the
    network on |x| with |W|, |b| gives A ≥ every intermediate magnitude, so L layers × 3 roundings bound
    the error by 3·L·u·A; ×2 covers the second-order terms (L·u ≪ 1).
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    a = x.abs().flatten(1)
    for lin in linears:
        a = a @ lin.weight.abs().T + (lin.bias.abs() if lin.bias is not None else 0)
    return 2 * 3 * len(linears) * U_BF16 * a


def _emulated_bf16(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CPU autocast's bf16 Linear/ReLU stack by hand: inputs, weights and biases rounded to bf16, products
    summed in float64, each layer's output rounded to bf16 (what autocast's bf16 ``linear`` returns)."""
    r = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    a = x.flatten(1).double()
    for i, lin in enumerate(linears):
        a = r(r(a) @ r(lin.weight).T + r(lin.bias))
        a = a.relu() if i < len(linears) - 1 else a
    return a.float()


def test_bf16_eval_on_cpu_within_bound(cli, tmp_path) -> None:
    import torch.nn.functional as F

    from prunecli.api._common import load_input
    from prunecli.data import load_data, make_loader

    ckpt = tmp_path / "m.safetensors"
    made = cli("finetune", "arch:fc_mlp", "-o", ckpt, "--data", "digits:train", "--augment", "none", *FAST)
    assert made.exit_code == 0, made.stderr
    base = ["eval", ckpt, "--data", "digits:test", "--device", "cpu", "--workers", "0", "--quiet"]
    fp32, bf16 = cli(*base), cli(*base, "--precision", "bf16")
    assert fp32.exit_code == 0 and bf16.exit_code == 0, bf16.stderr
    assert (fp32.record["metrics"]["precision"], bf16.record["metrics"]["precision"]) == ("fp32", "bf16")
    loss32, loss16 = fp32.record["metrics"]["loss"], bf16.record["metrics"]["loss"]
    assert loss16 != loss32  # autocast really ran: bf16 rounding moves the loss

    loaded = load_input(str(ckpt))  # the independent side: plain loops and the bounds
    ds, _ = load_data("digits:test", loaded)
    (x, y), *_ = list(make_loader(ds, batch_size=len(ds.dataset)))  # normalised as eval's loader does
    with torch.no_grad():
        logits = loaded.model.eval()(x)
        bound = _abs_network_bound(loaded.model, x).max(1).values  # per sample, ∞-norm of the logit error
        emulated = _emulated_bf16(loaded.model, x)
    # cross-entropy is 2-Lipschitz in the logits' ∞-norm (its gradient p − e_y has 1-norm ≤ 2)
    assert abs(loss16 - loss32) <= float((2 * bound).mean())
    # top-1 can change only where the fp32 margin between the two best classes is within 2·bound
    top2 = logits.topk(2, dim=1).values
    fragile = int(((top2[:, 0] - top2[:, 1]) <= 2 * bound).sum())
    assert abs(bf16.record["metrics"]["top1"] - fp32.record["metrics"]["top1"]) * len(x) <= fragile + 1e-9
    # the emulation predicts the bf16 loss up to one bf16 ulp per logit (float32 vs float64 summation order
    # can move a sum across a rounding boundary): |Δloss| ≤ 2 · 2u · max|logit|, on average over samples
    tol = float((2 * 2 * U_BF16 * emulated.abs().max(1).values).mean())
    assert abs(loss16 - float(F.cross_entropy(emulated, y))) <= tol
    assert tol < abs(loss16 - loss32) * 100  # the emulation tolerance is well below bf16's own effect


def test_fp16_on_cpu_is_refused(cli) -> None:
    r = cli("eval", "arch:fc_mlp", "--data", "digits:test", "--device", "cpu", "--precision", "fp16")
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines()[0].startswith("Error: --precision fp16 runs on CUDA only")


def test_unknown_precision_is_a_usage_error(cli) -> None:
    r = cli("eval", "arch:fc_mlp", "--data", "digits:test", "--device", "cpu", "--precision", "fp8")
    assert r.exit_code == 2 and "fp32" in r.stderr


def test_bf16_training_and_scoring_on_cpu(cli, tmp_path) -> None:
    """bf16 autocast trains and scores on CPU; the records say bf16; criteria outside the list fall back."""
    out = tmp_path / "t.safetensors"
    r = cli("finetune", "arch:fc_mlp", "-o", out, "--data", "digits:train", "--augment", "none", "--precision",
            "bf16", "--channels-last", *FAST)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert r.record["metrics"]["precision"] == "bf16" and r.record["metrics"]["channels_last"] is True
    s = cli("score", out, "--method", "taylor", "--data", "digits:train", "--batches", "2", "--device", "cpu",
            "--precision", "bf16", "-o", tmp_path / "t.scores", "--quiet")  # fmt: skip
    assert s.exit_code == 0, s.stderr
    assert s.record["metrics"]["precision"] == "bf16"
    b = cli("score", out, "--method", "biascomp", "--data", "digits:train", "--batches", "2", "--device", "cpu",
            "--precision", "bf16", "-o", tmp_path / "b.scores")  # fmt: skip
    assert b.exit_code == 0, b.stderr
    assert b.record["metrics"]["precision"] == "fp32" and "scores in fp32" in b.stderr


def test_taylor_bf16_scores_rank_like_fp32(cli, tmp_path) -> None:
    """Taylor scores from bf16 forward passes order the weights almost as fp32 ones do (Spearman > 0.95)."""
    from scipy.stats import spearmanr

    from prunecli.scores import load_scores

    ckpt = tmp_path / "m.safetensors"
    made = cli("finetune", "arch:fc_mlp", "-o", ckpt, "--data", "digits:train", "--augment", "none", *FAST)
    assert made.exit_code == 0, made.stderr
    files = {}
    for p in ("fp32", "bf16"):
        files[p] = tmp_path / f"{p}.scores"
        r = cli("score", ckpt, "--method", "taylor", "--data", "digits:train", "--batches", "2", "--device", "cpu",
                "--precision", p, "-o", files[p], "--quiet", "--workers", "0")  # fmt: skip
        assert r.exit_code == 0, r.stderr
    a, b = load_scores(files["fp32"]), load_scores(files["bf16"])
    flat = lambda s: torch.cat([v.flatten() for _, v in sorted(s.scores.items())]).double().numpy()  # noqa: E731
    assert spearmanr(flat(a), flat(b)).statistic > 0.95


# ---- augmentation ------------------------------------------------------------------------------------

CFG = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "interpolation": "bicubic",
       "crop_mode": "center"}  # fmt: skip


def _types(tf) -> list[str]:
    """The transform's steps by class name, nested Compose flattened."""
    out: list[str] = []
    for t in getattr(tf, "transforms", [tf]):
        out += _types(t) if hasattr(t, "transforms") else [type(t).__name__]
    return out


@pytest.mark.parametrize(
    ("side", "recipe_choice", "expected"),
    [(32, "crop", "crop"), (32, "crop-flip", "crop-flip"), (63, "crop", "crop"), (64, "crop", "timm"),
     (224, "crop-flip", "timm"), (224, "none", "none")],
)  # fmt: skip
def test_default_augment_follows_input_size(side: int, recipe_choice: str, expected: str) -> None:
    from prunecli.data import resolve_augment

    assert resolve_augment(recipe_choice, {**CFG, "input_size": (3, side, side)}, explicit=False)[0] == expected
    assert resolve_augment(recipe_choice, {**CFG, "input_size": (3, side, side)}, explicit=True)[0] == recipe_choice


def test_timm_augment_is_timms_training_transform() -> None:
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    from prunecli.data import train_transform

    cfg = {**CFG, "input_size": (3, 224, 224)}
    tf = train_transform(cfg, augment="timm")
    types = _types(tf)
    assert types[:4] == ["_ToMode", "RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "ColorJitter"]
    assert types[-1] == "Normalize"
    rrc = next(t for t in tf.transforms[1].transforms if type(t).__name__ == "RandomResizedCropAndInterpolation")
    assert rrc.interpolation == InterpolationMode.BICUBIC and rrc.scale == (0.08, 1.0)
    norm = tf.transforms[1].transforms[-1]
    assert tuple(norm.mean) == CFG["mean"] and tuple(norm.std) == CFG["std"]
    out = tf(Image.new("RGB", (300, 200), (10, 200, 30)))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32


def test_cifar_alias_and_small_augmentations() -> None:
    from PIL import Image

    from prunecli.data import augmentation_name, train_transform

    cfg = {**CFG, "input_size": (3, 32, 32)}
    assert augmentation_name("cifar") == "crop-flip"
    flip = ["_ToMode", "Resize", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert _types(train_transform(cfg, augment="cifar")) == flip
    assert _types(train_transform(cfg, augment="crop-flip")) == flip
    assert _types(train_transform(cfg, augment="crop")) == [t for t in flip if t != "RandomHorizontalFlip"]
    assert train_transform(cfg, augment="cifar")(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_finetune_records_the_resolved_augmentation(cli, tmp_path) -> None:
    """A timm ResNet at 32 px → the scratch recipe's crop-flip; at 64 px → timm; an explicit choice wins."""
    common = ["arch:resnet10t", "--num-classes", "10", "--data", "digits:train", "--device", "cpu", "--max-steps",
              "1", "-b", "4", "--quiet", "--force", "--workers", "0"]  # fmt: skip
    small = cli("finetune", *common, "-o", tmp_path / "s.safetensors", "--input-size", "32")
    large = cli("finetune", *common, "-o", tmp_path / "l.safetensors", "--input-size", "64")
    told = cli("finetune", *common, "-o", tmp_path / "t.safetensors", "--input-size", "64", "--augment", "cifar")
    for r in (small, large, told):
        assert r.exit_code == 0, r.stderr
    assert small.record["metrics"]["recipe"]["augment"] == "crop-flip"
    assert large.record["metrics"]["recipe"]["augment"] == "timm"
    assert "64 px" in large.record["metrics"]["recipe"]["augment_because"]
    assert told.record["metrics"]["recipe"]["augment"] == "crop-flip"
    assert told.record["metrics"]["recipe"]["augment_because"] == "requested"


def test_unknown_augmentation_lists_the_choices(cli, tmp_path) -> None:
    r = cli("finetune", "arch:fc_mlp", "-o", tmp_path / "x.safetensors", "--data", "digits:train", "--device",
            "cpu", "--augment", "mixup")  # fmt: skip
    assert r.exit_code == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: unknown augmentation 'mixup'") and "timm" in last and "cifar" in last
