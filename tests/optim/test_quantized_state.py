"""quantize_state: layout, nearest-code requantization, the second-moment zero rule, parity with 32-bit
Adam on gradients whose scales vary widely inside a block, non-finite gradients, overrides, bad input."""

from __future__ import annotations

import re

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qjax
import qjax.optim.quantized_state as qs
from qjax import PerBlock, Quantizer, dequantize, dynamic_map, quantize
from qjax.optim import adam8bit, encode_state, quantize_state, state_formats

SIZES = st.sampled_from([1, 5, 255, 256, 257, 700])
_encode = jax.jit(encode_state, static_argnums=(1, 2))
_quantize = jax.jit(lambda x, fmt, block: quantize(Quantizer(fmt, PerBlock(block)), x), static_argnums=(1, 2))
SIGNED_T = dynamic_map(signed=True).astype(np.float64)
UNSIGNED_T = dynamic_map(signed=False).astype(np.float64)


def _params(big=(64, 128), small=(100,)):
    key = jax.random.key(0)
    return {"big": jax.random.normal(key, big) * 0.1, "small": jnp.zeros(small)}


def _grads(params, seed=1, scale=1e-2):
    keys = jax.random.split(jax.random.key(seed), len(params))
    return {
        k: jax.random.normal(kk, v.shape) * scale
        for kk, (k, v) in zip(keys, sorted(params.items()), strict=True)
    }


def _assert_nearest(codes, x, block_size, table):
    """Every code is a nearest map value of x / absmax (up to float32 rounding of the division), except
    that with the unsigned map a positive x may take code 1 (the smallest positive value) instead of 0."""
    x = np.asarray(x, np.float64).reshape(-1)
    pad = -x.size % block_size
    xb = np.pad(x, (0, pad)).reshape(-1, block_size)
    absmax = np.maximum(np.abs(xb).max(1, keepdims=True), np.finfo(np.float32).tiny)
    u = (xb / absmax).reshape(-1)[: x.size]
    codes = np.asarray(codes).reshape(-1)
    got = np.abs(table[codes] - u)
    best = np.abs(table[None, :] - u[:, None]).min(1)
    nearest = got <= best + 1e-6 * np.abs(u) + 1e-12
    rounded_up = (table[0] == 0) & (codes == 1) & (x > 0) & (u < table[1])
    assert np.all(nearest | rounded_up), np.max(got - best)


