"""S3 benchmark: cas on an S3-compatible server against torch.save / torch.load plus a boto3 transfer.

Run from the repository root::

    .venv/bin/python bench/s3.py [--size 64M|256M|1G] [--rounds N] [--compression default|none|max]

A moto S3 server (``tests/backends/moto_server.py``) is started on 127.0.0.1 and a bucket
created; every client (cas's S3 backend and the boto3 baseline) talks to that one endpoint.
The state dict is the llama-like float32 one of ``bench/throughput.py`` (same generator,
same fixed seed, ~100 tensors). Measured in ``--rounds`` interleaved rounds (the order of
the contenders rotates from round to round), reported as medians:

a. first save: ``cas save`` into a fresh ``s3://`` repository, against ``torch.save`` to a
   local file + fsync + ``upload_file`` of that file (boto3's default transfer config:
   multipart, 8 MiB parts, 10 threads);
b. incremental save after 10 % of the tensors changed (every element of each, like an
   optimizer step: ``w += 1e-3 * randn``), against ``torch.save`` + ``upload_file`` again.
   The bytes cas uploaded for it (the sizes of the objects that are new in the bucket,
   from ``list_objects_v2`` before and after) are set against the bytes of the tensors
   that changed;
c. verified restore of that latest snapshot: warm (same process, index cache in place,
   repository opened beforehand, only ``load`` timed) and cold (a fresh subprocess with
   an empty ``CAS_CACHE_DIR``: ``Repository.open`` + ``load`` timed inside it, so the
   interpreter's and torch's import are not counted), against a boto3 download of the
   ``.pt`` + ``torch.load``. The download is measured twice: ``download_file`` with boto3's
   default transfer config (ranged GETs of 8 MiB, 10 threads) and ``download_file`` with
   multipart off (one GET streamed to the file; labelled ``get_object``); the faster of
   the two is the baseline.

Every S3 request of the process (cas's client and boto3's) is counted per operation, and
moto's price of a 1 MiB ranged GET is measured at the end, on a 1 MiB and on a 64 MiB
object, so the report can say how much of each time is moto's whole-object copy.

moto caveat: moto's server is Python on the same 2 cores as the clients, and it copies a
whole object for every ranged GET (see ``cas/backends/s3.py``). That taxes every ranged
reader: cas reads packs (64 MiB) in ranges, boto3's ``download_file`` reads the ``.pt`` in
8 MiB ranges (so each range copies the whole ``.pt``). The absolute seconds here are
moto's, not S3's; the ratios are side by side on one server.

The markdown report goes to stdout and to ``bench/out/s3.md``; raw timings to
``bench/out/s3.json``.
"""

from __future__ import annotations

import argparse
import collections
import gc
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import boto3  # noqa: E402
import botocore.client  # noqa: E402
import botocore.config  # noqa: E402
import throughput as tp  # noqa: E402  (bench/throughput.py: the state dict and its mutation)
import torch  # noqa: E402
from boto3.s3.transfer import TransferConfig  # noqa: E402

import cas  # noqa: E402
import cas.planes  # noqa: E402
from tests.backends.moto_server import MotoServer  # noqa: E402

MIB = 1 << 20
BUCKET = "cas-bench"
REGION = "us-east-1"
CHANGED = 0.10
OUT_DIR = ROOT / "bench" / "out"
SINGLE_GET = TransferConfig(multipart_threshold=1 << 40, use_threads=False)  # one GET, streamed

TARGETS = {  # benchmark: minimum speed of cas relative to the baseline
    "incremental save, 10 % changed": 5.0,
    "restore, warm cache": 1.5,
    "restore, cold cache": 1.5,
}
BYTES_TARGET = 1.2  # cas upload for the 10 % save / bytes of the changed tensors, at most


class RequestCounter:
    """Counts the S3 API calls of every botocore client in this process (cas's and the baseline's).

    It wraps ``BaseClient._make_api_call`` (one dictionary update per call, nothing else), so the
    report can say how many requests, and how many ranged GETs, each contender made.
    """

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def install(self) -> RequestCounter:
        original = botocore.client.BaseClient._make_api_call
        counter = self

        def counting(client: Any, operation: str, params: dict[str, Any]) -> Any:
            with counter._lock:
                counter.counts[operation] += 1
                if operation == "GetObject" and "Range" in params:
                    counter.counts["GetObject (ranged)"] += 1
            return original(client, operation, params)

        botocore.client.BaseClient._make_api_call = counting
        return self

    def take(self) -> dict[str, int]:
        """The counts since the last ``take`` (and reset them)."""
        with self._lock:
            out = dict(self.counts)
            self.counts.clear()
        return out


