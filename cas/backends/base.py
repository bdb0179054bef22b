"""The storage seam: one small interface for every byte ``cas`` reads or writes.

A backend is dumb byte storage under '/'-separated relative keys
(``packs/ab/<id>.pack``, ``refs/step-100``, ``config.json``). It knows nothing of
packs, refs or indexes; it imports no repository code, torch, lmdb or numpy.

Semantics every backend keeps (and ``tests/backends/test_conformance.py`` checks on
each of them):

* **Keys**: non-empty, '/'-separated, relative; no empty, ``.`` or ``..`` segment,
  no leading or trailing '/', no backslash or control character, at most 1024 UTF-8
  bytes, and no first segment starting with ``.cas`` (reserved for the backends'
  own files: temp files, lock files, probes). A bad key is a
  :class:`~cas.errors.UsageError`, raised before any I/O.
* **Whole-object writes** are atomic: a reader sees the old bytes or the new bytes,
  never a mix, and a failed write leaves no partial object under its key.
  ``mode="create"`` writes only if the key is absent, atomically (one of many
  racing creators wins, the others get :class:`~cas.errors.PreconditionFailedError`).
  ``if_version=`` is a compare-and-swap against the version token that
  :meth:`Backend.stat`, :meth:`Backend.write` and :meth:`Backend.list` return: the
  write happens only if the object still has that version (an absent object has
  none, so a CAS on it fails the same way).
* **Ranges** read like ``pread``: ``read_range(key, offset, length)`` returns at
  most ``length`` bytes and fewer only at the end of the object (``b""`` for an
  offset at or past the end). ``read_suffix(key, n)`` returns the last ``n`` bytes,
  the whole object when ``n`` exceeds its size. ``read_into`` must fill the
  caller's buffer exactly: an object that ends first raises :class:`ShortReadError`.
  Negative offsets or lengths are a :class:`~cas.errors.UsageError`.
* **Listing** is sorted by key (code point order, which is UTF-8 byte order, as S3
  lists), filtered by a plain string prefix, resumable strictly after
  ``start_after``; the backends' own files never show.
* **Delete** of an absent key is fine (idempotent). **Copy** overwrites the
  destination.
* **Errors** are translated once, at each backend's boundary, into the
  :class:`~cas.errors.StorageError` family: transient ones (connection refused,
  timeouts, 5xx, throttling) are :class:`~cas.errors.StorageUnavailableError`
  (retry), refused credentials or permissions
  :class:`~cas.errors.StoragePermissionError`, missing objects or buckets
  :class:`~cas.errors.ObjectNotFoundError`, lost create / CAS races
  :class:`~cas.errors.PreconditionFailedError`; anything else (disk full, quota)
  a plain :class:`~cas.errors.StorageError` saying what to do. Each message names
  the store (:meth:`Backend.describe`) and the key.

Subclasses implement the ``_``-prefixed primitives; the public methods check their
arguments first, so a primitive can trust its key and numbers.
"""

from __future__ import annotations

import abc
import builtins
import contextlib
import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from cas.errors import ObjectNotFoundError, PreconditionFailedError, StorageError, UsageError

WriteMode = Literal["overwrite", "create"]
BytesLike = bytes | bytearray | memoryview

MAX_KEY_BYTES = 1024
RESERVED_PREFIX = ".cas"
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


class ShortReadError(StorageError):
    """``read_into`` could not fill its buffer: the object ends before the range does."""


