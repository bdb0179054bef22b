"""Damaged or crafted manifest nodes give ManifestCorruptError, never a raw exception or a huge allocation.

The nodes come from a real repository (a small state dict using every value tag); Hypothesis
mutates their msgpack structure and bytes, and every public decoding function must raise only
CasError subclasses and allocate nothing that the chunk lists do not bear out. End to end, a
snapshot whose tree declares a 3 GB storage or tensor fails fast in load, verify and restore.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cas
import cas.statedict
from cas.ids import ChunkId, SnapshotId
from cas.manifest import SnapshotNode, unpack_node
from cas.repository import _collect_values, _fingerprints
from cas.statedict import Encoded, decode_state
from cas.store import CHUNK_SIZE_MAX
from cas.tree import (
    Blob,
    base_candidates,
    blob_leaves,
    check_tree,
    leaf_nbytes,
    plain_key,
    subtree,
    tensor_leaves,
)

CHUNK = 4096
CAS = Path(sys.executable).parent / "cas"
HUGE = 3_000_000_000
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rich_state() -> dict[Any, Any]:
    """A small state dict that uses every value tag of FORMAT.md §7 (P aside: no pickle)."""
    w = torch.arange(1200, dtype=torch.float32).reshape(40, 30)
    module = OrderedDict([("weight", w), ("bias", torch.zeros(30))])
    module._metadata = OrderedDict([("", {"version": 1})])  # type: ignore[attr-defined]
    return {
        "model": module,
        "tied": {"t": w.t(), "row": w[3], "bytes": w.view(torch.uint8)[:7]},  # views of one storage: V
        "arr": np.arange(12, dtype=np.float32).reshape(3, 4),
        "arr_be": np.arange(5, dtype=">i4"),
        "npscalar": np.float64(2.5),
        "big": b"x" * 9000,
        "small": b"abc",
        "ba": bytearray(b"zz"),
        "s": "h\u00e9llo",
        "i": 7,
        "bigint": 10**30,
        "f": 1.5,
        "c": 1 + 2j,
        "none": None,
        "flag": True,
        "lst": [1, [2, 3]],
        "tup": (1, "a"),
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "dev": torch.device("cpu"),
        1: "int key",
        (1, "x"): "tuple key",
        b"k": "bytes key",
        2.5: "float key",
        None: "none key",
        "empty": torch.empty(0),
        "zero_d": torch.tensor(3.0),
        "half": torch.ones(5, dtype=torch.float16),
        "param": torch.nn.Parameter(torch.ones(3)),
        "long": torch.arange(3000),  # 24000 bytes: 6 chunks
    }


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tree node, snapshot node) of a real snapshot, as msgpack-decoded Python objects."""
    path = tmp_path_factory.mktemp("fuzz") / "r"
    with cas.Repository.init(path, chunk_size=CHUNK, pack_size=1 << 20) as repo:
        snap = repo.save(rich_state(), tag="real")
        sid = SnapshotId.from_hex(snap.id)
        snap_bytes = repo.reader.read(sid, "snapshot")
        node = SnapshotNode.decode(snap_bytes, "snapshot")
        tree_bytes = repo.reader.read(node.tree, "tree")
    tree = msgpack.unpackb(tree_bytes, raw=False, strict_map_key=False)
    snapshot = msgpack.unpackb(snap_bytes, raw=False, strict_map_key=False)
    assert tree["storages"], "the state dict should hold a shared storage"
    return tree, snapshot


# ------------------------------------------------------------------ what mutations look like


def nest(depth: int) -> list[Any]:
    value: list[Any] = ["N"]
    for _ in range(depth):
        value = ["l", [value]]
    return value


BAD_STRINGS = ["float32)", "<f4'", "O", "float32", "<f4", "|b1", "object", "__class__", "V8", "S10", "<U3",
               "M8[ns]", "<f4,<f4", "(2,)f4", "cuda:x", "", "int8\x00", "\udcff", "torch.float32"]
