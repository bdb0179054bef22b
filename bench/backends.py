"""S3 client benchmark: boto3 against obstore, side by side, on a local moto server.

Run from the repository root::

    .venv/bin/pip install obstore   # the contender; not a cas dependency (boto3 comes with moto)
    .venv/bin/python bench/backends.py [--rounds 5] [--put-mib 64] [--range-mib 1] [--parallel 16]

Starts moto's S3 server as a subprocess on 127.0.0.1 (a free port), makes a bucket,
and times, for each client, interleaved (every round runs every case once, the order
of the clients rotating from round to round), the medians of ``--rounds`` rounds:

* a 64 MiB put as one PUT, and as a multipart upload (16 MiB parts, 4 in parallel);
* a single 1 MiB ranged GET (the median of 8 per round);
* 16 ranged GETs of 1 MiB in parallel, 0.5 MiB apart, from a 24 MiB object: boto3 on
  16 threads; obstore on 16 threads, and with ``get_ranges`` (one call: it merges
  ranges less than 1 MiB apart, so here it makes one 23.5 MiB GET); cas's
  ``read_ranges`` (merges gaps up to 1 MiB into spans of at most 16 MiB: here 2 GETs);
* the same through ``cas.backends.S3Backend`` (``write`` and ``read_ranges``), so the
  backend's own overhead over its client shows.

Then each client is checked for what the engine needs from conditional writes against
this server: create-only (``If-None-Match: *``) refused on an existing key,
compare-and-swap (``If-Match: <etag>``) refused on a stale ETag, create-only on a
multipart upload, listing and aborting incomplete multipart uploads.

The server is moto (Python, single process) on the same 2-core machine as the client,
so absolute numbers measure moto as much as the client; what they compare is the
clients' overhead on the same server. The ranged reads use a 24 MiB object because
moto copies the whole body for every ranged GET (bodies over 32 MiB also cost it
fresh mmaps each time: a 1 MiB range of a 64 MiB object takes it ~130 ms against
~27 ms for an 8 MiB one), which would swamp the clients. Both tables go to stdout as
markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import boto3  # noqa: E402
import botocore.config  # noqa: E402
import botocore.exceptions  # noqa: E402

try:
    import obstore
    from obstore.store import S3Store
except ImportError:
    raise SystemExit("bench/backends.py compares against obstore: .venv/bin/pip install obstore") from None

from cas.backends import S3Backend  # noqa: E402
from cas.errors import CasError  # noqa: E402
from tests.backends.moto_server import MotoServer  # noqa: E402

MiB = 1 << 20
BUCKET = "cas-bench"
KEY_ID, SECRET, REGION = "bench", "bench", "us-east-1"


def make_boto3(endpoint: str) -> object:
    cfg = botocore.config.Config(
        max_pool_connections=32, retries={"total_max_attempts": 1}, s3={"addressing_style": "path"}
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        config=cfg,
    )


def make_obstore(endpoint: str) -> S3Store:
    return S3Store(
        BUCKET,
        endpoint=endpoint,
        region=REGION,
        access_key_id=KEY_ID,
        secret_access_key=SECRET,
        virtual_hosted_style_request=False,
        client_options={"allow_http": True, "pool_max_idle_per_host": "32"},
    )


def boto3_multipart(s3: object, key: str, data: bytes, part: int, workers: int) -> None:
    c = s3  # botocore client; typed loosely to keep this script simple
    up = c.create_multipart_upload(Bucket=BUCKET, Key=key)  # type: ignore[attr-defined]
    uid = up["UploadId"]
    spans = [(i, o, min(part, len(data) - o)) for i, o in enumerate(range(0, len(data), part), 1)]

    def one(span: tuple[int, int, int]) -> dict[str, object]:
        n, off, ln = span
        r = c.upload_part(Bucket=BUCKET, Key=key, UploadId=uid, PartNumber=n, Body=data[off : off + ln])  # type: ignore[attr-defined]
        return {"PartNumber": n, "ETag": r["ETag"]}

    with ThreadPoolExecutor(workers) as ex:
        parts = list(ex.map(one, spans))
    c.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=uid, MultipartUpload={"Parts": parts})  # type: ignore[attr-defined]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> None:
    put_n = int(args.put_mib * MiB)
    rng_n = int(args.range_mib * MiB)
    par = args.parallel
    data = os.urandom(put_n)
    spacing = rng_n + rng_n // 2  # 0.5 MiB gaps: obstore's get_ranges merges them, the others do not
    src = os.urandom(par * spacing)
    offsets = [i * spacing for i in range(par)]

    with MotoServer() as srv:
        s3 = make_boto3(srv.endpoint)
        s3.create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]
        ob = make_obstore(srv.endpoint)
        s3.put_object(Bucket=BUCKET, Key="src", Body=src)  # type: ignore[attr-defined]
        be = S3Backend(
            BUCKET, "cas", endpoint=srv.endpoint, region=REGION, access_key_id=KEY_ID, secret_access_key=SECRET
        )
        be.write("src", src)
        pool = ThreadPoolExecutor(par)

        def b3_get(off: int) -> bytes:
            r = s3.get_object(Bucket=BUCKET, Key="src", Range=f"bytes={off}-{off + rng_n - 1}")  # type: ignore[attr-defined]
            body: bytes = r["Body"].read()
            return body

        def ob_get(off: int) -> bytes:
            return bytes(obstore.get_range(ob, "src", start=off, length=rng_n))

        def single(get: Callable[[int], bytes]) -> Callable[[], object]:
            def go() -> object:
                return [get(o) for o in offsets[:8]]

            return go

        cases: dict[str, dict[str, Callable[[], object]]] = {
            f"put {args.put_mib:g} MiB, one PUT": {
                "boto3": lambda: s3.put_object(Bucket=BUCKET, Key="p-b3", Body=data),  # type: ignore[attr-defined]
                "obstore": lambda: obstore.put(ob, "p-ob", data, use_multipart=False),
            },
            f"put {args.put_mib:g} MiB, multipart 16 MiB x 4 parallel": {
                "boto3": lambda: boto3_multipart(s3, "m-b3", data, 16 * MiB, 4),
                "obstore": lambda: obstore.put(ob, "m-ob", data, chunk_size=16 * MiB, max_concurrency=4),
                "cas S3Backend (boto3)": lambda: be.write("m-be", data),
            },
            f"get {args.range_mib:g} MiB range, single (per GET)": {
                "boto3": single(b3_get),
                "obstore": single(ob_get),
                "cas S3Backend (boto3)": lambda: [be.read_range("src", o, rng_n) for o in offsets[:8]],
            },
            f"get {par} x {args.range_mib:g} MiB ranges in parallel": {
                "boto3 (16 threads)": lambda: list(pool.map(b3_get, offsets)),
                "obstore get_ranges": lambda: obstore.get_ranges(
                    ob, "src", starts=offsets, ends=[o + rng_n for o in offsets]
                ),
                "obstore (16 threads)": lambda: list(pool.map(ob_get, offsets)),
                "cas S3Backend.read_ranges": lambda: be.read_ranges("src", [(o, rng_n) for o in offsets]),
            },
        }
        per_op = {name: (8 if "single" in name else 1) for name in cases}
        nbytes = {
            name: (put_n if name.startswith("put") else rng_n * (8 if "single" in name else par)) for name in cases
        }
        # warm-up: one of each (connection pools, moto's first-request costs)
        for impls in cases.values():
            for fn in impls.values():
                fn()
        times: dict[tuple[str, str], list[float]] = {}
        for rnd in range(args.rounds):
            for name, impls in cases.items():
                names = list(impls)
                k = rnd % len(names)
                for impl in names[k:] + names[:k]:
                    times.setdefault((name, impl), []).append(timed(impls[impl]))
        pool.shutdown()

        print(
            f"\nmoto {moto_version()} server on 127.0.0.1, {platform.machine()}, {os.cpu_count()} cores; "
            f"boto3 {boto3.__version__}, obstore {obstore.__version__}; medians of {args.rounds} rounds, "
            "interleaved\n"
        )
        print("| case | client | median | MiB/s | min - max |")
        print("| --- | --- | ---: | ---: | --- |")
        for (name, impl), ts in times.items():
            med = statistics.median(ts) / per_op[name]
            mibs = nbytes[name] / per_op[name] / MiB / med
            lo, hi = min(ts) / per_op[name], max(ts) / per_op[name]
            print(f"| {name} | {impl} | {fmt(med)} | {mibs:.0f} | {fmt(lo)} - {fmt(hi)} |")

        print("\nConditional writes and incomplete uploads against this server:\n")
        print("| check | boto3 | obstore |")
        print("| --- | --- | --- |")
        for check, (b3, obs) in conditional_checks(s3, ob).items():
            print(f"| {check} | {b3} | {obs} |")
        be.close()
        s3.close()  # type: ignore[attr-defined]


def conditional_checks(s3: object, ob: S3Store) -> dict[str, tuple[str, str]]:
    c = s3
    out: dict[str, tuple[str, str]] = {}

    def b3(fn: Callable[[], object]) -> str:
        try:
            fn()
        except botocore.exceptions.ClientError as e:
            return f"refused ({e.response['ResponseMetadata']['HTTPStatusCode']} {e.response['Error']['Code']})"
        return "IGNORED (write went through)"

    def obs(fn: Callable[[], object]) -> str:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reporting whatever obstore raises
            return f"refused ({type(e).__name__})"
        return "IGNORED (write went through)"

    etag = c.put_object(Bucket=BUCKET, Key="c-b3", Body=b"one")["ETag"]  # type: ignore[attr-defined]
    c.put_object(Bucket=BUCKET, Key="c-b3", Body=b"two")  # type: ignore[attr-defined]
    oet = obstore.put(ob, "c-ob", b"one")["e_tag"]
    obstore.put(ob, "c-ob", b"two")
    out["create-only on an existing key (`If-None-Match: *`)"] = (
        b3(lambda: c.put_object(Bucket=BUCKET, Key="c-b3", Body=b"x", IfNoneMatch="*")),  # type: ignore[attr-defined]
        obs(lambda: obstore.put(ob, "c-ob", b"x", mode="create")),
    )
    out["compare-and-swap on a stale ETag (`If-Match`)"] = (
        b3(lambda: c.put_object(Bucket=BUCKET, Key="c-b3", Body=b"x", IfMatch=etag)),  # type: ignore[attr-defined]
        obs(lambda: obstore.put(ob, "c-ob", b"x", mode={"e_tag": oet or ""})),
    )

    def b3_mp_create() -> None:
        up = c.create_multipart_upload(Bucket=BUCKET, Key="c-b3")  # type: ignore[attr-defined]
        try:
            r = c.upload_part(Bucket=BUCKET, Key="c-b3", UploadId=up["UploadId"], PartNumber=1, Body=b"y")  # type: ignore[attr-defined]
            c.complete_multipart_upload(  # type: ignore[attr-defined]
                Bucket=BUCKET,
                Key="c-b3",
                UploadId=up["UploadId"],
                MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": r["ETag"]}]},
                IfNoneMatch="*",
            )
        finally:
            with contextlib.suppress(botocore.exceptions.ClientError):  # gone if the complete went through
                c.abort_multipart_upload(Bucket=BUCKET, Key="c-b3", UploadId=up["UploadId"])  # type: ignore[attr-defined]

    def b3_mp_cas() -> None:
        up = c.create_multipart_upload(Bucket=BUCKET, Key="c-b3")  # type: ignore[attr-defined]
        try:
            r = c.upload_part(Bucket=BUCKET, Key="c-b3", UploadId=up["UploadId"], PartNumber=1, Body=b"z")  # type: ignore[attr-defined]
            c.complete_multipart_upload(  # type: ignore[attr-defined]
                Bucket=BUCKET,
                Key="c-b3",
                UploadId=up["UploadId"],
                MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": r["ETag"]}]},
                IfMatch=etag,
            )
        finally:
            with contextlib.suppress(botocore.exceptions.ClientError):  # gone if the complete went through
                c.abort_multipart_upload(Bucket=BUCKET, Key="c-b3", UploadId=up["UploadId"])  # type: ignore[attr-defined]

    out["compare-and-swap (`If-Match`, stale) on a multipart upload"] = (
        b3(b3_mp_cas),
        "not offered: `put(mode={'e_tag': ...})` always makes a single PUT",
    )
    out["create-only on a multipart upload"] = (
        b3(b3_mp_create),
        "not offered: `put(mode='create')` always makes a single PUT",
    )
    c.create_multipart_upload(Bucket=BUCKET, Key="left-over")  # type: ignore[attr-defined]
    ups = c.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])  # type: ignore[attr-defined]
    for u in ups:
        c.abort_multipart_upload(Bucket=BUCKET, Key=u["Key"], UploadId=u["UploadId"])  # type: ignore[attr-defined]
    left = c.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])  # type: ignore[attr-defined]
    out["list / abort incomplete multipart uploads"] = (
        f"yes (listed {len(ups)}, {len(left)} left after abort)",
        "not offered (no ListMultipartUploads)",
    )
    return out


def moto_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("moto")


def fmt(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--put-mib", type=float, default=64)
    ap.add_argument("--range-mib", type=float, default=1)
    ap.add_argument("--parallel", type=int, default=16)
    args = ap.parse_args()
    if args.rounds < 3:
        ap.error("--rounds must be at least 3 (the table reports medians)")
    try:
        run(args)
    except CasError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
