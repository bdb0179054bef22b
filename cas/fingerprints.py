"""The XXH3 fingerprints of a save's chunks, kept on this machine for the first save after a reopen.

A save takes the id of a chunk whose bytes did not change since its parent without a BLAKE3
pass when their XXH3-128 fingerprint equals the parent's (FORMAT.md §4). Within one process the
fingerprints stay in memory; so that a resumed trainer's first save need not BLAKE3-hash every
chunk again, each committed save also leaves them in ``<local dir>/fingerprints/<snapshot>.fp``
(the repository directory of a local repository, its cache directory for a remote one).

The file is a cache and is never trusted blindly: it maps chunk ids to fingerprints (the chunk
ids of each position come from the parent's own tree, never from the file), it is written whole
under a temp name and renamed, and a file whose magic, length or XXH3-64 checksum is wrong is
ignored (the save then hashes everything). Only the newest ``KEEP`` files are kept.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import time
import uuid
from pathlib import Path
from typing import Any

import xxhash

from cas.ids import ChunkId, SnapshotId
from cas.saver import Fingerprints

MAGIC = b"CASFP\x00\x00\x01"
ENTRY = struct.Struct("<32s16s")  # chunk id, XXH3-128 of its raw bytes
COUNT = struct.Struct("<Q")
CHECKSUM = struct.Struct("<Q")
KEEP = 4  # files kept per repository on this machine (the latest saves' parents)


def directory_of(local_dir: Path) -> Path:
    return local_dir / "fingerprints"


def _nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO opens without a writer


def _path(directory: Path, snap_id: SnapshotId) -> Path:
    return directory / f"{snap_id.hex()}.fp"


def encode(fingerprints: Fingerprints) -> bytes:
    by_chunk = {bytes(cid): fp for fp, cid in fingerprints.values()}
    body = b"".join([MAGIC, COUNT.pack(len(by_chunk)), *(ENTRY.pack(cid, fp) for cid, fp in sorted(by_chunk.items()))])
    return body + CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))


def decode(data: bytes) -> dict[bytes, bytes] | None:
    """chunk id -> fingerprint, or None if ``data`` is not a whole, intact fingerprint file."""
    head = len(MAGIC) + COUNT.size
    if len(data) < head + CHECKSUM.size or not data.startswith(MAGIC):
        return None
    (count,) = COUNT.unpack_from(data, len(MAGIC))
    if len(data) != head + count * ENTRY.size + CHECKSUM.size:
        return None
    body = data[: -CHECKSUM.size]
    if CHECKSUM.unpack_from(data, len(body))[0] != xxhash.xxh3_64_intdigest(body):
        return None
    return dict(ENTRY.iter_unpack(body[head:]))


def save(directory: Path, snap_id: SnapshotId, fingerprints: Fingerprints) -> None:
    """Leave a committed save's fingerprints for the next process (best effort: a cache that cannot
    be written only means the next save hashes every chunk)."""
    if not fingerprints:
        return
    with contextlib.suppress(OSError):
        directory.mkdir(parents=True, exist_ok=True)
        temp = directory / f".{snap_id.hex()}.{uuid.uuid4().hex}.tmp"
        try:
            temp.write_bytes(encode(fingerprints))
            os.replace(temp, _path(directory, snap_id))
        finally:
            with contextlib.suppress(OSError):
                temp.unlink()
        _prune(directory)


def _prune(directory: Path) -> None:
    entries = []
    for e in os.scandir(directory):
        with contextlib.suppress(OSError):
            if e.name.endswith(".fp"):
                entries.append((e.stat().st_mtime_ns, e.path))
            elif e.name.endswith(".tmp") and e.stat().st_mtime_ns < time.time_ns() - 3600 * 10**9:
                os.unlink(e.path)  # a writer killed between write and rename
    for _, path in sorted(entries, reverse=True)[KEEP:]:
        with contextlib.suppress(OSError):
            os.unlink(path)


def load(
    directory: Path, snap_id: SnapshotId, parent_chunks: dict[Any, tuple[Any, list[ChunkId]]]
) -> Fingerprints | None:
    """The fingerprints of snapshot ``snap_id``'s chunks at their positions, the positions and ids
    taken from the parent's tree (``cas.tree.base_candidates``: blob path -> (signature, chunk
    ids)), the fingerprints from the file; None without an intact file."""
    # a cache: anything but a regular file no larger than the parent's chunks can need is ignored
    # (a device, a FIFO or a huge file there must not hang or exhaust a save)
    limit = len(MAGIC) + COUNT.size + CHECKSUM.size + ENTRY.size * sum(len(c) for _s, c in parent_chunks.values())
    try:
        with open(_path(directory, snap_id), "rb", opener=_nonblocking) as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
                return None
            data = f.read(limit + 1)
    except OSError:
        return None
    by_chunk = decode(data)
    if by_chunk is None:
        return None
    out: Fingerprints = {}
    for path, (_signature, chunks) in parent_chunks.items():
        for index, cid in enumerate(chunks):
            fp = by_chunk.get(bytes(cid))
            if fp is not None:
                out[(path, index)] = (fp, cid)
    return out
