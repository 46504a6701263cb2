"""The layer table: what weight pruning needs to know about a model, stored in the checkpoint itself.

Unstructured and N:M pruning need little from the model: which tensors are prunable (conv/linear
weights), which of them form the classifier head (excluded by default), how many MACs each weight
element costs (the output positions per output channel of its layer, from the layer trace), and
which state-dict entries are buffers rather than parameters (for the parameter counts). prunecli
writes this table into the manifest of every checkpoint it saves from a model
(:func:`build_layer_table`), so a later ``prune --structure unstructured|N:M`` of that file can read
the tensors with safetensors and never import timm or rebuild the model (``api/prune.py``'s fast
path). Third-party files (timm folders, train.py files, bare state dicts) get the table the model
path would write from the layer-table cache, built once per architecture
(:mod:`prunecli.checkpoint.table_cache`); older prunecli files without a table take the model path.

Schema (``manifest.layer_table``, JSON; ``version`` :data:`TABLE_VERSION`)::

    {"version": 1,
     "input_size": [3, 224, 224],        # C, H, W of the MAC count (the data config's input size)
     "num_features": 768,                # model.num_features (a folder output's config.json), or null
     "buffers": ["bn1.running_mean", …], # state-dict names that are not parameters, sorted
     "state_digest": "9f2c…",            # sha256 of the sorted "name:shape" lines of the whole state dict
     "layers": [                         # prunable weights in module definition order (the tie-break order)
        {"name": "blocks.0.attn.qkv.weight", "kind": "linear", "shape": [2304, 768],
         "head": false, "macs_per_weight": 197}, …]}

``kind`` is ``conv`` (Conv1d/2d/3d and subclasses) or ``linear``; ``head`` marks the classifier
modules of :func:`prunecli.prunable.classifier_modules`; ``macs_per_weight`` is
:class:`prunecli.tracing.LayerTrace` ``positions`` for one sample at ``input_size`` (0 for a layer
the forward pass never runs), so ``macs = Σ macs_per_weight · numel`` as in
:func:`prunecli.tracing.count_macs`.

The table is only written when it is exact: no LoRA adapters beside the weights, no two state
tensors sharing memory (a tied weight pruned through one name would change the other), and a layer
trace that runs on the ``meta`` device (so saving never pays for a real forward pass). Readers check
``version`` and ``state_digest`` against the file's tensor names and shapes: a file whose tensors are
not exactly the model's (where loading the model would fail) never takes the fast path. The table is
input like the rest of the file: before any reader sees it, :mod:`prunecli.checkpoint.validate`
refuses a table whose entries contradict the tensors (a name not in the file or listed twice, a
buffer or a non-``.weight`` tensor as a layer, a ``kind`` its shape cannot have — Linear 2-D, Conv
3-5-D —, a shape that differs, head flags against ``pretrained_cfg['classifier']``), since the
digest covers names and shapes but not which tensors the table calls layers.

This module is torch-free at import time (``inspect`` may read tables without torch).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["TABLE_VERSION", "LayerEntry", "LayerTable", "build_layer_table", "state_digest"]

_LOG = logging.getLogger("prunecli")

TABLE_VERSION = 1


@dataclass(frozen=True)
class LayerEntry:
    """One prunable weight of the table (see the module docstring for the fields)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    head: bool
    macs_per_weight: int

    @property
    def module(self) -> str:
        """The module name (``blocks.0.attn.qkv``)."""
        return self.name.removesuffix(".weight")


