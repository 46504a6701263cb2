"""Typed requests (:mod:`prunecli.requests`): each option declared once, one JSON form, one ``-p`` parser.

- every command's record ``options`` equal the lineage entry's ``options`` of the checkpoint it wrote;
- every command with ``-p`` refuses an unknown and a repeated key alike: exit 1, one line, the valid keys
  in the hint;
- usage errors (bad values, conflicting options) and missing inputs are found before torch is imported;
- the generated Typer commands expose exactly the request fields (nothing restated by hand).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from prunecli import requests as R

REQUESTS = {
    "eval": R.EvalRequest,
    "inspect": R.InspectRequest,
    "report": R.ReportRequest,
    "score": R.ScoreRequest,
    "prune": R.PruneRequest,
    "restore": R.RestoreRequest,
    "finetune": R.FinetuneRequest,
    "finetune-lora": R.FinetuneLoraRequest,
}


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_each_option_once_and_the_cli_shows_exactly_the_request(cli, name: str) -> None:
    import typer

    from prunecli.cli.main import app

    leaves = [(path, spec) for path, _f, spec, _d in R.leaves(REQUESTS[name]) if spec.flags or spec.argument]
    names = [path[-1] for path, _ in leaves]
    assert len(names) == len(set(names)), f"{name}: two pieces declare the same option"
    flags = [f for _, spec in leaves for flag in spec.flags for f in flag.split("/")]
    assert len(flags) == len(set(flags)), f"{name}: a flag is declared twice"
    command = typer.main.get_command(app).commands[name]
    declared = {p.name for p in command.params if p.name != "help"}
    assert declared == set(names)
    cli_flags = {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")} - {
        "-h",
        "--help",
    }
    assert cli_flags == set(flags)


def test_to_json_is_plain_json_and_skips_runtime_only_fields() -> None:
    req = R.PruneRequest(checkpoint="a", output="b", method="magnitude", ratio=0.5,
                         layer_ratios=(("fc*", 0.25),), params=R.KeyValues([("norm", "2")]))  # fmt: skip
    data = req.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["layer_ratios"] == [["fc*", 0.25]] and data["params"] == {"norm": "2"}
    for private in ("checkpoint", "output", "force", "quiet", "metrics", "device", "workers", "dry_run"):
        assert private not in data
    assert data["batch_size"] == 128 and data["seed"] == 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"ratio": 1.0}, "outside [0, 1)"),
        ({"ratio": 0.5, "structure": "4:2"}, "1 <= N < M"),
        ({"ratio": 0.5, "scope": "model"}, "unknown value 'model'"),
        ({}, "--ratio is required"),
        ({"ratio": 0.5, "runtime": lambda: R.Runtime(batch_size=0)}, "--batch-size"),
        ({"ratio": 0.5, "runtime": lambda: R.Runtime(device="gpu")}, "--device"),
    ],
)
def test_library_callers_get_the_same_validation(kwargs: dict, message: str) -> None:
    import re

    with pytest.raises(R.RequestError, match=re.escape(message)):
        built = {k: v() if callable(v) else v for k, v in kwargs.items()}  # pieces validate when built, too
        R.PruneRequest(checkpoint="a", output="b", method="magnitude", **built)


def test_key_values_parse_and_check() -> None:
    kv = R.KeyValues.parse(["a=1", "b = x=y", "a=2"])
    assert dict(kv) == {"a": "2", "b": "x=y"} and kv.pairs[0] == ("a", "1")
    with pytest.raises(R.InputError, match="given twice") as info:
        kv.check(["a", "b", "c"], "m")
    assert info.value.hint == "give each key once; valid keys: a, b, c"
    with pytest.raises(R.InputError, match="unknown -p key 'z'"):
        R.KeyValues.parse(["z=1"]).check(["a"], "m")
    with pytest.raises(R.InputError, match="is not key=value"):
        R.KeyValues.parse(["=1"])
    assert R.KeyValues.of({"a": 1}) == {"a": "1"} and R.KeyValues.of(None) == {}


# ----------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny CNN checkpoint and its channel-pruned child (restore needs one)."""
    import timm
    import torch

    import prunecli.archs  # noqa: F401
    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    root = tmp_path_factory.mktemp("requests")
    torch.manual_seed(0)
    args = {"widths": [8, 16, 16], "hidden": 32}
    model = timm.create_model("improved_cnn", num_classes=10, **args).eval()
    manifest = Manifest("improved_cnn", 10, args, default_pretrained_cfg("improved_cnn"))
    base = Path(save_checkpoint(root / "base.safetensors", model, manifest)[0])
    return {"root": root, "base": base}


