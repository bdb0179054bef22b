"""One suite of repository behaviour run on a local directory and on S3 (moto's server, a real
process on 127.0.0.1): round trips, dedup measured in stored bytes, gc, check and repair, tags
as create-only / compare-and-swap writes, a fresh cache, the CLI, and a saver killed mid-upload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import cas
from cas.backends import open_backend
from cas.ids import PackId
from cas.layout import BackendSource
from cas.pack import read_footer
from tests.backends.moto_server import MotoServer
from tests.helpers import assert_same

CHUNK = 64 * 1024
KEY_ID = SECRET = "testing"


def s3_env(server: MotoServer, cache: Path) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_REGION": "us-east-1", "CAS_CACHE_DIR": str(cache)}


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A repository URL: a directory, or s3://BUCKET/PREFIX on a fresh bucket (env set for the client)."""
    if request.param == "local":
        yield str(tmp_path / "repo")
        return
    server: MotoServer = request.getfixturevalue("moto_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    for k, v in s3_env(server, tmp_path / "cache").items():
        monkeypatch.setenv(k, v)
    yield f"s3://{bucket}/run7"


def stored_objects(url: str) -> dict[str, int]:
    """Every object of the repository and its size, as the store lists them."""
    with open_backend(url, {"create": False} if "://" not in url else None) as backend:
        return {o.key: o.size for o in backend.list("")}


def pack_bytes(url: str) -> int:
    return sum(size for key, size in stored_objects(url).items() if key.startswith("packs/"))


def state(seed: int, n: int = 200_000) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "b": torch.arange(5000, dtype=torch.int64), "step": seed}


def test_round_trip_dedup_and_verify(where: str) -> None:
    with cas.Repository.init(where, chunk_size=CHUNK, pack_size=1 << 20) as repo:
        first = state(1)
        repo.save(first, tag="a")
        after_first = pack_bytes(where)
        again = repo.save(first, tag="a2")  # the same tensors: only new manifest nodes
        assert again.bytes_added < 2048
        # what the store grew by: the recorded bytes plus the snapshot node's own small pack
        assert 0 < pack_bytes(where) - after_first - again.bytes_added < 1024
        changed = state(1)
        changed["w"][:1000] += 1.0
        repo.save(changed, tag="b")
        assert pack_bytes(where) - after_first < 200 * 1024  # one changed chunk of 782 KiB of floats
        assert_same(repo.load("a"), first)
        assert_same(repo.load("b"), changed)
        report = repo.verify(read_data=True)
        assert report.ok and report.snapshots_checked == 3
        assert [s.tag for s in repo.snapshots()] == ["a", "a2", "b"]


def test_gc_frees_bytes_in_the_store(where: str) -> None:
    with cas.Repository.init(where, chunk_size=CHUNK, pack_size=256 * 1024) as repo:
        for i in range(4):
            repo.save(state(i), tag=f"s{i}")
        before = pack_bytes(where)
        repo.forget(keep_last=1)
        report = repo.gc()
        assert report.packs_deleted > 0 and report.bytes_freed > 0
        assert before - pack_bytes(where) == report.bytes_freed
        assert_same(repo.load("s3"), state(3))
        assert repo.verify(read_data=True).ok
        # lock objects (remote repositories) go with their holder
        assert not any(k.startswith("locks/") and k.endswith(".json") for k in stored_objects(where))


