"""Disaster recovery on real servers: each region is its own moto S3 server process on 127.0.0.1,
killed (SIGKILL), frozen (SIGSTOP) and resumed. Sync, failover and failback, fencing, heal from a
replica, tiers by age with an archive class, and the served endpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
import yaml

import cas
from cas.backends import open_backend
from tests.backends.moto_server import MotoServer
from tests.helpers import assert_same

KEY = "testing"
CHUNK = 256 * 1024
PACK = 1 << 20


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for k, v in {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": KEY, "AWS_REGION": "us-east-1",
                 "CAS_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


class Region:
    """One region: its own server process and a bucket on it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server = MotoServer().start()
        boto3.client("s3", endpoint_url=self.server.endpoint, region_name="us-east-1").create_bucket(Bucket="ckpt")

    @property
    def options(self) -> dict[str, Any]:
        return {"endpoint": self.server.endpoint, "timeout": 2.0, "retry_attempts": 2, "retry_base_delay": 0.05}

    def objects(self, prefix: str = "") -> dict[str, int]:
        with open_backend("s3://ckpt/run7", {"endpoint": self.server.endpoint}) as b:
            return {o.key: o.size for o in b.list(prefix)}

    def stop(self) -> None:
        assert self.server.proc is not None
        os.kill(self.server.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.server.proc is not None
        os.kill(self.server.proc.pid, signal.SIGCONT)


@pytest.fixture
def regions() -> Iterator[Callable[[str], Region]]:
    made: list[Region] = []

    def make(name: str) -> Region:
        r = Region(name)
        made.append(r)
        return r

    yield make
    for r in made:
        if r.server.proc is not None:
            r.resume()
        r.server.kill()


URL = "s3://ckpt/run7"


def state(seed: int, n: int = 400_000) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "b": torch.arange(20_000, dtype=torch.int64) * seed, "step": seed}


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    began = time.monotonic()
    while not cond():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - began


def two_regions(regions: Callable[[str], Region]) -> tuple[Region, Region, cas.Repository]:
    a, b = regions("primary"), regions("secondary")
    repo = cas.Repository.init(URL, storage_options=a.options, chunk_size=CHUNK, pack_size=PACK)
    repo.add_replica("secondary", URL, storage_options=b.options, region="us-west-2")
    return a, b, repo


def failover_ready(regions: Callable[[str], Region], tag: str, interval: float = 0.2) -> tuple[Region, Region]:
    """Two regions, ``state(1)`` saved as ``tag`` and replicated, failover settings stored."""
    a, b, repo = two_regions(regions)
    with repo:
        repo.save(state(1), tag=tag)
        assert repo.replicate().ok
        repo.set_failover(health_check_interval=interval, failure_threshold=2, recovery_threshold=2)
    return a, b


def test_sync_copies_everything_refs_last_and_never_resends(regions: Callable[[str], Region]) -> None:
    a, b, repo = two_regions(regions)
    saved = {}
    with repo:
        for step in range(3):
            s = state(1)
            s["w"][: 50_000 * step] += 1.0  # a series: deltas against the parent
            s["step"] = step
            repo.save(s, tag=f"step-{step}")
            saved[f"step-{step}"] = s
        assert repo.replication_lag()["secondary"]["snapshots_behind"] == 3
        first = repo.replicate(batch_size=2)
        round1 = first.rounds[0]
        assert first.ok and round1.error is None
        assert sorted(round1.refs_created) == ["step-0", "step-1", "step-2"]
        again = repo.replicate()
        assert again.rounds[0].bytes_copied == 0 and again.rounds[0].packs_copied == 0
        assert again.rounds[0].lag["snapshots_behind"] == 0 and again.rounds[0].lag["bytes_behind"] == 0
    # the bucket of the replica holds the same packs, byte counts and all
    packs_a = a.objects("packs/")
    assert packs_a == b.objects("packs/")
    assert round1.bytes_copied == sum(packs_a.values()) + sum(a.objects("indexes/").values())
    # the replica is a repository of its own: it lists, restores bit-identically and verifies
    with cas.Repository.open(URL, storage_options=b.options) as replica:
        assert [s.tag for s in replica.snapshots()] == ["step-0", "step-1", "step-2"]
        for tag, s in saved.items():
            assert_same(replica.load(tag), s)
        assert replica.verify(read_data=True).ok


