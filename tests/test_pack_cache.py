"""The local pack cache of remote repositories (cas/packcache.py) and the batched restore reads."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import botocore.client
import pytest
import torch

import cas
from tests.backends.moto_server import MotoServer
from tests.helpers import assert_same

KEY_ID = SECRET = "testing"


@pytest.fixture
def s3_url(moto_server: MotoServer, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    for k, v in {"AWS_ENDPOINT_URL": moto_server.endpoint, "AWS_ACCESS_KEY_ID": KEY_ID,
                 "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
                 "CAS_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(k, v)
    return f"s3://{s3_bucket}/pc"


@pytest.fixture
def gets(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """GetObject calls of every botocore client, by key suffix (.pack / .meta / other)."""
    counts: collections.Counter[str] = collections.Counter()
    original = botocore.client.BaseClient._make_api_call

    def counting(client: Any, operation: str, params: dict[str, Any]) -> Any:
        if operation == "GetObject":
            key = str(params.get("Key", ""))
            counts[".pack" if key.endswith(".pack") else ".meta" if key.endswith(".meta") else "other"] += 1
        return original(client, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", counting)
    return counts


def series(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(64, 1024, generator=g) for i in range(6)}


def step(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    out["w0"] = sd["w0"] + 1e-3 * torch.randn(sd["w0"].shape, generator=g)
    return out


def cached_packs(repo: cas.Repository) -> list[Path]:
    return sorted((repo.path / "pack-cache").glob("*.pack"))


def test_saves_keep_their_packs_and_reads_come_from_them(s3_url: str, gets: collections.Counter[str]) -> None:
    sd0 = series(1)
    sd1 = step(sd0, 2)
    with cas.Repository.init(s3_url, chunk_size=64 * 1024) as repo:
        repo.save(sd0, "a")
        repo.save(sd1, "b")  # delta bases read from the cached packs of "a"
        assert cached_packs(repo)
    gets.clear()
    with cas.Repository.open(s3_url) as repo:
        assert_same(repo.load("b"), sd1)
        assert_same(repo.load("a"), sd0)
    assert gets[".pack"] == 0, f"a restore on the machine that saved read packs from the store: {gets}"


def test_a_damaged_cached_pack_is_dropped_and_read_from_the_store(s3_url: str, gets: collections.Counter[str]) -> None:
    sd0 = series(3)
    sd1 = step(sd0, 4)
    with cas.Repository.init(s3_url, chunk_size=64 * 1024) as repo:
        repo.save(sd0, "a")
        repo.save(sd1, "b")
        files = cached_packs(repo)
    for f in files:  # bit rot in every cached pack, past the header
        data = bytearray(f.read_bytes())
        for i in range(200, len(data) - 200, 4096):
            data[i] ^= 0xFF
        f.chmod(0o644)
        f.write_bytes(bytes(data))
    gets.clear()
    with cas.Repository.open(s3_url) as repo:
        assert_same(repo.load("b"), sd1)
        assert_same(repo.load("a"), sd0)
        assert gets[".pack"] > 0
        repo.verify()


def test_cache_off_and_a_fresh_cache_restore_with_few_requests(
    s3_url: str, gets: collections.Counter[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAS_PACK_CACHE_BYTES", "0")
    sd = series(5)
    states = [sd]
    with cas.Repository.init(s3_url, chunk_size=64 * 1024) as repo:
        repo.save(sd, "s0")
        for i in range(1, 4):
            sd = step(sd, 10 + i)
            states.append(sd)
            repo.save(sd, f"s{i}")
        assert not cached_packs(repo)
    monkeypatch.setenv("CAS_CACHE_DIR", str(tmp_path / "fresh"))
    gets.clear()
    with cas.Repository.open(s3_url) as repo:
        assert_same(repo.load("s3"), states[3])
        chunks = 6 * 4  # 24 chunks of 64 KiB in the snapshot, plus chain links
        packs = len(repo._store.list_packs())
    # batched: about one request per pack (links prefetched in one batch per pack), not one per chunk
    assert gets[".pack"] <= 2 * packs < chunks, (gets, packs)


def test_verify_and_check_judge_the_bucket_not_the_cached_copy(s3_url: str, s3_bucket: str, admin_client: Any) -> None:
    """A pack damaged in the bucket while this machine's cached copy is intact: a load here would
    succeed, every other machine's would fail; verify and check on this machine must say so."""
    sd0 = series(11)
    with cas.Repository.init(s3_url, chunk_size=64 * 1024) as repo:
        repo.save(sd0, "a")
        assert cached_packs(repo)
        key = next(o["Key"] for o in admin_client.list_objects_v2(Bucket=s3_bucket)["Contents"]
                   if o["Key"].endswith(".pack"))
        body = bytearray(admin_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
        body[len(body) // 3] ^= 0x01  # a payload byte: the size and footer still check
        admin_client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(body))
        assert_same(repo.load("a"), sd0)  # served from the intact cached copy
        report = repo.verify(read_data=True)
        assert not report.ok and any("does not match its hash" in p for p in map(str, report.problems)), report
        assert key.rsplit("/", 1)[-1].removesuffix(".pack") in repo.check().damaged_packs


@pytest.mark.parametrize("damage", ["flipped", "deleted"])
def test_check_repair_heals_the_bucket_from_this_machines_cached_copy(
    s3_url: str, s3_bucket: str, admin_client: Any, damage: str
) -> None:
    """No replica, but this machine's pack cache holds an intact copy of a pack the bucket lost or
    damaged: check --repair puts that copy back (checked first), and every snapshot loads again
    on any machine. Before, the chunks were written off as lost."""
    sd0, sd1 = series(12), series(13)
    with cas.Repository.init(s3_url, chunk_size=64 * 1024) as repo:
        repo.save(sd0, "a")
        repo.save(sd1, "b")
        key = next(o["Key"] for o in admin_client.list_objects_v2(Bucket=s3_bucket)["Contents"]
                   if o["Key"].endswith(".pack"))
        intact = admin_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        if damage == "flipped":
            body = bytearray(intact)
            body[len(body) // 3] ^= 0x01
            admin_client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(body))
        else:
            admin_client.delete_object(Bucket=s3_bucket, Key=key)
        assert not repo.check().ok
        report = repo.check(repair=True)
        assert [h["from"] for h in report.healed] == ["this machine's pack cache"], report.healed
        assert admin_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == intact
        assert repo.check().ok and repo.verify(read_data=True).ok
    with cas.Repository.open(s3_url) as other:  # as another machine: no cache
        other.store.pack_cache.budget = 0
        assert_same(other.load("a"), sd0)
        assert_same(other.load("b"), sd1)


def test_a_save_goes_on_after_the_cache_directory_was_removed(s3_url: str) -> None:
    """A cleaner removed this machine's cache directory while a job held the repository open: the
    next save makes its temp directory again (it failed as "free space", with space to spare)."""
    import shutil

    sd0, sd1 = series(14), series(15)
    with cas.Repository.init(s3_url, chunk_size=64 * 1024) as repo:
        repo.save(sd0, "a")
        shutil.rmtree(repo.path)
        repo.save(sd1, "b")
        assert [s.tag for s in repo.snapshots()] == ["a", "b"]
    with cas.Repository.open(s3_url) as again:
        assert_same(again.load("a"), sd0)
        assert_same(again.load("b"), sd1)
