#!/usr/bin/env bash
# One-call GPU check of prunecli (issue 18): every subcommand on a timm ResNet-50 and ViT-B/16 (random
# weights; synthetic data and a JPEG folder it writes) on CUDA in fp32 and bf16, torchrun (nccl) on the
# GPUs present, and the GPU figures of the benchmarks (scoring vs the bare fwd+bwd loop at bf16, eval vs
# timm's loader loop). Prints one Markdown table; exit 1 when a step failed. Under 8 minutes on one GPU.
#
#   benchmarks/gpu_check.sh                    # on a GPU machine; without CUDA: one line, exit 0
#   benchmarks/gpu_check.sh --device cpu --tiny  # the same steps, tiny, on CPU (tests/test_gpu_check.py)
#
# Python: $PYTHON, else the repository's .venv, else python3.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$here/../.venv/bin/python" ]]; then py="$here/../.venv/bin/python"; else py=python3; fi
fi
exec "$py" "$here/gpu_check.py" "$@"
