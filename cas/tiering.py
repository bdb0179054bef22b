"""Storage tiers by age: data packs move hot -> warm -> cold -> archive (FORMAT.md §12).

A data pack's age is the age of the newest snapshot that reaches it (through any chunk, or a
delta base of one). It belongs in the first tier whose retention is longer than that age (the
last tier may keep packs indefinitely). ``migrate`` moves each pack that is in the wrong tier:
the bytes are read, structure-checked, written to the target tier, checked there (read back
and compared, or for an archive class that cannot be read back, its size), and only then
removed from the source tier. A crash in between leaves the pack in two tiers, which reads and
listings handle (the hotter copy wins), and the next run finishes the move.

Manifest packs, index objects, refs and config never move: everything needed to list, diff,
verify structure and plan a restore stays in the hot tier. Packs no snapshot reaches are left
for gc. A pack that must move out of an archive class first needs a restore request
(``cas restore --warmup`` or ``warmup``); until then it is reported, not moved.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import blake3

from cas.backends import FailoverBackend, TieredBackend
from cas.codec import needs_base
from cas.errors import ArchivedError, CasError, CorruptionError, ObjectNotFoundError, StorageError
from cas.ids import ChunkId, PackId, SnapshotId
from cas.layout import pack_key
from cas.pack import MemorySource, check_structure
from cas.reach import reached_chunks, snapshot_label

if TYPE_CHECKING:
    from cas.repository import Repository
    from cas.topology import TierSpec


@dataclass
class TierReport:
    moved: list[dict[str, Any]] = field(default_factory=list)
    bytes_moved: int = 0
    kept: int = 0
    unreached: int = 0
    needs_warmup: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tiered_backend(repo: Repository) -> TieredBackend | None:
    backend = repo.store.backend
    if isinstance(backend, FailoverBackend):  # the primary region carries the tiers
        backend = backend.region(backend.region_names[0])
    return backend if isinstance(backend, TieredBackend) else None


def packs_of(repo: Repository, chunk_ids: list[ChunkId]) -> set[PackId]:
    """The packs holding ``chunk_ids`` and every delta base below them."""
    out: set[PackId] = set()
    seen: set[bytes] = set()
    todo = [bytes(c) for c in chunk_ids]
    while todo:
        locs = repo.index.get_many(c for c in todo if c not in seen)
        seen.update(todo)
        todo = []
        for loc in locs.values():
            out.add(loc.pack_id)
            if needs_base(loc.codec) and loc.base_id is not None and bytes(loc.base_id) not in seen:
                todo.append(bytes(loc.base_id))
    return out


def pack_ages(repo: Repository, now: float) -> dict[PackId, float]:
    """Data pack -> age in seconds of the newest snapshot reaching it."""
    newest: dict[PackId, float] = {}
    for snap in repo.snapshots():
        sid = SnapshotId(bytes.fromhex(snap.id))
        try:
            reached = reached_chunks(repo.reader, sid, snapshot_label(snap.ref, sid))
        except CorruptionError:
            continue  # a damaged snapshot: its packs are judged by the others (and never moved for it)
        for pid in packs_of(repo, [cid for cid, _ in reached]):
            newest[pid] = max(newest.get(pid, 0.0), snap.time)
    return {pid: max(0.0, now - t) for pid, t in newest.items()}


def target_tier(tiers: list[TierSpec], age: float) -> int:
    for i, tier in enumerate(tiers):
        if tier.retention is None or age < tier.retention:
            return i
    return len(tiers) - 1


def _move(tb: TieredBackend, key: str, pack_id: PackId, src: int, dst: int) -> int:
    source = tb.tiers[src][1]
    target = tb.tiers[dst][1]
    data = source.read(key)
    check_structure(MemorySource(key.rsplit("/", 1)[-1], data), pack_id)
    target.write(key, data)
    try:
        back = target.read(key)
    except ArchivedError:
        if target.stat(key).size != len(data):
            raise StorageError(f"{target.describe()}: {key}: the copy has the wrong size; source kept") from None
    else:
        if blake3.blake3(back).digest() != blake3.blake3(data).digest():
            raise StorageError(f"{target.describe()}: {key}: the copy reads back other bytes; source kept")
    source.delete(key)
    tb.forget_location(key)
    return len(data)


def migrate(repo: Repository, *, now: float | None = None, dry_run: bool = False) -> TierReport:
    """Move every data pack to the tier its age calls for (see the module docstring)."""
    report = TierReport(dry_run=dry_run)
    tb = tiered_backend(repo)
    tiers = repo.topology.tiers
    if tb is None or len(tiers) < 2:
        return report
    now = time.time() if now is None else now
    with repo.store.lock(exclusive=False):  # gc waits: it must not judge packs caught mid-move
        ages = pack_ages(repo, now)
        locations: dict[str, int] = {}
        for i, (_, backend) in reversed(list(enumerate(tb.tiers))):
            for info in backend.list("packs/"):
                if info.key.endswith(".pack"):
                    locations[info.key] = i  # the hottest copy wins (listed last)
        for pid, age in sorted(ages.items(), key=lambda kv: kv[0]):
            key = pack_key(pid)
            src = locations.get(key)
            if src is None:
                continue  # a manifest pack, or gone
            dst = target_tier(tiers, age)
            if dst == src:
                report.kept += 1
                continue
            try:
                if tb.tiers[src][1].archive_state(key) is not None:
                    report.needs_warmup.append(pid.hex())
                    continue
                if dry_run:
                    report.moved.append({"pack": pid.hex(), "from": tb.tiers[src][0], "to": tb.tiers[dst][0],
                                         "age_s": age})
                    continue
                moved = _move(tb, key, pid, src, dst)
            except (CasError, OSError) as exc:
                report.errors.append(f"{pid.hex()[:12]}: {exc}")
                continue
            report.bytes_moved += moved
            report.moved.append({"pack": pid.hex(), "from": tb.tiers[src][0], "to": tb.tiers[dst][0],
                                 "age_s": age, "bytes": moved})
        report.unreached = sum(1 for k in locations if PackId(bytes.fromhex(k.rsplit("/", 1)[-1][:64])) not in ages)
    return report


def status(repo: Repository) -> dict[str, Any]:
    """Bytes and packs per tier (data packs; metadata is all in the first)."""
    tb = tiered_backend(repo)
    tiers = tb.tiers if tb is not None else [("hot", repo.store.backend)]
    out: dict[str, Any] = {}
    for name, backend in tiers:
        packs = nbytes = meta = meta_bytes = 0
        for info in backend.list("packs/"):
            if info.key.endswith(".pack"):
                packs += 1
                nbytes += info.size
            elif info.key.endswith(".meta"):
                meta += 1
                meta_bytes += info.size
        out[name] = {"data_packs": packs, "data_bytes": nbytes, "meta_packs": meta, "meta_bytes": meta_bytes,
                     "url": backend.describe()}
    return out


def archived_packs(repo: Repository, snapshot: str) -> list[str]:
    """The data packs of ``snapshot`` that sit in an archive class and are not restored."""
    snap = repo.resolve(snapshot)
    sid = SnapshotId(bytes.fromhex(snap.id))
    reached = reached_chunks(repo.reader, sid, snapshot_label(snap.ref, sid))
    out = []
    for pid in sorted(packs_of(repo, [cid for cid, _ in reached])):
        try:
            if repo.store.backend.archive_state(repo.store.pack_key_of(pid)) is not None:
                out.append(pid.hex())
        except ObjectNotFoundError:
            continue
    return out


def warmup(repo: Repository, snapshot: str, *, days: int = 1, wait: bool = True, timeout: float = 12 * 3600.0,
           poll: float = 5.0) -> list[str]:
    """Request a restore of every archived pack of ``snapshot``; with ``wait``, return once all are
    readable (or raise :class:`ArchivedError` after ``timeout``). Returns the packs requested."""
    packs = archived_packs(repo, snapshot)
    backend = repo.store.backend
    for pid in packs:
        backend.request_restore(repo.store.pack_key_of(PackId(bytes.fromhex(pid))), days)
    deadline = time.monotonic() + timeout
    while wait and packs:
        pending = [p for p in packs
                   if backend.archive_state(repo.store.pack_key_of(PackId(bytes.fromhex(p)))) is not None]
        if not pending:
            break
        if time.monotonic() > deadline:
            raise ArchivedError(f"snapshot {snapshot}: {len(pending)} pack(s) still restoring after {timeout:.0f} s",
                                pending, snapshot=snapshot, packs=pending)
        time.sleep(poll)
    return packs


def explain_archived(repo: Repository, snapshot: str, exc: ArchivedError) -> ArchivedError:
    """The error a load gives when data is archived: it names the snapshot and every archived pack."""
    try:
        packs = archived_packs(repo, snapshot)
    except CasError:
        packs = []
    shown = ", ".join(p[:12] for p in packs[:5]) + (f" and {len(packs) - 5} more" if len(packs) > 5 else "")
    return ArchivedError(
        f"snapshot {snapshot} needs {len(packs) or 'some'} pack(s) from an archive storage class"
        f"{': ' + shown if shown else ''}; run `cas restore --warmup {snapshot} ...` (or repo.warmup) to request "
        f"their restore first ({exc})",
        exc.keys, snapshot=snapshot, packs=packs,
    )

