from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
import torch

import cas
from cas.ids import SnapshotId, chunk_id_of
from cas.index import SealedPack
from cas.pack import ChunkKind, PackWriter, pack_path
from tests.helpers import assert_same, make_state, repo_files


def test_clean_repository_verifies(repo: cas.Repository) -> None:
    repo.save(make_state(1), tag="a")
    repo.save(make_state(2), tag="b")
    for read_data in (False, True):
        report = repo.verify(read_data=read_data)
        assert report.ok and report.problems == []
        assert report.snapshots_checked == 2 and report.chunks_checked > 8 and report.packs_checked >= 2


def test_flipped_byte_is_found_and_named(repo: cas.Repository) -> None:
    sd = {"enc.weight": torch.randn(16384), "dec.weight": torch.randn(16384)}  # one 64 KiB chunk each
    repo.save(sd, tag="step-1")
    repo.save({"other": torch.ones(10)}, tag="step-2")
    enc_id = chunk_id_of(sd["enc.weight"].numpy().tobytes())
    loc = repo.index.get(enc_id)
    path = pack_path(repo.path / "packs", loc.pack_id)
    data = bytearray(path.read_bytes())
    data[loc.offset + 1234] ^= 0x01
    path.write_bytes(bytes(data))

    assert repo.verify(read_data=False).ok  # structure is intact; only reading data finds bit rot
    report = repo.verify(read_data=True)
    assert not report.ok
    chunk_problems = [p for p in report.problems if p.kind == "corrupt-chunk"]
    assert len(chunk_problems) == 1
    p = chunk_problems[0]
    assert p.tensor == "enc.weight" and "step-1" in p.snapshot and p.pack == loc.pack_id.hex()
    assert all(q.kind == "corrupt-chunk" for q in report.problems)  # the footer is intact
    with pytest.raises(cas.ChunkCorruptError, match=r"snapshot [0-9a-f]+, tensor enc\.weight.*pack"):
        repo.load("step-1")
    assert repo.load("step-2")["other"].sum() == 10  # other snapshots still load


def test_missing_pack_is_named(repo: cas.Repository) -> None:
    repo.save({"w": torch.randn(1000)}, tag="a")
    loc = next(loc for _cid, loc in repo.index.iter_chunks() if loc.kind == ChunkKind.DATA)
    pack_path(repo.path / "packs", loc.pack_id).unlink()
    report = repo.verify()
    kinds = {p.kind for p in report.problems}
    assert "missing-pack" in kinds
    # the pack also held the manifest nodes, so the snapshot itself is unreadable
    assert any(p.snapshot and "a" in p.snapshot for p in report.problems)
    with pytest.raises(cas.CorruptionError):
        repo.load("a")


def test_missing_data_pack_names_tensor(tmp_path: Path) -> None:
    # Two saves: the second only adds manifest nodes (in their own pack) and reuses the first's data.
    with cas.Repository.init(tmp_path / "r", chunk_size=4096, pack_size=8192) as repo:
        repo.save({"w": torch.randn(4096)}, tag="a")  # 16 KiB: data spans packs
        victims = {loc.pack_id for _c, loc in repo.index.iter_chunks() if loc.kind == ChunkKind.DATA}
        node_packs = {loc.pack_id for _c, loc in repo.index.iter_chunks() if loc.kind == ChunkKind.NODE}
        victim = next(iter(victims - node_packs))
        pack_path(repo.path / "packs", victim).unlink()
        report = repo.verify()
        assert not report.ok
        missing = [p for p in report.problems if p.kind == "missing-chunk"]
        assert missing and all(p.tensor == "w" and p.pack == victim.hex() for p in missing)
        with pytest.raises(cas.MissingChunkError, match="tensor w"):
            repo.load("a")


def test_truncated_pack_gives_typed_error(tmp_path: Path) -> None:
    with cas.Repository.init(tmp_path / "r", chunk_size=4096, pack_size=8192) as repo:
        repo.save({"w": torch.randn(4096)}, tag="a")
        node_packs = {loc.pack_id for _c, loc in repo.index.iter_chunks() if loc.kind == ChunkKind.NODE}
        data_packs = {loc.pack_id for _c, loc in repo.index.iter_chunks() if loc.kind == ChunkKind.DATA} - node_packs
        path = pack_path(repo.path / "packs", next(iter(data_packs)))
        path.write_bytes(path.read_bytes()[:100])
        report = repo.verify()
        assert any(p.kind == "corrupt-pack" for p in report.problems)
        assert any(p.kind == "missing-chunk" and p.tensor == "w" for p in report.problems)
        with pytest.raises(cas.CorruptionError, match="tensor w"):
            repo.load("a")


def _plant_node(repo: cas.Repository, node: bytes, ref: str) -> None:
    writer = PackWriter(repo.path / "tmp" / "planted.tmp")
    cid = chunk_id_of(node)
    entry = writer.add(cid, ChunkKind.NODE, 0, node, len(node))
    pack_id, path = writer.seal(repo.path / "packs")
    repo.index.commit([SealedPack(pack_id, path.stat().st_size, [entry])])
    (repo.path / "refs" / ref).write_text(SnapshotId(cid).hex() + "\n")


def test_garbage_manifest_is_a_typed_error(repo: cas.Repository) -> None:
    repo.save(make_state(1), tag="good")
    _plant_node(repo, b"\xc1 this is not msgpack", "garbage")
    with pytest.raises(cas.ManifestCorruptError, match="does not decode"):
        repo.load("garbage")
    _plant_node(repo, msgpack.packb({"v": 1, "type": "snapshot", "tree": b"short"}), "malformed")
    with pytest.raises(cas.ManifestCorruptError, match="malformed"):
        repo.load("malformed")
    _plant_node(repo, msgpack.packb({"v": 9, "type": "snapshot"}), "future")
    with pytest.raises(cas.FormatVersionError, match="version 9"):
        repo.load("future")
    report = repo.verify()
    bad = sorted(p.snapshot.split(" ")[0] for p in report.problems if p.kind == "corrupt-manifest")
    assert bad == ["future", "garbage", "malformed"]
    assert_same(repo.load("good"), make_state(1))


def test_damaged_ref(repo: cas.Repository) -> None:
    repo.save({"a": 1}, tag="x")
    (repo.path / "refs" / "x").write_text("not an id\n")
    with pytest.raises(cas.ManifestCorruptError, match="ref 'x' is damaged"):
        repo.load("x")
    assert [p.kind for p in repo.verify().problems] == ["damaged-ref"]


def test_verify_changes_nothing(repo: cas.Repository) -> None:
    repo.save(make_state(1), tag="a")
    before = repo_files(repo.path)
    repo.verify(read_data=True)
    assert repo_files(repo.path) == before
