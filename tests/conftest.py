from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import cas


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[cas.Repository]:
    r = cas.Repository.init(tmp_path / "repo", chunk_size=64 * 1024, pack_size=1 << 20)
    yield r
    r.close()


# moto's S3 server (a real process on 127.0.0.1) for the repository tests that run on S3 too
from tests.backends.conftest import admin_client, moto_server, s3_bucket  # noqa: E402, F401