def test_a_new_tag_is_created_by_exactly_one_save(where: str) -> None:
    with cas.Repository.init(where, chunk_size=CHUNK) as setup:
        setup.save(state(0), tag="base")
    outcomes: list[str] = []
    barrier = threading.Barrier(4, timeout=120)  # a thread that dies before it must not hang the others

    def save(i: int) -> None:
        try:
            with cas.Repository.open(where) as repo:
                barrier.wait()
                try:
                    repo.save(state(100 + i, 20_000), tag="race")
                    outcomes.append(f"won {i}")
                except cas.TagExistsError:
                    outcomes.append("lost")
        except BaseException as exc:  # noqa: BLE001 - shows in the assertion below
            outcomes.append(f"error {exc!r}")
            barrier.abort()

    threads = [threading.Thread(target=save, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.split()[0] for o in outcomes) == ["lost", "lost", "lost", "won"], outcomes
    winner = int(next(o for o in outcomes if o.startswith("won")).split()[1])
    with cas.Repository.open(where) as repo:
        assert_same(repo.load("race"), state(100 + winner, 20_000))


def test_moving_a_tag_is_a_compare_and_swap(where: str) -> None:
    with cas.Repository.init(where, chunk_size=CHUNK) as repo:
        repo.save(state(1, 10_000), tag="latest-good")
        repo.save(state(2, 10_000), tag="latest-good", replace=True)
        assert_same(repo.load("latest-good"), state(2, 10_000))
        other = repo.save(state(3, 10_000), tag="other")
        store = repo.store
        version = store.ref_version("latest-good")
        sid = cas.ids.SnapshotId.from_hex(other.id)
        store.write_ref("latest-good", sid, if_version=version)  # unchanged since read: the swap happens
        with pytest.raises(cas.TagExistsError, match="moved by another save"):
            store.write_ref("latest-good", sid, if_version=version)  # stale version: refused
        assert repo.resolve("latest-good").id == other.id


def test_fresh_cache_or_lost_index_lists_restores_and_verifies(where: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with cas.Repository.init(where, chunk_size=CHUNK, pack_size=256 * 1024) as repo:
        repo.save(state(1), tag="a")
        repo.save(state(2), tag="b")
        index_dir = repo.store.index_dir
    if where.startswith("s3://"):
        monkeypatch.setenv("CAS_CACHE_DIR", str(tmp_path / "empty-cache"))  # another machine
    else:
        for f in index_dir.iterdir():
            f.unlink()
    with cas.Repository.open(where) as repo:
        assert [s.tag for s in repo.snapshots()] == ["a", "b"]
        assert_same(repo.load("b"), state(2))
        assert repo.verify(read_data=True).ok
        if where.startswith("s3://"):
            assert str(tmp_path / "empty-cache") in str(repo.store.index_dir)


def flip_byte_in_pack(url: str, offset_from_end: int) -> str:
    with open_backend(url, {"create": False} if "://" not in url else None) as backend:
        key = next(k for k in (o.key for o in backend.list("packs/")))
        data = bytearray(backend.read(key))
        data[len(data) - offset_from_end] ^= 0x01
        backend.write(key, bytes(data))
        return key


def test_check_repairs_a_damaged_pack_in_the_store(where: str) -> None:
    with cas.Repository.init(where, chunk_size=CHUNK, pack_size=4 << 20) as repo:
        repo.save(state(1), tag="a")
    key = flip_byte_in_pack(where, 64 + 96 + 5)  # inside the last footer entry: the footer no longer checks
    with cas.Repository.open(where) as repo:
        report = repo.check(repair=True)
        if "://" in where:  # this machine wrote the pack: its cached copy is put back (checked first)
            assert [h["from"] for h in report.healed] == ["this machine's pack cache"], report
        else:  # salvaged from what in it still verifies
            assert report.damaged_packs, report
        assert not report.lost_chunks and report.changed
        assert_same(repo.load("a"), state(1))
        assert repo.verify(read_data=True).ok
    objects = stored_objects(where)
    assert f"quarantine/{key.rsplit('/', 1)[1]}" in objects  # the damaged copy is kept
    with open_backend(where, {"create": False} if "://" not in where else None) as backend:
        # the salvaged pack came out byte-identical to the undamaged original, under the same name
        pack_id = PackId.from_hex(key.rsplit("/", 1)[1][:64])
        assert read_footer(BackendSource(backend, pack_id, key=key), pack_id)


def test_cli_on_the_store(where: str, tmp_path: Path) -> None:
    env = {**os.environ}
    cas_cli = [sys.executable, "-m", "cas.cli", "--repo", where]
    init = subprocess.run([*cas_cli, "init", "--chunk-size", "64K"], env=env, capture_output=True, text=True,
                          check=False)
    assert init.returncode == 0, init.stderr
    ckpt = tmp_path / "model.pt"
    torch.save({"w": torch.arange(50_000, dtype=torch.float32)}, ckpt)
    saved = subprocess.run([*cas_cli, "save", str(ckpt), "--tag", "m"], env=env, capture_output=True, text=True,
                           check=False)
    assert saved.returncode == 0, saved.stderr
    ls = subprocess.run([*cas_cli, "ls", "--json"], env=env, capture_output=True, text=True, check=False)
    assert ls.returncode == 0 and '"tag": "m"' in ls.stdout, ls.stderr
    out = tmp_path / "back.pt"
    restored = subprocess.run([*cas_cli, "restore", "m", str(out)], env=env, capture_output=True, text=True,
                              check=False)
    assert restored.returncode == 0, restored.stderr
    assert torch.equal(torch.load(out)["w"], torch.arange(50_000, dtype=torch.float32))


def test_s3_errors_are_typed_one_liners_within_the_timeout(moto_server: MotoServer, tmp_path: Path) -> None:
    env = {**os.environ, **s3_env(moto_server, tmp_path / "cache")}
    missing = subprocess.run([sys.executable, "-m", "cas.cli", "--repo", "s3://no-such-bucket-here/x", "ls"],
                             env=env, capture_output=True, text=True, check=False, timeout=120)
    assert missing.returncode == 3, missing.stderr
    assert missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert "no-such-bucket-here" in missing.stderr
    closed = MotoServer().endpoint  # a port nothing listens on
    t0 = time.monotonic()
    unreachable = subprocess.run(
        [sys.executable, "-m", "cas.cli", "--repo", "s3://bucket/x", "--endpoint", closed, "--timeout", "2", "ls"],
        env={**env, "AWS_ENDPOINT_URL": closed}, capture_output=True, text=True, check=False, timeout=120,
    )
    assert unreachable.returncode == 3 and "Traceback" not in unreachable.stderr, unreachable.stderr
    assert unreachable.stderr.count("\n") == 1
    assert time.monotonic() - t0 < 60


SAVER = textwrap.dedent("""
    import sys, torch, cas
    repo = cas.Repository.open(sys.argv[1])
    g = torch.Generator().manual_seed(int(sys.argv[2]))
    print("start", flush=True)
    repo.save({"big": torch.randn(3_000_000, generator=g)}, tag="killed", compression="none")
    print("done", flush=True)
""")


def test_saver_killed_mid_upload_loses_nothing_and_gc_reclaims(where: str) -> None:
    with cas.Repository.init(where, chunk_size=CHUNK, pack_size=1 << 20) as repo:
        repo.save(state(1), tag="kept")
    for delay in (0.5, 1.5, 3.0):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, where, "7"], stdout=subprocess.PIPE, text=True,
                                env={**os.environ})
        assert proc.stdout is not None and proc.stdout.readline().strip() == "start"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        with cas.Repository.open(where) as repo:
            assert_same(repo.load("kept"), state(1))
            tags = [s.tag for s in repo.snapshots()]
            assert tags in (["kept"], ["kept", "killed"])
            if tags == ["kept", "killed"]:
                repo.delete("killed")
            repo.gc()
            assert set(repo.store.list_packs()) == _packs_reached(repo)
            assert repo.verify(read_data=True).ok


