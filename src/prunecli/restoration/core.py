"""What every restoration method shares: the kept/pruned channels, the producer's dense statistics,
and the one consumer update of docs/restoration.md.

A method computes, for each pruned producer, a coefficient matrix ``S'`` (``|J| × p``: how much of
pruned channel ``j`` each kept channel ``i`` takes over) and :meth:`RestoreContext.compensate` folds it
into every consumer of the channels::

    W_new[:, P] = W_pruned[:, P] + W_dense[kept rows][:, J] · S'

(conv: on the input-channel axis; linear after Flatten: per ``H·W`` block). The consumer's dense rows
are taken at its own kept output indices, so a consumer that was itself pruned works. The pruned
model is only ever *added to*: it need not equal the dense model sliced (a fine-tuned or already
bias-compensated pruned model keeps its changes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunecli.errors import CheckpointError
from prunecli.restoration.graph import Consumer, Group, Pair, PairMap

__all__ = [
    "ProducerStats",
    "RestoreContext",
    "Unit",
    "channel_plan",
    "pruned_producers",
    "reconstruction_errors",
]

log = logging.getLogger("prunecli.restoration")

_ACT_FN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda t: t,
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "hardswish": F.hardswish,
    "relu6": F.relu6,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "elu": F.elu,
    "mish": F.mish,
    "softplus": F.softplus,
}


def channel_plan(structure: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The ``structure["channels"]`` map of a channel-pruned manifest, validated.

    Format (written by ``prune --structure channel``): ``{module: {"out": {"kept": [...], "dense": C},
    "in": {"kept": [...], "dense": C_in}}}`` with sorted indices into the dense parent's axis.

    Raises:
        CheckpointError: the structure is missing or malformed.
    """
    channels = (structure or {}).get("channels") if isinstance(structure, Mapping) else None
    if not isinstance(channels, Mapping) or not channels:
        raise CheckpointError("the checkpoint records no channel-pruned structure")
    plan: dict[str, dict[str, Any]] = {}
    for name, entry in channels.items():
        if not isinstance(entry, Mapping):
            raise CheckpointError(f"structure entry {name!r} is not a mapping")
        plan[name] = {}
        for axis in ("out", "in"):
            if axis not in entry or entry[axis] is None:
                continue
            kept, dense = entry[axis].get("kept"), entry[axis].get("dense")
            if not isinstance(kept, list) or not isinstance(dense, int):
                raise CheckpointError(f"structure entry {name!r}/{axis} needs 'kept' (list) and 'dense' (int)")
            if sorted(set(kept)) != list(kept) or (kept and (kept[0] < 0 or kept[-1] >= dense)):
                raise CheckpointError(f"structure entry {name!r}/{axis}: kept indices must be sorted, unique, < dense")
            plan[name][axis] = {"kept": [int(k) for k in kept], "dense": dense}
    return plan


def pruned_producers(plan: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[list[int], int]]:
    """Module name → (kept output indices, dense width) for every module that lost output channels."""
    out = {}
    for name, entry in plan.items():
        o = entry.get("out")
        if o is not None and len(o["kept"]) < o["dense"]:
            out[name] = (o["kept"], o["dense"])
    return dict(sorted(out.items()))


