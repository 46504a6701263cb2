"""Multi-process runs: torchrun with 2 gloo processes on CPU reproduces the one-process run.

How the runs are made comparable (``prunecli.distributed``): the same global batch (128 in one
process = 2 × 64 under torchrun), the same per-epoch permutation on every rank (ShardSampler), the
incomplete last global batch dropped, and no per-process randomness in the forward pass — no
augmentation (``--augment none``), an MLP without dropout or BatchNorm — so the only difference left
is the float summation order of DDP's gradient all-reduce.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prunecli.distributed import ShardSampler


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(args: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNECLI_NO_PROGRESS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "prunecli", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)


@pytest.mark.parametrize(("n", "batch", "drop_last"), [(37, 8, True), (37, 8, False), (64, 16, True)])
def test_shards_of_each_step_make_up_the_one_process_batch(n: int, batch: int, drop_last: bool) -> None:
    one = list(ShardSampler(n, shuffle=True, seed=3, global_batch=batch, drop_last=drop_last))
    for world in (2, 4):
        kw = {"shuffle": True, "seed": 3, "world_size": world, "global_batch": batch, "drop_last": drop_last}
        shards = [list(ShardSampler(n, rank=r, **kw)) for r in range(world)]
        per = batch // world
        for k in range(0, len(one), batch):
            local = [s[k // world : k // world + per] for s in shards]
            assert sorted(i for part in local for i in part) == sorted(one[k : k + batch])
        assert sorted(i for s in shards for i in s) == sorted(one)  # no sample repeated or lost
    if drop_last:
        assert len(one) == n - n % batch


def test_sampler_reshuffles_each_epoch_like_one_process() -> None:
    s = ShardSampler(20, shuffle=True, seed=0)
    first, second = list(s), list(s)
    assert first != second and sorted(first) == sorted(second) == list(range(20))
    g = torch.Generator().manual_seed(1)  # epoch 1 uses seed + 1: independent of prunecli's code path
    assert second == torch.randperm(20, generator=g).tolist()


@pytest.fixture
def pruned_mlp(tmp_path: Path) -> Path:
    import timm
    import torch.nn.utils.prune as P

    import prunecli.archs  # noqa: F401
    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    torch.manual_seed(0)
    model = timm.create_model("fc_mlp", num_classes=10)
    params = [(model.fc1, "weight"), (model.fc2, "weight")]
    P.global_unstructured(params, pruning_method=P.L1Unstructured, amount=0.5)
    for mod, name in params:
        P.remove(mod, name)
    path = tmp_path / "p50.safetensors"
    save_checkpoint(path, model, Manifest("fc_mlp", 10, {}, default_pretrained_cfg("fc_mlp"),
                                          masked=["fc1.weight", "fc2.weight"]))  # fmt: skip
    return path


def test_finetune_lora_two_gloo_processes_match_one_process(cli, pruned_mlp: Path, tmp_path: Path) -> None:
    common = ["--data", "digits:train", "--val", "digits:test", "--epochs", "2", "--batch-size", "128",
              "--lr", "1e-2", "--augment", "none", "--device", "cpu", "--wcr", "1e-6"]  # fmt: skip
    one = cli("finetune-lora", pruned_mlp, *common, "-o", tmp_path / "one.safetensors")
    assert one.exit_code == 0, one.stderr
    run = _torchrun(["finetune-lora", str(pruned_mlp), *common, "-o", str(tmp_path / "two.safetensors")])
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [ln for ln in run.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1  # only rank 0 prints the record
    two = json.loads(lines[0])
    a, b = one.record["metrics"], two["metrics"]
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert a["masked_update_layers"] == b["masked_update_layers"] == ["fc1.weight", "fc2.weight"]  # through the mask
    assert a["steps"] == b["steps"] == 2 * (1437 // 128)
    for key in ("train_loss", "train_acc_per_epoch", "wcr_per_epoch"):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert b["top1_before"] == a["top1_before"] and b["loss_before"] == pytest.approx(a["loss_before"], rel=1e-6)
    assert b["top1_after"] == pytest.approx(a["top1_after"], abs=1 / 360)  # at most one borderline sample
    assert b["sparsity_after"] == a["sparsity_after"] == a["sparsity_before"]
    w1, w2 = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert sorted(w1) == sorted(w2)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-3, atol=1e-4)  # Adam steps normalise float noise
    assert not torch.equal(w1["fc1.weight"], load_file(str(pruned_mlp))["fc1.weight"])  # training did happen


def _score_worker(rank: int, world: int, port: int, x: torch.Tensor, y: torch.Tensor, out: str) -> None:
    """One rank of a Taylor-style score (Σ_batches |θ·g|) over its share of every global batch."""
    import torch.distributed as dist

    from prunecli import distributed as D

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    D.init(torch.device("cpu"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    params = [model[0].weight, model[2].weight]
    acc = {"0.weight": torch.zeros_like(params[0]), "2.weight": torch.zeros_like(params[1])}
    sampler = ShardSampler(len(x), shuffle=False, rank=rank, world_size=world, global_batch=8, drop_last=True)
    idx = list(sampler)
    for k in range(0, len(idx), 8 // world):
        b = idx[k : k + 8 // world]
        loss = torch.nn.functional.cross_entropy(model(x[b]), y[b])
        grads = D.average_grads(list(torch.autograd.grad(loss, params)))
        for a, p, g in zip(acc.values(), params, grads, strict=True):
            a.add_((p.detach() * g).abs())
    counts = D.all_reduce_sums({"samples": len(idx)})
    if D.is_main():
        torch.save({"scores": acc, "samples": counts["samples"]}, out)
    dist.destroy_process_group()


def test_score_helpers_two_gloo_processes_match_full_batches(tmp_path: Path) -> None:
    """score under torchrun: per-batch gradients averaged over ranks give the one-process Taylor scores.

    The reference is computed here directly: |θ·∂L/∂θ| of the mean loss of each full batch, summed.
    """
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(37, 6, generator=g), torch.randint(0, 3, (37,), generator=g)
    out = tmp_path / "scores.pt"
    mp.spawn(_score_worker, args=(2, _free_port(), x, y, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    params = [model[0].weight, model[2].weight]
    expect = [torch.zeros_like(p) for p in params]
    for k in range(0, 32, 8):  # 37 samples, global batch 8, last incomplete batch dropped
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x[k : k + 8]), y[k : k + 8]), params)
        for e, p, gr in zip(expect, params, grads, strict=True):
            e.add_((p.detach() * gr).abs())
    assert got["samples"] == 32
    torch.testing.assert_close(got["scores"]["0.weight"], expect[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["scores"]["2.weight"], expect[1], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------- score and eval under torchrun
# Calibration: 65 class-balanced digits images (--fraction 0.045) in global batches of 12, so the last
# batch (5 images) splits 3 + 2 between the ranks: the per-rank loss scaling must make the uneven shares
# add up to the one-process batch mean.
_CALIB = {"data": "digits:train", "fraction": 0.045, "batch_size": 12, "device": "cpu"}
_CRITERIA = [
    ("taylor", {}),
    ("taylor", {"agg": "sq_mean", "granularity": "channel"}),
    ("snip", {}),
    ("proscore", {"lambda": "0.05"}),
    ("biascomp", {}),
    ("biascomp", {"sensitivity": "hutchinson", "probes": "3"}),
    ("wanda", {}),
]

_WORKER = """
import sys, torch
from prunecli import distributed as D
from prunecli.api._common import load_input
from prunecli.scoring import compute_scores
from prunecli.scores import save_scores

