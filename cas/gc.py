"""Garbage collection: mark what refs reach, sweep dead packs, repack sparse ones, clear crash leftovers.

What is stored is read from the packs (``cas.storeview``), never taken from the index
alone: the index is brought in line with the pack footers first, so a stale or lost
index cannot make a live pack look like an orphan. Packs whose footer does not check
are never deleted.

Safety beside writers (FORMAT.md §9): GC holds the repository lock exclusively, and
every save holds it shared from its first dedup lookup to its ref, so no save can
commit a snapshot that references a chunk GC removed. With no save in flight the
lock is free at once, so one run on an idle repository returns all unreachable space.

Crash safety: repacked chunks are written to new sealed packs first, then one LMDB
transaction moves the index, then old pack files are unlinked. A crash between any
two steps leaves only unreferenced packs or files, which the next run removes.
"""

from __future__ import annotations

import errno
import logging
import resource
import stat
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cas.codec import needs_base
from cas.errors import CorruptionError, FormatVersionError, GcRefusedError, StorageError, UsageError
from cas.faults import crash_point
from cas.ids import ChunkId, PackId
from cas.index import ChunkLocation, SealedPack
from cas.pack import FOOTER_ENTRY, HEADER, RECORD_HEADER, TRAILER, PackEntry
from cas.reach import reached_chunks, snapshot_label
from cas.storeview import StoreView, choose_copies, reconcile, scan_store

log = logging.getLogger("cas")
#: an unfinished multipart upload older than this belongs to a saver that died (none runs beside gc)
INCOMPLETE_UPLOAD_AGE_S = 3600.0

if TYPE_CHECKING:
    from cas.layout import Store
    from cas.repository import Repository


@dataclass
class GcReport:
    dry_run: bool
    snapshots: int = 0
    live_chunks: int = 0
    dead_chunks: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_written: int = 0
    orphan_packs_deleted: int = 0
    temp_files_deleted: int = 0
    bytes_freed: int = 0
    #: pack files whose footer does not check: gc never deletes them (run `cas check --repair`)
    unreadable_packs: list[str] = field(default_factory=list)
    repack_skipped: bool = False
    incomplete_uploads_aborted: int = 0
    mark_seconds: float = 0.0
    sweep_seconds: float = 0.0
    peak_rss_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mark(repo: Repository) -> tuple[set[bytes], int]:
    """Every chunk a ref reaches (nodes, tensor chunks, and delta bases, transitively).

    Run after ``reconcile``: the index then agrees with the packs, so the bases it names
    are the bases of the copies readers use.
    """
    live: set[bytes] = set()
    refs = 0
    for name in repo.store.ref_names():
        try:
            sid = repo.store.read_ref(name)
            live.update(cid for cid, _ in reached_chunks(repo.reader, sid, snapshot_label(name, sid)))
        except FileNotFoundError:
            continue  # removed by a concurrent forget / rm: nothing to keep for it
        except (CorruptionError, FormatVersionError) as exc:
            raise GcRefusedError(
                f"gc stopped before deleting anything: {exc}. Snapshot {name!r} may reach any chunk while its "
                f"manifest cannot be read: restore the missing or damaged pack, or give the snapshot up with "
                f"`cas rm {name}`; `cas check --repair` salvages what still verifies"
            ) from None
        refs += 1
    bases: dict[bytes, bytes] = {}
    for cid, _pack, _stored, base in repo.index.iter_compact():
        if base is not None:
            bases[cid] = base
    if bases:
        stack = [cid for cid in live if cid in bases]
        while stack:
            base = bases[stack.pop()]
            if base not in live:
                live.add(base)
                if base in bases:
                    stack.append(base)
    return live, refs


def temp_leftovers(tmp_dir: Path) -> list[Path]:
    """Files in ``tmp/`` that cas wrote and a crash left: regular files named ``*.tmp``.

    A ``tmp`` that is a symlink, and links or directories inside it, are never followed:
    gc deletes only what it can tell is its own.
    """
    if tmp_dir.is_symlink() or not tmp_dir.is_dir():
        if tmp_dir.is_symlink():
            log.warning("cas: %s is a symlink; gc leaves it and what it points to alone", tmp_dir)
        return []
    out = []
    for path in tmp_dir.iterdir():
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISREG(mode) and path.name.endswith(".tmp"):
            out.append(path)
    return out


