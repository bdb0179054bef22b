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
from pathlib import Path

from cas.ids import PackId

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
