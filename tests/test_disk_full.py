"""A save that runs out of disk (a real write refused by the kernel) commits nothing and loses nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import cas
from tests.helpers import assert_same, make_state

WORKER = textwrap.dedent("""
    import resource, signal, sys
    import torch, cas
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    repo = cas.Repository.open(sys.argv[1])
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    g = torch.Generator().manual_seed(7)
    try:
        repo.save({"big": torch.randn(2_000_000, generator=g)}, tag="big")
    except cas.StorageError as exc:
        print("STORAGE:", exc)
        sys.exit(3)
    sys.exit(0)
""")


def test_save_on_a_full_disk_commits_nothing(tmp_path: Path) -> None:
    path = tmp_path / "r"
    with cas.Repository.init(path, chunk_size=64 * 1024, pack_size=1 << 20) as repo:
        repo.save(make_state(1), tag="before")
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(path), str(300_000)], capture_output=True, text=True, timeout=300,
        check=False,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "nothing was committed" in proc.stdout and "Traceback" not in proc.stderr
    with cas.Repository.open(path) as repo:
        assert [s.tag for s in repo.snapshots()] == ["before"]
        assert_same(repo.load("before"), make_state(1))
        assert repo.verify(read_data=True).ok
        assert list((path / "tmp").iterdir()) == []  # the half-written pack was removed
        big = {"big": torch.randn(2_000_000, generator=torch.Generator().manual_seed(7))}
        repo.save(big, tag="big")  # with space again, the same save succeeds
        assert_same(repo.load("big"), big)
        report = repo.gc()  # any sealed pack of the failed save is unreferenced and goes
        assert repo.gc().bytes_freed == 0 and report.temp_files_deleted == 0
        assert repo.verify(read_data=True).ok


def _limited(limit: int) -> None:  # in the restore's child: files past ``limit`` bytes are refused (EFBIG)
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_restore_that_runs_out_of_disk_says_what_it_left_and_keeps_directories_private(tmp_path: Path) -> None:
    import hashlib
    import os
    import stat

    from tests.test_cli import CAS, run

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    files = {"a.bin": os.urandom(100_000), "sub/b.bin": os.urandom(3 << 20), "z.txt": b"last\n"}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    os.chmod(src / "sub", 0o755)
    repo = tmp_path / "repo"
    run("init", repo=repo)
    run("save", src, "--tag", "t", repo=repo)
    out = tmp_path / "out"
    proc = subprocess.run([str(CAS), "--repo", str(repo), "restore", "t", str(out)], capture_output=True, text=True,
                          timeout=300, check=False, preexec_fn=lambda: _limited(1 << 20))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    stopped = f"cannot write {out / 'sub' / 'b.bin'}: File too large; the restore stopped after 2 of 3 files"
    assert stopped in proc.stderr, proc.stderr[:400]
    assert "run it again with --force" in proc.stderr and "Traceback" not in proc.stderr
    for rel in ("a.bin", "z.txt"):  # a directory's files come before its subdirectories'
        assert hashlib.sha256((out / rel).read_bytes()).digest() == hashlib.sha256(files[rel]).digest()
    assert sorted(p.name for p in (out / "sub").iterdir()) == []  # no half file, no temp file
    assert stat.S_IMODE(os.stat(out / "sub").st_mode) == 0o700  # not opened up while it is incomplete
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700  # the target it made, too
    run("restore", "t", out, "--force", repo=repo)  # with room again
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data
    assert stat.S_IMODE(os.stat(out / "sub").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(out).st_mode) == stat.S_IMODE(os.stat(src).st_mode)
    two = tmp_path / "two"  # a backup of two inputs stores no mode for the top: the umask's default
    run("save", src / "z.txt", src / "sub", "--tag", "two", repo=repo)
    run("restore", "two", two, repo=repo)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(two).st_mode) == 0o777 & ~umask
    assert (two / "z.txt").read_bytes() == files["z.txt"]
    assert os.stat(out / "sub").st_mtime_ns == os.stat(src / "sub").st_mtime_ns


@pytest.mark.parametrize("refused", ["file", "directory"])
def test_a_restore_the_os_refuses_says_what_it_left(tmp_path: Path, refused: str) -> None:
    """An OSError on the way (ENAMETOOLONG: the target's path leaves no room for a file, or for a
    directory, of the backup) is the same stopped-after report as a full disk: a usage error naming
    the path, the files before it whole, nothing half-written, and a restore into a target that fits."""
    import hashlib
    import os

    from tests.test_cli import run

    sub = "sub" if refused == "file" else "s" * 40
    src = tmp_path / "src"
    (src / sub).mkdir(parents=True)
    files = {"a.bin": os.urandom(50_000), f"{sub}/b.bin": os.urandom(70_000)}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    repo = tmp_path / "repo"
    run("init", repo=repo)
    run("save", src, "--tag", "t", repo=repo)
    out = tmp_path
    while len(str(out)) < 3800:
        out = out / ("d" * 200)
    temp = len("/.cas-0123456789abcdef.tmp")  # the restore writes each file under a temp name first
    out = out / ("e" * (4095 - temp - len(str(out)) - 1))  # out/<temp> fits in PATH_MAX, out/sub/<temp> does not
    out.mkdir(parents=True)
    failed = run("restore", "t", out, "--force", repo=repo, ok=False)
    assert failed.returncode == 2, failed.stderr
    assert "Traceback" not in failed.stderr and "--force" in failed.stderr
    assert "File name too long" in failed.stderr, failed.stderr
    if refused == "file":  # the directories are made first, then a.bin, then the file that does not fit
        assert str(out / sub / "b.bin") in failed.stderr
        assert "the restore stopped after 1 of 2 files" in failed.stderr
        assert (out / "a.bin").read_bytes() == files["a.bin"]  # the file before it is whole
        assert [p.name for p in (out / sub).iterdir()] == []  # nothing half-written where it stopped
    else:  # the directory cannot be made: no file was written
        assert f"cannot restore into {out}: File name too long ({out / sub})" in failed.stderr
        assert "the restore stopped after 0 of 2 files" in failed.stderr
        assert list(out.iterdir()) == []
    fits = tmp_path / "fits"
    fits.mkdir()
    run("restore", "t", fits, "--force", repo=repo)
    for rel, data in files.items():
        assert hashlib.sha256((fits / rel).read_bytes()).digest() == hashlib.sha256(data).digest()
