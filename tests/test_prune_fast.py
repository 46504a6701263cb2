"""The timm-free fast path of ``prune`` (layer table in the manifest) and the magnitude kernel.

References: the model path of the same command (forced with ``PRUNECLI_FAST_PRUNE=0``; its own
parity with torch.nn.utils.prune is tested in test_prune_unstructured.py), brute-force Python sorts,
real forward passes with hooks for the MAC factors, hashlib over the written bytes, and a fresh
interpreter's ``sys.modules`` for the "no timm" claim.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from prunecli.checkpoint.header import read_header
from prunecli.errors import CheckpointError, InputError
from prunecli.pruning.unstructured import Scope, plan_scopes, prune_unstructured
from prunecli.requests import PruneRequest

PRUNE = importlib.import_module("prunecli.api.prune")


def _model(arch: str, seed: int = 0) -> nn.Module:
    import timm

    import prunecli.archs  # noqa: F401  (improved_cnn, fc_mlp)

    torch.manual_seed(seed)
    kw = {} if arch in ("improved_cnn", "fc_mlp") else {"num_classes": 10}
    return timm.create_model(arch, **kw).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.models import default_pretrained_cfg

    root = tmp_path_factory.mktemp("fast")
    out = {}
    for arch in ("test_resnet", "test_vit", "improved_cnn"):
        model = _model(arch)
        out[arch] = root / f"{arch}.safetensors"
        save_checkpoint(out[arch], model, Manifest(arch, 10, {}, default_pretrained_cfg(arch)))
    return out


def _run(monkeypatch: pytest.MonkeyPatch, fast: bool, src: Path, out: Path, **kw: Any) -> Any:
    """prune() on one path; proves which path ran (the fast path must never rebuild the model)."""
    calls: list[str] = []
    real = PRUNE.load_input

    def spy(*a: Any, **k: Any) -> Any:
        calls.append("model")
        return real(*a, **k)

    monkeypatch.setattr(PRUNE, "load_input", spy)
    monkeypatch.setenv("PRUNECLI_FAST_PRUNE", "1" if fast else "0")
    result = PRUNE.prune(PruneRequest.build(checkpoint=str(src), output=out, **kw))
    assert calls == ([] if fast else ["model"])
    return result


CASES = [
    ("test_resnet", {"method": "magnitude", "ratio": 0.5, "scope": "global"}),
    ("test_resnet", {"method": "l1", "ratio": 0.3, "scope": "layer", "include_head": True}),
    ("test_resnet", {"method": "magnitude", "ratio": 0.6, "scope": "global", "exclude": ["layer1.*"],
                     "layer_ratios": [("layer2.*", 0.2), ("*conv1*", 0.7)]}),
    ("test_resnet", {"method": "magnitude", "structure": "2:4"}),
    ("test_vit", {"method": "magnitude", "ratio": 0.5, "scope": "global"}),
    ("test_vit", {"method": "l2", "ratio": 0.45, "include_head": True, "exclude": ["*patch_embed*"]}),
    ("test_vit", {"method": "magnitude", "structure": "1:4", "include_head": True}),
    ("improved_cnn", {"method": "magnitude", "ratio": 0.8, "scope": "global", "include_head": True}),
    ("improved_cnn", {"method": "magnitude", "ratio": 0.5, "layer_ratios": [("fc1", 0.9)]}),
    ("improved_cnn", {"method": "magnitude", "structure": "2:8", "exclude": ["features.0.*"]}),
]  # fmt: skip


@pytest.mark.parametrize(("arch", "kw"), CASES)
def test_fast_path_writes_the_model_paths_bytes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ckpts: dict[str, Path], arch: str, kw: dict[str, Any]
) -> None:
    fast = _run(monkeypatch, True, ckpts[arch], tmp_path / "fast.safetensors", **kw)
    slow = _run(monkeypatch, False, ckpts[arch], tmp_path / "slow.safetensors", **kw)
    data = (tmp_path / "fast.safetensors").read_bytes()
    assert data == (tmp_path / "slow.safetensors").read_bytes()  # weights, manifest, lineage, table
    assert fast.metrics == slow.metrics and fast.device == slow.device
    assert fast.sha256 == slow.sha256 == hashlib.sha256(data).hexdigest()
    manifest = json.loads(read_header(tmp_path / "fast.safetensors").metadata["prunecli"])
    assert manifest["layer_table"] is not None  # the output can take the fast path again


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_fast_path_on_a_channel_pruned_checkpoint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ckpts: dict[str, Path], arch: str
) -> None:
    """Structured checkpoints rebuild through manifest.structure; their table must match that rebuild."""
    monkeypatch.setenv("PRUNECLI_FAST_PRUNE", "0")
    PRUNE.prune(
        PruneRequest.build(
            checkpoint=str(ckpts[arch]),
            output=tmp_path / "c.safetensors",
            method="magnitude",
            ratio=0.3,
            structure="channel",
        )
    )
    kw = {"method": "magnitude", "ratio": 0.5, "scope": "global"}
    a = _run(monkeypatch, True, tmp_path / "c.safetensors", tmp_path / "fast.safetensors", **kw)
    b = _run(monkeypatch, False, tmp_path / "c.safetensors", tmp_path / "slow.safetensors", **kw)
    assert (tmp_path / "fast.safetensors").read_bytes() == (tmp_path / "slow.safetensors").read_bytes()
    assert a.metrics == b.metrics


def test_fast_path_threshold_among_zeros(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, save_model) -> None:
    """More zero weights than the ratio removes: the mapped input must fall back to pruning copies in place."""
    model = _model("improved_cnn", seed=4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight[torch.rand(m.weight.shape) < 0.7] = 0.0
    src = save_model(model, tmp_path / "z.safetensors", "improved_cnn", 10)
    before = src.read_bytes()
    kw = {"method": "magnitude", "ratio": 0.5, "scope": "global"}
    a = _run(monkeypatch, True, src, tmp_path / "fast.safetensors", **kw)
    b = _run(monkeypatch, False, src, tmp_path / "slow.safetensors", **kw)
    assert (tmp_path / "fast.safetensors").read_bytes() == (tmp_path / "slow.safetensors").read_bytes()
    assert a.metrics == b.metrics
    out = _load(tmp_path / "fast.safetensors")
    params = dict(model.named_parameters())
    assert a.metrics["params_nonzero"] == sum(int((out[n] != 0).sum()) for n in params)
    assert src.read_bytes() == before  # the input is only ever mapped read-only or copied


def test_fast_path_scores_file_and_folder_output(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ckpts: dict[str, Path]
) -> None:
    from prunecli.scores import ScoresFile, save_scores

    src = ckpts["test_resnet"]
    from prunecli.checkpoint.hashing import file_sha256
    from prunecli.checkpoint.loaders import load_checkpoint

    loaded = load_checkpoint(str(src))
    gen = torch.Generator().manual_seed(3)
    scores = {f"{n}.weight": torch.rand(m.weight.shape, generator=gen) for n, m in _convs_and_linears(loaded.model)}
    save_scores(tmp_path / "r.scores", ScoresFile("random", "weight", scores, checkpoint_sha256=file_sha256(src)))
    kw = {"scores": tmp_path / "r.scores", "ratio": 0.4, "scope": "global"}
    a = _run(monkeypatch, True, src, f"{tmp_path / 'fast'}/", **kw)
    b = _run(monkeypatch, False, src, f"{tmp_path / 'slow'}/", **kw)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "slow" / name).read_bytes(), name
    assert a.metrics == b.metrics
    # independent: exactly the k lowest random scores (no ties in torch.rand at this size) are zero
    out = _load(tmp_path / "fast" / "model.safetensors")
    k = round(0.4 * sum(s.numel() for n, s in scores.items() if not n.startswith("fc.")))
    pooled = torch.cat([s.flatten() for n, s in scores.items() if not n.startswith("fc.")])
    threshold = pooled.kthvalue(k).values
    for n, s in scores.items():
        if n.startswith("fc."):
            assert torch.equal(out[n], loaded.model.state_dict()[n])
        else:
            assert torch.equal(out[n] == 0, s <= threshold), n


def test_fast_path_metrics_against_the_written_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ckpts: dict[str, Path]
) -> None:
    model = _model("test_vit")
    r = _run(monkeypatch, True, ckpts["test_vit"], tmp_path / "p.safetensors", method="magnitude", ratio=0.5)
    out = _load(tmp_path / "p.safetensors")
    params = dict(model.named_parameters())
    assert r.metrics["params"] == sum(p.numel() for p in params.values())
    assert r.metrics["params_nonzero"] == sum(int((out[n] != 0).sum()) for n in params)
    layers = {f"{n}.weight" for n, _ in _convs_and_linears(model)}
    for n in layers:
        assert r.metrics["layers"][n] == pytest.approx(float((out[n] == 0).float().mean()))


def test_layer_table_against_a_real_forward_pass(ckpts: dict[str, Path]) -> None:
    for arch, size in (("test_resnet", (3, 160, 160)), ("test_vit", (3, 160, 160)), ("improved_cnn", (3, 32, 32))):
        model = _model(arch)
        table = json.loads(read_header(ckpts[arch]).metadata["prunecli"])["layer_table"]
        assert table["version"] == 1 and tuple(table["input_size"]) == size, arch
        positions: dict[str, int] = {}
        hooks = [m.register_forward_hook(_count_positions(positions, n)) for n, m in _convs_and_linears(model)]
        with torch.no_grad():
            model(torch.zeros(1, *size))
        for h in hooks:
            h.remove()
        rows = {e["name"]: e for e in table["layers"]}
        assert list(rows) == [f"{n}.weight" for n, _ in _convs_and_linears(model)], arch
        for n, m in _convs_and_linears(model):
            row = rows[f"{n}.weight"]
            assert row["kind"] == ("conv" if isinstance(m, nn.Conv2d) else "linear")
            assert row["shape"] == list(m.weight.shape)
            assert row["macs_per_weight"] == positions.get(n, 0), (arch, n)
        head = {"test_resnet": "fc", "test_vit": "head", "improved_cnn": "fc2"}[arch]
        assert [r["name"] for r in table["layers"] if r["head"]] == [f"{head}.weight"]
        assert table["buffers"] == sorted(n for n, _ in model.named_buffers() if n in model.state_dict())


def test_no_table_where_it_would_not_be_exact(tmp_path: Path) -> None:
    from prunecli.checkpoint.manifest import Manifest
    from prunecli.checkpoint.writer import save_checkpoint
    from prunecli.layertable import build_layer_table

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x.flatten(1)))

    manifest = Manifest("fc_mlp", 4, {}, {"input_size": (1, 2, 2)})
    assert build_layer_table(Tied(), manifest) is None  # pruning one name would change the other
    plain = nn.Sequential(nn.Flatten(), nn.Linear(4, 4))
    assert build_layer_table(plain, manifest) is not None
    assert build_layer_table(plain, Manifest("fc_mlp", 4, {}, {"input_size": (1, 2, 2)}, adapters={"x": 1})) is None
    # a tensors-only save keeps a table only while it fits the tensors
    table = build_layer_table(plain, manifest)
    sd = plain.state_dict()
    save_checkpoint(tmp_path / "a.safetensors", sd, Manifest("fc_mlp", 4, layer_table=table))
    save_checkpoint(
        tmp_path / "b.safetensors", {**sd, "1.weight": torch.zeros(2, 4)}, Manifest("fc_mlp", 4, layer_table=table)
    )
    meta = {p: json.loads(read_header(tmp_path / p).metadata["prunecli"]) for p in ("a.safetensors", "b.safetensors")}
    assert meta["a.safetensors"]["layer_table"] == table
    assert meta["b.safetensors"]["layer_table"] is None


def test_inputs_without_a_table_take_the_model_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ckpts: dict[str, Path]
) -> None:
    from safetensors.torch import save_file

    model = _model("test_resnet")
    save_file(model.state_dict(), str(tmp_path / "bare.safetensors"))  # third-party: a bare state dict
    save_file({n: t.half() if t.is_floating_point() else t for n, t in model.state_dict().items()},
              str(tmp_path / "bare16.safetensors"))  # fmt: skip
    from prunecli.api._common import InputOptions

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # never the real home
    src = InputOptions(arch="test_resnet", num_classes=10)
    r = _run(monkeypatch, False, tmp_path / "bare.safetensors", tmp_path / "p.safetensors", method="magnitude",
             ratio=0.5, source=src)  # fmt: skip
    # a third-party file takes the fast path with a table from the cache (tests/test_table_cache.py) ...
    fast = _run(monkeypatch, True, tmp_path / "bare.safetensors", tmp_path / "f.safetensors", method="magnitude",
                ratio=0.5, source=src)  # fmt: skip
    assert fast.metrics == r.metrics
    assert (tmp_path / "f.safetensors").read_bytes() == (tmp_path / "p.safetensors").read_bytes()
    monkeypatch.setenv("PRUNECLI_FAST_PRUNE", "1")
    calls = []
    monkeypatch.setattr(PRUNE, "load_input", lambda *a, **k: calls.append(1) or _load_input(*a, **k))
    # ... unless it is not float32 (the model path converts it) or model args are given
    with_args = InputOptions(arch="test_resnet", num_classes=10, model_args={"drop_rate": 0.1})
    for name, opts in (("bare16", src), ("bare", with_args)):
        PRUNE.prune(
            PruneRequest.build(
                checkpoint=str(tmp_path / f"{name}.safetensors"),
                output=tmp_path / "q.safetensors",
                method="magnitude",
                ratio=0.5,
                force=True,
                source=opts,
            )
        )
    assert calls == [1, 1]
    calls.clear()
    # an older prunecli file (no table) and a float16 one also take the model path
    header = read_header(ckpts["test_resnet"])
    meta = json.loads(header.metadata["prunecli"])
    meta.pop("layer_table")
    tensors = _load(ckpts["test_resnet"])
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"format": "pt", "prunecli": json.dumps(meta)})
    half = {n: t.half() if t.is_floating_point() else t for n, t in tensors.items()}
    meta16 = json.loads(header.metadata["prunecli"])
    save_file(half, str(tmp_path / "f16.safetensors"), metadata={"format": "pt", "prunecli": json.dumps(meta16)})
    calls.clear()
    for name in ("old", "f16"):
        PRUNE.prune(
            PruneRequest.build(
                checkpoint=str(tmp_path / f"{name}.safetensors"),
                output=tmp_path / f"{name}_p.safetensors",
                method="magnitude",
                ratio=0.5,
            )
        )
    assert calls == [1, 1]
    # options the table cannot answer take the model path too
    PRUNE.prune(
        PruneRequest.build(
            checkpoint=str(ckpts["test_resnet"]),
            output=tmp_path / "s.safetensors",
            method="magnitude",
            ratio=0.5,
            transforms=PRUNE.DataOptions(input_size=(3, 64, 64)),
        )
    )
    assert calls == [1, 1, 1]


@pytest.mark.parametrize("edit", ["extra", "bias_shape"])
def test_file_that_does_not_fit_its_table_takes_the_model_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ckpts: dict[str, Path], edit: str
) -> None:
    """Tensors that are not exactly the model's: the fast path must not write what loading would refuse."""
    from safetensors.torch import save_file

    header = read_header(ckpts["test_resnet"])
    tensors = _load(ckpts["test_resnet"])
    if edit == "extra":
        tensors["extra.weight"] = torch.ones(3)
    else:
        tensors["fc.bias"] = torch.zeros(11)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=dict(header.metadata))
    monkeypatch.setenv("PRUNECLI_FAST_PRUNE", "1")
    calls: list[int] = []
    monkeypatch.setattr(PRUNE, "load_input", lambda *a, **k: calls.append(1) or _load_input(*a, **k))
    with pytest.raises(CheckpointError, match=r"unexpected|shape"):
        PRUNE.prune(
            PruneRequest.build(
                checkpoint=str(tmp_path / "bad.safetensors"),
                output=tmp_path / "o.safetensors",
                method="magnitude",
                ratio=0.5,
            )
        )
    assert calls == [1] and not (tmp_path / "o.safetensors").exists()


