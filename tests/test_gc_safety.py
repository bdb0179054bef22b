"""GC safety: GC beside concurrent savers, GC killed mid-run, GC on an idle repository.

Real processes (children of ``tests/gc_worker.py serve``, a fork server started with
``sys.executable`` that imports torch once) save, forget, collect and hold the repository lock
while this process checks, afterwards, that

* no snapshot that exists fails to load bit-identically, and every committed save is either still
  there or was removed by ``forget`` (never lost to GC: FORMAT.md §9, the shared/exclusive lock);
* a GC killed by SIGKILL at each of its crash points (``gc_repacked``, ``gc_index_committed``,
  ``gc_unlinked``) loses nothing, and the next GC removes every leftover;
* one GC on an idle repository returns all unreachable space (the next one frees nothing), and
  GC waits for a save in flight.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import cas
from tests import gc_worker
from tests.helpers import assert_same, pack_files

WORKER = Path(__file__).with_name("gc_worker.py")
EVENT_TIMEOUT = 120.0  # for a word from the fork server (its torch import can be slow on a busy machine)
CHUNK = 16 << 10


# fork server ------------------------------------------------------------------------------------


class Server:
    """``gc_worker.py serve``: imports torch once, forks one real process per job of a batch."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        env = {k: v for k, v in os.environ.items() if k != "CAS_CRASH_AT"}
        env["OPENBLAS_NUM_THREADS"] = "1"  # no BLAS thread pool in the server: fork() stays safe
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, env=env,
        )
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self._ready = False

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))
        self.events.put(None)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def next_event(self, timeout: float = EVENT_TIMEOUT) -> dict[str, Any]:
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no word from the gc_worker server in {timeout} s:\n{self.log()}") from None
        if event is None:
            raise AssertionError(f"the gc_worker server died (status {self.proc.wait()}):\n{self.log()}")
        return event

    def wait_for(self, kind: str, timeout: float, seen: list[dict[str, Any]]) -> bool:
        """Read events (into ``seen``) until one of ``kind``; False when none came within ``timeout``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                return False
            if event is None:
                raise AssertionError(f"the gc_worker server died (status {self.proc.wait()}):\n{self.log()}")
            seen.append(event)
            if event["event"] == kind:
                return True
            if event["event"] == "batch_done":
                raise AssertionError(f"batch ended before any {kind!r} event: {seen}")
        return False

    def submit(self, jobs: list[dict[str, Any]]) -> None:
        if not self._ready:
            event = self.next_event()
            assert event["event"] == "ready", event
            self._ready = True
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"batch": jobs}) + "\n").encode())
        self.proc.stdin.flush()

    def wait_batch(self, timeout: float) -> tuple[dict[str, int], list[dict[str, Any]]]:
        """Every child's return code by job name, and every event of the batch."""
        deadline = time.monotonic() + timeout
        codes: dict[str, int] = {}
        events: list[dict[str, Any]] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"batch still running after {timeout} s: {events}\n{self.log()}")
            event = self.next_event(left)
            events.append(event)
            if event["event"] == "exit":
                codes[event["name"]] = event["returncode"]
            elif event["event"] == "batch_done":
                return codes, events

    def run(self, jobs: list[dict[str, Any]], timeout: float = 60.0) -> tuple[dict[str, int], list[dict[str, Any]]]:
        self.submit(jobs)
        return self.wait_batch(timeout)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("gc_worker") / "server.log")
    yield srv
    srv.close()


def errors_of(events: list[dict[str, Any]]) -> str:
    return "\n".join(e["error"] for e in events if e["event"] == "error")


# repository facts ---------------------------------------------------------------------------------


def disk_packs(path: Path) -> set[str]:
    return {p.stem for p in pack_files(path)}


def temp_files(path: Path) -> list[Path]:
    return [p for p in (path / "tmp").rglob("*") if p.is_file()]


def stored_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in pack_files(path))


