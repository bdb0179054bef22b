"""Hugging Face ``transformers``: store ``Trainer`` checkpoint directories in a cas repository.

    from cas.integrations.hf import CasCallback, resume_from_cas

    trainer = Trainer(..., callbacks=[CasCallback("ckpts")])
    trainer.train(resume_from_checkpoint=resume_from_cas("ckpts", "restored"))   # None on the first run

Each time the ``Trainer`` writes ``<output_dir>/checkpoint-<step>/``, :class:`CasCallback`
stores the whole directory as one snapshot tagged ``checkpoint-<step>`` with metadata
``{"step", "metrics", "hf_checkpoint", "files"}``. What is stored, per file:

* ``*.safetensors``: the tensors and the header metadata, written back with
  ``safetensors`` -- the same bytes as the original (checked per file, see
  :func:`compare_restored`).
* ``*.pt``/``*.pth``/``*.bin`` that load with ``torch.load(weights_only=True)`` (numpy
  allowed, as the Trainer allows it for ``rng_state.pth``): the loaded state -- model
  weights, optimizer moments -- written back with ``torch.save``. The file that comes back
  loads to the same state (bit-identical tensors); its bytes can differ from the original's.
* everything else (``training_args.bin``, a pickle; json; tokenizer files) and any
  torch file that needs pickle or holds values cas does not store natively: the raw
  bytes, restored byte for byte.

Tensors are what checkpoints are made of, and storing them as tensors is what lets
cas deduplicate them across checkpoints (unchanged embeddings, frozen layers) at chunk
granularity. Every file's size and BLAKE3 digest is kept in the metadata.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import torch
from safetensors.torch import save_file
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from cas.errors import (
    CorruptionError,
    NotACheckpointError,
    OutputExistsError,
    SnapshotNotFoundError,
    UnsupportedObjectError,
    UsageError,
)
from cas.importers import SAFETENSORS_SUFFIX, read_checkpoint
from cas.integrations import open_or_init
from cas.reports import Snapshot
from cas.repository import Repository
from cas.statedict import encode_state
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
SNAPSHOT_VERSION = 1
TAG_PREFIX = "checkpoint-"
TORCH_FILE_SUFFIXES = (".pt", ".pth", ".bin")

RepoLike = Repository | str | os.PathLike[str]


def _numpy_safe_globals() -> AbstractContextManager[Any]:
    """What the Trainer itself allows when it loads ``rng_state.pth`` with ``weights_only=True``."""
    try:
        from transformers.trainer_pt_utils import safe_globals  # noqa: PLC0415 - optional helper

        return safe_globals()  # type: ignore[no-untyped-call,no-any-return]
    except ImportError:  # pragma: no cover - older/newer transformers
        core = getattr(np, "_core", None) or np.core
        allow = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
        return torch.serialization.safe_globals(allow)


def _digest(path: Path) -> str:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _storable(state: Any) -> bool:
    """Whether cas stores ``state`` without pickle (encoding only builds views; nothing is copied)."""
    try:
        encode_state(state, allow_pickle=False)
    except UnsupportedObjectError:
        return False
    return True


def _files(directory: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            yield path.relative_to(directory).as_posix(), path


def _read_file(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        try:
            tensors, source = read_checkpoint(path)
        except NotACheckpointError:
            pass
        else:
            return {"kind": "safetensors", "tensors": tensors, "header": dict(source["safetensors_metadata"])}
    elif suffix in TORCH_FILE_SUFFIXES:
        try:
            with _numpy_safe_globals():
                state, _ = read_checkpoint(path)
        except NotACheckpointError:
            pass  # e.g. training_args.bin, a pickle of TrainingArguments
        else:
            if _storable(state):
                return {"kind": "torch", "state": state}
    return {"kind": "raw", "data": path.read_bytes()}


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
    root = Path(directory)
    if not root.is_dir():
        raise NotACheckpointError(f"{root} is not a directory")
    files: dict[str, Any] = {}
    listing: dict[str, Any] = {}
    for rel, path in _files(root):
        entry = _read_file(path)
        files[rel] = entry
        listing[rel] = {"kind": entry["kind"], "size": path.stat().st_size, "blake3": _digest(path)}
    if not files:
        raise NotACheckpointError(f"{root} holds no files")
    state = {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "files": files}
    meta = {**(metadata or {}), "hf_checkpoint": root.name, "files": listing}
    if tag is None:
        return repo.save(state, metadata=meta)
    return repo.save(state, tag=tag, metadata=meta, replace=True)  # the tag moves atomically on commit


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
