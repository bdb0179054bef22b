"""Reading chunks back: pread from packs, decode, verify the BLAKE3 id, copy into place."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cas.backends import ShortReadError
from cas.codec import DECODES_IN_PLACE, Buffer, Codec, decode, needs_base, patch
from cas.errors import ChunkCorruptError, CorruptionError, MissingChunkError
from cas.ids import ChunkId, PackId, hash_bytes
from cas.index import ChunkLocation, Index

if TYPE_CHECKING:
    from cas.layout import Store

BASE_CACHE_BYTES = 256 << 20  # decoded delta bases kept for reuse within and across loads
MAX_CHAIN_LINKS = 1024  # a longer chain is damage (the saver never builds one): refuse, do not loop


@dataclass(frozen=True, slots=True)
class ChunkRead:
    chunk_id: ChunkId
    location: ChunkLocation
    dest: memoryview
    where: str  # "snapshot S, tensor T" for messages


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
        stored = self.payload(loc) if payload is None else payload
        if not needs_base(loc.codec):
            out = decode(loc.codec, stored, loc.raw_length, None, dest)
            if hash_bytes(out) != chunk_id:
                raise ChunkCorruptError(f"chunk {chunk_id.short()} does not match its hash")
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
                if cid == chunk_id:
                    raise  # the caller adds where and pack
                raise type(exc)(f"{link_where}: {exc} (pack {link.pack_id.short()})") from None
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
        try:
            try:
                raw = self._decode(base_id, loc, base_where, dest)  # no copy: the buffer is this call's own
            except CorruptionError:
                if not self._uncache_chain(base_id, loc):
                    raise
                raw = self._decode(base_id, loc, base_where, dest)  # from the store, not the local cache
        except CorruptionError as exc:
            raise type(exc)(f"{base_where}: {exc} (pack {loc.pack_id.short()})") from None
        if not scratch:
            self._remember(base_id, raw)
        return raw

    def verified_payload(self, chunk_id: ChunkId, where: str, loc: ChunkLocation) -> bytes:
        """The stored bytes of a chunk, read once and checked by decoding them (for repack/salvage)."""
        try:
            payload = self.payload(loc)
            self._decode(chunk_id, loc, where, payload=payload)
        except CorruptionError as exc:
            raise type(exc)(f"{where}: {exc} (pack {loc.pack_id.short()})") from None
        return payload

    def read(self, chunk_id: ChunkId, where: str, loc: ChunkLocation | None = None) -> bytes:
        """The verified raw bytes of one chunk."""
        loc = loc or self.locate(chunk_id, where)
        try:
            try:
                out = self._decode(chunk_id, loc, where)
            except CorruptionError:
                if not self._uncache_chain(chunk_id, loc):
                    raise
                out = self._decode(chunk_id, loc, where)  # from the store, not the local cache
        except CorruptionError as exc:
            raise type(exc)(f"{where}: {exc} (pack {loc.pack_id.short()})") from None
        return bytes(out)

    def read_into(self, job: ChunkRead, payload: bytes | None = None) -> None:
        """Read, decode and verify one chunk into its destination (``payload``: its stored bytes,
        when a batched ranged read already fetched them). A failure that involves a pack read from
        the local pack cache of a remote store drops those cached copies and reads once more from
        the store (the cache's disk may rot; the store's copy is the truth)."""
        try:
            self._read_into(job, payload)
        except CorruptionError:
            if not self._uncache_chain(job.chunk_id, job.location):
                raise
            self._read_into(job, None)

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
            raise type(exc)(f"{job.where}: {exc} (pack {loc.pack_id.short()})") from None

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
        first: BaseException | None = None
        deferred: list[tuple[ChunkRead, bytes]] = []
        if not self.store.is_local:
            first, deferred, handled = self._read_link_packs(reads, pool, progress)
            if handled:
                reads = [r for r in reads if id(r) not in handled]
        decoded: dict[bytes, Buffer] = {}
        held = 0
        try:
            for base_id, where in self._shared_bases(reads):
                if held >= self.base_cache_bytes:
                    break  # within the cache's bound; later chains decode their own bases
                decoded[base_id] = self.base(base_id, where)
                held += len(decoded[base_id])
        except CorruptionError:
            pass  # the reads below hit the same damage and report it against their tensors
        primary: dict[bytes, ChunkRead] = {}
        copies: list[tuple[ChunkRead, ChunkRead]] = []  # the same chunk twice (tied or identical tensors)
        unique = []
        for r in reads:
            done = decoded.get(r.chunk_id)
            if done is not None and len(done) == len(r.dest):  # decoded (and verified) as a shared base
                r.dest[:] = done
                if progress is not None:
                    progress(len(r.dest))
            elif r.chunk_id in primary and len(primary[r.chunk_id].dest) == len(r.dest):
                copies.append((r, primary[r.chunk_id]))
            else:
                primary.setdefault(r.chunk_id, r)
                unique.append(r)
        # chunks of packs this machine holds (a local repository, or a remote one's pack cache) are
        # read one by one straight into their tensors, in parallel; the rest, from an object store,
        # with one batched ranged read per group of a pack's chunks (adjacent ranges merge into one
        # GET), not one request per chunk
        local_packs = {pid for pid in {r.location.pack_id for r in unique} if self.store.has_local_copy(pid)}
        nearby = [r for r in unique if r.location.pack_id in local_packs]
        remote = [r for r in unique if r.location.pack_id not in local_packs]
        groups = pool.map(self._read_group, _groups(remote)) if remote else iter(())  # first: they wait on the net
        futures = [pool.submit(self.read_into, r, payload) for r, payload in deferred]
        futures += [pool.submit(self.read_into, r) for r in nearby]
        for fut, r in zip(futures, [r for r, _ in deferred] + nearby, strict=True):
            exc = fut.exception()
            if exc is not None and first is None:
                first = exc
            if progress is not None:
                progress(len(r.dest))
        for exc, filled in groups:
            if exc is not None and first is None:
                first = exc
            if progress is not None:
                progress(filled)
        if first is not None:
            raise first
        for r, source in copies:
            r.dest[:] = source.dest
            if progress is not None:
                progress(len(r.dest))

    def _read_link_packs(
        self, reads: list[ChunkRead], pool: Executor, progress: Callable[[int], None] | None
    ) -> tuple[BaseException | None, list[tuple[ChunkRead, bytes]], set[int]]:
        """From an object store, first the packs that hold delta-chain links of ``reads``, each
        pack's links and reads in ONE batched request (each link fetched alone would be a request,
        and on moto a copy of its whole pack; fetched apart from the reads of the same pack, the
        pack would be requested twice). Their chunks that need no base are decoded into place at
        once; those that do are returned with their stored bytes (deferred: their chains may run
        through packs still in flight), and every link's stored bytes wait in ``_prefetched`` for
        the chain rebuilds. Returns (first error, deferred reads, ids of the reads handled)."""
        links = self._links_below(reads)
        if not links:
            return None, [], set()
        link_packs = {key[0] for key in links}
        by_pack: dict[bytes, list[ChunkRead]] = {}
        for r in reads:
            if r.location.pack_id in link_packs:
                by_pack.setdefault(r.location.pack_id, []).append(r)
        jobs: list[tuple[list[ChunkRead], list[ChunkLocation]]] = []
        pack_links: dict[bytes, list[ChunkLocation]] = {}
        for loc in sorted(links.values(), key=lambda x: (x.pack_id, x.offset)):
            pack_links.setdefault(loc.pack_id, []).append(loc)
        for pack_id, locs in pack_links.items():
            groups = _groups(by_pack.get(pack_id, []))
            if not groups:
                jobs.append(([], locs))
                continue
            jobs.append((groups[0], locs))  # the links ride with the pack's first group
            jobs.extend((g, []) for g in groups[1:])

        def run(job: tuple[list[ChunkRead], list[ChunkLocation]]) -> tuple[BaseException | None, int,
                                                                             list[tuple[ChunkRead, bytes]]]:
            group, locs = job
            pack_id = (group[0].location if group else locs[0]).pack_id
            wanted = sorted({(r.location.offset, r.location.stored_length) for r in group}
                            | {(x.offset, x.stored_length) for x in locs})
            try:
                got = dict(zip(wanted, self._fetch(pack_id, wanted), strict=True))
            except CorruptionError as exc:
                if not group:
                    return None, 0, []  # the chain rebuilds read (and report) the links one by one
                return exc, sum(len(r.dest) for r in group), []
            later: list[tuple[ChunkRead, bytes]] = []
            for x in locs:
                self._prefetched[(x.pack_id, x.offset)] = got[(x.offset, x.stored_length)]
            first: BaseException | None = None
            filled = 0
            for r in group:
                payload = got[(r.location.offset, r.location.stored_length)]
                if needs_base(r.location.codec):
                    later.append((r, payload))
                    continue
                try:
                    self.read_into(r, payload)
                except CorruptionError as exc:
                    first = first or exc
                filled += len(r.dest)
            return first, filled, later

        first: BaseException | None = None
        deferred: list[tuple[ChunkRead, bytes]] = []
        for exc, filled, later in pool.map(run, jobs):
            first = first or exc
            deferred.extend(later)
            if progress is not None and filled:
                progress(filled)
        handled = {id(r) for group, _ in jobs for r in group}
        return first, deferred, handled

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

    def _read_group(self, group: list[ChunkRead]) -> tuple[BaseException | None, int]:
        """Chunks of one pack, fetched in one ``read_ranges`` call, then decoded and verified."""
        pack_id = group[0].location.pack_id
        first: BaseException | None = None
        try:
            payloads = self._fetch(pack_id, [(r.location.offset, r.location.stored_length) for r in group])
        except CorruptionError as exc:
            return exc, sum(len(r.dest) for r in group)
        for r, payload in zip(group, payloads, strict=True):
            try:
                self.read_into(r, payload)
            except CorruptionError as exc:
                first = first or exc
        return first, sum(len(r.dest) for r in group)

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
