"""PyTorch Lightning: a ``CheckpointIO`` plugin that stores checkpoints in a cas repository.

    from cas.integrations.lightning import CasCheckpointIO

    trainer = Trainer(plugins=[CasCheckpointIO("ckpts")], callbacks=[ModelCheckpoint(save_last=True)])
    trainer.fit(model)
    Trainer(plugins=[CasCheckpointIO("ckpts")]).fit(model, ckpt_path="last")   # or an exact path

Every ``Trainer.save_checkpoint`` (ModelCheckpoint included) becomes one cas snapshot:
its tensors are chunked and deduplicated against every other checkpoint in the
repository. Lightning still thinks in file paths, so each path maps to a tag
(:func:`lightning_tag`: the file name plus a short hash of the whole path, e.g.
``last.ckpt@3f0c9a12d4``) and the snapshot's metadata records the path as
``lightning_path``. Saving to the same path again (ModelCheckpoint rewrites
``last.ckpt``) replaces that path's snapshot.

By default a small JSON *pointer file* is written at the path itself (a few hundred
bytes, naming the repository and snapshot). Lightning looks at the file system in
places a ``CheckpointIO`` cannot reach: ``ckpt_path="last"`` lists the checkpoint
directory and picks the newest file, ``ModelCheckpoint`` checks whether a name is
taken before it picks a ``-v1`` suffix, and ``save_last="link"`` symlinks files. With
pointer files all of that works as it does with Lightning's own ``TorchCheckpointIO``.
Pass ``pointer_files=False`` to keep the checkpoint directory empty; then give exact
paths to ``ckpt_path``. A pointer file is not a torch checkpoint: load it with this
plugin (or :meth:`CasCheckpointIO.checkpoint_buffer`), not ``torch.load``.

``torch.load(path)`` on a pointer file fails (``UnpicklingError: invalid load key, '{'``:
it is JSON), and so does ``LightningModule.load_from_checkpoint(path)``, which calls
``torch.load`` itself. Open it through the plugin instead::

    io = CasCheckpointIO("ckpts")
    model = MyModel.load_from_checkpoint(io.checkpoint_buffer("ckpts/last.ckpt"))  # a torch.save buffer
    state = io.load_checkpoint("ckpts/last.ckpt")                                   # the checkpoint dict
    Trainer(plugins=[io]).fit(model, ckpt_path="ckpts/last.ckpt")                   # resume

``cat`` shows what a pointer file names (``{"format": "cas-lightning-pointer", "repository":
..., "snapshot": ...}``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol, get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO

from cas.errors import PickleRequiredError, SnapshotNotFoundError, UnsupportedObjectError, UsageError
from cas.integrations import open_or_init
from cas.reports import Snapshot
from cas.repository import Repository
from cas.store import TAG_PATTERN, fsync_dir

__all__ = ["POINTER_FORMAT", "CasCheckpointIO", "lightning_tag", "normalize_path", "plain_containers"]

POINTER_FORMAT = "cas-lightning-pointer"
POINTER_VERSION = 1
POINTER_MAX_BYTES = 64 * 1024
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")
_NAME_MAX = 100

MapLocation = str | torch.device | dict[str, str] | Callable[..., Any] | None


def normalize_path(path: _PATH) -> str:
    """The key a checkpoint path is known by: for a local path, the real path of its directory
    joined with its file name (a symlink at the path itself is not followed: Lightning's
    ``save_last="link"`` links ``last.ckpt`` to another checkpoint, and saving ``last.ckpt``
    must replace the link, not the target); any other URL is kept as it is."""
    text = os.fspath(path)
    if not _is_local_file_protocol(text):
        return text
    text = os.path.expanduser(text)
    parent, name = os.path.split(os.path.abspath(text))
    return os.path.join(os.path.realpath(parent), name)


def lightning_tag(path: _PATH) -> str:
    """The cas tag of a Lightning checkpoint path: deterministic, valid, unique per path.

    The file name (characters outside the tag alphabet replaced by ``_``, cut to 100)
    then ``@`` and the first 10 hex digits of the SHA-256 of the normalized path, so two
    ``last.ckpt`` in different directories get different tags.
    """
    norm = normalize_path(path)
    name = _TAG_UNSAFE.sub("_", norm.rstrip("/").rsplit("/", 1)[-1]).lstrip("._+=-")[:_NAME_MAX] or "checkpoint"
    tag = f"{name}@{hashlib.sha256(norm.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"
    assert TAG_PATTERN.fullmatch(tag), tag
    return tag


def plain_containers(obj: Any) -> Any:
    """``obj`` with dict and list subclasses turned into the plain types cas stores natively.

    Lightning puts ``AttributeDict`` (hyper-parameters) and similar subclasses in its
    checkpoints; their items survive as a ``dict``/``list`` (an ``OrderedDict`` subclass
    becomes an ``OrderedDict`` and keeps a state dict's ``_metadata``). Nothing else is
    touched: tensors are not copied, tuples (named ones, ``torch.Size``) stay as they are,
    and other objects are left for the ``allow_pickle`` rule. Unchanged parts are
    returned as the same objects.
    """
    if isinstance(obj, dict):
        exact = type(obj) in (dict, OrderedDict)
        items = [(k, plain_containers(v)) for k, v in obj.items()]
        if exact and all(new is old for (_, new), old in zip(items, obj.values(), strict=True)):
            return obj
        if isinstance(obj, OrderedDict):
            out: dict[Any, Any] = OrderedDict(items)
            meta = getattr(obj, "_metadata", None)
            if meta is not None:
                out._metadata = meta  # type: ignore[attr-defined]
            return out
        return dict(items)
    if isinstance(obj, list):
        values = [plain_containers(v) for v in obj]
        if type(obj) is list and all(new is old for new, old in zip(values, obj, strict=True)):
            return obj
        return values
    if type(obj) is tuple:
        values = [plain_containers(v) for v in obj]
        return obj if all(new is old for new, old in zip(values, obj, strict=True)) else tuple(values)
    return obj


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _move(v, device)
        meta = getattr(obj, "_metadata", None)
        if meta is not None:
            out._metadata = meta  # type: ignore[attr-defined]
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_move(v, device) for v in obj)
    return obj


class CasCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` that saves, loads and removes checkpoints in a cas repository.

    ``repo_or_path``: a :class:`cas.Repository` (left open; the caller owns it) or a path,
    opened or created (when missing or empty) on first use and closed at ``teardown``.

    ``allow_pickle`` -- what happens to checkpoint values cas cannot store natively
    (after :func:`plain_containers`): an ``Enum`` or a dataclass among the hyper-parameters,
    an OmegaConf config, whatever a ``on_save_checkpoint`` hook adds:

    * ``None`` (default, "auto"): a checkpoint of tensors and plain data -- which is what
      ``Trainer.fit`` writes for a module whose hyper-parameters are plain -- is stored
      without pickle. If some value needs it, those values (only those; tensors are still
      chunked and deduplicated) are pickled, with one warning naming the first of them,
      instead of failing the training run at its first checkpoint. Loading then reads
      pickled values unless Lightning was asked for ``weights_only=True``. This is the
      default because the whole point of a ``CheckpointIO`` is that ``Trainer.fit`` and
      its resume work unchanged, whatever the user put in ``save_hyperparameters``; the
      snapshot is still pickle-free whenever it can be, and the repository is the user's own
      (trusted as much as the ``.ckpt`` files Lightning would have written with pickle).
    * ``False``: never pickle; such a checkpoint raises ``cas.UnsupportedObjectError``
      naming the value, and a pickled snapshot does not load.
    * ``True``: pickle such values silently; load pickled values (unless
      ``weights_only=True``).

    ``pointer_files``: write a small JSON pointer at each checkpoint path (see the module
    docstring). ``gc_every``: run ``repo.gc()`` after every N removed checkpoints (0: never),
    so that ``ModelCheckpoint(save_top_k=...)`` does not let unreachable chunks pile up.
    """

    def __init__(
        self,
        repo_or_path: Repository | str | os.PathLike[str],
        *,
        allow_pickle: bool | None = None,
        pointer_files: bool = True,
        gc_every: int = 10,
    ) -> None:
        super().__init__()
        if allow_pickle not in (None, True, False):
            raise UsageError(f"allow_pickle must be None, True or False, got {allow_pickle!r}")
        if not isinstance(gc_every, int) or gc_every < 0:
            raise UsageError(f"gc_every must be a non-negative int, got {gc_every!r}")
        self._repo: Repository | None = None
        self._owns_repo = True
        if isinstance(repo_or_path, Repository):
            self._repo, self._owns_repo = repo_or_path, False
            self._path = repo_or_path.url
        else:
            self._path = os.fspath(repo_or_path)
        self.allow_pickle = allow_pickle
        self.pointer_files = pointer_files
        self.gc_every = gc_every
        self._removed = 0
        self._warned_pickle = False

    # the repository ------------------------------------------------------------------
    @property
    def repo(self) -> Repository:
        """The repository, (re)opened on first use after construction or ``teardown``."""
        if self._repo is None:
            self._repo, self._owns_repo = open_or_init(self._path)
        return self._repo

    def teardown(self) -> None:
        """Close the repository if this plugin opened it (it reopens on the next call)."""
        if self._repo is not None and self._owns_repo:
            self._repo.close()
            self._repo = None

    def __getstate__(self) -> dict[str, Any]:
        # Strategies that spawn processes pickle the plugin; each process opens its own.
        state = self.__dict__.copy()
        state["_repo"], state["_owns_repo"] = None, True
        return state

    # snapshots of a path ------------------------------------------------------------
    def snapshots_of(self, path: _PATH) -> list[Snapshot]:
        """Snapshots saved for ``path`` (metadata ``lightning_path``), oldest first."""
        norm = normalize_path(path)
        return [s for s in self.repo.snapshots() if s.metadata.get("lightning_path") == norm]

    def resolve(self, path: _PATH) -> Snapshot:
        """The snapshot that ``load_checkpoint(path)`` reads.

        In order: the snapshot a cas pointer file at ``path`` names; the newest snapshot
        whose ``lightning_path`` is ``path``; the tag :func:`lightning_tag` gives ``path``;
        ``path`` itself read as a cas tag or snapshot id. ``FileNotFoundError`` otherwise.
        """
        repo = self.repo
        pointer = self._read_pointer(path)
        if pointer is not None:
            try:
                return repo.resolve(str(pointer["snapshot"]))
            except SnapshotNotFoundError:
                pass  # a stale pointer (its snapshot was removed): try what the repository knows
        found = self.snapshots_of(path)
        if not found and os.path.islink(os.fspath(path)):
            found = self.snapshots_of(os.path.realpath(os.fspath(path)))
        if found:
            return found[-1]
        for spec in (lightning_tag(path), os.fspath(path)):
            if TAG_PATTERN.fullmatch(spec):
                try:
                    return repo.resolve(spec)
                except SnapshotNotFoundError:
                    continue
        raise FileNotFoundError(f"no cas snapshot for checkpoint {os.fspath(path)!r} in repository {repo.path}")

    # CheckpointIO ----------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Store ``checkpoint`` as the snapshot of ``path``, replacing the one saved there before.

        ``storage_options`` may be ``{"metadata": {...}}``: extra (JSON-like) snapshot metadata.
        """
        extra: dict[str, Any] = {}
        if storage_options is not None:
            if not isinstance(storage_options, dict) or set(storage_options) - {"metadata"}:
                raise TypeError(
                    f"{type(self).__name__} takes storage_options=None or {{'metadata': {{...}}}}, "
                    f"got {storage_options!r}"
                )
            extra = dict(storage_options.get("metadata") or {})
        norm = normalize_path(path)
        tag = lightning_tag(norm)
        metadata: dict[str, Any] = {**extra, "lightning_path": norm}
        for key, name in (("global_step", "step"), ("epoch", "epoch")):
            if type(checkpoint.get(key)) is int:
                metadata[name] = checkpoint[key]
        state = plain_containers(checkpoint)

        repo = self.repo
        snap = self._save(state, tag, metadata)  # replace=True: the tag moves atomically on commit
        for old in self.snapshots_of(norm):
            if old.id != snap.id and old.ref != tag:
                repo.delete(old.ref)  # e.g. saved under another tag by an older version
        if self.pointer_files:
            self._write_pointer(path, snap)

    def load_checkpoint(
        self, path: _PATH, map_location: MapLocation = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint saved for ``path`` (see :meth:`resolve`), every chunk verified.

        Tensors come back on the CPU (Lightning moves them to the strategy's device), or on
        ``map_location`` when that is a device or device string. A file at ``path`` that
        is not a cas pointer is an ordinary checkpoint: it is read with Lightning's
        ``TorchCheckpointIO``, so a run can resume from ``.ckpt`` files written before cas.
        """
        try:
            snap = self.resolve(path)
        except FileNotFoundError:
            if self._is_plain_file(path):
                return TorchCheckpointIO().load_checkpoint(path, weights_only=weights_only)
            raise
        allow = self.allow_pickle is not False and weights_only is not True
        try:
            state = self.repo.load(snap.id, allow_pickle=allow)
        except PickleRequiredError as exc:
            hint = (
                "it was loaded with weights_only=True" if weights_only is True
                else "this CasCheckpointIO has allow_pickle=False"
            )
            raise PickleRequiredError(f"checkpoint {os.fspath(path)!r}: {exc} ({hint})") from None
        if isinstance(map_location, (str, torch.device)):
            device = torch.device(map_location)
            if device.type != "cpu":
                state = _move(state, device)
        if not isinstance(state, dict):
            raise UsageError(f"snapshot {snap.short_id} for {os.fspath(path)!r} is not a Lightning checkpoint")
        return state

    def remove_checkpoint(self, path: _PATH) -> None:
        """Drop the snapshots of ``path`` and its pointer file (a plain file there is removed too,
        as ``TorchCheckpointIO`` would). Chunks are reclaimed by ``gc`` (see ``gc_every``)."""
        repo = self.repo
        dropped = False
        for snap in self.snapshots_of(path):
            repo.delete(snap.ref)
            dropped = True
        tag = lightning_tag(path)
        try:
            repo.delete(tag)
            dropped = True
        except SnapshotNotFoundError:
            pass
        fs = get_filesystem(path)
        if os.path.islink(os.fspath(path)):
            os.unlink(os.fspath(path))
        elif fs.exists(path):
            fs.rm(path, recursive=True)
        if dropped:
            self._removed += 1
            if self.gc_every and self._removed % self.gc_every == 0:
                repo.gc()

    # helpers ----------------------------------------------------------------------------
    def checkpoint_buffer(self, path: _PATH, weights_only: bool | None = None) -> io.BytesIO:
        """The checkpoint of ``path`` as an in-memory ``torch.save`` file, for APIs that read files
        themselves, e.g. ``MyModule.load_from_checkpoint(io.checkpoint_buffer(path))``."""
        buf = io.BytesIO()
        torch.save(self.load_checkpoint(path, weights_only=weights_only), buf)
        buf.seek(0)
        return buf

    def _save(self, state: Any, tag: str, metadata: dict[str, Any]) -> Snapshot:
        repo = self.repo
        if self.allow_pickle is not None:
            return repo.save(state, tag=tag, metadata=metadata, allow_pickle=self.allow_pickle, replace=True)
        try:
            return repo.save(state, tag=tag, metadata=metadata, allow_pickle=False, replace=True)
        except PickleRequiredError:
            raise
        except UnsupportedObjectError as exc:
            first = exc
        # Raises again when pickle would not help (a sparse or meta tensor, say).
        snap = repo.save(state, tag=tag, metadata=metadata, allow_pickle=True, replace=True)
        if not self._warned_pickle:
            self._warned_pickle = True
            warnings.warn(
                f"cas: {first}. CasCheckpointIO(allow_pickle=None) stores such values with pickle; pass "
                "allow_pickle=True to silence this, or False to refuse them",
                UserWarning,
                stacklevel=3,
            )
        return snap

    def _pointer_bytes(self, snap: Snapshot, path: _PATH) -> bytes:
        pointer = {
            "format": POINTER_FORMAT, "version": POINTER_VERSION, "repository": self.repo.url,
            "snapshot": snap.id, "tag": snap.tag, "lightning_path": normalize_path(path),
            "step": snap.metadata.get("step"),
        }
        return (json.dumps(pointer, indent=1) + "\n").encode()

    def _write_pointer(self, path: _PATH, snap: Snapshot) -> None:
        data = self._pointer_bytes(snap, path)
        text = os.fspath(path)
        if not _is_local_file_protocol(text):
            fs = get_filesystem(text)
            fs.makedirs(os.path.dirname(text), exist_ok=True)
            with fs.open(text, "wb") as f:
                f.write(data)
            return
        target = os.path.expanduser(text)
        parent = os.path.dirname(os.path.abspath(target))
        os.makedirs(parent, exist_ok=True)
        temp = os.path.join(parent, f".{os.path.basename(target)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, target)  # replaces a symlink at the path, not its target
        finally:
            if os.path.exists(temp):
                os.unlink(temp)
        fsync_dir(Path(parent))

    def _read_pointer(self, path: _PATH) -> dict[str, Any] | None:
        try:
            fs = get_filesystem(path)
            if not fs.isfile(path):
                return None
            with fs.open(path, "rb") as f:
                head = f.read(POINTER_MAX_BYTES + 1)
        except OSError:
            return None
        if len(head) > POINTER_MAX_BYTES or not head.lstrip().startswith(b"{"):
            return None
        try:
            pointer = json.loads(head)
        except ValueError:
            return None
        if not isinstance(pointer, dict) or pointer.get("format") != POINTER_FORMAT:
            return None
        return pointer

    def _is_plain_file(self, path: _PATH) -> bool:
        try:
            return bool(get_filesystem(path).isfile(path)) and self._read_pointer(path) is None
        except OSError:
            return False
