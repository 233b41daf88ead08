"""Frozen weight-and-activation models (W8A8, W4A8, W4A4) run the packed integer matmul: the input quantized
to int8 codes by its own quantizer, times the packed weight codes (kernels_pallas.packed_int_matmul). The
invariant: the frozen output equals ``fake_quant(input) @ dequantize(weight)`` layer by layer, which is the
weight-only packed path's result, to float32 rounding, on Linen and NNX; NaN rows stay NaN. MX/NVFP4 weights
and inputs freeze to the dequantized path with the fake-quant forward's outputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernels_pallas
from qjax import PerChannel, PerGroup, PerTensor, PerToken, Quantizer, fake_quant, presets, ptq, quantize
from qjax import linen as ql
from qjax import nnx as qn
from qjax.core import PACKED_INT
from qjax.qarray import dequantize
from qjax.rules import Rule
from qjax.serving import frozen_int_matmul, frozen_matmul, integer_input, pack_for_serving

X = jax.random.normal(jax.random.key(1), (2, 8, 64))
A8, A4 = Quantizer("int8", PerToken(-1)), Quantizer("int4", PerToken(-1))
NAMES = ("dense_0", "dense_1", "head")
# One model, three configurations: W8A8 per channel with per-token inputs; W4A8 per group of 32 with a static
# per-tensor input scale (Call.input_scale: LSQ's start here, where a calibrated scale is stored too); W4A4
# with asymmetric (zero-point) weights per group of 32 and int4 per-token inputs.
INPUTS = {"dense_0": A8, "dense_1": Quantizer("int8", PerTensor(), "learned"), "head": A4}
WEIGHTS = {"dense_0": Quantizer("int8", PerChannel(-1)), "dense_1": Quantizer("int4", PerGroup(0, 32)),
           "head": Quantizer("uint4", PerGroup(0, 32), "minmax")}
RULES = [Rule(f"^{n}$", weight=WEIGHTS[n], input=INPUTS[n]) for n in NAMES]
ENABLED = {"enabled": 1.0}  # a per-step switch: keeps the weight-only packed path ("packed matmul")


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(64, name="dense_0")(x))
        return nn.Dense(32, name="head")(nn.gelu(nn.Dense(64, name="dense_1")(h)))


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.dense_0 = nnx.Linear(64, 64, rngs=rngs)
        self.dense_1 = nnx.Linear(64, 64, rngs=rngs)
        self.head = nnx.Linear(64, 32, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.gelu(self.dense_1(jax.nn.gelu(self.dense_0(x)))))


@jax.jit
def reference(layers, x):
    """``fake_quant(input) @ dequantize(W) + b`` layer by layer (gelu between), from the frozen QArrays;
    ``layers``: ``(kernel QArray, bias, input scale or None)`` per layer of :data:`NAMES`."""
    h = x
    for name, (w, b, scale) in zip(NAMES, layers, strict=True):
        h = fake_quant(INPUTS[name], h, scale=scale) @ dequantize(w) + b
        h = h if name == "head" else jax.nn.gelu(h)
    return h


def assert_close(got, want):
    scale = float(jnp.max(jnp.abs(jnp.where(jnp.isnan(want), 0, want))))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


apply = jax.jit(lambda qmodel, variables, x, hparams: qmodel.apply(variables, x, hparams=hparams),
                static_argnums=0)
nnx_apply = nnx.jit(lambda model, x: model(x))


def test_linen_frozen_integer_path_equals_fake_quant_input_times_dequantized_weight():
    qmodel = ql.quantize_model(LinenMLP(), RULES, backend="xla")
    variables = jax.jit(qmodel.init)(jax.random.key(0), X)
    frozen = ql.freeze(qmodel, variables, X)
    assert qmodel.paths(frozen, X) == dict.fromkeys(NAMES, PACKED_INT)
    assert set(qmodel.paths(frozen, X, hparams=ENABLED).values()) == {ql.PACKED}
    got = apply(qmodel, frozen, X, {})
    assert_close(got, apply(qmodel, frozen, X, ENABLED))  # the weight-only packed path
    params, quant = frozen["params"], frozen["quant"]
    layers = [(params[n]["kernel"], params[n]["bias"], quant.get(n, {}).get(ql.INPUT_KEY)) for n in NAMES]
    assert layers[1][2].shape == (1, 1, 1)
    assert_close(got, reference(layers, X))


def test_linen_rtn_frozen_on_the_pallas_kernel_and_nan_rows(monkeypatch):
    # qjax.ptq.rtn freezes (one W4A8 layer between float ones); backend="interpret" runs the Pallas kernel;
    # a NaN in one token makes that token's outputs NaN on both frozen paths, the other tokens keep theirs.
    rules = [Rule("dense_1", weight=WEIGHTS["dense_1"], input=A8)]
    model = LinenMLP()
    frozen = ptq.rtn(model, jax.jit(model.init)(jax.random.key(0), X), rules, {"x": X})
    calls = []
    original = kernels_pallas.packed_int_matmul_pallas
    monkeypatch.setattr(kernels_pallas, "packed_int_matmul_pallas",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    x = X.at[0, 3, 5].set(jnp.nan)
    got = apply(ql.quantize_model(model, rules, backend="interpret"), frozen, x, {})
    assert len(calls) == 1
    want = apply(ql.quantize_model(model, rules, backend="xla"), frozen, x, ENABLED)
    nan = np.zeros(got.shape, bool)
    nan[0, 3] = True
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(np.isnan(want), nan)
    assert_close(got, want)


def test_nnx_frozen_integer_path_equals_fake_quant_input_times_dequantized_weight():
    model = NnxMLP(nnx.Rngs(0))
    qn.quantize_model(model, RULES, X)
    qn.freeze(model, backend="xla")
    assert qn.paths(model) == dict.fromkeys(NAMES, PACKED_INT)
    got = nnx_apply(model, X)
    layers = []
    for n in NAMES:
        module = getattr(model, n)
        scale = module.input_qscale.get_value() if hasattr(module, "input_qscale") else None
        layers.append((module.kernel.qarray, module.bias.get_value(), scale))
    assert_close(got, reference(layers, X))


@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_nvfp4_weights_and_inputs_freeze_to_the_fake_quant_outputs(backend):
    # Linen and NNX: nvfp4 weights (E2M1 codes in 4-bit fields, E4M3 scales per 16 along K under a tensor
    # scale) run on the packed weight-only matmul when frozen, the nvfp4 inputs fake-quantized before it
    # (one quantized layer: the path is per layer, and a small program compiles fast).
    rules = [Rule("head", weight=presets.nvfp4(0), input=presets.nvfp4(-1))]
    qmodel = ql.quantize_model(LinenMLP(), rules, backend=backend)
    variables = jax.jit(qmodel.init)(jax.random.key(0), X)
    frozen = ql.freeze(qmodel, variables, X)
    assert set(qmodel.paths(frozen, X).values()) == {ql.PACKED}
    kernel = frozen["params"]["head"]["kernel"]
    assert kernel.scale.dtype == jnp.float8_e4m3fn and kernel.packing[2] == 4
    assert_close(apply(qmodel, frozen, X, {}), apply(qmodel, variables, X, {}))
    model = NnxMLP(nnx.Rngs(0))
    qn.quantize_model(model, rules, X)
    before = nnx_apply(model, X)
    qn.freeze(model, backend=backend)
    assert set(qn.paths(model).values()) == {qn.PACKED}
    assert_close(nnx_apply(model, X), before)


@pytest.mark.parametrize("q,eligible", [
    (A8, True), (Quantizer("int4", PerTensor(), "given"), True),
    (Quantizer("int2", PerToken((-2, -1))), True),
    (Quantizer("ternary", PerToken(-1), "mean_abs"), True), (Quantizer("binary", PerTensor()), True),
    (Quantizer("int8", PerChannel((-3, -2))), True),  # one scale per (batch, token) of a rank-3 input
    (Quantizer("int8", PerChannel(-1), "given"), False),  # per input channel: varies along K
    (Quantizer("int8", PerToken(0)), False),  # a non-negative axis: K only for one rank
    (Quantizer("int8", PerToken(-1), "minmax"), False), (Quantizer("uint8", PerToken(-1)), False),
    (Quantizer("int8", PerGroup(-1, 32)), False), (Quantizer("nf4", PerToken(-1)), False),
    (Quantizer("fp8_e4m3", PerToken(-1)), False), (presets.nvfp4(-1), False), (None, False),
])
def test_integer_input_takes_signed_integer_codes_with_a_scale_constant_along_k(q, eligible):
    assert integer_input(q, {}) is eligible
    if q is not None:
        assert not integer_input(q, ENABLED)


def test_frozen_int_matmul_zeros_grad_vmap_and_errors():
    w = jax.jit(lambda v: pack_for_serving(quantize(Quantizer("int4", PerGroup(0, 32)), v), 1))(
        jax.random.normal(jax.random.key(2), (64, 12)))
    x = jax.random.normal(jax.random.key(3), (3, 5, 64))
    packed = lambda x: frozen_matmul(fake_quant(A8, x), w, "xla")
    integer = lambda x: frozen_int_matmul(x, w, A8, backend="xla")
    grad = lambda f: jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))

    @jax.jit
    def run(x):
        return integer(jnp.zeros_like(x)), jax.vmap(integer)(x), packed(x), grad(integer)(x), grad(packed)(x)

    zeros, got, want, g_int, g_packed = run(x)
    np.testing.assert_array_equal(zeros, np.zeros((3, 5, 12)))  # all-zero input: zeros, not NaN
    assert_close(got, want)
    assert_close(g_int, g_packed)  # the gradient: straight through the input's rounding, as the packed path
    with pytest.raises(ValueError, match="give no int8 codes with a scale constant along K"):
        frozen_int_matmul(x, w, Quantizer("int8", PerChannel(-1)))
    with pytest.raises(ValueError, match=r"x of shape \(3, 5, 63\) does not contract"):
        frozen_int_matmul(x[..., :63], w, A8)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        frozen_int_matmul(x, w, A8, backend="gpu")
