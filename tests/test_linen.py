"""The Linen transform: float path untouched, QAT by rules, learned scales, schedules, attention, freeze."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qjax import PerChannel, PerGroup, PerToken, QArray, Quantizer, fake_quant, quantize
from qjax import linen as ql
from qjax.rules import Rule
from tests.flax_models import ResNet, Transformer

W4 = Quantizer("int4", PerChannel(-1))
A8 = Quantizer("int8", PerToken(-1))
RESTE = Quantizer("binary", PerChannel(-1), "mean_abs", "reste")
NOTHING = [Rule("no-such-module", weight=W4)]


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(4, name="head")(x)


X = jax.random.normal(jax.random.key(1), (6, 8))


def mlp_reference(params, x, wq, aq, head_q=None):
    h = x
    for name in ("Dense_0", "Dense_1"):
        w = fake_quant(wq, params[name]["kernel"])
        h = nn.relu(fake_quant(aq, h) @ w + params[name]["bias"])
    w = params["head"]["kernel"] if head_q is None else fake_quant(head_q, params["head"]["kernel"])
    return h @ w + params["head"]["bias"]


@pytest.mark.parametrize("model,args,kwargs", [
    (MLP(), (X,), {}),
    (ResNet(), (jnp.ones((2, 8, 8, 3)),), {"train": False}),
    (Transformer(), (jnp.arange(12).reshape(2, 6) % 64,), {}),
], ids=["mlp", "resnet", "transformer"])
def test_float_path_is_bit_identical(model, args, kwargs):
    variables = model.init(jax.random.key(0), *args, **kwargs)
    qmodel = ql.quantize_model(model, NOTHING, warn_unused=False)
    np.testing.assert_array_equal(qmodel.apply(variables, *args, **kwargs),
                                  model.apply(variables, *args, **kwargs))


def test_unused_rule_warns_and_dry_run_table():
    qmodel = ql.quantize_model(MLP(), [Rule(r"Dense_\d", weight=W4), Rule("nope", weight=W4, name="nope")])
    with pytest.warns(UserWarning, match="nope"):
        variables = qmodel.init(jax.random.key(0), X)
    table = qmodel.table(variables, X)
    assert table["Dense_0"].rule.path == r"Dense_\d" and table["head"].rule is None
    text = qmodel.dry_run(variables, X)
    assert "Dense_1" in text and "head" in text


def test_qat_matches_manual_fake_quant():
    qmodel = ql.quantize_model(MLP(), [Rule(r"Dense_\d", weight=W4, input=A8)])
    variables = qmodel.init(jax.random.key(0), X)
    y = jax.jit(qmodel.apply)(variables, X)
    np.testing.assert_allclose(y, mlp_reference(variables["params"], X, W4, A8), rtol=1e-6, atol=1e-6)
    assert not np.allclose(y, MLP().apply(variables, X), atol=1e-4)


def test_gradients_reach_params_and_learned_scales():
    rules = [Rule(r"Dense_\d", weight=Quantizer("int4", PerChannel(-1), "learned"),
                  input=Quantizer("int8", scale="learned")),
             Rule("head", weight=Quantizer("binary", PerChannel(-1), "learned", "biper"))]
    qmodel = ql.quantize_model(MLP(), rules)
    variables = qmodel.init(jax.random.key(0), X)
    quant = variables["quant"]
    assert set(quant) == {"Dense_0", "Dense_1", "head"}
    assert quant["Dense_0"]["kernel"].shape == (1, 32) and quant["Dense_0"][ql.INPUT_KEY].shape == (1, 1)
    grads = jax.grad(lambda v: jnp.sum(qmodel.apply(v, X, hparams={"omega": 20.0}) ** 2))(variables)
    for leaf in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)


def test_schedule_does_not_recompile_and_changes_gradients():
    qmodel = ql.quantize_model(MLP(), [Rule(".*", weight=RESTE)])
    variables = qmodel.init(jax.random.key(0), X)
    opt = optax.sgd(0.1)
    traces = []

    @jax.jit
    def step(params, opt_state, o, enabled):
        traces.append(1)
        loss = lambda p: jnp.mean(qmodel.apply({"params": p}, X, hparams={"o": o, "enabled": enabled}) ** 2)
        grads = jax.grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, grads

    params, state = variables["params"], opt.init(variables["params"])
    grads = []
    for epoch in range(5):
        o = 1.0 + 2.0 * epoch / 4
        params, state, g = step(params, state, jnp.float32(o), jnp.float32(epoch > 0))
        grads.append(g)
    assert len(traces) == 1


def test_enabled_zero_is_the_float_model():
    qmodel = ql.quantize_model(MLP(), [Rule(".*", weight=RESTE, input=A8)])
    variables = qmodel.init(jax.random.key(0), X)
    off = qmodel.apply(variables, X, hparams={"enabled": 0.0})
    np.testing.assert_array_equal(off, MLP().apply(variables, X))
    on = qmodel.apply(variables, X, hparams={"enabled": 1.0})  # the fake-quant float path
    assert qmodel.paths(variables, X, hparams={"enabled": 1.0})["Dense_0"] == ql.FAKE_QUANT
    assert qmodel.paths(variables, X)["Dense_0"] in ql.FUSED_PATHS
    int8 = ql.quantize_model(MLP(), [Rule(".*", weight=RESTE, input=A8)], product="int8")
    assert int8.paths(variables, X)["Dense_0"] == ql.INT8
    np.testing.assert_allclose(on, int8.apply(variables, X), rtol=1e-5, atol=1e-6)
    fused = ql.quantize_model(MLP(), [Rule(".*", weight=RESTE, input=A8)], product="float")
    assert fused.paths(variables, X)["Dense_0"] == ql.FUSED_FLOAT
    np.testing.assert_allclose(on, qmodel.apply(variables, X), rtol=1e-5, atol=1e-6)


def test_biper_two_stages():
    q = Quantizer("binary", PerChannel(-1), "learned", "biper")
    qmodel = ql.quantize_model(MLP(), [Rule("head", weight=q)])
    variables = qmodel.init(jax.random.key(0), X)
    params, alpha = variables["params"], variables["quant"]["head"]["kernel"]
    h = MLP().apply(variables, X, capture_intermediates=True, mutable=["intermediates"])[1]
    feats = h["intermediates"]["Dense_1"]["__call__"][0]
    feats = nn.relu(feats)
    w = params["head"]["kernel"]
    stage1 = qmodel.apply(variables, X, hparams={"biper_binarize": 0.0, "omega": 20.0})
    np.testing.assert_allclose(stage1, feats @ (alpha * jnp.sin(20 * w)) + params["head"]["bias"],
                               rtol=1e-5, atol=1e-6)
    stage2 = qmodel.apply(variables, X, hparams={"biper_binarize": 1.0, "omega": 20.0})
    np.testing.assert_allclose(stage2, feats @ fake_quant(q, w, scale=alpha) + params["head"]["bias"],
                               rtol=1e-5, atol=1e-6)


def test_unknown_hparam_is_refused():
    qmodel = ql.quantize_model(MLP(), [Rule(".*", weight=RESTE)])
    variables = qmodel.init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"unknown QAT hyperparameter\(s\) \['temperature'\]; allowed"):
        qmodel.apply(variables, X, hparams={"temperature": 1.0})


def test_attention_activations_are_quantized_and_patch_is_undone():
    tokens = jnp.arange(12).reshape(2, 6) % 64
    model = Transformer()
    weights_only = [Rule(r"block_\d/.*", types=("Dense", "DenseGeneral"), weight=W4)]
    with_acts = [Rule(r"block_\d/attention", types=("MultiHeadDotProductAttention",),
                      activations=Quantizer("int4", PerToken(-1))), *weights_only]
    q1, q2 = ql.quantize_model(model, weights_only), ql.quantize_model(model, with_acts)
    variables = model.init(jax.random.key(0), tokens)
    einsum, dot_general = jnp.einsum, jax.lax.dot_general
    y1, y2 = q1.apply(variables, tokens), q2.apply(variables, tokens)
    assert jnp.einsum is einsum and jax.lax.dot_general is dot_general
    assert float(jnp.max(jnp.abs(y1 - y2))) > 1e-3
    table = q2.table(variables, tokens)
    assert table["block_0/attention"].rule.activations is not None
    assert table["block_0/attention/query"].rule is with_acts[1]


def test_resnet_qat_with_batch_stats_trains():
    model = ResNet()
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
    qmodel = ql.quantize_model(model, [Rule(".*", types=("Conv",), weight=Quantizer("ternary", PerChannel(-1),
                                                                                     "mean_abs"))])
    variables = qmodel.init(jax.random.key(0), x, train=False)
    out, updates = qmodel.apply(variables, x, train=True, mutable=["batch_stats"])
    assert out.shape == (4, 10) and "batch_stats" in updates
    grads = jax.grad(lambda p: jnp.sum(qmodel.apply({**variables, "params": p}, x, train=True,
                                                    mutable=["batch_stats"])[0]))(variables["params"])
    assert np.all(np.isfinite(grads["stem"]["kernel"])) and np.any(grads["stem"]["kernel"] != 0)


# --- freeze ----------------------------------------------------------------------------------------

FREEZE_RULES = {
    "int4-channel": [Rule(r"Dense_\d", weight=W4, input=A8)],
    "int4-group": [Rule(r"Dense_\d", weight=Quantizer("int4", PerGroup(0, 4)))],
    "uint4-minmax": [Rule(r"Dense_\d", weight=Quantizer("uint4", PerChannel(-1), "minmax"))],
    "ternary": [Rule(".*", weight=Quantizer("ternary", PerChannel(-1), "mean_abs"))],
    "binary-learned": [Rule(".*", weight=Quantizer("binary", PerChannel(-1), "learned", "biper"))],
    "nf4-dequantized": [Rule(".*", weight=Quantizer("nf4", PerChannel(-1)))],
    "lsq-weights-and-inputs": [Rule(r"Dense_\d", weight=Quantizer("int4", PerChannel(-1), "learned"),
                                    input=Quantizer("int8", scale="learned"))],
}


@pytest.mark.parametrize("name", FREEZE_RULES)
def test_freeze_gives_qat_codes_and_outputs(name, monkeypatch):
    qmodel = ql.quantize_model(MLP(), FREEZE_RULES[name])
    variables = qmodel.init(jax.random.key(0), X)
    # negative learned steps (an optimizer can push them through zero) are used by their magnitude
    variables = jax.tree_util.tree_map(lambda v: -v, variables) | {"params": variables["params"]} \
        if "quant" in variables else variables
    frozen = ql.freeze(qmodel, variables, X)
    # learned weight steps are folded into the QArrays; learned input steps stay (the inputs still need them)
    input_steps = {k: {ql.INPUT_KEY: v[ql.INPUT_KEY]} for k, v in variables.get("quant", {}).items()
                   if ql.INPUT_KEY in v}
    assert frozen.get("quant", {}) == input_steps
    table = qmodel.table(variables, X)
    for entry in table.values():
        if entry.weights:
            qa = frozen["params"][entry.name]["kernel"]
            assert isinstance(qa, QArray) and qa.codes.dtype == jnp.uint32
            scale = variables.get("quant", {}).get(entry.name, {}).get("kernel")
            ref = quantize(entry.rule.weight, variables["params"][entry.name]["kernel"], scale=scale)
            np.testing.assert_array_equal(qa.unpack().codes.view(jnp.uint8), ref.codes.view(jnp.uint8))
            np.testing.assert_array_equal(qa.scale, ref.scale)
    import kernels_pallas

    calls = []
    original = kernels_pallas.packed_matmul
    monkeypatch.setattr(kernels_pallas, "packed_matmul", lambda *a, **k: calls.append(1) or original(*a, **k))
    integer = kernels_pallas.packed_int_matmul  # layers with integer inputs: the packed integer matmul
    monkeypatch.setattr(kernels_pallas, "packed_int_matmul",
                        lambda *a, **k: calls.append(1) or integer(*a, **k))
    y_qat = qmodel.apply(variables, X)
    y_frozen = jax.jit(qmodel.apply)(frozen, X)
    np.testing.assert_allclose(y_frozen, y_qat, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(y_qat))))
    np.testing.assert_array_equal(jnp.argmax(y_frozen, -1), jnp.argmax(y_qat, -1))
    assert bool(calls) == (name != "nf4-dequantized")  # integer formats run on the packed matmul


def test_freeze_transformer_and_resnet():
    tokens = jnp.arange(12).reshape(2, 6) % 64
    rules = [Rule(r"block_\d/.*", types=("Dense", "DenseGeneral"), weight=W4, input=A8)]
    qmodel = ql.quantize_model(Transformer(), rules)
    variables = qmodel.init(jax.random.key(0), tokens)
    frozen = ql.freeze(qmodel, variables, tokens)
    assert isinstance(frozen["params"]["block_0"]["attention"]["out"]["kernel"], QArray)
    np.testing.assert_allclose(qmodel.apply(frozen, tokens), qmodel.apply(variables, tokens), rtol=1e-5,
                               atol=1e-5)
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    qmodel = ql.quantize_model(ResNet(), [Rule(".*", types=("Conv", "Dense"), weight=W4)])
    variables = qmodel.init(jax.random.key(0), x)
    frozen = ql.freeze(qmodel, variables, x)
    np.testing.assert_allclose(qmodel.apply(frozen, x), qmodel.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_execution_paths_for_attention_projections():
    tokens = jnp.arange(12).reshape(2, 6) % 64
    rules = [Rule(r".*/attention/out", weight=W4, input=Quantizer("int8", PerToken((-2, -1)))),
             Rule(r"block_\d/.*", types=("Dense", "DenseGeneral"), weight=W4, input=A8)]
    qmodel = ql.quantize_model(Transformer(), rules)
    variables = qmodel.init(jax.random.key(0), tokens)
    paths = qmodel.paths(variables, tokens)
    assert {paths["block_0/attention/query"], paths["block_0/attention/out"]} <= set(ql.FUSED_PATHS)
    assert qmodel.paths(variables, tokens, hparams={"enabled": 1.0})["block_0/attention/out"] == ql.FAKE_QUANT
    fast = qmodel.apply(variables, tokens)
    slow = qmodel.apply(variables, tokens, hparams={"enabled": 1.0})
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-4)
    frozen = ql.freeze(qmodel, variables, tokens)
    frozen_paths = ql.quantize_model(Transformer(), rules).paths(frozen, tokens)
    assert frozen_paths["block_0/attention/out"] == ql.DEQUANTIZED
    assert frozen_paths["block_0/attention/query"] == "packed integer matmul"  # qjax.core.PACKED_INT


def test_frozen_conv_bytes_follow_the_bit_width():
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    sizes = {}
    for fmt in ("int8", "int4", "binary"):
        rules = [Rule(".*", types=("Conv",), weight=Quantizer(fmt, PerChannel(-1)))]
        qmodel = ql.quantize_model(ResNet(), rules)
        variables = qmodel.init(jax.random.key(0), x)
        frozen = ql.freeze(qmodel, variables, x)
        kernel = frozen["params"]["ResNetBlock_1"]["Conv_1"]["kernel"]  # (3, 3, 16, 16)
        assert kernel.packing[0] != -4  # not along the 3 kernel rows
        sizes[fmt] = kernel.codes.nbytes
        np.testing.assert_allclose(qmodel.apply(frozen, x), qmodel.apply(variables, x), rtol=1e-5, atol=1e-5)
    # binary: 16 codes per axis fill half a 32-bit word, whichever channel axis is chosen
    assert sizes == {"int8": 3 * 3 * 16 * 16, "int4": 3 * 3 * 16 * 16 // 2, "binary": 3 * 3 * 16 * 4}
