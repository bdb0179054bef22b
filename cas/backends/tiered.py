"""A backend over storage tiers: hot first, then warm, cold, archive, each its own backend.

``TieredBackend([(name, backend), ...])``: the first tier is the repository's own store. Every
write lands there. *Movable* objects (data packs: ``packs/**.pack``) may live in any tier;
everything else (config, refs, manifest packs, index objects, locks) lives in the first tier
only, so listing, diffing, structure checks and restore planning never touch a cold tier.

Reads of a movable object go to the tier that holds it: a remembered location first, then the
tiers in order. Listing under ``packs/`` merges the tiers' listings in key order (a pack
caught in the middle of a move, in two tiers at once, shows once, from the hotter tier).
Deleting a movable object deletes it from every tier. An archived object's read raises the
tier's :class:`~cas.errors.ArchivedError` unchanged.

Moving objects between tiers (by age) is decided above this layer; :meth:`tier_of` and
:attr:`tiers` give it what it needs. The backend only routes.
"""

from __future__ import annotations

import builtins
import contextlib
import heapq
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TypeVar

from cas.backends.base import Backend, Capabilities, ObjectInfo, WriteMode
from cas.errors import ObjectNotFoundError, UsageError

T = TypeVar("T")
MOVABLE_PREFIX = "packs/"
MOVABLE_SUFFIX = ".pack"


@contextlib.contextmanager
def hold_all(backends: list[Backend]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for backend in backends:
            stack.enter_context(backend.hold_open())
        yield


def is_movable(key: str) -> bool:
    """Data packs may move to colder tiers; manifest packs (``.meta``) and the rest stay hot."""
    return key.startswith(MOVABLE_PREFIX) and key.endswith(MOVABLE_SUFFIX)


class TieredBackend(Backend):
    """``TieredBackend([("hot", backend), ("warm", backend), ...])``: see the module docstring."""

    def __init__(self, tiers: Sequence[tuple[str, Backend]]) -> None:
        names = [n for n, _ in tiers]
        if not tiers or len(set(names)) != len(names):
            raise UsageError("TieredBackend needs one or more tiers with distinct names")
        self.tiers: builtins.list[tuple[str, Backend]] = list(tiers)
        self.hot = self.tiers[0][1]
        self._where: dict[str, int] = {}
        self._lock = threading.Lock()

    # -- locating ----------------------------------------------------------------------

    def tier_names(self) -> builtins.list[str]:
        return [n for n, _ in self.tiers]

    def tier(self, name: str) -> Backend:
        for n, b in self.tiers:
            if n == name:
                return b
        raise UsageError(f"no tier {name!r} (tiers: {', '.join(self.tier_names())})")

    def _remember(self, key: str, tier: int | None) -> None:
        with self._lock:
            if tier is None:
                self._where.pop(key, None)
            else:
                self._where[key] = tier

    def tier_of(self, key: str) -> int | None:
        """The index of the (hottest) tier holding ``key``, or None if none does."""
        if not is_movable(key):
            return 0 if self.hot.exists(key) else None
        for i, (_, backend) in enumerate(self.tiers):
            if backend.exists(key):
                self._remember(key, i)
                return i
        self._remember(key, None)
        return None

    def forget_location(self, key: str) -> None:
        self._remember(key, None)

    def _at(self, key: str, op: Callable[[Backend], T]) -> T:
        if not is_movable(key):
            return op(self.hot)
        with self._lock:
            known = self._where.get(key)
        if known is not None:
            try:
                return op(self.tiers[known][1])
            except ObjectNotFoundError:
                self._remember(key, None)  # moved since: look again
        first: ObjectNotFoundError | None = None
        for i, (_, backend) in enumerate(self.tiers):
            try:
                result = op(backend)
            except ObjectNotFoundError as e:
                first = first or e
                continue
            self._remember(key, i)
            return result
        assert first is not None
        raise first

    # -- Backend -----------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        return self.hot.capabilities

    def describe(self) -> str:
        return self.hot.describe()

    def _read_range(self, key: str, offset: int, length: int | None) -> bytes:
        return self._at(key, lambda b: b._read_range(key, offset, length))

    def _read_suffix(self, key: str, n: int) -> bytes:
        return self._at(key, lambda b: b.read_suffix(key, n))

    def _read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> builtins.list[bytes]:
        return self._at(key, lambda b: b.read_ranges(key, ranges))

    def _read_into(self, key: str, offset: int, dest: memoryview) -> None:
        self._at(key, lambda b: b.read_into(key, offset, dest))

    def _empty_read(self, key: str) -> bytes:
        self._stat(key)
        return b""

    def _stat(self, key: str) -> ObjectInfo:
        return self._at(key, lambda b: b.stat(key))

    def _list(self, prefix: str, start_after: str | None) -> Iterator[ObjectInfo]:
        spans_packs = prefix.startswith(MOVABLE_PREFIX) or MOVABLE_PREFIX.startswith(prefix)
        if not spans_packs or len(self.tiers) == 1:
            yield from self.hot.list(prefix, start_after=start_after)
            return
        def stream(tier: int, backend: Backend) -> Iterator[tuple[str, int, ObjectInfo]]:
            for info in backend.list(prefix, start_after=start_after):
                if tier == 0 or is_movable(info.key):  # only data packs count outside the first tier
                    yield info.key, tier, info

        streams = [stream(i, backend) for i, (_, backend) in enumerate(self.tiers)]
        last: str | None = None
        for key, _tier, info in heapq.merge(*streams):
            if key != last:
                last = key
                yield info

    def _write(self, key: str, data: memoryview, mode: WriteMode, if_version: str | None) -> ObjectInfo:
        info = self.hot.write(key, data, mode=mode, if_version=if_version)
        if is_movable(key):
            self._remember(key, 0)
        return info

    def _write_file(self, key: str, path: Path) -> ObjectInfo:
        info = self.hot.write_file(key, path)
        if is_movable(key):
            self._remember(key, 0)
        return info

    def _delete(self, key: str) -> None:
        if not is_movable(key):
            self.hot.delete(key)
            return
        for _, backend in self.tiers:
            backend.delete(key)
        self._remember(key, None)

    def _copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        if not is_movable(src_key) or self.tier_of(src_key) == 0:
            return self.hot.copy(src_key, dst_key)
        return self._write(dst_key, memoryview(self._read_range(src_key, 0, None)), "overwrite", None)

    def hold_open(self) -> AbstractContextManager[None]:
        return hold_all([backend for _, backend in self.tiers])  # every tier keeps its handles

    def check(self) -> None:
        self.hot.check()

    def cleanup_incomplete(self, older_than_s: float) -> int:
        return sum(backend.cleanup_incomplete(older_than_s) for _, backend in self.tiers)

    def probe_conditional_writes(self) -> None:
        self.hot.probe_conditional_writes()

    def health_probe(self) -> None:
        self.hot.health_probe()

    def archive_state(self, key: str) -> str | None:
        return self._at(key, lambda b: b.archive_state(key))

    def request_restore(self, key: str, days: int = 1) -> None:
        self._at(key, lambda b: b.request_restore(key, days))

    def close(self) -> None:
        for _, backend in self.tiers:
            backend.close()
