"""prunecli report: joins eval records to the steps that made their checkpoints; bad files are clear."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from prunecli.record import SCHEMA


def _rec(command: str, inp: str | None, ckpt: str | None, options: dict, metrics: dict) -> str:
    return json.dumps(
        {
            "schema": SCHEMA,
            "command": command,
            "input": inp,
            "checkpoint": ckpt,
            "options": options,
            "metrics": metrics,
            "sha256": None,
            "device": "cpu",
            "elapsed_s": 0.1,
            "version": "0",
        }
    )


def _grid(tmp: Path) -> Path:
    lines = []
    truth = {}
    for method, base_acc in (("magnitude", 0.9), ("taylor", 0.95)):
        for ratio in (0.3, 0.5):
            p = str(tmp / f"{method}-{ratio}.safetensors")
            lines.append(
                _rec(
                    "prune",
                    "base.safetensors",
                    p,
                    {"method": method, "ratio": ratio},
                    {"target_ratio": ratio, "sparsity": ratio + 0.001, "params": 100, "macs": 1000},
                )
            )
            acc = round(base_acc - ratio / 2, 4)
            lines.append(_rec("eval", p, None, {"data": "digits:test"}, {"top1": acc, "top5": 1.0, "loss": 0.5}))
            truth[(method, ratio, False)] = acc
            lp = str(tmp / f"{method}-{ratio}-lora.safetensors")
            lines.append(_rec("finetune-lora", p, lp, {}, {"sparsity_after": ratio + 0.001}))
            lines.append(
                _rec("eval", lp, None, {"data": "digits:test"}, {"top1": acc + 0.01, "top5": 1.0, "loss": 0.4})
            )
            truth[(method, ratio, True)] = round(acc + 0.01, 4)
    f = tmp / "results.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f, truth


def test_report_joins_chain_and_renders_formats(cli, tmp_path):
    f, truth = _grid(tmp_path)
    r = cli("report", f, "--format", "csv")
    assert r.exit_code == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 8
    for row in rows:
        method = row["series"].split()[0]
        lora = "LoRA" in row["series"]
        assert abs(float(row["top1"]) - truth[(method, float(row["target_ratio"]), lora)]) < 1e-9
    md = cli("report", f)
    assert md.exit_code == 0
    assert "| top-1 \\ ratio |" in md.stdout and "magnitude +LoRA" in md.stdout
    js = cli("report", f, "--format", "json")
    assert len([json.loads(ln) for ln in js.stdout.splitlines()]) == 8


def test_report_plots(cli, tmp_path):
    f, _ = _grid(tmp_path)
    r = cli("report", f, "-o", tmp_path / "plots")
    assert r.exit_code == 0, r.stderr
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert {"accuracy_vs_ratio.png", "sparsity_vs_target.png", "accuracy_vs_macs.png"} <= set(pngs)
    for p in (tmp_path / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_bad_files(cli, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = cli("report", empty)
    assert r.exit_code == 1 and r.stderr.startswith("Error:") and "Traceback" not in r.stderr

    r = cli("report", tmp_path / "missing.jsonl")
    assert r.exit_code == 1 and "Error:" in r.stderr

    f, _ = _grid(tmp_path)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        f.read_text() + "{not json\n" + json.dumps({"schema": "prunecli/record-v0", "command": "eval"}) + "\n"
    )
    r = cli("report", mixed, "--format", "json")
    assert r.exit_code == 0
    assert len(r.stdout.splitlines()) == 8
    assert "malformed" in r.stderr and "another schema" in r.stderr

    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("nope\n[1,2]\n")
    r = cli("report", only_bad)
    assert r.exit_code == 1 and "Error:" in r.stderr


def test_report_marks_wcr_base_and_recovery(cli, tmp_path):
    """A finetune before the prune step is base training (tagged only with WCR); after it, recovery."""
    base, p, ft = (str(tmp_path / n) for n in ("base.safetensors", "p.safetensors", "ft.safetensors"))
    lines = [
        _rec("finetune", "arch:improved_cnn", base, {"wcr": 1e-4}, {"train_loss": [1.0]}),
        _rec("prune", base, p, {"method": "magnitude", "ratio": 0.9}, {"target_ratio": 0.9, "sparsity": 0.9}),
        _rec("eval", p, None, {"data": "digits:test"}, {"top1": 0.5}),
        _rec("finetune", p, ft, {}, {"train_loss": [1.0]}),
        _rec("eval", ft, None, {"data": "digits:test"}, {"top1": 0.7}),
    ]
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join(lines) + "\n")
    r = cli("report", f, "--format", "json")
    series = sorted(json.loads(ln)["series"] for ln in r.stdout.splitlines())
    assert series == ["magnitude (WCR base)", "magnitude (WCR base) +finetune"]


def test_report_params_column_is_all_parameters_with_non_zero_beside_it(tmp_path):
    """The demo's table and report agree: ``params`` is the parameter count, never the non-zero count."""
    from prunecli.api.report import FORMATS, build_rows

    p = str(tmp_path / "u70.safetensors")
    metrics = {"target_ratio": 0.7, "sparsity": 0.7, "params": 2474506, "params_nonzero": 747242,
               "macs": 1000, "macs_nonzero": 300}  # fmt: skip
    records = [
        json.loads(_rec("prune", "base.safetensors", p, {"method": "magnitude", "ratio": 0.7}, metrics)),
        json.loads(_rec("eval", p, None, {"data": "digits:test"}, {"top1": 0.9})),
    ]
    (row,) = build_rows(records)
    assert (row.params, row.params_nonzero, row.macs, row.macs_nonzero) == (2474506, 747242, 1000, 300)
    (cells,) = csv.DictReader(io.StringIO(FORMATS.get("csv")([row])))
    assert (cells["params"], cells["params_nonzero"]) == ("2474506", "747242")
    # a record without non-zero counts leaves that column empty instead of moving a number into "params"
    del records[0]["metrics"]["params_nonzero"]
    assert build_rows(records)[0].params_nonzero is None and build_rows(records)[0].params == 2474506