def _load_input(*a: Any, **k: Any) -> Any:
    from prunecli.api._common import load_input

    return load_input(*a, **k)


def test_fast_path_refuses_what_the_model_path_refuses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ckpts: dict[str, Path]
) -> None:
    from safetensors.torch import save_file

    header = read_header(ckpts["improved_cnn"])
    tensors = _load(ckpts["improved_cnn"])
    tensors["fc1.weight"][3, 5] = math.nan
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=dict(header.metadata))
    messages = []
    for fast in (True, False):
        monkeypatch.setenv("PRUNECLI_FAST_PRUNE", "1" if fast else "0")
        with pytest.raises(CheckpointError, match="NaN or infinite") as err:
            PRUNE.prune(
                PruneRequest.build(
                    checkpoint=str(tmp_path / "nan.safetensors"),
                    output=tmp_path / "o.safetensors",
                    method="magnitude",
                    ratio=0.5,
                )
            )
        messages.append(str(err.value))
        with pytest.raises(InputError, match="every weight"):
            PRUNE.prune(
                PruneRequest.build(
                    checkpoint=str(ckpts["improved_cnn"]),
                    output=tmp_path / "o.safetensors",
                    method="magnitude",
                    ratio=0.5,
                    layer_ratios=[("fc1", 0.99999999)],
                )
            )
    assert messages[0] == messages[1]
    assert not (tmp_path / "o.safetensors").exists()