def collect_garbage(repo: Repository, *, repack_below: float = 0.5, dry_run: bool = False) -> GcReport:
    if not isinstance(repack_below, (int, float)) or not 0.0 <= repack_below <= 1.0:
        raise UsageError(f"repack_below must be between 0 and 1, got {repack_below!r}")
    report = GcReport(dry_run=dry_run)
    store = repo.store
    with store.lock(exclusive=True):
        _reset_peak_rss()
        t0 = time.perf_counter()
        # What is stored comes from the packs, never from the index alone (it may be stale or lost).
        view = scan_store(store)
        unindexed_before = set(view.packs) - set(repo.index.packs())
        reconcile(repo.index, view)  # the cache brought in line with the packs (dry runs too: it is a cache)
        report.unreadable_packs = sorted(p.hex() for p in view.unreadable)
        for attempt in range(4):
            live, report.snapshots = mark(repo)
            report.live_chunks = len(live)
            report.mark_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            dead, delete, repack, location, unindexed = _plan(repo, view, live, repack_below)
            if not dry_run and attempt < 3 and _index_healed(repo, view, unindexed):
                continue  # live chunks whose chains resolve again (a base re-saved): indexed, plan again
            # A pack about to go may hold the only good copy of a live chunk the index places elsewhere
            # (a duplicate): drop it only once the indexed copy verifies; else the index is pointed at
            # the good copy, and mark and plan run again (that copy's delta bases must be live too).
            if dry_run or attempt == 3 or not _guard_duplicates(repo, view, [*delete, *repack], live, location):
                break
        report.dead_chunks = len(dead)
        keep_old: set[PackId] = set()
        temps = temp_leftovers(store.tmp_dir)
        report.packs_deleted = len(delete)
        report.packs_repacked = len(repack)
        report.orphan_packs_deleted = sum(1 for p in delete if p in unindexed_before)
        report.temp_files_deleted = len(temps)
        temp_bytes = sum(_size(p) for p in temps)
        freed = sum(view.sizes[p] for p in (*delete, *repack)) + temp_bytes
        if dry_run:
            report.bytes_freed = freed - _repacked_size(repo, repack, live, int(repo.config["pack_size"]))
            report.sweep_seconds = time.perf_counter() - t1
            report.peak_rss_bytes = _peak_rss()
            return report

        # 1. copy the live chunks of sparse packs into new packs (verified as they are read)
        new_packs, unmoved = _repack(repo, repack, live, report)
        keep_old |= unmoved
        report.packs_written = len(new_packs)
        crash_point("gc_repacked")
        # 2. one index transaction
        # A repack can write a pack byte-identical to one it read (same footer, same name): that
        # pack is live again and must neither leave the index nor be unlinked.
        rewritten = {p.pack_id for p in new_packs}
        removed_packs = [p for p in (*delete, *repack) if p not in keep_old and p not in rewritten]
        stale_snapshots = set(repo.index.snapshot_ids()) - {bytes(sid) for _name, sid in repo.refs()}
        moved = [(bytes(e.chunk_id), ChunkLocation.of(p.pack_id, e)) for p in new_packs for e in p.entries]
        new_rows = [(p.pack_id, p.size, len(p.entries)) for p in new_packs]

        def commit() -> None:
            repo.index.apply(put_chunks=moved, remove_chunks=dead, put_packs=new_rows,
                             remove_packs=removed_packs, remove_snapshots=stale_snapshots)

        try:
            commit()
        except StorageError:
            # A full disk: LMDB needs pages to commit. Packs that hold only dead records can go
            # first (a crash now leaves index entries of dead chunks in missing packs: opening
            # detects that and drops them, and saves never dedup against a missing pack), then
            # the commit is tried again.
            _unlink_packs(store, [p for p in delete if p not in rewritten])
            commit()
        crash_point("gc_index_committed")
        # 3. on an object store, one index object for the packs that remain replaces the old ones
        #    (written before they go: a crash leaves duplicates, which readers take either way)
        if not store.is_local and (removed_packs or new_packs or len(view.index_objects) > 1):
            gone = set(removed_packs)
            remaining = [(pid, view.sizes[pid], _footer_bytes(entries)) for pid, entries in view.packs.items()
                         if pid not in gone]
            remaining += [(p.pack_id, p.size, _footer_bytes(p.entries)) for p in new_packs
                          if p.pack_id not in view.packs]
            written = store.write_index_object(remaining)
            store.delete_index_objects([k for k in view.index_objects if k != written])
        # 4. unlink what nothing refers to any more
        _unlink_packs(store, removed_packs)
        for temp in temps:
            temp.unlink(missing_ok=True)
        # uploads a killed saver left unfinished (multipart, on object stores): no save is in flight now
        report.incomplete_uploads_aborted = store.backend.cleanup_incomplete(older_than_s=INCOMPLETE_UPLOAD_AGE_S)
        report.bytes_freed = freed - sum(view.sizes[p] for p in keep_old if p in view.sizes) - sum(
            p.size for p in new_packs
        )
        report.sweep_seconds = time.perf_counter() - t1
        report.peak_rss_bytes = _peak_rss()
    return report


