"""A backend on a local (or mounted) directory: key ``a/b/c`` is the file ``<root>/a/b/c``.

Writes are atomic and durable: the bytes go to a temp file in ``<root>/.cas-backend/tmp``,
which is fsynced, then renamed over the key (overwrite) or hard-linked to it
(create-only: ``link(2)`` fails with EEXIST if the key exists, so exactly one of many
racing creators wins, across processes), and the key's directory is fsynced (so are the
parents of directories a write creates). A crash leaves either the old object or the
new one, plus at worst a temp file, which :meth:`LocalBackend.cleanup_incomplete`
removes and ``list`` never shows.

Version tokens are ``<mtime_ns>-<size>-<inode>`` in hex. Every write stamps its temp file
with a fresh nanosecond mtime (strictly increasing within a process), so a rewrite gets
a new token even when the size is the same and the file system reuses the inode number.
(On a file system with coarse timestamps two rewrites of one key within one timestamp
tick that also reuse the inode would share a token; ext4, XFS, btrfs and tmpfs keep
nanoseconds.) A compare-and-swap checks the token and renames under an exclusive
``flock(2)`` on one of 64 lock files in ``<root>/.cas-backend/locks`` (chosen by a hash
of the key); overwrites, creates and deletes take the same lock, so a CAS cannot slip
between another writer's check and rename. That makes CAS atomic among all processes
on one host; on NFS it is only as good as the server's flock emulation.

``read_into`` uses ``os.preadv`` straight into the caller's buffer (no copy).

Inside :meth:`LocalBackend.hold_open` (a restore) the descriptors of pack files (keys under
``packs/``, which are immutable: named by their content) stay open for later reads, so a
restore opens each pack once instead of once per chunk (~35 us each, on a 1 MiB chunk ~10 %
of a verified read). They are closed when the outermost hold ends (a descriptor still in use
by another thread's read then, once that read is done): no descriptor outlives the operation,
so a long-lived process never keeps the space of a pack another process deleted.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import os
import stat as stat_mod
import threading
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from cas.backends.base import RESERVED_PREFIX, Backend, Capabilities, ObjectInfo, WriteMode
from cas.errors import (
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
    StoragePermissionError,
    StorageUnavailableError,
)

HIDDEN_DIR = f"{RESERVED_PREFIX}-backend"
LOCK_STRIPES = 64
_COPY_CHUNK = 8 << 20

_NOT_FOUND = {errno.ENOENT, errno.ENOTDIR}
_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}
_TRANSIENT = {
    errno.EAGAIN,
    errno.EBUSY,
    errno.EINTR,
    errno.EMFILE,
    errno.ENFILE,
    errno.ENOMEM,
    errno.ETIMEDOUT,
    errno.ESTALE,
    errno.ENETDOWN,
    errno.ENETUNREACH,
    errno.ENETRESET,
    errno.EHOSTDOWN,
    errno.EHOSTUNREACH,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ENOLINK,
    errno.ECOMM,
}
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV}

#: most pack descriptors one hold keeps open (later packs are opened per read, as outside a hold)
MAX_HELD_FDS = 256
_HELD_PREFIX = "packs/"

_clock_lock = threading.Lock()
_last_ns = [0]


def _fresh_ns() -> int:
    """A nanosecond timestamp strictly greater than any this process handed out before."""
    with _clock_lock:
        _last_ns[0] = max(time.time_ns(), _last_ns[0] + 1)
        return _last_ns[0]


class _Held:
    """A pack descriptor kept open by a hold: closed once retired and no read uses it."""

    __slots__ = ("fd", "retired", "st", "users")

    def __init__(self, fd: int, st: os.stat_result) -> None:
        self.fd = fd
        self.st = st
        self.users = 0
        self.retired = False


def _token(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}"


class LocalBackend(Backend):
    """Objects are files under ``root``. ``create=False`` refuses a root that does not exist;
    ``fsync=False`` skips the fsyncs (tests, scratch stores: then ``durable_write`` is False)."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True, fsync: bool = True) -> None:
        self.root = Path(os.path.abspath(os.fspath(root)))
        self._fsync = fsync
        self._hidden = self.root / HIDDEN_DIR
        self._tmp = self._hidden / "tmp"
        self._locks = self._hidden / "locks"
        self._dirs_ready = False
        self._hold_lock = threading.Lock()
        self._holds = 0
        self._held: dict[str, _Held] = {}
        with self._errors("open", ""):
            if create:
                self.root.mkdir(parents=True, exist_ok=True)
            elif not self.root.is_dir():
                raise ObjectNotFoundError(f"{self.describe()}: the directory does not exist")

    # -- plumbing -------------------------------------------------------------------

    def describe(self) -> str:
        return f"file://{self.root}"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            conditional_create=True,
            compare_and_swap=True,
            atomic_replace=True,
            range_reads=True,
            multipart=False,
            durable_write=self._fsync,
            consistent_list=True,
            zero_copy_read_into=True,
            local_path=self.root,
            flock_dir=Path(self.root) / "locks",
        )

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    @contextlib.contextmanager
    def _errors(self, op: str, key: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise self._translate(e, op, key) from e

    def _translate(self, e: OSError, op: str, key: str) -> StorageError:
        what = f"{self.describe()}: {op} {key}".rstrip()
        reason = e.strerror or str(e)
        code = e.errno
        if code in _NOT_FOUND or code == errno.EISDIR:
            return ObjectNotFoundError(f"{what}: no such object")
        if code == errno.EEXIST:
            return PreconditionFailedError(f"{what}: already exists (create-only write)")
        if code in _PERMISSION:
            if code == errno.EROFS:
                return StoragePermissionError(f"{what}: the file system is read-only")
            where = e.filename or self.root
            return StoragePermissionError(f"{what}: permission denied ({reason}); check the owner and mode of {where}")
        if code == errno.ENOSPC:
            return StorageError(
                f"{what}: no space left on the device holding {self.root}; free space there or move the store "
                "to a larger volume"
            )
        if code == errno.EDQUOT:
            return StorageError(f"{what}: disk quota exceeded under {self.root}; free space or raise the quota")
        if code in _TRANSIENT:
            return StorageUnavailableError(f"{what}: {reason} (transient; retry)")
        return StorageError(f"{what}: {reason} ({errno.errorcode.get(code or 0, code)})")

    def _ensure_hidden(self) -> None:
        if not self._dirs_ready:
            self._tmp.mkdir(parents=True, exist_ok=True)
            self._locks.mkdir(parents=True, exist_ok=True)
            self._dirs_ready = True

    def _fsync_dir(self, path: str | os.PathLike[str]) -> None:
        if not self._fsync:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ensure_parent(self, key: str, path: str) -> None:
        parent = os.path.dirname(path)
        if os.path.isdir(parent):
            return
        missing: builtins.list[str] = []
        p = parent
        while not os.path.isdir(p):
            if os.path.lexists(p):
                if os.path.isdir(p):  # another writer made it between the two checks
                    break
                raise StorageError(
                    f"{self.describe()}: write {key}: {os.path.relpath(p, self.root)} is an object, so no key "
                    "below it can be stored in a directory"
                )
            missing.append(p)
            p = os.path.dirname(p)
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(d)
            self._fsync_dir(os.path.dirname(d))

    @contextlib.contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        stripe = zlib.crc32(key.encode("utf-8")) % LOCK_STRIPES
        fd = os.open(self._locks / f"{stripe:02x}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _open_object(self, key: str) -> tuple[int, os.stat_result]:
        fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            os.close(fd)
            raise OSError(errno.EISDIR, "not a regular file")
        return fd, st

    # -- held descriptors (see the module docstring) ----------------------------------------

    @contextlib.contextmanager
    def hold_open(self) -> Iterator[None]:
        with self._hold_lock:
            self._holds += 1
        try:
            yield
        finally:
            idle: builtins.list[int] = []
            with self._hold_lock:
                self._holds -= 1
                if not self._holds:
                    held, self._held = builtins.list(self._held.values()), {}
                    for entry in held:
                        entry.retired = True
                    idle = [e.fd for e in held if e.users == 0]
            for fd in idle:
                os.close(fd)

    def _take_held(self, key: str) -> _Held | None:
        """The held descriptor of ``key`` (opened now if need be), its use counted; None outside a hold."""
        if not self._holds or not key.startswith(_HELD_PREFIX):
            return None
        with self._hold_lock:
            entry = self._held.get(key) if self._holds else None
            if entry is not None:
                entry.users += 1
                return entry
            if not self._holds or len(self._held) >= MAX_HELD_FDS:
                return None
        fd, st = self._open_object(key)
        with self._hold_lock:
            entry = self._held.get(key)
            if entry is None and self._holds and len(self._held) < MAX_HELD_FDS:
                entry = self._held[key] = _Held(fd, st)
                fd = -1
            elif entry is None:  # the hold ended meanwhile: use this descriptor once
                entry = _Held(fd, st)
                entry.retired = True
                fd = -1
            entry.users += 1
        if fd >= 0:
            os.close(fd)  # another thread opened it first
        return entry

    def _drop_held(self, entry: _Held) -> None:
        with self._hold_lock:
            entry.users -= 1
            close = entry.retired and entry.users == 0
        if close:
            os.close(entry.fd)

    @contextlib.contextmanager
    def _reading(self, key: str) -> Iterator[tuple[int, os.stat_result]]:
        """A read descriptor of ``key`` and its stat: the held one inside a hold, else opened for this read."""
        entry = self._take_held(key)
        if entry is not None:
            try:
                yield entry.fd, entry.st
            finally:
                self._drop_held(entry)
            return
        fd, st = self._open_object(key)
        try:
            yield fd, st
        finally:
            os.close(fd)

    def _retire_held(self, key: str) -> None:
        with self._hold_lock:
            entry = self._held.pop(key, None)
            if entry is None:
                return
            entry.retired = True
            close = entry.users == 0
        if close:
            os.close(entry.fd)

    def _info(self, key: str, st: os.stat_result) -> ObjectInfo:
        return ObjectInfo(key, st.st_size, _token(st), st.st_mtime_ns / 1e9)

    # -- reads ----------------------------------------------------------------------

    @staticmethod
    def _pread(fd: int, offset: int, length: int) -> bytes:
        chunks: builtins.list[bytes] = []
        while length > 0:
            b = os.pread(fd, min(length, 1 << 30), offset)
            if not b:
                break
            chunks.append(b)
            offset += len(b)
            length -= len(b)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _read_range(self, key: str, offset: int, length: int | None) -> bytes:
        with self._errors("read", key), self._reading(key) as (fd, st):
            n = max(0, st.st_size - offset) if length is None else length
            return self._pread(fd, offset, n)

    def _read_suffix(self, key: str, n: int) -> bytes:
        with self._errors("read", key), self._reading(key) as (fd, st):
            start = max(0, st.st_size - n)
            return self._pread(fd, start, st.st_size - start)

    def _read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> builtins.list[bytes]:
        with self._errors("read", key), self._reading(key) as (fd, _):
            return [self._pread(fd, off, ln) for off, ln in ranges]

    def _read_into(self, key: str, offset: int, dest: memoryview) -> None:
        with self._errors("read", key), self._reading(key) as (fd, _):
            pos = 0
            while pos < len(dest):
                n = os.preadv(fd, [dest[pos:]], offset + pos)
                if n == 0:
                    raise self._short_read(key, offset, len(dest), pos)
                pos += n

    def _stat(self, key: str) -> ObjectInfo:
        with self._errors("stat", key):
            st = os.stat(self._path(key))
        if not stat_mod.S_ISREG(st.st_mode):
            raise ObjectNotFoundError(f"{self.describe()}: stat {key}: no such object (a directory)")
        return self._info(key, st)

    # -- writes ---------------------------------------------------------------------

    def _new_temp(self) -> tuple[int, str]:
        self._ensure_hidden()
        path = os.path.join(self._tmp, f"{uuid.uuid4().hex}.tmp")
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644), path

    def _seal_temp(self, fd: int) -> os.stat_result:
        ns = _fresh_ns()
        os.utime(fd, ns=(ns, ns))
        if self._fsync:
            os.fsync(fd)
        return os.fstat(fd)

    def _publish(self, key: str, tmp: str, mode: WriteMode, if_version: str | None) -> None:
        path = self._path(key)
        self._ensure_parent(key, path)
        if os.path.isdir(path):
            raise StorageError(
                f"{self.describe()}: write {key}: keys below {key}/ exist, so it cannot also be an object in a "
                "directory"
            )
        with self._key_lock(key):
            if mode == "create":
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise PreconditionFailedError(
                        f"{self.describe()}: write {key}: already exists (create-only write)"
                    ) from None
                except OSError as e:
                    if e.errno not in _NO_HARD_LINKS:
                        raise
                    # No hard links here: under the key lock, check and rename (atomic among cas writers).
                    if os.path.lexists(path):
                        raise PreconditionFailedError(
                            f"{self.describe()}: write {key}: already exists (create-only write)"
                        ) from None
                    os.replace(tmp, path)
            else:
                if if_version is not None:
                    try:
                        current = _token(os.stat(path))
                    except FileNotFoundError:
                        current = None
                    if current != if_version:
                        raise PreconditionFailedError(
                            f"{self.describe()}: write {key}: version is no longer {if_version} "
                            f"(now {current or 'absent'}; compare-and-swap lost)"
                        )
                os.replace(tmp, path)
            self._retire_held(key)
        self._fsync_dir(os.path.dirname(path))

    def _write(self, key: str, data: memoryview, mode: WriteMode, if_version: str | None) -> ObjectInfo:
        tmp = ""
        with self._errors("write", key):
            try:
                fd, tmp = self._new_temp()
                try:
                    pos = 0
                    while pos < len(data):
                        pos += os.write(fd, data[pos : pos + (1 << 30)])
                    st = self._seal_temp(fd)
                finally:
                    os.close(fd)
                self._publish(key, tmp, mode, if_version)
            finally:
                if tmp:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
        return self._info(key, st)

    def _write_file(self, key: str, path: Path) -> ObjectInfo:
        with self._errors("write", key):
            self._ensure_hidden()  # the key locks live there
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                st = self._seal_temp(fd)
            finally:
                os.close(fd)
            try:
                self._publish(key, os.fspath(path), "overwrite", None)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                info = self._write(key, memoryview(path.read_bytes()), "overwrite", None)  # another file system
                path.unlink(missing_ok=True)
                return info
        return self._info(key, st)

    def _copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        tmp = ""
        with self._errors("copy", f"{src_key} -> {dst_key}"):
            try:
                src, _ = self._open_object(src_key)
                try:
                    fd, tmp = self._new_temp()
                    try:
                        while True:
                            try:
                                n = os.copy_file_range(src, fd, _COPY_CHUNK)
                            except OSError as e:
                                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                                    raise
                                b = os.read(src, _COPY_CHUNK)
                                n = len(b)
                                view = memoryview(b)
                                while view:
                                    view = view[os.write(fd, view) :]
                            if n == 0:
                                break
                        st = self._seal_temp(fd)
                    finally:
                        os.close(fd)
                finally:
                    os.close(src)
                self._publish(dst_key, tmp, "overwrite", None)
            finally:
                if tmp:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
        return self._info(dst_key, st)

    def _delete(self, key: str) -> None:
        path = self._path(key)
        with self._errors("delete", key):
            self._retire_held(key)
            if not os.path.lexists(path):
                return
            self._ensure_hidden()
            with self._key_lock(key):
                try:
                    os.unlink(path)
                except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                    return
            self._fsync_dir(os.path.dirname(path))

    # -- listing and housekeeping ---------------------------------------------------

    def _list(self, prefix: str, start_after: str | None) -> Iterator[ObjectInfo]:
        # Walk directories in an order that yields keys sorted as strings: a directory
        # sorts as "name/" (its keys all start with that), a file as "name".
        def walk(dir_path: str, key_prefix: str) -> Iterator[ObjectInfo]:
            try:
                with os.scandir(dir_path) as it:
                    entries = [(e.name + "/" if e.is_dir() else e.name, e) for e in it]
            except FileNotFoundError:
                return
            except OSError as e:
                raise self._translate(e, "list", key_prefix or prefix) from e
            entries.sort(key=lambda t: t[0])
            for name, entry in entries:
                if not key_prefix and name.startswith(RESERVED_PREFIX):
                    continue
                if name.rstrip("/") in (".", "..") or not name.isprintable() or "\\" in name:
                    continue
                full = key_prefix + name
                if name.endswith("/"):
                    if not (full.startswith(prefix) or prefix.startswith(full)):
                        continue
                    if start_after is not None and full < start_after and not start_after.startswith(full):
                        continue
                    yield from walk(entry.path, full)
                    continue
                if not full.startswith(prefix) or (start_after is not None and full <= start_after):
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue  # deleted while we listed
                except OSError as e:
                    raise self._translate(e, "list", full) from e
                if stat_mod.S_ISREG(st.st_mode):
                    yield self._info(full, st)

        # Start at the deepest directory the prefix names completely.
        base = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        return walk(self._path(base[:-1]) if base else str(self.root), base)

    def cleanup_incomplete(self, older_than_s: float) -> int:
        """Remove temp files of interrupted writes last modified more than ``older_than_s`` ago."""
        cutoff = time.time() - older_than_s
        removed = 0
        with self._errors("clean up temp files in", str(self._tmp)):
            try:
                entries = list(os.scandir(self._tmp))
            except FileNotFoundError:
                return 0
            for e in entries:
                try:
                    if e.stat().st_mtime < cutoff:
                        os.unlink(e.path)
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed

    def check(self) -> None:
        with self._errors("open", ""):
            if not self.root.is_dir():
                raise ObjectNotFoundError(f"{self.describe()}: the directory does not exist")
            os.listdir(self.root)
