"""One core, two front ends: the same weights give the same codes and scales in Linen and NNX; layers stacked
by vmap and run by scan get per-layer scales and pack along their contraction axis; partitioning boxes keep
their names; the QAT product and the kernel backend are static settings that change the compiled program."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

from qjax import PerChannel, PerToken, QArray, Quantizer, Rule, dequantize, fake_quant
from qjax import linen as ql
from qjax import nnx as qn

X = jax.random.normal(jax.random.key(1), (4, 8))
W4, A8 = Quantizer("int4", PerChannel(-1)), Quantizer("int8", PerToken(-1))
RESTE = Quantizer("binary", PerChannel(-1), "mean_abs", "reste")
LSQ = Quantizer("int4", PerChannel(-1), "learned")


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="l2")(nn.relu(nn.Dense(16, name="l1")(x)))


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1, self.l2 = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def both(rules):
    """The same weights in a quantized Linen model and a quantized NNX model."""
    qmodel = ql.quantize_model(LinenMLP(), rules)
    variables = qmodel.init(jax.random.key(0), X)
    model = NnxMLP(nnx.Rngs(0))
    for name in ("l1", "l2"):
        getattr(model, name).kernel.set_value(variables["params"][name]["kernel"])
        getattr(model, name).bias.set_value(variables["params"][name]["bias"])
    qn.quantize_model(model, rules, X)
    return qmodel, variables, model


def test_same_weights_same_codes_scales_and_outputs_in_both_front_ends():
    rules = [Rule("l1", weight=LSQ, input=A8), Rule("l2", weight=RESTE)]
    qmodel, variables, model = both(rules)
    np.testing.assert_array_equal(variables["quant"]["l1"]["kernel"], model.l1.kernel_qscale.get_value())
    assert qmodel.paths(variables, X) == qn.paths(model)
    np.testing.assert_allclose(jax.jit(qmodel.apply)(variables, X), nnx.jit(lambda m, x: m(x))(model, X),
                               rtol=1e-6, atol=1e-6)
    frozen = ql.freeze(qmodel, variables, X)
    qn.freeze(model)
    for name in ("l1", "l2"):
        a, b = frozen["params"][name]["kernel"], getattr(model, name).kernel.qarray
        assert isinstance(a, QArray) and a.packing == b.packing and a.format == b.format
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scale, b.scale)
    np.testing.assert_allclose(qmodel.apply(frozen, X), model(X), rtol=1e-6, atol=1e-6)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.up, self.down = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.relu(self.up(x)))


class Stack(nnx.Module):
    """Three blocks stacked by nnx.vmap (every Param gets a leading layer axis) and run by nnx.scan."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return Block(rngs)

        self.blocks = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def run(block, x):
            return block(x)

        return run(self.blocks, x)


def test_scanned_stack_scales_per_layer_packs_along_k_and_frozen_equals_qat():
    model = Stack(nnx.Rngs(0))
    w = model.blocks.up.kernel.get_value()  # (3, 8, 16)
    w = w.at[0].multiply(100.0)  # layer 0 much larger: pooled scales would crush layers 1 and 2
    model.blocks.up.kernel.set_value(w)
    hparams = qn.quantize_model(model, [Rule(".*", weight=W4, input=A8), Rule("never", weight=RESTE)], X,
                                hparams={"o": 1.0}, warn_unused=False)
    table = qn.module_table(model, [])
    assert table["blocks/up"].stacked == 1 and table["blocks/up"].contract == 1
    y = nnx.jit(lambda m, x: m(x))(model, X)
    # per-layer fake quant, by hand
    h = X
    for i in range(3):
        up, down = model.blocks.up, model.blocks.down
        a = jax.nn.relu(fake_quant(A8, h) @ fake_quant(W4, up.kernel.get_value()[i]) + up.bias.get_value()[i])
        h = h + fake_quant(A8, a) @ fake_quant(W4, down.kernel.get_value()[i]) + down.bias.get_value()[i]
    np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-5)
    hparams.set(o=2.0)  # hyperparameters live at the root, outside the scanned graph
    qn.freeze(model)
    qa = model.blocks.up.kernel.qarray
    assert qa.shape == (3, 8, 16) and qa.codes.shape == (3, 1, 16) and qa.scale.shape == (3, 1, 16)
    assert qa.packing[0] == -2  # packed along K of each layer's (K, N) weight, not along the layer axis
    for i in range(3):
        layer = jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], qa)
        np.testing.assert_array_equal(dequantize(layer), fake_quant(W4, w[i]))
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, X), y, rtol=1e-5, atol=1e-5)


