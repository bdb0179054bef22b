"""Incremental saves skip BLAKE3 for chunks whose XXH3-128 fingerprint is unchanged since the
parent save (kept in memory by the process that made it, and left in ``fingerprints/`` for the
next process on the machine), and the stored result is exactly what a full re-hash gives."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import cas
import cas.fingerprints
import cas.saver
from tests.helpers import assert_same


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(300_000, generator=g), "b": torch.randn(200_000, generator=g).bfloat16(),
            "c": torch.arange(70_000)}


@pytest.fixture
def blake3_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = cas.saver.hash_bytes

    def counting(data: bytes | bytearray | memoryview) -> bytes:
        calls.append(len(memoryview(data).cast("B")))
        return real(data)

    monkeypatch.setattr(cas.saver, "hash_bytes", counting)
    return calls


def _chunk_ids(repo: cas.Repository, tag: str) -> list[bytes]:
    from cas.reach import reached_chunks

    return sorted(cid for cid, _ in reached_chunks(repo.reader, repo.store.read_ref(tag), tag))


def test_unchanged_chunks_are_not_rehashed_and_ids_match_a_fresh_process(
    tmp_path: Path, blake3_calls: list[int]
) -> None:
    sd = _state()
    with cas.Repository.init(tmp_path / "r", chunk_size=64 * 1024) as repo:
        repo.save(sd, tag="s0")
        full = sum(blake3_calls)
        assert full >= sum(t.numel() * t.element_size() for t in sd.values())
        blake3_calls.clear()
        sd["a"][123_456] += 1.0  # one chunk of "a" changes
        repo.save(sd, tag="s1")
        data_hashed = [n for n in blake3_calls if n == 64 * 1024]
        assert len(data_hashed) == 1  # only the changed chunk (plus the small manifest nodes)
        assert_same(repo.load("s1"), sd)
        assert repo.verify(read_data=True).ok
    # a fresh process on another machine (no fingerprint cache) hashes everything: the same chunk ids
    shutil.rmtree(tmp_path / "r" / "fingerprints")
    with cas.Repository.open(tmp_path / "r") as again:
        blake3_calls.clear()
        again.save(sd, tag="s2")
        assert sum(blake3_calls) >= full
        # same bytes, same ids: only the snapshot node (tag, time, parent) differs
        assert len(set(_chunk_ids(again, "s1")) ^ set(_chunk_ids(again, "s2"))) == 2


def _data_hashed(calls: list[int]) -> int:
    return sum(n for n in calls if n == 64 * 1024)


def test_a_reopened_repository_takes_the_fingerprints_its_last_save_left(tmp_path: Path,
                                                                         blake3_calls: list[int]) -> None:
    """The resume case: a new process's first save is a child of the save the last process made
    on this machine; only the changed chunk is BLAKE3-hashed, and the snapshot is what a full
    re-hash stores (same chunk ids), restoring bit for bit."""
    sd = _state()
    with cas.Repository.init(tmp_path / "r", chunk_size=64 * 1024) as repo:
        s0 = repo.save(sd, tag="s0")
    assert (tmp_path / "r" / "fingerprints" / f"{s0.id}.fp").is_file()
    sd["a"][7] += 1.0
    with cas.Repository.open(tmp_path / "r") as repo:
        blake3_calls.clear()
        repo.save(sd, tag="s1")
        assert _data_hashed(blake3_calls) == 64 * 1024  # the one changed chunk
        assert_same(repo.load("s1"), sd)
        repo.save(sd, tag="s1-rehashed", parent="s0", rehash=True)
        assert set(_chunk_ids(repo, "s1")) ^ set(_chunk_ids(repo, "s1-rehashed")) <= {
            bytes.fromhex(repo.resolve("s1").id), bytes.fromhex(repo.resolve("s1-rehashed").id)}
        assert repo.verify(read_data=True).ok


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage"])
def test_a_damaged_fingerprint_file_is_ignored(tmp_path: Path, blake3_calls: list[int], damage: str) -> None:
    sd = _state()
    with cas.Repository.init(tmp_path / "r", chunk_size=64 * 1024) as repo:
        s0 = repo.save(sd, tag="s0")
    path = tmp_path / "r" / "fingerprints" / f"{s0.id}.fp"
    data = bytearray(path.read_bytes())
    if damage == "flip":  # a fingerprint's bit: caught by the checksum
        data[len(cas.fingerprints.MAGIC) + 8 + 40] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) - 9]
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"not a fingerprint file" * 3)
    path.write_bytes(bytes(data))
    sd["a"][7] += 1.0
    with cas.Repository.open(tmp_path / "r") as repo:
        blake3_calls.clear()
        repo.save(sd, tag="s1")
        assert _data_hashed(blake3_calls) >= sum(t.nbytes for t in sd.values()) - 64 * 1024  # all of it
        assert_same(repo.load("s1"), sd)


def test_the_fingerprint_cache_keeps_the_newest_files(tmp_path: Path) -> None:
    sd = _state()
    with cas.Repository.init(tmp_path / "r", chunk_size=64 * 1024) as repo:
        ids = []
        for i in range(cas.fingerprints.KEEP + 3):
            sd["c"][i] += 1
            ids.append(repo.save(sd, tag=f"s{i}").id)
    kept = sorted(p.stem for p in (tmp_path / "r" / "fingerprints").iterdir())
    assert kept == sorted(ids[-cas.fingerprints.KEEP:])


def test_a_remote_repository_keeps_its_fingerprints_in_the_cache_dir(tmp_path: Path, blake3_calls: list[int],
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    moto_server: Any, s3_bucket: str) -> None:
    for k, v in {"AWS_ENDPOINT_URL": moto_server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                 "CAS_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(k, v)
    url = f"s3://{s3_bucket}/fp"
    sd = _state()
    with cas.Repository.init(url, chunk_size=64 * 1024) as repo:
        s0 = repo.save(sd, tag="s0")
        local = repo.store.local_dir
    assert (local / "fingerprints" / f"{s0.id}.fp").is_file()
    assert str(tmp_path / "cache") in str(local)
    sd["a"][7] += 1.0
    with cas.Repository.open(url) as repo:
        blake3_calls.clear()
        repo.save(sd, tag="s1")
        assert _data_hashed(blake3_calls) == 64 * 1024
        assert_same(repo.load("s1"), sd)


def test_fingerprints_apply_only_to_children_of_the_snapshot_they_came_from(tmp_path: Path,
                                                                           blake3_calls: list[int]) -> None:
    sd = _state()
    with cas.Repository.init(tmp_path / "r", chunk_size=64 * 1024) as repo:
        repo.save(sd, tag="s0")
        repo.save(_state(seed=1), tag="other")
        blake3_calls.clear()
        repo.save(sd, tag="child-of-s0", parent="s0")  # the last save's fingerprints are of "other":
        assert _data_hashed(blake3_calls) == 0  # those of s0 come from the file s0's save left
        assert_same(repo.load("child-of-s0"), sd)
        shutil.rmtree(tmp_path / "r" / "fingerprints")
        repo.save(_state(seed=1), tag="other-2", parent="other")
        blake3_calls.clear()
        repo.save(sd, tag="child-of-s0-again", parent="s0")  # neither memory nor file holds s0's
        assert _data_hashed(blake3_calls) >= sum(t.nbytes for t in sd.values()) - 64 * 1024
        assert_same(repo.load("child-of-s0-again"), sd)


def test_rehash_hashes_everything(tmp_path: Path, blake3_calls: list[int]) -> None:
    sd = _state()
    with cas.Repository.init(tmp_path / "r", chunk_size=64 * 1024) as repo:
        repo.save(sd, tag="s0")
        blake3_calls.clear()
        repo.save(sd, tag="s1", rehash=True)
        assert sum(blake3_calls) >= sum(t.nbytes for t in sd.values())
