from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import cas
from tests.helpers import assert_same, make_state, pack_files, repo_files


def test_init_refuses_non_empty_directory_and_existing_repo(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(cas.RepositoryExistsError, match="not empty"):
        cas.Repository.init(tmp_path / "d")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["notes.txt"]
    cas.Repository.init(tmp_path / "r").close()
    with pytest.raises(cas.RepositoryExistsError, match="already a cas repository"):
        cas.Repository.init(tmp_path / "r")
    with pytest.raises(cas.UsageError, match="chunk size"):
        cas.Repository.init(tmp_path / "x", chunk_size=1000)


def test_open_non_repositories(tmp_path: Path) -> None:
    with pytest.raises(cas.NotARepositoryError, match="no such directory"):
        cas.Repository.open(tmp_path / "missing")
    with pytest.raises(cas.NotARepositoryError, match="cas init"):
        cas.Repository.open(tmp_path)
    (tmp_path / "config.json").write_text('{"name": "some other tool"}')
    with pytest.raises(cas.NotARepositoryError, match="not a cas config"):
        cas.Repository.open(tmp_path)
    (tmp_path / "config.json").write_text("\x00garbage")
    with pytest.raises(cas.NotARepositoryError, match="unreadable"):
        cas.Repository.open(tmp_path)


def test_future_format_version_is_refused(tmp_path: Path) -> None:
    cas.Repository.init(tmp_path / "r").close()
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    config["version"] = 7
    (tmp_path / "r" / "config.json").write_text(json.dumps(config))
    with pytest.raises(cas.FormatVersionError, match=r"version 7.*upgrade cas"):
        cas.Repository.open(tmp_path / "r")


def test_save_load_resolve_and_snapshot_fields(repo: cas.Repository) -> None:
    sd = make_state(1)
    with pytest.raises(cas.SnapshotNotFoundError, match="no snapshots yet"):
        repo.load("latest")
    s1 = repo.save(sd, tag="step-1", metadata={"step": 1, "metrics": {"loss": 2.31}})
    time.sleep(0.01)
    s2 = repo.save(make_state(2), tag="step-2", metadata={"step": 2})
    s3 = repo.save(make_state(3))  # untagged
    assert len(s1.id) == 64 and s2.parent == s1.id and s3.parent == s2.id and s1.parent is None
    assert [s.id for s in repo.snapshots()] == [s1.id, s2.id, s3.id]
    listed = repo.snapshots()[0]
    assert listed.tag == "step-1" and listed.metadata == {"step": 1, "metrics": {"loss": 2.31}}
    assert listed.logical_bytes == 4 * 50_000 * 4 and listed.bytes_added > 0 and listed.tensor_count == 4
    assert_same(repo.load("step-1"), sd)
    assert_same(repo.load(s1.id), sd)
    assert_same(repo.load(s1.id[:10]), sd)
    assert repo.resolve("latest").id == s3.id
    assert repo.resolve(s3.id[:8]).tag is None
    with pytest.raises(cas.SnapshotNotFoundError, match="no snapshot named 'step-9'"):
        repo.load("step-9")


def test_ambiguous_prefix(repo: cas.Repository) -> None:
    ids = [repo.save({"x": i}).id for i in range(40)]
    prefixes: dict[str, int] = {}
    for i in ids:
        prefixes[i[:4]] = prefixes.get(i[:4], 0) + 1
    shared = [p for p, n in prefixes.items() if n > 1]
    if shared:
        with pytest.raises(cas.AmbiguousSnapshotError, match="give more digits"):
            repo.resolve(shared[0])
    assert repo.resolve(ids[0][:16]).id == ids[0]


def test_tags_are_checked(repo: cas.Repository) -> None:
    repo.save({"a": 1}, tag="t1")
    before = repo_files(repo.path)
    with pytest.raises(cas.TagExistsError, match="already names a snapshot"):
        repo.save({"a": 2}, tag="t1")
    for bad in ("", "../escape", "a/b", "latest", "x" * 200, "a" * 64, " lead"):
        with pytest.raises(cas.InvalidTagError):
            repo.save({"a": 3}, tag=bad)
    assert repo_files(repo.path) == before
    assert repo.load("t1") == {"a": 1}


def test_metadata_must_be_plain(repo: cas.Repository) -> None:
    with pytest.raises(cas.UsageError, match=r"metadata\['loss'\] holds a Tensor"):
        repo.save({"a": 1}, metadata={"loss": torch.tensor(1.0)})
    with pytest.raises(cas.UsageError, match="non-string key"):
        repo.save({"a": 1}, metadata={1: "x"})
    assert repo.snapshots() == []


def test_dedup_same_state_adds_only_manifest(repo: cas.Repository) -> None:
    sd = make_state(5)
    repo.save(sd, tag="a")
    stored = repo.stats().stored_bytes
    second = repo.save(sd, tag="b")
    assert second.bytes_added == 0
    assert repo.stats().stored_bytes - stored < 2048
    sd["layer2.weight"] = sd["layer2.weight"] + 1
    third = repo.save(sd, tag="c")
    tensor_bytes = 50_000 * 4
    assert 0.5 * tensor_bytes < third.bytes_added < 1.1 * tensor_bytes + 4096
    d = repo.diff("b", "c")
    assert d.changed == ["layer2.weight"] and len(d.unchanged) == 3 and not d.added and not d.removed
    assert d.changed_bytes == tensor_bytes
    d2 = repo.diff("a", "latest")
    assert d2.values_changed == []


def test_diff_added_removed_and_values(repo: cas.Repository) -> None:
    repo.save({"w": torch.zeros(3), "gone": torch.ones(2), "step": 1}, tag="a")
    repo.save({"w": torch.zeros(3), "new": torch.ones(2), "step": 2}, tag="b")
    d = repo.diff("a", "b")
    assert d.added == ["new"] and d.removed == ["gone"] and d.unchanged == ["w"] and d.values_changed == ["step"]


def test_delete_drops_ref_only(repo: cas.Repository) -> None:
    s = repo.save(make_state(1), tag="a")
    repo.save(make_state(1), tag="b")
    packs = sorted(p.name for p in pack_files(repo.path))
    assert repo.delete("a").id == s.id
    assert [x.tag for x in repo.snapshots()] == ["b"]
    with pytest.raises(cas.SnapshotNotFoundError):
        repo.load("a")
    assert sorted(p.name for p in pack_files(repo.path)) == packs
    assert_same(repo.load("b"), make_state(1))
    with pytest.raises(cas.UsageError, match="refusing to delete 'latest'"):
        repo.delete("latest")


def test_stats(repo: cas.Repository) -> None:
    repo.save(make_state(1), tag="a")
    repo.save(make_state(1), tag="b")
    st = repo.stats()
    assert st.snapshot_count == 2 and st.logical_bytes == 2 * 4 * 200_000
    assert st.unique_bytes >= 4 * 200_000 and st.dedup_ratio == pytest.approx(2.0, rel=0.01)
    assert st.stored_bytes == sum(p.stat().st_size for p in pack_files(repo.path))
    assert st.pack_count == len(list(pack_files(repo.path)))
    assert st.ratio == st.logical_bytes / st.stored_bytes
    assert [s["bytes_added"] > 0 for s in st.per_snapshot] == [True, False]


def test_context_manager_and_reopen(tmp_path: Path) -> None:
    with cas.Repository.init(tmp_path / "r", chunk_size=4096) as repo:
        repo.save(make_state(2), tag="x")
    with cas.Repository.open(tmp_path / "r") as repo:
        assert repo.chunk_size == 4096
        assert_same(repo.load("x"), make_state(2))


def test_index_is_rebuilt_when_lost(tmp_path: Path) -> None:
    with cas.Repository.init(tmp_path / "r", chunk_size=4096, pack_size=65536) as repo:
        repo.save(make_state(1), tag="a")
        repo.save(make_state(2), tag="b")
        chunks = repo.index.chunk_count()
    for f in (tmp_path / "r" / "index").iterdir():
        f.unlink()
    with cas.Repository.open(tmp_path / "r") as repo:
        assert repo.index.chunk_count() == chunks
        assert_same(repo.load("a"), make_state(1))
        assert_same(repo.load("b"), make_state(2))
        assert repo.verify(read_data=True).ok
        assert repo.rebuild_index().chunks == chunks


def test_unsupported_object_changes_nothing(repo: cas.Repository) -> None:
    repo.save({"a": torch.ones(3)}, tag="a")
    before = repo_files(repo.path)
    with pytest.raises(cas.UnsupportedObjectError, match="optim/state/0/fn"):
        repo.save({"optim": {"state": {0: {"fn": object()}}}, "w": torch.randn(100_000)}, tag="b")
    assert repo_files(repo.path) == before
    assert [s.tag for s in repo.snapshots()] == ["a"]


def test_save_moves_cuda_free_tensor_types(repo: cas.Repository) -> None:
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(cas.UnsupportedObjectError, match="layout"):
        repo.save({"s": sparse})
    meta = torch.empty(3, device="meta")
    with pytest.raises(cas.UnsupportedObjectError, match="meta device"):
        repo.save({"m": meta})


def test_two_handles_on_one_repository_in_one_process(tmp_path: Path) -> None:
    first = cas.Repository.init(tmp_path / "r")
    second = cas.Repository.open(tmp_path / "r")
    first.save(make_state(1), tag="a")
    assert_same(second.load("a"), make_state(1))
    first.close()
    second.save(make_state(2), tag="b")
    assert [s.tag for s in second.snapshots()] == ["a", "b"]
    second.close()
    with cas.Repository.open(tmp_path / "r") as third:
        assert_same(third.load("b"), make_state(2))


def test_replace_moves_a_tag_atomically(repo: cas.Repository) -> None:
    first = repo.save({"v": 1}, tag="last")
    second = repo.save({"v": 2}, tag="last", replace=True)
    assert repo.resolve("last").id == second.id != first.id
    assert repo.load("last") == {"v": 2}
    before = repo_files(repo.path)
    with pytest.raises(cas.UnsupportedObjectError):
        repo.save({"v": object()}, tag="last", replace=True)
    assert repo_files(repo.path) == before and repo.load("last") == {"v": 2}  # a failed save moves nothing


def test_bytes_added_accounts_for_the_pack_files(repo: cas.Repository) -> None:
    for i in range(4):
        repo.save(make_state(i % 2, n=3))
    snaps = repo.snapshots()
    stored = repo.stats().stored_bytes
    added = sum(s.bytes_added for s in snaps)
    # everything but the records of the snapshot nodes themselves (written after bytes_added is known)
    assert added <= stored <= added + len(snaps) * (1024 + 88 + 96)
    assert repo.stats().dedup_ratio == pytest.approx(2.0, rel=0.01)
