"""Manifest nodes: canonical msgpack encodings of a state dict's tree and of a snapshot.

Two node types (see FORMAT.md):
- ``tree``: the typed structure of a state dict; each tensor/array/bytes leaf lists its chunk ids.
- ``snapshot``: the root; points to the tree node and carries tag, parent, time and metadata.

Nodes are stored as chunks, so a node's id is the BLAKE3 of its encoding and a
snapshot id is the Merkle root of the whole checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from cas.errors import FormatVersionError, ManifestCorruptError, UsageError
from cas.ids import DIGEST_SIZE, ChunkId

NODE_VERSION = 1


def pack_node(node: dict[str, Any], default: Callable[[Any], Any] | None = None) -> bytes:
    data: bytes = msgpack.packb(node, use_bin_type=True, default=default, strict_types=False)
    return data


def unpack_node(data: bytes | memoryview, expected_type: str, name: str) -> dict[str, Any]:
    try:
        node = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types on garbage
        raise ManifestCorruptError(f"manifest node {name} does not decode: {exc}") from None
    if not isinstance(node, dict) or "v" not in node or "type" not in node:
        raise ManifestCorruptError(f"manifest node {name} is not a cas node")
    if node["v"] != NODE_VERSION:
        raise FormatVersionError(f"manifest node {name} has version {node['v']}; this cas reads {NODE_VERSION}")
    if node["type"] != expected_type:
        raise ManifestCorruptError(f"manifest node {name} is a {node['type']!r} node, expected {expected_type!r}")
    return node


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
        node = unpack_node(data, "snapshot", name)
        try:
            parent = node["parent"]
            meta = node["metadata"]
            if not isinstance(meta, dict):
                raise TypeError("metadata is not a map")
            return cls(
                tree=ChunkId(node["tree"]), tag=node["tag"], parent=None if parent is None else ChunkId(parent),
                time_ns=int(node["time_ns"]), metadata=meta, logical_bytes=int(node["logical_bytes"]),
                tensor_count=int(node["tensor_count"]), bytes_added=int(node["bytes_added"]),
                chunk_size=int(node["chunk_size"]), pickled=bool(node["pickled"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestCorruptError(f"snapshot node {name} is malformed: {exc}") from None


def check_metadata(value: Any, path: str = "metadata") -> None:
    """Snapshot metadata must be plain JSON-like data (str keys), so every tool can read it."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_metadata(item, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise UsageError(f"{path} has a non-string key {key!r}; metadata keys must be strings")
            check_metadata(item, f"{path}[{key!r}]")
        return
    raise UsageError(
        f"{path} holds a {type(value).__name__}; metadata takes only None, bool, int, float, str, lists and dicts "
        "(convert tensors with .item() or .tolist())"
    )
