"""Regions of one repository: which one serves, health checks, failover and failback.

A repository with replicas and failover settings is opened over a
:class:`~cas.backends.FailoverBackend`: every operation goes to the serving region, reads fall
over to replicas at once when it does not answer. :class:`RegionMonitor` decides which region
serves. Each ``health_check_interval`` it probes every active region with a real round trip
(write, read back, delete a small object) and counts consecutive failures and successes:

* **failover**: after ``failure_threshold`` consecutive failures of the serving region, the
  healthy active region of highest weight serves (reads and writes);
* **failback**: once a region of higher weight (the primary) has ``recovery_threshold``
  consecutive successes, it is first brought up to date with what was written meanwhile (one
  replication round from the serving region into it, conflicts kept side by side) and only
  then serves again.

Writes are fenced by an epoch (``failover/epoch.json`` in each region: the epoch number and the
region that serves at it). Each switch writes a newer epoch to the region taking over and,
where they answer, to the others. Before a ref is written the region's epoch object is read:
if it names another region as serving, the write is refused with
:class:`~cas.errors.FencedError`. So a client still writing to a region that lost its role is
stopped as soon as that region hears of the new epoch, and what it wrote before is kept side
by side by the catch-up (never overwritten). Every transition is logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any

from cas.backends import Backend, FailoverBackend, RetryingBackend
from cas.errors import CasError, FencedError, ObjectNotFoundError
from cas.topology import FailoverSettings, RegionSpec

log = logging.getLogger("cas")
EPOCH_KEY = "failover/epoch.json"
#: how long the catch-up made with writes paused waits for a lock (a holder may wait on a write)
PAUSED_LOCK_WAIT_S = 10.0


@dataclass
class RegionHealth:
    name: str
    region: str | None
    url: str
    weight: float
    active: bool
    state: str = "unknown"  # up | down | unknown
    serving: bool = False
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_error: str | None = None
    last_check: float | None = None
    last_ok: float | None = None
    latency_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Transition:
    time: float
    kind: str  # failover | failback | open
    from_region: str
    to_region: str
    epoch: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_epoch(backend: Backend) -> tuple[int, str | None]:
    """(epoch, serving region) a region's epoch object holds; (0, None) if it has none."""
    try:
        body = json.loads(backend.read(EPOCH_KEY).decode())
    except ObjectNotFoundError:
        return 0, None
    except (UnicodeDecodeError, ValueError):
        return 0, None
    if not isinstance(body, dict) or not isinstance(body.get("epoch"), int):
        return 0, None
    serving = body.get("serving")
    return int(body["epoch"]), serving if isinstance(serving, str) else None


def write_epoch(backend: Backend, epoch: int, serving: str) -> None:
    backend.write(EPOCH_KEY, json.dumps({"epoch": epoch, "serving": serving, "time": time.time()}).encode())


