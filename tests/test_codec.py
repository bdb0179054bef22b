from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cas.codec import (
    FLAG_DIFFERENCE,
    FLAG_EXPONENT_ALIGNED,
    SAMPLE_THRESHOLD,
    Codec,
    decode,
    encode,
    encode_as,
    needs_base,
)
from cas.errors import ChunkCorruptError, FormatVersionError, UsageError

SETTINGS = ["none", "fast", "default", "max"]
ELEMENT_SIZES = [1, 2, 4, 8]
# (codec, flags) of every codec 2/3 variant
VARIANTS = [
    (Codec.BYTE_GROUPED, 0),
    (Codec.BYTE_GROUPED, FLAG_EXPONENT_ALIGNED),
    (Codec.DELTA, 0),
    (Codec.DELTA, FLAG_EXPONENT_ALIGNED),
    (Codec.DELTA, FLAG_DIFFERENCE),
]


def _encode_variant(data: bytes, codec: Codec, flags: int, k: int, base: bytes | None) -> bytes:
    return bytes(
        encode_as(
            data,
            codec,
            element_size=k,
            exponent_aligned=bool(flags & FLAG_EXPONENT_ALIGNED),
            difference=bool(flags & FLAG_DIFFERENCE),
            base=base if codec == Codec.DELTA else None,
        )
    )


def _weights(n: int, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


# -- the old API, unchanged -----------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=5000), compression=st.sampled_from(SETTINGS))
def test_round_trip(data: bytes, compression: str) -> None:
    codec, payload = encode(data, compression)
    assert codec in (Codec.RAW, Codec.ZSTD)  # no dtype information: plain zstd as before
    assert len(payload) <= len(data)  # never more than raw
    assert bytes(decode(codec, payload, len(data))) == data


def test_compressible_data_is_compressed_and_noise_stays_raw() -> None:
    codec, payload = encode(b"\0" * 100_000, "default")
    assert codec == Codec.ZSTD and len(payload) < 1000
    noise = os.urandom(100_000)
    codec, payload = encode(noise, "default")
    assert codec == Codec.RAW and bytes(payload) == noise
    for k in ELEMENT_SIZES:
        codec, payload = encode(noise, "max", element_size=k, is_float=k > 1, base=os.urandom(100_000))
        assert codec == Codec.RAW and payload is noise  # the same buffer, no copy


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


# -- every codec and variant round-trips ----------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=3000),
    k=st.sampled_from(ELEMENT_SIZES),
    variant=st.sampled_from(VARIANTS),
    base_seed=st.integers(0, 3),
)
def test_every_variant_round_trips(data: bytes, k: int, variant: tuple[Codec, int], base_seed: int) -> None:
    codec, flags = variant
    assume(not (k == 1 and flags & FLAG_EXPONENT_ALIGNED))
    base = bytes((b + base_seed * 37) % 256 for b in data) if base_seed else os.urandom(len(data))
    payload = _encode_variant(data, codec, flags, k, base)
    assert payload[:2] == bytes([k, flags])
    out = decode(codec, payload, len(data), base if codec == Codec.DELTA else None)
    assert bytes(out) == data


