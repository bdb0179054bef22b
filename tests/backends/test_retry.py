"""RetryingBackend around real backends made flaky by a thin test double."""

from __future__ import annotations

import builtins
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from cas.backends import Backend, Capabilities, LocalBackend, MemoryBackend, ObjectInfo, RetryingBackend
from cas.backends.base import WriteMode
from cas.errors import ObjectNotFoundError, PreconditionFailedError, StorageUnavailableError, UsageError


class Flaky(Backend):
    """Forwards to a real backend; the first ``fail`` calls of each primitive raise
    StorageUnavailableError. ``lose_replies`` writes land and then report a transient
    failure (a reply lost on the way back); ``list_fail_after`` breaks a listing after
    that many items, once."""

    def __init__(self, inner: Backend, fail: int = 0, lose_replies: int = 0, list_fail_after: int | None = None):
        self.inner = inner
        self.fail = fail
        self.lose_replies = lose_replies
        self.list_fail_after = list_fail_after
        self.calls: dict[str, int] = {}

    def _tick(self, op: str) -> None:
        n = self.calls[op] = self.calls.get(op, 0) + 1
        if n <= self.fail:
            raise StorageUnavailableError(f"flaky: {op} call {n} refused")

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def describe(self) -> str:
        return f"flaky {self.inner.describe()}"

    def _read_range(self, key: str, offset: int, length: int | None) -> bytes:
        self._tick("read")
        return self.inner._read_range(key, offset, length)

    def _read_suffix(self, key: str, n: int) -> bytes:
        self._tick("suffix")
        return self.inner._read_suffix(key, n)

    def _read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> builtins.list[bytes]:
        self._tick("ranges")
        return self.inner._read_ranges(key, ranges)

    def _read_into(self, key: str, offset: int, dest: memoryview) -> None:
        self._tick("into")
        self.inner._read_into(key, offset, dest)

    def _stat(self, key: str) -> ObjectInfo:
        self._tick("stat")
        return self.inner._stat(key)

    def _write(self, key: str, data: memoryview, mode: WriteMode, if_version: str | None) -> ObjectInfo:
        self._tick("write")
        info = self.inner._write(key, data, mode, if_version)
        if self.lose_replies > 0:
            self.lose_replies -= 1
            raise StorageUnavailableError("flaky: the reply was lost")
        return info

    def _delete(self, key: str) -> None:
        self._tick("delete")
        self.inner._delete(key)

    def _copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        self._tick("copy")
        return self.inner._copy(src_key, dst_key)

    def _list(self, prefix: str, start_after: str | None) -> Iterator[ObjectInfo]:
        self._tick("list")
        for i, info in enumerate(self.inner._list(prefix, start_after)):
            if self.list_fail_after is not None and i == self.list_fail_after:
                self.list_fail_after = None
                raise StorageUnavailableError("flaky: the listing broke")
            yield info