REPLICATOR = textwrap.dedent("""
    import sys, cas
    primary, secondary = sys.argv[1], sys.argv[2]
    repo = cas.Repository.open("s3://ckpt/run7", storage_options={"endpoint": primary})
    repo.replicate(batch_size=1)
    print("done", flush=True)
""")


def test_replicator_killed_mid_round_resumes_and_the_replica_verifies(
    regions: Callable[[str], Region], tmp_path: Path
) -> None:
    a, b, repo = two_regions(regions)
    with repo:
        for step in range(4):
            repo.save(state(10 + step), tag=f"s{step}", compression="none")
    script = tmp_path / "replicator.py"
    script.write_text(REPLICATOR)
    proc = subprocess.Popen([sys.executable, str(script), a.server.endpoint, b.server.endpoint],
                            env={**os.environ, "PYTHONPATH": str(Path.cwd())}, stdout=subprocess.DEVNULL)
    wait_for(lambda: len(b.objects("packs/")) >= 3 or proc.poll() is not None, 60, "the first packs on the replica")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    copied_before = b.objects("packs/")
    assert copied_before, "the replicator was killed before it copied anything"
    # refs come last: whatever the replica shows, it can restore
    with cas.Repository.open(URL, storage_options=b.options) as replica:
        for snap in replica.snapshots():
            replica.load(snap.ref)
    with cas.Repository.open(URL, storage_options=a.options) as repo:
        resumed = repo.replicate()
        out = resumed.rounds[0]
        assert resumed.ok
        assert out.already_there >= len(copied_before)  # nothing it already held was sent again
        assert out.lag["snapshots_behind"] == 0
    with cas.Repository.open(URL, storage_options=b.options) as replica:
        assert [s.tag for s in replica.snapshots()] == ["s0", "s1", "s2", "s3"]
        assert replica.verify(read_data=True).ok


def test_restore_in_flight_completes_from_the_secondary_when_the_primary_is_killed(
    regions: Callable[[str], Region]
) -> None:
    a, _b, repo = two_regions(regions)
    big = {"w": torch.randn(64 << 20, generator=torch.Generator().manual_seed(3))}  # 256 MiB of fp32
    interval, threshold, timeout = 0.2, 2, 2.0
    with repo:
        repo.save(big, tag="big", compression="none")
        assert repo.replicate().ok
        repo.set_failover(health_check_interval=interval, failure_threshold=threshold, recovery_threshold=2)
    with cas.Repository.open(URL, storage_options=a.options) as repo:
        result: dict[str, Any] = {}

        def restore() -> None:
            try:
                result["value"] = repo.load("big")
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                result["error"] = exc
            result["done"] = time.monotonic()

        t = threading.Thread(target=restore)
        t.start()
        time.sleep(0.3)  # the restore is reading from the primary
        killed = time.monotonic()
        a.server.kill()
        t.join(120)
        assert "error" not in result, result.get("error")
        assert torch.equal(result["value"]["w"], big["w"])
        assert result["done"] - killed < threshold * interval + timeout + 10.0  # + the reads themselves
        wait_for(lambda: repo.region == "us-west-2", threshold * interval + 3 * timeout, "the failover")
        assert repo.health()["failover_count"] == 1


