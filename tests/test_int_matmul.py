"""The fused QAT matmul: its int8 x int8 -> int32 product and its float product both equal the fake-quant
product up to float rounding, with the same gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import PerChannel, PerGroup, PerTensor, PerToken, Quantizer, fake_quant
from qjax.int_matmul import (
    _fake_quant_matmul,
    int8_qat_matmul,
    integer_eligible,
    qat_matmul,
)
from qjax.machine import int8_product_is_faster, resolve_product
from qjax.qat import surrogate_kwargs

X = jax.random.normal(jax.random.key(0), (2, 5, 64))
W = jax.random.normal(jax.random.key(1), (64, 4, 6)) * 0.1

ELIGIBLE = [
    (Quantizer("int8", PerChannel(-1)), Quantizer("int8", PerToken(-1))),
    (Quantizer("int4", PerChannel((-2, -1))), Quantizer("int8", PerTensor())),
    (Quantizer("int2", PerTensor()), Quantizer("int4", PerToken(-1))),
    (Quantizer("ternary", PerChannel(-1), "mean_abs"), Quantizer("int8", PerToken(-1))),
    (Quantizer("binary", PerChannel(-1), "mean_abs", "reste"),
     Quantizer("binary", PerToken(-1), "mean_abs", "approx_sign")),
]


@pytest.mark.parametrize("product", ["int8", "float"])
@pytest.mark.parametrize("weight,inputs", ELIGIBLE, ids=lambda q: f"{q.format}")
def test_equals_fake_quant_product_and_gradients(weight, inputs, product):
    assert integer_eligible(weight, inputs, {}, W.ndim, 1)
    y = jax.jit(lambda x, w: qat_matmul(x, w, weight, inputs, product=product))(X, W)
    ref = _fake_quant_matmul(X, W, None, None, {}, weight, inputs)
    assert y.shape == (2, 5, 4, 6)
    if product == "float":  # the same float32 product of the same fake-quant values
        np.testing.assert_array_equal(y, ref)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
    loss = lambda f: (lambda x, w: jnp.sum(jnp.sin(f(x, w))))
    g = jax.grad(loss(lambda x, w: qat_matmul(x, w, weight, inputs, hparams={"o": 2.0}, product=product)),
                 (0, 1))(X, W)
    g_ref = jax.grad(loss(lambda x, w: _fake_quant_matmul(x, w, None, None, {"o": 2.0}, weight, inputs)),
                     (0, 1))(X, W)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("product", ["int8", "float"])
def test_learned_scales_get_gradients(product):
    weight = Quantizer("int4", PerChannel(-1), "learned")
    inputs = Quantizer("int8", PerTensor(), "learned")
    ws, xs = jnp.full((1, 1, 6), 0.05), jnp.full((1, 1, 1), 0.03)
    g = jax.grad(lambda a, b: jnp.sum(qat_matmul(X, W, weight, inputs, b, a, product=product) ** 2),
                 (0, 1))(ws, xs)
    ref = lambda a, b: jnp.sum(_fake_quant_matmul(X, W, b, a, {}, weight, inputs) ** 2)
    g_ref = jax.grad(ref, (0, 1))(ws, xs)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4)


@pytest.mark.parametrize("weight,inputs,hparams", [
    (Quantizer("int4", PerGroup(0, 16)), Quantizer("int8", PerToken(-1)), {}),
    (Quantizer("uint4", PerChannel(-1), "minmax"), Quantizer("int8", PerToken(-1)), {}),
    (Quantizer("nf4", PerChannel(-1)), Quantizer("int8", PerToken(-1)), {}),
    (Quantizer("int4", PerChannel(-1)), Quantizer("fp8_e4m3", PerToken(-1)), {}),
    (Quantizer("int4", PerChannel(0)), Quantizer("int8", PerToken(-1)), {}),
    (Quantizer("int4", PerChannel(-1)), Quantizer("int8", PerToken(0)), {}),
    (Quantizer("int4", PerChannel(-1)), Quantizer("int8", PerToken(-1)), {"enabled": 1.0}),
    (Quantizer("int4", PerChannel(-1)), None, {}),
    (Quantizer("binary", PerChannel(-1), "learned", "biper"), Quantizer("int8", PerToken(-1)), {}),
], ids=["group", "minmax", "nf4", "fp8-input", "per-input-channel", "token-axis-0", "enabled", "no-input",
        "biper"])
def test_ineligible(weight, inputs, hparams):
    assert not integer_eligible(weight, inputs, hparams)


def test_two_contracting_axes_like_attention_out():
    x = jax.random.normal(jax.random.key(2), (3, 7, 4, 8))  # (batch, seq, heads, head_dim)
    w = jax.random.normal(jax.random.key(3), (4, 8, 16)) * 0.1  # (heads, head_dim, features)
    weight, inputs = Quantizer("int4", PerChannel(-1)), Quantizer("int8", PerToken((-2, -1)))
    assert integer_eligible(weight, inputs, {}, 3, 2)
    assert not integer_eligible(weight, Quantizer("int8", PerToken(-1)), {}, 3, 2)
    y = int8_qat_matmul(x, w, weight, inputs, contract=2)
    ref = _fake_quant_matmul(x, w, None, None, {}, weight, inputs, contract=2)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
    g = jax.grad(lambda w: jnp.sum(int8_qat_matmul(x, w, weight, inputs, contract=2) ** 2))(w)
    g_ref = jax.grad(lambda w: jnp.sum(_fake_quant_matmul(x, w, None, None, {}, weight, inputs, 2) ** 2))(w)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(g_ref))))


def _dot_line(product):
    weight, inputs = ELIGIBLE[0]
    hlo = jax.jit(lambda x, w: qat_matmul(x, w, weight, inputs, product=product)).lower(X, W).as_text()
    return hlo.split("dot_general")[1].split("\n")[0]


def test_product_argument_and_auto_by_machine_capability():
    # "auto": int8 where the machine multiplies int8 faster (GPU, TPU, VNNI/AMX CPUs), else float.
    assert resolve_product("auto") == ("int8" if int8_product_is_faster() else "float")
    assert "i8>, tensor<" in _dot_line("int8")
    assert "i8>" not in _dot_line("float")
    assert _dot_line("auto") == _dot_line(resolve_product("auto"))
    weight, inputs = ELIGIBLE[0]
    np.testing.assert_array_equal(int8_qat_matmul(X, W, weight, inputs),
                                  qat_matmul(X, W, weight, inputs, product="int8"))


def test_bad_product_names_the_value():
    with pytest.raises(ValueError, match=r"'int4'.*allowed: auto, int8, float"):
        qat_matmul(X, W, *ELIGIBLE[0], product="int4")


@pytest.mark.parametrize("product", ["int8", "float"])
@pytest.mark.parametrize("where", ["w-nan", "w-inf", "x-nan", "x-neg-inf"])
def test_non_finite_operands_give_the_reference_nan_outputs(product, where):
    """A NaN or Inf in an operand makes exactly the outputs NaN that the group-marked fake-quant product
    makes NaN (the float product lets a NaN element through by itself rather than marking its group);
    every other output is unchanged."""
    weight, inputs = Quantizer("int4", PerChannel(-1)), Quantizer("int8", PerToken(-1))
    x, w = X[0], W[:, 0, :]  # (5, 64) x (64, 6)
    if where == "w-nan":
        w = w.at[7, 2].set(jnp.nan)
    elif where == "w-inf":
        w = w.at[9, 4].set(jnp.inf)
    elif where == "x-nan":
        x = x.at[3, 11].set(jnp.nan)
    else:
        x = x.at[1, 0].set(-jnp.inf)
    y = jax.jit(lambda x, w: qat_matmul(x, w, weight, inputs, product=product))(x, w)
    ref = _fake_quant_matmul(x, w, None, None, {}, weight, inputs)
    assert bool(jnp.any(jnp.isnan(ref)))
    np.testing.assert_array_equal(jnp.isnan(y), jnp.isnan(ref))
    finite = ~jnp.isnan(ref)
    scale = float(jnp.max(jnp.abs(ref[finite])))
    np.testing.assert_allclose(y[finite], ref[finite], rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("product", ["int8", "float"])
@pytest.mark.parametrize("weight,inputs", ELIGIBLE[:1] + ELIGIBLE[3:], ids=lambda q: f"{q.format}")
def test_original_residuals_take_the_unquantized_operands(weight, inputs, product):
    # residuals="original": dx = r_x'(g . w^T), dw = r_w'(x^T . g), r' each quantizer's surrogate VJP (the
    # identity for the STE); the forward is the same fake-quant product.
    hp = {"o": 2.0}
    run = lambda r: (lambda x, w: qat_matmul(x, w, weight, inputs, hparams=hp, product=product, residuals=r))
    np.testing.assert_array_equal(jax.jit(run("original"))(X, W), jax.jit(run("quantized"))(X, W))
    g = jax.random.normal(jax.random.key(5), (2, 5, 4, 6))
    got = jax.vjp(run("original"), X, W)[1](g)
    fx = lambda v: fake_quant(inputs, v, **surrogate_kwargs(inputs, hp))
    fw = lambda v: fake_quant(weight, v, **surrogate_kwargs(weight, hp))
    gx = jnp.tensordot(g, W, ((2, 3), (1, 2)))
    gw = jnp.tensordot(X, g, ((0, 1), (0, 1)))
    want = (jax.vjp(fx, X)[1](gx)[0], jax.vjp(fw, W)[1](gw)[0])
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
    exact = jax.vjp(run("quantized"), X, W)[1](g)
    assert float(jnp.max(jnp.abs(exact[1] - got[1]))) > 1e-3 * float(jnp.max(jnp.abs(got[1])))


def test_bad_residuals_name_the_value():
    with pytest.raises(ValueError, match=r"residuals 'float'.*allowed: quantized, original"):
        qat_matmul(X, W, *ELIGIBLE[0], residuals="float")


@pytest.mark.parametrize("weight,inputs", ELIGIBLE[:4], ids=lambda q: f"{q.format}")
def test_float_products_operands_are_fake_quant_bit_for_bit_up_to_huge_scales(weight, inputs):
    from qjax.int_matmul import _float_fake_quant

    for q, v in ((weight, W), (inputs, X)):
        for factor in (1.0, 3e37 / float(jnp.max(jnp.abs(v)))):  # scales past 2^100 (grid_units)
            got = jax.jit(_float_fake_quant, static_argnums=0)(q, v * factor)
            np.testing.assert_array_equal(got, jax.jit(fake_quant, static_argnums=0)(q, v * factor))
            assert float(jnp.max(jnp.abs(got))) > 0
