"""Storage backends: the seam under every byte ``cas`` stores.

``open_backend(url, storage_options)`` picks one from a URL:

    /path/to/repo, ./repo, file:///path/to/repo   LocalBackend (options: create, fsync)
    s3://BUCKET/PREFIX                            S3Backend in a RetryingBackend (options: endpoint,
                                                  region, access_key_id, secret_access_key,
                                                  session_token, timeout, multipart_threshold,
                                                  part_size, max_concurrency, retry_attempts,
                                                  retry_base_delay, retry_max_delay)
    memory://NAME                                 MemoryBackend (a fresh, empty one)

The interface and its contract are in :mod:`cas.backends.base`. The S3 backend (and its
client library) loads only when an ``s3://`` URL is opened.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cas.backends.base import (
    Backend,
    BucketNotFoundError,
    Capabilities,
    ObjectInfo,
    ShortReadError,
    WriteMode,
    validate_key,
)
from cas.backends.failover import FailoverBackend
from cas.backends.local import LocalBackend
from cas.backends.memory import MemoryBackend
from cas.backends.retry import RetryingBackend
from cas.backends.tiered import TieredBackend
from cas.errors import UsageError

if TYPE_CHECKING:
    from cas.backends.s3 import IncompleteUpload, S3Backend

__all__ = [
    "Backend",
    "BucketNotFoundError",
    "Capabilities",
    "FailoverBackend",
    "IncompleteUpload",
    "LocalBackend",
    "MemoryBackend",
    "ObjectInfo",
    "RetryingBackend",
    "S3Backend",
    "ShortReadError",
    "TieredBackend",
    "WriteMode",
    "open_backend",
    "validate_key",
]

_S3_OPTIONS = {
    "endpoint",
    "region",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "timeout",
    "multipart_threshold",
    "part_size",
    "max_concurrency",
    "coalesce_gap",
    "read_span",
    "storage_class",
}
_RETRY_OPTIONS = {"retry_attempts": "attempts", "retry_base_delay": "base_delay", "retry_max_delay": "max_delay"}
_LOCAL_OPTIONS = {"create", "fsync"}


def __getattr__(name: str) -> Any:
    if name in ("S3Backend", "IncompleteUpload"):
        from cas.backends import s3  # noqa: PLC0415 - boto3 loads only when S3 is used

        return getattr(s3, name)
    raise AttributeError(f"module 'cas.backends' has no attribute {name!r}")


def _check_options(kind: str, options: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UsageError(
            f"unknown storage option(s) for {kind}: {', '.join(unknown)} (known: {', '.join(sorted(allowed))})"
        )


def open_backend(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Backend:
    """The backend a repository URL names (see the module docstring)."""
    options = dict(storage_options or {})
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise UsageError(f"storage URL must be a non-empty str or path, got {url!r}")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "":
        _check_options("a local directory", options, _LOCAL_OPTIONS)
        return LocalBackend(Path(url).expanduser(), **options)
    parsed = urllib.parse.urlsplit(url)
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise UsageError(f"file URL {url!r} names host {parsed.netloc!r}; only local paths are supported")
        _check_options("a local directory", options, _LOCAL_OPTIONS)
        return LocalBackend(urllib.parse.unquote(parsed.path), **options)
    if scheme == "memory":
        _check_options("memory", options, set())
        return MemoryBackend(parsed.netloc + parsed.path or "memory")
    if scheme == "s3":
        if not parsed.netloc:
            raise UsageError(f"S3 URL {url!r} names no bucket (expected s3://BUCKET/PREFIX)")
        if parsed.query or parsed.fragment:
            raise UsageError(f"S3 URL {url!r}: pass settings as storage_options, not in the URL")
        _check_options("S3", options, _S3_OPTIONS | set(_RETRY_OPTIONS))
        retry = {_RETRY_OPTIONS[k]: options.pop(k) for k in list(options) if k in _RETRY_OPTIONS}
        from cas.backends.s3 import S3Backend  # noqa: PLC0415 - boto3 loads only when S3 is used

        inner = S3Backend(parsed.netloc, urllib.parse.unquote(parsed.path).strip("/"), **options)
        return RetryingBackend(inner, **retry)
    raise UsageError(f"unsupported storage URL scheme {scheme!r} in {url!r} (use a path, file://, s3:// or memory://)")