@pytest.mark.parametrize("k", ELEMENT_SIZES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_length_including_empty_and_odd_tails(k: int, variant: tuple[Codec, int]) -> None:
    codec, flags = variant
    if k == 1 and flags & FLAG_EXPONENT_ALIGNED:
        pytest.skip("no exponent-aligned variant for single bytes")
    for length in [*range(0, 3 * k + 2), 100, 257, 4099]:
        data, base = os.urandom(length), os.urandom(length)
        payload = _encode_variant(data, codec, flags, k, base)
        assert bytes(decode(codec, payload, length, base if codec == Codec.DELTA else None)) == data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=4000),
    compression=st.sampled_from(SETTINGS),
    k=st.sampled_from([*ELEMENT_SIZES, 16]),
    is_float=st.booleans(),
    with_base=st.sampled_from(["none", "similar", "random", "other length"]),
)
def test_encode_picks_a_codec_that_round_trips_and_is_never_larger(
    data: bytes, compression: str, k: int, is_float: bool, with_base: str
) -> None:
    base: bytes | None = None
    if with_base == "similar":
        base = bytes(b ^ (i % 7 == 0) for i, b in enumerate(data))
    elif with_base == "random":
        base = os.urandom(len(data))
    elif with_base == "other length":
        base = os.urandom(len(data) + 1)
    codec, payload = encode(data, compression, element_size=k, is_float=is_float, base=base)
    assert len(payload) <= len(data)
    if compression == "none":
        assert codec == Codec.RAW
    if with_base == "other length":
        assert codec != Codec.DELTA  # a base of another length is not used
    assert bytes(decode(codec, payload, len(data), base if needs_base(codec) else None)) == data


def test_float_tensors_from_torch_round_trip_through_typed_views() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int8):
        t = (torch.randn(5000) * 30).to(dtype)
        nxt = t + (torch.randn(5000) * 0.01).to(dtype)
        view = memoryview(t.view(torch.uint8).numpy())
        base_view = memoryview(nxt.view(torch.uint8).numpy())
        for compression in SETTINGS:
            codec, payload = encode(
                view, compression, element_size=t.element_size(), is_float=dtype.is_floating_point, base=base_view
            )
            out = decode(codec, payload, t.nbytes, base_view if needs_base(codec) else None)
            assert bytes(out) == bytes(view)
    arr = _weights(1000)
    codec, payload = encode(memoryview(arr), "default", element_size=4, is_float=True)  # format "f"
    assert codec == Codec.BYTE_GROUPED and bytes(decode(codec, payload, arr.nbytes)) == arr.tobytes()


# -- compression targets (smaller versions of bench/codec_ratios.py) --------------------------


def test_grouped_codecs_beat_zstd_on_weights() -> None:
    w = _weights(1 << 18)  # 1 MiB: chooses on a sample
    codec, payload = encode(w.data, "default", element_size=4, is_float=True)
    assert codec == Codec.BYTE_GROUPED and payload[1] == FLAG_EXPONENT_ALIGNED
    assert len(payload) / w.nbytes <= 0.84
    zstd_size = len(encode(w.data, "default")[1])
    assert len(payload) < 0.92 * zstd_size
    bf = torch.from_numpy(_weights(1 << 18, seed=1)).bfloat16()
    raw = bf.view(torch.uint8).numpy()
    codec, payload = encode(raw.data, "default", element_size=2, is_float=True)
    assert codec == Codec.BYTE_GROUPED and len(payload) / raw.nbytes <= 0.67
    assert bytes(decode(codec, payload, raw.nbytes)) == raw.tobytes()


def test_delta_of_a_training_step_and_of_sparse_rows() -> None:
    w = _weights(1 << 18)
    nxt = w + _weights(1 << 18, seed=1, scale=1e-4)
    codec, payload = encode(nxt.data, "default", element_size=4, is_float=True, base=w.data)
    assert codec == Codec.DELTA and len(payload) / w.nbytes < 0.66
    assert bytes(decode(codec, payload, w.nbytes, w.data)) == nxt.tobytes()

    rows = w.reshape(-1, 256).copy()
    rows[[3, 500, 1000]] += 1e-3
    codec, payload = encode(rows.data, "fast", element_size=4, is_float=True, base=w.data)
    assert codec == Codec.DELTA and len(payload) / w.nbytes < 0.01
    assert bytes(decode(codec, payload, w.nbytes, w.data)) == rows.tobytes()

    # an unrelated base: the key frame is smaller and wins
    other = _weights(1 << 18, seed=2)
    for compression in ("fast", "default", "max"):
        codec, _ = encode(nxt.data, compression, element_size=4, is_float=True, base=other.data)
        assert codec == Codec.BYTE_GROUPED


