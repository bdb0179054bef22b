"""The LMDB index: chunk locations, pack sizes and snapshot summaries.

A cache of facts the packs and refs hold; ``Repository.rebuild_index`` makes it
anew from pack footers and snapshot nodes. Nothing is deleted on its word alone
(``cas.storeview`` decides from the packs), and every value carries a checksum
that is checked before use: a damaged value is an :class:`IndexCorruptError`,
never a wrong location. lmdb is imported here and nowhere else, and no lmdb
exception leaves this module: damage is ``IndexCorruptError``, a refused write
(disk full, I/O error) ``StorageError``, full reader slots ``LockedError``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import lmdb
import xxhash

from cas.errors import IndexCorruptError, LockedError, RepositoryError, StorageError, UsageError
from cas.ids import ZERO_DIGEST, ChunkId, PackId
from cas.pack import FLAG_HAS_BASE, PackEntry, raw_length_ok

INDEX_VERSION = b"2"  # 2: every value ends with an XXH3-64 checksum of key and value
# pack id, payload offset, stored length, raw length, codec, kind, flags, base id
LOCATION = struct.Struct("<32sQQQBBB5x32s")
PACK_INFO = struct.Struct("<QQ")  # file size, entry count
CHECKSUM = struct.Struct("<Q")
LOCATION_VALUE = LOCATION.size + CHECKSUM.size
PACK_VALUE = PACK_INFO.size + CHECKSUM.size
#: Largest chunk a location may describe (nodes of huge models included); anything larger is damage.
MAX_RAW_LENGTH = 1 << 32
#: Address space reserved for the map when the process has no address-space limit; the file grows
#: with use. Under ``ulimit -v`` a quarter of the limit is taken (never less than the file needs).
DEFAULT_MAP_SIZE = 64 << 30
MIN_MAP_SIZE = 64 << 20

T = TypeVar("T")
log = logging.getLogger("cas")


def _checksum(key: bytes, value: bytes) -> bytes:
    return CHECKSUM.pack(xxhash.xxh3_64_intdigest(key + value))


def _seal(key: bytes, value: bytes) -> bytes:
    return value + _checksum(key, value)


def _unseal(key: bytes, value: bytes | memoryview, size: int, what: str) -> bytes:
    stored = bytes(value)
    if len(stored) != size or _checksum(key, stored[:-CHECKSUM.size]) != stored[-CHECKSUM.size:]:
        raise IndexCorruptError(
            f"the index entry of {what} {key.hex()[:12]} is damaged (checksum); "
            "`cas index rebuild` recreates the index from the packs"
        )
    return stored[:-CHECKSUM.size]


class ChunkLocation(NamedTuple):
    """Where a chunk's payload lies and how it is coded. A named tuple, not a dataclass: a save looks
    one up per piece of its state dict, and building a frozen dataclass cost 1.4 of its 3.3 µs."""

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
        if len(raw) != LOCATION.size:
            raise IndexCorruptError(f"an index location has {len(raw)} bytes, not {LOCATION.size}")
        pack, offset, stored, rawlen, codec, kind, flags, base = LOCATION.unpack(raw)
        if not raw_length_ok(kind, rawlen) or stored > MAX_RAW_LENGTH or flags & ~FLAG_HAS_BASE:
            raise IndexCorruptError("an index location holds impossible lengths or flags")
        return cls(PackId(pack), offset, stored, rawlen, codec, kind, ChunkId(base) if flags & FLAG_HAS_BASE else None)

    @classmethod
    def of(cls, pack_id: PackId, entry: PackEntry) -> ChunkLocation:
        return cls(pack_id, entry.offset, entry.stored_length, entry.raw_length, entry.codec, entry.kind, entry.base_id)


def encode_location(key: bytes, location: ChunkLocation) -> bytes:
    """The stored value of a chunk location (what ``decode_location`` reads)."""
    return _seal(key, location.encode())


def decode_location(key: bytes, stored: bytes | memoryview) -> ChunkLocation:
    """A checked chunk location (its checksum covers the chunk id it is stored under)."""
    return ChunkLocation.decode(_unseal(key, stored, LOCATION_VALUE, "chunk"))


@dataclass(frozen=True, slots=True)
class SealedPack:
    pack_id: PackId
    size: int
    entries: list[PackEntry]


def _map_size(path: Path) -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    try:
        used = os.stat(path / "data.mdb").st_size
    except OSError:
        used = 0
    wanted = DEFAULT_MAP_SIZE if soft == resource.RLIM_INFINITY else max(MIN_MAP_SIZE, soft // 4)
    return max(wanted, 2 * used)


@contextlib.contextmanager
def _lmdb_errors(path: Path, doing: str) -> Iterator[None]:
    """Translate lmdb's exceptions, once, into typed cas errors that say what to do."""
    try:
        yield
    except lmdb.ReadersFullError as exc:
        raise LockedError(f"the index has no free reader slots ({exc}); close other cas processes") from None
    except lmdb.LockError as exc:
        raise LockedError(f"index at {path} is locked: {exc}") from None
    except (lmdb.DiskError, lmdb.MapFullError, lmdb.TxnFullError, lmdb.ReadonlyError) as exc:
        raise StorageError(
            f"the index at {path} refused a write while {doing} ({exc}); nothing was committed. "
            "Free space (cas forget + cas gc work on a full disk) and try again"
        ) from None
    except (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError, lmdb.VersionMismatchError,
            lmdb.PanicError, lmdb.BadTxnError, lmdb.BadValsizeError, lmdb.BadDbiError, lmdb.IncompatibleError,
            lmdb.CursorFullError, lmdb.PageFullError) as exc:
        raise IndexCorruptError(
            f"the index at {path} is damaged ({exc}) while {doing}; `cas index rebuild` recreates it from the packs"
        ) from None
    except lmdb.Error as exc:
        raise RepositoryError(f"the index at {path} failed while {doing}: {exc}") from None