REQUESTS = RequestCounter()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall time of ``fn()`` after flushing dirty pages and collecting garbage (as bench/throughput.py)."""
    os.sync()
    gc.collect()
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def digest(sd: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes (to compare a state dict across processes)."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        config=botocore.config.Config(max_pool_connections=16),
    )


def listing(s3: Any, prefix: str) -> dict[str, tuple[int, str]]:
    """key -> (size, etag) under ``prefix``."""
    out: dict[str, tuple[int, str]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = (obj["Size"], obj["ETag"])
    return out


def delete_prefix(s3: Any, prefix: str) -> None:
    keys = list(listing(s3, prefix))
    for i in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True})


# --------------------------------------------------------------------------- cold restore child


def child_restore(url: str, tag: str, want_digest: bool) -> None:
    """In a fresh process with an empty CAS_CACHE_DIR: time Repository.open + load; print JSON."""
    cas.planes.warm_up()  # compile / load the kernels outside the timing, as the parent does
    REQUESTS.install()
    gc.collect()
    start = time.perf_counter()
    repo = cas.Repository.open(url)
    opened = time.perf_counter()
    sd = repo.load(tag)
    done = time.perf_counter()
    repo.close()
    print(
        json.dumps(
            {
                "open_s": opened - start,
                "load_s": done - opened,
                "total_s": done - start,
                "digest": digest(sd) if want_digest else None,
                "requests": REQUESTS.take(),
            }
        )
    )


def cold_restore(url: str, tag: str, cache_dir: Path, want_digest: bool) -> dict[str, Any]:
    env = dict(os.environ, CAS_CACHE_DIR=str(cache_dir))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child-restore", url, "--child-tag", tag]
        + (["--child-digest"] if want_digest else []),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"cold-restore child failed:\n{proc.stderr}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = wall
    return out


# --------------------------------------------------------------------------- the rounds


def rotate(items: list[str], k: int) -> list[str]:
    k %= len(items)
    return items[k:] + items[:k]


class Results:
    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.notes: dict[str, Any] = {"rounds": []}

    def add(self, key: str, seconds: float) -> None:
        self.times.setdefault(key, []).append(seconds)

    def med(self, key: str) -> float:
        return statistics.median(self.times[key])


def run_round(sd: dict[str, torch.Tensor], rnd: int, s3: Any, work: Path, res: Results, compression: str) -> None:
    prefix = f"r{rnd}"
    url = f"s3://{BUCKET}/{prefix}/repo"
    pt_key = f"{prefix}/model.pt"
    pt = work / "model.pt"
    check = rnd == 0
    info: dict[str, Any] = {"round": rnd + 1, "loadavg_start": loadavg(), "requests": {}}
    requests = info["requests"]

    def torch_then_upload(bench: str) -> None:
        pt.unlink(missing_ok=True)
        t_save, _ = timed(lambda: tp.torch_save(sd, pt))  # torch.save + fsync of file and directory
        REQUESTS.take()
        start = time.perf_counter()
        s3.upload_file(str(pt), BUCKET, pt_key)
        t_up = time.perf_counter() - start
        requests[f"{bench}: upload_file"] = REQUESTS.take()
        res.add(f"{bench}|torch.save", t_save)
        res.add(f"{bench}|upload_file", t_up)
        res.add(f"{bench}|baseline", t_save + t_up)

    # a. first save ---------------------------------------------------------------
    repo = cas.Repository.init(url, compression=compression)
    try:
        for impl in rotate(["cas", "baseline"], rnd):
            if impl == "baseline":
                torch_then_upload("first save")
            else:
                REQUESTS.take()
                secs, snap = timed(lambda: repo.save(sd, tag="base"))
                requests["first save: cas"] = REQUESTS.take()
                res.add("first save|cas", secs)
                info["first_bytes_added"] = snap.bytes_added
        info["first_uploaded"] = sum(size for size, _ in listing(s3, prefix + "/repo/").values())
        log(f"  round {rnd + 1}: first saves done (load {loadavg()})")

        # b. incremental save, 10 % of the tensors changed ---------------------------
        names = tp.pick_changed(sd, CHANGED, tp.SEED + rnd)
        tp.mutate(sd, names, tp.SEED + 1000 * rnd + int(CHANGED * 100))
        changed = sum(sd[n].numel() * sd[n].element_size() for n in names)
        info["changed_tensors"] = f"{len(names)}/{len(sd)}"
        info["changed_bytes"] = changed
        for impl in rotate(["cas", "baseline"], rnd):
            if impl == "baseline":
                torch_then_upload("incremental save, 10 % changed")
            else:
                before = listing(s3, prefix + "/repo/")
                REQUESTS.take()
                secs, snap = timed(lambda: repo.save(sd, tag="inc10"))
                requests["incremental save: cas"] = REQUESTS.take()
                after = listing(s3, prefix + "/repo/")
                res.add("incremental save, 10 % changed|cas", secs)
                new = {k: v for k, v in after.items() if k not in before}
                rewritten = {k: v for k, v in after.items() if k in before and before[k] != v}
                info["inc_new_objects"] = len(new)
                info["inc_new_bytes"] = sum(size for size, _ in new.values())
                info["inc_rewritten_objects"] = sorted(rewritten)
                info["inc_rewritten_bytes"] = sum(size for size, _ in rewritten.values())
                info["inc_bytes_added"] = snap.bytes_added
        log(f"  round {rnd + 1}: incremental saves done (load {loadavg()})")
    finally:
        repo.close()

    # c. restores of the latest snapshot -----------------------------------------
    expect = digest(sd) if check else None
    for impl in rotate(["cas warm", "cas cold", "download_file", "get_object"], rnd):
        if impl == "cas warm":
            t_open, warm = timed(lambda: cas.Repository.open(url))
            try:
                REQUESTS.take()
                secs, loaded = timed(lambda warm=warm: warm.load("inc10"))
                requests["warm restore: cas load"] = REQUESTS.take()
            finally:
                warm.close()
            res.add("restore, warm cache|cas", secs)
            res.add("restore, warm cache|cas open", t_open)
            if check and not tp.same_state(sd, loaded):
                raise SystemExit("warm restore loaded a state dict that differs from the one saved")
            del loaded
        elif impl == "cas cold":
            cache = Path(tempfile.mkdtemp(prefix="cold-cache-", dir=work))
            os.sync()
            gc.collect()
            out = cold_restore(url, "inc10", cache, check)
            shutil.rmtree(cache, ignore_errors=True)
            res.add("restore, cold cache|cas", out["total_s"])
            res.add("restore, cold cache|cas open", out["open_s"])
            res.add("restore, cold cache|cas load", out["load_s"])
            res.add("restore, cold cache|child process wall", out["process_wall_s"])
            requests["cold restore: cas open + load"] = out["requests"]
            if check and out["digest"] != expect:
                raise SystemExit("cold restore loaded a state dict that differs from the one saved")
        else:
            pt.unlink(missing_ok=True)
            config = None if impl == "download_file" else SINGLE_GET

            def fetch_and_load(config: Any = config, impl: str = impl) -> dict[str, torch.Tensor]:
                REQUESTS.take()
                start = time.perf_counter()
                if config is None:
                    s3.download_file(BUCKET, pt_key, str(pt))
                else:
                    s3.download_file(BUCKET, pt_key, str(pt), Config=config)
                res.add(f"restore|{impl} download", time.perf_counter() - start)
                requests[f"restore: {impl}"] = REQUESTS.take()
                return tp.torch_load(pt)

            secs, loaded = timed(fetch_and_load)
            res.add(f"restore|{impl} + torch.load", secs)
            if check and not tp.same_state(sd, loaded):
                raise SystemExit(f"{impl} + torch.load gave a state dict that differs from the one saved")
            del loaded
    log(f"  round {rnd + 1}: restores done (load {loadavg()})")

    pt.unlink(missing_ok=True)
    delete_prefix(s3, prefix + "/")
    info["loadavg_end"] = loadavg()
    res.notes["rounds"].append(info)


def calibrate_moto(s3: Any, repeats: int = 5) -> dict[str, float]:
    """Median ms of one 1 MiB ranged GET from a 1 MiB object and from a 64 MiB one (a full pack)."""
    out: dict[str, float] = {}
    for mib in (1, 64):
        key = f"calibrate/{mib}"
        s3.put_object(Bucket=BUCKET, Key=key, Body=os.urandom(mib * MIB))
        ts = []
        for _ in range(repeats):
            start = time.perf_counter()
            s3.get_object(Bucket=BUCKET, Key=key, Range=f"bytes=0-{MIB - 1}")["Body"].read()
            ts.append(time.perf_counter() - start)
        out[f"{mib} MiB object"] = 1000 * statistics.median(ts)
        s3.delete_object(Bucket=BUCKET, Key=key)
    return out


# --------------------------------------------------------------------------- report


def report(res: Results, nbytes: int, args: Any, meta: dict[str, Any]) -> str:
    rounds = res.notes["rounds"]
    # the baseline for both restores: the faster (median) of the two ways to download
    dl = {k: res.med(f"restore|{k} + torch.load") for k in ("download_file", "get_object")}
    best_dl = min(dl, key=lambda k: dl[k])
    for bench in ("restore, warm cache", "restore, cold cache"):
        res.times[f"{bench}|baseline"] = res.times[f"restore|{best_dl} + torch.load"]

    def spread(key: str) -> str:
        ts = res.times[key]
        return f"{min(ts):.2f}-{max(ts):.2f}"

    lines = [
        f"# cas on S3 (moto server on 127.0.0.1) · {args.size} state dict",
        "",
        f"{platform.node()} · {os.cpu_count()} CPUs · Python {platform.python_version()} · torch {torch.__version__}"
        f" · boto3 {boto3.__version__} · moto {meta['moto']} · cas {tp.cas_revision()} (compression "
        f"`{args.compression}`) · {args.rounds} interleaved rounds, median",
        f"State dict: {meta['tensors']} tensors, {nbytes / MIB:.0f} MiB float32 ({meta['shape']}).",
        f"Load average (1/5/15 min) at start {meta['load_start']}, end {meta['load_end']}; per round: "
        + "; ".join(f"r{r['round']} {r['loadavg_start']} -> {r['loadavg_end']}" for r in rounds)
        + ".",
        "",
        "`speedup` = baseline seconds / cas seconds (> 1: cas is faster). Baselines: saves are `torch.save` to a "
        "local file + fsync + boto3 `upload_file`; restores are a boto3 download of the `.pt` + `torch.load` "
        f"(the faster median of `download_file` and one streamed `get_object`: here `{best_dl}`). cas loads verify "
        "every chunk's BLAKE3.",
        "",
        "| benchmark | baseline s (min-max) | cas s (min-max) | speedup | target | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    for bench in (
        "first save",
        "incremental save, 10 % changed",
        "restore, warm cache",
        "restore, cold cache",
    ):
        b, c = res.med(f"{bench}|baseline"), res.med(f"{bench}|cas")
        minimum = TARGETS.get(bench)
        target = f"≥ {minimum:g}x" if minimum else "—"
        met = ("yes" if b / c >= minimum else "**no**") if minimum else ""
        lines.append(
            f"| {bench} | {b:.2f} ({spread(f'{bench}|baseline')}) | {c:.2f} ({spread(f'{bench}|cas')}) "
            f"| {b / c:.2f}x | {target} | {met} |"
        )
    up = statistics.median(r["inc_new_bytes"] for r in rounds)
    ch = statistics.median(r["changed_bytes"] for r in rounds)
    lines.append(
        f"| bytes uploaded by the 10 % save | {ch / MIB:.1f} MiB changed | {up / MIB:.1f} MiB new objects "
        f"| {up / ch:.2f}x of changed | ≤ {BYTES_TARGET:g}x | {'yes' if up / ch <= BYTES_TARGET else '**no**'} |"
    )
    lines += [
        "",
        "Breakdown (medians, seconds):",
        "",
        "| part | median s | min-max s |",
        "|---|---:|---:|",
    ]
    for key in (
        "first save|torch.save",
        "first save|upload_file",
        "incremental save, 10 % changed|torch.save",
        "incremental save, 10 % changed|upload_file",
        "restore, warm cache|cas open",
        "restore, cold cache|cas open",
        "restore, cold cache|cas load",
        "restore, cold cache|child process wall",
        "restore|download_file download",
        "restore|download_file + torch.load",
        "restore|get_object download",
        "restore|get_object + torch.load",
    ):
        if key in res.times:
            lines.append(f"| {key.replace('|', ': ')} | {res.med(key):.2f} | {spread(key)} |")
    first_up = statistics.median(r["first_uploaded"] for r in rounds)
    rewritten = sorted({k.split("/repo/", 1)[-1] for r in rounds for k in r["inc_rewritten_objects"]})
    lines += [
        "",
        f"First save: cas uploaded {first_up / MIB:.1f} MiB ({first_up / nbytes:.2f} of raw); the `.pt` is "
        f"{meta['pt_bytes'] / MIB:.1f} MiB. Incremental: {rounds[-1]['changed_tensors']} tensors changed, "
        f"{ch / MIB:.1f} MiB ({ch / nbytes:.1%} of bytes); cas wrote "
        f"{statistics.median(r['inc_new_objects'] for r in rounds):.0f} new objects, "
        f"{up / MIB:.2f} MiB (its own `bytes_added`: "
        f"{statistics.median(r['inc_bytes_added'] for r in rounds) / MIB:.2f} MiB)"
        + (
            f", and rewrote {', '.join(rewritten)} "
            f"({statistics.median(r['inc_rewritten_bytes'] for r in rounds)} bytes)"
            if rewritten
            else ""
        )
        + ".",
        "",
        "S3 requests per operation (last round; counted on every botocore client in the process):",
        "",
        "| operation | requests | ranged GETs | by API call |",
        "|---|---:|---:|---|",
    ]
    for label, counts in rounds[-1]["requests"].items():
        calls = {k: v for k, v in counts.items() if k != "GetObject (ranged)"}
        lines.append(
            f"| {label} | {sum(calls.values())} | {counts.get('GetObject (ranged)', 0)} "
            f"| {', '.join(f'{k} {v}' for k, v in sorted(calls.items()))} |"
        )
    cal = meta["moto_calibration"]
    lines += [
        "",
        f"moto's price of a ranged GET here (median of 5, machine load at the time {meta['load_end']}): 1 MiB from "
        f"a 1 MiB object {cal['1 MiB object']:.0f} ms, 1 MiB from a 64 MiB object (a full pack) "
        f"{cal['64 MiB object']:.0f} ms: moto copies the whole object per ranged GET, so each per-chunk read "
        f"of a pack pays about {cal['64 MiB object'] - cal['1 MiB object']:.0f} ms more than on a server that "
        "seeks. Ranged readers (cas loads, `download_file`) are slowed by moto far more than a single GET is.",
        "",
        "The cold restore runs in a fresh process with an empty `CAS_CACHE_DIR`; its time is `Repository.open` + "
        "`load` inside the child (interpreter start and imports excluded: `child process wall` includes them).",
        "",
        "moto caveat: the server is moto 5 (Python, on the same two cores as the clients) and it copies the whole "
        "object for every ranged GET (see `cas/backends/s3.py`), which taxes every ranged reader: cas reads 64 MiB "
        "packs in ranges, `download_file` reads the `.pt` in 8 MiB ranges. Absolute seconds are moto's, not S3's; "
        "the ratios are side by side on one server.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256M", help="state dict size: 64M, 256M or 1G (K/M/G suffixes)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--compression", default="default", help="cas compression setting (default, none, max)")
    parser.add_argument("--dir", default=None, help="directory for local files and caches (default: a temp dir)")
    parser.add_argument("--child-restore", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-tag", default="latest", help=argparse.SUPPRESS)
    parser.add_argument("--child-digest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child_restore:
        child_restore(args.child_restore, args.child_tag, args.child_digest)
        return 0
    if args.rounds < 1:
        parser.error("need at least one round")
    size = tp.parse_size(args.size)

    started = time.perf_counter()
    load_start = loadavg()
    log(f"load average {load_start}")
    parent = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cas-s3-bench-", dir=parent))
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": REGION,
            "CAS_CACHE_DIR": str(work / "cache"),
        }
    )
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    res = Results()
    REQUESTS.install()
    try:
        cas.planes.warm_up()  # numba kernels compiled / loaded outside every timing
        log(f"building the {args.size} state dict")
        sd = tp.build_state_dict(size)
        nbytes = tp.nbytes_of(sd)
        shape = tp.plan_shape(size)
        with MotoServer() as srv:
            os.environ["AWS_ENDPOINT_URL"] = srv.endpoint
            log(f"moto server at {srv.endpoint}")
            s3 = s3_client(srv.endpoint)
            s3.create_bucket(Bucket=BUCKET)
            for rnd in range(args.rounds):
                run_round(sd, rnd, s3, work, res, args.compression)
            calibration = calibrate_moto(s3)
            s3.close()
        import moto

        tp.torch_save(sd, work / "size.pt")
        meta = {
            "moto": moto.__version__,
            "tensors": len(sd),
            "shape": f"d={shape.d_model}, ff={shape.d_ff}, vocab={shape.vocab}, layers={shape.layers}",
            "pt_bytes": (work / "size.pt").stat().st_size,
            "load_start": load_start,
            "moto_calibration": calibration,
            "load_end": loadavg(),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    text = report(res, nbytes, args, meta)
    text += f"\nTotal wall time {time.perf_counter() - started:.0f} s.\n"
    print(text, end="")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "s3.md").write_text(text)
    (OUT_DIR / "s3.json").write_text(
        json.dumps({"size": args.size, "bytes": nbytes, "times": res.times, "notes": res.notes, "meta": meta}, indent=2)
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
