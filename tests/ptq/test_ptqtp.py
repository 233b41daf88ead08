"""PTQTP on one layer: two trit-planes beat binary, ternary and 2-bit RTN in weight error, an exact
trit-plane weight is recovered, the error never increases with iterations, jit / vmap, zeros and NaNs,
and clear errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.trits import pack_trits, unpack_trits
from qjax.ptq.ptqtp import ptqtp_dequantize, ptqtp_layer

K, N, G = 256, 64, 64


def _gaussian(seed=0):
    return np.asarray(jax.random.normal(jax.random.key(seed), (K, N)), np.float32) * 0.05


def _groups(w):
    return np.asarray(w, np.float64).reshape(K // G, G, N)


def _binary_rtn(w):
    """``sign(W) mean|W|`` per (group, column)."""
    wg = _groups(w)
    return (np.where(wg >= 0, 1.0, -1.0) * np.abs(wg).mean(1, keepdims=True)).reshape(K, N)


def _ternary_rtn(w):
    """BitNet b1.58: ``gamma = mean|W|``, ``clip(round(W / gamma), -1, 1) gamma`` per (group, column)."""
    wg = _groups(w)
    gamma = np.abs(wg).mean(1, keepdims=True)
    return (np.clip(np.round(wg / gamma), -1, 1) * gamma).reshape(K, N)


def _int2_minmax_rtn(w):
    """2-bit asymmetric min-max RTN per (group, column): ``s = (max - min) / 3``, ``z = round(-min / s)``."""
    wg = _groups(w)
    lo, hi = wg.min(1, keepdims=True), wg.max(1, keepdims=True)
    s = (hi - lo) / 3
    z = np.round(-lo / s)
    return ((np.clip(np.round(wg / s) + z, 0, 3) - z) * s).reshape(K, N)


def _rel_error(w, w_hat):
    return float(np.linalg.norm(np.asarray(w_hat, np.float64) - w) / np.linalg.norm(w))


@pytest.fixture(scope="module")
def gaussian_fit():
    w = _gaussian()
    return w, ptqtp_layer(w, group_size=G)


def test_shapes_and_codes(gaussian_fit):
    _, (t1, t2, a1, a2) = gaussian_fit
    assert t1.shape == t2.shape == (K, N) and t1.dtype == t2.dtype == jnp.int8
    assert a1.shape == a2.shape == (K // G, 1, N) and a1.dtype == a2.dtype == jnp.float32
    for t in (t1, t2):
        assert set(np.unique(np.asarray(t))) <= {-1, 0, 1}
        np.testing.assert_array_equal(unpack_trits(pack_trits(t), 0, K), t)  # 5 trits per byte


def test_beats_binary_ternary_and_2bit_rtn(gaussian_fit):
    w, fit = gaussian_fit
    ptqtp = _rel_error(w, ptqtp_dequantize(*fit))
    binary, ternary, int2 = (_rel_error(w, f(w)) for f in (_binary_rtn, _ternary_rtn, _int2_minmax_rtn))
    # measured: 0.154 against 0.598 (binary), 0.509 (ternary), 0.457 (2-bit min-max)
    assert ptqtp < 0.5 * min(binary, ternary, int2)
    assert ptqtp < 0.2 and int2 < ternary < binary


def test_exact_trit_planes_are_recovered():
    rng = np.random.default_rng(1)
    t1, t2 = (rng.integers(-1, 2, (K, N)).astype(np.int8) for _ in range(2))
    a1 = rng.uniform(0.5, 1.5, (K // G, 1, N)).astype(np.float32)
    a2 = (a1 * rng.uniform(0.1, 0.4, a1.shape) * rng.choice([-1, 1], a1.shape)).astype(np.float32)
    w = np.asarray(ptqtp_dequantize(t1, t2, a1, a2))
    for ridge in (0.0, 1e-6):  # the default ridge shrinks the scales by ~1e-6 only
        assert _rel_error(w, ptqtp_dequantize(*ptqtp_layer(w, group_size=G, ridge=ridge))) < 1e-5


def test_error_never_increases_with_iterations():
    w = _gaussian(2)
    final = {}
    for starts, sweep in ((0, (0, 1, 2, 4, 50)), (16, (0, 2, 50))):
        errors = [_rel_error(w, ptqtp_dequantize(*ptqtp_layer(w, group_size=G, iters=i, ratio_starts=starts)))
                  for i in sweep]
        assert all(b <= a for a, b in itertools.pairwise(errors)), errors
        assert errors[-1] < errors[0]
        final[starts] = errors[-1]
    assert final[16] < final[0]  # the ratio starts improve on the greedy start alone


def test_jit_matches_eager_and_vmap_per_layer(gaussian_fit):
    w, eager = gaussian_fit
    jitted = jax.jit(lambda w: ptqtp_layer(w, group_size=G))(w)
    for e, j in zip(eager[:2], jitted[:2], strict=True):
        np.testing.assert_array_equal(e, j)
    for e, j in zip(eager[2:], jitted[2:], strict=True):
        np.testing.assert_allclose(e, j, rtol=1e-6)
    stack = np.stack([w, -2.0 * w[::-1]])
    batched = jax.vmap(lambda w: ptqtp_layer(w, group_size=G))(stack)
    second = ptqtp_layer(stack[1], group_size=G)
    for b, e, s in zip(batched, eager, second, strict=True):
        np.testing.assert_allclose(b[0], e, rtol=1e-6)
        np.testing.assert_allclose(b[1], s, rtol=1e-6)


def test_zeros_and_nan_stay_local(gaussian_fit):
    w, fit = gaussian_fit
    for out in ptqtp_layer(np.zeros((K, N), np.float32), group_size=G):
        np.testing.assert_array_equal(out, 0)
    bad = w.copy()
    bad[G + 5, 7] = np.nan  # group 1, column 7
    w_hat = np.asarray(ptqtp_dequantize(*ptqtp_layer(bad, group_size=G)))
    inside = np.zeros((K, N), bool)
    inside[G:2 * G, 7] = True
    assert np.isnan(w_hat[inside]).all()
    np.testing.assert_array_equal(w_hat[~inside], np.asarray(ptqtp_dequantize(*fit))[~inside])
    part = w.copy()
    part[:G, 3] = 0.0  # one all-zero (group, column) among nonzero ones
    w_hat = np.asarray(ptqtp_dequantize(*ptqtp_layer(part, group_size=G)))
    np.testing.assert_array_equal(w_hat[:G, 3], 0.0)
    assert np.isfinite(w_hat).all()


def test_bad_inputs_fail_clearly():
    w = _gaussian()
    with pytest.raises(ValueError, match=r"group_size=48 must be a positive integer dividing K = 256"):
        ptqtp_layer(w, group_size=48)
    with pytest.raises(ValueError, match=r"group_size=0"):
        ptqtp_layer(w, group_size=0)
    with pytest.raises(ValueError, match=r"group_size=65536 is too large; allowed: up to 46340"):
        ptqtp_layer(np.zeros((65536, 1), np.float32), group_size=65536)
    with pytest.raises(ValueError, match=r"weight of shape \(1, 256, 64\); allowed: a non-empty \(K, N\)"):
        ptqtp_layer(w[None], group_size=G)
    with pytest.raises(ValueError, match="weight dtype int32"):
        ptqtp_layer(np.ones((K, N), np.int32), group_size=G)
    with pytest.raises(ValueError, match="iters=-1"):
        ptqtp_layer(w, group_size=G, iters=-1)
    with pytest.raises(ValueError, match=r"ridge=-0\.1"):
        ptqtp_layer(w, group_size=G, ridge=-0.1)
    with pytest.raises(ValueError, match="ridge=nan"):
        ptqtp_layer(w, group_size=G, ridge=float("nan"))
    with pytest.raises(ValueError, match=r"ratio_starts=1\.5"):
        ptqtp_layer(w, group_size=G, ratio_starts=1.5)
    t = np.zeros((K, N), np.int8)
    a = np.zeros((K // G, 1, N), np.float32)
    with pytest.raises(ValueError, match="G dividing K"):
        ptqtp_dequantize(t, t, a[:3], a[:3])
    with pytest.raises(ValueError, match="both planes"):
        ptqtp_dequantize(t, t[:8], a, a)
