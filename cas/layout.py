"""A repository's objects over a storage backend: config, packs, refs, quarantine, locks.

    config.json                  the repository config (FORMAT.md §2)
    packs/<xx>/<id>.pack         immutable pack files (§3)
    refs/<name>                  one line: a snapshot id (§6)
    quarantine/<id>.pack         copies of damaged packs kept by `check --repair`
    damaged/<chunk>-<pack>-<n>   a stored copy of a chunk that a read found damaged (saves write it again)
    locks/<uuid>.json            lock objects of remote repositories (§9)

Every byte goes through a :class:`~cas.backends.Backend`; nothing here opens a file of the
store by path. What lives on the local machine only is kept apart: packs are written in a
local temp directory before they are stored, and the index (a cache) lives in the repository
directory for a local repository and under ``CAS_CACHE_DIR`` (default ``~/.cache/cas``), keyed
by the repository id, for a remote one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import blake3

from cas.backends import Backend, BucketNotFoundError, open_backend
from cas.errors import (
    CasError,
    FencedError,
    LockedError,
    ManifestCorruptError,
    MissingChunkError,
    NotARepositoryError,
    ObjectNotFoundError,
    PreconditionFailedError,
    RepositoryExistsError,
    TagExistsError,
)
from cas.ids import ChunkId, PackId, SnapshotId
from cas.packcache import PackCache, budget_from_env
from cas.store import REPO_FORMAT_NAME, REPO_VERSION, validate_config

CONFIG_KEY = "config.json"
PACKS = "packs/"
REFS = "refs/"
QUARANTINE = "quarantine/"
DAMAGED = "damaged/"
DAMAGE_KEY = re.compile(r"damaged/([0-9a-f]{64})-([0-9a-f]{64})-(\d{1,19})")
LOCKS = "locks/"
INDEXES = "indexes/"
INDEX_MAGIC = b"CASIDX\x00\x00"
INDEX_VERSION = 1
INDEX_HEADER = struct.Struct("<8sH6xI")  # magic, version, pack count
INDEX_PACK = struct.Struct("<32sQQ")  # pack id, pack size, footer length
HEX_ID = re.compile(r"[0-9a-f]{64}")
PACK_KEY = re.compile(r"packs/([0-9a-f]{2})/([0-9a-f]{64})(\.pack|\.meta)")
DATA_SUFFIX = ".pack"
META_SUFFIX = ".meta"
#: a lock object not refreshed for this long belongs to a dead process (FORMAT.md §9)
LOCK_STALE_S = 600.0
LOCK_REFRESH_S = 120.0
LOCK_WAIT_S = 300.0
#: the flock(2) files of a local repository (never lock objects: a repository reached through
#: another backend, a local replica opened by its URL, lists them beside its lock objects)
FLOCK_FILES = frozenset({"locks/gate.lock", "locks/repo.lock"})


log = logging.getLogger("cas")


def damage_key(chunk_id: bytes, pack_id: bytes, offset: int) -> str:
    """``damaged/<chunk id>-<pack id>-<payload offset>``: one record per damaged copy, all in one flat
    prefix (FORMAT.md §5)."""
    return f"{DAMAGED}{bytes(chunk_id).hex()}-{bytes(pack_id).hex()}-{int(offset)}"


def pack_key(pack_id: PackId, meta: bool = False) -> str:
    """``packs/xx/<id>.pack`` for data, ``packs/xx/<id>.meta`` for manifest nodes (version 2)."""
    name = pack_id.hex()
    return f"{PACKS}{name[:2]}/{name}{META_SUFFIX if meta else DATA_SUFFIX}"


def cache_root() -> Path:
    return Path(os.environ.get("CAS_CACHE_DIR") or Path.home() / ".cache" / "cas")


class BackendSource:
    """A pack object, read through the backend (a ``cas.pack.PackSource``)."""

    def __init__(self, backend: Backend, pack_id: PackId, size: int | None = None, key: str | None = None) -> None:
        self._backend = backend
        self._key = key or pack_key(pack_id)
        self._size = size
        self.name = self._key.rsplit("/", 1)[-1]

    def size(self) -> int:
        if self._size is None:
            try:
                self._size = self._backend.stat(self._key).size
            except ObjectNotFoundError:
                raise MissingChunkError(f"pack {self.name[:12]} is missing") from None
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        try:
            return self._backend.read_range(self._key, offset, length)
        except ObjectNotFoundError:
            raise MissingChunkError(f"pack {self.name[:12]} is missing") from None

    def read_all(self) -> bytes:
        try:
            return self._backend.read(self._key)
        except ObjectNotFoundError:
            raise MissingChunkError(f"pack {self.name[:12]} is missing") from None


def _dead_here(body: dict[str, Any]) -> bool:
    """A lock of a process on this host that no longer runs (killed): stale at once, no timeout."""
    if body.get("host") != socket.gethostname() or not isinstance(body.get("pid"), int):
        return False
    try:
        os.kill(body["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Store:
    """The objects of one repository in one backend, plus the local directories that serve it."""

    def __init__(self, backend: Backend, url: str, local_dir: Path) -> None:
        self.backend = backend
        self.url = url
        #: the repository directory of a local repository; for a remote one its cache directory
        self.local_dir = local_dir
        self.is_local = backend.capabilities.local_path is not None
        #: how long ``lock`` waits for a conflicting holder before a ``LockedError``
        self.lock_wait_s = LOCK_WAIT_S
        self.tmp_dir = local_dir / "tmp"
        self.index_dir = local_dir / "index"
        self.locks_dir = local_dir / "locks"
        for d in (self.tmp_dir, self.index_dir, self.locks_dir):
            d.mkdir(parents=True, exist_ok=True)
        #: remote stores: the packs this machine wrote (and so reads back fastest), kept locally (cas/packcache.py)
        self.pack_cache = PackCache(local_dir / "pack-cache", 0 if self.is_local else budget_from_env())
        #: the key of every pack seen (data packs end in .pack, manifest packs in .meta)
        self._pack_keys: dict[PackId, str] = {}
        self._store_reads = 0  # > 0: reads bypass the pack cache (see reading_the_store)
        self._keys_lock = threading.Lock()
        #: lock objects this process holds -> when each was last written (refreshed)
        self._held: dict[str, float] = {}
        self._held_lock = threading.Lock()
        #: damaged copies this process has recorded (each is written once)
        self._recorded: set[tuple[bytes, bytes, int]] = set()

    def describe(self) -> str:
        return self.backend.describe()

    # config ---------------------------------------------------------------
    def read_config_bytes(self) -> bytes | None:
        try:
            return self.backend.read(CONFIG_KEY)
        except ObjectNotFoundError:
            return None

    def write_config(self, config: dict[str, Any]) -> None:
        self.backend.write(CONFIG_KEY, json.dumps(config, indent=2).encode() + b"\n")

    def create_config(self, config: dict[str, Any]) -> None:
        """Write the config of a new repository; another repository already there wins (typed error)."""
        self.backend.write(CONFIG_KEY, json.dumps(config, indent=2).encode() + b"\n", mode="create")

    # packs ----------------------------------------------------------------
    def list_packs(self) -> dict[PackId, int]:
        """Every pack object and its size; objects whose names are not pack keys are skipped."""
        out: dict[PackId, int] = {}
        keys: dict[PackId, str] = {}
        for info in self.backend.list(PACKS):
            m = PACK_KEY.fullmatch(info.key)
            if m and m.group(2).startswith(m.group(1)):
                pid = PackId(bytes.fromhex(m.group(2)))
                out[pid] = info.size
                keys[pid] = info.key
        with self._keys_lock:
            self._pack_keys.update(keys)
        return out

    def pack_key_of(self, pack_id: PackId) -> str:
        """The key of a pack: known from a listing or a write, else found (data first, then nodes)."""
        with self._keys_lock:
            key = self._pack_keys.get(pack_id)
        if key is not None:
            return key
        for meta in (False, True):
            candidate = pack_key(pack_id, meta)
            if self.backend.exists(candidate):
                with self._keys_lock:
                    self._pack_keys[pack_id] = candidate
                return candidate
        return pack_key(pack_id)

    def pack_source(self, pack_id: PackId, size: int | None = None) -> BackendSource:
        return BackendSource(self.backend, pack_id, size, self.pack_key_of(pack_id))

    def pack_size(self, pack_id: PackId) -> int | None:
        try:
            return self.backend.stat(self.pack_key_of(pack_id)).size
        except ObjectNotFoundError:
            return None

    def hold_open(self) -> AbstractContextManager[None]:
        """Pack handles opened meanwhile stay open for later reads until it ends (one restore)."""
        return self.backend.hold_open()

    def _cached(self, pack_id: PackId) -> Path | None:
        if self._store_reads or not self.pack_cache.enabled:
            return None
        return self.pack_cache.path_of(pack_id)

    @contextlib.contextmanager
    def reading_the_store(self) -> Iterator[None]:
        """Meanwhile every pack read goes to the store, never to this machine's pack cache: what
        ``verify`` and ``check`` judge is the store's bytes (a cached copy may be intact while the
        bucket's is damaged, and every other machine reads the bucket)."""
        self._store_reads += 1
        try:
            yield
        finally:
            self._store_reads -= 1

    def has_local_copy(self, pack_id: PackId) -> bool:
        """True if reads of this pack are served from this machine (a local repository, or a remote
        one's pack cache): per-chunk reads straight into their tensors then cost no request."""
        return self.is_local or self._cached(pack_id) is not None

    def drop_cached(self, pack_id: PackId) -> bool:
        """Forget the local copy of a pack (a read through it failed to verify); True if there was one.
        While reads go to the store (``reading_the_store``) the failure was not the copy's, and the
        copy stays: it may be the intact one that ``check --repair`` puts back."""
        if self._store_reads:
            return False
        had = self._cached(pack_id) is not None
        self.pack_cache.drop(pack_id)
        return had

    def read_pack_range(self, pack_id: PackId, offset: int, length: int) -> bytes:
        cached = self._cached(pack_id)
        if cached is not None:
            try:
                return self.pack_cache.pread(cached, offset, length)
            except OSError:
                self.pack_cache.drop(pack_id)  # evicted by another process meanwhile: read the store
        try:
            return self.backend.read_range(self.pack_key_of(pack_id), offset, length)
        except ObjectNotFoundError:
            self._forget_key(pack_id)
            raise MissingChunkError(f"pack {pack_id.short()} is missing") from None

    def read_pack_ranges(self, pack_id: PackId, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Several ranges of one pack in one batched call (adjacent ranges merge into one request)."""
        cached = self._cached(pack_id)
        if cached is not None:
            try:
                return self.pack_cache.pread_many(cached, ranges)
            except OSError:
                self.pack_cache.drop(pack_id)
        try:
            return self.backend.read_ranges(self.pack_key_of(pack_id), ranges)
        except ObjectNotFoundError:
            self._forget_key(pack_id)
            raise MissingChunkError(f"pack {pack_id.short()} is missing") from None

    def read_pack_into(self, pack_id: PackId, offset: int, dest: memoryview) -> None:
        cached = self._cached(pack_id)
        if cached is not None:
            try:
                if self.pack_cache.pread_into(cached, offset, dest) == len(dest):
                    return
            except OSError:
                pass
            self.pack_cache.drop(pack_id)
        try:
            self.backend.read_into(self.pack_key_of(pack_id), offset, dest)
        except ObjectNotFoundError:
            self._forget_key(pack_id)
            raise MissingChunkError(f"pack {pack_id.short()} is missing") from None

    def _forget_key(self, pack_id: PackId) -> None:
        with self._keys_lock:
            self._pack_keys.pop(pack_id, None)

    def publish_pack(self, temp_path: Path, pack_id: PackId, meta: bool = False) -> None:
        """Store a sealed, fsynced temp pack under its name (moved into place on a local repository)."""
        key = pack_key(pack_id, meta)
        if not self.is_local:
            self.pack_cache.add(temp_path, pack_id)  # before the upload consumes the temp file
        try:
            self.backend.write_file(key, temp_path)
        except BaseException:
            self.pack_cache.drop(pack_id)
            raise
        with self._keys_lock:
            self._pack_keys[pack_id] = key

    def delete_pack(self, pack_id: PackId) -> None:
        self.backend.delete(self.pack_key_of(pack_id))
        self._forget_key(pack_id)
        self.pack_cache.drop(pack_id)

    def quarantine_pack(self, pack_id: PackId) -> str:
        """Keep a copy of a damaged pack under ``quarantine/`` (never read, never deleted by gc)."""
        source = self.pack_key_of(pack_id)
        key = f"{QUARANTINE}{source.rsplit('/', 1)[-1]}"
        if not self.backend.exists(key):
            self.backend.copy(source, key)
        return key

    # damage records (FORMAT.md §5) ------------------------------------------
    def record_damage(self, chunk_id: ChunkId, pack_id: PackId, offset: int) -> None:
        """Note that the copy of ``chunk_id`` at ``offset`` in ``pack_id`` does not decode to its id, so
        no save deduplicates against it and no rebuilt index chooses it while another copy exists.
        Best effort: a store that refuses the write (read-only credentials, a fenced region, a full
        disk) loses only the note; the read that found the damage still fails with its own error."""
        copy = (bytes(chunk_id), bytes(pack_id), int(offset))
        with self._keys_lock:
            if copy in self._recorded:
                return
            self._recorded.add(copy)
        body = json.dumps({"chunk": chunk_id.hex(), "pack": pack_id.hex(), "offset": int(offset),
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
        try:
            self.backend.write(damage_key(*copy), body)
        except (CasError, OSError) as exc:
            with self._keys_lock:
                self._recorded.discard(copy)  # a later read may record it yet
            log.warning("could not record damaged chunk %s (pack %s): %s", chunk_id.short(), pack_id.short(), exc)

    def damage_records(self) -> dict[ChunkId, set[tuple[PackId, int]]]:
        """Every recorded damaged copy, from the keys alone: chunk id -> {(pack id, payload offset)}.
        Best effort, as recording: a store that cannot list them gives none (and says so)."""
        out: dict[ChunkId, set[tuple[PackId, int]]] = {}
        try:
            for info in self.backend.list(DAMAGED):
                m = DAMAGE_KEY.fullmatch(info.key)
                if m is not None:
                    copies = out.setdefault(ChunkId(bytes.fromhex(m[1])), set())
                    copies.add((PackId(bytes.fromhex(m[2])), int(m[3])))
        except (CasError, OSError) as exc:
            log.warning("could not list the damage records: %s", exc)
            return {}
        return out

    def clear_damage(self, copies: Iterable[tuple[bytes, bytes, int]]) -> None:
        """Drop these records (chunk id, pack id, offset): their copy is gone, or everything verifies."""
        for copy in copies:
            try:
                self.backend.delete(damage_key(*copy))
            except (CasError, OSError) as exc:
                log.warning("could not drop the damage record of chunk %s: %s", bytes(copy[0]).hex()[:12], exc)
            with self._keys_lock:
                self._recorded.discard((bytes(copy[0]), bytes(copy[1]), int(copy[2])))

    # index objects ----------------------------------------------------------
    def write_index_object(self, packs: list[tuple[PackId, int, bytes]]) -> str | None:
        """Store the footers of ``packs`` (id, size, footer bytes) in one object under ``indexes/``,
        so a machine with an empty cache learns what the packs hold in one read instead of three
        per pack. Each footer proves itself (a pack's name is its footer's hash)."""
        if not packs:
            return None
        body = [INDEX_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, len(packs))]
        for pack_id, size, footer in packs:
            body += [INDEX_PACK.pack(pack_id, size, len(footer)), footer]
        data = b"".join(body)
        key = f"{INDEXES}{blake3.blake3(data).hexdigest()}.idx"
        self.backend.write(key, data + blake3.blake3(data).digest())
        return key

    def read_index_objects(self) -> tuple[dict[PackId, tuple[int, bytes]], list[str]]:
        """Every footer the index objects hold (pack id -> size, footer bytes), and their keys. An
        object that does not check is skipped (the packs it covers are read directly)."""
        found: dict[PackId, tuple[int, bytes]] = {}
        keys = []
        for info in self.backend.list(INDEXES):
            keys.append(info.key)
            try:
                data = self.backend.read(info.key)
            except ObjectNotFoundError:
                continue
            body, digest = data[:-32], data[-32:]
            if len(data) < INDEX_HEADER.size + 32 or blake3.blake3(body).digest() != digest:
                log.warning("cas: index object %s is damaged; the packs it covers are read directly", info.key)
                continue
            magic, version, count = INDEX_HEADER.unpack_from(body, 0)
            if magic != INDEX_MAGIC or version != INDEX_VERSION:
                continue
            pos = INDEX_HEADER.size
            for _ in range(count):
                if pos + INDEX_PACK.size > len(body):
                    break
                pack_id, size, length = INDEX_PACK.unpack_from(body, pos)
                pos += INDEX_PACK.size
                found[PackId(pack_id)] = (size, body[pos:pos + length])
                pos += length
        return found, keys

    def delete_index_objects(self, keys: list[str]) -> None:
        for key in keys:
            self.backend.delete(key)

    # refs -----------------------------------------------------------------
    def ref_names(self) -> list[str]:
        return sorted(info.key[len(REFS):] for info in self.backend.list(REFS) if "/" not in info.key[len(REFS):])

    def read_ref(self, name: str) -> SnapshotId:
        """The snapshot id a ref holds; FileNotFoundError if it is gone (listing races a delete)."""
        try:
            text = self.backend.read(REFS + name).decode(errors="replace").strip()
        except ObjectNotFoundError:
            raise FileNotFoundError(name) from None
        if not HEX_ID.fullmatch(text):
            raise ManifestCorruptError(f"ref {name!r} is damaged (holds {text[:80]!r}, not a snapshot id)")
        return SnapshotId(bytes.fromhex(text))

    def ref_version(self, name: str) -> str | None:
        try:
            return self.backend.stat(REFS + name).version
        except ObjectNotFoundError:
            return None

    def has_ref(self, name: str) -> bool:
        return self.backend.exists(REFS + name)

    def write_ref(self, name: str, snap_id: SnapshotId, *, create: bool = False, if_version: str | None = None) -> None:
        """Write a ref atomically. ``create``: only if no ref of that name exists (a tag is created by
        exactly one save); ``if_version``: only if the ref still has that version (moving a tag is a
        compare-and-swap, so two savers never both think they moved it)."""
        data = snap_id.hex().encode() + b"\n"
        try:
            if create:
                self.backend.write(REFS + name, data, mode="create")
            else:
                self.backend.write(REFS + name, data, if_version=if_version)
        except FencedError:
            raise
        except PreconditionFailedError:
            raise TagExistsError(
                f"tag {name!r} was taken or moved by another save while this one ran; nothing tagged"
            ) from None

    def delete_ref(self, name: str) -> None:
        self.backend.delete(REFS + name)

    # temp files -----------------------------------------------------------
    def new_temp_path(self, prefix: str) -> Path:
        # made again if it went (a remote store's cache directory cleaned while a job runs)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self.tmp_dir / f"{prefix}-{os.getpid()}-{uuid.uuid4().hex}.tmp"

    # locks ----------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, exclusive: bool) -> Iterator[None]:
        """Savers and loads hold the repository lock shared; gc, check and rebuild exclusive.

        Local repositories use flock(2) with a turnstile (``gate.lock``) so a stream of savers
        cannot starve gc. Remote repositories use lock objects (FORMAT.md §9): no lock server,
        and a process that died holding one stops counting once its object goes stale.
        """
        if self.is_local:
            with self._flock(exclusive, self.locks_dir):
                yield
            return
        flock_dir = self.backend.capabilities.flock_dir
        with self._object_lock(exclusive):
            if flock_dir is None:
                yield
            else:  # a local repository reached as objects: its flock holders count too
                flock_dir.mkdir(parents=True, exist_ok=True)
                with self._flock(exclusive, flock_dir):
                    yield

    @contextlib.contextmanager
    def _flock(self, exclusive: bool, locks_dir: Path) -> Iterator[None]:
        with open(locks_dir / "gate.lock", "a+b") as gate, open(locks_dir / "repo.lock", "a+b") as f:
            deadline = time.monotonic() + self.lock_wait_s
            if exclusive:
                self._flock_until(gate, fcntl.LOCK_EX, deadline)
                try:
                    self._flock_until(f, fcntl.LOCK_EX, deadline)
                    try:
                        yield
                    finally:
                        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                finally:
                    fcntl.flock(gate.fileno(), fcntl.LOCK_UN)
            else:
                self._flock_until(gate, fcntl.LOCK_SH, deadline)
                try:
                    self._flock_until(f, fcntl.LOCK_SH, deadline)
                finally:
                    fcntl.flock(gate.fileno(), fcntl.LOCK_UN)
                try:
                    yield
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _flock_until(self, f: Any, mode: int, deadline: float) -> None:
        """flock(2), waiting as long as it takes, or (a shorter ``lock_wait_s``) until ``deadline``."""
        if self.lock_wait_s >= LOCK_WAIT_S:
            fcntl.flock(f.fileno(), mode)
            return
        while True:
            try:
                fcntl.flock(f.fileno(), mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockedError(f"{self.describe()} is locked; try again later") from None
                time.sleep(0.05)

    def _live_locks(self, own: str) -> list[dict[str, Any]]:
        """The other lock objects that still count. Age is judged on the store's clock: a lock is
        stale when the store last wrote it more than ``LOCK_STALE_S`` before it wrote ours (just
        now), so a holder whose clock is off is judged right; or at once when its process is gone
        from this host. An object that is not a lock body counts as an exclusive lock of unknown
        holder until the store says it is old (never ignored while fresh, never a raw error)."""
        listed = list(self.backend.list(LOCKS))
        now = next((info.mtime for info in listed if info.key == own), None)
        if now is None:
            now = max((info.mtime for info in listed), default=time.time())
        out = []
        for info in listed:
            if info.key == own or now - info.mtime > LOCK_STALE_S or info.key in FLOCK_FILES:
                continue
            try:
                body = json.loads(self.backend.read(info.key))
            except ObjectNotFoundError:
                continue  # released while we listed
            except ValueError:
                body = None
            if not (isinstance(body, dict) and body.get("kind") in ("shared", "exclusive")
                    and isinstance(body.get("since"), (int, float)) and not isinstance(body.get("since"), bool)):
                body = {"kind": "exclusive", "host": "unknown (malformed lock object)", "pid": info.key, "since": 0.0}
            elif _dead_here(body):
                continue  # its process died without removing it
            out.append({**body, "key": info.key})
        return out

    @contextlib.contextmanager
    def _object_lock(self, exclusive: bool) -> Iterator[None]:
        """Write our lock object, then look at the others. A shared locker goes on when no live
        exclusive lock exists, else it removes its object and retries later. An exclusive locker
        keeps its object while it waits (so new shared lockers queue behind it, as the local
        turnstile does), goes on once no other live lock exists, and yields to an older waiting
        exclusive one (ordered by when each began to wait). Both write before they look, so two
        contenders never both go on."""
        key = f"{LOCKS}{uuid.uuid4().hex}.json"
        kind = "exclusive" if exclusive else "shared"
        deadline = time.monotonic() + self.lock_wait_s
        body: dict[str, Any] = {"kind": kind, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        delay = 0.05
        written = False
        while True:
            self.backend.write(key, json.dumps({**body, "time": time.time()}).encode())
            written = True
            others = self._live_locks(key)
            if exclusive:
                mine = (body["since"], key)
                older = [o for o in others if o.get("kind") == "exclusive" and (o.get("since", 0), o["key"]) < mine]
                blocking = older or others
                if not blocking:
                    break
                if older:  # an older exclusive waiter goes first: step aside
                    self.backend.delete(key)
                    written = False
                    body["since"] = time.time()
            else:
                blocking = [o for o in others if o.get("kind") == "exclusive"]
                if not blocking:
                    break
                self.backend.delete(key)
                written = False
            if time.monotonic() > deadline:
                if written:
                    self.backend.delete(key)
                who = ", ".join(f"{o.get('kind')} by {o.get('host')}:{o.get('pid')}" for o in blocking[:3])
                raise LockedError(f"{self.describe()} is locked ({who}); try again later")
            time.sleep(delay * (0.5 + uuid.uuid4().int % 1000 / 1000))
            delay = min(delay * 2, 0.5 if not exclusive else 2.0)
        stop = threading.Event()
        with self._held_lock:
            self._held[key] = time.monotonic()

        def refresh() -> None:
            while not stop.wait(LOCK_REFRESH_S):
                with contextlib.suppress(Exception):
                    self.backend.write(key, json.dumps({**body, "time": time.time()}).encode())
                    with self._held_lock:
                        self._held[key] = time.monotonic()

        refresher = threading.Thread(target=refresh, name="cas-lock-refresh", daemon=True)
        refresher.start()
        try:
            yield
        finally:
            stop.set()
            refresher.join()
            with self._held_lock:
                self._held.pop(key, None)
            with contextlib.suppress(Exception):
                self.backend.delete(key)

    def check_locks(self) -> None:
        """Raise :class:`LockedError` if a lock object this process holds has gone too long without
        a refresh: others may take it for stale, so a writer stops before it commits anything."""
        with self._held_lock:
            ages = [time.monotonic() - t for t in self._held.values()]
        if ages and max(ages) > LOCK_STALE_S * 0.8:
            raise LockedError(
                f"{self.describe()}: this process could not refresh its lock for {max(ages):.0f} s, so another "
                "host may have taken the repository; nothing was committed. Check the connection and save again"
            )


def _location(url: str | os.PathLike[str]) -> str:
    text = os.fspath(url)
    return text[len("file://"):] if text.startswith("file://") else text


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def local_dir_for(backend: Backend, repository_id: str, url: str) -> Path:
    """A local repository's own directory; for a remote one its cache, keyed by the repository id
    and the location (a replica holds the same repository id, and must not share the primary's
    cache)."""
    root = backend.capabilities.local_path
    if root is not None:
        return root
    where = backend.describe()  # the URL and, for S3, the endpoint: same-named buckets elsewhere differ
    return cache_root() / f"{repository_id}-{blake3.blake3(where.encode()).hexdigest()[:12]}"


def create_store(
    url: str | os.PathLike[str], storage_options: dict[str, Any] | None, settings: dict[str, Any]
) -> tuple[Store, dict[str, Any]]:
    """A new, empty repository at ``url`` (a directory, or an object-store prefix)."""
    text = os.fspath(url)
    if not _is_remote(text):
        root = Path(_location(text))
        if root.exists():
            if not root.is_dir():
                raise RepositoryExistsError(f"{root} exists and is not a directory")
            if (root / CONFIG_KEY).exists():
                raise RepositoryExistsError(f"{root} is already a cas repository")
            if any(root.iterdir()):
                raise RepositoryExistsError(f"{root} is not empty; cas init needs a new or empty directory")
    backend = open_backend(text, storage_options)
    try:
        if _is_remote(text):
            if backend.exists(CONFIG_KEY):
                raise RepositoryExistsError(f"{backend.describe()} is already a cas repository")
            if next(iter(backend.list("")), None) is not None:
                raise RepositoryExistsError(f"{backend.describe()} is not empty; cas init needs an empty prefix")
        config = {"format": REPO_FORMAT_NAME, "version": REPO_VERSION, "repository_id": uuid.uuid4().hex, **settings}
        store = Store(backend, text, local_dir_for(backend, config["repository_id"], text))
        try:
            store.create_config(config)
        except PreconditionFailedError:
            raise RepositoryExistsError(f"{backend.describe()} was made a repository by another process") from None
        return store, validate_config(config, f"{backend.describe()}/{CONFIG_KEY}")
    except BaseException:
        backend.close()
        raise


def open_store(url: str | os.PathLike[str], storage_options: dict[str, Any] | None) -> tuple[Store, dict[str, Any]]:
    """The store and checked config of an existing repository; a typed error if ``url`` is not one."""
    text = os.fspath(url)
    where = text
    if not _is_remote(text):
        root = Path(_location(text))
        if not root.is_dir():
            raise NotARepositoryError(f"{root} is not a cas repository (no such directory); create one with `cas init`")
        options = {"create": False, **(storage_options or {})}
    else:
        options = dict(storage_options or {})
    backend = open_backend(text, options)
    try:
        where = backend.describe()
        try:
            raw = backend.read(CONFIG_KEY)
        except BucketNotFoundError as exc:
            raise NotARepositoryError(f"{where} is not a cas repository: {exc}") from None
        except ObjectNotFoundError:
            raise NotARepositoryError(
                f"{where} is not a cas repository (no {CONFIG_KEY}); create one with `cas init`"
            ) from None
        try:
            config = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NotARepositoryError(f"{where} is not a cas repository ({CONFIG_KEY} is unreadable: {exc})") from None
        if not isinstance(config, dict):
            raise NotARepositoryError(f"{where} is not a cas repository ({CONFIG_KEY} is not a cas config)")
        location = Path(_location(text)) / CONFIG_KEY if not _is_remote(text) else f"{where}/{CONFIG_KEY}"
        config = validate_config(config, location)
        return Store(backend, text, local_dir_for(backend, str(config["repository_id"]), text)), config
    except BaseException:
        backend.close()
        raise
