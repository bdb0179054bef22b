"""Disaster recovery for a repository: replicas, sync, failover, tiers, heal (the engine side of
``Repository.add_replica`` / ``replicate`` / ``set_failover`` / ``set_tiers`` / ...).

Opening a repository reads its topology (``cas.topology``) and composes its backend from it:
the primary's store, wrapped in a :class:`~cas.backends.TieredBackend` when it has tiers, and
with replicas and failover settings all regions in a :class:`~cas.backends.FailoverBackend`
whose serving region a :class:`~cas.regions.RegionMonitor` chooses. When the primary does not
answer at open time, the topology this machine cached tells where the replicas are, and the
repository opens from the healthiest of them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cas.backends import Backend, FailoverBackend, TieredBackend, open_backend
from cas.errors import CasError, ConfigError, FencedError, StorageUnavailableError, UsageError
from cas.ids import SnapshotId
from cas.layout import Store, local_dir_for, open_store
from cas.packcache import CachedPacks
from cas.reach import reached_chunks
from cas.regions import RegionMonitor, read_epoch
from cas.replication import ReplicationReport, ensure_replica, replica_lag, sync_round
from cas.tiering import packs_of
from cas.topology import (
    FailoverSettings,
    RegionSpec,
    SyncSettings,
    TierSpec,
    Topology,
    apply_yaml,
    cache_topology,
    cached_topology,
    check_tiers,
    default_topology,
    kept_options,
    read_topology,
    same_location,
    tier_spec,
    write_topology,
)

if TYPE_CHECKING:
    from cas.reports import Snapshot
    from cas.repository import Repository

log = logging.getLogger("cas")
__all__ = ["DrState", "FailoverSettings", "RegionSpec", "ReplicationReport", "SyncSettings", "TierSpec", "Topology",
           "default_topology"]


@dataclass
class DrState:
    """What an open repository holds for disaster recovery."""

    #: the primary's own backend, as opened (before tiers or failover wrap it)
    primary: Backend | None
    primary_options: dict[str, Any] = field(default_factory=dict)
    monitor: RegionMonitor | None = None
    #: replica name -> its backend (opened once per process)
    backends: dict[str, Backend] = field(default_factory=dict)
    #: replica name -> storage options given in this process (secrets included; never stored)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    opened_from: str | None = None  # a replica's name when the primary was down at open time
    #: a replica's name when its own URL was opened: a direct view of that region, whose ref
    #: writes are fenced unless its epoch object says it serves
    direct: str | None = None

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()


def _tier_backend(spec: TierSpec) -> Backend:
    options = dict(spec.storage_options)
    if spec.storage_class:
        options["storage_class"] = spec.storage_class
    if "://" not in spec.url or spec.url.startswith("file://"):
        options.setdefault("create", True)
    return open_backend(spec.url, options)


def _replica_backend(state: DrState, spec: RegionSpec) -> Backend:
    backend = state.backends.get(spec.name)
    if backend is None:
        options = {**spec.storage_options, **state.options.get(spec.name, {})}
        if "://" not in spec.url or spec.url.startswith("file://"):
            options.setdefault("create", True)
        backend = state.backends[spec.name] = open_backend(spec.url, options)
    return backend


def open_repository_store(
    url: str | os.PathLike[str], storage_options: dict[str, Any] | None
) -> tuple[Store, dict[str, Any], Topology, DrState]:
    """The store (composed from the topology), config, topology and DR state of a repository."""
    text = os.fspath(url)
    opened_from = None
    try:
        store, config = open_store(text, storage_options)
        topology = read_topology(store.backend, text, storage_options)
    except StorageUnavailableError as exc:
        cached = cached_topology(text)
        if cached is None or cached.failover is None or not cached.failover.auto_failover or not cached.replicas:
            raise
        for spec in sorted((r for r in cached.replicas.values() if r.active), key=lambda r: -r.weight):
            try:
                store, config = open_store(spec.url, spec.storage_options)
                topology = read_topology(store.backend, cached.primary.url)
            except CasError as other:
                log.warning("cas: replica %s is not reachable either: %s", spec.name, other)
                continue
            opened_from = spec.name
            log.warning("cas: primary %s did not answer (%s); opened from replica %s", text, exc, spec.name)
            break
        else:
            raise
    state = DrState(store.backend if opened_from is None else None, dict(storage_options or {}),
                    opened_from=opened_from)
    if opened_from is None and not same_location(text, topology.primary.url, storage_options,
                                                 topology.primary.storage_options):
        direct = next((r.name for r in topology.replicas.values()
                       if same_location(text, r.url, storage_options, r.storage_options)), None)
        if direct is not None:
            state.direct = direct
            fenced = FailoverBackend([(direct, store.backend)], direct, fence=_replica_fence(topology))
            return Store(fenced, store.url, store.local_dir), config, topology, state
    composed = compose(store, config, topology, state)
    cache_topology(topology, text, *(r.url for r in topology.regions()))
    return composed, config, topology, state


def _replica_fence(topology: Topology) -> Callable[[str, Backend], None]:
    def fence(name: str, backend: Backend) -> None:
        epoch, serving = read_epoch(backend)
        if serving != name:
            who = serving or topology.primary.name
            where = topology.primary.url if who == topology.primary.name else "another region"
            raise FencedError(
                f"replica {name} does not serve (epoch {epoch}: {who} serves, at {where}); nothing was "
                "written. Write through the serving region: open the primary's URL"
            )
    return fence


def compose(store: Store, config: dict[str, Any], topology: Topology, state: DrState) -> Store:
    """The store whose backend the topology calls for (or ``store`` itself when plain)."""
    primary = state.primary
    if primary is None:  # opened from a replica: the primary is opened lazily, it may come back
        primary = state.primary = open_backend(topology.primary.url, state.primary_options)
    if len(topology.tiers) > 1:
        primary = TieredBackend([(topology.tiers[0].name, primary)]
                                + [(t.name, _tier_backend(t)) for t in topology.tiers[1:]])
    if topology.failover is None or not topology.replicas:
        if primary is store.backend:
            return store
        return Store(primary, store.url, store.local_dir)
    regions: list[tuple[str, Backend]] = [(topology.primary.name, primary)]
    regions += [(r.name, _replica_backend(state, r)) for r in topology.replicas.values()]
    serving = state.opened_from or topology.primary.name
    fb = FailoverBackend(regions, serving)
    url = topology.primary.url
    local_dir = store.local_dir if state.opened_from is None else local_dir_for(primary, config["repository_id"], url)
    composed = Store(fb, url, local_dir)
    bs = topology.sync.batch_size

    def catch_up(source: str, target: str, lock_wait_s: float | None = None) -> bool:
        stores = _region_store(composed, fb, source), _region_store(composed, fb, target)
        for region_store in stores:  # while writes are paused: a holder of the lock may be waiting on them
            region_store.lock_wait_s = lock_wait_s or region_store.lock_wait_s
        out = sync_round(*stores,
                         source_name=source, target_name=target, batch_size=bs,
                         topology_bytes=topology.to_json(), repository_id=str(config["repository_id"]))
        if out.error:
            log.warning("cas: catch-up of %s from %s did not complete: %s", target, source, out.error)
        return out.error is None

    monitor = RegionMonitor(topology.regions(), fb, topology.failover, catch_up)
    monitor.adopt_epochs()
    if state.opened_from is not None and monitor.serving != state.opened_from:
        fb.switch(state.opened_from)
        monitor._mark_serving()
    if state.opened_from is not None:
        h = monitor.health[topology.primary.name]
        h.state, h.consecutive_failures, h.last_error = "down", 1, "did not answer at open"
        epoch_serving = monitor.epoch
        monitor.switch(state.opened_from, "failover", f"primary did not answer at open (epoch was {epoch_serving})")
    if state.monitor is not None:
        state.monitor.stop()
    state.monitor = monitor
    monitor.start()
    return composed


def _packs_reached(repo: Repository, snapshot_hex: str) -> set[str]:
    """The packs (ids, hex) a snapshot needs: its nodes, its chunks and their delta bases."""
    sid = SnapshotId(bytes.fromhex(snapshot_hex))
    chunks = [cid for cid, _ in reached_chunks(repo.reader, sid, snapshot_hex[:12])]
    return {pack_id.hex() for pack_id in packs_of(repo, chunks)}


def _region_store(composed: Store, fb: FailoverBackend, name: str) -> Store:
    return Store(fb.region(name), composed.url, composed.local_dir / "regions" / name)


def save_topology(repo: Repository, topology: Topology) -> None:
    """Store the topology in the repository, every reachable replica and this machine's cache,
    then recompose the open repository's backend to match."""
    write_topology(repo.store.backend, topology)
    state = repo._dr
    for spec in topology.replicas.values():
        try:
            write_topology(_replica_backend(state, spec), topology)
        except CasError as exc:
            log.warning("cas: replica %s did not get the new topology yet (%s); the next sync brings it",
                        spec.name, exc)
    cache_topology(topology, repo.url, *(r.url for r in topology.regions()))
    repo.topology = topology
    plain = Store(state.primary or repo.store.backend, repo.url, repo.store.local_dir)
    new = compose(plain, repo.config, topology, state)
    repo.store.backend = new.backend
    repo.store.is_local = new.is_local