def fresh_copy_size(tmp: Path, states: list[Any], pack_size: int) -> int:
    """Stored bytes of a new repository holding ``states`` (saved in this order), and nothing else."""
    with cas.Repository.init(tmp, chunk_size=CHUNK, pack_size=pack_size) as fresh:
        for i, state in enumerate(states):
            fresh.save(state, f"s{i}")
        assert fresh.stats().stored_bytes == stored_bytes(tmp)
    return stored_bytes(tmp)


def assert_clean(path: Path) -> None:
    """No temp files, and the pack files on disk are exactly the packs the index knows."""
    assert temp_files(path) == []
    with cas.Repository.open(path) as repo:
        indexed = {p.hex() for p in repo.index.packs()}
        assert repo.stats().stored_bytes == stored_bytes(path)
    assert disk_packs(path) == indexed


def assert_verified(repo: cas.Repository) -> None:
    report = repo.verify(read_data=True)
    assert report.ok, "\n".join(str(p) for p in report.problems)


def assert_gc_idle(report: cas.GcReport) -> None:
    """A GC that found nothing to do."""
    got = {k: getattr(report, k) for k in ("bytes_freed", "packs_deleted", "packs_repacked", "packs_written",
                                           "dead_chunks", "orphan_packs_deleted", "temp_files_deleted")}
    assert got == dict.fromkeys(got, 0), got


# 3. idle repository -------------------------------------------------------------------------------


@pytest.mark.usefixtures("server")  # starts the server (its torch import) while this test runs
def test_one_gc_on_an_idle_repository_returns_everything(tmp_path: Path) -> None:
    with cas.Repository.init(tmp_path / "repo", chunk_size=CHUNK, pack_size=128 << 10) as repo:
        for i in range(10):
            repo.save(gc_worker.make_state([1 + i % 4, 5 + i % 3], 500 + i), f"s{i}")
        forgot = repo.forget(keep_last=3)
        assert [s.tag for s in forgot.removed] == [f"s{i}" for i in range(7)]
        first = repo.gc()
        assert first.bytes_freed > 0 and first.packs_deleted > 0
        assert_gc_idle(repo.gc())
        for i in range(7, 10):
            assert_same(repo.load(f"s{i}"), gc_worker.make_state([1 + i % 4, 5 + i % 3], 500 + i))
        assert_verified(repo)
    assert_clean(tmp_path / "repo")


# 2. GC killed at each crash point -----------------------------------------------------------------

CRASH_PACK_SIZE = 64 << 10
CRASH_SNAPSHOTS = 8
CRASH_KEEP = 3