weird = st.one_of(
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), HUGE, 750_000_000]),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(BAD_STRINGS),
    st.sampled_from(["N", "b", "i", "I", "f", "c", "s", "y", "Y", "l", "t", "d", "o", "T", "V", "A", "n", "Z", "D",
                     "E", "P", "X", "TT"]),
    st.text(max_size=8),
    st.binary(max_size=70),
    st.lists(st.integers(-3, 5), max_size=4),
    st.lists(st.sampled_from([HUGE, 2**40, 0, -1]), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.integers(1, 120).map(nest),  # deeper copies would hit the recursion limit in copy.deepcopy
    st.just(["I", "9" * 5000]),
    st.just(["s", HUGE]),
    st.just(["T", "float32", [HUGE], b"", 0]),
)


def locations(obj: Any) -> Iterator[tuple[Any, ...]]:
    """Every path into a nested structure, depth first (iterative: the structures nest deep)."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(obj, ())]
    while stack:
        value, path = stack.pop()
        yield path
        if isinstance(value, list):
            stack.extend((v, (*path, i)) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            stack.extend((v, (*path, k)) for k, v in reversed(list(value.items())))


def get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


@st.composite
def mutated(draw: st.DrawFn, base: Any) -> Any:
    """``base`` with 1-3 mutations at random places of its structure."""
    obj = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(locations(obj))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "delete", "insert", "truncate", "swap", "wrap"]))
        if not path:
            if op == "replace":
                obj = copy.deepcopy(draw(weird))
            continue
        parent, key = get(obj, path[:-1]), path[-1]
        target = parent[key]
        if op == "replace":
            parent[key] = copy.deepcopy(draw(weird))  # st.just values are shared between examples
        elif op == "delete":
            del parent[key]
        elif op == "insert" and isinstance(target, list):
            target.insert(draw(st.integers(0, len(target))), copy.deepcopy(draw(weird)))
        elif op == "truncate" and isinstance(target, (bytes, str, list)):
            parent[key] = target[: draw(st.integers(0, max(0, len(target) - 1)))]
        elif op == "swap":
            parent[key] = copy.deepcopy(get(obj, draw(st.sampled_from(paths))))
        elif op == "wrap":
            parent[key] = [target] if draw(st.booleans()) else ["l", [target]]
    return obj


# ------------------------------------------------------------------ feeding them through


@contextmanager
def allocation_bound(limit: int) -> Iterator[list[int]]:
    """Fail the test if torch.empty / np.empty is asked for more than ``limit`` bytes."""
    real_torch, real_np = torch.empty, np.empty
    asked: list[int] = []

    def numel(size: Any) -> int:
        dims = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        dims = (dims,) if isinstance(dims, int) else dims
        return math.prod(int(d) for d in dims)

    def torch_empty(*size: Any, dtype: torch.dtype | None = None, **kw: Any) -> torch.Tensor:
        n = numel(size) * (dtype or torch.float32).itemsize
        asked.append(n)
        assert n <= limit, f"torch.empty of {n} bytes (bound {limit})"
        return real_torch(*size, dtype=dtype, **kw)

    def np_empty(shape: Any, dtype: Any = float, **kw: Any) -> np.ndarray:
        n = numel((shape,)) * np.dtype(dtype).itemsize
        asked.append(n)
        assert n <= limit, f"np.empty of {n} bytes (bound {limit})"
        return real_np(shape, dtype, **kw)

    with mock.patch.object(torch, "empty", torch_empty), mock.patch.object(np, "empty", np_empty):
        yield asked


def chunk_ids_in(obj: Any) -> int:
    """How many chunk ids the byte strings of a node could list (an upper bound)."""
    return sum(len(get(obj, p)) // 32 for p in locations(obj) if isinstance(get(obj, p), bytes))


def read_blob(chunks: list[Any], path: Any) -> bytes:
    return b"\0" * (16 * len(chunks))


def only_cas_errors(fn: Callable[[], Any], *also: type[BaseException]) -> Any:
    try:
        return fn()
    except (cas.CasError, *also):
        return None


def feed_tree(node: Any) -> None:
    """Every public entry point over one (possibly mutated) tree node: only CasError may escape."""
    try:
        data = msgpack.packb(node, use_bin_type=True)
    except (ValueError, TypeError, OverflowError):
        data = None  # not packable (too deep, int out of range): the walkers still get the object
    ids = max(1, chunk_ids_in(node))
    accepted = None
    if data is not None:
        with allocation_bound(0):
            accepted = only_cas_errors(lambda: unpack_node(data, "tree", "fuzzed tree", chunk_size=CHUNK))
            only_cas_errors(lambda: unpack_node(data, "tree", "fuzzed tree"))
    root = node.get("root") if isinstance(node, dict) else node
    storages = node.get("storages") if isinstance(node, dict) else None
    with allocation_bound(0):
        leaves = only_cas_errors(lambda: tensor_leaves(root)) or []
        only_cas_errors(lambda: blob_leaves(root))
        only_cas_errors(lambda: base_candidates(root, storages, "fuzzed tree"))  # type: ignore[arg-type]
        only_cas_errors(lambda: check_tree(root, storages, "fuzzed tree", CHUNK))
        only_cas_errors(lambda: subtree(root, ("model", "weight"), "fuzzed tree"), KeyError)
        only_cas_errors(lambda: plain_key(root))
        for _path, enc in leaves:
            only_cas_errors(lambda enc=enc: leaf_nbytes(enc))
    with allocation_bound(ids * CHUNK):
        decoded = only_cas_errors(lambda: decode_state(
            root, storages, allow_pickle=False, read_blob=read_blob, name="fuzzed", chunk_size=CHUNK))  # type: ignore[arg-type]
    with allocation_bound(ids * CHUNK_SIZE_MAX):  # chunk size unknown: each chunk counts at most the largest
        only_cas_errors(lambda: decode_state(
            root, storages, allow_pickle=False, read_blob=read_blob, name="fuzzed"))  # type: ignore[arg-type]
    if accepted is not None:
        # a node the checks let through is safe for everything that reads it without more checks
        root, storages = accepted["root"], accepted["storages"]
        with allocation_bound(0):
            check_tree(root, storages, "accepted", CHUNK)
            _fingerprints(root, storages)
            _collect_values(root, (), {})
            base_candidates(root, storages, "accepted")
            for _path, enc in tensor_leaves(root):
                leaf_nbytes(enc)
    if decoded is not None:
        for job in decoded.fills:
            assert len(job.dest) <= len(job.chunks) * CHUNK


def feed_snapshot(node: Any) -> None:
    try:
        data = msgpack.packb(node, use_bin_type=True)
    except (ValueError, TypeError, OverflowError):
        return
    snap = only_cas_errors(lambda: SnapshotNode.decode(data, "fuzzed snapshot"))
    if snap is None:
        return
    assert type(snap.tree) is ChunkId and len(snap.tree) == 32
    assert snap.parent is None or len(snap.parent) == 32
    assert snap.tag is None or isinstance(snap.tag, str)
    for n in (snap.time_ns, snap.logical_bytes, snap.tensor_count, snap.bytes_added, snap.chunk_size):
        assert type(n) is int and n >= 0
    assert snap.chunk_size == 0 or 4096 <= snap.chunk_size <= CHUNK_SIZE_MAX
    assert type(snap.pickled) is bool
    datetime.fromtimestamp(snap.time_ns / 1e9, tz=UTC)  # what ls / retention do with it
    json.dumps(snap.metadata)  # what `cas show` does with it


def test_real_nodes_pass(nodes: tuple[dict[str, Any], dict[str, Any]]) -> None:
    tree, snapshot = nodes
    feed_tree(tree)
    feed_snapshot(snapshot)
    data = msgpack.packb(tree, use_bin_type=True)
    assert unpack_node(data, "tree", "t", chunk_size=CHUNK) == tree
    decoded = decode_state(tree["root"], tree["storages"], allow_pickle=False, read_blob=read_blob, name="t",
                           chunk_size=CHUNK)
    assert set(decoded.value) == set(rich_state())


@FUZZ
@given(data=st.data())
def test_mutated_tree_nodes(nodes: tuple[dict[str, Any], dict[str, Any]], data: st.DataObject) -> None:
    feed_tree(data.draw(mutated(nodes[0])))


@FUZZ
@given(data=st.data())
def test_mutated_snapshot_nodes(nodes: tuple[dict[str, Any], dict[str, Any]], data: st.DataObject) -> None:
    feed_snapshot(data.draw(mutated(nodes[1])))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_damaged_node_bytes(nodes: tuple[dict[str, Any], dict[str, Any]], data: st.DataObject) -> None:
    tree, snapshot = nodes
    for node, decode in ((tree, lambda b: unpack_node(b, "tree", "t", chunk_size=CHUNK)),
                         (snapshot, lambda b: SnapshotNode.decode(b, "s"))):
        raw = bytearray(msgpack.packb(node, use_bin_type=True))
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(1, len(raw)))
        with allocation_bound(0):
            only_cas_errors(lambda raw=raw, cut=cut, decode=decode: decode(bytes(raw[:cut])))


# ------------------------------------------------------------------ the cases the issue names


def _with(tree: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(tree)
    get(out, path[:-1])[path[-1]] = value
    return out


def _leaf_path(tree: dict[str, Any], tag: str) -> tuple[Any, ...]:
    for path in locations(tree):
        v = get(tree, path)
        if isinstance(v, list) and v and v[0] == tag and len(path) > 1 and path[0] == "root":
            return path
    raise AssertionError(f"no {tag} leaf")


def crafted(tree: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    t, v, a = _leaf_path(tree, "T"), _leaf_path(tree, "V"), _leaf_path(tree, "A")
    n, s = _leaf_path(tree, "n"), _leaf_path(tree, "s")
    return [
        ("numpy dtype with a paren", _with(tree, (*a, 1), "float32)")),
        ("numpy dtype with a quote", _with(tree, (*a, 1), "<f4'")),
        ("numpy object dtype", _with(tree, (*a, 1), "O")),
        ("numpy structured dtype", _with(tree, (*a, 1), "<f4,<f4")),
        ("torch name as numpy dtype", _with(tree, (*a, 1), "float32")),
        ("numpy string as torch dtype", _with(tree, (*t, 1), "<f4")),
        ("unknown torch dtype", _with(tree, (*t, 1), "float33")),
        ("dtype not a string", _with(tree, (*t, 1), 4)),
        ("scalar dtype object", _with(tree, (*n, 1), "O")),
        ("scalar bytes too short", _with(tree, (*n, 2), b"\0")),
        ("string length as a size", _with(tree, s, ["s", HUGE])),
        ("huge tensor shape", _with(tree, (*t, 2), [HUGE])),
        ("shape overflowing int64", _with(tree, (*t, 2), [2**40, 2**40])),
        ("negative dim", _with(tree, (*t, 2), [-1])),
        ("bool dim", _with(tree, (*t, 2), [True])),
        ("shape not a list", _with(tree, (*t, 2), 40)),
        ("chunk list truncated", _with(tree, (*t, 3), get(tree, (*t, 3))[:-1])),
        ("chunk list short by one", _with(tree, (*t, 3), get(tree, (*t, 3))[:-32] or b"\0" * 64)),
        ("chunk list not bytes", _with(tree, (*t, 3), "abc")),
        ("storage of 3e9 bytes", _with(tree, ("storages", 0, 0), HUGE)),
        ("storage of negative bytes", _with(tree, ("storages", 0, 0), -1)),
        ("storage chunks truncated", _with(tree, ("storages", 0, 1), get(tree, ("storages", 0, 1))[:40])),
        ("storage entry of wrong arity", _with(tree, ("storages", 0), [4800])),
        ("storage index out of range", _with(tree, (*v, 5), 7)),
        ("negative storage index", _with(tree, (*v, 5), -1)),
        ("view past its storage", _with(tree, (*v, 4), 10**6)),
        ("view stride past its storage", _with(tree, (*v, 3), [10**6] * len(get(tree, (*v, 3))))),
        ("negative stride", _with(tree, (*v, 3), [-1] * len(get(tree, (*v, 3))))),
        ("stride of the wrong length", _with(tree, (*v, 3), [1, 1, 1, 1])),
        ("tensor of wrong arity", _with(tree, t, get(tree, t)[:4])),
        ("tensor with an extra item", _with(tree, t, [*get(tree, t), 0])),
        ("bad flags", _with(tree, (*t, 4), 99)),
        ("unknown tag", _with(tree, t, ["X", 1])),
        ("tag not a string", _with(tree, t, [5, 1])),
        ("empty value", _with(tree, t, [])),
        ("value not a list", _with(tree, t, {"T": 1})),
        ("root missing", {k: x for k, x in tree.items() if k != "root"}),
        ("storages not a list", _with(tree, ("storages",), {"0": 1})),
        ("pairs not a list", _with(tree, ("root", 1), 5)),
        ("pair of three", _with(tree, ("root", 1, 0), [["s", b"a"], ["N"], ["N"]])),
        ("unhashable key", _with(tree, ("root", 1, 0, 0), ["l", []])),
        ("bytearray key", _with(tree, ("root", 1, 0, 0), ["y", b"k", True])),
        ("key with bad utf-8", _with(tree, ("root", 1, 0, 0), ["s", b"\xff\xfe"])),
        ("big int that is not decimal", _with(tree, s, ["I", "12x"])),
        ("big int of too many digits", _with(tree, s, ["I", "9" * 5000])),
        ("int out of range", _with(tree, s, ["i", 2**64])),
        ("float that is a string", _with(tree, s, ["f", "1.5"])),
        ("garbage device", _with(tree, s, ["E", "cuda:abc"])),
        ("torch.dtype of a dunder", _with(tree, s, ["D", "__class__"])),
        ("torch.Size of huge dims", _with(tree, s, ["Z", [2**64 - 1]])),
        ("big bytes without chunks", _with(tree, s, ["Y", b"", False])),
        ("deep nesting", _with(tree, s, nest(600))),
    ]


def test_crafted_trees_are_typed_errors(nodes: tuple[dict[str, Any], dict[str, Any]]) -> None:
    tree = nodes[0]
    for label, node in crafted(tree):
        data = msgpack.packb(node, use_bin_type=True) if label not in ("int out of range", "deep nesting") else None
        if data is not None:
            with allocation_bound(0), pytest.raises(cas.ManifestCorruptError) as info:
                unpack_node(data, "tree", "tree of snapshot abc", chunk_size=CHUNK)
            assert "tree of snapshot abc" in str(info.value), label
        root, storages = node.get("root"), node.get("storages")
        with allocation_bound(0), pytest.raises(cas.ManifestCorruptError):
            check_tree(root, storages, "t", CHUNK)
        with allocation_bound(0), pytest.raises(cas.ManifestCorruptError):
            decode_state(root, storages, allow_pickle=False, read_blob=read_blob, name="t", chunk_size=CHUNK)
        feed_tree(node)


def test_deep_python_nesting_is_not_a_recursion_error() -> None:
    root = ["d", [[["s", b"deep"], nest(20_000)]]]
    for fn in (lambda: tensor_leaves(root), lambda: blob_leaves(root), lambda: check_tree(root, [], "t"),
               lambda: decode_state(root, [], allow_pickle=False, read_blob=read_blob, name="t")):
        with pytest.raises(cas.ManifestCorruptError, match="nest"):
            fn()


def test_message_names_snapshot_and_key_path(nodes: tuple[dict[str, Any], dict[str, Any]]) -> None:
    tree = _with(nodes[0], ("storages", 0, 0), HUGE)
    with pytest.raises(cas.ManifestCorruptError) as info:
        unpack_node(msgpack.packb(tree, use_bin_type=True), "tree", "tree of snapshot 0123abcd", chunk_size=CHUNK)
    message = str(info.value)
    assert "tree of snapshot 0123abcd" in message and "model/weight" in message and str(HUGE) in message


def test_chunk_size_unknown_still_bounds_sizes(nodes: tuple[dict[str, Any], dict[str, Any]]) -> None:
    tree = nodes[0]
    check_tree(tree["root"], tree["storages"], "t")  # consistent at some chunk size: fine
    t = _leaf_path(tree, "T")
    for label, node in crafted(tree):
        if "3e9" in label or "huge" in label or "short by one" in label:
            with pytest.raises(cas.ManifestCorruptError):
                check_tree(node["root"], node["storages"], label)
    # two blobs that no single chunk size splits as listed
    one_chunk = _with(tree, (*t, 2), [2048])  # a float32 tensor of 8 KiB in one chunk: chunk size >= 8192
    with pytest.raises(cas.ManifestCorruptError, match="agree on one chunk size"):
        check_tree(one_chunk["root"], one_chunk["storages"], "t")


# ------------------------------------------------------------------ snapshot node fields


SNAPSHOT_CASES: list[tuple[str, Any]] = [
    ("tree", b"short"), ("tree", None), ("tree", "a" * 32), ("parent", b"x" * 31), ("parent", 5),
    ("tag", 5), ("tag", b"bytes"), ("time_ns", -1), ("time_ns", 1.5), ("time_ns", True), ("time_ns", "now"),
    ("metadata", []), ("metadata", {"k": b"bytes"}), ("metadata", {1: "int key"}), ("metadata", None),
    ("logical_bytes", -5), ("tensor_count", "3"), ("bytes_added", None), ("chunk_size", -4096),
    ("chunk_size", 4097), ("chunk_size", 1 << 40), ("chunk_size", True), ("pickled", 1), ("pickled", None),
]


@pytest.mark.parametrize(("key", "value"), SNAPSHOT_CASES)
def test_snapshot_fields_are_type_checked(nodes: tuple[dict[str, Any], dict[str, Any]], key: str, value: Any) -> None:
    node = dict(nodes[1], **{key: value})
    with pytest.raises(cas.ManifestCorruptError, match=rf"malformed: {key}(\[.*\] holds .*| is .*); "
                       if key != "metadata" else rf"malformed: {key}"):
        SnapshotNode.decode(msgpack.packb(node, use_bin_type=True), "snapshot s")
    del node[key]
    with pytest.raises(cas.ManifestCorruptError, match=f"malformed: it has no '{key}'"):
        SnapshotNode.decode(msgpack.packb(node, use_bin_type=True), "snapshot s")


def test_node_version_must_be_an_integer(nodes: tuple[dict[str, Any], dict[str, Any]]) -> None:
    for v in (True, "1", None, 1.0):
        with pytest.raises(cas.ManifestCorruptError, match="version"):
            SnapshotNode.decode(msgpack.packb(dict(nodes[1], v=v), use_bin_type=True), "s")
    with pytest.raises(cas.FormatVersionError):
        SnapshotNode.decode(msgpack.packb(dict(nodes[1], v=2), use_bin_type=True), "s")


# ------------------------------------------------------------------ end to end: a 3 GB declaration


@dataclasses.dataclass(eq=False)
class DeclaredBlob(Blob):
    """A storage blob whose declared byte count is not its bytes' (what a crafted tree claims)."""

    declared: int = 0

    @property
    def nbytes(self) -> int:
        return self.declared


