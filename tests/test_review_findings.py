"""Review findings: each test shows one bug in the current code (it fails until the bug is fixed).

Every test builds a real repository (a directory, or a prefix on moto's S3 server), damages or
stales it the way the FORMAT describes (bit rot in a pack, a truncated pack, an index cache of
another machine, a lock object of a host whose clock is off) and checks what the rules of
README / FORMAT promise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import cas
from cas.ids import ChunkId, hash_bytes
from cas.pack import RECORD_HEADER, RECORD_MAGIC
from tests.backends.moto_server import MotoServer
from tests.helpers import assert_same, make_state, tensor_bytes

CHUNK = 64 * 1024


def _s3_env(monkeypatch: pytest.MonkeyPatch, server: MotoServer, cache: Path) -> None:
    for k, v in {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                 "CAS_CACHE_DIR": str(cache)}.items():
        monkeypatch.setenv(k, v)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _cid(t: torch.Tensor, start: int = 0) -> ChunkId:
    return ChunkId(hash_bytes(tensor_bytes(t)[start:start + CHUNK]))


# 1 ------------------------------------------------------------------------------------------------
def test_stale_index_cache_of_another_machine_hides_newer_snapshots_and_latest_is_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto_server: MotoServer, s3_bucket: str
) -> None:
    """Machine A's index cache predates a save made on machine B. The index is only a cache:
    A must see B's snapshot; instead A lists it as DAMAGED, resolves ``latest`` to its own older
    snapshot, loads that one silently, and verify reports a corrupt manifest."""
    url = f"s3://{s3_bucket}/run"
    _s3_env(monkeypatch, moto_server, tmp_path / "cache-a")
    with cas.Repository.init(url, chunk_size=CHUNK, pack_size=1 << 20) as repo:
        repo.save(make_state(1, n=2, numel=20_000), tag="old")
    monkeypatch.setenv("CAS_CACHE_DIR", str(tmp_path / "cache-b"))  # machine B
    new = make_state(2, n=2, numel=20_000)
    with cas.Repository.open(url) as repo:
        repo.save(new, tag="new")
    monkeypatch.setenv("CAS_CACHE_DIR", str(tmp_path / "cache-a"))  # back on machine A
    with cas.Repository.open(url) as repo:
        assert [s.tag for s in repo.snapshots()] == ["old", "new"]
        assert repo.resolve("latest").tag == "new"
        assert_same(repo.load("latest"), new)
        assert repo.verify().ok


# 2 ------------------------------------------------------------------------------------------------
def test_check_repair_blames_an_intact_pack_for_its_delta_base_and_loses_a_recoverable_chunk(
    tmp_path: Path,
) -> None:
    """Pack P holds an intact delta D whose base B is indexed in pack R, where B's payload rots; an
    intact copy of B sits in pack Q. check must report only R, index Q's copy of B, and keep D:
    every byte s2 needs is intact. Instead P is reported damaged, quarantined and removed from
    packs/, D is unindexed as lost, and s2 cannot be loaded after the 'repair'."""
    root = tmp_path / "repo"
    w = torch.randn(4 * CHUNK // 4, generator=torch.Generator().manual_seed(0))
    s1 = {"w": w}
    with cas.Repository.init(root, chunk_size=CHUNK, pack_size=1 << 20) as repo:
        repo.save(s1, tag="s1")
        b = _cid(w)
        q = repo.index.get(b).pack_id
        q_path = root / repo.store.pack_key_of(q)
        kept = q_path.read_bytes()
        q_path.unlink()
        # Q is gone: its chunks are written again, into R (beside another tensor, so R is not Q)
        repo.save({**s1, "other": torch.arange(1000, dtype=torch.int32)}, tag="dup")
        r = repo.index.get(b).pack_id
        assert r != q
        q_path.write_bytes(kept)  # Q is back: B has two intact copies, the index names R's
        w2 = w.clone()
        w2[10] += 1.0
        s2 = {"w": w2}
        repo.save(s2, tag="s2")
        d = repo.index.get(_cid(w2))
        assert d.base_id == b  # D is a delta against B (its chain goes through R)
        p = d.pack_id
        bl = repo.index.get(b)
        _flip(root / repo.store.pack_key_of(r), bl.offset + bl.stored_length // 2)  # bit rot in R's copy of B
    with cas.Repository.open(root) as repo:
        report = repo.check(repair=True)
        assert p.hex() not in report.damaged_packs, report.damage[p.hex()]
        assert report.damaged_packs == [r.hex()]
        assert_same(repo.load("s2"), s2)


# 3 ------------------------------------------------------------------------------------------------
def test_gc_points_a_live_chunk_at_a_delta_copy_and_then_deletes_that_copys_base(tmp_path: Path) -> None:
    """Snapshot k's chunk X is indexed as a keyframe copy whose payload rots; an intact delta copy
    of X (against B) sits in a pack gc is about to delete. gc's duplicate guard points the index
    at the delta copy and keeps its pack, but B was not marked live: gc deletes B and its pack,
    so X can never be decoded again. Before gc, k was recoverable (check --repair would find the
    delta copy and B); after gc it is lost."""
    root = tmp_path / "repo"
    w0 = torch.randn(CHUNK // 4, generator=torch.Generator().manual_seed(0))
    w1 = w0.clone()
    w1[7] += 1.0
    with cas.Repository.init(root, chunk_size=CHUNK, pack_size=1 << 20) as repo:
        repo.save({"w": w0}, tag="s0")
        repo.save({"w": w1}, tag="s1")
        x = _cid(w1)
        delta_copy = repo.index.get(x)
        assert delta_copy.base_id == _cid(w0)
        c_path = root / repo.store.pack_key_of(delta_copy.pack_id)
        kept = c_path.read_bytes()
        c_path.unlink()
        repo.save({"w": w1}, tag="k", keyframe=True)  # X written again, as a keyframe
        keyframe_copy = repo.index.get(x)
        assert keyframe_copy.base_id is None
        c_path.write_bytes(kept)
        repo.delete("s0")
        repo.delete("s1")
        _flip(root / repo.store.pack_key_of(keyframe_copy.pack_id), keyframe_copy.offset + 100)
    with cas.Repository.open(root) as repo:
        repo.gc()
        loc = repo.index.get(x)
        assert loc is not None
        if loc.base_id is not None:  # gc chose the delta copy: its base must still be there
            assert repo.index.get(loc.base_id) is not None, "gc deleted the base of the copy it indexed"
        assert torch.equal(repo.load("k")["w"], w1)


# 4 ------------------------------------------------------------------------------------------------
def test_lock_object_of_a_holder_with_a_slow_clock_is_taken_for_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto_server: MotoServer, s3_bucket: str
) -> None:
    """A saver on another host whose clock runs 11 minutes behind writes (and refreshes) its shared
    lock object; the store stamps it as written a moment ago. gc must wait for it. Staleness is
    judged from the writer's own wall clock ("time" in the body), so gc goes ahead at once, beside
    a saver in flight: exactly the race §10 forbids (its packs would be swept before its ref)."""
    _s3_env(monkeypatch, moto_server, tmp_path / "cache")
    monkeypatch.setattr("cas.layout.LOCK_WAIT_S", 1.0)
    url = f"s3://{s3_bucket}/run"
    with cas.Repository.init(url, chunk_size=CHUNK, pack_size=1 << 20) as repo:
        repo.save(make_state(1, n=1, numel=1000), tag="a")
        skewed = time.time() - 660  # what that host's clock says now
        key = f"locks/{uuid.uuid4().hex}.json"
        body = {"kind": "shared", "host": "other-host", "pid": 4242, "since": skewed, "time": skewed}
        repo.store.backend.write(key, json.dumps(body).encode())
        written = repo.store.backend.stat(key)
        assert abs(written.mtime - time.time()) < 60  # the store says: refreshed just now
        with pytest.raises(cas.LockedError):
            repo.gc()


# 5 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [{"kind": "shared", "time": "soon"}, {"kind": "exclusive", "time": None},
                                  {"kind": "exclusive", "time": 1e18, "since": "x"}])
def test_a_malformed_lock_object_is_a_typed_error_or_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto_server: MotoServer, s3_bucket: str, body: dict[str, Any]
) -> None:
    """A damaged or foreign object under locks/ makes every save, load and gc raise a raw
    ValueError / TypeError (rule 6: every error is a typed cas.CasError)."""
    _s3_env(monkeypatch, moto_server, tmp_path / "cache")
    monkeypatch.setattr("cas.layout.LOCK_WAIT_S", 0.5)
    url = f"s3://{s3_bucket}/run"
    with cas.Repository.init(url, chunk_size=CHUNK, pack_size=1 << 20) as repo:
        repo.save(make_state(1, n=1, numel=1000), tag="a")
        repo.store.backend.write(f"locks/{uuid.uuid4().hex}.json", json.dumps(body).encode())
        with contextlib.suppress(cas.CasError):  # a typed refusal is fine; anything else fails the test
            repo.gc()


# 6 ------------------------------------------------------------------------------------------------
def test_index_recovery_in_one_repository_object_breaks_another_on_the_same_path(tmp_path: Path) -> None:
    """Two Repository objects on one path share one LMDB environment (reference-counted). When the
    second finds the index damaged and starts a fresh one, ``drop_env`` closes the shared
    environment under the first; closing the first then closes the second's new environment, and
    closing the second raises a bare KeyError (rule 6)."""
    root = tmp_path / "repo"
    with cas.Repository.init(root, chunk_size=CHUNK, pack_size=1 << 20) as repo:
        repo.save(make_state(1, n=1, numel=1000), tag="a")
    first = cas.Repository.open(root)
    env = first.index._env  # simulate a flipped bit in one index value on disk
    db = env.open_db(b"packs")
    with env.begin(write=True, db=db) as txn:
        k, v = next(iter(txn.cursor()))
        txn.put(bytes(k), bytes(v)[:-1] + bytes([v[-1] ^ 1]))
    second = cas.Repository.open(root)  # detects the damage, rebuilds the index
    try:
        assert [s.tag for s in second.snapshots()] == ["a"]
        with contextlib.suppress(cas.CasError):  # it may go on, or say (typed) its index was replaced
            first.snapshots()
        first.close()
        assert [s.tag for s in second.snapshots()] == ["a"]  # closed under it by first.close()
    finally:
        second.close()  # KeyError: its environment was released by the first object's close


# 7 ------------------------------------------------------------------------------------------------
def test_gc_dry_run_on_a_stale_index_refuses_and_tells_the_user_to_rm_an_intact_snapshot(tmp_path: Path) -> None:
    """An old copy of the index is put back (FORMAT §5: a stale index), missing a later save's pack.
    A real gc reconciles first and is fine; ``gc(dry_run=True)`` skips the reconcile, trusts the
    index's gaps, and raises GcRefusedError advising `cas rm new` for a snapshot that is intact."""
    root = tmp_path / "repo"
    with cas.Repository.init(root, chunk_size=CHUNK, pack_size=1 << 20) as repo:
        repo.save(make_state(1, n=2, numel=20_000), tag="old")
    old_index = tmp_path / "index-copy"
    shutil.copytree(root / "index", old_index)
    with cas.Repository.open(root) as repo:
        repo.save(make_state(2, n=2, numel=20_000), tag="new")
    shutil.rmtree(root / "index")
    shutil.copytree(old_index, root / "index")
    with cas.Repository.open(root) as repo:
        report = repo.gc(dry_run=True)
        assert report.snapshots == 2
        assert report.packs_deleted == 0  # every pack holds live chunks


