"""The NNX transform: in place, no copies, QAT by rules, learned scales, schedules, attention, modules
quantized by what they do (a hand-written ``@`` Linear, a Tunix-style Einsum), stacked layers run by scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qjax import PerChannel, PerToken, Quantizer, fake_quant
from qjax import nnx as qn
from qjax.rules import Rule

W4 = Quantizer("int4", PerChannel(-1))
A8 = Quantizer("int8", PerToken(-1))
RESTE = Quantizer("binary", PerChannel(-1), "mean_abs", "reste")
X = jax.random.normal(jax.random.key(1), (4, 8))


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


class Net(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=4, decode=False, rngs=rngs)
        self.ein = nnx.Einsum("btd,dh->bth", (4, 6), rngs=rngs)

    def __call__(self, x):
        h = self.conv(x)  # (b, h, w, 4)
        h = h.reshape(h.shape[0], -1, 4)
        return self.ein(self.attn(h))


def test_in_place_without_copying_parameters():
    model = MLP(nnx.Rngs(0))
    before = model(X)
    params = {n: getattr(model, n).kernel for n in ("l1", "l2")}
    pointers = {n: p.get_value().unsafe_buffer_pointer() for n, p in params.items()}
    qn.quantize_model(model, [Rule("l1", weight=RESTE, input=A8), Rule("l2", weight=W4)], X)
    for n, p in params.items():
        assert getattr(model, n).kernel is p
        assert p.get_value().unsafe_buffer_pointer() == pointers[n]
    w1 = fake_quant(RESTE, model.l1.kernel.get_value())
    h = jax.nn.relu(fake_quant(A8, X) @ w1 + model.l1.bias.get_value())
    expected = h @ fake_quant(W4, model.l2.kernel.get_value()) + model.l2.bias.get_value()
    np.testing.assert_allclose(model(X), expected, rtol=1e-6, atol=1e-6)
    qn.unquantize_model(model)
    np.testing.assert_array_equal(model(X), before)


def test_schedule_under_nnx_jit_does_not_recompile():
    model = MLP(nnx.Rngs(0))
    hparams = qn.quantize_model(model, [Rule(".*", weight=RESTE)], X, hparams={"o": 1.0})
    traces = []

    @nnx.jit
    def grads(model, x):
        traces.append(1)
        return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)

    results = []
    for o in (1.0, 2.0, 3.0):
        hparams.set(o=o)
        results.append(grads(model, X).l1.kernel.get_value())
    assert len(traces) == 1
    assert not np.allclose(results[0], results[-1])  # the traced o really changed the backward
    with pytest.raises(ValueError, match="'omega' was not declared"):
        hparams.set(omega=3.0)


def test_learned_scales_are_variables_and_get_gradients():
    model = MLP(nnx.Rngs(0))
    qn.quantize_model(model, [Rule(".*", weight=Quantizer("int4", PerChannel(-1), "learned"))], X)
    scales = nnx.state(model, qn.QuantScale)
    assert len(jax.tree_util.tree_leaves(scales)) == 2
    diff = nnx.DiffState(0, (nnx.Param, qn.QuantScale))
    grads = nnx.grad(lambda m: jnp.sum(m(X) ** 2), argnums=diff)(model)
    g = grads.l2.kernel_qscale.get_value()
    assert g.shape == (1, 3) and np.all(g != 0)


def test_learned_input_scales_start_from_the_example_input_train_and_freeze():
    model = MLP(nnx.Rngs(0))
    q_in = Quantizer("int8", scale="learned")
    qn.quantize_model(model, [Rule(".*", weight=Quantizer("int4", PerChannel(-1), "learned"), input=q_in)], X)
    # made by quantize_model from the example input (LSQ's data-dependent start): nnx.Optimizer sees them
    assert len(jax.tree_util.tree_leaves(nnx.state(model, qn.QuantScale))) == 4
    step = model.l1.input_qscale.get_value()
    np.testing.assert_allclose(step, 2 * jnp.mean(jnp.abs(X)) / np.sqrt(127), rtol=1e-6)
    diff = nnx.DiffState(0, (nnx.Param, qn.QuantScale))
    grads = nnx.grad(lambda m: jnp.sum(m(X) ** 2), argnums=diff)(model)
    assert float(jnp.abs(grads.l2.input_qscale.get_value()).max()) > 0
    expected = model(X)
    qn.freeze(model)
    np.testing.assert_allclose(model(X), expected, rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(model.l1.input_qscale.get_value() == step))  # inputs stay quantized


def test_conv_einsum_attention_types():
    model = Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 4, 4, 3))
    before = model(x)
    rules = [Rule("conv|ein|attn/(query|key|value|out)", weight=W4, input=A8),
             Rule("attn", types=("MultiHeadAttention",), activations=Quantizer("int4", PerToken(-1)))]
    assert "conv" in qn.dry_run(model, rules, x)
    qn.quantize_model(model, rules, x)
    table = qn.module_table(model, rules)
    assert table["attn"].rule is rules[1] and table["attn/query"].rule is rules[0]
    after = model(x)
    assert after.shape == before.shape and float(jnp.max(jnp.abs(after - before))) > 1e-3
    # attention's q k^T and p v take the activations quantizer: the float attention differs
    qn.unquantize_model(model)
    qn.quantize_model(model, rules[:1], x)
    assert float(jnp.max(jnp.abs(model(x) - after))) > 1e-4


def test_refuses_what_it_cannot_quantize_before_changing_anything():
    class Lookup(nnx.Module):  # owns a weight but never contracts it
        def __init__(self):
            self.kernel = nnx.Param(jnp.ones((3, 8)))

        def __call__(self, ids):
            return self.kernel[...][ids]

    model = Lookup()
    with pytest.raises(ValueError, match=r"names module '' \(Lookup\).*contracted: \[\]"):
        qn.quantize_model(model, [Rule(".*", types=("Lookup",), weight=W4)], jnp.array([0, 2]))
    assert type(model) is Lookup and not hasattr(model, qn.HPARAMS)  # untouched
    with pytest.raises(ValueError, match="needs example inputs"):
        qn.quantize_model(MLP(nnx.Rngs(0)), [Rule(".*", weight=W4)])
    model = MLP(nnx.Rngs(0))
    qn.quantize_model(model, [Rule(".*", weight=W4)], X)
    with pytest.raises(ValueError, match="already quantized"):
        qn.quantize_model(model, [Rule(".*", weight=W4)], X)


class HandLinear(nnx.Module):  # Flax's NNX toy Linear: x @ w
    def __init__(self, din, dout, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (din, dout)) * 0.3)
        self.b = nnx.Param(jnp.zeros((dout,)))

    def __call__(self, x):
        return x @ self.w + self.b


class TunixEinsum(nnx.Module):  # Tunix's Einsum: its own w, contracted by jnp.einsum in __call__
    def __init__(self, shape, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape) * 0.3)

    def __call__(self, eqn, x):
        return jnp.einsum(eqn, x, self.w.value)


class Custom(nnx.Module):
    def __init__(self, rngs):
        self.up = HandLinear(8, 16, rngs)
        self.proj = TunixEinsum((16, 2, 4), rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)

    def __call__(self, x):
        return self.proj("bd,dnh->bnh", jax.nn.relu(self.up(self.norm(x))))


def test_modules_are_quantized_by_what_they_do():
    model = Custom(nnx.Rngs(0))
    rules = [Rule(".*", weight=W4, input=A8, weight_names=("w", "kernel", "scale"))]
    table = qn.module_table(model, rules, X)
    assert {k for k, e in table.items() if e.rule} == {"up", "proj"}  # the norm's scale is not contracted
    qn.quantize_model(model, rules, X)
    assert qn.paths(model) == {"up": qn.AT_MODULE, "proj": qn.FAKE_QUANT}
    h = model.norm(X)
    h = jax.nn.relu(fake_quant(A8, h) @ fake_quant(W4, model.up.w.get_value()) + model.up.b.get_value())
    want = jnp.einsum("bd,dnh->bnh", fake_quant(A8, h), fake_quant(W4, model.proj.w.get_value()))
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, X), want, rtol=1e-5, atol=1e-6)
    grads = nnx.grad(lambda m: jnp.sum(m(X) ** 2))(model)
    assert float(jnp.abs(grads.up.w.get_value()).max()) > 0
    assert float(jnp.abs(grads.proj.w.get_value()).max()) > 0
    expected = model(X)
    qn.freeze(model)
    assert isinstance(model.up.w, qn.PackedWeight) and isinstance(model.proj.w, qn.PackedWeight)
    np.testing.assert_allclose(model(X), expected, rtol=1e-5, atol=1e-6)


def test_rules_that_quantize_nothing_are_an_error_unless_allowed():
    model = MLP(nnx.Rngs(0))
    before = model(X)
    with pytest.raises(ValueError, match=r"quantize no module.*can quantize .*\['l1', 'l2'\]"):
        qn.quantize_model(model, [Rule("nothing", weight=W4)], X)
    assert type(model) is MLP and not hasattr(model, qn.HPARAMS)  # untouched
    qn.quantize_model(model, [Rule("nothing", weight=W4)], X, warn_unused=False)  # a float baseline
    np.testing.assert_array_equal(model(X), before)


class Frozen(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.ein = nnx.Einsum("btd,dh->bth", (4, 6), rngs=rngs)
        self.lin = nnx.Linear(4, 5, rngs=rngs)
        self.gen = nnx.LinearGeneral(5, (2, 3), rngs=rngs)

    def __call__(self, x):
        h = self.conv(x).reshape(2, -1, 4)
        return self.gen(jax.nn.relu(self.lin(h))), self.ein(h)


def test_freeze_in_place_packs_weights_and_keeps_outputs(monkeypatch):
    model = Frozen(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 4, 4, 3))
    rules = [Rule("lin", weight=Quantizer("int4", PerChannel(-1), "learned"), input=A8),
             Rule("gen|conv|ein", weight=Quantizer("ternary", PerChannel(-1), "mean_abs"))]
    qn.quantize_model(model, rules, x)
    expected = model(x)
    qn.freeze(model)
    for name in ("lin", "gen", "conv", "ein"):
        kernel = getattr(model, name).kernel
        assert isinstance(kernel, qn.PackedWeight) and kernel.qarray.codes.dtype == jnp.uint32
    assert qn.paths(model) == {"lin": "packed integer matmul", "gen": qn.PACKED, "conv": qn.DEQUANTIZED,
                               "ein": qn.DEQUANTIZED}
    import kernels_pallas

    calls = []
    original = kernels_pallas.packed_matmul
    monkeypatch.setattr(kernels_pallas, "packed_matmul", lambda *a, **k: calls.append(1) or original(*a, **k))
    for got, want in zip(model(x), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1  # gen on the packed matmul (lin, W4A8: the packed integer matmul); conv and einsum
    # read the dequantized kernel
    jitted = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(jitted[0], expected[0], rtol=1e-5, atol=1e-5)
    leaves = jax.tree_util.tree_leaves(nnx.state(model.lin))
    assert any(leaf.dtype == jnp.uint32 for leaf in leaves)
    assert not any(leaf.shape == (4, 5) for leaf in leaves)
    with pytest.raises(ValueError, match="frozen"):
        qn.unquantize_model(model)
