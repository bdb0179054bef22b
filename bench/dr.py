"""Disaster-recovery benchmark: recovery point (replica lag) and recovery time (restore after the
primary dies), on two moto S3 servers on 127.0.0.1 (one per region).

Run from the repository root::

    .venv/bin/python bench/dr.py [--size 1G] [--saves 6] [--changed 0.1] [--rounds 3]

1. **Recovery point.** A series of ``--saves`` checkpoints of a ``--size`` float32 state dict
   (about 100 tensors; ``--changed`` of them change every save, every element a little, as an
   optimizer step does). After each save one replication round runs (what ``cas replicate``
   does every ``sync.interval`` seconds): the lag *before* the round (snapshots and bytes the
   replica does not hold: what a region loss at that instant would cost) and after it, the
   bytes the round sent, and its time.
2. **Recovery time.** With failover on (``health_check_interval`` 1 s, ``failure_threshold``
   2), the primary's server is SIGKILLed and the latest snapshot restored at once through the
   same repository handle: the time from the kill to the first restored byte and to the last
   (verified) byte, against a plain download of the same ``torch.save`` file from the
   secondary (boto3 ``download_file``, the faster of ranged-threaded and one streamed GET) +
   ``torch.load``, and against the same restore with both
   regions up. Medians of ``--rounds`` rounds (each round restarts the primary and re-replicates).

moto caveat: moto is Python on the same cores as the clients and copies a whole object for
every ranged GET; the seconds are moto's, the ratios are side by side on the same servers.
The markdown report goes to stdout and ``bench/out/dr.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
import torch
from boto3.s3.transfer import TransferConfig

import cas
from tests.backends.moto_server import MotoServer

URL = "s3://ckpt/run7"
MiB = 1 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def make_state(total: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = 100
    per = total // 4 // n
    return {f"layer{i:03d}.weight": torch.randn(per, generator=g) * 0.02 for i in range(n)}


def step(state: dict[str, torch.Tensor], changed: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    names = sorted(state)
    for name in names[: max(1, int(len(names) * changed))]:
        state[name] += 1e-3 * torch.randn(state[name].shape, generator=g)


def server() -> MotoServer:
    srv = MotoServer().start()
    boto3.client("s3", endpoint_url=srv.endpoint, region_name="us-east-1").create_bucket(Bucket="ckpt")
    return srv


def options(srv: MotoServer) -> dict[str, Any]:
    return {"endpoint": srv.endpoint, "timeout": 5.0, "retry_attempts": 2}


def load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--saves", type=int, default=6)
    ap.add_argument("--changed", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    size = parse_size(args.size)
    tmp = Path(tempfile.mkdtemp(prefix="cas-dr-"))
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1",
                      CAS_CACHE_DIR=str(tmp / "cache"))
    lines = [f"# Disaster recovery: {args.size} state dict, {args.saves} saves, {args.changed:.0%} of tensors "
             f"changed per save", "",
             f"machine: {platform.machine()}, {os.cpu_count()} cores, load average before {load_avg()}", ""]
    a, b = server(), server()
    state = make_state(size)
    logical = sum(t.numel() * t.element_size() for t in state.values())

    # 1. recovery point ----------------------------------------------------------------------
    repo = cas.Repository.init(URL, storage_options=options(a))
    repo.add_replica("secondary", URL, storage_options=options(b), region="us-west-2")
    lines += ["## Recovery point: replica lag around each replication round", "",
              "| save | save s | behind before round (snapshots / MiB) | round sent MiB | round s | behind after |",
              "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i in range(args.saves):
        if i:
            step(state, args.changed, i)
        t = time.perf_counter()
        repo.save(state, tag=f"step-{i}")
        save_s = time.perf_counter() - t
        before = repo.replication_lag()["secondary"]
        t = time.perf_counter()
        report = repo.replicate()
        round_s = time.perf_counter() - t
        out = report.rounds[0]
        lines.append(f"| {i} | {save_s:.2f} | {before['snapshots_behind']} / {before['bytes_behind'] / MiB:.1f} | "
                     f"{out.bytes_copied / MiB:.1f} | {round_s:.2f} | {out.lag['snapshots_behind']} / "
                     f"{out.lag['bytes_behind'] / MiB:.1f} |")
    repo.set_failover(health_check_interval=1.0, failure_threshold=2, recovery_threshold=2)
    repo.close()
    pt = tmp / "state.pt"
    torch.save(state, pt)
    client = boto3.client("s3", endpoint_url=b.endpoint, region_name="us-east-1")
    client.upload_file(str(pt), "ckpt", "plain/state.pt")
    pt.unlink()

    # 2. recovery time -----------------------------------------------------------------------
    rows: dict[str, list[float]] = {"first_byte": [], "last_byte": [], "download_load": [], "both_up": [],
                                    "failback": []}
    last = f"step-{args.saves - 1}"
    with cas.Repository.open(URL, storage_options=options(a)) as repo:
        for r in range(args.rounds):
            if r:  # bring a primary back on the same port: empty; failback copies everything into it first
                a = MotoServer(port=a.port).start()
                boto3.client("s3", endpoint_url=a.endpoint, region_name="us-east-1").create_bucket(Bucket="ckpt")
                t = time.perf_counter()
                while repo.region != "primary":
                    time.sleep(0.1)
                rows["failback"].append(time.perf_counter() - t)
            t = time.perf_counter()
            got = repo.load(last)
            rows["both_up"].append(time.perf_counter() - t)
            del got
            first: list[float] = []

            def progress(done: int, total: int, first: list[float] = first) -> None:
                if done and not first:
                    first.append(time.perf_counter())

            killed = time.perf_counter()
            a.kill()
            got = repo.load(last, progress=progress)
            end = time.perf_counter()
            rows["first_byte"].append((first[0] if first else end) - killed)
            rows["last_byte"].append(end - killed)
            assert all(torch.equal(got[k], state[k]) for k in state)
            del got
            # the faster of boto3's ranged, threaded download and one streamed GET (moto copies the
            # whole object for every ranged GET, which taxes the ranged one)
            times = []
            for config in (None, TransferConfig(multipart_threshold=1 << 40)):
                t = time.perf_counter()
                client.download_file("ckpt", "plain/state.pt", str(pt), Config=config)
                loaded = torch.load(pt, mmap=False, weights_only=True)
                times.append(time.perf_counter() - t)
                del loaded
                pt.unlink()
            rows["download_load"].append(min(times))

    def med(k: str) -> float:
        return statistics.median(rows[k])

    lines += ["", f"## Recovery time: the primary SIGKILLed, then the latest snapshot ({logical / MiB:.0f} MiB) "
              "restored through the same handle", "",
              "| measure | seconds (median) | vs download + torch.load from the secondary |",
              "| --- | ---: | ---: |",
              f"| kill -> first restored byte | {med('first_byte'):.2f} | |",
              f"| kill -> last verified byte | {med('last_byte'):.2f} | "
              f"{med('download_load') / med('last_byte'):.2f}x faster |",
              f"| download + torch.load of the .pt from the secondary | {med('download_load'):.2f} | 1.00x |",
              f"| the same restore, both regions up | {med('both_up'):.2f} | "
              f"{med('download_load') / med('both_up'):.2f}x faster |",
              *([f"| primary back (empty) -> caught up and serving again | {med('failback'):.2f} | |"]
                if rows["failback"] else []),
              "", f"load average after: {load_avg()}; rounds: {len(rows['last_byte'])}"]
    b.kill()
    text = "\n".join(lines) + "\n"
    out_dir = Path(__file__).resolve().parent / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "dr.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
