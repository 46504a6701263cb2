"""Producer → consumer pairs of a (dense) model: which layers read the output channels of which.

Restoration (docs/restoration.md) rewrites the *consumers* of a pruned layer's channels, so it must know,
for every producer (a Conv2d or Linear whose output channels were pruned), the BatchNorm directly
after it, the operations between it and its consumers, and how one producer channel maps onto the
consumer's input axis (one input channel for a conv, one column for a linear, a contiguous block of
``H·W`` columns after ``Flatten``). The graph comes from Torch-Pruning's dependency graph (built by
:func:`prunecli.depgraph.build_graph`; no home-made tracer); this module only walks it and classifies
the operations on the way:

* BatchNorm right after the producer → the producer's BN (folded into the LBYL algebra);
* ReLU-like activations, average pooling, Flatten/reshape → exact for LBYL's theory;
* other activations (GELU, SiLU, …) and max pooling → allowed, marked approximate;
* a residual add → the walk goes on: the channels are a *residual stream*, and every producer whose
  walk meets the same add node is in the same stream :class:`Group` (a ResNet stage: the stem or the
  downsample conv and every block's last conv), restored jointly into the union of their consumers;
* anything that mixes channels (concat, LayerNorm, a BN after the activation, grouped/depthwise convs
  as consumers) → the producer is refused with a reason; a stream with one refused member is refused
  as a whole (its coefficients must be shared by every producer that writes it);
* the fused ``qkv`` Linear of a timm attention module (``qkv``, ``proj``, ``num_heads``) is not walked:
  its value dimensions are restored per head into ``proj`` (:mod:`prunecli.restoration.attention`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["AttentionSpec", "Consumer", "Group", "Pair", "PairMap", "find_pairs"]

log = logging.getLogger(__name__)

# grad_fn names of single-input ops, by how they affect restoration.
_RELU_LIKE = {"ReluBackward0", "ReluBackward1", "ThresholdBackward0", "LeakyReluBackward0", "LeakyReluBackward1"}
_APPROX_ACT = {
    "GeluBackward0": "gelu",
    "SiluBackward0": "silu",
    "HardswishBackward0": "hardswish",
    "HardtanhBackward0": "relu6",
    "SigmoidBackward0": "sigmoid",
    "TanhBackward0": "tanh",
    "EluBackward0": "elu",
    "MishBackward0": "mish",
    "SoftplusBackward0": "softplus",
}
_LINEAR_OPS = {
    "AvgPool2DBackward0",
    "AvgPool1DBackward0",
    "AdaptiveAvgPool2DBackward0",
    "AdaptiveAvgPool1DBackward0",
    "MeanBackward0",
    "MeanBackward1",
    "CloneBackward0",
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
    "FlattenBackward0",
    "AddmmBackward0",  # Torch-Pruning's node for a Linear applied to a (B, T, C) input
    "MmBackward0",
    "NativeDropoutBackward0",
}
_MAX_POOL = {"MaxPool2DWithIndicesBackward0", "MaxPool1DWithIndicesBackward0", "AdaptiveMaxPool2DBackward0"}


@dataclass(frozen=True)
class Consumer:
    """A layer that reads a producer's output channels.

    Attributes:
        name: module name of the consumer (Conv2d with groups=1, or Linear).
        block: consumer input features per producer channel (1, or H·W after Flatten).
    """

    name: str
    block: int = 1


@dataclass
class Pair:
    """A producer and everything restoration needs to know about the path to its consumers.

    Attributes:
        producer: module name of the Conv2d/Linear whose output channels are pruned.
        norm: the BatchNorm directly after it, or None (docs/restoration.md: the form without BatchNorm).
        activation: ``relu`` (positively homogeneous: the identity of docs/restoration.md holds), ``identity`` (no
            activation: the identity is exact), or the name of an approximate one (``gelu``…).
        approximate: reasons why restoration is only approximate (non-ReLU activation, max pooling).
        consumers: every layer that reads the channels.
        stream: the channels reach a residual add (they are part of a residual stream).
    """

    producer: str
    norm: str | None = None
    activation: str = "identity"
    approximate: list[str] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    stream: bool = False


@dataclass(frozen=True)
class AttentionSpec:
    """A timm attention module with a fused ``qkv`` Linear (ViT, DeiT, EVA, BEiT, …).

    Attributes:
        module: the attention module's name.
        qkv, proj: names of its fused query/key/value Linear and its output projection.
        num_heads: heads; ``qkv`` has ``3 · num_heads · head_dim`` outputs (q, k, v, head-major each).
        head_dim: the dense per-head width.
    """

    module: str
    qkv: str
    proj: str
    num_heads: int
    head_dim: int


@dataclass
class Group:
    """Producers whose pruned channels are one axis: a single producer, or a residual stream.

    Attributes:
        producers: the conv/linear layers writing the channels (forward/definition order).
        kind: ``block`` (one producer, consumers right behind it), ``stream`` (a residual stream) or
            ``attention`` (a fused ``qkv``: its value dimensions, restored into ``proj``).
        reason: why it cannot be restored by the data-free methods (None when it can).
        attention: the attention module (``kind == "attention"``).
    """

    producers: list[str]
    kind: str = "block"
    reason: str | None = None
    attention: AttentionSpec | None = None

    @property
    def name(self) -> str:
        """The group's name in records: its first producer (``+N`` more for a stream)."""
        more = len(self.producers) - 1
        return self.producers[0] + (f" (+{more} stream producers)" if more > 0 else "")