@dataclass
class ProducerStats:
    """Dense producer filters and BatchNorm statistics, float64 (docs/restoration.md).

    Attributes:
        weight: ``C × d`` flattened dense filters (full fan-in).
        bias: ``C`` producer bias (zeros if none). With BN it is folded into ``mean``.
        gamma, beta, mean, var, eps: the BN after the producer (None without BN).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    gamma: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    var: torch.Tensor | None = None
    eps: float = 0.0

    @property
    def has_bn(self) -> bool:
        return self.gamma is not None

    def pre_activation_constant(self, j: int) -> float:
        """The value of channel ``j`` when its filter (or γ) is zero: a constant channel (docs/restoration.md)."""
        if not self.has_bn:
            return float(self.bias[j])
        if float(self.gamma[j]) == 0.0:
            return float(self.beta[j])
        sigma = float(torch.sqrt(self.var[j] + self.eps))
        return float(self.gamma[j] * (self.bias[j] - self.mean[j]) / sigma + self.beta[j])


@dataclass
class Unit:
    """One group the data-free methods restore: its producers' pairs and the shared kept/pruned channels.

    Attributes:
        group: the group (``block`` or ``stream``).
        pair: the producer's pair; for a stream, one pair whose consumers are the union of its members'.
        members: each producer's own pair (one for a ``block``).
        kept, pruned: the dense indices of the kept and pruned channels (the same for every member).
    """

    group: Group
    pair: Pair
    members: list[Pair]
    kept: list[int]
    pruned: list[int]


def _joint_pair(members: Sequence[Pair]) -> Pair:
    """One pair for the whole group: the first producer's, reading into every member's consumers."""
    if len(members) == 1:
        return members[0]
    consumers: dict[str, Consumer] = {}
    for m in members:
        for c in m.consumers:
            consumers.setdefault(c.name, c)
    acts = {m.activation for m in members} - {"identity"}
    first = members[0]
    return Pair(first.producer, None, next(iter(acts)) if len(acts) == 1 else "identity",
                sorted({w for m in members for w in m.approximate}),
                [consumers[k] for k in sorted(consumers)], stream=True)  # fmt: skip


@dataclass
class RestoreContext:
    """The models and bookkeeping one restoration run works on.

    Attributes:
        pruned: the channel-pruned model, rewritten in place.
        dense: the dense parent (None for methods that do not need it, e.g. ``bn``).
        plan: :func:`channel_plan` of the pruned model's structure.
        pairs: producer → consumer paths of the dense model (None when no dense model is needed).
        calib: calibration input batches (CPU tensors), or None.
        device: where data-driven methods run.
        warnings: messages for the record (also logged).
        layers: per-producer report rows, filled by the methods.
        outcomes: group name → method → ``restored`` or ``skipped: why`` (:meth:`done`, :meth:`skip`).
        method: the name of the method running now.
    """

    pruned: nn.Module
    dense: nn.Module | None
    plan: dict[str, dict[str, Any]]
    pairs: PairMap | None = None
    calib: list[torch.Tensor] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    warnings: list[str] = field(default_factory=list)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    outcomes: dict[str, dict[str, str]] = field(default_factory=dict)
    method: str = ""
    _warned: set[str] = field(default_factory=set)

    def calib_samples(self, samples: int) -> list[torch.Tensor]:
        """The first ``samples`` calibration images, as batches (the last one cut short)."""
        out: list[torch.Tensor] = []
        n = 0
        for b in self.calib or ():
            if n >= samples:
                break
            out.append(b[: samples - n])
            n += len(out[-1])
        return out

    def warn(self, message: str) -> None:
        """Records and logs ``message`` once."""
        if message not in self._warned:
            self._warned.add(message)
            self.warnings.append(message)
            log.warning(message)

    def restorable(self, *, quiet: bool = False) -> list[Unit]:
        """Every group the data-free methods can restore, as a :class:`Unit`; warns once per reason for the rest.

        ``quiet``: no warnings about the data-free methods' limits (``lstsq`` refits those layers too).

        One warning per reason, naming every layer it applies to (a ViT refuses the same residual
        stream in every block). Norms and parameters pruned with the residual stream (``cls_token``) are
        not producers; a pruned head has no consumer to compensate: neither is warned about. Attention
        groups are returned by :meth:`attention_units`.
        """
        assert self.pairs is not None
        producers = pruned_producers(self.plan)
        found = []
        refused: dict[str, list[str]] = {}
        approximate: dict[str, list[str]] = {}
        for name, reason in self.pairs.refused.items():
            if name in producers and "no conv/linear consumer" not in reason:
                refused.setdefault(reason, []).append(name)
        for group in self.pairs.groups:
            if group.kind == "attention" or group.reason is not None:
                continue
            members = [self.pairs.pairs[n] for n in group.producers if n in self.pairs.pairs and n in producers]
            if not members:
                continue
            kept, dense = producers[members[0].producer]
            if any(producers[m.producer] != (kept, dense) for m in members):
                why = "the producers of this residual stream keep different channels"
                self.skip(group, why)
                refused.setdefault(why, []).extend(m.producer for m in members)
                continue
            for m in members:
                for why in m.approximate:
                    approximate.setdefault(why, []).append(m.producer)
            if group.kind == "stream":
                approximate.setdefault("a residual add", []).append(group.producers[0])
            pruned = sorted(set(range(dense)) - set(kept))
            found.append(Unit(group, _joint_pair(members), members, list(kept), pruned))
        if quiet:
            return found
        for reason, names in refused.items():
            self.warn(f"{_layer_list(names)}: not restored: {reason}")
        for why, names in approximate.items():
            self.warn(f"{_layer_list(names)}: restoration is approximate ({why} between it and its consumers)")
        return found

    def attention_units(self) -> list[tuple[Group, list[int]]]:
        """(group, kept ``qkv`` output indices) for every fused-qkv attention whose ``qkv`` lost outputs."""
        if self.pairs is None:
            return []
        producers = pruned_producers(self.plan)
        return [(g, producers[g.producers[0]][0]) for g in self.pairs.groups
                if g.kind == "attention" and g.producers[0] in producers]  # fmt: skip

    def done(self, group: Group, method: str, outcome: str = "restored") -> None:
        """Records what ``method`` did to ``group`` (the record's ``groups``: no group silently left out)."""
        self.outcomes.setdefault(group.name, {})[method] = outcome

    def skip(self, group: Group, reason: str) -> None:
        """Records that the running method left ``group`` as pruned, and why."""
        self.outcomes.setdefault(group.name, {})[self.method] = f"skipped: {reason}"

    def stream_stats(self, unit: Unit) -> ProducerStats:
        """The stream's channels as one regression problem: each producer's post-norm affine map, stacked.

        Producer ``p`` writes ``n_k = ŵ_k·x_p + b̂_k`` into the stream (``ŵ = γ/σ·w``,
        ``b̂ = β − γ/σ·(μ − b)`` with its BatchNorm; ``w``, ``b`` without). The stream channel is a sum
        of such terms, so coefficients ``s`` with ``[ŵ_j; b̂_j] = Σ_i s_i [ŵ_i; b̂_i]`` for *every*
        producer make channel ``j`` the same combination of the kept channels everywhere along the
        stream (docs/restoration.md). Returned without BatchNorm (bias zero): the ridge form of LBYL.
        """
        parts = []
        for pair in unit.members:
            st = self.producer_stats(pair)
            if st.has_bn:
                scale = st.gamma / torch.sqrt(st.var + st.eps)
                parts += [st.weight * scale[:, None], (st.beta - scale * st.mean)[:, None]]
            else:
                parts += [st.weight, st.bias[:, None]]
        w = torch.cat(parts, dim=1)
        return ProducerStats(w, torch.zeros(len(w), dtype=torch.float64))

    def producer_stats(self, pair: Pair) -> ProducerStats:
        """Dense filters, bias and BN of ``pair.producer`` in float64."""
        assert self.dense is not None
        mod = self.dense.get_submodule(pair.producer)
        w = mod.weight.detach().to(torch.float64).reshape(mod.weight.shape[0], -1).cpu()
        b = mod.bias.detach().to(torch.float64).cpu() if getattr(mod, "bias", None) is not None else torch.zeros(len(w))
        if pair.norm is None:
            return ProducerStats(w, b.double())
        bn = self.dense.get_submodule(pair.norm)
        c = len(w)
        gamma = bn.weight.detach().double().cpu() if bn.weight is not None else torch.ones(c, dtype=torch.float64)
        beta = bn.bias.detach().double().cpu() if bn.bias is not None else torch.zeros(c, dtype=torch.float64)
        if bn.running_mean is None or bn.running_var is None:
            raise CheckpointError(f"{pair.norm}: BatchNorm without running statistics cannot be restored")
        mean = bn.running_mean.detach().double().cpu() - b  # fold the producer bias into μ (docs/restoration.md)
        return ProducerStats(w, b, gamma, beta, mean, bn.running_var.detach().double().cpu(), float(bn.eps))

    def constant_channels(self, stats: ProducerStats, pruned: Sequence[int]) -> dict[int, float]:
        """Pruned channels whose filter or γ is zero: index → their constant pre-activation value."""
        norms = stats.weight.norm(dim=1)
        scale = float(norms.max()) if len(norms) else 0.0
        out = {}
        for j in pruned:
            zero_gamma = stats.has_bn and abs(float(stats.gamma[j])) <= 1e-12 * max(1.0, float(stats.gamma.abs().max()))
            if zero_gamma or float(norms[j]) <= 1e-12 * max(scale, 1e-30):
                out[j] = stats.pre_activation_constant(j)
        return out

    def compensate(
        self,
        pair: Pair,
        kept: Sequence[int],
        pruned: Sequence[int],
        s_prime: torch.Tensor,
        constants: Mapping[int, float] | None = None,
    ) -> list[str]:
        """Folds ``S'`` (``|J| × p``) into every consumer of ``pair``; returns the consumers updated.

        ``constants`` (pruned channel → constant pre-activation value) adds ``act(const)`` times the
        consumer's spatial weight sums to its bias (or to the following BN's running mean when the
        consumer has no bias), exact away from zero-padding borders (docs/restoration.md).
        """
        assert self.dense is not None
        done = []
        for cons in pair.consumers:
            dmod, pmod = self.dense.get_submodule(cons.name), self.pruned.get_submodule(cons.name)
            rows = self._rows(cons.name, dmod.weight.shape[0])
            wd = dmod.weight.detach().to(torch.float64).cpu()[rows]
            o = wd.shape[0]
            if tuple(pmod.weight.shape[:1]) != (o,):
                raise CheckpointError(
                    f"{cons.name}: pruned weight has {pmod.weight.shape[0]} output rows, the structure keeps {o}"
                )
            c_dense = wd.shape[1] // cons.block
            wd3 = wd.reshape(o, c_dense, cons.block, -1)  # (out, channel, block, kernel)
            cols = self._columns(cons.name, kept, cons.block, pmod.weight.shape[1], wd.shape[1])
            delta = torch.einsum("ojbk,jp->opbk", wd3[:, list(pruned)], s_prime.to(torch.float64))
            with torch.no_grad():
                w = pmod.weight
                flat = w.reshape(o, w.shape[1], -1) if cons.block == 1 else w.reshape(o, -1, 1)
                upd = delta.reshape(o, len(kept) * cons.block, -1).to(w.dtype).to(w.device)
                flat[:, cols] += upd
                if constants:
                    act = _ACT_FN.get(pair.activation, _ACT_FN["identity"])
                    vals = act(torch.tensor(list(constants.values()), dtype=torch.float64))
                    shift = torch.einsum("ojbk,j->o", wd3[:, list(constants)], vals)
                    self.add_bias(cons.name, pmod, shift)
            done.append(cons.name)
        return done

    def _rows(self, name: str, dense_rows: int) -> list[int]:
        o = self.plan.get(name, {}).get("out")
        return list(o["kept"]) if o is not None else list(range(dense_rows))

    def _columns(self, name: str, kept: Sequence[int], block: int, pruned_in: int, dense_in: int) -> list[int]:
        """Positions on the pruned consumer's input axis of the kept producer channels (block-expanded)."""
        entry = self.plan.get(name, {}).get("in")
        wanted = [k * block + t for k in kept for t in range(block)]
        if entry is None:
            if pruned_in == len(wanted):
                return list(range(len(wanted)))
            if pruned_in == dense_in:
                return wanted
            raise CheckpointError(f"{name}: the structure records no kept input indices and the widths do not fit")
        pos = {d: i for i, d in enumerate(entry["kept"])}
        missing = [d for d in wanted if d not in pos]
        if missing:
            raise CheckpointError(f"{name}: input column {missing[0]} of a kept producer channel is not kept")
        return [pos[d] for d in wanted]

    def add_bias(self, name: str, mod: nn.Module, shift: torch.Tensor) -> None:
        """Adds ``shift`` to ``mod``'s bias, or subtracts it from the running mean of the BatchNorm after it."""
        if getattr(mod, "bias", None) is not None:
            mod.bias.add_(shift.to(mod.bias.dtype).to(mod.bias.device))
            return
        norm = self.pairs.norm_after.get(name) if self.pairs is not None else None
        if norm is not None:
            bn = self.pruned.get_submodule(norm)
            if bn.running_mean is not None and bn.running_mean.shape == shift.shape:
                bn.running_mean.sub_(shift.to(bn.running_mean.dtype).to(bn.running_mean.device))
                return
        self.warn(f"{name}: a constant pruned channel could not be folded (no bias, no BatchNorm after it)")


def _layer_list(names: Sequence[str], shown: int = 4) -> str:
    """``a, b, c, d and 8 more``: the layers a warning is about, short enough for one line."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def _consumer_outputs(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs of modules ``names`` on one batch (no generator: grad mode must not leak across yields)."""
    store: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda _m, _i, out, n=n: store.__setitem__(n, out.detach()))
        for n in names
    ]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return store


