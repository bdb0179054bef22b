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
