"""Differential test of the safetensors header validator against the safetensors library itself.

A seeded generator builds a few hundred small files: valid ones of every shape of header (no tensor,
scalars, empty tensors, sub-byte dtypes, padding, metadata absent, empty or null) and each one mutated
once (overlapping or gapped offsets, dtypes relabelled to the same or another width, wrong sizes,
negative, float, string, boolean, ``-0`` and out-of-range dimensions, huge or short length fields,
duplicate keys, non-string metadata, trailing or missing bytes, NaN, deep nesting, lone surrogates, …).
Each file goes through :func:`prunecli.checkpoint.header.read_header` and through
``safetensors.safe_open``; both must accept and refuse the same files. Where a file is accepted, both
must read the same names, dtypes, shapes and metadata, and ``safetensors.torch.load_file`` must return
the very tensors prunecli's own readers return.

The only files where the answers may differ are those breaking a rule of the format that the library
does not check (``spec_only``): a header not starting with ``{``, a key that appears twice, a dtype
given as a JSON object. prunecli refuses them; the test checks that it does.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from prunecli.checkpoint.header import DTYPE_BITS, MAX_HEADER, read_header
from prunecli.errors import CheckpointError

SEED = 20261202
N_CASES = 360

# dtypes by bits per element, and those torch can hold (load_file is compared on files made of these only)
WIDTH: dict[int, list[str]] = {}
for _name, _bits in DTYPE_BITS.items():
    WIDTH.setdefault(_bits, []).append(_name)
TORCH_DTYPES = {"BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "I64", "F64", "F8_E4M3", "F8_E5M2"}


@dataclass
class Raw:
    """JSON text inserted verbatim (NaN, -0, a number JSON writers would never produce)."""

    text: str


@dataclass
class Pairs:
    """A JSON object written from key/value pairs, so that a key may appear twice."""

    items: list[tuple[str, Any]]


def render(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        value = Pairs(list(value.items()))
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{json.dumps(k)}:{render(v)}" for k, v in value.items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(render(v) for v in value) + "]"
    return json.dumps(value)


@dataclass
class Case:
    """One generated file: the header's top-level pairs, the data section and framing."""

    pairs: list[tuple[str, Any]]
    data: bytes
    prefix: str = ""
    suffix: str = ""
    length: Callable[[int], int] = field(default=lambda n: n)  # header length field from the real length
    header_bytes: Callable[[bytes], bytes] = field(default=lambda b: b)
    spec_only: bool = False
    label: str = "valid"

    def tensors(self) -> list[dict[str, Any]]:
        return [v for k, v in self.pairs if k != "__metadata__" and isinstance(v, dict)]

    def to_bytes(self) -> bytes:
        header = self.header_bytes((self.prefix + render(Pairs(self.pairs)) + self.suffix).encode("utf-8"))
        return struct.pack("<Q", self.length(len(header))) + header + self.data


def _valid(rng: random.Random) -> Case:
    """A valid file built by hand: contiguous offsets in a random order of keys, optional metadata."""
    entries: list[tuple[str, dict[str, Any]]] = []
    offset = 0
    for i in range(rng.choice([0, 1, 2, 3, 3, 4])):
        dtype = rng.choice(sorted(DTYPE_BITS))
        shape = [rng.choice([0, 1, 1, 2, 3, 4, 5]) for _ in range(rng.choice([0, 1, 1, 2, 3]))]
        numel = 1
        for d in shape:
            numel *= d
        if numel * DTYPE_BITS[dtype] % 8:  # sub-byte dtypes: make the count fill whole bytes
            shape = [*shape, 8]
            numel *= 8
        nbytes = numel * DTYPE_BITS[dtype] // 8
        entry = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        entries.append((f"t{i}.{rng.choice(['weight', 'bias', 'x'])}", entry))
        offset += nbytes
    rng.shuffle(entries)
    pairs: list[tuple[str, Any]] = list(entries)
    meta = rng.choice(["absent", "empty", "null", "some"])
    if meta != "absent":
        value = {"empty": {}, "null": None, "some": {"format": "pt", "note": "é ☃", "": ""}}[meta]
        pairs.insert(rng.randrange(len(pairs) + 1), ("__metadata__", value))
    data = bytes(rng.randrange(256) for _ in range(offset))
    return Case(pairs, data, suffix=" " * rng.randrange(8))


