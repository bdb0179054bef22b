"""Failback and lock objects across regions, on real moto servers (one process per region).

A save can land in the old region between failback's copy and the switch. Failback now copies a
second time with writes paused, and switches only once that copy completes. A round after the
switch then copies what other processes wrote there. A lock object whose delete a failing region
missed is deleted when that region answers again.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import cas
from cas.backends import open_backend
from cas.backends.failover import FailoverBackend
from cas.layout import Store
from tests.helpers import assert_same
from tests.test_dr import URL, Region, _env, failover_ready, regions, state, wait_for

__all__ = ["_env", "regions"]  # fixtures shared with test_dr
ROOT = Path(__file__).resolve().parent.parent


def save_in_another_process(options: dict[str, object], tag: str, seed: int, cache: Path) -> None:
    """A second writer (another rank, another job) saving straight into one region."""
    code = textwrap.dedent(f"""
        import torch, cas
        from tests.test_dr import state
        with cas.Repository.open({URL!r}, storage_options={options!r}) as r:
            r.save(state({seed}), tag={tag!r})
    """)
    env = {"PYTHONPATH": str(ROOT), "CAS_CACHE_DIR": str(cache), "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_save_landing_between_failback_copy_and_switch_reaches_the_primary(
    regions: Callable[[str], Region], tmp_path: Path
) -> None:
    a, b = failover_ready(regions, "before")
    with cas.Repository.open(URL, storage_options=a.options) as repo:
        monitor = repo._dr.monitor
        assert monitor is not None
        a.stop()
        wait_for(lambda: repo.region == "us-west-2", 15, "the failover")
        repo.save(state(2), tag="during")
        copy = monitor.catch_up
        landed: list[str] = []

        def copy_then_a_save_lands(source: str, target: str, *lock_wait_s: float | None) -> bool:
            done = copy(source, target, *lock_wait_s)
            if done and not landed:  # right after failback's first copy, before it switches
                save_in_another_process(b.options, "racing", 4, tmp_path / "other-cache")
                landed.append("racing")
            return done

        monitor.catch_up = copy_then_a_save_lands
        a.resume()
        wait_for(lambda: repo.region == "primary", 30, "the failback")
        assert landed == ["racing"], "test setup: the racing save never ran"
        assert "refs/racing" in b.objects("refs/")
        assert "refs/racing" in a.objects("refs/"), "the save that landed before the switch stayed in the old region"
    with cas.Repository.open(URL, storage_options=a.options) as r:
        assert [s.tag for s in r.snapshots()] == ["before", "during", "racing"]
        assert_same(r.load("racing"), state(4))
        assert r.verify(read_data=True).ok


def test_paused_writes_hold_a_write_until_the_switch_is_made(regions: Callable[[str], Region]) -> None:
    a, b = regions("primary"), regions("secondary")
    fb = FailoverBackend([("primary", open_backend(URL, a.options)), ("secondary", open_backend(URL, b.options))],
                         "primary")
    wrote = threading.Event()

    def write() -> None:
        fb.write("packs/00/x.pack", b"payload")
        wrote.set()

    with fb.paused_writes():
        t = threading.Thread(target=write)
        t.start()
        assert not wrote.wait(0.5), "a write went through while writes were paused"
        fb.switch("secondary")
        fb.write("locks/l.json", b"{}")  # lock objects are never held back
    t.join(10)
    assert wrote.is_set()
    assert "packs/00/x.pack" in b.objects("packs/") and "packs/00/x.pack" not in a.objects("packs/")
    fb.close()


def test_a_lock_a_failing_region_kept_is_deleted_when_it_answers(regions: Callable[[str], Region]) -> None:
    a, b = regions("primary"), regions("secondary")
    quick = {"timeout": 1.0, "retry_attempts": 1, "retry_base_delay": 0.05}
    fb = FailoverBackend([("primary", open_backend(URL, {**a.options, **quick})),
                          ("secondary", open_backend(URL, {**b.options, **quick}))], "secondary")
    key = "locks/0123abcd.json"
    for region in (a, b):  # a write that timed out on the primary landed there after all
        with open_backend(URL, region.options) as direct:
            direct.write(key, b'{"kind": "exclusive"}')
    a.stop()
    try:
        fb.set_failing({"primary"})  # as a timed-out write marks it (the write may land later)
        fb.delete(key)
        assert key not in b.objects("locks/")
        assert fb.delete_stale_locks() == 0  # still marked failing
    finally:
        a.resume()
    assert key in a.objects("locks/"), "test setup: the frozen primary lost the lock object anyway"
    fb.set_failing(set())
    assert fb.delete_stale_locks() == 1
    assert key not in a.objects("locks/"), "the lock object stayed in the primary after its holder released it"
    assert fb.delete_stale_locks() == 0
    fb.close()


def test_lock_wait_s_bounds_the_wait_for_a_conflicting_lock(regions: Callable[[str], Region], tmp_path: Path) -> None:
    """The copy made with writes paused waits a bounded time for locks (a holder of an exclusive
    lock in this process may itself wait on a paused write): it gives up, and failback is tried
    again next round. Both kinds of lock: objects in a bucket, flock(2) on a local directory."""
    a = regions("primary")
    local = tmp_path / "local-repo"
    cas.Repository.init(local).close()
    for url, options, holder_dir, waiter_dir in (
        (URL, a.options, tmp_path / "holder-cache", tmp_path / "waiter-cache"), (str(local), {}, local, local),
    ):
        holder = Store(open_backend(url, options), url, holder_dir)
        waiter = Store(open_backend(url, options), url, waiter_dir)
        waiter.lock_wait_s = 0.5
        with holder.lock(exclusive=True):
            began = time.monotonic()
            with pytest.raises(cas.LockedError, match="is locked"), waiter.lock(exclusive=False):
                pass
            assert time.monotonic() - began < 5, f"{url}: waited {time.monotonic() - began:.1f} s"
        with waiter.lock(exclusive=False):  # released: taken at once
            pass
        holder.backend.close()
        waiter.backend.close()


def test_an_archived_pack_holds_back_only_the_refs_that_need_it(
    regions: Callable[[str], Region], tmp_path: Path
) -> None:
    """A replica added after old packs went to an archive class: everything else replicates, the
    refs whose snapshots need an archived pack wait (reported) until a warmup restores it."""
    arch = regions("archive")
    hot, replica = tmp_path / "hot", tmp_path / "replica"
    day = 86400.0
    s1 = {"a": torch.randn(300_000, generator=torch.Generator().manual_seed(1))}
    s2 = {"c": torch.randn(300_000, generator=torch.Generator().manual_seed(3))}
    with cas.Repository.init(hot, chunk_size=256 << 10, pack_size=1 << 20) as repo:
        repo.save(s1, tag="s1", compression="none")
        repo.set_tiers([
            {"name": "hot", "url": str(hot), "retention": "7d"},
            {"name": "archive", "url": "s3://ckpt/run7", "storage_class": "GLACIER", "retention": "indefinite",
             "endpoint": arch.server.endpoint},
        ])
        assert {m["to"] for m in repo.migrate_tiers(now=time.time() + 400 * day).moved} == {"archive"}
        repo.save(s2, tag="s2", compression="none")  # new data, hot
        repo.add_replica("dr", str(replica))
        first = repo.replicate()
        rounds = first.rounds
        assert len(rounds) == 1 and rounds[0].error is None, rounds[0].error
        assert rounds[0].archived and all(k.endswith(".pack") for k in rounds[0].archived)
        assert rounds[0].refs_held == ["s1"] and "s2" in rounds[0].refs_created
        assert not first.ok, "a round that left a snapshot behind reported ok"
        assert not (replica / "refs" / "s1").exists()
        with cas.Repository.open(replica) as r:
            assert [s.tag for s in r.snapshots()] == ["s2"]
            assert_same(r.load("s2"), s2)
        assert len(repo.warmup("s1", poll=0.05, timeout=30)) == len(rounds[0].archived)  # restores requested
        assert repo.warmup("s1", poll=0.05, timeout=30) == []  # and done
        second = repo.replicate()
        assert second.ok and second.rounds[0].refs_created == ["s1"] and not second.rounds[0].refs_held
    with cas.Repository.open(replica) as r:
        assert [s.tag for s in r.snapshots()] == ["s1", "s2"]
        assert_same(r.load("s1"), s1)
        assert r.verify(read_data=True).ok


def test_set_tiers_takes_storage_options_as_format_md_stores_them(
    regions: Callable[[str], Region], tmp_path: Path
) -> None:
    arch = regions("archive")
    hot = tmp_path / "hot"
    flat = {"name": "archive", "url": "s3://ckpt/run7", "retention": "indefinite", "storage_class": "GLACIER",
            "endpoint": arch.server.endpoint}
    nested = {**{k: v for k, v in flat.items() if k != "endpoint"},
              "storage_options": {"endpoint": arch.server.endpoint}}
    with cas.Repository.init(hot) as repo:
        first = repo.set_tiers([{"name": "hot", "url": str(hot), "retention": "7d"}, flat])
        second = repo.set_tiers([{"name": "hot", "url": str(hot), "retention": "7d"}, nested])
        assert second == first and second[1].storage_options == {"endpoint": arch.server.endpoint}
        with pytest.raises(cas.ConfigError, match="storage_options must be a mapping"):
            repo.set_tiers([{"name": "hot", "url": str(hot), "retention": "7d"},
                            {**nested, "storage_options": "endpoint=x"}])
        with pytest.raises(cas.UsageError, match=r"tiers\.archive: unknown storage option 'secret_key'"):
            repo.set_tiers([{"name": "hot", "url": str(hot), "retention": "7d"},
                            {**nested, "storage_options": {"secret_key": "x"}}])
        assert repo.topology.tiers == first  # the refused calls changed nothing


def test_lockers_of_a_local_region_through_failover_and_directly_exclude_each_other(tmp_path: Path) -> None:
    """A local replica is locked with flock(2) by replication (its own store) and with lock objects
    by a process that opened it by its URL (through the failover backend): each must see the other."""
    replica = tmp_path / "replica"
    cas.Repository.init(replica).close()
    url = str(replica)

    def direct() -> Store:
        return Store(open_backend(url, {}), url, replica)

    def through_failover(name: str) -> Store:
        return Store(FailoverBackend([("dr", open_backend(url, {}))], "dr"), url, tmp_path / name)

    for holder, waiter in ((direct(), through_failover("w1")), (through_failover("h2"), direct())):
        assert holder.is_local != waiter.is_local
        waiter.lock_wait_s = 0.5
        with holder.lock(exclusive=True), pytest.raises(cas.LockedError, match="is locked"), \
                waiter.lock(exclusive=False):
            pass
        with holder.lock(exclusive=False), waiter.lock(exclusive=False):  # shared with shared: both go on
            pass
        with waiter.lock(exclusive=True):
            pass
    assert not [p for p in (replica / "locks").iterdir() if p.suffix == ".json"], "a lock object was left behind"


def test_a_ref_write_in_flight_does_not_wait_for_the_health_checker(regions: Callable[[str], Region]) -> None:
    """A failback holds the monitor's lock while it waits for the writes in flight; a ref write's
    fence must therefore not need that lock (it did: the two waited on each other for ever)."""
    a, _b = failover_ready(regions, "s1", interval=30)
    with cas.Repository.open(URL, storage_options=a.options) as repo:
        monitor = repo._dr.monitor
        assert monitor is not None
        done = threading.Event()

        def write_a_ref() -> None:
            monitor.backend.write("refs/probe-ref", b"0" * 64 + b"\n")
            done.set()

        with monitor._lock:  # as check_once holds it through a failback
            writer = threading.Thread(target=write_a_ref)
            writer.start()
            assert done.wait(20), "the fenced ref write waited for the health checker's lock"
        writer.join()
        monitor.backend.delete("refs/probe-ref")
