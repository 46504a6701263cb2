"""Every CKPT form of docs/checkpoints.md loads to the same model that timm itself builds from the same weights.

The reference is always timm's own path (``timm.create_model`` + ``load_state_dict``), never prunecli's
loader; accuracy through the CLI is compared with a plain evaluation loop over the same images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import save_for_hf

from prunecli.api._common import InputOptions, load_input

ARCH = "test_resnet"
NUM_CLASSES = 3
TOL = 1e-5


def _timm_reference(state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = timm.create_model(ARCH, pretrained=False, num_classes=NUM_CLASSES)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def weights() -> dict[str, dict[str, torch.Tensor]]:
    """A tiny timm model's weights, with trained-looking BN statistics, plus a distinct EMA copy."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=NUM_CLASSES)
    model.train()
    with torch.no_grad():  # populate running stats so eval-mode BN is not the identity
        for _ in range(2):
            model(torch.randn(4, 3, 64, 64))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    noisy = lambda v: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()  # noqa: E731
    ema = {k: noisy(v) for k, v in sd.items()}
    return {"plain": sd, "ema": ema}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, weights: dict) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    model = _timm_reference(weights["plain"])
    save_for_hf(model, str(root / "hf_st"), safe_serialization=True)
    save_for_hf(model, str(root / "hf_bin"), safe_serialization=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # a real optimizer state with momentum buffers
    torch.save(
        {
            "epoch": 7,
            "arch": type(model).__name__.lower(),  # what timm's train.py writes ("resnet")
            "state_dict": weights["plain"],
            "state_dict_ema": weights["ema"],
            "optimizer": opt.state_dict(),
            "version": 2,
            "args": argparse.Namespace(model=ARCH, lr=0.1, epochs=10, amp=False),
            "metric": 0.5,
        },
        root / "train.pth.tar",
    )
    torch.save(weights["plain"], root / "bare.pth")
    torch.save({f"module.{k}": v for k, v in weights["plain"].items()}, root / "ddp.pth")
    from safetensors.torch import save_file

    save_file(weights["plain"], str(root / "bare.safetensors"))
    return {"root": root}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder with NUM_CLASSES classes of odd-sized RGB images (exercises resize and crop)."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in range(NUM_CLASSES):
        (root / f"class_{c}").mkdir()
        for i in range(4):
            arr = rng.integers(0, 256, size=(50 + 7 * i, 61 - 3 * c, 3), dtype=np.uint8)
            arr[..., c] = 255 - arr[..., c] // 3  # some class signal
            Image.fromarray(arr).save(root / f"class_{c}" / f"img{i}.png")
    return root


FORMS = {
    "hf-safetensors": ("hf_st", {}, "plain"),
    "hf-bin": ("hf_bin", {}, "plain"),
    "train-pth-tar": ("train.pth.tar", {}, "plain"),
    "train-pth-tar-ema": ("train.pth.tar", {"ema": True}, "ema"),
    "bare-pth": ("bare.pth", {"arch": ARCH}, "plain"),
    "bare-pth-ddp-prefix": ("ddp.pth", {"arch": ARCH}, "plain"),
    "bare-safetensors": ("bare.safetensors", {"arch": ARCH}, "plain"),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_logits_match_timm(form: str, files: dict, weights: dict) -> None:
    name, flags, which = FORMS[form]
    loaded = load_input(str(files["root"] / name), InputOptions(**flags))
    assert loaded.manifest.arch == ARCH
    assert loaded.manifest.num_classes == NUM_CLASSES
    ref = _timm_reference(weights[which])
    x = torch.randn(5, 3, 72, 72, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (loaded.model(x) - ref(x)).abs().max().item()
    assert diff <= TOL
    assert not loaded.model.training


def test_ema_differs_from_plain(files: dict) -> None:
    """--ema really selects the other weights (otherwise the EMA case above proves nothing)."""
    a = load_input(str(files["root"] / "train.pth.tar")).model.state_dict()
    b = load_input(str(files["root"] / "train.pth.tar"), InputOptions(ema=True)).model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_ema_against_plain_reference(cli, files: dict, weights: dict, images: Path) -> None:
    """--ema applies to CKPT only: the same .pth.tar as --reference is read with its plain weights."""
    ckpt = str(files["root"] / "train.pth.tar")
    r = cli("eval", ckpt, "--ema", "--reference", ckpt, "--data", f"imagefolder:{images}")
    assert r.exit_code == 0, r.stderr
    assert r.record["metrics"]["kl"] > 0
    same = cli("eval", ckpt, "--reference", ckpt, "--data", f"imagefolder:{images}")
    assert same.record["metrics"]["kl"] == 0.0 and same.record["metrics"]["agreement"] == 1.0


def _hand_eval(model: torch.nn.Module, root: Path, cfg: dict) -> tuple[int, float, int]:
    """An evaluation loop written from scratch: PIL, torchvision transforms, cross-entropy."""
    from torchvision import transforms as T

    size = cfg["input_size"][-1]
    interp = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[cfg["interpolation"]]
    scale = int(np.floor(size / cfg["crop_pct"]))
    tf = T.Compose(
        [T.Resize(scale, interpolation=interp), T.CenterCrop(size), T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])]
    )
    classes = sorted(p.name for p in root.iterdir())
    correct, loss, n = 0, 0.0, 0
    with torch.no_grad():
        for label, cls in enumerate(classes):
            for f in sorted((root / cls).iterdir()):
                x = tf(Image.open(f).convert("RGB"))[None]
                logits = model(x)
                correct += int(logits.argmax(1).item() == label)
                loss += torch.nn.functional.cross_entropy(logits, torch.tensor([label])).item()
                n += 1
    return correct, loss / n, n


@pytest.mark.parametrize("form", ["hf-safetensors", "hf-bin", "train-pth-tar", "train-pth-tar-ema", "bare-pth"])
def test_cli_eval_accuracy_matches_hand_loop(cli, form: str, files: dict, weights: dict, images: Path) -> None:
    name, flags, which = FORMS[form]
    args = ["eval", str(files["root"] / name), "--data", f"imagefolder:{images}", "--device", "cpu", "-b", "5"]
    if flags.get("ema"):
        args.append("--ema")
    if flags.get("arch"):
        args += ["--arch", flags["arch"]]
    r = cli(*args)
    assert r.exit_code == 0, r.stderr
    m = r.record["metrics"]
    cfg = timm.models.get_pretrained_cfg(ARCH).to_dict()
    correct, loss, n = _hand_eval(_timm_reference(weights[which]), images, cfg)
    assert m["samples"] == n == 4 * NUM_CLASSES
    assert m["top1"] == correct / n
    assert m["loss"] == pytest.approx(loss, abs=1e-5)


def test_eval_input_size_override_matches_hand_loop(cli, files: dict, weights: dict, images: Path) -> None:
    r = cli("eval", str(files["root"] / "hf_st"), "--data", f"imagefolder:{images}", "--input-size", "48",
            "--mean", "0.4,0.45,0.5", "--std", "0.2,0.25,0.3", "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    cfg = {**timm.models.get_pretrained_cfg(ARCH).to_dict(), "input_size": (3, 48, 48)}
    cfg.update(mean=(0.4, 0.45, 0.5), std=(0.2, 0.25, 0.3))
    correct, loss, n = _hand_eval(_timm_reference(weights["plain"]), images, cfg)
    assert r.record["metrics"]["top1"] == correct / n
    assert r.record["metrics"]["loss"] == pytest.approx(loss, abs=1e-5)


# --- timm:NAME[.TAG] from a local Hugging Face cache --------------------------------------------------------


def _fake_hub_cache(root: Path, repo: str, sd: dict[str, torch.Tensor], num_classes: int) -> Path:
    from safetensors.torch import save_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file(sd, str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps({"architecture": ARCH, "num_classes": num_classes}))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


@pytest.mark.parametrize("spec", ["timm:test_resnet", "timm:test_resnet.r160_in1k"])
@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_timm_cache_offline(spec: str, env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(5)
    src = timm.create_model(ARCH, pretrained=False).eval()  # 1000 classes, as the hub weights have
    hub = tmp_path / "hub" if env == "HF_HUB_CACHE" else tmp_path / "hfhome" / "hub"
    _fake_hub_cache(hub, "timm/test_resnet.r160_in1k", src.state_dict(), 1000)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(env, str(hub if env == "HF_HUB_CACHE" else tmp_path / "hfhome"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_input(spec)
    assert loaded.manifest.arch == ARCH and loaded.manifest.num_classes == 1000
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (loaded.model(x) - src(x)).abs().max().item() <= TOL


def test_timm_cache_missing_is_a_clear_error(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    r = cli("inspect", "timm:test_resnet")
    assert r.exit_code == 1
    assert r.stderr.startswith("Error: timm:test_resnet: pretrained weights are not in the local Hugging Face cache")
    assert "Traceback" not in r.stderr


def test_timm_cache_unknown_tag(cli) -> None:
    r = cli("inspect", "timm:test_resnet.no_such_tag")
    assert r.exit_code == 1
    assert "unknown pretrained tag 'no_such_tag'" in r.stderr.splitlines()[0]


def test_arch_fresh(cli) -> None:
    """arch:NAME builds timm's architecture with fresh weights and the requested head."""
    a = load_input("arch:test_vit", InputOptions(num_classes=7))
    ref = timm.create_model("test_vit", num_classes=7)
    assert a.manifest.arch == "test_vit" and a.model.num_classes == 7
    assert sorted(a.model.state_dict()) == sorted(ref.state_dict())
    assert sum(p.numel() for p in a.model.parameters()) == sum(p.numel() for p in ref.parameters())
    r = cli("inspect", "arch:fc_mlp", "--layers")
    assert r.exit_code == 0, r.stderr
    assert r.record["metrics"]["params"] == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10


def test_stdin_dash_reads_previous_record(cli, files: dict, tmp_path: Path) -> None:
    """'-' takes the checkpoint of the previous record (the last non-empty line on stdin)."""
    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    out = tmp_path / "m.safetensors"
    model = load_input(str(files["root"] / "hf_st")).model
    path, sha = save_checkpoint(out, model, Manifest(ARCH, NUM_CLASSES, {}, default_pretrained_cfg(ARCH)))
    record = {"schema": "prunecli/record-v1", "command": "prune", "checkpoint": path, "sha256": sha}
    direct = cli("inspect", str(out))
    piped = cli("inspect", "-", input="some log line\n" + json.dumps(record) + "\n\n")
    assert piped.exit_code == 0, piped.stderr
    assert piped.record["metrics"] == direct.record["metrics"]
    assert piped.record["input"] == path  # the record names the file the pipe delivered, not "-"


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        ("", "stdin holds no JSON record"),
        ("not json\n", "stdin is not a prunecli JSON record"),
        ('{"command": "eval", "checkpoint": null}\n', "names no checkpoint"),
    ],
)
def test_stdin_dash_errors(cli, stdin: str, message: str) -> None:
    r = cli("inspect", "-", input=stdin)
    assert r.exit_code == 1
    assert r.stderr.startswith("Error: ") and message in r.stderr.splitlines()[0]
