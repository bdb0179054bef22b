"""Subprocess worker for tests/test_gc_safety.py: savers, GC loops and lock holders as real processes.

``python gc_worker.py serve`` starts a fork server: it imports cas (and torch) once, then reads one
JSON object a line on stdin, ``{"batch": [JOB, ...]}``, forks one child per job (all at once, so they
run concurrently), waits for all of them and reports. A job is a JSON object with a ``"role"``:

``saver``     ``{"repo", "worker", "seconds", "log", "parent", "pause"}``: saves state dicts until the batch
              deadline, sleeping about ``pause`` seconds (default 0.03) between saves, as training does:
              back-to-back saves of several processes would hold the shared lock without a gap, and
              GC (exclusive) would wait for all of them to stop.
              Each save draws 3 tensors from a pool shared by every saver (so chunks dedup across
              processes) plus one tensor of its own, is tagged ``w<worker>-<i>``, records what it
              holds in its metadata (``{"seeds": [...], "unique": U}``) and, only after ``save()``
              returned, appends ``"<tag> <seed>,<seed>,<seed>,<unique>"`` to ``log``. ``parent`` is passed
              to ``save()`` (``"latest"``, its default, when absent).
``gc_loop``   ``{"repo", "seconds", "keep_last", "log"}``: until the deadline, ``forget(keep_last=K)``
              then ``gc()``; appends ``{"forgot": [refs]}`` after each forget and ``{"gc": report}``
              after each gc to ``log`` (JSON lines).
``forget_gc`` ``{"repo", "keep_last"}``: one ``forget(keep_last=K)`` (then event ``forgot``), one ``gc()``.
``gc_once``   ``{"repo"}``: one ``gc()``; with ``"crash_at"`` set, ``CAS_CRASH_AT`` is set to it first.
``hold_lock`` ``{"repo", "seconds"}``: holds the repository lock shared (as a save in flight does)
              for ``seconds``.

Every job may carry ``"crash_at"`` (the ``CAS_CRASH_AT`` of the child; unset otherwise). Events go to
stdout, one JSON object a line, each written with one ``os.write`` (lines never interleave), stamped
with ``"t"`` = ``time.monotonic()`` (one clock for every process of the machine)::

    {"event": "ready"}                                  server: imports done
    {"event": "started", "name": N, "pid": P}           server: child forked
    {"event": "locked"} / {"event": "releasing"}        hold_lock child
    {"event": "forgot", "refs": [...]}                  forget_gc child: forget returned
    {"event": "gc", "report": {...}}                    gc_once / forget_gc child: gc returned
    {"event": "done", "name": N, ...}                   child finished its job
    {"event": "error", "name": N, "error": TEXT}        child raised (exit status 1)
    {"event": "exit", "name": N, "pid": P, "returncode": RC}   server: child ended (-9 = SIGKILL)
    {"event": "batch_done"}                             server: every child of the batch ended

The state dicts are deterministic functions of the seeds (``make_state``), so the test process can
rebuild what any snapshot must hold from its metadata.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback
from typing import Any

import torch

import cas

POOL_SEEDS = 10  # tensors shared by every saver
PICK = 3  # pool tensors per save


def pool_tensor(seed: int) -> torch.Tensor:
    """48, 64 or 80 KiB of float32 (3-5 chunks of 16 KiB), the same bytes in every process."""
    numel = 12288 + 4096 * (seed % 3)
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def unique_tensor(seed: int) -> torch.Tensor:
    """~33 KiB, not a multiple of the chunk size."""
    return torch.randn(8200, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def make_state(seeds: list[int], unique: int) -> dict[str, Any]:
    state: dict[str, Any] = {f"pool.{s}": pool_tensor(s) for s in seeds}
    state["own"] = unique_tensor(unique)
    state["unique"] = unique
    return state


def emit(**event: Any) -> None:
    event["t"] = time.monotonic()
    os.write(1, (json.dumps(event) + "\n").encode())


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def run_saver(job: dict[str, Any]) -> dict[str, Any]:
    worker = int(job["worker"])
    rng = random.Random(worker)
    saves = 0
    parent = job.get("parent", "latest")
    with cas.Repository.open(job["repo"], threads=2) as repo:
        while time.monotonic() < job["deadline"]:
            seeds = rng.sample(range(1, POOL_SEEDS + 1), PICK)
            unique = 100_000 * (worker + 1) + saves
            tag = f"w{worker}-{saves:04d}"
            repo.save(make_state(seeds, unique), tag, {"seeds": seeds, "unique": unique}, parent=parent)
            _append(job["log"], f"{tag} {','.join(map(str, [*seeds, unique]))}\n")  # committed: save returned
            saves += 1
            time.sleep(rng.uniform(0.5, 1.5) * float(job.get("pause", 0.03)))  # a training step: lock free
    return {"saves": saves}


def run_gc_loop(job: dict[str, Any]) -> dict[str, Any]:
    rounds = 0
    with cas.Repository.open(job["repo"], threads=2) as repo:
        while time.monotonic() < job["deadline"]:
            forgot = repo.forget(keep_last=int(job["keep_last"]))
            _append(job["log"], json.dumps({"forgot": [s.ref for s in forgot.removed]}) + "\n")
            report = repo.gc()
            _append(job["log"], json.dumps({"gc": report.to_dict()}) + "\n")
            rounds += 1
            time.sleep(0.005)  # let waiting savers in between two runs
    return {"rounds": rounds}


def run_gc_once(job: dict[str, Any]) -> dict[str, Any]:
    with cas.Repository.open(job["repo"], threads=2) as repo:
        report = repo.gc()
    emit(event="gc", name=job["name"], report=report.to_dict())
    return {}


def run_forget_gc(job: dict[str, Any]) -> dict[str, Any]:
    with cas.Repository.open(job["repo"], threads=2) as repo:
        forgot = repo.forget(keep_last=int(job["keep_last"]))
        emit(event="forgot", name=job["name"], refs=[s.ref for s in forgot.removed])
        report = repo.gc()
    emit(event="gc", name=job["name"], report=report.to_dict())
    return {}


def run_hold_lock(job: dict[str, Any]) -> dict[str, Any]:
    with cas.Repository.open(job["repo"], threads=1) as repo, repo.store.lock(exclusive=False):
        emit(event="locked", name=job["name"])
        time.sleep(float(job["seconds"]))
        emit(event="releasing", name=job["name"])
    return {}


ROLES = {"saver": run_saver, "gc_loop": run_gc_loop, "gc_once": run_gc_once, "forget_gc": run_forget_gc,
         "hold_lock": run_hold_lock}


def run_job(job: dict[str, Any]) -> int:
    try:
        result = ROLES[job["role"]](job)
    except Exception:  # noqa: BLE001 - reported to the test, which fails on it
        emit(event="error", name=job["name"], error=traceback.format_exc())
        return 1
    emit(event="done", name=job["name"], **result)
    return 0


def run_batch(jobs: list[dict[str, Any]]) -> None:
    start = time.monotonic()
    children: dict[int, str] = {}
    for job in jobs:
        job.setdefault("deadline", start + float(job.get("seconds", 0)))
        pid = os.fork()
        if pid == 0:  # child: one job, never back into the server loop
            code = 1
            try:
                os.environ.pop("CAS_CRASH_AT", None)
                if job.get("crash_at"):
                    os.environ["CAS_CRASH_AT"] = job["crash_at"]
                code = run_job(job)
            finally:
                os._exit(code)
        children[pid] = job["name"]
        emit(event="started", name=job["name"], pid=pid)
    while children:
        pid, status = os.wait()
        name = children.pop(pid, None)
        if name is not None:
            emit(event="exit", name=name, pid=pid, returncode=os.waitstatus_to_exitcode(status))
    emit(event="batch_done")


def serve() -> None:
    emit(event="ready", pid=os.getpid())
    for line in sys.stdin:
        if line.strip():
            run_batch(json.loads(line)["batch"])


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        serve()
    elif sys.argv[1:2] == ["run"] and len(sys.argv) == 3:  # one job in this process (no fork)
        job = json.loads(sys.argv[2])
        job.setdefault("name", job["role"])
        job.setdefault("deadline", time.monotonic() + float(job.get("seconds", 0)))
        sys.exit(run_job(job))
    else:
        sys.exit("usage: gc_worker.py serve | run JOB")


if __name__ == "__main__":
    main()