# What an index file still holds, read by a child process: LMDB trusts its pages, so a damaged
# one can send a read past the end of the file (SIGBUS) and kill the reader. The child takes
# that risk; a rebuild learns from its death that the old index is damaged and goes on.
_DUMP_IN_CHILD = r"""
import struct, sys
import lmdb
out = sys.stdout.buffer
dump = sys.argv[4] == "dump"  # else every page is walked, nothing sent
# a registered reader (lock=True): a saver committing meanwhile does not reuse the pages it reads
env = lmdb.open(sys.argv[1], readonly=True, max_dbs=8, subdir=True, map_size=int(sys.argv[2]))
for tag, name in ((b"c", b"chunks"), (b"s", b"snapshots")):
    db = env.open_db(name, create=False)
    with env.begin(db=db) as txn:
        for key, value in txn.cursor():
            if dump:
                key, value = bytes(key), bytes(value)
                out.write(tag + struct.pack("<II", len(key), len(value)) + key + value)
out.write(b"E")
out.flush()
# a write on a copy: the pages only writes touch (the free list) must hold too
try:  # a consistent copy (under a read transaction), free list included
    env.copy(sys.argv[3])
except (OSError, lmdb.DiskError) as exc:
    sys.stderr.write(f"no copy to write: {exc}")
    sys.exit(3)
copy = lmdb.open(sys.argv[3], map_size=int(sys.argv[2]), max_dbs=8, subdir=True, sync=False, metasync=False)
with copy.begin(write=True) as txn:
    for name in (b"chunks", b"packs", b"snapshots"):
        txn.drop(copy.open_db(name, txn=txn, create=False), delete=False)
copy.close()
out.write(b"W")
out.flush()
"""
_DUMP_RECORD = struct.Struct("<II")


@dataclass
class IndexContents:
    """What an old index still holds: chunk locations whose checksum holds, cached snapshot nodes
    (unchecked: callers hash them), and why the file is damaged (None: every page read cleanly)."""

    #: (chunk id, stored value) of every chunk entry, as stored (checked when decoded)
    records: list[tuple[bytes, bytes]]
    snapshot_nodes: dict[bytes, bytes]
    damage: str | None
    #: False when no child process could be started: nothing was read (the caller reads itself)
    read: bool = True

    def locations(self, in_packs: Collection[bytes] | None = None) -> list[tuple[ChunkId, ChunkLocation]]:
        """The entries (of the packs ``in_packs``) whose checksum holds, decoded."""
        out = []
        for key, value in self.records:
            if in_packs is not None and value[:32] not in in_packs:
                continue
            with contextlib.suppress(IndexCorruptError):
                out.append((ChunkId(key), decode_location(key, value)))
        return out


