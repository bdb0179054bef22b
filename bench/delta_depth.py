"""Restore time of a chunk against its delta-chain depth: the measurement behind max_delta_depth.

A pretraining-like series (every weight moves a little each save) is saved with a
high depth limit, so snapshot k's chunks sit at depth k. Each snapshot is then
restored with a cold base cache, interleaved over several rounds; the table gives
the median time relative to the keyframe snapshot (depth 0).

    .venv/bin/python bench/delta_depth.py [--mib 64] [--depth 12] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import cas


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cas-depth-"))
    try:
        numel = args.mib * 2**20 // 4
        g = torch.Generator().manual_seed(0)
        w = torch.randn(numel, generator=g) * 0.02
        sizes = []
        with cas.Repository.init(work / "r", max_delta_depth=args.depth) as repo:
            for k in range(args.depth + 1):
                w = w + torch.randn(numel, generator=g) * 2e-4
                sizes.append(repo.save({"w": w}, tag=f"d{k}").bytes_added / (numel * 4))
            times: dict[int, list[float]] = {k: [] for k in range(args.depth + 1)}
            for _ in range(args.rounds):
                for k in range(args.depth + 1):
                    repo.reader.clear_cache()
                    t0 = time.perf_counter()
                    repo.load(f"d{k}")
                    times[k].append(time.perf_counter() - t0)
        key = statistics.median(times[0])
        print("| depth | stored / raw | restore s (median) | vs keyframe |")
        print("| ---: | ---: | ---: | ---: |")
        for k in range(args.depth + 1):
            med = statistics.median(times[k])
            print(f"| {k} | {sizes[k]:.3f} | {med:.3f} | {med / key:.2f}x |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
