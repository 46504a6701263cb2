"""``prunecli prune`` from the command line: records, pipes, and clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn


def _mlp(seed: int = 0) -> nn.Module:
    import timm

    import prunecli.archs  # noqa: F401

    torch.manual_seed(seed)
    return timm.create_model("fc_mlp").eval()


@pytest.fixture
def mlp_ckpt(tmp_path: Path, save_model) -> Path:
    return save_model(_mlp(), tmp_path / "base.safetensors", "fc_mlp", 10)


def _scores(tmp_path: Path, ckpt: Path, method: str, granularity: str, name: str = "s.scores", seed: int = 0) -> Path:
    from prunecli.checkpoint.loaders import load_checkpoint
    from prunecli.scores import ScoresFile, save_scores

    loaded = load_checkpoint(str(ckpt))
    gen = torch.Generator().manual_seed(seed)
    scores = {
        n: torch.rand(p.shape if granularity == "weight" else p.shape[:1], generator=gen)
        for n, p in loaded.model.named_parameters()
        if n.endswith(".weight")
    }
    save_scores(tmp_path / name, ScoresFile(method, granularity, scores, checkpoint_sha256=loaded.sha256))
    return tmp_path / name


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_prune_pipes_into_eval(cli, mlp_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    r = cli("prune", mlp_ckpt, "--method", "magnitude", "--ratio", "0.5", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert r.record["command"] == "prune" and r.record["checkpoint"] == str(out.resolve())
    m = r.record["metrics"]
    assert m["selected_sparsity"] == 0.5 and m["target_ratio"] == 0.5 and m["scope"] == "layer"
    # the file's sparsity counts every prunable weight, head included: fc1 19,200 + fc2 30,000 half zero, head 1,000
    assert m["sparsity"] == pytest.approx(0.5 * 49200 / 50200, rel=1e-12)
    assert m["excluded"] == ["head.weight"] and m["layers"]["head.weight"] == 0.0
    piped = cli("eval", "-", "--data", "digits", input=r.stdout)
    direct = cli("eval", out, "--data", "digits")
    assert piped.exit_code == 0, piped.stderr
    assert piped.record["metrics"]["samples"] == 360
    assert piped.record["metrics"]["loss"] == direct.record["metrics"]["loss"]


def test_scores_file_default_global_scope(cli, mlp_ckpt: Path, tmp_path: Path) -> None:
    scores = _scores(tmp_path, mlp_ckpt, "taylor", "weight")
    r = cli("prune", mlp_ckpt, "--scores", scores, "--ratio", "0.3", "-o", tmp_path / "p.safetensors")
    assert r.exit_code == 0, r.stderr
    assert r.record["metrics"]["scope"] == "global"
    from prunecli.scores import load_scores

    sf = load_scores(scores)
    names = ["fc1.weight", "fc2.weight"]
    flat = torch.cat([sf.scores[n].flatten() for n in names])
    drop = torch.zeros(flat.numel(), dtype=torch.bool)
    drop[torch.topk(flat, round(0.3 * flat.numel()), largest=False).indices] = True
    ours = _weights(tmp_path / "p.safetensors")
    assert torch.equal(torch.cat([(ours[n] == 0).flatten() for n in names]), drop)


def test_exclude_that_matches_nothing_warns(cli, mlp_ckpt: Path, tmp_path: Path) -> None:
    r = cli(
        "prune",
        mlp_ckpt,
        "--method",
        "l1",
        "--ratio",
        "0.2",
        "--exclude",
        "nothing*",
        "-x",
        "fc1",
        "-o",
        tmp_path / "p.safetensors",
    )
    assert r.exit_code == 0, r.stderr
    assert "Warning: --exclude 'nothing*' matches no prunable layer" in r.stderr
    assert r.record["metrics"]["layers"]["fc1.weight"] == 0.0
    assert r.record["metrics"]["layers"]["fc2.weight"] == 0.2


def test_include_head_and_layer_ratio(cli, mlp_ckpt: Path, tmp_path: Path) -> None:
    r = cli(
        "prune",
        mlp_ckpt,
        "--method",
        "magnitude",
        "--ratio",
        "0.5",
        "--include-head",
        "--layer-ratio",
        "fc*=0.1",
        "--layer-ratio",
        "fc2=0.25",
        "-o",
        tmp_path / "p.safetensors",
    )
    assert r.exit_code == 0, r.stderr
    layers = r.record["metrics"]["layers"]
    assert layers == {"fc1.weight": 0.1, "fc2.weight": 0.25, "head.weight": 0.5}  # the last matching pattern wins


def test_nm_from_the_cli(cli, mlp_ckpt: Path, tmp_path: Path) -> None:
    r = cli("prune", mlp_ckpt, "--method", "magnitude", "--structure", "2:4", "-o", tmp_path / "p.safetensors")
    assert r.exit_code == 0, r.stderr
    w = _weights(tmp_path / "p.safetensors")["fc1.weight"]
    assert ((w.view(300, 16, 4) != 0).sum(-1) == 2).all()
    assert r.record["metrics"]["structure"] == "2:4" and r.record["metrics"]["selected_sparsity"] == 0.5


# (arguments, message, exit code): invalid values and conflicting options are usage errors (2), found by
# the request before anything is loaded; what only the inputs can tell is bad input (1).
BAD = {
    "ratio_one": (["--method", "magnitude", "--ratio", "1.0"], "outside [0, 1)", 2),
    "ratio_negative": (["--method", "magnitude", "--ratio", "-0.2"], "outside [0, 1)", 2),
    "layer_ratio_outside": (["--method", "magnitude", "--ratio", "0.2", "--layer-ratio", "fc1=1.2"], "outside", 2),
    "layer_ratio_syntax": (["--method", "magnitude", "--ratio", "0.2", "--layer-ratio", "fc1"], "GLOB=R", 2),
    "empties_layer": (["--method", "magnitude", "--ratio", "0.2", "--layer-ratio", "fc2=0.99999"], "every weight", 1),
    "no_ratio": (["--method", "magnitude"], "--ratio is required", 2),
    "no_scores": (["--ratio", "0.5"], "exactly one of --scores", 2),
    "nm_ratio": (["--method", "magnitude", "--structure", "2:4", "--ratio", "0.3"], "contradicts", 2),
    "nm_bad": (["--method", "magnitude", "--structure", "4:2"], "1 <= N < M", 2),
    "structure": (["--method", "magnitude", "--ratio", "0.5", "--structure", "blocks"], "unknown structure", 2),
    "scope": (["--method", "magnitude", "--ratio", "0.5", "--scope", "model"], "choose from layer, global", 2),
    "compensate_no_shifts": (["--method", "magnitude", "--ratio", "0.5", "--compensate", "bias"], "bias shifts", 1),
    "compensate_kind": (["--method", "magnitude", "--ratio", "0.5", "--compensate", "mean"], "unknown compensation", 2),
    "missing_scores": (["--scores", "nope.scores", "--ratio", "0.5"], "does not exist", 1),
    "unknown_method": (["--method", "nope", "--ratio", "0.5"], "unknown method 'nope'", 1),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_without_output(cli, mlp_ckpt: Path, tmp_path: Path, case: str) -> None:
    args, message, code = BAD[case]
    out = tmp_path / "p.safetensors"
    r = cli("prune", mlp_ckpt, *args, "-o", out)
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    assert r.stderr.startswith("Error:") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors"]


def test_scores_of_another_checkpoint(cli, mlp_ckpt: Path, tmp_path: Path, save_model) -> None:
    other = save_model(_mlp(seed=1), tmp_path / "other.safetensors", "fc_mlp", 10)
    scores = _scores(tmp_path, other, "taylor", "weight")
    r = cli("prune", mlp_ckpt, "--scores", scores, "--ratio", "0.5", "-o", tmp_path / "p.safetensors")
    assert r.exit_code == 1 and "another checkpoint" in r.stderr
    assert not (tmp_path / "p.safetensors").exists()


def test_channel_scores_for_unstructured(cli, mlp_ckpt: Path, tmp_path: Path) -> None:
    scores = _scores(tmp_path, mlp_ckpt, "fpgm", "channel")
    for structure in ("unstructured", "2:4"):
        r = cli(
            "prune",
            mlp_ckpt,
            "--scores",
            scores,
            "--ratio",
            "0.5",
            "--structure",
            structure,
            "-o",
            tmp_path / "p.safetensors",
        )
        assert r.exit_code == 1 and "per-weight scores" in r.stderr, r.stderr


def test_global_selection_emptying_a_layer(cli, tmp_path: Path, save_model) -> None:
    model = _mlp()
    with torch.no_grad():
        model.fc2.weight.mul_(1e-6)  # fc2 (30,000 of 49,200 weights) is far below fc1
    src = save_model(model, tmp_path / "base.safetensors", "fc_mlp", 10)
    r = cli(
        "prune", src, "--method", "magnitude", "--ratio", "0.7", "--scope", "global", "-o", tmp_path / "p.safetensors"
    )
    assert r.exit_code == 1 and "every weight of 'fc2.weight'" in r.stderr


def test_output_rules(cli, mlp_ckpt: Path, tmp_path: Path) -> None:
    r = cli("prune", mlp_ckpt, "--method", "magnitude", "--ratio", "0.5", "-o", mlp_ckpt, "--force")
    assert r.exit_code == 1 and "is the input" in r.stderr
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    r = cli("prune", mlp_ckpt, "--method", "magnitude", "--ratio", "0.5", "-o", tmp_path / "exists.safetensors")
    assert r.exit_code == 1 and "--force" in r.stderr
    assert (tmp_path / "exists.safetensors").read_bytes() == b"x"


def test_help_lists_examples(cli) -> None:
    r = cli("prune", "--help")
    assert r.exit_code == 0
    assert "--structure" in r.stdout and "prunecli prune base.safetensors" in r.stdout


def test_channel_restore_in_one_step_equals_two_steps(cli, tmp_path: Path, save_model) -> None:
    """``prune --structure channel --restore lbyl`` == ``prune --structure channel`` then ``restore --method lbyl``."""
    import timm

    import prunecli.archs  # noqa: F401  (registers improved_cnn with timm; the test must not depend on another's)

    torch.manual_seed(0)
    src = save_model(timm.create_model("improved_cnn"), tmp_path / "base.safetensors", "improved_cnn", 10)
    args = ("--method", "magnitude", "--ratio", "0.3", "--structure", "channel")
    one = cli("prune", src, *args, "--restore", "lbyl", "-o", tmp_path / "one.safetensors")
    assert one.exit_code == 0, one.stderr
    assert one.record["metrics"]["restore"]["method"] == "lbyl"
    assert one.record["metrics"]["params"] < one.record["metrics"]["params_before"]
    two_a = cli("prune", src, *args, "-o", tmp_path / "two_a.safetensors")
    assert two_a.exit_code == 0, two_a.stderr
    two = cli("restore", tmp_path / "two_a.safetensors", "--method", "lbyl", "-o", tmp_path / "two.safetensors")
    assert two.exit_code == 0, two.stderr
    a, b = _weights(tmp_path / "one.safetensors"), _weights(tmp_path / "two.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    piped = cli("eval", "-", "--data", "digits", input=one.stdout)
    assert piped.exit_code == 0 and piped.record["metrics"]["samples"] == 360
