"""The fast path's input: a checkpoint read as raw tensors plus its layer table, no model built.

Used by ``prunecli prune`` (see :mod:`prunecli.api.prune`, "Fast path") for unstructured and N:M
pruning with magnitude scores or a scores file. ``fast_input`` returns None whenever the model path
must run instead; ``no_cache`` is ``--no-cache`` (the layer-table cache of third-party checkpoints).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prunecli.requests import ModelSource, Transforms

__all__ = ["MAGNITUDE", "FastInput", "fast_input"]

MAGNITUDE = frozenset({"magnitude", "l1", "l2"})
"""Criterion names computed on the fly as |w| (the L1 and L2 norms of one weight rank alike)."""


@dataclasses.dataclass
class FastInput:
    """A checkpoint read for the fast path: tensors straight from the file, the model described by its table.

    ``mapped``: the tensors are read-only views of the file (magnitude pruning plans on them and masks
    each pruned tensor while writing it, ``transform``); otherwise they are a private copy, pruned in
    place. ``sha``: a future of the input's sha256 while it is being hashed.
    """

    loaded: Any  # prunecli.checkpoint.loaders.Loaded with model=None
    tensors: dict[str, Any]
    table: Any  # prunecli.layertable.LayerTable
    mapped: bool = False
    sha: Any = None
    transform: dict[str, Any] | None = None

    def input_sha256(self) -> str:
        """The input's digest (waits for the hashing thread); also what the lineage records."""
        if self.sha is not None:
            from prunecli.checkpoint.hashing import remember_sha256

            self.loaded._sha = self.sha.result()
            remember_sha256(self.loaded.source.weights, self.loaded._sha)
            self.sha = None
        return str(self.loaded._sha)

    def writable(self, names: Sequence[str]) -> None:
        """Private copies of ``names`` (for in-place pruning of a mapped input)."""
        self.tensors.update({n: self.tensors[n].clone() for n in names})


def fast_input(
    spec: str,
    *,
    kind: str,
    method: str | None,
    scores: Path | None,
    compensate: str | None,
    inputs: ModelSource | None,
    dopts: Transforms | None,
    out: tuple[str | Path, bool],
    no_cache: bool = False,
) -> FastInput | None:
    """Reads CKPT for the fast path (module docstring) when the run allows it; None → the model path.

    Every condition is one under which the model path would compute exactly what the table and the
    raw tensors give: weight scores that need no model (magnitude on the fly, or a scores file), no
    bias compensation (it needs the BatchNorm modules), the MAC count at the table's input size,
    float32 tensors (the model path converts others to float32), and a table that fits the file.
    """
    if os.environ.get("PRUNECLI_FAST_PRUNE", "1") == "0" or kind not in ("unstructured", "nm") or compensate:
        return None
    if scores is None and (method or "").lower() not in MAGNITUDE:
        return None
    if (inputs is not None and inputs.model_args) or (dopts is not None and dopts.input_size):
        return None
    from prunecli.checkpoint.sources import SourceKind, resolve_source
    from prunecli.checkpoint.validate import manifest_from_header
    from prunecli.layertable import LayerTable

    source = resolve_source(spec)
    header = source.header
    if source.kind is not SourceKind.PRUNECLI or header is None:
        return None
    manifest = manifest_from_header(header, where=source.spec)  # metadata checked against the tensors
    table = LayerTable.parse(manifest.layer_table)
    if table is None or manifest.adapters or not table.fits({t.name: t.shape for t in header.tensors}):
        return None
    if any(t.dtype in _FLOAT_DTYPES and t.dtype != "F32" for t in header.tensors):
        return None
    from prunecli.checkpoint.hashing import remember_sha256
    from prunecli.checkpoint.loaders import Loaded
    from prunecli.checkpoint.loaders import check_finite as _check_finite
    from prunecli.checkpoint.safetensors_io import map_safetensors_hashed, read_safetensors_hashed
    from prunecli.checkpoint.writer import check_output

    check_output(out[0], force=out[1], inputs=[source.path, source.weights])  # before reading a large file
    assert source.weights is not None
    # Magnitude pruning needs no writable weights (MagnitudeMasks): map the file instead of copying it.
    mapped = map_safetensors_hashed(header) if kind == "unstructured" and scores is None else None
    if mapped is not None:
        tensors, future = mapped
        fast = FastInput(Loaded(None, manifest, source), tensors, table, mapped=True, sha=future)  # type: ignore[arg-type]
    else:
        tensors, sha = read_safetensors_hashed(header)
        remember_sha256(source.weights, sha)
        fast = FastInput(Loaded(None, manifest, source, _sha=sha), tensors, table)  # type: ignore[arg-type]
    try:
        _check_finite(tensors, source.spec)
    except BaseException:
        fast.input_sha256()  # let the hashing thread finish before the error unwinds
        raise
    return fast


_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4"})
