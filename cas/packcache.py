"""A local cache of the packs of a remote repository (``$CAS_CACHE_DIR/<repository>/packs/``).

A save into an object store writes each pack to a local temp file first; that file is kept here
(a hard link, no copy) once it is uploaded. The next save reads its delta bases, and a restore on
the same machine reads its chunks, from these files instead of ranged GETs: on an object store a
request costs milliseconds (and on some servers a copy of the whole object), a local ``pread``
microseconds. Packs are immutable and named by the hash of their footer, and every chunk read from
a cached pack is still decoded and BLAKE3-verified by the reader, which drops a cached pack that
fails (bit rot on the local disk) and reads that pack from the store again.

The cache is bounded (``CAS_PACK_CACHE_BYTES``, default 4 GiB; ``0`` turns it off): the least
recently added or read packs go first. It is never a source of truth: listings, gc and repair work
from what the store holds; a pack deleted from the store may linger here until evicted, unused,
since the index no longer names it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from cas.backends.base import Backend, Capabilities, ObjectInfo, WriteMode
from cas.errors import CasError, ObjectNotFoundError, UsageError
from cas.ids import PackId
from cas.pack import ChunkKind, read_footer

DEFAULT_BYTES = 4 << 30


def budget_from_env() -> int:
    text = os.environ.get("CAS_PACK_CACHE_BYTES", "").strip()
    if not text:
        return DEFAULT_BYTES
    try:
        return max(0, int(text))
    except ValueError:
        return DEFAULT_BYTES


class PackCache:
    def __init__(self, directory: Path, budget: int) -> None:
        self.directory = directory
        self.budget = budget
        self._lock = threading.Lock()
        self._sizes: dict[PackId, int] | None = None  # pack -> bytes, oldest use first (loaded lazily)
        self._total = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def _path(self, pack_id: PackId) -> Path:
        return self.directory / f"{pack_id.hex()}.pack"

    def _load(self) -> dict[PackId, int]:
        if self._sizes is None:
            entries: list[tuple[float, PackId, int]] = []
            with contextlib.suppress(FileNotFoundError):
                for e in os.scandir(self.directory):
                    name = e.name
                    if not name.endswith(".pack") or len(name) != 69:
                        continue
                    try:
                        st = e.stat()
                        entries.append((st.st_mtime, PackId(bytes.fromhex(name[:64])), st.st_size))
                    except (OSError, ValueError):
                        continue
            entries.sort(key=lambda t: t[0])
            self._sizes = {pid: size for _, pid, size in entries}
            self._total = sum(self._sizes.values())
        return self._sizes

    def path_of(self, pack_id: PackId) -> Path | None:
        """The cached file of a pack, or None."""
        if not self.enabled:
            return None
        with self._lock:
            sizes = self._load()
            if pack_id not in sizes:
                return None
            sizes[pack_id] = sizes.pop(pack_id)  # most recently used last
        return self._path(pack_id)

    def add(self, temp_path: Path, pack_id: PackId) -> None:
        """Keep a sealed, fsynced pack file (hard-linked: the caller's file stays where it is)."""
        if not self.enabled:
            return
        try:
            size = temp_path.stat().st_size
            if size > self.budget:
                return
            self.directory.mkdir(parents=True, exist_ok=True)
            target = self._path(pack_id)
            with contextlib.suppress(FileExistsError):
                os.link(temp_path, target)
        except OSError:
            return  # a cache: if it cannot keep the file, reads go to the store
        with self._lock:
            sizes = self._load()
            if pack_id not in sizes:
                sizes[pack_id] = size
                self._total += size
            victims = []
            while self._total > self.budget and len(sizes) > 1:
                old = next(iter(sizes))
                self._total -= sizes.pop(old)
                victims.append(old)
        for old in victims:
            with contextlib.suppress(OSError):
                self._path(old).unlink()

    def drop(self, pack_id: PackId) -> None:
        """Forget a pack (deleted from the store, or its cached copy failed to verify)."""
        if not self.enabled:
            return
        with self._lock:
            sizes = self._load()
            size = sizes.pop(pack_id, None)
            if size is not None:
                self._total -= size
        with contextlib.suppress(OSError):
            self._path(pack_id).unlink()

    @staticmethod
    def pread(path: Path, offset: int, length: int) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    @staticmethod
    def pread_many(path: Path, ranges: list[tuple[int, int]]) -> list[bytes]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return [os.pread(fd, length, offset) for offset, length in ranges]
        finally:
            os.close(fd)

    @staticmethod
    def pread_into(path: Path, offset: int, dest: memoryview) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pos = 0
            while pos < len(dest):
                n = os.preadv(fd, [dest[pos:]], offset + pos)
                if n == 0:
                    break
                pos += n
            return pos
        finally:
            os.close(fd)


class CachedPacks(Backend):
    """This machine's cached packs as a read-only backend under the store's keys
    (``packs/<xx>/<id>.pack``): a heal source for ``check --repair`` when the store lost or
    damaged a pack this machine wrote or read. Every copy is checked before it is used."""

    def __init__(self, cache: PackCache) -> None:
        self._cache = cache

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            conditional_create=False, compare_and_swap=False, atomic_replace=False, range_reads=True,
            multipart=False, durable_write=False, consistent_list=True, zero_copy_read_into=False, local_path=None,
        )

    def describe(self) -> str:
        return f"pack cache {self._cache.directory}"

    def _file(self, key: str) -> Path:
        name = key.rsplit("/", 1)[-1]
        if not key.startswith("packs/") or name[-5:] not in (".pack", ".meta") or len(name) != 69:
            raise ObjectNotFoundError(f"{self.describe()}: no {key}")
        try:
            pack_id = PackId(bytes.fromhex(name[:-5]))
        except ValueError:
            raise ObjectNotFoundError(f"{self.describe()}: no {key}") from None
        path = self._cache.path_of(pack_id)
        if path is None:
            raise ObjectNotFoundError(f"{self.describe()}: no {key}")
        return path

    def _read_range(self, key: str, offset: int, length: int | None) -> bytes:
        try:
            with open(self._file(key), "rb") as f:
                f.seek(offset)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.describe()}: no {key}") from None

    def _read_suffix(self, key: str, n: int) -> bytes:
        size = self._stat(key).size
        return self._read_range(key, max(0, size - n), None)

    def _stat(self, key: str) -> ObjectInfo:
        try:
            st = os.stat(self._file(key))
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.describe()}: no {key}") from None
        return ObjectInfo(key, st.st_size, f"{st.st_mtime_ns}-{st.st_size}", st.st_mtime)

    def _list(self, prefix: str, start_after: str | None) -> Iterator[ObjectInfo]:
        with self._cache._lock:
            ids = list(self._cache._load())
        keys = []
        for pack_id in ids:  # a pack of manifest nodes only is a .meta in the store
            path = self._cache.path_of(pack_id)
            try:
                entries = read_footer(path, pack_id) if path is not None else []
            except (CasError, OSError):
                continue
            meta = bool(entries) and all(e.kind == ChunkKind.NODE for e in entries)
            keys.append(f"packs/{pack_id.hex()[:2]}/{pack_id.hex()}{'.meta' if meta else '.pack'}")
        for key in sorted(keys):
            if key.startswith(prefix) and (start_after is None or key > start_after):
                with contextlib.suppress(ObjectNotFoundError):
                    yield self._stat(key)

    def _write(self, key: str, data: memoryview, mode: WriteMode, if_version: str | None) -> ObjectInfo:
        raise UsageError(f"{self.describe()} is read-only")

    def _delete(self, key: str) -> None:
        raise UsageError(f"{self.describe()} is read-only")
