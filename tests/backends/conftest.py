"""Fixtures for the backend tests: one moto S3 server per session, a fresh bucket per test."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cas.backends import Backend, LocalBackend, MemoryBackend, RetryingBackend
from tests.backends.moto_server import MotoServer

KEY_ID = "testing"
SECRET = "testing"
REGION = "us-east-1"
MiB = 1 << 20

_bucket_ids = itertools.count()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """moto's S3 server as a subprocess on a free 127.0.0.1 port, killed at the end of the session."""
    with MotoServer() as srv:
        yield srv


def s3_client(endpoint: str, key_id: str = KEY_ID, secret: str = SECRET) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=key_id, aws_secret_access_key=secret
    )


@pytest.fixture(scope="session")
def admin_client(moto_server: MotoServer) -> Iterator[Any]:
    """A plain boto3 client on the session's server, for setting up and inspecting buckets."""
    client = s3_client(moto_server.endpoint)
    yield client
    client.close()


@pytest.fixture
def s3_bucket(admin_client: Any) -> str:
    """A new, empty bucket on the session's server."""
    name = f"cas-test-{os.getpid()}-{next(_bucket_ids)}"
    admin_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def make_s3(moto_server: MotoServer, s3_bucket: str) -> Iterator[Callable[..., Any]]:
    """``make_s3(prefix="t", **kwargs)`` -> an S3Backend on the test's bucket (closed afterwards)."""
    from cas.backends.s3 import S3Backend

    made: list[S3Backend] = []

    def make(prefix: str = "t", **kwargs: Any) -> S3Backend:
        bucket = kwargs.pop("bucket", s3_bucket)
        opts: dict[str, Any] = {
            "endpoint": moto_server.endpoint,
            "region": REGION,
            "access_key_id": KEY_ID,
            "secret_access_key": SECRET,
            "timeout": 10.0,
            "multipart_threshold": 5 * MiB,
            "part_size": 5 * MiB,
            "max_concurrency": 8,
        }
        opts.update(kwargs)
        b = S3Backend(bucket, prefix, **opts)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


BACKEND_KINDS = ["memory", "local", "s3", "retrying-memory"]


@pytest.fixture(params=BACKEND_KINDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def backend(backend_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Backend]:
    b: Backend
    if backend_kind == "memory":
        b = MemoryBackend()
    elif backend_kind == "local":
        b = LocalBackend(tmp_path / "store")
    elif backend_kind == "s3":
        b = request.getfixturevalue("make_s3")()
    elif backend_kind == "retrying-memory":
        b = RetryingBackend(MemoryBackend(), attempts=3, base_delay=0.0, max_delay=0.0)
    else:  # pragma: no cover
        raise AssertionError(backend_kind)
    yield b
    b.close()
