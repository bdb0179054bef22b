"""Save sessions: a save split into what writers do and what one committer does.

A :class:`SaveSession` stores chunks and manifest subtrees and returns what it wrote
(:class:`SavedPart`: a subtree of the snapshot's tree, chunk ids only, no tensor bytes),
with no ref and no global state. A commit takes parts (from this session, from other
processes' sessions, or both), builds the tree node and the snapshot node, and writes the
ref atomically. ``Repository.save`` is one session that stores one part and commits it; a
``torch.distributed.checkpoint`` save is one session per rank and a commit on the
coordinator (``cas.integrations.dcp``).

Write order (FORMAT.md §8, §12): every session makes its packs durable and commits their
index entries before it returns its parts, so a commit that holds every part writes a ref
only to chunks that are durable. Sessions hold the repository lock shared (unless the caller
holds it for them, ``lock=False``), so gc never runs between a part being written and its
commit while the lock is held across both.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import msgpack

from cas import fingerprints as fingerprint_cache
from cas.errors import CasError, StorageError, UsageError
from cas.faults import crash_point
from cas.ids import ChunkId, PackId, SnapshotId
from cas.index import SealedPack
from cas.manifest import NODE_VERSION, SnapshotNode, check_metadata, pack_node
from cas.reports import Snapshot
from cas.saver import ChunkStorer, Fingerprints
from cas.tree import FILES_KEY, Blob, KeyPath, check_tree

if TYPE_CHECKING:
    from cas.repository import Repository

Progress = Callable[[int, int], None]
log = logging.getLogger("cas")


@dataclass(frozen=True)
class SavedPart:
    """What a session stored for one subtree: plain data (picklable, small), ready for a commit.

    ``tree`` is the encoded tree node of the subtree (``{"v", "type": "tree", "root",
    "storages"}``, FORMAT.md §7), its leaves naming chunk ids; a commit of this part alone
    stores these bytes as the snapshot's tree node.
    """

    tree: bytes
    logical_bytes: int
    tensor_count: int
    bytes_added: int
    pickled: bool
    chunk_size: int
    #: the session that wrote it (a commit in the same session does not count its bytes twice)
    session: str
    #: a label for per-writer accounting (a rank), or None
    label: int | None = None


def _blob_chunks(obj: Any) -> Any:
    if isinstance(obj, Blob):
        return b"".join(obj.chunks)
    raise TypeError(f"cannot encode {type(obj).__name__} in a manifest node")


def tree_bytes(root: Any, storages: list[Any]) -> bytes:
    """The tree node of ``root`` (Blob leaves become their chunk lists)."""
    return pack_node({"v": NODE_VERSION, "type": "tree", "root": root, "storages": storages}, default=_blob_chunks)


def _unpack_tree(data: bytes) -> tuple[Any, list[Any]]:
    node = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    return node["root"], node["storages"]


def _footers(packs: list[SealedPack]) -> list[tuple[PackId, int, bytes]]:
    """(id, size, footer bytes) of sealed packs: what an index object holds."""
    return [(p.pack_id, p.size, b"".join(e.footer_bytes() for e in p.entries)) for p in packs]


def _key_of(enc: Any) -> bytes:
    return bytes(msgpack.packb(enc, use_bin_type=True))


def _renumber(enc: Any, offset: int) -> Any:
    """``enc`` with every shared-storage view's storage index moved up by ``offset``."""
    if not offset or not isinstance(enc, list) or not enc:
        return enc
    tag = enc[0]
    if tag == "V":
        return [*enc[:5], int(enc[5]) + offset, *enc[6:]]
    if tag in ("d", "o"):
        return [tag, [[k, _renumber(v, offset)] for k, v in enc[1]], *enc[2:]]
    if tag in ("l", "t"):
        return [tag, [_renumber(v, offset) for v in enc[1]]]
    return enc


def _merge(a: Any, b: Any, path: str) -> Any:
    """Two subtrees as one: dicts merge key by key; anything else must be equal."""
    if a == b:
        return a
    if isinstance(a, list) and isinstance(b, list) and a and b and a[0] == b[0] == "d":
        pairs = [list(p) for p in a[1]]
        where = {_key_of(k): i for i, (k, _v) in enumerate(pairs)}
        for k, v in b[1]:
            i = where.get(_key_of(k))
            if i is None:
                where[_key_of(k)] = len(pairs)
                pairs.append([k, v])
            else:
                pairs[i][1] = _merge(pairs[i][1], v, f"{path}/{k[1] if len(k) > 1 else k}")
        return ["d", pairs]
    raise UsageError(f"two parts of one snapshot hold different values at {path or '<root>'}; each key path "
                     "may be written by one writer only (or by several with identical bytes)")


