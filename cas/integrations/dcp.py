"""``torch.distributed.checkpoint`` (DCP) storage on a cas repository, local or on S3.

    import torch.distributed.checkpoint as dcp
    from cas.integrations.dcp import CasStorageReader, CasStorageWriter

    dcp.save(state_dict, storage_writer=CasStorageWriter("s3://bucket/run", tag="step-100"))
    dcp.load(state_dict, storage_reader=CasStorageReader("s3://bucket/run", "step-100"))
    dcp.async_save(state_dict, storage_writer=CasStorageWriter(url, tag="step-200")).result()

Every rank stores the shards it writes in a save session of its own (raw contiguous tensor
bytes, chunked and deduplicated as any save: the same tensor bytes get the same chunk ids on
any rank, in any run, and in single-process saves); the coordinator commits one snapshot per
global checkpoint, with the plan's metadata in the tree (no pickle: DCP's planner data is
plain dicts, tuples and strings) and per-rank bytes in the snapshot metadata. Loads reshard:
each rank reads only the chunks that hold the byte ranges it keeps, sorted by pack and offset.
Each rank's chunks are stored as deltas against the same shard of the previous checkpoint of
the same job (same key path, dtype and shape), as single-process saves are.

The coordinator holds the repository lock (shared) from its global plan to its commit, so gc
waits for a distributed save as for any other; the ranks' sessions run under it.
The snapshot tree layout is specified in ``cas/FORMAT.md`` §12.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import os
import threading
import time
import uuid
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from cas.errors import (
    CorruptionError,
    ManifestCorruptError,
    MissingChunkError,
    NotARepositoryError,
    PickleRequiredError,
    RepositoryExistsError,
    SnapshotNotFoundError,
    UsageError,
)
from cas.ids import ChunkId, SnapshotId
from cas.reader import ChunkRead
from cas.reports import Snapshot
from cas.repository import Repository
from cas.saver import Fingerprints
from cas.session import SavedPart, merge_parts
from cas.statedict import byte_view, decode_state
from cas.store import check_tag
from cas.storeview import reconcile, scan_store
from cas.tree import KeyPath, plain_key

__all__ = [
    "CasStorageReader",
    "CasStorageWriter",
    "dcp_info",
    "is_dcp_snapshot",
    "load_unsharded",
]

#: version of the tree layout of a DCP snapshot (FORMAT.md §12)
LAYOUT_VERSION = 1
TENSORS, OBJECTS, PLAN = "tensors", "objects", "dcp"
#: most tensor bytes a rank hands to its session at once (memory stays bounded for GPU shards)
BATCH_BYTES = 512 << 20

RepoLike = Repository | str | os.PathLike[str]

# one opened repository per (location, process): ranks and successive writers share it (its index,
# thread pool and this process's fingerprints of its last shards)
_opened: dict[tuple[str, int], Repository] = {}
_opened_lock = threading.Lock()
#: (repository id, rank) -> (save id, fingerprints of what this process stored for that save)
_last_saves: dict[tuple[str, int], tuple[str, Fingerprints]] = {}


def _open(repo: RepoLike, storage_options: dict[str, Any] | None, create: bool) -> Repository:
    if isinstance(repo, Repository):
        return repo
    where = os.fspath(repo)
    key = (where, os.getpid())
    with _opened_lock:
        opened = _opened.get(key)
        if opened is None:
            try:
                opened = Repository.open(where, storage_options=storage_options)
            except NotARepositoryError:
                if not create:
                    raise
                opened = _create(where, storage_options)
            _opened[key] = opened
        return opened


def _create(where: str, storage_options: dict[str, Any] | None) -> Repository:
    """Create a repository that every rank may be creating at once: one wins, the others open it
    once its config is there."""
    try:
        return Repository.init(where, storage_options=storage_options)
    except (RepositoryExistsError, NotARepositoryError):
        pass
    deadline = time.monotonic() + 60
    while True:
        try:
            return Repository.open(where, storage_options=storage_options)
        except NotARepositoryError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def shard_key(offsets: Any) -> str:
    """The tree key of the shard of a tensor that starts at ``offsets`` (``"[0,128]"``)."""
    return "[" + ",".join(str(int(o)) for o in offsets) + "]"


def _parse_shard_key(key: Any, where: str) -> tuple[int, ...]:
    if not isinstance(key, str) or not key.startswith("[") or not key.endswith("]"):
        raise ManifestCorruptError(f"{where}: shard key {key!r} is malformed")
    body = key[1:-1]
    try:
        return tuple(int(x) for x in body.split(",")) if body else ()
    except ValueError:
        raise ManifestCorruptError(f"{where}: shard key {key!r} is malformed") from None


def is_dcp_snapshot(snap: Snapshot) -> bool:
    """Whether a snapshot was written by :class:`CasStorageWriter` (one global DCP checkpoint)."""
    return isinstance(snap.metadata.get("dcp"), dict)


@dataclasses.dataclass(frozen=True)
class _PlanInfo:
    """What the coordinator tells every rank (``SavePlan.storage_data``)."""

    parent: str | None  # snapshot id (hex) whose shards are delta bases, or None
    parent_save_id: str | None
    save_id: str


@dataclasses.dataclass(frozen=True)
class _Written:
    """``WriteResult.storage_data`` of an item: its key path; the rank's first item carries its part."""

    path: tuple[str, ...]
    part: SavedPart | None = None


