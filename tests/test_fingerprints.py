"""Incremental saves skip BLAKE3 for chunks whose XXH3-128 fingerprint is unchanged since the
previous save in this process, and the stored result is exactly what a full re-hash gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cas
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
    # a fresh process (fresh Repository object) hashes everything and gets the same chunk ids
    with cas.Repository.open(tmp_path / "r") as again:
        blake3_calls.clear()
        again.save(sd, tag="s2")
        assert sum(blake3_calls) >= full
        # same bytes, same ids: only the snapshot node (tag, time, parent) differs
        assert len(set(_chunk_ids(again, "s1")) ^ set(_chunk_ids(again, "s2"))) == 2


def test_fingerprints_apply_only_to_children_of_the_last_save(tmp_path: Path, blake3_calls: list[int]) -> None:
    sd = _state()
    with cas.Repository.init(tmp_path / "r", chunk_size=64 * 1024) as repo:
        repo.save(sd, tag="s0")
        repo.save(_state(seed=1), tag="other")
        blake3_calls.clear()
        repo.save(sd, tag="child-of-s0", parent="s0")  # the last save's fingerprints are of "other"
        assert sum(n for n in blake3_calls if n == 64 * 1024) >= sum(t.nbytes for t in sd.values()) - 64 * 1024
        assert_same(repo.load("child-of-s0"), sd)


def test_rehash_hashes_everything(tmp_path: Path, blake3_calls: list[int]) -> None:
    sd = _state()
    with cas.Repository.init(tmp_path / "r", chunk_size=64 * 1024) as repo:
        repo.save(sd, tag="s0")
        blake3_calls.clear()
        repo.save(sd, tag="s1", rehash=True)
        assert sum(blake3_calls) >= sum(t.nbytes for t in sd.values())