@dataclass
class PairMap:
    """Result of :func:`find_pairs`.

    Attributes:
        pairs: producer name → restorable pair.
        refused: producer name → one-line reason why its channels cannot be restored.
        norm_after: conv/linear name → the BatchNorm directly after it (to fold constant bias shifts
            into ``running_mean`` when a consumer has no bias; :func:`prunecli.tracing.norms_after`).
        order: conv/linear module names in definition order (a topological proxy for timm models).
        groups: every producer asked about, in exactly one group (refused ones too).
        attention: ``qkv`` name → its attention module, for every fused-qkv attention of the model.
    """

    pairs: dict[str, Pair]
    refused: dict[str, str]
    norm_after: dict[str, str]
    order: list[str]
    groups: list[Group] = field(default_factory=list)
    attention: dict[str, AttentionSpec] = field(default_factory=dict)


class _Refuse(Exception):
    pass


def _is_norm(mod: nn.Module) -> bool:
    from prunecli.tracing import is_batchnorm

    return is_batchnorm(mod)


def find_pairs(
    model: nn.Module,
    example_inputs: torch.Tensor,
    producers: list[str] | None = None,
) -> PairMap:
    """Traces ``model`` with Torch-Pruning's dependency graph and classifies producer → consumer paths.

    Args:
        model: the dense model (eval mode; it is run once on ``example_inputs``).
        example_inputs: one input batch of the right shape.
        producers: restrict the walk to these conv/linear names (default: all).

    Returns:
        the pairs, the refusals with their reasons, and the BN after each layer.
    """
    from prunecli.depgraph import build_graph
    from prunecli.tracing import norms_after

    names = {mod: name for name, mod in model.named_modules()}
    was_training = model.training
    model.eval()
    try:
        graph = build_graph(model, example_inputs)
    finally:
        model.train(was_training)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    norm_after = norms_after(model, layers, example_inputs)  # the tracer's one rule, as bias compensation's
    attention = attention_modules(model)
    pairs: dict[str, Pair] = {}
    refused: dict[str, str] = {}
    joins: dict[str, set[int]] = {}  # producer → the residual add nodes its channels reach
    asked = producers if producers is not None else list(layers)
    for name in asked:
        mod = layers.get(name)
        if mod is None:
            refused[name] = "not a Conv2d or Linear layer"
            continue
        if name in attention:  # restored per head into proj (restoration/attention.py), not walked
            continue
        node = graph.module2node.get(mod)
        if node is None:
            refused[name] = "not reached by the traced forward pass"
            continue
        if isinstance(mod, nn.Conv2d) and mod.groups != 1:
            refused[name] = f"grouped/depthwise conv (groups={mod.groups}) as producer: filters see different inputs"
            continue
        joins[name] = set()
        try:
            pairs[name] = _walk(name, mod, node, names, joins[name])
        except _Refuse as why:
            refused[name] = str(why)
    groups = _group(asked, pairs, refused, joins, attention, list(layers))
    return PairMap(pairs, refused, norm_after, list(layers), groups, attention)


