"""quantize_state composes with optax: chain, MultiSteps, inject_hyperparams schedules, masked, vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import qjax.optim as qo


def _params():
    return {"w": jax.random.normal(jax.random.key(0), (64, 128)) * 0.1, "b": jnp.zeros((128,))}


def _grads(seed):
    p = _params()
    keys = jax.random.split(jax.random.key(seed), 2)
    return {
        "w": jax.random.normal(keys[0], p["w"].shape) * 0.01,
        "b": jax.random.normal(keys[1], (128,)) * 0.01,
    }


def _run(opt, steps):
    params, state = _params(), None
    state = opt.init(params)
    step = jax.jit(opt.update)
    history = []
    for i in range(steps):
        updates, state = step(_grads(i), state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history, state


def _close(a, b, rtol):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < rtol


def test_chain_with_clipping_and_a_schedule():
    sched = optax.cosine_decay_schedule(1e-2, 10)
    ours, state = _run(optax.chain(optax.clip_by_global_norm(0.5), qo.adam8bit(sched)), 10)
    ref, _ = _run(optax.chain(optax.clip_by_global_norm(0.5), optax.adam(sched)), 10)
    assert qo.state_formats(state)["1/0/mu/w"] == "dynamic"
    assert _close(ours[-1]["w"] - _params()["w"], ref[-1]["w"] - _params()["w"], 0.05)


def test_multisteps_applies_every_k_steps():
    history, state = _run(optax.MultiSteps(qo.adam8bit(1e-2), every_k_schedule=3), 6)
    ref, _ = _run(optax.MultiSteps(optax.adam(1e-2), every_k_schedule=3), 6)
    start = _params()["w"]
    moved = [bool(jnp.any(h["w"] != start)) for h in history]
    assert moved == [False, False, True, True, True, True]
    assert bool(jnp.all(history[3]["w"] == history[2]["w"])) and bool(
        jnp.all(history[4]["w"] == history[2]["w"])
    )
    assert qo.state_formats(state)["inner_opt_state/0/nu/w"] == "dynamic_unsigned"
    assert qo.state_formats(state)["acc_grads/w"] == "float32"  # MultiSteps' own buffer, outside the wrapper
    assert _close(history[-1]["w"] - start, ref[-1]["w"] - start, 0.05)


def test_wrapping_multisteps_quantizes_its_accumulator_too():
    _, state = _run(qo.quantize_state(optax.MultiSteps(optax.adam(1e-2), 2).gradient_transformation()), 4)
    assert qo.state_formats(state)["acc_grads/w"] == "dynamic"


def test_inject_hyperparams_inside_the_wrapper_keeps_hyperparams_editable():
    opt = qo.quantize_state(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2))
    params = _params()
    state = opt.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    updates, state = opt.update(_grads(0), state, params)
    assert np.all(np.asarray(updates["w"]) == 0)
    assert qo.state_formats(state)["inner_state/0/mu/w"] == "dynamic"


def test_masked_leaves_pass_through_and_hold_no_state():
    mask = {"w": True, "b": False}
    for opt in (
        optax.masked(qo.adam8bit(1e-2), mask),
        qo.quantize_state(optax.masked(optax.adam(1e-2), mask)),
    ):
        params = _params()
        state = opt.init(params)
        assert set(qo.state_formats(state)) == {
            "inner_state/0/count",
            "inner_state/0/mu/w",
            "inner_state/0/nu/w",
        }
        g = _grads(0)
        updates, _ = opt.update(g, state, params)
        np.testing.assert_array_equal(updates["b"], g["b"])  # masked out: the gradient unchanged
        assert not np.array_equal(updates["w"], g["w"])


def test_vmap_over_independent_runs():
    opt = qo.adam8bit(1e-2)
    params = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x]), _params())
    grads = jax.tree_util.tree_map(lambda x: jnp.stack([x, -x]), _grads(0))
    states = jax.vmap(opt.init)(params)
    updates, states = jax.vmap(opt.update)(grads, states, params)
    single, _ = opt.update(
        jax.tree_util.tree_map(lambda x: x[1], grads),
        opt.init(jax.tree_util.tree_map(lambda x: x[1], params)),
        jax.tree_util.tree_map(lambda x: x[1], params),
    )
    np.testing.assert_allclose(updates["w"][1], single["w"], rtol=1e-6)
    assert states[0].mu["w"].codes.shape == (2, 64, 128)
