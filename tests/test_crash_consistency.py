"""Crash consistency: a save killed by SIGKILL at any step leaves the repository as it was.

Real worker processes (``tests/crash_worker.py``) save into a repository and are SIGKILLed, either by
a named crash point of ``cas.faults`` (``CAS_CRASH_AT``) or from outside at random times. After each
kill this process checks that

* every snapshot committed before the kill still has its id and loads bit-identically,
* ``verify(read_data=True)`` finds nothing wrong,
* the killed snapshot is absent (its tag unknown) unless the kill came after its ref was written,
  in which case it is complete and loads bit-identically,
* the next save, by a fresh process, succeeds and loads bit-identically.

The crash-point tests also check that the kill left what the crash-window table of FORMAT.md
(section 8) says it leaves (a temp pack, sealed packs the index does not know, index entries no ref
reaches), so each one really tests the window it names.

Most workers are children of a fork server (one torch import for the module instead of one per
process); ``test_crash_point_in_spawned_process`` runs a plain ``sys.executable crash_worker.py``
process with ``CAS_CRASH_AT`` in its environment, as a user would.
"""

from __future__ import annotations

import functools
import importlib.util
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import pytest
import torch

import cas
from tests.helpers import pack_files

WORKER = Path(__file__).with_name("crash_worker.py")
CHUNK_SIZE = 64 << 10
PACK_SIZE = 512 << 10
BASES = {"base-1": "base1", "base-2": "base2"}  # committed before every crash: tag -> variant
VICTIM = "victim"  # tag (and variant) of the save that is killed
EVENT_TIMEOUT = 120.0
ITERATIONS = 4  # of test_sigkill_at_random_times


