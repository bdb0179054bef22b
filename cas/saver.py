"""The save pipeline: chunk -> hash (thread pool) -> dedup lookup -> encode (thread pool) -> pack.

Memory is bounded: chunks are zero-copy slices of the caller's tensors, and at
most ``window`` hashes and ``window`` encoded chunks are in flight at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cas.codec import Buffer, encode, needs_base
from cas.faults import crash_point
from cas.ids import ChunkId, hash_bytes
from cas.index import ChunkLookup, SealedPack
from cas.pack import FOOTER_ENTRY, HEADER, TRAILER, ChunkKind, PackWriter
from cas.tree import Blob, KeyPath


class PackSink:
    """Appends chunks to the open pack and seals it at the target size.

    Sealing (fsync, read-back, rename, directory fsync) runs on a background thread so
    hashing and encoding go on meanwhile; ``finish`` returns once every pack is durable.
    """

    def __init__(self, new_temp_path: Callable[[], Path], packs_dir: Path, target_size: int) -> None:
        self._new_temp_path = new_temp_path
        self._packs_dir = packs_dir
        self._target_size = target_size
        self._writer: PackWriter | None = None
        self._publisher = ThreadPoolExecutor(1, thread_name_prefix="cas-seal")
        self._publishing: list[Future[SealedPack]] = []
        self.stored_bytes = 0

    def add(
        self,
        chunk_id: ChunkId,
        kind: ChunkKind,
        codec: int,
        payload: bytes | memoryview,
        raw_length: int,
        base_id: ChunkId | None = None,
    ) -> None:
        if self._writer is None:
            self._writer = PackWriter(self._new_temp_path())
            self.stored_bytes += HEADER.size + TRAILER.size  # what the pack adds besides its records
        before = self._writer.size
        self._writer.add(chunk_id, kind, codec, payload, raw_length, base_id)
        self.stored_bytes += self._writer.size - before + FOOTER_ENTRY.size
        if self._writer.size >= self._target_size:
            self._seal()

    def _seal(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        pack_id = writer.finish()
        size = writer.size

        def publish() -> SealedPack:
            writer.publish(pack_id, self._packs_dir)
            return SealedPack(pack_id, size, writer.entries)

        self._publishing.append(self._publisher.submit(publish))

    def finish(self) -> list[SealedPack]:
        """Seal the open pack; wait until every pack of this sink is durable."""
        self._seal()
        try:
            return [f.result() for f in self._publishing]
        finally:
            self._publisher.shutdown(wait=True)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._publisher.shutdown(wait=True)  # packs already published stay: unreferenced, gc removes them


BaseMap = dict[KeyPath, tuple[tuple[Any, ...], list[ChunkId]]]


class ChunkStorer:
    """Stores blobs and nodes for one save, deduplicating against the index and itself.

    A new chunk whose tensor (same path, dtype and shape) has a chunk at the same
    position in the parent snapshot may be stored as a delta against it; when that
    chunk's chain is already at ``max_depth``, against its nearest ancestor that
    leaves room. The codec keeps the delta only when it is smaller than a keyframe.
    """

    def __init__(
        self,
        sink: PackSink,
        lookup: ChunkLookup,
        pool: Executor,
        compression: str,
        chunk_size: int,
        window: int,
        *,
        bases: BaseMap | None = None,
        max_depth: int = 0,
        read_base: Callable[[ChunkId], bytes] | None = None,
    ) -> None:
        self.sink = sink
        self.lookup = lookup
        self.pool = pool
        self.compression = compression
        self.chunk_size = chunk_size
        self.window = window
        self.bases = bases or {}
        self.max_depth = max_depth if read_base is not None else 0
        self.read_base = read_base
        self.known: set[bytes] = set()
        self.depths: dict[bytes, int] = {}

    def _is_new(self, cid: bytes) -> bool:
        if cid in self.known:
            return False
        self.known.add(cid)
        return cid not in self.lookup

    def _depth(self, cid: bytes) -> int | None:
        """Delta links below ``cid`` (0 for a keyframe); None if it is not stored."""
        depth = self.depths.get(cid)
        if depth is not None:
            return depth
        chain = []
        cursor: bytes | None = cid
        while cursor is not None and cursor not in self.depths:
            loc = self.lookup.get(cursor)
            if loc is None:
                return None
            chain.append(cursor)
            cursor = loc.base_id
        depth = -1 if cursor is None else self.depths[cursor]
        for link in reversed(chain):
            depth += 1
            self.depths[link] = depth
        return self.depths[cid]

    def _base_for(self, blob: Blob, index: int, cid: ChunkId) -> tuple[ChunkId | None, float]:
        """The delta base for a new chunk, and the delta ceiling to encode it with."""
        if not self.max_depth:
            return None, 1.0
        entry = self.bases.get(blob.path)
        if entry is None or entry[0] != blob.signature or index >= len(entry[1]):
            return None, 1.0
        parent = entry[1][index]
        if parent == cid:
            return None, 1.0
        depth = self._depth(parent)
        if depth is None:
            return None, 1.0
        if depth + 1 <= self.max_depth:
            return parent, 1.0
        # The parent chunk's chain is full. Either restart it (a keyframe now, cheap deltas
        # after) or delta against an ancestor that leaves room (dearer as the weights drift).
        # Keep the delta only while it beats a restart cycle's average, estimated from this
        # chain: (keyframe + depth x fresh delta) / (depth + 1).
        chain = [parent]
        sizes = []
        loc = self.lookup.get(parent)
        while loc is not None:
            sizes.append(loc.stored_length)
            if loc.base_id is None:
                break
            chain.append(loc.base_id)
            loc = self.lookup.get(loc.base_id)
        # keyframe: the chain's root; fresh delta: its depth-1 chunk, written one save after it
        keyframe = sizes[-1] if loc is not None and sizes else 0
        fresh = sizes[-2] if len(sizes) >= 2 else 0
        if not keyframe or not fresh:
            return None, 1.0
        ancestor = chain[depth + 1 - self.max_depth]  # the deepest one a new delta may hang from
        ratio = min(1.0, fresh / keyframe)
        return ancestor, (1 + self.max_depth * ratio) / (self.max_depth + 1)

    def _encode(
        self, piece: memoryview, blob: Blob, base_id: ChunkId | None, ceiling: float
    ) -> tuple[int, Buffer, ChunkId | None]:
        base = self.read_base(base_id) if base_id is not None and self.read_base is not None else None
        codec, payload = encode(
            piece, self.compression, element_size=blob.element_size, is_float=blob.is_float, base=base,
            delta_ceiling=ceiling,
        )
        return codec, payload, base_id if needs_base(codec) else None

    def _pieces(self, blobs: Iterable[Blob]) -> Iterator[tuple[Blob, int, memoryview]]:
        size = self.chunk_size
        for blob in blobs:
            view = blob.view
            for index, start in enumerate(range(0, len(view), size)):
                yield blob, index, view[start:start + size]

    def store_blobs(self, blobs: list[Blob], progress: Callable[[int], None] | None = None) -> None:
        hashing: deque[tuple[Blob, int, memoryview, Future[bytes]]] = deque()
        encoding: deque[tuple[ChunkId, int, Future[tuple[int, Buffer, ChunkId | None]]]] = deque()

        def drain_hash() -> None:
            blob, index, piece, fut = hashing.popleft()
            cid = ChunkId(fut.result())
            blob.chunks.append(cid)
            if self._is_new(cid):
                base, ceiling = self._base_for(blob, index, cid)
                encoding.append((cid, len(piece), self.pool.submit(self._encode, piece, blob, base, ceiling)))
            if progress is not None:
                progress(len(piece))

        def drain_encode() -> None:
            cid, raw_length, fut = encoding.popleft()
            codec, payload, base_id = fut.result()
            self.sink.add(cid, ChunkKind.DATA, codec, payload, raw_length, base_id)
            base_depth = self.depths.get(base_id) if base_id is not None else None
            self.depths[cid] = 0 if base_depth is None else base_depth + 1

        for blob in blobs:
            blob.chunks.clear()
        for blob, index, piece in self._pieces(blobs):
            hashing.append((blob, index, piece, self.pool.submit(hash_bytes, piece)))
            while len(hashing) > self.window:
                drain_hash()
            while encoding and (len(encoding) > self.window or encoding[0][2].done()):
                drain_encode()
        while hashing:
            drain_hash()
            while encoding and encoding[0][2].done():
                drain_encode()
        while encoding:
            drain_encode()
        crash_point("blobs_stored")

    def store_node(self, data: bytes) -> ChunkId:
        cid = ChunkId(hash_bytes(data))
        if self._is_new(cid):
            codec, payload = encode(data, self.compression)
            self.sink.add(cid, ChunkKind.NODE, codec, payload, len(data))
        return cid
