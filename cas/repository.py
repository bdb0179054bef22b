"""The engine: ties the store, packs, index and manifests into save / load / verify / diff."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from cas import dr, tiering
from cas.arguments import check_names, check_public_kwargs
from cas.check import CheckReport, check_repository
from cas.codec import check_compression, codec_name
from cas.errors import (
    AmbiguousSnapshotError,
    ArchivedError,
    ChunkCorruptError,
    CorruptionError,
    FormatVersionError,
    IndexCorruptError,
    KeyNotFoundError,
    ManifestCorruptError,
    MissingChunkError,
    NotARepositoryError,
    PreconditionFailedError,
    ShapeMismatchError,
    SnapshotNotFoundError,
    TagExistsError,
    UsageError,
)
from cas.gc import GcReport, collect_garbage
from cas.ids import ChunkId, PackId, SnapshotId, hash_bytes
from cas.index import Index, IndexContents, SealedPack, drop_env, encode_location, read_in_child
from cas.layout import Store, create_store
from cas.manifest import SnapshotNode, check_metadata, unpack_node
from cas.pack import ChunkKind, PackEntry
from cas.reach import snapshot_label
from cas.reader import ChunkRead, ChunkReader
from cas.reports import DiffReport, Problem, RebuildReport, Snapshot, StatsReport, VerifyReport
from cas.retention import ForgetReport, RetentionPolicy, apply_policy, metric_of
from cas.saver import Fingerprints, PackSinks, chain_extremes, link_cost
from cas.session import SavedPart, SaveSession
from cas.store import CHUNK_SIZE_MAX as MAX_CHUNK_SIZE
from cas.store import CHUNK_SIZE_MIN as MIN_CHUNK_SIZE
from cas.store import MAX_DELTA_DEPTH_LIMIT, check_tag, validate_config
from cas.storeview import reconcile, scan_store
from cas.tree import (
    GLOB_CHARS,
    KeyPath,
    base_candidates,
    dir_entries,
    drop_paths,
    file_entries,
    format_path,
    is_files_tree,
    leaf_nbytes,
    plain_key,
    select_paths,
    subtree,
    tensor_leaves,
)
from cas.verify import verify_repository

if TYPE_CHECKING:
    import torch

# torch is imported by the functions that need it (save, load, load_into) through cas.statedict,
# so listing, verify, gc and the CLI's read-only commands start without it.

DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB: see FORMAT.md for the measurement behind it
DEFAULT_PACK_SIZE = 64 << 20
DEFAULT_MAX_DELTA_DEPTH = 8
DEFAULT_MAX_CHAIN_COST = 2.0  # a chunk at the end of its chain restores in at most ~2x a keyframe
Progress = Callable[[int, int], None]
log = logging.getLogger("cas")
T = TypeVar("T")


def _default_threads() -> int:
    return max(1, os.cpu_count() or 1)


class Repository:
    """A cas repository on local disk. Use ``Repository.init`` or ``Repository.open``."""

    def __init__(
        self, store: Store, config: dict[str, Any], threads: int | None = None, *, check_index: bool = False
    ) -> None:
        self._store = store
        self.config = config
        #: where the repository is: a directory, or an object-store URL (``s3://BUCKET/PREFIX``)
        self.url = store.url
        #: the local directory: the repository itself, or for a remote one its cache (index, temp packs)
        self.path = store.local_dir
        self._threads = threads or _default_threads()
        self._pool: ThreadPoolExecutor | None = None
        self._fingerprints: tuple[SnapshotId, Fingerprints] | None = None  # of this process's last save
        self.last_rebuild: RebuildReport | None = None
        self._probed = False  # conditional writes of a remote store checked (at the first save)
        #: regions, failover, sync and tiers (``cas.topology``); set from the store by ``open``
        self.topology = dr.default_topology(store.url)
        self._dr = dr.DrState(store.backend)
        self._last_replication: dr.ReplicationReport | None = None
        self._old_index: IndexContents | None = None  # read in a child: what rebuild learns from
        damaged_index = False
        if check_index:  # a walk of every page; what it holds is read only if a rebuild needs it
            walk = read_in_child(store.index_dir, contents=False)
            if walk.damage is None:
                self._old_index = None  # sound: nothing to keep (a rebuild reads it again)
            else:
                self._old_index = read_in_child(store.index_dir)  # what it still holds, for the rebuild
                self._old_index.damage = self._old_index.damage or walk.damage
                log.warning("cas: the index at %s is damaged (%s); rebuilding it from the packs",
                            store.index_dir, self._old_index.damage)
                self.index = self._fresh_index()
                damaged_index = True
        if not damaged_index:
            try:
                self.index = Index(store.index_dir)
            except IndexCorruptError as exc:
                log.warning("cas: %s; rebuilding it from the packs", exc)
                self.index = self._fresh_index()
                damaged_index = True
        self.reader = ChunkReader(store, self.index)
        try:
            self._check_index(damaged_index)
        except BaseException:
            self.close()
            raise

    def _fresh_index(self) -> Index:
        """Move a damaged index aside (it is a cache: the previous damaged copy goes) and start anew."""
        index_dir = self._store.index_dir
        drop_env(index_dir)
        aside = index_dir.with_name("index.damaged")
        if aside.exists():
            shutil.rmtree(aside, ignore_errors=True)
        if index_dir.exists():
            os.replace(index_dir, aside)
        index_dir.mkdir()
        return Index(index_dir)

    def _check_index(self, rebuild: bool) -> None:
        """Detect a lost, stale or damaged index at open: it is rebuilt or brought in line, never acted on.

        Lost (empty while packs exist) or unreadable: rebuilt from the packs. Stale (it names
        packs that are gone, as an old copy put back after a gc would): brought in line with the
        packs. Packs it does not know yet are normal (a save in flight has not committed) and are
        taken in by gc, check and rebuild, or when a read misses.
        """
        on_disk = set(self._store.list_packs())
        try:
            if not rebuild:
                rebuild = self.index.chunk_count() == 0 and bool(on_disk)
            stale = not rebuild and bool(set(self.index.packs()) - on_disk)
        except IndexCorruptError as exc:  # rebuild reads what it still holds in a child, then replaces it
            log.warning("cas: %s; rebuilding it from the packs", exc)
            rebuild, stale = True, False
        if rebuild:
            self.rebuild_index()
        elif stale:
            self._reconcile()

    def _replace_index(self) -> Index:
        self.index.close()
        return self._fresh_index()

    def _reconcile(self) -> bool:
        """Bring the index in line with the packs (under the shared lock: savers may go on, gc may not)."""
        with self._store.lock(exclusive=False):
            return reconcile(self.index, scan_store(self._store)).changed

    def _unknown_packs(self) -> bool:
        known = self.index.packs()
        return any(pid not in known for pid in self._store.list_packs())

    # lifecycle ------------------------------------------------------------
    @classmethod
    def init(
        cls,
        path: str | os.PathLike[str],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        pack_size: int = DEFAULT_PACK_SIZE,
        compression: str = "default",
        max_delta_depth: int = DEFAULT_MAX_DELTA_DEPTH,
        max_chain_cost: float = DEFAULT_MAX_CHAIN_COST,
        threads: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> Repository:
        """Create a repository in a new or empty directory, or under an empty object-store prefix.

        ``path`` is a directory or a URL: ``file:///dir``, ``s3://BUCKET/PREFIX`` (credentials,
        endpoint and region from the ``AWS_*`` environment variables or ``storage_options``:
        endpoint, region, access_key_id, secret_access_key, timeout).
        ``max_delta_depth``: most delta links below a chunk (0: no deltas).
        ``max_chain_cost``: most estimated restore time of a chunk at the end of its
        chain, in keyframe restores (dense deltas count ~0.45 each, sparse ones little).
        """
        if not isinstance(max_delta_depth, int) or not 0 <= max_delta_depth <= MAX_DELTA_DEPTH_LIMIT:
            raise UsageError(f"max_delta_depth must be an integer from 0 to {MAX_DELTA_DEPTH_LIMIT}")
        if not isinstance(max_chain_cost, (int, float)) or not 1.0 <= max_chain_cost < float("inf"):
            raise UsageError("max_chain_cost must be a finite number of at least 1.0 (keyframe restores)")
        if not isinstance(chunk_size, int) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size % 16:
            raise UsageError(
                f"chunk size {chunk_size} must be a multiple of 16 between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes"
            )
        if not isinstance(pack_size, int) or pack_size < chunk_size:
            raise UsageError(f"pack size {pack_size} must be at least the chunk size {chunk_size}")
        check_compression(compression)
        store, config = create_store(
            path, storage_options, {"chunk_size": chunk_size, "pack_size": pack_size, "compression": compression,
                                    "max_delta_depth": max_delta_depth, "max_chain_cost": float(max_chain_cost)}
        )
        repo = cls(store, config, threads)
        repo.topology = dr.default_topology(store.url, storage_options)
        repo._dr.primary_options = dict(storage_options or {})
        return repo

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, threads: int | None = None, storage_options: dict[str, Any] | None = None,
        check_index: bool = False,
    ) -> Repository:
        """Open an existing repository (a directory or a URL, as ``init``); a clear error if it is not one.

        ``check_index=True`` first reads the whole local index in a child process, and rebuilds
        it from the packs if that fails: LMDB trusts its pages, and a damaged one can kill the
        process that reads it (SIGBUS). ``cas check``, ``gc``, ``verify`` and ``index rebuild``
        open this way; it costs one pass over the index.
        """
        store, config, topology, state = dr.open_repository_store(path, storage_options)
        try:
            repo = cls(store, config, threads, check_index=check_index)
        except BaseException:
            state.close()
            raise
        repo.topology = topology
        repo._dr = state
        return repo

    def close(self) -> None:
        self._dr.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.index.close()
        self._store.backend.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="cas")
        return self._pool

    @property
    def store(self) -> Store:
        """Where packs, refs and temp files live (for the repository's own modules: gc, check, verify)."""
        return self._store

    @property
    def splits_metadata(self) -> bool:
        """Version 2 repositories keep manifest nodes in packs of their own (``.meta``)."""
        return int(self.config["version"]) >= 2

    @property
    def codes_zero_runs(self) -> bool:
        """Version 3 repositories may code a mostly-zero plane as zero runs (plane mode 2)."""
        return int(self.config["version"]) >= 3

    def pack_sinks(self, prefix: str) -> PackSinks:
        """Where new chunks go: packs sealed at the configured size, nodes apart from data (version 2)."""
        return PackSinks(lambda: self._store.new_temp_path(prefix), self._store.publish_pack,
                         int(self.config["pack_size"]), split=self.splits_metadata)

    @property
    def chunk_size(self) -> int:
        return int(self.config["chunk_size"])

    @property
    def max_delta_depth(self) -> int:
        """Longest delta chain a save may build (0: no deltas); see FORMAT.md for the measurement."""
        return int(self.config.get("max_delta_depth", DEFAULT_MAX_DELTA_DEPTH))

    @property
    def max_chain_cost(self) -> float:
        """Most estimated restore time of a chunk at the end of its delta chain, in keyframe restores."""
        return float(self.config.get("max_chain_cost", DEFAULT_MAX_CHAIN_COST))

    # save ------------------------------------------------------------------
    def save(
        self,
        state_dict: Any,
        tag: str | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        allow_pickle: bool = False,
        compression: str | None = None,
        parent: str | None = "latest",
        keyframe: bool = False,
        replace: bool = False,
        rehash: bool = False,
        progress: Progress | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> Snapshot:
        """Store ``state_dict`` as a new snapshot; only chunks not already stored are written.

        ``before_commit`` is called once every chunk is stored, before anything is committed;
        an exception from it aborts the save (for sources that can change while they are read:
        ``cas save`` of files checks that none changed).

        ``parent`` (default: the latest snapshot) is recorded in the manifest and is where
        delta bases come from; ``keyframe=True`` stores no chunk as a delta (chains restart).
        ``replace=True`` moves an existing tag to the new snapshot in one atomic rename (the
        old snapshot stays tagged until the new one is committed; gc frees it later).
        A child of this process's previous save takes the ids of chunks whose XXH3-128
        fingerprint did not change without a BLAKE3 pass (FORMAT.md §4); ``rehash=True``
        hashes every chunk (for tensors from a source that might craft XXH3 collisions).
        """
        snap = self._with_index_recovery(lambda: self._save(
            state_dict, tag, metadata, allow_pickle=allow_pickle, compression=compression, parent=parent,
            keyframe=keyframe, replace=replace, rehash=rehash, progress=progress, before_commit=before_commit,
        ))
        dr.after_save(self, snap)
        return snap

    def _save(
        self,
        state_dict: Any,
        tag: str | None,
        metadata: dict[str, Any] | None,
        *,
        allow_pickle: bool,
        compression: str | None,
        parent: str | None,
        keyframe: bool,
        replace: bool,
        rehash: bool,
        progress: Progress | None,
        before_commit: Callable[[], None] | None = None,
    ) -> Snapshot:
        if not self._store.is_local and not self._probed:
            # a store that accepts conditional writes and ignores them would break tags: refused here
            self._store.backend.probe_conditional_writes()
            self._probed = True
        ref_version: str | None = None  # the tag's version when it is moved: the ref write is a compare-and-swap
        if tag is not None:
            check_tag(tag)
            ref_version = self._store.ref_version(tag)
            if not replace and ref_version is not None:
                raise TagExistsError(f"tag {tag!r} already names a snapshot; pick another tag or `rm` it first")
        metadata = dict(metadata or {})
        check_metadata(metadata)
        compression = compression or str(self.config.get("compression", "default"))
        check_compression(compression)
        with self.session(parent, compression=compression, keyframe=keyframe, rehash=rehash) as session:
            part = session.store(state_dict, allow_pickle=allow_pickle, progress=progress)
            if before_commit is not None:
                before_commit()
            return session.commit([part], tag, metadata, replace=replace, ref_version=ref_version)

    def session(
        self,
        parent: str | SnapshotId | None = "latest",
        *,
        compression: str | None = None,
        keyframe: bool = False,
        rehash: bool = False,
        lock: bool = True,
        fingerprints: tuple[SnapshotId | None, Fingerprints] | None = None,
        label: int | None = None,
    ) -> SaveSession:
        """A save session: stores chunks and subtrees (``store``, ``store_items``) and returns what it
        wrote as :class:`SavedPart` values; ``finish`` makes them durable and indexed without a
        ref, ``commit`` turns parts (its own and other sessions') into a snapshot (``save`` is
        one session that commits its one part).

        ``parent`` (a snapshot spec or id, or None) is where delta bases come from and what the
        snapshot records. The session holds the repository lock shared until it is finished
        (so gc waits for it); ``lock=False`` when the caller holds it for the whole save.
        ``fingerprints``: (snapshot, fingerprints) of the save the caller made before (defaults to
        this process's last save); applied only to a child of that snapshot (FORMAT.md §4).
        """
        compression = compression or str(self.config.get("compression", "default"))
        check_compression(compression)
        previous = None if rehash else (fingerprints or self._fingerprints)
        return SaveSession(self, parent, compression=compression, keyframe=keyframe, previous=previous,
                           lock=lock, label=label, rehash=rehash)

    def commit(
        self,
        parts: list[SavedPart],
        tag: str | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        parent: str | None = "latest",
        replace: bool = False,
        lock: bool = True,
    ) -> Snapshot:
        """One snapshot of parts that save sessions stored and finished (possibly in other processes):
        their trees merged into one tree node, a snapshot node, the ref written atomically.
        ``lock=False`` when the caller holds the repository lock (shared) across the sessions and
        this commit, as a distributed save does."""
        if tag is not None:
            check_tag(tag)
            if not replace and self._store.has_ref(tag):
                raise TagExistsError(f"tag {tag!r} already names a snapshot; pick another tag or `rm` it first")
        with self.session(parent, keyframe=True, lock=lock) as session:
            return session.commit(parts, tag, metadata, replace=replace)

    def _parent_id(self, parent: str | None) -> SnapshotId | None:
        """The snapshot a save names as its parent: ``latest`` is the newest readable one, and none
        when every snapshot is damaged (the save then stores keyframes; a warning says why)."""
        if parent is None or not self._store.ref_names():
            return None
        try:
            return self._resolve_id(parent)
        except SnapshotNotFoundError:
            if parent != "latest":
                raise
            log.warning("cas: no snapshot can be read; this save has no parent and stores keyframes")
            return None

    def _delta_parent(self, parent_id: SnapshotId) -> tuple[SnapshotId | None, Any]:
        """The snapshot a save takes delta bases from, and its base map: the parent, or when its
        manifest cannot be read, the nearest intact ancestor (a warning says so), or none
        (keyframes): a damaged snapshot never blocks the saves after it. Bases whose chunks are
        damaged are skipped one by one as the save reads them."""
        cursor: SnapshotId | None = parent_id
        for _ in range(16):
            if cursor is None:
                break
            try:
                root, storages, node = self._tree_of(cursor)
                if cursor != parent_id:
                    log.warning("cas: snapshot %s is damaged; this save deltas against its ancestor %s",
                                parent_id.short(), cursor.short())
                return cursor, base_candidates(root, storages, f"snapshot {cursor.short()}")
            except (CorruptionError, FormatVersionError) as exc:
                log.warning("cas: snapshot %s cannot be a delta parent (%s)", cursor.short(), exc)
                try:
                    node = self._snapshot_node(cursor)
                except (CorruptionError, FormatVersionError):
                    break
                cursor = SnapshotId(node.parent) if node.parent is not None else None
        log.warning("cas: no intact parent snapshot; this save stores keyframes")
        return None, None

    # snapshots ----------------------------------------------------------------
    def _snapshot_node(self, snap_id: SnapshotId) -> SnapshotNode:
        """The snapshot node, from the index's cache when its bytes hash to the id, else from its pack."""
        name = f"snapshot {snap_id.short()}"
        raw = self.index.snapshot_node(snap_id)
        if raw is not None and hash_bytes(raw) != snap_id:
            log.warning("cas: the index's copy of %s is damaged; reading it from its pack", name)
            raw = None
            fixed = self.reader.read(snap_id, name)
            self.index.apply(put_snapshots=[(snap_id, fixed)])
            return SnapshotNode.decode(fixed, name)
        if raw is None:
            try:
                raw = self.reader.read(snap_id, name)
            except MissingChunkError:
                # another machine (or a replication round) stored it since this cache last looked
                if not self._unknown_packs() or not self._reconcile():
                    raise
                self.reader.clear_cache()
                raw = self.reader.read(snap_id, name)
        return SnapshotNode.decode(raw, name)

    @staticmethod
    def _snapshot(ref: str, snap_id: SnapshotId, node: SnapshotNode) -> Snapshot:
        # the tag is the ref's name (a retagged snapshot keeps the tag it was saved with in its node)
        tag = node.tag if ref == snap_id.hex() or ref == node.tag else ref
        return Snapshot(
            id=snap_id.hex(), tag=None if ref == snap_id.hex() else tag, time=node.time_ns / 1e9,
            parent=None if node.parent is None else node.parent.hex(), metadata=node.metadata,
            logical_bytes=node.logical_bytes, bytes_added=node.bytes_added, tensor_count=node.tensor_count, ref=ref,
        )

    def snapshots(self) -> list[Snapshot]:
        """Every snapshot a ref points to, oldest first. A snapshot whose node cannot be read is left
        out with a warning (``damaged_snapshots`` lists them): one damaged snapshot never hides
        the others."""
        for attempt in (0, 1):
            snaps = []
            missing: list[tuple[str, CorruptionError | FormatVersionError]] = []
            for name, sid in self.refs():
                try:
                    snaps.append(self._snapshot(name, sid, self._snapshot_node(sid)))
                except (CorruptionError, FormatVersionError) as exc:
                    missing.append((name, exc))
            # a node the index does not know while the store holds packs it does not know: the cache
            # lags (another machine saved, an old copy was put back), not damage
            if (attempt == 0 and any(isinstance(e, MissingChunkError) for _, e in missing)
                    and self._unknown_packs() and self._reconcile()):
                continue
            break
        for name, problem in missing:
            if self._store.has_ref(name):
                log.warning("cas: snapshot %s is damaged and left out (%s); `cas check` says more", name, problem)
            # else: forgotten (and collected) by another process while we listed
        return sorted(snaps, key=lambda s: (s.time, s.id))

    def damaged_snapshots(self) -> list[tuple[str, str]]:
        """(ref, what is wrong) of every snapshot whose ref or node cannot be read."""
        out = []
        for name in self._store.ref_names():
            try:
                self._snapshot_node(self._store.read_ref(name))
            except FileNotFoundError:
                continue
            except (CorruptionError, FormatVersionError) as exc:
                out.append((name, str(exc)))
        return out

    def refs(self) -> list[tuple[str, SnapshotId]]:
        """(name, snapshot id) of every ref; a ref removed while we list them is skipped, a damaged
        one is left out with a warning."""
        refs = []
        for name in self._store.ref_names():
            try:
                refs.append((name, self._store.read_ref(name)))
            except FileNotFoundError:
                continue
            except CorruptionError as exc:
                log.warning("cas: %s", exc)
        return refs

    def _resolve_id(self, spec: str) -> SnapshotId:
        return SnapshotId.from_hex(self.resolve(spec).id)

    def resolve(self, spec: str) -> Snapshot:
        """A snapshot by tag, full id, unique id prefix (4+ hex digits), or ``latest``."""
        if not isinstance(spec, str) or not spec:
            raise UsageError(f"snapshot must be a tag, an id or 'latest', not {spec!r}")
        if spec == "latest":
            snaps = self.snapshots()
            if not snaps:
                raise SnapshotNotFoundError("the repository has no snapshots yet, so there is no 'latest'")
            return snaps[-1]
        lowered = spec.lower()
        is_hex = all(c in "0123456789abcdef" for c in lowered)
        if "/" not in spec and spec not in (".", "..") and self._store.has_ref(spec):
            sid = self._store.read_ref(spec)
            if is_hex and len(lowered) >= 4 and sid.hex() != lowered:
                # an all-hex tag never shadows an id prefix: both meanings must agree
                others = {other for _name, other in self.refs() if other.hex().startswith(lowered) and other != sid}
                if others:
                    raise AmbiguousSnapshotError(
                        f"{spec!r} is both a tag and the id prefix of {len(others)} other snapshot(s); "
                        "give more id digits, or rename the tag with `cas tag`"
                    )
            return self._snapshot(spec, sid, self._snapshot_node(sid))
        if len(lowered) >= 4 and is_hex:
            matches = {sid: name for name, sid in self.refs() if sid.hex().startswith(lowered)}
            if len(matches) == 1:
                sid, name = next(iter(matches.items()))
                return self._snapshot(name, sid, self._snapshot_node(sid))
            if len(matches) > 1:
                raise AmbiguousSnapshotError(f"id prefix {spec!r} matches {len(matches)} snapshots; give more digits")
        if is_hex and len(lowered) < 4:
            raise SnapshotNotFoundError(
                f"no snapshot tagged {spec!r}; an id prefix needs at least 4 hex digits (try `cas ls` for tags and ids)"
            )
        raise SnapshotNotFoundError(f"no snapshot named {spec!r} (try `cas ls` for tags and ids)")

    def delete(self, spec: str) -> Snapshot | None:
        """Drop the ref of a snapshot; its chunks are freed by a later GC.

        A tag (or an id) that names a ref is dropped without reading the snapshot, so a damaged
        snapshot can always be given up; then the returned value is None if its node is unreadable.
        """
        if spec == "latest":
            raise UsageError("refusing to delete 'latest': name the snapshot by its tag or id")
        if isinstance(spec, str) and "/" not in spec and spec not in (".", "..") and self._store.has_ref(spec):
            try:
                snap: Snapshot | None = self.resolve(spec)
            except (CorruptionError, FormatVersionError):
                snap = None
            self._store.delete_ref(spec)
            return snap
        resolved = self.resolve(spec)
        self._store.delete_ref(resolved.ref)
        return resolved

    def retag(self, spec: str, new_tag: str) -> Snapshot:
        """Give a snapshot the tag ``new_tag`` in place of its tag (or of its id ref, if untagged).

        The new ref is created first (create-only: a tag that names a snapshot is refused),
        then the old one is dropped, so a crash between leaves the snapshot under both names.
        """
        check_tag(new_tag)
        snap = self.resolve(spec)
        if snap.ref == new_tag:
            return snap
        sid = SnapshotId.from_hex(snap.id)
        if self._store.has_ref(new_tag):
            raise TagExistsError(f"tag {new_tag!r} already names a snapshot; pick another tag or `rm` it first")
        try:
            self._store.write_ref(new_tag, sid, create=True)
        except PreconditionFailedError:
            raise TagExistsError(f"tag {new_tag!r} was just created by another process") from None
        self._store.delete_ref(snap.ref)
        return self._snapshot(new_tag, sid, self._snapshot_node(sid))

    # load ------------------------------------------------------------------
    def _tree(self, snap: Snapshot) -> tuple[Any, list[Any], SnapshotNode]:
        return self._tree_of(SnapshotId.from_hex(snap.id))

    def _tree_of(self, snap_id: SnapshotId) -> tuple[Any, list[Any], SnapshotNode]:
        node = self._snapshot_node(snap_id)
        name = f"tree of snapshot {snap_id.short()}"
        tree = unpack_node(self.reader.read(node.tree, name), "tree", name, chunk_size=node.chunk_size or None)
        if "root" not in tree or not isinstance(tree.get("storages"), list):
            raise ManifestCorruptError(f"{name} is malformed")
        return tree["root"], tree["storages"], node

    def _read_blob(self, snap: Snapshot) -> Callable[[list[ChunkId], KeyPath], bytes]:
        def read(chunks: list[ChunkId], path: KeyPath) -> bytes:
            where = f"snapshot {snap.short_id}, tensor {format_path(path)}"
            return b"".join(self.reader.read(c, where) for c in chunks)
        return read

    def _fill(self, snap: Snapshot, decoded: Any, progress: Progress | None) -> None:
        reads: list[ChunkRead] = []
        for job in decoded.fills:
            where = f"snapshot {snap.short_id}, tensor {format_path(job.path)}"
            reads.extend(self.reader.plan(job.dest, job.chunks, where))
        total = sum(len(r.dest) for r in reads)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        self.reader.run(reads, self.pool, advance)

    def load(
        self,
        snapshot: str = "latest",
        *,
        keys: str | tuple[Any, ...] | list[str | tuple[Any, ...]] | None = None,
        dtype: torch.dtype | None = None,
        allow_pickle: bool = False,
        progress: Progress | None = None,
    ) -> Any:
        """The state dict of a snapshot, every chunk verified against its id.

        ``keys``: load only these parts (only their chunks are read). Each key is a
        '/'-separated key path (``"model"``, ``"optim/state"``), a prefix that ends at a
        ``.`` or ``/`` boundary (``"model.layers.0"`` selects ``model.layers.0.weight`` in a
        flat state dict), or a glob (``"*.bias"``); the result keeps the selected values at
        their places (``load(s, keys=["model"])["model"]``); a list holding a selected value
        comes whole; a tuple is an exact key path (``("files", "a/b.pt")``, for keys that hold
        a ``/``). A key that selects nothing is :class:`KeyNotFoundError`.
        ``dtype``: floating-point tensors (and arrays stay as they are) come back cast to it.
        """
        from cas.statedict import cast_floats, decode_state  # noqa: PLC0415 - torch only when loading

        wanted = _key_list(keys)
        if dtype is not None:
            cast_floats(None, dtype)  # a dtype that is not a torch.dtype fails before anything is read

        def run() -> Any:
            with self._store.lock(exclusive=False):  # gc waits: it cannot move chunks under a load
                snap = self.resolve(snapshot)
                root, storages, node = self._tree(snap)
                if wanted is not None:
                    root = self._select(snap, root, wanted)
                decoded = decode_state(
                    root, storages, allow_pickle=allow_pickle, read_blob=self._read_blob(snap),
                    name=f"snapshot {snap.short_id}", chunk_size=node.chunk_size or None,
                )
                self._fill(snap, decoded, progress)
                return decoded.value

        value = self._with_index_recovery(run, snapshot)
        return cast_floats(value, dtype) if dtype is not None else value

    def _select(self, snap: Snapshot, root: Any, keys: list[Any]) -> Any:
        pruned, unmatched = select_paths(root, keys, f"snapshot {snap.short_id}")
        if unmatched:
            top = sorted({format_path(p[:1]) for p, _ in tensor_leaves(root)})[:8]
            raise KeyNotFoundError(
                f"snapshot {snap.short_id} has no key {unmatched[0]!r}"
                + (f" (top-level keys with tensors: {', '.join(top)})" if top else "")
            )
        return pruned

    def _with_index_recovery(self, run: Callable[[], T], snapshot: str | None = None) -> T:
        """Run ``run``; if it fails on the index (a damaged entry, or a chunk missing while the packs
        hold more than the index knows: a stale or lost index), bring the index in line with the
        packs and run it once more. The index is a cache: its gaps are never the last word.
        A chunk copy that does not verify (now recorded damaged) is read once more when bringing the
        index in line re-points it at another copy. A load of ``snapshot`` that meets archived data
        says which packs need a restore request."""
        try:
            try:
                return run()
            except ArchivedError as exc:
                if snapshot is None:
                    raise
                raise tiering.explain_archived(self, snapshot, exc) from None
        except IndexCorruptError as exc:
            log.warning("cas: %s; rebuilding the index from the packs", exc)
            self.rebuild_index()
        except MissingChunkError:
            if not self._unknown_packs() or not self._reconcile():
                raise
        except ChunkCorruptError as exc:
            # the read recorded the damaged copy: another copy in the store (a save here or on another
            # machine wrote the chunk again) serves once the index is brought in line (FORMAT.md §5)
            if exc.copy is None or not self._reconcile():
                raise
        self.reader.clear_cache()
        return run()

    def load_into(
        self,
        target: Any,
        snapshot: str = "latest",
        *,
        key: str | None = None,
        strict: bool = True,
        cast: bool = False,
        allow_pickle: bool = False,
        progress: Progress | None = None,
    ) -> Any:
        """Fill the tensors of a module or state dict in place from a snapshot.

        ``key`` picks a part of the snapshot ('/'-separated, e.g. ``"model"`` when the
        snapshot holds ``{"model": ..., "optim": ...}``). Shapes and dtypes must match
        (checked before any byte is written); with ``cast=True`` a floating-point tensor of
        another dtype is converted to the target's. With ``strict`` (default) the names must
        match too and the target is returned; with ``strict=False`` only the tensors both
        have are filled (no other chunk is read) and the result is a :class:`LoadResult`
        with ``missing_keys`` (in the target, not in the snapshot) and ``unexpected_keys``,
        as ``torch.nn.Module.load_state_dict`` reports them. Non-tensor values of a dict
        target are replaced by the snapshot's.

        An optimizer, LR scheduler or anything else with ``state_dict``/``load_state_dict``
        gets the snapshot part (``key``) through its own ``load_state_dict``, so an optimizer
        that has not stepped yet is filled too; any other target is a :class:`UsageError`.
        """
        import torch  # noqa: PLC0415 - torch only when loading

        if not isinstance(target, (torch.nn.Module, dict)):
            if callable(getattr(target, "load_state_dict", None)) and callable(getattr(target, "state_dict", None)):
                return self._load_stateful(target, snapshot, key, allow_pickle, progress)
            raise UsageError(
                f"load_into fills an nn.Module, a state dict, or an object with load_state_dict (an optimizer, "
                f"an LR scheduler), not a {type(target).__module__}.{type(target).__qualname__}; "
                "use load() for anything else"
            )

        def run() -> Any:
            with self._store.lock(exclusive=False):  # gc waits: it cannot move chunks under a load
                return self._load_into(target, snapshot, key, strict, cast, allow_pickle, progress)

        return self._with_index_recovery(run, snapshot)

    def _load_stateful(
        self, target: Any, snapshot: str, key: str | None, allow_pickle: bool, progress: Progress | None
    ) -> Any:
        what = type(target).__qualname__
        state = self.load(snapshot, keys=[key.strip("/")] if key else None, allow_pickle=allow_pickle,
                          progress=progress)
        if key:
            for part in key.strip("/").split("/"):
                state = state[part] if isinstance(state, dict) else state[int(part)]
        try:
            target.load_state_dict(state)
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as exc:
            hint = ""
            if key is None and isinstance(state, dict):
                fits = [k for k, v in state.items() if isinstance(v, dict) and "state" in v and "param_groups" in v]
                if fits:
                    hint = f"; the snapshot's {fits[0]!r} entry is an optimizer state: pass key={fits[0]!r}"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ShapeMismatchError(
                f"snapshot {self.resolve(snapshot).short_id} does not fit the {what}: {first}{hint}"
            ) from None
        return target

    def _load_into(
        self, target: Any, snapshot: str, key: str | None, strict: bool, cast: bool, allow_pickle: bool,
        progress: Progress | None,
    ) -> Any:
        import torch  # noqa: PLC0415 - torch only when loading

        from cas.statedict import LoadResult, collect_targets, decode_state  # noqa: PLC0415
        snap = self.resolve(snapshot)
        root, storages, snap_node = self._tree(snap)
        full_root = root
        if key:
            try:
                root = subtree(root, tuple(key.strip("/").split("/")), f"snapshot {snap.short_id}")
            except KeyError as exc:
                raise KeyNotFoundError(str(exc.args[0])) from None
        targets = collect_targets(target)
        stored = {path: enc for path, enc in tensor_leaves(root) if enc[0] in ("T", "V")}
        problems = []
        unexpected = [p for p in stored if p not in targets]
        missing = [p for p in targets if p not in stored]
        for path, enc in stored.items():
            t = targets.get(path)
            shape = [int(d) for d in enc[2]]
            if t is None:
                if strict:
                    problems.append(f"{format_path(path)} is in the snapshot but not in the target")
                continue
            dtype = str(t.dtype).removeprefix("torch.")
            castable = cast and t.dtype.is_floating_point and _is_float_name(enc[1])
            if list(t.shape) != shape or (dtype != enc[1] and not castable):
                problems.append(f"{format_path(path)}: snapshot has {enc[1]}{shape}, target has {dtype}{list(t.shape)}")
        if strict:
            problems += [f"{format_path(p)} is in the target but not in the snapshot" for p in missing]
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            listed = "; ".join(problems[:5]) + more
            hint = "" if key else _key_hint(full_root, targets)
            raise ShapeMismatchError(f"snapshot {snap.short_id} does not fit the target: {listed}{hint}")
        if unexpected:  # strict=False: what the target does not hold is not read
            root = drop_paths(root, set(unexpected), f"snapshot {snap.short_id}")
        decoded = decode_state(
            root, storages, allow_pickle=allow_pickle, read_blob=self._read_blob(snap),
            name=f"snapshot {snap.short_id}", targets=targets, chunk_size=snap_node.chunk_size or None,
        )
        self._fill(snap, decoded, progress)
        with torch.no_grad():
            for dest, src in decoded.copies:
                dest.copy_(src)
        if isinstance(target, dict) and isinstance(decoded.value, dict):
            _merge_values(target, decoded.value)
        if strict:
            return target
        return LoadResult([format_path(p) for p in missing], [format_path(p) for p in unexpected])

    def tensors(self, snapshot: str = "latest") -> list[dict[str, Any]]:
        """Every tensor/array leaf of a snapshot: path, dtype, shape, bytes (from the manifest; no data read)."""
        snap = self.resolve(snapshot)
        root, _storages, _ = self._tree(snap)
        return [
            {"path": format_path(path), "kind": "array" if enc[0] == "A" else "tensor", "dtype": str(enc[1]),
             "shape": [int(d) for d in enc[2]], "nbytes": leaf_nbytes(enc), "shared_storage": enc[0] == "V"}
            for path, enc in tensor_leaves(root)
        ]

    def files(self, snapshot: str = "latest") -> list[dict[str, Any]] | None:
        """The files and directories of a byte-exact file backup (``cas save FILE_OR_DIR``), from the
        manifest (no data read): ``kind`` ("file" or "dir"), ``path``, ``mode``, ``mtime_ns``, and for
        files ``size``, ``format``, ``tensors`` (how many) and, for the second and later names of a
        hard-linked file, ``link`` (the first name's path); None for a snapshot that is not one."""
        snap = self.resolve(snapshot)
        root, _storages, _ = self._tree(snap)
        if not is_files_tree(root):
            return None
        name = f"snapshot {snap.short_id}"
        out = []
        for kind, rels in (("file", file_entries(root, name)), ("dir", dir_entries(root, name))):
            for rel in rels:
                enc = subtree(root, ("files" if kind == "file" else "dirs", rel), name)
                fields = {plain_key(k, name): v for k, v in enc[1]} if enc[0] == "d" else {}
                info: dict[str, Any] = {"kind": kind, "path": rel}
                for field in ("mode", "mtime_ns", *(("size",) if kind == "file" else ())):
                    value = fields.get(field)
                    info[field] = value[1] if isinstance(value, list) and len(value) == 2 and value[0] == "i" else None
                    if info[field] is None:
                        raise ManifestCorruptError(f"{name}: {kind} {rel!r} has no integer {field}")
                if kind == "file":
                    fmt = fields.get("format")
                    info["format"] = bytes(fmt[1]).decode() if isinstance(fmt, list) and fmt[0] == "s" else None
                    tensors = fields.get("tensors")
                    info["tensors"] = len(tensors[1]) if isinstance(tensors, list) and tensors[0] == "d" else 0
                    link = fields.get("link")  # a hard link of that earlier path (absent: none)
                    if isinstance(link, list) and link[0] == "s":
                        info["link"] = bytes(link[1]).decode()
                out.append(info)
        return out

    # diff / stats / verify ----------------------------------------------------
    def diff(self, a: str, b: str) -> DiffReport:
        """Tensors added, removed, changed and unchanged from snapshot ``a`` to ``b``.

        Equal bytes are unchanged whatever the layout: a tensor that shares a storage (tied
        weights) and one that does not compare by their own elements. Only a view that covers
        part of its storage is read (both sides of that path) to compare with ``torch.equal``;
        everything else is decided from the manifests.
        """
        sa, sb = self.resolve(a), self.resolve(b)
        leaves_a, values_a = _fingerprints(*self._tree(sa)[:2])
        leaves_b, values_b = _fingerprints(*self._tree(sb)[:2])
        report = DiffReport(a=sa.id, b=sb.id)
        for path, (key, nbytes, exact, kpath) in leaves_b.items():
            if path not in leaves_a:
                report.added.append(path)
                continue
            key_a, _n, exact_a, kpath_a = leaves_a[path]
            same = key_a == key
            if not same and not (exact and exact_a) and key_a[1:3] == key[1:3]:  # a partial view: read both
                same = self._same_tensor(sa, kpath_a, sb, kpath)
            if same:
                report.unchanged.append(path)
            else:
                report.changed.append(path)
                report.changed_bytes += nbytes
        report.removed = [p for p in leaves_a if p not in leaves_b]
        report.values_changed = [
            p for p in sorted(set(values_a) | set(values_b)) if values_a.get(p) != values_b.get(p)
        ]
        return report

    def _same_tensor(self, sa: Snapshot, path_a: KeyPath, sb: Snapshot, path_b: KeyPath) -> bool:
        import torch  # noqa: PLC0415 - only for views that cover part of their storage

        def one(snap: Snapshot, path: KeyPath) -> Any:
            value = self.load(snap.id, keys=[path])
            for k in path:
                value = value[k]
            return value

        ta, tb = one(sa, path_a), one(sb, path_b)
        return bool(ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(ta, tb))

    def stats(self) -> StatsReport:
        return self._with_index_recovery(self._stats)

    def _stats(self) -> StatsReport:
        snaps = self.snapshots()
        unique = 0
        chunks = 0
        codecs: dict[str, dict[str, int]] = {}
        bases: dict[bytes, tuple[bytes | None, float]] = {}  # chunk -> (delta base, cost of its own link)
        for cid, loc in self.index.iter_chunks():
            if loc.kind == ChunkKind.DATA:  # logical bytes count tensor data only, so must this
                unique += loc.raw_length
            chunks += 1
            row = codecs.setdefault(codec_name(loc.codec), {"chunks": 0, "raw_bytes": 0, "stored_bytes": 0})
            row["chunks"] += 1
            row["raw_bytes"] += loc.raw_length
            row["stored_bytes"] += loc.stored_length
            if loc.base_id is not None:
                bases[cid] = (loc.base_id, link_cost(loc.codec, loc.stored_length, loc.raw_length,
                                                     zero_runs=self.codes_zero_runs))
        depth, cost = chain_extremes(bases)
        packs = self.index.packs()
        stored = sum(size for size, _count in packs.values())
        per = [
            {"id": s.id, "tag": s.tag, "time": s.time, "logical_bytes": s.logical_bytes, "bytes_added": s.bytes_added}
            for s in snaps
        ]
        return StatsReport(
            snapshot_count=len(snaps), logical_bytes=sum(s.logical_bytes for s in snaps), unique_bytes=unique,
            stored_bytes=stored, chunk_count=chunks, pack_count=len(packs), per_snapshot=per,
            codecs=codecs, deepest_chain=depth, costliest_chain=cost,
        )

    def verify(
        self, read_data: bool = False, progress: Progress | None = None, snapshots: list[str] | None = None,
        *, record: bool = False,
    ) -> VerifyReport:
        """Check refs, manifests and chunks (re-hashing every chunk with ``read_data``).

        ``snapshots`` limits the check to those snapshots (tags or ids) and the packs they use.
        Verify changes nothing, unless ``record``: then the outcome of a whole-repository verify
        is kept in the store (``status/verify.json``) for ``cas serve``'s metrics.
        """
        only = {self.resolve(s).id for s in snapshots} if snapshots is not None else None
        with self._store.reading_the_store() if read_data else contextlib.nullcontext():
            report = self._with_index_recovery(
                lambda: verify_repository(self, read_data=read_data, progress=progress, only=only))
            if read_data:
                self._verify_file_backups(report, only)
        if record and only is None:
            dr.record_verify(self, report.ok, read_data, len(report.problems))
        return report

    def _verify_file_backups(self, report: VerifyReport, only: set[str] | None) -> None:
        """Every file of every file backup whose chunks verified is rebuilt in order and checked
        against its stored size and SHA-256 (chunks can verify while the file they make does not:
        a file that changed while an older cas read it)."""
        from cas.filebytes import PartLoader, file_problem  # noqa: PLC0415 - torch only for file backups

        damaged = {p.snapshot for p in report.problems if p.snapshot}
        for name, sid in self.refs():
            if (only is not None and sid.hex() not in only) or snapshot_label(name, sid) in damaged:
                continue  # already reported: its chunks do not verify
            try:
                root, _storages, _ = self._tree(self.resolve(sid.hex()))
                if not is_files_tree(root):
                    continue
                where = f"snapshot {name} ({sid.short()})"
                load = PartLoader(self, sid.hex())
                for rel in file_entries(root, where):
                    problem = file_problem(load, rel, f"{where}, file {rel}")
                    if problem is not None:
                        report.problems.append(Problem("corrupt-file", problem, snapshot=snapshot_label(name, sid),
                                                       tensor=f"files/{rel}"))
            except (CorruptionError, FormatVersionError) as exc:
                report.problems.append(Problem("corrupt-file", f"{name}: {exc}", snapshot=snapshot_label(name, sid)))

    def last_verify(self) -> dict[str, Any] | None:
        """When the last whole-repository verify ran (any host), whether it was clean, how deep."""
        return dr.last_verify(self)

    # retention and gc ---------------------------------------------------------
    def retention_policy(self) -> RetentionPolicy | None:
        """The policy stored in the repository config (applied by ``forget()`` with no rules)."""
        stored = self.config.get("retention")
        return RetentionPolicy.from_dict(stored) if stored else None

    def set_retention_policy(self, policy: RetentionPolicy | None = None, **rules: Any) -> RetentionPolicy | None:
        """Store a retention policy in the config (``None`` and no rules clears it)."""
        if policy is None and rules:
            policy = _retention_policy("set_retention_policy", rules)
        with self._store.lock(exclusive=False):
            config = self._reload_config()
            if policy is None or policy.empty:
                config.pop("retention", None)
            else:
                config["retention"] = policy.to_dict()
            self._store.write_config(config)
            self.config = config
        return policy

    def _reload_config(self) -> dict[str, Any]:
        raw = self._store.read_config_bytes()
        if raw is None:
            raise NotARepositoryError(f"{self._store.describe()}: config.json is gone")
        try:
            config = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NotARepositoryError(f"{self._store.describe()}: config.json is unreadable: {exc}") from None
        return validate_config(config, self.path / "config.json")

    def forget(self, *, dry_run: bool = False, **rules: Any) -> ForgetReport:
        """Apply retention rules (union; see ``RetentionPolicy``) and drop the refs of the rest.

        Keyword arguments are named after the CLI flags: keep_last, keep_hourly, keep_daily,
        keep_weekly, keep_monthly, keep_yearly, keep_within ("36h", "2w"), keep_tag (patterns),
        keep_best with metric and mode ("min"/"max"), keep_every_steps. With no rules, the
        policy stored in the config applies. Space returns with ``gc()``.
        """
        policy = _retention_policy("forget", rules) if rules else self.retention_policy()
        if policy is None:
            raise UsageError("no retention rule given and none stored in the repository config")
        snaps = self.snapshots()
        if policy.keep_best and snaps and all(metric_of(s, policy.metric or "") is None for s in snaps):
            # ranking on a metric no snapshot has would keep none of them: most likely a misspelt name
            present = sorted({k for s in snaps for k in _metric_names(s)})
            raise UsageError(f"keep_best: no snapshot has a metric {policy.metric!r}, so nothing would be kept by it; "
                             f"metrics saved: {', '.join(present) or 'none'}. Nothing was removed")
        reasons, removed = apply_policy(snaps, policy)
        report = ForgetReport(dry_run=dry_run)
        report.kept = [(s, reasons[s.id]) for s in snaps if s.id in reasons]
        report.removed = removed
        if not dry_run:
            for snap in removed:
                self._store.delete_ref(snap.ref)
        return report

    def gc(self, *, repack_below: float = 0.5, dry_run: bool = False) -> GcReport:
        """Delete what no snapshot reaches; repack packs whose live share is under ``repack_below``."""
        return self._with_index_recovery(
            lambda: collect_garbage(self, repack_below=repack_below, dry_run=dry_run))

    def check(self, *, repair: bool = False) -> CheckReport:
        """Find damaged packs; with ``repair``, keep what is readable and unindex what is lost."""
        heal = dr.heal_sources(self) if repair else []
        with self._store.reading_the_store():  # the store's bytes are judged, not this machine's cached copies
            return self._with_index_recovery(lambda: check_repository(self, repair=repair, heal_from=heal))

    # disaster recovery: replicas, sync, failover, tiers ------------------------
    def add_replica(
        self,
        name: str,
        url: str | os.PathLike[str],
        *,
        storage_options: dict[str, Any] | None = None,
        region: str | None = None,
        active: bool = True,
        weight: float = 0.0,
    ) -> dr.RegionSpec:
        """Add a replica (another region's copy of this repository): a path or ``s3://`` URL of an
        empty location, or of a replica of this repository. Nothing is copied until
        :meth:`replicate` (or ``cas replicate``) runs. Credentials in ``storage_options`` are used
        by this process only; the stored topology keeps the endpoint, region and timeout."""
        return dr.add_replica(self, name, os.fspath(url), storage_options=storage_options, region=region,
                              active=active, weight=weight)

    def replicas(self) -> list[dr.RegionSpec]:
        """The replicas in the topology (the primary is ``topology.primary``)."""
        return list(self.topology.replicas.values())

    def remove_replica(self, name: str) -> dr.RegionSpec:
        """Forget a replica (its store is left as it is)."""
        return dr.remove_replica(self, name)

    def replicate(self, batch_size: int | None = None) -> dr.ReplicationReport:
        """One sync round: every object a replica lacks is copied (packs, index objects, metadata,
        refs last), at most ``batch_size`` objects per batch; resumable, never re-sending."""
        return dr.replicate(self, batch_size)

    def replication_lag(self) -> dict[str, dict[str, Any]]:
        """Per replica: snapshots and bytes it does not hold yet, and the oldest one's age."""
        return dr.lag(self)

    def set_failover(
        self,
        health_check_interval: float = 30,
        failure_threshold: int = 3,
        recovery_threshold: int = 2,
        auto_failover: bool = True,
    ) -> dr.FailoverSettings:
        """Health-check every region each ``health_check_interval`` seconds; after
        ``failure_threshold`` consecutive failures of the serving region, reads and writes move
        to the healthiest active replica by weight; after ``recovery_threshold`` successes of
        the primary, it catches up and serves again."""
        return dr.set_failover(self, health_check_interval=health_check_interval,
                               failure_threshold=failure_threshold, recovery_threshold=recovery_threshold,
                               auto_failover=auto_failover)

    def set_sync(self, **settings: Any) -> dr.SyncSettings:
        """``mode`` ("async" or "sync": save returns once every active replica holds the
        snapshot), ``interval`` (seconds between ``cas replicate`` rounds), ``batch_size``."""
        return dr.set_sync(self, **settings)

    @property
    def region(self) -> str:
        """The region serving reads and writes now."""
        return dr.region_name(self)

    def health(self) -> dict[str, Any]:
        """Each region's state, consecutive failures and successes, last error; the serving
        region, the failover epoch and every transition so far."""
        return dr.health(self)

    def set_tiers(self, tiers: list[Any]) -> list[dr.TierSpec]:
        """Storage tiers by age, hottest first: dicts ``{"name", "url", "retention",
        "storage_class"}`` (retention "7d", "30d", seconds, or "indefinite"). The first tier is
        this repository's own store; :meth:`migrate_tiers` moves data packs by age."""
        return dr.set_tiers(self, tiers)

    def migrate_tiers(self, *, now: float | None = None, dry_run: bool = False) -> tiering.TierReport:
        """Move every data pack to the tier its age calls for (copied and checked before the
        source copy is removed); ``now`` replaces the clock (seconds since the epoch)."""
        return tiering.migrate(self, now=now, dry_run=dry_run)

    def tier_status(self) -> dict[str, Any]:
        """Packs and bytes per tier."""
        return tiering.status(self)

    def warmup(self, snapshot: str = "latest", *, wait: bool = True, timeout: float = 12 * 3600.0,
               poll: float = 5.0, days: int = 1) -> list[str]:
        """Request a restore of the snapshot's archived packs; with ``wait``, until they are readable."""
        return tiering.warmup(self, snapshot, days=days, wait=wait, timeout=timeout, poll=poll)

    def apply_config(self, text: str) -> dr.Topology:
        """Apply a topology YAML document (regions, failover, sync, tiers; any subset)."""
        return dr.apply_config(self, text)

    def show_config(self) -> str:
        """The topology as YAML (the shape ``apply_config`` reads)."""
        return self.topology.to_yaml()

    # index recovery -----------------------------------------------------------
    def _write_nodes(self, nodes: dict[bytes, bytes]) -> list[SealedPack]:
        """Write verified manifest nodes into a new pack (durable before this returns)."""
        sink = self.pack_sinks("nodes")
        try:
            for cid, node in nodes.items():
                sink.add(ChunkId(cid), ChunkKind.NODE, 0, node, len(node))
            return sink.finish()
        except BaseException:
            sink.abort()
            raise

    def _store_nodes(self, nodes: dict[bytes, bytes]) -> None:
        """Write verified manifest nodes into a new pack and index them (what a recovery found only
        in a cache goes back into the store, so it no longer depends on the cache)."""
        self.index.commit(self._write_nodes(nodes), replace=set(nodes))
        log.warning("cas: %d snapshot nodes found only in the index cache were stored again", len(nodes))

    def _read_index_here(self) -> IndexContents:
        """What ``read_in_child`` reads, read in this process (no child could be started)."""
        out = IndexContents([], {}, None)
        try:
            out.records = [(bytes(cid), encode_location(cid, loc)) for cid, loc in self.index.iter_chunks()]
        except IndexCorruptError as exc:
            out.damage = str(exc)
        try:
            for sid in self.index.snapshot_ids():
                node = self.index.snapshot_node(sid)
                if node is not None:
                    out.snapshot_nodes[sid] = node
        except IndexCorruptError as exc:
            out.damage = out.damage or str(exc)
        return out

    def _unreadable_nodes(self, nodes: dict[bytes, bytes]) -> dict[bytes, bytes]:
        out = {}
        for sid, node in nodes.items():
            try:
                self.reader.read(ChunkId(sid), "rebuild")
            except (CorruptionError, FormatVersionError, IndexCorruptError):
                out[sid] = node
        return out

    def rebuild_index(self) -> RebuildReport:
        """Recreate the index from pack footers and snapshot nodes.

        For every chunk the copy whose delta chain resolves to a keyframe is indexed (a dead
        delta whose base gc collected is never preferred to an intact copy elsewhere). Packs
        whose footer does not check stay on disk, and what in them still verifies is indexed
        where it lies; the report lists them (`cas check --repair` salvages them).

        The old index is read by a child process first (a damaged LMDB page can kill its
        reader): what it still holds serves as hints, and snapshot nodes only its cache holds
        are stored again. When it is damaged it is moved aside, never written or cleared.
        """
        with self._store.lock(exclusive=True):
            self.reader.clear_cache()
            view = scan_store(self._store)
            old, self._old_index = self._old_index, None
            moved_aside = old is not None and old.damage is not None  # at open: this index is new and empty
            if old is None or not moved_aside:
                old = read_in_child(self.index.path)
                if not old.read:
                    old = self._read_index_here()
            hints: dict[PackId, list[PackEntry]] = {}
            for cid, loc in old.locations(set(view.unreadable)):  # what the old index knew of damaged packs
                hints.setdefault(loc.pack_id, []).append(PackEntry(
                    cid, loc.offset, loc.stored_length, loc.raw_length, loc.codec, loc.kind, loc.base_id))
            kept_nodes = {sid: node for sid, node in old.snapshot_nodes.items() if hash_bytes(node) == sid}
            # nodes only the cache still holds go into the store first (not into the old index,
            # which may refuse writes): a crash after the clear below must not take them with it
            in_footers = {bytes(e.chunk_id) for entries in view.packs.values() for e in entries}
            cache_only = {sid: node for sid, node in kept_nodes.items() if sid not in in_footers}
            if old.damage is None:
                cache_only.update(self._unreadable_nodes(
                    {sid: node for sid, node in kept_nodes.items() if sid not in cache_only}))
            if cache_only:
                self._write_nodes(cache_only)
                log.warning("cas: %d snapshot nodes found only in the index cache were stored again",
                            len(cache_only))
                view = scan_store(self._store)
            if old.damage is not None:
                if not moved_aside:
                    log.warning("cas: the index at %s is damaged (%s); starting a new one", self.index.path, old.damage)
                    self.reader.index = self.index = self._replace_index()
            else:
                try:
                    self.index.clear()
                except IndexCorruptError as exc:  # its pages are damaged: a new one (it is only a cache)
                    log.warning("cas: %s; starting a new index", exc)
                    self.reader.index = self.index = self._replace_index()
            found = reconcile(self.index, view, self.reader, announce=False, hints=hints)
            report = RebuildReport(
                chunks=self.index.chunk_count(), packs=len(view.packs) + len(view.unreadable),
                unreadable_packs={p.hex(): why for p, why in sorted(view.unreadable.items())},
                salvaged_chunks=found.salvaged_chunks,
            )
            snapshots = []
            restore: dict[bytes, bytes] = {}
            for name, sid in self.refs():
                try:
                    snapshots.append((sid, self.reader.read(sid, f"ref {name}")))
                except (CorruptionError, FormatVersionError) as exc:
                    if sid in kept_nodes:  # its pack lost it, the old cache held it verified: store it again
                        restore[sid] = kept_nodes[sid]
                        snapshots.append((sid, kept_nodes[sid]))
                    else:
                        report.unreadable_snapshots[name] = str(exc)
            if old.damage is not None:  # not read through the old index above: read through the new one
                restore.update(self._unreadable_nodes(
                    {sid: node for sid, node in kept_nodes.items() if sid not in cache_only and sid not in restore}))
            if restore:
                self._store_nodes(restore)
            self.index.apply(put_snapshots=snapshots)
            report.snapshots = len(snapshots)
            self.last_rebuild = report
            if not report.ok:
                log.warning(
                    "cas: index rebuilt with %d unreadable packs and %d unreadable snapshots; run `cas check "
                    "--repair`", len(report.unreadable_packs), len(report.unreadable_snapshots),
                )
            return report


check_public_kwargs(Repository)  # a misspelt keyword argument is a typed ArgumentError


def _fingerprints(
    root: Any, storages: list[Any]
) -> tuple[dict[str, tuple[Any, int, bool, KeyPath]], dict[str, Any]]:
    """Per tensor path: (a key that changes when its content does, bytes, whether the key is its
    elements' own chunks, key path); per non-tensor leaf path: its encoding.

    A view that is its whole storage, contiguous from offset 0, has the storage's chunks as its
    own: it gets the key a plain tensor of those bytes gets (tied or not, same bytes, same key).
    """
    leaves: dict[str, tuple[Any, int, bool, KeyPath]] = {}
    for path, enc in tensor_leaves(root):
        name = format_path(path)
        nbytes = leaf_nbytes(enc)
        if enc[0] == "V":
            storage_bytes, chunks = storages[int(enc[5])]
            shape, stride, offset = [int(d) for d in enc[2]], [int(d) for d in enc[3]], int(enc[4])
            if offset == 0 and int(storage_bytes) == nbytes and _is_contiguous(shape, stride):
                leaves[name] = (("T", enc[1], tuple(shape), chunks), nbytes, True, path)
            else:
                key: Any = ("V", enc[1], tuple(shape), tuple(stride), offset, chunks)
                leaves[name] = (key, nbytes, False, path)
        else:
            leaves[name] = (("T" if enc[0] == "T" else enc[0], enc[1], tuple(enc[2]), enc[3]), nbytes, True, path)
    values: dict[str, Any] = {}
    _collect_values(root, (), values)
    return leaves, values


def _is_contiguous(shape: list[int], stride: list[int]) -> bool:
    expected = 1
    for d, st in zip(reversed(shape), reversed(stride), strict=True):
        if d != 1 and st != expected:
            return False
        expected *= d
    return True


def _collect_values(enc: Any, path: KeyPath, out: dict[str, Any]) -> None:
    tag = enc[0]
    if tag in ("T", "V", "A"):
        return
    if tag in ("d", "o"):
        for k, v in enc[1]:
            _collect_values(v, (*path, plain_key(k)), out)
    elif tag in ("l", "t"):
        for i, v in enumerate(enc[1]):
            _collect_values(v, (*path, i), out)
    else:
        out[format_path(path)] = repr(enc)


def _key_list(keys: Any) -> list[Any] | None:
    """``keys`` as a list: strings (formatted key paths, prefixes, globs) and tuples (exact key paths)."""
    if keys is None:
        return None
    if isinstance(keys, (str, tuple)):
        keys = [keys]
    if not isinstance(keys, list) or not all(isinstance(k, (str, tuple)) for k in keys):
        raise UsageError(f"keys must be a key path or a list of them (strings or tuples of keys), not {keys!r}")
    return [k.strip("/") if isinstance(k, str) and not (GLOB_CHARS & set(k)) else k for k in keys]


def _is_float_name(dtype: Any) -> bool:
    return isinstance(dtype, str) and (dtype.startswith(("float", "bfloat")))


def _key_hint(root: Any, targets: dict[KeyPath, Any]) -> str:
    """For a target that does not fit a whole snapshot: the top-level entry that does fit, if one does."""
    if not targets:
        return ""
    wanted = {format_path(p) for p in targets}
    under: dict[str, set[str]] = {}
    for path, _enc in tensor_leaves(root):
        if len(path) > 1:
            under.setdefault(str(path[0]), set()).add(format_path(path[1:]))
    for top, paths in under.items():
        if paths == wanted or (len(wanted & paths) * 2 > len(wanted) and len(wanted & paths) * 2 > len(paths)):
            return f"; the snapshot's {top!r} entry fits it: pass key={top!r}"
    return ""


def _merge_values(target: dict[Any, Any], loaded: dict[Any, Any]) -> None:
    import torch  # noqa: PLC0415 - only reached from load_into, which imported it already

    for key, value in loaded.items():
        current = target.get(key)
        if isinstance(current, torch.Tensor):
            continue
        if isinstance(current, dict) and isinstance(value, dict):
            _merge_values(current, value)
        else:
            target[key] = value


def _retention_policy(call: str, rules: dict[str, Any]) -> RetentionPolicy:
    """``RetentionPolicy(**rules)``; a misspelt rule is an ArgumentError naming the rules there are."""
    names = [f.name for f in dataclasses.fields(RetentionPolicy)]
    check_names(call, rules, names, names)
    return RetentionPolicy(**rules)


def _metric_names(snap: Snapshot) -> list[str]:
    metrics = snap.metadata.get("metrics")
    out = [str(k) for k in metrics] if isinstance(metrics, dict) else []
    return out + [str(k) for k, v in snap.metadata.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
