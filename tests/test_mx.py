"""MX block formats (mxfp8, mxfp4: OCP Microscaling Formats v1.0; nvfp4: NVIDIA NVFP4): presets, the scale
formulas against numpy by hand, exact round trips, stored bytes, numerics, transforms."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qjax import PerGroup, QArray, Quantizer, dequantize, fake_quant, presets, quantize, rules
from qjax.scales import TINY, scale_value
from qjax.summary import summarize
from tests.test_quantizer import close_across_modes, same_bits

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
E4M3 = np.unique(np.abs(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)))
E4M3 = E4M3[np.isfinite(E4M3)]  # 0 .. 448, subnormals included
PRESETS = {"mxfp8": presets.mxfp8, "mxfp4": presets.mxfp4, "nvfp4": presets.nvfp4}
ELEMENT = {"mxfp8": (ml_dtypes.float8_e4m3fn, 448.0, 8), "mxfp4": (ml_dtypes.float4_e2m1fn, 6.0, 2)}


def ocp_reference(x: np.ndarray, name: str, block: int = 32):
    """OCP MX v1.0, section 6.3, by hand along the last axis: ``shared_exp = floor(log2(amax)) - emax_elem``
    (clipped to [-126, 127]), ``X = 2^shared_exp``, elements ``x / X`` rounded to the element type,
    saturating. Returns (biased exponents, element codes as float32, dequantized values)."""
    dtype, fmax, emax = ELEMENT[name]
    xb = x.astype(np.float64).reshape(*x.shape[:-1], -1, block)
    amax = np.abs(xb).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        shared = np.floor(np.log2(amax)) - emax
    shared = np.clip(np.where(amax == 0, -127, shared), -126, 127)
    scale = np.exp2(shared)
    elements = np.clip(xb / scale, -fmax, fmax).astype(np.float32).astype(dtype).astype(np.float32)
    value = (elements * scale).astype(np.float32).reshape(x.shape)
    return (shared + 127).astype(np.uint8), elements.reshape(x.shape), value


def blocks_along_last(qa: QArray) -> np.ndarray:
    return np.asarray(scale_value(qa.scale, qa.tensor_scale))


def agree_across_programs(q: Quantizer, a, b) -> None:
    """Two results of ``q`` from differently compiled programs (eager vs jit, vmap vs a loop, a gradient's
    program): e8m0 multiplies and divides by powers of two, exact in every program, so bit for bit; nvfp4's
    ``s = b t`` and ``x / s`` may round differently (XLA computes a division by a broadcast as a product with
    the reciprocal in some programs): the same codes, values an ulp apart."""
    if q.scale == "e8m0":
        assert same_bits(a, b)
    else:
        close_across_modes(a, b)


# --- presets --------------------------------------------------------------------------------------------


def test_presets_are_element_format_group_and_block_rule():
    assert presets.mxfp8(0) == Quantizer("fp8_e4m3", PerGroup(0, 32), "e8m0")
    assert presets.mxfp4(axis=-1) == Quantizer("fp4_e2m1", PerGroup(-1, 32), "e8m0")
    assert presets.nvfp4(1) == Quantizer("fp4_e2m1", PerGroup(1, 16), "nvfp4")
    q = presets.mxfp4(0)
    assert rules.rule_from_dict(rules.rule_to_dict(rules.Rule(".*", weight=q))).weight == q  # rules are data
    hash(q)  # static under jit


# --- closed forms ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [-120, -7, 0, 3, 100, 119])
def test_e8m0_block_with_amax_fmax_times_2k_gets_scale_2k(k):
    for name, fmax in (("mxfp4", 6.0), ("mxfp8", 448.0)):
        x = np.zeros((4, 64), np.float32)
        x[0, 5], x[0, 9], x[1, 32] = fmax * 2.0**k, -0.5 * 2.0**k, -fmax * 2.0**k
        qa = quantize(PRESETS[name](-1), jnp.asarray(x))
        assert qa.scale.dtype == jnp.uint8 and qa.scale.shape == (4, 2, 1)
        # the other blocks are all zero: code 1, the smallest scale
        np.testing.assert_array_equal(np.asarray(qa.scale)[:2, :, 0], [[k + 127, 1], [1, k + 127]])
        np.testing.assert_array_equal(blocks_along_last(qa)[:2, :, 0], [[2.0**k, TINY], [TINY, 2.0**k]])
        np.testing.assert_array_equal(dequantize(qa), x)  # on the grid: exact


def test_e8m0_floor_saturates_where_qwix_ceil_leaves_the_top_binade_unused():
    # amax = 7: OCP's 2^(floor(log2 7) - 2) = 1 saturates 7 to 6 and keeps the step 0.5 near 0. Qwix 0.1.8's
    # 2^ceil(log2(7 / 6)) = 2 (qwix/_src/core/qarray.py, compute_scale_zero_point) gives 7 -> 8, 1 -> 1,
    # -0.3 -> 0 (checked by running it).
    x = jnp.zeros((4, 64)).at[0, 0].set(7.0).at[0, 1].set(1.0).at[0, 2].set(-0.3)
    qa = quantize(presets.mxfp4(-1), x)
    assert int(qa.scale[0, 0, 0]) == 127
    np.testing.assert_array_equal(np.asarray(dequantize(qa))[0, :3], [6.0, 1.0, -0.5])
    x8 = jnp.zeros((4, 64)).at[0, 0].set(500.0).at[0, 1].set(1.0)  # E4M3: 500 / 2^0 saturates to 448
    y8 = np.asarray(dequantize(quantize(presets.mxfp8(-1), x8)))
    np.testing.assert_array_equal(y8[0, :2], [448.0, 1.0])


@pytest.mark.parametrize("name", ["mxfp4", "mxfp8"])
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), log_spread=st.floats(-30.0, 30.0))
def test_e8m0_matches_the_ocp_formula_by_hand(name, seed, log_spread):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((4, 64)) * np.exp2(rng.uniform(-6, 6, (4, 1)) + log_spread)).astype(np.float32)
    x[3, 32:] = 0.0  # an all-zero block
    exps, elements, value = ocp_reference(x, name)
    qa = quantize(PRESETS[name](-1), jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(qa.scale), exps)
    np.testing.assert_array_equal(np.asarray(qa.codes).astype(np.float32), elements)
    assert same_bits(dequantize(qa), value)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(-117, 119))  # c 2^k normal float32
def test_values_on_the_e8m0_grid_survive_exactly(seed, k):
    rng = np.random.default_rng(seed)
    for name, grid, top in (("mxfp4", E2M1, (4.0, 6.0)), ("mxfp8", E4M3, E4M3[E4M3 >= 256])):
        c = rng.choice(grid, (4, 64)) * rng.choice([-1, 1], (4, 64))
        c[:, ::32] = rng.choice(top, (4, 2))  # each block reaches the element type's top binade
        x = jnp.asarray(c * np.float32(2.0**k), jnp.float32)
        qa = quantize(PRESETS[name](-1), x)
        np.testing.assert_array_equal(np.asarray(qa.scale), k + 127)
        assert same_bits(dequantize(qa), x)


def test_nvfp4_closed_form():
    # tensor amax 2688 * 2^k -> t = 2^k; a block with amax 6 b 2^k -> block scale b (E4M3); elements x / (b t)
    k = -5
    x = np.zeros((4, 64), np.float32)
    x[0, 0] = 2688 * 2.0**k  # block 0: b = 448
    x[0, 16], x[0, 17] = 6 * 0.75 * 2.0**k, 1.5 * 0.75 * 2.0**k  # block 1: b = 0.75, codes 6 and 1.5
    x[0, 32] = 6 * 2.0**-9 * 2.0**k  # block 2: b = 2^-9, the smallest E4M3
    qa = quantize(presets.nvfp4(-1), jnp.asarray(x))
    assert qa.scale.dtype == jnp.float8_e4m3fn and qa.tensor_scale.dtype == jnp.float32
    assert qa.tensor_scale.shape == (1, 1, 1) and float(qa.tensor_scale[0, 0, 0]) == 2.0**k
    np.testing.assert_array_equal(np.asarray(qa.scale, np.float32)[0].ravel(), [448, 0.75, 2.0**-9, 2.0**-9])
    np.testing.assert_array_equal(np.asarray(qa.codes, np.float32)[0, [0, 16, 17, 32]], [6, 6, 1.5, 6])
    np.testing.assert_array_equal(dequantize(qa), x)


def _near_tie(u: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Whether ``|u|`` lies within 1e-5 (relative) of a midpoint of ``grid``: where a division computed as a
    product with its reciprocal (as XLA does) may round to the other neighbour than numpy's division."""
    mid = (grid[1:] + grid[:-1]) / 2
    a = np.abs(u)[..., None]
    return np.any(np.abs(a - mid) <= 1e-5 * np.maximum(a, 1e-30), axis=-1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), log_spread=st.floats(-30.0, 30.0))