# -- replicas ----------------------------------------------------------------------------

def add_replica(repo: Repository, name: str, url: str, *, storage_options: dict[str, Any] | None,
                region: str | None, active: bool, weight: float) -> RegionSpec:
    top = repo.topology
    spec = RegionSpec(name, os.fspath(url), region, float(weight), bool(active),
                      kept_options(storage_options, f"replica {name}"))
    # validate through the topology rules (names, urls)
    from cas.topology import _name, _url  # noqa: PLC0415 - the same checks the YAML gets

    _name(name, "replica name")
    _url(spec.url, f"replica {name}")
    if name == top.primary.name or name in top.replicas:
        raise UsageError(f"a region named {name!r} exists already (`cas replica ls`); remove it first")
    for r in top.regions():
        mine = {**r.storage_options, **(repo._dr.primary_options if r is top.primary else repo._dr.options.get(
            r.name, {}))}
        if same_location(r.url, spec.url, mine, storage_options):
            raise UsageError(f"{spec.url} is already region {r.name} of this repository")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
        raise UsageError(f"replica weight must be a non-negative number, got {weight!r}")
    repo._dr.options[name] = dict(storage_options or {})
    backend = _replica_backend(repo._dr, spec)
    ensure_replica(repo.store.backend, backend, str(repo.config["repository_id"]))
    save_topology(repo, Topology(top.primary, {**top.replicas, name: spec}, top.failover, top.sync, top.tiers))
    return spec