@dataclass
class RegionMonitor:
    """Health of every region and the choice of the serving one (see the module docstring).

    ``catch_up(source, target, lock_wait_s)`` runs one replication round from region ``source``
    into region ``target`` and says whether it completed (failback waits for it). A failback
    copies twice: once while writes go on, then again with this process's writes paused, and
    switches only once that completes; a round after the switch copies what other processes
    wrote to the old region before they saw the new epoch (retried until it completes).
    """

    regions: list[RegionSpec]
    backend: FailoverBackend
    settings: FailoverSettings
    catch_up: Callable[[str, str, float | None], bool]
    epoch: int = 0
    failover_count: int = 0
    transitions: list[Transition] = field(default_factory=list)
    health: dict[str, RegionHealth] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._epoch_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._owed_catch_up: set[tuple[str, str]] = set()  # (old region, new region) after a failback
        self._probe_pool = ThreadPoolExecutor(max(1, len(self.regions)), thread_name_prefix="cas-health")
        for spec in self.regions:
            self.health[spec.name] = RegionHealth(spec.name, spec.region, spec.url, spec.weight, spec.active)
        self.health[self.backend.serving].serving = True
        self.backend.set_fence(self.fence)

    # -- the serving region ------------------------------------------------------------

    @property
    def serving(self) -> str:
        return self.backend.serving

    def spec(self, name: str) -> RegionSpec:
        return next(r for r in self.regions if r.name == name)

    def _by_preference(self) -> list[RegionSpec]:
        order = {r.name: i for i, r in enumerate(self.regions)}
        return sorted((r for r in self.regions if r.active), key=lambda r: (-r.weight, order[r.name]))

    def adopt_epochs(self) -> None:
        """At open: take the newest epoch the reachable regions know, and the region it names."""
        best: tuple[int, str | None] = (0, None)
        for spec in self.regions:
            try:
                found = read_epoch(self._raw(spec.name))  # one try: a dead region must not stall the open
            except CasError:
                continue
            if found[0] > best[0]:
                best = found
        self.epoch = best[0]
        if best[1] is not None and best[1] in self.health and best[1] != self.serving:
            self.backend.switch(best[1])
            self._mark_serving()

    def fence(self, name: str, backend: Backend) -> None:
        """Refuse a ref write to region ``name`` if its epoch object says another region serves."""
        epoch, serving = read_epoch(backend)
        if serving is not None and serving != name:
            raise FencedError(
                f"region {name} no longer serves (epoch {epoch}: {serving} serves); nothing was written. "
                "Reopen the repository to write where it serves now"
            )
        # not under self._lock: a ref write calls this while counted as in flight, and a failback
        # holds self._lock while it waits for writes in flight to finish
        with self._epoch_lock:
            self.epoch = max(self.epoch, epoch)

    def _mark_serving(self) -> None:
        for h in self.health.values():
            h.serving = h.name == self.serving

    def _raw(self, name: str) -> Backend:
        """A region's backend without its retry loop (health checks count failures themselves)."""
        backend = self.backend.region(name)
        return backend.inner if isinstance(backend, RetryingBackend) else backend

    def switch(self, to: str, kind: str, reason: str) -> None:
        """Make ``to`` serve at a new epoch (written to it, and to every other region that answers)."""
        with self._lock:
            before = self.serving
            known = self.epoch
            others = [s.name for s in self.regions if s.name != to and self.health[s.name].state != "down"]
            for name in [to, *others]:
                with contextlib.suppress(CasError):
                    known = max(known, read_epoch(self._raw(name))[0])
            epoch = known + 1
            write_epoch(self.backend.region(to), epoch, to)
            for name in others:
                with contextlib.suppress(CasError):  # down: told when it comes back (_tell_stale)
                    write_epoch(self._raw(name), epoch, to)
            with self._epoch_lock:
                self.epoch = max(self.epoch, epoch)
            self.backend.switch(to)
            self._mark_serving()
            if kind == "failover":
                self.failover_count += 1
            self.transitions.append(Transition(time.time(), kind, before, to, epoch, reason))
            log.warning("cas: %s from region %s to %s at epoch %d: %s", kind, before, to, epoch, reason)

    # -- health checks -----------------------------------------------------------------

    def _probe(self, name: str) -> tuple[str, float, str | None]:
        began = time.monotonic()
        try:
            self._raw(name).health_probe()
        except CasError as exc:
            return name, time.monotonic() - began, f"{type(exc).__name__}: {exc}"
        except OSError as exc:
            return name, time.monotonic() - began, f"{type(exc).__name__}: {exc}"
        return name, time.monotonic() - began, None

    def check_once(self) -> None:
        """Probe every region once (in parallel), then fail over or back if the counts say so."""
        names = [r.name for r in self.regions if r.active or r.name == self.serving]
        futures = [self._probe_pool.submit(self._probe, n) for n in names]
        wait(futures)
        now = time.time()
        with self._lock:
            for fut in futures:
                name, latency, error = fut.result()
                h = self.health[name]
                h.last_check, h.latency_s = now, latency
                if error is None:
                    h.consecutive_successes += 1
                    h.consecutive_failures = 0
                    h.last_ok = now
                    if h.state != "up":
                        log.info("cas: region %s is up", name)
                    h.state = "up"
                else:
                    h.consecutive_failures += 1
                    h.consecutive_successes = 0
                    h.last_error = error
                    if h.state != "down":
                        log.warning("cas: region %s failed a health check: %s", name, error)
                    h.state = "down"
            self.backend.set_failing({n for n, h in self.health.items() if h.state == "down"})
            self._decide()
            if self._owed_catch_up and self.settings.auto_failover:
                self._pay_catch_up()
        self.backend.delete_stale_locks()

    def _decide(self) -> None:
        if not self.settings.auto_failover:
            return
        serving = self.health[self.serving]
        ranked = self._by_preference()
        if serving.consecutive_failures >= self.settings.failure_threshold:
            for spec in ranked:
                h = self.health[spec.name]
                if spec.name != serving.name and h.state == "up":
                    self.switch(spec.name, "failover",
                                f"{serving.name} failed {serving.consecutive_failures} health checks "
                                f"({serving.last_error})")
                    return
            return
        weight = self.spec(serving.name).weight
        for spec in ranked:
            h = self.health[spec.name]
            if spec.weight <= weight or spec.name == serving.name:
                break
            if h.consecutive_successes >= self.settings.recovery_threshold:
                self._fail_back(serving.name, spec.name, h.consecutive_successes)
                return
        self._tell_stale()

    def _fail_back(self, old: str, new: str, successes: int) -> None:
        if not self.catch_up(old, new, None):
            return
        # A save landing in the old region between the copy and the switch would stay there
        # (replication runs the other way once it serves again): writes wait, the copy runs
        # again, and only then does the new region serve.
        with self.backend.paused_writes():
            if not self.catch_up(old, new, PAUSED_LOCK_WAIT_S):
                return
            self.switch(new, "failback", f"{new} passed {successes} health checks and caught up")
        self._owed_catch_up.add((old, new))
        self._pay_catch_up()

    def _pay_catch_up(self) -> None:
        """Copy what other processes wrote to a region that no longer serves (they are fenced
        once they read the new epoch; a ref written before that is copied here)."""
        for old, new in sorted(self._owed_catch_up):
            if new != self.serving:
                self._owed_catch_up.discard((old, new))  # it moved on: a later failback copies again
            elif self.health[old].state == "up" and self.catch_up(old, new, None):
                self._owed_catch_up.discard((old, new))

    def _tell_stale(self) -> None:
        """Regions that came back learn the current epoch (so writes sent to them are fenced)."""
        for spec in self.regions:
            h = self.health[spec.name]
            if spec.name == self.serving or h.state != "up":
                continue
            try:
                epoch, serving = read_epoch(self.backend.region(spec.name))
                if (epoch < self.epoch or serving != self.serving) and self.epoch > 0:
                    write_epoch(self.backend.region(spec.name), self.epoch, self.serving)
            except CasError:
                continue

    # -- the background thread ---------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cas-health-checker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.health_check_interval):
            try:
                self.check_once()
            except Exception:  # the checker must outlive any one bad round
                log.exception("cas: health check round failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 + 2 * self.settings.health_check_interval)
            self._thread = None
        self._probe_pool.shutdown(wait=False, cancel_futures=True)

    def report(self) -> dict[str, Any]:
        with self._lock:
            return {
                "serving": self.serving,
                "epoch": self.epoch,
                "failover_count": self.failover_count,
                "regions": {n: h.to_dict() for n, h in self.health.items()},
                "transitions": [t.to_dict() for t in self.transitions],
            }
