"""`check --repair`: find damaged packs, keep everything that still verifies, say exactly what was lost.

Recovery never makes things worse (DESIGN.md invariant 9):
- the index is brought in line with the packs first (``cas.storeview``), so a stale or lost
  index never makes an intact pack look damaged;
- a pack is damaged when its structure does not check (``cas.pack.check_structure``: footer,
  record headers, reserved bytes) or a record decodes to bytes that do not match its id. A dead
  delta record whose base gc collected cannot be decoded, but it is not damage: nothing needs it;
- repair salvages every chunk of a damaged pack that verifies, from every place it may sit (the
  footer, even behind a damaged header, a forward scan of record headers, the index), into new
  packs; only once those are durable and indexed, and a copy of the damaged file is in
  ``quarantine/``, is the damaged file removed from ``packs/``. Nothing is done to a pack that
  checks. Snapshots are never dropped: the report lists every snapshot and tensor that reaches
  a lost chunk (a later save of the same bytes writes those chunks again and heals them).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from cas.backends import Backend
from cas.codec import Codec, needs_base
from cas.errors import CasError, CorruptionError, FormatVersionError, MissingChunkError, ObjectNotFoundError
from cas.ids import ChunkId, PackId, hash_bytes
from cas.index import ChunkLocation
from cas.layout import PACK_KEY, BackendSource
from cas.manifest import SnapshotNode
from cas.pack import ChunkKind, MemorySource, PackEntry, check_structure, read_footer, salvage_candidates
from cas.reach import reached_chunks, snapshot_label
from cas.storeview import StoreView, reconcile, scan_store

if TYPE_CHECKING:
    from cas.repository import Repository


@dataclass
class CheckReport:
    repaired: bool
    packs_checked: int = 0
    damaged_packs: list[str] = field(default_factory=list)
    #: pack id -> what is wrong with it
    damage: dict[str, str] = field(default_factory=dict)
    lost_chunks: list[str] = field(default_factory=list)
    salvaged_chunks: int = 0
    #: dead records that cannot be decoded because gc collected their base (not damage)
    unverifiable_dead_records: int = 0
    #: every (snapshot, tensor) that reaches a lost or missing chunk, or whose manifest is unreadable
    affected: list[dict[str, str]] = field(default_factory=list)
    #: whether this run changed anything on disk or in the index (repairs, index brought in line)
    changed: bool = False
    quarantined: list[str] = field(default_factory=list)
    #: packs replaced by (damaged) or brought back from (missing) a replica's intact copy
    healed: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged_packs and not self.lost_chunks and not self.affected

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def _check_records(repo: Repository, pack_id: PackId, entries: list[PackEntry], report: CheckReport) -> str | None:
    """Decode every record of a structurally sound pack; the first real damage, or None."""
    for entry in entries:
        loc = ChunkLocation.of(pack_id, entry)
        try:
            repo.reader.verified_payload(entry.chunk_id, f"check of pack {pack_id.short()}", loc)
        except MissingChunkError as exc:
            # after reconcile no index entry names a missing pack: what is missing is a delta base
            if needs_base(entry.codec) and repo.index.get(entry.chunk_id) != loc:
                report.unverifiable_dead_records += 1  # its base was collected: nothing reads this copy
                continue
            return str(exc)
        except (CorruptionError, FormatVersionError) as exc:
            if needs_base(entry.codec) and entry.base_id is not None and not _verifies(repo, entry.base_id):
                # the chain broke below this record, in its base (perhaps in another pack): that is
                # the base's damage, reported (and salvaged) where the base lies, not this pack's
                continue
            return str(exc)
    return None


def _verifies(repo: Repository, chunk_id: ChunkId) -> bool:
    try:
        repo.reader.read(chunk_id, f"check of chunk {chunk_id.short()}")
    except (CorruptionError, FormatVersionError):
        return False
    return True


def check_repository(
    repo: Repository, *, repair: bool = False, heal_from: list[tuple[str, Backend]] | None = None
) -> CheckReport:
    """Check every pack; with ``repair``, first fetch intact copies of damaged or missing packs
    from the replicas in ``heal_from`` (name, backend), then salvage what is still damaged."""
    if not (repair and heal_from):
        report = _check(repo, repair=repair)
    else:
        report = _check(repo, repair=False)
        if not report.ok:
            with repo.store.lock(exclusive=True):
                healed = heal_packs(repo, report, heal_from)
            repo.reader.clear_cache()
            report = _check(repo, repair=True)
            report.healed = healed
            report.changed = report.changed or bool(healed)
    return report


def _settle_damage_records(repo: Repository) -> None:
    """Drop every damage record (FORMAT.md §5) once a check found nothing damaged, or a repair took
    the damaged packs out of ``packs/``: no pack there holds a damaged copy any more."""
    store = repo.store
    records = store.damage_records()
    store.clear_damage([(cid, pid, off) for cid, copies in records.items() for pid, off in copies])


def _missing_chunks(repo: Repository) -> set[bytes]:
    """Chunks the snapshots reach that the index (in line with the packs) does not hold."""
    missing: set[bytes] = set()
    store = repo.store
    for name in store.ref_names():
        try:
            sid = store.read_ref(name)
        except (FileNotFoundError, CorruptionError):
            continue
        try:
            reached = reached_chunks(repo.reader, sid, snapshot_label(name, sid))
        except (CorruptionError, FormatVersionError):
            missing.add(bytes(sid))
            try:
                node = SnapshotNode.decode(repo.reader.read(sid, f"snapshot {name}"), name)
                missing.add(bytes(node.tree))
            except (CorruptionError, FormatVersionError):
                pass
            continue
        present = repo.index.get_many(cid for cid, _ in reached)
        missing.update(bytes(cid) for cid, _ in reached if cid not in present)
    return missing


def heal_packs(repo: Repository, first: CheckReport, sources: list[tuple[str, Backend]]) -> list[dict[str, str]]:
    """Replace each damaged pack by a replica's copy that checks (structure and every record),
    and bring back packs holding missing chunks. The damaged bytes go to ``quarantine/`` first,
    and come back if no replica's copy checks."""
    store = repo.store
    healed: list[dict[str, str]] = []
    for hex_id in first.damaged_packs:
        pack_id = PackId(bytes.fromhex(hex_id))
        key = store.pack_key_of(pack_id)
        try:
            kept = store.quarantine_pack(pack_id)
        except ObjectNotFoundError:
            kept = None
        for name, backend in sources:
            try:
                data = backend.read(key)
                entries = check_structure(MemorySource(key.rsplit("/", 1)[-1], data), pack_id)
            except (CasError, OSError):
                continue
            store.backend.write(key, data)
            repo.reader.clear_cache()
            problem = _check_records(repo, pack_id, entries, CheckReport(repaired=False))
            if problem is None:
                healed.append({"pack": hex_id, "from": name, "why": first.damage.get(hex_id, "damaged")})
                break
            if kept is not None:  # this copy is no better: put the damaged bytes back for salvage
                store.backend.write(key, store.backend.read(kept))
                repo.reader.clear_cache()
    missing = _missing_chunks(repo)
    if not missing:
        return healed
    here = set(store.list_packs())
    for name, backend in sources:
        for info in backend.list("packs/"):
            m = PACK_KEY.fullmatch(info.key)
            if not m or not missing:
                continue
            pack_id = PackId(bytes.fromhex(m.group(2)))
            if pack_id in here:
                continue
            try:
                entries = read_footer(BackendSource(backend, pack_id, info.size, info.key), pack_id)
                if not any(bytes(e.chunk_id) in missing for e in entries):
                    continue
                data = backend.read(info.key)
                check_structure(MemorySource(info.key.rsplit("/", 1)[-1], data), pack_id)
            except (CasError, OSError):
                continue
            store.backend.write(info.key, data, mode="create")
            here.add(pack_id)
            missing -= {bytes(e.chunk_id) for e in entries}
            healed.append({"pack": pack_id.hex(), "from": name, "why": "missing"})
    return healed