def crash_state(i: int) -> dict[str, Any]:
    """Snapshot i of the crash tests.

    ``base`` (one chunk) is written by snapshot 0 and shared by all, so the packs of snapshot 0
    turn sparse when it is forgotten (repacked); ``pair`` is shared by snapshots 2k and 2k+1, so
    snapshot 4's packs hold chunks kept alive by snapshot 5; ``own`` is unique (dead packs).
    """
    g = torch.Generator().manual_seed
    return {
        "base": torch.randn(CHUNK // 4, generator=g(1)),
        "pair": torch.randn(4 * CHUNK // 4, generator=g(100 + i // 2)),
        "own": torch.randn(5 * CHUNK // 4 + 10, generator=g(1000 + i)),
        "step": i,
    }


def build_crash_repo(path: Path) -> list[str]:
    """The repository before the killed GC: 8 snapshots, the last 3 kept by forget. Returns kept tags."""
    with cas.Repository.init(path, chunk_size=CHUNK, pack_size=CRASH_PACK_SIZE) as repo:
        for i in range(CRASH_SNAPSHOTS):
            repo.save(crash_state(i), f"c{i}")
        forgot = repo.forget(keep_last=CRASH_KEEP)
        kept = [s.tag for s in repo.snapshots()]
        assert [s.tag for s in forgot.removed] == [f"c{i}" for i in range(CRASH_SNAPSHOTS - CRASH_KEEP)]
        plan = repo.gc(dry_run=True)
        # the killed GC has to both delete dead packs and repack sparse ones (and unlink >= 2 files)
        assert plan.packs_deleted >= 2 and plan.packs_repacked >= 1, plan
    return [t for t in kept if t is not None]


@pytest.mark.parametrize("crash_at", ["gc_repacked", "gc_index_committed", "gc_unlinked:1", "gc_unlinked:2"])
def test_gc_killed_at_crash_point_loses_nothing(tmp_path: Path, server: Server, crash_at: str) -> None:
    path = tmp_path / "repo"
    kept = build_crash_repo(path)
    assert kept == [f"c{i}" for i in range(CRASH_SNAPSHOTS - CRASH_KEEP, CRASH_SNAPSHOTS)]
    packs_before = disk_packs(path)
    with cas.Repository.open(path) as repo:
        indexed_before = {p.hex() for p in repo.index.packs()}
        chunks_before = repo.index.chunk_count()
    assert packs_before == indexed_before

    codes, events = server.run([{"role": "gc_once", "name": "gc", "repo": str(path), "crash_at": crash_at}])
    assert codes == {"gc": -signal.SIGKILL}, (codes, errors_of(events))

    # the kill left what its window leaves (so each case really tests the window it names)
    packs_after = disk_packs(path)
    with cas.Repository.open(path) as repo:
        indexed_after = {p.hex() for p in repo.index.packs()}
        chunks_after = repo.index.chunk_count()
    if crash_at == "gc_repacked":  # new packs sealed, index untouched
        assert indexed_after == indexed_before and chunks_after == chunks_before
        assert packs_after > packs_before
    else:  # index moved; old packs (all, or all but the unlinked ones) still on disk
        assert chunks_after < chunks_before
        assert indexed_after - indexed_before and indexed_before - indexed_after
        assert indexed_after <= packs_after
        unlinked = int(crash_at.partition(":")[2] or 0)
        assert len(packs_after - indexed_after) == len(indexed_before - indexed_after) - unlinked >= 1

    with cas.Repository.open(path) as repo:
        assert [s.tag for s in repo.snapshots()] == kept
        for tag in kept:
            assert_same(repo.load(tag), crash_state(int(tag[1:])))
        assert_verified(repo)
        repo.gc()
        for tag in kept:  # the GC that cleans up after the killed one must not lose data either
            assert_same(repo.load(tag), crash_state(int(tag[1:])))
        assert_verified(repo)
        assert_gc_idle(repo.gc())
    assert_clean(path)
    assert disk_packs(path).isdisjoint(packs_before - indexed_after)  # every leftover is gone
    fresh = fresh_copy_size(tmp_path / "fresh", [crash_state(int(t[1:])) for t in kept], CRASH_PACK_SIZE)
    assert abs(stored_bytes(path) - fresh) <= 0.1 * fresh, (stored_bytes(path), fresh)

    with cas.Repository.open(path) as repo:
        repo.save(crash_state(99), "after")
        for tag in kept:
            assert_same(repo.load(tag), crash_state(int(tag[1:])))
        assert_same(repo.load("after"), crash_state(99))
        assert_verified(repo)
    assert_clean(path)


# 3b. GC waits for a save in flight ------------------------------------------------------------------


def test_gc_waits_for_a_save_in_flight(tmp_path: Path, server: Server) -> None:
    path = tmp_path / "repo"
    with cas.Repository.init(path, chunk_size=CHUNK, pack_size=128 << 10) as repo:
        for i in range(3):
            repo.save(gc_worker.make_state([i + 1], 700 + i), f"s{i}")
        repo.forget(keep_last=1)
    hold = 3.0
    server.submit([{"role": "hold_lock", "name": "holder", "repo": str(path), "seconds": hold}])
    events = []
    while not any(e["event"] == "locked" for e in events):
        events.append(server.next_event())
        assert events[-1]["event"] in ("started", "locked"), events
    with cas.Repository.open(path) as repo:
        t0 = time.monotonic()
        report = repo.gc()
        t1 = time.monotonic()
    codes, rest = server.wait_batch(30)
    assert codes == {"holder": 0}, errors_of(rest)
    locked = next(e["t"] for e in events if e["event"] == "locked")
    releasing = next(e["t"] for e in rest if e["event"] == "releasing")
    assert t0 < releasing, "precondition: gc was called while the lock was held"
    assert t1 >= releasing and t1 - locked >= hold, "gc finished while a save held the repository lock"
    assert t1 - t0 >= hold / 2, f"gc took {t1 - t0:.2f} s; it should have waited ~{hold} s for the lock"
    assert report.packs_deleted > 0
    with cas.Repository.open(path) as repo:
        assert_same(repo.load("s2"), gc_worker.make_state([3], 702))
        assert_gc_idle(repo.gc())


def test_save_resolving_latest_beside_forget_and_gc(
    tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save() resolves its parent ("latest") by reading every ref, then every snapshot node, outside
    the repository lock. Another process's forget + gc in between must not make the save fail.

    The interleaving is forced: the third (last) ``read_ref`` of the save's parent lookup runs a
    ``forget(keep_last=1)`` + ``gc()`` in a worker process before it returns. A save holding the lock
    by then makes that gc wait, which is fine: the hook waits for it at most a few seconds.
    """
    path = tmp_path / "repo"
    with cas.Repository.init(path, chunk_size=CHUNK, pack_size=128 << 10) as repo:
        for i in range(3):
            repo.save(gc_worker.make_state([i + 1], 800 + i), f"s{i}")
        store = repo._store
        real_read_ref = store.read_ref
        calls = 0
        seen: list[dict[str, Any]] = []

        def read_ref_then_race(name: str) -> Any:
            nonlocal calls
            sid = real_read_ref(name)
            calls += 1
            if calls == 3:  # every ref read, no snapshot node yet
                server.submit([{"role": "forget_gc", "name": "gc", "repo": str(path), "keep_last": 1}])
                assert server.wait_for("forgot", EVENT_TIMEOUT, seen), seen
                server.wait_for("gc", 3.0, seen)  # returns at once unless this save holds the lock
            return sid

        monkeypatch.setattr(store, "read_ref", read_ref_then_race)
        try:
            repo.save(gc_worker.make_state([9], 899), "s3")
        finally:
            monkeypatch.undo()
            if calls >= 3:
                codes, events = server.wait_batch(60)
                assert codes == {"gc": 0}, errors_of(seen + events)
        assert [e["refs"] for e in seen if e["event"] == "forgot"] in ([], [["s0", "s1"]])
    with cas.Repository.open(path) as repo:
        assert [s.tag for s in repo.snapshots()] == (["s2", "s3"] if calls >= 3 else ["s0", "s1", "s2", "s3"])
        assert_same(repo.load("s3"), gc_worker.make_state([9], 899))
        assert_same(repo.load("s2"), gc_worker.make_state([3], 802))
        assert_verified(repo)


def test_gc_beside_a_concurrent_forget(tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """``forget`` (and ``rm``) take no lock, so refs may vanish while GC marks; GC must still complete.

    Forced interleaving: GC's first ``read_ref`` of the mark first lets a worker process run
    ``forget(keep_last=1)`` (that worker's own gc then waits for this one's exclusive lock).
    """
    path = tmp_path / "repo"
    with cas.Repository.init(path, chunk_size=CHUNK, pack_size=128 << 10) as repo:
        for i in range(3):
            repo.save(gc_worker.make_state([i + 1], 900 + i), f"s{i}")
        store = repo._store
        real_read_ref = store.read_ref
        seen: list[dict[str, Any]] = []

        def race_then_read_ref(name: str) -> Any:
            if not seen:
                server.submit([{"role": "forget_gc", "name": "gc", "repo": str(path), "keep_last": 1}])
                assert server.wait_for("forgot", EVENT_TIMEOUT, seen), seen
            return real_read_ref(name)

        monkeypatch.setattr(store, "read_ref", race_then_read_ref)
        try:
            repo.gc()
        finally:
            monkeypatch.undo()
            if seen:
                codes, events = server.wait_batch(60)
                assert codes == {"gc": 0}, errors_of(seen + events)
        assert seen, "gc read no ref"
    with cas.Repository.open(path) as repo:
        assert [s.tag for s in repo.snapshots()] == ["s2"]
        assert_same(repo.load("s2"), gc_worker.make_state([3], 902))
        assert_verified(repo)
        assert_gc_idle(repo.gc())
    assert_clean(path)


# 1. savers and GC at once ------------------------------------------------------------------------

STRESS_SECONDS = 8.0
SAVERS = 3
STRESS_KEEP = 4
STRESS_PACK_SIZE = 256 << 10


def test_gc_beside_concurrent_savers(tmp_path: Path, server: Server) -> None:
    path = tmp_path / "repo"
    cas.Repository.init(path, chunk_size=CHUNK, pack_size=STRESS_PACK_SIZE).close()
    logs = tmp_path / "logs"
    logs.mkdir()
    jobs: list[dict[str, Any]] = [
        # back-to-back saves (no pause) resolving parent "latest": gc must still get its turn (the lock's
        # turnstile), and no save may trip over what a concurrent forget + gc removed
        {"role": "saver", "name": f"saver{w}", "repo": str(path), "worker": w, "seconds": STRESS_SECONDS,
         "log": str(logs / f"saver{w}.log"), "pause": 0}
        for w in range(SAVERS)
    ]
    jobs.append({"role": "gc_loop", "name": "gc", "repo": str(path), "seconds": STRESS_SECONDS,
                 "keep_last": STRESS_KEEP, "log": str(logs / "gc.log")})
    t0 = time.monotonic()
    codes, events = server.run(jobs, timeout=STRESS_SECONDS + 60)
    elapsed = time.monotonic() - t0
    assert codes == dict.fromkeys((j["name"] for j in jobs), 0), errors_of(events)
    assert elapsed < STRESS_SECONDS + 30, f"workers ran {elapsed:.1f} s"

    committed: dict[str, list[int]] = {}  # tag -> seeds (the last is the unique one)
    for w in range(SAVERS):
        for line in (logs / f"saver{w}.log").read_text().splitlines():
            tag, seeds = line.split(" ")
            committed[tag] = [int(s) for s in seeds.split(",")]
    forgotten: set[str] = set()
    gc_reports = []
    for line in (logs / "gc.log").read_text().splitlines():
        entry = json.loads(line)
        if "forgot" in entry:
            assert forgotten.isdisjoint(entry["forgot"]), "forget removed a snapshot twice"
            forgotten.update(entry["forgot"])
        else:
            gc_reports.append(entry["gc"])
    # the run was a real race: every saver committed, forget removed others' saves, gc freed space
    assert all(any(t.startswith(f"w{w}-") for t in committed) for w in range(SAVERS))
    assert len(gc_reports) >= 3 and forgotten
    assert sum(r["packs_deleted"] + r["packs_repacked"] for r in gc_reports) > 0

    with cas.Repository.open(path) as repo:
        snaps = repo.snapshots()
        present = {s.tag for s in snaps}
        assert len(present) == len(snaps) >= STRESS_KEEP
        assert present <= set(committed), "a snapshot no saver logged"
        assert present.isdisjoint(forgotten)
        lost = set(committed) - present - forgotten
        assert not lost, f"committed saves neither present nor forgotten: {sorted(lost)}"
        assert forgotten <= set(committed)
        states = []
        for snap in snaps:
            assert snap.tag is not None
            seeds = committed[snap.tag]
            assert snap.metadata == {"seeds": seeds[:-1], "unique": seeds[-1]}
            state = gc_worker.make_state(seeds[:-1], seeds[-1])
            assert_same(repo.load(snap.tag), state)
            states.append(state)
        assert_verified(repo)

        repo.gc()  # the repository is idle now: one GC returns everything unreachable
        assert_gc_idle(repo.gc())
        # packs at least half live survive the default GC; a tighter repack threshold compacts them,
        # after which the store is as small as a fresh repository holding the same snapshots
        repo.gc(repack_below=0.9)
        assert_gc_idle(repo.gc(repack_below=0.9))
        assert_verified(repo)
        for snap, state in zip(snaps, states, strict=True):
            assert_same(repo.load(snap.id), state)
    assert_clean(path)
    fresh = fresh_copy_size(tmp_path / "fresh", states, STRESS_PACK_SIZE)
    assert abs(stored_bytes(path) - fresh) <= 0.1 * fresh, (stored_bytes(path), fresh)
