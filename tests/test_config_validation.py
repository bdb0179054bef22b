"""config.json is checked when a repository opens: a bad value is a ConfigError naming key, value and file.

Every case writes a real config.json; nothing stored may change, and the CLI exits 3 with one line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import cas
from cas.retention import RetentionPolicy, parse_duration
from cas.store import RETENTION_COUNTS, RETENTION_RULES, _is_duration, validate_config
from tests.helpers import assert_same, repo_files

CAS = Path(sys.executable).parent / "cas"
MISSING = object()

#: (key, bad value or MISSING, what the message must also say)
BAD: list[tuple[str, Any, str]] = [
    ("chunk_size", -4096, "multiple of 16 from 4096 to 268435456"),
    ("chunk_size", 0, "multiple of 16"),
    ("chunk_size", 4095, "multiple of 16"),
    ("chunk_size", 4100, "multiple of 16"),
    ("chunk_size", (256 << 20) + 16, "268435456"),
    ("chunk_size", 65536.0, "multiple of 16"),
    ("chunk_size", True, "multiple of 16"),
    ("chunk_size", "1M", "multiple of 16"),
    ("chunk_size", None, "multiple of 16"),
    ("chunk_size", [65536], "multiple of 16"),
    ("chunk_size", MISSING, "missing"),
    ("pack_size", 1024, "from chunk_size"),
    ("pack_size", -1, "from chunk_size"),
    ("pack_size", False, "from chunk_size"),
    ("pack_size", "64M", "from chunk_size"),
    ("pack_size", 1e9, "from chunk_size"),
    ("pack_size", {"size": 1}, "from chunk_size"),
    ("pack_size", MISSING, "missing"),
    ("compression", "zstd", '"none", "fast", "default", "max"'),
    ("compression", None, '"none", "fast", "default", "max"'),
    ("compression", 3, '"none", "fast", "default", "max"'),
    ("compression", ["fast"], '"none", "fast", "default", "max"'),
    ("max_delta_depth", -1, "from 0 to 64"),
    ("max_delta_depth", 65, "from 0 to 64"),
    ("max_delta_depth", 8.5, "from 0 to 64"),
    ("max_delta_depth", True, "from 0 to 64"),
    ("max_delta_depth", "8", "from 0 to 64"),
    ("max_delta_depth", None, "from 0 to 64"),
    ("max_chain_cost", float("nan"), "finite number of at least 1.0"),
    ("max_chain_cost", float("inf"), "finite number of at least 1.0"),
    ("max_chain_cost", float("-inf"), "finite number of at least 1.0"),
    ("max_chain_cost", 0.5, "finite number of at least 1.0"),
    ("max_chain_cost", "2.0", "finite number of at least 1.0"),
    ("max_chain_cost", True, "finite number of at least 1.0"),
    ("max_chain_cost", None, "finite number of at least 1.0"),
    ("repository_id", "xyz", "32 hexadecimal digits"),
    ("repository_id", 12345, "32 hexadecimal digits"),
    ("repository_id", "ab" * 17, "32 hexadecimal digits"),
    ("repository_id", MISSING, "missing"),
    ("version", "1", "integer format version (1, 2 or 3)"),
    ("version", True, "integer format version (1, 2 or 3)"),
    ("version", None, "integer format version (1, 2 or 3)"),
    ("retention", 5, "object of retention rules"),
    ("retention", [["keep_last", 5]], "object of retention rules"),
    ("retention", "keep_last=5", "object of retention rules"),
    ("retention", {"keep_lst": 5}, "unknown rule"),
    ("retention", {"keep_last": "5"}, "retention.keep_last"),
    ("retention", {"keep_last": -1}, "retention.keep_last"),
    ("retention", {"keep_last": True}, "retention.keep_last"),
    ("retention", {"keep_daily": 1.5}, "retention.keep_daily"),
    ("retention", {"keep_every_steps": None}, "retention.keep_every_steps"),
    ("retention", {"keep_within": 36}, "retention.keep_within"),
    ("retention", {"keep_within": "3m"}, "retention.keep_within"),
    ("retention", {"keep_within": ""}, "retention.keep_within"),
    ("retention", {"keep_within": {"h": 36}}, "retention.keep_within"),
    ("retention", {"keep_tag": [1, 2]}, "retention.keep_tag"),
    ("retention", {"keep_tag": {"a": "b"}}, "retention.keep_tag"),
    ("retention", {"keep_best": 2}, "keep_best needs the metric"),
    ("retention", {"keep_best": 2, "metric": ["loss"]}, "retention.metric"),
    ("retention", {"keep_best": 1, "metric": "loss", "mode": "lowest"}, "retention.mode"),
    ("retention", {"mode": None}, "retention.mode"),
    ("retention", {"keep_last": {"nested": {"garbage": [1, None]}}}, "retention.keep_last"),
]


def _id(case: tuple[str, Any, str]) -> str:
    key, value, _ = case
    return f"{key}={'missing' if value is MISSING else json.dumps(value)}"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with two snapshots (each case copies it)."""
    path = tmp_path_factory.mktemp("cfg") / "r"
    with cas.Repository.init(path, chunk_size=4096, pack_size=1 << 16) as repo:
        repo.save({"w": torch.arange(3000, dtype=torch.float32)}, tag="a", metadata={"loss": 1.0})
        repo.save({"w": torch.arange(3000, dtype=torch.float32) + 1}, tag="b", metadata={"loss": 0.5})
    return path


def _copy(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, ignore=shutil.ignore_patterns("lock.mdb"))
    return dest