def test_sampled_choice_matches_the_best_full_encoding() -> None:
    assert SAMPLE_THRESHOLD <= (1 << 20)
    w = _weights(1 << 18)
    nxt = w + _weights(1 << 18, seed=1, scale=1e-4)
    _, chosen = encode(nxt.data, "default", element_size=4, is_float=True, base=w.data)
    best = min(len(_encode_variant(nxt.tobytes(), c, f, 4, w.tobytes())) for c, f in VARIANTS)
    assert len(chosen) <= 1.01 * best


# -- damage ----------------------------------------------------------------------------


def _payloads() -> list[tuple[Codec, bytes, bytes, bytes | None]]:
    """(codec, payload, raw, base) for every codec, with compressible and stored planes and a tail."""
    w = _weights(3000)
    raw = w.tobytes() + b"\x01\x02\x03"
    base = (w + _weights(3000, seed=1, scale=1e-4)).tobytes() + b"\x09\x08\x07"
    found: list[tuple[Codec, bytes, bytes, bytes | None]] = [(Codec.ZSTD, bytes(encode_as(raw, Codec.ZSTD)), raw, None)]
    for codec, flags in VARIANTS:
        for k in (1, 4):
            if k == 1 and flags & FLAG_EXPONENT_ALIGNED:
                continue
            b = base if codec == Codec.DELTA else None
            found.append((codec, _encode_variant(raw, codec, flags, k, base), raw, b))
    return found


PAYLOADS = _payloads()


def _decode_or_corrupt(codec: int, payload: bytes, raw_length: int, base: bytes | None) -> None:
    try:
        out = decode(codec, payload, raw_length, base)
    except ChunkCorruptError:
        return
    assert len(memoryview(out).cast("B")) == raw_length  # wrong bytes are left to the BLAKE3 check


@settings(max_examples=400, deadline=None)
@given(
    which=st.integers(0, len(PAYLOADS) - 1),
    position=st.floats(0, 1, exclude_max=True),
    xor=st.integers(1, 255),
    count=st.integers(1, 4),
)
def test_fuzz_damaged_payload_raises_chunk_corrupt_or_keeps_length(
    which: int, position: float, xor: int, count: int
) -> None:
    codec, payload, raw, base = PAYLOADS[which]
    damaged = bytearray(payload)
    for i in range(count):
        damaged[(int(position * len(payload)) + 7 * i) % len(payload)] ^= xor
    _decode_or_corrupt(codec, bytes(damaged), len(raw), base)


@settings(max_examples=200, deadline=None)
@given(which=st.integers(0, len(PAYLOADS) - 1), cut=st.floats(0, 1, exclude_max=True), extra=st.binary(max_size=8))
def test_fuzz_truncated_or_extended_payload_raises(which: int, cut: float, extra: bytes) -> None:
    codec, payload, raw, base = PAYLOADS[which]
    with pytest.raises(ChunkCorruptError):
        decode(codec, payload[: int(cut * len(payload))], len(raw), base)
    if extra and codec != Codec.ZSTD:  # a zstd frame ignores trailing bytes; codecs 2/3 count them
        with pytest.raises(ChunkCorruptError):
            decode(codec, payload + extra, len(raw), base)
    with pytest.raises(ChunkCorruptError):
        decode(codec, payload, len(raw) + 1 + len(extra), base if base is None else base + b"\0" * (1 + len(extra)))


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=200), raw_length=st.integers(0, 300), codec=st.sampled_from([1, 2, 3]))
def test_fuzz_arbitrary_bytes_never_raise_another_error(payload: bytes, raw_length: int, codec: int) -> None:
    _decode_or_corrupt(codec, payload, raw_length, os.urandom(raw_length) if codec == 3 else None)