@given(
    x=hnp.arrays(
        np.float32, SIZES, elements=st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_subnormal=False)
    ),
    block=st.sampled_from([1, 7, 64, 256]),
    fmt=st.sampled_from(["dynamic", "dynamic_unsigned"]),
)
def test_encode_state_is_nearest_code_per_block_absmax(x, block, fmt):
    if fmt == "dynamic_unsigned":
        x = np.abs(x)
    q = _encode(jnp.asarray(x), fmt, block)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == x.shape
    assert q.scale.shape == (-(-x.size // block), 1) and q.scale.dtype == jnp.float32
    _assert_nearest(q.codes, x, block, UNSIGNED_T if fmt == "dynamic_unsigned" else SIGNED_T)
    # The absmax element decodes to (nearly) itself: the largest code magnitude is 1.0 (or 0.99297).
    np.testing.assert_allclose(
        np.asarray(dequantize(q)).reshape(-1)[np.argmax(np.abs(x))],
        x.reshape(-1)[np.argmax(np.abs(x))],
        rtol=0.0071,
    )


@given(
    x=hnp.arrays(
        np.float32, SIZES, elements=st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_subnormal=False)
    )
)
def test_signed_codes_equal_qjax_quantize(x):
    """encode_state reuses qjax.quantize: the same codes and absmaxes, only kept in the leaf's shape."""
    q = _encode(jnp.asarray(x), "dynamic", 64)
    ref = _quantize(jnp.asarray(x), "dynamic", 64)
    np.testing.assert_array_equal(q.codes, ref.codes)
    np.testing.assert_array_equal(q.scale, ref.scale)
    _assert_nearest(q.codes, x, 64, SIGNED_T)


@given(exponents=hnp.arrays(np.float64, SIZES, elements=st.floats(-14, 3)), zeros=st.integers(0, 5))
def test_nonzero_second_moment_never_decodes_to_zero(exponents, zeros):
    v = (10.0**exponents).astype(np.float32)
    v[:zeros] = 0.0
    q = _encode(jnp.asarray(v), "dynamic_unsigned", 256)
    decoded = np.asarray(dequantize(q))
    assert np.all(decoded[v > 0] > 0), "a positive second moment decoded to 0"
    assert np.all(decoded[v == 0] == 0)
    # Apart from the round-up, codes are the nearest ones.
    rounded_up = (np.asarray(q.codes) == 1) & (v > 0)
    plain = _quantize(jnp.asarray(v), "dynamic_unsigned", 256).codes
    np.testing.assert_array_equal(np.where(rounded_up, 1, plain), q.codes)


def test_state_layout_big_leaves_8bit_small_leaves_float():
    params = _params()
    state = adam8bit(1e-3).init(params)
    mu, nu = state[0].mu, state[0].nu
    for leaf, fmt in ((mu["big"], "dynamic"), (nu["big"], "dynamic_unsigned")):
        assert isinstance(leaf, qjax.QArray) and leaf.format == fmt
        assert leaf.codes.shape == (64, 128) and leaf.codes.dtype == jnp.uint8
        assert leaf.scale.shape == (64 * 128 // 256, 1) and leaf.scale.dtype == jnp.float32
    assert mu["small"].dtype == jnp.float32 and mu["small"].shape == (100,)
    assert state_formats(state) == {
        "0/count": "int32",
        "0/mu/big": "dynamic",
        "0/mu/small": "float32",
        "0/nu/big": "dynamic_unsigned",
        "0/nu/small": "float32",
    }


@pytest.mark.parametrize(("size", "expected"), [(4095, "float32"), (4096, "dynamic")])
def test_min_size_boundary(size, expected):
    state = adam8bit(1e-3).init({"w": jnp.zeros((size,))})
    assert state_formats(state)["0/mu/w"] == expected


@pytest.mark.parametrize("block_size", [256, 2048, 1000])
def test_block_sizes_including_the_papers_2048_and_a_partial_last_block(block_size):
    params = {"w": jnp.zeros((5000,))}
    opt = quantize_state(optax.adam(1e-2), block_size=block_size)
    state = opt.init(params)
    assert state[0].mu["w"].scale.shape == (-(-5000 // block_size), 1)
    grads = {"w": jnp.linspace(-1.0, 1.0, 5000)}
    updates, state = jax.jit(opt.update)(grads, state, params)
    ref, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(params), params)
    np.testing.assert_allclose(updates["w"], ref["w"], rtol=1e-5, atol=1e-9)
    _assert_nearest(state[0].mu["w"].codes, 0.1 * np.linspace(-1.0, 1.0, 5000), block_size, SIGNED_T)


def _adam_reference(m, v, g, t, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    update = -lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return update, m, v


def test_two_steps_match_a_numpy_reference_with_brute_force_nearest_codes():
    params = {"w": jnp.zeros((32, 256))}
    opt = adam8bit(1e-2)
    state = opt.init(params)
    step = jax.jit(opt.update)
    for t in (1, 2):
        g = np.asarray(_grads(params, seed=t, scale=1.0)["w"], np.float64)
        m_old = np.asarray(dequantize(state[0].mu["w"]), np.float64)
        v_old = np.asarray(dequantize(state[0].nu["w"]), np.float64)
        updates, state = step({"w": jnp.asarray(g, jnp.float32)}, state, params)
        want, m, v = _adam_reference(m_old, v_old, g, t)
        np.testing.assert_allclose(updates["w"], want, rtol=2e-5, atol=1e-8)
        _assert_nearest(state[0].mu["w"].codes, m, 256, SIGNED_T)
        _assert_nearest(state[0].nu["w"].codes, v, 256, UNSIGNED_T)
        np.testing.assert_allclose(state[0].mu["w"].scale[:, 0], np.abs(m).reshape(-1, 256).max(1), rtol=1e-6)
        np.testing.assert_allclose(state[0].nu["w"].scale[:, 0], v.reshape(-1, 256).max(1), rtol=1e-6)


def _wide_scale_run(opt, steps=150, n=8192, seed=0):
    """Adam on a gradient stream whose per-element scales are e^N(0, 1.5) (REFERENCES' gotcha)."""
    key_scale, key_noise = jax.random.split(jax.random.key(seed))
    scales = jnp.exp(1.5 * jax.random.normal(key_scale, (n,)))
    params = {"w": jnp.zeros((n,))}
    state = opt.init(params)

    def body(carry, key):
        params, state = carry
        g = {"w": scales * (0.3 + jax.random.normal(key, (n,)))}
        updates, state = opt.update(g, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.jit(lambda c, k: jax.lax.scan(body, c, k))(
        (params, state), jax.random.split(key_noise, steps)
    )
    return np.asarray(params["w"])


def _parity_metrics(opt8):
    """(how much further the farthest 8-bit parameter went than the farthest 32-bit one, 99th percentile of
    the per-element distance ratio, relative L2 distance of the two final parameter vectors)."""
    p32 = _wide_scale_run(optax.adam(1e-3))
    p8 = _wide_scale_run(opt8)
    ratio = np.abs(p8) / np.maximum(np.abs(p32), 1e-4)
    rel_l2 = np.linalg.norm(p8 - p32) / np.linalg.norm(p32)
    return np.abs(p8).max() / np.abs(p32).max(), np.percentile(ratio, 99), rel_l2


def test_parity_with_32bit_adam_on_widely_varying_gradient_scales():
    """Per-element gradient scales e^N(0, 1.5) span ~8 decades inside a block (REFERENCES' gotcha)."""
    farthest, p99, rel_l2 = _parity_metrics(adam8bit(1e-3))
    assert farthest < 1.6, f"the farthest parameter went {farthest:.1f}x as far as with 32-bit Adam"
    assert p99 < 2.0, f"99th percentile of |p8| / |p32| is {p99:.2f}"
    assert rel_l2 < 0.25, f"relative L2 distance to 32-bit Adam {rel_l2:.3f}"


def test_parity_test_detects_second_moments_rounded_to_zero(monkeypatch):
    """Without the round-up rule the same check fails: v decodes to 0 and m / (sqrt(v) + eps) explodes."""
    monkeypatch.setattr(qs, "_round_up_nonzero", lambda codes, x: codes)
    farthest, _, _ = _parity_metrics(adam8bit(1e-3))
    assert farthest > 10


def _poisoned(g, value, *index):
    return {**g, "big": g["big"].at[index].set(value)}


def test_nonfinite_gradient_element_leaves_its_param_and_state_and_poisons_no_block():
    params = _params()
    opt = adam8bit(1e-2)
    step = jax.jit(lambda g, s, p: (lambda u, s: (optax.apply_updates(p, u), s))(*opt.update(g, s, p)))
    state = opt.init(params)
    params, state = step(_grads(params, seed=1), state, params)
    g = _grads(params, seed=2)
    bad = _poisoned(_poisoned(g, jnp.nan, 0, 0), jnp.inf, 40, 7)  # blocks 0 and 40*128/256 = 20
    clean = _poisoned(_poisoned(g, 0.5, 0, 0), -3.0, 40, 7)
    new_params, new_state = step(bad, state, params)
    ref_params, ref_state = step(clean, state, params)
    assert new_params["big"][0, 0] == params["big"][0, 0] and new_params["big"][40, 7] == params["big"][40, 7]
    for q in (new_state[0].mu["big"], new_state[0].nu["big"]):
        assert np.isfinite(np.asarray(q.scale)).all() and np.isfinite(np.asarray(dequantize(q))).all()
    # Every block without a bad element is bit-identical to a run where the bad values were finite.
    for name in ("mu", "nu"):
        got, ref = getattr(new_state[0], name)["big"], getattr(ref_state[0], name)["big"]
        others = np.ones(32, bool)
        others[[0, 20]] = False
        np.testing.assert_array_equal(np.asarray(got.scale)[others], np.asarray(ref.scale)[others])
        np.testing.assert_array_equal(
            np.asarray(got.codes).reshape(32, 256)[others], np.asarray(ref.codes).reshape(32, 256)[others]
        )
        old = np.asarray(dequantize(getattr(state[0], name)["big"]))
        new = np.asarray(dequantize(got))
        step_size = 0.02 * np.asarray(got.scale)[[0, 20], 0]  # map spacing near the top is <= 1.4%
        assert abs(new[0, 0] - old[0, 0]) <= step_size[0] and abs(new[40, 7] - old[40, 7]) <= step_size[1]
    others = np.ones(params["big"].shape, bool)
    others[0, 0] = others[40, 7] = False
    np.testing.assert_allclose(
        np.asarray(new_params["big"])[others],
        np.asarray(ref_params["big"])[others],
        rtol=0,
        atol=1e-3 * 1e-2 * 1.1,
    )


def test_finite_gradient_whose_square_overflows_poisons_no_block_like_32bit_adam():
    """g = 1e20 is finite but g^2 is inf in float32: 32-bit optax gives that element a 0 update and no NaN
    anywhere; the 8-bit state must not turn its block's absmax into NaN (issue 12: 256 NaN updates)."""
    params = _params()
    opt8, opt32 = adam8bit(1e-3), optax.adam(1e-3)
    s8, s32 = opt8.init(params), opt32.init(params)
    huge = _poisoned(_grads(params, seed=2), 1e20, 0, 3)
    for i, g in enumerate([_grads(params, seed=1), huge, _grads(params, seed=3), _grads(params, seed=4)]):
        u8, s8 = jax.jit(opt8.update)(g, s8, params)
        u32, s32 = opt32.update(g, s32, params)
        got, ref = np.asarray(u8["big"]), np.asarray(u32["big"])
        assert np.isfinite(got).all(), f"step {i}: {np.count_nonzero(~np.isfinite(got))} non-finite updates"
        for q in (s8[0].mu["big"], s8[0].nu["big"]):
            assert np.isfinite(np.asarray(q.scale)).all() and np.isfinite(np.asarray(dequantize(q))).all()
        others = np.ones(got.shape, bool)
        others[0, 3] = False
        # block 0 (rows 0-1) and every other block: within the 8-bit state's quantization error of 32-bit
        assert np.abs(got - ref)[others].max() < 0.1 * np.abs(ref).max(), i
        assert np.count_nonzero(got[:2][others[:2]]) == 2 * 128 - 1  # the block mates still move
        if i == 1:
            assert got[0, 3] == 0 and ref[0, 3] == 0  # skipped, as 32-bit Adam's m / sqrt(inf) = 0


def test_all_nonfinite_gradient_keeps_the_state_bit_for_bit():
    params = _params()
    opt = adam8bit(1e-2)
    state = opt.init(params)
    _, state = opt.update(_grads(params), state, params)
    nan = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), params)
    updates, new_state = jax.jit(opt.update)(nan, state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree_util.tree_leaves(updates))
    for a, b in zip(
        jax.tree_util.tree_leaves(new_state[0].mu), jax.tree_util.tree_leaves(state[0].mu), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree_util.tree_leaves(new_state[0].nu), jax.tree_util.tree_leaves(state[0].nu), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_nonfinite_element_does_not_poison_a_global_norm_inside_the_wrapper():
    params = _params()
    opt = quantize_state(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)))
    state = opt.init(params)
    updates, _ = opt.update(_poisoned(_grads(params), jnp.nan, 3, 3), state, params)
    assert np.isfinite(np.asarray(updates["big"])).all()
    assert np.count_nonzero(np.asarray(updates["big"])) == updates["big"].size - 1


def test_skip_nonfinite_false_lets_nan_through():
    params = _params()
    opt = adam8bit(1e-2, skip_nonfinite=False)
    updates, _ = opt.update(_poisoned(_grads(params), jnp.nan, 0, 0), opt.init(params), params)
    assert np.isnan(np.asarray(updates["big"][0, 0]))


def test_jit_and_eager_give_identical_states():
    params = _params()
    opt = adam8bit(1e-2)
    eager_updates, eager_state = opt.update(_grads(params), opt.init(params), params)
    jit_updates, jit_state = jax.jit(opt.update)(_grads(params), jax.jit(opt.init)(params), params)
    for a, b in zip(
        jax.tree_util.tree_leaves(eager_state), jax.tree_util.tree_leaves(jit_state), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree_util.tree_leaves(eager_updates), jax.tree_util.tree_leaves(jit_updates), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6)  # XLA may fuse the float update differently


def test_overrides_keep_32bit_force_a_map_and_first_match_wins():
    params = {"embed": jnp.zeros((64, 128)), "dense": jnp.zeros((64, 128)), "head": jnp.zeros((64, 128))}
    opt = quantize_state(
        optax.adam(1e-3),
        overrides=[
            ("embed", "float32"),
            (re.compile(r"mu/dense$"), "dynamic_unsigned"),
            ("dense", "float32"),
        ],
    )
    formats = state_formats(opt.init(params))
    assert formats["0/mu/embed"] == formats["0/nu/embed"] == "float32"
    assert formats["0/mu/dense"] == "dynamic_unsigned" and formats["0/nu/dense"] == "float32"
    assert formats["0/mu/head"] == "dynamic" and formats["0/nu/head"] == "dynamic_unsigned"
    as_dict = quantize_state(optax.adam(1e-3), overrides={"head": "float32"})
    assert state_formats(as_dict.init(params))["0/mu/head"] == "float32"


def test_second_moment_rule_is_overridable():
    params = {"w": jnp.zeros((64, 128))}
    formats = state_formats(quantize_state(optax.adam(1e-3), second_moment_fields=()).init(params))
    assert formats["0/nu/w"] == "dynamic"
    formats = state_formats(quantize_state(optax.adam(1e-3), second_moment_fields=("mu", "nu")).init(params))
    assert formats["0/mu/w"] == formats["0/nu/w"] == "dynamic_unsigned"


def test_parameter_copies_in_the_state_stay_32bit():
    """Schedule-free AdamW keeps the parameters' z sequence in its state: never 8-bit."""
    from optax import contrib

    formats = state_formats(
        quantize_state(contrib.schedule_free_adamw(1e-3)).init({"w": jnp.zeros((64, 128))})
    )
    assert formats["z/w"] == "float32" and formats["base_optimizer_state/0/nu/w"] == "dynamic_unsigned"


def test_stable_embedding_state_stays_32bit_by_default():
    params = {"params": {"stable_embedding": jnp.zeros((100, 64)), "dense": jnp.zeros((100, 64))}}
    formats = state_formats(adam8bit(1e-3).init(params))
    assert formats["0/mu/params/stable_embedding"] == "float32"
    assert formats["0/mu/params/dense"] == "dynamic"


def test_override_matching_nothing_warns():
    with pytest.warns(UserWarning, match="matched no state leaf"):
        quantize_state(optax.adam(1e-3), overrides={"no_such_layer": "float32"}).init(_params())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_size": 0}, "block_size=0"),
        ({"block_size": -256}, "block_size=-256"),
        ({"block_size": 2.5}, "block_size=2.5"),
        ({"block_size": True}, "block_size=True"),
        ({"min_size": -1}, "min_size=-1"),
        ({"overrides": {3: "float32"}}, "has type int; allowed: str"),
        ({"overrides": {"(": "float32"}}, "invalid"),
        ({"overrides": {"w": "int8"}}, "'int8'.*allowed: dynamic, dynamic_unsigned, float32"),
        ({"overrides": [("w",)]}, "not a \\(path regex, format\\) pair"),
        ({"overrides": "w"}, "must be a mapping"),
        ({"second_moment_fields": "nu"}, "sequence of field names"),
    ],
)
def test_bad_input_raises_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_state(optax.adam(1e-3), **kwargs)


