"""cas under torch.distributed.checkpoint against DCP's own FileSystemWriter / FileSystemReader.

One run of 4 ranks (gloo on CPU; subgroups give the 2-rank cases): a DTensor-sharded model
(Shard(0) on every tensor; float32 and bfloat16) is saved by N ranks twice, the second time after a
small update (a few rows of a few tensors), to a cas repository (a fresh one per N) and to a DCP
directory per save;
then the second checkpoint is loaded by M != N ranks (resharding) from both. Reported: bytes
written by the first and the incremental save, save times, load time with resharding, and
cas / FileSystemWriter ratios, for N = 2 (M = 4) and N = 4 (M = 2).

    .venv/bin/python bench/dcp.py --mib 256 [--json out.json]

Times are wall clock on rank 0 between barriers (the slowest rank decides). Every load is
checked bit-identical against the saved tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MiB = 1 << 20


def model_spec(mib: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Tensors adding up to about ``mib`` MiB: 8 float32 matrices and 2 bfloat16 embeddings."""
    rows = max(64, (mib * MiB) // (10 * 4096 * 4)) // 64 * 64
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for i in range(8):
        spec[f"layers.{i}.weight"] = ((rows, 4096), torch.float32)
    for i in range(2):
        spec[f"emb.{i}"] = ((rows * 2, 4096), torch.bfloat16)
    return spec


def full(name: str, shape: tuple[int, ...], dtype: torch.dtype, version: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, name)) * 31)
    t = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    if version and name in ("layers.0.weight", "layers.5.weight", "emb.1"):
        t[version * 7 % shape[0]: version * 7 % shape[0] + 8] += 0.01  # a small update: 8 rows of 3 tensors
    return t


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def rank_main(rank: int, world: int, port: int, root: str, mib: int, out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from cas.integrations.dcp import CasStorageReader, CasStorageWriter

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=10))
    torch.set_num_threads(1)
    spec = model_spec(mib)
    groups = {2: dist.new_group([0, 1]), 4: dist.group.WORLD}
    results: dict[str, Any] = {}
    repo_url = os.path.join(root, "cas-repo")

    def state(n: int, version: int, zeros: bool = False) -> dict[str, Any]:
        mesh = DeviceMesh.from_group(groups[n], "cpu")
        return {"model": {name: distribute_tensor(torch.zeros(shape, dtype=dtype) if zeros else
                                                  full(name, shape, dtype, version), mesh, [Shard(0)],
                                                  src_data_rank=None)
                          for name, (shape, dtype) in spec.items()}}

    def timed(n: int, fn: Any) -> float:
        dist.barrier()
        start = time.perf_counter()
        if rank < n:
            fn()
        dist.barrier()
        return time.perf_counter() - start

    # warm-up (not measured): first use of the codecs, thread pools and the repository in each rank
    warm_mesh = DeviceMesh.from_group(groups[4], "cpu")
    warm = {"w": distribute_tensor(torch.randn(256, 4096), warm_mesh, [Shard(0)], src_data_rank=None)}
    dcp.save(warm, storage_writer=CasStorageWriter(f"{repo_url}-warm-up", tag="warm-up"))
    dcp.load(warm, storage_reader=CasStorageReader(f"{repo_url}-warm-up", "warm-up"))
    dcp.save(warm, storage_writer=dcp.FileSystemWriter(Path(root, "fs-warm-up")))
    dcp.load(warm, storage_reader=dcp.FileSystemReader(Path(root, "fs-warm-up")))
    for n, m in ((2, 4), (4, 2)):
        row: dict[str, Any] = {"save_ranks": n, "load_ranks": m}
        for kind in ("cas", "fs"):
            for version, label in ((0, "first"), (1, "incremental")):
                sd = state(n, version) if rank < n else None
                if kind == "cas":
                    tag = f"n{n}-v{version}"
                    writer = CasStorageWriter(f"{repo_url}-n{n}", tag=tag, job=f"n{n}")  # a fresh repository
                    t = timed(n, lambda sd=sd, w=writer, g=groups[n]: dcp.save(sd, storage_writer=w, process_group=g))
                    if rank == 0:
                        assert writer.snapshot is not None
                        row[f"cas_{label}_bytes"] = writer.snapshot.bytes_added
                else:
                    path = Path(root, f"fs-n{n}-v{version}")
                    t = timed(n, lambda sd=sd, p=path, g=groups[n]: dcp.save(
                        sd, storage_writer=dcp.FileSystemWriter(p), process_group=g))
                    if rank == 0:
                        row[f"fs_{label}_bytes"] = dir_bytes(path)
                row[f"{kind}_{label}_save_s"] = t
                del sd
            # the incremental checkpoint, loaded by m ranks (resharded)
            target = state(m, 0, zeros=True) if rank < m else None
            if kind == "cas":
                reader: Any = CasStorageReader(f"{repo_url}-n{n}", f"n{n}-v1")
            else:
                reader = dcp.FileSystemReader(Path(root, f"fs-n{n}-v1"))
            g = groups[m]
            row[f"{kind}_load_s"] = timed(m, lambda t=target, r=reader, g=g: dcp.load(t, storage_reader=r,
                                                                                        process_group=g))
            if rank < m and target is not None:
                for name, dt in target["model"].items():
                    shape, dtype = spec[name]
                    ref = full(name, shape, dtype, 1)
                    local = dt.to_local()
                    offset = dt.__create_chunk_list__()[0].offsets[0] if local.numel() else 0
                    expected = ref.narrow(0, offset, local.shape[0])
                    assert torch.equal(local.view(torch.uint8), expected.view(torch.uint8)), (kind, name)
            del target
        if rank == 0:
            results[f"n{n}"] = row
        dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="global model size in MiB")
    parser.add_argument("--dir", default=None, help="where repositories go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    import multiprocessing

    import torch.multiprocessing as mp

    from tests.backends.moto_server import free_port

    root = tempfile.mkdtemp(prefix="cas-bench-dcp-", dir=args.dir)
    out = os.path.join(root, "results.json")
    spec = model_spec(args.mib)
    total = sum(torch.Size(s).numel() * torch.empty(0, dtype=d).element_size() for s, d in spec.values())
    print(f"model: {len(spec)} tensors, {total / MiB:.0f} MiB; 4 ranks (gloo, CPU); in {root}")
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed.checkpoint", "cas.integrations.dcp"])
    try:
        mp.start_processes(rank_main, args=(4, free_port(), root, args.mib, out), nprocs=4, start_method="forkserver")
        results = json.loads(Path(out).read_text())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    lines = [
        "| save ranks -> load ranks | | first save | incremental save | load (resharded) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key in ("n2", "n4"):
        r = results[key]
        arrow = f"{r['save_ranks']} -> {r['load_ranks']}"
        lines.append(f"| {arrow} | FileSystemWriter bytes | {r['fs_first_bytes'] / MiB:.1f} MiB | "
                     f"{r['fs_incremental_bytes'] / MiB:.1f} MiB | |")
        lines.append(f"| {arrow} | cas bytes | {r['cas_first_bytes'] / MiB:.1f} MiB | "
                     f"{r['cas_incremental_bytes'] / MiB:.2f} MiB | |")
        lines.append(f"| {arrow} | bytes cas / FS | {r['cas_first_bytes'] / r['fs_first_bytes']:.2f} | "
                     f"{r['cas_incremental_bytes'] / r['fs_incremental_bytes']:.3f} | |")
        lines.append(f"| {arrow} | FileSystemWriter time | {r['fs_first_save_s']:.2f} s | "
                     f"{r['fs_incremental_save_s']:.2f} s | {r['fs_load_s']:.2f} s |")
        lines.append(f"| {arrow} | cas time | {r['cas_first_save_s']:.2f} s | {r['cas_incremental_save_s']:.2f} s | "
                     f"{r['cas_load_s']:.2f} s |")
        lines.append(f"| {arrow} | time cas / FS | {r['cas_first_save_s'] / r['fs_first_save_s']:.2f} | "
                     f"{r['cas_incremental_save_s'] / r['fs_incremental_save_s']:.2f} | "
                     f"{r['cas_load_s'] / r['fs_load_s']:.2f} |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