def remove_replica(repo: Repository, name: str) -> RegionSpec:
    top = repo.topology
    if name not in top.replicas:
        raise UsageError(f"no replica named {name!r} (replicas: {', '.join(top.replicas) or 'none'})")
    if repo._dr.monitor is not None and repo._dr.monitor.serving == name:
        raise UsageError(f"replica {name!r} serves now (failover); it can be removed once the primary serves again")
    replicas = {n: r for n, r in top.replicas.items() if n != name}
    removed = top.replicas[name]
    save_topology(repo, Topology(top.primary, replicas, top.failover, top.sync, top.tiers))
    backend = repo._dr.backends.pop(name, None)
    if backend is not None:
        backend.close()
    return removed


def _source(repo: Repository) -> tuple[str, Store]:
    backend = repo.store.backend
    if isinstance(backend, FailoverBackend):
        name = backend.serving
        return name, _region_store(repo.store, backend, name)
    return repo.topology.primary.name, repo.store


def _targets(repo: Repository, only_active: bool) -> list[tuple[RegionSpec, Store]]:
    state = repo._dr
    source_name, _ = _source(repo)
    out = []
    for spec in repo.topology.regions():
        if spec.name == source_name or (only_active and not spec.active):
            continue
        if spec.name == repo.topology.primary.name:
            backend = state.primary
            if backend is None:
                continue
            if isinstance(repo.store.backend, FailoverBackend):
                backend = repo.store.backend.region(spec.name)
        else:
            backend = _replica_backend(state, spec)
        out.append((spec, Store(backend, spec.url, local_dir_for(backend, str(repo.config["repository_id"]),
                                                                 spec.url))))
    return out


