"""An in-process backend: a dict behind a lock. For unit tests and as the reference semantics."""

from __future__ import annotations

import bisect
import builtins
import itertools
import threading
import time
from collections.abc import Iterator

from cas.backends.base import RESERVED_PREFIX, Backend, Capabilities, ObjectInfo, WriteMode
from cas.errors import ObjectNotFoundError, PreconditionFailedError


class MemoryBackend(Backend):
    """Objects live in this process only; every operation is atomic (one lock)."""

    def __init__(self, name: str = "memory") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._objects: dict[str, tuple[bytes, ObjectInfo]] = {}
        self._keys: builtins.list[str] = []  # sorted
        self._versions = itertools.count(1)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            conditional_create=True,
            compare_and_swap=True,
            atomic_replace=True,
            range_reads=True,
            multipart=False,
            durable_write=False,
            consistent_list=True,
            zero_copy_read_into=False,
            local_path=None,
        )

    def describe(self) -> str:
        return f"memory://{self._name}"

    def _get(self, key: str) -> tuple[bytes, ObjectInfo]:
        with self._lock:
            entry = self._objects.get(key)
        if entry is None:
            raise ObjectNotFoundError(f"{self.describe()}: {key}: no such object")
        return entry

    def _read_range(self, key: str, offset: int, length: int | None) -> bytes:
        data = self._get(key)[0]
        return data[offset:] if length is None else data[offset : offset + length]

    def _read_suffix(self, key: str, n: int) -> bytes:
        return self._get(key)[0][-n:]

    def _write(self, key: str, data: memoryview, mode: WriteMode, if_version: str | None) -> ObjectInfo:
        payload = bytes(data)
        with self._lock:
            current = self._objects.get(key)
            if mode == "create" and current is not None:
                raise PreconditionFailedError(f"{self.describe()}: {key}: already exists (create-only write)")
            if if_version is not None and (current is None or current[1].version != if_version):
                raise PreconditionFailedError(
                    f"{self.describe()}: {key}: version is no longer {if_version} (compare-and-swap lost)"
                )
            info = ObjectInfo(key, len(payload), str(next(self._versions)), time.time())
            if current is None:
                bisect.insort(self._keys, key)
            self._objects[key] = (payload, info)
            return info

    def _stat(self, key: str) -> ObjectInfo:
        return self._get(key)[1]

    def _list(self, prefix: str, start_after: str | None) -> Iterator[ObjectInfo]:
        with self._lock:
            lo = bisect.bisect_left(self._keys, prefix)
            if start_after is not None:
                lo = max(lo, bisect.bisect_right(self._keys, start_after))
            keys = list(itertools.takewhile(lambda k: k.startswith(prefix), self._keys[lo:]))
            infos = [self._objects[k][1] for k in keys if not k.startswith(RESERVED_PREFIX)]
        return iter(infos)

    def _delete(self, key: str) -> None:
        with self._lock:
            if self._objects.pop(key, None) is not None:
                del self._keys[bisect.bisect_left(self._keys, key)]