def test_report_separates_selected_sparsity_from_file_sparsity(tmp_path):
    """Target vs achieved compares like with like; a channel ratio is never plotted as a sparsity."""
    from prunecli.api.report import build_rows

    u, lo, c = (str(tmp_path / n) for n in ("u.safetensors", "u-lora.safetensors", "c.safetensors"))
    records = [
        _rec("prune", "base.safetensors", u, {"method": "magnitude", "ratio": 0.5},
             {"target_ratio": 0.5, "selected_sparsity": 0.5, "sparsity": 0.4998, "params": 10}),
        _rec("finetune-lora", u, lo, {}, {"sparsity": 0.4998, "sparsity_after": 0.4998, "params": 10}),
        _rec("prune", "base.safetensors", c, {"method": "l2", "ratio": 0.3, "structure": "channel"},
             {"target_ratio": 0.3, "channel_ratio": 0.3, "params_removed": 0.5089, "sparsity": 0.0, "params": 5}),
    ] + [_rec("eval", p, None, {"data": "digits:test"}, {"top1": 0.5}) for p in (u, lo, c)]  # fmt: skip
    rows = {Path(r.checkpoint).name: r for r in build_rows([json.loads(x) for x in records])}
    assert (rows["u.safetensors"].selected_sparsity, rows["u.safetensors"].sparsity) == (0.5, 0.4998)
    assert (rows["u-lora.safetensors"].selected_sparsity, rows["u-lora.safetensors"].sparsity) == (0.5, 0.4998)
    assert rows["c.safetensors"].selected_sparsity is None and rows["c.safetensors"].sparsity == 0.0
    assert rows["c.safetensors"].target_ratio == 0.3