def test_forged_headers_are_corrupt() -> None:
    raw = _weights(64).tobytes()
    good = _encode_variant(raw, Codec.BYTE_GROUPED, 0, 4, None)
    forged = [
        bytes([3]) + good[1:],  # element size 3
        bytes([4, 0x04]) + good[2:],  # unknown flag
        bytes([4, FLAG_DIFFERENCE]) + good[2:],  # difference without a base codec
        bytes([1, FLAG_EXPONENT_ALIGNED]) + good[2:],  # exponent-aligned single bytes
        good[:2] + bytes([7]) + good[3:],  # unknown plane mode
        good[:2] + struct.pack("<BI", 1, 64) + good[7:],  # stored plane marked zstd
        good[:2] + struct.pack("<BI", 0, 60) + good[7:],  # lengths that do not add up
        b"",
        good[:5],
    ]
    for payload in forged:
        with pytest.raises(ChunkCorruptError):
            decode(Codec.BYTE_GROUPED, payload, len(raw))
    delta = _encode_variant(raw, Codec.DELTA, FLAG_DIFFERENCE, 4, raw)
    with pytest.raises(ChunkCorruptError, match="do not combine"):
        decode(Codec.DELTA, bytes([4, FLAG_DIFFERENCE | FLAG_EXPONENT_ALIGNED]) + delta[2:], len(raw), raw)


def test_huge_or_negative_lengths_are_corrupt_without_allocating_them() -> None:
    frame = bytearray(encode_as(b"a" * 1000, Codec.ZSTD))
    frame[5] = 0xFF  # the content size field
    with pytest.raises(ChunkCorruptError):
        decode(Codec.ZSTD, bytes(frame), 1000)
    for codec, payload, _, base in PAYLOADS:
        for raw_length in (1 << 62, -1):
            with pytest.raises(ChunkCorruptError):
                decode(codec, payload, raw_length, base)


def test_delta_needs_its_base() -> None:
    assert needs_base(Codec.DELTA)
    assert not any(needs_base(c) for c in (Codec.RAW, Codec.ZSTD, Codec.BYTE_GROUPED))
    raw, base = _weights(100).tobytes(), _weights(100, seed=1).tobytes()
    payload = _encode_variant(raw, Codec.DELTA, 0, 4, base)
    with pytest.raises(ChunkCorruptError, match="without its base"):
        decode(Codec.DELTA, payload, len(raw))
    with pytest.raises(ChunkCorruptError, match="base chunk of 399 bytes"):
        decode(Codec.DELTA, payload, len(raw), base[:-1])
    with pytest.raises(UsageError):
        encode_as(raw, Codec.DELTA, element_size=4)


def test_bad_arguments_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="element size"):
        encode(b"abcd", "default", element_size=3)
    with pytest.raises(UsageError, match="exponent-aligned"):
        encode_as(b"abcd", Codec.BYTE_GROUPED, exponent_aligned=True)
    with pytest.raises(UsageError, match="difference"):
        encode_as(b"abcd", Codec.BYTE_GROUPED, element_size=4, difference=True)
    with pytest.raises(UsageError, match="base chunk holds"):
        encode_as(b"abcd", Codec.DELTA, element_size=4, base=b"abc")


def test_encode_and_decode_from_threads() -> None:
    chunks = [(_weights(1 << 16, seed=i).tobytes(), _weights(1 << 16, seed=i + 100).tobytes()) for i in range(8)]

    def work(pair: tuple[bytes, bytes]) -> bool:
        data, base = pair
        ok = True
        for compression in ("fast", "default"):
            codec, payload = encode(data, compression, element_size=4, is_float=True, base=base)
            ok &= bytes(decode(codec, payload, len(data), base if needs_base(codec) else None)) == data
        return ok

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, chunks * 3))


# -- golden bytes: the format must not drift --------------------------------------------

