"""Repository versions: new repositories are version 3 (manifest nodes in `.meta` packs of their own,
apart from data, since version 2; planes coded as zero runs, since version 3); a version-1 or -2
repository opens, loads and takes new saves in its own format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

import cas
from cas.codec import Codec
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
    assert json.loads((tmp_path / "r" / "config.json").read_text())["version"] == 3
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


def plane_modes(root: Path) -> dict[int, set[int]]:
    """Codec -> the plane modes its records use, over every pack of the repository at ``root``."""
    out: dict[int, set[int]] = {}
    for _pid, path in iter_pack_files(root / "packs"):
        data = path.read_bytes()
        for e in read_footer(path):
            payload = data[e.offset : e.offset + e.stored_length]
            if e.codec in (Codec.BYTE_GROUPED, Codec.DELTA):
                out.setdefault(e.codec, set()).update(payload[2 : 2 + 5 * payload[0] : 5])
    return out


def training_steps(repo: cas.Repository) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    state = {"w": torch.randn(400_000, generator=g) * 0.02, "h": (torch.randn(300_000, generator=g)).bfloat16()}
    repo.save(state, tag="a")
    for step in range(2):
        state = {"w": state["w"] + torch.randn(400_000, generator=g) * 1e-3,
                 "h": (state["h"].float() + torch.randn(300_000, generator=g) * 1e-2).bfloat16()}
        repo.save(state, tag=f"b{step}")
    return state


def test_a_version_2_repository_never_gets_zero_run_planes(tmp_path: Path) -> None:
    """What a cas that reads only versions 1 and 2 wrote; this cas must keep it readable by that cas."""
    sizes = {}
    for version in (2, 3):
        root = tmp_path / f"v{version}"
        cas.Repository.init(root).close()
        config = json.loads((root / "config.json").read_text())
        config["version"] = version
        (root / "config.json").write_text(json.dumps(config))
        with cas.Repository.open(root) as repo:
            state = training_steps(repo)
            assert_same(repo.load("b1"), state)
            assert repo.verify(read_data=True).ok
        modes = plane_modes(root)
        assert Codec.DELTA in modes  # the steps were stored as deltas
        assert json.loads((root / "config.json").read_text())["version"] == version
        if version == 2:
            assert all(2 not in m for m in modes.values())
        else:
            assert 2 in modes[Codec.DELTA]
        sizes[version] = sum(p.stat().st_size for p in (root / "packs").rglob("*.pack"))
    assert sizes[3] < sizes[2]
