"""A wrapper that retries transient failures of any backend.

Only :class:`~cas.errors.StorageUnavailableError` is retried (connection refused, timeouts,
5xx, throttling, an object that kept changing under a read): up to ``attempts`` tries in
all, sleeping ``min(max_delay, base_delay * 2**n)`` between them, less a random part of up
to half of it (jitter, so that many clients that failed together do not come back
together). Everything else (not found, permission, precondition, usage) is final and
passes through at once.

Conditional writes need care: a create-only or compare-and-swap write whose reply was
lost may have landed, and its retry then fails with ``PreconditionFailedError`` against
our own bytes. So when a write that had failed transiently comes back
``PreconditionFailedError`` on a later try, the object is read back: the same bytes
mean the earlier try won (success, its current info is returned); other bytes mean
someone else's write is there, and the error stands. (Identical bytes written by
another writer are taken as ours: the stored state is the same either way.)

``list`` resumes after the last key it yielded when a page fails.
"""

from __future__ import annotations

import builtins
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TypeVar

from cas.backends.base import Backend, Capabilities, ObjectInfo, WriteMode
from cas.errors import ObjectNotFoundError, PreconditionFailedError, StorageUnavailableError, UsageError

T = TypeVar("T")


class RetryingBackend(Backend):
    """``RetryingBackend(inner, attempts=5, base_delay=0.1, max_delay=5.0)``.

    ``on_retry(error, attempt, delay)`` is called before each sleep (for logging);
    ``sleep`` can be replaced in tests.
    """

    def __init__(
        self,
        inner: Backend,
        attempts: int = 5,
        base_delay: float = 0.1,
        max_delay: float = 5.0,
        *,
        on_retry: Callable[[StorageUnavailableError, int, float], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if attempts < 1 or base_delay < 0 or max_delay < base_delay:
            raise UsageError("RetryingBackend needs attempts >= 1 and 0 <= base_delay <= max_delay")
        self.inner = inner
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._on_retry = on_retry
        self._sleep = sleep

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def describe(self) -> str:
        return self.inner.describe()

    def hold_open(self) -> AbstractContextManager[None]:
        return self.inner.hold_open()

    def delay(self, attempt: int) -> float:
        """The pause after failed try number ``attempt`` (0-based)."""
        d = min(self.max_delay, self.base_delay * (2.0**attempt))
        return d - random.uniform(0.0, d / 2)

    def _retry(self, fn: Callable[[], T]) -> T:
        for attempt in range(self.attempts):
            try:
                return fn()
            except StorageUnavailableError as e:
                if attempt + 1 >= self.attempts:
                    raise
                self._pause(e, attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _pause(self, e: StorageUnavailableError, attempt: int) -> None:
        d = self.delay(attempt)
        if self._on_retry is not None:
            self._on_retry(e, attempt + 1, d)
        self._sleep(d)

    def _read_range(self, key: str, offset: int, length: int | None) -> bytes:
        return self._retry(lambda: self.inner._read_range(key, offset, length))

    def _read_suffix(self, key: str, n: int) -> bytes:
        return self._retry(lambda: self.inner._read_suffix(key, n))

    def _read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> builtins.list[bytes]:
        return self._retry(lambda: self.inner._read_ranges(key, ranges))

    def _read_into(self, key: str, offset: int, dest: memoryview) -> None:
        self._retry(lambda: self.inner._read_into(key, offset, dest))

    def _empty_read(self, key: str) -> bytes:
        return self._retry(lambda: self.inner._empty_read(key))

    def _stat(self, key: str) -> ObjectInfo:
        return self._retry(lambda: self.inner._stat(key))

    def _write_file(self, key: str, path: Path) -> ObjectInfo:
        data = memoryview(path.read_bytes())
        info = self._write(key, data, "overwrite", None)
        path.unlink(missing_ok=True)
        return info

    def _delete(self, key: str) -> None:
        self._retry(lambda: self.inner._delete(key))

    def _copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        return self._retry(lambda: self.inner._copy(src_key, dst_key))

    def _write(self, key: str, data: memoryview, mode: WriteMode, if_version: str | None) -> ObjectInfo:
        conditional = mode == "create" or if_version is not None
        failed_transiently = False
        for attempt in range(self.attempts):
            try:
                return self.inner._write(key, data, mode, if_version)
            except StorageUnavailableError as e:
                if attempt + 1 >= self.attempts:
                    raise
                failed_transiently = True
                self._pause(e, attempt)
            except PreconditionFailedError:
                if conditional and failed_transiently and self._holds(key, data):
                    return self._stat(key)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _holds(self, key: str, data: memoryview) -> bool:
        try:
            return self._read_range(key, 0, None) == data
        except ObjectNotFoundError:
            return False

    def _list(self, prefix: str, start_after: str | None) -> Iterator[ObjectInfo]:
        last = start_after
        failures = 0
        while True:
            try:
                for info in self.inner._list(prefix, last):
                    yield info
                    last = info.key
                    failures = 0
                return
            except StorageUnavailableError as e:
                if failures + 1 >= self.attempts:
                    raise
                self._pause(e, failures)
                failures += 1

    def check(self) -> None:
        self._retry(self.inner.check)

    def cleanup_incomplete(self, older_than_s: float) -> int:
        return self._retry(lambda: self.inner.cleanup_incomplete(older_than_s))

    def probe_conditional_writes(self) -> None:
        self._retry(self.inner.probe_conditional_writes)

    def health_probe(self) -> None:
        self.inner.health_probe()  # one try: a health check counts failures itself

    def archive_state(self, key: str) -> str | None:
        return self._retry(lambda: self.inner.archive_state(key))

    def request_restore(self, key: str, days: int = 1) -> None:
        self._retry(lambda: self.inner.request_restore(key, days))

    def close(self) -> None:
        self.inner.close()
