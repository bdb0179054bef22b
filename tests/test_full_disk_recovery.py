"""A repository on a real, small file system that fills up: every refusal is a typed StorageError,
nothing committed is lost, and `forget` + `gc` free space even when the disk is completely full.

The file system is a tmpfs mounted by the test (root only; elsewhere the file-size-limit variant
in tests/test_disk_full.py covers the save path).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import cas
from tests.helpers import assert_same

FS_BYTES = 24 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "fs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); tests/test_disk_full.py covers saves")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def state(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"w": torch.randn(256 * 1024, generator=g)}  # 1 MiB of noise: no dedup, little compression


def fill(path: Path) -> None:
    """Take every free byte of the file system with a filler file."""
    try:
        f = open(path, "ab")  # noqa: SIM115 - closed below
    except OSError:
        return  # not even a new file fits: the disk is full already
    with contextlib.suppress(OSError), f:
        block = b"\xff" * (1 << 16)
        with contextlib.suppress(OSError):
            while True:
                f.write(block)
                f.flush()
        for size in (4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\xff" * size)
                    f.flush()


def test_full_disk_saves_fail_typed_and_gc_frees_space(small_fs: Path) -> None:
    path = small_fs / "repo"
    committed: dict[str, dict[str, torch.Tensor]] = {}
    with cas.Repository.init(path, chunk_size=64 * 1024, pack_size=512 * 1024, compression="none") as repo:
        failures = 0
        messages: list[str] = []
        for i in range(60):
            try:
                repo.save(state(i), tag=f"s{i}")
            except cas.StorageError as exc:  # never an lmdb error or a raw OSError
                messages.append(str(exc))
                failures += 1
                if failures >= 3:
                    break
                continue
            committed[f"s{i}"] = state(i)
        assert failures >= 1 and len(committed) >= 5, (failures, len(committed))
        assert all("nothing was committed" in m or "refused" in m for m in messages), messages
        fill(small_fs / "filler")
        vfs = os.statvfs(small_fs)
        assert vfs.f_bavail * vfs.f_frsize < 64 << 10
        for tag, expected in committed.items():  # everything committed still loads on a full disk
            assert_same(repo.load(tag), expected)
        with pytest.raises(cas.StorageError):
            repo.save(state(999), tag="no-room")
        repo.forget(keep_last=2)
        report = repo.gc()  # freeing space must work on a completely full disk
        assert report.bytes_freed > 0 and report.packs_deleted > 0, report
        keep = sorted(committed, key=lambda t: int(t[1:]))[-2:]
        assert sorted(s.tag or "" for s in repo.snapshots()) == sorted(keep)
        repo.save(state(1000), tag="after")  # there is room again
    with cas.Repository.open(path) as repo:
        for tag in keep:
            assert_same(repo.load(tag), committed[tag])
        assert_same(repo.load("after"), state(1000))
        (small_fs / "filler").unlink()
        assert repo.verify(read_data=True).ok
        assert repo.check().ok


def test_full_disk_during_index_commit_keeps_the_index_usable(small_fs: Path) -> None:
    """Fill the disk to within a few KiB, then save many small new chunks: whichever write is refused
    (a pack, the index commit, the ref), the error is typed and the index still opens and loads."""
    path = small_fs / "repo"
    with cas.Repository.init(path, chunk_size=4096, pack_size=64 * 1024, compression="none") as repo:
        base = {"a": torch.arange(100_000, dtype=torch.float32)}
        repo.save(base, tag="base")
    filler = small_fs / "filler"
    fill(filler)
    for spare in (4096, 16384, 65536, 262144):
        with open(filler, "r+b") as f:
            f.truncate(max(0, filler.stat().st_size - spare))
        with cas.Repository.open(path) as repo:
            try:
                repo.save({"b": torch.randn(200_000, generator=torch.Generator().manual_seed(spare))},
                          tag=f"b{spare}")
            except cas.StorageError:
                pass
            except OSError as exc:  # pragma: no cover - the failure this test exists for
                pytest.fail(f"raw OSError escaped: {exc} (errno {errno.errorcode.get(exc.errno or 0)})")
            assert_same(repo.load("base"), base)
        fill(filler)
    filler.unlink()
    with cas.Repository.open(path) as repo:
        assert_same(repo.load("base"), base)
        repo.gc()
        assert repo.verify(read_data=True).ok