def save_crafted(repo: cas.Repository, tag: str, kind: str, monkeypatch: pytest.MonkeyPatch) -> cas.Snapshot:
    """A snapshot, written by the repository's own save path, whose tree declares HUGE bytes in 4 KiB of chunks."""
    data = memoryview(bytes(range(256)) * 16)  # 4096 bytes: one chunk

    def encode(obj: Any, allow_pickle: bool = False) -> Encoded:
        if kind == "storage":
            storage = DeclaredBlob(data, ("w",), declared=HUGE)
            tree = ["d", [[["s", b"w"], ["V", "float32", [HUGE // 4], [1], 0, 0, 0]]]]
            return Encoded(tree, [storage], [], 1, HUGE, False)
        blob = Blob(data, ("w",))
        tree = ["d", [[["s", b"w"], ["T", "float32", [HUGE // 4], blob, 0]]]]
        return Encoded(tree, [], [blob], 1, HUGE, False)

    with monkeypatch.context() as m:
        m.setattr(cas.statedict, "encode_state", encode)
        return repo.save({}, tag=tag, parent=None)


@pytest.fixture
def crafted_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "r"
    with cas.Repository.init(path, chunk_size=CHUNK, pack_size=1 << 20, threads=2) as repo:
        repo.save({"w": torch.zeros(1024)}, tag="good")
        save_crafted(repo, "huge-storage", "storage", monkeypatch)
        save_crafted(repo, "huge-tensor", "tensor", monkeypatch)
    return path


def test_huge_declared_sizes_fail_fast(crafted_repo: Path) -> None:
    with cas.Repository.open(crafted_repo, threads=2) as repo, allocation_bound(1 << 20):
        for tag in ("huge-storage", "huge-tensor"):
            calls: list[Callable[[str], Any]] = [
                repo.load, repo.tensors, lambda t: repo.diff("good", t),
                lambda t: repo.load_into({"w": torch.zeros(1024)}, t),
            ]
            for fn in calls:
                with pytest.raises(cas.ManifestCorruptError, match="3000000000 bytes") as info:
                    fn(tag)
                assert "malformed at w:" in str(info.value) and "chunk" in str(info.value)
        report = repo.verify(read_data=True)
        bad = sorted(p.snapshot.split(" ")[0] for p in report.problems if p.kind == "corrupt-manifest")
        assert bad == ["huge-storage", "huge-tensor"], report.problems
        assert all("3000000000 bytes" in p.message for p in report.problems)
        assert_loads(repo)


def assert_loads(repo: cas.Repository) -> None:
    out = repo.load("good")
    assert torch.equal(out["w"], torch.zeros(1024))


def test_save_after_a_crafted_parent(crafted_repo: Path) -> None:
    """The saver reads the parent's tree (base_candidates): a crafted one is a typed error or is passed over."""
    with cas.Repository.open(crafted_repo, threads=2) as repo:
        assert repo.resolve("latest").tag == "huge-tensor"
        error = None
        try:
            snap = repo.save({"w": torch.ones(1024)}, tag="after")
        except cas.ManifestCorruptError as exc:
            error = str(exc)
        if error is not None:
            assert "3000000000" in error and not repo.store.has_ref("after")
        else:
            assert torch.equal(repo.load(snap.id)["w"], torch.ones(1024))
        assert_loads(repo)


MEMORY_PROBE = textwrap.dedent("""
    import os, resource, sys
    import torch, numpy, cas, cas.statedict, cas.cli
    path = sys.argv[1]
    vsz = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vsz + (2 << 30), resource.RLIM_INFINITY))  # < 3e9 bytes more
    with cas.Repository.open(path, threads=2) as repo:
        for tag in ("huge-storage", "huge-tensor"):
            try:
                repo.load(tag)
                print("LOADED", tag)
            except cas.ManifestCorruptError:
                pass
        report = repo.verify(read_data=True)
        print("problems", sorted(p.kind for p in report.problems))
    for tag in ("huge-storage", "huge-tensor"):
        try:
            cas.cli.main(["--repo", path, "restore", tag, path + "/../" + tag + ".pt"])
        except SystemExit as exc:
            print("exit-" + tag, exc.code)
    print("maxrss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")


def test_huge_declared_sizes_do_not_allocate(crafted_repo: Path) -> None:
    """In a process whose address space cannot take 3 GB more: load, verify and `cas restore` fail fast, small."""
    env = dict(os.environ, MALLOC_ARENA_MAX="2", CAS_NO_NUMBA="1")
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(crafted_repo)], env=env, capture_output=True,
                          text=True, timeout=180, check=False)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, (out, err)
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert "LOADED" not in lines, out
    assert lines["problems"] == "['corrupt-manifest', 'corrupt-manifest']", out
    assert lines["exit-huge-storage"] == lines["exit-huge-tensor"] == "7", (out, err)
    errors = err.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("cas: error: ") and "3000000000 bytes" in e for e in errors), err
    assert int(lines["maxrss_mb"]) < 1536, out  # far below the 2.8 GB a trusted size would take (torch alone ~0.4 GB)
    assert not list(crafted_repo.parent.glob("*.pt"))


def test_metadata_tensors_are_reached(tmp_path: Path) -> None:
    """Blobs under an OrderedDict's _metadata are listed (GC keeps them), not tensor leaves."""
    od: OrderedDict[str, Any] = OrderedDict(w=torch.zeros(2))
    od._metadata = {"blob": b"y" * 9000}  # type: ignore[attr-defined]
    with cas.Repository.init(tmp_path / "r", chunk_size=CHUNK) as repo:
        repo.save({"m": od}, tag="a")
        repo.gc()
        assert repo.verify(read_data=True).ok
        assert repo.load("a")["m"]._metadata == {"blob": b"y" * 9000}
        assert [t["path"] for t in repo.tensors("a")] == ["m/w"]


def test_deep_but_real_trees_still_load(tmp_path: Path) -> None:
    """The depth limit is past what msgpack can hold: whatever a save wrote still loads."""
    value: Any = torch.ones(2)
    for _ in range(300):
        value = [value]
    with cas.Repository.init(tmp_path / "r", chunk_size=CHUNK) as repo:
        repo.save({"x": value, "k": {((((1,),),),): 2}}, tag="deep")
        out = repo.load("deep")
        for _ in range(300):
            out["x"] = out["x"][0]
        assert torch.equal(out["x"], torch.ones(2)) and out["k"] == {((((1,),),),): 2}
        assert repo.verify(read_data=True).ok