def _some_tensor(rng: random.Random, case: Case) -> dict[str, Any]:
    """A tensor entry of the case (adds a 2-element F32 tensor at the end of the data if there is none)."""
    tensors = case.tensors()
    if not tensors:
        entry = {"dtype": "F32", "shape": [2], "data_offsets": [len(case.data), len(case.data) + 8]}
        case.pairs.append(("w", entry))
        case.data += bytes(8)
        return entry
    return rng.choice(tensors)


def _nonempty_tensor(rng: random.Random, case: Case) -> dict[str, Any]:
    tensors = [t for t in case.tensors() if t["data_offsets"][1] > t["data_offsets"][0]]
    if tensors:
        return rng.choice(tensors)
    entry = {"dtype": "I16", "shape": [3], "data_offsets": [len(case.data), len(case.data) + 6]}
    case.pairs.append(("w", entry))
    case.data += bytes(6)
    return entry


def _shift_after(case: Case, at: int, by: int) -> None:
    for t in case.tensors():
        b, e = t["data_offsets"]
        if b >= at and isinstance(b, int) and isinstance(e, int):
            t["data_offsets"] = [b + by, e + by]


MUTATIONS: dict[str, Callable[[random.Random, Case], None]] = {}


def mutation(name: str) -> Callable[[Callable[[random.Random, Case], None]], Callable[[random.Random, Case], None]]:
    def register(fn: Callable[[random.Random, Case], None]) -> Callable[[random.Random, Case], None]:
        MUTATIONS[name] = fn
        return fn

    return register


@mutation("none")
def _none(rng: random.Random, case: Case) -> None:
    pass


@mutation("overlap")
def _overlap(rng: random.Random, case: Case) -> None:
    _some_tensor(rng, case)
    if len(case.tensors()) < 2:
        case.pairs.append(
            ("extra", {"dtype": "U8", "shape": [1], "data_offsets": [len(case.data), len(case.data) + 1]})
        )
        case.data += b"\1"
    t = max(case.tensors(), key=lambda t: t["data_offsets"][0])
    k = rng.randint(1, max(1, t["data_offsets"][0]))
    t["data_offsets"] = [t["data_offsets"][0] - k, t["data_offsets"][1] - k]
    case.data = case.data[:-k] if len(case.data) >= k else case.data


@mutation("gap")
def _gap(rng: random.Random, case: Case) -> None:
    t = _some_tensor(rng, case)
    k = rng.randint(1, 16)
    _shift_after(case, t["data_offsets"][0], k)
    case.data += bytes(k)


@mutation("same-width-dtype")
def _relabel_same(rng: random.Random, case: Case) -> None:
    t = _some_tensor(rng, case)
    t["dtype"] = rng.choice(WIDTH[DTYPE_BITS[t["dtype"]]])  # still valid: same bytes, read as another type


@mutation("other-width-dtype")
def _relabel_other(rng: random.Random, case: Case) -> None:
    t = _nonempty_tensor(rng, case)
    t["dtype"] = rng.choice([d for d, b in DTYPE_BITS.items() if b != DTYPE_BITS[t["dtype"]] and b % 8 == 0])


@mutation("wrong-size")
def _wrong_size(rng: random.Random, case: Case) -> None:
    t = _some_tensor(rng, case)
    k = rng.choice([-1, 1, 2, 8]) if t["data_offsets"][1] > t["data_offsets"][0] else rng.choice([1, 4])
    _shift_after(case, t["data_offsets"][1], k)
    t["data_offsets"] = [t["data_offsets"][0], t["data_offsets"][1] + k]
    case.data = case.data[:k] if k < 0 else case.data + bytes(k)


@mutation("bad-dimension")
def _bad_dim(rng: random.Random, case: Case) -> None:
    t = _some_tensor(rng, case)
    bad = rng.choice([-1, 2.0, 1.5, "2", True, Raw("-0"), Raw("2e0"), 2**64, 2**64 - 1, None, [2]])
    t["shape"] = [*t["shape"][: rng.randint(0, len(t["shape"]))], bad]


@mutation("zero-with-huge-dims")
def _huge_zero(rng: random.Random, case: Case) -> None:
    t = _some_tensor(rng, case)
    _shift_after(case, t["data_offsets"][1], -(t["data_offsets"][1] - t["data_offsets"][0]))
    case.data = case.data[: len(case.data) - (t["data_offsets"][1] - t["data_offsets"][0])]
    t["data_offsets"] = [t["data_offsets"][0], t["data_offsets"][0]]
    t["shape"] = rng.choice([[0, 2**40, 2**40], [2**40, 2**40, 0], [2**64 - 1, 0], [0, 2**64 - 1], [2**32, 2**32, 0]])


