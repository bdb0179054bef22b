"""Save sessions: parts stored by several sessions (as ranks would) and one commit; ``save`` on the same steps."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

import cas
from cas.session import SavedPart, chunk_ids_of
from tests.helpers import assert_same

CHUNK = 64 * 1024


def _repo(tmp_path: Path) -> cas.Repository:
    return cas.Repository.init(tmp_path / "repo", chunk_size=CHUNK)


def test_parts_of_two_sessions_commit_as_one_snapshot(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a, b = torch.randn(300_000), torch.randn(70_000)
    with _repo(tmp_path) as repo:
        with repo.session() as s1:
            p1 = s1.store({"model": {"a": a}})
        with repo.session() as s2:
            p2 = s2.store({"model": {"b": b}, "step": 3})
        assert repo.snapshots() == []  # finished sessions leave no snapshot
        parts = [pickle.loads(pickle.dumps(p)) for p in (p1, p2)]  # parts travel between processes
        snap = repo.commit(parts, tag="joint", metadata={"step": 3})
        assert snap.tensor_count == 2 and snap.logical_bytes == (a.numel() + b.numel()) * 4
        assert snap.bytes_added >= p1.bytes_added + p2.bytes_added > 0
        assert_same(repo.load("joint"), {"model": {"a": a, "b": b}, "step": 3})
        assert repo.verify(read_data=True).ok
        single = repo.save({"model": {"a": a, "b": b}, "step": 3}, tag="single")
        assert single.bytes_added < 2 * CHUNK  # every chunk was stored by the sessions already
        # the same bytes give the same chunk ids whichever path stored them
        assert set(chunk_ids_of(p1)) | set(chunk_ids_of(p2)) <= {
            c for c, _ in repo.index.iter_chunks()}


def test_store_items_keeps_views_as_plain_tensors_with_single_save_ids(tmp_path: Path) -> None:
    flat = torch.arange(200_000, dtype=torch.float32)
    x, y = flat[:120_000], flat[120_000:]
    with _repo(tmp_path) as repo:
        with repo.session() as s:
            part = s.store_items([(("t", "x"), x), (("t", "y"), y), (("meta", "n"), 7)])
        repo.commit([part], tag="items")
        loaded = repo.load("items")
        assert_same(loaded, {"t": {"x": x, "y": y}, "meta": {"n": 7}})
        ids = set(chunk_ids_of(part))
        repo.save({"x": x.clone()}, tag="alone")
        alone = repo.tensors("alone")
        assert alone[0]["shared_storage"] is False
        with repo.session() as s:
            again = s.store({"x": x.clone()})
        assert set(chunk_ids_of(again)) <= ids


def test_conflicting_parts_are_refused(tmp_path: Path) -> None:
    with _repo(tmp_path) as repo:
        with repo.session() as s:
            p1 = s.store({"w": torch.zeros(4)})
        with repo.session() as s:
            p2 = s.store({"w": torch.ones(4)})
        with pytest.raises(cas.UsageError, match="different values at"):
            repo.commit([p1, p2], tag="bad")
        assert repo.snapshots() == []
        # identical subtrees from two writers (a replicated value) merge into one
        snap = repo.commit([p1, p1], tag="same")
        assert_same(repo.load(snap.id), {"w": torch.zeros(4)})


def test_uncommitted_session_is_collected_and_deltas_follow_parent(tmp_path: Path) -> None:
    torch.manual_seed(1)
    w = torch.randn(256, 1024)
    with _repo(tmp_path) as repo:
        repo.save({"w": w}, tag="base")
        with repo.session() as s:
            s.store({"junk": torch.randn(100_000)})
        assert [x.tag for x in repo.snapshots()] == ["base"]
        assert repo.gc().packs_deleted >= 1
        w2 = w.clone()
        w2[:2] += 1.0  # a small change: the new chunks are deltas against the parent's
        with repo.session("base") as s:
            part = s.store({"w": w2})
            assert s.parent is not None
            snap = s.commit([part], tag="next")
        assert snap.parent == repo.resolve("base").id
        assert snap.bytes_added < w.numel() * 4 // 8
        assert_same(repo.load("next"), {"w": w2})


def test_a_session_holds_the_lock_until_finished(tmp_path: Path) -> None:
    import threading

    with _repo(tmp_path) as repo:
        session = repo.session()
        part = session.store({"a": torch.ones(10)})
        done = threading.Event()

        def gc() -> None:
            with cas.Repository.open(tmp_path / "repo") as other:
                other.gc()
            done.set()

        t = threading.Thread(target=gc)
        t.start()
        assert not done.wait(0.5)  # gc waits for the session
        session.finish()
        t.join(30)
        assert done.is_set()
        assert isinstance(part, SavedPart)
        with pytest.raises(cas.UsageError, match="finished"):
            session.store({"b": torch.ones(1)})
