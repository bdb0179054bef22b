"""torch.distributed.checkpoint on cas with real process groups (torch.multiprocessing spawn, gloo on CPU).

One spawn of 4 ranks runs a whole scenario (subgroups give the other world sizes, so one
process start serves several): a DTensor-sharded model saved by 2 ranks and by 4 ranks, the
second time with a small change, then loaded by 4, 2 and 3 ranks (Shard(0) and Shard(1)
placements), bit-identical to the unsharded reference, each rank reading only what it keeps;
an FSDP2 model with its AdamW state saved by 2 ranks and loaded by 4.
Separate spawns: a rank SIGKILLed mid-save; two jobs saving into one repository (local and S3,
one cache directory per rank as if on separate hosts) while gc and retention run beside them.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

import cas
from cas.integrations.dcp import CasStorageReader, CasStorageWriter, _chunk_runs, dcp_info, load_unsharded
from tests.backends.moto_server import MotoServer, free_port

CHUNK = 64 * 1024
KEY_ID = SECRET = "testing"

#: name -> (shape, dtype): the sharded model
MODEL = {
    "layer0.weight": ((256, 512), torch.float32),
    "layer0.bias": ((256,), torch.float32),
    "layer1.weight": ((512, 256), torch.float32),
    "emb": ((1000, 64), torch.bfloat16),
}
REPLICATED = 8192  # float32 elements of a tensor every rank holds whole


def reference(name: str, version: int = 0, job: str = "") -> torch.Tensor:
    """The unsharded value of a model tensor; version 1 changes one row of layer0.weight."""
    shape, dtype = MODEL[name]
    g = torch.Generator().manual_seed(sum(map(ord, name + job)) * 7919)
    t = torch.randn(shape, generator=g).to(dtype)
    if version >= 1 and name == "layer0.weight":
        t[3] += 1.0
    if version >= 2:
        t[version % shape[0]] -= 0.5
    return t


def replicated(version: int = 0) -> torch.Tensor:
    return torch.arange(REPLICATED, dtype=torch.float32) + version


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
    yield f"s3://{bucket}/dcp"


# --------------------------------------------------------------------------- workers (in spawned ranks)


def _init(rank: int, world: int, port: int, env: dict[str, str], cache: str | None) -> None:
    # a forkserver's children have the server's environment: the test's S3 settings come along here
    for key in [k for k in os.environ if k.startswith(("AWS_", "CAS_"))]:
        del os.environ[key]
    os.environ.update(env)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if cache is not None:  # one cache directory per rank: as if every rank ran on its own host
        os.environ["CAS_CACHE_DIR"] = os.path.join(cache, f"host{rank}")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))


def _mesh(group: Any) -> Any:
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, "cpu")


def _sharded(mesh: Any, version: int, placements: dict[str, Any] | None = None, zeros: bool = False,
             job: str = "") -> dict[str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor

    out = {}
    for name in MODEL:
        full = torch.zeros_like(reference(name)) if zeros else reference(name, version, job)
        out[name] = distribute_tensor(full, mesh, [(placements or {}).get(name, Shard(0))], src_data_rank=None)
    return out


def _state(mesh: Any, version: int, **kw: Any) -> dict[str, Any]:
    return {"model": _sharded(mesh, version, **kw), "replicated": replicated(version), "step": version}


def _check_loaded(state: dict[str, Any], version: int) -> None:
    for name, dt in state["model"].items():
        full = dt.full_tensor()
        assert torch.equal(full.view(torch.uint8), reference(name, version).view(torch.uint8)), name
    assert torch.equal(state["replicated"], replicated(version))
    assert state["step"] == version


def _fsdp_model(mesh: Any) -> tuple[Any, Any]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _fsdp_phase(rank: int, url: str, out: str, g2: Any, world_mesh: Any) -> None:
    """FSDP2: a model and its AdamW state saved by 2 ranks after a step, loaded by 4."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    dist = torch.distributed
    if rank < 2:
        model, opt = _fsdp_model(_mesh(g2))
        model(torch.ones(8, 64)).sum().backward()
        opt.step()
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, storage_writer=CasStorageWriter(url, tag="fsdp", job="fsdp"),
                 process_group=g2)
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
        exp_avg = {k: v["exp_avg"].full_tensor() for k, v in opt.state_dict()["state"].items()}
        if rank == 0:
            torch.save({"model": full, "exp_avg": exp_avg}, Path(out, "fsdp-ref.pt"))
    dist.barrier()
    model, opt = _fsdp_model(world_mesh)
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, storage_reader=CasStorageReader(url, "fsdp"))
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    ref = torch.load(Path(out, "fsdp-ref.pt"), weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v.full_tensor(), ref["model"][k]), k
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"].full_tensor(), ref["exp_avg"][k]), k
    assert all(float(v["step"]) == 1.0 for v in opt.state_dict()["state"].values())