def _footer_bytes(entries: list[PackEntry]) -> bytes:
    return b"".join(e.footer_bytes() for e in entries)


def _plan(
    repo: Repository, view: StoreView, live: set[bytes], repack_below: float
) -> tuple[list[bytes], list[PackId], list[PackId], dict[bytes, bytes], set[bytes]]:
    """Dead index entries, packs to delete, packs to repack, where each live chunk is indexed, and the
    live chunks the index names nowhere (see ``_unindexed_live``)."""
    live_bytes: dict[bytes, int] = defaultdict(int)  # what the live records take in the file
    live_count: dict[bytes, int] = defaultdict(int)
    location: dict[bytes, bytes] = {}
    dead: list[bytes] = []
    per_record = RECORD_HEADER.size + FOOTER_ENTRY.size
    for cid, pack, stored, _base in repo.index.iter_compact():
        if cid in live:
            live_bytes[pack] += stored + per_record
            live_count[pack] += 1
            location[cid] = pack
        else:
            dead.append(cid)
    delete: list[PackId] = []
    repack: list[PackId] = []
    unindexed = _unindexed_live(view, live, location)
    for pack_id, entries in view.packs.items():  # unreadable packs are never deleted nor repacked
        if any(bytes(e.chunk_id) in unindexed for e in entries):
            continue  # the only copies of live chunks the index lost (a base gone): kept whole, never proven dead
        if live_count.get(pack_id, 0) == 0:
            delete.append(pack_id)
        elif live_count[pack_id] < len(entries) and live_bytes[pack_id] < repack_below * view.sizes[pack_id]:
            repack.append(pack_id)  # a fully live pack is never rewritten, whatever its overhead
    return dead, delete, repack, location, unindexed


def _unindexed_live(view: StoreView, live: set[bytes], location: dict[bytes, bytes]) -> set[bytes]:
    """Live chunks the index names nowhere, but a pack holds (reconcile drops a delta whose base
    chain no longer resolves: a later save of the base's bytes heals it, so its record must stay).
    The delta bases those records name are added to ``live`` (transitively) and to the result
    where the index does not name them either."""
    held: dict[bytes, list[bytes]] = {}  # chunk -> the bases its copies name
    for entries in view.packs.values():
        for e in entries:
            held.setdefault(bytes(e.chunk_id), [])
            if e.base_id is not None and needs_base(e.codec):
                held[bytes(e.chunk_id)].append(bytes(e.base_id))
    unindexed = {cid for cid in live if cid not in location and cid in held}
    stack = list(unindexed)
    while stack:
        for base in held.get(stack.pop(), ()):
            if base not in live:
                live.add(base)
            if base not in location and base in held and base not in unindexed:
                unindexed.add(base)
                stack.append(base)
    return unindexed


def _index_healed(repo: Repository, view: StoreView, unindexed: set[bytes]) -> bool:
    """Index the live chunks the index lost whose copies resolve to a keyframe again (a save wrote
    the lost base anew after ``check --repair``): the snapshots that need them load again."""
    if not unindexed:
        return False
    chosen = choose_copies(view.copies(), avoid=view.damaged)
    heal = [(cid, chosen[cid][0]) for cid in unindexed if cid in chosen]
    if heal:
        repo.index.apply(put_chunks=heal)
    return bool(heal)


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except FileNotFoundError:
        return 0