class BucketNotFoundError(ObjectNotFoundError):
    """The container itself (an S3 bucket) does not exist: ``exists()`` raises it instead of saying False."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a backend knows about one stored object.

    ``version`` is an opaque token for compare-and-swap (an ETag on S3, a
    modification-time / size / inode token on a local directory); compare tokens
    only for equality and only within one backend. ``mtime`` is seconds since the epoch.
    """

    key: str
    size: int
    version: str
    mtime: float


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend guarantees, for the engine to query instead of guessing from its type.

    conditional_create: ``write(mode="create")`` is atomic against racing writers.
    compare_and_swap: ``write(if_version=...)`` is atomic against racing writers.
    atomic_replace: an overwrite is seen whole or not at all.
    range_reads: ranged reads cost about the bytes read (not the whole object).
    multipart: large writes go up in parallel parts.
    durable_write: a write that returned survives a crash or power loss (fsync on
        local; the service's own durability on S3).
    consistent_list: a written object shows in ``list`` as soon as the write returns.
    zero_copy_read_into: ``read_into`` fills the buffer without an intermediate copy.
    local_path: the root directory of a local backend (for mmap, flock or
        hard links the engine may want), else None.
    flock_dir: where the flock(2) files of a local repository live, also when a wrapper
        hides ``local_path`` (a local region behind failover): lockers that use lock
        objects there take these flocks too, so both kinds of locker exclude each other.
    """

    conditional_create: bool
    compare_and_swap: bool
    atomic_replace: bool
    range_reads: bool
    multipart: bool
    durable_write: bool
    consistent_list: bool
    zero_copy_read_into: bool
    local_path: Path | None = None
    flock_dir: Path | None = None


def validate_key(key: object) -> str:
    """Return ``key`` if it is a valid object key, else raise :class:`UsageError`."""
    if not isinstance(key, str):
        raise UsageError(f"storage key must be a str, got {type(key).__name__}")
    if not key:
        raise UsageError("storage key is empty")
    if _BAD_CHARS.search(key):
        raise UsageError(f"storage key {key!r} holds a control character or a backslash")
    if key.startswith("/"):
        raise UsageError(f"storage key {key!r} must be relative (no leading '/')")
    parts = key.split("/")
    for part in parts:
        if part == "":
            raise UsageError(f"storage key {key!r} has an empty segment ('//' or a trailing '/')")
        if part in (".", ".."):
            raise UsageError(f"storage key {key!r} has a {part!r} segment")
    if parts[0].startswith(RESERVED_PREFIX):
        raise UsageError(f"storage key {key!r}: names starting with {RESERVED_PREFIX!r} are reserved for the backend")
    try:
        n = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise UsageError(f"storage key {key!r} is not valid Unicode") from None
    if n > MAX_KEY_BYTES:
        raise UsageError(f"storage key is {n} bytes long; at most {MAX_KEY_BYTES} are allowed")
    return key


def is_valid_key(key: str) -> bool:
    """True if ``key`` passes :func:`validate_key` (for skipping foreign names while listing)."""
    try:
        validate_key(key)
    except UsageError:
        return False
    return True


def validate_prefix(prefix: object) -> str:
    """A list prefix: '' (everything) or the start of a key (it may end in '/')."""
    if not isinstance(prefix, str):
        raise UsageError(f"list prefix must be a str, got {type(prefix).__name__}")
    if prefix == "":
        return prefix
    complete = prefix.split("/")[:-1]  # the last segment may be partial ("packs/a"); '' if prefix ends in '/'
    if prefix.startswith("/") or _BAD_CHARS.search(prefix) or any(p in ("", ".", "..") for p in complete):
        raise UsageError(f"list prefix {prefix!r} is not the start of a valid key")
    return prefix


def _check_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise UsageError(f"{name} must be >= 0, got {value}")
    return value


def as_byte_view(data: object, *, writable: bool = False, what: str = "data") -> memoryview:
    """A flat unsigned-byte view of ``data`` (bytes, bytearray, memoryview, any C-contiguous buffer)."""
    try:
        mv = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise UsageError(f"{what} must be bytes-like, got {type(data).__name__}") from None
    if writable and mv.readonly:
        raise UsageError(f"{what} is a read-only buffer; read_into needs a writable one")
    if mv.format != "B" or mv.ndim != 1:
        if not mv.c_contiguous:
            raise UsageError(f"{what} must be a C-contiguous buffer")
        mv = mv.cast("B")
    return mv


class Backend(abc.ABC):
    """Byte storage under '/'-separated keys. See the module docstring for the contract."""

    # -- what subclasses implement ---------------------------------------------------

    @abc.abstractmethod
    def _read_range(self, key: str, offset: int, length: int | None) -> bytes:
        """Bytes from ``offset``; ``length=None`` means to the end. Short at the end."""

    @abc.abstractmethod
    def _read_suffix(self, key: str, n: int) -> bytes:
        """The last ``n`` (> 0) bytes, or the whole object if it is shorter."""

    @abc.abstractmethod
    def _write(self, key: str, data: memoryview, mode: WriteMode, if_version: str | None) -> ObjectInfo: ...

    @abc.abstractmethod
    def _stat(self, key: str) -> ObjectInfo: ...

    @abc.abstractmethod
    def _list(self, prefix: str, start_after: str | None) -> Iterator[ObjectInfo]: ...

    @abc.abstractmethod
    def _delete(self, key: str) -> None: ...

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abc.abstractmethod
    def describe(self) -> str:
        """The store in words for messages, e.g. ``s3://bucket/prefix at http://127.0.0.1:9000``."""

    # Overridable with something faster; the defaults are built on the primitives.

    def _read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> builtins.list[bytes]:
        return [self._read_range(key, off, ln) if ln else self._empty_read(key) for off, ln in ranges]

    def _read_into(self, key: str, offset: int, dest: memoryview) -> None:
        data = self._read_range(key, offset, len(dest))
        if len(data) != len(dest):
            raise self._short_read(key, offset, len(dest), len(data))
        dest[:] = data

    def _copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        return self._write(dst_key, memoryview(self._read_range(src_key, 0, None)), "overwrite", None)

    def _write_file(self, key: str, path: Path) -> ObjectInfo:
        info = self._write(key, memoryview(path.read_bytes()), "overwrite", None)
        path.unlink(missing_ok=True)
        return info

    def _empty_read(self, key: str) -> bytes:
        self._stat(key)  # a zero-length read of a missing object is still an error
        return b""

    def _short_read(self, key: str, offset: int, wanted: int, got: int) -> ShortReadError:
        return ShortReadError(
            f"{self.describe()}: {key}: wanted {wanted} bytes at offset {offset} but the object "
            f"ended after {got} (size {offset + got})"
        )

    # -- the public interface ----------------------------------------------------------

    def read(self, key: str) -> bytes:
        """The whole object."""
        return self._read_range(validate_key(key), 0, None)

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset``; short only at the end of the object."""
        key = validate_key(key)
        _check_int("offset", offset)
        if _check_int("length", length) == 0:
            return self._empty_read(key)
        return self._read_range(key, offset, length)

    def read_suffix(self, key: str, n: int) -> bytes:
        """The last ``n`` bytes (a pack's trailer); the whole object when ``n`` exceeds its size."""
        key = validate_key(key)
        if _check_int("n", n) == 0:
            return self._empty_read(key)
        return self._read_suffix(key, n)

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> builtins.list[bytes]:
        """Several ``(offset, length)`` ranges of one object, in the order given (parallel where possible)."""
        key = validate_key(key)
        checked: builtins.list[tuple[int, int]] = []
        for r in ranges:
            if not isinstance(r, tuple) or len(r) != 2:
                raise UsageError(f"ranges must be (offset, length) pairs, got {r!r}")
            checked.append((_check_int("offset", r[0]), _check_int("length", r[1])))
        if not checked:
            return []
        return self._read_ranges(key, checked)

    def read_into(self, key: str, offset: int, dest: memoryview) -> None:
        """Fill ``dest`` exactly with the bytes at ``offset`` (zero-copy where the backend can)."""
        key = validate_key(key)
        _check_int("offset", offset)
        view = as_byte_view(dest, writable=True, what="dest")
        if len(view) == 0:
            self._stat(key)
            return
        self._read_into(key, offset, view)

    def write(
        self, key: str, data: BytesLike, *, mode: WriteMode = "overwrite", if_version: str | None = None
    ) -> ObjectInfo:
        """Write the whole object atomically; see the module docstring for ``mode`` and ``if_version``."""
        key = validate_key(key)
        if mode not in ("overwrite", "create"):
            raise UsageError(f"write mode must be 'overwrite' or 'create', got {mode!r}")
        if if_version is not None:
            if not isinstance(if_version, str) or not if_version:
                raise UsageError(f"if_version must be a version token (a non-empty str), got {if_version!r}")
            if mode == "create":
                raise UsageError("write: mode='create' and if_version exclude each other")
        return self._write(key, as_byte_view(data), mode, if_version)

    def write_file(self, key: str, path: Path) -> ObjectInfo:
        """Store the local file at ``path`` under ``key`` (overwrite), atomically; the file is consumed
        (a local backend on the same file system moves it into place: no copy)."""
        return self._write_file(validate_key(key), path)

    def stat(self, key: str) -> ObjectInfo:
        """Size, version and mtime; :class:`~cas.errors.ObjectNotFoundError` if absent."""
        return self._stat(validate_key(key))

    def exists(self, key: str) -> bool:
        key = validate_key(key)
        try:
            self._stat(key)
        except BucketNotFoundError:
            raise
        except ObjectNotFoundError:
            return False
        return True

    def list(self, prefix: str = "", *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix``, sorted by key, strictly after ``start_after``."""
        prefix = validate_prefix(prefix)
        if start_after is not None and not isinstance(start_after, str):
            raise UsageError(f"start_after must be a str or None, got {type(start_after).__name__}")
        if prefix.startswith(RESERVED_PREFIX):
            return iter(())  # the backends' own files never show
        return self._list(prefix, start_after or None)

    def delete(self, key: str) -> None:
        """Remove the object; an absent key is fine."""
        self._delete(validate_key(key))

    def copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        """Copy one object to another key (overwriting it); returns the new object's info."""
        return self._copy(validate_key(src_key), validate_key(dst_key))

    def check(self) -> None:
        """Raise a typed error now if the store cannot be reached or does not exist (cheap)."""
        return None

    def cleanup_incomplete(self, older_than_s: float) -> int:
        """Remove what interrupted writes left behind (temp files, multipart uploads) that is
        older than ``older_than_s`` seconds; returns how many. For GC."""
        return 0

    def probe_conditional_writes(self) -> None:
        """Check that create-only and compare-and-swap writes are really enforced by the store.

        Some S3-compatible stores accept ``If-None-Match`` / ``If-Match`` and ignore them,
        which would silently break tag creation and ref updates. This writes a probe
        object under a reserved key, tries a second create-only write and a stale
        compare-and-swap, and deletes it. Raises :class:`~cas.errors.StorageError` if
        either went through. Call it once when a repository is opened for writing.
        """
        key = f"{RESERVED_PREFIX}-probe/{uuid.uuid4().hex}"
        try:
            first = self._write(key, memoryview(b"probe-1"), "create", None)
            try:
                self._write(key, memoryview(b"probe-2"), "create", None)
            except PreconditionFailedError:
                pass
            else:
                raise StorageError(
                    f"{self.describe()} ignores create-only writes (If-None-Match: *): a second create of "
                    f"{key} went through. cas needs them for tags and refs; use a store that enforces "
                    "conditional writes"
                )
            second = self._write(key, memoryview(b"probe-3"), "overwrite", None)
            if second.version == first.version:
                raise StorageError(f"{self.describe()}: an overwrite of {key} kept its version token")
            try:
                self._write(key, memoryview(b"probe-4"), "overwrite", first.version)
            except PreconditionFailedError:
                pass
            else:
                raise StorageError(
                    f"{self.describe()} ignores compare-and-swap writes (If-Match): a write of {key} against "
                    "a stale version went through. cas needs them to move refs; use a store that enforces "
                    "conditional writes"
                )
        finally:
            self._delete(key)

    def hold_open(self) -> AbstractContextManager[None]:
        """While the returned context is open, a backend may keep the handles its reads open for
        later reads of the same objects (the local backend: one descriptor per pack instead of an
        open per chunk); all are released when the outermost hold ends. Default: nothing held."""
        return contextlib.nullcontext()

    def health_probe(self) -> None:
        """One real round trip, for health checks: write a small probe object under a reserved key,
        read it back, delete it. Raises the typed error of the step that failed (one try, no retry)."""
        key = f"{RESERVED_PREFIX}-health/{uuid.uuid4().hex}"
        body = uuid.uuid4().bytes
        self._write(key, memoryview(body), "overwrite", None)
        try:
            if self._read_range(key, 0, None) != body:
                raise StorageError(f"{self.describe()}: health probe {key} read back other bytes than were written")
        finally:
            self._delete(key)

    def archive_state(self, key: str) -> str | None:
        """None if the object can be read now; ``"archived"`` if it sits in an archive storage
        class and needs :meth:`request_restore`; ``"restoring"`` if a restore is under way.
        Backends without archive classes always say None (after checking the object exists)."""
        self._stat(validate_key(key))
        return None

    def request_restore(self, key: str, days: int = 1) -> None:
        """Ask the store to bring an archived object back to readable storage for ``days`` days
        (idempotent; a no-op where there is nothing to restore)."""
        self._stat(validate_key(key))

    def close(self) -> None:
        """Release connections and pools. The backend is unusable afterwards."""
        return None

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