def _load_worker() -> Any:
    spec = importlib.util.spec_from_file_location("crash_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


# expected contents ---------------------------------------------------------------


@functools.cache
def expected_state(variant: str) -> dict[str, tuple[torch.dtype, tuple[int, ...], bytes, torch.Tensor]]:
    return {
        name: (t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes(), t)
        for name, t in worker.make_state(variant).items()
    }


def assert_loads_identically(repo: cas.Repository, tag: str, variant: str) -> None:
    got = repo.load(tag)
    want = expected_state(variant)
    assert isinstance(got, dict), f"{tag}: loaded a {type(got).__name__}"
    assert list(got) == list(want), f"{tag}: keys {list(got)} != {list(want)}"
    for name, (dtype, shape, raw, tensor) in want.items():
        t = got[name]
        assert isinstance(t, torch.Tensor), f"{tag}/{name}: {type(t).__name__}"
        assert t.dtype == dtype and tuple(t.shape) == shape, f"{tag}/{name}: {t.dtype}{tuple(t.shape)}"
        assert torch.equal(t, tensor), f"{tag}/{name}: values differ"
        assert t.contiguous().view(torch.uint8).numpy().tobytes() == raw, f"{tag}/{name}: bytes differ"


def check_repository(
    path: Path, committed: dict[str, str], absent: Iterable[str] = (), load: Iterable[str] | None = None
) -> dict[str, str]:
    """The invariants after a kill; returns tag -> snapshot id.

    Exactly the ``committed`` snapshots (tag -> variant) exist and load bit-identically (only those in
    ``load``, when given), every tag of ``absent`` is unknown, and a full verify finds no problem.
    """
    with cas.Repository.open(path) as repo:
        snaps = repo.snapshots()
        assert sorted(s.tag or "" for s in snaps) == sorted(committed), "snapshots other than the committed ones"
        assert all(s.ref == s.tag for s in snaps)
        for tag in committed if load is None else load:
            assert_loads_identically(repo, tag, committed[tag])
        for tag in absent:
            with pytest.raises(cas.SnapshotNotFoundError):
                repo.load(tag)
            with pytest.raises(cas.SnapshotNotFoundError):
                repo.resolve(tag)
        report = repo.verify(read_data=True)
        assert report.ok, "\n".join(str(p) for p in report.problems)
        assert report.snapshots_checked == len(committed)
        assert report.chunks_checked > 0
        return {s.tag or "": s.id for s in snaps}


@dataclass(frozen=True)
class DiskState:
    packs: frozenset[str]  # pack files under packs/
    indexed: frozenset[str]  # packs the index knows
    refs: frozenset[str]
    temps: frozenset[str]  # files under tmp/

    @classmethod
    def of(cls, path: Path) -> DiskState:
        with cas.Repository.open(path) as repo:
            indexed = frozenset(p.hex() for p in repo.index.packs())
        return cls(
            packs=frozenset(p.stem for p in pack_files(path)),
            indexed=indexed,
            refs=frozenset(p.name for p in (path / "refs").iterdir()),
            temps=frozenset(p.name for p in (path / "tmp").iterdir()),
        )


# running workers ---------------------------------------------------------------------


@dataclass
class Outcome:
    returncode: int | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    log: str = ""

    @property
    def saved(self) -> list[tuple[str, str]]:
        return [(e["tag"], e["id"]) for e in self.events if e["event"] == "saved"]

    @property
    def errors(self) -> list[str]:
        return [e["error"] for e in self.events if e["event"] == "error"]

    def __str__(self) -> str:
        return f"returncode {self.returncode}, events {self.events}\n{self.log}"


Runner = Callable[[dict[str, Any], str | None], Outcome]


def _worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CAS_CRASH_AT"}
    env["OPENBLAS_NUM_THREADS"] = "1"  # no BLAS thread pool in the fork server: fork() stays safe
    return env


class ForkServer:
    """``crash_worker.py serve``: one process that imports torch once and forks a worker per job."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, env=_worker_env(),
        )
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self._running: int | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._events.put(json.loads(line))
        self._events.put(None)

    def _next(self) -> dict[str, Any]:
        try:
            event = self._events.get(timeout=EVENT_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no word from the fork server in {EVENT_TIMEOUT} s:\n{self.log()}") from None
        if event is None:
            raise AssertionError(f"the fork server died (status {self.proc.wait()}):\n{self.log()}")
        return event

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def start(self, job: dict[str, Any], crash_at: str | None = None) -> tuple[int, Outcome]:
        """Fork a worker for ``job``; returns its pid once it has opened the repository."""
        assert self._running is None, "one job at a time"
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({**job, "crash_at": crash_at}) + "\n").encode())
        self.proc.stdin.flush()
        event = self._next()
        assert event["event"] == "started", event
        self._running = pid = int(event["pid"])
        outcome = Outcome()
        while True:  # until the worker is ready to save (or already gone)
            event = self._next()
            self._record(outcome, event)
            if event["event"] in ("ready", "exit"):
                return pid, outcome

    def _record(self, outcome: Outcome, event: dict[str, Any]) -> None:
        outcome.events.append(event)
        if event["event"] == "exit":
            assert event["pid"] == self._running
            self._running = None
            outcome.returncode = int(event["returncode"])
            outcome.log = self.log()

    def wait(self, outcome: Outcome, until: str = "exit") -> Outcome:
        """Collect the worker's events until one of kind ``until`` (or its exit)."""
        while outcome.returncode is None:
            event = self._next()
            self._record(outcome, event)
            if event["event"] == until:
                break
        return outcome

    def run(self, job: dict[str, Any], crash_at: str | None = None) -> Outcome:
        _pid, outcome = self.start(job, crash_at)
        return self.wait(outcome)

    def reset(self) -> None:
        """Kill a worker a failed test left running, so the next test starts clean."""
        if self._running is not None:
            os.kill(self._running, signal.SIGKILL)
            self.wait(Outcome())

    def close(self) -> None:
        if self._running is not None:
            os.kill(self._running, signal.SIGKILL)
        self.proc.kill()  # holds nothing: no need to wait for torch to tear down
        self.proc.wait()
        self._thread.join(timeout=30)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._log.close()


def spawn_run(job: dict[str, Any], crash_at: str | None = None) -> Outcome:
    """One plain ``sys.executable crash_worker.py run JOB`` process; CAS_CRASH_AT in its environment."""
    env = _worker_env()
    if crash_at is not None:
        env["CAS_CRASH_AT"] = crash_at
    proc = subprocess.run(
        [sys.executable, str(WORKER), "run", json.dumps(job)], capture_output=True, env=env, timeout=300, check=False
    )
    events = [json.loads(line) for line in proc.stdout.decode().splitlines() if line.strip()]
    return Outcome(proc.returncode, events, proc.stderr.decode(errors="replace")[-4000:])


# fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    srv = ForkServer(tmp_path_factory.mktemp("fork-server") / "server.log")
    yield srv
    srv.close()


@pytest.fixture
def server(fork_server: ForkServer) -> Iterator[ForkServer]:
    yield fork_server
    fork_server.reset()


@pytest.fixture(scope="module")
def template(fork_server: ForkServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding the two base snapshots, saved by a worker process."""
    path = tmp_path_factory.mktemp("template") / "repo"
    cas.Repository.init(path, chunk_size=CHUNK_SIZE, pack_size=PACK_SIZE).close()
    out = fork_server.run({"repo": str(path), "saves": [[tag, variant] for tag, variant in BASES.items()]})
    assert out.returncode == 0 and [t for t, _ in out.saved] == list(BASES), out
    check_repository(path, dict(BASES), absent=[VICTIM])
    with cas.Repository.open(path) as repo:
        stats = repo.stats()
    assert stats.pack_count >= 8, stats  # several packs per save
    return path


@pytest.fixture
def crash_repo(template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    shutil.copytree(template, path)
    return path


# the crash-point matrix --------------------------------------------------------------------

CRASH_POINTS = [
    "chunk_written:1",
    "chunk_written:7",
    "pack_before_rename",
    "pack_sealed:1",
    "pack_sealed:2",
    "blobs_stored",
    "before_index_commit",
    "before_ref",
    "after_ref",
]


def check_crash_stage(crash_at: str, before: DiskState, after: DiskState) -> None:
    """The kill landed where the crash point says: shows each scenario tests the state it names."""
    point, _, count_text = crash_at.partition(":")
    count = int(count_text or "1")
    new_packs = after.packs - before.packs
    assert before.packs <= after.packs, "a sealed pack vanished"
    assert after.refs - before.refs == ({VICTIM} if point == "after_ref" else set()), after.refs
    if point in ("chunk_written", "pack_before_rename", "blobs_stored"):
        # the pack being written, plus finished packs still queued for sealing (a background thread)
        assert len(after.temps - before.temps) >= 1, "killed with no pack open in tmp/"
    elif point != "pack_sealed":
        assert after.temps == before.temps, "killed with a pack open in tmp/ after every pack was sealed"
    if (point, count) in (("chunk_written", 1), ("pack_before_rename", 1)):
        assert not new_packs, "the first pack of the save was sealed before the crash point"
    if point == "pack_sealed":
        assert len(new_packs) == count, new_packs
    if point == "blobs_stored":  # ~3 MiB of new data in 512 KiB packs, sealed or queued for sealing
        assert len(new_packs) + len(after.temps - before.temps) >= 4, (new_packs, after.temps)
    if point in ("before_index_commit", "before_ref", "after_ref"):
        assert len(new_packs) >= 4, new_packs
    if point in ("before_ref", "after_ref"):
        assert after.indexed - before.indexed == new_packs, "the index does not hold the save's packs"
    else:
        assert after.indexed == before.indexed, "the killed save reached the index"


def crash_scenario(crash_run: Runner, next_run: Runner, path: Path, crash_at: str) -> None:
    committed = dict(BASES)
    with cas.Repository.open(path) as repo:  # the template: checked in full once
        ids_before = {s.tag: s.id for s in repo.snapshots()}
    assert list(ids_before) == list(BASES)
    before = DiskState.of(path)

    out = crash_run({"repo": str(path), "saves": [[VICTIM, VICTIM]]}, crash_at)
    assert out.returncode == -signal.SIGKILL, out
    assert not out.saved and not out.errors, out

    after = DiskState.of(path)
    check_crash_stage(crash_at, before, after)
    committed_by_kill = crash_at == "after_ref"
    if committed_by_kill:
        committed[VICTIM] = VICTIM
    ids = check_repository(path, committed, absent=[] if committed_by_kill else [VICTIM])
    assert {t: ids[t] for t in BASES} == ids_before

    # The next save, by a new process: the same tag, unless the killed save did commit it.
    retry = VICTIM
    if committed_by_kill:
        retry = f"{VICTIM}-again"
        with cas.Repository.open(path) as repo, pytest.raises(cas.TagExistsError):
            repo.save(worker.make_state(VICTIM), VICTIM)
    out = next_run({"repo": str(path), "saves": [[retry, VICTIM]]}, None)
    assert out.returncode == 0 and not out.errors, out
    assert [t for t, _ in out.saved] == [retry], out
    committed[retry] = VICTIM
    ids_after = check_repository(path, committed)
    assert ids_after[retry] == out.saved[0][1]
    assert {t: ids_after[t] for t in ids} == ids


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_crash_point(server: ForkServer, crash_repo: Path, crash_at: str) -> None:
    crash_scenario(server.run, server.run, crash_repo, crash_at)


def test_crash_point_in_spawned_process(server: ForkServer, crash_repo: Path) -> None:
    """The same with a plain process (no fork server) killed by CAS_CRASH_AT from its environment."""
    crash_scenario(spawn_run, server.run, crash_repo, "before_index_commit")


# kills from outside at random times ------------------------------------------------------------


def test_sigkill_at_random_times(server: ForkServer, crash_repo: Path) -> None:
    """A worker saves in a loop; it is killed at a random point of its third save.

    The point is a random fraction of the time its second save took (measured from the worker's own
    timestamps; the first save of a process is slower), so kills spread over a whole save on a fast
    or a loaded machine alike.
    """
    rng = random.Random(20240611)
    committed = dict(BASES)
    ids = check_repository(crash_repo, committed)
    next_i = 0  # the worker saves loop-<next_i>, loop-<next_i + 1>, ... until it is killed
    for fraction in [rng.random() for _ in range(ITERATIONS)]:
        pid, out = server.start({"repo": str(crash_repo), "saves": [], "loop_from": next_i})
        assert out.returncode is None, out
        server.wait(out, until="saved")
        server.wait(out, until="saved")
        assert out.returncode is None and len(out.saved) == 2, out
        save_s = out.events[-1]["t"] - out.events[-2]["t"]
        time.sleep(max(0.0, out.events[-1]["t"] + fraction * save_s - time.monotonic()))
        os.kill(pid, signal.SIGKILL)
        server.wait(out)
        assert out.returncode == -signal.SIGKILL and not out.errors, out
        saved = [t for t, _ in out.saved]
        assert saved == [f"loop-{i}" for i in range(next_i, next_i + len(saved))], out
        committed.update((t, t) for t in saved)
        next_i += len(saved)

        # The save in flight may have been killed after its ref was written (committed but not yet
        # reported); otherwise it must be absent.
        in_flight = f"loop-{next_i}"
        absent = [in_flight]
        if (crash_repo / "refs" / in_flight).is_file():
            committed[in_flight] = in_flight
            next_i += 1
            absent = []
        new_ids = check_repository(crash_repo, committed, absent)
        assert {t: new_ids[t] for t in ids} == ids, "a committed snapshot changed"

        tag = f"loop-{next_i}"
        out = server.run({"repo": str(crash_repo), "saves": [[tag, tag]]})
        assert out.returncode == 0 and [t for t, _ in out.saved] == [tag], out
        committed[tag] = tag
        next_i += 1
        ids = check_repository(crash_repo, committed, load=[tag])  # all of them load after the next kill
        assert ids[tag] == out.saved[0][1]
        assert {t: ids[t] for t in new_ids} == new_ids


# what a kill leaves in the index's lock file ------------------------------------------------------


def test_killed_savers_leave_no_stale_index_readers(server: ForkServer, crash_repo: Path) -> None:
    """A saver holds an LMDB read transaction for its whole save; SIGKILL leaves its reader slot taken.

    LMDB frees the slots of dead processes only when the lock file is set up afresh (no process has
    the index open) or when someone calls ``reader_check``. While any process keeps the index open (a
    training job that saves now and then, a long ``cas`` command), each killed saver leaks a slot:
    the slot pins the pages of its old transaction (the index file grows instead of reusing them),
    and after ``max_readers`` (512) kills every new reader fails with MDB_READERS_FULL. The next save
    after a kill should clear them (``Index`` calling ``env.reader_check()`` when it opens).
    """
    holder = lmdb.open(str(crash_repo / "index"), readonly=True, max_dbs=8, max_readers=512, subdir=True)
    try:
        killed = []
        for _ in range(3):
            pid, out = server.start({"repo": str(crash_repo), "saves": [[VICTIM, VICTIM]]}, "blobs_stored")
            server.wait(out)
            assert out.returncode == -signal.SIGKILL, out
            killed.append(pid)
        out = server.run({"repo": str(crash_repo), "saves": [[VICTIM, VICTIM]]})
        assert out.returncode == 0 and not out.errors, out
        slots = [line.split() for line in holder.readers().splitlines()[1:]]
        stale = sorted({int(fields[0]) for fields in slots if fields and int(fields[0]) in killed})
        assert not stale, f"reader slots of killed savers {stale} are still taken:\n{holder.readers()}"
    finally:
        holder.close()
    check_repository(crash_repo, {**BASES, VICTIM: VICTIM})
