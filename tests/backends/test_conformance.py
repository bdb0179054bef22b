"""One contract, every backend: memory, local directory, S3 (moto server), and the retry wrapper.

What each backend must do is in the docstring of ``cas.backends.base``; this suite is
that contract in executable form.
"""

from __future__ import annotations

import array
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from cas.backends import Backend, Capabilities, LocalBackend, MemoryBackend, ObjectInfo, ShortReadError
from cas.backends.base import WriteMode
from cas.errors import ObjectNotFoundError, PreconditionFailedError, StorageError, UsageError

MiB = 1 << 20
DATA = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable

BAD_KEYS = [
    "",
    "/abs",
    "trailing/",
    "a//b",
    "./a",
    "a/./b",
    "../a",
    "a/../b",
    "a/..",
    "back\\slash",
    "nul\x00",
    "new\nline",
    ".cas-backend/tmp/x",
    ".cas-probe/x",
    "x" * 1025,
]


def race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(i)`` on ``n`` threads released together; each result or exception, in order."""
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - the test inspects what each thread got
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


class TestConformance:
    # -- round trips --------------------------------------------------------------

    def test_round_trip_and_info(self, backend: Backend) -> None:
        t0 = time.time()
        for key, data in [("config.json", b"{}"), ("refs/step-100", b"abc" * 100), ("packs/ab/x.pack", DATA)]:
            info = backend.write(key, data)
            assert isinstance(info, ObjectInfo)
            assert (info.key, info.size) == (key, len(data))
            assert info.version
            assert backend.read(key) == data
            st = backend.stat(key)
            assert (st.key, st.size, st.version) == (key, len(data), info.version)
            assert t0 - 5 <= st.mtime <= time.time() + 5
            assert backend.exists(key)

    def test_bytes_like_inputs(self, backend: Backend) -> None:
        backend.write("a", bytearray(b"bytearray"))
        assert backend.read("a") == b"bytearray"
        backend.write("b", memoryview(DATA)[10:20])
        assert backend.read("b") == DATA[10:20]
        floats = array.array("f", [1.0, 2.0, 3.0])
        backend.write("c", memoryview(floats))
        assert backend.read("c") == floats.tobytes()

    def test_overwrite_replaces_and_changes_version(self, backend: Backend) -> None:
        versions = set()
        for i in range(5):
            info = backend.write("k", bytes([i]) * 100)  # same size every time
            versions.add(info.version)
            assert backend.read("k") == bytes([i]) * 100
        assert len(versions) == 5

    def test_unicode_and_odd_keys(self, backend: Backend) -> None:
        keys = ["refs/ünïcode-ß", "refs/with space", "refs/ümlaut/x", "refs/a-b_c.d~e", "refs/é", "refs/z"]
        for k in keys:
            backend.write(k, k.encode())
        for k in keys:
            assert backend.read(k) == k.encode()
        assert [i.key for i in backend.list("refs/")] == sorted(keys)

    def test_empty_object(self, backend: Backend) -> None:
        info = backend.write("empty", b"")
        assert info.size == 0
        assert backend.read("empty") == b""
        assert backend.read_range("empty", 0, 10) == b""
        assert backend.read_suffix("empty", 4) == b""
        assert backend.read_ranges("empty", [(0, 1), (0, 0)]) == [b"", b""]
        backend.read_into("empty", 0, memoryview(bytearray(0)))
        with pytest.raises(ShortReadError):
            backend.read_into("empty", 0, memoryview(bytearray(1)))
        assert backend.stat("empty").size == 0
        assert [i.key for i in backend.list()] == ["empty"]

    # -- ranges -------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("offset", "length"),
        [
            (0, 100),
            (0, len(DATA)),
            (5000, 1234),
            (len(DATA) - 7, 7),
            (len(DATA) - 7, 100),
            (len(DATA), 10),
            (len(DATA) + 500, 10),
            (123, 0),
        ],
    )
    def test_read_range(self, backend: Backend, offset: int, length: int) -> None:
        backend.write("obj", DATA)
        # pread semantics: short only at the end, b"" at or past the end
        assert backend.read_range("obj", offset, length) == DATA[offset : offset + length]

    @pytest.mark.parametrize("n", [1, 64, len(DATA) - 1, len(DATA), len(DATA) + 1, 10 * len(DATA), 0])
    def test_read_suffix(self, backend: Backend, n: int) -> None:
        backend.write("obj", DATA)
        assert backend.read_suffix("obj", n) == (DATA[-n:] if n else b"")

    def test_read_ranges_keeps_order(self, backend: Backend) -> None:
        backend.write("obj", DATA)
        ranges = [(9000, 100), (0, 10), (5, 10), (5, 10), (10_000, 1000), (20_000, 5), (300, 0), (100, 4000), (0, 1)]
        assert backend.read_ranges("obj", ranges) == [DATA[o : o + n] for o, n in ranges]
        assert backend.read_ranges("obj", []) == []

    def test_read_into_fills_exactly(self, backend: Backend) -> None:
        backend.write("obj", DATA)
        buf = bytearray(b"\xff" * 1000)
        backend.read_into("obj", 0, memoryview(buf)[100:600])
        assert buf[100:600] == DATA[:500]
        assert buf[:100] == b"\xff" * 100 and buf[600:] == b"\xff" * 400
        floats = array.array("f", [0.0] * 16)  # a typed buffer, as a tensor's would be
        backend.read_into("obj", 64, memoryview(floats))
        assert floats.tobytes() == DATA[64 : 64 + 64]
        with pytest.raises(ShortReadError, match="obj"):
            backend.read_into("obj", len(DATA) - 10, memoryview(bytearray(11)))
        with pytest.raises(UsageError):
            backend.read_into("obj", 0, memoryview(b"read-only"))

    def test_large_object(self, backend: Backend) -> None:
        # above the multipart threshold of the S3 fixture (5 MiB parts), across part boundaries
        data = os.urandom(11 * MiB + 12345)
        info = backend.write("packs/big.pack", data)
        assert info.size == len(data)
        assert backend.stat("packs/big.pack").version == info.version
        assert backend.read("packs/big.pack") == data
        assert backend.read_range("packs/big.pack", 5 * MiB - 10, 6 * MiB) == data[5 * MiB - 10 : 11 * MiB - 10]
        assert backend.read_suffix("packs/big.pack", 64) == data[-64:]
        ranges = [(10 * MiB, 2 * MiB), (0, 100), (3 * MiB, 7 * MiB), (4 * MiB + 1, 10)]
        assert backend.read_ranges("packs/big.pack", ranges) == [data[o : o + n] for o, n in ranges]
        buf = bytearray(len(data) - 1)
        backend.read_into("packs/big.pack", 1, memoryview(buf))
        assert buf == data[1:]
        with pytest.raises(PreconditionFailedError):
            backend.write("packs/big.pack", data, mode="create")

    # -- conditional writes -------------------------------------------------------

    def test_create_only(self, backend: Backend) -> None:
        info = backend.write("refs/t", b"one", mode="create")
        with pytest.raises(PreconditionFailedError):
            backend.write("refs/t", b"two", mode="create")
        assert backend.read("refs/t") == b"one"
        assert backend.stat("refs/t").version == info.version
        backend.delete("refs/t")
        backend.write("refs/t", b"three", mode="create")  # absent again: allowed
        assert backend.read("refs/t") == b"three"

    def test_create_only_race(self, backend: Backend) -> None:
        results = race(8, lambda i: backend.write("refs/raced", f"writer-{i}".encode() * 100, mode="create"))
        winners = [i for i, r in enumerate(results) if isinstance(r, ObjectInfo)]
        losers = [r for r in results if not isinstance(r, ObjectInfo)]
        assert len(winners) == 1, results
        odd = [repr(r) for r in losers if not isinstance(r, PreconditionFailedError)]
        assert not odd, odd
        assert backend.read("refs/raced") == f"writer-{winners[0]}".encode() * 100

    def test_compare_and_swap(self, backend: Backend) -> None:
        v1 = backend.write("refs/main", b"v1")
        v2 = backend.write("refs/main", b"v2", if_version=v1.version)
        assert v2.version != v1.version
        with pytest.raises(PreconditionFailedError):
            backend.write("refs/main", b"stale", if_version=v1.version)
        assert backend.read("refs/main") == b"v2"
        assert backend.stat("refs/main").version == v2.version
        v3 = backend.write("refs/main", b"v3", if_version=backend.stat("refs/main").version)
        assert backend.read("refs/main") == b"v3"
        assert v3.version == backend.stat("refs/main").version
        with pytest.raises(PreconditionFailedError):
            backend.write("refs/absent", b"x", if_version=v1.version)
        assert not backend.exists("refs/absent")
        backend.delete("refs/main")
        with pytest.raises(PreconditionFailedError):
            backend.write("refs/main", b"x", if_version=v3.version)

    def test_compare_and_swap_race(self, backend: Backend) -> None:
        base = backend.write("refs/head", b"base")
        results = race(8, lambda i: backend.write("refs/head", f"w{i}".encode(), if_version=base.version))
        winners = [i for i, r in enumerate(results) if isinstance(r, ObjectInfo)]
        assert len(winners) == 1, results
        assert all(isinstance(r, PreconditionFailedError) for i, r in enumerate(results) if i not in winners)
        assert backend.read("refs/head") == f"w{winners[0]}".encode()
        assert backend.stat("refs/head").version == results[winners[0]].version

    def test_bad_write_arguments(self, backend: Backend) -> None:
        info = backend.write("k", b"x")
        with pytest.raises(UsageError):
            backend.write("k", b"y", mode="create", if_version=info.version)
        with pytest.raises(UsageError):
            backend.write("k", b"y", mode="append")  # type: ignore[arg-type]
        with pytest.raises(UsageError):
            backend.write("k", b"y", if_version="")
        with pytest.raises(UsageError):
            backend.write("k", "text")  # type: ignore[arg-type]
        assert backend.read("k") == b"x"

    def test_probe_conditional_writes(self, backend: Backend) -> None:
        backend.probe_conditional_writes()
        assert list(backend.list()) == []

    # -- listing ------------------------------------------------------------------

    KEYS: Sequence[str] = (
        "a-c",
        "a.b",
        "a/b",
        "a/b/c",
        "a0",
        "config.json",
        "packs/ab/1.pack",
        "packs/ab/2.pack",
        "packs/abc/3.pack",
        "packs/b/4.pack",
        "refs/step-100",
        "refs/step-20",
        "z",
    )

    def _fill(self, backend: Backend) -> None:
        for k in self.KEYS:
            if k == "a/b":
                continue  # a local directory cannot hold both a/b and a/b/c
            backend.write(k, k.encode())

    def _keys(self, infos: Any) -> list[str]:
        return [i.key for i in infos]

    def test_list_sorted(self, backend: Backend) -> None:
        self._fill(backend)
        expected = sorted(k for k in self.KEYS if k != "a/b")
        infos = list(backend.list())
        assert self._keys(infos) == expected
        for info in infos:
            st = backend.stat(info.key)
            assert (info.size, info.version) == (st.size, st.version)

    def test_list_prefix(self, backend: Backend) -> None:
        self._fill(backend)
        assert self._keys(backend.list("packs/")) == [
            "packs/ab/1.pack",
            "packs/ab/2.pack",
            "packs/abc/3.pack",
            "packs/b/4.pack",
        ]
        assert self._keys(backend.list("packs/ab")) == ["packs/ab/1.pack", "packs/ab/2.pack", "packs/abc/3.pack"]
        assert self._keys(backend.list("packs/ab/")) == ["packs/ab/1.pack", "packs/ab/2.pack"]
        assert self._keys(backend.list("a")) == ["a-c", "a.b", "a/b/c", "a0"]
        assert self._keys(backend.list("refs/step-1")) == ["refs/step-100"]
        assert self._keys(backend.list("nothing/")) == []
        assert self._keys(backend.list("config.json")) == ["config.json"]

    def test_list_start_after(self, backend: Backend) -> None:
        self._fill(backend)
        everything = self._keys(backend.list())
        for i, k in enumerate(everything):
            assert self._keys(backend.list(start_after=k)) == everything[i + 1 :]
        assert (
            self._keys(backend.list(start_after="packs/ab/1.pack!"))
            == everything[everything.index("packs/ab/2.pack") :]
        )
        assert self._keys(backend.list("packs/", start_after="packs/ab/2.pack")) == [
            "packs/abc/3.pack",
            "packs/b/4.pack",
        ]
        assert self._keys(backend.list("packs/", start_after="a")) == self._keys(backend.list("packs/"))
        assert self._keys(backend.list(start_after="zz")) == []

    def test_list_resumes_page_by_page(self, backend: Backend) -> None:
        keys = [f"packs/{i:04d}" for i in range(30)]
        for k in keys:
            backend.write(k, b"")
        got: list[str] = []
        after = None
        while True:
            page = [i.key for _, i in zip(range(7), backend.list("packs/", start_after=after), strict=False)]
            if not page:
                break
            got += page
            after = page[-1]
        assert got == keys

    def test_list_hides_temp_objects(self, backend: Backend, backend_kind: str) -> None:
        backend.write("visible", b"x")
        if backend_kind == "local":
            assert isinstance(backend, LocalBackend)
            backend._ensure_hidden()
            (backend._tmp / "leftover.tmp").write_bytes(b"half a write")
        elif backend_kind == "s3":
            client = backend._client  # type: ignore[attr-defined]
            client.create_multipart_upload(Bucket=backend.bucket, Key=backend._k("in-flight"))  # type: ignore[attr-defined]
        backend.probe_conditional_writes()
        assert self._keys(backend.list()) == ["visible"]
        assert self._keys(backend.list(".c")) == []
        assert self._keys(backend.list(".cas-backend/")) == []
        assert not backend.exists("in-flight")

    # -- delete, copy ---------------------------------------------------------------

    def test_delete_is_idempotent(self, backend: Backend) -> None:
        backend.write("refs/x", b"x")
        backend.delete("refs/x")
        assert not backend.exists("refs/x")
        with pytest.raises(ObjectNotFoundError):
            backend.stat("refs/x")
        backend.delete("refs/x")
        backend.delete("never/was")
        assert list(backend.list()) == []

    def test_copy(self, backend: Backend) -> None:
        backend.write("src", DATA)
        backend.write("dst", b"old")
        info = backend.copy("src", "dst")
        assert (info.key, info.size) == ("dst", len(DATA))
        assert backend.read("dst") == DATA
        assert backend.stat("dst").version == info.version
        backend.copy("src", "sub/dir/copy")
        assert backend.read("sub/dir/copy") == DATA
        assert backend.read("src") == DATA
        with pytest.raises(ObjectNotFoundError):
            backend.copy("missing", "dst2")
        assert not backend.exists("dst2")

    # -- errors ---------------------------------------------------------------------

    def test_missing_keys_are_typed(self, backend: Backend) -> None:
        calls: list[Callable[[], object]] = [
            lambda: backend.read("missing"),
            lambda: backend.read_range("missing", 0, 10),
            lambda: backend.read_range("missing", 0, 0),
            lambda: backend.read_suffix("missing", 10),
            lambda: backend.read_suffix("missing", 0),
            lambda: backend.read_ranges("missing", [(0, 1), (5, 5)]),
            lambda: backend.read_ranges("missing", [(0, 0)]),
            lambda: backend.read_into("missing", 0, memoryview(bytearray(4))),
            lambda: backend.read_into("missing", 0, memoryview(bytearray(0))),
            lambda: backend.stat("missing"),
            lambda: backend.read("dir/missing"),
        ]
        for call in calls:
            with pytest.raises(ObjectNotFoundError, match="missing"):
                call()
        assert not backend.exists("missing")

    def test_directory_is_not_an_object(self, backend: Backend) -> None:
        backend.write("packs/ab/1.pack", b"x")
        for key in ("packs", "packs/ab"):
            assert not backend.exists(key)
            with pytest.raises(ObjectNotFoundError):
                backend.read(key)
            backend.delete(key)
        assert backend.read("packs/ab/1.pack") == b"x"

    @pytest.mark.parametrize("key", BAD_KEYS)
    def test_bad_keys(self, backend: Backend, key: str) -> None:
        calls: list[Callable[[], object]] = [
            lambda: backend.read(key),
            lambda: backend.read_range(key, 0, 1),
            lambda: backend.read_suffix(key, 1),
            lambda: backend.read_ranges(key, [(0, 1)]),
            lambda: backend.read_into(key, 0, memoryview(bytearray(1))),
            lambda: backend.write(key, b"x"),
            lambda: backend.write(key, b"x", mode="create"),
            lambda: backend.stat(key),
            lambda: backend.exists(key),
            lambda: backend.delete(key),
            lambda: backend.copy(key, "ok"),
            lambda: backend.copy("ok", key),
        ]
        backend.write("ok", b"x")
        for call in calls:
            with pytest.raises(UsageError):
                call()
        assert self._keys(backend.list()) == ["ok"]

    def test_bad_arguments(self, backend: Backend) -> None:
        backend.write("k", DATA)
        for call in [
            lambda: backend.read_range("k", -1, 10),
            lambda: backend.read_range("k", 0, -1),
            lambda: backend.read_range("k", 1.5, 10),  # type: ignore[arg-type]
            lambda: backend.read_suffix("k", -1),
            lambda: backend.read_ranges("k", [(0, -1)]),
            lambda: backend.read_ranges("k", [(0, 1, 2)]),  # type: ignore[list-item]
            lambda: backend.read_into("k", -1, memoryview(bytearray(1))),
            lambda: list(backend.list("/abs")),
            lambda: list(backend.list("a//")),
            lambda: list(backend.list("../")),
            lambda: list(backend.list(start_after=3)),  # type: ignore[arg-type]
            lambda: backend.read(123),  # type: ignore[arg-type]
        ]:
            with pytest.raises(UsageError):
                call()

    # -- the rest of the surface ------------------------------------------------------

    def test_describe_capabilities_close(self, backend: Backend) -> None:
        assert backend.describe() and "\n" not in backend.describe()
        caps = backend.capabilities
        assert isinstance(caps, Capabilities)
        assert caps.conditional_create and caps.compare_and_swap and caps.atomic_replace and caps.range_reads
        if isinstance(backend, LocalBackend):
            assert caps.local_path == backend.root and caps.durable_write
        else:
            assert caps.local_path is None
        backend.check()
        assert backend.cleanup_incomplete(3600) == 0
        with backend as b:
            assert b is backend
        assert backend.describe() in repr(backend)


class _IgnoresConditions(MemoryBackend):
    """A store that accepts conditional writes and ignores the conditions (as some do)."""

    def __init__(self, ignore: str) -> None:
        super().__init__()
        self.ignore = ignore

    def _write(self, key: str, data: memoryview, mode: WriteMode, if_version: str | None) -> ObjectInfo:
        if self.ignore == "create":
            mode = "overwrite"
        if self.ignore == "cas":
            if_version = None
        return super()._write(key, data, mode, if_version)


@pytest.mark.parametrize(("ignore", "match"), [("create", "create-only"), ("cas", "compare-and-swap")])
def test_probe_detects_ignored_conditions(ignore: str, match: str) -> None:
    b = _IgnoresConditions(ignore)
    with pytest.raises(StorageError, match=match):
        b.probe_conditional_writes()
    assert list(b.list()) == []
    assert b._keys == []


def test_local_keys_are_files(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path)
    b.write("packs/ab/x.pack", b"data")
    assert (tmp_path / "packs" / "ab" / "x.pack").read_bytes() == b"data"
    assert not list((tmp_path / ".cas-backend" / "tmp").iterdir())
