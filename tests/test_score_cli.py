"""``prunecli score`` end to end: scores files, metadata, --compare, and clear errors for bad input."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import timm
import torch
from scipy.stats import spearmanr

import prunecli.archs  # noqa: F401


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    torch.manual_seed(0)
    model = timm.create_model("improved_cnn", num_classes=10, widths=(4, 8, 8), hidden=16)
    path = tmp_path_factory.mktemp("score") / "base.safetensors"
    args = {"widths": [4, 8, 8], "hidden": 16}
    save_checkpoint(path, model, Manifest("improved_cnn", 10, args, default_pretrained_cfg("improved_cnn")), force=True)
    return path


def test_taylor_scores_file_and_record(cli, ckpt: Path, tmp_path: Path) -> None:
    from prunecli.scores import load_scores

    out = tmp_path / "t.scores"
    r = cli("score", ckpt, "--method", "taylor", "--data", "digits:train", "--batches", "2", "-b", "16",
            "-p", "agg=sq_mean", "-o", out, "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    rec = r.record
    assert rec["scores"] == str(out.resolve()) and rec["checkpoint"] is None
    m = rec["metrics"]
    assert m["method"] == "taylor" and m["granularity"] == "weight" and m["samples"] == 32
    assert m["options"]["agg"] == "sq_mean" and m["options"]["batches"] == 2
    sf = load_scores(out)
    assert sf.checkpoint_sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert sf.data == "digits:train" and sf.samples == 32
    names = ["features.0.conv.weight", "features.1.conv.weight", "features.2.conv.weight", "fc1.weight", "fc2.weight"]
    assert sorted(sf.scores) == sorted(names) == sorted(m["layers"])
    fc1 = sf.scores["fc1.weight"].double()
    st = m["layers"]["fc1.weight"]
    assert st["count"] == fc1.numel() == 16 * 128
    assert st["max"] == pytest.approx(float(fc1.max()), rel=1e-6) and st["mean"] == pytest.approx(float(fc1.mean()))


def test_biascomp_stores_bias_shifts_and_fraction_is_balanced(cli, ckpt: Path, tmp_path: Path) -> None:
    from prunecli.scores import load_scores

    out = tmp_path / "b.scores"
    r = cli("score", ckpt, "-m", "biascomp", "--data", "digits:train", "--fraction", "0.05", "-o", out, "-q")
    assert r.exit_code == 0, r.stderr
    sf = load_scores(out)
    from collections import Counter

    from prunecli.data import _digits

    counts = Counter(_digits()["train"][1])  # round(0.05 · n_c) images of each digit class
    assert sf.samples == sum(max(1, round(0.05 * n)) for n in counts.values())
    assert set(sf.extras["bias_shift"]) == set(sf.scores)
    assert all(sf.extras["bias_shift"][n].shape == sf.scores[n].shape for n in sf.scores)
    assert sf.stats["features.0.conv.weight"]["compensate"] == "bias"


def test_data_free_and_compare_matches_scipy(cli, ckpt: Path, tmp_path: Path) -> None:
    from prunecli.scores import load_scores

    a, b = tmp_path / "l1.scores", tmp_path / "rand.scores"
    assert cli("score", ckpt, "-m", "l1", "-o", a, "-q").exit_code == 0
    assert cli("score", ckpt, "-m", "random", "--seed", "1", "-o", b, "-q").exit_code == 0
    assert load_scores(a).data is None and load_scores(a).samples == 0
    r = cli("score", "--compare", a, b)
    assert r.exit_code == 0, r.stderr
    pair = r.record["metrics"]["pairs"][0]
    sa, sb = load_scores(a).scores, load_scores(b).scores
    for name, rho in pair["layers"].items():
        assert rho == pytest.approx(spearmanr(sa[name].flatten(), sb[name].flatten()).statistic, abs=1e-9)
    va = torch.cat([sa[n].flatten() for n in sa])
    vb = torch.cat([sb[n].flatten() for n in sa])
    assert pair["overall"] == pytest.approx(spearmanr(va, vb).statistic, abs=1e-9)
    assert cli("score", "--compare", a, a).record["metrics"]["pairs"][0]["overall"] == pytest.approx(1.0)
    c = tmp_path / "fpgm.scores"
    assert cli("score", ckpt, "-m", "fpgm", "-o", c, "-q").exit_code == 0
    r = cli("score", "--compare", a, c)
    assert r.exit_code == 1 and "Error: cannot compare weight scores" in r.stderr


@pytest.mark.parametrize(
    "args,message,code",
    [
        (["-m", "taylor"], "needs calibration data", 1),
        (["-m", "nope"], "unknown method 'nope'", 1),
        (["-m", "taylor", "--data", "digits", "-p", "foo=1"], "unknown -p key 'foo'", 1),
        (["-m", "proscore", "--data", "digits", "-p", "lambda=abc"], "expects a number", 1),
        (["-m", "biascomp", "--data", "digits", "-p", "probes=1.5"], "expects an integer", 1),
        (["-m", "taylor", "--data", "digits", "-p", "agg"], "is not key=value", 1),
        # invalid option values and conflicts are usage errors (exit 2), found before torch is imported
        (["-m", "taylor", "--data", "digits", "--fraction", "0"], "--fraction: 0.0 is outside (0, 1]", 2),
        (["-m", "taylor", "--data", "digits", "--fraction", "1.5"], "--fraction: 1.5 is outside (0, 1]", 2),
        (["-m", "taylor", "--data", "digits", "--batches", "0"], "--batches: 0 is below 1", 2),
        (["-m", "taylor", "--data", "digits", "--batches", "2", "--fraction", "0.5"], "exclusive", 1),
        (["-m", "taylor", "--data", "digits", "--score-mode", "bogus"], "--score-mode", 2),
        (["-m", "l1"], "needs an output file", 2),
    ],
)
def test_bad_input_exits_with_one_error_line(
    cli, ckpt: Path, tmp_path: Path, args: list[str], message: str, code: int
) -> None:
    out = [] if "needs an output file" in message else ["-o", tmp_path / "x.scores"]
    r = cli("score", ckpt, *args, *out)
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    assert r.stderr.startswith("Error: ") and message in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2 and r.stdout == ""
    assert not (tmp_path / "x.scores").exists()


def test_existing_output_needs_force(cli, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.scores"
    out.write_text("keep")
    r = cli("score", ckpt, "-m", "l2", "-o", out)
    assert r.exit_code == 1 and "exists" in r.stderr and out.read_text() == "keep"
    assert cli("score", ckpt, "-m", "l2", "-o", out, "--force", "-q").exit_code == 0


def test_help_and_list_name_every_criterion(cli) -> None:
    from prunecli.criteria import CRITERIA

    r = cli("score", "--help")
    text = re.sub(r"\s+", " ", r.stdout)
    listed = cli("score", "--list-methods").record["metrics"]["methods"]
    assert sorted(m["name"] for m in listed) == CRITERIA.names()
    for name in CRITERIA.names(with_aliases=True):
        assert re.search(rf"\b{name}\b", text), name
