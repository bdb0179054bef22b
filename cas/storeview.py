"""What the store holds, read from the packs themselves, and the index brought in line with it.

The index is a cache (DESIGN.md invariant 4). GC, check and rebuild never act on its
word alone: they first read every pack's footer (``scan_store``), choose for every chunk
a copy whose delta chain resolves down to a keyframe (``choose_copies``), and bring the
index in line (``reconcile``): entries that point at a missing pack, at a record that is
not there, or at a copy whose chain is broken are replaced by a good copy or dropped;
packs the index does not know (a stale index, a lost one, a save killed before its
index commit) are indexed. Packs whose footer does not check are never deleted: they
are reported, and ``salvage`` indexes what in them still verifies.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cas.codec import needs_base
from cas.errors import CorruptionError, FormatVersionError, MissingChunkError
from cas.ids import ChunkId, PackId
from cas.index import ChunkLocation, Index
from cas.pack import PackEntry, PackSource, parse_footer, read_footer, salvage_candidates
from cas.reader import MAX_CHAIN_LINKS, ChunkReader

if TYPE_CHECKING:
    from cas.layout import Store

log = logging.getLogger("cas")

Copy = tuple[PackId, PackEntry]


@dataclass
class StoreView:
    """Every pack object in the store: the footers that check, and the packs that do not."""

    packs: dict[PackId, list[PackEntry]] = field(default_factory=dict)
    sizes: dict[PackId, int] = field(default_factory=dict)
    #: packs whose footer does not check (damaged, truncated, foreign): kept, never deleted
    unreadable: dict[PackId, str] = field(default_factory=dict)
    sources: dict[PackId, PackSource] = field(default_factory=dict)
    #: keys of the index objects read (gc replaces them with one covering what remains)
    index_objects: list[str] = field(default_factory=list)
    #: (pack, payload offset) of every copy a read recorded damaged (FORMAT.md §5): chosen last
    damaged: set[tuple[bytes, int]] = field(default_factory=set)

    def copies(self) -> dict[bytes, list[Copy]]:
        out: dict[bytes, list[Copy]] = {}
        for pack_id, entries in self.packs.items():
            for entry in entries:
                out.setdefault(bytes(entry.chunk_id), []).append((pack_id, entry))
        return out


def scan_store(store: Store) -> StoreView:
    """List the packs and read every footer: from the index objects where they hold it (one read
    per save; each footer proves itself against its pack's name), else from the pack (three small
    ranged reads)."""
    view = StoreView()
    view.damaged = {(bytes(pid), off) for copies in store.damage_records().values() for pid, off in copies}
    known, view.index_objects = store.read_index_objects()
    for pack_id, size in store.list_packs().items():
        source = store.pack_source(pack_id, size)
        view.sources[pack_id] = source
        view.sizes[pack_id] = size
        kept = known.get(pack_id)
        if kept is not None and kept[0] == size:
            try:
                view.packs[pack_id] = parse_footer(kept[1], size, source.name, pack_id)
                continue
            except (CorruptionError, FormatVersionError):
                pass  # read the pack itself
        try:
            view.packs[pack_id] = read_footer(source, pack_id)
        except MissingChunkError:  # deleted while we listed
            del view.sources[pack_id], view.sizes[pack_id]
        except (CorruptionError, FormatVersionError) as exc:
            view.unreadable[pack_id] = str(exc)
    return view


def choose_copies(
    copies: dict[bytes, list[Copy]],
    prefer: dict[bytes, ChunkLocation] | None = None,
    assume: Iterable[bytes] = (),
    avoid: set[tuple[bytes, int]] | frozenset[tuple[bytes, int]] = frozenset(),
) -> dict[bytes, tuple[ChunkLocation, int]]:
    """For every chunk with a copy whose chain resolves to a keyframe: that copy and its depth.

    A delta copy resolves when some copy of its base does (any copy of a chunk decodes to the
    same bytes); chunks in ``assume`` count as resolved (indexed in packs whose footer does not
    check, where reads verify them). A copy is clean when it is not in ``avoid`` (pack, offset:
    recorded damaged) and, for a delta, some clean copy of its base resolves. Clean copies win over
    the rest; among them the one ``prefer`` names (the index's current entry), then the
    shallowest, then the lowest pack id: deterministic, and no churn. A chunk whose copies are all
    unclean still gets its best one (a recorded copy may be a false alarm; nothing is dropped).
    """
    depth: dict[tuple[bytes, bytes, int], int] = {}
    best: dict[bytes, int] = {}
    clean_chunks: set[bytes] = set()
    clean: set[tuple[bytes, bytes, int]] = set()
    pending: list[tuple[bytes, PackId, PackEntry]] = []
    for cid in assume:
        best[cid] = 0
        clean_chunks.add(cid)
    for cid, found in copies.items():
        for pack_id, entry in found:
            if not needs_base(entry.codec):
                key = (cid, bytes(pack_id), entry.offset)
                depth[key] = 0
                best[cid] = 0
                if (key[1], key[2]) not in avoid:
                    clean.add(key)
                    clean_chunks.add(cid)
            elif entry.base_id is not None:
                pending.append((cid, pack_id, entry))
    deltas = list(pending)
    for _round in range(MAX_CHAIN_LINKS):
        rest = []
        progressed = False
        for cid, pack_id, entry in pending:
            base_depth = best.get(bytes(entry.base_id))  # type: ignore[arg-type]
            if base_depth is None:
                rest.append((cid, pack_id, entry))
                continue
            d = base_depth + 1
            depth[(cid, bytes(pack_id), entry.offset)] = d
            if cid not in best or d < best[cid]:
                best[cid] = d
            progressed = True
        pending = rest
        if not progressed or not pending:
            break
    if avoid:  # which resolving deltas reach a keyframe through clean copies only
        for _round in range(MAX_CHAIN_LINKS):
            grew = False
            for cid, pack_id, entry in deltas:
                key = (cid, bytes(pack_id), entry.offset)
                if key in clean or key not in depth or (key[1], key[2]) in avoid:
                    continue
                if bytes(entry.base_id) in clean_chunks:  # type: ignore[arg-type]
                    clean.add(key)
                    clean_chunks.add(cid)
                    grew = True
            if not grew:
                break
    else:
        clean = set(depth)
    chosen: dict[bytes, tuple[ChunkLocation, int]] = {}
    for cid, found in copies.items():
        if cid not in best:
            continue
        wanted = prefer.get(cid) if prefer else None
        keys = [((cid, bytes(pid), e.offset), pid, e) for pid, e in found]
        options = [(depth[key], key[1], ChunkLocation.of(pid, e), key in clean) for key, pid, e in keys if key in depth]
        if not options:
            continue
        options = [o for o in options if o[3]] or options
        pick = next((o for o in options if o[2] == wanted), None) or min(options, key=lambda o: (o[0], o[1]))
        chosen[cid] = (pick[2], pick[0])
    return chosen


@dataclass
class ReconcileReport:
    chunks_added: int = 0
    chunks_repointed: int = 0
    chunks_dropped: int = 0
    packs_added: int = 0
    packs_dropped: int = 0
    unreadable_packs: list[str] = field(default_factory=list)
    salvaged_chunks: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.chunks_added or self.chunks_repointed or self.chunks_dropped
                    or self.packs_added or self.packs_dropped or self.salvaged_chunks)


def reconcile(
    index: Index,
    view: StoreView,
    reader: ChunkReader | None = None,
    *,
    announce: bool = True,
    hints: dict[PackId, list[PackEntry]] | None = None,
) -> ReconcileReport:
    """Bring the index in line with the packs (one transaction; a second one for salvage).

    - an entry whose pack is readable but whose record is not there as indexed, or whose chain
      does not resolve, is re-pointed at a good copy, or dropped if there is none;
    - an entry whose pack file is gone is re-pointed or dropped;
    - an entry in a pack whose footer does not check is left alone (it cannot be checked here;
      reads verify it, ``check --repair`` salvages the pack);
    - every chunk of a pack the index does not list is indexed (its good copy);
    - every indexed delta's base is indexed (closure), so chains never end in the index's gaps.
    With ``reader``, unreadable packs not in the index are salvaged: the records a forward
    scan finds that decode to their ids are indexed; ``hints`` adds candidate records per
    pack (what an index being rebuilt knew of them: it loaded before, it must load after).
    """
    report = ReconcileReport(unreadable_packs=sorted(p.hex() for p in view.unreadable))
    known_packs = index.packs()
    copies = view.copies()
    assume = {bytes(cid) for cid, loc in index.iter_chunks() if loc.pack_id in view.unreadable}
    final = _reconcile_pass(index, view, copies, known_packs, assume, report)
    if reader is not None:
        unindexed = [pid for pid in view.unreadable if pid not in known_packs]
        salvaged = salvage(index, reader, view, unindexed, final, hints or {})
        report.salvaged_chunks = len(salvaged)
        if salvaged:  # deltas in readable packs whose bases only a damaged pack holds resolve now
            _reconcile_pass(index, view, copies, known_packs, assume | salvaged, report)
    if report.changed and announce:
        log.warning(
            "cas: the index did not match the packs and was brought in line (%d chunks added, %d re-pointed, "
            "%d dropped; %d packs added, %d dropped)", report.chunks_added, report.chunks_repointed,
            report.chunks_dropped, report.packs_added, report.packs_dropped,
        )
    return report


def _reconcile_pass(
    index: Index,
    view: StoreView,
    copies: dict[bytes, list[Copy]],
    known_packs: dict[PackId, tuple[int, int]],
    assume: set[bytes],
    report: ReconcileReport,
) -> dict[bytes, ChunkLocation]:
    """One transaction of ``reconcile``; returns what the index holds afterwards."""
    current = {bytes(cid): loc for cid, loc in index.iter_chunks()}
    chosen = choose_copies(copies, current, assume, view.damaged)
    final: dict[bytes, ChunkLocation] = {}
    puts: dict[bytes, ChunkLocation] = {}
    drops: list[bytes] = []
    for cid, loc in current.items():
        good = chosen.get(cid)
        if loc.pack_id in view.unreadable and good is None:
            final[cid] = loc  # cannot be checked here; reads verify it, check --repair salvages the pack
            continue
        if good is not None and good[0] == loc:
            final[cid] = loc
        elif good is not None:
            puts[cid] = final[cid] = good[0]
            report.chunks_repointed += 1
        else:
            drops.append(cid)
            report.chunks_dropped += 1
    for pack_id, entries in view.packs.items():
        if pack_id in known_packs:
            continue
        for entry in entries:
            cid = bytes(entry.chunk_id)
            good = chosen.get(cid)
            if cid not in final and good is not None:
                puts[cid] = final[cid] = good[0]
                report.chunks_added += 1
    stack = [bytes(loc.base_id) for loc in final.values() if loc.base_id is not None and needs_base(loc.codec)]
    while stack:
        base = stack.pop()
        if base in final or base not in chosen:
            continue
        loc = chosen[base][0]
        puts[base] = final[base] = loc
        report.chunks_added += 1
        if loc.base_id is not None and needs_base(loc.codec):
            stack.append(bytes(loc.base_id))
    indexed_packs = index.packs()
    put_packs = [(pid, view.sizes[pid], len(entries)) for pid, entries in view.packs.items()
                 if pid not in known_packs and pid not in indexed_packs]
    report.packs_added += len(put_packs)
    on_disk = set(view.packs) | set(view.unreadable)
    drop_packs = [pid for pid in indexed_packs if pid not in on_disk]
    report.packs_dropped += len(drop_packs)
    if puts or drops or put_packs or drop_packs:
        index.apply(put_chunks=puts.items(), remove_chunks=drops, put_packs=put_packs, remove_packs=drop_packs)
    return final


def salvage(
    index: Index,
    reader: ChunkReader,
    view: StoreView,
    pack_ids: Iterable[PackId],
    indexed: dict[bytes, ChunkLocation],
    hints: dict[PackId, list[PackEntry]],
) -> set[bytes]:
    """Index what still verifies in packs whose footer does not check: every record the footer
    (read from the trailer) or a forward scan of the record headers names, kept only if it
    decodes to its chunk id. Deltas are retried after their bases are in; returns their ids."""
    total: set[bytes] = set()
    for pack_id in pack_ids:
        candidates = [*hints.get(pack_id, []), *salvage_candidates(view.sources[pack_id])]
        pending = [e for e in candidates if bytes(e.chunk_id) not in indexed]
        kept: list[tuple[bytes, ChunkLocation]] = []
        while pending:
            rest = []
            for entry in pending:
                cid = bytes(entry.chunk_id)
                if cid in indexed:
                    continue
                loc = ChunkLocation.of(pack_id, entry)
                if needs_base(entry.codec) and (entry.base_id is None or bytes(entry.base_id) not in indexed):
                    rest.append(entry)
                    continue
                try:  # a candidate that fails is no news (the pack is known damaged): not recorded
                    reader.verified_payload(ChunkId(cid), f"salvage of pack {pack_id.short()}", loc, record=False)
                except (CorruptionError, FormatVersionError):  # a spurious record header: not a chunk
                    continue
                index.apply(put_chunks=[(cid, loc)])  # its deltas, later in the list, find it
                indexed[cid] = loc
                kept.append((cid, loc))
            if len(rest) == len(pending):
                break
            pending = rest
        if kept:
            index.apply(put_packs=[(pack_id, view.sizes.get(pack_id, 0), len(kept))])
            log.warning("cas: pack %s is damaged; %d chunks in it still verify and were indexed (run `cas check "
                        "--repair`)", pack_id.short(), len(kept))
        total.update(cid for cid, _ in kept)
    return total