def _scenario(rank: int, world: int, port: int, env: dict[str, str], url: str, out: str, cache: str | None,
              fsdp: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import Shard

    t0 = time.time()
    _init(rank, world, port, env, cache)
    dist = torch.distributed
    report: dict[str, Any] = {"t_init": time.time() - t0, "start": t0}
    g2 = dist.new_group([0, 1])
    g3 = dist.new_group([0, 1, 2])
    world_mesh = _mesh(dist.group.WORLD)
    # N = 2 ranks save (ranks 2 and 3 wait)
    if rank < 2:
        w = CasStorageWriter(url, tag="n2", job="two")
        dcp.save(_state(_mesh(g2), 0), storage_writer=w, process_group=g2)
        if rank == 0:
            assert w.snapshot is not None
            report["n2"] = w.snapshot.bytes_added
    dist.barrier()
    report["t_n2"] = time.time() - t0
    # N = 4 ranks save, then save again with a small change (delta chains across ranks)
    for tag, version in (("n4-a", 0), ("n4-b", 1)):
        w = CasStorageWriter(url, tag=tag, job="four", metadata={"step": version})
        dcp.save(_state(world_mesh, version), storage_writer=w)
        if rank == 0:
            assert w.snapshot is not None
            report[tag] = w.snapshot.bytes_added
    report["t_n4"] = time.time() - t0
    # M = 4 loads what 2 saved, layer1.weight split by columns (byte ranges of every row)
    target = _state(world_mesh, 0, zeros=True, placements={"layer1.weight": Shard(1)})
    target["replicated"] = torch.zeros(REPLICATED)
    target["step"] = -1
    reader = CasStorageReader(url, "n2")
    dcp.load(target, storage_reader=reader)
    _check_loaded(target, 0)
    report["read_m4"] = reader.bytes_read
    report["t_m4"] = time.time() - t0
    # M = 2 and M = 3 (uneven shards) load what 4 saved
    for group, m in ((g2, 2), (g3, 3)):
        if rank < m:
            target = _state(_mesh(group), 0, zeros=True)
            target["replicated"] = torch.zeros(REPLICATED)
            reader = CasStorageReader(url, "n4-b")
            dcp.load(target, storage_reader=reader, process_group=group)
            _check_loaded(target, 1)
            report[f"read_m{m}"] = reader.bytes_read
        dist.barrier()
    if fsdp:
        _fsdp_phase(rank, url, out, g2, world_mesh)
    report["t_end"] = time.time() - t0
    report["end"] = time.time()
    Path(out, f"scenario-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def _killed_save(rank: int, world: int, port: int, env: dict[str, str], url: str, out: str, victim: int,
                 crash_at: str) -> None:
    import torch.distributed.checkpoint as dcp

    _init(rank, world, port, env, None)
    mesh = _mesh(torch.distributed.group.WORLD)
    dcp.save(_state(mesh, 0), storage_writer=CasStorageWriter(url, tag="good"))
    torch.distributed.barrier()
    Path(out, f"first-{rank}").write_text("ok")
    if rank == victim:  # a rank once its shards are stored, or the coordinator in its commit
        os.environ["CAS_CRASH_AT"] = crash_at
    dcp.save(_state(mesh, 1), storage_writer=CasStorageWriter(url, tag="doomed"))


def _job(rank: int, world: int, port: int, env: dict[str, str], url: str, job: str, steps: int,
         cache: str | None) -> None:
    import torch.distributed.checkpoint as dcp

    _init(rank, world, port, env, cache)
    mesh = _mesh(torch.distributed.group.WORLD)
    for step in range(steps):
        state = {"model": _sharded(mesh, step, job=job), "step": step}
        w = CasStorageWriter(url, tag=f"{job}-{step}", job=job, metadata={"job": job, "step": step})
        if job.endswith("async"):
            dcp.async_save(state, storage_writer=w).result()
        else:
            dcp.save(state, storage_writer=w)
    torch.distributed.destroy_process_group()


#: how ranks start: a fresh interpreter per rank ("spawn"), or forked from a fresh server process that
#: imported torch and cas once ("forkserver", the default: on a loaded 2-core machine four ranks each
#: importing torch take ~40 s). Neither inherits the test process's threads, locks or LMDB handles.
START_METHOD = os.environ.get("CAS_TEST_START_METHOD", "forkserver")
PRELOAD = ["torch", "torch.distributed.checkpoint", "torch.distributed.tensor", "torch.distributed.fsdp",
           "cas.integrations.dcp", "tests.test_dcp"]


def _spawn(fn: Any, world: int, *args: Any) -> Any:
    import multiprocessing

    import torch.multiprocessing as mp

    if START_METHOD == "forkserver":
        multiprocessing.set_forkserver_preload(PRELOAD)
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "CAS_"))}
    return mp.start_processes(fn, args=(world, free_port(), env, *args), nprocs=world, join=False,
                              start_method=START_METHOD)


