"""``prunecli report``: tables and plots from the JSON records of many runs (issue 9, README.md, Subcommands).

Records are joined through the files they name: an ``eval`` record's ``input`` is a checkpoint that
some ``prune``/``restore``/``finetune-lora``/``finetune`` record wrote (its ``checkpoint``). Walking
that chain back gives each evaluation its criterion, structure, target and achieved sparsity, the
restoration method and whether LoRA recovery ran — the coordinates of paper A's tables and figures.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prunecli.errors import InputError
from prunecli.record import SCHEMA, Result, dumps
from prunecli.registry import Registry
from prunecli.requests import ReportRequest

__all__ = ["FORMATS", "Row", "build_rows", "read_records", "report"]

log = logging.getLogger("prunecli")

PRODUCERS = ("prune", "restore", "finetune-lora", "finetune")


@dataclass(frozen=True)
class Row:
    """One evaluated checkpoint with the coordinates of the steps that made it."""

    checkpoint: str
    data: str | None
    criterion: str | None
    structure: str | None
    target_ratio: float | None
    selected_sparsity: float | None  # what the prune step removed of the weights it selected (vs target_ratio)
    sparsity: float | None
    restore: str | None
    lora: bool
    finetuned: bool
    wcr: bool
    top1: float | None
    top5: float | None
    loss: float | None
    params: int | None
    params_nonzero: int | None
    macs: int | None
    macs_nonzero: int | None

    @property
    def series(self) -> str:
        """The legend label: criterion, restoration and recovery that produced the checkpoint."""
        parts = [self.criterion or "dense"]
        if self.structure and self.structure != "unstructured":
            parts.append(self.structure)
        if self.restore:
            parts.append(f"+{self.restore}")
        if self.wcr:
            parts.append("(WCR base)")
        if self.lora:
            parts.append("+LoRA")
        if self.finetuned:
            parts.append("+finetune")
        return " ".join(parts)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Reads a JSON Lines file of records; malformed lines and other schemas are skipped with a warning.

    Raises:
        InputError: the file is missing or empty, or holds no usable record.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    records, bad, foreign = [], 0, 0
    lines = path.read_text(errors="replace").splitlines()
    if not any(ln.strip() for ln in lines):
        raise InputError(f"{path}: empty file, no records to report", hint="append records with --metrics FILE or >>")
    for ln in lines:
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(rec, dict):
            bad += 1
        elif rec.get("schema") != SCHEMA:
            foreign += 1
        else:
            records.append(rec)
    if bad:
        log.warning(f"{path}: skipped {bad} malformed line(s)")
    if foreign:
        log.warning(f"{path}: skipped {foreign} record(s) of another schema (this prunecli reads {SCHEMA})")
    if not records:
        raise InputError(f"{path}: no {SCHEMA} records found")
    return records


def _norm(p: Any) -> str | None:
    return os.path.normpath(str(p)) if p else None


def build_rows(records: list[dict[str, Any]]) -> list[Row]:
    """Joins eval records to the chain of records that produced their checkpoints."""
    producer: dict[str, dict[str, Any]] = {}
    for rec in records:
        if rec.get("command") in PRODUCERS and rec.get("checkpoint"):
            producer[_norm(rec["checkpoint"])] = rec  # type: ignore[index]
    rows = []
    for rec in records:
        if rec.get("command") != "eval":
            continue
        ckpt = _norm(rec.get("input"))
        info: dict[str, Any] = {
            "criterion": None,
            "structure": None,
            "target_ratio": None,
            "selected_sparsity": None,
            "sparsity": None,
            "restore": None,
            "lora": False,
            "finetuned": False,
            "wcr": False,
            "params": None,
            "params_nonzero": None,
            "macs": None,
            "macs_nonzero": None,
        }
        seen: set[str] = set()
        node = producer.get(ckpt) if ckpt else None
        past_prune = False
        while node is not None and _norm(node.get("checkpoint")) not in seen:
            seen.add(_norm(node.get("checkpoint")))  # type: ignore[arg-type]
            _absorb(info, node, past_prune)
            past_prune = past_prune or node.get("command") == "prune"
            node = producer.get(_norm(node.get("input")))  # type: ignore[arg-type]
        m = rec.get("metrics") or {}
        rows.append(
            Row(
                checkpoint=ckpt or "",
                data=m.get("data") or (rec.get("options") or {}).get("data"),
                top1=m.get("top1"),
                top5=m.get("top5"),
                loss=m.get("loss"),
                **info,
            )
        )
    rows.sort(key=lambda r: (r.series, r.target_ratio if r.target_ratio is not None else -1.0, r.checkpoint))
    return rows


def _absorb(info: dict[str, Any], rec: dict[str, Any], past_prune: bool) -> None:
    """Fills the coordinates from one producing record; the step nearest the eval wins for metrics.

    Steps found after the prune step (walking backwards) made the dense base: a ``finetune`` there is
    base training (noted only when it used WCR), not recovery.
    """
    cmd, opts, m = rec.get("command"), rec.get("options") or {}, rec.get("metrics") or {}
    if past_prune:
        if cmd == "finetune" and opts.get("wcr"):
            info["wcr"] = True
        return
    # the counts of the step nearest the eval: all parameters and the non-zero ones, in their own
    # columns (prunecli.counting's convention; "params" is never the non-zero count)
    if info["params"] is None and m.get("params") is not None:
        info["params"], info["params_nonzero"] = m["params"], m.get("params_nonzero")
    if info["macs"] is None and m.get("macs") is not None:
        info["macs"], info["macs_nonzero"] = m["macs"], m.get("macs_nonzero")
    if info["sparsity"] is None and m.get("sparsity") is not None:
        info["sparsity"] = m.get("sparsity")
    if cmd == "finetune-lora":
        info["lora"] = True
        if m.get("sparsity_after") is not None and info["sparsity"] is None:
            info["sparsity"] = m["sparsity_after"]
    elif cmd == "finetune":
        info["finetuned"] = True
    elif cmd == "restore":
        info["restore"] = info["restore"] or opts.get("method")
    elif cmd == "prune":
        info["criterion"] = opts.get("method") or m.get("method") or (m.get("scores_method"))
        info["structure"] = opts.get("structure") or "unstructured"
        info["target_ratio"] = m.get("target_ratio", opts.get("ratio"))
        if info["structure"] != "channel":  # a channel ratio is a fraction of channels, not of weights
            # records written before prunecli.counting named it "sparsity" (over the selected weights)
            info["selected_sparsity"] = m.get("selected_sparsity", m.get("sparsity"))
        if opts.get("restore"):
            info["restore"] = info["restore"] or opts.get("restore")


COLUMNS = (
    "series", "target_ratio", "selected_sparsity", "sparsity", "top1", "top5", "loss",
    "params", "params_nonzero", "macs", "macs_nonzero", "data", "checkpoint",
)  # fmt: skip


def _cells(row: Row) -> dict[str, Any]:
    d = asdict(row)
    d["series"] = row.series
    return {c: d.get(c) for c in COLUMNS}


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


FORMATS: Registry[Any] = Registry("report format")


@FORMATS.register("md")
def _markdown(rows: list[Row]) -> str:
    cols = COLUMNS[:-1]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(_cells(r)[c]) for c in cols) + " |" for r in rows]
    pivot = _pivot(rows)
    if pivot:
        lines += ["", pivot]
    return "\n".join(lines) + "\n"


def _pivot(rows: list[Row]) -> str:
    """Top-1 by target ratio (rows) × series (columns): paper A's Tables 1–2 layout."""
    ratios = sorted({r.target_ratio for r in rows if r.target_ratio is not None})
    series = sorted({r.series for r in rows if r.target_ratio is not None})
    if not ratios or not series:
        return ""
    cell = {(r.target_ratio, r.series): r.top1 for r in rows}
    out = ["| top-1 \\ ratio | " + " | ".join(series) + " |", "|---|" + "---|" * len(series)]
    for ratio in ratios:
        out.append(f"| {ratio:g} | " + " | ".join(_fmt(cell.get((ratio, s))) for s in series) + " |")
    return "\n".join(out)


