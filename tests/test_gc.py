from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cas
from cas.pack import iter_pack_files, pack_path
from tests.helpers import assert_same, make_state, repo_files


def series(i: int) -> dict[str, object]:
    """Checkpoint i of a run: a frozen part, a part that changes every save, and the step."""
    g = torch.Generator().manual_seed(1000 + i)
    return {"frozen": torch.arange(60_000, dtype=torch.float32), "moving": torch.randn(120_000, generator=g),
            "step": i}


def init(path: Path) -> cas.Repository:
    return cas.Repository.init(path, chunk_size=32 * 1024, pack_size=256 * 1024)


def test_gc_frees_what_it_should_and_nothing_more(tmp_path: Path) -> None:
    with init(tmp_path / "r") as repo:
        for i in range(10):
            repo.save(series(i), tag=f"s{i}")
        before = repo.stats().stored_bytes
        repo.forget(keep_last=3)
        report = repo.gc()
        after = repo.stats().stored_bytes
        assert report.bytes_freed == before - after > 0
        assert after == sum(p.stat().st_size for _, p in iter_pack_files(repo.path / "packs"))
        for i in (7, 8, 9):
            assert_same(repo.load(f"s{i}"), series(i))
        assert repo.verify(read_data=True).ok
        with init(tmp_path / "fresh") as fresh:
            for i in (7, 8, 9):
                fresh.save(series(i), tag=f"s{i}")
            assert after <= 1.10 * fresh.stats().stored_bytes
        again = repo.gc()
        assert again.bytes_freed == 0 and again.packs_deleted == 0 and again.dead_chunks == 0


def test_gc_keeps_everything_when_nothing_is_dead(repo: cas.Repository) -> None:
    repo.save(make_state(1), tag="a")
    repo.save(make_state(2), tag="b")
    before = repo_files(repo.path)
    report = repo.gc()
    assert report.bytes_freed == 0 and report.dead_chunks == 0
    assert {k: v for k, v in repo_files(repo.path).items() if k.startswith("packs/")} == {
        k: v for k, v in before.items() if k.startswith("packs/")
    }
    assert_same(repo.load("a"), make_state(1))


def test_gc_dry_run_changes_nothing(tmp_path: Path) -> None:
    with init(tmp_path / "r") as repo:
        for i in range(4):
            repo.save(series(i), tag=f"s{i}")
        repo.forget(keep_last=1)
        before = repo_files(repo.path)
        report = repo.gc(dry_run=True)
        assert report.dry_run and report.bytes_freed > 0 and report.dead_chunks > 0
        assert repo_files(repo.path) == before
        assert repo.gc().bytes_freed == report.bytes_freed


def test_gc_removes_crash_leftovers(tmp_path: Path) -> None:
    with init(tmp_path / "r") as repo:
        repo.save(series(0), tag="s0")
        (repo.path / "tmp" / "pack-1-dead.tmp").write_bytes(b"x" * 1000)
        # a sealed pack no index entry refers to (a save killed before its index commit)
        with init(tmp_path / "other") as other:
            other.save(series(5), tag="x")
            stray = next(p for _, p in iter_pack_files(other.path / "packs"))
        target = repo.path / "packs" / stray.parent.name / stray.name
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(stray.read_bytes())
        report = repo.gc()
        assert report.temp_files_deleted == 1 and report.orphan_packs_deleted == 1
        assert not target.exists() and not list((repo.path / "tmp").iterdir())
        assert_same(repo.load("s0"), series(0))


def test_gc_refuses_when_a_snapshot_is_unreadable(tmp_path: Path) -> None:
    with init(tmp_path / "r") as repo:
        repo.save(series(0), tag="s0")
        s1 = repo.save(series(1), tag="s1")
        repo.delete("s0")
        node_pack = repo.index.get(bytes.fromhex(s1.id)).pack_id  # the pack holding s1's snapshot node
        pack_path(repo.path / "packs", node_pack).unlink()
        before = repo_files(repo.path)
        with pytest.raises(cas.GcRefusedError, match="before deleting anything") as refused:
            repo.gc()
        assert "cas rm s1" in str(refused.value)  # it says what to do
        # no stored file changed (the index, a cache, was brought in line with the packs)
        assert {k: v for k, v in repo_files(repo.path).items() if not k.startswith("index/")} == {
            k: v for k, v in before.items() if not k.startswith("index/")
        }
        repo.delete("s1")  # a damaged snapshot can always be given up
        assert repo.gc().packs_deleted > 0


def test_repack_moves_live_chunks(tmp_path: Path) -> None:
    with cas.Repository.init(tmp_path / "r", chunk_size=32 * 1024, pack_size=4 << 20) as repo:
        # one big pack holding two snapshots' data; deleting one leaves it about half live
        repo.save({"a": torch.randn(200_000), "b": torch.randn(200_000)}, tag="ab")
        keep = {"a": repo.load("ab")["a"]}
        repo.save(keep, tag="a-only")
        repo.delete("ab")
        report = repo.gc(repack_below=0.6)
        assert report.packs_repacked >= 1 and report.packs_written >= 1
        assert report.bytes_freed > 600_000  # ~0.83 of 800 KB (byte-grouped float32)
        assert_same(repo.load("a-only"), keep)
        assert repo.verify(read_data=True).ok
        assert repo.gc(repack_below=0.6).packs_repacked == 0


def test_cli_forget_and_gc(tmp_path: Path) -> None:
    from tests.test_cli import run

    path = tmp_path / "r"
    with init(path) as repo:
        for i in range(5):
            repo.save(series(i), tag=f"s{i}", metadata={"step": i * 100, "metrics": {"loss": 5.0 - i}})
    out = run("forget", "--keep-last", "1", "--keep-every-steps", "200", "--dry-run", repo=path).stdout
    assert "keep" in out and "would remove 2" in out
    out = run("forget", "--keep-last", "1", "--keep-every-steps", "200", "--prune", repo=path).stdout
    assert "removed 2" in out and "gc freed" in out
    import json

    gc_json = json.loads(run("gc", "--json", repo=path).stdout)
    assert gc_json["bytes_freed"] == 0
    run("forget", "--keep-last", "1", "--save-policy", "--dry-run", repo=path)
    with cas.Repository.open(path) as repo:
        assert repo.retention_policy() is None  # a dry run stores nothing either
    run("forget", "--keep-last", "1", "--save-policy", repo=path)
    with cas.Repository.open(path) as repo:
        assert repo.retention_policy() == cas.RetentionPolicy(keep_last=1)
    run("index", "rebuild", repo=path)
    assert "ok" in run("verify", "--read-data", repo=path).stdout


def test_gc_never_loses_a_pack_it_would_rewrite_identically(tmp_path: Path) -> None:
    # small compressible chunks: per-record overhead dominates, the pack looks sparse by payload bytes
    with cas.Repository.init(tmp_path / "z", chunk_size=4096) as repo:
        sd = {"w": torch.zeros(1 << 16)}
        repo.save(sd, tag="z")
        report = repo.gc()
        assert report.packs_repacked == 0 and report.bytes_freed == 0  # fully live: never rewritten
        assert_same(repo.load("z"), sd)
        repo.gc()
        assert repo.verify(read_data=True).ok
    with cas.Repository.init(tmp_path / "r", chunk_size=4096) as repo:
        sd = {"w": torch.randn(50_000)}
        repo.save(sd, tag="r")
        repo.gc(repack_below=1.0)  # even asked to repack everything, the live data survives
        assert_same(repo.load("r"), sd)
        assert repo.verify(read_data=True).ok
        assert repo.gc(repack_below=1.0).packs_repacked == 0
