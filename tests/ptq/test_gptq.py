"""GPTQ on one layer: lower output error than RTN, RTN exactly under an identity Hessian, act-order and
groups, jit, and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import PerChannel, PerGroup, PerToken, QArray, Quantizer, dequantize, presets, quantize
from qjax.ptq import gptq_layer
from qjax.scales import scale_value

K, N, ROWS = 128, 48, 1024


def _data(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    mix = jnp.eye(K) + jax.random.normal(k3, (K, K)) / jnp.sqrt(K)  # correlated inputs, as in a network
    x = jax.random.normal(k1, (ROWS, K)) @ mix * jnp.linspace(0.2, 3.0, K)
    w = jax.random.normal(k2, (K, N)) * 0.05
    return x, w, 2 * x.T @ x / ROWS


def _output_error(x, w, qa):
    return float(jnp.mean((x @ w - x @ dequantize(qa)) ** 2))


QUANTIZERS = [Quantizer("int4", PerChannel(-1), "minmax"), Quantizer("int3", PerGroup(0, 32), "minmax"),
              Quantizer("int2", PerGroup(0, 32), "absmax"), Quantizer("ternary", PerGroup(0, 32), "mean_abs"),
              # MX block formats: E8M0 block exponents; NVFP4's E4M3 block scales under a tensor scale
              presets.mxfp4(0), presets.mxfp8(0), presets.nvfp4(0)]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("q", QUANTIZERS, ids=lambda q: f"{q.format}-{type(q.granularity).__name__}")
def test_gptq_beats_rtn_in_output_error(q, act_order):
    x, w, h = _data()
    qa = gptq_layer(q, w, h, block_size=64, act_order=act_order)
    assert isinstance(qa, QArray) and qa.shape == w.shape and qa.format == q.format
    assert _output_error(x, w, qa) < 0.9 * _output_error(x, w, quantize(q, w))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("q", QUANTIZERS, ids=lambda q: f"{q.format}-{type(q.granularity).__name__}")
def test_identity_hessian_is_rtn(q, act_order):
    _, w, _ = _data(1)
    hessian = 2.0 * jnp.eye(K) + jnp.diag(jnp.linspace(0, 1, K))  # diagonal: no error moves to other rows
    qa, rtn = gptq_layer(q, w, hessian, block_size=64, act_order=act_order), quantize(q, w)
    np.testing.assert_array_equal(qa.codes, rtn.codes)
    # a mean-abs scale may differ by an ulp: XLA orders the jitted and the eager mean differently
    np.testing.assert_allclose(qa.scale, rtn.scale, rtol=1e-6)
    np.testing.assert_allclose(dequantize(qa), dequantize(rtn), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("q", QUANTIZERS[4:], ids=lambda q: q.format + "-" + q.scale)
def test_block_formats_store_their_own_scales(q):
    _, w, h = _data(5)
    qa, rtn = gptq_layer(q, w, h, block_size=64), quantize(q, w)
    # the scales GPTQ set group by group are stored as the rule stores them (E8M0 uint8 / E4M3), the NVFP4
    # tensor scale is the original weight's, and fake-quant of the stored QArray is its dequantization
    assert qa.scale.dtype == rtn.scale.dtype and qa.scale.shape == rtn.scale.shape
    if q.scale == "nvfp4":
        np.testing.assert_array_equal(qa.tensor_scale, rtn.tensor_scale)
    # every value is a grid point of its stored block scale: w_q / s decodes to itself (to float rounding
    # of b * t for NVFP4)
    gran = qa.granularity
    blocks = gran.to_blocks(jnp.zeros(w.shape)).shape
    s_el = gran.from_blocks(jnp.broadcast_to(scale_value(qa.scale, qa.tensor_scale), blocks), w.shape)
    u = np.asarray(dequantize(qa) / s_el)
    np.testing.assert_allclose(qa.fmt.decode(qa.fmt.encode(u)), u, rtol=1e-6, atol=0)
    assert np.all(np.isfinite(dequantize(qa)))


def test_groups_keep_one_scale_per_group_and_codes_on_grid():
    x, w, h = _data(2)
    q = Quantizer("int3", PerGroup(0, 16), "minmax")
    for act_order in (False, True):
        qa = gptq_layer(q, w, h, block_size=32, act_order=act_order)
        assert qa.scale.shape == (K // 16, 1, N) and qa.zero_point.shape == (K // 16, 1, N)
        assert int(qa.codes.min()) >= -4 and int(qa.codes.max()) <= 3
    # act-order sorts rows by decreasing H_kk: with strongly varying input scales it changes the answer
    plain, ordered = gptq_layer(q, w, h, block_size=32), gptq_layer(q, w, h, block_size=32, act_order=True)
    assert not np.array_equal(plain.codes, ordered.codes)
    assert _output_error(x, w, ordered) < _output_error(x, w, quantize(q, w))


def test_dead_inputs_and_padding_to_block():
    _, w, h = _data(3)
    h = h.at[5].set(0.0).at[:, 5].set(0.0)  # input 5 never fires
    qa = gptq_layer(Quantizer("int4", PerChannel(-1)), w, h, block_size=48)  # 128 rows: blocks of 48 + pad
    assert qa.shape == w.shape and np.all(np.isfinite(dequantize(qa)))
    np.testing.assert_array_equal(qa.codes[5], 0)


def test_under_jit_and_matches_eager():
    _, w, h = _data(4)
    q = Quantizer("int4", PerGroup(0, 32), "minmax")
    jitted = jax.jit(lambda w, h: gptq_layer(q, w, h, block_size=32))(w, h)
    eager = gptq_layer(q, w, h, block_size=32)
    np.testing.assert_array_equal(jitted.codes, eager.codes)
    np.testing.assert_allclose(jitted.scale, eager.scale, rtol=1e-6)  # XLA's reductions: jit may reorder


def test_bad_inputs_fail_clearly():
    _, w, h = _data()
    q = Quantizer("int4", PerChannel(-1))
    with pytest.raises(ValueError, match=r"hessian has shape \(128, 128\); allowed: \(1, 1\) for a weight of "
                                         r"shape \(1, 128, 48\) contracting 1 axes"):
        gptq_layer(q, w[None], h)  # a 3-D weight contracts its leading axis: the Hessian must match it
    with pytest.raises(ValueError, match=r"hessian has shape \(4, 4\)"):
        gptq_layer(q, w, jnp.eye(4))
    with pytest.raises(ValueError, match="granularity"):
        gptq_layer(Quantizer("int4", PerToken(0)), w, h)
    with pytest.raises(ValueError, match="multiple of the group size 64"):
        gptq_layer(Quantizer("int4", PerGroup(0, 64)), w, h, block_size=48)
    with pytest.raises(ValueError, match="scale rule 'learned'"):
        gptq_layer(Quantizer("int4", PerChannel(-1), "learned"), w, h)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_layer(q, w, -jnp.eye(K), damp=0.0)
    with pytest.raises(ValueError, match="block_size"):
        gptq_layer(q, w, h, block_size=0)