def _check(repo: Repository, *, repair: bool = False) -> CheckReport:
    report = CheckReport(repaired=repair)
    store = repo.store
    with store.lock(exclusive=True):
        view = scan_store(store)
        if reconcile(repo.index, view, repo.reader).changed:
            report.changed = True
        damaged: dict[PackId, str] = dict(view.unreadable)
        for pack_id in sorted(set(view.packs) | set(view.unreadable)):
            report.packs_checked += 1
            if pack_id in damaged:
                continue
            try:
                entries = check_structure(view.sources[pack_id], pack_id)
            except (CorruptionError, FormatVersionError, OSError) as exc:
                damaged[pack_id] = str(exc)
                continue
            problem = _check_records(repo, pack_id, entries, report)
            if problem is not None:
                damaged[pack_id] = problem
        # packs the index names but that are gone were dropped by reconcile; their chunks show up
        # below as missing from the snapshots that reach them
        report.damaged_packs = [p.hex() for p in sorted(damaged)]
        report.damage = {p.hex(): why for p, why in sorted(damaged.items())}

        lost: set[bytes] = set()
        salvage: dict[bytes, tuple[PackEntry, bytes]] = {}
        indexed_in: dict[PackId, list[tuple[ChunkId, ChunkLocation]]] = {}
        for cid, loc in repo.index.iter_chunks():
            if loc.pack_id in damaged:
                indexed_in.setdefault(loc.pack_id, []).append((cid, loc))
        for pack_id in sorted(damaged):
            candidates = list(salvage_candidates(view.sources[pack_id]))
            candidates += [_entry_of(cid, loc) for cid, loc in indexed_in.get(pack_id, [])]
            verified: set[bytes] = set()
            for entry in candidates:
                key = bytes(entry.chunk_id)
                if key in salvage or key in verified:
                    continue
                loc = ChunkLocation.of(pack_id, entry)
                try:
                    payload = repo.reader.verified_payload(entry.chunk_id, f"check of pack {pack_id.short()}", loc,
                                                           record=False)  # candidates of a pack known damaged
                except (CorruptionError, FormatVersionError):
                    continue
                verified.add(key)
                salvage[key] = (entry, payload)
            for cid, _loc in indexed_in.get(pack_id, []):
                if bytes(cid) not in salvage:
                    lost.add(bytes(cid))
        elsewhere = _recover_elsewhere(repo, view, damaged, lost, salvage)
        report.lost_chunks = sorted(ChunkId(c).hex() for c in lost)
        report.salvaged_chunks = len(salvage) + len(elsewhere)
        if repair and elsewhere:
            repo.index.apply(put_chunks=elsewhere.items())
            report.changed = True

        if repair and damaged:
            _repair(repo, damaged, salvage, lost, report)

        # Which snapshots and tensors reach what is gone (lost now, or missing from the index),
        # themselves or through a delta base anywhere down their chain?
        broken: dict[bytes, bool] = {}
        for name in store.ref_names():
            try:
                sid = store.read_ref(name)
                label = snapshot_label(name, sid)
                reached = reached_chunks(repo.reader, sid, label)
            except FileNotFoundError:
                continue
            except (CorruptionError, FormatVersionError) as exc:
                report.affected.append({
                    "snapshot": name, "tensor": "<manifest>",
                    "error": f"{exc}; its manifest is lost unless the pack holding it is restored: "
                             f"`cas rm {name}` gives it up",
                })
                continue
            present = repo.index.get_many(cid for cid, _ in reached)
            hit: dict[str, None] = {}
            for cid, tensor in reached:
                if _chain_broken(repo, cid, present, lost, broken):
                    hit.setdefault(tensor)
            report.affected.extend({"snapshot": label, "tensor": t} for t in hit)
        if report.ok or repair:  # under the lock: no save or repair moves a pack meanwhile
            _settle_damage_records(repo)
    return report


