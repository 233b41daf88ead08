"""Trit packing: 5 trits per byte (1.6 bits per trit), exact round trips on every axis and odd sizes, the
documented plane layout, jit / vmap, and clear errors for non-trits."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kernels_pallas import trits


@st.composite
def trit_arrays(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=13))
    dtype = draw(st.sampled_from([np.int8, np.int16, np.int32]))
    codes = draw(hnp.arrays(dtype, shape, elements=st.integers(-1, 1)))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    return codes, axis


@settings(max_examples=25, deadline=None)
@given(trit_arrays())
def test_round_trip(case):
    codes, axis = case
    packed = trits.pack_trits(codes, axis)
    size = codes.shape[axis]
    expected = list(codes.shape)
    expected[axis] = trits.trits_packed_size(size)
    assert packed.dtype == np.uint8 and packed.shape == tuple(expected)
    assert int(np.max(packed, initial=0)) <= 242
    back = trits.unpack_trits(packed, axis, size)
    assert back.dtype == np.int8
    np.testing.assert_array_equal(back, codes)


def test_layout_is_base3_planes():
    """byte p = sum_i (t[p + i P] + 1) 3^i with P = ceil(K / 5); padding with 0-trits (digit 1)."""
    codes = np.array([1, -1, 0, 1, 1, -1, 0, 0, 1, -1, 1, 0, -1], np.int8)  # K = 13 -> P = 3 bytes
    packed = np.asarray(trits.pack_trits(codes))
    assert packed.shape == (3,)
    padded = np.concatenate([codes, np.zeros(2, np.int8)])
    for p in range(3):
        assert int(packed[p]) == sum((int(padded[p + i * 3]) + 1) * 3**i for i in range(5))
    assert int(trits.pack_trits(np.zeros(5, np.int8))[0]) == 121  # five 0-trits
    assert int(trits.pack_trits(np.ones(5, np.int8))[0]) == 242  # the largest byte


def test_real_size_is_1_6_bits_per_trit():
    codes = np.ones((4000, 16), np.int8)
    packed = trits.pack_trits(codes, 0)
    assert packed.nbytes * 8 / codes.size == pytest.approx(1.6) == trits.BITS_PER_TRIT
    assert trits.pack_trits(codes, 1).shape == (4000, 4)  # 16 trits -> 4 bytes (padded to 20)
    assert [trits.trits_packed_size(k) for k in (0, 1, 5, 6, 10, 4096)] == [0, 1, 1, 2, 2, 820]


def test_jit_and_vmap():
    codes = np.random.default_rng(0).integers(-1, 2, size=(6, 23)).astype(np.int8)
    pack = jax.jit(trits.pack_trits, static_argnums=1)
    unpack = jax.jit(trits.unpack_trits, static_argnums=(1, 2))
    packed = pack(codes, 1)
    np.testing.assert_array_equal(packed, trits.pack_trits(codes, 1))
    np.testing.assert_array_equal(unpack(packed, 1, 23), codes)
    np.testing.assert_array_equal(jax.vmap(lambda c: trits.pack_trits(c, 0))(codes), packed)
    # traced misfits cannot be checked: clipped to a trit, the neighbours unchanged
    bad = codes.copy()
    bad[0, 3] = 5
    back = np.asarray(trits.unpack_trits(pack(bad, 1), 1, 23))
    assert back[0, 3] == 1
    np.testing.assert_array_equal(np.delete(back.ravel(), 3), np.delete(codes.ravel(), 3))


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match=r"code 2 at index \(1, 0\) is not a trit; allowed: -1, 0, 1"):
        trits.pack_trits(np.array([[0, 1], [2, -1]], np.int8))
    with pytest.raises(ValueError, match=r"code -3 .* is not a trit"):
        trits.pack_trits(np.array([-3, 0, 1], np.int32))
    with pytest.raises(ValueError, match="integer dtype, got float32"):
        trits.pack_trits(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="axis=2 is out of range for rank 2"):
        trits.pack_trits(np.zeros((2, 5), np.int8), axis=2)
    with pytest.raises(ValueError, match="packed must be uint8, got int8"):
        trits.unpack_trits(np.zeros(2, np.int8), 0, 10)
    with pytest.raises(ValueError, match=r"size=11 does not match 2 bytes of 5 trits each; allowed: "
                                         r"6 \.\. 10"):
        trits.unpack_trits(np.zeros(2, np.uint8), 0, 11)
    with pytest.raises(ValueError, match=r"byte 250 is not 5 packed trits; allowed: 0 \.\. 242"):
        trits.unpack_trits(np.array([121, 250], np.uint8), 0, 10)
    with pytest.raises(ValueError, match="size=-1"):
        trits.trits_packed_size(-1)
