"""cas: a content-addressed, deduplicating store for deep-learning checkpoints."""

from cas.check import CheckReport
from cas.errors import (
    AmbiguousSnapshotError,
    ArchivedError,
    ArgumentError,
    CasError,
    ChunkCorruptError,
    ConfigError,
    CorruptionError,
    FencedError,
    FormatVersionError,
    GcRefusedError,
    IndexCorruptError,
    InvalidTagError,
    KeyNotFoundError,
    LockedError,
    ManifestCorruptError,
    MissingChunkError,
    NotACheckpointError,
    NotARepositoryError,
    ObjectNotFoundError,
    OutputExistsError,
    PackCorruptError,
    PickleRequiredError,
    PreconditionFailedError,
    RepositoryError,
    RepositoryExistsError,
    ShapeMismatchError,
    SnapshotNotFoundError,
    SourceChangedError,
    StorageError,
    StoragePermissionError,
    StorageUnavailableError,
    TagExistsError,
    UnsupportedObjectError,
    UsageError,
)
from cas.gc import GcReport
from cas.policy import EveryNSteps, EverySeconds, StagePolicy, YoungDaly
from cas.reports import DiffReport, Problem, Snapshot, StatsReport, VerifyReport
from cas.repository import Repository
from cas.retention import ForgetReport, RetentionPolicy
from cas.session import SavedPart, SaveSession

__version__ = "0.1.0"

# The trainer-facing names need torch; they load on first use so that `import cas` (and the
# CLI's read-only commands) start without importing torch.
_LAZY = {
    "CheckpointManager": "cas.manager",
    "RestoreResult": "cas.manager",
    "LoadResult": "cas.statedict",
    "validate": "cas.validation",
    "ValidationReport": "cas.validation",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cas' has no attribute {name!r}")
    import importlib  # noqa: PLC0415

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

__all__ = [
    "AmbiguousSnapshotError",
    "ArchivedError",
    "FencedError",
    "ArgumentError",
    "CasError",
    "CheckpointManager",
    "ConfigError",
    "CheckReport",
    "ChunkCorruptError",
    "CorruptionError",
    "DiffReport",
    "EveryNSteps",
    "EverySeconds",
    "ForgetReport",
    "FormatVersionError",
    "GcRefusedError",
    "GcReport",
    "IndexCorruptError",
    "InvalidTagError",
    "KeyNotFoundError",
    "LoadResult",
    "LockedError",
    "ManifestCorruptError",
    "MissingChunkError",
    "NotACheckpointError",
    "NotARepositoryError",
    "ObjectNotFoundError",
    "OutputExistsError",
    "PackCorruptError",
    "PickleRequiredError",
    "PreconditionFailedError",
    "Problem",
    "Repository",
    "RepositoryError",
    "RepositoryExistsError",
    "RestoreResult",
    "RetentionPolicy",
    "SavedPart",
    "SaveSession",
    "ShapeMismatchError",
    "Snapshot",
    "StagePolicy",
    "SnapshotNotFoundError",
    "SourceChangedError",
    "StatsReport",
    "StorageError",
    "StoragePermissionError",
    "StorageUnavailableError",
    "TagExistsError",
    "UnsupportedObjectError",
    "UsageError",
    "ValidationReport",
    "VerifyReport",
    "YoungDaly",
    "__version__",
    "validate",
]
