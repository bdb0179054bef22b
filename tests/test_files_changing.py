"""File backups of files that change, or cannot be read, while `cas save` reads them.

A file written in place between the hash of a chunk and its encoding used to store the new bytes
under the old bytes' id: the store itself was poisoned, and a later save of an untouched copy of
the old bytes deduplicated onto it and could not be restored. Pieces of files are now hashed and
encoded from one private copy, and a file that changed is refused before anything is committed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import cas
from cas.files import build_state
from tests.test_cli import run

MIB = 1 << 20


def overwrite_during_save(repo: cas.Repository, src: Path, checked: bool) -> Exception | None:
    """Save ``src`` while chunk 5 of its file is overwritten in place after the first pieces were
    hashed (a writer elsewhere; the progress callback only makes the timing exact)."""
    files = build_state([src])
    calls = [0]

    def progress(*_args: int) -> None:
        calls[0] += 1
        if calls[0] == 4:
            time.sleep(0.2)  # the pieces ahead in the window are hashed meanwhile
            fd = os.open(src / "blob.dat", os.O_WRONLY)
            os.pwrite(fd, b"\0" * MIB, 5 * MIB)
            os.close(fd)

    try:
        repo.save(files.state, tag="live", metadata={"source": files.source}, progress=progress,
                  before_commit=files.check_unchanged if checked else None)
    except cas.CasError as exc:
        return exc
    finally:
        files.close()
    return None


@pytest.mark.parametrize("checked", [True, False])
def test_a_file_written_during_its_save_never_poisons_the_store(tmp_path: Path, checked: bool) -> None:
    data = os.urandom(16 * MIB)
    live, clean = tmp_path / "live", tmp_path / "clean"
    for d in (live, clean):
        d.mkdir()
        (d / "blob.dat").write_bytes(data)
    with cas.Repository.init(tmp_path / "repo") as repo:
        error = overwrite_during_save(repo, live, checked)
        if checked:  # what `cas save` does: the change is found before the commit
            assert isinstance(error, cas.SourceChangedError), error
            assert "changed while it was saved" in str(error) and "nothing was committed" in str(error)
            assert repo.snapshots() == []
        files = build_state([clean])
        try:
            repo.save(files.state, tag="clean", metadata={"source": files.source})
        finally:
            files.close()
        report = repo.verify(read_data=True)
        assert report.ok, report.problems  # every stored chunk hashes to its id
    out = tmp_path / "out"
    done = run("restore", "clean", str(out), repo=tmp_path / "repo")
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256((out / "blob.dat").read_bytes()).digest() == hashlib.sha256(data).digest()


def test_cas_save_refuses_a_file_that_changes_and_commits_nothing(tmp_path: Path) -> None:
    """A real writer process appending to a file while `cas save` reads it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "log.bin").write_bytes(os.urandom(48 * MIB))
    (src / "keep.txt").write_text("x")
    run("init", repo=tmp_path / "repo")
    writer = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        "end = time.monotonic() + 20\n"
        "with open(sys.argv[1], 'ab') as f:\n"
        "    while time.monotonic() < end:\n"
        "        f.write(os.urandom(4096)); f.flush(); time.sleep(0.002)\n"
    ), str(src / "log.bin")])
    try:
        time.sleep(0.3)
        done = run("save", str(src), "--tag", "moving", repo=tmp_path / "repo", ok=False, subprocess_=True)
    finally:
        writer.kill()
        writer.wait()
    assert done.returncode != 0, done.stdout
    assert "log.bin changed while it was saved" in done.stderr and "nothing was committed" in done.stderr, done.stderr
    with cas.Repository.open(tmp_path / "repo") as repo:
        assert repo.snapshots() == []


def test_an_unreadable_directory_is_an_error_not_left_out(tmp_path: Path) -> None:
    if os.geteuid() == 0 and not _can_drop_privileges():
        pytest.skip("running as root without setpriv: permissions are not enforced")
    base = Path(tempfile.mkdtemp(prefix="cas-unreadable-", dir="/tmp"))  # the unprivileged user can reach it
    os.chmod(base, 0o755)
    src = base / "src"
    (src / "locked").mkdir(parents=True)
    (src / "locked" / "shard.bin").write_bytes(b"x" * 100)
    (src / "config.json").write_text("{}")
    os.chmod(src / "locked", 0)
    try:
        code = ("import sys\nfrom pathlib import Path\nfrom cas.files import build_state\n"
                "try:\n    build_state([Path(sys.argv[1])])\nexcept PermissionError as e:\n    print('refused', e)\n")
        cmd = [sys.executable, "-c", code, str(src)]
        if os.geteuid() == 0:
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        assert "refused" in done.stdout and "locked" in done.stdout, (done.stdout, done.stderr)
    finally:
        os.chmod(src / "locked", 0o755)
        shutil.rmtree(base)


