"""Manifest nodes: canonical msgpack encodings of a state dict's tree and of a snapshot.

Two node types (see FORMAT.md):
- ``tree``: the typed structure of a state dict; each tensor/array/bytes leaf lists its chunk ids.
- ``snapshot``: the root; points to the tree node and carries tag, parent, time and metadata.

Nodes are stored as chunks, so a node's id is the BLAKE3 of its encoding and a
snapshot id is the Merkle root of the whole checkpoint.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from cas.errors import FormatVersionError, ManifestCorruptError, UnsupportedObjectError, UsageError
from cas.ids import DIGEST_SIZE, ChunkId, hash_bytes
from cas.store import CHUNK_SIZE_RULE, chunk_size_ok

NODE_VERSION = 1
UINT64_LIMIT = 1 << 64
INT64_LIMIT = 1 << 63

#: per thread, (tree id, chunk size) of the snapshot node decoded last: readers decode a snapshot
#: node and then its tree node, so the tree's chunk lists are checked at the snapshot's chunk size
_last_snapshot = threading.local()


def pack_node(node: dict[str, Any], default: Callable[[Any], Any] | None = None) -> bytes:
    try:
        data: bytes = msgpack.packb(node, use_bin_type=True, default=default, strict_types=False)
    except (ValueError, OverflowError) as exc:  # msgpack: nesting beyond 511 levels, ints beyond 64 bits
        raise UnsupportedObjectError(
            f"cannot store this {node.get('type', 'manifest')} node: {exc} (msgpack holds at most 511 levels "
            "of nesting and 64-bit integers)"
        ) from None
    return data


def unpack_node(
    data: bytes | memoryview, expected_type: str, name: str, *, chunk_size: int | None = None
) -> dict[str, Any]:
    """Decode a manifest node of ``expected_type``; a tree node is checked in full (``cas.tree.check_tree``).

    ``chunk_size``: the chunk size of the snapshot whose tree this is. Without it, a tree node
    that belongs to the snapshot node this thread decoded last is checked at that snapshot's
    chunk size, any other one against the repository bounds only.
    """
    try:
        node = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types on garbage
        raise ManifestCorruptError(f"manifest node {name} does not decode: {exc}") from None
    if not isinstance(node, dict) or "v" not in node or "type" not in node:
        raise ManifestCorruptError(f"manifest node {name} is not a cas node")
    version = node["v"]
    if type(version) is not int:
        raise ManifestCorruptError(f"manifest node {name} has version {_shown(version)}, not an integer")
    if version != NODE_VERSION:
        raise FormatVersionError(f"manifest node {name} has version {version}; this cas reads {NODE_VERSION}")
    if node["type"] != expected_type:
        raise ManifestCorruptError(
            f"manifest node {name} is a {_shown(node['type'])} node, expected {expected_type!r}"
        )
    if expected_type == "tree":
        from cas.tree import check_tree_node  # noqa: PLC0415 - cas.tree imports this module

        if chunk_size is None:
            chunk_size = _snapshot_chunk_size(data)
        check_tree_node(node, name, chunk_size)
    return node


def _snapshot_chunk_size(tree_data: bytes | memoryview) -> int | None:
    """The chunk size of the snapshot node this thread decoded last, if ``tree_data`` is its tree."""
    last: tuple[bytes, int] | None = getattr(_last_snapshot, "node", None)
    if last is None or not last[1] or hash_bytes(tree_data) != last[0]:
        return None
    return last[1]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def split_chunk_ids(raw: object, name: str) -> list[ChunkId]:
    if not isinstance(raw, bytes) or len(raw) % DIGEST_SIZE:
        raise ManifestCorruptError(f"manifest node {name} has a malformed chunk list")
    return [ChunkId(raw[i:i + DIGEST_SIZE]) for i in range(0, len(raw), DIGEST_SIZE)]


@dataclass(frozen=True)
class SnapshotNode:
    tree: ChunkId
    tag: str | None
    parent: ChunkId | None
    time_ns: int
    metadata: dict[str, Any] = field(default_factory=dict)
    logical_bytes: int = 0
    tensor_count: int = 0
    bytes_added: int = 0
    chunk_size: int = 0
    pickled: bool = False

    def encode(self) -> bytes:
        return pack_node({
            "v": NODE_VERSION, "type": "snapshot", "tree": bytes(self.tree), "tag": self.tag,
            "parent": None if self.parent is None else bytes(self.parent), "time_ns": self.time_ns,
            "metadata": self.metadata, "logical_bytes": self.logical_bytes, "tensor_count": self.tensor_count,
            "bytes_added": self.bytes_added, "chunk_size": self.chunk_size, "pickled": self.pickled,
        })

    @classmethod
    def decode(cls, data: bytes | memoryview, name: str) -> SnapshotNode:
        """Decode and type-check a snapshot node (every field: FORMAT.md §7)."""
        node = unpack_node(data, "snapshot", name)

        def field_of(key: str, ok: Callable[[Any], bool], rule: str) -> Any:
            if key not in node:
                raise ManifestCorruptError(f"snapshot node {name} is malformed: it has no {key!r}")
            value = node[key]
            if not ok(value):
                raise ManifestCorruptError(f"snapshot node {name} is malformed: {key} is {_shown(value)}; {rule}")
            return value

        def digest(value: Any) -> bool:
            return type(value) is bytes and len(value) == DIGEST_SIZE

        def count(value: Any) -> bool:
            return type(value) is int and 0 <= value < UINT64_LIMIT

        tree = field_of("tree", digest, f"it must be a {DIGEST_SIZE}-byte chunk id")
        tag = field_of("tag", lambda v: v is None or type(v) is str, "it must be a string or nil")
        parent = field_of("parent", lambda v: v is None or digest(v), f"it must be a {DIGEST_SIZE}-byte id or nil")
        time_ns = field_of("time_ns", lambda v: type(v) is int and 0 <= v < INT64_LIMIT,
                           "it must be a non-negative integer (Unix time in nanoseconds)")
        metadata = field_of("metadata", lambda v: type(v) is dict, "it must be a map")
        problem = _metadata_problem(metadata)
        if problem is not None:
            raise ManifestCorruptError(f"snapshot node {name} is malformed: {problem}")
        counts = {key: field_of(key, count, "it must be a non-negative integer")
                  for key in ("logical_bytes", "tensor_count", "bytes_added")}
        chunk_size = field_of("chunk_size", lambda v: (type(v) is int and v == 0) or chunk_size_ok(v),
                              f"{CHUNK_SIZE_RULE} (or 0)")
        pickled = field_of("pickled", lambda v: type(v) is bool, "it must be true or false")
        _last_snapshot.node = (tree, chunk_size)
        return cls(
            tree=ChunkId(tree), tag=tag, parent=None if parent is None else ChunkId(parent), time_ns=time_ns,
            metadata=metadata, chunk_size=chunk_size, pickled=pickled, **counts,
        )


def _metadata_problem(metadata: dict[Any, Any]) -> str | None:
    """Why decoded snapshot metadata is not JSON-like data with string keys (None if it is)."""
    stack: list[tuple[Any, str]] = [(metadata, "metadata")]
    while stack:
        value, path = stack.pop()
        if value is None or type(value) in (bool, int, float, str):
            continue
        if type(value) is list:
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))
        elif type(value) is dict:
            for key, item in value.items():
                if type(key) is not str:
                    return f"{path} has the non-string key {_shown(key)}"
                stack.append((item, f"{path}[{key!r}]"))
        else:
            return f"{path} holds a {type(value).__name__}, not JSON-like data"
    return None


METADATA_MAX_DEPTH = 100


def check_metadata(value: Any, path: str = "metadata", depth: int = 0) -> None:
    """Snapshot metadata must be plain JSON-like data (str keys), so every tool can read it."""
    if depth > METADATA_MAX_DEPTH:
        raise UsageError(f"{path} nests more than {METADATA_MAX_DEPTH} levels deep")
    if isinstance(value, int) and not isinstance(value, bool) and not -INT64_LIMIT <= value < UINT64_LIMIT:
        raise UsageError(f"{path} is an integer beyond 64 bits; store it as a string or a float")
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_metadata(item, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise UsageError(f"{path} has a non-string key {key!r}; metadata keys must be strings")
            check_metadata(item, f"{path}[{key!r}]", depth + 1)
        return
    raise UsageError(
        f"{path} holds a {type(value).__name__}; metadata takes only None, bool, int, float, str, lists and dicts "
        "(convert tensors with .item() or .tolist())"
    )