def _write(path: Path, key: str, value: Any) -> dict[str, Any]:
    config = json.loads((path / "config.json").read_text())
    if value is MISSING:
        del config[key]
    else:
        config[key] = value
    (path / "config.json").write_text(json.dumps(config))  # NaN / Infinity as Python's json writes them
    return config


@pytest.mark.parametrize("case", BAD, ids=[_id(c) for c in BAD])
def test_bad_config_is_a_config_error(template: Path, tmp_path: Path, case: tuple[str, Any, str]) -> None:
    key, value, also = case
    path = _copy(template, tmp_path / "r")
    config = _write(path, key, value)
    before = repo_files(path)
    with pytest.raises(cas.ConfigError) as info:
        cas.Repository.open(path)
    message = str(info.value)
    assert key in message, message
    assert also in message, message
    assert str(path / "config.json") in message, message
    assert "\n" not in message
    if value is not MISSING:
        assert key + " is " in message or key in ("retention",), message
    assert info.value.exit_code == 3
    assert isinstance(info.value, cas.RepositoryError)
    with pytest.raises(cas.ConfigError):
        validate_config(config, path)
    assert repo_files(path) == before  # nothing stored changed


def test_message_names_value_and_range(template: Path, tmp_path: Path) -> None:
    path = _copy(template, tmp_path / "r")
    _write(path, "chunk_size", -4096)
    with pytest.raises(cas.ConfigError) as info:
        cas.Repository.open(path)
    assert str(info.value) == (
        f"{path / 'config.json'}: chunk_size is -4096; it must be a multiple of 16 from 4096 to 268435456 bytes "
        "(edit the file or restore it from a replica)"
    )


def test_foreign_and_future_configs_keep_their_errors(template: Path, tmp_path: Path) -> None:
    path = _copy(template, tmp_path / "r")
    _write(path, "format", "something-else")
    with pytest.raises(cas.NotARepositoryError):
        cas.Repository.open(path)
    _write(path, "format", "cas-repository")
    _write(path, "version", 4)  # a version from the future
    with pytest.raises(cas.FormatVersionError, match="upgrade cas"):
        cas.Repository.open(path)


GOOD: list[tuple[str, Any]] = [
    ("max_chain_cost", MISSING),  # older repositories
    ("max_delta_depth", MISSING),
    ("compression", MISSING),
    ("retention", None),
    ("retention", {}),
    ("retention", {"keep_last": 1, "keep_tag": "a*", "keep_within": "2w"}),
    ("retention", {"keep_best": 1, "metric": "loss", "mode": "max"}),
    ("max_chain_cost", 3),
    ("max_delta_depth", 0),
    ("pack_size", 4096),
    ("some_future_key", {"anything": [1, 2]}),
]


@pytest.mark.parametrize("case", GOOD, ids=[f"{k}={'missing' if v is MISSING else json.dumps(v)}" for k, v in GOOD])
def test_good_configs_still_open(template: Path, tmp_path: Path, case: tuple[str, Any]) -> None:
    path = _copy(template, tmp_path / "r")
    _write(path, *case)
    with cas.Repository.open(path) as repo:
        assert_same(repo.load("a"), {"w": torch.arange(3000, dtype=torch.float32)})
        repo.save({"w": torch.zeros(10)}, tag="c")
        assert repo.verify().ok


def test_cli_exits_3_with_one_line(template: Path, tmp_path: Path) -> None:
    cases = [("chunk_size", -4096), ("max_chain_cost", float("nan")), ("retention", {"keep_last": "x"})]
    runs = []
    for i, (key, value) in enumerate(cases):
        path = _copy(template, tmp_path / f"r{i}")
        _write(path, key, value)
        for args in (["ls"], ["gc"], ["forget", "--keep-last", "1"]):
            proc = subprocess.Popen(
                [str(CAS), "--repo", str(path), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            runs.append((key, path, repo_files(path), args, proc))
    for key, path, before, args, proc in runs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 3, (args, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("cas: error: ") and key in lines[0] and "config.json" in lines[0], lines[0]
        assert "Traceback" not in err and out == ""
        assert repo_files(path) == before, args  # gc / forget removed nothing


def test_retention_rules_match_retention_policy() -> None:
    """store.py cannot import cas.retention (a higher layer): its copy of the rules must stay in step."""
    fields = RetentionPolicy.__dataclass_fields__
    assert set(RETENTION_RULES) == set(fields)
    assert {name for name, f in fields.items() if f.type == "int"} == set(RETENTION_COUNTS)


@pytest.mark.parametrize("text", ["36h", "1d12h", "2w", "6mo", "1y", "1.5h", "90min", "10s", " 1d 2h ", "3m", "",
                                  "h", "1", "1.h", "1.5.5h", "2weeks", "-1d", "1d-", "1e3s", "1 mo", "0s"])
def test_duration_check_matches_parse_duration(text: str) -> None:
    try:
        parse_duration(text)
        parses = True
    except cas.UsageError:
        parses = False
    assert _is_duration(text) == parses


@pytest.mark.parametrize("rules", [
    {"keep_last": 3}, {"keep_within": "1d12h", "keep_tag": ["a*", "b"]}, {"keep_best": 2, "metric": "loss"},
    {"keep_every_steps": 1000, "mode": "max"}, {"keep_tag": "release-*"}, {"metric": None, "keep_within": None},
])
def test_accepted_retention_is_a_policy(rules: dict[str, Any]) -> None:
    config = {"format": "cas-repository", "version": 1, "repository_id": "0" * 32, "chunk_size": 4096,
              "pack_size": 4096, "retention": rules}
    validate_config(config, "/nowhere")
    RetentionPolicy.from_dict(rules)
