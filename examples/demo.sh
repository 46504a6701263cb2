#!/usr/bin/env bash
# `make demo`: the whole prunecli story on the embedded UCI digits data, on the CPU, in a few minutes.
#
#   1. finetune       train paper A's CNN (improved_cnn) from scratch on digits:train
#   2. eval           evaluate the dense base on digits:test
#   3. score          Taylor (paper A) and PROscore (paper D) importance on calibration data
#   4. prune          unstructured: 70 % of the weights by Taylor score (global), dense shapes with zeros
#   5. finetune-lora  LoRA recovery of the unstructured model (paper A), sparsity kept exactly
#   6. prune          channel: 50 % of the channels by PROscore, physically smaller
#   7. restore        training-free LBYL restoration (paper B), then BN re-estimation
#   8. eval           every checkpoint on digits:test
#   9. report         a table on stderr and PNG plots under demo-out/plots/
#
# Every step prints its JSON record on stdout (and appends it to demo-out/records.jsonl). Outputs live
# under demo-out/ (git-ignored); --force makes reruns overwrite them. Overrides:
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
COMMON=(--device "$DEVICE" --seed "$SEED" --metrics "$RECORDS" --quiet)
EVAL=(--data digits:test "${COMMON[@]}")

say "1/9 train improved_cnn from scratch on digits:train ($EPOCHS epochs, Adam 1e-3, cosine, crop+flip)"
prunecli finetune arch:improved_cnn --data digits:train --epochs "$EPOCHS" \
  --optimizer adam --lr 1e-3 --schedule cosine "${COMMON[@]}" --force -o "$OUT/base.safetensors"

say "2/9 evaluate the dense base"
prunecli eval "$OUT/base.safetensors" "${EVAL[@]}"

say "3/9 score: taylor (10 batches) and proscore (class-balanced 25 % of digits:train)"
prunecli score "$OUT/base.safetensors" --method taylor --data digits:train "${COMMON[@]}" --force -o "$OUT/taylor.scores"
prunecli score "$OUT/base.safetensors" --method proscore --data digits:train --fraction 0.25 "${COMMON[@]}" \
  --force -o "$OUT/proscore.scores"

say "4/9 prune 70 % of the weights (unstructured, global Taylor) | 8/9 eval"
prunecli prune "$OUT/base.safetensors" --scores "$OUT/taylor.scores" --ratio 0.7 "${COMMON[@]}" \
  --force -o "$OUT/taylor70.safetensors" | prunecli eval - "${EVAL[@]}"

say "5/9 LoRA recovery (rank 8, alpha 16, Linear layers, masked merge) | 8/9 eval"
prunecli finetune-lora "$OUT/taylor70.safetensors" --data digits:train --epochs 3 "${COMMON[@]}" \
  --force -o "$OUT/taylor70-lora.safetensors" | prunecli eval - "${EVAL[@]}"

say "6/9 prune 50 % of the channels by PROscore (Torch-Pruning dependency graph) | 8/9 eval"
prunecli prune "$OUT/base.safetensors" --scores "$OUT/proscore.scores" --structure channel --ratio 0.5 \
  "${COMMON[@]}" --force -o "$OUT/ch50.safetensors" | prunecli eval - "${EVAL[@]}"

say "7/9 restore: LBYL (data-free) then BN re-estimation | 8/9 eval"
prunecli restore "$OUT/ch50.safetensors" --method lbyl+bn --data digits:train "${COMMON[@]}" \
  --force -o "$OUT/ch50-lbyl-bn.safetensors" | prunecli eval - "${EVAL[@]}"

say "9/9 report ($RECORDS)"
prunecli report "$RECORDS" -o "$OUT/plots" --quiet >&2
prunecli inspect "$OUT/ch50-lbyl-bn.safetensors" --quiet >/dev/null

python - "$RECORDS" "$MIN_TOP1" >&2 <<'PY'
import json
import sys
from pathlib import Path

records = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
evals = {Path(r["input"]).name: r["metrics"] for r in records if r["command"] == "eval"}
sizes = {Path(r["checkpoint"]).name: r["metrics"] for r in records if r["command"] == "prune"}
rows = [("checkpoint", "top1", "loss", "params", "sparsity")]
for name, m in evals.items():
    p = sizes.get(name, {})
    rows.append((name, f"{m['top1']:.4f}", f"{m['loss']:.4f}", str(p.get("params", "")),
                 "" if p.get("sparsity") is None else f"{p['sparsity']:.3f}"))
widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
print()
for j, row in enumerate(rows):
    print("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))))
    if j == 0:
        print("  ".join("-" * w for w in widths))
base = evals["base.safetensors"]["top1"]
print(f"\ndemo: dense base top-1 on digits:test = {base:.4f}; plots in {Path(sys.argv[1]).parent / 'plots'}")
if base < float(sys.argv[2]):
    print(f"demo: top-1 {base:.4f} is below {sys.argv[2]}")
    sys.exit(1)
PY
