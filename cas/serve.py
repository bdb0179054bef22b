"""``cas serve``: the endpoints monitoring and Kubernetes probes expect, over real HTTP.

    /health    liveness: 200 while the process and its background loops are alive
    /ready     readiness: 200 when the serving region answers a probe and the local index
               knows every pack the store lists (the cache is in sync); else 503 and why
    /metrics   Prometheus text format (prometheus-client): snapshots, logical and stored
               bytes, last save and last verify time and result, replication lag per
               replica, region health and the failover count

The WSGI app is served by waitress (a well-kept, pure-Python, multi-threaded WSGI server).
The same process can run the replicator (a round every ``sync.interval`` seconds) and the
health checker (when the repository has failover settings, it runs as soon as it opens).
Costly numbers (stats, lag) are refreshed in the background, never computed on a scrape.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cas.errors import CasError

if TYPE_CHECKING:
    from cas.repository import Repository

log = logging.getLogger("cas")
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


@dataclass
class ServeState:
    """What the background loops last saw (read by the endpoints, never recomputed on a request)."""

    repo: Repository
    refresh_interval: float = 15.0
    replicate_interval: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    lag: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_refresh: float | None = None
    last_refresh_error: str | None = None
    replication_rounds: int = 0
    last_replication: float | None = None
    last_replication_ok: bool | None = None
    ready: tuple[bool, list[str]] = (False, ["not checked yet"])
    started: float = field(default_factory=time.time)
    #: the serving region's last probe by the readiness check: (region, answered); it is the
    #: region's health when no failover settings run health checks
    probe: tuple[str, bool] | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # -- background loops ----------------------------------------------------------------

    def start(self) -> None:
        self._spawn("cas-serve-refresh", self._refresh_loop)
        if self.replicate_interval is not None:
            self._spawn("cas-serve-replicate", self._replicate_loop)

    def _spawn(self, name: str, fn: Callable[[], None]) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def stop(self, timeout: float = 5.0) -> list[str]:
        """Ask the loops to end and wait up to ``timeout`` seconds in all; the names of those still
        running (inside a round that does not end) are returned."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        return [t.name for t in self._threads if t.is_alive()]

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.refresh_interval)

    def refresh(self) -> None:
        repo = self.repo
        try:
            report = repo.stats()
            snaps = repo.snapshots()
            stats = {
                "snapshots": report.snapshot_count,
                "logical_bytes": report.logical_bytes,
                "stored_bytes": report.stored_bytes,
                "last_save_time": max((s.time for s in snaps), default=None),
                "last_verify": repo.last_verify(),
            }
            lag = repo.replication_lag() if repo.topology.replicas else {}
            ready = self._readiness()
            with self._lock:
                self.stats, self.lag, self.ready = stats, lag, ready
                self.last_refresh, self.last_refresh_error = time.time(), None
        except CasError as exc:
            with self._lock:
                self.last_refresh_error = f"{type(exc).__name__}: {exc}"
                self.ready = (False, [self.last_refresh_error])
            log.warning("cas serve: refresh failed: %s", exc)

    def _readiness(self) -> tuple[bool, list[str]]:
        repo = self.repo
        why = []
        serving = str(repo.health()["serving"])
        try:
            repo.store.backend.health_probe()
            answered = True
        except CasError as exc:
            why.append(f"serving region {repo.region} does not answer: {exc}")
            answered = False
        with self._lock:
            self.probe = (serving, answered)
        try:
            if repo._unknown_packs():
                why.append("the local index does not know every pack yet (it catches up at the next read)")
        except CasError as exc:
            why.append(f"cannot list packs: {exc}")
        return (not why, why)

    def _replicate_loop(self) -> None:
        assert self.replicate_interval is not None
        while not self._stop.is_set():
            self.replicate_once()
            self._stop.wait(self.replicate_interval)

    def replicate_once(self) -> None:
        lag: dict[str, dict[str, Any]] = {}
        try:
            report = self.repo.replicate()
            ok = report.ok
            lag = {r.replica: r.lag for r in report.rounds if r.lag and "error" not in r.lag}
        except CasError as exc:
            log.warning("cas serve: replication round failed: %s", exc)
            ok = False
        with self._lock:
            self.lag = {**self.lag, **lag}  # measured as the round ended: no wait for the next refresh
            self.replication_rounds += 1
            self.last_replication, self.last_replication_ok = time.time(), ok

    # -- endpoints -----------------------------------------------------------------------

    def readiness(self, fresh: bool = True) -> tuple[bool, list[str]]:
        if fresh:
            ready = self._readiness()
            with self._lock:
                self.ready = ready
        with self._lock:
            return self.ready


