"""cas: a content-addressed, deduplicating store for deep-learning checkpoints."""

from cas.errors import (
    AmbiguousSnapshotError,
    CasError,
    ChunkCorruptError,
    CorruptionError,
    FormatVersionError,
    InvalidTagError,
    ManifestCorruptError,
    MissingChunkError,
    NotACheckpointError,
    NotARepositoryError,
    OutputExistsError,
    PackCorruptError,
    PickleRequiredError,
    RepositoryError,
    RepositoryExistsError,
    ShapeMismatchError,
    SnapshotNotFoundError,
    TagExistsError,
    UnsupportedObjectError,
    UsageError,
)
from cas.reports import DiffReport, Problem, Snapshot, StatsReport, VerifyReport
from cas.repository import Repository

__version__ = "0.1.0"

__all__ = [
    "AmbiguousSnapshotError",
    "CasError",
    "ChunkCorruptError",
    "CorruptionError",
    "DiffReport",
    "FormatVersionError",
    "InvalidTagError",
    "ManifestCorruptError",
    "MissingChunkError",
    "NotACheckpointError",
    "NotARepositoryError",
    "OutputExistsError",
    "PackCorruptError",
    "PickleRequiredError",
    "Problem",
    "Repository",
    "RepositoryError",
    "RepositoryExistsError",
    "ShapeMismatchError",
    "Snapshot",
    "SnapshotNotFoundError",
    "StatsReport",
    "TagExistsError",
    "UnsupportedObjectError",
    "UsageError",
    "VerifyReport",
    "__version__",
]