def test_saves_in_a_failover_land_in_the_secondary_and_the_primary_catches_up(
    regions: Callable[[str], Region]
) -> None:
    a, b = failover_ready(regions, "before")
    with cas.Repository.open(URL, storage_options=a.options) as repo:
        assert repo.region == "primary"
        a.stop()
        wait_for(lambda: repo.region == "us-west-2", 15, "the failover")
        during = state(2)
        snap = repo.save(during, tag="during")
        assert "refs/during" in b.objects("refs/")
        assert_same(repo.load("during"), during)
        a.resume()
        wait_for(lambda: repo.region == "primary", 20, "the failback")
        kinds = [(t["kind"], t["to_region"]) for t in repo.health()["transitions"]]
        assert kinds == [("failover", "secondary"), ("failback", "primary")]
        assert repo.health()["regions"]["primary"]["consecutive_successes"] >= 2
        after = state(3)
        repo.save(after, tag="after")
        assert "refs/after" in a.objects("refs/")
        assert repo.replicate().ok
    # nothing lost in either region
    for region in (a, b):
        with cas.Repository.open(URL, storage_options=region.options) as r:
            assert [s.tag for s in r.snapshots()] == ["before", "during", "after"]
            assert r.resolve("during").id == snap.id
            assert_same(r.load("during"), during)
            assert r.verify(read_data=True).ok


def test_a_replica_that_does_not_serve_refuses_writes_and_a_moved_tag_is_kept_side_by_side(
    regions: Callable[[str], Region]
) -> None:
    a, b, repo = two_regions(regions)
    with repo:
        first = repo.save(state(1), tag="t")
        assert repo.replicate().ok
    with cas.Repository.open(URL, storage_options=b.options) as direct:
        with pytest.raises(cas.FencedError, match="does not serve"):
            direct.save(state(9), tag="sneaky")
        assert [s.tag for s in direct.snapshots()] == ["t"]
    # a region that served during a failover moved the tag: the replica keeps its own, and the
    # other value is kept beside it, never overwritten
    other = cas.Repository.open(URL, storage_options=a.options)
    with other:
        moved = other.save(state(2), tag="t2")
        with open_backend(URL, {"endpoint": b.server.endpoint}) as backend:
            backend.write("refs/t", moved.id.encode() + b"\n")  # the replica's own move of "t"
        report = other.replicate()
    conflict = report.rounds[0].conflicts
    assert conflict == [{"tag": "t", "kept": moved.id, "theirs_as": "t@primary", "source_value": first.id}]
    with cas.Repository.open(URL, storage_options=b.options) as replica:
        assert replica.resolve("t").id == moved.id
        assert replica.resolve("t@primary").id == first.id


def test_forget_and_gc_reach_the_replica_only_through_its_own_gc(regions: Callable[[str], Region]) -> None:
    _a, b, repo = two_regions(regions)
    with repo:
        repo.save(state(1), tag="old", compression="none")
        repo.save(state(2), tag="new", compression="none")
        assert repo.replicate().ok
        before = sum(b.objects("packs/").values())
        repo.delete("old")
        repo.gc()
        out = repo.replicate().rounds[0]
    assert out.refs_removed == ["old"]
    assert out.gc_bytes_freed > 0
    assert sum(b.objects("packs/").values()) == before - out.gc_bytes_freed
    with cas.Repository.open(URL, storage_options=b.options) as replica:
        assert [s.tag for s in replica.snapshots()] == ["new"]
        assert replica.verify(read_data=True).ok


def test_sync_mode_save_returns_once_the_replica_holds_the_snapshot(regions: Callable[[str], Region]) -> None:
    _a, b, repo = two_regions(regions)
    with repo:
        repo.set_sync(mode="sync")
        snap = repo.save(state(4), tag="synced")
        assert "refs/synced" in b.objects("refs/")
        with cas.Repository.open(URL, storage_options=b.options) as replica:
            assert replica.resolve("synced").id == snap.id
        b.stop()
        try:
            with pytest.raises(cas.StorageUnavailableError, match="committed in region primary but not yet in"):
                repo.save(state(5), tag="unsynced")
        finally:
            b.resume()
        assert repo.resolve("unsynced")  # committed in the primary: the next round copies it


