"""Integrations of cas with training frameworks.

Each lives in its own module and imports its framework only there, so ``import cas``
never needs them:

* :mod:`cas.integrations.lightning` -- ``CasCheckpointIO``, a PyTorch Lightning
  ``CheckpointIO`` plugin (``pip install 'cas[lightning]'``).
* :mod:`cas.integrations.hf` -- ``CasCallback`` and ``restore_checkpoint`` for the
  Hugging Face ``transformers`` ``Trainer`` (``pip install 'cas[hf]'``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

from cas.errors import NotARepositoryError, SnapshotNotFoundError
from cas.ids import SnapshotId
from cas.reports import Snapshot
from cas.repository import Repository

__all__ = ["open_or_init", "replace_tag"]


def open_or_init(repo_or_path: Repository | str | os.PathLike[str]) -> tuple[Repository, bool]:
    """The repository to use and whether the caller opened it (and so must close it).

    A path is opened, or initialised when it does not exist or is an empty directory
    (as ``CheckpointManager`` does); a non-empty directory that is not a repository is
    refused with ``NotARepositoryError``.
    """
    if isinstance(repo_or_path, Repository):
        return repo_or_path, False
    path = Path(repo_or_path)
    try:
        return Repository.open(path), True
    except NotARepositoryError:
        if path.exists() and any(path.iterdir()):
            raise
        return Repository.init(path), True


def replace_tag(repo: Repository, tag: str, save: Callable[[], Snapshot]) -> Snapshot:
    """Run ``save`` (which saves a snapshot tagged ``tag``) so that it replaces the snapshot the
    tag names now, if any.

    Tags are immutable, so the old ref is dropped first. If ``save`` fails, the tag is
    pointed at the old snapshot again (its chunks are still stored unless a ``gc`` in
    another process ran in that window), so a failed save of ``last.ckpt`` does not lose
    the previous one. cas has no public call for that step yet: it writes
    the ref through the store, as ``Repository.save`` does.
    """
    try:
        previous: Snapshot | None = repo.resolve(tag)
    except SnapshotNotFoundError:
        previous = None
    if previous is not None:
        repo.delete(tag)
    try:
        return save()
    except BaseException:
        if previous is not None:
            try:
                if not repo._store.has_ref(tag):
                    repo._store.write_ref(tag, SnapshotId(bytes.fromhex(previous.id)))
            except Exception as exc:  # noqa: BLE001 - best effort while the save's error propagates
                warnings.warn(f"cas: could not point tag {tag!r} back at {previous.short_id}: {exc}",
                              RuntimeWarning, stacklevel=2)
        raise
