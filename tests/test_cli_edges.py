"""The rough edges a new user hits on the command line: each is an exit code and a one-line message."""

from __future__ import annotations

import enum
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import cas
from cas.repository import Repository
from tests.test_cli import assert_one_line_error, run


class Colour(enum.Enum):  # a class weights_only refuses: a Lightning hparam, say
    RED = 1


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    run("--repo", path, "init", "--chunk-size", "64K")
    return path


@pytest.fixture
def saved(repo_dir: Path) -> Path:
    with Repository.open(repo_dir) as repo:
        repo.save({"model": {"w": torch.randn(64, 64)}, "step": 1}, tag="a")
        repo.save({"model": {"w": torch.randn(64, 64)}, "step": 2}, tag="b")
    return repo_dir


def test_unwritable_outputs_are_one_line(saved: Path, tmp_path: Path) -> None:
    assert_one_line_error(run("restore", "a", "/proc/x.pt", repo=saved, ok=False), 2, "cannot write /proc/x.pt")
    assert_one_line_error(run("restore", "a", tmp_path, repo=saved, ok=False), 2, "is a directory; name the file")
    assert_one_line_error(run("restore", "a", tmp_path / "no" / "x.pt", repo=saved, ok=False), 2, "does not exist")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    (tmp_path / "f.pt").write_bytes(b"x")
    run("save", tmp_path / "f.pt", "--tag", "bad-file", repo=saved, ok=False)  # not a torch.save archive
    torch.save({"w": torch.ones(2)}, tmp_path / "g.pt")
    run("save", tmp_path / "g.pt", "--tag", "g", repo=saved)
    proc = run("restore", "g", "/proc/g.pt", repo=saved, ok=False)
    assert_one_line_error(proc, 2, "cannot write /proc/g.pt")
    assert ".tmp" not in proc.stderr


def test_rm_checks_every_name_before_removing_any(saved: Path) -> None:
    assert_one_line_error(run("rm", "a", "nope", "b", repo=saved, ok=False), 4, "nothing was removed")
    with Repository.open(saved) as repo:
        assert sorted(s.tag for s in repo.snapshots()) == ["a", "b"]
    assert_one_line_error(run("rm", "a", "latest", repo=saved, ok=False), 2, "refusing to delete 'latest'")
    out = run("rm", "a", "b", repo=saved).stdout
    assert out.count("removed snapshot") == 2


def test_repo_that_is_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert_one_line_error(run("--repo", tmp_path / "file", "ls", ok=False), 3, "is a regular file")


def test_all_hex_tags_and_short_prefixes(saved: Path, tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "c.pt")
    assert_one_line_error(run("save", tmp_path / "c.pt", "--tag", "beef", repo=saved, ok=False), 2, "all hex digits")
    assert_one_line_error(run("tag", "a", "cafe1234", repo=saved, ok=False), 2, "all hex digits")
    assert_one_line_error(run("show", "ab", repo=saved, ok=False), 4, "at least 4 hex digits")
    # a tag made through the API that is also another snapshot's id prefix never silently wins
    with Repository.open(saved) as repo:
        b = repo.resolve("b")
        repo.save({"x": torch.ones(1)}, tag=b.id[:6])
    assert_one_line_error(run("show", b.id[:6], repo=saved, ok=False), 4, "both a tag and the id prefix")
    assert b.id in run("show", b.id[:8], repo=saved).stdout


def test_tag_renames(saved: Path) -> None:
    out = run("tag", "a", "release-1", repo=saved).stdout
    assert "a -> release-1" in out
    tags = {s["tag"] for s in json.loads(run("ls", "--json", repo=saved).stdout)}
    assert tags == {"release-1", "b"}
    assert_one_line_error(run("tag", "b", "release-1", repo=saved, ok=False), 2, "already names a snapshot")
    assert_one_line_error(run("tag", "nope", "x", repo=saved, ok=False), 4, "no snapshot named")


