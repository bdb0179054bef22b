"""A save that runs out of disk (a real write refused by the kernel) commits nothing and loses nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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
