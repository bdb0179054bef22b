"""Integrations of cas with training frameworks.

Each lives in its own module and imports its framework only there, so ``import cas``
never needs them:

* :mod:`cas.integrations.lightning` -- ``CasCheckpointIO``, a PyTorch Lightning
  ``CheckpointIO`` plugin (``pip install 'cas[lightning]'``).
* :mod:`cas.integrations.hf` -- ``CasCallback`` and ``restore_checkpoint`` for the
  Hugging Face ``transformers`` ``Trainer`` (``pip install 'cas[hf]'``).
* :mod:`cas.integrations.dcp` -- ``CasStorageWriter`` and ``CasStorageReader``,
  ``torch.distributed.checkpoint`` storage (one snapshot per global checkpoint, resharding loads).
"""

from __future__ import annotations

import os
from pathlib import Path

from cas.errors import NotARepositoryError
from cas.repository import Repository

__all__ = ["open_or_init"]


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
