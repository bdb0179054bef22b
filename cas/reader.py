"""Reading chunks back: pread from packs, decode, verify the BLAKE3 id, copy into place."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from cas.backends import ShortReadError
from cas.codec import DECODES_IN_PLACE, Buffer, Codec, decode, needs_base, patch
from cas.errors import ChunkCorruptError, CorruptionError, MissingChunkError
from cas.ids import ChunkId, PackId, hash_bytes
from cas.index import ChunkLocation, Index

if TYPE_CHECKING:
    from cas.layout import Store

T = TypeVar("T")

BASE_CACHE_BYTES = 256 << 20  # decoded delta bases kept for reuse within and across loads
MAX_CHAIN_LINKS = 1024  # a longer chain is damage (the saver never builds one): refuse, do not loop


@dataclass(frozen=True, slots=True)
class ChunkRead:
    chunk_id: ChunkId
    location: ChunkLocation
    dest: memoryview
    where: str  # "snapshot S, tensor T" for messages


def _of_copy(exc: CorruptionError, chunk_id: bytes, loc: ChunkLocation) -> CorruptionError:
    """``exc`` marked as the failure of this stored copy of the chunk (unless a deeper read already
    named the copy that failed): what ``Store.record_damage`` is told, so saves stop deduplicating
    against it."""
    if isinstance(exc, ChunkCorruptError) and exc.copy is None:
        exc.copy = (bytes(chunk_id), bytes(loc.pack_id), loc.offset)
    return exc


def _within(exc: CorruptionError, message: str) -> CorruptionError:
    """The same error, said where it happened (the damaged copy it names carried over)."""
    out = type(exc)(message)
    if isinstance(exc, ChunkCorruptError) and isinstance(out, ChunkCorruptError):
        out.copy = exc.copy
    return out


class ChunkReader:
    """Verified reads of chunks, through the store's backend (ranged reads straight into tensors)."""

    def __init__(self, store: Store, index: Index) -> None:
        self.store = store
        self.index = index
        self._lock = threading.Lock()
        self._bases: OrderedDict[bytes, Buffer] = OrderedDict()
        self._local = threading.local()
        self._bases_bytes = 0
        self.base_cache_bytes = BASE_CACHE_BYTES
        #: stored bytes of delta-chain links fetched in batches ahead of a restore from an object
        #: store, by (pack, offset): a chain rebuild then makes no request of its own
        self._prefetched: dict[tuple[bytes, int], bytes] = {}
        #: packs whose local cached copy failed and was dropped (reads of them go to the store)
        self._uncached: set[PackId] = set()
        #: one thread at a time drops cached packs: a thread that finds a pack already gone must
        #: see it in ``_uncached`` (two threads failing on one damaged pack at once)
        self._uncache_lock = threading.Lock()

    def pack_size(self, pack_id: PackId) -> int | None:
        """The size of a pack, or None if it is not there."""
        return self.store.pack_size(pack_id)

    def clear_cache(self) -> None:
        """Forget cached delta bases (verify reads everything from disk)."""
        with self._lock:
            self._bases.clear()
            self._bases_bytes = 0

    def locate(self, chunk_id: ChunkId, where: str) -> ChunkLocation:
        loc = self.index.get(chunk_id)
        if loc is None:
            raise MissingChunkError(f"{where}: chunk {chunk_id.short()} is not in the index")
        return loc

    def payload(self, loc: ChunkLocation) -> bytes:
        """The stored (encoded) bytes of a chunk, unverified."""
        if self._prefetched:
            got = self._prefetched.get((loc.pack_id, loc.offset))
            if got is not None and len(got) == loc.stored_length:
                return got
        data = self.store.read_pack_range(loc.pack_id, loc.offset, loc.stored_length) if loc.stored_length else b""
        if len(data) != loc.stored_length:
            raise ChunkCorruptError(f"pack {loc.pack_id.short()} is truncated")
        return data

    def _decode(
        self,
        chunk_id: ChunkId,
        loc: ChunkLocation,
        where: str,
        dest: memoryview | None = None,
        payload: bytes | None = None,
    ) -> Buffer:
        """Decode (following the delta chain) and verify one chunk.

        With ``dest`` the codec may decode straight into it (the result is then a view of it).
        A delta chain is rebuilt in one buffer: the keyframe (or the nearest cached base)
        decoded into it, then each delta patched in place, and only the result is hashed:
        the delta codecs are injective in their base, so a chunk that matches its id
        proves every link below it. If it does not match, the chain is decoded again link
        by link, each verified, to name the damaged chunk. Only bases read through
        :meth:`base` are cached: copying every decoded base costs more than it saves.
        """
        stored = self._stored(chunk_id, loc) if payload is None else payload
        if not needs_base(loc.codec):
            try:
                out = decode(loc.codec, stored, loc.raw_length, None, dest)
                if hash_bytes(out) != chunk_id:
                    raise ChunkCorruptError(f"chunk {chunk_id.short()} does not match its hash")
            except CorruptionError as exc:
                raise _of_copy(exc, chunk_id, loc) from None
            return out
        links, cached = self._chain(chunk_id, loc, where)
        if dest is not None and len(dest) == loc.raw_length and not dest.readonly:
            buf = dest
        else:
            buf = memoryview(np.empty(loc.raw_length, np.uint8))  # type: ignore[arg-type]  # every byte is written
        try:
            self._rebuild(links, cached, buf, stored)
            if hash_bytes(buf) == chunk_id:
                return buf
        except ChunkCorruptError:
            pass
        out = self._decode_stepwise(chunk_id, loc, where, stored)  # raises, naming the damaged link
        if buf is dest:  # the caller reads its own buffer, which the failed rebuild left wrong
            buf[:] = memoryview(out).cast("B")
            return buf
        return out

    def _rebuild(
        self, links: list[tuple[ChunkId, ChunkLocation]], cached: Buffer | None, buf: memoryview, stored: bytes
    ) -> None:
        """Decode a chain into ``buf``: its root (or cached base), then each delta patched in place."""
        top_id = links[0][0]
        if cached is not None:
            if len(cached) != len(buf):
                raise ChunkCorruptError(f"chunk {top_id.short()} has a delta base of another length")
            buf[:] = cached
        else:
            _root_id, root = links.pop()
            if root.raw_length != len(buf):
                raise ChunkCorruptError(f"chunk {top_id.short()} has a delta base of another length")
            if root.codec in DECODES_IN_PLACE:
                decode(root.codec, self.payload(root), root.raw_length, None, buf)
            else:
                buf[:] = memoryview(decode(root.codec, self.payload(root), root.raw_length)).cast("B")
        for i, (_cid, link) in enumerate(reversed(links)):
            last = i == len(links) - 1
            patch(link.codec, stored if last else self.payload(link), link.raw_length, buf)

    def _chain(
        self, chunk_id: ChunkId, loc: ChunkLocation, where: str
    ) -> tuple[list[tuple[ChunkId, ChunkLocation]], Buffer | None]:
        """The chunk and the links below it, down to a keyframe (included) or a cached base (returned)."""
        links = [(chunk_id, loc)]
        seen = {chunk_id}
        cursor: ChunkLocation | None = loc
        lookup = self.index.reader()  # one read transaction for the whole walk
        try:
            while cursor is not None and needs_base(cursor.codec):
                base_id = cursor.base_id
                if base_id is None:
                    raise ChunkCorruptError(f"chunk {links[-1][0].short()} is a delta without a base")
                if self._bases:
                    with self._lock:
                        cached = self._bases.get(base_id)
                        if cached is not None:
                            self._bases.move_to_end(base_id)
                            return links, cached
                if base_id in seen or len(links) > MAX_CHAIN_LINKS:
                    raise ChunkCorruptError(f"chunk {chunk_id.short()} has a looping or overlong delta chain")
                cursor = lookup.get(base_id)
                if cursor is None:
                    raise MissingChunkError(f"{where}, delta base {base_id.short()}: chunk is not in the index")
                links.append((base_id, cursor))
                seen.add(base_id)
        finally:
            lookup.close()
        return links, None

    def _decode_stepwise(self, chunk_id: ChunkId, loc: ChunkLocation, where: str, payload: bytes) -> Buffer:
        """Decode with every link verified on its own (slow path after a failed chain check).

        The error names the first damaged chunk from the keyframe up (and its pack).
        """
        chain = [(chunk_id, loc, where, payload)]
        seen = {chunk_id}
        cursor = loc
        while needs_base(cursor.codec):
            base_id = cursor.base_id
            if base_id is None:
                raise ChunkCorruptError(f"{chain[-1][2]}: chunk {chain[-1][0].short()} is a delta without a base")
            if base_id in seen or len(chain) > MAX_CHAIN_LINKS:
                raise ChunkCorruptError(f"{where}: chunk {chunk_id.short()} has a looping or overlong delta chain")
            base_where = f"{where}, delta base {base_id.short()}"
            cursor = self.locate(base_id, base_where)
            chain.append((base_id, cursor, base_where, b""))
            seen.add(base_id)
        base: Buffer | None = None
        for cid, link, link_where, stored in reversed(chain):
            try:
                out = decode(link.codec, stored or self.payload(link), link.raw_length, base)
                if hash_bytes(out) != cid:
                    raise ChunkCorruptError(f"chunk {cid.short()} does not match its hash")
            except CorruptionError as exc:
                _of_copy(exc, cid, link)
                if cid == chunk_id:
                    raise  # the caller adds where and pack
                raise _within(exc, f"{link_where}: {exc} (pack {link.pack_id.short()})") from None
            base = bytes(out) if cid != chunk_id else out
        assert base is not None
        return base

    def _remember(self, base_id: ChunkId, raw: Buffer) -> None:
        if isinstance(raw, memoryview):
            raw = raw.toreadonly()  # what the cache hands out must not be written through
        with self._lock:
            if base_id in self._bases:
                return
            self._bases[base_id] = raw
            self._bases_bytes += len(raw)
            while self._bases_bytes > self.base_cache_bytes and len(self._bases) > 1:
                _old, dropped = self._bases.popitem(last=False)
                self._bases_bytes -= len(dropped)

    def base(self, base_id: ChunkId, where: str, *, scratch: bool = False) -> Buffer:
        """The verified raw bytes of a delta base, from the cache or decoded (and cached) now.

        ``scratch``: decode into a per-thread buffer that the thread's next such call
        overwrites, and do not cache (a save reads each base once, to encode one delta).
        """
        with self._lock:
            cached = self._bases.get(base_id)
            if cached is not None:
                self._bases.move_to_end(base_id)
                return cached
        base_where = f"{where}, delta base {base_id.short()}"
        loc = self.locate(base_id, base_where)
        dest = None
        if scratch:
            buf: np.ndarray | None = getattr(self._local, "scratch", None)
            if buf is None or len(buf) < loc.raw_length:
                buf = self._local.scratch = np.empty(max(loc.raw_length, 1 << 20), np.uint8)
            dest = memoryview(buf[: loc.raw_length])  # type: ignore[arg-type]
        try:  # no copy: the buffer is this call's own
            raw = self._from_store_on_failure(base_id, loc, lambda: self._decode(base_id, loc, base_where, dest))
        except CorruptionError as exc:
            raise _within(exc, f"{base_where}: {exc} (pack {loc.pack_id.short()})") from None
        if not scratch:
            self._remember(base_id, raw)
        return raw

    def verified_payload(self, chunk_id: ChunkId, where: str, loc: ChunkLocation, *, record: bool = True) -> bytes:
        """The stored bytes of a chunk, read once and checked by decoding them (for repack/salvage).
        As every read, a failure through this machine's cached copy of a pack is tried again from
        the store. ``record=False``: a failure is not recorded as damage (salvage tries candidates
        that are often not chunks at all)."""
        def checked() -> bytes:
            payload = self._stored(chunk_id, loc)
            self._decode(chunk_id, loc, where, payload=payload)
            return payload

        try:
            return self._from_store_on_failure(chunk_id, loc, checked, record=record)
        except CorruptionError as exc:
            raise _within(exc, f"{where}: {exc} (pack {loc.pack_id.short()})") from None

    def _stored(self, chunk_id: ChunkId, loc: ChunkLocation) -> bytes:
        """``payload``, a failure marked as this copy's."""
        try:
            return self.payload(loc)
        except CorruptionError as exc:
            raise _of_copy(exc, chunk_id, loc) from None

    def read(self, chunk_id: ChunkId, where: str, loc: ChunkLocation | None = None) -> bytes:
        """The verified raw bytes of one chunk."""
        found = loc or self.locate(chunk_id, where)
        try:
            out = self._from_store_on_failure(chunk_id, found, lambda: self._decode(chunk_id, found, where))
        except CorruptionError as exc:
            raise _within(exc, f"{where}: {exc} (pack {found.pack_id.short()})") from None
        return bytes(out)

    def read_into(self, job: ChunkRead, payload: bytes | None = None) -> None:
        """Read, decode and verify one chunk into its destination (``payload``: its stored bytes,
        when a batched ranged read already fetched them). A failure that involves a pack read from
        the local pack cache of a remote store drops those cached copies and reads once more from
        the store (the cache's disk may rot; the store's copy is the truth)."""
        self._from_store_on_failure(job.chunk_id, job.location, lambda: self._read_into(job, payload),
                                    lambda: self._read_into(job, None))

    def _from_store_on_failure(
        self, chunk_id: ChunkId, loc: ChunkLocation, attempt: Callable[[], T], again: Callable[[], T] | None = None,
        *, record: bool = True,
    ) -> T:
        """``attempt()``; if it fails and packs on the chunk's chain are cached on this machine, those
        copies are dropped and ``again()`` (by default ``attempt``) reads from the store. The copy a
        failure that stands names is recorded damaged (unless ``record`` is False)."""
        try:
            try:
                return attempt()
            except CorruptionError:
                if not self._uncache_chain(chunk_id, loc):
                    raise
                return (again or attempt)()  # from the store, not the local cache
        except CorruptionError as exc:
            if record:
                self._record(exc)
            raise

    def _record(self, exc: CorruptionError) -> None:
        """Tell the store which stored copy failed (best effort: the read's own error is what counts)."""
        copy = exc.copy if isinstance(exc, ChunkCorruptError) else None
        if copy is not None:
            self.store.record_damage(ChunkId(copy[0]), PackId(copy[1]), copy[2])

    def _uncache_chain(self, chunk_id: ChunkId, loc: ChunkLocation) -> bool:
        """Drop the locally cached packs on a chunk's delta chain; True if there were any."""
        if not self.store.pack_cache.enabled:
            return False
        packs: set[PackId] = {loc.pack_id}
        try:
            links, _cached = self._chain(chunk_id, loc, "")
            packs.update(link.pack_id for _, link in links)
        except CorruptionError:
            pass
        with self._uncache_lock:
            dropped = False
            for pack_id in packs:
                if self.store.drop_cached(pack_id):
                    dropped = True
                    with self._lock:
                        self._uncached.add(pack_id)
            if dropped:
                self.clear_cache()
                self._prefetched.clear()
                return True
            with self._lock:  # another thread dropped them while this read had the cached bytes
                return bool(packs & self._uncached)

    def _read_into(self, job: ChunkRead, payload: bytes | None = None) -> None:
        loc = job.location
        try:
            if len(job.dest) != loc.raw_length:
                raise ChunkCorruptError(
                    f"chunk {job.chunk_id.short()} has {loc.raw_length} bytes, expected {len(job.dest)}"
                )
            if loc.codec == Codec.RAW:
                if loc.stored_length != len(job.dest):
                    raise ChunkCorruptError(f"chunk {job.chunk_id.short()} is raw but not stored at its length")
                if payload is not None:
                    if len(payload) != len(job.dest):
                        raise ChunkCorruptError(f"pack {loc.pack_id.short()} is truncated")
                    job.dest[:] = payload
                else:
                    try:
                        self.store.read_pack_into(loc.pack_id, loc.offset, job.dest)
                    except ShortReadError:
                        raise ChunkCorruptError(f"pack {loc.pack_id.short()} is truncated") from None
                if hash_bytes(job.dest) != job.chunk_id:
                    raise ChunkCorruptError(f"chunk {job.chunk_id.short()} does not match its hash")
                return
            if payload is not None and len(payload) != loc.stored_length:
                raise ChunkCorruptError(f"pack {loc.pack_id.short()} is truncated")
            in_place = loc.codec in DECODES_IN_PLACE and not job.dest.readonly
            out = self._decode(job.chunk_id, loc, job.where, job.dest if in_place else None, payload)
            if not in_place:
                job.dest[:] = out
        except CorruptionError as exc:
            _of_copy(exc, job.chunk_id, loc)
            raise _within(exc, f"{job.where}: {exc} (pack {loc.pack_id.short()})") from None

    def plan(self, dest: memoryview, chunks: Sequence[ChunkId], where: str) -> list[ChunkRead]:
        """Split ``dest`` by the chunks' raw lengths; every chunk must be indexed and the sizes must add up."""
        locations = self.index.get_many(chunks)
        reads: list[ChunkRead] = []
        offset = 0
        for cid in chunks:
            loc = locations.get(cid)
            if loc is None:
                raise MissingChunkError(f"{where}: chunk {cid.short()} is not in the index")
            reads.append(ChunkRead(cid, loc, dest[offset:offset + loc.raw_length], where))
            offset += loc.raw_length
        if offset != len(dest):
            raise ChunkCorruptError(f"{where}: chunks hold {offset} bytes, expected {len(dest)}")
        return reads

    def run(self, reads: list[ChunkRead], pool: Executor, progress: Callable[[int], None] | None = None) -> None:
        """Read many chunks in parallel, in pack order; the first error is raised after all finish.

        A chunk wanted at several places is decoded once and copied; delta bases that two or
        more of the chunks' chains go through are decoded once, first, and cached: no chain is
        decoded twice in one restore.
        """
        with self.store.hold_open():  # a local store opens each pack once, not once per chunk
            try:
                self._run(reads, pool, progress)
            finally:
                self._prefetched.clear()

    def _run(self, reads: list[ChunkRead], pool: Executor, progress: Callable[[int], None] | None) -> None:
        reads = sorted(reads, key=lambda r: (r.location.pack_id, r.location.offset))
        # chunks of packs this machine holds (a local repository, or a remote one's pack cache) are
        # read one by one straight into their tensors, in parallel; the rest come from an object
        # store in one batched ranged read per group of a pack's chunks (adjacent ranges merge
        # into one GET), fetched ahead of the decoding (_Fetches)
        if not self.store.is_local:
            packs = {r.location.pack_id for r in reads}
            local_packs = {pid for pid in packs if self.store.has_local_copy(pid)}
            links = self._links_below(reads)
            if len(local_packs) < len(packs) or links:
                self._run_remote(reads, local_packs, links, pool, progress)
                return
        decoded = self._decode_shared_bases(reads)
        unique, copies = self._dedup(reads, decoded, progress)
        self._collect([pool.submit(self.read_into, r) for r in unique], unique, progress)
        self._copy(copies, progress)

    def _decode_shared_bases(self, reads: list[ChunkRead]) -> dict[bytes, Buffer]:
        """Bases that two or more chains go through, decoded once (within the cache's bound)."""
        decoded: dict[bytes, Buffer] = {}
        held = 0
        try:
            for base_id, where in self._shared_bases(reads):
                if held >= self.base_cache_bytes:
                    break  # later chains decode their own bases
                decoded[base_id] = self.base(base_id, where)
                held += len(decoded[base_id])
        except CorruptionError:
            pass  # the reads hit the same damage and report it against their tensors
        return decoded

    @staticmethod
    def _dedup(
        reads: list[ChunkRead], decoded: dict[bytes, Buffer], progress: Callable[[int], None] | None
    ) -> tuple[list[ChunkRead], list[tuple[ChunkRead, ChunkRead]]]:
        """(reads to make, (read, read it copies)): a chunk wanted twice (tied or identical tensors)
        is read once; one decoded (and verified) as a shared base is copied now."""
        primary: dict[bytes, ChunkRead] = {}
        copies: list[tuple[ChunkRead, ChunkRead]] = []
        unique = []
        for r in reads:
            done = decoded.get(r.chunk_id)
            if done is not None and len(done) == len(r.dest):
                r.dest[:] = done
                if progress is not None:
                    progress(len(r.dest))
            elif r.chunk_id in primary and len(primary[r.chunk_id].dest) == len(r.dest):
                copies.append((r, primary[r.chunk_id]))
            else:
                primary.setdefault(r.chunk_id, r)
                unique.append(r)
        return unique, copies

    @staticmethod
    def _collect(futures: list[Future[None]], reads: list[ChunkRead], progress: Callable[[int], None] | None) -> None:
        first: BaseException | None = None
        for fut, r in zip(futures, reads, strict=True):
            exc = fut.exception()
            if exc is not None and first is None:
                first = exc
            if progress is not None:
                progress(len(r.dest))
        if first is not None:
            raise first

    @staticmethod
    def _copy(copies: list[tuple[ChunkRead, ChunkRead]], progress: Callable[[int], None] | None) -> None:
        for r, source in copies:
            r.dest[:] = source.dest
            if progress is not None:
                progress(len(r.dest))

    def _run_remote(
        self, reads: list[ChunkRead], local_packs: set[PackId], links: dict[tuple[bytes, int], ChunkLocation],
        pool: Executor, progress: Callable[[int], None] | None,
    ) -> None:
        """A restore from an object store, in two phases over one stream of fetches.

        Phase 1: the packs that hold delta-chain links of the reads, each pack's links and reads
        in ONE batched request (a link fetched alone is a request, and on moto a copy of its whole
        pack; fetched apart from the reads of its pack, the pack would be requested twice). Their
        chunks that need no base are decoded into place at once; those that do wait (their chains
        may run through packs still in flight), and every link's stored bytes wait in
        ``_prefetched`` for the chain rebuilds. Phase 2: the deferred deltas, the chunks of packs
        held locally and the other packs. Fetches run ahead of the decoding on threads of their
        own (a restore waits on the network, not on the cores), at most ``FETCH_AHEAD_BYTES`` of
        stored bytes fetched and not yet decoded."""
        unique, copies = self._dedup(reads, {}, progress)
        nearby = [r for r in unique if r.location.pack_id in local_packs]
        remote = [r for r in unique if r.location.pack_id not in local_packs]
        link_packs = {key[0] for key in links}
        by_pack: dict[bytes, list[ChunkRead]] = {}
        for r in remote:
            by_pack.setdefault(r.location.pack_id, []).append(r)
        first_jobs: list[_FetchJob] = []
        pack_links: dict[bytes, list[ChunkLocation]] = {}
        for loc in sorted(links.values(), key=lambda x: (x.pack_id, x.offset)):
            pack_links.setdefault(loc.pack_id, []).append(loc)
        for pack_id, locs in pack_links.items():
            groups = _groups(by_pack.get(pack_id, []))
            first_jobs.append(_FetchJob(PackId(pack_id), groups[0] if groups else [], locs))  # links ride along
            first_jobs.extend(_FetchJob(PackId(pack_id), g, []) for g in groups[1:])
        later_jobs = [_FetchJob(g[0].location.pack_id, g, [])
                      for g in _groups([r for r in remote if r.location.pack_id not in link_packs])]

        failures: list[BaseException] = []
        deferred: list[tuple[ChunkRead, bytes]] = []
        lock = threading.Lock()

        def process(job: _FetchJob, got: dict[tuple[int, int], bytes] | BaseException, phase: int) -> int:
            if isinstance(got, BaseException):  # damage where the pack is (missing, short): its reads fail
                if job.group:
                    with lock:
                        failures.append(got)
                return sum(len(r.dest) for r in job.group)
            for x in job.links:
                self._prefetched[(x.pack_id, x.offset)] = got[(x.offset, x.stored_length)]
            filled = 0
            for r in job.group:
                payload = got[(r.location.offset, r.location.stored_length)]
                if phase == 1 and needs_base(r.location.codec):
                    with lock:
                        deferred.append((r, payload))
                    continue
                try:
                    self.read_into(r, payload)
                except CorruptionError as exc:
                    with lock:
                        failures.append(exc)
                filled += len(r.dest)
            return filled

        submitted: list[tuple[Future[None], ChunkRead]] = []

        def barrier() -> None:
            """Between the phases: shared bases decoded once, then the deferred and the local reads."""
            decoded = self._decode_shared_bases([r for r, _ in deferred] + nearby)
            for r, payload in deferred:
                done = decoded.get(r.chunk_id)
                if done is not None and len(done) == len(r.dest):
                    r.dest[:] = done
                    if progress is not None:
                        progress(len(r.dest))
                else:
                    submitted.append((pool.submit(self.read_into, r, payload), r))
            submitted.extend((pool.submit(self.read_into, r), r) for r in nearby)

        try:
            _Fetches(self, pool, progress).run(first_jobs, later_jobs, process, barrier)
        finally:
            for fut, _ in submitted:  # no read still writes into the tensors once this returns
                fut.exception()
        first: BaseException | None = failures[0] if failures else None
        try:
            self._collect([f for f, _ in submitted], [r for _, r in submitted], progress)
        except BaseException as exc:  # noqa: BLE001 - the first of all errors is raised
            first = first or exc
        if first is not None:
            raise first
        self._copy(copies, progress)

    def _links_below(self, reads: list[ChunkRead]) -> dict[tuple[bytes, int], ChunkLocation]:
        """Every delta-chain link below ``reads`` that lies in a pack this machine does not hold and
        is not already a decoded base, by (pack, offset); links that are reads themselves included."""
        links: dict[tuple[bytes, int], ChunkLocation] = {}
        local: dict[bytes, bool] = {}
        lookup = self.index.reader()
        try:
            for r in reads:
                loc: ChunkLocation | None = r.location
                steps = 0
                while (loc is not None and needs_base(loc.codec) and loc.base_id is not None
                       and steps <= MAX_CHAIN_LINKS):
                    with self._lock:
                        if loc.base_id in self._bases:
                            break
                    loc = lookup.get(loc.base_id)
                    steps += 1
                    if loc is not None and loc.stored_length:
                        if loc.pack_id not in local:
                            local[loc.pack_id] = self.store.has_local_copy(loc.pack_id)
                        if not local[loc.pack_id]:  # a cached pack is read where the chain needs it
                            links[(loc.pack_id, loc.offset)] = loc
        finally:
            lookup.close()
        return links

    def _fetch(self, pack_id: PackId, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Ranges of one pack (sorted by offset) from an object store: as ONE request for the span
        that covers them all when they fill at least half of it (the gaps are chunks this restore
        does not need: a request costs more than the bytes between), else as a batch."""
        start = min(off for off, _ in ranges)
        end = max(off + ln for off, ln in ranges)
        needed = sum(ln for _, ln in ranges)
        if len(ranges) < 2 or 2 * needed < end - start:
            return self.store.read_pack_ranges(pack_id, ranges)
        (span,) = self.store.read_pack_ranges(pack_id, [(start, end - start)])
        view = memoryview(span)
        return [bytes(view[off - start: off - start + ln]) for off, ln in ranges]

    def _shared_bases(self, reads: list[ChunkRead]) -> list[tuple[ChunkId, str]]:
        """Bases on the delta chains of two or more of ``reads``, keyframe-most first."""
        seen_by: dict[bytes, int] = {}
        depth_of: dict[bytes, int] = {}
        where_of: dict[bytes, str] = {}
        lookup = self.index.reader()
        try:
            for read in reads:
                chain: list[ChunkId] = []
                loc: ChunkLocation | None = read.location
                while loc is not None and needs_base(loc.codec) and loc.base_id is not None:
                    base_id = loc.base_id
                    if base_id in chain or len(chain) > MAX_CHAIN_LINKS:
                        break
                    chain.append(base_id)
                    seen_by[base_id] = seen_by.get(base_id, 0) + 1
                    where_of.setdefault(base_id, read.where)
                    loc = lookup.get(base_id)
                for height, base_id in enumerate(reversed(chain)):
                    depth_of[base_id] = height
        finally:
            lookup.close()
        shared = [b for b, n in seen_by.items() if n > 1]
        shared.sort(key=lambda b: depth_of[b])
        return [(ChunkId(b), where_of[b]) for b in shared]


#: most stored bytes one batched read of an object store fetches (memory held per worker): more than
#: a whole default-sized pack (64 MiB and a little), so a restore makes about one request per pack
#: (on moto, which copies the whole object for every GET, one 64 MiB GET took 0.53 s where four
#: 16 MiB ranges took 0.95 s)
GROUP_BYTES = 128 << 20


def _groups(reads: list[ChunkRead]) -> list[list[ChunkRead]]:
    """Reads (sorted by pack and offset) cut into runs of one pack of at most ``GROUP_BYTES``."""
    groups: list[list[ChunkRead]] = []
    size = 0
    for r in reads:
        if groups and groups[-1][0].location.pack_id == r.location.pack_id and size + r.location.stored_length \
                <= GROUP_BYTES:
            groups[-1].append(r)
            size += r.location.stored_length
        else:
            groups.append([r])
            size = r.location.stored_length
    return groups


@dataclass(frozen=True, slots=True)
class _FetchJob:
    """One batched read of a pack from an object store: a group of its chunks, and delta-chain links."""

    pack_id: PackId
    group: list[ChunkRead]
    links: list[ChunkLocation]

    def ranges(self) -> list[tuple[int, int]]:
        return sorted({(r.location.offset, r.location.stored_length) for r in self.group}
                      | {(x.offset, x.stored_length) for x in self.links})

    def nbytes(self) -> int:
        return sum(ln for _, ln in self.ranges())


#: stored bytes fetched from an object store and not yet decoded, at most (memory a restore holds)
FETCH_AHEAD_BYTES = 512 << 20
#: concurrent batched reads of a restore from an object store (each one request, or a few)
FETCH_THREADS = 8

_Fetched = dict[tuple[int, int], bytes] | BaseException


class _Fetches:
    """Jobs' fetches run ahead on threads of their own, in order, within ``FETCH_AHEAD_BYTES``;
    each fetched job is decoded on the pool. Phase-2 jobs are decoded only after every phase-1
    job is and ``barrier`` ran (their fetches need not wait)."""

    def __init__(self, reader: ChunkReader, pool: Executor, progress: Callable[[int], None] | None) -> None:
        self.reader = reader
        self.pool = pool
        self.progress = progress
        self._cond = threading.Condition()
        self._held = 0

    def _fetch(self, job: _FetchJob) -> _Fetched:
        ranges = job.ranges()
        try:
            return dict(zip(ranges, self.reader._fetch(job.pack_id, ranges), strict=True))
        except CorruptionError as exc:
            return exc

    def _reserve(self, size: int, waiting_on_fetches: bool) -> bool:
        """Count ``size`` bytes as held; False (nothing counted) when over the bound and fetches in
        flight (take their results first); with none in flight wait for decodes to free room."""
        with self._cond:
            if self._held and self._held + size > FETCH_AHEAD_BYTES:
                if waiting_on_fetches:
                    return False
                self._cond.wait_for(lambda: not self._held or self._held + size <= FETCH_AHEAD_BYTES)
            self._held += size
            return True

    def _release(self, size: int) -> None:
        with self._cond:
            self._held -= size
            self._cond.notify_all()

    def run(
        self,
        first: list[_FetchJob],
        later: list[_FetchJob],
        process: Callable[[_FetchJob, _Fetched, int], int],
        barrier: Callable[[], None],
    ) -> None:
        jobs = [(1, j) for j in first] + [(2, j) for j in later]
        sizes = [j.nbytes() for _, j in jobs]
        fetching: deque[tuple[int, _FetchJob, int, Future[_Fetched]]] = deque()
        decoding: dict[int, list[Future[int]]] = {1: [], 2: []}
        io = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="cas-fetch")
        nxt = 0
        barrier_done = False
        try:
            while nxt < len(jobs) or fetching:
                while nxt < len(jobs) and self._reserve(sizes[nxt], bool(fetching)):
                    phase, job = jobs[nxt]
                    fetching.append((phase, job, sizes[nxt], io.submit(self._fetch, job)))
                    nxt += 1
                phase, job, size, fut = fetching.popleft()
                got = fut.result()  # a StorageError (unavailable, denied) ends the restore
                if phase == 2 and not barrier_done:
                    self._drain(decoding[1])
                    barrier()
                    barrier_done = True
                decoding[phase].append(self.pool.submit(self._work, process, job, got, phase, size))
            if not barrier_done:
                self._drain(decoding[1])
                barrier()
        finally:
            for _, _, _, pending in fetching:
                pending.cancel()
            io.shutdown(wait=True, cancel_futures=True)
            for futures in decoding.values():
                for f in futures:
                    f.exception()  # no decode still writes into the tensors once this returns
        self._drain(decoding[2])

    def _work(self, process: Callable[[_FetchJob, _Fetched, int], int], job: _FetchJob, got: _Fetched,
              phase: int, size: int) -> int:
        try:
            return process(job, got, phase)
        finally:
            self._release(size)

    def _drain(self, futures: list[Future[int]]) -> None:
        for f in futures:
            filled = f.result()
            if self.progress is not None and filled:
                self.progress(filled)
        futures.clear()
