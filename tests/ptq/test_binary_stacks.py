"""Binary stacks on one layer: BitStack's residual error falls with every stack and truncation equals a fresh
fit, one stack is sign binarization, bits per weight, jit,
zeros and clear errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.ptq.binary_stacks import BinaryStacks, bitstack_layer

K, N, G = 256, 64, 64


def _gaussian(seed=0):
    return np.asarray(jax.random.normal(jax.random.key(seed), (K, N)), np.float32) * 0.05


def _rel_error(w, w_hat):
    return float(np.linalg.norm(np.asarray(w_hat, np.float64) - w) / np.linalg.norm(w))


@pytest.fixture(scope="module")
def six():
    w = _gaussian()
    return w, bitstack_layer(w, stacks=6)


def test_shapes_and_codes(six):
    w, fit = six
    assert isinstance(fit, BinaryStacks) and fit.num_stacks == 6
    assert fit.signs.shape == (6, K, N) and fit.signs.dtype == jnp.int8
    assert fit.scales.shape == (6, 1, 1, N) and fit.scales.dtype == jnp.float32
    assert set(np.unique(np.asarray(fit.signs))) <= {-1, 1}
    grouped = bitstack_layer(w, stacks=3, group_size=G)
    assert grouped.scales.shape == (3, K // G, 1, N)


@pytest.mark.parametrize("group_size", [None, G])
def test_error_non_increasing_and_truncation_is_a_fresh_fit(group_size):
    w = _gaussian(1)
    fit = bitstack_layer(w, stacks=6, group_size=group_size)
    errors = [_rel_error(w, fit.dequantize(stacks=j)) for j in range(1, 7)]
    assert all(b <= a + 1e-7 for a, b in itertools.pairwise(errors))
    assert errors[-1] < 0.5 * errors[0]
    for j in (1, 2, 4):
        fresh = bitstack_layer(w, stacks=j, group_size=group_size)
        np.testing.assert_array_equal(fit.signs[:j], fresh.signs)
        np.testing.assert_allclose(fit.dequantize(stacks=j), fresh.dequantize(), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(fit.dequantize(), fit.dequantize(stacks=6))


def test_one_stack_is_sign_binarization(six):
    w, _ = six
    expected = np.abs(w).mean(0, keepdims=True) * np.where(w >= 0, 1.0, -1.0)
    np.testing.assert_allclose(bitstack_layer(w, stacks=1).dequantize(), expected, rtol=1e-6, atol=1e-8)
    wg = w.reshape(K // G, G, N)
    grouped = (np.abs(wg).mean(1, keepdims=True) * np.where(wg >= 0, 1.0, -1.0)).reshape(K, N)
    np.testing.assert_allclose(bitstack_layer(w, stacks=1, group_size=G).dequantize(), grouped,
                               rtol=1e-6, atol=1e-8)


def test_bits_per_weight(six):
    _, fit = six
    assert fit.bits_per_weight() == pytest.approx(6 * (1 + 16 / K))
    assert fit.bits_per_weight(stacks=2, scale_bits=32) == pytest.approx(2 * (1 + 32 / K))
    grouped = bitstack_layer(_gaussian(), stacks=3, group_size=G)
    for j in (1, 2, 3):
        assert grouped.bits_per_weight(stacks=j) == pytest.approx(j * (1 + 16 / G))
    assert grouped.bits_per_weight(scale_bits=0) == 3


def test_jit_equals_eager():
    w = _gaussian(3)
    cases = ((bitstack_layer, {"stacks": 3, "group_size": G}), (bitstack_layer, {"stacks": 2}))
    for fn, kw in cases:
        eager = fn(w, **kw)
        jitted = jax.jit(lambda x, fn=fn, kw=kw: fn(x, **kw).dequantize())(w)
        np.testing.assert_allclose(jitted, eager.dequantize(), rtol=1e-6, atol=1e-8)
    leaves = jax.tree_util.tree_leaves(eager)
    assert len(leaves) == 2  # a pytree: signs and scales


def test_all_zero_weight_gives_zeros():
    w = np.zeros((K, N), np.float32)
    for fit in (bitstack_layer(w, stacks=3, group_size=G), bitstack_layer(w)):
        out = np.asarray(fit.dequantize())
        assert np.all(np.isfinite(np.asarray(fit.scales))) and np.all(out == 0)


def test_nan_stays_in_its_group():
    w = _gaussian(4)
    w[3, 5] = np.nan
    for fit in (bitstack_layer(w, stacks=2, group_size=G), bitstack_layer(w, stacks=5, group_size=G)):
        out = np.asarray(fit.dequantize())
        assert np.all(np.isnan(out[:G, 5]))
        assert np.all(np.isfinite(np.delete(out, 5, axis=1))) and np.all(np.isfinite(out[G:, 5]))


@pytest.mark.parametrize(("call", "match"), [
    (lambda w: bitstack_layer(w, stacks=0), "stacks=0"),
    (lambda w: bitstack_layer(w, stacks=2.5), "stacks=2.5"),
    (lambda w: bitstack_layer(w, group_size=100), "group_size=100"),
    (lambda w: bitstack_layer(w, group_size=0), "group_size=0"),
    (lambda w: bitstack_layer(w[0]), r"shape \(64,\)"),
    (lambda w: bitstack_layer(w[None]), r"shape \(1, 256, 64\)"),
    (lambda w: bitstack_layer(w.astype(np.int32)), "dtype int32"),
    (lambda w: bitstack_layer(w, stacks=2).dequantize(stacks=3), "stacks=3"),
    (lambda w: bitstack_layer(w, stacks=2).bits_per_weight(stacks=0), "stacks=0"),
    (lambda w: bitstack_layer(w, stacks=2).bits_per_weight(scale_bits=-1), "scale_bits=-1"),
])
def test_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(_gaussian())