def replicate(repo: Repository, batch_size: int | None = None, *, only_active: bool = False) -> ReplicationReport:
    """One round from the serving region to every other region (see ``cas.replication``)."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    bs = batch_size or repo.topology.sync.batch_size
    source_name, source = _source(repo)
    report = ReplicationReport()
    topology_bytes = repo.topology.to_json()
    for spec, target in _targets(repo, only_active):
        out = sync_round(source, target, source_name=source_name, target_name=spec.name, batch_size=bs,
                         topology_bytes=topology_bytes, repository_id=str(repo.config["repository_id"]),
                         gc=lambda st: _replica_gc(repo, st), reaches=lambda sid: _packs_reached(repo, sid))
        try:
            out.lag = replica_lag(source, target, lambda sid: repo._snapshot_node(sid).time_ns / 1e9)
        except CasError as exc:
            out.lag = {"error": str(exc)}
        report.rounds.append(out)
    repo._last_replication = report
    return report


def _replica_gc(repo: Repository, target: Store) -> int:
    from cas.repository import Repository as Repo  # noqa: PLC0415 - the replica's own gc, same protocol

    other = Repo(Store(target.backend, target.url, target.local_dir), dict(repo.config))
    try:
        return other.gc().bytes_freed
    finally:
        if other._pool is not None:
            other._pool.shutdown(wait=True)
        other.index.close()  # not close(): the replica's backend stays open for this repository


def lag(repo: Repository) -> dict[str, dict[str, Any]]:
    _, source = _source(repo)
    out: dict[str, dict[str, Any]] = {}
    for spec, target in _targets(repo, False):
        try:
            out[spec.name] = replica_lag(source, target, lambda sid: repo._snapshot_node(sid).time_ns / 1e9)
        except CasError as exc:
            out[spec.name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def after_save(repo: Repository, snap: Snapshot) -> None:
    """``sync.mode: sync``: a save returns once every active replica holds the snapshot."""
    if repo.topology.sync.mode != "sync" or not repo.topology.replicas:
        return
    report = replicate(repo, only_active=True)
    behind = [r for r in report.rounds if r.error or snap.ref in r.lag.get("refs_behind", [snap.ref])]
    if behind:
        raise StorageUnavailableError(
            f"snapshot {snap.short_id} is committed in region {_source(repo)[0]} but not yet in "
            + ", ".join(f"{r.replica} ({r.error or 'behind'})" for r in behind)
            + " (sync.mode is sync); the next `cas replicate` round copies it"
        )


# -- settings ------------------------------------------------------------------------------

def set_failover(repo: Repository, **settings: Any) -> FailoverSettings:
    failover = FailoverSettings(**settings)
    top = repo.topology
    save_topology(repo, Topology(top.primary, top.replicas, failover, top.sync, top.tiers))
    return failover


def set_sync(repo: Repository, **settings: Any) -> SyncSettings:
    unknown = sorted(set(settings) - {"mode", "interval", "batch_size"})
    if unknown:
        raise UsageError(f"set_sync: unknown setting(s) {', '.join(unknown)} (known: mode, interval, batch_size)")
    sync = dataclasses.replace(repo.topology.sync, **settings)
    top = repo.topology
    save_topology(repo, Topology(top.primary, top.replicas, top.failover, sync, top.tiers))
    return sync


def set_tiers(repo: Repository, tiers: list[Any]) -> list[TierSpec]:
    specs = []
    for t in tiers:
        if isinstance(t, TierSpec):
            specs.append(t)
        elif isinstance(t, dict):
            try:
                specs.append(tier_spec(**t))
            except TypeError as exc:
                raise ConfigError(f"tier {t!r}: {exc}") from None
        else:
            raise UsageError(f"a tier is a dict (name, url, retention, storage_class) or TierSpec, got {t!r}")
    check_tiers(specs, repo.url)
    top = repo.topology
    save_topology(repo, Topology(top.primary, top.replicas, top.failover, top.sync, specs))
    return specs


def apply_config(repo: Repository, text: str) -> Topology:
    top = apply_yaml(repo.topology, text, repo.url, repo._dr.primary_options)
    for name, spec in top.replicas.items():
        if name not in repo.topology.replicas:
            ensure_replica(repo.store.backend, _replica_backend(repo._dr, spec), str(repo.config["repository_id"]))
    save_topology(repo, top)
    return top


def health(repo: Repository) -> dict[str, Any]:
    monitor = repo._dr.monitor
    if monitor is not None:
        return monitor.report()
    spec = repo.topology.primary
    return {"serving": spec.name, "epoch": 0, "failover_count": 0, "transitions": [],
            "regions": {spec.name: {"name": spec.name, "region": spec.region, "url": spec.url, "weight": spec.weight,
                                    "active": True, "state": "unknown", "serving": True, "consecutive_failures": 0,
                                    "consecutive_successes": 0, "last_error": None, "last_check": None,
                                    "last_ok": None, "latency_s": None}}}


def region_name(repo: Repository) -> str:
    monitor = repo._dr.monitor
    name = monitor.serving if monitor is not None else repo.topology.primary.name
    spec = next(r for r in repo.topology.regions() if r.name == name)
    return spec.region or spec.name


VERIFY_STATUS = "status/verify.json"


def record_verify(repo: Repository, ok: bool, read_data: bool, problems: int) -> None:
    """Keep the outcome of a whole-repository verify in the store (for metrics and operators)."""
    body = {"time": time.time(), "ok": ok, "read_data": read_data, "problems": problems,
            "host": socket.gethostname()}
    try:
        repo.store.backend.write(VERIFY_STATUS, json.dumps(body).encode())
    except CasError as exc:  # a read-only store still verifies
        log.warning("cas: could not record the verify result: %s", exc)


def last_verify(repo: Repository) -> dict[str, Any] | None:
    try:
        body = json.loads(repo.store.backend.read(VERIFY_STATUS).decode())
    except (CasError, UnicodeDecodeError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def heal_sources(repo: Repository) -> list[tuple[str, Backend]]:
    """Where to fetch intact copies of damaged or missing packs from (check --repair): this
    machine's pack cache (a remote store's), then the replicas. Every copy is checked first."""
    out: list[tuple[str, Backend]] = []
    if repo.store.pack_cache.enabled:
        out.append(("this machine's pack cache", CachedPacks(repo.store.pack_cache)))
    for spec, target in _targets(repo, False):
        out.append((spec.name, target.backend))
    return out

