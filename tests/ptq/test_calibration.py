"""Activation ranges by interception: equal to the absmax computed by hand, padding left out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import PerChannel, PerTensor, Quantizer, Rule
from qjax.linen import quantize_model
from qjax.ptq import calibrate, input_scales

RULES = [Rule(".*", types=("Dense",), weight=Quantizer("int8", PerChannel(-1)),
              input=Quantizer("int8", PerTensor(), "given"))]


def _hand_inputs(variables, batch):
    """The inputs of dense_0, dense_1 and head, computed by hand from the parameters."""
    p = variables["params"]
    x = batch["x"]
    h0 = jax.nn.gelu(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
    h1 = jax.nn.gelu(h0 @ p["dense_1"]["kernel"] + p["dense_1"]["bias"])
    return {"dense_0": x, "dense_1": h0, "head": h1}


def test_ranges_match_hand_computed_absmax(mlp):
    model, variables, batches = mlp
    ranges = calibrate(model, variables, RULES, batches)
    assert sorted(ranges) == ["dense_0", "dense_1", "head"]
    for name in ranges:
        rows = [(_hand_inputs(variables, b)[name], b["attention_mask"]) for b in batches]
        per_channel = np.max([np.max(np.abs(np.asarray(x)) * (np.asarray(m)[..., None] > 0), axis=(0, 1))
                              for x, m in rows], axis=0)
        np.testing.assert_allclose(ranges[name].channel_absmax, per_channel, rtol=1e-5)
        np.testing.assert_allclose(ranges[name].absmax, per_channel.max(), rtol=1e-5)


def test_padding_tokens_are_left_out(mlp):
    model, variables, batches = mlp
    spiked = [{**b, "x": jnp.where(b["attention_mask"][..., None] > 0, b["x"], 1e3)} for b in batches]
    assert float(calibrate(model, variables, RULES, spiked)["dense_0"].absmax) < 100
    unmasked = [{"x": b["x"]} for b in spiked]
    assert float(calibrate(model, variables, RULES, unmasked)["dense_0"].absmax) == pytest.approx(1e3)


def test_input_scales_feed_the_given_input_quantizer(mlp):
    model, variables, batches = mlp
    ranges = calibrate(model, variables, RULES, batches)
    calibrated = input_scales(model, variables, RULES, ranges, batches[0])
    scale = calibrated["quant"]["dense_1"]["__input__"]
    np.testing.assert_allclose(scale.reshape(()), ranges["dense_1"].absmax / 127, rtol=1e-6)
    qmodel = quantize_model(model, RULES)
    y = jax.jit(lambda v, b: qmodel.apply(v, **b))(calibrated, batches[0])
    y_float = model.apply(variables, **batches[0])
    assert float(jnp.mean((y - y_float) ** 2)) < 1e-3 * float(jnp.mean(y_float**2))


def test_calibration_errors(mlp):
    model, variables, batches = mlp
    with pytest.raises(ValueError, match="batches is empty"):
        calibrate(model, variables, RULES, [])
    with pytest.raises(ValueError, match="matches no module path"):
        calibrate(model, variables, [Rule("nothing", weight=Quantizer("int4"))], batches)
    with pytest.raises(ValueError, match="allowed: a dict of arrays"):
        calibrate(model, variables, RULES, [batches[0]["x"]])


def test_an_always_zero_channel_never_stores_a_zero_scale(mlp):
    """Issue 12: its scale was absmax(0) floored at TINY *before* / 127, a subnormal that flushes to 0."""
    model, variables, batches = mlp
    rules = [Rule(".*", types=("Dense",), input=Quantizer("int8", PerChannel(-1), "given"))]
    dead = [{**b, "x": b["x"].at[..., 3].set(0.0)} for b in batches]
    ranges = calibrate(model, variables, rules, dead)
    scale = input_scales(model, variables, rules, ranges, dead[0])["quant"]["dense_0"]["__input__"]
    scale = np.asarray(scale)
    assert scale.ravel()[3] == np.float32(ranges["dense_0"].absmax) / np.float32(127)
    assert np.all(scale > 0) and np.all(np.isfinite(scale))
    zero = [{**b, "x": jnp.zeros_like(b["x"])} for b in batches[:1]]
    ranges = calibrate(model, variables, rules, zero)
    scale = input_scales(model, variables, rules, ranges, zero[0])["quant"]["dense_0"]["__input__"]
    np.testing.assert_array_equal(scale, np.float32(np.finfo(np.float32).tiny))
