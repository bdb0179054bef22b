"""Errors raised by cas.

Every error a user can meet is a :class:`CasError`; the CLI maps the class's
``exit_code`` to the process exit status and prints the message on one line.

    CasError                              exit 1
    ├── UsageError                        exit 2  bad argument to an API call or command
    │   ├── InvalidTagError
    │   ├── TagExistsError
    │   ├── OutputExistsError
    │   ├── ShapeMismatchError            load_into target does not fit the snapshot
    │   ├── KeyNotFoundError              a key asked for (load keys=, cas cat) is not in the snapshot
    │   └── ArgumentError                 an unknown keyword argument (also a TypeError)
    ├── RepositoryError                   exit 3
    │   ├── NotARepositoryError
    │   ├── RepositoryExistsError         init on a non-empty directory
    │   ├── FormatVersionError            repository written by an unknown format version
    │   ├── LockedError
    │   ├── ConfigError                   config.json holds a value of the wrong type or range
    │   └── StorageError                  the store refused an operation (disk full, quota, read-only, ...)
    │       ├── StorageUnavailableError   transient: connection refused, timeout, 5xx, throttling (retry)
    │       ├── StoragePermissionError    credentials or permissions refused the operation
    │       ├── ObjectNotFoundError       the object (or bucket) does not exist
    │       ├── PreconditionFailedError   a create-only or compare-and-swap write lost its race
    │       │   └── FencedError           a write to a region that no longer serves (failover epoch moved)
    │       └── ArchivedError             data in an archive storage class: request a restore first
    ├── SnapshotNotFoundError             exit 4  unknown tag / id / prefix
    │   └── AmbiguousSnapshotError
    ├── UnsupportedObjectError            exit 5  value the typed encoding cannot hold
    │   └── PickleRequiredError           snapshot holds pickled values; pass allow_pickle=True
    ├── NotACheckpointError               exit 6  an input file that is not a checkpoint
    └── CorruptionError                   exit 7  stored bytes are damaged or missing
        ├── ChunkCorruptError             decoded bytes do not hash to the chunk id
        ├── MissingChunkError             a referenced chunk is not in the index or its pack
        ├── PackCorruptError              a pack's footer / trailer / checksum is wrong
        ├── ManifestCorruptError          a manifest node does not decode
        ├── IndexCorruptError             the local index is damaged or stale beyond repair in place
        └── GcRefusedError                gc cannot tell what is live; it deleted nothing
"""

from __future__ import annotations


class CasError(Exception):
    """Base of every error cas raises on purpose."""

    exit_code = 1


class UsageError(CasError):
    exit_code = 2


class InvalidTagError(UsageError):
    pass


class TagExistsError(UsageError):
    pass


class OutputExistsError(UsageError):
    pass


class ShapeMismatchError(UsageError):
    pass


class KeyNotFoundError(UsageError):
    pass


class ArgumentError(UsageError, TypeError):
    """A call with a keyword argument the function does not take (a typo in a name)."""


class RepositoryError(CasError):
    exit_code = 3


class NotARepositoryError(RepositoryError):
    pass


class RepositoryExistsError(RepositoryError):
    pass


class FormatVersionError(RepositoryError):
    pass


class LockedError(RepositoryError):
    pass


class ConfigError(RepositoryError):
    pass


class StorageError(RepositoryError):
    pass


class StorageUnavailableError(StorageError):
    pass


class StoragePermissionError(StorageError):
    pass


class ObjectNotFoundError(StorageError):
    pass


class PreconditionFailedError(StorageError):
    pass


class FencedError(PreconditionFailedError):
    """A write went to a region that is no longer the serving one (another took over at a newer
    failover epoch). Nothing was written; reopen the repository to write where it serves now."""


class ArchivedError(StorageError):
    """Objects are in an archive storage class (e.g. S3 GLACIER) and need a restore request
    before they can be read. ``keys`` names them; a load also sets ``snapshot`` and ``packs``."""

    def __init__(self, message: str, keys: list[str] | None = None, *, snapshot: str | None = None,
                 packs: list[str] | None = None) -> None:
        super().__init__(message)
        self.keys = list(keys or [])
        self.snapshot = snapshot
        self.packs = list(packs or [])


class SnapshotNotFoundError(CasError):
    exit_code = 4


class AmbiguousSnapshotError(SnapshotNotFoundError):
    pass


class UnsupportedObjectError(CasError):
    exit_code = 5


class PickleRequiredError(UnsupportedObjectError):
    pass


class NotACheckpointError(CasError):
    exit_code = 6


class SourceChangedError(CasError):
    """A file being saved was written, grown, cut or replaced while it was read; nothing was
    committed."""


class CorruptionError(CasError):
    exit_code = 7


class ChunkCorruptError(CorruptionError):
    """A chunk's stored copy does not decode to its id. ``copy``: (chunk id, pack id, payload offset)
    of the copy that failed, where the reader read one (a pack cut short, a record that decodes to
    other bytes, a delta chain that does not resolve: the delta's own copy); None otherwise."""

    def __init__(self, message: str, copy: tuple[bytes, bytes, int] | None = None) -> None:
        super().__init__(message)
        self.copy = copy


class MissingChunkError(CorruptionError):
    pass


class PackCorruptError(CorruptionError):
    pass


class ManifestCorruptError(CorruptionError):
    pass


class IndexCorruptError(CorruptionError):
    pass


class GcRefusedError(CorruptionError):
    pass
