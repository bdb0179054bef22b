from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cas.codec import (
    _PLANE_ZERO_RUNS,
    FLAG_DIFFERENCE,
    FLAG_EXPONENT_ALIGNED,
    SAMPLE_THRESHOLD,
    Buffer,
    Codec,
    changed_share,
    decode,
    encode,
    encode_as,
    needs_base,
    patch,
)
from cas.errors import ChunkCorruptError, FormatVersionError, UsageError

SETTINGS = ["none", "fast", "default", "max"]
ELEMENT_SIZES = [1, 2, 4, 8]
# (codec, flags) of every codec 2/3/4 variant
VARIANTS = [
    (Codec.BYTE_GROUPED, 0),
    (Codec.BYTE_GROUPED, FLAG_EXPONENT_ALIGNED),
    (Codec.DELTA, 0),
    (Codec.DELTA, FLAG_EXPONENT_ALIGNED),
    (Codec.DELTA, FLAG_DIFFERENCE),
    (Codec.SPARSE_DELTA, 0),
    (Codec.SPARSE_DELTA, FLAG_EXPONENT_ALIGNED),
    (Codec.SPARSE_DELTA, FLAG_DIFFERENCE),
]
SPARSE_FLAGS = [0, FLAG_EXPONENT_ALIGNED, FLAG_DIFFERENCE]
# codec 4 header: k, flags, r (runs), m (elements in the runs), run table mode, its stored length
SPARSE_HEAD = struct.Struct("<BBIIBI")


def _encode_variant(
    data: bytes, codec: Codec, flags: int, k: int, base: bytes | None, zero_runs: bool = True
) -> bytes:
    return bytes(
        encode_as(
            data,
            codec,
            element_size=k,
            exponent_aligned=bool(flags & FLAG_EXPONENT_ALIGNED),
            difference=bool(flags & FLAG_DIFFERENCE),
            base=base if needs_base(codec) else None,
            zero_runs=zero_runs,
        )
    )


def _parse_sparse(payload: bytes) -> dict:
    """Split a codec 4 payload into its fields, following the module docstring (no checks)."""
    k, flags, r, m, table_mode, table_length = SPARSE_HEAD.unpack_from(payload)
    pos = SPARSE_HEAD.size
    table = payload[pos : pos + table_length]
    if table_mode == 1:
        table = zstandard.ZstdDecompressor().decompress(table)
    pos += table_length
    fields = struct.unpack_from("<" + "BI" * k, payload, pos)
    pos += 5 * k
    plane_modes, plane_lengths = list(fields[0::2]), list(fields[1::2])
    pos += sum(plane_lengths)
    gaps_lengths = struct.unpack(f"<{2 * r}I", table)
    starts, end = [], 0
    for gap, length in zip(gaps_lengths[:r], gaps_lengths[r:], strict=True):
        starts.append(end + gap)
        end += gap + length
    return {
        "k": k,
        "flags": flags,
        "r": r,
        "m": m,
        "table_mode": table_mode,
        "runs": list(zip(starts, gaps_lengths[r:], strict=True)),
        "plane_modes": plane_modes,
        "tail": payload[pos:],
    }


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
    base_seed=st.integers(0, 4),
)
def test_every_variant_round_trips(data: bytes, k: int, variant: tuple[Codec, int], base_seed: int) -> None:
    codec, flags = variant
    assume(not (k == 1 and flags & FLAG_EXPONENT_ALIGNED))
    if base_seed == 4:  # a similar base: every 13th byte differs (sparse runs)
        base = bytes(b ^ (i % 13 == 0) for i, b in enumerate(data))
    elif base_seed:
        base = bytes((b + base_seed * 37) % 256 for b in data)
    else:
        base = os.urandom(len(data))
    payload = _encode_variant(data, codec, flags, k, base)
    assert payload[:2] == bytes([k, flags])  # codecs 2, 3 and 4 all start with k and flags
    out = decode(codec, payload, len(data), base if needs_base(codec) else None)
    assert bytes(out) == data


