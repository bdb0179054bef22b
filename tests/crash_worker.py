"""Subprocess worker for tests/test_crash_consistency.py: opens a repository and saves state dicts.

A job is a JSON object::

    {"repo": PATH, "saves": [[TAG, VARIANT], ...], "loop_from": N or null, "crash_at": SPEC or null}

The worker opens ``repo`` with ``cas.Repository.open``, saves each ``(tag, variant)`` in order and then,
when ``loop_from`` is set, saves ``loop-N``, ``loop-N+1``, ... until it is killed. It reports on stdout,
one JSON object a line, each written with a single ``os.write`` (so lines never interleave) and
stamped with ``"t"``, the writer's ``time.monotonic()`` (one clock for every process of the machine)::

    {"event": "ready", "pid": P}                       repository open, first save about to start
    {"event": "saved", "tag": T, "id": ID}             save returned: the snapshot is committed
    {"event": "error", "error": TEXT}                  a save raised (exit status 1)

Two ways to run it:

``python crash_worker.py run JOB``
    one process, one job; ``CAS_CRASH_AT`` comes from the environment.

``python crash_worker.py serve``
    a fork server: imports cas (and torch) once, then for each job line read on stdin forks a child that
    sets ``CAS_CRASH_AT`` from the job's ``crash_at`` and runs the job. The server writes
    ``{"event": "started", "pid": P}`` before the child runs (the child waits on a pipe for it) and
    ``{"event": "exit", "pid": P, "returncode": RC}`` after it ends (RC as ``subprocess`` reports it:
    ``-9`` for SIGKILL). Forking saves the ~4 s torch import per crash; each child is a separate
    process killed by a real SIGKILL.

The state dicts are deterministic functions of the variant name (see ``make_state``), so the test
process can rebuild what any committed snapshot must hold.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

import torch

import cas

# variant -> tensor name -> (shape, seed, seed of the rewritten second half or None)
TensorSpec = tuple[tuple[int, ...], int, int | None]
VARIANTS: dict[str, dict[str, TensorSpec]] = {
    "base1": {
        "embed.weight": ((512, 512), 11, None),  # 1 MiB
        "layers.0.weight": ((384, 1024), 12, None),  # 1.5 MiB
        "layers.1.weight": ((1000, 300), 13, None),  # not a multiple of the chunk size
        "head.bias": ((4099,), 14, None),
    },
    "base2": {  # shares embed / layers.0 with base1, half of layers.1
        "embed.weight": ((512, 512), 11, None),
        "layers.0.weight": ((384, 1024), 12, None),
        "layers.1.weight": ((1000, 300), 13, 23),
        "layers.2.weight": ((256, 1024), 25, None),
        "head.bias": ((4099,), 24, None),
    },
    "victim": {  # the save that is killed: shares some tensors with both bases, ~3.3 MiB of new data
        "embed.weight": ((512, 512), 11, None),
        "layers.0.weight": ((384, 1024), 31, None),
        "layers.1.weight": ((1000, 300), 13, 23),
        "layers.2.weight": ((256, 1024), 32, None),
        "layers.3.weight": ((200, 1000), 33, None),
        "head.bias": ((4099,), 24, None),
    },
}


def variant_spec(variant: str) -> dict[str, TensorSpec]:
    if variant.startswith("loop-"):  # base2 with one new 1 MiB tensor and a new bias per iteration
        i = int(variant.removeprefix("loop-"))
        spec = dict(VARIANTS["base2"])
        spec["layers.2.weight"] = ((256, 1024), 1000 + i, None)
        spec["head.bias"] = ((4099,), 2000 + i, None)
        return spec
    return VARIANTS[variant]


def _tensor(shape: tuple[int, ...], seed: int, patch_seed: int | None) -> torch.Tensor:
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    if patch_seed is not None:
        half = shape[0] // 2
        t[half:] = torch.randn(
            (shape[0] - half, *shape[1:]), generator=torch.Generator().manual_seed(patch_seed), dtype=torch.float32
        )
    return t


def make_state(variant: str) -> dict[str, torch.Tensor]:
    """The state dict a snapshot of ``variant`` holds; the same bytes in every process."""
    return {name: _tensor(*spec) for name, spec in variant_spec(variant).items()}


def emit(**event: Any) -> None:
    event["t"] = time.monotonic()  # system-wide clock: comparable across processes
    os.write(1, (json.dumps(event) + "\n").encode())


def run_job(job: dict[str, Any]) -> int:
    try:
        with cas.Repository.open(job["repo"], threads=2) as repo:
            emit(event="ready", pid=os.getpid())
            saves = [tuple(s) for s in job.get("saves", [])]
            if job.get("loop_from") is not None:
                start = int(job["loop_from"])
                saves += [(f"loop-{i}", f"loop-{i}") for i in range(start, start + 10_000)]
            for tag, variant in saves:
                snap = repo.save(make_state(variant), tag)
                emit(event="saved", tag=tag, id=snap.id)
    except Exception:  # noqa: BLE001 - reported to the test, which fails on it
        emit(event="error", error=traceback.format_exc())
        return 1
    return 0


def serve() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        go_r, go_w = os.pipe()  # the child waits until "started" is written, so it comes first
        pid = os.fork()
        if pid == 0:  # child: run one job, never return into the server loop
            code = 1
            try:
                os.close(go_w)
                os.read(go_r, 1)
                os.close(go_r)
                os.environ.pop("CAS_CRASH_AT", None)
                if job.get("crash_at"):
                    os.environ["CAS_CRASH_AT"] = job["crash_at"]
                code = run_job(job)
            finally:
                os._exit(code)
        os.close(go_r)
        emit(event="started", pid=pid)
        os.close(go_w)
        _, status = os.waitpid(pid, 0)
        emit(event="exit", pid=pid, returncode=os.waitstatus_to_exitcode(status))


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        serve()
    elif sys.argv[1:2] == ["run"] and len(sys.argv) == 3:
        sys.exit(run_job(json.loads(sys.argv[2])))
    else:
        sys.exit("usage: crash_worker.py serve | run JOB")


if __name__ == "__main__":
    main()
