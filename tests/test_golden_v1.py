"""The golden version-1 repository (tests/golden/v1, written once by tests/golden_states.py) must
open, load bit-identically, verify and check with every later version of cas."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import cas
from tests.golden_states import GOLDEN, golden_states
from tests.helpers import assert_same

#: the golden files never change: a test that rewrites them instead of reading them is a format break
GOLDEN_FILES = {
    p.relative_to(GOLDEN).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(GOLDEN.rglob("*")) if p.is_file()
}


def test_golden_v1_opens_loads_verifies_and_checks(tmp_path: Path) -> None:
    copy = tmp_path / "v1"
    shutil.copytree(GOLDEN, copy)
    with cas.Repository.open(copy) as repo:  # no index: rebuilt from the packs on open
        assert [s.tag for s in repo.snapshots()] == [tag for tag, _ in golden_states()]
        for tag, expected in golden_states():
            assert_same(repo.load(tag), expected)
        report = repo.verify(read_data=True)
        assert report.ok and report.snapshots_checked == 4, report.problems
        assert repo.check().ok
        assert repo.stats().deepest_chain >= 1  # the golden series holds delta chains
    assert {p.relative_to(copy).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(copy.rglob("*")) if p.is_file() and p.relative_to(copy).parts[0] in ("packs", "refs")
            } == {k: v for k, v in GOLDEN_FILES.items() if k.split("/")[0] in ("packs", "refs")}


def test_golden_v1_is_intact_in_the_tree() -> None:
    assert "config.json" in GOLDEN_FILES and sum(k.startswith("packs/") for k in GOLDEN_FILES) >= 2
    assert sum(k.startswith("refs/") for k in GOLDEN_FILES) == 4