def test_inner_must_be_a_gradient_transformation():
    with pytest.raises(TypeError, match="expects an optax GradientTransformation, got function"):
        quantize_state(optax.adam)


def test_path_str_and_match_params():
    params = {"a": {"w": jnp.zeros((3, 4))}, "b": jnp.zeros((5,))}
    state = optax.adam(1e-3).init(params)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    names = [qs.path_str(p) for p, _ in leaves]
    assert names == ["0/count", "0/mu/a/w", "0/mu/b", "0/nu/a/w", "0/nu/b"]
    matched = qs.match_params([(p, x.shape) for p, x in leaves], params)
    assert matched[0] is None and matched[1] is params["a"]["w"] and matched[4] is params["b"]
    assert qs.match_params([(leaves[1][0], (4, 3))], params) == [None]  # same path, other shape


@pytest.mark.parametrize("name", ["dynamic", "dynamic_unsigned", "nf4"])
def test_table_encode_equals_searchsorted_on_midpoints(name):
    """Format.encode's bucket lookup (formats.py, two gathers) is exactly ``searchsorted(midpoints, u)``."""
    fmt = qjax.get_format(name)
    table = np.asarray(fmt.table, np.float32)
    mid = (table[1:] + table[:-1]) / np.float32(2)
    rng = np.random.default_rng(0)
    special = [0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 1e-30, -1e-30, 3.0, -3.0]
    u = np.concatenate(
        [
            table,
            mid,
            np.nextafter(mid, np.inf),
            np.nextafter(mid, -np.inf),
            special,
            rng.standard_normal(20000) * np.exp(4 * rng.standard_normal(20000)),
        ]
    ).astype(np.float32)
    np.testing.assert_array_equal(fmt.encode(jnp.asarray(u)), np.searchsorted(mid, u))
    assert int(fmt.encode(jnp.asarray([np.nan]))[0]) == int(np.searchsorted(mid, 0.0))  # NaN -> code of 0