def test_nvfp4_matches_nvidias_formula_by_hand(seed, log_spread):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((4, 64)) * np.exp2(rng.uniform(-8, 4, (4, 1)) + log_spread)).astype(np.float32)
    qa = quantize(presets.nvfp4(-1), jnp.asarray(x))
    xb = x.reshape(4, 4, 16)
    amax = np.abs(xb).max(-1, keepdims=True)
    t = np.float32(np.abs(x).max() / np.float32(448 * 6))
    raw = np.clip(amax / np.float32(6) / t, 2.0**-9, 448).astype(np.float32)
    b = raw.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert float(qa.tensor_scale.ravel()[0]) == pytest.approx(float(t), rel=2**-23)
    ok = ~_near_tie(raw, E4M3)
    np.testing.assert_array_equal(np.asarray(qa.scale, np.float32)[ok], b[ok])
    s = np.asarray(scale_value(qa.scale, qa.tensor_scale))
    u = xb / s
    codes = np.clip(u, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    ok = ~_near_tie(u, E2M1)
    stored = np.asarray(qa.codes, np.float32).reshape(4, 4, 16)
    np.testing.assert_array_equal(stored[ok], codes[ok])
    np.testing.assert_array_equal(np.asarray(dequantize(qa)), (stored * s).reshape(4, 64))  # code * (b t)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(-100, 100))
def test_values_on_the_nvfp4_grid_survive_exactly(seed, k):
    rng = np.random.default_rng(seed)
    b = rng.choice(E4M3[E4M3 > 0], (4, 4, 1))  # a block scale per block, tensor scale t = 2^k
    c = rng.choice(E2M1, (4, 4, 16)) * rng.choice([-1, 1], (4, 4, 16))
    c[..., 0] = 6.0  # each block reaches 6 b t
    b[0, 0, 0] = 448.0  # the tensor reaches 6 * 448 * t
    x = jnp.asarray((c * b * np.float32(2.0**k)).reshape(4, 64), jnp.float32)
    qa = quantize(presets.nvfp4(-1), x)
    assert float(qa.tensor_scale.ravel()[0]) == 2.0**k
    np.testing.assert_array_equal(np.asarray(qa.scale, np.float32), b)
    assert same_bits(dequantize(qa), x)


# --- the invariant, transforms ----------------------------------------------------------------------------


@functools.cache
def _jitted(name: str, axis: int):
    """``(fake_quant, dequantize . quantize)`` of a preset, each jitted once."""
    q = PRESETS[name](axis)
    return jax.jit(lambda v: fake_quant(q, v)), jax.jit(lambda v: dequantize(quantize(q, v)))


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), spread=st.floats(1e-20, 1e20))
def test_fake_quant_equals_dequantize_quantize_bit_for_bit(name, dtype, seed, spread):
    x = (jax.random.normal(jax.random.key(seed), (4, 64)) * spread).astype(dtype)
    q = PRESETS[name](-1)
    assert same_bits(fake_quant(q, x), dequantize(quantize(q, x)))  # eager
    for axis, v in ((-1, x), (0, x.T)):  # activations (tokens, features), a weight (in, out)
        fq, dq = _jitted(name, axis)
        assert fq(v).dtype == dtype and same_bits(fq(v), dq(v))  # jit


