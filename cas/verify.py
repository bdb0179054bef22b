"""Repository verification: every ref, every manifest node, every chunk a snapshot reaches.

``verify`` returns findings; it raises only for errors outside the data it checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from cas.codec import needs_base
from cas.errors import CorruptionError, FormatVersionError, IndexCorruptError
from cas.ids import ChunkId, PackId
from cas.index import ChunkLocation, Index
from cas.pack import check_structure
from cas.reach import reached_chunks, snapshot_label
from cas.reports import Problem, VerifyReport

if TYPE_CHECKING:
    from cas.repository import Repository

#: chunk id -> the (snapshot, tensor) pairs that reach it
Users = dict[ChunkId, list[tuple[str, str]]]


def verify_repository(
    repo: Repository,
    read_data: bool = False,
    progress: Callable[[int, int], None] | None = None,
    only: set[str] | None = None,
) -> VerifyReport:
    report = VerifyReport(read_data=read_data)
    repo.reader.clear_cache()  # every chunk, delta bases included, is read from disk
    store = repo.store
    index = repo.index
    listed = store.list_packs()
    pack_sizes: dict[PackId, int | None] = dict(listed)
    bad_packs: dict[PackId, str] = {}

    for pack_id, (indexed_size, _count) in (index.packs().items() if only is None else ()):
        actual = listed.get(pack_id)
        if actual is None:
            pack_sizes[pack_id] = None
            bad_packs[pack_id] = "missing-pack"
            report.problems.append(Problem("missing-pack", f"pack {pack_id.hex()}.pack is missing",
                                           pack=pack_id.hex()))
            continue
        report.packs_checked += 1
        problem = None
        if actual != indexed_size:
            problem = f"pack is {actual} bytes, the index recorded {indexed_size}"
        elif read_data:
            try:  # footer, record headers, reserved bytes; payloads below
                check_structure(store.pack_source(pack_id, actual), pack_id)
            except (CorruptionError, FormatVersionError) as exc:
                problem = str(exc)
        if problem:
            bad_packs[pack_id] = "corrupt-pack"
            report.problems.append(Problem("corrupt-pack", problem, pack=pack_id.hex()))

    users: Users = {}
    for name in repo.store.ref_names():
        try:
            sid = repo.store.read_ref(name)
        except CorruptionError as exc:
            report.problems.append(Problem("damaged-ref", str(exc), snapshot=name))
            continue
        if only is not None and sid.hex() not in only:
            continue
        label = snapshot_label(name, sid)
        report.snapshots_checked += 1
        try:
            for cid, tensor in reached_chunks(repo.reader, sid, label):
                users.setdefault(cid, []).append((label, tensor))
        except IndexCorruptError:
            raise  # the cache is damaged, not the snapshot: the repository rebuilds it and verifies again
        except (CorruptionError, FormatVersionError) as exc:
            report.problems.append(Problem("corrupt-manifest", str(exc), snapshot=label))

    # Every chunk a snapshot reaches must be indexed, in a pack that exists and is big enough.
    to_read: list[tuple[ChunkId, ChunkLocation]] = []
    locations = index.get_many(users)
    for cid, reached_by in users.items():
        loc = locations.get(cid)
        if loc is None:
            for snap, tensor in reached_by:
                report.problems.append(Problem(
                    "missing-chunk", f"chunk {cid.short()} is not in the index", snapshot=snap, tensor=tensor,
                    chunk=cid.hex(),
                ))
            continue
        size = pack_sizes.get(loc.pack_id)
        if size is None or loc.offset + loc.stored_length > size:
            for snap, tensor in reached_by:
                report.problems.append(Problem(
                    "missing-chunk", f"chunk {cid.short()} is gone: its pack is missing or truncated",
                    snapshot=snap, tensor=tensor, pack=loc.pack_id.hex(), chunk=cid.hex(),
                ))
            continue
        report.chunks_checked += 1
        if read_data:
            to_read.append((cid, loc))

    if read_data and to_read:
        total = sum(loc.raw_length for _, loc in to_read)
        done = 0

        groups, bases = _chain_order(index, to_read)

        def check(item: tuple[ChunkId, ChunkLocation]) -> tuple[ChunkId, ChunkLocation, str | None]:
            cid, loc = item
            try:
                if cid in bases:  # decoded once, kept for the chunks whose chains go through it
                    repo.reader.base(cid, f"chunk {cid.short()}")
                else:
                    repo.reader.read(cid, f"chunk {cid.short()}", loc)
            except IndexCorruptError:
                raise
            except CorruptionError as exc:
                return cid, loc, str(exc)
            return cid, loc, None

        def check_group(group: list[tuple[ChunkId, ChunkLocation]]) -> list[tuple[ChunkId, ChunkLocation, str | None]]:
            return [check(item) for item in group]  # one chain in order: each base is cached before its deltas

        for results in repo.pool.map(check_group, groups):
            for cid, loc, error in results:
                done += loc.raw_length
                report.bytes_read += loc.stored_length
                if progress is not None:
                    progress(done, total)
                if error is None:
                    continue
                for snap, tensor in users[cid]:
                    report.problems.append(Problem(
                        "corrupt-chunk", error, snapshot=snap, tensor=tensor, pack=loc.pack_id.hex(),
                        chunk=cid.hex(),
                    ))
    return report


def _chain_order(
    index: Index, to_read: list[tuple[ChunkId, ChunkLocation]]
) -> tuple[list[list[tuple[ChunkId, ChunkLocation]]], set[bytes]]:
    """The chunks grouped by delta chain (each group keyframe first, then by depth), and those that
    are bases of others: each chain is decoded once, its links cached while its chunks are checked."""
    wanted = {cid for cid, _ in to_read}
    root_of: dict[bytes, tuple[bytes, int]] = {}
    bases: set[bytes] = set()
    lookup = index.reader()
    try:
        for cid, loc in to_read:
            path: list[bytes] = []
            cursor: bytes | None = cid
            current: ChunkLocation | None = loc
            while cursor is not None and cursor not in root_of and current is not None and len(path) < 4096:
                path.append(cursor)
                base = current.base_id if needs_base(current.codec) else None
                if base is not None and base in wanted:
                    bases.add(base)
                cursor = base
                current = lookup.get(base) if base is not None else None
            if not path:
                continue  # reached already, as a base of another wanted chunk
            root, depth = root_of.get(cursor, (path[-1], -1)) if cursor is not None else (path[-1], -1)
            for link in reversed(path):
                depth += 1
                root_of[link] = (root, depth)
    finally:
        lookup.close()
    groups: dict[bytes, list[tuple[ChunkId, ChunkLocation]]] = {}
    for item in sorted(to_read, key=lambda x: (x[1].pack_id, x[1].offset)):
        groups.setdefault(root_of.get(item[0], (item[0], 0))[0], []).append(item)
    for group in groups.values():
        group.sort(key=lambda x: root_of.get(x[0], (x[0], 0))[1])
    return list(groups.values()), bases

