"""What only the local-directory backend has: files, temp files, errno translation, processes."""

from __future__ import annotations

import errno
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from cas.backends import LocalBackend, MemoryBackend, RetryingBackend, open_backend
from cas.errors import (
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
    StoragePermissionError,
    StorageUnavailableError,
    UsageError,
)


def test_write_is_atomic_and_leaves_no_temp_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = LocalBackend(tmp_path)
    b.write("refs/x", b"old")
    real_write = os.write

    def full_disk(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(StorageError, match="no space left") as exc:
        b.write("refs/x", b"new bytes")
    monkeypatch.setattr(os, "write", real_write)
    assert type(exc.value) is StorageError and str(tmp_path) in str(exc.value) and "refs/x" in str(exc.value)
    assert b.read("refs/x") == b"old"
    assert list((tmp_path / ".cas-backend" / "tmp").iterdir()) == []


def test_errno_translation(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path)
    cases = [
        (errno.ENOENT, ObjectNotFoundError),
        (errno.ENOTDIR, ObjectNotFoundError),
        (errno.EACCES, StoragePermissionError),
        (errno.EPERM, StoragePermissionError),
        (errno.EROFS, StoragePermissionError),
        (errno.EEXIST, PreconditionFailedError),
        (errno.ENOSPC, StorageError),
        (errno.EDQUOT, StorageError),
        (errno.ESTALE, StorageUnavailableError),
        (errno.ETIMEDOUT, StorageUnavailableError),
        (errno.EIO, StorageError),
    ]
    for code, cls in cases:
        got = b._translate(OSError(code, os.strerror(code)), "write", "refs/x")
        assert type(got) is cls, (errno.errorcode[code], got)
        assert "refs/x" in str(got) and str(tmp_path) in str(got)
    assert "quota" in str(b._translate(OSError(errno.EDQUOT, "q"), "write", "k"))
    assert "read-only" in str(b._translate(OSError(errno.EROFS, "ro"), "write", "k"))


def test_read_only_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = LocalBackend(tmp_path)
    b.write("k", b"x")

    def erofs(*a: object, **k: object) -> int:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "open", erofs)
    with pytest.raises(StoragePermissionError, match="read-only"):
        b.write("k2", b"y")


def test_temp_files_cleanup(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path)
    b.write("k", b"x")
    tmp = tmp_path / ".cas-backend" / "tmp"
    old, young = tmp / "old.tmp", tmp / "young.tmp"
    old.write_bytes(b"crash leftover")
    young.write_bytes(b"being written")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert [i.key for i in b.list()] == ["k"]
    assert b.cleanup_incomplete(3600) == 1
    assert not old.exists() and young.exists()
    assert b.cleanup_incomplete(0) == 1


def test_key_below_an_object(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path)
    b.write("a", b"x")
    with pytest.raises(StorageError, match="is an object"):
        b.write("a/b", b"y")
    with pytest.raises(ObjectNotFoundError):
        b.read("a/b")
    assert not b.exists("a/b")
    b.delete("a/b")
    assert b.read("a") == b"x"
    b.write("d/e", b"z")
    for mode in ("overwrite", "create"):
        with pytest.raises(StorageError, match="keys below d/ exist"):
            b.write("d", b"y", mode=mode)  # type: ignore[arg-type]
    assert b.read("d/e") == b"z"


def test_a_directory_another_writer_makes_meanwhile_is_not_an_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Racing first writes below a new directory: one writer sees ``refs/`` missing, another
    makes it, and the first then finds it. That is a directory, not an object in the way (seen
    as a StorageError from a create-only race of 8 threads)."""
    backend = LocalBackend(tmp_path / "store")
    refs = os.path.join(backend.root, "refs")
    real_isdir = os.path.isdir
    seen: list[str] = []

    def isdir_then_made(path: str | os.PathLike[str]) -> bool:
        if os.fspath(path) == refs and len(seen) < 2:  # missing at the first two checks; made after them
            seen.append(refs)
            if len(seen) == 2:
                os.mkdir(refs)
            return False
        return real_isdir(path)

    monkeypatch.setattr(os.path, "isdir", isdir_then_made)
    backend.write("refs/raced", b"one", mode="create")
    assert seen and backend.read("refs/raced") == b"one"


def test_versions_differ_for_same_size_rewrites(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path, fsync=False)
    versions = [b.write("refs/x", b"%03d" % (i % 2)).version for i in range(200)]  # inode numbers get reused
    assert len(set(versions)) == 200


def test_no_fsync_option_and_missing_root(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "new" / "root", fsync=False)
    assert not b.capabilities.durable_write and b.capabilities.local_path == tmp_path / "new" / "root"
    b.write("k", b"x")
    assert b.read("k") == b"x"
    with pytest.raises(ObjectNotFoundError, match="does not exist"):
        LocalBackend(tmp_path / "absent", create=False)


def _cas_worker(root: str, version: str, i: int, q: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    b = LocalBackend(root)
    try:
        b.write("refs/head", f"p{i}".encode(), if_version=version)
        q.put(("won", i))
    except PreconditionFailedError:
        q.put(("lost", i))


def test_compare_and_swap_across_processes(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path)
    base = b.write("refs/head", b"base")
    ctx = multiprocessing.get_context("fork")
    q: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=_cas_worker, args=(str(tmp_path), base.version, i, q)) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    results = [q.get(timeout=5) for _ in procs]
    winners = [i for what, i in results if what == "won"]
    assert len(winners) == 1, results
    assert b.read("refs/head") == f"p{winners[0]}".encode()


def test_open_backend(tmp_path: Path) -> None:
    b = open_backend(str(tmp_path / "a"))
    assert isinstance(b, LocalBackend) and b.root == tmp_path / "a"
    b = open_backend(tmp_path / "b", {"fsync": False})
    assert isinstance(b, LocalBackend) and not b.capabilities.durable_write
    b = open_backend(f"file://{tmp_path}/c")
    assert isinstance(b, LocalBackend) and b.root == tmp_path / "c"
    assert isinstance(open_backend("memory://x"), MemoryBackend)
    s3 = open_backend(
        "s3://bucket/prefix",
        {"endpoint": "http://127.0.0.1:9", "access_key_id": "a", "secret_access_key": "b", "retry_attempts": 2},
    )
    assert isinstance(s3, RetryingBackend) and s3.attempts == 2
    assert s3.describe() == "s3://bucket/prefix at http://127.0.0.1:9"
    s3.close()
    for url, opts in [
        ("gs://bucket/x", None),
        ("s3:///nobucket", None),
        ("s3://bucket/x?region=y", None),
        ("file://otherhost/x", None),
        (str(tmp_path), {"endpoint": "http://x"}),
        ("s3://bucket/x", {"bogus": 1}),
        ("s3://bucket/x", {"endpoint": "ftp://x"}),
        ("", None),
    ]:
        with pytest.raises(UsageError):
            open_backend(url, opts)