def merge_parts(parts: list[SavedPart], session: str, label: int | None = None) -> SavedPart:
    """Several parts as one (their trees merged; shared storages renumbered)."""
    if not parts:
        raise UsageError("nothing to merge: no parts")
    if len(parts) == 1:
        return parts[0]
    sizes = {p.chunk_size for p in parts}
    if len(sizes) != 1:
        raise UsageError(f"parts were stored with different chunk sizes {sorted(sizes)}")
    root: Any = None
    storages: list[Any] = []
    for part in parts:
        sub_root, sub_storages = _unpack_tree(part.tree)
        sub_root = _renumber(sub_root, len(storages))
        storages += sub_storages
        root = sub_root if root is None else _merge(root, sub_root, "")
    chunk_size = sizes.pop()
    check_tree(root, storages, "merged parts", chunk_size)
    return SavedPart(
        tree=tree_bytes(root, storages), logical_bytes=sum(p.logical_bytes for p in parts),
        tensor_count=sum(p.tensor_count for p in parts), bytes_added=sum(p.bytes_added for p in parts),
        pickled=any(p.pickled for p in parts), chunk_size=chunk_size, session=session, label=label,
    )


def _nest(path: KeyPath, value: Any) -> Any:
    for key in reversed(path):
        value = {key: value}
    return value


class _Nested:
    """Encoded one-path trees gathered into one dict encoding (linear in the number of paths)."""

    def __init__(self) -> None:
        self.children: dict[bytes, tuple[Any, _Nested | Any]] = {}

    def add(self, enc: Any, depth: int, where: KeyPath) -> None:
        node = self
        for level in range(depth):
            key_enc, value = enc[1][0]  # a one-key dict on the path
            key = _key_of(key_enc)
            last = level == depth - 1
            held = node.children.get(key)
            if last:
                if held is not None and held[1] != value:
                    raise UsageError(f"two values at {'/'.join(map(str, where))}")
                node.children[key] = (key_enc, value)
                return
            if held is None:
                held = (key_enc, _Nested())
                node.children[key] = held
            if not isinstance(held[1], _Nested):
                raise UsageError(f"a value and a subtree at {'/'.join(map(str, where[:level + 1]))}")
            node = held[1]
            enc = value

    def encode(self) -> Any:
        return ["d", [[k, v.encode() if isinstance(v, _Nested) else v] for k, v in self.children.values()]]