@dataclass(frozen=True)
class LayerTable:
    """A parsed, version-checked layer table."""

    input_size: tuple[int, ...]
    num_features: int | None
    buffers: tuple[str, ...]
    layers: tuple[LayerEntry, ...]
    state_digest: str

    @classmethod
    def parse(cls, doc: Any) -> LayerTable | None:
        """The table of a manifest (``manifest.layer_table``); None when absent, malformed or of another version."""
        if not isinstance(doc, Mapping) or doc.get("version") != TABLE_VERSION:
            return None
        try:
            layers = tuple(
                LayerEntry(
                    str(e["name"]), str(e["kind"]), tuple(int(d) for d in e["shape"]), bool(e["head"]),
                    int(e["macs_per_weight"]),
                )
                for e in doc["layers"]
            )  # fmt: skip
            nf = doc.get("num_features")
            return cls(
                tuple(int(s) for s in doc["input_size"]),
                int(nf) if nf is not None else None,
                tuple(str(b) for b in doc["buffers"]),
                layers,
                str(doc["state_digest"]),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def fits(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        """True when ``shapes`` (tensor name → shape) are exactly the state dict the table was built from."""
        return state_digest(shapes) == self.state_digest and all(
            tuple(shapes.get(e.name, ())) == e.shape for e in self.layers
        )


def state_digest(shapes: Mapping[str, Sequence[int]]) -> str:
    """sha256 of the sorted ``name:d0,d1,…`` lines: the identity of a state dict's names and shapes."""
    import hashlib

    lines = "\n".join(f"{n}:{','.join(str(int(d)) for d in shapes[n])}" for n in sorted(shapes))
    return hashlib.sha256(lines.encode()).hexdigest()


def build_layer_table(model: Any, manifest: Any, state: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The layer table of ``model`` as it will be rebuilt from ``manifest``; None where it would not be exact.

    Never raises: a model the table cannot describe is simply saved without one (later steps take
    the model path).

    Args:
        model: the ``nn.Module`` being saved.
        manifest: the manifest it is saved with (its ``pretrained_cfg`` decides the head and the
            input size, as it does when the checkpoint is loaded again).
        state: ``model.state_dict()`` when the caller has it already.
    """
    try:
        return _build(model, manifest, state)
    except Exception as exc:  # a table is an optimisation; saving must not fail for it
        _LOG.debug("no layer table for %s: %s", getattr(manifest, "arch", "?"), exc)
        return None


def _build(model: Any, manifest: Any, state: Mapping[str, Any] | None) -> dict[str, Any] | None:
    from torch import nn

    from prunecli.prunable import classifier_modules, prunable_layers

    if manifest.adapters:
        return None
    state = model.state_dict() if state is None else state
    storages: set[int] = set()
    for t in state.values():
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages:
                return None  # tied or overlapping tensors
            storages.add(ptr)
    params = {n for n, _ in model.named_parameters()}
    layers = prunable_layers(model)
    if any(f"{n}.weight" not in params or f"{n}.weight" not in state for n in layers):
        return None
    # The head as the loader will see it: build_model sets model.pretrained_cfg from the manifest when it has one.
    cfg = dict(manifest.pretrained_cfg) or dict(getattr(model, "pretrained_cfg", None) or {})
    head = set(classifier_modules(_WithConfig(model, cfg)))
    input_size = _input_size(manifest.pretrained_cfg)
    from prunecli.tracing import trace_layers

    trace = trace_layers(model, input_size, cpu_fallback=False)  # the table never pays for a real forward pass
    if trace is None:
        return None
    positions = trace.positions
    nf = getattr(model, "num_features", None)
    return {
        "version": TABLE_VERSION,
        "input_size": list(input_size),
        "num_features": nf if isinstance(nf, int) else None,
        "buffers": sorted(n for n in state if n not in params),
        "state_digest": state_digest({n: tuple(t.shape) for n, t in state.items()}),
        "layers": [
            {
                "name": f"{n}.weight",
                "kind": "conv" if isinstance(m, nn.modules.conv._ConvNd) else "linear",
                "shape": list(m.weight.shape),
                "head": n in head,
                "macs_per_weight": int(positions.get(n, 0)),
            }
            for n, m in layers.items()
        ],
    }


class _WithConfig:
    """``model`` seen with another ``pretrained_cfg`` (for :func:`prunecli.prunable.classifier_modules`)."""

    def __init__(self, model: Any, cfg: dict[str, Any]) -> None:
        self._model = model
        self.pretrained_cfg = cfg

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _input_size(pretrained_cfg: Mapping[str, Any]) -> tuple[int, ...]:
    """The MAC count's input size, exactly as ``prune`` resolves it without ``--input-size``."""
    from prunecli.data import data_config

    return tuple(int(s) for s in data_config(dict(pretrained_cfg))["input_size"])