@pytest.mark.parametrize("k", ELEMENT_SIZES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_length_including_empty_and_odd_tails(k: int, variant: tuple[Codec, int]) -> None:
    codec, flags = variant
    if k == 1 and flags & FLAG_EXPONENT_ALIGNED:
        pytest.skip("no exponent-aligned variant for single bytes")
    for length in [*range(0, 3 * k + 2), 100, 257, 4099]:
        data = os.urandom(length)
        similar = bytearray(data)
        similar[::37] = bytes(b ^ 0x20 for b in similar[::37])
        for base in (os.urandom(length), bytes(similar), data):
            payload = _encode_variant(data, codec, flags, k, base)
            assert bytes(decode(codec, payload, length, base if needs_base(codec) else None)) == data


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
        assert not needs_base(codec)  # a base of another length is not used
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
    # three changed rows of 1 KiB: the sparse delta stores little more than their changed bytes
    assert codec == Codec.SPARSE_DELTA and len(payload) < 3 * 1024
    assert bytes(decode(codec, payload, w.nbytes, w.data)) == rows.tobytes()
    dense = encode_as(rows.data, Codec.DELTA, element_size=4, difference=True, base=w.data)
    assert len(payload) < len(dense)
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
            b = base if needs_base(codec) else None
            found.append((codec, _encode_variant(raw, codec, flags, k, base), raw, b))
    # sparse deltas against bases that differ in a few places, so that damage hits the run table
    for k in ELEMENT_SIZES:
        for changed, tail_differs in _sparse_patterns(len(raw) // k, k):
            sparse_base = _sparse_base(raw, k, changed, tail_differs)
            for flags in SPARSE_FLAGS:
                if k == 1 and flags & FLAG_EXPONENT_ALIGNED:
                    continue
                payload = _encode_variant(raw, Codec.SPARSE_DELTA, flags, k, sparse_base)
                found.append((Codec.SPARSE_DELTA, payload, raw, sparse_base))
    return found


def _sparse_patterns(n: int, k: int) -> list[tuple[list[int], bool]]:
    """(changed element positions, tail differs) for a chunk of ``n`` elements of ``k`` bytes."""
    merged = 16 // k  # a gap of exactly 16 bytes: folded into one run
    few = [0, 1, 2, 50, 51, 300, 301 + merged, 1000, 1000 + merged + 1, n - 2, n - 1]
    many = [j for i in range(5, n - 2, 40) for j in (i, i + 1, i + 2)]  # regular runs: a zstd-framed run table
    return [(few, True), (many, False), ([n // 2], False), ([], True)]


def _sparse_base(raw: bytes, k: int, changed: list[int], tail_differs: bool) -> bytes:
    """``raw`` with the elements at ``changed`` moved a little (byte 0, some also byte k-1) and maybe its tail."""
    base = bytearray(raw)
    for j, i in enumerate(changed):
        base[i * k] ^= 1 + j % 200
        if j % 3 == 0 and k > 1:
            base[i * k + k - 1] ^= 0x40
    t = len(raw) % k
    if tail_differs and t:
        base[-t:] = bytes(b ^ 0xA5 for b in base[-t:])
    return bytes(base)


PAYLOADS = _payloads()


def test_damage_payloads_cover_every_sparse_layout() -> None:
    sparse = [_parse_sparse(payload) for codec, payload, _, _ in PAYLOADS if codec == Codec.SPARSE_DELTA]
    for k in ELEMENT_SIZES:
        of_k = [p for p in sparse if p["k"] == k]
        assert {p["table_mode"] for p in of_k} == {0, 1}  # stored and zstd-framed run tables
        assert {0, 1} <= {mode for p in of_k for mode in p["plane_modes"]} <= {0, 1, 2}
        assert any(p["r"] == 0 for p in of_k) and any(p["r"] == 1 and p["m"] == 1 for p in of_k)
        assert any(p["runs"] and p["runs"][0][0] == 0 and sum(p["runs"][-1]) == 12003 // k for p in of_k)
    # zero-run planes (mode 2) in sparse and dense deltas, so that damage hits their headers and streams
    assert any(2 in p["plane_modes"] for p in sparse)
    assert any(codec == Codec.DELTA and 2 in payload[2 : 2 + 5 * payload[0] : 5] for codec, payload, _, _ in PAYLOADS)


def _decode_or_corrupt(codec: int, payload: bytes, raw_length: int, base: bytes | None) -> None:
    out: bytes | None = None
    try:
        out = bytes(decode(codec, payload, raw_length, base))
    except ChunkCorruptError:
        pass
    else:
        assert len(out) == raw_length  # wrong bytes are left to the BLAKE3 check
    if needs_base(codec) and base is not None and len(base) == raw_length >= 0:
        buf = bytearray(base)  # patch (the reader's path) agrees with decode on damage and on the result
        try:
            patch(codec, payload, raw_length, buf)
        except ChunkCorruptError:
            assert out is None
        else:
            assert out == buf


@settings(max_examples=1000, deadline=None)
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
    if extra and codec != Codec.ZSTD:  # a zstd frame ignores trailing bytes; codecs 2/3/4 count them
        with pytest.raises(ChunkCorruptError):
            decode(codec, payload + extra, len(raw), base)
    longer = len(raw) + 1 + len(extra)
    longer_base = base if base is None else base + b"\0" * (1 + len(extra))
    if codec == Codec.SPARSE_DELTA and (longer - len(raw)) % payload[0] == 0:
        # a sparse payload does not record n, only the tail length: with a base of the other length and the
        # same tail length it decodes (to other bytes), which the BLAKE3 check catches
        _decode_or_corrupt(codec, payload, longer, longer_base)
    else:
        with pytest.raises(ChunkCorruptError):
            decode(codec, payload, longer, longer_base)


@pytest.mark.parametrize("k", ELEMENT_SIZES)
def test_sparse_delta_with_a_shorter_base_and_length(k: int) -> None:
    # a base shorter by whole elements with a length to match: the runs overrun the chunk or the tail does not fit
    raw = _weights(3000).tobytes() + b"\x01\x02\x03"
    base = _sparse_base(raw, k, [0, len(raw) // k - 1], True)  # a run ends at the last element
    payload = _encode_variant(raw, Codec.SPARSE_DELTA, 0, k, base)
    for cut in (k, 2 * k, 1):
        with pytest.raises(ChunkCorruptError):
            decode(Codec.SPARSE_DELTA, payload, len(raw) - cut, base[:-cut])


@settings(max_examples=400, deadline=None)
@given(payload=st.binary(max_size=200), raw_length=st.integers(0, 300), codec=st.sampled_from([1, 2, 3, 4]))
def test_fuzz_arbitrary_bytes_never_raise_another_error(payload: bytes, raw_length: int, codec: int) -> None:
    _decode_or_corrupt(codec, payload, raw_length, os.urandom(raw_length) if needs_base(codec) else None)


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


@pytest.mark.parametrize("codec", [Codec.DELTA, Codec.SPARSE_DELTA])
def test_delta_needs_its_base(codec: Codec) -> None:
    assert needs_base(codec)
    assert not any(needs_base(c) for c in (Codec.RAW, Codec.ZSTD, Codec.BYTE_GROUPED))
    raw, base = _weights(100).tobytes(), _weights(100, seed=1).tobytes()
    if codec == Codec.SPARSE_DELTA:  # a few changed elements
        base = _sparse_base(raw, 4, [3, 50, 51], False)
    payload = _encode_variant(raw, codec, 0, 4, base)
    with pytest.raises(ChunkCorruptError, match="without its base"):
        decode(codec, payload, len(raw))
    with pytest.raises(ChunkCorruptError, match="base chunk of 399 bytes"):
        decode(codec, payload, len(raw), base[:-1])
    with pytest.raises(ChunkCorruptError, match="base chunk of 401 bytes"):
        decode(codec, payload, len(raw), base + b"\0")
    with pytest.raises(ChunkCorruptError, match="base chunk of 399 bytes"):
        patch(codec, payload, len(raw), memoryview(bytearray(base[:-1])))
    with pytest.raises(UsageError):
        encode_as(raw, codec, element_size=4)
    with pytest.raises(UsageError, match="base chunk holds"):
        encode_as(raw, codec, element_size=4, base=base[:-1])
    with pytest.raises(ChunkCorruptError, match="not a delta codec"):
        patch(Codec.BYTE_GROUPED, payload, len(raw), memoryview(bytearray(base)))


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
        for codec in (Codec.DELTA, Codec.SPARSE_DELTA):  # patch's per-thread scratch buffers
            buf = bytearray(base)
            patch(codec, encode_as(data, codec, element_size=4, difference=True, base=base), len(data), buf)
            ok &= buf == data
        return ok

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, chunks * 3))


# -- sparse delta (codec 4) -------------------------------------------------------------


_UINTS = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def _expected_runs(mask: np.ndarray, k: int) -> list[tuple[int, int]]:
    """(start, length) of the runs of changed elements, per the spec: unchanged gaps of at most
    16 bytes (16 // k elements) between two changed elements are folded into one run."""
    runs: list[list[int]] = []
    for i in np.flatnonzero(mask).tolist():
        if runs and i - (runs[-1][0] + runs[-1][1]) <= 16 // k:
            runs[-1][1] = i + 1 - runs[-1][0]
        else:
            runs.append([i, 1])
    return [(start, length) for start, length in runs]


@st.composite
def _sparse_change(draw: st.DrawFn) -> tuple[int, int, bytes, bytes, np.ndarray]:
    """(k, flags, base, data, mask of the changed elements): a random base and a sparse set of changes."""
    k = draw(st.sampled_from(ELEMENT_SIZES))
    flags = draw(st.sampled_from(SPARSE_FLAGS if k > 1 else [0, FLAG_DIFFERENCE]))
    n = draw(st.integers(0, 300))
    mask = np.zeros(n, bool)
    pos = 0  # runs of changes after gaps (in elements) shorter and longer than 16 bytes; gap 0: adjacent runs
    for gap, length in draw(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 20)), max_size=10)):
        mask[pos + gap : pos + gap + length] = True
        pos += gap + length
    if draw(st.booleans()):  # a run touching the start
        mask[: draw(st.integers(1, 3))] = True
    if n and draw(st.booleans()):  # a run touching the end
        mask[n - draw(st.integers(1, 3)) :] = True
    tail = draw(st.integers(0, k - 1))
    tail_differs = draw(st.booleans())
    small = draw(st.booleans())  # small integer steps (the difference variant's case) or random bit flips
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    base = rng.integers(0, 256, n * k + tail, np.uint8)
    data = base.copy()
    ints = data[: n * k].view(_UINTS[k])
    count = int(mask.sum())
    if small:
        step = rng.integers(1, 4, count).astype(_UINTS[k])
        ints[mask] = np.where(rng.random(count) < 0.5, ints[mask] + step, ints[mask] - step)
    else:
        flips = rng.integers(0, 256, count * k, np.uint8).view(_UINTS[k])
        flips[flips == 0] = 1
        ints[mask] ^= flips
    if tail_differs and tail:
        data[n * k :] ^= rng.integers(1, 256, tail, np.uint8)
    return k, flags, base.tobytes(), data.tobytes(), mask


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(change=_sparse_change())
def test_sparse_delta_round_trips_and_patches(change: tuple[int, int, bytes, bytes, np.ndarray]) -> None:
    k, flags, base, data, mask = change
    n, t = divmod(len(data), k)
    share = changed_share(np.frombuffer(data, np.uint8), np.frombuffer(base, np.uint8), k)
    assert share == (int(mask.sum()) / n if n else 0.0)  # exact; the tail is not counted

    payload = _encode_variant(data, Codec.SPARSE_DELTA, flags, k, base)
    fields = _parse_sparse(payload)
    assert (fields["k"], fields["flags"]) == (k, flags)
    assert fields["runs"] == _expected_runs(mask, k)
    assert fields["r"] == len(fields["runs"]) and fields["m"] == sum(length for _, length in fields["runs"])
    assert fields["tail"] == bytes(a ^ b for a, b in zip(data[n * k :], base[n * k :], strict=True))
    assert len(fields["tail"]) == t

    assert bytes(decode(Codec.SPARSE_DELTA, payload, len(data), base)) == data
    dest = bytearray(len(data))
    out = decode(Codec.SPARSE_DELTA, payload, len(data), base, memoryview(dest))
    assert bytes(dest) == data and bytes(out) == data
    buf = bytearray(base)
    patch(Codec.SPARSE_DELTA, payload, len(data), buf)
    assert buf == data

    dense = _encode_variant(data, Codec.DELTA, flags, k, base)  # the dense delta patches too
    buf = bytearray(base)
    patch(Codec.DELTA, dense, len(data), buf)
    assert buf == data


def _sparse_payload(
    runs: list[tuple[int, int]],
    *,
    m: int | None = None,
    r: int | None = None,
    k: int = 4,
    flags: int = 0,
    table: bytes | None = None,
    table_mode: int = 0,
    tail: bytes = b"\x5a",
) -> bytes:
    """A codec 4 payload built by hand from the documented layout: stored run table, stored planes.

    ``runs``: (gap, length) pairs; ``m``/``r``/``table`` override what they would be. Plane i holds
    bytes i+1, i+2, ... so every value is non-zero.
    """
    r = len(runs) if r is None else r
    m = sum(length for _, length in runs) if m is None else m
    if table is None:
        table = struct.pack(f"<{2 * len(runs)}I", *(g for g, _ in runs), *(length for _, length in runs))
    planes = b"".join(bytes((i + j + 1) % 256 for j in range(m)) for i in range(k))
    head = SPARSE_HEAD.pack(k, flags, r, m, table_mode, len(table))
    return head + table + struct.pack("<BI", 0, m) * k + planes + tail


SPARSE_BASE = bytes(range(100, 133))  # 8 elements of 4 bytes and a 1-byte tail


def test_hand_built_sparse_payload_decodes() -> None:
    # runs: elements 1-2 (gap 1) and 6 (gap 3 after element 3): the builder follows the spec
    payload = _sparse_payload([(1, 2), (3, 1)])
    expected = bytearray(SPARSE_BASE)
    for j, element in enumerate([1, 2, 6]):
        for i in range(4):
            expected[4 * element + i] ^= i + j + 1
    expected[32] ^= 0x5A
    assert bytes(decode(Codec.SPARSE_DELTA, payload, 33, SPARSE_BASE)) == expected
    buf = bytearray(SPARSE_BASE)
    patch(Codec.SPARSE_DELTA, payload, 33, buf)
    assert buf == expected
    # no runs at all: the base with its tail changed
    assert bytes(decode(Codec.SPARSE_DELTA, _sparse_payload([]), 33, SPARSE_BASE)) == SPARSE_BASE[:32] + bytes(
        [SPARSE_BASE[32] ^ 0x5A]
    )


ZSTD_TABLE = zstandard.ZstdCompressor().compress(struct.pack("<2I", 1, 2))  # one run (1, 2) as a zstd frame
DAMAGED_SPARSE = {
    "a run overruns the chunk": _sparse_payload([(6, 3)]),
    "the last run overruns the chunk": _sparse_payload([(1, 2), (5, 1)]),
    "a run ends one past the chunk": _sparse_payload([(0, 9)], m=9),
    "a gap of 2**32 - 1": _sparse_payload([(0xFFFFFFFF, 1)]),
    "gaps that would wrap a u32 sum": _sparse_payload([(0xFFFFFFFF, 1), (0xFFFFFFFF, 1)]),
    "a zero-length run": _sparse_payload([(1, 0), (2, 2)]),
    "a zero-length run and m = 0": _sparse_payload([(1, 0)]),
    "a zero-length run, r > m": _sparse_payload([(0, 1), (0, 1), (0, 0)]),
    "m above the sum of the lengths": _sparse_payload([(1, 2)], m=3),
    "m below the sum of the lengths": _sparse_payload([(1, 2), (1, 2)], m=3),
    "r > m": _sparse_payload([(0, 1), (1, 1), (1, 1)], m=2),
    "m > n": _sparse_payload([(0, 8)], m=9),
    "r larger than the table": _sparse_payload([(1, 2)], r=2),
    "r smaller than the table": _sparse_payload([(1, 1), (1, 1)], r=1),
    "unknown run table mode": _sparse_payload([(1, 2)], table_mode=7),
    "a stored table marked zstd": _sparse_payload([(1, 2)], table_mode=1),
    "a zstd table of the wrong content size": _sparse_payload([(1, 2), (1, 1)], table=ZSTD_TABLE, table_mode=1),
    "a zstd table that does not decode": _sparse_payload(
        [(1, 2)], table=ZSTD_TABLE[:-3] + b"\xff\xff\xff", table_mode=1
    ),
    "a missing tail": _sparse_payload([(1, 2)], tail=b""),
    "a tail too long": _sparse_payload([(1, 2)], tail=b"\x01\x02"),
    "difference and exponent-aligned": _sparse_payload([(1, 2)], flags=FLAG_DIFFERENCE | FLAG_EXPONENT_ALIGNED),
    "an unknown flag": _sparse_payload([(1, 2)], flags=0x04),
    "exponent-aligned single bytes": _sparse_payload([(1, 2)], k=1, flags=FLAG_EXPONENT_ALIGNED, tail=b""),
    "element size 3": _sparse_payload([(1, 2)], k=3, tail=b""),
    "a header cut short": _sparse_payload([(1, 2)])[:14],
    "plane descriptors cut short": _sparse_payload([(1, 2)])[:30],
}


@pytest.mark.parametrize("payload", DAMAGED_SPARSE.values(), ids=DAMAGED_SPARSE.keys())
def test_damaged_sparse_run_tables_are_corrupt(payload: bytes) -> None:
    assert bytes(decode(Codec.SPARSE_DELTA, _sparse_payload([(1, 2)]), 33, SPARSE_BASE))  # the base fits
    with pytest.raises(ChunkCorruptError):
        decode(Codec.SPARSE_DELTA, payload, 33, SPARSE_BASE)
    with pytest.raises(ChunkCorruptError):
        patch(Codec.SPARSE_DELTA, payload, 33, memoryview(bytearray(SPARSE_BASE)))


# r = 0 with m > 0: the (empty) run table does not add up to m
@pytest.mark.parametrize("m", [1, 2])
def test_sparse_payload_without_runs_but_with_changed_elements_is_corrupt(m: int) -> None:
    payload = _sparse_payload([], m=m)
    with pytest.raises(ChunkCorruptError):
        decode(Codec.SPARSE_DELTA, payload, 33, SPARSE_BASE)


@settings(max_examples=400, deadline=None)
@given(
    n=st.integers(0, 40),
    runs=st.lists(
        st.tuples(st.one_of(st.integers(0, 45), st.just(0xFFFFFFFF)), st.integers(0, 45)), min_size=1, max_size=6
    ),
    m_delta=st.one_of(st.just(0), st.integers(-3, 3)),
)
def test_fuzz_sparse_run_tables(n: int, runs: list[tuple[int, int]], m_delta: int) -> None:
    """Any run table: decodes exactly when the spec allows it (runs of length >= 1 inside the n
    elements adding up to m), else ChunkCorruptError."""
    m = sum(length for _, length in runs) + m_delta
    assume(m >= 0)
    payload = _sparse_payload(runs, m=m, tail=b"")
    base = bytes(range(4 * n))
    valid = all(length >= 1 for _, length in runs) and m_delta == 0 and sum(g + ln for g, ln in runs) <= n
    if not valid:
        with pytest.raises(ChunkCorruptError):
            decode(Codec.SPARSE_DELTA, payload, 4 * n, base)
        return
    expected = bytearray(base)
    j, end = 0, 0
    for gap, length in runs:
        for element in range(end + gap, end + gap + length):
            for i in range(4):
                expected[4 * element + i] ^= (i + j + 1) % 256
            j += 1
        end += gap + length
    assert bytes(decode(Codec.SPARSE_DELTA, payload, 4 * n, base)) == expected


def test_encode_picks_the_sparse_delta_when_a_few_rows_changed() -> None:
    w = _weights(1 << 18)  # 1 MiB of float32 in rows of 256: chooses on a sample
    rows = w.reshape(-1, 256).copy()
    changed = np.arange(20) * 51 + 7  # 20 of 1024 rows (2 %), none adjacent
    rows[changed] += np.float32(1e-3)
    arr, base_arr = np.frombuffer(rows, np.uint8), np.frombuffer(w, np.uint8)
    assert changed_share(arr, base_arr, 4) == 20 * 256 / (1 << 18) == np.count_nonzero(rows.ravel() != w) / (1 << 18)
    # a tail (here 3 bytes of the last, unchanged element, or a differing extra byte) is not counted
    assert changed_share(arr[:-1], base_arr[:-1], 4) == 20 * 256 / ((1 << 18) - 1)
    tail_differs = changed_share(np.append(arr, np.uint8(1)), np.append(base_arr, np.uint8(2)), 4)
    assert tail_differs == 20 * 256 / (1 << 18)
    dense = encode_as(rows.data, Codec.DELTA, element_size=4, difference=True, base=w.data)
    for compression in ("fast", "default", "max"):
        codec, payload = encode(rows.data, compression, element_size=4, is_float=True, base=w.data)
        assert codec == Codec.SPARSE_DELTA, compression
        assert len(payload) < len(dense) and len(payload) < w.nbytes / 10
        fields = _parse_sparse(bytes(payload))
        assert fields["runs"] == [(256 * int(row), 256) for row in changed]
        assert bytes(decode(codec, payload, w.nbytes, w.data)) == rows.tobytes()

    # every element moved a little: more than half changed, so no sparse candidate; the dense delta wins
    nxt = w + _weights(1 << 18, seed=1, scale=1e-4)
    share = changed_share(np.frombuffer(nxt, np.uint8), base_arr, 4)
    assert share == np.count_nonzero(nxt != w) / (1 << 18) and share > 0.5
    for compression in ("fast", "default"):
        codec, payload = encode(nxt.data, compression, element_size=4, is_float=True, base=w.data)
        assert codec == Codec.DELTA, compression
        assert bytes(decode(codec, payload, w.nbytes, w.data)) == nxt.tobytes()


def _typed_view(b: bytes) -> memoryview:
    return memoryview(np.frombuffer(bytearray(b), np.float32))


@pytest.mark.parametrize("codec", [Codec.SPARSE_DELTA, Codec.DELTA])
@pytest.mark.parametrize("make", [bytearray, _typed_view], ids=["bytearray", "float32-view"])
def test_patch_into_other_writable_buffers(codec: Codec, make: type) -> None:
    # a memoryview of float32 has len() in elements: patch must still see its bytes
    base = _weights(64).tobytes()
    data = _sparse_base(base, 4, [1, 2, 40], False)
    payload = _encode_variant(data, codec, FLAG_DIFFERENCE, 4, base)
    buf = make(base)
    patch(codec, payload, len(data), buf)
    assert bytes(buf) == data


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
    encoded = _encode_variant(raw, Codec.BYTE_GROUPED, FLAG_EXPONENT_ALIGNED, 4, None, zero_runs=False)
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


# Codec 4 of GOLDEN_RAW against GOLDEN_BASE, k = 4, flags = 0 (XOR, no rotation), derived from the
# module docstring by hand. Elements 3 (3.25 = 0x40500000 vs 3.0 = 0x40400000) and 4 (0.0 = 0x00000000 vs
# 0.0078125 = 0x3c000000) differ, elements 0-2 and 5 are equal: one run. Values 0x40500000 ^ 0x40400000 =
# 0x00100000 and 0x00000000 ^ 0x3c000000 = 0x3c000000. Everything is stored (mode 0): the run table
# (8 bytes) and the planes (2 bytes) are too short to try zstd.
GOLDEN_SPARSE = (
    "04"  # k = 4
    "00"  # flags = 0
    "01000000"  # r = 1 run (u32)
    "02000000"  # m = 2 elements in all runs (u32)
    "00"  # run table mode 0: stored
    "08000000"  # run table stored length 8r = 8 (u32)
    "03000000"  # gap[0] = 3: the run starts at element 3
    "02000000"  # length[0] = 2: elements 3 and 4
    "0002000000"  # plane 0 descriptor: stored, m = 2 bytes
    "0002000000"  # plane 1 descriptor
    "0002000000"  # plane 2 descriptor
    "0002000000"  # plane 3 descriptor
    "0000"  # plane 0: byte 0 (least significant) of 0x00100000 and of 0x3c000000
    "0000"  # plane 1: byte 1
    "1000"  # plane 2: byte 2
    "003c"  # plane 3: byte 3 (most significant)
    "02"  # tail, t = 25 mod 4 = 1 byte: 0x07 ^ 0x05
)


def test_golden_sparse_payload() -> None:
    payload = bytes.fromhex(GOLDEN_SPARSE)
    assert len(payload) == 15 + 8 + 5 * 4 + 4 * 2 + 1
    assert _encode_variant(GOLDEN_RAW, Codec.SPARSE_DELTA, 0, 4, GOLDEN_BASE) == payload
    assert bytes(decode(Codec.SPARSE_DELTA, payload, len(GOLDEN_RAW), GOLDEN_BASE)) == GOLDEN_RAW
    buf = bytearray(GOLDEN_BASE)
    patch(Codec.SPARSE_DELTA, payload, len(GOLDEN_RAW), buf)
    assert buf == GOLDEN_RAW


# -- zero-run planes (plane mode 2, format version 3) ---------------------------------------

# 600 bytes, nonzero at 0, 10, 300 and 599, as codec 2 with k = 1: one plane of mode 2 holding
# m = 4 | g = 6 | gap stream stored, 6 bytes | values stored, 4 bytes | 00 09 ff 22 ff 2b | 07 01 02 09
GOLDEN_ZERO_RUNS = "0100" "021c000000" "04000000" "06000000" "0006000000" "0004000000" "0009ff22ff2b" "07010209"


def _golden_zero_runs_raw() -> bytes:
    raw = bytearray(600)
    for pos, value in ((0, 7), (10, 1), (300, 2), (599, 9)):
        raw[pos] = value
    return bytes(raw)


def test_golden_zero_run_payload() -> None:
    raw, payload = _golden_zero_runs_raw(), bytes.fromhex(GOLDEN_ZERO_RUNS)
    assert bytes(decode(Codec.BYTE_GROUPED, payload, len(raw))) == raw
    assert _encode_variant(raw, Codec.BYTE_GROUPED, 0, 1, None) == payload
    without = _encode_variant(raw, Codec.BYTE_GROUPED, 0, 1, None, zero_runs=False)
    assert without[2] == 1  # one zstd frame (on a plane this small, with its 18-byte header, no larger)
    assert bytes(decode(Codec.BYTE_GROUPED, without, len(raw))) == raw


# offsets in the plane body: m 0-3 | g 4-7 | gap mode 8 | its length 9-12 | value mode 13 | its
# length 14-17 | gap stream 18-23 | values 24-27
@pytest.mark.parametrize("damage", [
    (0, b"\x05"),  # m = 5: the gap stream ends after 4 values
    (0, b"\xff\xff\x00\x00"),  # m larger than the plane
    (4, b"\x07"),  # g = 7, the stored gap stream holds 6
    (9, b"\x07"),  # gap stream length 7 in its descriptor: the lengths no longer add up
    (13, b"\x09"),  # value stream mode 9
    (23, b"\xff"),  # the last gap is an escape
    (24, b"\x00"),  # a zero value
    (23, b"\xe0"),  # 255 + 224 zeros before the last value: it lands past the plane
])
def test_damaged_zero_run_planes_are_corrupt(damage: tuple[int, bytes]) -> None:
    offset, patch_bytes = damage
    payload = bytearray(bytes.fromhex(GOLDEN_ZERO_RUNS))
    start = 7 + offset  # after k, flags and the plane descriptor
    payload[start : start + len(patch_bytes)] = patch_bytes
    with pytest.raises(ChunkCorruptError, match="zero"):
        decode(Codec.BYTE_GROUPED, bytes(payload), 600)


def _plane_modes(codec: Codec, payload: Buffer) -> list[int]:
    view = bytes(payload)
    if codec in (Codec.BYTE_GROUPED, Codec.DELTA):
        return list(view[2 : 2 + 5 * view[0] : 5])
    if codec == Codec.SPARSE_DELTA:
        return _parse_sparse(view)["plane_modes"]
    return []


@settings(max_examples=150, deadline=None)
@given(
    k=st.sampled_from([2, 4, 8]),
    n=st.integers(0, 20_000),
    share=st.floats(0, 0.6),
    scale=st.sampled_from([1e-6, 1e-4, 1e-2]),
    seed=st.integers(0, 2**32 - 1),
)
def test_deltas_with_zero_run_planes_round_trip(k: int, n: int, share: float, scale: float, seed: int) -> None:
    """Training-step deltas (a share of elements moved a little): the high planes are mostly zero."""
    rng = np.random.default_rng(seed)
    dtype = {2: np.float16, 4: np.float32, 8: np.float64}[k]
    base = rng.standard_normal(n).astype(dtype)
    moved = rng.random(n) < share
    raw = np.where(moved, base + (rng.standard_normal(n) * scale).astype(dtype), base).astype(dtype)
    raw_bytes, base_bytes = raw.tobytes() + b"\x01", base.tobytes() + b"\x02"
    for zero_runs in (True, False):
        codec, payload = encode(raw_bytes, "default", element_size=k, is_float=True, base=base_bytes,
                                zero_runs=zero_runs)
        assert bytes(decode(codec, payload, len(raw_bytes), base_bytes if needs_base(codec) else None)) == raw_bytes
        if not zero_runs:
            assert _PLANE_ZERO_RUNS not in _plane_modes(codec, payload)


def test_zero_run_planes_shrink_the_high_byte_of_a_training_step() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1 << 18, generator=g) * 0.02
    for dtype in (torch.float32, torch.bfloat16):
        step = (base + torch.randn(base.shape, generator=g) * 1e-3).to(dtype)
        raw, b = step.view(torch.uint8).numpy().tobytes(), base.to(dtype).view(torch.uint8).numpy().tobytes()
        codec, with_runs = encode(raw, "default", element_size=step.element_size(), is_float=True, base=b)
        _, without = encode(raw, "default", element_size=step.element_size(), is_float=True, base=b, zero_runs=False)
        assert codec == Codec.DELTA and _plane_modes(codec, with_runs)[-1] == _PLANE_ZERO_RUNS
        assert len(with_runs) < 0.99 * len(without)  # measured: 0.986x (float32), 0.955x (bfloat16)
        assert bytes(decode(codec, with_runs, len(raw), b)) == raw