def test_import_errors_keep_the_class_and_allow_pickle_imports(repo_dir: Path, tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(3)}, "hparams": {"colour": Colour.RED}}, tmp_path / "l.ckpt")
    proc = run("save", "--state", tmp_path / "l.ckpt", repo=repo_dir, ok=False)
    assert_one_line_error(proc, 6, "Colour")
    run("save", "--allow-pickle", tmp_path / "l.ckpt", "--tag", "l", repo=repo_dir)
    with Repository.open(repo_dir) as repo:
        assert repo.load("l", allow_pickle=True)["hparams"]["colour"] is Colour.RED
    run("save", tmp_path / "l.ckpt", "--tag", "bytes", repo=repo_dir)  # a byte-exact backup needs no pickle
    run("restore", "bytes", tmp_path / "back.ckpt", repo=repo_dir)
    assert (tmp_path / "back.ckpt").read_bytes() == (tmp_path / "l.ckpt").read_bytes()


def test_ctrl_c_during_save(repo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save({"w": torch.randn(100)}, tmp_path / "c.pt")
    real = Repository.save

    def interrupted(self: Repository, *args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(Repository, "save", interrupted)
    proc = run("save", tmp_path / "c.pt", "--tag", "c", repo=repo_dir, ok=False)
    assert_one_line_error(proc, 130, "nothing was committed")
    assert "cas gc" in proc.stderr
    assert json.loads(run("ls", "--json", repo=repo_dir).stdout) == []

    def committed_then_interrupted(self: Repository, *args: Any, **kwargs: Any) -> Any:
        real(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Repository, "save", committed_then_interrupted)
    proc = run("save", tmp_path / "c.pt", "--tag", "c", repo=repo_dir)
    assert "interrupted after the save committed" in proc.stderr and "saved snapshot" in proc.stdout
    assert [s["tag"] for s in json.loads(run("ls", "--json", repo=repo_dir).stdout)] == ["c"]


def test_gc_says_it_waits_for_a_save(saved: Path) -> None:
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with Repository.open(saved) as repo, repo.store.lock(exclusive=False):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    threading.Timer(1.0, release.set).start()
    started = time.monotonic()
    proc = run("gc", repo=saved)
    thread.join()
    assert "waiting for the save or restore in flight" in proc.stderr and time.monotonic() - started >= 0.9
    assert "waiting" not in run("gc", repo=saved).stderr


def test_ls_and_show_fit_80_columns(saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    with Repository.open(saved) as repo:
        repo.save({"model": {"a.very.long.module.path.that.goes.on.and.on.weight" * 2: torch.ones(3)}},
                  tag="t" * 60, metadata={"metrics": {"loss": 0.25, "accuracy": 0.9, "perplexity": 12.5},
                                          "note": "x" * 200})
    for args in (("ls",), ("show", "t" * 60), ("show", "a")):
        lines = run(*args, repo=saved).stdout.splitlines()
        assert lines and max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]


def test_cat_prints_a_summary_and_raw_bytes(saved: Path, tmp_path: Path) -> None:
    out = run("cat", "a", "model/w", repo=saved).stdout
    assert "model/w: float32 [64, 64]" in out and "mean" in out
    assert "model/w: float32" in run("cat", "a", "w", repo=saved).stdout  # a unique last part is enough
    run("cat", "a", "model/w", "--raw", "-o", tmp_path / "w.bin", repo=saved)
    with Repository.open(saved) as repo:
        w = repo.load("a")["model"]["w"]
    assert (tmp_path / "w.bin").read_bytes() == w.numpy().tobytes()
    assert_one_line_error(run("cat", "a", "model/v", repo=saved, ok=False), 2, "no tensor 'model/v'")


def test_unexpected_errors_are_one_line_too(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Repository, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("something deep broke\nwith a second line")

    monkeypatch.setattr(Repository, "snapshots", broken)
    assert_one_line_error(run("ls", repo=saved, ok=False), 1, "RuntimeError: something deep broke")


def test_unknown_keyword_arguments_are_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(cas.ArgumentError, match="chunk_size"):
        Repository.init(tmp_path / "r", chunk_sise=1 << 20)
