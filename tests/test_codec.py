from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cas.codec import Codec, decode, encode
from cas.errors import ChunkCorruptError, FormatVersionError, UsageError


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=5000), compression=st.sampled_from(["none", "fast", "default", "max"]))
def test_round_trip(data: bytes, compression: str) -> None:
    codec, payload = encode(data, compression)
    assert len(payload) <= len(data)  # never more than raw
    assert bytes(decode(codec, payload, len(data))) == data


def test_compressible_data_is_compressed_and_noise_stays_raw() -> None:
    codec, payload = encode(b"\0" * 100_000, "default")
    assert codec == Codec.ZSTD and len(payload) < 1000
    noise = os.urandom(100_000)
    codec, payload = encode(noise, "default")
    assert codec == Codec.RAW and bytes(payload) == noise


def test_corrupted_or_truncated_payload_raises_typed_error() -> None:
    data = b"checkpoint" * 1000
    codec, payload = encode(data, "default")
    assert codec == Codec.ZSTD
    with pytest.raises(ChunkCorruptError):
        decode(codec, payload[: len(payload) // 2], len(data))
    damaged = bytearray(payload)
    damaged[len(damaged) // 2] ^= 0x55
    try:
        out = decode(codec, bytes(damaged), len(data))
    except ChunkCorruptError:
        pass
    else:  # zstd has no checksum by default: the repository's BLAKE3 check catches the rest
        assert len(out) == len(data)
    with pytest.raises(ChunkCorruptError):
        decode(codec, payload, len(data) + 1)
    with pytest.raises(ChunkCorruptError):
        decode(Codec.RAW, b"abc", 4)


def test_unknown_codec_and_setting() -> None:
    with pytest.raises(FormatVersionError, match="codec 9"):
        decode(9, b"", 0)
    with pytest.raises(UsageError, match="unknown compression"):
        encode(b"x", "zip")