@FORMATS.register("csv")
def _csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in _cells(r).items()})
    return buf.getvalue()


@FORMATS.register("json")
def _json(rows: list[Row]) -> str:
    return "\n".join(dumps(_cells(r)) for r in rows) + ("\n" if rows else "")


def _plots(rows: list[Row], out_dir: Path) -> list[str]:
    """PNG figures: accuracy vs ratio (paper A Fig. 2, LoRA dashed as Figs. 4–5), achieved vs target
    sparsity (Fig. 3), accuracy vs MACs and params."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plots need matplotlib", hint="pip install 'prunecli[plot]'") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    by_series: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        if r.target_ratio is not None:
            by_series[r.series].append(r)

    def save(fig: Any, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=120, metadata={"Software": None})
        plt.close(fig)
        written.append(str(path.resolve()))

    if by_series:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for s in sorted(by_series):
            pts = sorted((r.target_ratio, r.top1) for r in by_series[s] if r.top1 is not None)
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="o",
                    linestyle="--" if ("LoRA" in s or "finetune" in s) else "-",
                    label=s,
                )
        ax.set_xlabel("target pruning ratio")
        ax.set_ylabel("top-1 accuracy")
        ax.set_title("Accuracy vs pruning ratio")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "accuracy_vs_ratio.png")

        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for s in sorted(by_series):
            pts = sorted((r.target_ratio, r.selected_sparsity) for r in by_series[s] if r.selected_sparsity is not None)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=s)
        lim = [0, max(r.target_ratio for r in rows if r.target_ratio is not None) * 1.05 + 1e-9]
        ax.plot(lim, lim, color="grey", linewidth=1, linestyle=":", label="achieved = target")
        ax.set_xlabel("target pruning ratio")
        ax.set_ylabel("achieved sparsity")
        ax.set_title("Achieved vs target sparsity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "sparsity_vs_target.png")

    def nonzero(r: Row, key: str) -> int | None:  # the non-zero count, or the count where none was recorded
        v = getattr(r, f"{key}_nonzero")
        return v if v is not None else getattr(r, key)

    for key, label, name in (
        ("macs", "MACs (non-zero)", "accuracy_vs_macs.png"),
        ("params", "parameters (non-zero)", "accuracy_vs_params.png"),
    ):
        pts_by = {
            s: sorted((nonzero(r, key), r.top1) for r in rs if nonzero(r, key) is not None and r.top1 is not None)
            for s, rs in by_series.items()
        }
        if any(pts_by.values()):
            fig, ax = plt.subplots(figsize=(6.4, 4.4))
            for s in sorted(pts_by):
                if pts_by[s]:
                    ax.plot(*zip(*pts_by[s], strict=True), marker="o", label=s)
            ax.set_xlabel(label)
            ax.set_ylabel("top-1 accuracy")
            ax.set_title(f"Accuracy vs {label}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            save(fig, name)
    return written


def report(req: ReportRequest) -> tuple[str, Result]:
    """Renders the table of ``req.results`` in ``req.fmt``; with ``req.output`` also writes the PNG plots.

    Returns:
        (table text for stdout or a file, Result whose metrics summarise rows and plots).

    Example:
        >>> text, _ = report(ReportRequest(results=Path("results.jsonl"), fmt="md"))
    """
    path, fmt, out_dir = req.results, req.fmt, req.output
    render = FORMATS.get(fmt)
    records = read_records(path)
    rows = build_rows(records)
    if not rows:
        raise InputError(f"{path}: holds {len(records)} record(s) but no eval records to tabulate")
    text = render(rows)
    plots = _plots(rows, Path(out_dir)) if out_dir else []
    metrics = {"records": len(records), "rows": len(rows), "series": sorted({r.series for r in rows}), "plots": plots}
    return text, Result(metrics=metrics, device="none")
