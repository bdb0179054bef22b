"""The save pipeline: chunk -> hash (thread pool) -> dedup lookup -> encode (thread pool) -> pack.

Memory is bounded: chunks are zero-copy slices of the caller's tensors, and at
most ``window`` hash tasks (each up to ``HASH_GROUP_BYTES`` of pieces, or one copied piece) and
``window`` encoded chunks are in flight at once.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, NamedTuple

import xxhash

from cas.codec import Buffer, Codec, encode, needs_base
from cas.errors import CorruptionError
from cas.faults import crash_point
from cas.ids import ChunkId, PackId, hash_bytes
from cas.index import ChunkLocation, ChunkLookup, SealedPack
from cas.pack import FOOTER_ENTRY, HEADER, TRAILER, ChunkKind, PackWriter
from cas.sources import read_copy
from cas.tree import Blob, KeyPath

log = logging.getLogger("cas")


class PackSink:
    """Appends chunks to the open pack and seals it at the target size.

    Sealing (fsync, read-back, rename, directory fsync) runs on a background thread so
    hashing and encoding go on meanwhile; ``finish`` returns once every pack is durable.
    """

    def __init__(
        self, new_temp_path: Callable[[], Path], publish: Callable[[Path, PackId], None], target_size: int
    ) -> None:
        self._new_temp_path = new_temp_path
        self._publish = publish
        self._target_size = target_size
        self._writer: PackWriter | None = None
        self._publisher = ThreadPoolExecutor(1, thread_name_prefix="cas-seal")
        self._publishing: list[Future[SealedPack]] = []
        self._sealed: list[PackWriter] = []  # in the order of _publishing
        self._flushing: list[Future[None]] = []
        self._unflushed = 0
        self.stored_bytes = 0

    def add(
        self,
        chunk_id: ChunkId,
        kind: ChunkKind,
        codec: int,
        payload: Buffer,
        raw_length: int,
        base_id: ChunkId | None = None,
    ) -> None:
        if self._writer is None:
            self._writer = PackWriter(self._new_temp_path())
            self.stored_bytes += HEADER.size + TRAILER.size  # what the pack adds besides its records
        before = self._writer.size
        self._writer.add(chunk_id, kind, codec, memoryview(payload), raw_length, base_id)
        self.stored_bytes += self._writer.size - before + FOOTER_ENTRY.size
        self._unflushed += self._writer.size - before
        if self._writer.size >= self._target_size:
            self._seal()
        elif self._unflushed >= FLUSH_BYTES:
            self._flush_early(self._writer.temp_path)

    def _flush_early(self, path: Path) -> None:
        """Start writing the open pack's bytes to disk now, on the seal thread (an fdatasync of what
        was appended so far), so the fsync that seals it has only the tail left: the disk writes
        while hashing and encoding go on, instead of after them. Durability still rests on the
        seal's fsync; a flush that fails (the pack was aborted meanwhile) is ignored."""
        self._unflushed = 0

        def flush() -> None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return
            try:
                os.fdatasync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)

        self._flushing = [f for f in self._flushing if not f.done()]
        if not self._flushing:  # one at a time: a slow disk does not queue flushes behind the seals
            self._flushing.append(self._publisher.submit(flush))

    def _seal(self) -> None:
        writer, self._writer = self._writer, None
        self._unflushed = 0
        if writer is None:
            return
        pack_id = writer.finish()
        size = writer.size

        def publish() -> SealedPack:
            writer.publish(pack_id, self._publish)
            return SealedPack(pack_id, size, writer.entries)

        self._publishing.append(self._publisher.submit(publish))
        self._sealed.append(writer)

    def _cancel_queued(self) -> None:
        """After a failure: drop the publishes not yet started (on a store that stopped answering
        each would wait out its own timeouts and retries) and remove their temp packs."""
        self._publisher.shutdown(wait=True, cancel_futures=True)
        for fut, writer in zip(self._publishing, self._sealed, strict=True):
            if fut.cancelled():
                writer.temp_path.unlink(missing_ok=True)

    def finish(self) -> list[SealedPack]:
        """Seal the open pack; wait until every pack of this sink is durable."""
        self._seal()
        try:
            return [f.result() for f in self._publishing]
        except BaseException:
            self._cancel_queued()
            raise
        finally:
            self._publisher.shutdown(wait=True)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._cancel_queued()  # packs already published stay: unreferenced, gc removes them


