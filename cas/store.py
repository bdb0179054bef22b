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

import contextlib
import fcntl
import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cas.errors import (
    FormatVersionError,
    InvalidTagError,
    ManifestCorruptError,
    NotARepositoryError,
    RepositoryExistsError,
)
from cas.ids import SnapshotId

REPO_FORMAT_NAME = "cas-repository"
REPO_VERSION = 1
CONFIG_NAME = "config.json"
TAG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@=-]{0,127}")
HEX_ID = re.compile(r"[0-9a-f]{64}")
RESERVED_TAGS = frozenset({"latest"})


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


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.packs_dir = root / "packs"
        self.refs_dir = root / "refs"
        self.index_dir = root / "index"
        self.tmp_dir = root / "tmp"
        self.locks_dir = root / "locks"

    # config ---------------------------------------------------------------
    @classmethod
    def create(cls, root: Path, settings: dict[str, Any]) -> LocalStore:
        if root.exists():
            if not root.is_dir():
                raise RepositoryExistsError(f"{root} exists and is not a directory")
            if (root / CONFIG_NAME).exists():
                raise RepositoryExistsError(f"{root} is already a cas repository")
            if any(root.iterdir()):
                raise RepositoryExistsError(f"{root} is not empty; cas init needs a new or empty directory")
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root)
        for d in (store.packs_dir, store.refs_dir, store.index_dir, store.tmp_dir, store.locks_dir):
            d.mkdir(exist_ok=True)
        config = {"format": REPO_FORMAT_NAME, "version": REPO_VERSION, "repository_id": uuid.uuid4().hex, **settings}
        atomic_write(root / CONFIG_NAME, json.dumps(config, indent=2).encode() + b"\n", store.tmp_dir)
        fsync_dir(root.parent if root.parent != root else root)
        return store

    @classmethod
    def open(cls, root: Path) -> tuple[LocalStore, dict[str, Any]]:
        config_path = root / CONFIG_NAME
        if not root.is_dir():
            raise NotARepositoryError(f"{root} is not a cas repository (no such directory); create one with `cas init`")
        if not config_path.is_file():
            raise NotARepositoryError(f"{root} is not a cas repository (no {CONFIG_NAME}); create one with `cas init`")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NotARepositoryError(f"{root} is not a cas repository ({CONFIG_NAME} is unreadable: {exc})") from None
        if not isinstance(config, dict) or config.get("format") != REPO_FORMAT_NAME:
            raise NotARepositoryError(f"{root} is not a cas repository ({CONFIG_NAME} is not a cas config)")
        version = config.get("version")
        if version != REPO_VERSION:
            raise FormatVersionError(
                f"{root} has repository format version {version!r}; this cas reads version {REPO_VERSION}"
                + ("; upgrade cas" if isinstance(version, int) and version > REPO_VERSION else "")
            )
        store = cls(root)
        for d in (store.packs_dir, store.refs_dir, store.tmp_dir, store.locks_dir, store.index_dir):
            if not d.is_dir():
                if d in (store.packs_dir, store.refs_dir):
                    raise NotARepositoryError(f"{root} is damaged: {d.name}/ is missing")
                d.mkdir(exist_ok=True)
        return store, config

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write(self.root / CONFIG_NAME, json.dumps(config, indent=2).encode() + b"\n", self.tmp_dir)

    # refs -----------------------------------------------------------------
    def ref_path(self, name: str) -> Path:
        return self.refs_dir / name

    def write_ref(self, name: str, snap_id: SnapshotId) -> None:
        atomic_write(self.ref_path(name), snap_id.hex().encode() + b"\n", self.tmp_dir)

    def read_ref(self, name: str) -> SnapshotId:
        path = self.ref_path(name)
        text = path.read_text(errors="replace").strip()
        if not HEX_ID.fullmatch(text):
            raise ManifestCorruptError(f"ref {name!r} is damaged (holds {text[:80]!r}, not a snapshot id)")
        return SnapshotId(bytes.fromhex(text))

    def has_ref(self, name: str) -> bool:
        return self.ref_path(name).is_file()

    def delete_ref(self, name: str) -> None:
        self.ref_path(name).unlink()
        fsync_dir(self.refs_dir)

    def ref_names(self) -> list[str]:
        return sorted(p.name for p in self.refs_dir.iterdir() if p.is_file() and not p.name.endswith(".tmp"))

    # temp files and locks ----------------------------------------------------
    def new_temp_path(self, prefix: str) -> Path:
        return self.tmp_dir / f"{prefix}-{os.getpid()}-{uuid.uuid4().hex}.tmp"

    @contextlib.contextmanager
    def lock(self, exclusive: bool) -> Iterator[None]:
        """Savers and loads hold the repository lock shared; gc holds it exclusive.

        A turnstile (``gate.lock``) keeps a stream of savers from starving gc: gc takes
        the gate exclusively before waiting for the repository lock, and a saver passes
        the gate (shared, released at once) before taking its shared lock, so once gc
        waits, new saves queue behind it while the saves in flight finish.
        """
        with open(self.locks_dir / "gate.lock", "a+b") as gate, open(self.locks_dir / "repo.lock", "a+b") as f:
            if exclusive:
                fcntl.flock(gate.fileno(), fcntl.LOCK_EX)
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                    try:
                        yield
                    finally:
                        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                finally:
                    fcntl.flock(gate.fileno(), fcntl.LOCK_UN)
            else:
                fcntl.flock(gate.fileno(), fcntl.LOCK_SH)
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_SH)
                finally:
                    fcntl.flock(gate.fileno(), fcntl.LOCK_UN)
                try:
                    yield
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