@pytest.mark.parametrize("name", PRESETS)
def test_grad_is_straight_through_and_clipped_ste_zeroes_saturated_elements(name):
    q = PRESETS[name](-1)
    x = jax.random.normal(jax.random.key(1), (4, 64)).at[0, 0].set(7.0).at[0, 1].set(1.0)
    g = jax.jit(jax.grad(lambda v: jnp.sum(fake_quant(q, v) ** 2)))(x)
    agree_across_programs(q, g, 2 * fake_quant(q, x))  # identity STE: d/dx sum(fq^2) = 2 fq
    clipped = dataclasses.replace(q, surrogate="clipped_ste")
    g = jax.jit(jax.grad(lambda v: jnp.sum(fake_quant(clipped, v))))(x)
    qa = quantize(q, x)
    s = np.asarray(scale_value(qa.scale, qa.tensor_scale))
    u = np.asarray(x).reshape(s.shape[0], s.shape[1], -1) / s
    fmax = qa.fmt.max_abs
    clear = np.abs(np.abs(u) - fmax) > 1e-5 * fmax  # not at the edge, where the division's last ulp decides
    np.testing.assert_array_equal(np.asarray(g).reshape(u.shape)[clear], (np.abs(u) <= fmax)[clear])
    if name == "mxfp4":
        assert float(g[0, 0]) == 0.0  # 7 saturates to 6 in its block of scale 1


