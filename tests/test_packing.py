"""Bit packing: round trips for every width and odd sizes, the documented plane layout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qjax import packing


def random_codes(rng, shape, bits, signed):
    lo, hi = packing.code_range(bits, signed)
    codes = rng.integers(lo, hi + 1, size=shape)
    if bits == 1 and signed:
        codes = np.where(codes == 0, 1, codes)
    return codes.astype(np.int8 if signed else np.uint8)


def test_layout_is_planes_along_axis():
    """word p holds code p + j*P at bits 4j..4j+3 as offset binary (int4)."""
    codes = np.arange(-8, 8, dtype=np.int8).repeat(2)  # K = 32 -> P = 4 words
    words = np.asarray(packing.pack(codes, 4, 0))
    assert words.shape == (4,)
    for p in range(4):
        for j in range(8):
            assert (int(words[p]) >> (4 * j)) & 0xF == codes[p + j * 4] + 8


def test_binary_layout_bits():
    codes = np.array([1, -1, 1, 1] + [-1] * 28 + [1], np.int8)  # 33 codes -> 2 words
    words = np.asarray(packing.pack(codes, 1, 0))
    assert words.shape == (2,)
    # word 0 holds codes 0, 2, 4, ..., word 1 codes 1, 3, 5, ... (P = 2)
    assert int(words[0]) & 1 == 1 and (int(words[0]) >> 1) & 1 == 1  # codes 0 and 2 are +1
    assert int(words[1]) & 1 == 0  # code 1 is -1
    assert (int(words[0]) >> 16) & 1 == 1  # code 32 is +1


def test_ternary_packs_as_two_bits():
    codes = np.array([-1, 0, 1] * 6, np.int8)
    words = packing.pack(codes, 2, 0)
    assert words.shape == (2,)
    np.testing.assert_array_equal(packing.unpack(words, 2, 0, 18), codes)


@pytest.mark.parametrize("bits", packing.PACK_BITS)
def test_jit_vmap_scan(bits):
    codes = random_codes(np.random.default_rng(bits), (6, 40), bits, True)
    pack = jax.jit(packing.pack, static_argnums=(1, 2))
    unpack = jax.jit(packing.unpack, static_argnums=(1, 2, 3, 4))
    words = pack(codes, bits, 1)
    np.testing.assert_array_equal(unpack(words, bits, 1, 40, True), codes)
    vw = jax.vmap(lambda c: packing.pack(c, bits, 0))(codes)
    np.testing.assert_array_equal(vw, words)
    _, sw = jax.lax.scan(lambda c, row: (c, packing.pack(row, bits, 0)), 0, jnp.asarray(codes))
    np.testing.assert_array_equal(sw, words)


def test_packed_bytes():
    codes = np.ones((4096, 64), np.int8)
    for bits in packing.PACK_BITS:
        assert packing.pack(codes, bits, 0).nbytes == codes.size * bits // 8


def test_numpy_integer_arguments_accepted():
    codes = np.arange(-8, 8, dtype=np.int8)
    words = packing.pack(codes, np.int64(4), np.int32(0))
    np.testing.assert_array_equal(packing.unpack(words, 4, 0, np.int64(16)), codes)


# --- unsigned and signed codes of every dtype, width and axis; QArray formats -------------------

SIGNED_DTYPES = (np.int8, np.int16, np.int32)
UNSIGNED_DTYPES = (np.uint8, np.uint16, np.uint32)


def test_qjax_packing_is_the_kernels_layout():
    """One implementation: qjax.packing re-exports kernels_pallas.layout."""
    from kernels_pallas import layout

    for name in ("PACK_BITS", "pack", "unpack", "decode_fields", "code_range", "check_axis", "packed_size"):
        assert getattr(packing, name) is getattr(layout, name)


@pytest.mark.parametrize("bits", packing.PACK_BITS)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=45), signed=st.booleans(),
       seed=st.integers(0, 2**16), axis_pick=st.integers(-3, 2), dtype_pick=st.integers(0, 2))
def test_round_trip_every_dtype_and_axis(bits, signed, shape, seed, axis_pick, dtype_pick):
    """unpack(pack(c)) == c for signed and unsigned codes of any integer dtype, odd sizes, any axis (every
    example compiles its own shapes: signedness is drawn, not a second parametrization)."""
    axis = axis_pick % len(shape) - (len(shape) if axis_pick < 0 else 0)  # negative axes too
    dtype = (SIGNED_DTYPES if signed else UNSIGNED_DTYPES)[dtype_pick]
    codes = random_codes(np.random.default_rng(seed), shape, bits, signed).astype(dtype)
    words = packing.pack(codes, bits, axis)
    assert words.dtype == jnp.uint32
    assert words.shape[axis] == packing.packed_size(shape[axis], bits)
    back = packing.unpack(words, bits, axis, shape[axis], signed=signed)
    assert back.dtype == (jnp.int8 if signed else jnp.uint8)
    np.testing.assert_array_equal(np.asarray(back).astype(np.int64), codes.astype(np.int64))


@pytest.mark.parametrize("bits", packing.PACK_BITS)
def test_unsigned_fields_are_stored_as_they_are(bits):
    """Unsigned codes fill the whole field range 0 .. 2^bits - 1, including the top code."""
    top = 2**bits - 1
    n = 32 // bits
    codes = np.full((n,), top, np.uint8)
    words = np.asarray(packing.pack(codes, bits, 0))
    assert words.shape == (1,) and int(words[0]) == 2**32 - 1
    np.testing.assert_array_equal(packing.unpack(jnp.asarray(words), bits, 0, n, signed=False), codes)
    stored = jnp.arange(top + 1, dtype=jnp.int32)
    np.testing.assert_array_equal(packing.decode_fields(stored, bits, False), stored)


# formats whose codes pack as unsigned fields: uint, table indices, float bit patterns
UNSIGNED_CODE_FORMATS = ["uint2", "uint3", "uint4", "uint5", "uint6", "uint7", "uint8", "nf4",
                         "dynamic_unsigned", "fp4_e2m1", "fp8_e4m3"]


@functools.cache
def _packed_round_trip(fmt: str, axis: int):
    """quantize -> pack(axis) -> (codes back, dequantized packed, dequantized unpacked), one jit per case."""
    from qjax import PerChannel, Quantizer, dequantize, quantize

    q = Quantizer(fmt, PerChannel(-1), "minmax" if fmt.startswith("uint") else "absmax")

    def run(x):
        qa = quantize(q, x)
        packed = qa.pack(axis)
        assert packed.codes.dtype == jnp.uint32 and packed.shape == qa.shape
        return qa.codes, packed.unpack().codes, dequantize(packed), dequantize(qa)

    return jax.jit(run)


@pytest.mark.parametrize("fmt", [*UNSIGNED_CODE_FORMATS, "int4", "int2", "ternary", "binary"])
@pytest.mark.parametrize("axis", [0, 1, -1, -3])
@given(seed=st.integers(0, 2**16), offset=st.floats(-1.0, 1.0))
def test_qarray_pack_round_trips_unsigned_and_signed_formats(fmt, axis, seed, offset):
    x = jax.random.normal(jax.random.key(seed), (5, 37, 3)) + offset  # odd sizes: padded words
    codes, back, packed_value, value = _packed_round_trip(fmt, axis)(x)
    assert back.dtype == codes.dtype
    np.testing.assert_array_equal(np.asarray(back).view(np.uint8), np.asarray(codes).view(np.uint8))
    np.testing.assert_array_equal(packed_value, value)
