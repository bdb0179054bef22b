"""`check --repair`: find damaged packs, keep what can still be read, and say exactly what was lost.

A damaged pack's readable chunks are copied into a new pack, its unreadable chunks
are removed from the index, and the damaged file is moved to ``quarantine/``.
Snapshots are never dropped: the report lists every snapshot and tensor that
reaches a lost chunk (a later save of the same bytes writes those chunks again
and heals them).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cas.errors import CorruptionError, FormatVersionError
from cas.ids import ChunkId, PackId
from cas.index import ChunkLocation
from cas.pack import PackEntry, iter_pack_files, pack_path, read_footer, scan_records
from cas.reach import reached_chunks, snapshot_label
from cas.saver import PackSink
from cas.store import fsync_dir

if TYPE_CHECKING:
    from cas.repository import Repository


@dataclass
class CheckReport:
    repaired: bool
    packs_checked: int = 0
    damaged_packs: list[str] = field(default_factory=list)
    lost_chunks: list[str] = field(default_factory=list)
    salvaged_chunks: int = 0
    #: every (snapshot, tensor) that reaches a lost or missing chunk, or whose manifest is unreadable
    affected: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged_packs and not self.lost_chunks and not self.affected

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def _pack_is_intact(repo: Repository, path: Path, pack_id: PackId) -> bool:
    """The footer hashes to the pack's name and every record decodes to its chunk id."""
    try:
        entries = read_footer(path, pack_id)
        for entry in entries:
            repo.reader.read(entry.chunk_id, f"check of pack {pack_id.short()}", ChunkLocation.of(pack_id, entry))
    except (CorruptionError, FormatVersionError, OSError):
        return False
    return True


def check_repository(repo: Repository, *, repair: bool = False) -> CheckReport:
    report = CheckReport(repaired=repair)
    store = repo.store
    with store.lock(exclusive=True):
        indexed = repo.index.packs()
        on_disk = dict(iter_pack_files(store.packs_dir))
        by_pack: dict[PackId, list[tuple[ChunkId, ChunkLocation]]] = {}
        for cid, loc in repo.index.iter_chunks():
            by_pack.setdefault(loc.pack_id, []).append((cid, loc))
        damaged: list[PackId] = []
        for pack_id in sorted(set(indexed) | set(on_disk)):
            report.packs_checked += 1
            path = on_disk.get(pack_id) or pack_path(store.packs_dir, pack_id)
            if not path.exists() or not _pack_is_intact(repo, path, pack_id):
                damaged.append(pack_id)
        report.damaged_packs = [p.hex() for p in damaged]

        lost: set[bytes] = set()
        salvage: list[tuple[ChunkId, PackEntry, bytes]] = []
        for pack_id in damaged:
            path = pack_path(store.packs_dir, pack_id)
            candidates: dict[bytes, PackEntry] = {}
            if path.exists():
                try:
                    found = read_footer(path)
                except (CorruptionError, FormatVersionError):
                    found = scan_records(path)
                candidates = {e.chunk_id: e for e in found}
            for cid, _loc in by_pack.get(pack_id, []):
                entry = candidates.get(cid)
                if entry is None:
                    lost.add(cid)
                    continue
                loc = ChunkLocation.of(pack_id, entry)
                try:
                    payload = repo.reader.verified_payload(cid, f"check of pack {pack_id.short()}", loc)
                except CorruptionError:
                    lost.add(cid)
                    continue
                salvage.append((cid, entry, payload))
        report.lost_chunks = sorted(ChunkId(c).hex() for c in lost)
        report.salvaged_chunks = len(salvage)

        if repair and damaged:
            # Keep a copy of each damaged file first: a salvaged pack can come out byte-identical
            # to the undamaged original (same footer, same name) and then replaces it in place.
            quarantine = store.root / "quarantine"
            quarantine.mkdir(exist_ok=True)
            for pack_id in damaged:
                path = pack_path(store.packs_dir, pack_id)
                if path.exists():
                    shutil.copy2(path, quarantine / path.name)
            fsync_dir(quarantine)
            sink = PackSink(lambda: store.new_temp_path("repair"), store.packs_dir, int(repo.config["pack_size"]))
            try:
                for cid, entry, payload in salvage:
                    sink.add(cid, entry.kind, entry.codec, payload, entry.raw_length, entry.base_id)  # type: ignore[arg-type]
                new_packs = sink.finish()
            except BaseException:
                sink.abort()
                raise
            rewritten = {p.pack_id for p in new_packs}
            gone = [p for p in damaged if p not in rewritten]
            repo.index.apply_gc(lost, new_packs, gone)
            repo.reader.close()
            for pack_id in gone:
                pack_path(store.packs_dir, pack_id).unlink(missing_ok=True)
            fsync_dir(store.packs_dir)

        # Which snapshots and tensors reach what is gone (lost now, or missing from the index)?
        for name in store.ref_names():
            try:
                sid = store.read_ref(name)
                label = snapshot_label(name, sid)
                reached = reached_chunks(repo.reader, sid, label)
            except CorruptionError as exc:
                report.affected.append({"snapshot": name, "tensor": "<manifest>", "error": str(exc)})
                continue
            present = repo.index.get_many(cid for cid, _ in reached)
            hit: dict[str, None] = {}
            for cid, tensor in reached:
                if cid in lost or cid not in present:
                    hit.setdefault(tensor)
            report.affected.extend({"snapshot": label, "tensor": t} for t in hit)
    return report