def reconstruction_errors(
    dense: nn.Module,
    models: Mapping[str, nn.Module],
    plan: Mapping[str, Mapping[str, Any]],
    consumers: Sequence[str],
    batches: Sequence[torch.Tensor],
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """Relative error ``‖Y − Y_dense‖ / ‖Y_dense‖`` of each consumer's output (pre-activation), per model.

    The dense output is taken at the consumer's kept output rows. Returns ``{consumer: {key: error}}``
    for each key of ``models`` (e.g. ``before`` and ``after``).
    """
    names = sorted(set(consumers))
    if not names or not batches:
        return {}
    channel_dim1 = {n: isinstance(dense.get_submodule(n), nn.Conv2d) for n in names}
    num = {k: dict.fromkeys(names, 0.0) for k in models}
    den = dict.fromkeys(names, 0.0)
    for m in (dense, *models.values()):
        m.eval().to(device)
    for xb in batches:
        xb = xb.to(device)
        ref = _consumer_outputs(dense, names, xb)
        outs = {k: _consumer_outputs(m, names, xb) for k, m in models.items()}
        for n in names:
            o = plan.get(n, {}).get("out")
            y = ref[n].double()
            if o is not None:
                y = y[:, o["kept"]] if channel_dim1[n] else y[..., o["kept"]]
            den[n] += float((y**2).sum())
            for k in models:
                num[k][n] += float(((outs[k][n].double() - y) ** 2).sum())
    return {n: {k: (num[k][n] / den[n]) ** 0.5 if den[n] > 0 else float("nan") for k in models} for n in names}
