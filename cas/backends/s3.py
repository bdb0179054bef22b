"""An S3-compatible backend on botocore (boto3's engine): ``s3://BUCKET/PREFIX`` on AWS, MinIO, Ceph, R2, moto...

Client: botocore (the engine under boto3), chosen over obstore (the Python bindings of
Rust's ``object_store``) by measurement and by what each can do against an S3 server.
``bench/backends.py`` (``.venv/bin/python bench/backends.py --rounds 5``) runs both
against moto's server on 127.0.0.1, interleaved, medians of 5 rounds (2-core machine,
moto 5.2.5, boto3/botocore 1.44.8, obstore 0.12.1):

    | case                                        | boto3     | obstore                       | S3Backend |
    | 64 MiB, one PUT                             | 972 ms    | 927 ms                        |           |
    | 64 MiB, multipart 16 MiB x 4 parallel       | 2094 ms   | 2179 ms                       | 1964 ms   |
    | 1 MiB ranged GET                            | 30.0 ms   | 27.1 ms                       | 27.1 ms   |
    | 16 x 1 MiB ranges, 16 parallel              | 272 ms    | 240 ms (get_ranges: 104 ms)   | 74 ms     |

On one server the two clients are within the noise of each other: the server (moto, in
Python, on the same two cores) sets the pace, not the client. (obstore's ``get_ranges``
wins its row by merging ranges under 1 MiB apart into one GET, which ``read_ranges``
here does as well, in spans of at most ``part_size`` fetched in parallel.) What
decided it is the rest of the table the bench prints: both clients' single PUTs honour
``If-None-Match: *`` and ``If-Match`` on moto, but obstore turns any conditional put into
one PUT (no conditional multipart upload, so no parallel create of a multi-GB pack) and
has no ListMultipartUploads, so the ``abort_incomplete_uploads`` that GC needs after a
killed writer cannot be written on it; its errors also come as a few coarse classes
where botocore gives the service's error code and HTTP status, which the one-place
error translation below relies on. botocore is pure Python (one dependency, no
native wheel) and the reference S3 client.

What moto (5.2, server mode) does and does not do, as the tests found: it enforces
``If-None-Match: *`` on PutObject and CompleteMultipartUpload and ``If-Match`` on
PutObject; it IGNORES ``If-Match`` on CompleteMultipartUpload (so compare-and-swap
writes here are single PUTs, see :meth:`S3Backend._multipart_allowed`, and
:meth:`S3Backend.probe_conditional_writes` records it); it accepts any credentials
unless started with IAM checks (``INITIAL_NO_AUTH_ACTION_COUNT``), which the tests do
for the wrong-credentials case; it reports every multipart upload as initiated in 2010
(so an age filter on incomplete uploads cannot be tested against it); and it copies a
whole object for each ranged GET.

How it maps the interface:

* ``write``: one ``PutObject`` below ``multipart_threshold`` (64 MiB), else a multipart
  upload of ``part_size`` (16 MiB) parts sent ``max_concurrency`` at a time; a failed or
  interrupted upload is aborted before the error is raised (parts still in flight are
  waited for first, so the abort is final). ``mode="create"`` sends
  ``If-None-Match: *`` and ``if_version=`` sends ``If-Match: <etag>``, on the
  ``PutObject`` or on the ``CompleteMultipartUpload``; either way the service decides
  atomically. A CAS against a key that is gone is a ``PreconditionFailedError`` (S3
  answers 404 there). :meth:`~cas.backends.base.Backend.probe_conditional_writes`
  detects a store that silently ignores those headers.
* Reads are ranged ``GetObject`` calls. A whole-object read asks for the first
  ``part_size`` bytes and, if the object is larger, fetches the rest in parallel,
  pinned to the first response's ETag with ``If-Match`` (an overwrite in between
  restarts the read, so a reader never mixes two versions). ``read_ranges`` sorts
  the ranges, merges neighbours less than ``coalesce_gap`` apart (up to ``read_span``, 128 MiB,
  per request), fetches the merged spans in parallel and checks that every response
  came from one version. A range starting at or past the end (HTTP 416) reads as
  ``b""``, as ``pread`` would.
* ``list`` is ``ListObjectsV2`` with ``StartAfter``; ``copy`` is ``CopyObject`` (multipart
  ``UploadPartCopy`` above 5 GiB), pinned to the source's ETag.
* ``list_incomplete_uploads`` / ``abort_incomplete_uploads(older_than_s)`` (also
  ``cleanup_incomplete``) find and abort multipart uploads that a killed writer left.
* botocore's own retries are off (one attempt per call, ``connect_timeout`` and
  ``read_timeout`` = ``timeout``), so a failure surfaces within the timeout as a typed
  error; :class:`~cas.backends.retry.RetryingBackend` (which ``open_backend`` wraps
  around this) retries the transient ones.

Errors are translated in one place, :meth:`S3Backend._translate`: connection errors,
timeouts, 5xx (but 501), ``SlowDown`` / throttling and ``RequestTimeout`` ->
``StorageUnavailableError``; 403, ``AccessDenied``, ``InvalidAccessKeyId``,
``SignatureDoesNotMatch``, missing credentials -> ``StoragePermissionError``; 404,
``NoSuchKey`` -> ``ObjectNotFoundError`` (``NoSuchBucket`` -> ``BucketNotFoundError``, a
subclass); 412 ``PreconditionFailed`` and 409 ``ConditionalRequestConflict`` ->
``PreconditionFailedError``; the rest -> ``StorageError``. Each message is one line that
names the endpoint, the bucket, the key and the operation.
"""

