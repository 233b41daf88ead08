"""A Flax model written elsewhere: transformers' FlaxBertModel (small random config), quantized by rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import PerChannel, PerGroup, PerToken, QArray, Quantizer
from qjax import linen as ql
from qjax.rules import Rule

transformers = pytest.importorskip("transformers", reason="transformers<5 is in the test extras")


@pytest.fixture(scope="module")
def bert():
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=32)
    model = transformers.FlaxBertModel(config, seed=0)
    ids = jax.random.randint(jax.random.key(0), (2, 10), 0, 128)
    inputs = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "token_type_ids": jnp.zeros_like(ids),
              "position_ids": jnp.broadcast_to(jnp.arange(10), ids.shape), "head_mask": None}
    return model.module, {"params": model.params}, inputs


def run(qmodel, variables, inputs):
    return qmodel.apply(variables, **inputs, deterministic=True).last_hidden_state


def test_float_path_bit_identical(bert):
    module, variables, inputs = bert
    qmodel = ql.quantize_model(module, [Rule("nothing", weight=Quantizer("int4"))], warn_unused=False)
    np.testing.assert_array_equal(run(qmodel, variables, inputs),
                                  module.apply(variables, **inputs, deterministic=True).last_hidden_state)


def test_every_linear_layer_quantized_and_frozen(bert):
    module, variables, inputs = bert
    rules = [Rule(r"encoder/layer/\d+/attention/self", types=("FlaxBertSelfAttention",),
                  activations=Quantizer("int8", PerToken(-1))),
             Rule(r"encoder/layer/\d+/.*", types=("Dense",), weight=Quantizer("int4", PerGroup(0, 16)),
                  input=Quantizer("int8", PerToken(-1)))]
    qmodel = ql.quantize_model(module, rules)
    table = qmodel.table(variables, **inputs, deterministic=True)
    dense = [e for e in table.values() if e.rule is rules[1]]
    assert len(dense) == 2 * 6  # query, key, value, attention output, intermediate, output per layer
    assert table["encoder/layer/0/attention/self"].rule is rules[0]
    y = run(qmodel, variables, inputs)
    y_float = module.apply(variables, **inputs, deterministic=True).last_hidden_state
    cos = jnp.sum(y * y_float, -1) / (jnp.linalg.norm(y, axis=-1) * jnp.linalg.norm(y_float, axis=-1))
    assert 0.9 < float(cos.mean()) < 1.0
    frozen = ql.freeze(qmodel, variables, **inputs, deterministic=True)
    assert isinstance(frozen["params"]["encoder"]["layer"]["1"]["output"]["dense"]["kernel"], QArray)
    np.testing.assert_allclose(run(qmodel, frozen, inputs), y, rtol=1e-5, atol=1e-5)


def test_binary_qat_gradients(bert):
    module, variables, inputs = bert
    binary = Quantizer("binary", PerChannel(-1), "mean_abs", "reste")
    rules = [Rule(r"encoder/.*", types=("Dense",), weight=binary)]
    qmodel = ql.quantize_model(module, rules)
    grads = jax.grad(lambda v: jnp.sum(run(qmodel, v, inputs) ** 2))(variables)
    g = grads["params"]["encoder"]["layer"]["0"]["intermediate"]["dense"]["kernel"]
    assert np.all(np.isfinite(g)) and np.any(g != 0)