def _can_drop_privileges() -> bool:
    return subprocess.run(["setpriv", "--reuid=65534", "true"], capture_output=True, check=False).returncode == 0


def test_a_name_as_long_as_the_filesystem_allows_restores(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    name = "x" * 250 + ".json"  # 255 bytes: NAME_MAX
    (src / name).write_text("{}")
    run("init", repo=tmp_path / "repo")
    assert run("save", str(src), "--tag", "t", repo=tmp_path / "repo").returncode == 0
    done = run("restore", "t", str(tmp_path / "out"), repo=tmp_path / "repo")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / name).read_text() == "{}"


def test_a_directory_holding_the_repository_is_saved_without_it(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print(1)\n")
    run("init", repo=project / ".cas")
    done = run("save", str(project), "--tag", "bk", repo=project / ".cas", subprocess_=True)
    assert done.returncode == 0, done.stderr
    assert "is the repository being saved into; left out" in done.stderr
    out = tmp_path / "out"
    assert run("restore", "bk", str(out), repo=project / ".cas").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["train.py"]
    assert run("verify", "--read-data", repo=project / ".cas").returncode == 0


def test_verify_read_data_rebuilds_each_backed_up_file_against_its_sha256(tmp_path: Path) -> None:
    """A backup whose chunks all verify, but whose file they rebuild is not the file read (what a
    file written during the save of an older cas left): verify --read-data says so."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(3 * MIB))
    (src / "b.txt").write_text("fine")
    with cas.Repository.init(tmp_path / "repo") as repo:
        files = build_state([src])
        try:
            files.state["files"]["a.bin"]["sha256"] = hashlib.sha256(b"what was read first").digest()
            repo.save(files.state, tag="torn", metadata={"source": files.source})
            files2 = build_state([src])
            repo.save(files2.state, tag="good", metadata={"source": files2.source})
            files2.close()
        finally:
            files.close()
        assert repo.verify().ok  # structure only: nothing rebuilt
        report = repo.verify(read_data=True)
        assert [(p.kind, p.tensor) for p in report.problems] == [("corrupt-file", "files/a.bin")], report.problems
        assert "torn" in str(report.problems[0]) and "would not restore" in report.problems[0].message
        assert repo.verify(read_data=True, snapshots=["good"]).ok
    done = run("verify", "--read-data", repo=tmp_path / "repo", ok=False)
    assert done.returncode == 1 and "corrupt-file" in done.stdout + done.stderr, (done.stdout, done.stderr)


_CUT_DURING_SAVE = r"""
import os, sys
from pathlib import Path
import cas
from cas.files import build_state
src, repo_dir, how = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
files = build_state([src])
target = src / ("notes.txt" if how == "replaced-small" else "model.safetensors")
if how == "cut":
    os.truncate(target, 4096)  # under the mapping the tensors view
else:  # replaced by a file of the same size and mtime: only its inode tells
    other = src / "other"
    other.write_bytes(os.urandom(target.stat().st_size))
    st = target.stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, target)
with cas.Repository.open(repo_dir) as repo:
    try:
        repo.save(files.state, tag="cut", before_commit=files.check_unchanged)
    except cas.SourceChangedError as exc:
        print("refused:", exc)
    else:
        print("saved")
    print("refs:", sorted(name for name, _ in repo.refs()))
files.close()
"""


@pytest.mark.parametrize("how", ["cut", "replaced", "replaced-small"])
def test_a_file_cut_short_or_replaced_under_its_mapping_is_refused_not_a_crash(tmp_path: Path, how: str) -> None:
    """The tensors of a file backup view the file's mapping; a file cut short under it used to kill
    `cas save` with SIGBUS when the saver read the piece. The pieces are read from the file now."""
    import torch
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    save_file({"w": torch.randn(3 * MIB // 4), "b": torch.randn(1000)}, str(src / "model.safetensors"))
    (src / "notes.txt").write_text("kept\n")
    with cas.Repository.init(tmp_path / "repo") as repo:
        repo.save({"x": torch.zeros(4)}, tag="before")
    proc = subprocess.run([sys.executable, "-c", _CUT_DURING_SAVE, str(src), str(tmp_path / "repo"), how],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])  # -7 was SIGBUS
    word = "was cut short" if how == "cut" else "was replaced"
    name = "notes.txt" if how == "replaced-small" else "model.safetensors"  # notes: inline bytes, never read again
    assert f"refused: {src / name} {word} while it was" in proc.stdout, proc.stdout
    assert "nothing was committed" in proc.stdout
    assert "refs: ['before']" in proc.stdout
    with cas.Repository.open(tmp_path / "repo") as repo:
        assert [name for name, _ in repo.refs()] == ["before"]
        assert torch.equal(repo.load("before")["x"], torch.zeros(4))


def test_file_bytes_read_past_a_cut_is_a_source_changed_error(tmp_path: Path) -> None:
    from cas.files import FileBytes

    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 * MIB))
    with open(path, "rb") as f:
        data = FileBytes(f.fileno(), path, 3 * MIB)
        assert data.sha256() == hashlib.sha256(path.read_bytes()).digest()
        assert data[MIB:MIB + 5] == path.read_bytes()[MIB:MIB + 5]
        os.truncate(path, MIB + 100)
        with pytest.raises(cas.SourceChangedError, match=r"was cut short while it was read \(to 1048676 bytes, it "
                                                         r"had 3145728\)"):
            data.sha256()
        with pytest.raises(cas.SourceChangedError, match="cut short"):
            data[MIB:2 * MIB]


_FAIL_THEN_UNMAP = r"""
import os, sys, time
from pathlib import Path
import cas
from cas.files import build_state
src, repo_dir = Path(sys.argv[1]), Path(sys.argv[2])
files = build_state([src])
os.truncate(src / "d.bin", 4096)  # its first piece fails, behind slow encodes, its other pieces queued
with cas.Repository.open(repo_dir) as repo:
    try:
        repo.save(files.state, tag="x")
    except cas.SourceChangedError as exc:
        files.close()  # a library caller frees the files at once, the repository still open
        time.sleep(1.0)  # a hash task still queued would now read unmapped memory
        print("refused:", exc)