class _Collector(Collector):
    def __init__(self, state: ServeState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s = self.state
        with s._lock:
            stats, lag = dict(s.stats), dict(s.lag)
            rounds, last_rep, last_rep_ok = s.replication_rounds, s.last_replication, s.last_replication_ok
            probe = s.probe
        health = s.repo.health()

        def gauge(name: str, doc: str, value: float | None, labels: dict[str, str] | None = None) -> Metric:
            g = GaugeMetricFamily(name, doc, labels=list(labels or {}))
            if value is not None:
                g.add_metric(list((labels or {}).values()), float(value))
            return g

        yield gauge("cas_snapshots", "Snapshots in the repository", stats.get("snapshots"))
        yield gauge("cas_logical_bytes", "Bytes of all snapshots as saved", stats.get("logical_bytes"))
        yield gauge("cas_stored_bytes", "Bytes the packs take in the store", stats.get("stored_bytes"))
        yield gauge("cas_last_save_timestamp_seconds", "When the newest snapshot was saved",
                    stats.get("last_save_time"))
        verify = stats.get("last_verify") or {}
        yield gauge("cas_last_verify_timestamp_seconds", "When verify last ran", verify.get("time"))
        yield gauge("cas_last_verify_ok", "1 if the last verify found no problem", None if not verify
                    else float(bool(verify.get("ok"))))
        yield gauge("cas_replication_rounds_total", "Replication rounds this process ran", rounds)
        yield gauge("cas_last_replication_timestamp_seconds", "When the last replication round ended", last_rep)
        yield gauge("cas_last_replication_ok", "1 if the last replication round completed",
                    None if last_rep_ok is None else float(last_rep_ok))
        for metric, key, doc in (
            ("cas_replication_lag_snapshots", "snapshots_behind", "Snapshots a replica does not hold yet"),
            ("cas_replication_lag_bytes", "bytes_behind", "Pack bytes a replica does not hold yet"),
            ("cas_replication_lag_seconds", "oldest_unsynced_age_s", "Age of the oldest snapshot not replicated"),
        ):
            g = GaugeMetricFamily(metric, doc, labels=["replica"])
            for name, row in sorted(lag.items()):
                if key in row:
                    g.add_metric([name], float(row[key]))
            yield g
        up = GaugeMetricFamily("cas_region_up", "1 if the region passed its last health check", labels=["region"])
        serving = GaugeMetricFamily("cas_region_serving", "1 for the region serving now", labels=["region"])
        fails = GaugeMetricFamily("cas_region_consecutive_failures", "Consecutive failed health checks",
                                  labels=["region"])
        for name, h in sorted(health["regions"].items()):
            state = h["state"]
            if state == "unknown" and probe is not None and probe[0] == name:  # no health checks: the probe
                state = "up" if probe[1] else "down"
            if state != "unknown":  # never checked: no sample (a 0 would page someone)
                up.add_metric([name], 1.0 if state == "up" else 0.0)
            serving.add_metric([name], 1.0 if h["serving"] else 0.0)
            fails.add_metric([name], float(h["consecutive_failures"]))
        yield up
        yield serving
        yield fails
        yield gauge("cas_failover_total", "Failovers since this process started", health["failover_count"])
        yield gauge("cas_failover_epoch", "The failover epoch in force", health["epoch"])


def make_app(state: ServeState) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    registry = CollectorRegistry()
    registry.register(_Collector(state))

    def respond(start: StartResponse, status: str, body: bytes, kind: str) -> list[bytes]:
        start(status, [("Content-Type", kind), ("Content-Length", str(len(body)))])
        return [body]

    def app(environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return respond(start, "405 Method Not Allowed", b"GET only\n", "text/plain")
        if path == "/health":
            alive = state.alive()
            body = json.dumps({"alive": alive, "uptime_s": time.time() - state.started}).encode()
            return respond(start, "200 OK" if alive else "503 Service Unavailable", body, "application/json")
        if path == "/ready":
            ok, why = state.readiness()
            body = json.dumps({"ready": ok, "region": state.repo.region, "why": why}).encode()
            return respond(start, "200 OK" if ok else "503 Service Unavailable", body, "application/json")
        if path == "/metrics":
            return respond(start, "200 OK", generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8")
        return respond(start, "404 Not Found", b"not found: try /health, /ready or /metrics\n", "text/plain")

    return app


def serve(repo: Repository, host: str, port: int, *, replicate_interval: float | None,
          refresh_interval: float = 15.0, ready: Callable[[str, int], None] | None = None) -> None:
    """Serve until interrupted (SIGINT / SIGTERM end it)."""
    from waitress.server import create_server  # noqa: PLC0415 - only the serving process needs it

    state = ServeState(repo, refresh_interval=refresh_interval, replicate_interval=replicate_interval)
    server = None
    # the handlers go in before anything starts or is announced: a signal sent as soon as the
    # address is printed (an orchestrator's, a test's) must end the server, not kill it unclean
    handlers = _interrupt_on_signals()
    try:
        state.start()
        server = create_server(make_app(state), host=host, port=port, threads=4, ident="cas")
        bound = server.effective_port  # type: ignore[union-attr]
        log.warning("cas serve: listening on http://%s:%s (/health, /ready, /metrics)", host, bound)
        if ready is not None:
            ready(host, int(bound))
        server.run()  # returns on KeyboardInterrupt (waitress catches it)
    except KeyboardInterrupt:
        pass  # a signal before the loop ran (while starting or announcing): the same request to end
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        stuck = state.stop()
        if server is not None:
            server.close()
        if stuck:
            # SIGINT / SIGTERM must end the process: a round that does not return (a store that stopped
            # answering) is abandoned as a crash would abandon it; every write of a round is crash-safe
            log.warning("cas serve: %s did not stop within 5 s; exiting without waiting", ", ".join(stuck))
            logging.shutdown()
            os._exit(1)


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _interrupt_on_signals() -> dict[int, Any]:
    """SIGINT and SIGTERM end the server (through KeyboardInterrupt: the loops stop, the repository
    closes) whatever disposition the process inherited: a shell starts background jobs with SIGINT
    ignored, which would leave `cas serve` deaf to it. Returns the handlers to put back."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