def _lineage_options(path: Path) -> dict:
    from prunecli.checkpoint.header import read_header
    from prunecli.checkpoint.manifest import METADATA_KEY, Manifest

    return Manifest.from_json(read_header(path).metadata[METADATA_KEY]).lineage[-1]["options"]


def test_record_options_equal_lineage_options_for_every_writer(cli, chain: dict[str, Path]) -> None:
    root, base = chain["root"], chain["base"]
    channel = root / "c.safetensors"
    runs = {
        "prune": ("prune", base, "-m", "l1", "-r", "0.3", "-p", "norm=1", "-x", "fc1",
                  "--layer-ratio", "features*=0.2"),
        "prune-channel": ("prune", base, "-m", "l2", "-r", "0.3", "--structure", "channel"),
        "restore": ("restore", channel, "-m", "lbyl", "-p", "lambda2=0.01"),
        "finetune": ("finetune", base, "--data", "digits:train", "--val", "digits:test", "--epochs", "1",
                     "--max-steps", "1", "-b", "16"),
        "finetune-lora": ("finetune-lora", base, "--data", "digits:train", "--epochs", "1", "--max-steps", "1",
                          "-b", "16", "--rank", "2"),
    }  # fmt: skip
    for tag, (command, *args) in runs.items():
        out = channel if tag == "prune-channel" else root / f"{tag}.safetensors"
        r = cli(command, *args, "-o", out, "-q")
        assert r.exit_code == 0, (tag, r.stderr)
        assert r.record["options"] == _lineage_options(out), tag
        assert r.record["options"], tag
    scores = root / "s.scores"
    r = cli("score", base, "-m", "taylor", "--data", "digits:train", "--batches", "1", "-b", "8", "-o", scores, "-q")
    assert r.exit_code == 0, r.stderr
    assert r.record["options"]["method"] == "taylor" and r.record["options"]["batches"] == 1


PARAM_COMMANDS = {
    "score": ("score", "{base}", "-m", "taylor", "--data", "digits", "-o", "{root}/x.scores"),
    "prune": ("prune", "{base}", "-m", "magnitude", "-r", "0.5", "-o", "{root}/x.safetensors"),
    "prune-channel": ("prune", "{base}", "-m", "l2", "-r", "0.5", "--structure", "channel",
                      "-o", "{root}/x.safetensors"),
    "restore": ("restore", "{base}", "-m", "lbyl", "-o", "{root}/x.safetensors"),
}  # fmt: skip
VALID_KEYS = {"score": "agg, granularity", "prune": "granularity, norm", "prune-channel": "granularity, norm",
              "restore": "lambda1, lambda2, mode"}  # fmt: skip