@pytest.mark.parametrize("name", PRESETS)
def test_activations_vmap_and_grad(name):
    q = PRESETS[name](-1)  # activations (tokens, features), blocks along the features, a batch of 3
    xs = jax.random.normal(jax.random.key(2), (3, 4, 64)) * jnp.array([1.0, 1e-3, 1e3])[:, None, None]
    loop = jnp.stack([fake_quant(q, x) for x in xs])
    vmapped = jax.vmap(lambda x: fake_quant(q, x))(xs)
    agree_across_programs(q, vmapped, loop)
    qa = jax.vmap(lambda x: quantize(q, x))(xs)  # made inside vmap, dequantized outside
    assert same_bits(dequantize(qa), vmapped)
    grads = jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(fake_quant(q, x) ** 2))))(xs)
    agree_across_programs(q, grads, 2 * vmapped)
    x3 = xs.reshape(2, 6, 64)  # (batch, seq, features): blocks along the last axis of a rank-3 input
    fq, dq = _jitted(name, -1)
    assert same_bits(fq(x3), dq(x3))
    if q.scale == "e8m0":  # blocks are independent (nvfp4's tensor scale spans the whole rank-3 tensor)
        np.testing.assert_array_equal(fq(x3).reshape(3, 4, 64), vmapped)


# --- numerics: zeros, NaN, Inf, huge ----------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_zero_blocks_nan_blocks_and_huge_inputs(name):
    q = PRESETS[name](-1)
    size = q.granularity.size
    zeros = fake_quant(q, jnp.zeros((4, 64)))
    assert not bool(jnp.any(jnp.isnan(zeros))) and bool(jnp.all(zeros == 0))
    qa = quantize(q, jnp.zeros((4, 64)))
    np.testing.assert_array_equal(blocks_along_last(qa), TINY)  # the smallest scale, as every rule's floor
    x = jax.random.normal(jax.random.key(3), (4, 64))
    x = x.at[1, 3].set(jnp.nan).at[2, 40].set(-jnp.inf).at[3, :size].set(0.0)
    y = fake_quant(q, x)
    assert same_bits(y, dequantize(quantize(q, x)))
    nan = np.isnan(np.asarray(y))
    expected = np.zeros((4, 64), bool)
    expected[1, :size] = True  # the NaN's block
    expected[2, 40 // size * size:(40 // size + 1) * size] = True  # the Inf's block
    np.testing.assert_array_equal(nan, expected)
    clean = np.asarray(fake_quant(q, jnp.where(expected, 0.0, x)))  # the marked blocks zeroed instead
    np.testing.assert_array_equal(np.asarray(y)[~nan], clean[~nan])  # other blocks (and nvfp4's t) untouched
    np.testing.assert_array_equal(np.asarray(y)[3, :size], 0.0)
    stored = np.asarray(quantize(q, x).scale).reshape(4, -1)
    if name != "nvfp4":
        assert stored[1, 0] == 0xFF  # E8M0 NaN
    else:
        assert np.isnan(stored.astype(np.float32)[1, 0])
    top = float(np.finfo(np.float32).max)
    huge = jnp.asarray(np.linspace(-1.0, 1.0, 256).reshape(4, 64) * top, jnp.float32)
    y = fake_quant(q, huge)
    assert bool(jnp.all(jnp.isfinite(y))) and float(jnp.max(jnp.abs(y))) > 0.5 * top
    assert same_bits(y, dequantize(quantize(q, huge)))


# --- storage: real bytes, packing -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "bits"), [("mxfp8", 8.25), ("mxfp4", 4.25), ("nvfp4", 4.5)])
def test_real_bytes_per_element(name, bits):
    w = jax.random.normal(jax.random.key(4), (256, 32))
    qa, packed = jax.jit(lambda v: (lambda qa: (qa, qa.pack(0)))(quantize(PRESETS[name](0), v)))(w)
    assert qa.scale.dtype == (jnp.float8_e4m3fn if name == "nvfp4" else jnp.uint8)
    tensor = 4 if name == "nvfp4" else 0
    assert packed.nbytes == w.size * bits / 8 + tensor
    row = summarize({"layer": {"kernel": packed}}).layers[0]
    assert row.real_bytes == packed.nbytes and row.params == w.size
    assert row.bits == f"{qa.format}:{qa.fmt.bits}"


@functools.cache
def _packed_round_trip(name: str, axis: int):
    """quantize -> pack(axis) -> (codes, scale, codes and scale back, dequantized packed and unpacked), jitted
    once per case."""
    def run(x):
        qa = quantize(PRESETS[name](0), x)
        packed = qa.pack(axis)
        assert packed.codes.dtype == jnp.uint32
        back = packed.unpack()
        return qa.codes, qa.scale, back.codes, back.scale, dequantize(packed), dequantize(qa)

    return jax.jit(run)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("axis", [0, -1])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), spread=st.floats(1e-3, 1e3))
def test_packing_round_trips_exactly(name, axis, seed, spread):
    x = jax.random.normal(jax.random.key(seed), (64, 33)) * spread  # 33: a padded word along the last axis
    codes, scale, codes_back, scale_back, packed_value, value = _packed_round_trip(name, axis)(x)
    assert same_bits(codes_back, codes) and same_bits(scale_back, scale)
    assert same_bits(packed_value, value)
