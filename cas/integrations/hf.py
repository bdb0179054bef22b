"""Hugging Face ``transformers``: store ``Trainer`` checkpoint directories in a cas repository.

    from cas.integrations.hf import CasCallback, resume_from_cas

    trainer = Trainer(..., callbacks=[CasCallback("ckpts")])
    trainer.train(resume_from_checkpoint=resume_from_cas("ckpts", "restored"))   # None on the first run

Each time the ``Trainer`` writes ``<output_dir>/checkpoint-<step>/``, :class:`CasCallback`
stores the whole directory as one snapshot tagged ``checkpoint-<step>`` with metadata
``{"step", "metrics", "hf_checkpoint", "files"}``: a byte-exact file backup (``cas.files``,
FORMAT.md §7a, what ``cas save DIR`` stores). Every file comes back with the same bytes, mode
and mtime; the tensors of ``model.safetensors``, ``optimizer.pt``, ``scheduler.pt`` and
``rng_state.pth`` are stored as tensors (read without unpickling anything), so cas
deduplicates them across checkpoints (unchanged embeddings, frozen layers) and against live
saves at chunk granularity. Every file's size and BLAKE3 digest is kept in the metadata
(:func:`compare_restored`).

Snapshots of version 1 (tensors re-serialized on restore: ``torch`` files loaded to the same
state but not the same bytes) still restore.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import blake3
import torch
from safetensors.torch import save_file
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from cas.errors import (
    CorruptionError,
    NotACheckpointError,
    OutputExistsError,
    SnapshotNotFoundError,
    UsageError,
)
from cas.integrations import open_or_init
from cas.reports import Snapshot
from cas.repository import Repository
from cas.store import fsync_dir

__all__ = [
    "SNAPSHOT_FORMAT",
    "CasCallback",
    "compare_restored",
    "hf_snapshots",
    "restore_checkpoint",
    "resume_from_cas",
    "save_checkpoint_dir",
]

SNAPSHOT_FORMAT = "cas-hf-checkpoint"
SNAPSHOT_VERSION = 1  # the version-1 state layout (restored still; new snapshots are file backups)
TAG_PREFIX = "checkpoint-"

RepoLike = Repository | str | os.PathLike[str]


def _digest(path: Path) -> str:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def save_checkpoint_dir(
    repo: Repository,
    directory: str | os.PathLike[str],
    *,
    tag: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Snapshot:
    """Store every file under ``directory`` as one snapshot (see the module docstring).

    A ``tag`` that names a snapshot already (a resumed run saving the same step again)
    is moved to the new one.
    """
    from cas.files import build_state  # noqa: PLC0415

    root = Path(directory)
    if not root.is_dir():
        raise NotACheckpointError(f"{root} is not a directory")
    files = build_state([root])
    try:
        stored = files.state["files"]
        if not stored:
            raise NotACheckpointError(f"{root} holds no files")
        listing = {rel: {"kind": value["format"], "size": value["size"], "blake3": _digest(root / rel)}
                   for rel, value in stored.items()}
        meta = {**(metadata or {}), "hf_checkpoint": root.name, "files": listing, "source": files.source}
        if tag is None:
            return repo.save(files.state, metadata=meta, before_commit=files.check_unchanged)
        return repo.save(files.state, tag=tag, metadata=meta, replace=True,  # the tag moves atomically on commit
                         before_commit=files.check_unchanged)
    finally:
        files.close()


def hf_snapshots(repo: Repository) -> list[Snapshot]:
    """The snapshots holding a ``transformers`` checkpoint directory, oldest first."""
    return [s for s in repo.snapshots() if "hf_checkpoint" in s.metadata]


def _resolve(repo: Repository, tag_or_step: str | int) -> Snapshot:
    if isinstance(tag_or_step, bool):
        raise UsageError(f"a checkpoint is a tag, an id, a step or 'latest', not {tag_or_step!r}")
    if isinstance(tag_or_step, int):
        return repo.resolve(f"{TAG_PREFIX}{tag_or_step}")
    if tag_or_step == "latest":
        snaps = hf_snapshots(repo)
        if not snaps:
            raise SnapshotNotFoundError(f"repository {repo.path} holds no transformers checkpoint")
        return snaps[-1]
    return repo.resolve(tag_or_step)


def _with_repo(repo_or_path: RepoLike) -> tuple[Repository, bool]:
    if isinstance(repo_or_path, Repository):
        return repo_or_path, False
    return Repository.open(repo_or_path), True


def restore_checkpoint(
    repo_or_path: RepoLike,
    tag_or_step: str | int,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> str:
    """Write the checkpoint directory of a snapshot to ``out_dir``; returns ``out_dir`` as a str,
    ready for ``trainer.train(resume_from_checkpoint=...)``.

    ``tag_or_step``: a step (``checkpoint-<step>``), a tag, a snapshot id, or ``"latest"``
    (the newest transformers checkpoint). The directory is written next to ``out_dir``
    and renamed into place, so ``out_dir`` is never half-written. An ``out_dir`` that is
    not empty is refused unless ``overwrite`` (which replaces it whole).
    """
    repo, owned = _with_repo(repo_or_path)
    try:
        snap = _resolve(repo, tag_or_step)
        if "hf_checkpoint" not in snap.metadata:
            raise UsageError(f"snapshot {snap.ref} was not saved from a transformers checkpoint directory")
        listing = repo.files(snap.id)
        if listing is not None:  # a byte-exact file backup: written file by file
            return _restore_files(repo, snap, listing, Path(out_dir), overwrite)
        state = repo.load(snap.id)
    finally:
        if owned:
            repo.close()
    if not isinstance(state, dict) or state.get("format") != SNAPSHOT_FORMAT:
        raise UsageError(f"snapshot {snap.ref} does not hold a {SNAPSHOT_FORMAT} (version {SNAPSHOT_VERSION})")
    if state.get("version") != SNAPSHOT_VERSION:
        raise UsageError(f"snapshot {snap.ref} is {SNAPSHOT_FORMAT} version {state.get('version')}; "
                         f"this cas reads version {SNAPSHOT_VERSION}")
    out = Path(out_dir)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    temp.mkdir()
    try:
        for rel, entry in state["files"].items():
            _write_file(temp, rel, entry)
        fsync_dir(temp)
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():
            out.unlink()
        os.replace(temp, out)
        fsync_dir(out.parent)
    finally:
        if temp.exists():
            shutil.rmtree(temp)
    return str(out)


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    temp.mkdir()
    return temp


def _swap_in(temp: Path, out: Path) -> None:
    fsync_dir(temp)
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    elif out.exists() or out.is_symlink():
        out.unlink()
    os.replace(temp, out)
    fsync_dir(out.parent)


def _restore_files(repo: Repository, snap: Snapshot, listing: list[dict[str, Any]], out: Path,
                   overwrite: bool) -> str:
    from cas.filebytes import PartLoader  # noqa: PLC0415
    from cas.files import restore_files  # noqa: PLC0415

    temp = _prepare_out(out, overwrite)
    try:
        restore_files(PartLoader(repo, snap.id), listing, f"snapshot {snap.short_id}", temp)
        _swap_in(temp, out)
    finally:
        if temp.exists():
            shutil.rmtree(temp)
    return str(out)


def _write_file(root: Path, rel: str, entry: dict[str, Any]) -> None:
    target = root.joinpath(*rel.split("/"))
    if ".." in rel.split("/") or not target.resolve().is_relative_to(root.resolve()):
        raise UsageError(f"refusing to write {rel!r} outside the checkpoint directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    kind = entry.get("kind")
    if kind == "raw":
        target.write_bytes(entry["data"])
    elif kind == "safetensors":
        header = entry.get("header") or None
        save_file(entry["tensors"], str(target), metadata=header)
    elif kind == "torch":
        torch.save(entry["state"], target)
    else:
        raise UsageError(f"{rel}: unknown stored kind {kind!r}")
    with open(target, "rb+") as f:
        os.fsync(f.fileno())


def compare_restored(
    repo_or_path: RepoLike, tag_or_step: str | int, directory: str | os.PathLike[str]
) -> dict[str, bool]:
    """For each file of the snapshot: whether ``directory`` holds it with the original bytes
    (size and BLAKE3 digest recorded when it was stored). ``torch`` files may differ in
    bytes yet load to the same state; a missing file is False."""
    repo, owned = _with_repo(repo_or_path)
    try:
        listing = _resolve(repo, tag_or_step).metadata.get("files") or {}
    finally:
        if owned:
            repo.close()
    root = Path(directory)
    result = {}
    for rel, info in listing.items():
        path = root.joinpath(*rel.split("/"))
        result[rel] = path.is_file() and path.stat().st_size == info["size"] and _digest(path) == info["blake3"]
    return result


def resume_from_cas(
    repo_or_path: RepoLike, out_dir: str | os.PathLike[str], tag_or_step: str | int = "latest"
) -> str | None:
    """Restore a checkpoint for ``trainer.train(resume_from_checkpoint=...)``.

    Writes it to ``<out_dir>/<tag>`` (replacing a directory of that name) and returns that
    path; returns None when the repository does not exist yet or holds no transformers
    checkpoint and ``tag_or_step`` is ``"latest"`` -- so the same line works on a first run.
    """
    if not isinstance(repo_or_path, Repository) and not Path(repo_or_path).exists():
        return None
    repo, owned = _with_repo(repo_or_path)
    try:
        if tag_or_step == "latest" and not hf_snapshots(repo):
            return None
        snap = _resolve(repo, tag_or_step)
        name = snap.tag or snap.metadata.get("hf_checkpoint") or snap.id
        return restore_checkpoint(repo, snap.id, Path(out_dir) / str(name), overwrite=True)
    finally:
        if owned:
            repo.close()


def _latest_metrics(log_history: list[dict[str, Any]] | None) -> dict[str, float | int]:
    """The most recent value of every numeric entry of ``state.log_history``."""
    metrics: dict[str, float | int] = {}
    for entry in log_history or []:
        for key, value in entry.items():
            if isinstance(value, bool) or not isinstance(key, str):
                continue
            if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
                metrics[key] = value
    return metrics


class CasCallback(TrainerCallback):
    """Stores every checkpoint directory the ``Trainer`` writes as one cas snapshot.

    ``repo_or_path``: a :class:`cas.Repository` (left open) or a path (opened, or created when
    missing or empty; closed at the end of training and reopened if training goes on).
    ``tag_prefix``: snapshots are tagged ``<tag_prefix><step>``. ``delete_after_save``:
    remove ``checkpoint-<step>/`` from disk once its snapshot is stored and verified
    (every chunk re-read and re-hashed), leaving cas as the only copy; resume with
    :func:`resume_from_cas`. With ``save_total_limit`` set, the repository keeps as many
    snapshots as the Trainer keeps directories (the newest, and the best checkpoint's):
    :meth:`rotate`. It cannot be combined with ``load_best_model_at_end``
    (the Trainer reloads the best checkpoint from disk). Only the main process stores.
    """

    def __init__(
        self, repo_or_path: RepoLike, *, tag_prefix: str = TAG_PREFIX, delete_after_save: bool = False
    ) -> None:
        if isinstance(repo_or_path, Repository):
            self._repo: Repository | None = repo_or_path
            self._owns_repo = False
            self._path = repo_or_path.url
        else:
            self._repo, self._owns_repo = None, True
            self._path = os.fspath(repo_or_path)
        self.tag_prefix = tag_prefix
        self.delete_after_save = delete_after_save
        self.saved: list[Snapshot] = []

    @property
    def repo(self) -> Repository:
        if self._repo is None:
            self._repo, self._owns_repo = open_or_init(self._path)
        return self._repo

    def close(self) -> None:
        """Close the repository if this callback opened it (it reopens when needed)."""
        if self._repo is not None and self._owns_repo:
            self._repo.close()
            self._repo = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.delete_after_save and args.load_best_model_at_end:
            raise UsageError(
                "CasCallback(delete_after_save=True) cannot be used with load_best_model_at_end: "
                "the Trainer reloads the best checkpoint directory from disk"
            )

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        directory = self.checkpoint_dir(args, state)
        metadata = {"step": int(state.global_step), "metrics": _latest_metrics(state.log_history)}
        if state.epoch is not None:
            metadata["epoch"] = float(state.epoch)
        snap = save_checkpoint_dir(self.repo, directory, tag=f"{self.tag_prefix}{state.global_step}",
                                   metadata=metadata)
        self.saved.append(snap)
        if args.save_total_limit:
            self.rotate(int(args.save_total_limit), state.best_model_checkpoint)
        if self.delete_after_save:
            report = self.repo.verify(read_data=True, snapshots=[snap.id])
            if not report.ok:
                raise CorruptionError(
                    f"snapshot {snap.ref} did not verify ({report.problems[0]}); {directory} is kept"
                )
            shutil.rmtree(directory)

    def rotate(self, limit: int, best_checkpoint: str | None = None) -> list[Snapshot]:
        """Mirror the Trainer's ``save_total_limit``: keep the ``limit`` newest snapshots of this
        callback's tags (and the best checkpoint's, as the Trainer keeps it); drop the others'
        refs (``gc`` frees their space). Returns the removed ones."""
        mine = []
        for snap in hf_snapshots(self.repo):
            tag = snap.tag or ""
            if tag.startswith(self.tag_prefix) and tag[len(self.tag_prefix):].isdigit():
                mine.append((int(tag[len(self.tag_prefix):]), snap))
        mine.sort(key=lambda item: item[0])
        keep = {snap.id for _step, snap in mine[-max(1, limit):]}
        if best_checkpoint:
            best = Path(best_checkpoint).name
            keep |= {snap.id for _step, snap in mine if snap.metadata.get("hf_checkpoint") == best}
        removed = []
        for _step, snap in mine:
            if snap.id not in keep:
                self.repo.delete(snap.ref)
                removed.append(snap)
        return removed

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.close()

    @staticmethod
    def checkpoint_dir(args: TrainingArguments, state: TrainerState) -> Path:
        """The directory the Trainer has just written: ``<output_dir>/checkpoint-<step>`` (or, in a
        hyper-parameter search, the newest ``<output_dir>/<run>/checkpoint-<step>``)."""
        name = f"{TAG_PREFIX}{state.global_step}"
        output_dir = Path(args.output_dir or ".")
        direct = output_dir / name
        if direct.is_dir():
            return direct
        runs = sorted(output_dir.glob(f"*/{name}"), key=lambda p: p.stat().st_mtime)
        if runs:
            return runs[-1]
        raise NotACheckpointError(f"the Trainer saved step {state.global_step} but {direct} does not exist")
