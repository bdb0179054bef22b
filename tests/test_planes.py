"""The compiled byte-plane kernels give exactly the numpy reference's bytes, both ways, in place too."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cas import planes

CASES = [(mode, rotate) for mode in (planes.PLAIN, planes.XOR, planes.DIFFERENCE) for rotate in (False, True)
         if not (mode == planes.DIFFERENCE and rotate)]


def test_the_kernels_are_in_use() -> None:
    # numba is a dependency: a silent fallback to the ~8x slower numpy path would be a regression
    assert planes.accelerated()


@settings(max_examples=200, deadline=None)
@given(
    k=st.sampled_from([1, 2, 4, 8]),
    case=st.sampled_from(CASES),
    n=st.integers(0, 700),
    seed=st.integers(0, 2**32 - 1),
    extremes=st.booleans(),
)
def test_split_and_join_match_the_numpy_reference(k: int, case: tuple[int, bool], n: int, seed: int,
                                                  extremes: bool) -> None:
    mode, rotate = case
    rng = np.random.default_rng(seed)
    if extremes:  # all-zero / all-one words, sign bits, carries across every byte
        choices = np.array([0, 1, 0x7F, 0x80, 0xFF], np.uint8)
        data, base = rng.choice(choices, n * k), rng.choice(choices, n * k)
    else:
        data, base = rng.integers(0, 256, n * k, dtype=np.uint8), rng.integers(0, 256, n * k, dtype=np.uint8)
    b = None if mode == planes.PLAIN else base
    expected = planes._np_split(data, b, k, mode, rotate)
    got = planes.split(data, b, k, mode, rotate)
    assert got.shape == (k, n) and np.array_equal(got, expected)
    stored = [np.frombuffer(bytes(plane), np.uint8) for plane in got]  # read-only, as decoded from a payload
    out = np.full(n * k, 0xAB, np.uint8)
    planes.join(stored, out, b, k, mode, rotate)
    assert np.array_equal(out, data)
    if b is not None:  # a delta applied in place: out starts as the base
        inplace = base.copy()
        planes.join(stored, inplace, inplace, k, mode, rotate)
        assert np.array_equal(inplace, data)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_float_rotation_puts_the_exponent_in_the_top_plane(k: int) -> None:
    dtype = {2: np.float16, 4: np.float32, 8: np.float64}[k]
    values = np.array([1.0, -1.0, 2.0, -2.0], dtype)
    top = planes.split(values.view(np.uint8), None, k, planes.PLAIN, rotate=True)[k - 1]
    # +x and -x differ only in the sign bit, which the rotation moved out of the top byte
    assert top[0] == top[1] and top[2] == top[3] and top[0] != top[2]


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(0, 3000),
    density=st.floats(0, 1),
    long_gaps=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_zero_runs_match_the_numpy_reference(n: int, density: float, long_gaps: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    plane = np.where(rng.random(n) < density, rng.integers(1, 256, n), 0).astype(np.uint8)
    if long_gaps and n:  # gaps of exactly 254, 255, 256 and 510 zero bytes: escapes and their edges
        plane[:] = 0
        for pos in (0, 255, 511, 767, 1278, 2000):
            if pos < n:
                plane[pos] = 1 + pos % 255
    gaps, values = planes.zero_runs(plane)
    ref_gaps, ref_values = planes._np_zero_runs(plane)
    assert np.array_equal(gaps, ref_gaps) and np.array_equal(values, ref_values)
    assert np.array_equal(values, plane[plane != 0])
    assert not len(gaps) or gaps[-1] != 255
    for join in (planes.zero_runs_join, planes._np_zero_runs_join):
        out = np.full(n, 0xAB, np.uint8)
        assert join(gaps, values, out) and np.array_equal(out, plane)


def test_zero_runs_of_a_hand_made_plane() -> None:
    plane = np.zeros(600, np.uint8)
    plane[[0, 10, 300, 599]] = [7, 1, 2, 9]
    gaps, values = planes.zero_runs(plane)
    # 0 zeros before byte 0; 9 before byte 10; 289 = 255 + 34 before byte 300; 298 = 255 + 43 before 599
    assert bytes(gaps) == bytes([0, 9, 255, 34, 255, 43]) and bytes(values) == bytes([7, 1, 2, 9])


@pytest.mark.parametrize(
    ("gaps", "values", "n"),
    [
        ([0, 9], [7], 20),  # more gap entries than values
        ([0], [7, 1], 20),  # more values than gap entries
        ([0, 255], [7], 300),  # a trailing escape
        ([19, 0], [7, 1], 20),  # the second value lands past the plane
        ([255, 255], [], 600),  # escapes and no value
        ([3], [0], 20),  # a zero value: not what zero_runs writes
        ([20], [5], 20),  # exactly one past the end
    ],
)
def test_zero_runs_that_do_not_describe_the_plane_are_refused(gaps: list[int], values: list[int], n: int) -> None:
    for join in (planes.zero_runs_join, planes._np_zero_runs_join):
        out = np.full(n, 0xAB, np.uint8)
        assert not join(np.array(gaps, np.uint8), np.array(values, np.uint8), out)
        assert (out == 0xAB).all()  # nothing written