from __future__ import annotations

import builtins
import contextlib
import email.utils
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import botocore.config
import botocore.exceptions
import botocore.session

from cas.backends.base import (
    RESERVED_PREFIX,
    Backend,
    BucketNotFoundError,
    Capabilities,
    ObjectInfo,
    WriteMode,
    is_valid_key,
)
from cas.errors import (
    ArchivedError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
    StoragePermissionError,
    StorageUnavailableError,
    UsageError,
)

MiB = 1 << 20
GiB = 1 << 30
MAX_PARTS = 10_000
MIN_PART = 5 * MiB
MAX_COPY_OBJECT = 5 * GiB
MAX_PUT = 5 * GiB  # the largest single PutObject S3 accepts

T = TypeVar("T")

_PERMISSION_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AccountProblem",
    "InvalidSecurity",
    "NotSignedUp",
    "403",
    "Forbidden",
}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
    "503",
    "500",
}
#: storage classes whose objects need a restore request before a GET
_ARCHIVE_CLASSES = {"GLACIER", "DEEP_ARCHIVE"}
_PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412"}
_CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    botocore.exceptions.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ...
    botocore.exceptions.HTTPClientError,  # ReadTimeoutError and other urllib3 failures
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.FlexibleChecksumError,  # bytes damaged in transit: a retry fetches them again
    OSError,
)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True, slots=True)
class IncompleteUpload:
    """A multipart upload that was started and neither completed nor aborted."""

    key: str
    upload_id: str
    initiated: float  # seconds since the epoch, as the service reports it


class _VersionChanged(Exception):
    """Internal: the object was overwritten between the requests of one read."""


def _apply_range(data: bytes, rng: str | None) -> bytes:
    """Cut a whole object's bytes down to an HTTP Range we asked for (``bytes=a-b`` or ``bytes=-n``)."""
    if rng is None:
        return data
    spec = rng.removeprefix("bytes=")
    first, _, last = spec.partition("-")
    if not first:
        return data[-int(last) :]
    return data[int(first) : int(last) + 1 if last else None]


_SESSION_LOCK = threading.Lock()
_SESSION: list[botocore.session.Session] = []


