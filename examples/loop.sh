#!/usr/bin/env bash
# A make-free sweep: one criterion × several ratios, evaluated before and after LoRA recovery,
# all records appended to one JSON Lines file and rendered as a table.
#
#   examples/loop.sh BASE [TRAIN] [VAL] [OUT]      (BASE: any checkpoint prunecli reads)
set -euo pipefail
BASE=${1:?usage: loop.sh BASE [TRAIN] [VAL] [OUT]}
TRAIN=${2:-digits:train}
VAL=${3:-digits:test}
OUT=${4:-loop-out}
METHOD=${METHOD:-magnitude}
RATIOS=${RATIOS:-"0.3 0.5"}
EPOCHS=${EPOCHS:-1}
mkdir -p "$OUT"
: > "$OUT/results.jsonl"

for r in $RATIOS; do
  p="$OUT/$METHOD-$r.safetensors"
  prunecli prune "$BASE" --method "$METHOD" --ratio "$r" --force -q -o "$p" --metrics "$OUT/results.jsonl" >/dev/null
  prunecli eval "$p" --data "$VAL" -q --metrics "$OUT/results.jsonl" >/dev/null
  prunecli finetune-lora "$p" --data "$TRAIN" --epochs "$EPOCHS" --force -q -o "${p%.safetensors}-lora.safetensors" \
    --metrics "$OUT/results.jsonl" >/dev/null
  prunecli eval "${p%.safetensors}-lora.safetensors" --data "$VAL" -q --metrics "$OUT/results.jsonl" >/dev/null
done
prunecli report "$OUT/results.jsonl"
