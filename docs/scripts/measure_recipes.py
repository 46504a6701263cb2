"""The measurement behind docs/finetuning.md: one epoch of each recipe on a model trained on digits.

Usage (from the repository root; about 2 minutes per architecture on one CPU core):

    OMP_NUM_THREADS=1 PRUNECLI_NO_PROGRESS=1 python docs/scripts/measure_recipes.py improved_cnn
    OMP_NUM_THREADS=1 PRUNECLI_NO_PROGRESS=1 python docs/scripts/measure_recipes.py resnet10t

Trains a base model (6 epochs, Adam 1e-3, cosine, random crop without flip; 32×32 input), then runs
one epoch of ``finetune`` on ``digits:train`` with each variant and two seeds, and prints one JSON line
per run with the test top-1 before and after (evaluated through ``prunecli.load_model`` and its eval
transform).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

import prunecli
from prunecli.api.finetune import finetune
from prunecli.data import build_dataset, make_loader
from prunecli.evaluation import evaluate_model
from prunecli.requests import FinetuneRequest

VARIANTS = {
    "scratch (paper A)": {"recipe": "scratch"},
    "finetune": {"recipe": "finetune"},
    "finetune + flip": {"recipe": "finetune", "augment": "crop-flip"},
    "finetune, no warm-up": {"recipe": "finetune", "warmup": 0.0},
    "finetune at 1e-3": {"recipe": "finetune", "lr": 1e-3},
    "finetune at 1e-3, no warm-up": {"recipe": "finetune", "lr": 1e-3, "warmup": 0.0},
}


def _run(**kw: object) -> None:
    finetune(FinetuneRequest.build(data="digits:train", device="cpu", force=True, **kw))


def top1(path: Path, size: int | None) -> float:
    model = prunecli.load_model(path)
    cfg = prunecli.data_config(model, input_size=(size,) if size else None)
    loader = make_loader(build_dataset("digits:test", cfg), batch_size=256)
    return evaluate_model(model, loader, torch.device("cpu"))["top1"]


def main(arch: str) -> None:
    torch.set_num_threads(1)
    size = None if arch == "improved_cnn" else 32  # timm models default to 224 px; digits are 32 px
    extra = {} if size is None else {"num_classes": 10, "input_size": (size,)}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.safetensors"
        _run(checkpoint=f"arch:{arch}", output=str(base), epochs=6, recipe="scratch", augment="crop", **extra)
        before = top1(base, size)
        for name, kw in VARIANTS.items():
            for seed in (0, 1):
                out = Path(tmp) / "ft.safetensors"
                _run(checkpoint=str(base), output=str(out), epochs=1, seed=seed,
                     **({} if size is None else {"input_size": (size,)}), **kw)  # fmt: skip
                print(json.dumps({"arch": arch, "variant": name, "seed": seed, "before": before,
                                  "after": top1(out, size)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "improved_cnn")
