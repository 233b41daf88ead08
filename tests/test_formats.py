"""Formats: value sets, nearest rounding, the dynamic map and NF4 tables."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qjax import formats as F


def test_signed_dynamic_map_structure():
    m = F.dynamic_map(signed=True)
    assert m.shape == (256,) and m.dtype == np.float32
    assert np.all(np.diff(m) > 0)
    assert m[127] == 0.0 and m[255] == 1.0
    assert (m < 0).sum() == 127 and (m > 0).sum() == 128
    assert -1.0 not in m
    assert m[0] == pytest.approx(-0.99297, abs=1e-5)
    assert np.abs(m[m != 0]).min() == pytest.approx(5.5e-7, rel=1e-6)
    np.testing.assert_array_equal(m[128:255], -m[126::-1])  # mirrored


def test_unsigned_dynamic_map_structure():
    m = F.dynamic_map(signed=False)
    assert m.shape == (256,) and np.all(np.diff(m) > 0)
    assert m[0] == 0.0 and m[255] == 1.0 and (m > 0).sum() == 255
    assert m[1] == pytest.approx(3.25e-7, rel=1e-6)


def test_dynamic_map_decades():
    m = F.dynamic_map(signed=True)
    pos = m[128:255]
    counts = [((pos >= 10.0**k) & (pos < 10.0 ** (k + 1))).sum() for k in range(-7, 0)]
    assert counts == [1, 2, 4, 8, 16, 32, 64]


def test_nf4_table_rebuilt_from_normal_quantiles():
    np.testing.assert_allclose(F.normal_float_map(), F.NF4_VALUES, atol=2e-6)
    assert len(F.NF4_VALUES) == 16 and 0.0 in F.NF4_VALUES


@pytest.mark.parametrize("name", ["nf4", "dynamic", "dynamic_unsigned"])
@given(u=st.floats(-1.5, 1.5, width=32))
def test_table_encode_is_nearest(name, u):
    fmt = F.get_format(name)
    table = np.asarray(fmt.table)
    code = int(fmt.encode(jnp.float32(u)))
    best = np.abs(table - np.clip(u, table[0], table[-1])).min()
    assert abs(table[code] - np.clip(u, table[0], table[-1])) == best


def test_table_encode_is_not_biased_upwards():
    fmt = F.get_format("nf4")
    t = np.asarray(fmt.table, np.float32)
    just_above = t[:-1] + (t[1:] - t[:-1]) * 0.1  # nearer to the lower neighbour
    np.testing.assert_array_equal(fmt.encode(jnp.asarray(just_above)), np.arange(15))


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_formats_range_and_rounding(bits):
    for signed in (True, False):
        fmt = F.get_format(f"{'' if signed else 'u'}int{bits}")
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        assert (fmt.lo, fmt.hi, fmt.max_abs, fmt.bits) == (lo, hi, hi, bits)
        assert fmt.edge == (hi + 0.5 if signed else hi)  # absmax_edge: the top bucket's outer edge
        u = jnp.linspace(lo - 3, hi + 3, 97)
        codes = fmt.encode(u)
        assert codes.dtype == (jnp.int8 if signed else jnp.uint8)
        np.testing.assert_array_equal(codes, np.clip(np.round(np.asarray(u)), lo, hi))


def test_binary_and_ternary():
    b, t = F.get_format("binary"), F.get_format("ternary")
    u = jnp.array([-2.0, -0.5, -0.0, 0.0, 0.4, 0.5, 0.6, 3.0])
    np.testing.assert_array_equal(b.encode(u), [-1, -1, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(t.encode(u), [-1, -0.0, 0, 0, 0, 0, 1, 1])
    assert (b.bits, t.bits) == (1, 2)


@pytest.mark.parametrize(("name", "dtype", "top"), [
    ("fp8_e4m3", ml_dtypes.float8_e4m3fn, 448.0),
    ("fp8_e5m2", ml_dtypes.float8_e5m2, 57344.0),
    ("fp4_e2m1", ml_dtypes.float4_e2m1fn, 6.0),
])
def test_float_formats_round_like_ml_dtypes_and_saturate(name, dtype, top):
    fmt = F.get_format(name)
    assert fmt.max_abs == top and fmt.code_dtype == np.dtype(dtype)
    u = np.random.default_rng(0).standard_normal(500).astype(np.float32) * top / 3
    u = np.concatenate([u, [top * 10, -top * 10, 0.0]]).astype(np.float32)
    got = np.asarray(fmt.decode(fmt.encode(jnp.asarray(u))))
    np.testing.assert_array_equal(got, np.clip(u, -top, top).astype(dtype).astype(np.float32))
    assert np.isfinite(got).all()


def test_nan_encodes_to_zero_code():
    for name in F.FORMAT_NAMES:
        fmt = F.get_format(name)
        value = float(fmt.decode(fmt.encode(jnp.float32(np.nan))))
        assert value == float(fmt.decode(fmt.encode(jnp.float32(0.0)))), name


def test_registry_names_and_passthrough():
    assert {"int2", "int8", "uint4", "binary", "ternary", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4",
            "dynamic", "dynamic_unsigned"} <= set(F.FORMAT_NAMES)
    fmt = F.get_format("int4")
    assert F.get_format(fmt) is fmt
    hash(fmt)  # static under jit


def _dynamic_probes(name: str) -> np.ndarray:
    """Every table value and midpoint of a dynamic map, the 64 float32 neighbours on each side of every
    midpoint, all of them negated, +-0, subnormals, huge values, +-Inf, NaN, a strided sweep over all float32
    bit patterns and random values spread over many decades."""
    table = np.asarray(F.get_format(name).table, np.float32)
    mid = (table[1:] + table[:-1]) / np.float32(2)
    near = (mid.view(np.int32)[:, None] + np.arange(-64, 65, dtype=np.int32)[None, :]).view(np.float32)
    special = np.array(
        [0.0, 1e-45, 1e-40, 1e-38, 1e-30, 1e-8, 0.99999994, 1.0, 1.0000001, 2.0, 3.0, 1e30, 3.4e38, np.inf],
        np.float32,
    )
    sweep = np.arange(0, 0x7F800001, 4099, dtype=np.int64).astype(np.uint32).view(np.float32)
    rng = np.random.default_rng(0)
    spread = (rng.standard_normal(200_000) * 10.0 ** rng.uniform(-9, 1, 200_000)).astype(np.float32)
    positive = np.concatenate([table, mid, near.reshape(-1), special, sweep, spread])
    return np.concatenate([positive, -positive, [np.nan, -np.nan]]).astype(np.float32)


@pytest.mark.parametrize("name", ["dynamic", "dynamic_unsigned"])
def test_dynamic_map_arithmetic_form_is_the_table(name):
    """T(m) = (18 m + 9 - 16 * 2^floor(log2 m)) / (5^(E-e) 2^s) in one float32 division is every value."""
    codec = F._dynamic_codec(name == "dynamic")
    table = F.dynamic_map(name == "dynamic")
    positions = np.arange(1, 128) if codec.signed else np.arange(2, 256)
    inside = table[128:255] if codec.signed else table[1:255]
    np.testing.assert_array_equal(F._dynamic_values(positions, codec).view(np.uint32), inside.view(np.uint32))
    assert codec.bounds == tuple(sorted(codec.bounds)) and len(codec.bounds) == 6


@pytest.mark.parametrize("name", ["dynamic", "dynamic_unsigned"])
@pytest.mark.parametrize("mode", ["jit", "eager"])
def test_dynamic_encode_is_exactly_the_table_search(name, mode):
    """The arithmetic encoder equals ``searchsorted(midpoints, u, side="left")`` (NaN as 0) bit for bit at
    every midpoint, its float32 neighbours, the special values and a sweep of all bit patterns."""
    fmt = F.get_format(name)
    table = np.asarray(fmt.table, np.float32)
    mid = (table[1:] + table[:-1]) / np.float32(2)
    u = _dynamic_probes(name)
    encode = jax.jit(fmt.encode) if mode == "jit" else fmt.encode
    got = np.asarray(encode(jnp.asarray(u)))
    expected = np.searchsorted(mid, np.where(np.isnan(u), np.float32(0), u), side="left")
    assert got.dtype == np.uint8
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, [(float(u[i]), int(got[i]), int(expected[i])) for i in bad[:5]]


@pytest.mark.parametrize("name", ["dynamic", "dynamic_unsigned"])
def test_dynamic_encode_of_every_decoded_value_is_its_code(name):
    fmt = F.get_format(name)
    codes = jnp.arange(256, dtype=jnp.uint8)
    np.testing.assert_array_equal(fmt.encode(fmt.decode(codes)), codes)
    np.testing.assert_array_equal(fmt.decode(codes), np.asarray(fmt.table, np.float32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_absmax_grid_has_the_finer_step_and_error_at_most_half_of_it(bits):
    # absmax_edge: s = amax / (2^(b-1) - 1/2) (GPTQ's reference quantizer, Qwix): +-amax sit on the outer
    # edges of the end buckets, no element is more than s/2 off, and the step is finer than absmax's
    # amax / (2^(b-1) - 1), so the mean squared error of evenly spread values is lower.
    from qjax import PerTensor, Quantizer, fake_quant, quantize

    x = jnp.linspace(-1.0, 1.0, 4097)
    q = Quantizer(f"int{bits}", PerTensor(), "absmax_edge")
    hi = 2 ** (bits - 1) - 1
    codes = np.asarray(quantize(q, x).codes)
    assert codes.min() >= -hi - 1 and codes.max() == hi and codes.min() <= -hi
    s = 1.0 / (hi + 0.5)
    err = fake_quant(q, x) - x
    assert float(jnp.max(jnp.abs(err))) <= s / 2 * (1 + 1e-6)
    coarse = fake_quant(Quantizer(f"int{bits}", PerTensor()), x) - x
    assert float(jnp.mean(err**2)) < float(jnp.mean(coarse**2))
