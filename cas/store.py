"""The local store: a repository's directory layout, config, refs, temp files and lock.

    <repo>/config.json     format name and version, chunk size, defaults
    <repo>/packs/xx/<id>.pack
    <repo>/refs/<name>     one line: a snapshot id (hex)
    <repo>/index/          LMDB (rebuildable)
    <repo>/tmp/            packs being written; leftovers of crashes
    <repo>/locks/repo.lock flock: shared by savers, exclusive by gc

Every file write is atomic: a temp name, fsync, ``os.replace``, fsync of the directory.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from pathlib import Path
from typing import Any, TypeGuard

from cas.errors import (
    ConfigError,
    FormatVersionError,
    InvalidTagError,
    NotARepositoryError,
)

REPO_FORMAT_NAME = "cas-repository"
# 2: manifest nodes in packs of their own; 3: planes coded as zero runs (FORMAT.md §1); 1 and 2 still open
REPO_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
CONFIG_NAME = "config.json"


def _readable_versions() -> str:
    """``1, 2 or 3``."""
    *head, last = map(str, READABLE_VERSIONS)
    return f"{', '.join(head)} or {last}" if head else last
TAG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@=-]{0,127}")
HEX_ID = re.compile(r"[0-9a-f]{64}")
RESERVED_TAGS = frozenset({"latest"})

#: bounds of ``chunk_size`` (FORMAT.md §2): a multiple of 16, so every chunk boundary is
#: element-aligned for every dtype up to complex128
CHUNK_SIZE_MIN = 4096
CHUNK_SIZE_MAX = 256 << 20
CHUNK_ALIGN = 16
MAX_DELTA_DEPTH_LIMIT = 64
PACK_SIZE_MAX = (1 << 63) - 1
COMPRESSION_NAMES = ("none", "fast", "default", "max")
CHUNK_SIZE_RULE = f"it must be a multiple of {CHUNK_ALIGN} from {CHUNK_SIZE_MIN} to {CHUNK_SIZE_MAX} bytes"
REPOSITORY_ID = re.compile(r"[0-9a-fA-F]{32}")
#: the retention rules (``cas.retention.RetentionPolicy`` fields) and those whose value is a count
RETENTION_COUNTS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly",
                    "keep_best", "keep_every_steps")
RETENTION_RULES = frozenset({*RETENTION_COUNTS, "keep_within", "keep_tag", "metric", "mode"})
DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:s|min|h|d|w|mo|y))+")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, temp_dir: Path) -> None:
    temp = temp_dir / f"{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(temp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG_PATTERN.fullmatch(tag):
        raise InvalidTagError(
            f"invalid tag {tag!r}: use 1-128 characters from letters, digits and . _ + @ = -, "
            "starting with a letter or digit"
        )
    if tag in RESERVED_TAGS or HEX_ID.fullmatch(tag):
        raise InvalidTagError(f"tag {tag!r} is reserved (it would be read as a snapshot id or 'latest')")
    return tag


def chunk_size_ok(value: object) -> TypeGuard[int]:
    """Whether ``value`` is a chunk size a repository may use (FORMAT.md §2)."""
    return (type(value) is int and CHUNK_SIZE_MIN <= value <= CHUNK_SIZE_MAX
            and value % CHUNK_ALIGN == 0)


def _shown(value: object) -> str:
    """A config value as it reads in the JSON file, shortened for a one-line message."""
    try:
        text = json.dumps(value, ensure_ascii=True, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: object) -> TypeGuard[int]:
    return type(value) is int  # not bool: true is not a size


def validate_config(config: dict[str, Any], root: Path | str) -> dict[str, Any]:
    """Check every known key of a repository config for type and range; returns ``config`` unchanged.

    ``root`` is the config file (or the repository directory) named in messages. A missing
    required key or a bad value raises :class:`ConfigError` naming the key, the value, what is
    allowed and the file; unknown keys are left alone (a newer cas may add some). ``format``
    and ``version`` keep their own errors (not a repository / a format this cas cannot read).
    """
    path = os.fspath(root)  # a local path, or an object URL such as s3://bucket/prefix/config.json
    if not path.endswith(CONFIG_NAME):
        path = path.rstrip("/") + "/" + CONFIG_NAME
    where = path[: -len(CONFIG_NAME)].rstrip("/") or "."
    fix = "(edit the file or restore it from a replica)"

    def bad(key: str, rule: str) -> ConfigError:
        shown = _shown(config[key]) if key in config else "missing"
        return ConfigError(f"{path}: {key} is {shown}; {rule} {fix}")

    if not isinstance(config, dict) or config.get("format") != REPO_FORMAT_NAME:
        raise NotARepositoryError(f"{where} is not a cas repository ({CONFIG_NAME} is not a cas config)")
    version = config.get("version")
    if not _is_int(version):
        raise bad("version", f"it must be an integer format version ({_readable_versions()})")
    if version not in READABLE_VERSIONS:
        raise FormatVersionError(
            f"{where} has repository format version {version!r}; this cas reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}" + ("; upgrade cas" if version > REPO_VERSION else "")
        )
    rid = config.get("repository_id")
    if not isinstance(rid, str) or not REPOSITORY_ID.fullmatch(rid):
        raise bad("repository_id", "it must be a string of 32 hexadecimal digits")
    chunk_size = config.get("chunk_size")
    if not chunk_size_ok(chunk_size):
        raise bad("chunk_size", CHUNK_SIZE_RULE)
    pack_size = config.get("pack_size")
    if not _is_int(pack_size) or not chunk_size <= pack_size <= PACK_SIZE_MAX:
        raise bad("pack_size", f"it must be an integer number of bytes from chunk_size ({chunk_size}) "
                               f"to {PACK_SIZE_MAX}")
    if "compression" in config and config["compression"] not in COMPRESSION_NAMES:
        raise bad("compression", "it must be one of " + ", ".join(f'"{c}"' for c in COMPRESSION_NAMES))
    if "max_delta_depth" in config:
        depth = config["max_delta_depth"]
        if not _is_int(depth) or not 0 <= depth <= MAX_DELTA_DEPTH_LIMIT:
            raise bad("max_delta_depth", f"it must be an integer from 0 to {MAX_DELTA_DEPTH_LIMIT} (0: no deltas)")
    if "max_chain_cost" in config:
        cost = config["max_chain_cost"]
        if (not isinstance(cost, (int, float)) or isinstance(cost, bool) or not math.isfinite(cost)
                or cost < 1.0):
            raise bad("max_chain_cost", "it must be a finite number of at least 1.0 (keyframe restores)")
    if config.get("retention") is not None:
        _validate_retention(config["retention"], path, fix)
    return config


def _tag_patterns(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(p, str) for p in value))


def _validate_retention(rules: object, path: str, fix: str) -> None:
    """``retention`` holds what ``RetentionPolicy.from_dict`` takes, every value of the right type.

    The rules are those of ``cas.retention.RetentionPolicy`` (a higher layer, so not imported here;
    tests/test_config_validation.py keeps the two in step), checked as its ``__post_init__`` does.
    """

    def bad(what: str, value: object, rule: str) -> ConfigError:
        return ConfigError(f"{path}: {what} is {_shown(value)}; {rule} {fix}")

    if not isinstance(rules, dict):
        raise bad("retention", rules, "it must be an object of retention rules such as {\"keep_last\": 5}")
    for key, value in rules.items():
        where = f"retention.{key}"
        if key not in RETENTION_RULES:
            raise ConfigError(
                f"{path}: retention has an unknown rule {_shown(key)}; the rules are "
                f"{', '.join(sorted(RETENTION_RULES))} {fix}"
            )
        if key in RETENTION_COUNTS:
            if not _is_int(value) or value < 0:
                raise bad(where, value, "it must be a non-negative integer")
        elif key == "keep_within":
            if value is not None and not (isinstance(value, str) and _is_duration(value)):
                raise bad(where, value, 'it must be a duration such as "36h", "1d12h", "2w", "6mo" or "1y", or null')
        elif key == "metric":
            if value is not None and not isinstance(value, str):
                raise bad(where, value, "it must be a metric name (a string), or null")
        elif key == "mode":
            if value not in ("min", "max"):
                raise bad(where, value, 'it must be "min" or "max"')
        elif key == "keep_tag" and not _tag_patterns(value):
            raise bad(where, value, "it must be a tag pattern or a list of tag patterns (strings)")
    if rules.get("keep_best") and not rules.get("metric"):
        raise bad("retention.metric", rules.get("metric"), "keep_best needs the metric to rank snapshots by")


def _is_duration(text: str) -> bool:
    """What ``cas.retention.parse_duration`` accepts: '36h', '1d12h', '2w', '6mo', '1y' (spaces ignored)."""
    compact = text.strip().replace(" ", "")
    return bool(compact) and DURATION.fullmatch(compact) is not None