GOLDEN_RAW = struct.pack("<6f", 1.0, -2.0, 0.5, 3.25, 0.0, -0.0078125) + b"\x07"
GOLDEN_BASE = struct.pack("<6f", 1.0, -2.0, 0.5, 3.0, 0.0078125, -0.0078125) + b"\x05"
# codec, element size, flags, planes (plane 0 = least significant bytes), tail. Every plane is
# stored (mode 0), so the payload is exact: k | flags | k x (mode 0, u32 n) | planes | tail
GOLDEN = [
    (Codec.BYTE_GROUPED, 4, 0, "000000000000 000000000000 800000500000 3fc03f4000bc", "07"),
    (Codec.BYTE_GROUPED, 4, 1, "000100000001 000000000000 000000a00000 7f807e800078", "07"),
    (Codec.DELTA, 4, 0, "000000000000 000000000000 000000100000 000000003c00", "02"),
    (Codec.DELTA, 4, 1, "000000000000 000000000000 000000200000 000000007800", "02"),
    (Codec.DELTA, 4, 2, "00000000ff00 00000000ff00 00000020ff00 000000007700", "02"),
    (Codec.BYTE_GROUPED, 1, 0, "0000803f000000c00000003f0000504000000000000000bc07", ""),
    (Codec.BYTE_GROUPED, 2, 1, "00000001000000a000000001 007f0080007e008000000078", "07"),
    (Codec.DELTA, 8, 2, "0000ff 0000ff 0000ff 000077 000000 000000 002000 000000", "02"),
]
# np.arange(64, dtype=float32), byte-grouped and exponent-aligned: planes 0-1 are zstd frames
GOLDEN_ZSTD_PLANES = (
    "0401011100000001110000000040000000011d00000028b52ffd2040450000100000010093001628b52ffd2040450000100000010093"
    "001600000080004080c00020406080a0c0e000102030405060708090a0b0c0d0e0f00008101820283038404850586068707880889098a0a8"
    "b0b8c0c8d0d8e0e8f0f828b52ffd2040a5000058007f8080818181818283840310008df49b1d01"
)


@pytest.mark.parametrize(("codec", "k", "flags", "planes", "tail"), GOLDEN)
def test_golden_payloads(codec: Codec, k: int, flags: int, planes: str, tail: str) -> None:
    n = len(GOLDEN_RAW) // k
    payload = bytes([k, flags]) + struct.pack("<BI", 0, n) * k + bytes.fromhex(planes + tail)
    base = GOLDEN_BASE if codec == Codec.DELTA else None
    assert bytes(decode(codec, payload, len(GOLDEN_RAW), base)) == GOLDEN_RAW
    assert _encode_variant(GOLDEN_RAW, codec, flags, k, GOLDEN_BASE) == payload


def test_golden_payload_with_zstd_planes() -> None:
    raw = np.arange(64, dtype=np.float32).tobytes()
    payload = bytes.fromhex(GOLDEN_ZSTD_PLANES)
    assert bytes(decode(Codec.BYTE_GROUPED, payload, len(raw))) == raw
    # the zstd frames' bytes may differ with another libzstd; the layout may not
    encoded = _encode_variant(raw, Codec.BYTE_GROUPED, FLAG_EXPONENT_ALIGNED, 4, None)
    assert encoded[:2] == payload[:2]
    assert [encoded[2 + 5 * i] for i in range(4)] == [1, 1, 0, 1]
    assert bytes(decode(Codec.BYTE_GROUPED, encoded, len(raw))) == raw


def test_decode_in_place_writes_into_the_given_buffer() -> None:
    import numpy as np

    from cas.codec import DECODES_IN_PLACE

    data = (np.random.default_rng(5).standard_normal(5000).astype(np.float32) * 0.02).tobytes()
    moved = (np.frombuffer(data, np.float32) + np.float32(1e-4)).tobytes()
    for payload_args in ((data, None), (moved, data)):
        raw, base = payload_args
        codec, payload = encode(raw, "default", element_size=4, is_float=True, base=base)
        assert codec in DECODES_IN_PLACE
        dest = bytearray(len(raw))
        out = decode(codec, bytes(payload), len(raw), base, memoryview(dest))
        assert bytes(dest) == raw and bytes(out) == raw