def read_in_child(path: Path, timeout: float = 600.0, *, contents: bool = True) -> IndexContents:
    """Every chunk entry and snapshot node of the index at ``path``, read in a child process
    (no lmdb call of this process touches the file), which then clears a scratch copy of it
    (a write reads the free list, which no read touches). What the child sent before it died
    or failed is kept; the death itself is reported as damage. With ``contents=False`` the
    child only walks every page (a check that the file is sound: ~0.5 s for 200 K chunks)."""
    found = IndexContents([], {}, None)
    if not (path / "data.mdb").exists():
        return found
    if not sys.executable:
        log.warning("cas: no interpreter to read the index in a child process; reading it in this one")
        return IndexContents([], {}, None, read=False)
    out = b""
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".index-probe-") as scratch:
            done = subprocess.run(
                [sys.executable, "-c", _DUMP_IN_CHILD, str(path), str(_map_size(path)), scratch,
                 "dump" if contents else "walk"],
                capture_output=True, timeout=timeout, check=False,
            )
    except subprocess.TimeoutExpired as exc:
        out, found.damage = exc.stdout or b"", f"reading it took over {timeout:.0f} s"
    except OSError as exc:  # no interpreter to start (an embedded one): not a sign of damage
        log.warning("cas: no child process could read the index (%s); reading it in this one", exc)
        return IndexContents([], {}, None, read=False)
    else:
        out = done.stdout
        wrote = out.endswith(b"EW")
        out = out[:-1] if wrote else out
        if done.returncode < 0:
            doing = "clearing a copy of it" if out.endswith(b"E") else "reading it"
            found.damage = f"{doing} killed the process (signal {-done.returncode})"
        elif done.returncode not in (0, 3):  # 3: no room for the scratch copy (the write is not tried)
            last = (done.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
            found.damage = f"reading it failed: {last[:300]}"
    view = memoryview(out)
    pos = 0
    while pos < len(out) and out[pos] in (0x63, 0x73):  # b"c", b"s"
        head = pos + 1 + _DUMP_RECORD.size
        if head > len(out):
            break
        klen, vlen = _DUMP_RECORD.unpack_from(out, pos + 1)
        if head + klen + vlen > len(out):
            break
        key, value = bytes(view[head:head + klen]), bytes(view[head + klen:head + klen + vlen])
        if out[pos] == 0x73:
            found.snapshot_nodes[key] = value
        else:
            found.records.append((key, value))
        pos = head + klen + vlen
    if found.damage is None and out[pos:] != b"E":
        found.damage = "its contents ended early"
    return found


# LMDB allows one environment per file per process: Repository objects that open the
# same repository in one process share it (reference-counted).
_open_envs: dict[str, tuple[lmdb.Environment, int]] = {}
_open_dbs: dict[str, dict[bytes, Any]] = {}
_env_refs: dict[int, int] = {}  # id(environment) -> holders
_open_envs_lock = threading.Lock()


def _acquire_env(path: Path) -> lmdb.Environment:
    key = os.path.realpath(path)
    with _open_envs_lock:
        if key in _open_envs:
            env = _open_envs[key][0]
            _env_refs[id(env)] += 1
            return env
        with _lmdb_errors(path, "opening it"):
            env = lmdb.open(
                key, map_size=_map_size(path), max_dbs=8, subdir=True, max_readers=512, metasync=True, sync=True,
            )
            env.reader_check()  # free the reader slots of processes that died (SIGKILL) holding them
            _check_file_length(env, path)
            # the named databases are opened once per environment, here, under the lock: two threads
            # opening them at once can deadlock (LMDB's write mutex against the GIL)
            _open_dbs[key] = {name: env.open_db(name) for name in (b"chunks", b"packs", b"snapshots", b"meta")}
        _open_envs[key] = (env, 1)
        _env_refs[id(env)] = 1
        return env


def _check_file_length(env: lmdb.Environment, path: Path) -> None:
    """An index file cut short (a bad copy, a full disk) holds fewer pages than its meta page
    says: LMDB would map the missing ones and the first read of one kills the process (SIGBUS).
    Such a file is damage, found before any read."""
    try:
        size = os.stat(path / "data.mdb").st_size
    except FileNotFoundError:
        return
    needed = (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])
    if size < needed:
        env.close()
        raise IndexCorruptError(
            f"the index file {path / 'data.mdb'} is truncated ({size} of {needed} bytes); it is rebuilt from the packs"
        )


def _release_env(path: Path, env: lmdb.Environment) -> None:
    """One holder fewer of ``env``; the last one closes it (also an environment ``drop_env`` retired)."""
    key = os.path.realpath(path)
    with _open_envs_lock:
        left = _env_refs.get(id(env), 1) - 1
        if left > 0:
            _env_refs[id(env)] = left
            return
        _env_refs.pop(id(env), None)
        if key in _open_envs and _open_envs[key][0] is env:
            del _open_envs[key]
            _open_dbs.pop(key, None)
        # closed under the lock: LMDB refuses a second environment on a file this process still
        # has open, so an opener racing this release must find it closed, not merely forgotten
        with contextlib.suppress(lmdb.Error):
            env.close()