@pytest.mark.parametrize("case", sorted(PARAM_COMMANDS))
@pytest.mark.parametrize("bad", ["unknown", "repeated"])
def test_every_p_option_refuses_unknown_and_repeated_keys_alike(cli, chain: dict, case: str, bad: str) -> None:
    args = [a.format(base=chain["base"], root=chain["root"]) for a in PARAM_COMMANDS[case]]
    key = VALID_KEYS[case].split(", ")[-1]
    extra = ["-p", "nope=1"] if bad == "unknown" else ["-p", f"{key}=1", "-p", f"{key}=2"]
    r = cli(*args, *extra)
    assert r.exit_code == 1, (r.exit_code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert r.stdout == "" and len(lines) == 2 and lines[0].startswith("Error: "), r.stderr
    assert ("unknown -p key 'nope'" if bad == "unknown" else f"-p {key} is given twice") in lines[0]
    assert lines[1].startswith("Hint: ") and f"valid keys: {VALID_KEYS[case]}" in lines[1]
    assert not any(p.name.startswith("x.") for p in chain["root"].iterdir())


NO_TORCH = r"""
import json, sys
from typer.testing import CliRunner
from prunecli.cli.main import app
runner = CliRunner()
out = {}
for args in json.loads(sys.argv[1]):
    r = runner.invoke(app, args)
    out[" ".join(args)] = [r.exit_code, r.stderr.strip()]
out["heavy"] = sorted(m for m in ("torch", "timm", "torchvision", "numpy") if m in sys.modules)
print(json.dumps(out))
"""


def test_usage_errors_and_missing_files_are_reported_before_torch_is_imported(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.safetensors")
    cases = [
        ["prune", missing, "-m", "magnitude", "-r", "1.5", "-o", str(tmp_path / "o.safetensors")],
        ["prune", missing, "-m", "magnitude", "-r", "0.5", "-o", str(tmp_path / "o.safetensors")],
        ["eval", missing, "--data", "digits"],
        ["finetune", missing, "--epochs", "0", "-o", str(tmp_path / "o.safetensors")],
        ["score", missing, "-m", "l1", "--fraction", "2", "-o", str(tmp_path / "o.scores")],
        ["restore", missing, "-b", "0", "-o", str(tmp_path / "o.safetensors")],
    ]
    p = subprocess.run([sys.executable, "-c", NO_TORCH, json.dumps(cases)], capture_output=True, text=True, check=True)
    result = json.loads(p.stdout)
    assert result.pop("heavy") == []
    codes = [result[" ".join(c)] for c in cases]
    assert [c[0] for c in codes] == [2, 1, 1, 2, 2, 2]
    assert "--ratio: ratio 1.5 is outside [0, 1)" in codes[0][1]
    assert all(len(msg.splitlines()) <= 2 and msg.startswith("Error: ") for _, msg in codes)
    assert "no such file or directory" in codes[1][1] and "no such file or directory" in codes[2][1]


def test_request_fields_have_help_and_known_types() -> None:
    for request in REQUESTS.values():
        for path, _f, spec, default in R.leaves(request):
            if not spec.flags and not spec.argument:
                continue
            assert spec.help.strip(), path
            assert spec.cli_type in (str, int, float, bool), path
            if default is not dataclasses.MISSING and spec.check is not None and not spec.multiple:
                assert spec.check(default) is None, (path, default)  # every default is a valid value


def test_readme_python_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's "From Python" block, extracted (not copied), runs in a fresh folder and prints what it says."""
    import contextlib
    import io
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## From Python", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    first, second = out.getvalue().splitlines()
    assert first == "0.5 0.5"
    assert 0.0 <= float(second) <= 1.0
    assert (tmp_path / "mlp.safetensors").is_file() and (tmp_path / "mlp-p50.safetensors").is_file()


def test_eval_needs_data_or_takes_the_lineages_val(cli, chain: dict[str, Path]) -> None:
    """``eval`` never silently evaluates on data the user did not name: --data, or the --val of the last
    training step in the checkpoint's lineage (said on stderr), else a one-line error."""
    r = cli("eval", chain["base"])
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "Error: eval needs --data",
        "Hint: e.g. --data imagefolder:val/ (no training step in the checkpoint's lineage names its --val data)",
    ]
    trained = chain["root"] / "val.safetensors"
    r = cli("finetune", chain["base"], "--data", "digits:train", "--val", "digits:test", "--epochs", "1",
            "--max-steps", "1", "-b", "16", "-o", trained, "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    r = cli("eval", trained)
    assert r.exit_code == 0, r.stderr
    assert r.record["metrics"]["data"] == "digits:test" and r.record["metrics"]["samples"] == 360
    assert "no --data given: evaluating on digits:test" in r.stderr


def test_channel_record_says_which_ratio_is_which(cli, chain: dict[str, Path]) -> None:
    """Channel pruning's record: the requested fraction of channels, and the fraction of parameters it removed
    (computed here from the record's own before/after counts and from the written file)."""
    from safetensors import safe_open

    out = chain["root"] / "ch.safetensors"
    r = cli("prune", chain["base"], "-m", "l2", "-r", "0.3", "--structure", "channel", "-o", out, "-q")
    assert r.exit_code == 0, r.stderr
    m = r.record["metrics"]
    assert m["channel_ratio"] == m["target_ratio"] == 0.3
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    with safe_open(str(out), "pt") as f:
        names = list(f.keys())
        params = sum(f.get_tensor(k).numel() for k in names if not k.endswith(buffers))
    assert m["params"] == params
    assert m["params_removed"] == pytest.approx(1 - params / m["params_before"], rel=1e-12)
    assert m["params_removed"] > m["channel_ratio"]  # a removed channel takes its weights in the next layer too
    assert m["sparsity"] == 0.0  # the narrower model is dense


def test_elapsed_s_does_not_count_the_wait_for_the_previous_step(tmp_path: Path) -> None:
    """A piped step reads its stdin record before its clock starts: a slow upstream step is not its time."""
    import os
    import time

    record = json.dumps({"schema": "prunecli/record-v1", "command": "finetune", "checkpoint": "arch:fc_mlp"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNECLI_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "prunecli", "eval", "-", "--data", "synthetic:4", "--device", "cpu", "-q"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    time.sleep(3.0)  # the upstream step is still running
    start = time.monotonic()
    out, err = proc.communicate(record + "\n", timeout=300)
    after_input = time.monotonic() - start
    assert proc.returncode == 0, err
    elapsed = json.loads(out.strip().splitlines()[-1])["elapsed_s"]
    assert elapsed <= after_input  # measured inside the time after the record arrived, never the 3 s before it