def _unlink_packs(store: Store, pack_ids: list[PackId]) -> None:
    for pid in pack_ids:
        store.delete_pack(pid)  # durable when it returns (the local backend fsyncs the directory)
        crash_point("gc_unlinked")


def _guard_duplicates(
    repo: Repository, view: StoreView, going: list[PackId], live: set[bytes], location: dict[bytes, bytes]
) -> bool:
    """Whether a pack among ``going`` holds the good copy of a live chunk whose indexed copy
    (elsewhere) does not verify: then the index is pointed at the good copy (and gc plans again)."""
    keep: set[PackId] = set()
    checked: dict[bytes, bool] = {}
    for pack_id in going:
        for entry in view.packs[pack_id]:
            cid = bytes(entry.chunk_id)
            if cid not in live or location.get(cid) == pack_id:
                continue
            if cid not in checked:
                try:
                    repo.reader.read(ChunkId(cid), f"gc check of chunk {ChunkId(cid).short()}")
                    checked[cid] = True
                except CorruptionError:
                    checked[cid] = False
            if checked[cid]:
                continue
            loc = ChunkLocation.of(pack_id, entry)
            try:
                repo.reader.verified_payload(ChunkId(cid), f"gc check of pack {pack_id.short()}", loc)
            except CorruptionError:
                continue
            repo.index.apply(put_chunks=[(cid, loc)])
            checked[cid] = True
            keep.add(pack_id)
    return bool(keep)


def _repack(
    repo: Repository, repack: list[PackId], live: set[bytes], report: GcReport
) -> tuple[list[SealedPack], set[PackId]]:
    """New packs holding the live chunks of ``repack``, and the packs that must stay (a chunk in
    them did not verify: never move or drop what we cannot read; check handles it). On a full
    disk nothing is repacked (deleting whole dead packs still frees space)."""
    if not repack:
        return [], set()
    sink = repo.pack_sinks("gc")
    keep_old: set[PackId] = set()
    moving: dict[PackId, list[tuple[ChunkId, ChunkLocation]]] = defaultdict(list)
    repack_set = set(repack)
    for cid, loc in repo.index.iter_chunks():
        if loc.pack_id in repack_set and cid in live:
            moving[loc.pack_id].append((cid, loc))
    try:
        for pack_id in repack:
            for cid, loc in sorted(moving[pack_id], key=lambda x: x[1].offset):
                try:  # the bytes written are the bytes verified
                    payload = repo.reader.verified_payload(cid, f"gc repack of pack {pack_id.short()}", loc)
                except CorruptionError:
                    keep_old.add(pack_id)
                    continue
                sink.add(cid, loc.kind, loc.codec, payload, loc.raw_length, loc.base_id)  # type: ignore[arg-type]
        return sink.finish(), keep_old
    except OSError as exc:
        sink.abort()
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(f"gc could not write a repacked pack: {exc}; nothing was deleted") from exc
        log.warning("cas: no space to repack (%s); gc deletes whole dead packs only", exc)
        report.repack_skipped = True
        return [], set(repack)
    except BaseException:
        sink.abort()
        raise


def _reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: /proc/self/clear_refs), so the report is GC's own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _repacked_size(repo: Repository, repack: list[PackId], live: set[bytes], target: int) -> int:
    """Bytes the repack would write: the same packing as ``PackSink`` (for dry runs)."""
    moving: dict[PackId, list[int]] = defaultdict(list)
    wanted = set(repack)
    for cid, loc in repo.index.iter_chunks():
        if loc.pack_id in wanted and cid in live:
            moving[loc.pack_id].append(loc.offset)
            moving[loc.pack_id].append(loc.stored_length)
    total, size, count = 0, 0, 0
    for pack_id in repack:
        pairs = sorted(zip(moving[pack_id][::2], moving[pack_id][1::2], strict=True))
        for _offset, stored in pairs:
            size = size or HEADER.size
            size += RECORD_HEADER.size + stored
            count += 1
            if size >= target:
                total += size + count * FOOTER_ENTRY.size + TRAILER.size
                size, count = 0, 0
    if count:
        total += size + count * FOOTER_ENTRY.size + TRAILER.size
    return total