def drop_env(path: Path) -> None:
    """Retire the environment of a (damaged) index before its files are moved: new opens get a new
    one; Repository objects still holding the old one keep it until they close."""
    key = os.path.realpath(path)
    with _open_envs_lock:
        _open_envs.pop(key, None)
        _open_dbs.pop(key, None)


class Index:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._env = _acquire_env(path)
        self._closed = False
        try:
            with _open_envs_lock:
                dbs = _open_dbs.get(os.path.realpath(path)) or {}
            if not dbs:
                raise IndexCorruptError(f"the index at {path} was replaced while it opened; open the repository again")
            self._chunks: Any = dbs[b"chunks"]
            self._packs: Any = dbs[b"packs"]
            self._snapshots: Any = dbs[b"snapshots"]
            self._meta: Any = dbs[b"meta"]
            with _lmdb_errors(path, "opening it"), self._env.begin(db=self._meta) as txn:
                version = txn.get(b"version")
                empty = txn.stat(self._chunks)["entries"] == 0 and txn.stat(self._snapshots)["entries"] == 0
            if version is None and empty:
                with _lmdb_errors(path, "opening it"), self._env.begin(write=True, db=self._meta) as txn:
                    txn.put(b"version", INDEX_VERSION)
            elif version != INDEX_VERSION:
                raise IndexCorruptError(
                    f"the index at {path} has version {version!r}, not {INDEX_VERSION!r}; it is rebuilt from the packs"
                )
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _release_env(self._path, self._env)

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(
                "this repository is closed (Repository.close, or its `with` block ended); open it again with "
                f"cas.Repository.open (its index: {self._path})"
            )

    def _read(self, doing: str, fn: Callable[[lmdb.Transaction], T], db: Any = None) -> T:
        self._check_open()
        with _lmdb_errors(self._path, doing), self._env.begin(db=db) as txn:
            return fn(txn)

    def _write(self, doing: str, fn: Callable[[lmdb.Transaction], None]) -> None:
        self._check_open()
        with _lmdb_errors(self._path, doing), self._env.begin(write=True) as txn:
            fn(txn)

    # chunks -------------------------------------------------------------
    def get(self, chunk_id: bytes) -> ChunkLocation | None:
        raw = self._read("reading a chunk location", lambda txn: txn.get(chunk_id), self._chunks)
        return None if raw is None else decode_location(bytes(chunk_id), raw)

    def get_many(self, chunk_ids: Iterable[bytes]) -> dict[bytes, ChunkLocation]:
        def run(txn: lmdb.Transaction) -> dict[bytes, ChunkLocation]:
            found = {}
            for cid in chunk_ids:
                raw = txn.get(cid)
                if raw is not None:
                    found[cid] = decode_location(bytes(cid), raw)
            return found
        return self._read("reading chunk locations", run, self._chunks)

    def reader(self) -> ChunkLookup:
        """A read transaction for one save; stale reader slots of dead processes are freed first."""
        self._check_open()
        with _lmdb_errors(self._path, "starting a read"):
            self._env.reader_check()
            return ChunkLookup(self._env.begin(db=self._chunks), self._path)

    def iter_chunks(self) -> Iterator[tuple[ChunkId, ChunkLocation]]:
        self._check_open()
        with _lmdb_errors(self._path, "listing chunks"), self._env.begin(db=self._chunks) as txn:
            for key, value in txn.cursor():
                yield ChunkId(bytes(key)), decode_location(bytes(key), value)

    def iter_compact(self) -> Iterator[tuple[bytes, bytes, int, bytes | None]]:
        """(chunk id, pack id, stored length, base id or None) of every chunk, as plain bytes.

        For full scans (gc): fields are sliced out of the stored value, no objects per field;
        the checksum is still checked.
        """
        has_base = FLAG_HAS_BASE
        self._check_open()
        with _lmdb_errors(self._path, "listing chunks"), self._env.begin(db=self._chunks) as txn:
            for key, value in txn.cursor():
                k = bytes(key)
                v = _unseal(k, value, LOCATION_VALUE, "chunk")
                stored = int.from_bytes(v[40:48], "little")
                base = bytes(v[64:96]) if v[58] & has_base else None
                yield k, bytes(v[:32]), stored, base

    def chunk_count(self) -> int:
        return int(self._read("counting chunks", lambda txn: txn.stat(self._chunks)["entries"]))

    def commit(
        self,
        packs: Iterable[SealedPack],
        snapshots: Iterable[tuple[bytes, bytes]] = (),
        replace: frozenset[bytes] | set[bytes] = frozenset(),
    ) -> None:
        """One write transaction: the chunk entries of sealed packs and snapshot summaries.

        An existing entry for a chunk is kept (first writer wins): a chunk written
        twice by racing savers is found either way, and GC reclaims the spare copy.
        Chunks in ``replace`` (written again because their entry named a copy that cannot be
        read: a missing or short pack, a broken chain) take the new entry.
        """
        def run(txn: lmdb.Transaction) -> None:
            for pack in packs:
                info = PACK_INFO.pack(pack.size, len(pack.entries))
                txn.put(pack.pack_id, _seal(pack.pack_id, info), db=self._packs)
                for entry in pack.entries:
                    loc = ChunkLocation.of(pack.pack_id, entry).encode()
                    txn.put(entry.chunk_id, _seal(entry.chunk_id, loc), db=self._chunks,
                            overwrite=entry.chunk_id in replace)
            for snap_id, node in snapshots:
                txn.put(snap_id, node, db=self._snapshots)
        self._write("committing a save", run)

    def apply(
        self,
        put_chunks: Iterable[tuple[bytes, ChunkLocation]] = (),
        remove_chunks: Iterable[bytes] = (),
        put_packs: Iterable[tuple[bytes, int, int]] = (),
        remove_packs: Iterable[bytes] = (),
        put_snapshots: Iterable[tuple[bytes, bytes]] = (),
        remove_snapshots: Iterable[bytes] = (),
    ) -> None:
        """One transaction of explicit changes (gc, repair, reconciliation with the packs)."""
        def run(txn: lmdb.Transaction) -> None:
            for cid in remove_chunks:
                txn.delete(cid, db=self._chunks)
            for cid, loc in put_chunks:
                txn.put(cid, _seal(cid, loc.encode()), db=self._chunks)
            for pid in remove_packs:
                txn.delete(pid, db=self._packs)
            for pid, size, count in put_packs:
                txn.put(pid, _seal(pid, PACK_INFO.pack(size, count)), db=self._packs)
            for sid in remove_snapshots:
                txn.delete(sid, db=self._snapshots)
            for sid, node in put_snapshots:
                txn.put(sid, node, db=self._snapshots)
        self._write("updating the index", run)

    def snapshot_ids(self) -> list[bytes]:
        return self._read("listing snapshots", lambda txn: [bytes(k) for k, _ in txn.cursor()], self._snapshots)

    def packs(self) -> dict[PackId, tuple[int, int]]:
        def run(txn: lmdb.Transaction) -> dict[PackId, tuple[int, int]]:
            out = {}
            for k, v in txn.cursor():
                key = bytes(k)
                size, count = PACK_INFO.unpack(_unseal(key, v, PACK_VALUE, "pack"))
                out[PackId(key)] = (size, count)
            return out
        return self._read("listing packs", run, self._packs)

    def snapshot_node(self, snap_id: bytes) -> bytes | None:
        """The cached encoding of a snapshot node (the same bytes as its chunk; callers check its hash)."""
        raw = self._read("reading a snapshot", lambda txn: txn.get(snap_id), self._snapshots)
        return None if raw is None else bytes(raw)

    def clear(self) -> None:
        def run(txn: lmdb.Transaction) -> None:
            for db in (self._chunks, self._packs, self._snapshots):
                txn.drop(db, delete=False)
        self._write("clearing the index", run)


class ChunkLookup:
    """A read transaction held for the length of one save (many lookups, one snapshot of the index)."""

    def __init__(self, txn: lmdb.Transaction, path: Path) -> None:
        self._txn = txn
        self._path = path

    def __contains__(self, chunk_id: bytes) -> bool:
        with _lmdb_errors(self._path, "looking up a chunk"):
            return self._txn.get(chunk_id) is not None

    def get(self, chunk_id: bytes) -> ChunkLocation | None:
        try:  # once per piece of a save: no context manager on the way (it cost a third of the look-up)
            raw = self._txn.get(chunk_id)
        except lmdb.Error:
            with _lmdb_errors(self._path, "looking up a chunk"):
                raise
        return None if raw is None else decode_location(bytes(chunk_id), raw)

    def close(self) -> None:
        with contextlib.suppress(lmdb.Error):
            self._txn.abort()