class PackSinks:
    """Data chunks and manifest nodes in packs of their own (repository version 2), so data packs
    can move to a cold tier while what lists, diffs, verifies structure and plans a restore stays
    hot. With ``split=False`` (version 1) one sink takes both."""

    def __init__(
        self, new_temp_path: Callable[[], Path], publish: Callable[[Path, PackId, bool], None], target_size: int,
        *, split: bool,
    ) -> None:
        self.data = PackSink(new_temp_path, lambda temp, pid: publish(temp, pid, False), target_size)
        self.nodes = PackSink(new_temp_path, lambda temp, pid: publish(temp, pid, True), target_size) if split \
            else self.data

    @property
    def stored_bytes(self) -> int:
        return self.data.stored_bytes + (self.nodes.stored_bytes if self.nodes is not self.data else 0)

    def add(
        self, chunk_id: ChunkId, kind: ChunkKind, codec: int, payload: Buffer, raw_length: int,
        base_id: ChunkId | None = None,
    ) -> None:
        (self.nodes if kind == ChunkKind.NODE else self.data).add(chunk_id, kind, codec, payload, raw_length, base_id)

    def finish(self) -> list[SealedPack]:
        packs = self.data.finish()
        return packs + self.nodes.finish() if self.nodes is not self.data else packs

    def abort(self) -> None:
        self.data.abort()
        if self.nodes is not self.data:
            self.nodes.abort()


#: appended bytes after which the open pack is flushed to disk in the background (see PackSink._flush_early)
FLUSH_BYTES = 8 << 20
#: pieces hashed by one pool task, up to this many bytes (and at least one piece)
HASH_GROUP_BYTES = 8 << 20

BaseMap = dict[KeyPath, tuple[tuple[Any, ...], list[ChunkId]]]
#: (blob path, chunk index) -> (XXH3-128 of the chunk's bytes, its id), from one save
Fingerprints = dict[tuple[KeyPath, int], tuple[bytes, ChunkId]]


#: Estimated restore time of one delta link, in keyframe restores of the same chunk, measured
#: with bench/delta_depth.py (``--dtype``, ``--pattern``) and on the bf16 revision series. A dense
#: delta decodes every byte again. A sparse one costs a fixed part plus a part that grows faster
#: than what it stores: changed rows are few long runs (cheap), elements changed one by one are a
#: run each (dear), and the fit ``fixed + a r + b r^2`` (``r`` = stored / raw) covers both, but
#: for elements changed one by one near r = 0.1 (0.42 measured per link against 0.35: the index
#: records no run count, bench/delta_depth.py --pattern scattered --rows 0.1).
#: Relative to its keyframe a link costs more the smaller the elements: a bf16 keyframe stores its
#: noisy mantissa plane as is while its delta entropy-decodes both planes, and a 1-byte keyframe
#: is one zstd frame that decodes at memory speed.
#: Real checkpoints cost more per dense link than synthetic ones: their deltas entropy-code planes
#: their keyframes store as is (float32 weights: the third byte; a plane of random noise compresses
#: in neither). Measured with --files on tools/make_series.py checkpoints: float32 weights + AdamW
#: (pretrain, 98 MiB) 1.63-1.72x / 2.12-2.31x / 2.65-2.82x at depth 1 / 2 / 3 with ~3/4 of the
#: chunks deltas, ~0.8-1.0 a link (per chunk: a 0.54-0.75 ms patch against a 0.75 ms keyframe
#: restore; synthetic float32: 0.27-0.31); bf16 weights (120 MiB) 1.62-1.63x / 2.05-2.20x /
#: 2.62-2.93x, 0.58-0.73 a link with zero-run planes, 0.9 without (synthetic: 0.45-0.5).
DENSE_LINK_COST = 0.8  # 4- and 8-byte elements
DENSE_LINK_COSTS = {1: 2.5, 2: 0.7}  # zero-run planes (format version 3); int8 measured 2.3 without them
DENSE_LINK_COSTS_V2 = {1: 2.5, 2: 0.9}  # repositories of format versions 1 and 2: no zero-run planes
#: (fixed, a, b) of a sparse link for 4- and 8-byte elements: measured 0.10 (rows, r = 0.015),
#: 0.18 (rows, r = 0.073), 1.0 (elements changed one by one, r = 0.30)
SPARSE_LINK = (0.12, 1.4, 6.0)
#: the same for 1- and 2-byte elements: int8 0.26 (rows, r = 0.04) and 2.5 (one by one, r = 0.23);
#: bf16 0.2 (rows, r = 0.046) and 1.28 (one by one, r = 0.22)
SPARSE_LINKS = {1: (0.18, 2.1, 36.0), 2: (0.13, 1.54, 17.0)}


