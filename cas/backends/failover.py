"""A backend over the same repository in several regions: one serves, the others stand by.

``FailoverBackend(regions, serving)`` sends every operation to the *serving* region. Reads
(whole, range, suffix, multi-range, into a buffer, stat, list, archive state) that fail
transiently there (:class:`~cas.errors.StorageUnavailableError`) are tried again at once on
the other regions, in the order given, so a read in flight when the serving region dies
completes from a replica; the caller sees no error. The bytes are the same bytes: packs are
content-addressed and immutable, and every chunk read above this layer is hashed against its
id. An object the serving region does not have is *not* looked for elsewhere (not found is an
answer, not a failure).

Writes and deletes go to the serving region only: a write never lands in a region that is
not serving. Lock objects (``locks/``) are the exception: a lock that the serving region does
not take is written to the next region that answers (a load in flight keeps its lock where a
gc after the failover will see it), and a lock is deleted from every region: a region that
is failing is asked again when it answers (``delete_stale_locks``; a write that timed out
there may have landed). ``paused_writes`` holds other writes while a switch is prepared. Writes to keys
the ``fence`` covers (refs) first call ``fence(name, backend)``,
which raises :class:`~cas.errors.FencedError` if that region no longer serves (another took
over at a newer failover epoch); the engine provides it.

Which region serves is decided above this layer (by health checks); :meth:`switch` moves it.
The backend only routes. It imports no repository code.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from cas.backends.base import Backend, Capabilities, ObjectInfo, WriteMode
from cas.backends.retry import RetryingBackend
from cas.backends.tiered import hold_all
from cas.errors import CasError, StorageUnavailableError, UsageError

T = TypeVar("T")
log = logging.getLogger("cas")

Fence = Callable[[str, Backend], None]


class FailoverBackend(Backend):
    """``FailoverBackend([(name, backend), ...], serving=name, fence=None, fenced_prefix="refs/")``."""

    def __init__(
        self,
        regions: Sequence[tuple[str, Backend]],
        serving: str,
        *,
        fence: Fence | None = None,
        fenced_prefix: str = "refs/",
    ) -> None:
        names = [n for n, _ in regions]
        if not regions or len(set(names)) != len(names):
            raise UsageError("FailoverBackend needs one or more regions with distinct names")
        if serving not in names:
            raise UsageError(f"serving region {serving!r} is not one of {names}")
        self._regions: dict[str, Backend] = dict(regions)
        self._order = names
        self._serving = serving
        self._lock = threading.Lock()
        self._fence = fence
        self.fenced_prefix = fenced_prefix
        self.lock_prefix = "locks/"
        #: regions to try last for reads (set by the health checker: known to be failing)
        self._failing: set[str] = set()
        #: reads served by a region other than the serving one (for metrics and tests)
        self.fallback_reads = 0
        #: lock objects a region did not delete (it was failing): deleted when it answers again
        self._stale_locks: dict[str, set[str]] = {}
        # writes wait while a switch is prepared (``paused_writes``); in-flight ones are counted
        self._gate = threading.Condition(self._lock)
        self._paused = False
        self._in_flight = 0

    # -- routing ---------------------------------------------------------------------

    @property
    def serving(self) -> str:
        return self._serving

    @property
    def region_names(self) -> builtins.list[str]:
        return list(self._order)

    def region(self, name: str) -> Backend:
        return self._regions[name]

    def switch(self, name: str) -> None:
        """Make ``name`` the serving region (the health checker decides when)."""
        if name not in self._regions:
            raise UsageError(f"no region {name!r} (regions: {', '.join(self._order)})")
        with self._lock:
            self._serving = name

    def set_failing(self, names: set[str]) -> None:
        with self._lock:
            self._failing = set(names)

    @contextlib.contextmanager
    def paused_writes(self) -> Iterator[None]:
        """Hold new writes and deletes (lock objects excepted), and wait for those in flight: what
        the serving region holds stays put while a switch is made (a failback copies it first)."""
        with self._gate:
            while self._paused:
                self._gate.wait()
            self._paused = True
            while self._in_flight:
                self._gate.wait()
        try:
            yield
        finally:
            with self._gate:
                self._paused = False
                self._gate.notify_all()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        with self._gate:
            while self._paused:
                self._gate.wait()
            self._in_flight += 1
        try:
            yield
        finally:
            with self._gate:
                self._in_flight -= 1
                self._gate.notify_all()

    def delete_stale_locks(self) -> int:
        """Delete the lock objects a failing region kept (one try each); how many went."""
        with self._lock:
            owed = {name: set(keys) for name, keys in self._stale_locks.items()
                    if keys and name not in self._failing}
        gone = 0
        for name, keys in owed.items():
            for key in sorted(keys):
                try:
                    self._one_try(name).delete(key)
                except StorageUnavailableError:
                    break  # still not answering: the next round
                except CasError as exc:  # refused (permissions): it goes stale on its own
                    log.warning("cas: region %s refused to delete lock object %s: %s", name, key, exc)
                with self._lock:
                    self._stale_locks[name].discard(key)
                gone += 1
        return gone

    def set_fence(self, fence: Fence | None) -> None:
        self._fence = fence

    def _one_try(self, name: str) -> Backend:
        """A region's backend without its retry loop (the next region, or the next round, is the retry)."""
        backend = self._regions[name]
        return backend.inner if isinstance(backend, RetryingBackend) else backend

    def _read_order(self) -> builtins.list[str]:
        """Serving region first, unless health checks say it is failing; failing regions last."""
        with self._lock:
            serving, failing = self._serving, set(self._failing)
        order = [serving] + [n for n in self._order if n != serving]
        return [n for n in order if n not in failing] + [n for n in order if n in failing]

    def _read(self, op: Callable[[Backend], T]) -> T:
        """One try in each region (no retry loop: the next region is the retry), then the
        serving region once more with its own retries."""
        first: StorageUnavailableError | None = None
        order = self._read_order()
        silent: list[str] = []
        for name in order:
            try:
                result = op(self._one_try(name))
            except StorageUnavailableError as e:
                first = first or e
                silent.append(name)
                log.warning("cas: region %s did not answer a read (%s); trying the next region", name, e)
                continue
            if silent:
                with self._lock:  # suspect until the next health check says otherwise: later reads
                    self._failing.update(silent)  # go where they are answered, without a timeout each
            if name != self._serving:
                self.fallback_reads += 1
            return result
        serving = self._serving_backend()
        if isinstance(serving, RetryingBackend):
            return op(serving)
        assert first is not None
        raise first

    def _serving_backend(self) -> Backend:
        with self._lock:
            return self._regions[self._serving]

    def _fenced(self, key: str) -> Backend:
        with self._lock:
            name = self._serving
        backend = self._regions[name]
        if self._fence is not None and key.startswith(self.fenced_prefix):
            self._fence(name, backend)
        return backend

    # -- Backend ---------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        # the engine must not take a region for a local directory it may lock or mmap
        return replace(self._serving_backend().capabilities, local_path=None)

    def describe(self) -> str:
        name = self.serving
        return f"{self._regions[name].describe()} (region {name})"

    def _read_range(self, key: str, offset: int, length: int | None) -> bytes:
        return self._read(lambda b: b._read_range(key, offset, length))

    def _read_suffix(self, key: str, n: int) -> bytes:
        return self._read(lambda b: b.read_suffix(key, n))

    def _read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> builtins.list[bytes]:
        return self._read(lambda b: b.read_ranges(key, ranges))

    def _read_into(self, key: str, offset: int, dest: memoryview) -> None:
        self._read(lambda b: b.read_into(key, offset, dest))

    def _empty_read(self, key: str) -> bytes:
        self._stat(key)
        return b""

    def _stat(self, key: str) -> ObjectInfo:
        return self._read(lambda b: b.stat(key))

    def _list(self, prefix: str, start_after: str | None) -> Iterator[ObjectInfo]:
        last = start_after
        tried: set[str] = set()
        while True:
            order = [n for n in self._read_order() if n not in tried]
            if not order:
                raise StorageUnavailableError(f"{self.describe()}: list {prefix}: no region answered")
            name = order[0]
            try:
                for info in self._regions[name].list(prefix, start_after=last):
                    last = info.key
                    yield info
                return
            except StorageUnavailableError as e:
                tried.add(name)
                if len(tried) == len(self._order):
                    raise
                log.warning("cas: region %s did not answer a listing (%s); going on in the next region", name, e)

    def _write(self, key: str, data: memoryview, mode: WriteMode, if_version: str | None) -> ObjectInfo:
        if key.startswith(self.lock_prefix):
            return self._read(lambda b: b.write(key, data, mode=mode, if_version=if_version))
        with self._writing():
            return self._fenced(key).write(key, data, mode=mode, if_version=if_version)

    def _write_file(self, key: str, path: Path) -> ObjectInfo:
        with self._writing():
            return self._fenced(key).write_file(key, path)

    def _delete(self, key: str) -> None:
        if key.startswith(self.lock_prefix):
            with self._lock:
                failing = set(self._failing)
            for name in self._order:  # one try each; a failing region is asked again when it answers
                if name in failing:
                    self._owe_lock_delete(name, key)
                    continue
                try:
                    self._one_try(name).delete(key)
                except StorageUnavailableError:
                    self._owe_lock_delete(name, key)
            return
        with self._writing():
            self._fenced(key).delete(key)

    def _owe_lock_delete(self, name: str, key: str) -> None:
        # a write that timed out may still land there (a frozen server wakes up): the lock
        # object would outlive its holder and make exclusive lockers wait for it to go stale
        with self._lock:
            self._stale_locks.setdefault(name, set()).add(key)

    def _copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        with self._writing():
            return self._fenced(dst_key).copy(src_key, dst_key)

    def hold_open(self) -> AbstractContextManager[None]:
        return hold_all(list(self._regions.values()))

    def check(self) -> None:
        self._serving_backend().check()

    def cleanup_incomplete(self, older_than_s: float) -> int:
        return self._serving_backend().cleanup_incomplete(older_than_s)

    def probe_conditional_writes(self) -> None:
        self._serving_backend().probe_conditional_writes()

    def health_probe(self) -> None:
        self._serving_backend().health_probe()

    def archive_state(self, key: str) -> str | None:
        return self._read(lambda b: b.archive_state(key))

    def request_restore(self, key: str, days: int = 1) -> None:
        self._serving_backend().request_restore(key, days)

    def close(self) -> None:
        for backend in self._regions.values():
            backend.close()