def _join(ctx: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise AssertionError(f"ranks still running after {timeout_s} s")


# --------------------------------------------------------------------------- tests


def test_sharded_saves_dedup_delta_and_reshard(where: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    cache = str(tmp_path / "hosts") if where.startswith("s3://") else None
    cas.Repository.init(where, chunk_size=CHUNK).close()
    # FSDP2 (fully_shard on a CPU mesh, with AdamW state) in the local run only: the S3 run adds nothing to it
    _join(_spawn(_scenario, 4, where, str(out), cache, cache is None), 150)
    reports = [json.loads((out / f"scenario-{r}.json").read_text()) for r in range(4)]
    model_bytes = sum(reference(n).numel() * reference(n).element_size() for n in MODEL)
    total = model_bytes + REPLICATED * 4
    with cas.Repository.open(where) as repo:
        snaps = {s.tag: s for s in repo.snapshots()}
        assert set(snaps) == {"n2", "n4-a", "n4-b"} | ({"fsdp"} if cache is None else set())
        # one snapshot per global checkpoint, per-rank bytes in its metadata
        assert snaps["n4-a"].metadata["dcp"]["world_size"] == 4
        ranks = snaps["n4-a"].metadata["dcp"]["ranks"]
        assert sorted(r["rank"] for r in ranks) == [0, 1, 2, 3]
        assert sum(r["logical_bytes"] for r in ranks) == total
        # the same tensors sharded 4 ways instead of 2: chunks dedup wherever shard bytes line up
        assert reports[0]["n4-a"] < reports[0]["n2"]
        # one row changed: the second save stores about that (deltas against the previous shards)
        assert reports[0]["n4-b"] < 0.05 * reports[0]["n2"], reports[0]
        assert snaps["n4-b"].parent == snaps["n4-a"].id
        # resharding reads only what each rank keeps: M = 4, about a quarter of the row-sharded tensors
        # each (chunk granularity), but every chunk of layer1.weight, whose columns it splits
        column_split = 512 * 256 * 4
        for r in range(4):
            assert reports[r]["read_m4"] < column_split + 0.4 * (total - column_split), reports[r]
        assert sum(reports[r]["read_m2"] for r in range(2)) < 1.5 * total
        # the replicated tensor is stored once
        rep_ids = _chunk_ids_of(repo, "n4-b", "replicated")
        records = [e for pid in repo.store.list_packs() for e in _footer(repo, pid) if e.chunk_id in rep_ids]
        assert len(records) == len(rep_ids) == -(-REPLICATED * 4 // CHUNK)
        # the unsharded state, bit-identical to the reference
        whole = load_unsharded(repo, "n4-b")
        for name in MODEL:
            assert torch.equal(whole["model"][name].view(torch.uint8), reference(name, 1).view(torch.uint8))
        assert torch.equal(whole["replicated"], replicated(1)) and whole["step"] == 1
        info = dcp_info(repo, "n4-b")
        assert {t["fqn"] for t in info["tensors"]} == {f"model.{n}" for n in MODEL} | {"replicated"}
        assert not repo.resolve("n4-b").metadata.get("pickled")
        assert repo.verify(read_data=True).ok


def _chunk_ids_of(repo: cas.Repository, snapshot: str, fqn: str) -> set[bytes]:
    root, _storages, _node = repo._tree(repo.resolve(snapshot))
    from cas.tree import tensor_leaves

    found = set()
    for path, enc in tensor_leaves(root):
        if path[:2] == ("tensors", fqn):
            found |= {enc[3][i:i + 32] for i in range(0, len(enc[3]), 32)}
    return found


def _footer(repo: cas.Repository, pack_id: Any) -> list[Any]:
    from cas.pack import read_footer

    return list(read_footer(repo.store.pack_source(pack_id)))


@pytest.mark.parametrize(("victim", "crash_at"), [(1, "blobs_stored"), (0, "before_ref")])
def test_rank_killed_mid_save_leaves_previous_snapshot_intact(tmp_path: Path, victim: int, crash_at: str) -> None:
    url = str(tmp_path / "repo")
    out = tmp_path / "out"
    out.mkdir()
    ctx = _spawn(_killed_save, 2, url, str(out), victim, crash_at)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and all(p.is_alive() for p in ctx.processes):
        time.sleep(0.2)
    time.sleep(3)  # the coordinator notices its peer is gone (or is stopped below)
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
        p.join(10)
    assert (out / "first-0").exists() and (out / "first-1").exists()
    assert ctx.processes[victim].exitcode == -signal.SIGKILL
    with cas.Repository.open(url) as repo:
        assert [s.tag for s in repo.snapshots()] == ["good"]  # no half snapshot is visible
        whole = load_unsharded(repo, "good", nested=False)
        for name in MODEL:
            assert torch.equal(whole[f"model.{name}"].view(torch.uint8), reference(name).view(torch.uint8))
        report = repo.gc()  # the killed save's packs are unreferenced; gc is not blocked by a dead lock
        assert report.packs_deleted + report.orphan_packs_deleted >= 1
        assert repo.verify(read_data=True).ok


def test_many_jobs_into_one_repository_beside_gc_and_retention(where: str, tmp_path: Path) -> None:
    cache = str(tmp_path / "hosts") if where.startswith("s3://") else None
    with cas.Repository.init(where, chunk_size=CHUNK) as repo:
        repo.save({"seed": torch.ones(10)}, tag="seed")
    jobs = [_spawn(_job, 2, where, "alpha", 2, cache), _spawn(_job, 2, where, "beta-async", 2, cache)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def gc_loop() -> None:
        try:
            with cas.Repository.open(where) as r:
                while not stop.is_set():
                    r.forget(keep_last=3)
                    r.gc()
                    time.sleep(0.5)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=gc_loop)
    t.start()
    try:
        for ctx in jobs:
            _join(ctx, 150)
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    with cas.Repository.open(where) as repo:
        repo.forget(keep_last=3)
        repo.gc()
        snaps = repo.snapshots()
        assert len(snaps) == 3
        assert {s.tag for s in snaps} >= {"alpha-1", "beta-async-1"}
        for s in snaps:
            whole = load_unsharded(repo, s.id)
            job, step = s.metadata["job"], s.metadata["step"]
            for name in MODEL:
                assert torch.equal(whole["model"][name].view(torch.uint8),
                                   reference(name, step, job).view(torch.uint8)), (s.tag, name)
            assert s.metadata["dcp"]["job"] == job
        assert repo.verify(read_data=True).ok


# --------------------------------------------------------------------------- single process


def test_chunk_runs_read_only_the_rows_a_region_touches() -> None:
    # 64 rows of 4 KiB in 16 KiB chunks: rows 8..15 are chunks 2 and 3
    assert _chunk_runs((64, 1024), 4, (8, 0), (8, 1024), 16384) == [(2, 4)]
    # a column strip touches every row's chunk
    assert _chunk_runs((64, 1024), 4, (0, 0), (64, 10), 16384) == [(0, 16)]
    # every other 4-row block of a column strip of a wide tensor
    assert _chunk_runs((8, 8192), 4, (2, 0), (2, 8), 16384) == [(4, 5), (6, 7)]
    assert _chunk_runs((), 8, (), (), 16384) == [(0, 1)]
    assert _chunk_runs((0, 5), 4, (0, 0), (0, 5), 16384) == []


def test_single_process_ids_match_plain_saves_and_cli(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from click.testing import CliRunner

    from cas.cli import cli

    w = torch.randn(300, 400)
    with cas.Repository.init(tmp_path / "repo", chunk_size=CHUNK) as repo:
        with pytest.warns(UserWarning, match="single process"):
            dcp.save({"model": {"w": w}, "step": 3, "note": "x"},
                     storage_writer=CasStorageWriter(repo, tag="dcp"), no_dist=True)
        # a single-process save of the same tensor stores nothing new
        assert repo.save({"w": w.clone()}, tag="plain").bytes_added < 4096
        assert _chunk_ids_of(repo, "dcp", "model.w")
        target = {"model": {"w": torch.zeros(300, 400)}, "step": 0, "note": ""}
        with pytest.warns(UserWarning, match="single process"):
            dcp.load(target, storage_reader=CasStorageReader(repo, "dcp"), no_dist=True)
        assert torch.equal(target["model"]["w"], w) and target["step"] == 3 and target["note"] == "x"
        from torch.distributed.checkpoint.api import CheckpointException

        with pytest.raises(CheckpointException, match="already names"), \
                pytest.warns(UserWarning, match="single process"):
            dcp.save({"w": w}, storage_writer=CasStorageWriter(repo, tag="dcp"), no_dist=True)
    runner = CliRunner()
    shown = runner.invoke(cli, ["--repo", str(tmp_path / "repo"), "show", "dcp"])
    assert shown.exit_code == 0, shown.output
    assert "model.w" in shown.output and "300x400" in shown.output
    for name in ("whole.pt", "whole.safetensors"):
        res = runner.invoke(cli, ["--repo", str(tmp_path / "repo"), "restore", "dcp", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
    loaded = torch.load(tmp_path / "whole.pt", weights_only=True)
    assert torch.equal(loaded["model"]["w"], w) and loaded["step"] == 3
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "whole.safetensors")["model.w"], w)


def test_checkpoint_manager_works_unchanged_on_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  request: pytest.FixtureRequest) -> None:
    server: MotoServer = request.getfixturevalue("moto_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    for k, v in s3_env(server, tmp_path / "cache").items():
        monkeypatch.setenv(k, v)
    model = torch.nn.Linear(64, 32)
    with cas.Repository.init(f"s3://{bucket}/mgr", chunk_size=CHUNK) as repo:
        mgr = cas.CheckpointManager(repo, max_to_keep=2)
        for step in (10, 20, 30):
            with torch.no_grad():
                model.weight[0, 0] = step
            assert mgr.save(step, {"model": model.state_dict(), "step": step}, force=True)
        mgr.close()
        assert [s.tag for s in repo.snapshots()][-1] == "step-30"
    fresh = torch.nn.Linear(64, 32)
    with cas.Repository.open(f"s3://{bucket}/mgr") as repo:
        mgr = cas.CheckpointManager(repo)
        result = mgr.restore_latest(into={"model": fresh, "step": 0})
        assert result is not None and result.step == 30
        assert torch.equal(fresh.weight, model.weight)
        mgr.close()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_plan_metadata_that_is_not_plain_data_needs_the_pickle_opt_in(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class OddPlanner(DefaultSavePlanner):
        def create_global_plan(self, all_plans: Any) -> Any:
            plans, metadata = super().create_global_plan(all_plans)
            metadata.planner_data = {"mappings": metadata.planner_data, "odd": {1, 2}}  # a set: no plain encoding
            return plans, metadata

    w = torch.randn(64, 64)
    with cas.Repository.init(tmp_path / "repo", chunk_size=CHUNK) as repo:
        with pytest.raises(CheckpointException, match="allow_pickle"):
            dcp.save({"w": w}, storage_writer=CasStorageWriter(repo, tag="odd"), planner=OddPlanner(), no_dist=True)
        assert repo.snapshots() == []
        dcp.save({"w": w}, storage_writer=CasStorageWriter(repo, tag="odd", allow_pickle=True), planner=OddPlanner(),
                 no_dist=True)
        with pytest.raises(CheckpointException, match="allow_pickle"):
            dcp.load({"w": torch.zeros(64, 64)}, storage_reader=CasStorageReader(repo, "odd"), no_dist=True)
        target = {"w": torch.zeros(64, 64)}
        dcp.load(target, storage_reader=CasStorageReader(repo, "odd", allow_pickle=True), no_dist=True)
        assert torch.equal(target["w"], w)