ckpt, outdir, calib, criteria = sys.argv[1], sys.argv[2], eval(sys.argv[3]), eval(sys.argv[4])
D.init(torch.device("cpu"))
loaded = load_input(ckpt)
for i, (method, params) in enumerate(criteria):
    sf = compute_scores(loaded, method, params=params, **calib)
    if D.is_main():
        save_scores(f"{outdir}/{i}.scores", sf)
"""


@pytest.fixture(scope="module")
def cnn_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Paper A's CNN (conv + BatchNorm + linear), random weights, randomised BatchNorm statistics."""
    import timm

    import prunecli.archs  # noqa: F401
    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    torch.manual_seed(0)
    model = timm.create_model("improved_cnn", num_classes=10).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("ddp") / "cnn.safetensors"
    save_checkpoint(path, model, Manifest("improved_cnn", 10, {}, default_pretrained_cfg("improved_cnn")))
    return path


def _assert_scores_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = float(b.abs().max()) or 1.0
    torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5 * scale, msg=lambda m: f"{what}: {m}")


def test_score_criteria_two_gloo_processes_match_one_process(cnn_ckpt: Path, tmp_path: Path) -> None:
    """Every data-driven criterion gives the one-process scores (and bias shifts) under torchrun."""
    from prunecli.api._common import load_input
    from prunecli.scores import load_scores
    from prunecli.scoring import compute_scores

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNECLI_NO_PROGRESS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(script), str(cnn_ckpt), str(tmp_path), repr(_CALIB),
           repr(_CRITERIA)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = load_input(str(cnn_ckpt))
    for i, (method, params) in enumerate(_CRITERIA):
        one = compute_scores(loaded, method, params=params, **_CALIB)
        two = load_scores(tmp_path / f"{i}.scores")
        assert two.samples == one.samples == 65, method
        assert two.options == one.options, method
        assert sorted(two.scores) == sorted(one.scores)
        for name in one.scores:
            _assert_scores_close(two.scores[name], one.scores[name], f"{method} {params} {name}")
        for kind, group in one.extras.items():
            for name in group:
                _assert_scores_close(two.extras[kind][name], group[name], f"{method} {kind} {name}")


def test_score_and_eval_cli_two_gloo_processes(cli, cnn_ckpt: Path, tmp_path: Path) -> None:
    """``torchrun … -m prunecli score|eval``: one record from rank 0, the one-process file and metrics."""
    from prunecli.scores import load_scores

    args = ["--method", "taylor", "--data", "digits:train", "--fraction", "0.045", "--batch-size", "12",
            "--device", "cpu"]  # fmt: skip
    one = cli("score", cnn_ckpt, *args, "-o", tmp_path / "one.scores")
    assert one.exit_code == 0, one.stderr
    run = _torchrun(["score", str(cnn_ckpt), *args, "-o", str(tmp_path / "two.scores")])
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [ln for ln in run.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["metrics"]["samples"] == one.record["metrics"]["samples"] == 65
    a, b = load_scores(tmp_path / "one.scores"), load_scores(tmp_path / "two.scores")
    for name in a.scores:
        _assert_scores_close(b.scores[name], a.scores[name], name)

    ev_one = cli("eval", cnn_ckpt, "--data", "digits:test", "--batch-size", "50", "--device", "cpu")
    assert ev_one.exit_code == 0, ev_one.stderr
    run = _torchrun(["eval", str(cnn_ckpt), "--data", "digits:test", "--batch-size", "50", "--device", "cpu"])
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [ln for ln in run.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    m1, m2 = ev_one.record["metrics"], json.loads(lines[0])["metrics"]
    assert m2["samples"] == m1["samples"] == 360 and m2["world_size"] == 2
    assert m2["top1"] == pytest.approx(m1["top1"], abs=1e-12)
    assert m2["top5"] == pytest.approx(m1["top5"], abs=1e-12)
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-6)