"""


def test_a_failed_file_save_leaves_no_task_reading_the_files_it_unmaps(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name, size in (("a.bin", 3), ("b.bin", 3), ("c.bin", 3), ("d.bin", 12)):
        (src / name).write_bytes(os.urandom(size * MIB))
    cas.Repository.init(tmp_path / "repo", compression="max").close()  # encodes slow enough to queue behind
    proc = subprocess.run([sys.executable, "-c", _FAIL_THEN_UNMAP, str(src), str(tmp_path / "repo")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])  # -11: SIGSEGV in a pool thread
    assert f"refused: {src / 'd.bin'} was cut short while it was saved (to 4096 bytes" in proc.stdout


def test_no_mapping_stays_registered_when_build_state_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cas import sources

    good, bad = tmp_path / "good.dat", tmp_path / "bad.pt"
    good.write_bytes(os.urandom(2 * MIB))
    bad.write_bytes(b"not a zip archive at all")
    before = dict(sources._mapped)
    with pytest.raises(cas.NotACheckpointError, match=r"bad\.pt is not a readable torch\.save archive"):
        build_state([good, bad])  # fails in the second file's read
    assert sources._mapped == before
    from cas import files as cas_files

    real = cas_files.check_rel

    def second_fails(rel: str, where: str) -> tuple[str, ...]:
        if rel == "other.dat":
            raise KeyboardInterrupt  # anything between two reads
        return real(rel, where)

    (tmp_path / "other.dat").write_bytes(b"x" * 10_000)
    monkeypatch.setattr(cas_files, "check_rel", second_fails)
    with pytest.raises(KeyboardInterrupt):
        build_state([good, tmp_path / "other.dat"])
    assert sources._mapped == before


def test_a_closed_mapping_below_a_live_one_does_not_hide_it() -> None:
    from cas import sources

    live = sources.MappedFile(1 << 40, 1 << 20, Path("/live"), 1, 2, lambda: True)
    # a file mapped inside that range earlier, closed since (its entry not yet dropped)
    dead = sources.MappedFile((1 << 40) + 4096, 4096, Path("/dead"), 1, 3, lambda: False)
    sources.register(live)
    sources.register(dead)
    try:
        assert sources._mapping_of((1 << 40) + 8192, 4096) is live
        assert dead.address not in sources._mapped  # dropped on the way
        assert sources._mapping_of((1 << 40) + (1 << 20) - 1, 2) is None  # runs past the live one
    finally:
        sources.unregister(live.address)
        sources.unregister(dead.address)


_MAP_LIMIT = r"""
import resource, sys
from pathlib import Path
import cas
from cas.files import build_state
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
used = sum(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (used + (256 << 20), hard))
try:
    build_state([Path(sys.argv[1])])
except cas.UsageError as exc:
    print("refused:", exc)
"""


def test_a_file_that_cannot_be_mapped_is_a_usage_error_that_says_what_to_do(tmp_path: Path) -> None:
    big = tmp_path / "big.dat"
    with open(big, "wb") as f:
        f.truncate(4 << 30)  # sparse: 4 GiB of address space, no disk
    proc = subprocess.run([sys.executable, "-c", _MAP_LIMIT, str(big)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    refused = f"refused: cannot map {big} (4294967296 bytes): Cannot allocate memory. A save keeps every file"
    assert refused in proc.stdout
    assert "save the directory in parts" in proc.stdout