def test_fast_path_never_imports_timm(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['prunecli', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('prunecli', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'timm', 'torchvision'}), file=sys.stderr)\n"
    )
    for arch, extra in (("test_vit", ["--ratio", "0.5", "--scope", "global"]), ("test_resnet", ["--structure", "2:4"])):
        out = tmp_path / f"{arch}.safetensors"
        cmd = [sys.executable, "-c", probe, "prune", str(ckpts[arch]), "--method", "magnitude", *extra, "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr
        assert Path(json.loads(proc.stdout.strip().splitlines()[-1])["checkpoint"]) == out.resolve()
    # the probe does see timm when the model path runs
    cmd = [sys.executable, "-c", probe, "prune", str(ckpts["test_vit"]), "--method", "magnitude", "--ratio", "0.5",
           "-o", str(tmp_path / "m.safetensors")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**_env(), "PRUNECLI_FAST_PRUNE": "0"})
    assert "timm" in proc.stderr.strip().splitlines()[-1]


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


# --------------------------------------------------------------------------- magnitude kernel vs brute force


def _brute(weights: dict[str, torch.Tensor], k: int) -> set[tuple[str, int]]:
    order = list(weights)
    flat = [(abs(v), order.index(n), i) for n, w in weights.items() for i, v in enumerate(w.flatten().tolist())]
    flat.sort()
    return {(order[li], i) for _, li, i in flat[:k]}