def link_cost(
    codec: int, stored_length: int, raw_length: int, element_size: int = 4, zero_runs: bool = True
) -> float:
    """Estimated restore time a chunk stored with ``codec`` adds over its base (keyframes: 1).

    ``element_size``: of the tensor the chunk belongs to (the index does not record it: callers
    that do not know it, such as ``Repository.stats``, get the estimate for 4-byte elements).
    ``zero_runs``: the repository codes planes as zero runs (format version 3), which decode faster."""
    if codec == Codec.SPARSE_DELTA:
        fixed, a, b = SPARSE_LINKS.get(element_size, SPARSE_LINK)
        r = stored_length / max(1, raw_length)
        return fixed + a * r + b * r * r
    if codec == Codec.DELTA:
        return (DENSE_LINK_COSTS if zero_runs else DENSE_LINK_COSTS_V2).get(element_size, DENSE_LINK_COST)
    return 1.0


def chain_extremes(bases: dict[bytes, tuple[bytes | None, float]]) -> tuple[int, float]:
    """(most links, highest estimated restore cost) over chains given as chunk -> (base, link cost)."""
    known: dict[bytes, tuple[int, float]] = {}
    for start in bases:
        path: list[bytes] = []
        cursor: bytes | None = start
        while cursor is not None and cursor in bases and cursor not in known and len(path) <= len(bases):
            path.append(cursor)
            cursor = bases[cursor][0]
        depth, cost = known.get(cursor, (0, 1.0)) if cursor is not None else (0, 1.0)
        for cid in reversed(path):
            depth, cost = depth + 1, cost + bases[cid][1]
            known[cid] = (depth, cost)
    if not known:
        return 0, 1.0
    return max(d for d, _ in known.values()), max(c for _, c in known.values())


class _Cycle(NamedTuple):
    """What a full chain's options are weighed with: the size of a one-step delta and of the keyframe."""

    fresh: int
    keyframe: int


