"""SqueezeLLM on one layer: the weighted k-means objective, sensitivity, the dense-and-sparse split, codes,
jit, zeros and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.ptq.squeeze_llm import SqueezeLayer, _squeeze_jit, squeeze_llm_layer

K, N = 128, 64


def _gaussian(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    w = jax.random.normal(k1, (K, N)) * 0.02
    sens = jax.random.normal(k2, (K, N)) ** 2  # squared gradients: a Fisher-diagonal stand-in
    return w, sens


def _weighted_error(w, wq, sens):
    return float(jnp.sum(sens * (w - wq) ** 2))


def _rtn(w, bits):
    """Uniform asymmetric min-max round-to-nearest per output column."""
    lo, hi = jnp.min(w, axis=0, keepdims=True), jnp.max(w, axis=0, keepdims=True)
    scale = (hi - lo) / (2**bits - 1)
    return jnp.round((w - lo) / scale) * scale + lo


def test_objective_non_increasing_and_beats_rtn():
    w, sens = _gaussian()
    layer, history = _squeeze_jit(w, sens, 0, 3, 20)
    h = np.asarray(history)
    assert np.all(np.diff(h) <= 1e-6 * h[0])
    assert h[-1] < h[0]
    err = _weighted_error(w, layer.dequantize(), sens)
    np.testing.assert_allclose(err, h[-1], rtol=1e-4)
    rtn = _weighted_error(w, _rtn(w, 3), sens)
    assert err < 0.8 * rtn


def test_sensitive_rows_get_lower_error():
    w, _ = _gaussian(1)
    rows = np.arange(K) < 16
    sens = jnp.where(rows[:, None], 100.0, 1.0) * jnp.ones((K, N))
    uniform = squeeze_llm_layer(w, bits=2, outlier_fraction=0.0)
    focused = squeeze_llm_layer(w, sens, bits=2, outlier_fraction=0.0)
    e_u = float(jnp.sum((w - uniform.dequantize())[rows] ** 2))
    e_f = float(jnp.sum((w - focused.dequantize())[rows] ** 2))
    assert e_f < 0.8 * e_u


def test_outliers_kept_exactly_and_help_heavy_tails():
    w = jax.random.t(jax.random.key(2), 3.0, (K, N)) * 0.02
    f = 0.0045
    m = round(f * K * N)
    layer = squeeze_llm_layer(w, bits=3, outlier_fraction=f)
    assert isinstance(layer, SqueezeLayer)
    mask = np.asarray(layer.outlier_mask)
    assert mask.shape == (K, N) and mask.dtype == bool and mask.sum() == m
    a = np.abs(np.asarray(w))
    assert a[mask].min() >= a[~mask].max()
    wq = np.asarray(layer.dequantize())
    np.testing.assert_array_equal(wq[mask], np.asarray(w)[mask])
    assert not np.any(np.asarray(layer.outlier_values)[~mask])
    none = squeeze_llm_layer(w, bits=3, outlier_fraction=0.0)
    ones = jnp.ones((K, N))
    assert _weighted_error(w, layer.dequantize(), ones) < 0.9 * _weighted_error(w, none.dequantize(), ones)
    bpw = (3 * K * N + 8 * N * 32 + m * (16 + 32)) / (K * N)
    assert layer.bits_per_weight() == pytest.approx(bpw)


@pytest.mark.parametrize("bits", [1, 4])
def test_codes_and_layout(bits):
    w, sens = _gaussian(3)
    layer = squeeze_llm_layer(w, sens, bits=bits, iters=5)
    assert layer.codes.dtype == jnp.uint8 and layer.codes.shape == (K, N)
    assert int(jnp.max(layer.codes)) < 2**bits
    assert layer.table.shape == (N, 2**bits) and layer.table.dtype == jnp.float32
    assert layer.outlier_values.dtype == jnp.float32


def test_jit_equals_eager():
    w, sens = _gaussian(4)
    eager = squeeze_llm_layer(w, sens)
    jitted = jax.jit(squeeze_llm_layer)(w, sens)
    np.testing.assert_array_equal(eager.codes, jitted.codes)
    np.testing.assert_array_equal(eager.outlier_mask, jitted.outlier_mask)
    np.testing.assert_allclose(eager.table, jitted.table, rtol=1e-6)
    np.testing.assert_allclose(eager.dequantize(), jitted.dequantize(), rtol=1e-6)


def test_all_zero_weight():
    layer = squeeze_llm_layer(jnp.zeros((K, N)), jnp.zeros((K, N)))
    wq = np.asarray(layer.dequantize())
    assert np.all(np.isfinite(np.asarray(layer.table))) and not np.any(wq)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"bits": 0}, "bits=0"), ({"bits": 9}, "bits=9"), ({"bits": 2.5}, "bits=2.5"),
    ({"outlier_fraction": 0.5}, "outlier_fraction=0.5"),
    ({"outlier_fraction": -0.1}, "outlier_fraction=-0.1"),
    ({"iters": -1}, "iters=-1"),
])
def test_bad_arguments(kwargs, match):
    w, _ = _gaussian()
    with pytest.raises(ValueError, match=match):
        squeeze_llm_layer(w, **kwargs)


def test_bad_sensitivity_and_weight():
    w, sens = _gaussian()
    with pytest.raises(ValueError, match=r"sensitivity of shape \(128, 32\)"):
        squeeze_llm_layer(w, sens[:, :32])
    with pytest.raises(ValueError, match="sensitivity holds negative"):
        squeeze_llm_layer(w, sens.at[0, 0].set(-1.0))
    with pytest.raises(ValueError, match="weight of shape"):
        squeeze_llm_layer(w[0])