@mutation("bad-shape")
def _bad_shape(rng: random.Random, case: Case) -> None:
    t = _some_tensor(rng, case)
    t["shape"] = rng.choice([2, "2", None, {"0": 2}])


@mutation("bad-offsets")
def _bad_offsets(rng: random.Random, case: Case) -> None:
    t = _some_tensor(rng, case)
    b, e = t["data_offsets"]
    t["data_offsets"] = rng.choice([[b], [b, e, e], [float(b), e], [b, Raw(f"{e}.0")], [-1, e], [e, b], [str(b), e]])


@mutation("header-length")
def _length(rng: random.Random, case: Case) -> None:
    choice = rng.choice(["huge", "limit+1", "past-end", "short", "u64"])
    case.length = {
        "huge": lambda n: 2**40,
        "limit+1": lambda n: MAX_HEADER + 1,
        "past-end": lambda n: n + len(case.data) + 1,
        "short": lambda n: max(n - rng.randint(1, 5), 0),
        "u64": lambda n: 2**64 - 1,
    }[choice]


@mutation("duplicate-tensor")
def _dup_tensor(rng: random.Random, case: Case) -> None:
    t = _some_tensor(rng, case)
    name = next(k for k, v in case.pairs if v is t)
    same = rng.random() < 0.5
    case.pairs.append((name, dict(t) if same else {**t, "shape": [*t["shape"], 1, 1]}))
    case.spec_only = True


@mutation("duplicate-metadata")
def _dup_meta(rng: random.Random, case: Case) -> None:
    if rng.random() < 0.5:
        case.pairs += [("__metadata__", {"a": "1"}), ("__metadata__", {"a": "1"})]  # the library refuses too
    else:
        case.pairs.append(("__metadata__", Pairs([("a", "1"), ("a", "2")])))
        case.spec_only = True


@mutation("duplicate-field")
def _dup_field(rng: random.Random, case: Case) -> None:
    t = _some_tensor(rng, case)
    name = next(i for i, (k, v) in enumerate(case.pairs) if v is t)
    key = rng.choice(["dtype", "shape", "data_offsets", "extra"])
    items = [*t.items(), (key, t.get(key, 1))]
    case.pairs[name] = (case.pairs[name][0], Pairs(items))
    case.spec_only = True


@mutation("metadata-values")
def _meta_values(rng: random.Random, case: Case) -> None:
    case.pairs = [(k, v) for k, v in case.pairs if k != "__metadata__"]
    case.pairs.append(("__metadata__", rng.choice([{"a": 1}, {"a": None}, {"a": ["x"]}, {"a": {"b": "c"}}, [], "x",
                                                   {"a": True}, {"a": "ok", "b": 2.5}, 0, None, {}])))  # fmt: skip


@mutation("data-length")
def _data_length(rng: random.Random, case: Case) -> None:
    if rng.random() < 0.5 or not case.data:
        case.data += bytes(rng.randint(1, 9))  # trailing bytes: not covered by any tensor
    else:
        case.data = case.data[: -rng.randint(1, len(case.data))]


@mutation("dtype-name")
def _dtype_name(rng: random.Random, case: Case) -> None:
    t = _some_tensor(rng, case)
    choice = rng.choice(["lower", "unknown", "null", "int", "map", "list"])
    if choice == "map":
        t["dtype"] = {t["dtype"]: None}  # serde accepts an enum written as a map; the format says a string
        case.spec_only = True
    else:
        t["dtype"] = {"lower": t["dtype"].lower(), "unknown": "F128", "null": None, "int": 4, "list": [t["dtype"]]}[
            choice
        ]


@mutation("fields")
def _fields(rng: random.Random, case: Case) -> None:
    t = _some_tensor(rng, case)
    choice = rng.choice(["missing", "extra", "extra-nested"])
    if choice == "missing":
        del t[rng.choice(["dtype", "shape", "data_offsets"])]
    elif choice == "extra":
        t["extra"] = rng.choice([1, "x", None, [1, 2], {"a": [1, {"b": None}]}, 2**70, -1.5])
    else:
        t["extra"] = rng.choice([[[]], {"a": {"b": {}}}])