def _chain_broken(
    repo: Repository, cid: bytes, present: dict[bytes, ChunkLocation], lost: set[bytes], broken: dict[bytes, bool]
) -> bool:
    """Whether ``cid`` or a base its chain decodes through is lost or missing from the index."""
    path: list[bytes] = []
    cursor: bytes | None = cid
    result = False
    while cursor is not None:
        if cursor in broken:
            result = broken[cursor]
            break
        path.append(cursor)
        loc = present.get(cursor) if cursor == cid else repo.index.get(cursor)
        if cursor in lost or loc is None or len(path) > 4096:
            result = True
            break
        cursor = bytes(loc.base_id) if loc.base_id is not None and needs_base(loc.codec) else None
    for link in path:
        broken[link] = result
    return result


def _recover_elsewhere(
    repo: Repository,
    view: StoreView,
    damaged: dict[PackId, str],
    lost: set[bytes],
    salvage: dict[bytes, tuple[PackEntry, bytes]],
) -> dict[bytes, ChunkLocation]:
    """Chunks lost from their indexed copy that survive somewhere else, verified: another copy in
    an intact pack (a dead record gc kept, a racing saver's duplicate) is indexed instead; a
    snapshot node whose only good copy is the index's cache (checked against its id) is written
    into the salvage packs. Both are taken out of ``lost``."""
    found: dict[bytes, ChunkLocation] = {}
    copies = view.copies()
    for cid in sorted(lost):
        for pack_id, entry in copies.get(cid, []):
            if pack_id in damaged:
                continue
            loc = ChunkLocation.of(pack_id, entry)
            try:
                repo.reader.verified_payload(ChunkId(cid), f"check of pack {pack_id.short()}", loc)
            except (CorruptionError, FormatVersionError):
                continue
            found[cid] = loc
            break
        if cid in found:
            lost.discard(cid)
            continue
        cached = repo.index.snapshot_node(cid)
        if cached is not None and hash_bytes(cached) == cid:
            salvage[cid] = (PackEntry(ChunkId(cid), 0, len(cached), len(cached), Codec.RAW, ChunkKind.NODE), cached)
            lost.discard(cid)
    return found