class SaveSession:
    """One writer's share of a save: chunks and subtrees stored, packs durable, index committed.

    Use ``Repository.session()``. ``store`` / ``store_items`` may be called several times;
    ``finish`` seals the packs and commits their index entries (no ref); ``commit`` adds the
    tree and snapshot nodes for parts (this session's and others') and writes the ref.
    """

    def __init__(
        self,
        repo: Repository,
        parent: str | SnapshotId | None,
        *,
        compression: str,
        keyframe: bool,
        previous: tuple[SnapshotId | None, Fingerprints] | None,
        lock: bool,
        label: int | None = None,
        rehash: bool = False,
    ) -> None:
        self.repo = repo
        self.id = uuid.uuid4().hex
        self.label = label
        self._stack = contextlib.ExitStack()
        self._closed = False
        if lock:
            self._stack.enter_context(repo.store.lock(exclusive=False))
        try:
            # under the lock: no gc can remove the parent's manifest while we read it
            # (an id is taken as is: a snapshot forgotten meanwhile only means keyframes, never a failed save)
            self.parent: SnapshotId | None = parent if isinstance(parent, SnapshotId) else repo._parent_id(parent)
            bases = None
            if self.parent is not None and not keyframe and repo.max_delta_depth:
                self.parent, bases = repo._delta_parent(self.parent)
            self.sink = repo.pack_sinks("pack")
            self._lookup = repo.index.reader()
            self.storer = ChunkStorer(
                self.sink, self._lookup, repo.pool, compression, repo.chunk_size, window=2 * repo._threads + 2,
                bases=bases, max_depth=repo.max_delta_depth, max_cost=repo.max_chain_cost,
                read_base=lambda cid: repo.reader.base(cid, "delta base for a save", scratch=True),
                fingerprints=self._previous_fingerprints(previous, rehash, bases),
                pack_size_of=repo.reader.pack_size, zero_runs=repo.codes_zero_runs,
                damaged=repo.store.damage_records(),
            )
        except BaseException:
            self._stack.close()
            raise
        self.packs: list[SealedPack] = []

    # context manager: an exception aborts (packs already published stay unreferenced: gc)
    def __enter__(self) -> SaveSession:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._closed:
            if exc_type is None:
                self.finish()
            else:
                self.abort()

    def _previous_fingerprints(
        self, previous: tuple[SnapshotId | None, Fingerprints] | None, rehash: bool, bases: Any
    ) -> Fingerprints | None:
        """The XXH3 shortcut (FORMAT.md §4) only for a child of the save that took the fingerprints:
        this process's (or the caller's) last save, else the one this machine left in its cache."""
        if rehash or self.parent is None:
            return None
        if previous is not None and previous[0] == self.parent:
            return previous[1]
        if not bases:
            return None
        return fingerprint_cache.load(fingerprint_cache.directory_of(self.repo.store.local_dir), self.parent, bases)

    @property
    def fingerprints(self) -> Fingerprints:
        """(blob path, chunk index) -> (XXH3-128, chunk id) of what this session stored (FORMAT.md §4)."""
        return self.storer.fingerprints

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("this save session is finished; open a new one")

    def _guarded(self, run: Callable[[], Any]) -> Any:
        try:
            return run()
        except OSError as exc:
            self.abort()
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            advice = ("Free space (cas forget + cas gc) and save again" if full
                      else "Check that this path exists and is writable, then save again")
            raise StorageError(
                f"saving stopped: {exc.strerror or exc} ({exc.filename or self.repo.path}); nothing was committed "
                f"and every earlier snapshot is intact. {advice}"
            ) from exc
        except BaseException:
            self.abort()
            raise

    def store(self, state: Any, *, allow_pickle: bool = False, progress: Progress | None = None) -> SavedPart:
        """Store a state dict (or any value the typed encoding holds) as one subtree."""
        self._check_open()
        from cas.statedict import encode_state  # noqa: PLC0415 - torch only when saving

        def run() -> SavedPart:
            encoded = encode_state(state, allow_pickle=allow_pickle)
            blobs = encoded.storages + encoded.blobs
            # files may be written by another process while they are read (tensors are this one's)
            self.storer.copy_pieces = isinstance(state, dict) and FILES_KEY in state
            return self._store_blobs(
                blobs, lambda: tree_bytes(encoded.tree, [[b.nbytes, b] for b in encoded.storages]),
                encoded.logical_bytes, encoded.tensor_count, encoded.pickled, progress,
            )

        part: SavedPart = self._guarded(run)
        return part

    def store_items(
        self, items: Iterable[tuple[KeyPath, Any]], *, allow_pickle: bool = False, progress: Progress | None = None
    ) -> SavedPart:
        """Store values at key paths (dict keys from the root) as one subtree. Each value is encoded
        on its own: tensors that share memory are still stored as plain tensors of their own
        elements (as ``torch.distributed.checkpoint`` shards must be), so their chunk ids equal
        those of the same tensors saved alone."""
        self._check_open()
        from cas.statedict import encode_state  # noqa: PLC0415 - torch only when saving

        def run() -> SavedPart:
            nested = _Nested()
            blobs: list[Blob] = []
            logical = tensors = 0
            pickled = False
            for path, value in items:
                if not path:
                    raise UsageError("store_items takes values at non-empty key paths")
                encoded = encode_state(_nest(path, value), allow_pickle=allow_pickle)
                if encoded.storages:
                    raise UsageError(f"value at {'/'.join(map(str, path))} holds tensors that share a storage; "
                                     "store it with store()")
                blobs += encoded.blobs
                logical += encoded.logical_bytes
                tensors += encoded.tensor_count
                pickled = pickled or encoded.pickled
                nested.add(encoded.tree, len(path), path)
            root = nested.encode()
            return self._store_blobs(blobs, lambda: tree_bytes(root, []), logical, tensors, pickled, progress)

        part: SavedPart = self._guarded(run)
        return part

    def _store_blobs(
        self, blobs: list[Blob], tree: Callable[[], bytes], logical: int, tensors: int, pickled: bool,
        progress: Progress | None,
    ) -> SavedPart:
        total = sum(b.nbytes for b in blobs)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        before = self.sink.stored_bytes
        self.storer.store_blobs(blobs, advance)
        return SavedPart(
            tree=tree(), logical_bytes=logical, tensor_count=tensors, bytes_added=self.sink.stored_bytes - before,
            pickled=pickled, chunk_size=self.repo.chunk_size, session=self.id, label=self.label,
        )

    def _seal(self, snapshots: list[tuple[bytes, bytes]]) -> None:
        """Packs durable, the index object written (remote stores), one index transaction."""
        packs = self.sink.finish()
        store = self.repo.store
        if not store.is_local:  # what a fresh cache reads instead of every pack's footer
            store.write_index_object(_footers(packs))
        store.check_locks()  # a writer whose lock may have gone stale commits nothing
        crash_point("before_index_commit")
        self.repo.index.commit(packs, snapshots, replace=self.storer.replaced)
        self.packs = packs
        self._settle_damage()

    def _settle_damage(self) -> None:
        """Delete the damage records of copies whose pack is gone (FORMAT.md §5): no index can read
        them any more. The others stay while their pack holds the damaged copy, so that no save
        deduplicates against it and no rebuilt index (another machine's cache) chooses it. Best
        effort: it runs after the index commit, and nothing here may fail the save."""
        try:
            pack_size = self.repo.reader.pack_size
            gone = [(cid, pack_id, offset) for cid, copies in self.storer.damaged.items()
                    for pack_id, offset in copies if pack_size(pack_id) is None]
            if gone:
                self.repo.store.clear_damage(gone)
        except (CasError, OSError) as exc:
            log.warning("cas: the damage records were not tidied (%s); the next save tries again", exc)

    def finish(self) -> None:
        """Make what this session stored durable and indexed (no ref); then the session is closed."""
        self._check_open()
        self._guarded(lambda: self._seal([]))
        self._close()

    def abort(self) -> None:
        """Drop the open temp pack; packs already published stay unreferenced until gc."""
        if self._closed:
            return
        try:
            self.sink.abort()
        finally:
            self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._lookup.close()
        finally:
            self._stack.close()

    def commit(
        self,
        parts: list[SavedPart],
        tag: str | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        replace: bool = False,
        ref_version: str | None = None,
    ) -> Snapshot:
        """Build the snapshot of ``parts`` (their trees merged), store its nodes with this session's
        chunks, commit the index and write the ref atomically; then the session is closed.

        A new tag is a create-only write; ``replace=True`` moves an existing one by
        compare-and-swap against ``ref_version`` (its version when the save began, looked up
        here if not given).
        """
        self._check_open()
        repo = self.repo
        metadata = dict(metadata or {})
        check_metadata(metadata)
        if not parts:
            raise UsageError("a commit needs at least one part")
        if tag is not None and ref_version is None and replace:
            ref_version = repo.store.ref_version(tag)

        def run() -> Snapshot:
            if not repo.store.is_local and not repo._probed:
                # a store that accepts conditional writes and ignores them would break tags: refused here
                repo.store.backend.probe_conditional_writes()
                repo._probed = True
            part = merge_parts(parts, self.id)
            if part.chunk_size != repo.chunk_size:
                raise UsageError(f"parts were stored at chunk size {part.chunk_size}, the repository's is "
                                 f"{repo.chunk_size}")
            tree_id = self.storer.store_node(part.tree)
            # bytes of other sessions' parts, plus what this one stored (its parts and the tree node)
            foreign = sum(p.bytes_added for p in parts if p.session != self.id)
            node = SnapshotNode(
                tree=tree_id, tag=tag, parent=self.parent, time_ns=time.time_ns(), metadata=metadata,
                logical_bytes=part.logical_bytes, tensor_count=part.tensor_count,
                bytes_added=foreign + self.sink.stored_bytes, chunk_size=part.chunk_size, pickled=part.pickled,
            )
            node_bytes = node.encode()
            snap_id = SnapshotId(self.storer.store_node(node_bytes))
            self._seal([(snap_id, node_bytes)])
            crash_point("before_ref")
            ref = tag or snap_id.hex()
            # a new tag is created by exactly one save; a moved one only if no other save moved it meanwhile
            repo.store.write_ref(ref, snap_id, create=tag is not None and ref_version is None,
                                 if_version=ref_version if tag is not None else None)
            # the next save, a child of this one, need not re-hash what did not change
            repo._fingerprints = (snap_id, self.storer.fingerprints)
            # ... nor one in a new process on this machine (a cache: a save never fails for it)
            fingerprint_cache.save(fingerprint_cache.directory_of(repo.store.local_dir), snap_id,
                                   self.storer.fingerprints)
            crash_point("after_ref")
            return repo._snapshot(ref, snap_id, node)

        snap: Snapshot = self._guarded(run)
        self._close()
        return snap


def chunk_ids_of(part: SavedPart) -> list[ChunkId]:
    """Every chunk a part's leaves name (for tests and accounting)."""
    from cas.tree import blob_leaves, tensor_leaves  # noqa: PLC0415

    root, storages = _unpack_tree(part.tree)
    out: list[ChunkId] = []
    for _path, enc in tensor_leaves(root):
        if enc[0] in ("T", "A"):
            raw = enc[3]
            out += [ChunkId(raw[i:i + 32]) for i in range(0, len(raw), 32)]
    for _path, raw in blob_leaves(root):
        out += [ChunkId(raw[i:i + 32]) for i in range(0, len(raw), 32)]
    for _nbytes, raw in storages:
        out += [ChunkId(raw[i:i + 32]) for i in range(0, len(raw), 32)]
    return out
