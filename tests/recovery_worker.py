"""Shared pieces of the recovery tests, and the worker process of tests/test_recovery_kill.py.

As a module (``from tests import recovery_worker``) it gives the deterministic state dicts the
recovery tests save (``series_state``), byte-exact comparison against them (``assert_state``), and
small helpers that read a repository's files the way FORMAT.md lays them out (pack footers,
which pack holds what).

As a script it runs one recovery command on a repository and reports on stdout, one JSON object
a line, each written with a single ``os.write`` and stamped with ``"t"`` (``time.monotonic()``,
one clock for every process of the machine)::

    {"event": "ready", "pid": P}            about to open the repository and run the command
    {"event": "done", "seconds": S, "report": {...}}   the command returned (S: since "ready")
    {"event": "error", "error": TEXT, "cas_error": BOOL}   the command raised (exit status 1)

A job is a JSON object ``{"repo": PATH, "command": C, "repack_below": X, "crash_at": SPEC or null}``
with ``C`` one of ``open`` (open and close: a lost index is rebuilt then), ``rebuild_index``,
``check_repair``, ``gc``.

``python recovery_worker.py run JOB``
    one process, one job (``CAS_CRASH_AT`` from the environment).

``python recovery_worker.py serve``
    a fork server: imports cas and torch once, then forks a child per job line read on stdin
    (the child sets ``CAS_CRASH_AT`` from the job's ``crash_at``). The server writes
    ``{"event": "started", "pid": P}`` before the child runs and
    ``{"event": "exit", "pid": P, "returncode": RC}`` after it ends (``-9``: SIGKILL).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: import the cas next to these tests, not another one
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import blake3
import msgpack
import numpy as np
import torch
import zstandard

import cas
from cas.pack import HEADER, RECORD_HEADER, RECORD_MAGIC, PackEntry, iter_pack_files, read_footer

ROOT = Path(__file__).resolve().parents[1]

# deterministic states ---------------------------------------------------------------------------

EMB_ROWS, EMB_COLS = 512, 64  # 128 KiB of float32: sparse row updates give sparse-delta chunks
DENSE = 16384  # 64 KiB of float32: small dense updates give dense-delta chunks


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def series_state(i: int, seed: int = 0) -> dict[str, Any]:
    """Step ``i`` of a small training run: an embedding whose few rows move each step (sparse deltas
    against step ``i - 1``), a dense weight that moves a little everywhere (dense deltas), a tensor
    of its own (unique data), and a frozen tensor every step shares (dedup)."""
    emb = torch.randn(EMB_ROWS, EMB_COLS, generator=_gen(seed * 1000 + 1))
    dense = torch.randn(DENSE, generator=_gen(seed * 1000 + 2))
    for step in range(1, i + 1):
        g = _gen(seed * 1000 + 100 + step)
        rows = torch.randperm(EMB_ROWS, generator=g)[:3]
        emb[rows] += torch.randn(len(rows), EMB_COLS, generator=g) * 1e-3
        dense += torch.randn(DENSE, generator=g) * 1e-4
    return {
        "emb": emb,
        "dense": dense,
        "own": torch.randn(6000 + 16 * i, generator=_gen(seed * 1000 + 500 + i)),
        "frozen": torch.arange(8192, dtype=torch.float32),
        "step": i,
    }


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_state(got: Any, want: dict[str, Any], where: str) -> None:
    """``got`` holds exactly ``want``'s keys; every tensor the same dtype, shape and bytes."""
    assert isinstance(got, dict), f"{where}: loaded a {type(got).__name__}"
    assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            t = got[key]
            assert isinstance(t, torch.Tensor), f"{where}/{key}: {type(t).__name__}"
            assert t.dtype == value.dtype, f"{where}/{key}: dtype {t.dtype} != {value.dtype}"
            assert t.shape == value.shape, f"{where}/{key}: shape {tuple(t.shape)} != {tuple(value.shape)}"
            assert torch.equal(t, value), f"{where}/{key}: values differ"
            assert tensor_bytes(t) == tensor_bytes(value), f"{where}/{key}: bytes differ"
        elif isinstance(value, np.ndarray):
            a = got[key]
            assert isinstance(a, np.ndarray) and a.dtype == value.dtype and a.tobytes() == value.tobytes(), (
                f"{where}/{key}: array differs"
            )
        else:
            assert got[key] == value and type(got[key]) is type(value), f"{where}/{key}: {got[key]!r} != {value!r}"


# reading the repository's files (FORMAT.md) ------------------------------------------------------


def pack_files(repo_path: Path) -> dict[str, Path]:
    """Pack name (64 hex) -> file, for every pack file under ``packs/``."""
    return {pid.hex(): path for pid, path in iter_pack_files(repo_path / "packs")}


def footers(repo_path: Path) -> dict[str, list[PackEntry]]:
    """Pack name -> its footer entries, for every pack whose footer parses."""
    out = {}
    for name, path in pack_files(repo_path).items():
        try:
            out[name] = read_footer(path)
        except cas.CasError:
            continue
    return out