def _session() -> botocore.session.Session:
    """One botocore session per process (under ``_SESSION_LOCK``): it caches the parsed S3
    service model, so a second backend costs milliseconds, not a few hundred of them."""
    if not _SESSION:
        _SESSION.append(botocore.session.Session())
    return _SESSION[0]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class S3Backend(Backend):
    """Objects under ``prefix`` in ``bucket`` of an S3-compatible service.

    Arguments left ``None`` come from the environment: ``AWS_ENDPOINT_URL_S3`` /
    ``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (else ``us-east-1``),
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` (and, when
    no key is set at all, botocore's usual profile / role chain). ``http://`` endpoints
    are allowed (MinIO, moto, a local gateway). ``timeout`` bounds connecting and each
    read of a response, in seconds.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        timeout: float = 30.0,
        multipart_threshold: int = 64 * MiB,
        part_size: int = 16 * MiB,
        max_concurrency: int = 16,
        coalesce_gap: int = 1 * MiB,
        storage_class: str | None = None,
        read_span: int = 128 * MiB,
    ) -> None:
        if not isinstance(bucket, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}", bucket):
            raise UsageError(f"S3 bucket name {bucket!r} is not valid")
        prefix = prefix.strip("/")
        if prefix and not is_valid_key(prefix):
            raise UsageError(f"S3 prefix {prefix!r} is not a valid key prefix")
        if part_size < MIN_PART:
            raise UsageError(f"S3 part_size must be at least 5 MiB (the service minimum), got {part_size}")
        if multipart_threshold < part_size:
            raise UsageError("S3 multipart_threshold must be at least part_size")
        if read_span < 1:
            raise UsageError(f"S3 read_span must be positive, got {read_span}")
        if timeout <= 0 or max_concurrency < 1 or coalesce_gap < 0:
            raise UsageError("S3 timeout and max_concurrency must be positive, coalesce_gap >= 0")
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        if endpoint is not None and not re.match(r"https?://[^/]+", endpoint):
            raise UsageError(f"S3 endpoint {endpoint!r} must be an http:// or https:// URL")
        self.bucket = bucket
        self.prefix = prefix + "/" if prefix else ""
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.timeout = float(timeout)
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self.coalesce_gap = coalesce_gap
        self.read_span = read_span
        if storage_class is not None and not re.fullmatch(r"[A-Z_]{2,32}", str(storage_class)):
            raise UsageError(f"S3 storage_class {storage_class!r} is not a storage class name (e.g. GLACIER)")
        #: the storage class every write asks for (None: the bucket's default, STANDARD)
        self.storage_class = storage_class
        self._put_extra: dict[str, str] = {"StorageClass": storage_class} if storage_class else {}
        self._bucket_known = False
        # Whether multipart completes honour If-None-Match / If-Match; filled by probe_conditional_writes.
        self.conditional_multipart: dict[str, bool] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        access_key_id = access_key_id or os.environ.get("AWS_ACCESS_KEY_ID") or None
        secret_access_key = secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY") or None
        session_token = session_token or os.environ.get("AWS_SESSION_TOKEN") or None
        if (access_key_id is None) != (secret_access_key is None):
            raise StoragePermissionError(
                f"{self.describe()}: an access key id needs its secret access key (and the other way round)"
            )
        config = botocore.config.Config(
            connect_timeout=self.timeout,
            read_timeout=self.timeout,
            retries={"total_max_attempts": 1},
            max_pool_connections=max(10, 2 * max_concurrency),
            s3={"addressing_style": "path" if self.endpoint else "auto"},
            tcp_keepalive=True,
        )
        with self._errors("connect", ""), _SESSION_LOCK:
            self._client: Any = _session().create_client(
                "s3",
                region_name=self.region,
                endpoint_url=self.endpoint,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                aws_session_token=session_token,
                config=config,
            )

    # -- plumbing -------------------------------------------------------------------

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix.rstrip('/')}".rstrip("/")
        return f"{where} at {self.endpoint}" if self.endpoint else f"{where} ({self.region})"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            conditional_create=True,
            compare_and_swap=True,
            atomic_replace=True,
            range_reads=True,
            multipart=True,
            durable_write=True,
            consistent_list=True,
            zero_copy_read_into=False,
            local_path=None,
        )

    def _k(self, key: str) -> str:
        return self.prefix + key

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="cas-s3")
            return self._pool

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
        with contextlib.suppress(Exception):
            self._client.close()

    @contextlib.contextmanager
    def _errors(self, op: str, key: str, *, cas: bool = False) -> Iterator[None]:
        try:
            yield
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as e:
            raise self._translate(e, op, key, cas=cas) from e

    def _translate(self, e: Exception, op: str, key: str, *, cas: bool = False) -> StorageError:
        """The one place where client errors become cas errors."""
        what = f"{self.describe()}: {op} {key}".rstrip()
        if isinstance(e, botocore.exceptions.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            msg = _one_line(err.get("Message", "") or code)
            detail = f"{code}: {msg} (HTTP {status})" if code and code != str(status) else f"HTTP {status} {msg}"
            if code == "NoSuchBucket":
                return BucketNotFoundError(f"{what}: bucket {self.bucket!r} does not exist ({detail})")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                if cas:
                    return PreconditionFailedError(f"{what}: the object is gone (compare-and-swap lost)")
                return ObjectNotFoundError(f"{what}: no such object")
            if code == "InvalidObjectState":
                return ArchivedError(
                    f"{what}: the object is in an archive storage class; request a restore first "
                    "(`cas restore --warmup`)", [key]
                )
            if code == "NoSuchUpload":
                return ObjectNotFoundError(f"{what}: the multipart upload no longer exists ({detail})")
            if code in _PRECONDITION_CODES or status == 412 or (status == 409 and "Conditional" in code):
                return PreconditionFailedError(f"{what}: precondition failed ({detail})")
            if code in _PERMISSION_CODES or status in (401, 403):
                return StoragePermissionError(
                    f"{what}: access refused ({detail}); check the access key, the secret and the bucket's policy"
                )
            if status == 501 or code == "NotImplemented":
                return StorageError(f"{what}: the store does not implement this request ({detail})")
            if code in _TRANSIENT_CODES or status == 429 or status >= 500:
                return StorageUnavailableError(f"{what}: {detail} (transient; retry)")
            return StorageError(f"{what}: {detail}")
        if isinstance(e, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
            return StoragePermissionError(
                f"{what}: no credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or pass "
                "access_key_id / secret_access_key"
            )
        if isinstance(e, _CONNECTION_ERRORS):
            return StorageUnavailableError(f"{what}: cannot reach the store: {_one_line(str(e))}")
        return StorageError(f"{what}: {_one_line(str(e))}")

    def _not_found(self, key: str, op: str) -> ObjectNotFoundError:
        """A HEAD 404 has no body: tell a missing bucket from a missing key."""
        if not self._bucket_known:
            try:
                self._client.head_bucket(Bucket=self.bucket)
                self._bucket_known = True
            except botocore.exceptions.ClientError as e:
                if int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0) == 404:
                    return BucketNotFoundError(f"{self.describe()}: {op} {key}: bucket {self.bucket!r} does not exist")
            except (botocore.exceptions.BotoCoreError, OSError) as e:
                raise self._translate(e, op, key) from e
        return ObjectNotFoundError(f"{self.describe()}: {op} {key}: no such object")

    def _run_all(self, fns: Sequence[Callable[[], T]]) -> builtins.list[T]:
        """Run ``fns`` on the pool; on the first failure cancel what has not started, wait
        for what has, and raise that failure."""
        if len(fns) == 1:
            return [fns[0]()]
        futures: builtins.list[Future[T]] = [self._executor().submit(fn) for fn in fns]
        done, not_done = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            for g in not_done:
                g.cancel()
            wait(not_done)
            exc = failed.exception()
            assert exc is not None
            raise exc
        return [f.result() for f in futures]

    # -- reads ----------------------------------------------------------------------

    def _get(self, key: str, rng: str | None, if_match: str | None = None) -> tuple[bytes, str, int | None]:
        """One GET: (bytes, etag, total size if the response said). 416 -> (b"", "", None)."""
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": self._k(key)}
        if rng is not None:
            kw["Range"] = rng
        if if_match is not None:
            kw["IfMatch"] = if_match
        with self._errors("read", key):
            try:
                resp = self._client.get_object(**kw)
            except botocore.exceptions.ClientError as e:
                err = e.response.get("Error", {})
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if err.get("Code") == "InvalidRange" or status == 416:
                    return b"", "", None
                if if_match is not None and (err.get("Code") == "PreconditionFailed" or status == 412):
                    raise _VersionChanged from None
                raise
            body = resp["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
        etag = str(resp.get("ETag", ""))
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if rng is None or status == 200:
            # the whole object (a store that ignores Range answers 200 with all of it)
            return _apply_range(data, rng), etag, len(data)
        m = _CONTENT_RANGE.match(resp.get("ContentRange") or "")
        return data, etag, (int(m.group(3)) if m and m.group(3) != "*" else None)

    def _pinned(self, key: str, fn: Callable[[], T]) -> T:
        """Run a multi-request read again if the object changed under it (up to 3 times)."""
        for _ in range(3):
            try:
                return fn()
            except _VersionChanged:
                continue
        raise StorageUnavailableError(
            f"{self.describe()}: read {key}: the object kept changing while it was read (three tries)"
        )

    def _read_range(self, key: str, offset: int, length: int | None) -> bytes:
        if length is not None and length <= self.part_size:
            return self._get(key, f"bytes={offset}-{offset + length - 1}")[0]
        return self._pinned(key, lambda: self._read_big(key, offset, length))

    def _read_big(self, key: str, offset: int, length: int | None) -> bytes:
        first_len = self.part_size if length is None else min(length, self.part_size)
        head, etag, total = self._get(key, f"bytes={offset}-{offset + first_len - 1}")
        if total is None or len(head) < first_len:
            return head
        end = total if length is None else min(total, offset + length)
        spans = [(o, min(self.part_size, end - o)) for o in range(offset + len(head), end, self.part_size)]
        rest = self._run_all(
            [
                (lambda o=o, n=n: self._get(key, f"bytes={o}-{o + n - 1}", if_match=etag)[0])  # type: ignore[misc]
                for o, n in spans
            ]
        )
        return b"".join([head, *rest])

    def _read_suffix(self, key: str, n: int) -> bytes:
        return self._get(key, f"bytes=-{n}")[0]

    def _read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> builtins.list[bytes]:
        if all(ln == 0 for _, ln in ranges):
            self._stat(key)
            return [b""] * len(ranges)
        # Merge neighbours (sorted by offset) into spans of at most read_span, one GET each; a
        # longer range is a span of its own, fetched as several read_span pieces. (Few large GETs
        # beat many parallel smaller ones where a request has a fixed price: on moto, which copies
        # the whole object per GET, a 64 MiB pack read whole took 0.53 s, as 4 x 16 MiB 0.95 s.)
        order = sorted((i for i in range(len(ranges)) if ranges[i][1] > 0), key=lambda i: ranges[i][0])
        spans: builtins.list[tuple[int, int, builtins.list[int]]] = []
        for i in order:
            off, ln = ranges[i]
            if spans:
                start, end, members = spans[-1]
                if off <= end + self.coalesce_gap and max(end, off + ln) - start <= self.read_span:
                    spans[-1] = (start, max(end, off + ln), [*members, i])
                    continue
            spans.append((off, off + ln, [i]))
        pieces = [
            (s, o, min(self.read_span, end - o))
            for s, (start, end, _) in enumerate(spans)
            for o in range(start, end, self.read_span)
        ]

        def fetch() -> builtins.list[bytes]:
            got = self._run_all(
                [(lambda o=o, n=n: self._get(key, f"bytes={o}-{o + n - 1}")) for _, o, n in pieces]  # type: ignore[misc]
            )
            if len({etag for _, etag, _ in got if etag}) > 1:
                raise _VersionChanged
            joined: builtins.list[builtins.list[bytes]] = [[] for _ in spans]
            for (s, _, _), (data, _, _) in zip(pieces, got, strict=True):
                joined[s].append(data)
            out = [b""] * len(ranges)
            for (start, _, members), chunks in zip(spans, joined, strict=True):
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                for i in members:
                    off, ln = ranges[i]
                    out[i] = data[off - start : off - start + ln]
            return out

        return self._pinned(key, fetch)

    def _read_into(self, key: str, offset: int, dest: memoryview) -> None:
        n = len(dest)
        spans = [(o, min(self.part_size, n - o)) for o in range(0, n, self.part_size)]

        def fill() -> None:
            def piece(o: int, ln: int) -> str:
                data, etag, _ = self._get(key, f"bytes={offset + o}-{offset + o + ln - 1}")
                if len(data) != ln:
                    raise self._short_read(key, offset, n, o + len(data))
                dest[o : o + ln] = data
                return etag

            etags = self._run_all([(lambda o=o, ln=ln: piece(o, ln)) for o, ln in spans])  # type: ignore[misc]
            if len(set(etags)) > 1:
                raise _VersionChanged

        self._pinned(key, fill)

    def _stat(self, key: str) -> ObjectInfo:
        try:
            with self._errors("stat", key):
                r = self._client.head_object(Bucket=self.bucket, Key=self._k(key))
        except BucketNotFoundError:
            raise
        except ObjectNotFoundError:
            raise self._not_found(key, "stat") from None
        self._bucket_known = True
        return ObjectInfo(key, int(r["ContentLength"]), str(r["ETag"]), r["LastModified"].timestamp())

    # -- writes ---------------------------------------------------------------------

    @staticmethod
    def _body(data: memoryview) -> bytes:
        obj = data.obj
        if isinstance(obj, bytes) and len(obj) == data.nbytes:
            return obj
        return data.tobytes()

    @staticmethod
    def _when(resp: dict[str, Any]) -> float:
        date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        with contextlib.suppress(TypeError, ValueError):
            if date:
                return email.utils.parsedate_to_datetime(date).timestamp()
        return time.time()

    @staticmethod
    def _conditions(mode: WriteMode, if_version: str | None) -> dict[str, str]:
        if mode == "create":
            return {"IfNoneMatch": "*"}
        if if_version is not None:
            return {"IfMatch": if_version}
        return {}

    def _write(self, key: str, data: memoryview, mode: WriteMode, if_version: str | None) -> ObjectInfo:
        if len(data) >= self.multipart_threshold and self._multipart_allowed(key, len(data), mode, if_version):
            return self._write_multipart(key, data, mode, if_version)
        with self._errors("write", key, cas=if_version is not None):
            r = self._client.put_object(
                Bucket=self.bucket, Key=self._k(key), Body=self._body(data), **self._conditions(mode, if_version),
                **self._put_extra,
            )
        self._bucket_known = True
        return ObjectInfo(key, len(data), str(r["ETag"]), self._when(r))

    def _multipart_allowed(self, key: str, n: int, mode: WriteMode, if_version: str | None) -> bool:
        """May a conditional write of ``n`` bytes go up as a multipart upload?

        Stores differ in whether they honour conditions on ``CompleteMultipartUpload``
        (moto honours ``If-None-Match`` there and ignores ``If-Match``), and a single
        PutObject's conditions are what :meth:`probe_conditional_writes` checks first.
        So a compare-and-swap write is a single PUT up to 5 GiB unless the probe found
        ``If-Match`` honoured on multipart completes; a create-only write is multipart
        unless the probe found ``If-None-Match`` ignored there."""
        if mode == "create":
            ok = self.conditional_multipart.get("create", True)
        elif if_version is not None:
            ok = self.conditional_multipart.get("cas", False)
        else:
            return True
        if ok:
            return True
        if n > MAX_PUT:
            kind = "create-only" if mode == "create" else "compare-and-swap"
            raise StorageError(
                f"{self.describe()}: write {key}: a {kind} write of {n} bytes needs a multipart upload, and this "
                "store does not enforce conditions on multipart uploads"
            )
        return False

    def probe_conditional_writes(self) -> None:
        """The generic probe (single PUTs must honour ``If-None-Match`` / ``If-Match``, else
        ``StorageError``), then whether multipart completes honour them too: recorded in
        :attr:`conditional_multipart` (``{"create": bool, "cas": bool}``) and used to route
        large conditional writes (see :meth:`_multipart_allowed`)."""
        super().probe_conditional_writes()
        key = f"{RESERVED_PREFIX}-probe/{uuid.uuid4().hex}"
        try:
            first = self._write(key, memoryview(b"probe-1"), "overwrite", None)
            self._write(key, memoryview(b"probe-2"), "overwrite", None)
            found: dict[str, bool] = {}
            for kind, cond in (("create", {"IfNoneMatch": "*"}), ("cas", {"IfMatch": first.version})):
                with self._errors("probe", key):
                    up = self._client.create_multipart_upload(Bucket=self.bucket, Key=self._k(key), **self._put_extra)
                try:
                    with self._errors("probe", key):
                        part = self._client.upload_part(
                            Bucket=self.bucket, Key=self._k(key), UploadId=up["UploadId"], PartNumber=1, Body=b"p"
                        )
                    try:
                        with self._errors("probe", key):
                            self._client.complete_multipart_upload(
                                Bucket=self.bucket,
                                Key=self._k(key),
                                UploadId=up["UploadId"],
                                MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
                                **cond,
                            )
                        found[kind] = False
                    except PreconditionFailedError:
                        found[kind] = True
                finally:
                    self._abort(key, up["UploadId"])
            self.conditional_multipart = found
        finally:
            self._delete(key)

    def _write_multipart(self, key: str, data: memoryview, mode: WriteMode, if_version: str | None) -> ObjectInfo:
        n = len(data)
        part = max(self.part_size, -(-n // MAX_PARTS))
        if mode == "create" and self._exists_quick(key):
            # Refuse before uploading gigabytes; the conditional complete below stays the real check.
            raise PreconditionFailedError(f"{self.describe()}: write {key}: already exists (create-only write)")
        with self._errors("write", key):
            up = self._client.create_multipart_upload(Bucket=self.bucket, Key=self._k(key), **self._put_extra)
        upload_id: str = up["UploadId"]
        try:

            def send(num: int, off: int) -> dict[str, Any]:
                with self._errors(f"write (part {num})", key):
                    r = self._client.upload_part(
                        Bucket=self.bucket,
                        Key=self._k(key),
                        UploadId=upload_id,
                        PartNumber=num,
                        Body=data[off : off + part].tobytes(),
                    )
                return {"PartNumber": num, "ETag": r["ETag"]}

            parts = self._run_all(
                [(lambda num=num, off=off: send(num, off)) for num, off in enumerate(range(0, n, part), 1)]  # type: ignore[misc]
            )
            with self._errors("write (complete)", key, cas=if_version is not None):
                r = self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=self._k(key),
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    **self._conditions(mode, if_version),
                )
        except BaseException:
            self._abort(key, upload_id)
            raise
        return ObjectInfo(key, n, str(r["ETag"]), self._when(r))

    def _exists_quick(self, key: str) -> bool:
        try:
            self._stat(key)
        except BucketNotFoundError:
            raise
        except ObjectNotFoundError:
            return False
        return True

    def _abort(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(Exception):
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=self._k(key), UploadId=upload_id)

    def _copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        src = self._stat(src_key)
        for _ in range(3):
            try:
                if src.size > MAX_COPY_OBJECT:
                    return self._copy_multipart(src, dst_key)
                with self._errors("copy", f"{src_key} -> {dst_key}"):
                    r = self._client.copy_object(
                        Bucket=self.bucket,
                        Key=self._k(dst_key),
                        CopySource={"Bucket": self.bucket, "Key": self._k(src_key)},
                        CopySourceIfMatch=src.version,
                    )
                res = r.get("CopyObjectResult", {})
                when = res["LastModified"].timestamp() if "LastModified" in res else self._when(r)
                return ObjectInfo(dst_key, src.size, str(res.get("ETag", "")), when)
            except PreconditionFailedError:
                src = self._stat(src_key)  # the source changed between stat and copy: again
        raise StorageUnavailableError(f"{self.describe()}: copy {src_key}: the source kept changing (three tries)")

    def _copy_multipart(self, src: ObjectInfo, dst_key: str) -> ObjectInfo:
        part = max(self.part_size, 256 * MiB, -(-src.size // MAX_PARTS))
        op = f"copy {src.key} -> {dst_key}"
        with self._errors(op, ""):
            up = self._client.create_multipart_upload(Bucket=self.bucket, Key=self._k(dst_key), **self._put_extra)
        upload_id: str = up["UploadId"]
        try:

            def one(num: int, off: int) -> dict[str, Any]:
                with self._errors(op, f"(part {num})"):
                    r = self._client.upload_part_copy(
                        Bucket=self.bucket,
                        Key=self._k(dst_key),
                        UploadId=upload_id,
                        PartNumber=num,
                        CopySource={"Bucket": self.bucket, "Key": self._k(src.key)},
                        CopySourceIfMatch=src.version,
                        CopySourceRange=f"bytes={off}-{min(src.size, off + part) - 1}",
                    )
                return {"PartNumber": num, "ETag": r["CopyPartResult"]["ETag"]}

            parts = self._run_all(
                [(lambda num=num, off=off: one(num, off)) for num, off in enumerate(range(0, src.size, part), 1)]  # type: ignore[misc]
            )
            with self._errors(op, ""):
                r = self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=self._k(dst_key), UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
        except BaseException:
            self._abort(dst_key, upload_id)
            raise
        return ObjectInfo(dst_key, src.size, str(r["ETag"]), self._when(r))

    def _delete(self, key: str) -> None:
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=self._k(key))

    # -- listing and housekeeping ---------------------------------------------------

    def _list(self, prefix: str, start_after: str | None) -> Iterator[ObjectInfo]:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._k(prefix)}
        if start_after is not None:
            kw["StartAfter"] = self._k(start_after)
        cut = len(self.prefix)
        while True:
            with self._errors("list", prefix or "(all)"):
                page = self._client.list_objects_v2(**kw)
            self._bucket_known = True
            for obj in page.get("Contents", []):
                key = str(obj["Key"])[cut:]
                if key.startswith(RESERVED_PREFIX) or not is_valid_key(key):
                    continue  # the backend's probes; folder markers and other foreign names
                yield ObjectInfo(key, int(obj["Size"]), str(obj.get("ETag", "")), obj["LastModified"].timestamp())
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            kw["ContinuationToken"] = token

    def list_incomplete_uploads(self, prefix: str = "") -> builtins.list[IncompleteUpload]:
        """Multipart uploads under this backend's prefix that were neither completed nor aborted."""
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._k(prefix)}
        out: builtins.list[IncompleteUpload] = []
        cut = len(self.prefix)
        while True:
            with self._errors("list uploads", prefix or "(all)"):
                page = self._client.list_multipart_uploads(**kw)
            for u in page.get("Uploads", []):
                out.append(IncompleteUpload(str(u["Key"])[cut:], str(u["UploadId"]), u["Initiated"].timestamp()))
            if not page.get("IsTruncated"):
                return out
            kw["KeyMarker"] = page.get("NextKeyMarker")
            kw["UploadIdMarker"] = page.get("NextUploadIdMarker")

    def abort_incomplete_uploads(self, older_than_s: float) -> int:
        """Abort the incomplete uploads started more than ``older_than_s`` seconds ago; returns how many.

        Give ``older_than_s`` a margin well beyond the longest upload a live writer can
        take: aborting a live upload makes that writer's write fail (it does not corrupt
        anything)."""
        cutoff = time.time() - older_than_s
        n = 0
        for u in self.list_incomplete_uploads():
            if u.initiated <= cutoff:
                with self._errors("abort upload", u.key):
                    try:
                        self._client.abort_multipart_upload(
                            Bucket=self.bucket, Key=self._k(u.key), UploadId=u.upload_id
                        )
                    except botocore.exceptions.ClientError as e:
                        if e.response.get("Error", {}).get("Code") != "NoSuchUpload":
                            raise
                        continue
                n += 1
        return n

    def cleanup_incomplete(self, older_than_s: float) -> int:
        return self.abort_incomplete_uploads(older_than_s)

    def health_probe(self) -> None:
        # the probe object goes up in the default class: an archive class could not be read back
        key = f"{RESERVED_PREFIX}-health/{uuid.uuid4().hex}"
        body = uuid.uuid4().bytes
        with self._errors("health probe", key):
            self._client.put_object(Bucket=self.bucket, Key=self._k(key), Body=body)
        try:
            if self._get(key, None)[0] != body:
                raise StorageError(f"{self.describe()}: health probe {key} read back other bytes than were written")
        finally:
            self._delete(key)

    def archive_state(self, key: str) -> str | None:
        with self._errors("stat", key):
            r = self._client.head_object(Bucket=self.bucket, Key=self._k(key))
        if r.get("StorageClass") not in _ARCHIVE_CLASSES:
            return None
        restore = str(r.get("Restore") or "")
        if 'ongoing-request="false"' in restore:
            return None  # a restored copy is readable until it expires
        return "restoring" if 'ongoing-request="true"' in restore else "archived"

    def request_restore(self, key: str, days: int = 1) -> None:
        if self.archive_state(key) != "archived":
            return
        try:
            with self._errors("restore", key):
                self._client.restore_object(Bucket=self.bucket, Key=self._k(key), RestoreRequest={"Days": int(days)})
        except StorageError as e:
            if "RestoreAlreadyInProgress" not in str(e):
                raise

    def check(self) -> None:
        """HEAD the bucket: a missing bucket, refused credentials or an unreachable endpoint
        raise their typed errors here, within the timeout."""
        with self._errors("open", ""):
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except botocore.exceptions.ClientError as e:
                if int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0) == 404:
                    raise BucketNotFoundError(f"{self.describe()}: bucket {self.bucket!r} does not exist") from None
                raise
        self._bucket_known = True
