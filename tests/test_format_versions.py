"""Repository versions: new repositories are version 2 (manifest nodes in `.meta` packs of their own,
apart from data); a version-1 repository opens, loads and takes new saves in its own layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

import cas
from cas.pack import ChunkKind, iter_pack_files, read_footer
from tests.golden_states import GOLDEN, golden_states
from tests.helpers import assert_same


def kinds_by_suffix(root: Path) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for _pid, path in iter_pack_files(root / "packs"):
        out.setdefault(path.suffix, set()).update(e.kind for e in read_footer(path))
    return out


def test_new_repositories_keep_nodes_apart_from_data(tmp_path: Path) -> None:
    with cas.Repository.init(tmp_path / "r", chunk_size=16 * 1024) as repo:
        state = {"w": torch.randn(50_000), "step": 1}
        repo.save(state, tag="a")
        assert_same(repo.load("a"), state)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["version"] == 2
    assert kinds_by_suffix(tmp_path / "r") == {".pack": {ChunkKind.DATA}, ".meta": {ChunkKind.NODE}}


def test_a_version_1_repository_takes_saves_in_its_own_layout(tmp_path: Path) -> None:
    copy = tmp_path / "v1"
    shutil.copytree(GOLDEN, copy)
    with cas.Repository.open(copy) as repo:
        state = {"w": torch.randn(30_000), "step": 9}
        repo.save(state, tag="new")
        repo.forget(keep_last=2)
        repo.gc(repack_below=0.9)
        assert_same(repo.load("new"), state)
        assert_same(repo.load("s3"), golden_states()[-1][1])
        assert repo.verify(read_data=True).ok
    assert json.loads((copy / "config.json").read_text())["version"] == 1
    assert set(kinds_by_suffix(copy)) == {".pack"}  # a cas that reads only version 1 can still open it
