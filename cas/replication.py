"""Copying a repository to a replica, one resumable round at a time (FORMAT.md §12).

A round copies what the replica lacks, in the order that keeps it restorable at every
instant: data packs, then manifest packs, then index objects, then config and topology,
refs last. So a replica never shows a snapshot it cannot restore; a round cut short (a
crash, a dead link) leaves only unreferenced packs, and the next round goes on from what the
replica lists. Nothing the replica already holds is sent again: packs and index objects are
immutable and named by their content, so a listed key is a held object.

Every pack is checked before it is sent (its structure and that its footer hashes to its
name): a damaged pack is never spread; the round then writes no refs and says why.

Refs are compared against what the previous round from the same source left
(``sync/<source>.json`` on the replica):
- a ref the replica does not have is created (create-only);
- a ref the replica still holds at the value last synced follows the source (compare-and-swap);
- a ref the replica moved itself (a save there during a failover) is a *conflict*: the
  replica's ref stays, the source's value is kept beside it as ``TAG@SOURCE``, and it is
  reported; nothing is overwritten;
- a ref the source deleted (forget) is deleted on the replica only if the replica still holds
  the value last synced, and the packs are then reclaimed by the replica's own gc (the same
  safe protocol as everywhere): deletions are never mirrored blindly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from cas.backends import Backend
from cas.codec import decode, needs_base
from cas.errors import (
    ArchivedError,
    CasError,
    ConfigError,
    CorruptionError,
    FormatVersionError,
    ObjectNotFoundError,
    PackCorruptError,
    PreconditionFailedError,
)
from cas.ids import PackId, SnapshotId, hash_bytes
from cas.layout import CONFIG_KEY, INDEXES, PACK_KEY, PACKS, REFS, Store
from cas.pack import MemorySource, PackEntry, check_structure
from cas.topology import TOPOLOGY_KEY

log = logging.getLogger("cas")
SYNC_STATE = "sync/"
#: objects a region may hold before it holds a repository (written by health checks and failover)
HOUSEKEEPING = ("failover/", "locks/", "status/", SYNC_STATE)
COPY_THREADS = 8


@dataclass
class ReplicaRound:
    """What one round did for one replica, and what it still lacks afterwards."""

    replica: str
    packs_copied: int = 0
    index_objects_copied: int = 0
    bytes_copied: int = 0
    already_there: int = 0
    refs_created: list[str] = field(default_factory=list)
    refs_moved: list[str] = field(default_factory=list)
    refs_removed: list[str] = field(default_factory=list)
    conflicts: list[dict[str, str]] = field(default_factory=list)
    not_copied: list[str] = field(default_factory=list)
    #: packs the replica lacks that sit in an archive tier here (not readable until restored)
    archived: list[str] = field(default_factory=list)
    #: refs not synced because their snapshot reaches an archived pack the replica lacks
    refs_held: list[str] = field(default_factory=list)
    gc_bytes_freed: int = 0
    seconds: float = 0.0
    error: str | None = None
    lag: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReplicationReport:
    rounds: list[ReplicaRound] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.error is None and not r.not_copied and not r.refs_held for r in self.rounds)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "replicas": [r.to_dict() for r in self.rounds]}


def ensure_replica(source: Backend, target: Backend, repository_id: str) -> None:
    """Make ``target`` a repository with the source's config (same repository id), or check it is one.
    A store that holds another repository, or other objects, is refused: nothing is written."""
    try:
        raw = target.read(CONFIG_KEY)
    except ObjectNotFoundError:
        # an empty location may already hold cas's own housekeeping (a failover epoch, a lock)
        if any(not info.key.startswith(HOUSEKEEPING) for info in target.list("")):
            raise ConfigError(f"{target.describe()} is not empty and holds no cas repository; a replica needs an "
                              "empty location or a replica of this repository") from None
        with contextlib.suppress(PreconditionFailedError):  # another replicator made it: checked below
            target.write(CONFIG_KEY, source.read(CONFIG_KEY), mode="create")
        raw = target.read(CONFIG_KEY)
    try:
        other = json.loads(raw.decode()).get("repository_id")
    except (UnicodeDecodeError, ValueError, AttributeError):
        other = None
    if other != repository_id:
        raise ConfigError(
            f"{target.describe()} holds another repository ({other}), not a replica of {repository_id}; "
            "pick an empty location"
        )


def _keys(backend: Backend, prefix: str) -> dict[str, int]:
    return {info.key: info.size for info in backend.list(prefix)}


def _copy_checked(source: Backend, target: Backend, key: str) -> int:
    """Copy one pack or index object; packs are structure-checked first. Returns the bytes sent."""
    data = source.read(key)
    m = PACK_KEY.fullmatch(key)
    if m:
        entries = check_structure(MemorySource(key.rsplit("/", 1)[-1], data), PackId(bytes.fromhex(m.group(2))))
        _check_payloads(key, data, entries)
    try:
        target.write(key, data, mode="create")
    except PreconditionFailedError:
        return 0  # already there (immutable and content-named: the same object)
    return len(data)


def _check_payloads(key: str, data: bytes, entries: list[PackEntry]) -> None:
    """Decode and BLAKE3-hash every record whose chain resolves inside the pack (keyframes, and
    deltas on a base in the same pack): one that does not match its id is a damaged pack.
    A delta on a base in another pack is checked by every read on the replica."""
    view = memoryview(data)
    by_id = {bytes(e.chunk_id): e for e in entries}
    bases = {bytes(e.base_id) for e in entries if e.base_id is not None and needs_base(e.codec)}
    decoded: dict[bytes, bytes] = {}  # only what a delta in this pack decodes against

    def raw(entry: PackEntry, depth: int) -> bytes | None:
        cid = bytes(entry.chunk_id)
        if cid in decoded:
            return decoded[cid]
        base: bytes | None = None
        if needs_base(entry.codec):
            base_entry = by_id.get(bytes(entry.base_id)) if entry.base_id is not None else None
            if base_entry is None or depth > len(entries):
                return None
            base = raw(base_entry, depth + 1)
            if base is None:
                return None
        payload = view[entry.offset:entry.offset + entry.stored_length]
        try:
            out = memoryview(decode(entry.codec, payload, entry.raw_length, base)).cast("B")
        except (CorruptionError, FormatVersionError) as exc:
            raise PackCorruptError(f"pack {key}: chunk {entry.chunk_id.short()} does not decode ({exc})") from None
        if hash_bytes(out) != cid:
            raise PackCorruptError(f"pack {key}: chunk {entry.chunk_id.short()} does not match its hash")
        if cid not in bases:
            return b""  # checked; nothing here decodes against it
        decoded[cid] = bytes(out)
        return decoded[cid]

    for entry in entries:
        raw(entry, 0)


def _copy_all(source: Backend, target: Backend, keys: list[str], batch_size: int, out: ReplicaRound,
              is_pack: bool) -> None:
    """Copy ``keys`` in batches of at most ``batch_size`` objects, each batch in parallel."""
    with ThreadPoolExecutor(min(COPY_THREADS, batch_size), thread_name_prefix="cas-replicate") as pool:
        for start in range(0, len(keys), batch_size):
            batch = keys[start:start + batch_size]
            futures = [(key, pool.submit(_copy_checked, source, target, key)) for key in batch]
            for key, fut in futures:
                try:
                    sent = fut.result()
                except PackCorruptError as exc:
                    out.not_copied.append(f"{key}: {exc}")
                    log.warning("cas: not replicating damaged %s (%s); run `cas check --repair`", key, exc)
                    continue
                except ObjectNotFoundError:
                    continue  # gc removed it since the listing: nothing reaches it any more
                except ArchivedError:  # the rest goes on; refs reaching it are held back
                    out.archived.append(key)
                    continue
                out.bytes_copied += sent
                if is_pack:
                    out.packs_copied += 1 if sent else 0
                else:
                    out.index_objects_copied += 1 if sent else 0
                out.already_there += 0 if sent else 1


def _read_refs(store: Store) -> dict[str, tuple[str, str]]:
    """Every ref: name -> (snapshot id hex, version token)."""
    out = {}
    for info in store.backend.list(REFS):
        name = info.key[len(REFS):]
        if "/" in name:
            continue
        try:
            out[name] = (store.backend.read(info.key).decode(errors="replace").strip(), info.version)
        except ObjectNotFoundError:
            continue
    return out


def _state_key(source_name: str) -> str:
    return f"{SYNC_STATE}{source_name}.json"


def _read_state(target: Backend, source_name: str) -> dict[str, str]:
    try:
        body = json.loads(target.read(_state_key(source_name)).decode())
    except (ObjectNotFoundError, UnicodeDecodeError, ValueError):
        return {}
    refs = body.get("refs") if isinstance(body, dict) else None
    return {str(k): str(v) for k, v in refs.items()} if isinstance(refs, dict) else {}


def _conflict_name(tag: str, source_name: str, taken: Iterable[str]) -> str:
    used = set(taken)
    base = f"{tag}@{source_name}"[:120]
    name, n = base, 2
    while name in used:
        name, n = f"{base}-{n}", n + 1
    return name


def sync_refs(ours: dict[str, tuple[str, str]], target: Store, source_name: str, out: ReplicaRound,
              held: frozenset[str] | set[str] = frozenset()) -> None:
    """Bring the replica's refs in line with ``ours``, the source's refs as read before its packs
    were listed (see the module docstring). Refs in ``held`` are left as they are there."""
    state = _read_state(target.backend, source_name)
    theirs = _read_refs(target)
    new_state: dict[str, str] = {}
    for name, (value, _) in sorted(ours.items()):
        if name in held:
            out.refs_held.append(name)
            if name in state:
                new_state[name] = state[name]
            continue
        data = value.encode() + b"\n"
        have = theirs.get(name)
        if have is None:
            if name in state:  # removed on the replica since we synced it: its call, kept removed
                log.warning("cas: ref %s was removed on replica %s; not re-created", name, out.replica)
                continue
            try:
                target.backend.write(REFS + name, data, mode="create")
                out.refs_created.append(name)
            except PreconditionFailedError:
                continue  # created there meanwhile: compared next round
            new_state[name] = value
        elif have[0] == value:
            new_state[name] = value
        elif state.get(name) == have[0]:
            try:
                target.backend.write(REFS + name, data, if_version=have[1])
                out.refs_moved.append(name)
                new_state[name] = value
            except PreconditionFailedError:
                new_state[name] = state[name]  # moved there meanwhile: compared next round
        else:
            aside = _conflict_name(name, source_name, theirs)
            if aside not in theirs:
                target.backend.write(REFS + aside, data, mode="create")
                theirs[aside] = (value, "")
            out.conflicts.append({"tag": name, "kept": have[0], "theirs_as": aside, "source_value": value})
            log.warning("cas: ref %s differs on replica %s (moved there); kept it, %s's value is %s",
                        name, out.replica, source_name, aside)
            new_state[name] = state.get(name, have[0])
    for name, (value, version) in sorted(theirs.items()):
        if name in ours or state.get(name) != value:
            continue  # the replica's own ref (or one moved there): kept
        try:
            target.backend.write(REFS + name, value.encode() + b"\n", if_version=version)  # still ours?
        except PreconditionFailedError:
            continue
        target.backend.delete(REFS + name)
        out.refs_removed.append(name)
    target.backend.write(_state_key(source_name), json.dumps({"refs": new_state, "time": time.time()}).encode())


def _held_refs(ours: dict[str, tuple[str, str]], archived: list[str],
               reaches: Callable[[str], set[str]] | None) -> set[str]:
    """The refs whose snapshot reaches one of the ``archived`` packs (or cannot be read to say)."""
    if not archived or reaches is None:
        return set()
    missing = {m.group(2) for k in archived if (m := PACK_KEY.fullmatch(k))}
    held = set()
    for name, (value, _) in ours.items():
        try:
            if reaches(value) & missing:
                held.add(name)
        except CasError:
            held.add(name)  # not known: not claimed to be there
    return held


def sync_round(
    source: Store,
    target: Store,
    *,
    source_name: str,
    target_name: str,
    batch_size: int,
    topology_bytes: bytes | None,
    repository_id: str,
    gc: Callable[[Store], int] | None = None,
    reaches: Callable[[str], set[str]] | None = None,
) -> ReplicaRound:
    """One round from ``source`` to ``target`` (see the module docstring). Errors of the target
    (unreachable, refused) end the round and are reported, not raised.

    A pack the replica lacks that sits in an archive tier here cannot be read: the rest is
    copied, and ``reaches(snapshot id hex)`` (the pack ids, hex, a snapshot needs) says which
    refs to hold back. Without it no ref is synced while such a pack is missing there."""
    out = ReplicaRound(target_name)
    began = time.monotonic()
    try:
        ensure_replica(source.backend, target.backend, repository_id)
        # Both gcs wait: the source's must not delete a pack of a ref read here, the replica's
        # must not take packs copied before their refs for dead.
        with source.lock(exclusive=False), target.lock(exclusive=False):
            ours = _read_refs(source)  # refs first: every pack they reach is listed below
            have = _keys(target.backend, PACKS)
            packs = _keys(source.backend, PACKS)
            missing = sorted(k for k in packs if k not in have and PACK_KEY.fullmatch(k))
            data = [k for k in missing if k.endswith(".pack")]
            meta = [k for k in missing if not k.endswith(".pack")]
            out.already_there += len(packs) - len(missing)
            _copy_all(source.backend, target.backend, data, batch_size, out, True)
            _copy_all(source.backend, target.backend, meta, batch_size, out, True)
            have_idx = _keys(target.backend, INDEXES)
            idx = sorted(k for k in _keys(source.backend, INDEXES) if k not in have_idx)
            _copy_all(source.backend, target.backend, idx, batch_size, out, False)
            if topology_bytes is not None:
                target.backend.write(TOPOLOGY_KEY, topology_bytes)
            if out.not_copied:
                out.error = (f"{len(out.not_copied)} damaged pack(s) not replicated, so no refs were written; "
                             "run `cas check --repair` on the source")
            elif out.archived and reaches is None:
                out.error = (f"{len(out.archived)} pack(s) the replica lacks are in an archive tier, so no refs "
                             "were written; `cas tier warmup` the snapshots that need them")
            else:
                sync_refs(ours, target, source_name, out, _held_refs(ours, out.archived, reaches))
                if out.refs_held:
                    log.warning("cas: %d ref(s) not replicated to %s: their snapshots need %d archived pack(s) "
                                "it lacks (`cas tier warmup` them, then replicate)", len(out.refs_held),
                                target_name, len(out.archived))
        if out.refs_removed and gc is not None:
            out.gc_bytes_freed = gc(target)
    except CasError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        log.warning("cas: replication to %s stopped: %s", target_name, out.error)
    out.seconds = time.monotonic() - began
    return out


def replica_lag(source: Store, target: Store, snapshot_time: Callable[[SnapshotId], float | None],
                now: float | None = None) -> dict[str, Any]:
    """What the replica lacks: snapshots (refs whose value it does not hold), pack bytes, and the
    age of the oldest snapshot not yet there."""
    now = time.time() if now is None else now
    ours = _read_refs(source)
    theirs = _read_refs(target)
    behind = sorted(name for name, (value, _) in ours.items() if theirs.get(name, ("",))[0] != value)
    have = _keys(target.backend, PACKS)
    missing_bytes = sum(size for key, size in _keys(source.backend, PACKS).items() if key not in have)
    times = []
    for name in behind:
        try:
            t = snapshot_time(SnapshotId(bytes.fromhex(ours[name][0])))
        except (ValueError, CasError):
            t = None
        if t is not None:
            times.append(t)
    return {
        "snapshots_behind": len(behind),
        "refs_behind": behind,
        "bytes_behind": missing_bytes,
        "oldest_unsynced_age_s": (now - min(times)) if times else 0.0,
    }
