"""How long a training loop is blocked by CheckpointManager.save vs a synchronous torch.save (+ fsync).

Steady state: the second and later saves of a run, every tensor changed since the
last save. The loop is blocked only while the tensors are copied into the
manager's reused host staging buffers; the commit runs in the background (here it
is awaited between saves, standing in for the training steps between checkpoints).

    .venv/bin/python bench/stall.py [--size-mib 1024] [--rounds 4] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import cas


def make_state(total_mib: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n_layers = max(1, total_mib // 32)
    per = total_mib * 2**20 // 4 // n_layers
    return {f"layer{i}.weight": torch.randn(per, generator=g) * 0.02 for i in range(n_layers)}


def torch_save_fsync(state: dict[str, torch.Tensor], path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cas-stall-", dir=args.dir))
    try:
        state = make_state(args.size_mib)
        blocked: list[float] = []
        commit: list[float] = []
        sync: list[float] = []
        with cas.CheckpointManager(work / "repo", gc_every=0, max_to_keep=2) as mgr:
            for step in range(args.rounds + 1):
                with torch.no_grad():
                    for t in state.values():
                        t.add_(1e-4)  # every tensor changed since the last save
                t0 = time.perf_counter()
                mgr.save(step, state, force=True)
                b = time.perf_counter() - t0
                mgr.wait()
                total = time.perf_counter() - t0
                s = torch_save_fsync(state, work / "ckpt.pt")
                (work / "ckpt.pt").unlink()
                if step == 0:
                    continue  # the first save allocates the staging buffers: not steady state
                blocked.append(b)
                commit.append(total)
                sync.append(s)
        mb, ms, mc = statistics.median(blocked), statistics.median(sync), statistics.median(commit)
        size = f"{args.size_mib} MiB"
        print("| state dict | manager.save blocked (median) | torch.save + fsync | stall ratio | background commit |")
        print("| --- | --- | --- | --- | --- |")
        print(f"| {size} | {mb * 1000:.0f} ms | {ms * 1000:.0f} ms | {mb / ms:.3f} | {mc * 1000:.0f} ms |")
        print(f"\nrounds: {args.rounds}; blocked per round (ms): {[round(x * 1000) for x in blocked]}; "
              f"torch.save per round (ms): {[round(x * 1000) for x in sync]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