def test_check_repair_heals_damaged_and_missing_packs_from_a_replica(tmp_path: Path) -> None:
    primary, mirror = tmp_path / "primary", tmp_path / "mirror"
    s1, s2 = state(1), state(2)
    with cas.Repository.init(primary, chunk_size=CHUNK, pack_size=PACK) as repo:
        repo.save(s1, tag="a")
        repo.save(s2, tag="b")
        repo.add_replica("mirror", mirror)
        assert repo.replicate().ok
    data = sorted((primary / "packs").rglob("*.pack"), key=lambda p: p.stat().st_size)
    damaged, lost = data[-1], data[-2]
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    lost.unlink()
    with cas.Repository.open(primary) as repo:
        assert not repo.verify(read_data=True).ok
        report = repo.check(repair=True)
        healed = {h["pack"]: h for h in report.healed}
        assert damaged.name.removesuffix(".pack") in healed and lost.name.removesuffix(".pack") in healed
        assert {h["from"] for h in report.healed} == {"mirror"}
        assert report.ok, report.to_dict()
        assert repo.verify(read_data=True).ok
        assert_same(repo.load("a"), s1)
        assert_same(repo.load("b"), s2)
    assert damaged.read_bytes() == (mirror / damaged.relative_to(primary)).read_bytes()
    assert lost.read_bytes() == (mirror / lost.relative_to(primary)).read_bytes()
    assert any((primary / "quarantine").iterdir())  # the damaged bytes were kept first


def test_tiers_move_packs_by_age_restore_across_tiers_and_archive_needs_a_warmup(
    regions: Callable[[str], Region], tmp_path: Path
) -> None:
    arch = regions("archive")
    hot = tmp_path / "hot"
    day = 86400.0
    s1 = {"a": torch.randn(300_000, generator=torch.Generator().manual_seed(1)),
          "b": torch.randn(300_000, generator=torch.Generator().manual_seed(2))}
    with cas.Repository.init(hot, chunk_size=CHUNK, pack_size=PACK) as repo:
        snap1 = repo.save(s1, tag="s1", compression="none")
        repo.set_tiers([
            {"name": "hot", "url": str(hot), "retention": "7d"},
            {"name": "warm", "url": str(tmp_path / "warm"), "retention": "30d"},
            {"name": "cold", "url": str(tmp_path / "cold"), "retention": "180d"},
            {"name": "archive", "url": "s3://ckpt/run7", "storage_class": "GLACIER", "retention": "indefinite",
             "endpoint": arch.server.endpoint},
        ])
        t0 = snap1.time
        assert repo.migrate_tiers(now=t0 + 1 * day).moved == []
        warm = repo.migrate_tiers(now=t0 + 10 * day)
        assert warm.moved and {m["to"] for m in warm.moved} == {"warm"}
        cold = repo.migrate_tiers(now=t0 + 40 * day)
        assert {m["to"] for m in cold.moved} == {"cold"}
        status = repo.tier_status()
        assert status["hot"]["data_packs"] == 0 and status["cold"]["data_packs"] == len(cold.moved)
        assert status["hot"]["meta_packs"] > 0  # metadata stays hot
        assert not list((hot / "packs").rglob("*.pack"))
    with cas.Repository.open(hot) as repo:
        # a new save reuses "a" (in the cold tier) and adds "c" (hot): its restore reads both tiers
        s2 = {"a": s1["a"], "c": torch.randn(300_000, generator=torch.Generator().manual_seed(3))}
        repo.save(s2, tag="s2", compression="none")
        assert list((hot / "packs").rglob("*.pack"))
        assert_same(repo.load("s2"), s2)
        assert repo.verify(read_data=True).ok
        archived = repo.migrate_tiers(now=time.time() + 400 * day)
        assert {m["to"] for m in archived.moved} == {"archive"}
        assert all(k.startswith("packs/") and k.endswith(".pack") for k in arch.objects())
        with pytest.raises(cas.ArchivedError) as err:
            repo.load("s1")
        assert err.value.snapshot == "s1" and err.value.packs
        assert "warmup" in str(err.value) and err.value.packs[0][:12] in str(err.value)
        env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "CAS_WARMUP_POLL": "0.05"}
        out = tmp_path / "s1.pt"
        done = run_cas("--repo", str(hot), "restore", "s1", str(out), "--warmup", env=env)
        assert done.returncode == 0, done.stderr
        assert f"{len(err.value.packs)} archived pack(s) of snapshot" in done.stderr
        assert_same(torch.load(out, weights_only=True), s1)
        assert repo.warmup("s1", poll=0.05, timeout=30) == []  # restored: nothing left to request
        assert_same(repo.load("s1"), s1)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # 127.0.0.1 only
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start_serve(env: dict[str, str], *args: str, serve_args: tuple[str, ...] = ("--refresh", "0.2")
                ) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "cas.cli", *args, "serve", "--port", "0", *serve_args],
                            env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if line.startswith("serving http://"):
            base = line.split()[1].rsplit("/health", 1)[0]
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, base
        if not line and proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    proc.stderr.close()
    raise AssertionError("cas serve did not start")


