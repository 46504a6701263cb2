#!/usr/bin/env bash
# Prune a third-party timm checkpoint end to end with pipes: each step prints one JSON record and
# the next step reads the checkpoint it names from stdin ("-").
#
#   examples/pipeline.sh CKPT [TRAIN] [VAL] [OUT]
#   CKPT  a timm folder written by timm.models.save_for_hf, timm:NAME.TAG from the local cache,
#         a train.py .pth.tar, or a prunecli .safetensors
#   TRAIN calibration / recovery data (default digits:train), VAL evaluation data (default digits:test)
#
# Example: python -c "import timm; timm.models.save_for_hf(timm.create_model('resnet18', num_classes=10), 'r18')"
#          examples/pipeline.sh r18 imagefolder:train/ imagefolder:val/
set -euo pipefail
CKPT=${1:?usage: pipeline.sh CKPT [TRAIN] [VAL] [OUT]}
TRAIN=${2:-digits:train}
VAL=${3:-digits:test}
OUT=${4:-pipeline-out}
RATIO=${RATIO:-0.5}
EPOCHS=${EPOCHS:-1}
mkdir -p "$OUT"

prunecli score "$CKPT" --method taylor --data "$TRAIN" --batches 4 --force -q -o "$OUT/taylor.scores" >/dev/null
prunecli prune "$CKPT" --scores "$OUT/taylor.scores" --ratio "$RATIO" --force -q -o "$OUT/pruned.safetensors" \
  | prunecli finetune-lora - --data "$TRAIN" --epochs "$EPOCHS" --force -q -o "$OUT/recovered.safetensors" \
  | prunecli eval - --data "$VAL" -q
