"""How much a first touch of memory costs on this machine: page-cache writes of 51 MiB (the size of a
10 % incremental save of the 512 MiB bench dict), timed one by one, before and after touching
``--touch-gib`` GiB of anonymous memory (which makes the host back that much of the guest's memory).

    .venv/bin/python bench/experiments/first_touch.py --writes 8 --touch-gib 16

On a VM with free page reporting (``page_reporting`` on the kernel command line) writes that land on
pages the host took back run ~10x slower (bench/experiments/README.md, 2026-12-04).
"""

from __future__ import annotations

import argparse
import mmap
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def writes(directory: Path, data: bytes, count: int) -> list[float]:
    """Milliseconds per write of ``data`` into a new file (the fdatasync after it not counted)."""
    out = []
    paths = [directory / f"w{i}" for i in range(count)]
    for path in paths:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        start = time.perf_counter()
        os.write(fd, data)
        out.append((time.perf_counter() - start) * 1000)
        os.fdatasync(fd)
        os.close(fd)
    for path in paths:
        path.unlink()
    return out


def touch(gib: int) -> float:
    """Seconds to write one byte per 4 KiB page of ``gib`` GiB of fresh anonymous memory (then freed)."""
    start = time.perf_counter()
    for _ in range(gib):
        area = mmap.mmap(-1, 1 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        view = np.frombuffer(area, np.uint8)
        view[::4096] = 1
        del view
        area.close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=8)
    parser.add_argument("--mib", type=int, default=51)
    parser.add_argument("--touch-gib", type=int, default=0, help="touch this much memory, then write again")
    parser.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    args = parser.parse_args()
    reporting = "page_reporting" in Path("/proc/cmdline").read_text() if Path("/proc/cmdline").exists() else False
    print(f"free page reporting on the kernel command line: {'yes' if reporting else 'no'}")
    data = np.random.default_rng(0).integers(0, 256, args.mib << 20, dtype=np.uint8).tobytes()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"{args.mib} MiB page-cache writes, ms:", [round(x) for x in writes(Path(tmp), data, args.writes)])
        if args.touch_gib:
            print(f"touching {args.touch_gib} GiB took {touch(args.touch_gib):.1f} s")
            print("the same writes after it, ms:", [round(x) for x in writes(Path(tmp), data, args.writes)])


if __name__ == "__main__":
    main()
