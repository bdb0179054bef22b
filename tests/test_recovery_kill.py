"""Recovery commands killed by SIGKILL lose nothing: rebuild_index, check --repair, the rebuild an open
of a repository without an index does, and gc (alone and on a stale index) beside them.

A worker process (``tests/recovery_worker.py``, a child of a fork server that imports cas and torch
once) opens a prepared repository and runs one command; this process SIGKILLs it

* at random instants, drawn uniformly between 0 and the command's measured duration (open and
  command, one uninterrupted run on a copy of the same repository), counted from the moment the
  worker says it starts to open the repository; and
* at the named crash points of ``cas.faults`` the command passes (``CAS_CRASH_AT``; a point the
  command never reaches lets it finish, which is checked the same way).

After each kill it reopens the repository and checks that every snapshot that loaded before the
command loads bit-identically after it, that a second run of the command completes normally, and
that afterwards those snapshots still load and ``verify(read_data=True)`` names no other snapshot.

``check --repair`` runs on a repository with damage to repair: one flipped bit in a chunk's payload
(that snapshot cannot load before, and need not after) and one flipped bit in another pack's footer
(every chunk of it still verifies: what used it must load before and after). The lost-index and
stale-index repositories hold every chunk of every snapshot, so every snapshot must load after
the command, whatever loaded before it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import cas
from cas.pack import TRAILER, ChunkKind
from tests.recovery_worker import ROOT, assert_state, chunk_ids, footers, pack_files, series_state

WORKER = Path(__file__).with_name("recovery_worker.py")
CHUNK = 16 << 10
PACK = 32 << 10
SNAPSHOTS = 10
DELETED = 5  # k0..k4 are deleted before the command: gc has dead chunks to sweep and packs to repack
SEED = 3
TRIALS = 8
EVENT_TIMEOUT = 120.0
CRASH_POINTS = {
    "open": [],
    "rebuild_index": [],
    "check_repair": ["chunk_written:1", "pack_sealed:1"],
    "gc": ["gc_repacked", "gc_index_committed", "gc_unlinked"],
}
CAS = Path(sys.executable).parent / "cas"


def expected(tag: str) -> dict[str, Any]:
    return series_state(int(tag.removeprefix("k")), seed=SEED)


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("CAS_CRASH_AT", "CAS_REPO")}
    out["OPENBLAS_NUM_THREADS"] = "1"  # no BLAS thread pool in the fork server: fork() stays safe
    out["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [out.get("PYTHONPATH")])])
    return out


# the fork server ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    returncode: int | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    log: str = ""

    def event(self, kind: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e["event"] == kind), None)

    def __str__(self) -> str:
        return f"returncode {self.returncode}, events {self.events}\n{self.log}"


class ForkServer:
    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, env=env(),
        )
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self.running: int | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._events.put(json.loads(line))
        self._events.put(None)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def _next(self) -> dict[str, Any]:
        try:
            event = self._events.get(timeout=EVENT_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no word from the recovery worker in {EVENT_TIMEOUT} s:\n{self.log()}") from None
        if event is None:
            raise AssertionError(f"the recovery worker server died (status {self.proc.wait()}):\n{self.log()}")
        return event

    def _record(self, outcome: Outcome, event: dict[str, Any]) -> None:
        outcome.events.append(event)
        if event["event"] == "exit":
            self.running = None
            outcome.returncode = int(event["returncode"])
            outcome.log = self.log()

    def start(self, job: dict[str, Any]) -> tuple[int, Outcome]:
        """Fork a worker for ``job``; returns once it has opened the repository (or ended)."""
        assert self.running is None, "one job at a time"
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        event = self._next()
        assert event["event"] == "started", event
        self.running = pid = int(event["pid"])
        outcome = Outcome()
        while True:
            event = self._next()
            self._record(outcome, event)
            if event["event"] in ("ready", "exit"):
                return pid, outcome

    def wait(self, outcome: Outcome) -> Outcome:
        while outcome.returncode is None:
            self._record(outcome, self._next())
        return outcome

    def run(self, job: dict[str, Any]) -> Outcome:
        _pid, outcome = self.start(job)
        return self.wait(outcome)

    def reset(self) -> None:
        if self.running is not None:
            os.kill(self.running, signal.SIGKILL)
            self.wait(Outcome())

    def close(self) -> None:
        if self.running is not None:
            os.kill(self.running, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()
        self._thread.join(timeout=30)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._log.close()


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    srv = ForkServer(tmp_path_factory.mktemp("recovery-server") / "server.log")
    yield srv
    srv.close()


@pytest.fixture
def server(fork_server: ForkServer) -> Iterator[ForkServer]:
    yield fork_server
    fork_server.reset()


# prepared repositories ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    path: Path
    loads: frozenset[str]  # the snapshots that load before the command


def open_repo(path: Path) -> cas.Repository:
    """Open; if the engine refuses (a damaged index), ``cas index rebuild`` is the documented way out."""
    try:
        return cas.Repository.open(path, threads=2)
    except cas.CasError as exc:
        refused = exc
    proc = subprocess.run([str(CAS), "--repo", str(path), "index", "rebuild"], capture_output=True, text=True,
                          env=env(), timeout=180, check=False)
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, (
        f"open refused ({refused}) and `cas index rebuild` failed: {proc.stderr[-2000:]}"
    )
    return cas.Repository.open(path, threads=2)


def loading(path: Path, tags: list[str]) -> frozenset[str]:
    """The tags that load bit-identically (on a throw-away copy: opening may bring the index in line)."""
    scratch = path.parent / f"{path.name}-probe"
    shutil.copytree(path, scratch)
    try:
        out = set()
        with open_repo(scratch) as repo:
            for tag in tags:
                try:
                    assert_state(repo.load(tag), expected(tag), tag)
                except cas.CasError:
                    continue
                out.add(tag)
        return frozenset(out)
    finally:
        shutil.rmtree(scratch)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    path = tmp_path_factory.mktemp("clean") / "repo"
    with cas.Repository.init(path, chunk_size=CHUNK, pack_size=PACK, threads=2) as repo:
        for i in range(SNAPSHOTS):
            repo.save(expected(f"k{i}"), f"k{i}")
        for i in range(DELETED):
            repo.delete(f"k{i}")
        assert repo.gc(dry_run=True, repack_below=0.9).packs_repacked > 0, "test setup: gc should repack"
    tags = [f"k{i}" for i in range(DELETED, SNAPSHOTS)]
    loads = loading(path, tags)
    assert loads == set(tags)
    return Prepared(path, loads)


@pytest.fixture(scope="module")
def damaged(clean: Prepared, tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    path = tmp_path_factory.mktemp("damaged") / "repo"
    shutil.copytree(clean.path, path)
    fts = footers(path)
    files = pack_files(path)

    def data_pack(tag: str, exclude: set[str]) -> str:
        wanted = set(chunk_ids(expected(tag)["dense"], CHUNK))  # changed every step: k9's own chunks
        for name, entries in sorted(fts.items()):
            if name not in exclude and any(e.chunk_id in wanted and e.kind == ChunkKind.DATA for e in entries):
                return name
        raise AssertionError(f"test setup: no pack holds chunks of {tag}")

    payload_pack = data_pack("k9", set())
    entry = next(e for e in fts[payload_pack] if e.chunk_id in set(chunk_ids(expected("k9")["dense"], CHUNK)))
    flip(files[payload_pack], entry.offset + entry.stored_length // 2)
    footer_pack = data_pack("k6", {payload_pack})
    data = files[footer_pack].read_bytes()
    footer_at = int(TRAILER.unpack_from(data, len(data) - TRAILER.size)[0])
    flip(files[footer_pack], footer_at + 40)  # inside the first entry's base id: the footer sum fails
    loads = loading(path, [f"k{i}" for i in range(DELETED, SNAPSHOTS)])
    assert "k9" not in loads and "k6" in loads, loads
    return Prepared(path, loads)


@pytest.fixture(scope="module")
def lost_index(clean: Prepared, tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """The clean repository without its index: opening it rebuilds the index."""
    path = tmp_path_factory.mktemp("lost-index") / "repo"
    shutil.copytree(clean.path, path)
    shutil.rmtree(path / "index")
    return Prepared(path, clean.loads)


@pytest.fixture(scope="module")
def stale_index(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """The clean repository's history with an index copied before the last two saves and the deletes."""
    path = tmp_path_factory.mktemp("stale-index") / "repo"
    with cas.Repository.init(path, chunk_size=CHUNK, pack_size=PACK, threads=2) as repo:
        for i in range(SNAPSHOTS - 2):
            repo.save(expected(f"k{i}"), f"k{i}")
    shutil.copytree(path / "index", path.parent / "old-index")
    with cas.Repository.open(path, threads=2) as repo:
        for i in range(SNAPSHOTS - 2, SNAPSHOTS):
            repo.save(expected(f"k{i}"), f"k{i}")
        for i in range(DELETED):
            repo.delete(f"k{i}")
    shutil.rmtree(path / "index")
    shutil.copytree(path.parent / "old-index", path / "index")
    return Prepared(path, frozenset(f"k{i}" for i in range(DELETED, SNAPSHOTS)))


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x08]))