class ChunkStorer:
    """Stores blobs and nodes for one save, deduplicating against the index and itself.

    A new chunk whose tensor (same path, dtype and shape) has a chunk at the same
    position in the parent snapshot may be stored as a delta against it. Chains are
    bounded twice: at most ``max_depth`` links, and an estimated restore time of at most
    ``max_cost`` keyframe restores (sparse deltas are cheap links, dense ones dear).
    When the parent chunk's chain is full, the chain branches (see ``_branches``) or
    restarts with a keyframe, whichever costs less per save.
    """

    def __init__(
        self,
        sink: PackSinks,
        lookup: ChunkLookup,
        pool: Executor,
        compression: str,
        chunk_size: int,
        window: int,
        *,
        bases: BaseMap | None = None,
        max_depth: int = 0,
        max_cost: float = float("inf"),
        read_base: Callable[[ChunkId], Buffer] | None = None,
        fingerprints: Fingerprints | None = None,
        pack_size_of: Callable[[PackId], int | None] | None = None,
        zero_runs: bool = True,
        damaged: dict[ChunkId, set[tuple[PackId, int]]] | None = None,
    ) -> None:
        self.sink = sink
        #: copies a read found damaged (``Store.damage_records``): chunk -> {(pack, offset)}; a chunk
        #: whose indexed copy is one of them counts as not stored, and is written again
        self.damaged = damaged or {}
        #: planes may be coded as zero runs (plane mode 2: repositories of format version 3)
        self.zero_runs = zero_runs
        self.pack_size_of = pack_size_of
        self._pack_sizes: dict[bytes, int | None] = {}
        self._stored: dict[bytes, bool] = {}
        #: chunks the index names but whose copy cannot be read: written again, their entries replaced
        self.replaced: set[bytes] = set()
        self.lookup = lookup
        self.pool = pool
        self.compression = compression
        self.chunk_size = chunk_size
        self.window = window
        #: hash and encode a private copy of each new piece: for sources another process may write
        #: while they are saved (files), so a chunk's bytes always hash to its id
        self.copy_pieces = False
        self.bases = bases or {}
        self.max_depth = max_depth if read_base is not None else 0
        self.max_cost = max_cost
        self.read_base = read_base
        self.known: set[bytes] = set()
        #: the previous save's fingerprints (its snapshot is this save's parent), and this save's
        self.previous = fingerprints or {}
        self.fingerprints: Fingerprints = {}
        self.chains: dict[bytes, tuple[int, float]] = {}  # chunk -> (links below it, estimated restore cost)

    def _is_new(self, cid: bytes) -> bool:
        if cid in self.known:
            return False
        self.known.add(cid)
        if self._is_stored(cid):
            return False
        if self.lookup.get(cid) is not None:
            self.replaced.add(cid)
        return True

    def _is_stored(self, cid: bytes) -> bool:
        """The index names the chunk, and every link of its chain down to a keyframe, in packs that
        are there and long enough. The index is a cache: a stale entry (its pack gone, its base
        collected) must not let a save commit a snapshot that cannot be read, so such a chunk is
        written again."""
        path: list[bytes] = []
        cursor: bytes | None = cid
        ok = True
        while cursor is not None:
            known = self._stored.get(cursor)
            if known is not None:
                ok = known
                break
            loc = self.lookup.get(cursor)
            if loc is None or len(path) > 4096:
                ok = False
                break
            path.append(cursor)
            if self.damaged and (loc.pack_id, loc.offset) in self.damaged.get(ChunkId(cursor), ()):
                ok = False
                break
            if self.pack_size_of is not None:
                if loc.pack_id not in self._pack_sizes:
                    self._pack_sizes[loc.pack_id] = self.pack_size_of(loc.pack_id)
                size = self._pack_sizes[loc.pack_id]
                if size is None or loc.offset + loc.stored_length > size:
                    ok = False
                    break
            cursor = loc.base_id if needs_base(loc.codec) else None
        for link in path:
            self._stored[link] = ok
        return ok

    def _chain_of(self, cid: bytes, element_size: int) -> tuple[int, float] | None:
        """(delta links below ``cid``, estimated restore cost) of a stored chunk; None if not stored.
        ``element_size``: of the tensor whose chain it is (a chain stays within one tensor)."""
        known = self.chains.get(cid)
        if known is not None:
            return known
        chain: list[tuple[bytes, ChunkLocation]] = []
        cursor: bytes | None = cid
        while cursor is not None and cursor not in self.chains:
            loc = self.lookup.get(cursor)
            if loc is None or len(chain) > 4096:
                return None
            chain.append((cursor, loc))
            cursor = loc.base_id if needs_base(loc.codec) else None
        depth, cost = (-1, 0.0) if cursor is None else self.chains[cursor]
        for link, loc in reversed(chain):
            if depth < 0:
                depth, cost = 0, 1.0
            else:
                depth, cost = depth + 1, cost + self._link_cost(loc.codec, loc.stored_length, loc.raw_length,
                                                                     element_size)
            self.chains[link] = (depth, cost)
        return self.chains[cid]

    def _link_cost(self, codec: int, stored_length: int, raw_length: int, element_size: int) -> float:
        """``link_cost`` for this repository's format (zero-run planes or not)."""
        return link_cost(codec, stored_length, raw_length, element_size, self.zero_runs)

    def _fits(self, cid: bytes, link: float, element_size: int) -> bool:
        info = self._chain_of(cid, element_size)
        return info is not None and info[0] + 1 <= self.max_depth and info[1] + link <= self.max_cost

    def _bases_for(
        self, blob: Blob, index: int, cid: ChunkId
    ) -> tuple[list[tuple[ChunkId, float, bool]], _Cycle | None]:
        """Delta bases to try for a new chunk, each with its delta ceiling and whether it is the parent
        itself (a one-step delta); and the cycle to weigh them by (None: take the first that works)."""
        if not self.max_depth or self.compression == "none":  # "none" stores raw: a base would be read for nothing
            return [], None
        entry = self.bases.get(blob.path)
        if entry is None or entry[0] != blob.signature or index >= len(entry[1]):
            return [], None
        parent = entry[1][index]
        if parent == cid:
            return [], None
        parent_loc = self.lookup.get(parent)
        k = blob.element_size
        if parent_loc is None or self._chain_of(parent, k) is None or not self._is_stored(parent):
            return [], None
        # the new link will likely cost what the parent's did (same tensor, same kind of update)
        link = (self._link_cost(parent_loc.codec, parent_loc.stored_length, parent_loc.raw_length, k)
                if needs_base(parent_loc.codec) else self._link_cost(Codec.DELTA, 0, 0, k))
        # A keyframe parent gives no hint of the update's kind: try the delta if even the cheapest
        # link fits (``_encode`` checks the real cost and falls back to a keyframe).
        cheapest = self._link_cost(Codec.SPARSE_DELTA, 0, 1, k)
        if self._fits(parent, link if needs_base(parent_loc.codec) else cheapest, k):
            return [(parent, 1.0, True)], None
        branches, cycle = self._branches(parent, parent_loc, link, k)
        if parent_loc.codec == Codec.SPARSE_DELTA and self._fits(parent, cheapest, k):
            # The parent may itself be a branch: a delta spanning several saves, whose size says little
            # of the next one-step link. Try that link first (``_encode`` checks its real cost, and its
            # size is the one-step size the branches are weighed with); without this, every save after
            # a branch branched again.
            return [(parent, 1.0, True), *branches], cycle
        return branches, cycle

    def _branches(
        self, parent: ChunkId, parent_loc: ChunkLocation, link: float, element_size: int
    ) -> tuple[list[tuple[ChunkId, float, bool]], _Cycle | None]:
        """Where a full chain goes on. A delta from an ancestor at depth d-1 (so the new chunk sits at
        depth d), then L - d one-step deltas until the chain is full again: a branch cycle, costing
        per save (c + (L - d) f) / (1 + L - d) for a branch delta c and one-step deltas f. It is
        kept only while that beats a restart cycle (a keyframe K, then L one-step deltas):
        c < (1 + L - d)(K + L f) / (L + 1) - (L - d) f, a ceiling relative to the keyframe.
        Dense chains branch from their keyframe (a two-level tree under each keyframe); sparse
        chains, cheap to decode, also try the parent's base and grandparent and the chain's middle,
        and keep the cheapest cycle (``_encode`` weighs each with the room its real cost leaves)."""
        chain = [(parent, parent_loc)]
        loc = parent_loc
        while needs_base(loc.codec) and loc.base_id is not None:
            base_loc = self.lookup.get(loc.base_id)
            if base_loc is None or len(chain) > 4096:
                return [], None
            chain.append((loc.base_id, base_loc))
            loc = base_loc
        if len(chain) < 2:
            return [], None
        keyframe = chain[-1][1].stored_length
        fresh = parent_loc.stored_length if needs_base(parent_loc.codec) else chain[-2][1].stored_length
        if not keyframe or not fresh:
            return [], None
        links = self.max_depth if link <= 0 else max(1, min(self.max_depth, int((self.max_cost - 1.0) / link)))
        ratio = min(1.0, fresh / keyframe)
        picks = [len(chain) - 1]  # the keyframe
        if parent_loc.codec == Codec.SPARSE_DELTA:
            picks += [1, 2, len(chain) // 2]
        options = []
        for j in sorted(set(picks), reverse=True):
            if not 0 < j < len(chain) or not self._fits(chain[j][0], link, element_size):
                continue
            depth = len(chain) - 1 - j + 1  # of the new chunk
            room = max(0, links - depth)
            ceiling = (1 + room) * (1 + links * ratio) / (links + 1) - room * ratio
            if ceiling > 0:
                options.append((ChunkId(chain[j][0]), min(1.0, ceiling), False))
        return options, (_Cycle(fresh, keyframe) if options else None)

    def _room(self, depth: int, cost: float, one_step: float) -> int:
        """One-step deltas a chain still takes on top of a chunk at ``depth`` whose restore costs ``cost``."""
        by_cost = int((self.max_cost - cost) / one_step) if one_step > 0 else self.max_depth
        return max(0, min(self.max_depth - depth, by_cost))

    def _link_fits(
        self, base_chain: tuple[int, float] | None, codec: int, payload: Buffer, piece: memoryview, blob: Blob
    ) -> bool:
        """The chunk encoded as ``payload`` (a delta) stays within the cost bound on that base's chain."""
        link = self._link_cost(codec, len(payload), len(piece), blob.element_size)
        return base_chain is None or base_chain[1] + link <= self.max_cost

    def _encode(
        self, piece: memoryview, blob: Blob, options: list[tuple[ChunkId, float, bool]], cycle: _Cycle | None
    ) -> tuple[int, Buffer, ChunkId | None]:
        """Encode against the first option that gives a delta within the cost bound; with a ``cycle``
        (several branch points), against each, keeping the cheapest cycle per save: a delta c whose real
        cost leaves room for r one-step deltas f costs (c + r f) / (1 + r) per save, a restart (keyframe
        K, then L one-step deltas) (K + L f) / (1 + L)."""
        best: tuple[float, int, Buffer, ChunkId] | None = None
        keyframe: tuple[int, Buffer] | None = None
        k = blob.element_size
        fresh = cycle.fresh if cycle is not None else 0
        for base_id, ceiling, one_step_of_parent in options:
            try:
                base = self.read_base(base_id) if self.read_base is not None else None
            except CorruptionError as exc:  # a damaged base: skip it (a keyframe at worst), never fail the save
                log.warning("cas: delta base %s cannot be read (%s); trying the next base", base_id.short(), exc)
                continue
            codec, payload = encode(
                piece, self.compression, element_size=k, is_float=blob.is_float, base=base,
                delta_ceiling=ceiling, zero_runs=self.zero_runs,
            )
            base_chain = self.chains.get(base_id)
            if codec == Codec.SPARSE_DELTA and not self._link_fits(base_chain, codec, payload, piece, blob):
                # a sparse delta of many short runs decodes slowly; a dense one may still fit
                codec, payload = encode(
                    piece, self.compression, element_size=k, is_float=blob.is_float, base=base,
                    delta_ceiling=ceiling, sparse=False, zero_runs=self.zero_runs,
                )
            if not needs_base(codec):
                keyframe = codec, payload
                if cycle is None:
                    return codec, payload, None  # a keyframe beats the delta: further bases are dearer still
                continue
            if not self._link_fits(base_chain, codec, payload, piece, blob):
                continue  # dearer to restore than estimated (a dense step after sparse ones): try the next base
            if cycle is None:
                return codec, payload, base_id
            if one_step_of_parent:
                fresh = min(fresh, len(payload))  # the parent's one-step delta: what the next saves will add
            one_step = self._link_cost(codec, fresh, len(piece), k)
            depth, cost = base_chain if base_chain is not None else (self.max_depth, self.max_cost)
            after = self._room(depth + 1, cost + self._link_cost(codec, len(payload), len(piece), k), one_step)
            per_save = (len(payload) + after * fresh) / (1 + after)
            if best is None or per_save < best[0]:
                best = (per_save, codec, payload, base_id)
        if best is not None and cycle is not None:
            one_step = self._link_cost(best[1], fresh, len(piece), k)
            links = self._room(0, 1.0, one_step)
            restart = len(keyframe[1]) if keyframe is not None else cycle.keyframe
            if (restart + links * fresh) / (1 + links) < best[0]:
                best = None  # restarting the chain costs less per save than any branch
        if best is not None:
            return best[1], best[2], best[3]
        if keyframe is not None:
            return keyframe[0], keyframe[1], None
        codec, payload = encode(piece, self.compression, element_size=k, is_float=blob.is_float,
                                zero_runs=self.zero_runs)
        return codec, payload, None

    def _pieces(self, blobs: Iterable[Blob]) -> Iterator[tuple[Blob, int, memoryview]]:
        size = self.chunk_size
        for blob in blobs:
            view = blob.view
            for index, start in enumerate(range(0, len(view), size)):
                yield blob, index, view[start:start + size]

    def _groups(self, blobs: Iterable[Blob]) -> Iterator[list[tuple[Blob, int, memoryview]]]:
        """The pieces in order, in groups hashed by one pool task: a task per 1 MiB piece costs
        about a fifth of the piece's XXH3 pass in hand-offs. Copied pieces go one by one (their
        copies are what the window bounds)."""
        most = 1 if self.copy_pieces else max(1, HASH_GROUP_BYTES // max(1, self.chunk_size))
        group: list[tuple[Blob, int, memoryview]] = []
        size = 0
        for item in self._pieces(blobs):
            group.append(item)
            size += len(item[2])
            if len(group) >= most or size >= HASH_GROUP_BYTES:
                yield group
                group, size = [], 0
        if group:
            yield group

    def _identify_group(
        self, group: list[tuple[Blob, int, memoryview]]
    ) -> list[tuple[bytes, bytes, memoryview]]:
        identify = self._identify_copy if self.copy_pieces else self._identify_view
        return [identify(piece, (blob.path, index)) for blob, index, piece in group]

    def _identify(self, piece: memoryview, key: tuple[KeyPath, int]) -> tuple[bytes, bytes]:
        """(XXH3-128 fingerprint, chunk id) of a piece. A piece whose fingerprint equals that of the
        chunk at the same position in the previous save keeps that chunk's id without a BLAKE3 pass
        (XXH3 runs at ~40 GB/s a core, BLAKE3 at ~3; two different pieces collide with odds ~2^-128)."""
        fingerprint = xxhash.xxh3_128_digest(piece)
        known = self.previous.get(key)
        if known is not None and known[0] == fingerprint:
            return fingerprint, known[1]
        return fingerprint, hash_bytes(piece)

    def _identify_view(self, piece: memoryview, key: tuple[KeyPath, int]) -> tuple[bytes, bytes, memoryview]:
        fingerprint, digest = self._identify(piece, key)
        return fingerprint, digest, piece

    def _identify_copy(self, piece: memoryview, key: tuple[KeyPath, int]) -> tuple[bytes, bytes, memoryview]:
        """``_identify`` of a private copy of the piece, which is what gets encoded: a writer elsewhere
        cannot change it between hash and encode. A piece of a mapped file is read from the file
        (``cas.sources.read_copy``): a file cut short under its mapping would kill this process
        with SIGBUS; read, it is a ``SourceChangedError``."""
        own = memoryview(read_copy(piece))
        fingerprint, digest = self._identify(own, key)
        return fingerprint, digest, own

    def store_blobs(self, blobs: list[Blob], progress: Callable[[int], None] | None = None) -> None:
        hashing: deque[tuple[list[tuple[Blob, int, memoryview]], Future[list[tuple[bytes, bytes, memoryview]]]]]
        hashing = deque()
        encoding: deque[tuple[ChunkId, int, int, Future[tuple[int, Buffer, ChunkId | None]]]] = deque()

        def drain_hash() -> None:
            group, fut = hashing.popleft()
            for (blob, index, _), (fingerprint, digest, piece) in zip(group, fut.result(), strict=True):
                cid = ChunkId(digest)
                self.fingerprints[(blob.path, index)] = (fingerprint, cid)
                blob.chunks.append(cid)
                if self._is_new(cid):
                    options, cycle = self._bases_for(blob, index, cid)
                    encoding.append((cid, len(piece), blob.element_size,
                                     self.pool.submit(self._encode, piece, blob, options, cycle)))
                if progress is not None:
                    progress(len(piece))

        def drain_encode() -> None:
            cid, raw_length, element_size, fut = encoding.popleft()
            codec, payload, base_id = fut.result()
            self.sink.add(cid, ChunkKind.DATA, codec, payload, raw_length, base_id)
            base_chain = self.chains.get(base_id) if base_id is not None else None
            if base_chain is None:
                self.chains[cid] = (0, 1.0)
            else:
                cost = self._link_cost(codec, len(payload), raw_length, element_size)
                self.chains[cid] = (base_chain[0] + 1, base_chain[1] + cost)

        for blob in blobs:
            blob.chunks.clear()
        try:
            for group in self._groups(blobs):
                hashing.append((group, self.pool.submit(self._identify_group, group)))
                while len(hashing) > self.window:
                    drain_hash()
                while encoding and (len(encoding) > self.window or encoding[0][3].done()):
                    drain_encode()
            while hashing:
                drain_hash()
                while encoding and encoding[0][3].done():
                    drain_encode()
            while encoding:
                drain_encode()
        except BaseException:
            # No task may outlive a failed save: the caller then frees what they read (a file
            # backup unmaps its files), and a task still queued would read freed memory.
            pending: list[Future[Any]] = [fut for _, fut in hashing]
            pending += [fut for *_, fut in encoding]
            for fut in pending:
                fut.cancel()
            wait(pending)
            raise
        crash_point("blobs_stored")

    def store_node(self, data: bytes) -> ChunkId:
        cid = ChunkId(hash_bytes(data))
        if self._is_new(cid):
            codec, payload = encode(data, self.compression, zero_runs=self.zero_runs)
            self.sink.add(cid, ChunkKind.NODE, codec, payload, len(data))
        return cid
