"""Garbage collection: mark what refs reach, sweep dead packs, repack sparse ones, clear crash leftovers.

Safety beside writers (FORMAT.md §9): GC holds the repository lock exclusively, and
every save holds it shared from its first dedup lookup to its ref, so no save can
commit a snapshot that references a chunk GC removed. With no save in flight the
lock is free at once, so one run on an idle repository returns all unreachable space.

Crash safety: repacked chunks are written to new sealed packs first, then one LMDB
transaction moves the index, then old pack files are unlinked. A crash between any
two steps leaves only unreferenced packs or files, which the next run removes.
"""

from __future__ import annotations

import resource
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from cas.errors import CorruptionError, GcRefusedError, UsageError
from cas.faults import crash_point
from cas.ids import ChunkId, PackId
from cas.index import ChunkLocation
from cas.pack import FOOTER_ENTRY, HEADER, RECORD_HEADER, TRAILER, iter_pack_files, pack_path
from cas.reach import reached_chunks, snapshot_label
from cas.saver import PackSink
from cas.store import fsync_dir

if TYPE_CHECKING:
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
    mark_seconds: float = 0.0
    sweep_seconds: float = 0.0
    peak_rss_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mark(repo: Repository) -> tuple[set[bytes], int]:
    """Every chunk a ref reaches (nodes, tensor chunks, and delta bases, transitively)."""
    live: set[bytes] = set()
    refs = 0
    for name in repo.store.ref_names():
        try:
            sid = repo.store.read_ref(name)
            live.update(cid for cid, _ in reached_chunks(repo.reader, sid, snapshot_label(name, sid)))
        except FileNotFoundError:
            continue  # removed by a concurrent forget / rm: nothing to keep for it
        except CorruptionError as exc:
            raise GcRefusedError(
                f"gc stopped before deleting anything: {exc}. Run `cas check --repair` (or `cas rm` the snapshot)"
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


def collect_garbage(repo: Repository, *, repack_below: float = 0.5, dry_run: bool = False) -> GcReport:
    if not 0.0 <= repack_below <= 1.0:
        raise UsageError(f"repack_below must be between 0 and 1, got {repack_below}")
    report = GcReport(dry_run=dry_run)
    store = repo.store
    with store.lock(exclusive=True):
        _reset_peak_rss()
        t0 = time.perf_counter()
        live, report.snapshots = mark(repo)
        report.live_chunks = len(live)
        report.mark_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()

        indexed_packs = repo.index.packs()
        live_bytes: dict[bytes, int] = defaultdict(int)  # what the live records take in the file
        live_count: dict[bytes, int] = defaultdict(int)
        referenced: set[bytes] = set()
        dead: list[bytes] = []
        per_record = RECORD_HEADER.size + FOOTER_ENTRY.size
        for cid, pack, stored, _base in repo.index.iter_compact():
            referenced.add(pack)
            if cid in live:
                live_bytes[pack] += stored + per_record
                live_count[pack] += 1
            else:
                dead.append(cid)
        report.dead_chunks = len(dead)
        on_disk = dict(iter_pack_files(store.packs_dir))
        delete: list[PackId] = []
        repack: list[PackId] = []
        for pack_id, (size, count) in indexed_packs.items():
            if live_count.get(pack_id, 0) == 0:
                delete.append(pack_id)
            elif live_count[pack_id] < count and live_bytes[pack_id] < repack_below * size:
                repack.append(pack_id)  # a fully live pack is never rewritten, whatever its overhead
        orphans = [pid for pid in on_disk if pid not in indexed_packs and pid not in referenced]
        temps = [p for p in store.tmp_dir.iterdir() if p.is_file()]
        report.packs_deleted = len(delete)
        report.packs_repacked = len(repack)
        report.orphan_packs_deleted = len(orphans)
        report.temp_files_deleted = len(temps)

        def size_of(pid: PackId) -> int:
            path = on_disk.get(pid)
            return path.stat().st_size if path is not None and path.exists() else 0

        freed = sum(size_of(p) for p in (*delete, *repack, *orphans)) + sum(p.stat().st_size for p in temps)
        if dry_run:
            report.bytes_freed = freed - _repacked_size(repo, repack, live, int(repo.config["pack_size"]))
            report.sweep_seconds = time.perf_counter() - t1
            report.peak_rss_bytes = _peak_rss()
            return report

        # 1. copy the live chunks of sparse packs into new packs (verified as they are read)
        sink = PackSink(lambda: store.new_temp_path("gc"), store.packs_dir, int(repo.config["pack_size"]))
        keep_old: set[PackId] = set()
        if repack:
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
                            keep_old.add(pack_id)  # never move (or drop) what we cannot read: check handles it
                            continue
                        sink.add(cid, loc.kind, loc.codec, payload, loc.raw_length, loc.base_id)  # type: ignore[arg-type]
                new_packs = sink.finish()
            except BaseException:
                sink.abort()
                raise
        else:
            new_packs = []
        report.packs_written = len(new_packs)
        crash_point("gc_repacked")
        # 2. one index transaction
        # A repack can write a pack byte-identical to one it read (same footer, same name): that
        # pack is live again and must neither leave the index nor be unlinked.
        rewritten = {p.pack_id for p in new_packs}
        removed_packs = [p for p in (*delete, *repack) if p not in keep_old and p not in rewritten]
        stale_snapshots = set(repo.index.snapshot_ids()) - {bytes(sid) for _name, sid in repo.refs()}
        repo.index.apply_gc(dead, new_packs, removed_packs, stale_snapshots)
        crash_point("gc_index_committed")
        # 3. unlink what nothing refers to any more. A repack may rewrite byte-identical packs a killed
        # GC left as orphans (same content, same name): those are live again and must stay.
        orphans = [p for p in orphans if p not in rewritten]
        repo.reader.close()
        for pid in (*removed_packs, *orphans):
            pack_path(store.packs_dir, pid).unlink(missing_ok=True)
            crash_point("gc_unlinked")
        for temp in temps:
            temp.unlink(missing_ok=True)
        fsync_dir(store.packs_dir)
        for sub in store.packs_dir.iterdir():
            if sub.is_dir():
                fsync_dir(sub)
        report.bytes_freed = freed - sum(size_of(p) for p in keep_old) - sum(p.size for p in new_packs)
        report.sweep_seconds = time.perf_counter() - t1
        report.peak_rss_bytes = _peak_rss()
    return report


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
