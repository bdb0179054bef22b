"""Recovery around delta chains: a lost keyframe must not make gc delete the intact deltas on top
of it, ``check`` must name every snapshot that decodes through it, and re-saving the lost bytes
heals them all. The fingerprint cache is never read past what it can hold."""

from __future__ import annotations

import os
from pathlib import Path

import torch

import cas
from cas.errors import CorruptionError
from cas.pack import read_footer


def _records(root: Path) -> list[tuple[Path, object]]:
    return [(p, e) for p in sorted((root / "packs").rglob("*.pack")) for e in read_footer(p)]


def _damaged_base(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor], Path]:
    """s0 one keyframe chunk, s1 a sparse delta on it in a pack of its own; the keyframe is then flipped."""
    root = tmp_path / "repo"
    repo = cas.Repository.init(root, chunk_size=64 * 1024, pack_size=256 * 1024, compression="default")
    a = {"w": torch.randn(16384, generator=torch.Generator().manual_seed(1))}
    b = {"w": a["w"].clone()}
    b["w"][:50] += 1.0
    repo.save(a, tag="s0")
    repo.save(b, tag="s1")
    repo.close()
    records = _records(root)
    keyframe = next((p, e) for p, e in records if e.kind == 0 and e.base_id is None)  # type: ignore[attr-defined]
    delta_pack = next(p for p, e in records if e.base_id is not None)  # type: ignore[attr-defined]
    assert delta_pack != keyframe[0]
    offset = keyframe[1].offset + keyframe[1].stored_length // 2  # type: ignore[attr-defined]
    with open(keyframe[0], "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))
    return root, a, b, delta_pack


def test_gc_after_repair_keeps_deltas_on_a_lost_base_and_a_resave_heals_them(tmp_path: Path) -> None:
    root, a, b, delta_pack = _damaged_base(tmp_path)
    with cas.Repository.open(root) as repo:
        report = repo.check(repair=True)
        assert len(report.lost_chunks) == 1
        # both snapshots decode through the lost keyframe: both are named
        assert sorted(x["snapshot"].split()[0] for x in report.affected) == ["s0", "s1"]
        repo.gc()
        assert delta_pack.exists(), "gc deleted the only copy of s1's delta"
        for tag in ("s0", "s1"):
            try:
                repo.load(tag)
                raise AssertionError(f"{tag} loaded with its keyframe lost")
            except CorruptionError:
                pass
        repo.save(a, tag="heal")  # writes the lost keyframe again
        repo.gc()  # indexes the deltas whose chains resolve again
        assert torch.equal(repo.load("s0")["w"], a["w"])
        assert torch.equal(repo.load("s1")["w"], b["w"])
        assert repo.verify(read_data=True).ok


def test_a_fingerprint_file_that_is_a_device_is_ignored(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    sd = {"w": torch.randn(65536, generator=torch.Generator().manual_seed(2))}
    with cas.Repository.init(root, chunk_size=64 * 1024) as repo:
        first = repo.save(sd, tag="s0")
    fp = root / "fingerprints" / f"{first.id}.fp"
    assert fp.exists()
    fp.unlink()
    os.symlink("/dev/zero", fp)  # read whole, this would never end
    sd["w"][:10] += 1
    with cas.Repository.open(root) as repo:
        repo.save(sd, tag="s1")
        assert torch.equal(repo.load("s1")["w"], sd["w"])