class CasStorageWriter(StorageWriter):
    """A DCP ``StorageWriter`` that stores a global checkpoint as one cas snapshot.

    ``repo``: a :class:`Repository` (used as is), or a directory / URL each rank opens itself
    (created if missing). ``tag`` names the snapshot (also settable as DCP's
    ``checkpoint_id``); ``metadata`` is JSON-like user metadata. ``job`` names the training
    job: delta bases come from the newest snapshot of the same job (``parent="latest"``), so
    several jobs share one repository without chaining into each other. ``allow_pickle``
    lets plan metadata that is not plain data be pickled (the same opt-in as ``save``).
    """

    def __init__(
        self,
        repo: RepoLike,
        tag: str | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        job: str | None = None,
        parent: str | None = "latest",
        compression: str | None = None,
        keyframe: bool = False,
        replace: bool = False,
        allow_pickle: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if tag is not None:
            check_tag(tag)
        self._target = repo
        self.tag = tag
        self.metadata = dict(metadata or {})
        self.job = job
        self.parent = parent
        self.compression = compression
        self.keyframe = keyframe
        self.replace = replace
        self.allow_pickle = allow_pickle
        self.storage_options = storage_options
        self.is_coordinator = False
        self.rank = 0
        self._held = contextlib.ExitStack()
        self._info: _PlanInfo | None = None
        #: the snapshot the last ``finish`` committed (on the coordinator)
        self.snapshot: Snapshot | None = None

    def __getstate__(self) -> dict[str, Any]:  # a process-based async save ships the writer
        state = self.__dict__.copy()
        if isinstance(self._target, Repository):
            state["_target"] = self._target.url
        state["_held"] = contextlib.ExitStack()
        return state

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._held.close()

    @property
    def repo(self) -> Repository:
        return _open(self._target, self.storage_options, create=True)

    # StorageWriter ---------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self._release()
        if checkpoint_id is not None:
            tag = os.fspath(checkpoint_id)
            check_tag(tag)
            self.tag = tag
        self._info = None
        self.snapshot = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """A checkpoint id is a cas tag."""
        try:
            check_tag(os.fspath(checkpoint_id))
        except (UsageError, TypeError):
            return False
        return True

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.tag, save_id=self._info.save_id if self._info else None)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        rank = kwargs.get("rank")
        if rank is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.rank = int(rank)
        # every rank opens (and if need be rebuilds or catches up the cache of) the repository now,
        # before the coordinator takes the lock that it holds until the commit: a rank on another
        # host learns of the packs other hosts wrote (the parent's nodes among them)
        repo = self.repo
        if not repo.store.is_local and repo._unknown_packs():
            repo._reconcile()

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        repo = self.repo
        if self.tag is not None and not self.replace and repo.store.has_ref(self.tag):
            raise UsageError(f"tag {self.tag!r} already names a snapshot; pick another tag or `rm` it first")
        parent = self._parent(repo)
        # from here to the commit gc waits: the ranks' new packs are unreferenced until then
        self._held.enter_context(repo.store.lock(exclusive=False))
        if parent is not None and not repo.store.has_ref(parent.ref):
            parent = None  # forgotten meanwhile: keyframes
        dcp_meta = parent.metadata.get("dcp") if parent is not None else None
        parent_save = dcp_meta.get("save_id") if isinstance(dcp_meta, dict) else None
        self._info = _PlanInfo(parent.id if parent is not None else None,
                               parent_save if isinstance(parent_save, str) else None, uuid.uuid4().hex)
        return [dataclasses.replace(p, storage_data=self._info) for p in plans]

    def _parent(self, repo: Repository) -> Snapshot | None:
        if self.parent is None or self.keyframe:
            return None
        if self.parent != "latest":
            return repo.resolve(self.parent)
        same_job = [s for s in repo.snapshots() if is_dcp_snapshot(s) and s.metadata["dcp"].get("job") == self.job]
        return same_job[-1] if same_job else None

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        info = plan.storage_data
        if not isinstance(info, _PlanInfo):
            raise UsageError("this save plan was not prepared by CasStorageWriter.prepare_global_plan")
        repo = self.repo
        try:
            results = self._write(repo, info, plan, planner)
        except MissingChunkError:
            # the cache lags (another host committed meanwhile): catch up and go once more. Without
            # taking the lock: the coordinator holds it for this save, and a rank queueing for it
            # behind a waiting gc would wait for ever (gc waits for the coordinator)
            if not repo._unknown_packs():
                raise
            reconcile(repo.index, scan_store(repo.store))
            repo.reader.clear_cache()
            results = self._write(repo, info, plan, planner)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _write(self, repo: Repository, info: _PlanInfo, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
        cache_key = (str(repo.config["repository_id"]), self.rank)
        last = _last_saves.get(cache_key)
        previous = None
        if last is not None and info.parent is not None and last[0] == info.parent_save_id:
            previous = (SnapshotId.from_hex(info.parent), last[1])
        results: list[WriteResult] = []
        parts: list[SavedPart] = []
        # the coordinator holds the lock for everyone (a rank taking it too could queue behind a
        # waiting gc that waits for the coordinator)
        parent = SnapshotId.from_hex(info.parent) if info.parent is not None else None
        with repo.session(parent, compression=self.compression, keyframe=self.keyframe, lock=False,
                          fingerprints=previous, label=self.rank) as session:
            batch: list[tuple[KeyPath, Any]] = []
            held = 0
            for item in plan.items:
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    value: Any = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
                    path: tuple[str, ...] = (OBJECTS, item.index.fqn)
                    size = len(value)
                else:
                    value = _plain_tensor(data)
                    if item.tensor_data is None:
                        raise UsageError(f"write item {item.index.fqn} has no tensor data")
                    path = (TENSORS, item.index.fqn, shard_key(item.tensor_data.chunk.offsets))
                    size = value.numel() * value.element_size()
                batch.append((path, value))
                results.append(WriteResult(index=item.index, size_in_bytes=size, storage_data=_Written(path)))
                held += size
                if held >= BATCH_BYTES:
                    parts.append(session.store_items(batch, allow_pickle=self.allow_pickle))
                    batch, held = [], 0
            if batch or not parts:
                parts.append(session.store_items(batch, allow_pickle=self.allow_pickle))
            session.finish()  # durable and indexed before the coordinator can commit
            fingerprints = session.fingerprints
        _last_saves[cache_key] = (info.save_id, fingerprints)
        part = merge_parts(parts, session.id, label=self.rank)
        if results:
            results[0] = dataclasses.replace(results[0], storage_data=_Written(results[0].storage_data.path, part))
        return results

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        repo = self.repo
        info = self._info
        try:
            if info is None:
                raise UsageError("finish before prepare_global_plan")
            parts = [w.storage_data.part for rank_results in results for w in rank_results
                     if isinstance(w.storage_data, _Written) and w.storage_data.part is not None]
            ranks = [{"rank": p.label, "bytes_added": p.bytes_added, "logical_bytes": p.logical_bytes,
                      "tensors": p.tensor_count} for p in parts]
            user = {k: v for k, v in self.metadata.items() if k != "dcp"}
            snap_meta = {**user, "dcp": {"version": LAYOUT_VERSION, "world_size": len(results), "job": self.job,
                                         "save_id": info.save_id, "ranks": ranks}}
            parent = SnapshotId.from_hex(info.parent) if info.parent is not None else None
            with repo.session(parent, keyframe=True, lock=False) as session:
                plan_part = session.store_items([((PLAN,), _plan_value(metadata))], allow_pickle=self.allow_pickle)
                self.snapshot = session.commit([*parts, plan_part], self.tag, snap_meta, replace=self.replace)
        finally:
            self._release()

    def _release(self) -> None:
        self._held.close()
        self._held = contextlib.ExitStack()


def _plain_tensor(data: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    if isinstance(data, DTensor):
        data = data.to_local()
    if not isinstance(data, torch.Tensor):
        raise UsageError(f"a tensor write item resolved to a {type(data).__name__}")
    t = data.detach()
    if type(t) is not torch.Tensor:
        t = t.as_subclass(torch.Tensor)
    return t


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _plan_value(metadata: Metadata) -> dict[str, Any]:
    """The global plan's metadata as plain data (no pickle): per tensor its properties and global
    size (its shards are the tree's), the byte items, DCP's planner data and version."""
    tensors: dict[str, Any] = {}
    objects: list[str] = []
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            p = md.properties
            tensors[fqn] = {
                "dtype": _dtype_name(p.dtype), "shape": [int(d) for d in md.size],
                "requires_grad": bool(p.requires_grad), "pin_memory": bool(p.pin_memory),
                "layout": str(p.layout).removeprefix("torch."),
                "memory_format": str(p.memory_format).removeprefix("torch."),
            }
        else:
            objects.append(fqn)
    return {"version": LAYOUT_VERSION, "tensors": tensors, "objects": objects,
            "planner_data": metadata.planner_data, "torch_version": metadata.version}


# ---------------------------------------------------------------------------- reading


def _pairs(enc: Any, where: str) -> dict[Any, Any]:
    if not isinstance(enc, list) or not enc or enc[0] != "d":
        raise ManifestCorruptError(f"{where}: expected a dict")
    return {plain_key(k): v for k, v in enc[1]}


@dataclasses.dataclass
class _Layout:
    """A DCP snapshot's tree, parsed: shards per tensor, byte items, the plan."""

    snap: Snapshot
    chunk_size: int
    shards: dict[str, dict[tuple[int, ...], list[Any]]]
    objects: dict[str, list[Any]]
    plan: dict[str, Any]


def _layout(repo: Repository, snapshot: str, allow_pickle: bool = False) -> _Layout:
    snap = repo.resolve(snapshot)
    if not is_dcp_snapshot(snap):
        raise UsageError(f"snapshot {snap.short_id} was not written by CasStorageWriter (no DCP layout)")
    root, storages, node = repo._tree(snap)
    name = f"snapshot {snap.short_id}"
    top = _pairs(root, name)
    shards: dict[str, dict[tuple[int, ...], list[Any]]] = {}
    for fqn, per in _pairs(top.get(TENSORS, ["d", []]), name).items():
        shards[str(fqn)] = {_parse_shard_key(k, name): v for k, v in _pairs(per, f"{name}, {fqn}").items()}
    objects = {str(k): v for k, v in _pairs(top.get(OBJECTS, ["d", []]), name).items()}
    if PLAN not in top:
        raise ManifestCorruptError(f"{name} has no DCP plan metadata")

    def read_blob(chunks: list[ChunkId], path: KeyPath) -> bytes:
        return b"".join(repo.reader.read(c, f"{name}, {'/'.join(map(str, path))}") for c in chunks)

    plan = decode_state(top[PLAN], storages, allow_pickle=allow_pickle, read_blob=read_blob, name=name,
                        chunk_size=node.chunk_size or None).value
    if not isinstance(plan, dict) or not isinstance(plan.get("tensors"), dict):
        raise ManifestCorruptError(f"{name}: the DCP plan metadata is malformed")
    return _Layout(snap, node.chunk_size or repo.chunk_size, shards, objects, plan)


def _dtype(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ManifestCorruptError(f"{where}: unknown dtype {name!r}")
    return dtype


def _metadata_of(layout: _Layout) -> Metadata:
    sd: dict[str, Any] = {}
    storage: dict[MetadataIndex, tuple[str, tuple[int, ...]]] = {}
    where = f"snapshot {layout.snap.short_id}"
    for fqn, props in layout.plan["tensors"].items():
        chunks = []
        for offsets, enc in sorted(layout.shards.get(fqn, {}).items()):
            if enc[0] != "T":
                raise ManifestCorruptError(f"{where}: shard {fqn}{shard_key(offsets)} is not a plain tensor")
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(int(d) for d in enc[2])))
            storage[MetadataIndex(fqn, offsets)] = (fqn, offsets)
        layout_kind = getattr(torch, str(props.get("layout", "strided")), torch.strided)
        memory_format = getattr(torch, str(props.get("memory_format", "contiguous_format")), torch.contiguous_format)
        properties = TensorProperties(
            dtype=_dtype(str(props["dtype"]), where), layout=layout_kind, requires_grad=bool(props["requires_grad"]),
            memory_format=memory_format, pin_memory=bool(props["pin_memory"]),
        )
        sd[fqn] = TensorStorageMetadata(properties=properties, size=torch.Size(props["shape"]), chunks=chunks)
    for fqn in layout.plan.get("objects", []):
        sd[fqn] = BytesStorageMetadata()
        storage[MetadataIndex(fqn)] = (fqn, ())
    return Metadata(
        state_dict_metadata=sd, planner_data=layout.plan.get("planner_data"), storage_data=storage,
        storage_meta=StorageMeta(checkpoint_id=layout.snap.tag, save_id=layout.snap.metadata["dcp"].get("save_id")),
        version=layout.plan.get("torch_version"),
    )


def _chunk_runs(shape: tuple[int, ...], itemsize: int, offsets: tuple[int, ...], lengths: tuple[int, ...],
                chunk_size: int) -> list[tuple[int, int]]:
    """Runs ``[a, b)`` of chunk indices of a row-major tensor of ``shape`` that hold the region at
    ``offsets`` of ``lengths``: only those are read (a column strip reads the chunks its rows touch)."""
    total = int(np.prod(shape, dtype=np.int64)) * itemsize if shape else itemsize
    count = -(-total // chunk_size)
    if total == 0 or any(n == 0 for n in lengths):
        return []
    if not shape:
        return [(0, count)]
    strides = [1] * len(shape)
    for j in range(len(shape) - 2, -1, -1):
        strides[j] = strides[j + 1] * shape[j + 1]
    k = len(shape) - 1
    while k > 0 and offsets[k] == 0 and lengths[k] == shape[k]:
        k -= 1  # dims after k are whole: runs are contiguous across them
    starts = np.array([offsets[k] * strides[k]], dtype=np.int64)
    for j in range(k):
        steps = np.arange(offsets[j], offsets[j] + lengths[j], dtype=np.int64) * strides[j]
        starts = (starts[None, :] + steps[:, None]).ravel()
    run = lengths[k] * strides[k]
    first = starts * itemsize // chunk_size
    last = ((starts + run) * itemsize - 1) // chunk_size
    mark = np.zeros(count + 1, dtype=np.int64)
    np.add.at(mark, first, 1)
    np.add.at(mark, last + 1, -1)
    need = np.cumsum(mark)[:-1] > 0
    edges = np.flatnonzero(np.diff(np.concatenate(([0], need.astype(np.int8), [0]))))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


class _ShardRead:
    """One region of a stored shard, read into a buffer (or straight into its target)."""

    def __init__(self, repo: Repository, layout: _Layout, fqn: str, offsets: tuple[int, ...],
                 region: tuple[tuple[int, ...], tuple[int, ...]], dest: torch.Tensor | None) -> None:
        enc = layout.shards[fqn][offsets]
        where = f"snapshot {layout.snap.short_id}, tensor {fqn}{shard_key(offsets)}"
        if enc[0] != "T":
            raise ManifestCorruptError(f"{where} is not a plain tensor")
        self.dtype = _dtype(str(enc[1]), where)
        self.shape = tuple(int(d) for d in enc[2])
        chunks = [ChunkId(enc[3][i:i + 32]) for i in range(0, len(enc[3]), 32)]
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        nbytes = int(np.prod(self.shape, dtype=np.int64)) * itemsize if self.shape else itemsize
        self.region = region
        whole = region[0] == (0,) * len(self.shape) and region[1] == self.shape
        self.direct = (dest is not None and whole and dest.device.type == "cpu" and dest.dtype == self.dtype
                       and dest.is_contiguous() and dest.numel() * itemsize == nbytes)
        if self.direct and dest is not None:
            self.buf = dest.detach()
            view = byte_view(self.buf) if nbytes else memoryview(b"")
        else:
            self.buf = torch.empty(nbytes, dtype=torch.uint8)
            view = byte_view(self.buf)
        self.reads: list[ChunkRead] = []
        cs = layout.chunk_size
        for a, b in _chunk_runs(self.shape, itemsize, *region, cs):
            self.reads += repo.reader.plan(view[a * cs:min(b * cs, nbytes)], chunks[a:b], where)
        self.bytes_read = sum(len(r.dest) for r in self.reads)

    def tensor(self) -> torch.Tensor:
        """The region, once the reads ran."""
        if self.direct:
            return self.buf
        t = self.buf.view(self.dtype).view(self.shape)
        for dim, (start, length) in enumerate(zip(*self.region, strict=True)):
            t = t.narrow(dim, start, length)
        return t


class CasStorageReader(StorageReader):
    """A DCP ``StorageReader`` for a snapshot written by :class:`CasStorageWriter`.

    Loads reshard: any world size, any placement; each rank reads (verified) only the chunks
    that hold what it keeps, in one parallel pass sorted by pack and offset.
    ``snapshot``: a tag, an id, or ``latest`` (also settable as DCP's ``checkpoint_id``).
    ``allow_pickle``: plan metadata that the writer pickled (its own opt-in) may be unpickled.
    """

    def __init__(self, repo: RepoLike, snapshot: str = "latest", *, allow_pickle: bool = False,
                 storage_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self._target = repo
        self.snapshot = snapshot
        self.allow_pickle = allow_pickle
        self.storage_options = storage_options
        self._layout: _Layout | None = None
        self.is_coordinator = False
        #: bytes of chunks this rank read in its last ``read_data``
        self.bytes_read = 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if isinstance(self._target, Repository):
            state["_target"] = self._target.url
        state["_layout"] = None
        return state

    @property
    def repo(self) -> Repository:
        return _open(self._target, self.storage_options, create=False)

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.snapshot = os.fspath(checkpoint_id)
        self._layout = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """A checkpoint id is a tag, a snapshot id (prefix) or ``latest``."""
        text = os.fspath(checkpoint_id)
        if not isinstance(text, str):
            return False
        if text == "latest":
            return True
        try:
            check_tag(text)
        except UsageError:
            return len(text) >= 4 and all(c in "0123456789abcdef" for c in text.lower())
        return True

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        repo = self.repo

        def run() -> _Layout:
            with repo.store.lock(exclusive=False):
                return _layout(repo, self.snapshot, self.allow_pickle)

        self._layout = repo._with_index_recovery(run)
        return _metadata_of(self._layout)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        # every rank must read the snapshot the coordinator planned with ("latest" may move)
        snap_id = self._layout.snap.id if self._layout is not None else None
        return [dataclasses.replace(p, storage_data=snap_id) for p in plans]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        layout = self._layout
        if layout is None:
            raise UsageError("read_data before read_metadata")
        if plan.storage_data is not None and plan.storage_data != layout.snap.id:
            raise SnapshotNotFoundError(
                f"{self.snapshot!r} named snapshot {str(plan.storage_data)[:12]} on the coordinator and "
                f"{layout.snap.short_id} here (a save moved it meanwhile); load by tag or id"
            )
        repo = self.repo

        def run() -> None:
            with repo.store.lock(exclusive=False):  # gc waits: it cannot move chunks under a load
                self._read(repo, layout, plan.items, planner)

        repo._with_index_recovery(run)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read(self, repo: Repository, layout: _Layout, items: list[ReadItem], planner: LoadPlanner) -> None:
        jobs: list[tuple[ReadItem, torch.Tensor, _ShardRead]] = []
        reads: list[ChunkRead] = []
        for item in items:
            fqn = item.storage_index.fqn
            where = f"snapshot {layout.snap.short_id}, {fqn}"
            if item.type == LoadItemType.BYTE_IO:
                enc = layout.objects.get(fqn)
                if enc is None:
                    raise ManifestCorruptError(f"{where}: no such byte item")
                planner.load_bytes(item, io.BytesIO(_object_bytes(repo, enc, where)))
                continue
            offsets = tuple(int(o) for o in (item.storage_index.offset or ()))
            if offsets not in layout.shards.get(fqn, {}):
                raise ManifestCorruptError(f"{where}: no shard at {shard_key(offsets)}")
            target = planner.resolve_tensor(item).detach()
            region = (tuple(int(o) for o in item.storage_offsets), tuple(int(n) for n in item.lengths))
            shard = _ShardRead(repo, layout, fqn, offsets, region, target)
            jobs.append((item, target, shard))
            reads += shard.reads
        repo.reader.run(reads, repo.pool)
        self.bytes_read = sum(len(r.dest) for r in reads)
        for item, target, shard in jobs:
            if not shard.direct:
                src = shard.tensor()
                if target.size() != src.size():
                    raise ManifestCorruptError(f"{item.storage_index.fqn}: region {list(src.size())} does not fit "
                                               f"the target {list(target.size())}")
                target.copy_(src)
            planner.commit_tensor(item, target)


def _object_bytes(repo: Repository, enc: list[Any], where: str) -> bytes:
    if enc[0] == "y":
        return bytes(enc[1])
    if enc[0] == "Y":
        raw = enc[1]
        return b"".join(repo.reader.read(ChunkId(raw[i:i + 32]), where) for i in range(0, len(raw), 32))
    raise ManifestCorruptError(f"{where}: a byte item is stored as {enc[0]!r}")


# ---------------------------------------------------------------------------- whole-state views


def dcp_info(repo: Repository, snapshot: str = "latest") -> dict[str, Any]:
    """What ``cas show`` lists for a DCP snapshot: per fully qualified name its dtype, global shape,
    shards and bytes; the byte items; per-rank bytes (from the manifest, no data read)."""
    layout = _layout(repo, snapshot)
    tensors = []
    for fqn, props in layout.plan["tensors"].items():
        itemsize = torch.empty(0, dtype=_dtype(str(props["dtype"]), fqn)).element_size()
        shape = [int(d) for d in props["shape"]]
        tensors.append({"fqn": fqn, "dtype": props["dtype"], "shape": shape, "shards": len(layout.shards.get(fqn, {})),
                        "nbytes": int(np.prod(shape, dtype=np.int64)) * itemsize})
    return {"tensors": tensors, "objects": list(layout.plan.get("objects", [])),
            "world_size": layout.snap.metadata["dcp"].get("world_size"),
            "ranks": layout.snap.metadata["dcp"].get("ranks", [])}


def load_unsharded(repo: Repository, snapshot: str = "latest", *, allow_pickle: bool = False,
                   nested: bool = True) -> dict[str, Any]:
    """The whole, unsharded state of a DCP snapshot on CPU: every tensor assembled from its shards
    (every chunk verified), byte items unpickled by ``torch.load`` (``weights_only`` unless
    ``allow_pickle``). ``nested``: keys as the saved state dict had them (DCP's flattening undone
    from its planner data); else flat fully qualified names."""
    def run() -> dict[str, Any]:
        with repo.store.lock(exclusive=False):
            return _unsharded(repo, snapshot, allow_pickle, nested)

    out: dict[str, Any] = repo._with_index_recovery(run)
    return out


def _unsharded(repo: Repository, snapshot: str, allow_pickle: bool, nested: bool) -> dict[str, Any]:
    layout = _layout(repo, snapshot, allow_pickle)
    where = f"snapshot {layout.snap.short_id}"
    flat: dict[str, Any] = {}
    pieces: list[tuple[torch.Tensor, tuple[int, ...], _ShardRead]] = []
    reads: list[ChunkRead] = []
    for fqn, props in layout.plan["tensors"].items():
        shape = tuple(int(d) for d in props["shape"])
        full = torch.empty(shape, dtype=_dtype(str(props["dtype"]), where))
        covered = 0
        for offsets, enc in layout.shards.get(fqn, {}).items():
            sizes = tuple(int(d) for d in enc[2])
            dest = full
            for dim, (start, length) in enumerate(zip(offsets, sizes, strict=True)):
                dest = dest.narrow(dim, start, length)
            shard = _ShardRead(repo, layout, fqn, offsets, ((0,) * len(sizes), sizes), dest)
            pieces.append((dest, offsets, shard))
            reads += shard.reads
            covered += int(np.prod(sizes, dtype=np.int64)) if sizes else 1
        if covered != (int(np.prod(shape, dtype=np.int64)) if shape else 1):
            raise ManifestCorruptError(f"{where}: the shards of {fqn} do not cover its {list(shape)} elements")
        flat[fqn] = full
    repo.reader.run(reads, repo.pool)
    for dest, _offsets, shard in pieces:
        if not shard.direct:
            dest.copy_(shard.tensor())
    for fqn, enc in layout.objects.items():
        data = _object_bytes(repo, enc, f"{where}, {fqn}")
        try:
            flat[fqn] = torch.load(io.BytesIO(data), weights_only=not allow_pickle)
        except Exception as exc:  # noqa: BLE001 - unpickling raises whatever the object raises
            if not allow_pickle:
                raise PickleRequiredError(
                    f"{fqn} in {where} is a pickled object that torch's safe loader refuses ({exc}); pass "
                    "allow_pickle=True (cas restore --allow-pickle) for snapshots you trust"
                ) from None
            raise CorruptionError(f"{fqn} in {where} does not unpickle: {exc}") from None
    mapping = layout.plan.get("planner_data")
    if not nested or not isinstance(mapping, dict) or not all(isinstance(v, tuple) for v in mapping.values()):
        return flat
    out: dict[str, Any] = {}
    for fqn, value in flat.items():
        path = mapping.get(fqn, (fqn,))
        _set(out, path, value)
    return out


def _set(root: dict[Any, Any], path: tuple[Any, ...], value: Any) -> None:
    cursor: Any = root
    for key, nxt in itertools.pairwise(path):
        if isinstance(cursor, list):
            while len(cursor) <= key:
                cursor.append(None)
            if cursor[key] is None:
                cursor[key] = [] if isinstance(nxt, int) else {}
            cursor = cursor[key]
        else:
            cursor = cursor.setdefault(key, [] if isinstance(nxt, int) else {})
    if isinstance(cursor, list):
        while len(cursor) <= path[-1]:
            cursor.append(None)
    cursor[path[-1]] = value

