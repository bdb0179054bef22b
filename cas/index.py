"""The LMDB index: chunk locations, pack sizes and snapshot summaries.

A cache of facts the packs and refs hold; ``Repository.rebuild_index`` makes it
anew from pack footers and snapshot nodes. lmdb is imported here and nowhere else.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb

from cas.errors import LockedError, RepositoryError
from cas.ids import ZERO_DIGEST, ChunkId, PackId
from cas.pack import FLAG_HAS_BASE, PackEntry

# pack id, payload offset, stored length, raw length, codec, kind, flags, base id
LOCATION = struct.Struct("<32sQQQBBB5x32s")
PACK_INFO = struct.Struct("<QQ")  # file size, entry count
MAP_SIZE = 1 << 40  # address space only; the file grows with use


@dataclass(frozen=True, slots=True)
class ChunkLocation:
    pack_id: PackId
    offset: int
    stored_length: int
    raw_length: int
    codec: int
    kind: int
    base_id: ChunkId | None

    def encode(self) -> bytes:
        flags = FLAG_HAS_BASE if self.base_id is not None else 0
        return LOCATION.pack(
            self.pack_id, self.offset, self.stored_length, self.raw_length,
            self.codec, self.kind, flags, self.base_id or ZERO_DIGEST,
        )

    @classmethod
    def decode(cls, raw: bytes) -> ChunkLocation:
        pack, offset, stored, rawlen, codec, kind, flags, base = LOCATION.unpack(raw)
        return cls(PackId(pack), offset, stored, rawlen, codec, kind, ChunkId(base) if flags & FLAG_HAS_BASE else None)

    @classmethod
    def of(cls, pack_id: PackId, entry: PackEntry) -> ChunkLocation:
        return cls(pack_id, entry.offset, entry.stored_length, entry.raw_length, entry.codec, entry.kind, entry.base_id)


@dataclass(frozen=True, slots=True)
class SealedPack:
    pack_id: PackId
    size: int
    entries: list[PackEntry]


# LMDB allows one environment per file per process: Repository objects that open the
# same repository in one process share it (reference-counted).
_open_envs: dict[str, tuple[lmdb.Environment, int]] = {}
_open_envs_lock = threading.Lock()


def _acquire_env(path: Path) -> lmdb.Environment:
    key = os.path.realpath(path)
    with _open_envs_lock:
        if key in _open_envs:
            env, count = _open_envs[key]
            _open_envs[key] = (env, count + 1)
            return env
        try:
            env = lmdb.open(
                key, map_size=MAP_SIZE, max_dbs=8, subdir=True, max_readers=512, metasync=True, sync=True,
            )
        except lmdb.LockError as exc:
            raise LockedError(f"index at {path} is locked: {exc}") from None
        except lmdb.Error as exc:
            raise RepositoryError(
                f"cannot open the index at {path}: {exc}; `cas index rebuild` recreates it"
            ) from None
        env.reader_check()  # free the reader slots of processes that died (SIGKILL) holding them
        _open_envs[key] = (env, 1)
        return env


def _release_env(path: Path) -> None:
    key = os.path.realpath(path)
    with _open_envs_lock:
        env, count = _open_envs[key]
        if count > 1:
            _open_envs[key] = (env, count - 1)
        else:
            del _open_envs[key]
            env.close()


class Index:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._env = _acquire_env(path)
        self._closed = False
        self._chunks = self._env.open_db(b"chunks")
        self._packs = self._env.open_db(b"packs")
        self._snapshots = self._env.open_db(b"snapshots")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _release_env(self._path)

    # chunks -------------------------------------------------------------
    def get(self, chunk_id: bytes) -> ChunkLocation | None:
        with self._env.begin(db=self._chunks) as txn:
            raw = txn.get(chunk_id)
        return None if raw is None else ChunkLocation.decode(raw)

    def get_many(self, chunk_ids: Iterable[bytes]) -> dict[bytes, ChunkLocation]:
        found = {}
        with self._env.begin(db=self._chunks) as txn:
            for cid in chunk_ids:
                raw = txn.get(cid)
                if raw is not None:
                    found[cid] = ChunkLocation.decode(raw)
        return found

    def reader(self) -> ChunkLookup:
        """A read transaction for one save; stale reader slots of dead processes are freed first."""
        self._env.reader_check()
        try:
            return ChunkLookup(self._env.begin(db=self._chunks))
        except lmdb.ReadersFullError as exc:
            raise LockedError(f"the index has no free reader slots ({exc}); close other cas processes") from None

    def iter_chunks(self) -> Iterator[tuple[ChunkId, ChunkLocation]]:
        with self._env.begin(db=self._chunks) as txn:
            for key, value in txn.cursor():
                yield ChunkId(bytes(key)), ChunkLocation.decode(value)

    def iter_compact(self) -> Iterator[tuple[bytes, bytes, int, bytes | None]]:
        """(chunk id, pack id, stored length, base id or None) of every chunk, as plain bytes.

        For full scans (gc): fields are sliced out of the stored value, no objects per field.
        """
        has_base = FLAG_HAS_BASE
        with self._env.begin(db=self._chunks) as txn:
            for key, value in txn.cursor():
                stored = int.from_bytes(value[40:48], "little")
                base = bytes(value[64:96]) if value[58] & has_base else None
                yield bytes(key), bytes(value[:32]), stored, base

    def chunk_count(self) -> int:
        with self._env.begin() as txn:
            return int(txn.stat(self._chunks)["entries"])

    def commit(self, packs: Iterable[SealedPack], snapshots: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """One write transaction: the chunk entries of sealed packs and snapshot summaries.

        An existing entry for a chunk is kept (first writer wins): a chunk written
        twice by racing savers is found either way, and GC reclaims the spare copy.
        """
        with self._env.begin(write=True) as txn:
            for pack in packs:
                txn.put(pack.pack_id, PACK_INFO.pack(pack.size, len(pack.entries)), db=self._packs)
                for entry in pack.entries:
                    loc = ChunkLocation.of(pack.pack_id, entry)
                    txn.put(entry.chunk_id, loc.encode(), db=self._chunks, overwrite=False)
            for snap_id, node in snapshots:
                txn.put(snap_id, node, db=self._snapshots)

    def apply_gc(
        self,
        remove_chunks: Iterable[bytes],
        new_packs: Iterable[SealedPack],
        remove_packs: Iterable[bytes],
        remove_snapshots: Iterable[bytes] = (),
    ) -> None:
        """One transaction: drop dead chunks, point moved chunks at their new packs, drop old packs."""
        with self._env.begin(write=True) as txn:
            for cid in remove_chunks:
                txn.delete(cid, db=self._chunks)
            for pack in new_packs:
                txn.put(pack.pack_id, PACK_INFO.pack(pack.size, len(pack.entries)), db=self._packs)
                for entry in pack.entries:
                    txn.put(entry.chunk_id, ChunkLocation.of(pack.pack_id, entry).encode(), db=self._chunks)
            for pid in remove_packs:
                txn.delete(pid, db=self._packs)
            for sid in remove_snapshots:
                txn.delete(sid, db=self._snapshots)

    def snapshot_ids(self) -> list[bytes]:
        with self._env.begin(db=self._snapshots) as txn:
            return [bytes(k) for k, _ in txn.cursor()]

    def packs(self) -> dict[PackId, tuple[int, int]]:
        with self._env.begin(db=self._packs) as txn:
            return {PackId(bytes(k)): PACK_INFO.unpack(v) for k, v in txn.cursor()}

    def snapshot_node(self, snap_id: bytes) -> bytes | None:
        """The cached encoding of a snapshot node (the same bytes as its chunk)."""
        with self._env.begin(db=self._snapshots) as txn:
            raw = txn.get(snap_id)
        return None if raw is None else bytes(raw)

    def clear(self) -> None:
        with self._env.begin(write=True) as txn:
            for db in (self._chunks, self._packs, self._snapshots):
                txn.drop(db, delete=False)


class ChunkLookup:
    """A read transaction held for the length of one save (many lookups, one snapshot of the index)."""

    def __init__(self, txn: lmdb.Transaction) -> None:
        self._txn = txn

    def __contains__(self, chunk_id: bytes) -> bool:
        return self._txn.get(chunk_id) is not None

    def get(self, chunk_id: bytes) -> ChunkLocation | None:
        raw = self._txn.get(chunk_id)
        return None if raw is None else ChunkLocation.decode(raw)

    def close(self) -> None:
        self._txn.abort()
