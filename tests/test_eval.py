"""``prunecli eval``: top1/top5/loss against a hand-written loop, --reference agreement and KL against an
independent float64 computation, --benchmark keys, --metrics, digits splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from prunecli.checkpoint.manifest import Manifest
from prunecli.checkpoint.writer import save_checkpoint
from prunecli.models import default_pretrained_cfg

ARCH, K, SIZE = "test_resnet", 6, 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(1)
    for c in range(K):
        (root / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, size=(30 + 5 * i, 44, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / "imgs" / f"c{c}" / f"{i}.png")
    models = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        m = timm.create_model(ARCH, num_classes=K).eval()
        cfg = {**default_pretrained_cfg(ARCH), "input_size": (3, SIZE, SIZE)}
        save_checkpoint(root / f"{name}.safetensors", m, Manifest(ARCH, K, {}, cfg))
        models[name] = m
    return {"root": root, "imgs": root / "imgs", "models": models}


def _logits(model: torch.nn.Module, imgs: Path) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float64) and labels over the folder, with transforms written out by hand."""
    from torchvision import transforms as T

    cfg = default_pretrained_cfg(ARCH)
    tf = T.Compose([
        T.Resize(int(SIZE / cfg["crop_pct"]), interpolation=T.InterpolationMode.BILINEAR),
        T.CenterCrop(SIZE),
        T.ToTensor(),
        T.Normalize(cfg["mean"], cfg["std"]),
    ])  # fmt: skip
    xs, ys = [], []
    for label, cls in enumerate(sorted(p.name for p in imgs.iterdir())):
        for f in sorted((imgs / cls).iterdir()):
            xs.append(tf(Image.open(f).convert("RGB")))
            ys.append(label)
    with torch.no_grad():
        out = model(torch.stack(xs)).double().numpy()
    return out, np.array(ys)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def test_metrics_match_hand_computation(cli, setup: dict) -> None:
    r = cli("eval", str(setup["root"] / "a.safetensors"), "--data", f"imagefolder:{setup['imgs']}", "-b", "4")
    assert r.exit_code == 0, r.stderr
    m = r.record["metrics"]
    z, y = _logits(setup["models"]["a"], setup["imgs"])
    top5 = np.argsort(-z, 1)[:, :5]
    assert m["samples"] == len(y) == 3 * K
    assert m["top1"] == np.mean(z.argmax(1) == y)
    assert m["top5"] == np.mean((top5 == y[:, None]).any(1))
    assert m["loss"] == pytest.approx(-np.mean(_log_softmax(z)[np.arange(len(y)), y]), abs=1e-5)
    assert r.record["schema"] == "prunecli/record-v1" and r.record["device"] == "cpu"
    assert r.record["input"] == str(setup["root"] / "a.safetensors")


def test_reference_against_itself(cli, setup: dict) -> None:
    ckpt = str(setup["root"] / "a.safetensors")
    r = cli("eval", ckpt, "--data", f"imagefolder:{setup['imgs']}", "--reference", ckpt)
    assert r.exit_code == 0, r.stderr
    assert r.record["metrics"]["agreement"] == 1.0
    assert r.record["metrics"]["kl"] == 0.0


def test_reference_against_another_model(cli, setup: dict) -> None:
    r = cli("eval", str(setup["root"] / "a.safetensors"), "--data", f"imagefolder:{setup['imgs']}",
            "--reference", str(setup["root"] / "b.safetensors"), "-b", "5")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    za, _ = _logits(setup["models"]["a"], setup["imgs"])
    zb, _ = _logits(setup["models"]["b"], setup["imgs"])
    lp, lq = _log_softmax(zb), _log_softmax(za)  # KL(p_reference ‖ p_model)
    kl = np.mean((np.exp(lp) * (lp - lq)).sum(1))
    assert kl > 1e-4  # the two models really differ
    assert r.record["metrics"]["kl"] == pytest.approx(kl, rel=1e-4)
    assert r.record["metrics"]["agreement"] == np.mean(za.argmax(1) == zb.argmax(1))


def test_benchmark_keys(cli, setup: dict) -> None:
    r = cli("eval", str(setup["root"] / "a.safetensors"), "--data", "synthetic:4", "--benchmark", "-b", "2")
    assert r.exit_code == 0, r.stderr
    m = r.record["metrics"]
    assert m["latency_ms"] > 0 and m["throughput_ips"] == pytest.approx(2 / (m["latency_ms"] / 1e3))
    assert m["benchmark_batch_size"] == 2 and m["benchmark_iters"] >= 1
    assert m["samples"] == 4


def test_metrics_file_appends_the_record(cli, setup: dict, tmp_path: Path) -> None:
    ckpt = str(setup["root"] / "a.safetensors")
    out = tmp_path / "runs.jsonl"
    r1 = cli("eval", ckpt, "--data", "synthetic:3", "--metrics", str(out))
    r2 = cli("eval", ckpt, "--data", "synthetic:5", "--metrics", str(out), "--quiet")
    lines = out.read_text().splitlines()
    assert [json.loads(ln) for ln in lines] == [r1.record, r2.record]
    assert r2.stderr == ""  # --quiet silences the human summary
    assert r1.stdout.strip() == lines[0]


def test_synthetic_eval_is_deterministic(cli, setup: dict) -> None:
    ckpt = str(setup["root"] / "b.safetensors")
    a = cli("eval", ckpt, "--data", "synthetic:6").record["metrics"]
    b = cli("eval", ckpt, "--data", "synthetic:6", "-b", "4").record["metrics"]
    assert a["top1"] == b["top1"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_eval_from_stdin_record(cli, setup: dict) -> None:
    ckpt = str(setup["root"] / "a.safetensors")
    rec = json.dumps({"command": "prune", "checkpoint": ckpt})
    a = cli("eval", "-", "--data", "synthetic:4", input=rec + "\n")
    b = cli("eval", ckpt, "--data", "synthetic:4")
    assert a.exit_code == 0, a.stderr
    assert a.record["metrics"] == b.record["metrics"] and a.record["input"] == b.record["input"] == ckpt


def test_library_api(setup: dict) -> None:
    """prunecli.api.evaluate is the CLI's engine and returns a Result."""
    from prunecli import api

    req = api.EvalRequest(
        checkpoint=str(setup["root"] / "a.safetensors"), data="synthetic:4", runtime=api.Runtime(device="cpu")
    )
    res = api.evaluate(req)
    assert res.checkpoint is None and res.device == "cpu" and res.metrics["samples"] == 4