def test_linen_partitioning_boxes_are_read_through_and_written_back_with_their_names():
    class Boxed(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            h = nn.Dense(16, kernel_init=init, name="wi")(x)
            init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
            return nn.Dense(4, kernel_init=init, name="wo")(nn.relu(h))

    qmodel = ql.quantize_model(Boxed(), [Rule(".*", weight=W4, input=A8)])
    variables = qmodel.init(jax.random.key(0), X)
    assert isinstance(variables["params"]["wi"]["kernel"], nn.LogicallyPartitioned)
    y = jax.jit(qmodel.apply)(variables, X)
    frozen = ql.freeze(qmodel, variables, X)
    box = frozen["params"]["wi"]["kernel"]
    assert isinstance(box, nn.LogicallyPartitioned) and box.names == ("embed", "mlp")
    assert isinstance(box.unbox(), QArray)
    assert isinstance(frozen["params"]["wo"]["kernel"], nn.Partitioned)
    assert frozen["params"]["wo"]["kernel"].names == (None, "model")
    np.testing.assert_allclose(jax.jit(qmodel.apply)(frozen, X), y, rtol=1e-5, atol=1e-5)


def hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_the_product_is_a_static_setting_that_changes_the_program():
    rules = [Rule(".*", weight=W4, input=A8)]
    texts = {}
    for product in ("int8", "float"):
        qmodel = ql.quantize_model(LinenMLP(), rules, product=product)
        variables = qmodel.init(jax.random.key(0), X)
        texts["linen", product] = hlo(qmodel.apply, variables, X)
        model = NnxMLP(nnx.Rngs(0))
        qn.quantize_model(model, rules, X, product=product)
        graphdef, state = nnx.split(model)
        texts["nnx", product] = hlo(lambda s, x, g=graphdef: nnx.merge(g, s)(x), state, X)
    int8_dot = lambda text: any("dot_general" in line and "xi8>" in line for line in text.splitlines())
    for front in ("linen", "nnx"):
        assert int8_dot(texts[front, "int8"]) and not int8_dot(texts[front, "float"])
    # nnx.jit: one jitted function, two settings -> two traces, two programs
    traces = []
    run = nnx.jit(lambda m, x: traces.append(1) or m(x))
    model = NnxMLP(nnx.Rngs(0))
    for product in ("int8", "float", "int8"):
        qn.quantize_model(model, rules, X, product=product)
        run(model, X)
        qn.unquantize_model(model)
    assert len(traces) == 2


def test_the_backward_residuals_are_a_static_setting_of_both_front_ends():
    # residuals="original" (Qwix's backward: the unquantized operands) against the exact fake-quant
    # gradient: the same forward, other weight gradients, in Linen and NNX alike.
    rules = [Rule(".*", weight=W4, input=A8)]
    grads = {}
    for residuals in ("quantized", "original"):
        qmodel = ql.quantize_model(LinenMLP(), rules, residuals=residuals)
        variables = qmodel.init(jax.random.key(0), X)
        loss = lambda p, q=qmodel: (q.apply({"params": p}, X) ** 2).sum()
        grads["linen", residuals] = jax.jit(jax.grad(loss))(variables["params"])
        model = NnxMLP(nnx.Rngs(0))
        qn.quantize_model(model, rules, X, residuals=residuals)
        grads["nnx", residuals] = nnx.grad(lambda m: (m(X) ** 2).sum())(model)
    for front in ("linen", "nnx"):
        a, b = (jax.tree.leaves(grads[front, r]) for r in ("quantized", "original"))
        assert any(float(abs(x - y).max()) > 1e-4 for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match=r"residuals 'int8'.*allowed: quantized, original"):
        ql.quantize_model(LinenMLP(), rules, residuals="int8")


def test_linen_scan_stack_scales_per_layer_and_frozen_equals_qat():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(8, name="d")(nn.relu(x)), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scanned(name="s")(x, None)[0]

    qmodel = ql.quantize_model(Stack(), [Rule(".*", weight=W4, input=A8)])
    variables = qmodel.init(jax.random.key(1), X)
    assert qmodel.table(variables, X)["s/d"].stacked == 1
    y = jax.jit(qmodel.apply)(variables, X)
    w, b = variables["params"]["s"]["d"]["kernel"], variables["params"]["s"]["d"]["bias"]
    h = X
    for i in range(3):
        h = h + fake_quant(A8, jax.nn.relu(h)) @ fake_quant(W4, w[i]) + b[i]
    np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-5)
    frozen = ql.freeze(qmodel, variables, X)
    qa = frozen["params"]["s"]["d"]["kernel"]
    assert qa.scale.shape == (3, 1, 8) and qa.packing[0] == -2
    np.testing.assert_allclose(jax.jit(qmodel.apply)(frozen, X), y, rtol=1e-5, atol=1e-5)