def scanned_chunk_ids(path: Path) -> set[bytes]:
    """The chunk ids of the records of a pack, found by walking its record headers from the front
    (FORMAT.md §3: a 16-byte header, then 88-byte record headers each followed by its payload),
    whatever state its header, footer and trailer are in."""
    data = path.read_bytes()
    out: set[bytes] = set()
    pos = HEADER.size
    while pos + RECORD_HEADER.size <= len(data):
        magic, _codec, _kind, _flags, _raw, stored, cid, _base = RECORD_HEADER.unpack_from(data, pos)
        if magic != RECORD_MAGIC or pos + RECORD_HEADER.size + stored > len(data):
            break
        out.add(bytes(cid))
        pos += RECORD_HEADER.size + stored
    return out


def stored_chunk_ids(repo_path: Path) -> set[bytes]:
    """Every chunk some pack under ``packs/`` still holds: from its footer, or from its records when
    the footer does not parse."""
    out: set[bytes] = set()
    for path in pack_files(repo_path).values():
        try:
            out |= {bytes(e.chunk_id) for e in read_footer(path)}
        except cas.CasError:
            out |= scanned_chunk_ids(path)
    return out


def packs_holding(repo_path: Path, chunk_ids: set[bytes]) -> set[str]:
    """Names of the packs whose footer lists any of ``chunk_ids``."""
    return {name for name, entries in footers(repo_path).items() if any(e.chunk_id in chunk_ids for e in entries)}


def ref_id(repo_path: Path, tag: str) -> bytes:
    return bytes.fromhex((repo_path / "refs" / tag).read_text().strip())


def chunk_ids(t: torch.Tensor, chunk_size: int) -> list[bytes]:
    """The ids of a tensor's chunks (FORMAT.md §4: BLAKE3 of each ``chunk_size`` slice of its bytes)."""
    raw = tensor_bytes(t)
    return [blake3.blake3(raw[i:i + chunk_size]).digest() for i in range(0, len(raw), chunk_size)]


def data_chunk_ids(state: dict[str, Any], chunk_size: int) -> set[bytes]:
    return {cid for v in state.values() if isinstance(v, torch.Tensor) for cid in chunk_ids(v, chunk_size)}


def read_record(path: Path, entry: PackEntry) -> bytes:
    """The raw bytes of a raw (codec 0) or zstd (codec 1) record: how manifest nodes are stored."""
    with open(path, "rb") as f:
        f.seek(entry.offset)
        payload = f.read(entry.stored_length)
    if entry.codec == 0:
        return payload
    if entry.codec == 1:
        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=entry.raw_length)
    raise AssertionError(f"a manifest node stored with codec {entry.codec}")


def reached_chunks(repo_path: Path, snap_id: bytes, state: dict[str, Any], chunk_size: int,
                   fts: dict[str, list[PackEntry]] | None = None) -> set[bytes]:
    """Every chunk a snapshot needs, from the pack files alone: its snapshot node, its tree node (read
    from the snapshot node), the chunks of its tensors, and the delta bases of all of them,
    transitively (over every copy of a chunk any footer lists)."""
    fts = footers(repo_path) if fts is None else fts
    by_chunk: dict[bytes, list[tuple[str, PackEntry]]] = {}
    for name, entries in fts.items():
        for e in entries:
            by_chunk.setdefault(bytes(e.chunk_id), []).append((name, e))
    want = {snap_id} | data_chunk_ids(state, chunk_size)
    files = pack_files(repo_path)
    for name, e in by_chunk.get(snap_id, []):
        try:
            node = msgpack.unpackb(read_record(files[name], e), raw=False)
            want.add(bytes(node["tree"]))
            break
        except Exception:  # noqa: BLE001 - a damaged copy: try the next one
            continue
    stack = list(want)
    while stack:
        for _name, e in by_chunk.get(stack.pop(), []):
            if e.base_id is not None and bytes(e.base_id) not in want:
                want.add(bytes(e.base_id))
                stack.append(bytes(e.base_id))
    return want


# the worker --------------------------------------------------------------------------------------


def emit(**event: Any) -> None:
    event["t"] = time.monotonic()
    os.write(1, (json.dumps(event, default=str) + "\n").encode())


def run_job(job: dict[str, Any]) -> int:
    try:
        emit(event="ready", pid=os.getpid())
        t0 = time.monotonic()
        with cas.Repository.open(job["repo"], threads=2) as repo:  # opening may recover (a lost index)
            command = job["command"]
            if command == "open":
                report: Any = {}
            elif command == "rebuild_index":
                report = {"chunks": repo.rebuild_index()}
            elif command == "check_repair":
                report = repo.check(repair=True).to_dict()
            elif command == "gc":
                report = repo.gc(repack_below=float(job.get("repack_below", 0.5))).to_dict()
            else:
                raise ValueError(f"unknown command {command!r}")
            emit(event="done", seconds=time.monotonic() - t0, report=report)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
        emit(event="error", error=traceback.format_exc(), cas_error=isinstance(exc, cas.CasError))
        return 1
    return 0


def serve() -> None:
    from cas import planes

    planes.warm_up()  # the codec kernels load once here, not in every child (and not in its timing)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        go_r, go_w = os.pipe()  # the child waits until "started" is written, so it comes first
        pid = os.fork()
        if pid == 0:  # child: one job, never back into the server loop
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
        sys.exit("usage: recovery_worker.py serve | run JOB")


if __name__ == "__main__":
    main()