def attention_modules(model: nn.Module) -> dict[str, AttentionSpec]:
    """``qkv`` name → :class:`AttentionSpec` for every timm-style attention with a fused ``qkv`` Linear.

    Recognised by shape, not class: a module with ``qkv`` and ``proj`` Linears and an integer
    ``num_heads`` where ``qkv`` makes ``3 × proj.in_features`` outputs (timm's ``Attention``, EVA's and
    BEiT's attention, …). A ``qkv`` whose q, k and v widths differ is not this layout.
    """
    found: dict[str, AttentionSpec] = {}
    for name, mod in model.named_modules():
        qkv, proj, heads = getattr(mod, "qkv", None), getattr(mod, "proj", None), getattr(mod, "num_heads", None)
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int) and heads > 0):
            continue
        width = proj.in_features
        if qkv.out_features != 3 * width or width % heads:
            continue
        prefix = f"{name}." if name else ""
        found[f"{prefix}qkv"] = AttentionSpec(name, f"{prefix}qkv", f"{prefix}proj", heads, width // heads)
    return found


def _group(
    asked: list[str],
    pairs: dict[str, Pair],
    refused: dict[str, str],
    joins: dict[str, set[int]],
    attention: dict[str, AttentionSpec],
    order: list[str],
) -> list[Group]:
    """Every asked producer in one group: producers meeting at a residual add are one stream (union-find)."""
    parent = {n: n for n in asked}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    by_node: dict[int, str] = {}
    for name, nodes in joins.items():
        for node in nodes:
            other = by_node.setdefault(node, name)
            parent[root(name)] = root(other)
    members: dict[str, list[str]] = {}
    for name in asked:
        members.setdefault(root(name), []).append(name)
    pos = {n: i for i, n in enumerate(order)}
    groups = []
    for names in members.values():
        names = sorted(names, key=lambda n: (pos.get(n, len(pos)), n))
        if names[0] in attention:
            groups.append(Group(names, "attention", attention=attention[names[0]]))
            continue
        stream = any(joins.get(n) for n in names)
        bad = [n for n in names if n in refused]
        reason = None
        if bad:
            reason = refused[bad[0]]
            if len(names) > 1:
                if len({refused[n] for n in bad}) > 1 or len(bad) < len(names):
                    reason = f"{bad[0]}: {reason}"
                for n in names:  # the stream's coefficients are shared: one refused writer refuses them all
                    refused.setdefault(n, f"shares its residual stream with {bad[0]}, which is not restorable")
                    pairs.pop(n, None)
        groups.append(Group(names, "stream" if stream else "block", reason))
    return sorted(groups, key=lambda g: (pos.get(g.producers[0], len(pos)), g.producers[0]))


def _walk(name: str, producer: nn.Module, start: object, names: dict[nn.Module, str], joins: set[int]) -> Pair:
    channels = producer.out_channels if isinstance(producer, nn.Conv2d) else producer.out_features
    pair = Pair(producer=name)
    consumers: dict[str, Consumer] = {}
    acts: set[str] = set()
    stack = [(out, True) for out in start.outputs]  # (node, still directly after the producer)
    seen: set[int] = set()
    late: str | None = None  # a refusal found on the stream, raised once the stream's adds are all joined
    while stack:
        node, first = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        mod = node.module
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            consumers[names[mod]] = _consumer(names[mod], mod, channels)
            continue
        if _is_norm(mod):
            if not first or pair.norm is not None:
                raise _Refuse(f"BatchNorm {names.get(mod, '?')} after the activation mixes scales")
            pair.norm = names[mod]
            fused = getattr(mod, "act", None)  # timm BatchNormAct2d: BN and activation in one module
            if isinstance(fused, nn.Module) and not isinstance(fused, nn.Identity):
                kind = "relu" if isinstance(fused, (nn.ReLU, nn.LeakyReLU)) else type(fused).__name__.lower()
                acts.add(kind)
                if kind != "relu":
                    pair.approximate.append(f"{kind} activation")
            stack.extend((out, True) for out in node.outputs)
            continue
        if isinstance(mod, nn.Module) and mod in names:  # LayerNorm, GroupNorm, attention, embeddings …
            if pair.stream:  # refused, but the walk goes on along the stream to find every producer of it
                late = late or (f"its channels are a residual stream read through a {type(mod).__name__}, which "
                                "mixes channels: only lstsq refits the layers that read it")  # fmt: skip
                continue
            raise _Refuse(f"{type(mod).__name__} {names[mod]} mixes channels")
        op = _grad_fn_name(node)
        if op.startswith("Add") and _op_kind(node) == "refuse" and is_add(node):
            pair.stream = True  # a residual add: the channels go on, summed with the other branch's
            joins.add(id(node))
            stack.extend((out, False) for out in node.outputs)
            continue
        kind = _op_kind(node)
        if kind == "refuse":
            if op.startswith(("Add", "Sub")):
                raise _Refuse("its channels are added to another branch in a way restoration does not follow")
            raise _Refuse(f"its channels reach {_OP_WORDS.get(op, 'an operation restoration does not support')}")
        if kind == "relu":
            acts.add("relu")
        elif kind == "maxpool":
            if "max pooling" not in pair.approximate:
                pair.approximate.append("max pooling")
        elif kind not in ("linear", "reshape"):
            acts.add(kind)
            if f"{kind} activation" not in pair.approximate:
                pair.approximate.append(f"{kind} activation")
        stack.extend((out, False) for out in node.outputs)
    if late is not None:
        raise _Refuse(late)
    if not consumers:
        raise _Refuse("no conv/linear consumer found (the channels feed the output)")
    if len(acts) > 1:
        raise _Refuse(f"several activations on the path ({', '.join(sorted(acts))})")
    pair.activation = next(iter(acts)) if acts else "identity"
    pair.consumers = [consumers[k] for k in sorted(consumers)]
    return pair


def is_add(node: object) -> bool:
    """True for a two-input element-wise add (a residual connection), not an add of a constant or bias."""
    return len(getattr(node, "inputs", ())) >= 2


# refused operations in the words of a warning (by autograd name)
_OP_WORDS = {
    "PermuteBackward0": "a permute (into tokens or attention heads)",
    "TransposeBackward0": "a transpose (into tokens or attention heads)",
    "CatBackward0": "a concatenation with other channels",
    "MulBackward0": "a product with another branch (gating or attention)",
    "BmmBackward0": "a batched matrix product (attention)",
    "SplitBackward0": "a split into several branches",
    "UnbindBackward0": "a split into several branches (query, key, value)",
}


def _grad_fn_name(node: object) -> str:
    """The autograd name of a Torch-Pruning operation node (``AddBackward0``), or ``""``."""
    fn = getattr(node.module, "_grad_fn", None)
    op = fn if isinstance(fn, str) else (fn.name() if fn is not None and hasattr(fn, "name") else "")
    return op.split(".")[-1]


def _op_kind(node: object) -> str:
    from prunecli.depgraph import is_elementwise_op, is_reshape_op

    mod = node.module
    if is_reshape_op(mod):
        return "reshape"
    if not is_elementwise_op(mod):
        return "refuse"
    op = _grad_fn_name(node)
    if op in _RELU_LIKE:
        return "relu"
    if op in _APPROX_ACT:
        return _APPROX_ACT[op]
    if op in _LINEAR_OPS:
        return "linear"
    if op in _MAX_POOL:
        return "maxpool"
    return "refuse"


def _consumer(name: str, mod: nn.Module, channels: int) -> Consumer:
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1:
            raise _Refuse(f"consumer {name} is a grouped/depthwise conv (groups={mod.groups}): no cross-channel "
                          "weights to compensate with")  # fmt: skip
        if mod.in_channels != channels:
            raise _Refuse(f"consumer {name} reads {mod.in_channels} channels, the producer makes {channels}")
        return Consumer(name, 1)
    if mod.in_features % channels:
        raise _Refuse(f"consumer {name} reads {mod.in_features} features, not a multiple of {channels} channels")
    return Consumer(name, mod.in_features // channels)