@mutation("framing")
def _framing(rng: random.Random, case: Case) -> None:
    choice = rng.choice(["lead-space", "lead-newline", "bom", "nul-pad", "garbage", "spaces", "newlines", "empty"])
    if choice in ("lead-space", "lead-newline"):
        case.prefix = " " if choice == "lead-space" else "\n"
        case.spec_only = True
    elif choice == "bom":
        case.prefix = "\ufeff"
    elif choice == "nul-pad":
        case.suffix += "\0" * rng.randint(1, 7)
    elif choice == "garbage":
        case.suffix += rng.choice(["x", "}", "{}", ",", "]"])
    elif choice == "spaces":
        case.suffix += " " * rng.randint(1, 20)
    elif choice == "newlines":
        case.suffix += "\n\t\r "
    else:
        case.header_bytes = lambda b: b""


@mutation("json-values")
def _json_values(rng: random.Random, case: Case) -> None:
    t = _some_tensor(rng, case)
    t["extra"] = Raw(
        rng.choice(
            [
                "NaN",
                "Infinity",
                "-Infinity",
                "1e400",
                "-1e400",
                "1e308",
                "0.5",
                "-0",
                "1E2",
                "1" * 309,
                "1" * 400,
                "-" + "1" * 5000,
                "0." + "1" * 5000,
            ]
        )
    )


@mutation("nesting")
def _nesting(rng: random.Random, case: Case) -> None:
    t = _some_tensor(rng, case)
    depth = rng.choice([60, 124, 125, 126, 127, 200])  # the tensor entry is already 2 levels deep
    opener, closer = rng.choice([("[", "]"), ('{"k":', "}")])
    inner = "1" if opener != "[" else ""
    t["extra"] = Raw(opener * depth + inner + closer * depth)


@mutation("surrogate")
def _surrogate(rng: random.Random, case: Case) -> None:
    text = rng.choice(["\ud800", "a\udfff", "\ud83d\ude00"])  # the last is a valid pair (an emoji)
    if rng.random() < 0.5:
        case.pairs = [(k, v) for k, v in case.pairs if k != "__metadata__"]
        case.pairs.append(("__metadata__", {"k": text}))
    else:
        case.pairs.append((text, {"dtype": "U8", "shape": [], "data_offsets": [len(case.data), len(case.data) + 1]}))
        case.data += b"\7"