def _entry_of(cid: ChunkId, loc: ChunkLocation) -> PackEntry:
    return PackEntry(cid, loc.offset, loc.stored_length, loc.raw_length, loc.codec, loc.kind, loc.base_id)


def _repair(
    repo: Repository,
    damaged: dict[PackId, str],
    salvage: dict[bytes, tuple[PackEntry, bytes]],
    lost: set[bytes],
    report: CheckReport,
) -> None:
    """Salvaged chunks into new packs (durable, indexed), a copy of each damaged pack in
    ``quarantine/``, and only then the damaged packs out of ``packs/``."""
    store = repo.store
    for pack_id in damaged:
        with contextlib.suppress(ObjectNotFoundError):
            report.quarantined.append(store.quarantine_pack(pack_id))
    sink = repo.pack_sinks("repair")
    try:
        for cid, (entry, payload) in salvage.items():
            sink.add(ChunkId(cid), entry.kind, entry.codec, payload, entry.raw_length, entry.base_id)  # type: ignore[arg-type]
        new_packs = sink.finish()
    except BaseException:
        sink.abort()
        raise
    rewritten = {p.pack_id for p in new_packs}
    gone = [p for p in damaged if p not in rewritten]
    moved = [(bytes(e.chunk_id), ChunkLocation.of(p.pack_id, e)) for p in new_packs for e in p.entries]
    repo.index.apply(
        put_chunks=moved, remove_chunks=lost, put_packs=[(p.pack_id, p.size, len(p.entries)) for p in new_packs],
        remove_packs=gone,
    )
    for pack_id in gone:
        store.delete_pack(pack_id)
    report.changed = True
