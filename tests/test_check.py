from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

import cas
from cas.ids import chunk_id_of
from cas.pack import TRAILER, pack_path, read_footer
from tests.helpers import assert_same


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"enc": torch.randn(8192, generator=g), "dec": torch.randn(8192, generator=g)}  # one 32 KiB chunk each


@pytest.fixture
def repo(tmp_path: Path) -> cas.Repository:
    r = cas.Repository.init(tmp_path / "r", chunk_size=32 * 1024, pack_size=1 << 20)
    yield r
    r.close()


def flip(repo: cas.Repository, tensor: torch.Tensor, at: int = 100) -> Path:
    loc = repo.index.get(chunk_id_of(tensor.numpy().tobytes()))
    path = pack_path(repo.path / "packs", loc.pack_id)
    data = bytearray(path.read_bytes())
    data[loc.offset + at] ^= 0x10
    path.write_bytes(bytes(data))
    return path


def test_clean_check(repo: cas.Repository) -> None:
    repo.save(state(), tag="a")
    report = repo.check()
    assert report.ok and report.packs_checked >= 1 and not report.affected


def test_check_repair_salvages_and_names_what_was_lost(repo: cas.Repository) -> None:
    sd = state()
    repo.save(sd, tag="a")
    repo.save({"other": torch.ones(100)}, tag="b")
    damaged = flip(repo, sd["enc"])
    report = repo.check()
    assert not report.ok and report.damaged_packs == [damaged.stem]
    assert len(report.lost_chunks) == 1
    assert [a["tensor"] for a in report.affected] == ["enc"] and "a" in report.affected[0]["snapshot"]
    assert damaged.exists()  # without --repair nothing moves

    report = repo.check(repair=True)
    assert report.salvaged_chunks >= 1  # dec (the manifest nodes of "a" live in a .meta pack of their own)
    assert not damaged.exists() and (repo.path / "quarantine" / damaged.name).exists()
    assert [s.tag for s in repo.snapshots()] == ["a", "b"]  # never drops a snapshot
    verify = repo.verify(read_data=True)
    assert {(p.kind, p.tensor) for p in verify.problems} == {("missing-chunk", "enc")}
    with pytest.raises(cas.MissingChunkError, match="tensor enc"):
        repo.load("a")
    assert repo.load("b")["other"].sum() == 100
    # saving the same bytes again writes the lost chunk anew: snapshot "a" heals
    repo.save(sd, tag="a-again")
    assert_same(repo.load("a"), sd)
    assert repo.verify(read_data=True).ok
    assert repo.check().ok


def test_repair_of_a_pack_with_a_damaged_footer(repo: cas.Repository) -> None:
    sd = state()
    repo.save(sd, tag="a")
    loc = repo.index.get(chunk_id_of(sd["enc"].numpy().tobytes()))
    path = pack_path(repo.path / "packs", loc.pack_id)
    records = len(read_footer(path))
    data = bytearray(path.read_bytes())
    footer_offset = struct.unpack_from("<Q", data, len(data) - TRAILER.size)[0]
    data[footer_offset + 3] ^= 0xFF  # footer checksum now fails: records are found by scanning
    path.write_bytes(bytes(data))
    report = repo.check(repair=True)
    assert report.damaged_packs == [path.stem] and report.lost_chunks == [] and report.salvaged_chunks == records
    assert report.affected == []
    assert_same(repo.load("a"), sd)
    assert repo.verify(read_data=True).ok


def test_cli_check_exit_codes(tmp_path: Path) -> None:
    from tests.test_cli import run

    path = tmp_path / "r"
    with cas.Repository.init(path, chunk_size=32 * 1024) as repo:
        sd = state()
        repo.save(sd, tag="a")
        assert "0 damaged" in run("check", repo=path).stdout
        flip(repo, sd["dec"])
    proc = run("check", repo=path, ok=False)
    assert proc.returncode == 1 and "affected: snapshot a" in proc.stdout and "tensor dec" in proc.stdout
    proc = run("check", "--repair", repo=path, ok=False)
    assert proc.returncode == 1 and "(repaired)" in proc.stdout