@mutation("sub-byte")
def _sub_byte(rng: random.Random, case: Case) -> None:
    dtype, count = rng.choice([("F4", 1), ("F4", 3), ("F4", 2), ("F6_E2M3", 4), ("F6_E3M2", 2), ("F6_E2M3", 3)])
    nbytes = -(-count * DTYPE_BITS[dtype] // 8)
    case.pairs.append(
        ("q", {"dtype": dtype, "shape": [count], "data_offsets": [len(case.data), len(case.data) + nbytes]})
    )
    case.data += bytes(nbytes)


@mutation("structure")
def _structure(rng: random.Random, case: Case) -> None:
    choice = rng.choice(["array", "tensor-not-object", "string", "utf8"])
    if choice == "array":
        case.header_bytes = lambda b: b"[" + b[1:-1] + b"]" if b.startswith(b"{") else b
    elif choice == "tensor-not-object":
        case.pairs.append(("w", rng.choice([1, "x", None, [0, 1]])))
    elif choice == "string":
        case.header_bytes = lambda b: b'"{}"'
    else:
        case.header_bytes = lambda b: b.replace(b"}", b"\xff}", 1)


def _generate() -> list[tuple[str, Case]]:
    rng = random.Random(SEED)
    names = sorted(MUTATIONS)
    cases = []
    for i in range(N_CASES):
        case = _valid(rng)
        name = names[i % len(names)]
        MUTATIONS[name](rng, case)
        case.label = name
        cases.append((f"{i:03d}-{name}", case))
    return cases


def _library(path: Path) -> tuple[bool, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return True, (set(fh.keys()), fh.metadata() or {})
    except Exception as exc:  # SafetensorError, and whatever else the library raises on a bad file
        return False, str(exc)


def _prunecli(path: Path) -> tuple[bool, Any]:
    try:
        return True, read_header(path)
    except CheckpointError as exc:
        return False, str(exc)


CASES = _generate()


def test_generator_covers_both_answers() -> None:
    """The comparison is not vacuous: many files of each kind, every mutation used."""
    assert {c.label for _, c in CASES} == set(MUTATIONS)
    assert len(CASES) >= 300


def _raw(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (comparing bytes, not values: NaN payloads and -0 must match too)."""
    return t.reshape(-1).view(torch.uint8)


def test_prunecli_and_safetensors_agree(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from prunecli.checkpoint.safetensors_io import map_safetensors_hashed, read_safetensors_hashed

    accepted = refused = spec_only = 0
    disagreements = []
    for name, case in CASES:
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(case.to_bytes())
        lib_ok, lib = _library(path)
        ours_ok, ours = _prunecli(path)
        if not ours_ok:
            assert "\n" not in ours and ours.startswith(str(path)), ours  # one line naming the file
        if case.spec_only:
            spec_only += 1
            if ours_ok:
                disagreements.append(f"{name}: breaks a format rule but prunecli accepted it")
            continue
        if lib_ok != ours_ok:
            disagreements.append(f"{name}: safetensors {'accepts' if lib_ok else 'refuses'} ({lib}), prunecli {ours}")
            continue
        if not ours_ok:
            refused += 1
            continue
        accepted += 1
        keys, metadata = lib
        assert {t.name for t in ours.tensors} == keys and ours.metadata == metadata, name
        if all(t.dtype in TORCH_DTYPES for t in ours.tensors):
            try:
                expected = load_file(str(path))
            except Exception:  # a shape torch cannot hold (more than 2**63 - 1 elements along the way)
                expected = None
            try:
                tensors, _ = read_safetensors_hashed(ours)
                mapped = map_safetensors_hashed(ours)
            except CheckpointError as exc:
                assert expected is None, f"{name}: safetensors.torch reads it, prunecli: {exc}"
                continue
            assert expected is not None and tensors.keys() == expected.keys(), name
            for k, v in expected.items():  # bit-exact: both read the same bytes
                assert tensors[k].dtype == v.dtype and tensors[k].shape == v.shape, (name, k)
                assert torch.equal(_raw(tensors[k]), _raw(v)), (name, k)
                if mapped is not None:
                    assert torch.equal(_raw(mapped[0][k]), _raw(v)), (name, k)
    assert not disagreements, "\n".join(disagreements)
    assert accepted >= 60 and refused >= 150 and spec_only >= 20, (accepted, refused, spec_only)


def _file(tmp_path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def _f32x2(begin: int, end: int) -> str:
    return f'{{"dtype":"F32","shape":[2],"data_offsets":[{begin},{end}]}}'


def _two(a: str, b: str, names: str = "ab") -> str:
    return f'{{"{names[0]}":{a},"{names[1]}":{b}}}'


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        (_two(_f32x2(0, 8), _f32x2(4, 12)), 12, None, "overlaps the tensor before it"),
        (_two(_f32x2(0, 8), _f32x2(12, 20)), 20, None, "leaves a gap of 4 bytes"),
        ('{"a":' + _f32x2(0, 8) + "}", 9, None, "tensors cover 8 (trailing bytes)"),
        ('{"a":' + _f32x2(0, 8) + "}", 4, None, "ends at byte 8 but the file holds only 4 data bytes"),
        (_two(_f32x2(0, 8), _f32x2(0, 8), "aa"), 8, None, "key 'a' appears twice"),
        ('{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', 8, None, "not a list of non-negative integers"),
        ('{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', 8, None, "not a list of non-negative integers"),
        ('{"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}}', 8, None, "unknown dtype 'F33'"),
        ('{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', 2, None, "do not fill whole bytes"),
        ('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,8]}}', 8, None, "spans 8 bytes, its shape needs 2"),
        ('{"__metadata__":{"a":1}}', 0, None, "__metadata__ must map strings to strings"),
        ('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":' + "[" * 126 + "]" * 126 + "}}", 1, None,
         "nested deeper than 127 levels"),
        ('{"__metadata__":{"a":"\\ud800"}}', 0, None, "lone surrogate"),
        ('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":' + "1" * 5000 + "}}", 1, None, "out of range"),
        ('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":NaN}}', 1, None, "NaN is not JSON"),
        (' {}', 0, None, "does not start with '{'"),
        ("{}", 0, MAX_HEADER + 1, "exceeds the format's 100000000-byte limit"),
        ('{"a":{"dtype":"U8","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}', 0, None, "overflows"),
    ],
)  # fmt: skip
def test_refusals_name_the_problem(tmp_path: Path, header: str, data: int, length: int | None, message: str) -> None:
    path = _file(tmp_path, header.encode(), bytes(data), length)
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert _library(path)[0] is (message == "does not start with '{'" or "appears twice" in message)


def test_header_read_by_every_reader(tmp_path: Path) -> None:
    """read_safetensors (the library path) refuses what read_header refuses, with prunecli's message."""
    from prunecli.checkpoint.safetensors_io import read_safetensors

    path = _file(tmp_path, _two(_f32x2(0, 8), _f32x2(0, 8), "aa").encode(), bytes(8))
    with pytest.raises(CheckpointError, match="appears twice"):
        read_safetensors(path)
