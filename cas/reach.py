"""What a snapshot reaches: its manifest nodes and every chunk of every tensor, with names for messages."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cas.errors import ManifestCorruptError
from cas.ids import ChunkId, SnapshotId
from cas.manifest import SnapshotNode, split_chunk_ids, unpack_node
from cas.tree import blob_leaves, format_path, tensor_leaves

if TYPE_CHECKING:
    from cas.reader import ChunkReader

MANIFEST = "<manifest>"


def snapshot_label(ref: str, sid: SnapshotId) -> str:
    return f"{ref} ({sid.short()})" if ref != sid.hex() else sid.short()


def reached_chunks(reader: ChunkReader, sid: SnapshotId, label: str) -> list[tuple[ChunkId, str]]:
    """(chunk id, tensor path) for the snapshot node, the tree node and every data chunk.

    Reading the nodes verifies them; a damaged node raises a CorruptionError.
    """
    node = SnapshotNode.decode(reader.read(sid, f"snapshot {label}"), f"snapshot {label}")
    name = f"tree of snapshot {label}"
    tree = unpack_node(reader.read(node.tree, name), "tree", name, chunk_size=node.chunk_size or None)
    root, storages = tree.get("root"), tree.get("storages")
    if root is None or not isinstance(storages, list):
        raise ManifestCorruptError(f"{name} is malformed")
    out: list[tuple[ChunkId, str]] = [(ChunkId(sid), MANIFEST), (node.tree, MANIFEST)]
    storage_users: dict[int, str] = {}
    try:
        for path, enc in tensor_leaves(root):
            if enc[0] == "V":
                storage_users.setdefault(int(enc[5]), format_path(path))
        for i, (_nbytes, raw) in enumerate(storages):
            tensor = storage_users.get(i, f"<storage {i}>")
            out.extend((cid, tensor) for cid in split_chunk_ids(raw, name))
        for path, raw in blob_leaves(root):
            tensor = format_path(path)
            out.extend((cid, tensor) for cid in split_chunk_ids(raw, name))
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ManifestCorruptError(f"{name} is malformed: {exc}") from None
    return out
