"""A damaged LMDB page in the index: the tools that repair it must survive it.

LMDB trusts its pages. A page of garbage can make a read or a write touch memory past the end
of the file, and the process dies of SIGBUS. The index is only a cache, so ``cas index rebuild``,
``check``, ``gc`` and ``verify`` first read it (and clear a scratch copy of it) in a child
process. If that child dies or fails, the index is moved aside and built again from the packs.
Every case here runs the real ``cas`` console script in a subprocess, because a SIGBUS would kill
pytest.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cas
from cas.index import read_in_child
from tests.helpers import assert_same

CAS = Path(sys.executable).parent / "cas"
ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096


def cli(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CAS_REPO"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([str(CAS), "--repo", str(repo), *args], capture_output=True, text=True, env=env,
                          timeout=180, check=False)


def states() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return {f"s{i}": {f"t{j}": torch.randn(4000, generator=g) for j in range(24)} for i in range(3)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("index-damage") / "repo"
    with cas.Repository.init(path, chunk_size=16 << 10) as repo:
        for tag, state in states().items():
            repo.save(state, tag)
    return path


def copy_repo(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def damage_page(repo: Path, page: int, seed: int) -> None:
    with open(repo / "index" / "data.mdb", "r+b") as f:
        f.seek(page * PAGE + 16)
        f.write(random.Random(seed).randbytes(PAGE - 32))


def assert_loads_in_child(repo: Path) -> None:
    """Every snapshot loads bit for bit, in a child process (a damaged index must not kill pytest)."""
    code = (
        "import sys, torch, cas\n"
        "with cas.Repository.open(sys.argv[1]) as r:\n"
        "    torch.save({t: r.load(t) for t in ('s0', 's1', 's2')}, sys.argv[2])\n"
    )
    out = repo.parent / f"{repo.name}-loaded.pt"
    done = subprocess.run([sys.executable, "-c", code, str(repo), str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=180, check=False)
    assert done.returncode == 0, f"load after the rebuild: exit {done.returncode}: {done.stderr[-1500:]}"
    assert_same(torch.load(out), states())


def test_rebuild_survives_a_damaged_page_anywhere_in_the_index(saved: Path, tmp_path: Path) -> None:
    pages = (saved / "index" / "data.mdb").stat().st_size // PAGE
    assert pages > 8, f"test setup: the index has only {pages} pages"
    sample = sorted({*range(2, pages, 3), pages - 2, pages - 1})  # the meta pages 0 and 1 have checksums
    for page in sample:
        repo = copy_repo(saved, tmp_path / f"p{page}")
        damage_page(repo, page, seed=page)
        rebuilt = cli(repo, "index", "rebuild")
        assert rebuilt.returncode == 0, (
            f"page {page}: `cas index rebuild` exit {rebuilt.returncode} (a negative one is a signal): "
            f"{rebuilt.stderr[-1500:]}"
        )
        assert "index rebuilt: " in rebuilt.stdout and "3 snapshots" in rebuilt.stdout, rebuilt.stdout
        listed = cli(repo, "ls")
        assert listed.returncode == 0 and all(f"s{i}" in listed.stdout for i in range(3)), (page, listed)
    assert_loads_in_child(repo)


@pytest.mark.parametrize("command", [("check", "--repair"), ("gc",), ("verify", "--read-data")])
def test_check_gc_and_verify_survive_a_damaged_index(saved: Path, tmp_path: Path, command: tuple[str, ...]) -> None:
    pages = (saved / "index" / "data.mdb").stat().st_size // PAGE
    for page in sorted({*range(3, pages, 8), pages - 1}):
        repo = copy_repo(saved, tmp_path / f"p{page}")
        damage_page(repo, page, seed=page)
        done = cli(repo, *command)
        assert done.returncode == 0, (
            f"page {page}: `cas {' '.join(command)}`: exit {done.returncode} (a negative one is a signal): "
            f"{done.stderr[-1500:]}"
        )
    listed = cli(repo, "ls")
    assert listed.returncode == 0 and all(f"s{i}" in listed.stdout for i in range(3)), listed


def test_a_truncated_index_is_set_aside_and_rebuilt_by_check(saved: Path, tmp_path: Path) -> None:
    """LMDB maps the pages a truncated file lacks and the first read of one is a SIGBUS."""
    repo = copy_repo(saved, tmp_path / "repo")
    mdb = repo / "index" / "data.mdb"
    os.truncate(mdb, mdb.stat().st_size // 2)
    done = cli(repo, "check")
    assert done.returncode == 0, f"`cas check`: exit {done.returncode}: {done.stderr[-1500:]}"
    assert "rebuilding it from the packs" in done.stderr, done.stderr
    assert (repo / "index.damaged" / "data.mdb").exists(), "the damaged index was not kept aside"
    assert_loads_in_child(repo)


def test_read_in_child_reports_what_it_read_and_why_it_stopped(saved: Path, tmp_path: Path) -> None:
    sound = read_in_child(saved / "index")
    assert sound.damage is None
    with cas.Repository.open(saved) as repo:
        expected = dict(repo.index.iter_chunks())
        snapshot_ids = set(repo.index.snapshot_ids())
    assert dict(sound.locations()) == expected and len(expected) > 20
    assert set(sound.snapshot_nodes) == snapshot_ids and len(snapshot_ids) == 3
    assert not list((saved).glob(".index-probe-*")), "the scratch copy was left behind"
    walked = read_in_child(saved / "index", contents=False)  # every page walked, nothing sent
    assert walked.damage is None and not walked.records and not walked.snapshot_nodes

    repo = copy_repo(saved, tmp_path / "repo")
    mdb = repo / "index" / "data.mdb"
    os.truncate(mdb, mdb.stat().st_size // 2)
    cut = read_in_child(repo / "index")
    assert cut.damage is not None and "killed the process (signal 7)" in cut.damage, cut.damage
    assert set(cut.locations()) <= set(expected.items()), "a location the child reported is not the index's"


def test_open_with_check_index_rebuilds_a_damaged_index_and_keeps_what_it_verified(
    saved: Path, tmp_path: Path
) -> None:
    repo_path = copy_repo(saved, tmp_path / "repo")
    mdb = repo_path / "index" / "data.mdb"
    os.truncate(mdb, mdb.stat().st_size // 2)
    code = (
        "import sys, cas\n"
        "with cas.Repository.open(sys.argv[1], check_index=True) as r:\n"
        "    print(r.last_rebuild.snapshots, r.last_rebuild.ok, sorted(s.tag for s in r.snapshots()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(repo_path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-1500:]
    assert done.stdout.split("\n")[0] == "3 True ['s0', 's1', 's2']", done.stdout
    assert (repo_path / "index.damaged" / "data.mdb").exists(), "the damaged index was not kept aside"
    assert_loads_in_child(repo_path)


def test_without_a_child_interpreter_rebuild_reads_the_index_itself(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An embedded interpreter has no ``sys.executable`` to start: that is no sign of damage, so the
    index is not moved aside, and rebuild reads it in this process as before."""
    repo_path = copy_repo(saved, tmp_path / "repo")
    monkeypatch.setattr(sys, "executable", "")
    skipped = read_in_child(repo_path / "index")
    assert skipped.read is False and skipped.damage is None and not skipped.records
    with cas.Repository.open(repo_path, check_index=True) as repo:
        report = repo.rebuild_index()
        assert report.ok and report.snapshots == 3
        assert_same({t: repo.load(t) for t in ("s0", "s1", "s2")}, states())
    assert not (repo_path / "index.damaged").exists()