@pytest.mark.parametrize("fmt", ["dynamic", "dynamic_unsigned"])
@pytest.mark.parametrize("shape", [(64, 128), (1000, 7)])
def test_requantize_equals_qjax_quantize_and_keeps_dead_blocks(fmt, shape):
    """The fused requantization (one reduction for the maxima, arithmetic encoder) gives qjax.quantize's
    codes and absmaxes bit for bit, NaN/Inf blocks included; blocks without a finite gradient keep the old
    codes and absmax."""
    rng = np.random.default_rng(3)
    after = (rng.standard_normal(shape) * np.exp(3 * rng.standard_normal(shape))).astype(np.float32)
    if fmt == "dynamic_unsigned":
        after = np.abs(after)
    flat = after.reshape(-1)
    flat[5], flat[700], flat[701] = np.nan, np.inf, -np.inf
    finite = np.ones(shape, bool).reshape(-1)
    finite[256:512] = False  # a dead block
    finite[3], finite[1000] = False, False  # isolated non-finite gradients in live blocks
    old = encode_state(jnp.asarray(rng.standard_normal(shape), jnp.float32), fmt, 256)
    finite = jnp.asarray(finite.reshape(shape))
    got = jax.jit(lambda a, f, o: qs._requantize([o], [a], [f])[0])(jnp.asarray(after), finite, old)
    ref = _quantize(jnp.asarray(after), fmt, 256)
    codes = np.asarray(ref.codes)
    if fmt == "dynamic_unsigned":
        codes = np.where((codes == 0) & (after > 0), 1, codes)
    live = np.asarray(finite).reshape(-1)
    live = np.pad(live, (0, -live.size % 256)).reshape(-1, 256).any(1)
    live_el = np.repeat(live, 256)[: after.size].reshape(shape)
    np.testing.assert_array_equal(got.codes, np.where(live_el, codes, old.codes))
    np.testing.assert_array_equal(got.scale, np.where(live[:, None], ref.scale, old.scale))
    assert np.isnan(np.asarray(got.scale)[[0, 2]]).all() and not live[1]


def test_update_writes_no_full_size_float32_temporary():
    """Each pass recomputes the dequantized state in registers: XLA's temporaries stay below one float32
    copy of the state (full-size temporaries are page-faulted in on every step on CPU)."""
    params = {"w": jnp.zeros((512, 1024))}
    opt = adam8bit(1e-3)
    state = opt.init(params)
    compiled = jax.jit(lambda p, s, g: opt.update(g, s, p), donate_argnums=(1,)).lower(
        params, state, params
    ).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 4 * 512 * 1024
