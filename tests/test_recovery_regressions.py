"""Regression tests for the recovery paths: rebuild_index, gc, check --repair and the index.

One test per reproduction of the issue "recovery paths lose data". Each damages real files on
disk the way the reproduction does and asserts the rule, not the symptom:

* the index (``index/``, LMDB) is a cache: nothing is deleted because the index does not mention
  it, and a stale, lost or damaged index is detected and rebuilt or refused, never acted on;
* repair and GC never delete or move away a pack whose chunks still verify, and never delete
  what they cannot parse;
* every manifest node, cached snapshot node and index value a decision rests on is checked
  before use;
* a damaged snapshot degrades only itself: saves, listing, retention, GC and restore go on;
* every snapshot whose chunks are still somewhere in the store loads bit-identically after any
  recovery command, and nothing that verified before one fails after it.

Where a rule lets the engine choose (rebuild or refuse), a ``cas.CasError`` is accepted and the
test goes on with what must hold either way (files that must still exist, snapshots that must
still load once the index is rebuilt).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import pytest
import torch

import cas
from cas.pack import FOOTER_ENTRY, HEADER, RECORD_HEADER, TRAILER, ChunkKind, PackEntry, read_footer
from tests.recovery_worker import (
    ROOT,
    assert_state,
    chunk_ids,
    data_chunk_ids,
    footers,
    pack_files,
    packs_holding,
    reached_chunks,
    ref_id,
    series_state,
    stored_chunk_ids,
)

CHUNK = 16 << 10
PACK = 64 << 10
CAS = Path(sys.executable).parent / "cas"


# helpers ------------------------------------------------------------------------------------------


def new_repo(path: Path, **kw: Any) -> cas.Repository:
    return cas.Repository.init(path, chunk_size=kw.pop("chunk_size", CHUNK), pack_size=kw.pop("pack_size", PACK),
                               threads=2, **kw)


def open_repo(path: Path) -> cas.Repository:
    return cas.Repository.open(path, threads=2)


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CAS_REPO", "CAS_CRASH_AT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def cli(repo: Path, *args: str | Path, preexec_fn: Callable[[], None] | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """The real ``cas`` console script in a subprocess (the cas of this checkout)."""
    return subprocess.run(
        [str(CAS), "--repo", str(repo), *map(str, args)], capture_output=True, text=True, env=cli_env(),
        timeout=timeout, check=False, preexec_fn=preexec_fn,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"{proc.args[3:]} exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> None:
    assert proc.returncode == code, f"{proc.args[3:]}: exit {proc.returncode} (want {code}): {proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cas: error: "), proc.stderr


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        assert len(byte) == 1, f"{path.name} has no byte {offset}"
        f.seek(offset)
        f.write(bytes([byte[0] ^ mask]))


def footer_offset(path: Path) -> int:
    data = path.read_bytes()
    offset, _count, _digest, _version, _magic = TRAILER.unpack_from(data, len(data) - TRAILER.size)
    return int(offset)


def assert_loads(repo: cas.Repository, expected: dict[str, dict[str, Any]]) -> None:
    for tag, state in expected.items():
        assert_state(repo.load(tag), state, tag)


def assert_verifies(repo: cas.Repository) -> None:
    report = repo.verify(read_data=True)
    assert report.ok, "\n".join(str(p) for p in report.problems)


def reopened_loads(path: Path, expected: dict[str, dict[str, Any]], verify: bool = True) -> None:
    with open_repo(path) as repo:
        assert_loads(repo, expected)
        if verify:
            assert_verifies(repo)


def copy_index(path: Path, to: Path) -> None:
    shutil.copytree(path / "index", to)


def put_index_back(path: Path, saved: Path) -> None:
    shutil.rmtree(path / "index")
    shutil.copytree(saved, path / "index")


def pack_of(repo_path: Path, cid: bytes) -> str:
    holding = packs_holding(repo_path, {cid})
    assert len(holding) == 1, f"chunk {cid.hex()[:12]} is in {len(holding)} packs"
    return holding.pop()


def data_pack_without_nodes(repo_path: Path, wanted: set[bytes]) -> tuple[str, list[PackEntry]]:
    """A pack that holds some of ``wanted`` (data chunks) and no manifest node."""
    for name, entries in sorted(footers(repo_path).items()):
        if any(e.chunk_id in wanted for e in entries) and all(e.kind == ChunkKind.DATA for e in entries):
            return name, entries
    raise AssertionError("test setup: no data-only pack holds the wanted chunks")


def index_dump(index_dir: Path) -> dict[bytes, list[tuple[bytes, bytes]]]:
    """Every named LMDB database of the index and its items (no cas process may have it open)."""
    if not (index_dir / "data.mdb").exists():
        return {}
    env = lmdb.open(str(index_dir), readonly=True, lock=False, max_dbs=16, subdir=True)
    try:
        with env.begin() as txn:
            names = [bytes(k) for k, _ in txn.cursor()]
        out = {}
        for name in names:
            try:
                db = env.open_db(name, create=False)
            except lmdb.Error:
                continue
            with env.begin(db=db) as txn:
                out[name] = [(bytes(k), bytes(v)) for k, v in txn.cursor()]
        return out
    finally:
        env.close()


def store_state(path: Path) -> tuple[dict[str, str], dict[bytes, list[tuple[bytes, bytes]]]]:
    """The files under packs/, refs/ and quarantine/ (hashes) and the index's contents."""
    files = {}
    for sub in ("packs", "refs", "quarantine"):
        for p in sorted((path / sub).rglob("*")):
            if p.is_file():
                files[p.relative_to(path).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files, index_dump(path / "index")


# a. rebuild after gc: stale delta copies must not win -------------------------------------------------


def embedding(seed: int) -> torch.Tensor:
    return torch.randn(256, 64, generator=torch.Generator().manual_seed(seed))  # 64 KiB: 4 chunks of 64 rows


def sparse_change(t: torch.Tensor, seed: int) -> torch.Tensor:
    out = t.clone()
    rows = torch.tensor([5, 70, 135, 200])  # one row in each chunk: every chunk gets a sparse delta
    out[rows] += torch.randn(len(rows), t.shape[1], generator=torch.Generator().manual_seed(seed)) * 1e-3
    return out


def dense(seed: int, numel: int = 16384) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rebuild", ["rebuild_index", "lost_index"])
def test_a_rebuild_after_gc_keeps_a_resaved_snapshot_loadable(tmp_path: Path, rebuild: str) -> None:
    """s2 (sparse deltas against s1) shares packs with live data; after rm s1 s2 + gc its dead delta
    records stay in those packs while their bases are gone. s2's tensors saved again (s4) are written
    anew; a rebuild must index the intact copies, never the dead deltas whose bases are gone."""
    path = tmp_path / "repo"
    a = {f"a{i}": embedding(i) for i in range(4)}
    s1 = dict(a)
    s2: dict[str, Any] = {}
    for i in range(4):  # deltas interleaved with live keyframes: the packs of s2 stay after gc
        s2[f"a{i}"] = sparse_change(a[f"a{i}"], 10 + i)
        s2[f"b{i}"] = dense(20 + i)
    s3 = {f"b{i}": s2[f"b{i}"] for i in range(4)}
    with new_repo(path) as repo:
        repo.save(s1, "s1")
        repo.save(s2, "s2")
        repo.save(s3, "s3")
        repo.delete("s1")
        repo.delete("s2")
        repo.gc()
        repo.save(s2, "s4")
        assert_loads(repo, {"s3": s3, "s4": s2})
        if rebuild == "rebuild_index":
            repo.rebuild_index()
    if rebuild == "lost_index":
        shutil.rmtree(path / "index")
    with open_repo(path) as repo:  # reopened: nothing cached from before the rebuild
        assert_loads(repo, {"s3": s3, "s4": s2})
        assert_verifies(repo)
        repo.save(s2, "s5")  # dedups against what the rebuilt index holds
        assert_loads(repo, {"s5": s2, "s4": s2, "s3": s3})
        assert_verifies(repo)
    reopened_loads(path, {"s5": s2, "s4": s2, "s3": s3})


# b. stale index + gc --------------------------------------------------------------------------------


def test_b_gc_with_a_stale_index_deletes_no_live_pack(tmp_path: Path) -> None:
    """An index copy from before a repacking gc, put back: the packs the repack wrote are unknown to
    it. The next gc must not delete them (nor anything live): it rebuilds the index or refuses."""
    path = tmp_path / "repo"
    states = {f"s{i}": series_state(i) for i in range(6)}
    kept = {t: states[t] for t in ("s4", "s5")}
    with new_repo(path) as repo:
        for tag, state in states.items():
            repo.save(state, tag)
    copy_index(path, tmp_path / "old-index")
    with open_repo(path) as repo:
        for tag in ("s0", "s1", "s2", "s3"):
            repo.delete(tag)
        report = repo.gc(repack_below=0.9)
        assert report.packs_repacked > 0, "test setup: the first gc should repack"
        assert_loads(repo, kept)
    put_index_back(path, tmp_path / "old-index")
    live: set[bytes] = set()
    for tag, state in kept.items():
        live |= reached_chunks(path, ref_id(path, tag), state, CHUNK)
    live_packs = packs_holding(path, live)
    files = pack_files(path)
    with open_repo(path) as repo, contextlib.suppress(cas.CasError):  # refusing a stale index is allowed
        repo.gc(repack_below=0.0)  # nothing to repack: a live pack may only go by being deleted
    gone = sorted(name[:12] for name in live_packs if not files[name].exists())
    assert not gone, f"gc deleted packs holding live chunks: {gone}"
    reopened_loads(path, kept)


# c. damaged footer + lost index + gc, then repair ---------------------------------------------------


def test_c_gc_keeps_a_pack_it_cannot_parse_and_repair_salvages_it(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    states = {f"s{i}": series_state(i) for i in range(3)}
    with new_repo(path) as repo:
        for tag, state in states.items():
            repo.save(state, tag)
    name, _entries = data_pack_without_nodes(path, data_chunk_ids(states["s2"], CHUNK))
    damaged = pack_files(path)[name]
    flip(damaged, footer_offset(damaged) + 5, 0x10)  # inside the first footer entry's chunk id
    with pytest.raises(cas.CorruptionError):
        read_footer(damaged, None)  # the damage is real: the footer no longer hashes to the trailer's sum
    shutil.rmtree(path / "index")
    with open_repo(path) as repo:
        with contextlib.suppress(cas.CasError):  # refusing is allowed; deleting what it cannot parse is not
            repo.gc()
        assert damaged.exists(), "gc deleted a pack whose footer it could not parse"
        repo.check(repair=True)
    reopened_loads(path, states)


# d. zeroed pack header -----------------------------------------------------------------------------------


def test_d_zeroed_pack_header_loses_no_chunk(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    states = {f"s{i}": series_state(i) for i in range(3)}
    with new_repo(path) as repo:
        for tag, state in states.items():
            repo.save(state, tag)
    name, entries = data_pack_without_nodes(path, data_chunk_ids(states["s0"], CHUNK))
    damaged = pack_files(path)[name]
    with open(damaged, "r+b") as f:
        f.write(bytes(HEADER.size))
    with open_repo(path) as repo:
        assert_loads(repo, states)  # readers go by the index: the records are intact
        report = repo.check(repair=True)
        assert report.lost_chunks == [], f"repair lost {len(report.lost_chunks)} intact chunks"
        assert report.salvaged_chunks == len(entries), (report.salvaged_chunks, len(entries))
    reopened_loads(path, states)
    with open_repo(path) as repo:
        repo.rebuild_index()
    reopened_loads(path, states)


# e. stale index + check --repair -------------------------------------------------------------------------


def test_e_repair_with_a_stale_index_moves_no_intact_pack(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    states = {f"s{i}": series_state(i) for i in range(3)}
    with new_repo(path) as repo:
        repo.save(states["s0"], "s0")
    copy_index(path, tmp_path / "old-index")
    with open_repo(path) as repo:
        repo.save(states["s1"], "s1")  # deltas against s0
        repo.save(states["s2"], "s2")  # deltas against s1, whose packs the old index does not know
    put_index_back(path, tmp_path / "old-index")
    files = pack_files(path)
    with open_repo(path) as repo:
        try:
            report = repo.check(repair=True)
        except cas.CasError:
            report = None  # refusing to act on a stale index is allowed
        if report is not None:
            damaged = [p[:12] for p in report.damaged_packs]
            assert damaged == [], f"intact packs reported damaged: {damaged}"
    moved = sorted(n[:12] for n, p in files.items() if not p.exists())
    assert not moved, f"repair moved intact packs away: {moved}"
    quarantined = list((path / "quarantine").glob("*")) if (path / "quarantine").exists() else []
    assert quarantined == [], f"intact packs in quarantine/: {[q.name[:12] for q in quarantined]}"
    reopened_loads(path, states)


# f. a bit flip in the index's cached snapshot node -----------------------------------------------------


def flip_cached_time(index_dir: Path, snap_id: bytes) -> bool:
    """Flip the highest set bit of ``time_ns`` in the cached node of ``snap_id`` (the snapshot looks
    decades older); if the value is not plain msgpack, flip a bit in its middle. False if the
    index caches no node for it."""
    env = lmdb.open(str(index_dir), max_dbs=16, subdir=True)
    try:
        try:
            db = env.open_db(b"snapshots", create=False)
        except lmdb.NotFoundError:
            return False
        with env.begin(write=True, db=db) as txn:
            raw = txn.get(snap_id)
            if raw is None:
                return False
            value = bytearray(raw)
            at = value.find(b"\xa7time_ns\xcf")
            if at >= 0:
                pos = at + len(b"\xa7time_ns\xcf")
                t = int.from_bytes(value[pos:pos + 8], "big")
                value[pos:pos + 8] = (t ^ (1 << (t.bit_length() - 1))).to_bytes(8, "big")
            else:
                value[len(value) // 2] ^= 0x01
            txn.put(snap_id, bytes(value))
        return True
    finally:
        env.close()


def test_f_damaged_cached_snapshot_node_is_never_believed(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    states = {f"step-{i}": series_state(i) for i in range(4)}
    with new_repo(path) as repo:
        for tag, state in states.items():
            repo.save(state, tag, {"step": state["step"]})
        before = [s.to_dict() for s in repo.snapshots()]
    newest = "step-3"
    if not flip_cached_time(path / "index", ref_id(path, newest)):
        pytest.skip("the index caches no snapshot node: nothing to damage")
    with open_repo(path) as repo:
        try:
            listed = [s.to_dict() for s in repo.snapshots()]
        except cas.CasError:
            listed = None  # refusing is allowed; listing wrong values is not
        if listed is not None:
            assert listed == before, "snapshots() returned metadata other than what was saved"
        latest = repo.load("latest")
        assert latest["step"] == 3, f"load('latest') returned step {latest['step']}"
        assert_state(latest, states[newest], "latest")
        repo.forget(keep_last=2)
        repo.gc()
        tags = {s.tag for s in repo.snapshots()}
        assert newest in tags, f"forget(keep_last=2) removed the newest snapshot; kept {sorted(tags)}"
        assert_loads(repo, {newest: states[newest]})
    reopened_loads(path, {newest: states[newest]})


# g. tmp/ a symlink ---------------------------------------------------------------------------------------


def test_g_gc_deletes_nothing_behind_a_tmp_symlink(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    with new_repo(path) as repo:
        repo.save(series_state(0), "s0")
        repo.save(series_state(1), "s1")
        repo.delete("s0")
    other = tmp_path / "elsewhere"
    other.mkdir()
    precious = {"notes.txt": b"not cas's\n", "pack-1-abc.tmp": b"looks like a temp pack", "data.bin": os.urandom(999)}
    for name, data in precious.items():
        (other / name).write_bytes(data)
    shutil.rmtree(path / "tmp")
    (path / "tmp").symlink_to(other, target_is_directory=True)
    with open_repo(path) as repo, contextlib.suppress(cas.CasError):  # refusing a symlinked tmp/ is allowed
        repo.gc()
    for name, data in precious.items():
        assert (other / name).is_file(), f"gc deleted {name} in the directory tmp/ links to"
        assert (other / name).read_bytes() == data
    reopened_loads(path, {"s1": series_state(1)})


# h. a damaged newest snapshot must not block saves ---------------------------------------------------


def h_states() -> list[dict[str, Any]]:
    """s0; s1 = sparse change of s0's embedding + a new tensor; s2 = another sparse change + the same."""
    emb = torch.randn(512, 64, generator=torch.Generator().manual_seed(5))  # 128 KiB
    e1 = emb.clone()
    e1[[3, 200, 400]] += 0.01
    e2 = e1.clone()
    e2[[10, 300, 500]] -= 0.01
    extra = dense(77, 32768)  # 128 KiB: the manifest lands in a later pack than the deltas
    return [{"emb": emb, "keep": dense(78)}, {"emb": e1, "extra": extra, "keep": dense(78)},
            {"emb": e2, "extra": extra, "keep": dense(78)}]


def damage_data_of(path: Path, state: dict[str, Any], how: str, tag: str) -> str:
    """Truncate (or delete) the pack holding the first chunk of the snapshot's embedding."""
    cid = chunk_ids(state["emb"], CHUNK)[0]
    name = pack_of(path, cid)
    assert all(e.kind == ChunkKind.DATA for e in footers(path)[name]), "test setup: damaged pack holds a node"
    assert ref_id(path, tag) not in {e.chunk_id for e in footers(path)[name]}
    target = pack_files(path)[name]
    if how == "truncate":
        os.truncate(target, target.stat().st_size // 2)
    else:
        target.unlink()
    return name


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_h_api_save_after_a_damaged_newest_snapshot(tmp_path: Path, how: str) -> None:
    path = tmp_path / "repo"
    s0, s1, s2 = h_states()
    with new_repo(path) as repo:
        repo.save(s0, "s0")
        repo.save(s1, "s1")
    damage_data_of(path, s1, how, "s1")
    with open_repo(path) as repo:
        repo.save(s2, "s2")  # parent: the damaged s1
        assert_loads(repo, {"s2": s2, "s0": s0})
    reopened_loads(path, {"s2": s2, "s0": s0}, verify=False)


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_h_manager_save_and_restore_latest_after_a_damaged_newest_snapshot(tmp_path: Path, how: str) -> None:
    path = tmp_path / "repo"
    s0, s1, s2 = h_states()
    new_repo(path).close()
    with cas.CheckpointManager(path) as mgr:
        mgr.save(1, s0)
        mgr.save(2, s1)
        mgr.wait()
    damage_data_of(path, s1, how, "step-2")
    with cas.CheckpointManager(path) as mgr:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "does not restore ... trying the previous one"
            resumed = mgr.restore_latest()
        assert resumed is not None and resumed.step == 1, resumed
        assert_state(resumed.state_dict, s0, "restore_latest")
        mgr.save(3, s2)
        mgr.wait()
        assert_state(mgr.repo.load("step-3"), s2, "step-3")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            resumed = mgr.restore_latest()
        assert resumed is not None and resumed.step == 3, resumed
        assert_state(resumed.state_dict, s2, "restore_latest")


@pytest.mark.parametrize("how", ["truncate"])  # one variant: the CLI imports torch (seconds); the API covers both
def test_h_cli_save_after_a_damaged_newest_snapshot(tmp_path: Path, how: str) -> None:
    path = tmp_path / "repo"
    s0, s1, s2 = h_states()
    with new_repo(path) as repo:
        repo.save(s0, "s0")
        repo.save(s1, "s1")
    damage_data_of(path, s1, how, "s1")
    torch.save(s2, tmp_path / "s2.pt")
    ok(cli(path, "save", "--state", tmp_path / "s2.pt", "--tag", "s2"))  # its contents, not its bytes
    reopened_loads(path, {"s2": s2, "s0": s0}, verify=False)


# i. a snapshot whose manifest is gone, and a lost index: the CLI goes on around it -------------------------


def test_i_cli_works_around_a_snapshot_with_a_truncated_manifest(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    states = {f"s{i}": series_state(i) for i in range(3)}
    with new_repo(path) as repo:
        for tag, state in states.items():
            repo.save(state, tag)
    name = pack_of(path, ref_id(path, "s2"))
    damaged = pack_files(path)[name]
    entries = read_footer(damaged)
    # cut after the first record when the pack holds several (manifest nodes have packs of their own)
    cut = entries[0].offset + entries[0].stored_length if len(entries) > 1 else damaged.stat().st_size // 2
    before_cut = {e.chunk_id for e in entries if e.offset + e.stored_length <= cut}  # still verifiable
    assert before_cut, "test setup: no record lies wholly before the cut"
    os.truncate(damaged, cut)
    shutil.rmtree(path / "index")
    intact = {t: states[t] for t in ("s0", "s1")}

    out = ok(cli(path, "ls"))
    assert "s0" in out and "s1" in out, out
    ok(cli(path, "show", "s0"))
    one_line_error(cli(path, "show", "s2"), 7)
    ok(cli(path, "stats"))
    restored = cli(path, "restore", "latest", tmp_path / "latest.pt")
    if restored.returncode == 0:  # fell back to the newest intact snapshot
        assert_state(torch.load(tmp_path / "latest.pt", weights_only=True), states["s1"], "restore latest")
    else:
        one_line_error(restored, 7)
    new = series_state(3)
    torch.save(new, tmp_path / "s3.pt")
    ok(cli(path, "save", "--state", tmp_path / "s3.pt", "--tag", "s3"))
    intact["s3"] = new

    rebuilt = cli(path, "index", "rebuild")  # exit 1 ("damage found") is fine: it must say so
    assert rebuilt.returncode in (0, 1) and "Traceback" not in rebuilt.stderr, rebuilt.stderr
    text = rebuilt.stdout + rebuilt.stderr
    warned = name[:8] in text or any(w in text.lower() for w in ("unreadable", "damaged", "skipped", "corrupt"))
    assert warned, f"`cas index rebuild` said nothing of the unreadable pack: {text!r}"

    for _ in range(2):
        files_before = store_state(path)
        proc = cli(path, "check", "--repair")
        assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr
        if "(repaired)" in proc.stdout:
            assert store_state(path) != files_before, f"check --repair said it repaired, changed nothing: {proc.stdout}"
    lost = before_cut - stored_chunk_ids(path)
    assert not lost, f"check --repair dropped {len(lost)} chunks of the truncated pack that still verified"

    ok(cli(path, "rm", "s2"))
    out = ok(cli(path, "ls"))
    assert re.search(r"\bs0\b", out) and not re.search(r"\bs2\b", out), out
    with open_repo(path) as repo:
        assert sorted(s.tag for s in repo.snapshots()) == ["s0", "s1", "s3"]
        assert_loads(repo, intact)
        assert_verifies(repo)


# j. an ordinary gc leaves a repository check() calls ok --------------------------------------------------


def test_j_check_is_ok_after_an_ordinary_gc(tmp_path: Path) -> None:
    """rm the parents of delta chains, gc: dead delta records whose bases are gone may stay in kept
    packs; check must not call such a healthy pack damaged."""
    path = tmp_path / "repo"
    a = embedding(1)
    s1 = {"a": a, "u": dense(2)}
    s2 = {"a": sparse_change(a, 3), "b": dense(4, 32768)}  # deltas against s1, sharing packs with b
    s3 = {"a": embedding(5), "b": s2["b"]}
    with new_repo(path) as repo:
        repo.save(s1, "s1")
        repo.save(s2, "s2")
        repo.save(s3, "s3")
        repo.delete("s1")
        repo.delete("s2")
        repo.gc()
        report = repo.check()
        damaged = [p[:12] for p in report.damaged_packs]
        assert report.ok, f"check after a plain gc: damaged packs {damaged}, affected {report.affected}"
        assert_verifies(repo)
        assert_loads(repo, {"s3": s3})


# k. a damaged record header or reserved byte is damage ------------------------------------------------


@pytest.mark.parametrize("field", ["kind", "flags", "reserved", "trailer_reserved"])
def test_k_damaged_record_header_is_reported(tmp_path: Path, field: str) -> None:
    path = tmp_path / "repo"
    state = series_state(0)
    with new_repo(path) as repo:
        repo.save(state, "s0")
    name, _entries = data_pack_without_nodes(path, data_chunk_ids(state, CHUNK))
    target = pack_files(path)[name]
    first = HEADER.size  # the first record header: magic(4) codec kind flags zero ...
    offset = {
        "kind": (first + 5, 0x01),
        "flags": (first + 6, 0x01),
        "reserved": (first + 7, 0x5A),
        "trailer_reserved": (target.stat().st_size - TRAILER.size + 8 + 8 + 32 + 2 + 1, 0x5A),
    }[field]
    assert RECORD_HEADER.size == 88 and FOOTER_ENTRY.size == 96
    flip(target, *offset)
    with open_repo(path) as repo:
        report = repo.verify(read_data=True)
        assert not report.ok, f"verify --read-data found nothing wrong with a damaged {field} byte"
        assert not repo.check().ok, f"check found nothing wrong with a damaged {field} byte"


# l. lmdb errors never escape raw --------------------------------------------------------------------------


def test_l_garbage_index_file_is_recovered_or_refused_with_advice(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    states = {f"s{i}": series_state(i) for i in range(2)}
    with new_repo(path) as repo:
        for tag, state in states.items():
            repo.save(state, tag)
    (path / "index" / "data.mdb").write_bytes(os.urandom(64 << 10))
    refused: cas.CasError | None = None
    try:
        with open_repo(path) as repo:
            assert_loads(repo, states)
    except cas.CasError as exc:
        refused = exc
    assert refused is None or "rebuild" in str(refused), f"the error does not say what to do: {refused}"
    ok(cli(path, "index", "rebuild"))
    reopened_loads(path, states)


def test_l_index_values_of_the_wrong_length_are_cas_errors(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    states = {f"s{i}": series_state(i) for i in range(2)}
    with new_repo(path) as repo:
        for tag, state in states.items():
            repo.save(state, tag)
    targets = chunk_ids(states["s1"]["emb"], CHUNK) + chunk_ids(states["s1"]["own"], CHUNK)
    env = lmdb.open(str(path / "index"), max_dbs=16, subdir=True)
    try:
        db = env.open_db(b"chunks", create=False)
        with env.begin(write=True, db=db) as txn:
            present = [cid for cid in targets if txn.get(cid) is not None]
            assert present, "test setup: the chunks db holds none of the snapshot's chunks"
            for i, cid in enumerate(present):
                txn.put(cid, os.urandom(50 if i % 2 else 200))
    finally:
        env.close()
    with open_repo(path) as repo:
        for what, call in (("load", lambda: repo.load("s1")), ("verify", lambda: repo.verify(read_data=True)),
                           ("stats", repo.stats), ("check", repo.check), ("gc", repo.gc)):
            try:
                got = call()
            except cas.CasError:
                continue
            except Exception as exc:
                raise AssertionError(f"{what}: {type(exc).__name__} escaped: {exc}") from exc
            if what == "load":
                assert_state(got, states["s1"], "s1")
        repo.rebuild_index()
    reopened_loads(path, states)


# m. under ulimit -v ---------------------------------------------------------------------------------------

AS_LIMIT = 8 << 30


def limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def test_m_commands_work_under_an_address_space_limit(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    with new_repo(path) as repo:
        repo.save(series_state(0), "s0")
        repo.save(series_state(1), "s1")
    ok(cli(path, "ls", preexec_fn=limit_address_space))
    ok(cli(path, "verify", "--read-data", preexec_fn=limit_address_space))
    code = (
        "import sys, cas\n"
        "from tests.recovery_worker import assert_state, series_state\n"
        f"with cas.Repository.open({str(path)!r}, threads=2) as r:\n"
        "    assert_state(r.load('s1'), series_state(1), 's1')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=ROOT,
                          timeout=180, check=False, preexec_fn=limit_address_space)
    assert proc.returncode == 0, f"load under ulimit -v 8 GiB: {proc.stderr[-2000:]}"


# n. a long-lived handle does not keep deleted packs' space ---------------------------------------------


def deleted_pack_fds(repo_path: Path) -> list[str]:
    packs = str((repo_path / "packs").resolve())
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(packs) and target.endswith("(deleted)"):
            out.append(target)
    return out


def test_n_long_lived_repository_releases_packs_another_gc_deleted(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    states = {f"s{i}": series_state(i) for i in range(3)}
    with new_repo(path) as repo:
        for tag, state in states.items():
            repo.save(state, tag)
    with open_repo(path) as repo:
        assert_loads(repo, states)  # every pack opened for reading
        repo.delete("s0")
        repo.delete("s1")
        gc = json.loads(ok(cli(path, "gc", "--repack-below", "0.9", "--json")))
        assert gc["packs_deleted"] + gc["packs_repacked"] > 0, f"test setup: the other gc deleted nothing: {gc}"
        repo.snapshots()
        held = deleted_pack_fds(path)
        assert not held, f"after snapshots(), {len(held)} descriptors still hold deleted packs"
        repo.save(series_state(3), "s3")
        held = deleted_pack_fds(path)
        assert not held, f"after a save, {len(held)} descriptors still hold deleted packs"
        assert_loads(repo, {"s2": states["s2"], "s3": series_state(3)})


# beyond the reproductions: found while writing these tests ----------------------------------------


def test_extra_truncated_index_file_does_not_kill_the_process(tmp_path: Path) -> None:
    """``index/data.mdb`` cut short (a full disk, a bad copy): LMDB maps pages past the end of the file
    and the first read of one raises SIGBUS, killing the process. Every command must instead
    recover or refuse with advice, and ``cas index rebuild`` must work. (Subprocesses only: a
    SIGBUS here would kill pytest.)"""
    path = tmp_path / "repo"
    with new_repo(path) as repo:
        for i in range(3):
            repo.save(series_state(i), f"s{i}")
    mdb = path / "index" / "data.mdb"
    os.truncate(mdb, mdb.stat().st_size // 2)
    listed = cli(path, "ls")
    assert listed.returncode >= 0, f"`cas ls` was killed by signal {-listed.returncode}"
    if listed.returncode != 0:
        one_line_error(listed, listed.returncode)
        assert "rebuild" in listed.stderr, listed.stderr
    rebuilt = cli(path, "index", "rebuild")
    assert rebuilt.returncode in (0, 1), f"`cas index rebuild`: exit {rebuilt.returncode}: {rebuilt.stderr[-2000:]}"
    out = ok(cli(path, "ls"))
    assert all(f"s{i}" in out for i in range(3)), out
    ok(cli(path, "verify", "--read-data"))  # every chunk re-hashed against its id


def test_extra_repair_uses_an_intact_copy_in_another_pack(tmp_path: Path) -> None:
    """A chunk stored twice (a dead record kept in a live pack by gc, then written again by a later
    save); the copy the index points to is damaged. The intact copy is still in the store, so after
    check --repair the snapshot must load."""
    path = tmp_path / "repo"
    c = dense(1, 4096)  # exactly one chunk
    s1 = {"c": c, "big": dense(2, 32768)}
    s3 = {"c": c.clone(), "x": dense(3)}
    with new_repo(path) as repo:
        repo.save(s1, "s1")
        repo.save({"big": s1["big"]}, "s2")
        repo.delete("s1")
        repo.gc()  # c is dead; its pack stays (big is live)
        cid = chunk_ids(c, CHUNK)[0]
        old = packs_holding(path, {cid})
        assert old, "test setup: gc removed the pack holding the first copy"
        repo.save(s3, "s3")  # c written again
        new = packs_holding(path, {cid}) - old
        assert len(new) == 1, "test setup: the second copy was not written"
        second = pack_files(path)[new.pop()]
        entry = next(e for e in read_footer(second) if e.chunk_id == cid)
        flip(second, entry.offset + entry.stored_length // 2)
        repo.check(repair=True)
    reopened_loads(path, {"s3": s3, "s2": {"big": s1["big"]}})


def test_extra_repair_keeps_a_snapshot_node_the_index_holds_verified(tmp_path: Path) -> None:
    """The record of a snapshot node is damaged in its pack while the index's cached copy (checked
    against the snapshot id) still serves loads. What loads before check --repair and rebuild_index
    must load after them: the verified copy must not vanish with the cache."""
    path = tmp_path / "repo"
    states = {f"s{i}": series_state(i) for i in range(2)}
    with new_repo(path) as repo:
        for tag, state in states.items():
            repo.save(state, tag)
    sid = ref_id(path, "s1")
    name = pack_of(path, sid)
    entry = next(e for e in footers(path)[name] if e.chunk_id == sid)
    flip(pack_files(path)[name], entry.offset + entry.stored_length // 2)
    with open_repo(path) as repo:
        try:
            assert_state(repo.load("s1"), states["s1"], "s1")
            loaded = True
        except cas.CasError:
            loaded = False  # the engine does not serve nodes from its cache: nothing more to hold it to
        repo.check(repair=True)
    if loaded:
        reopened_loads(path, states, verify=False)
        with open_repo(path) as repo:
            repo.rebuild_index()
        reopened_loads(path, states, verify=False)


def test_extra_save_when_every_snapshot_is_damaged(tmp_path: Path) -> None:
    """The only snapshot's manifest is gone (pack truncated, index lost): listings leave it out, and a
    save with the default parent ("latest") must fall back to keyframes, not fail for want of one."""
    path = tmp_path / "repo"
    with new_repo(path) as repo:
        repo.save(series_state(0), "s0")
    damaged = pack_files(path)[pack_of(path, ref_id(path, "s0"))]
    os.truncate(damaged, damaged.stat().st_size // 2)
    shutil.rmtree(path / "index")
    with open_repo(path) as repo:
        repo.save(series_state(1), "s1")
        assert_loads(repo, {"s1": series_state(1)})
    reopened_loads(path, {"s1": series_state(1)}, verify=False)