# the checks ----------------------------------------------------------------------------------------------


def job(path: Path, command: str, crash_at: str | None = None) -> dict[str, Any]:
    return {"repo": str(path), "command": command, "repack_below": 0.9, "crash_at": crash_at}


def assert_done(out: Outcome, what: str, may_refuse: bool = False) -> dict[str, Any]:
    """The command returned; with ``may_refuse``, a ``cas.CasError`` refusal counts (as a stale index
    may be refused rather than rebuilt)."""
    error = out.event("error")
    if may_refuse and out.returncode == 1 and error is not None and error["cas_error"]:
        return {"seconds": error["t"] - out.events[0]["t"], "refused": error["error"]}
    assert out.returncode == 0, f"{what}: {out}"
    done = out.event("done")
    assert done is not None, f"{what}: {out}"
    return done


def check_after(server: ForkServer, prepared: Prepared, path: Path, command: str, what: str,
                may_refuse: bool = False) -> None:
    """Everything that loaded before loads; a second run completes; then it all still holds."""
    with open_repo(path) as repo:
        for tag in sorted(prepared.loads):
            try:
                assert_state(repo.load(tag), expected(tag), tag)
            except cas.CasError as exc:
                raise AssertionError(f"{what}: {tag} must load (it loaded before), not after it: {exc!r}") from exc
    assert_done(server.run(job(path, command)), f"{what}: the second run", may_refuse)
    with open_repo(path) as repo:
        for tag in sorted(prepared.loads):
            try:
                assert_state(repo.load(tag), expected(tag), tag)
            except cas.CasError as exc:
                raise AssertionError(f"{what}: {tag} must load, not after the second run: {exc!r}") from exc
        report = repo.verify(read_data=True)
        named = {p.snapshot.split(" (")[0] for p in report.problems if p.snapshot}
        assert named.isdisjoint(prepared.loads), f"{what}: verify after the second run: {report.problems}"
        if prepared.loads == {f"k{i}" for i in range(DELETED, SNAPSHOTS)}:
            assert report.ok, f"{what}: verify after the second run: {report.problems}"