def stop_serve(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    time.sleep(0.1)  # the drain thread reads the end of the pipe
    assert proc.stderr is not None
    proc.stderr.close()




def test_serve_answers_health_ready_and_metrics_with_the_primary_up_down_and_back(
    regions: Callable[[str], Region]
) -> None:
    a, _b, repo = two_regions(regions)
    with repo:
        repo.save(state(1), tag="s1")
        assert repo.replicate().ok
        repo.verify(record=True)
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    proc, base = start_serve(env, "--repo", URL, "--endpoint", a.server.endpoint, "--timeout", "1")
    try:
        assert _get(base + "/health")[0] == 200
        wait_for(lambda: _get(base + "/ready")[0] == 200, 30, "ready")
        wait_for(lambda: b"cas_snapshots 1.0" in _get(base + "/metrics")[1], 30, "the metrics")
        metrics = _get(base + "/metrics")[1].decode()
        assert "cas_last_verify_ok 1.0" in metrics
        assert 'cas_replication_lag_snapshots{replica="secondary"} 0.0' in metrics
        assert "cas_logical_bytes" in metrics and "cas_stored_bytes" in metrics
        # no failover settings, so no health checks: the readiness probe says whether it answers
        assert 'cas_region_up{region="primary"} 1.0' in metrics
        a.stop()
        wait_for(lambda: _get(base + "/ready")[0] == 503, 30, "not ready with the primary down")
        wait_for(lambda: b'cas_region_up{region="primary"} 0.0' in _get(base + "/metrics")[1], 30, "primary down")
        assert _get(base + "/health")[0] == 200  # alive all along
        a.resume()
        wait_for(lambda: _get(base + "/ready")[0] == 200, 30, "ready again")
        assert _get(base + "/nothing")[0] == 404
    finally:
        a.resume()
        stop_serve(proc)


def test_serve_reports_replication_lag_as_each_round_ends(regions: Callable[[str], Region]) -> None:
    from cas.serve import ServeState

    _a, _b, repo = two_regions(regions)
    with repo:
        repo.save(state(1), tag="s1")  # not replicated yet
        served = ServeState(repo, refresh_interval=3600.0, replicate_interval=0.3)
        served.refresh()
        assert served.lag["secondary"]["snapshots_behind"] == 1
        served.replicate_once()  # the next refresh is an hour away: the round's own measure is shown
        assert served.lag["secondary"]["snapshots_behind"] == 0 and served.last_replication_ok


def test_serve_reports_failover_in_metrics(regions: Callable[[str], Region]) -> None:
    a, _b = failover_ready(regions, "s1")
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    proc, base = start_serve(env, "--repo", URL, "--endpoint", a.server.endpoint, "--timeout", "1")
    try:
        wait_for(lambda: b'cas_region_up{region="primary"} 1.0' in _get(base + "/metrics")[1], 30, "primary up")
        a.stop()
        wait_for(lambda: b"cas_failover_total 1.0" in _get(base + "/metrics")[1], 30, "the failover")
        metrics = _get(base + "/metrics")[1].decode()
        assert 'cas_region_serving{region="secondary"} 1.0' in metrics
        assert 'cas_region_up{region="primary"} 0.0' in metrics
        status, body = _get(base + "/ready")  # the secondary serves: ready
        assert status == 200 and json.loads(body)["region"] == "us-west-2"
    finally:
        a.resume()
        stop_serve(proc)


TOPOLOGY = """
regions:
  primary:   {{name: us-east-1,    url: "s3://ckpt/run7", endpoint: "{a}", weight: 100, active: true}}
  secondary: {{name: us-west-2,    url: "s3://ckpt/run7", endpoint: "{b}", weight: 0,   active: true}}
  dr:        {{name: eu-central-1, url: "{dr}",           weight: 0,   active: false}}
failover: {{health_check_interval: 30, failure_threshold: 3, recovery_threshold: 2, auto_failover: true}}
sync:     {{mode: async, interval: 300, batch_size: 100}}
tiers:
  hot:     {{url: "s3://ckpt/run7", retention: 7d}}
  warm:    {{url: "{warm}",          retention: 30d}}
  archive: {{url: "s3://ckpt/archive", endpoint: "{a}", storage_class: GLACIER, retention: indefinite}}
"""


def run_cas(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cas.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_config_apply_show_and_replica_commands(regions: Callable[[str], Region], tmp_path: Path) -> None:
    a, b = regions("primary"), regions("secondary")
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    base = ["--repo", URL, "--endpoint", a.server.endpoint]
    assert run_cas(*base, "init", env=env).returncode == 0
    path = tmp_path / "topology.yaml"
    path.write_text(TOPOLOGY.format(a=a.server.endpoint, b=b.server.endpoint, dr=tmp_path / "dr",
                                    warm=tmp_path / "warm"))
    done = run_cas(*base, "config", "apply", str(path), env=env)
    assert done.returncode == 0, done.stderr
    assert "2 replica(s), failover on, sync async, 3 tier(s)" in done.stdout
    shown = yaml.safe_load(run_cas(*base, "config", "show", env=env).stdout)
    wanted = yaml.safe_load(path.read_text())
    assert shown["failover"] == wanted["failover"] and shown["sync"] == wanted["sync"]
    for role, spec in wanted["regions"].items():
        assert {k: shown["regions"][role][k] for k in spec} == spec
    assert {n: (t["url"], t["retention"]) for n, t in shown["tiers"].items()} == {
        n: (t["url"], t["retention"]) for n, t in wanted["tiers"].items()}
    assert shown["tiers"]["archive"]["storage_class"] == "GLACIER"
    listed = json.loads(run_cas(*base, "replica", "ls", "--json", env=env).stdout)
    assert [r["name"] for r in listed["regions"]] == ["primary", "secondary", "dr"]
    assert run_cas(*base, "replica", "rm", "dr", env=env).returncode == 0
    added = run_cas(*base, "replica", "add", "dr2", str(tmp_path / "dr2"), "--region", "eu-west-1", "--inactive",
                    env=env)
    assert added.returncode == 0, added.stderr
    again = run_cas(*base, "replica", "add", "dr2", str(tmp_path / "dr3"), env=env)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "exists already" in again.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("failover: {failure_threshold: 0}\n")
    refused = run_cas(*base, "config", "apply", str(bad), env=env)
    assert refused.returncode == 3 and "failure_threshold must be at least 1" in refused.stderr
    assert refused.stderr.count("\n") == 1
    # the topology is in the repository and in every replica
    with open_backend(URL, {"endpoint": b.server.endpoint}) as backend:
        assert json.loads(backend.read("topology.json"))["replicas"].keys() == {"secondary", "dr2"}
    once = run_cas(*base, "replicate", "--once", env=env)
    assert once.returncode == 0, once.stderr
    assert "secondary:" in once.stdout and "dr2:" in once.stdout


def test_a_client_that_finds_the_primary_dead_at_open_goes_to_the_replica(regions: Callable[[str], Region]) -> None:
    a, b, repo = two_regions(regions)
    s = state(7)
    with repo:
        repo.save(s, tag="s")
        assert repo.replicate().ok
        repo.set_failover(health_check_interval=0.2, failure_threshold=2, recovery_threshold=2)
    a.server.kill()  # the region is gone; this machine's cached topology says where to go
    with cas.Repository.open(URL, storage_options=a.options) as repo:
        assert repo.region == "us-west-2"
        assert_same(repo.load("s"), s)
        repo.save(state(8), tag="s8")
    assert "refs/s8" in b.objects("refs/")


def test_checkpoint_manager_takes_an_s3_url(regions: Callable[[str], Region], monkeypatch: pytest.MonkeyPatch) -> None:
    a = regions("primary")
    monkeypatch.setenv("AWS_ENDPOINT_URL", a.server.endpoint)
    model = torch.nn.Linear(8, 4)
    with cas.CheckpointManager(URL, async_save=False) as manager:  # an empty prefix becomes a repository
        assert manager.save(1, {"model": model.state_dict()}, force=True)
    with cas.CheckpointManager(URL, async_save=False) as manager:  # and opens as one the next time
        assert_same(manager.repo.load("latest")["model"], model.state_dict())


def test_bad_settings_are_typed_errors_and_change_nothing(tmp_path: Path) -> None:
    with cas.Repository.init(tmp_path / "r") as repo:
        with pytest.raises(cas.UsageError, match="unknown setting"):
            repo.set_sync(mod="sync")
        with pytest.raises(cas.ConfigError, match=r"sync\.mode"):
            repo.set_sync(mode="sometimes")
        with pytest.raises(cas.ConfigError, match="failure_threshold must be at least 1"):
            repo.set_failover(failure_threshold=0)
        with pytest.raises(cas.ConfigError, match="first tier"):
            repo.set_tiers([{"name": "hot", "url": str(tmp_path / "elsewhere"), "retention": "7d"}])
        assert not (tmp_path / "r" / "topology.json").exists()
        assert repo.topology.sync.mode == "async" and repo.topology.failover is None


def test_a_pack_with_a_damaged_payload_is_not_replicated(tmp_path: Path) -> None:
    """Structure intact, one payload byte flipped: the round decodes and hashes what it copies, so
    the pack stays on the source, no ref is written, and the replica holds nothing damaged."""
    primary, mirror = tmp_path / "primary", tmp_path / "mirror"
    with cas.Repository.init(primary, chunk_size=CHUNK, pack_size=PACK, compression="default") as repo:
        repo.save(state(1), tag="a")
        packs = sorted((primary / "packs").rglob("*.pack"), key=lambda p: p.stat().st_size)
        damaged = packs[-1]
        raw = bytearray(damaged.read_bytes())
        raw[len(raw) // 3] ^= 0x01
        damaged.write_bytes(bytes(raw))
        repo.add_replica("mirror", mirror)
        result = repo.replicate()
        assert not result.ok
        [round_] = result.rounds
        [why] = round_.not_copied
        assert damaged.name in why and "does not match its hash" in why, why
        assert round_.refs_created == []
    assert not (mirror / damaged.relative_to(primary)).exists()
    assert not [p for p in (mirror / "refs").rglob("*") if p.is_file()]