@pytest.mark.parametrize("seed", range(6))
def test_magnitude_kernel_matches_brute_force(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (37, 11), "b.weight": (6, 4, 3, 3), "c.weight": (300,)}
    # exact ties across layers, ±0.0, subnormals, values in one high-16-bit bin and far apart
    palette = torch.tensor([-0.0, 0.0, 1e-41, -1e-41, 0.5, -0.5, 0.50000006, -0.5000001, 0.50001, 3.0, -3e38, 1e-3])
    src = {n: palette[torch.randint(len(palette), s, generator=gen)] for n, s in shapes.items()}
    if seed % 2:  # continuous values too
        src = {
            n: torch.where(torch.rand(t.shape, generator=gen) < 0.5, t, torch.randn(t.shape, generator=gen))
            for n, t in src.items()
        }
    total = sum(t.numel() for t in src.values())
    for k in (1, 7, total // 4, total // 2, (3 * total) // 4):
        w = {n: t.clone() for n, t in src.items()}
        expect = _brute(src, k)
        if any(sum(1 for e in expect if e[0] == n) == t.numel() for n, t in w.items()):
            continue
        nonzero: dict[str, int] = {}
        removed = prune_unstructured(w, None, [Scope(tuple(shapes), k, k / total)], nonzero=nonzero)
        for n, t in w.items():
            flat, orig = t.flatten(), src[n].flatten()
            gone = {i for (m, i) in expect if m == n}
            assert removed[n] == len(gone)
            for i in range(flat.numel()):
                want = orig[i] * 0.0 if i in gone else orig[i]  # a removed weight is w·0: keeps its sign
                assert flat[i].view(torch.int32) == want.view(torch.int32), (n, i, k)
            if n in nonzero:
                assert nonzero[n] == int((t != 0).sum())
        # the generic path (explicit |w| scores) selects the same weights
        g = {n: t.clone() for n, t in src.items()}
        prune_unstructured(g, lambda n, g=g: src[n].abs(), [Scope(tuple(shapes), k, k / total)])
        assert all(torch.equal(g[n].view(torch.int32), w[n].view(torch.int32)) for n in w)


def test_magnitude_kernel_layer_scope_and_empty_layer() -> None:
    gen = torch.Generator().manual_seed(9)
    w = {"a.weight": torch.randn(50, 20, generator=gen), "b.weight": torch.randn(7, 3, generator=gen)}
    src = {n: t.clone() for n, t in w.items()}
    prune_unstructured(w, None, plan_scopes({n: t.numel() for n, t in w.items()}, 0.35, "layer"))
    for n, t in src.items():
        k = round(0.35 * t.numel())
        assert {i for (_, i) in _brute({n: t}, k)} == set((w[n].flatten() == 0).nonzero().flatten().tolist())
    weights = {"a.weight": torch.full((10,), 5.0), "b.weight": torch.full((4,), 0.1)}
    with pytest.raises(InputError, match=r"every weight of 'b\.weight'"):
        prune_unstructured(weights, None, plan_scopes({"a.weight": 10, "b.weight": 4}, 0.5, "global"))


# --------------------------------------------------------------------------- helpers


def _count_positions(positions: dict[str, int], name: str) -> Any:
    """Hook: output positions per output channel (linear: tokens; conv: H_out·W_out), summed over calls."""

    def hook(mod: nn.Module, _args: object, out: torch.Tensor) -> None:
        n = out[0].numel() // out.shape[-1] if isinstance(mod, nn.Linear) else out.shape[-1] * out.shape[-2]
        positions[name] = positions.get(name, 0) + n

    return hook


def _convs_and_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
