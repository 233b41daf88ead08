"""Orbax: an 8-bit optimizer state saves and restores bit for bit, and resuming gives the identical next
100 steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import qjax
import qjax.optim as qo

STEPS = 100


def _setup():
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (128, 64))
    y = jnp.tanh(x @ jax.random.normal(kw, (64, 96)))
    params = {"w": jnp.zeros((64, 96)), "b": jnp.zeros((96,))}
    loss = lambda p, i: jnp.mean((jnp.tanh(x[i] @ p["w"] + p["b"]) - y[i]) ** 2)
    opt = qo.adamw8bit(3e-3, weight_decay=1e-2, block_size=128)

    @jax.jit
    def run(params, state, start):
        def body(carry, t):
            params, state = carry
            batch = jax.random.randint(jax.random.fold_in(jax.random.key(1), t), (32,), 0, 128)
            grads = jax.grad(loss)(params, batch)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss(params, batch)

        return jax.lax.scan(body, (params, state), start + jnp.arange(STEPS))

    return params, opt, run


def _assert_identical(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_save_restore_bit_for_bit_and_identical_next_100_steps(tmp_path):
    params, opt, run = _setup()
    (params, state), _ = run(params, opt.init(params), 0)
    assert isinstance(state[0].mu["w"], qjax.QArray)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "step100", {"params": params, "opt_state": state})
    checkpointer.wait_until_finished()

    (want_params, want_state), want_losses = run(params, state, STEPS)

    abstract = jax.eval_shape(lambda: {"params": params, "opt_state": state})
    restored = checkpointer.restore(tmp_path / "step100", abstract)
    _assert_identical(restored, {"params": params, "opt_state": state})
    assert isinstance(restored["opt_state"][0].nu["w"], qjax.QArray)
    assert restored["opt_state"][0].nu["w"].format == "dynamic_unsigned"

    (got_params, got_state), got_losses = run(restored["params"], restored["opt_state"], STEPS)
    _assert_identical((got_params, got_state), (want_params, want_state))
    np.testing.assert_array_equal(got_losses, want_losses)
    assert want_losses[-1] < want_losses[0]
