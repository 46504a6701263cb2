#!/usr/bin/env bash
# `make demo`: the prunecli story on the embedded UCI digits data, on the CPU, in a few minutes.
#
#   1. finetune  train paper A's CNN (improved_cnn) from scratch on digits:train, validating on digits:test
#   2. eval      evaluate the trained checkpoint on digits:test
#   3. a small table on stderr, built from the JSON records (which also go to stdout, one per step)
#
# Outputs live under demo-out/ (git-ignored); --force makes reruns overwrite them. Overrides:
#   OUT=dir EPOCHS=n DEVICE=cpu|auto SEED=n MIN_TOP1=0.95 bash examples/demo.sh
set -euo pipefail

OUT=${OUT:-demo-out}
EPOCHS=${EPOCHS:-12}
DEVICE=${DEVICE:-cpu}
SEED=${SEED:-0}
MIN_TOP1=${MIN_TOP1:-0.95}
RECORDS="$OUT/records.jsonl"

mkdir -p "$OUT"
: > "$RECORDS"
say() { printf '\n== %s\n' "$*" >&2; }
COMMON=(--device "$DEVICE" --seed "$SEED" --metrics "$RECORDS")

say "1/2 train improved_cnn from scratch on digits:train ($EPOCHS epochs, Adam 1e-3, cosine, crop+flip)"
prunecli finetune arch:improved_cnn --data digits:train --val digits:test --epochs "$EPOCHS" \
  --optimizer adam --lr 1e-3 --schedule cosine "${COMMON[@]}" --force -o "$OUT/base.safetensors"

say "2/2 evaluate on digits:test"
prunecli eval "$OUT/base.safetensors" --data digits:test "${COMMON[@]}"

say "summary ($RECORDS)"
python - "$RECORDS" "$MIN_TOP1" >&2 <<'PY'
import json
import sys
from pathlib import Path

records = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
rows = [("step", "command", "output", "top1", "loss", "sparsity", "seconds")]
for i, r in enumerate(records, 1):
    m = r["metrics"]
    top1 = m.get("top1", m.get("val_top1_final"))
    loss = m.get("loss", (m.get("train_loss") or [None])[-1])
    sparsity = m.get("sparsity", m.get("sparsity_after"))
    out = Path(r["checkpoint"] or r["input"] or "-").name
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    rows.append((str(i), r["command"], out, fmt(top1, ".4f"), fmt(loss, ".4f"), fmt(sparsity, ".3f"),
                 fmt(r["elapsed_s"], ".1f")))
widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
for j, row in enumerate(rows):
    print("  ".join(cell.ljust(w) if c < 3 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))))
    if j == 0:
        print("  ".join("-" * w for w in widths))
final = next(r for r in reversed(records) if r["command"] == "eval")["metrics"]["top1"]
if final < float(sys.argv[2]):
    print(f"demo: top-1 {final:.4f} is below {sys.argv[2]}", file=sys.stderr)
    sys.exit(1)
print(f"\ndemo: base model top-1 on digits:test = {final:.4f}")
PY