def measured_seconds(server: ForkServer, prepared: Prepared, tmp: Path, command: str, may_refuse: bool) -> float:
    """The shorter of two uninterrupted runs (the first may pay for cold caches), each checked."""
    seconds = []
    for run in range(2):
        path = tmp / f"measure{run}"
        shutil.copytree(prepared.path, path)
        done = assert_done(server.run(job(path, command)), f"uninterrupted {command}", may_refuse)
        check_after(server, prepared, path, command, f"uninterrupted {command}", may_refuse)
        shutil.rmtree(path)
        seconds.append(float(done["seconds"]))
    return min(seconds)


def kill_trials(server: ForkServer, prepared: Prepared, tmp: Path, command: str, seed: int,
                may_refuse: bool = False) -> None:
    duration = measured_seconds(server, prepared, tmp, command, may_refuse)
    rng = random.Random(seed)
    outcomes: list[int | None] = []
    trial = 0
    # TRIALS kills; if every one of them came too late (a loaded machine), up to TRIALS more, earlier
    while trial < TRIALS or (-signal.SIGKILL not in outcomes and trial < 2 * TRIALS):
        path = tmp / f"trial{trial}"
        shutil.copytree(prepared.path, path)
        delay = rng.uniform(0.0, duration if trial < TRIALS else duration / 4)
        trial += 1
        pid, out = server.start(job(path, command))
        ready = out.event("ready")
        assert ready is not None and out.returncode is None, out
        time.sleep(max(0.0, ready["t"] + delay - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):  # it may have just finished
            os.kill(pid, signal.SIGKILL)
        server.wait(out)
        what = f"{command} killed after {delay * 1000:.1f} of {duration * 1000:.1f} ms"
        if out.returncode != -signal.SIGKILL:
            assert_done(out, what, may_refuse)
        outcomes.append(out.returncode)
        check_after(server, prepared, path, command, what, may_refuse)
        shutil.rmtree(path)
    assert -signal.SIGKILL in outcomes, f"every {command} finished before its kill: {outcomes}"


def crash_point_trials(server: ForkServer, prepared: Prepared, tmp: Path, command: str) -> None:
    for point in CRASH_POINTS[command]:
        path = tmp / f"crash-{point.replace(':', '-')}"
        shutil.copytree(prepared.path, path)
        out = server.run(job(path, command, crash_at=point))
        what = f"{command} killed at crash point {point}"
        assert out.returncode in (0, -signal.SIGKILL), f"{what}: {out}"
        assert out.event("error") is None, f"{what}: {out}"
        check_after(server, prepared, path, command, what)
        shutil.rmtree(path)


# the tests -----------------------------------------------------------------------------------------------


def test_rebuild_index_killed_at_random_instants(server: ForkServer, clean: Prepared, tmp_path: Path) -> None:
    kill_trials(server, clean, tmp_path, "rebuild_index", seed=1)


def test_open_rebuilding_a_lost_index_killed_at_random_instants(
    server: ForkServer, lost_index: Prepared, tmp_path: Path
) -> None:
    kill_trials(server, lost_index, tmp_path, "open", seed=4)


def test_gc_with_a_stale_index_killed_at_random_instants(
    server: ForkServer, stale_index: Prepared, tmp_path: Path
) -> None:
    kill_trials(server, stale_index, tmp_path, "gc", seed=5, may_refuse=True)


def test_check_repair_killed_at_random_instants(server: ForkServer, damaged: Prepared, tmp_path: Path) -> None:
    kill_trials(server, damaged, tmp_path, "check_repair", seed=2)


def test_check_repair_killed_at_crash_points(server: ForkServer, damaged: Prepared, tmp_path: Path) -> None:
    crash_point_trials(server, damaged, tmp_path, "check_repair")


def test_gc_killed_at_random_instants(server: ForkServer, clean: Prepared, tmp_path: Path) -> None:
    kill_trials(server, clean, tmp_path, "gc", seed=3)


def test_gc_killed_at_crash_points(server: ForkServer, clean: Prepared, tmp_path: Path) -> None:
    crash_point_trials(server, clean, tmp_path, "gc")
