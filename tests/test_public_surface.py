"""`cas.__all__` is exactly the public surface: every name in it resolves, every public name of the
package is in it, and every error class users can meet is exported."""

from __future__ import annotations

import inspect

import cas
import cas.errors

PUBLIC = {
    "AmbiguousSnapshotError", "ArchivedError", "ArgumentError", "CasError", "CheckpointManager", "CheckReport",
    "ChunkCorruptError", "ConfigError", "CorruptionError", "DiffReport", "EveryNSteps", "EverySeconds",
    "FencedError", "ForgetReport", "FormatVersionError",
    "GcRefusedError", "GcReport", "IndexCorruptError", "InvalidTagError", "KeyNotFoundError", "LoadResult",
    "LockedError", "ManifestCorruptError",
    "MissingChunkError", "NotACheckpointError", "NotARepositoryError", "ObjectNotFoundError", "OutputExistsError",
    "PackCorruptError", "PickleRequiredError", "PreconditionFailedError", "Problem", "Repository",
    "RepositoryError", "RepositoryExistsError", "RestoreResult", "RetentionPolicy",
    "SavedPart", "SaveSession", "ShapeMismatchError",
    "Snapshot", "StagePolicy", "SnapshotNotFoundError", "SourceChangedError", "StatsReport", "StorageError",
    "StoragePermissionError",
    "StorageUnavailableError", "TagExistsError", "UnsupportedObjectError", "UsageError", "ValidationReport",
    "VerifyReport", "YoungDaly", "__version__", "validate",
}


def test_all_is_exactly_the_public_surface() -> None:
    assert set(cas.__all__) == PUBLIC
    assert len(cas.__all__) == len(set(cas.__all__))
    for name in cas.__all__:
        assert getattr(cas, name) is not None


def test_every_error_class_is_exported() -> None:
    errors = {name for name, obj in inspect.getmembers(cas.errors, inspect.isclass)
              if issubclass(obj, cas.CasError) and obj.__module__ == "cas.errors"}
    assert errors <= set(cas.__all__), errors - set(cas.__all__)
    assert all(issubclass(getattr(cas, e), cas.CasError) for e in errors)
