"""Quantizer: the bit-exact invariant, error bounds, scale rules, gradients, transforms, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qjax import (
    FORMAT_NAMES,
    PerBlock,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    Quantizer,
    dequantize,
    fake_quant,
    init_scale,
    quantize,
    scale_shape,
)
from qjax.presets import BITNET_ACTIVATIONS, BITNET_TERNARY, XNOR_WEIGHTS
from qjax.surrogates import SIGN_SURROGATES

GRANULARITIES = [PerTensor(), PerChannel(-1), PerChannel(0), PerToken(-1), PerGroup(0, 8),
                 PerBlock(64)]
X = jax.random.normal(jax.random.key(0), (32, 12)) * 0.7


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def close_across_modes(a, b):
    """Two results of the same quantizer from differently compiled programs (eager vs jitted, vmap or scan vs
    a loop): XLA does not promise one reduction order across them (an AVX-512 CPU sums ``mean|x|`` in another
    order than an AVX2 one, eagerly or fused), so a scale may differ by an ulp. The codes must agree, so each
    value agrees to a few ulps of the largest value (multi-basis sums cancel: their ulp is the scale's), NaN
    where the other is NaN; a flipped code would differ by a whole step."""
    eps = float(jnp.finfo(jnp.asarray(a).dtype).eps)
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    top = np.nanmax(np.abs(b), initial=0.0)
    np.testing.assert_allclose(a, b, rtol=4 * eps, atol=4 * eps * top)


def all_quantizers():
    for name in FORMAT_NAMES:
        surrogates = sorted(SIGN_SURROGATES) if name == "binary" else ["ste", "clipped_ste"]
        for surrogate in surrogates:
            yield Quantizer(name, PerChannel(-1), surrogate=surrogate)
    for g in GRANULARITIES:
        yield Quantizer("int4", g)
        yield Quantizer("binary", g, "mean_abs", "reste")
    yield Quantizer("uint4", PerGroup(0, 8), "minmax")
    yield Quantizer("int3", PerChannel(-1), "median")
    yield Quantizer("binary", PerChannel(-1), "mean_abs", "clipped_ste", bases=3)
    yield BITNET_TERNARY
    yield BITNET_ACTIVATIONS
    yield XNOR_WEIGHTS


@pytest.mark.parametrize("q", list(all_quantizers()), ids=repr)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fake_quant_equals_dequantize_quantize_bit_for_bit(q, dtype):
    x = X.astype(dtype)
    fq = jax.jit(fake_quant, static_argnums=0)(q, x)
    dq = jax.jit(lambda v: dequantize(quantize(q, v)))(x)
    assert fq.dtype == dtype
    assert same_bits(fq, dq)
    assert same_bits(fake_quant(q, x), dequantize(quantize(q, x)))  # eagerly too
    close_across_modes(fake_quant(q, x), fq)  # eager vs jitted


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("gran", GRANULARITIES, ids=repr)
@given(seed=st.integers(0, 2**20), spread=st.floats(1e-3, 1e3))
def test_uniform_error_within_half_a_step(bits, gran, seed, spread):
    x = jax.random.normal(jax.random.key(seed), (32, 16)) * spread
    q = Quantizer(f"int{bits}", gran)
    qa = quantize(q, x)
    err = jnp.abs(dequantize(qa) - x)
    step = gran.resolve(x.shape).from_blocks(
        jnp.broadcast_to(qa.scale, gran.resolve(x.shape).to_blocks(x).shape), x.shape)
    assert bool(jnp.all(err <= step / 2 * (1 + 1e-5)))


@given(seed=st.integers(0, 2**20), bits=st.integers(2, 8))
def test_minmax_asymmetric_error_and_exact_zero(seed, bits):
    x = jax.random.uniform(jax.random.key(seed), (16, 8), minval=-0.3, maxval=2.0)
    x = x.at[0, 0].set(0.0)
    q = Quantizer(f"uint{bits}", PerChannel(-1), "minmax")
    qa = quantize(q, x)
    y = dequantize(qa)
    assert float(y[0, 0]) == 0.0
    assert bool(jnp.all(jnp.abs(y - x) <= qa.scale / 2 * (1 + 1e-5)))


def test_bitnet_ternary_exactly_as_published():
    w = jax.random.normal(jax.random.key(3), (64, 32)) * 0.02
    gamma = jnp.mean(jnp.abs(w))
    w_q = jnp.clip(jnp.round(w / jnp.maximum(gamma, 1e-5)), -1, 1)
    qa = quantize(BITNET_TERNARY, w)
    np.testing.assert_array_equal(qa.codes, w_q.astype(jnp.int8))
    np.testing.assert_allclose(float(qa.scale.squeeze()), float(gamma), rtol=1e-7)
    np.testing.assert_allclose(fake_quant(BITNET_TERNARY, w), w_q * gamma, rtol=1e-6)
    tiny = jnp.full((4, 4), 1e-7)  # gamma below 1e-5: codes round to 0 as in the paper
    np.testing.assert_array_equal(quantize(BITNET_TERNARY, tiny).codes, 0)


def test_bitnet_activations_exactly_as_published():
    x = jax.random.normal(jax.random.key(4), (3, 5, 64)) * 3
    x = x.at[1, 2].set(0.0)  # an all-zero token: 1e-5 floor, no NaN
    s = 127 / jnp.maximum(jnp.max(jnp.abs(x), -1, keepdims=True), 1e-5)
    ref = jnp.clip(jnp.round(x * s), -128, 127) / s
    qa = quantize(BITNET_ACTIVATIONS, x)
    assert qa.scale.shape == (3, 5, 1)
    np.testing.assert_array_equal(qa.codes, jnp.clip(jnp.round(x * s), -128, 127))
    np.testing.assert_allclose(fake_quant(BITNET_ACTIVATIONS, x), ref, rtol=1e-6, atol=0)
    assert not bool(jnp.any(jnp.isnan(fake_quant(BITNET_ACTIVATIONS, x))))


@pytest.mark.parametrize(("rule", "stat"), [
    ("absmax", lambda a: jnp.max(a, 0) / 7), ("mean_abs", lambda a: jnp.mean(a, 0)),
    ("median", lambda a: jnp.median(a, 0)),
])
def test_scale_rules_per_channel(rule, stat):
    q = Quantizer("int4", PerChannel(-1), rule)
    qa = quantize(q, X)
    np.testing.assert_allclose(qa.scale[0], stat(jnp.abs(X)), rtol=1e-6)


def test_group_and_block_scale_shapes():
    assert scale_shape(Quantizer("int4", PerGroup(0, 8)), (32, 12)) == (4, 1, 12)
    assert scale_shape(Quantizer("int4", PerGroup(-1, 4)), (32, 12)) == (32, 3, 1)
    assert scale_shape(Quantizer("int8", PerBlock(64)), (32, 12)) == (6, 1)
    assert scale_shape(Quantizer("int8", PerToken(-1)), (2, 3, 4)) == (2, 3, 1)
    assert scale_shape(Quantizer("binary", PerChannel(-1), "mean_abs", bases=2), (8, 4)) == (2, 1, 4)
    qa = quantize(Quantizer("int4", PerGroup(0, 8)), X)
    for g in range(4):  # each group of 8 rows, each column, has its own absmax
        np.testing.assert_allclose(qa.scale[g, 0], jnp.max(jnp.abs(X[8 * g:8 * g + 8]), 0) / 7,
                                   rtol=1e-6)


def test_multi_basis_binary_residuals():
    x = jax.random.normal(jax.random.key(5), (64, 16))
    errors = []
    for k in (1, 2, 3, 4):
        q = Quantizer("binary", PerChannel(-1), "mean_abs", bases=k)
        qa = quantize(q, x)
        if k > 1:
            assert qa.codes.shape == (k, 64, 16) and set(np.unique(qa.codes)) == {-1, 1}
        errors.append(float(jnp.mean((dequantize(qa) - x) ** 2)))
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 4
    # by hand: alpha_1 = mean|x|, b_1 = sign(x), alpha_2 = mean|x - alpha_1 b_1|, ...
    b1 = jnp.where(x < 0, -1.0, 1.0)
    a1 = jnp.mean(jnp.abs(x), 0)
    r1 = x - a1 * b1
    b2 = jnp.where(r1 < 0, -1.0, 1.0)
    a2 = jnp.mean(jnp.abs(r1), 0)
    q2 = Quantizer("binary", PerChannel(-1), "mean_abs", bases=2)
    np.testing.assert_allclose(dequantize(quantize(q2, x)), a1 * b1 + a2 * b2, rtol=1e-6)


def test_binary_gradient_is_scale_times_surrogate():
    q = Quantizer("binary", PerTensor(), "mean_abs", "approx_sign")
    x = jnp.linspace(-1.5, 1.5, 13)
    g = jax.grad(lambda v: jnp.sum(fake_quant(q, v)))(x)
    np.testing.assert_allclose(g, jnp.mean(jnp.abs(x)) * jnp.maximum(0, 2 - 2 * jnp.abs(x)),
                               rtol=1e-6)


def test_grid_gradients_ste_and_clipped():
    x = jnp.array([-3.0, -0.2, 0.0, 0.4, 2.9])
    s = jnp.array([[0.25]])
    q = Quantizer("int4", PerTensor(), "given", "clipped_ste")  # range [-8, 7] * 0.25 = [-2, 1.75]
    g = jax.grad(lambda v: jnp.sum(fake_quant(q, v[None], scale=s)))(x)
    np.testing.assert_array_equal(g, [0, 1, 1, 1, 0])
    q = Quantizer("int4", PerTensor(), "given", "ste")
    g = jax.grad(lambda v: jnp.sum(fake_quant(q, v[None], scale=s)))(x)
    np.testing.assert_array_equal(g, [1, 1, 1, 1, 1])


def test_learned_scale_gets_lsq_gradient():
    q = Quantizer("int4", PerChannel(-1), "learned", "clipped_ste")
    s = init_scale(q, X, "lsq_init")
    np.testing.assert_allclose(s[0], 2 * jnp.mean(jnp.abs(X), 0) / np.sqrt(7), rtol=1e-6)
    g = jax.grad(lambda sc: jnp.sum(fake_quant(q, X, scale=sc)))(s)
    u = X / s
    inside = (u >= -8) & (u <= 7)
    code = jnp.clip(jnp.round(u), -8, 7)
    expected = jnp.sum(jnp.where(inside, code - u, code), 0) / np.sqrt(32 * 7)
    np.testing.assert_allclose(g[0], expected, rtol=1e-5, atol=1e-6)
    # computed scales are detached: the gradient of x is the straight-through one only
    gx = jax.grad(lambda v: jnp.sum(fake_quant(Quantizer("int4", PerChannel(-1)), v)))(X)
    np.testing.assert_array_equal(gx, jnp.ones_like(X))


def test_learned_scale_is_used_by_its_magnitude():
    # An optimizer can push a learned step (BiPer's alpha, an LSQ step) through zero: training and freezing
    # both use |s|, so QAT and the frozen codes agree and the gradient points the magnitude the right way.
    for q in (Quantizer("int4", PerChannel(-1), "learned"), Quantizer("binary", PerChannel(-1), "learned",
                                                                        "biper")):
        s = init_scale(q, X, "mean_abs")
        flipped = s.at[0, ::2].multiply(-1)
        assert same_bits(jax.jit(lambda v, sc, q=q: fake_quant(q, v, scale=sc))(X, flipped),
                         fake_quant(q, X, scale=s))
        qa = quantize(q, X, scale=flipped)
        assert bool(jnp.all(qa.scale > 0))
        assert same_bits(dequantize(qa), fake_quant(q, X, scale=flipped))
        g_pos = jax.grad(lambda sc, q=q: jnp.sum(fake_quant(q, X, scale=sc) ** 2))(s)
        g_neg = jax.grad(lambda sc, q=q: jnp.sum(fake_quant(q, X, scale=sc) ** 2))(flipped)
        np.testing.assert_allclose(g_neg, g_pos * jnp.sign(flipped), rtol=1e-6)
    # a zero step is floored (no NaN), a NaN step stays NaN
    q = Quantizer("int4", PerTensor(), "learned")
    assert bool(jnp.all(jnp.isfinite(fake_quant(q, X, scale=jnp.zeros((1, 1))))))
    assert bool(jnp.all(jnp.isnan(fake_quant(q, X, scale=jnp.full((1, 1), jnp.nan)))))


def test_biper_codes_and_learned_alpha():
    q = Quantizer("binary", PerChannel(-1), "learned", "biper")
    w = jax.random.normal(jax.random.key(6), (16, 4)) * 0.1
    alpha = jnp.full((1, 4), 0.5)
    qa = quantize(q, w, scale=alpha, omega=20.0)
    np.testing.assert_array_equal(qa.codes, jnp.where(jnp.sin(20 * w) < 0, -1, 1))
    assert same_bits(fake_quant(q, w, scale=alpha, omega=20.0), dequantize(qa))
    ga = jax.grad(lambda a: jnp.sum(fake_quant(q, w, scale=a)))(alpha)
    np.testing.assert_allclose(ga[0], jnp.sum(qa.codes, 0), rtol=1e-6)
    gw = jax.grad(lambda v: jnp.sum(fake_quant(q, v, scale=alpha, omega=20.0)))(w)
    np.testing.assert_allclose(gw, 0.5 * 20 * jnp.cos(20 * w), rtol=1e-5, atol=1e-6)


def test_schedule_of_hyperparameters_does_not_recompile():
    q = Quantizer("binary", PerChannel(-1), "mean_abs", "reste")
    traces = []

    @jax.jit
    def step(w, o):
        traces.append(1)
        return w - 0.1 * jax.grad(lambda v: jnp.sum(fake_quant(q, v, o=o) ** 2))(w)

    w = X
    for e in range(6):
        w = step(w, 1.0 + 2.0 * e / 5)
    assert len(traces) == 1


@pytest.mark.parametrize("q", [Quantizer("int4", PerChannel(-1)), Quantizer("nf4", PerGroup(0, 8)),
                               Quantizer("binary", PerChannel(-1), "mean_abs", "reste"),
                               Quantizer("fp8_e4m3", PerToken(-1)),
                               Quantizer("binary", PerTensor(), "mean_abs", bases=2)], ids=repr)
def test_vmap_scan_grad_agree_with_loop(q):
    xs = jax.random.normal(jax.random.key(7), (3, 16, 8))
    loop = jnp.stack([fake_quant(q, x) for x in xs])
    vmapped = jax.vmap(lambda x: fake_quant(q, x))(xs)
    close_across_modes(vmapped, loop)
    _, scanned = jax.lax.scan(lambda c, x: (c, fake_quant(q, x)), 0, xs)
    close_across_modes(scanned, loop)
    grads = jax.vmap(jax.grad(lambda x: jnp.sum(fake_quant(q, x) ** 2)))(xs)
    loop_grads = jnp.stack([jax.grad(lambda x: jnp.sum(fake_quant(q, x) ** 2))(x) for x in xs])
    np.testing.assert_allclose(grads, loop_grads, rtol=1e-6)
    qa = jax.vmap(lambda x: quantize(q, x))(xs)  # a QArray made inside vmap dequantizes outside
    np.testing.assert_array_equal(jax.vmap(dequantize)(qa), vmapped)  # same mode: bit for bit
    if not isinstance(q.granularity, PerTensor) or q.bases == 1:
        close_across_modes(dequantize(qa), loop)


@pytest.mark.parametrize("q", list(all_quantizers()), ids=repr)
def test_all_zero_gives_zero_without_nan(q):
    z = jnp.zeros((16, 8))
    scale = init_scale(q, z) if q.scale in ("given", "learned") else None
    y = fake_quant(q, z, scale=scale)
    assert not bool(jnp.any(jnp.isnan(y)))
    if q.fmt.kind != "binary":
        np.testing.assert_array_equal(y, 0.0)
    g = jax.grad(lambda v: jnp.sum(fake_quant(q, v, scale=scale)))(z)
    assert not bool(jnp.any(jnp.isnan(g)))


@pytest.mark.parametrize("q", list(all_quantizers()), ids=repr)
def test_nan_stays_nan_and_poisons_only_its_group(q):
    x = X.at[5, 3].set(jnp.nan)
    y = fake_quant(q, x)
    assert bool(jnp.isnan(y[5, 3]))
    assert same_bits(y, dequantize(quantize(q, x)))
    clean = fake_quant(q, X)
    nan = np.asarray(jnp.isnan(y))
    np.testing.assert_array_equal(np.asarray(y)[~nan], np.asarray(clean)[~nan])
    if not isinstance(q.granularity, PerTensor):
        assert nan.mean() < 0.5  # only the group holding the NaN is NaN


def test_inf_input_marks_its_group_nan():
    x = X.at[0, 0].set(jnp.inf)
    y = fake_quant(Quantizer("int8", PerChannel(-1)), x)
    assert bool(jnp.all(jnp.isnan(y[:, 0]))) and not bool(jnp.any(jnp.isnan(y[:, 1:])))


def test_nan_in_a_flat_block_is_not_encoded_as_a_number():
    x = (jnp.full((64, 128), 0.001) * 0.9 + 0.001).at[0, 0].set(jnp.nan)
    qa = quantize(Quantizer("dynamic", PerBlock(256)), x)
    assert bool(jnp.isnan(qa.scale[0, 0])) and not bool(jnp.any(jnp.isnan(qa.scale[1:])))
    assert bool(jnp.isnan(dequantize(qa)[0, 0]))


@pytest.mark.parametrize("rule", ["absmax", "minmax"])
def test_group_marks_are_exact_for_nan_inf_and_huge_finite_values(rule):
    """A group is marked (NaN scale) iff it holds a NaN or an Inf, wherever it sits in the group; huge
    finite values of both signs (whose plain sum would overflow to inf - inf = NaN) are not marked."""
    q = Quantizer("int8" if rule == "absmax" else "uint8", PerChannel(-1), rule)
    x = np.array(jax.random.normal(jax.random.key(3), (64, 9)), np.float32)
    x[0, 0], x[31, 1], x[63, 2] = np.nan, np.nan, np.nan  # first, middle, last row of a column
    x[:, 3] = np.nan
    x[10, 4], x[20, 5] = np.inf, -np.inf
    x[::2, 6], x[1::2, 6] = 1.5e38, -1.5e38  # finite (max - min too); a plain sum overflows both ways
    x[:, 7] = 0.0
    y = jax.jit(lambda v: fake_quant(q, v))(jnp.asarray(x))
    marked = np.asarray(jnp.all(jnp.isnan(y), axis=0))
    np.testing.assert_array_equal(marked, [True] * 6 + [False] * 3)
    assert not bool(jnp.any(jnp.isnan(y[:, 6:])))
    np.testing.assert_array_equal(np.asarray(y[:, 7]), 0.0)


def test_biper_stages_share_alpha_even_when_it_went_negative():
    """Stage 1 ``|alpha| sin(omega w)`` and stage 2 ``|alpha| sign(sin(omega w))`` use the same alpha, so
    switching stages flips no weight, also in a channel whose learned alpha an optimizer pushed below 0."""
    from qjax import qat
    from qjax.quantizer import relaxed_quant

    q = Quantizer("binary", PerChannel(-1), "learned", "biper")
    w = jax.random.normal(jax.random.key(7), (64, 4)) * 0.1
    alpha = jnp.array([[0.5, -0.3, 0.2, -1e-3]])
    stage1 = qat.quantize_weight(q, w, alpha, {"biper_binarize": 0.0, "omega": 20.0})
    stage2 = qat.quantize_weight(q, w, alpha, {"biper_binarize": 1.0, "omega": 20.0})
    wave = jnp.sin(20 * w)
    np.testing.assert_allclose(stage1, jnp.abs(alpha) * wave, rtol=1e-6, atol=1e-7)
    assert same_bits(stage2, fake_quant(q, w, scale=alpha, omega=20.0))
    clear = jnp.abs(wave) > 1e-3
    np.testing.assert_array_equal(jnp.sign(stage1)[clear], jnp.sign(stage2)[clear])
    assert bool(jnp.all((stage1 * stage2)[clear] > 0))
    assert same_bits(relaxed_quant(q, w, scale=alpha, omega=20.0), stage1)
    # d stage1 / d alpha = sign(alpha) sum_k sin(omega w): the gradient of |alpha| sin(omega w)
    ga = jax.grad(lambda a: jnp.sum(relaxed_quant(q, w, scale=a, omega=20.0)))(alpha)
    np.testing.assert_allclose(ga, jnp.sign(alpha) * jnp.sum(wave, 0, keepdims=True), rtol=1e-5)


def test_relaxed_quant_uses_the_fake_quant_scale():
    from qjax.quantizer import relaxed_quant

    w = jax.random.normal(jax.random.key(8), (16, 3))
    for q in (Quantizer("binary", PerChannel(-1), "mean_abs", "biper"),
              Quantizer("binary", PerTensor(), "absmax", "ste")):
        codes = quantize(q, w, omega=5.0) if q.surrogate == "biper" else quantize(q, w)
        kwargs = {"omega": 5.0} if q.surrogate == "biper" else {}
        wave = jnp.sin(5.0 * w) if q.surrogate == "biper" else w
        np.testing.assert_allclose(relaxed_quant(q, w, **kwargs), codes.scale * wave, rtol=1e-6)
    with pytest.raises(ValueError, match=r"relaxed_quant needs a sign quantizer .* got format 'int4'"):
        relaxed_quant(Quantizer("int4"), w)
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['o'\] for surrogate 'biper'"):
        relaxed_quant(Quantizer("binary", PerTensor(), "mean_abs", "biper"), w, o=1.0)


FLOAT32_MAX = float(np.finfo(np.float32).max)
FAMILIES = ["int2", "int8", "uint4", "binary", "binary-bases-2", "ternary", "fp8_e4m3", "fp8_e5m2",
            "fp4_e2m1", "nf4", "dynamic", "dynamic_unsigned"]


def _rules(family):
    if family == "binary-bases-2":
        return ["mean_abs", "given"]
    minmax = ["minmax"] if family.lstrip("u").startswith("int") else []
    return ["absmax", "mean_abs", "median", *minmax, "given", "learned"]


@pytest.mark.parametrize("family", FAMILIES)
@given(data=st.data(), top=st.floats(1.0, FLOAT32_MAX), seed=st.integers(0, 2**16))
def test_finite_input_never_overflows_to_nan_or_inf(family, data, top, seed):
    """Magnitudes up to float32's largest value, every scale rule and format family: the scale rules sum and
    subtract scaled values, ``x / s`` stays right for huge ``s``, and dequantized values saturate."""
    rule = data.draw(st.sampled_from(_rules(family)), label="rule")
    grans = [PerTensor(), PerChannel(-1), PerGroup(0, 8), PerBlock(32)]
    gran = data.draw(st.sampled_from(grans), label="gran")
    bases = 2 if family == "binary-bases-2" else 1
    q = Quantizer(family.split("-")[0], gran, rule, bases=bases)
    u = np.asarray(jax.random.uniform(jax.random.key(seed), (16, 8), minval=-1.0, maxval=1.0), np.float64)
    u[0, :], u[1, :] = 1.0, -1.0  # the extremes in every group of rows 0..7
    x = jnp.asarray(u * top, jnp.float32)
    init = {"given": data.draw(st.sampled_from(["absmax", "mean_abs", "median", "lsq_init"]), label="init"),
            "learned": "lsq_init"}
    scale = init_scale(q, x, init[rule]) if rule in init else None
    y = fake_quant(q, x, scale=scale)
    assert bool(jnp.all(jnp.isfinite(y))), (q, top)
    assert same_bits(y, dequantize(quantize(q, x, scale=scale)))
    if rule in ("absmax", "minmax") and family not in ("binary",):
        # the largest magnitude lands on (or next to) the largest code: no silent collapse to 0
        assert float(jnp.max(jnp.abs(y))) >= 0.25 * float(jnp.max(jnp.abs(x)))