@pytest.fixture(params=["memory", "local"])
def inner(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return MemoryBackend() if request.param == "memory" else LocalBackend(tmp_path / "store")


def retrying(b: Backend, attempts: int = 4) -> tuple[RetryingBackend, list[float]]:
    sleeps: list[float] = []
    return RetryingBackend(b, attempts=attempts, base_delay=0.01, max_delay=0.04, sleep=sleeps.append), sleeps


def test_transient_failures_are_retried(inner: Backend) -> None:
    inner.write("k", b"0123456789")
    flaky = Flaky(inner, fail=2)
    r, sleeps = retrying(flaky)
    assert r.read("k") == b"0123456789"
    assert r.read_range("k", 2, 3) == b"234"
    assert r.read_suffix("k", 2) == b"89"
    assert r.read_ranges("k", [(0, 1), (9, 5)]) == [b"0", b"9"]
    buf = bytearray(4)
    r.read_into("k", 1, memoryview(buf))
    assert buf == b"1234"
    assert r.stat("k").size == 10
    r.write("k2", b"x")
    r.copy("k", "k3")
    r.delete("k3")
    assert [i.key for i in r.list()] == ["k", "k2"]
    # each primitive failed twice, then worked (read ran once more for read_range)
    ops = ("suffix", "ranges", "into", "stat", "write", "copy", "delete", "list")
    assert flaky.calls == {**dict.fromkeys(ops, 3), "read": 4}
    assert len(sleeps) == 2 * 9


def test_gives_up_after_attempts(inner: Backend) -> None:
    inner.write("k", b"x")
    flaky = Flaky(inner, fail=10)
    r, sleeps = retrying(flaky, attempts=3)
    with pytest.raises(StorageUnavailableError, match="call 3"):
        r.read("k")
    assert flaky.calls["read"] == 3 and len(sleeps) == 2


def test_final_errors_are_not_retried(inner: Backend) -> None:
    flaky = Flaky(inner)
    r, sleeps = retrying(flaky)
    with pytest.raises(ObjectNotFoundError):
        r.read("missing")
    r.write("k", b"x", mode="create")
    with pytest.raises(PreconditionFailedError):
        r.write("k", b"y", mode="create")
    with pytest.raises(UsageError):
        r.read("../bad")
    assert sleeps == [] and flaky.calls == {"read": 1, "write": 2}


def test_retried_create_that_landed_is_a_success(inner: Backend) -> None:
    flaky = Flaky(inner, lose_replies=1)
    r, sleeps = retrying(flaky)
    info = r.write("refs/tag", b"ours", mode="create")  # landed, reply lost, retry sees it exists
    assert info.size == 4 and r.read("refs/tag") == b"ours" and len(sleeps) == 1
    assert info.version == inner.stat("refs/tag").version


def test_retried_create_against_someone_elses_bytes_fails(inner: Backend) -> None:
    inner.write("refs/tag", b"theirs")
    r, _ = retrying(Flaky(inner, fail=1))
    with pytest.raises(PreconditionFailedError):
        r.write("refs/tag", b"ours", mode="create")  # first try transient, second refused: not ours
    assert inner.read("refs/tag") == b"theirs"
    r2, _ = retrying(Flaky(inner))
    with pytest.raises(PreconditionFailedError):
        r2.write("refs/tag", b"theirs", mode="create")  # no transient failure: a plain refusal stands


def test_retried_compare_and_swap_that_landed_is_a_success(inner: Backend) -> None:
    v1 = inner.write("refs/main", b"v1")
    r, _ = retrying(Flaky(inner, lose_replies=1))
    info = r.write("refs/main", b"v2", if_version=v1.version)
    assert inner.read("refs/main") == b"v2" and info.version == inner.stat("refs/main").version


def test_listing_resumes_after_the_last_key(inner: Backend) -> None:
    for i in range(10):
        inner.write(f"packs/{i}", b"")
    r, sleeps = retrying(Flaky(inner, list_fail_after=4))
    assert [i.key for i in r.list("packs/")] == [f"packs/{i}" for i in range(10)]
    assert len(sleeps) == 1


def test_delays_grow_with_jitter_and_cap() -> None:
    r = RetryingBackend(MemoryBackend(), attempts=10, base_delay=0.1, max_delay=1.0)
    for attempt, full in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (8, 1.0)]:
        ds = [r.delay(attempt) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in ds)
        assert max(ds) - min(ds) > full / 10  # jittered
    with pytest.raises(UsageError):
        RetryingBackend(MemoryBackend(), attempts=0)


def test_wrapper_forwards_the_rest(tmp_path: Path) -> None:
    local = LocalBackend(tmp_path)
    r = RetryingBackend(local)
    assert r.describe() == local.describe() and r.capabilities == local.capabilities
    r.check()
    r.probe_conditional_writes()
    assert r.cleanup_incomplete(0) == 0
    r.close()