def _packs_reached(repo: cas.Repository) -> set[Any]:
    return {loc.pack_id for _cid, loc in repo.index.iter_chunks()}


CONCURRENT_SAVER = textwrap.dedent("""
    import json, sys, torch, cas
    url, worker, count, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    with cas.Repository.open(url) as repo:
        for i in range(count):
            seed = worker * 1000 + i
            g = torch.Generator().manual_seed(seed)
            repo.save({"w": torch.randn(40_000, generator=g), "shared": torch.arange(20_000.0)},
                      tag=f"w{worker}-{i}")
            with open(log, "a") as f:
                f.write(json.dumps({"tag": f"w{worker}-{i}", "seed": seed}) + "\\n")
""")

GC_LOOP = textwrap.dedent("""
    import json, os, sys, time, cas
    url, stop, log = sys.argv[1], sys.argv[2], sys.argv[3]
    with cas.Repository.open(url) as repo:
        while not os.path.exists(stop):  # until every saver returned, then once more
            report = repo.forget(keep_last=4)
            with open(log, "a") as f:
                f.write(json.dumps({"forgot": [s.ref for s in report.removed]}) + "\\n")
            repo.gc()
            time.sleep(0.5)
        report = repo.forget(keep_last=4)
        with open(log, "a") as f:
            f.write(json.dumps({"forgot": [s.ref for s in report.removed]}) + "\\n")
        repo.gc()
""")


def test_three_savers_and_a_gc_loop_share_one_repository(where: str, tmp_path: Path) -> None:
    """Several processes save while forget + gc run beside them (flock locally, lock objects on S3):
    every snapshot whose save returned and that forget did not remove restores bit-identically."""
    with cas.Repository.init(where, chunk_size=CHUNK, pack_size=256 * 1024):
        pass
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_SAVER, where, str(w), "5", str(logs / f"s{w}")],
                              env=env) for w in range(3)]
    gc_loop = subprocess.Popen([sys.executable, "-c", GC_LOOP, where, str(logs / "stop"), str(logs / "gc")], env=env)
    for p in procs:
        assert p.wait(timeout=600) == 0
    (logs / "stop").touch()
    assert gc_loop.wait(timeout=600) == 0
    saved = {}
    for w in range(3):
        for line in (logs / f"s{w}").read_text().splitlines():
            entry = json.loads(line)
            saved[entry["tag"]] = entry["seed"]
    forgotten = {t for line in (logs / "gc").read_text().splitlines() for t in json.loads(line)["forgot"]}
    assert len(saved) == 15 and forgotten, (len(saved), forgotten)
    with cas.Repository.open(where) as repo:
        present = {s.tag for s in repo.snapshots()}
        assert present == set(saved) - forgotten
        for tag in present:
            g = torch.Generator().manual_seed(saved[tag])
            assert_same(repo.load(tag), {"w": torch.randn(40_000, generator=g), "shared": torch.arange(20_000.0)})
        repo.gc()
        assert repo.verify(read_data=True).ok


