"""``inspect --layers`` counts zeros in bounded memory, whatever the tensor size, and counts them right.

The memory test builds a safetensors file with one 1 GiB float32 tensor whose data section is a
hole (``truncate``: real zeros on read, no disk used) and runs ``inspect --layers`` in a fresh
interpreter that reports its own peak resident set size (``resource.getrusage``) before and after the
count. The bound: the 8 MiB read buffer (the I/O it needs) plus 64 MiB. Counting the whole tensor at
once would need at least the tensor (1 GiB) on top.
"""

from __future__ import annotations

import importlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

MiB = 1 << 20

_PROBE = """
import json, resource, sys
from prunecli.api.inspect import inspect
from prunecli.requests import InspectRequest
inspect(InspectRequest(checkpoint=sys.argv[1], layers=False))  # every import done before the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = inspect(InspectRequest(checkpoint=sys.argv[1], layers=True)).metrics
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_kib": base, "peak_kib": peak, "sparsity": m["sparsity"], "nonzero": m["params_nonzero"]}))
"""


@pytest.mark.slow
def test_layers_of_a_1gib_tensor_in_bounded_memory(tmp_path: Path) -> None:
    n = 1 << 14  # 16384 × 16384 float32 = 1 GiB
    header = json.dumps({"big.weight": {"dtype": "F32", "shape": [n, n], "data_offsets": [0, 4 * n * n]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    os.truncate(path, 8 + len(header) + 4 * n * n)  # a hole: reads as zeros
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["sparsity"] == 1.0 and out["nonzero"] == 0  # all zeros by construction
    growth = (out["peak_kib"] - out["base_kib"]) * 1024  # ru_maxrss is in KiB on Linux
    assert growth < 8 * MiB + 64 * MiB, f"peak grew by {growth / MiB:.0f} MiB"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_chunked_count_matches_numpy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """Chunks of 64 bytes (not a multiple of most tensors): the count equals a direct count of the tensor,
    negative zeros included, for every tensor of the file."""
    from prunecli.requests import InspectRequest

    inspect_mod = importlib.import_module("prunecli.api.inspect")  # the module (the package exports the function)

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, shape in enumerate([(37, 11), (5, 3, 3, 3), (1000,), (2, 2)]):
        t = torch.randn(shape, generator=g)
        t[torch.rand(shape, generator=g) < 0.4] = 0.0
        t.view(-1)[:3] = -0.0
        tensors[f"l{i}.weight"] = (t * 10).to(dtype)
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    monkeypatch.setattr(inspect_mod, "_CHUNK_BYTES", 64)
    rows = {
        r["name"]: r for r in inspect_mod.inspect(InspectRequest(checkpoint=str(path), layers=True)).metrics["layers"]
    }
    for name, t in tensors.items():
        zeros = int(np.sum(t.float().numpy() == 0))  # -0.0 == 0 in IEEE comparison
        assert rows[name]["sparsity"] == zeros / t.numel(), name  # exact: the same division of two integer counts