# 8 ------------------------------------------------------------------------------------------------
def test_rebuild_over_a_truncated_pack_with_a_spurious_record_header_cannot_open_the_repository(
    tmp_path: Path,
) -> None:
    """A pack cut short (a partial copy, a full disk) whose surviving payload happens to hold the
    bytes of a record header with an unknown codec: salvage's forward scan resyncs on the magic and
    offers that record; decoding it raises FormatVersionError, which storeview.salvage does not
    catch. With the index lost, Repository.open rebuilds and fails: the whole repository cannot
    be opened ("upgrade cas"), although snapshot 'good' is intact (rule 4; rule 6's message)."""
    root = tmp_path / "repo"
    raw = bytearray(os.urandom(CHUNK))
    fake = RECORD_HEADER.pack(RECORD_MAGIC, 0xEE, 0, 0, 16, 16, b"\x11" * 32, bytes(32))
    raw[1000:1000 + len(fake)] = fake
    good = make_state(1, n=1, numel=1000)
    with cas.Repository.init(root, chunk_size=CHUNK, pack_size=1 << 20, compression="none") as repo:
        repo.save(good, tag="good")
        repo.save({"blob": torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()}, tag="bad")
        loc = repo.index.get(hash_bytes(bytes(raw)))
        bad_pack = loc.pack_id
        path = root / repo.store.pack_key_of(bad_pack)
        path.write_bytes(path.read_bytes()[: loc.offset + 2000])  # truncated inside that payload
    shutil.rmtree(root / "index")  # the index is lost: open rebuilds it from the packs
    with cas.Repository.open(root) as repo:
        assert_same(repo.load("good"), good)
        assert repo.last_rebuild is not None and bad_pack.hex() in repo.last_rebuild.unreadable_packs


