"""StableEmbedding (Linen) and StableEmbeddingNNX: Xavier table, LayerNorm after the lookup, 32-bit state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qjax.optim as qo

N, D = 300, 64
IDS = jnp.array([[0, 5, 299], [7, 7, 1]])


def test_linen_lookup_is_layer_normalized_with_xavier_table():
    module = qo.StableEmbedding(N, D)
    variables = module.init(jax.random.key(0), IDS)
    table = variables["params"]["stable_embedding"]
    assert table.shape == (N, D) and set(variables["params"]["norm"]) == {"scale", "bias"}
    bound = np.sqrt(6 / (N + D))
    assert float(jnp.abs(table).max()) <= bound and float(jnp.abs(table).max()) > 0.9 * bound
    y = module.apply(variables, IDS)
    assert y.shape == (2, 3, D)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(-1), 1, atol=5e-3)  # var / (var + eps), var ~ 0.005
    rows = (table[IDS] - table[IDS].mean(-1, keepdims=True)) / jnp.sqrt(
        table[IDS].var(-1, keepdims=True) + 1e-5
    )
    np.testing.assert_allclose(y, rows, atol=1e-5)
    logits = module.apply(variables, y, method=module.attend)
    np.testing.assert_allclose(logits, y @ table.T, rtol=1e-5, atol=1e-5)


def test_nnx_matches_linen_given_the_same_table():
    nnx_module = qo.StableEmbeddingNNX(N, D, rngs=nnx.Rngs(0))
    linen = qo.StableEmbedding(N, D)
    variables = {
        "params": {
            "stable_embedding": nnx_module.stable_embedding[...],
            "norm": {"scale": jnp.ones(D), "bias": jnp.zeros(D)},
        }
    }
    np.testing.assert_allclose(nnx_module(IDS), linen.apply(variables, IDS), atol=1e-6)
    np.testing.assert_allclose(
        nnx_module.attend(jnp.ones((1, D))), jnp.ones((1, D)) @ nnx_module.stable_embedding[...].T, rtol=1e-5
    )


def test_embedding_state_stays_32bit_while_other_layers_are_8bit_linen_and_nnx():
    model = nnx.Sequential(qo.StableEmbeddingNNX(N, D, rngs=nnx.Rngs(0)), nnx.Linear(D, D, rngs=nnx.Rngs(1)))
    optimizer = nnx.Optimizer(model, qo.adam8bit(1e-3), wrt=nnx.Param)
    formats = qo.state_formats(optimizer.opt_state)
    assert {k: v for k, v in formats.items() if "stable_embedding" in k} == {
        "0/mu/layers/0/stable_embedding/value": "float32",
        "0/nu/layers/0/stable_embedding/value": "float32",
    }
    assert formats["0/mu/layers/1/kernel/value"] == "dynamic"
    loss = lambda m: jnp.mean(m(IDS) ** 2)
    optimizer.update(model, nnx.grad(loss)(model))  # one 8-bit training step runs

    variables = qo.StableEmbedding(N, D).init(jax.random.key(0), IDS)
    variables = {"params": {**variables["params"], "dense": jnp.zeros((D, D * 2))}}
    formats = qo.state_formats(qo.adam8bit(1e-3).init(variables))
    assert formats["0/mu/params/stable_embedding"] == "float32" and formats["0/mu/params/dense"] == "dynamic"
    assert qo.state_formats(optax.adam(1e-3).init(variables))["0/mu/params/stable_embedding"] == "float32"


@pytest.mark.parametrize(("n", "d"), [(0, 8), (8, -1), (2.5, 8)])
def test_bad_sizes_raise(n, d):
    with pytest.raises(ValueError, match="positive integer"):
        qo.StableEmbeddingNNX(n, d, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="positive integer"):
        qo.StableEmbedding(n, d).init(jax.random.key(0), IDS)


def test_float_ids_raise():
    with pytest.raises(TypeError, match="ids must be integers"):
        qo.StableEmbeddingNNX(N, D, rngs=nnx.Rngs(0))(jnp.ones((2,)))
