"""cas: a content-addressed, deduplicating store for deep-learning checkpoints."""

from cas.check import CheckReport
from cas.errors import (
    AmbiguousSnapshotError,
    CasError,
    ChunkCorruptError,
    CorruptionError,
    FormatVersionError,
    GcRefusedError,
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
    StorageError,
    TagExistsError,
    UnsupportedObjectError,
    UsageError,
)
from cas.gc import GcReport
from cas.manager import CheckpointManager, RestoreResult
from cas.policy import EveryNSteps, EverySeconds, StagePolicy, YoungDaly
from cas.reports import DiffReport, Problem, Snapshot, StatsReport, VerifyReport
from cas.repository import Repository
from cas.retention import ForgetReport, RetentionPolicy
from cas.validate import ValidationReport, validate

__version__ = "0.1.0"

__all__ = [
    "AmbiguousSnapshotError",
    "CasError",
    "CheckpointManager",
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
    "RestoreResult",
    "RetentionPolicy",
    "ShapeMismatchError",
    "Snapshot",
    "StagePolicy",
    "SnapshotNotFoundError",
    "StatsReport",
    "StorageError",
    "TagExistsError",
    "UnsupportedObjectError",
    "UsageError",
    "ValidationReport",
    "VerifyReport",
    "YoungDaly",
    "__version__",
    "validate",
]