def test_s3_server_frozen_mid_save_is_a_typed_error_and_nothing_half_visible(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The S3 server stops answering (SIGSTOP) in the middle of a save: the save fails with a typed
    StorageError within its timeout and retries, no snapshot of it is visible, and once the server
    answers again (SIGCONT) the repository is intact and the same save succeeds."""
    import boto3

    with MotoServer() as server:
        boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1", aws_access_key_id=KEY_ID,
                     aws_secret_access_key=SECRET).create_bucket(Bucket="frozen")
        for k, v in s3_env(server, tmp_path / "cache").items():
            monkeypatch.setenv(k, v)
        url = "s3://frozen/r"
        options = {"timeout": 2, "retry_attempts": 2, "retry_base_delay": 0.1, "retry_max_delay": 0.5}
        with cas.Repository.init(url, chunk_size=CHUNK, pack_size=256 * 1024, storage_options=options) as repo:
            repo.save(state(1), tag="before")
            big = {"w": torch.randn(2_000_000, generator=torch.Generator().manual_seed(9))}
            errors: list[BaseException] = []

            def save() -> None:
                try:
                    repo.save(big, tag="during", compression="none")
                except BaseException as exc:  # noqa: BLE001 - recorded and asserted below
                    errors.append(exc)

            saver = threading.Thread(target=save)
            saver.start()
            time.sleep(0.8)
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                saver.join(timeout=120)
                assert not saver.is_alive(), "the save hung on a frozen server"
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            if errors:  # the usual case; a save that finished before the freeze is fine too
                assert isinstance(errors[0], cas.StorageError), repr(errors[0])
                assert "Traceback" not in str(errors[0])
                assert not repo.store.has_ref("during")
            assert [s.tag for s in repo.snapshots()] in (["before"], ["before", "during"])
            assert_same(repo.load("before"), state(1))
            if not repo.store.has_ref("during"):
                repo.save(big, tag="during", compression="none")
            assert_same(repo.load("during"), big)
            repo.gc()
            assert repo.verify(read_data=True).ok


def test_a_fresh_cache_reads_index_objects_not_every_pack(moto_server: MotoServer, s3_bucket: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """On S3 each save stores the footers of its packs in one index object: a machine with an empty
    cache reads those (one GET per save) and no pack footer; gc folds them into one."""
    for k, v in s3_env(moto_server, tmp_path / "cache").items():
        monkeypatch.setenv(k, v)
    url = f"s3://{s3_bucket}/run7"
    with cas.Repository.init(url, chunk_size=CHUNK, pack_size=128 * 1024) as repo:
        for i in range(3):
            repo.save(state(i), tag=f"s{i}")
        packs = len(repo.store.list_packs())
    assert packs >= 6
    assert sum(k.startswith("indexes/") for k in stored_objects(url)) == 3
    monkeypatch.setenv("CAS_CACHE_DIR", str(tmp_path / "empty"))
    reads: list[str] = []
    from cas.backends.base import Backend

    original = Backend.read_range

    def counting(self: Backend, key: str, offset: int, length: int) -> bytes:
        reads.append(key)
        return original(self, key, offset, length)

    monkeypatch.setattr(Backend, "read_range", counting)
    with cas.Repository.open(url) as repo:
        assert [s.tag for s in repo.snapshots()] == ["s0", "s1", "s2"]
        footer_reads = [k for k in reads if k.startswith("packs/")]
        # no footer was read from a pack (only the snapshot nodes' records, to list them)
        assert len(footer_reads) <= 3, footer_reads
        assert_same(repo.load("s2"), state(2))
        repo.forget(keep_last=1)
        repo.gc()
        assert sum(k.startswith("indexes/") for k in stored_objects(url)) == 1
    monkeypatch.setenv("CAS_CACHE_DIR", str(tmp_path / "empty-again"))
    with cas.Repository.open(url) as repo:
        assert_same(repo.load("s2"), state(2))
        assert repo.verify(read_data=True).ok


def test_a_cold_delta_restore_requests_each_pack_once(moto_server: MotoServer, s3_bucket: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """From an empty cache, a snapshot whose changed chunks are delta links on an earlier one reads
    each pack in one request: the links below the deltas ride with the reads of their own pack
    (fetched apart, a keyframe pack would be requested twice). Damage in a link's pack is a typed
    error naming the tensor, and a read of the store's good copy afterwards still restores."""
    for k, v in s3_env(moto_server, tmp_path / "cache").items():
        monkeypatch.setenv(k, v)
    url = f"s3://{s3_bucket}/deltas"
    g = torch.Generator().manual_seed(5)
    base = {f"w{i}": torch.randn(60_000, generator=g) for i in range(6)}
    nxt = {k: (v + 1e-3 * torch.randn(v.shape, generator=g)) if k in ("w1", "w4") else v.clone()
           for k, v in base.items()}
    with cas.Repository.init(url, chunk_size=CHUNK, pack_size=1 << 20) as repo:
        repo.save(base, tag="base")
        snap = repo.save(nxt, tag="next")
        assert snap.bytes_added < 0.8 * sum(t.numel() * 4 for k, t in nxt.items() if k in ("w1", "w4"))  # deltas
    from cas.layout import Store

    calls: list[tuple[str, str]] = []
    ranges_of, range_of = Store.read_pack_ranges, Store.read_pack_range

    def counting_ranges(self: Store, pack_id: PackId, ranges: list[tuple[int, int]]) -> list[bytes]:
        calls.append(("ranges", pack_id.hex()))
        return ranges_of(self, pack_id, ranges)

    def counting_range(self: Store, pack_id: PackId, offset: int, length: int) -> bytes:
        calls.append(("range", pack_id.hex()))
        return range_of(self, pack_id, offset, length)

    monkeypatch.setattr(Store, "read_pack_ranges", counting_ranges)
    monkeypatch.setattr(Store, "read_pack_range", counting_range)
    monkeypatch.setenv("CAS_CACHE_DIR", str(tmp_path / "cold"))
    with cas.Repository.open(url) as repo:
        calls.clear()
        assert_same(repo.load("next"), nxt)
        data = [(kind, p) for kind, p in calls
                if not repo.store.pack_key_of(PackId(bytes.fromhex(p))).endswith(".meta")]  # the tree's node
        tensor_packs = [p for kind, p in data if kind == "ranges"]
        assert not [c for c in data if c[0] == "range"], calls  # no link read on its own
        assert len(tensor_packs) == len(set(tensor_packs)) >= 2, calls  # the keyframe pack(s) and the new one(s)

    # fetch-ahead bounded to one job at a time (each fetch waits for the decodes before it)
    monkeypatch.setattr("cas.reader.FETCH_AHEAD_BYTES", 1)
    monkeypatch.setenv("CAS_CACHE_DIR", str(tmp_path / "cold-bounded"))
    with cas.Repository.open(url) as repo:
        assert_same(repo.load("next"), nxt)
        assert_same(repo.load("base"), base)
    monkeypatch.undo()
    for k, v in s3_env(moto_server, tmp_path / "cache").items():
        monkeypatch.setenv(k, v)

    # rot a byte inside the keyframe chunks of w1 (a link of the delta snapshot), in the bucket
    with open_backend(url) as backend:
        keys = sorted(o.key for o in backend.list("packs/") if not o.key.endswith(".meta"))
        originals = {k: backend.read(k) for k in keys}
        first = keys[0] if len(keys) == 1 else max(keys, key=lambda k: len(originals[k]))
        data = bytearray(originals[first])
        data[len(data) // 3] ^= 0x40
        backend.write(first, bytes(data))
    monkeypatch.setenv("CAS_CACHE_DIR", str(tmp_path / "cold-again"))
    with cas.Repository.open(url) as repo, pytest.raises(cas.ChunkCorruptError, match=r"snapshot \w+, tensor w\d"):
        repo.load("next")
    with open_backend(url) as backend:
        backend.write(first, originals[first])
    monkeypatch.setenv("CAS_CACHE_DIR", str(tmp_path / "cold-third"))
    with cas.Repository.open(url) as repo:
        assert_same(repo.load("next"), nxt)


def rot_chunk_in_store(url: str, repo: cas.Repository, chunk_id: bytes, at: int = 100) -> tuple[str, int]:
    """Flip one byte of a chunk's payload in the store's copy of its pack (and forget this machine's
    cached copy, which did not rot); returns the pack key and the payload offset."""
    loc = repo.index.get(chunk_id)
    assert loc is not None
    return rot_copy(url, repo, loc.pack_id, loc.offset, at), loc.offset


def rot_copy(url: str, repo: cas.Repository, pack_id: PackId, offset: int, at: int = 100) -> str:
    key = repo.store.pack_key_of(pack_id)
    with open_backend(url, {"create": False} if "://" not in url else None) as backend:
        data = bytearray(backend.read(key))
        data[offset + at] ^= 0x10
        backend.write(key, bytes(data))
    repo.store.drop_cached(pack_id)
    return key


def copies_in_store(repo: cas.Repository, chunk_id: bytes) -> list[tuple[PackId, int]]:
    """Every (pack, payload offset) whose footer names the chunk."""
    out = []
    for pack_id in repo.store.list_packs():
        out += [(pack_id, e.offset) for e in read_footer(repo.store.pack_source(pack_id), pack_id)
                if bytes(e.chunk_id) == bytes(chunk_id)]
    return out


def damage_keys(url: str) -> list[str]:
    return sorted(k for k in stored_objects(url) if k.startswith("damaged/"))


def frozen_and_moving(step: int) -> dict[str, Any]:
    """A frozen tensor (the same bytes in every save) and one that moves."""
    g = torch.Generator().manual_seed(7)
    frozen = torch.randn(64 * 1024, generator=g)  # 4 chunks of 64 KiB
    return {"frozen": frozen, "moving": torch.full((1000,), float(step)), "step": step}


def frozen_chunk(i: int = 1) -> bytes:
    from cas.ids import chunk_id_of

    return chunk_id_of(frozen_and_moving(0)["frozen"].numpy().tobytes()[i * CHUNK:(i + 1) * CHUNK])


def test_a_damaged_chunk_a_load_finds_is_written_again_by_the_next_save(where: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk that rotted in the store is not deduplicated against once a read has found it: the
    next save holding its bytes writes a fresh copy, which heals every older snapshot that needs it,
    in this index and in one rebuilt from the packs (or another machine's); the record stays until
    `check --repair` takes the damaged pack out."""
    cid = frozen_chunk()
    with cas.Repository.init(where, chunk_size=CHUNK, compression="none") as repo:
        repo.save(frozen_and_moving(1), tag="s1")
        key, offset = rot_chunk_in_store(where, repo, cid)
        with pytest.raises(cas.ChunkCorruptError, match=f"chunk {cid.hex()[:12]} does not match its hash"):
            repo.load("s1")
    pack_hex = key.rsplit("/", 1)[1][:64]
    record_key = f"damaged/{cid.hex()}-{pack_hex}-{offset}"
    assert damage_keys(where) == [record_key]
    with open_backend(where, {"create": False} if "://" not in where else None) as backend:
        record = json.loads(backend.read(record_key))
    assert record["chunk"] == cid.hex() and record["pack"] == pack_hex and record["offset"] == offset

    with cas.Repository.open(where) as repo:  # another process: the record is in the store
        before = pack_bytes(where)
        snap = repo.save(frozen_and_moving(2), tag="s2")
        assert snap.bytes_added >= CHUNK  # the damaged chunk (and the moving tensor), not deduplicated
        assert pack_bytes(where) - before >= CHUNK
        assert_same(repo.load("s2"), frozen_and_moving(2))
        assert_same(repo.load("s1"), frozen_and_moving(1))  # healed: its chunk now reads from the fresh copy
        assert repo.verify(read_data=True).ok
        assert repo.save(frozen_and_moving(3), tag="s3").bytes_added < CHUNK  # the fresh copy dedups
        repo.rebuild_index()  # never chooses the recorded copy while the fresh one exists
        assert_same(repo.load("s1"), frozen_and_moving(1))
    assert damage_keys(where) == [record_key]  # kept while the damaged copy is in its pack
    if "://" in where:  # another machine, its index built from the store: it reads the fresh copy too
        monkeypatch.setenv("CAS_CACHE_DIR", str(tmp_path / "machine-b"))
        with cas.Repository.open(where) as repo:
            assert_same(repo.load("s1"), frozen_and_moving(1))
            assert repo.save(frozen_and_moving(4), tag="s4").bytes_added < CHUNK
    with cas.Repository.open(where) as repo:
        repo.check(repair=True)  # the damaged pack goes to quarantine/, and with it the record
        assert_same(repo.load("s1"), frozen_and_moving(1))
    assert damage_keys(where) == []


def test_check_records_the_damage_it_finds_for_the_next_save(where: str) -> None:
    cid = frozen_chunk(0)
    with cas.Repository.init(where, chunk_size=CHUNK, compression="none") as repo:
        repo.save(frozen_and_moving(1), tag="s1")
        rot_chunk_in_store(where, repo, cid)
        report = repo.check()  # no --repair: it reports, and records what it found
        assert not report.ok and [a["tensor"] for a in report.affected] == ["frozen"]
    assert [k[len("damaged/"):][:64] for k in damage_keys(where)] == [cid.hex()]
    with cas.Repository.open(where) as repo:
        repo.save(frozen_and_moving(2), tag="s2")
        assert_same(repo.load("s1"), frozen_and_moving(1))
        assert_same(repo.load("s2"), frozen_and_moving(2))


def save_with_two_copies_of_the_frozen_tensor(repo: cas.Repository) -> None:
    """Snapshot s1 of ``frozen_and_moving(1)``, while a second session stores the frozen tensor's bytes
    again: two copies of each of its chunks, in two packs (as racing writers leave them)."""
    a, b = repo.session(parent=None), repo.session(parent=None)
    part = a.store(frozen_and_moving(1))
    b.store({"frozen": frozen_and_moving(1)["frozen"], "other": torch.ones(10)})
    a.finish()
    b.finish()
    with repo.session(parent=None) as c:
        c.commit([part], tag="s1")


def test_every_damaged_copy_of_a_chunk_is_recorded(where: str) -> None:
    """Two copies of one chunk (two sessions stored the same bytes), both rotted: a record per copy,
    so whichever the index names, the next save writes the chunk again."""
    cid = frozen_chunk()
    with cas.Repository.init(where, chunk_size=CHUNK, compression="none") as repo:
        save_with_two_copies_of_the_frozen_tensor(repo)
        copies = copies_in_store(repo, cid)
        assert len(copies) == 2
        for pack_id, offset in copies:
            rot_copy(where, repo, pack_id, offset)
        with pytest.raises(cas.ChunkCorruptError):
            repo.load("s1")
        assert not repo.check().ok  # reads every record: the other copy too
    assert sorted(k[len("damaged/") + 65:] for k in damage_keys(where)) == sorted(f"{p.hex()}-{o}" for p, o in copies)
    with cas.Repository.open(where) as repo:
        assert repo.save(frozen_and_moving(2), tag="s2").bytes_added >= CHUNK
        assert_same(repo.load("s2"), frozen_and_moving(2))
        assert_same(repo.load("s1"), frozen_and_moving(1))


def test_a_damaged_delta_base_is_recorded_and_its_chain_written_again(where: str) -> None:
    """A delta whose base rotted: the read names the base, and the next save holding the delta's
    bytes writes them again (as a keyframe), which heals the older snapshot; check --repair then
    drops the base's record (it is lost, and its damaged pack is out of packs/)."""
    g = torch.Generator().manual_seed(5)
    first = {"w": torch.randn(64 * 1024, generator=g)}
    second = {"w": first["w"] + 1e-3 * torch.randn(64 * 1024, generator=g)}
    with cas.Repository.init(where, chunk_size=CHUNK, compression="default") as repo:
        repo.save(first, tag="s1")
        repo.save(second, tag="s2")
        entries = dict(repo.index.iter_chunks())
        deltas = [cid for cid, loc in entries.items() if loc.base_id is not None]
        assert deltas, "the second save should store deltas"
        base = entries[deltas[0]].base_id
        assert base is not None
        rot_chunk_in_store(where, repo, base)
        with pytest.raises(cas.ChunkCorruptError, match=f"delta base {base.hex()[:12]}"):
            repo.load("s2")
    assert [k[len("damaged/"):][:64] for k in damage_keys(where)] == [base.hex()]
    with cas.Repository.open(where) as repo:
        repo.save(second, tag="s3")  # the same bytes as s2: its chunks are written again, not deduplicated
        assert_same(repo.load("s2"), second)  # healed through the fresh copies
        assert_same(repo.load("s3"), second)
        with pytest.raises(cas.ChunkCorruptError):
            repo.load("s1")  # the base's own bytes are in no state saved since: still damaged
        report = repo.check(repair=True)
        assert base.hex() in report.lost_chunks
    assert damage_keys(where) == []


def test_a_store_that_refuses_the_damage_record_still_gets_the_read_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    where = str(tmp_path / "repo")
    with cas.Repository.init(where, chunk_size=CHUNK, compression="none") as repo:
        repo.save(frozen_and_moving(1), tag="s1")
        rot_chunk_in_store(where, repo, frozen_chunk(0))
        real_write = repo.store.backend.write

        def refuse(key: str, *args: Any, **kwargs: Any) -> Any:
            if key.startswith("damaged/"):
                raise cas.StorageError("the store is read-only here")
            return real_write(key, *args, **kwargs)

        monkeypatch.setattr(repo.store.backend, "write", refuse)
        with pytest.raises(cas.ChunkCorruptError, match="does not match its hash"):
            repo.load("s1")
        monkeypatch.setattr(repo.store.backend, "write", real_write)
        with pytest.raises(cas.ChunkCorruptError, match="does not match its hash"):
            repo.load("s1")  # the refused record is tried again by the next read
    assert len(damage_keys(where)) == 1


def test_damage_records_never_fail_a_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Listing and tidying the records is best effort: a store that fails there (after the save's
    index commit, too) still gets its snapshot committed and tagged."""
    from cas.errors import StorageUnavailableError

    where = str(tmp_path / "repo")
    with cas.Repository.init(where, chunk_size=CHUNK, compression="none") as repo:
        repo.save(frozen_and_moving(1), tag="s1")
        rot_chunk_in_store(where, repo, frozen_chunk(0))
        with pytest.raises(cas.ChunkCorruptError):
            repo.load("s1")
        committed = []
        real_commit, real_stat, real_list = repo.index.commit, repo.store.backend.stat, repo.store.backend.list

        def commit(*args: Any, **kwargs: Any) -> None:
            real_commit(*args, **kwargs)
            committed.append(True)

        def stat(key: str, *args: Any, **kwargs: Any) -> Any:
            if committed:  # the tidying after the index commit asks whether the recorded pack is there
                raise StorageUnavailableError(f"{key}: timed out")
            return real_stat(key, *args, **kwargs)

        monkeypatch.setattr(repo.index, "commit", commit)
        monkeypatch.setattr(repo.store.backend, "stat", stat)
        with caplog.at_level("WARNING", logger="cas"):
            repo.save(frozen_and_moving(2), tag="s2")
        assert committed and "s2" in repo.store.ref_names()
        assert "the damage records were not tidied" in caplog.text and "timed out" in caplog.text
        monkeypatch.setattr(repo.store.backend, "stat", real_stat)
        assert_same(repo.load("s2"), frozen_and_moving(2))

        def failing_list(prefix: str = "", **kwargs: Any) -> Any:
            if prefix.startswith("damaged/"):
                raise StorageUnavailableError("listing timed out")
            return real_list(prefix, **kwargs)

        monkeypatch.setattr(repo.store.backend, "list", failing_list)
        repo.save(frozen_and_moving(3), tag="s3")  # no records to go by: deduplicated as before, committed
        assert "s3" in repo.store.ref_names()


def test_a_save_drops_damage_records_of_packs_that_are_gone(where: str) -> None:
    from cas.ids import ChunkId

    with cas.Repository.init(where, chunk_size=CHUNK, compression="none") as repo:
        repo.save(frozen_and_moving(1), tag="s1")
        cid = frozen_chunk(0)
        repo.store.record_damage(ChunkId(cid), PackId(bytes(32)), 0)  # a copy in a pack no store holds
        assert repo.store.damage_records() == {cid: {(PackId(bytes(32)), 0)}}
        again = repo.save(frozen_and_moving(1), tag="s2")
        assert again.bytes_added < CHUNK  # the indexed copy is another one: deduplicated as usual
        assert repo.store.damage_records() == {}
        assert_same(repo.load("s2"), frozen_and_moving(1))


def test_a_check_that_finds_nothing_damaged_drops_stale_records(where: str) -> None:
    """A record of a copy that is fine (a read through a cached copy that rotted, since dropped)
    goes at the next check that verifies every pack, with or without --repair."""
    from cas.ids import ChunkId

    with cas.Repository.init(where, chunk_size=CHUNK, compression="none") as repo:
        repo.save(frozen_and_moving(1), tag="s1")
        loc = repo.index.get(frozen_chunk(0))
        assert loc is not None
        repo.store.record_damage(ChunkId(frozen_chunk(0)), loc.pack_id, loc.offset)
        assert len(damage_keys(where)) == 1
        assert repo.check(repair=True).ok
    assert damage_keys(where) == []


def test_cli_restore_records_damage_and_ls_warns_until_a_save_heals_it(tmp_path: Path) -> None:
    from tests.test_cli import run

    where = tmp_path / "repo"
    cid = frozen_chunk(0)
    with cas.Repository.init(where, chunk_size=CHUNK, compression="none") as repo:
        repo.save(frozen_and_moving(1), tag="s1")
        rot_chunk_in_store(str(where), repo, cid)
    assert run("ls", repo=where).stderr == ""
    failed = run("restore", "s1", tmp_path / "out.pt", repo=where, ok=False)
    assert failed.returncode == 7 and f"chunk {cid.hex()[:12]} does not match its hash" in failed.stderr
    listed = run("ls", repo=where)
    assert "warning: reads found 1 stored chunk damaged; the next save that holds their bytes writes them again" \
        in listed.stderr and "s1" in listed.stdout
    checked = run("check", repo=where, ok=False)
    assert checked.returncode == 1 and "affected: snapshot" in checked.stdout
    assert "1 damaged chunk copy is recorded: the next save that still holds their bytes writes them again" \
        in checked.stdout
    with cas.Repository.open(where) as repo:
        repo.save(frozen_and_moving(2), tag="s2")
    listed = run("ls", repo=where)
    assert "warning" not in listed.stderr
    assert "note: 1 damaged chunk copy is superseded by a fresh copy; `cas check --repair` takes the damaged " \
        "packs out" in listed.stderr
    run("restore", "s1", tmp_path / "out.pt", repo=where)
    assert_same(torch.load(tmp_path / "out.pt", weights_only=True), frozen_and_moving(1))
    repaired = run("check", "--repair", repo=where, ok=False)  # it found damage: exit 1, even once repaired
    assert repaired.returncode == 1 and "0 lost (repaired)" in repaired.stdout
    assert run("ls", repo=where).stderr == ""


def test_a_rebuilt_index_takes_the_intact_copy_even_where_the_damaged_one_sorts_first(where: str) -> None:
    """Two copies of one chunk, the one in the pack with the lower id rotted (without the records a
    rebuild takes that one: same depth, lowest pack id): check records it, and the rebuilt index
    names the intact copy."""
    cid = frozen_chunk()
    with cas.Repository.init(where, chunk_size=CHUNK, compression="none") as repo:
        save_with_two_copies_of_the_frozen_tensor(repo)
        (low, low_offset), (high, high_offset) = sorted(copies_in_store(repo, cid))
        rot_copy(where, repo, low, low_offset)
        assert not repo.check().ok
        assert damage_keys(where) == [f"damaged/{cid.hex()}-{low.hex()}-{low_offset}"]
        repo.rebuild_index()
        loc = repo.index.get(cid)
        assert loc is not None and (loc.pack_id, loc.offset) == (high, high_offset)
        assert_same(repo.load("s1"), frozen_and_moving(1))


def test_choose_copies_takes_clean_chains_over_ones_through_a_recorded_copy() -> None:
    from cas.codec import Codec
    from cas.ids import ChunkId
    from cas.index import ChunkLocation
    from cas.pack import PackEntry
    from cas.storeview import choose_copies

    x, base, other_base = (ChunkId(bytes([i]) * 32) for i in (1, 2, 3))
    p1, p2, p3, p4 = (PackId(bytes([i]) * 32) for i in (1, 2, 3, 4))
    copies = {
        bytes(base): [(p1, PackEntry(base, 100, 10, 10, Codec.RAW, 0))],  # its only copy: recorded damaged
        bytes(other_base): [(p2, PackEntry(other_base, 100, 10, 10, Codec.RAW, 0))],
        bytes(x): [(p3, PackEntry(x, 100, 10, 10, Codec.DELTA, 0, base)),  # through the damaged base
                   (p4, PackEntry(x, 100, 10, 10, Codec.DELTA, 0, other_base))],
    }
    avoid = {(bytes(p1), 100)}
    assert choose_copies(copies)[bytes(x)][0].pack_id == p3  # without records: lowest pack id
    assert choose_copies(copies, avoid=avoid)[bytes(x)][0].pack_id == p4
    current = {bytes(x): ChunkLocation.of(p3, copies[bytes(x)][0][1])}
    assert choose_copies(copies, prefer=current, avoid=avoid)[bytes(x)][0].pack_id == p4
    assert choose_copies(copies, prefer=current)[bytes(x)][0].pack_id == p3  # no churn without a reason
    chosen = choose_copies(copies, avoid=avoid)
    assert chosen[bytes(base)][0].pack_id == p1  # its only copy: still indexed (reads verify it)


def test_a_check_without_repair_that_finds_nothing_damaged_drops_stale_records(where: str) -> None:
    from cas.ids import ChunkId

    with cas.Repository.init(where, chunk_size=CHUNK, compression="none") as repo:
        repo.save(frozen_and_moving(1), tag="s1")
        loc = repo.index.get(frozen_chunk(0))
        assert loc is not None
        repo.store.record_damage(ChunkId(frozen_chunk(0)), loc.pack_id, loc.offset)  # a false alarm
        rot_chunk_in_store(where, repo, frozen_chunk(2))
        assert not repo.check().ok  # something is damaged: the records stay
        assert len(damage_keys(where)) == 2
    with cas.Repository.init(where + "-clean", chunk_size=CHUNK, compression="none") as repo:
        repo.save(frozen_and_moving(1), tag="s1")
        loc = repo.index.get(frozen_chunk(0))
        assert loc is not None
        repo.store.record_damage(ChunkId(frozen_chunk(0)), loc.pack_id, loc.offset)
        assert len(damage_keys(where + "-clean")) == 1
        assert repo.check().ok  # every copy verifies: the record was a false alarm, and goes
    assert damage_keys(where + "-clean") == []


def test_gc_reading_a_rotted_cached_pack_records_nothing_and_keeps_the_data(where: str) -> None:
    """On a remote store gc reads live chunks through this machine's pack cache: a cached copy that
    rotted is dropped and the chunk read again from the store, whose copy is intact and is not
    recorded as damaged."""
    from cas.ids import chunk_id_of

    if "://" not in where:
        pytest.skip("a local repository has no pack cache")
    s3_where = where
    g = torch.Generator().manual_seed(3)
    keep, drop = torch.randn(CHUNK, generator=g), torch.randn(CHUNK, generator=g)
    with cas.Repository.init(s3_where, chunk_size=CHUNK, compression="none") as repo:
        repo.save({"keep": keep, "drop": drop}, tag="a")
        repo.save({"keep": keep}, tag="b")
        cid = chunk_id_of(keep.numpy().tobytes()[:CHUNK])
        loc = repo.index.get(cid)
        assert loc is not None
        cached = repo.store.pack_cache.path_of(loc.pack_id)
        assert cached is not None, "this machine wrote the pack: it holds a copy"
        data = bytearray(cached.read_bytes())
        data[loc.offset + 10] ^= 0x01
        cached.write_bytes(bytes(data))
        repo.delete("a")
        assert repo.gc(repack_below=0.9).packs_repacked >= 1
        assert damage_keys(s3_where) == []
        assert_same(repo.load("b"), {"keep": keep})
        assert repo.check().ok


def test_dropped_damage_records_leave_nothing_behind(tmp_path: Path) -> None:
    """Records live in one flat prefix: a local repository keeps no empty directory once they go."""
    from cas.ids import ChunkId

    where = tmp_path / "repo"
    with cas.Repository.init(where, chunk_size=CHUNK, compression="none") as repo:
        repo.save(frozen_and_moving(1), tag="s1")
        repo.store.record_damage(ChunkId(frozen_chunk(0)), PackId(bytes(32)), 0)
        assert [p.name for p in (where / "damaged").iterdir()] == [f"{frozen_chunk(0).hex()}-{'00' * 32}-0"]
        repo.save(frozen_and_moving(2), tag="s2")  # the recorded pack is gone: the record goes
        assert list((where / "damaged").iterdir()) == []


def test_another_machine_whose_cache_names_the_damaged_copy_reads_the_fresh_one_after_a_heal(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Machine B's index cache was built before the rot; machine A finds the damage and heals it with
    a save. B, opening again, learns the fresh pack and reads the fresh copy."""
    if "://" not in where:
        pytest.skip("a local repository has one index")
    machine_a, machine_b = str(tmp_path / "machine-a"), str(tmp_path / "machine-b")
    cid = frozen_chunk()
    monkeypatch.setenv("CAS_CACHE_DIR", machine_a)
    with cas.Repository.init(where, chunk_size=CHUNK, compression="none") as repo:
        repo.save(frozen_and_moving(1), tag="s1")
    monkeypatch.setenv("CAS_CACHE_DIR", machine_b)
    with cas.Repository.open(where) as repo:
        assert_same(repo.load("s1"), frozen_and_moving(1))  # B's cache now names the copy that will rot
    monkeypatch.setenv("CAS_CACHE_DIR", machine_a)
    with cas.Repository.open(where) as repo:
        rot_chunk_in_store(where, repo, cid)
        with pytest.raises(cas.ChunkCorruptError):
            repo.load("s1")
        repo.save(frozen_and_moving(2), tag="s2")
    monkeypatch.setenv("CAS_CACHE_DIR", machine_b)
    with cas.Repository.open(where) as repo:
        assert_same(repo.load("s1"), frozen_and_moving(1))
        assert_same(repo.load("s2"), frozen_and_moving(2))