# 9 ------------------------------------------------------------------------------------------------
def test_sigkill_inside_rebuild_index_loses_a_snapshot_an_uninterrupted_rebuild_keeps(tmp_path: Path) -> None:
    """Snapshot a2's node lives only in the index cache (its small pack is lost); rebuild_index is
    designed to store such verified nodes again. But it clears the index in one transaction and
    re-creates it in later ones: a SIGKILL right after the clear leaves an empty index, the next
    open rebuilds from the packs alone, and a2 (intact data, intact tree) is gone for good (rule 5:
    SIGKILL at any instant)."""
    root = tmp_path / "repo"
    state = make_state(1, n=1, numel=1000)
    with cas.Repository.init(root, chunk_size=CHUNK, pack_size=1 << 20) as repo:
        repo.save(state, tag="a")
        before = set(repo.store.list_packs())
        repo.save(state, tag="a2")  # same tensors and tree: its pack holds only the snapshot node
        (node_pack,) = set(repo.store.list_packs()) - before
        node_path = root / repo.store.pack_key_of(node_pack)
    node_path.unlink()
    kill_after_clear = textwrap.dedent(f"""
        import os, signal, cas, cas.index
        clear = cas.index.Index.clear
        def clear_then_die(self):
            clear(self)
            os.kill(os.getpid(), signal.SIGKILL)
        cas.index.Index.clear = clear_then_die
        cas.Repository.open({str(root)!r}).rebuild_index()
    """)
    done = subprocess.run([sys.executable, "-c", kill_after_clear], check=False, cwd=Path(__file__).parents[1],
                          capture_output=True, timeout=60)
    assert done.returncode == -9, done.stderr.decode()
    with cas.Repository.open(root) as repo:
        assert sorted(s.tag for s in repo.snapshots()) == ["a", "a2"]
        assert_same(repo.load("a2"), state)
