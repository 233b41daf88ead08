"""adam8bit, adamw8bit, lion8bit, momentum8bit: optax's hyperparameters, their state maps, and training
that tracks the 32-bit optimizer."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qjax.optim as qo

READY = {  # ours, optax's, kwargs used in the runs, {field: expected map}
    "adam8bit": (qo.adam8bit, optax.adam, {}, {"mu": "dynamic", "nu": "dynamic_unsigned"}),
    "adamw8bit": (
        qo.adamw8bit,
        optax.adamw,
        {"weight_decay": 0.1},
        {"mu": "dynamic", "nu": "dynamic_unsigned"},
    ),
    "lion8bit": (qo.lion8bit, optax.lion, {}, {"mu": "dynamic"}),
    "momentum8bit": (qo.momentum8bit, optax.sgd, {"momentum": 0.9}, {"trace": "dynamic"}),
}
LR = {"adam8bit": 1e-2, "adamw8bit": 1e-2, "lion8bit": 6e-3, "momentum8bit": 0.15}
# Lion steps by sign(m): an 8-bit m near 0 can flip a sign, so its weights drift further apart.
WEIGHT_TOL = {"adam8bit": 0.03, "adamw8bit": 0.03, "lion8bit": 0.1, "momentum8bit": 0.05}


def _problem():
    """Least squares with a (64, 128) weight: big enough (8192 elements) for 8-bit state."""
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (256, 64))
    y = x @ (0.1 * jax.random.normal(kw, (64, 128)))
    params = {"w": jnp.zeros((64, 128)), "b": jnp.zeros((128,))}
    loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
    return params, loss


def _train(opt, steps=60):
    params, loss = _problem()

    def body(carry, _):
        params, state = carry
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), value

    (params, state), losses = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))(
        (params, opt.init(params))
    )
    return params, state, np.asarray(losses)


@pytest.mark.parametrize("name", READY)
def test_same_hyperparameters_and_defaults_as_optax(name):
    ours, theirs, _, _ = READY[name]
    mine = inspect.signature(ours).parameters
    for pname, param in inspect.signature(theirs).parameters.items():
        assert pname in mine, f"{name} lacks optax's {pname}"
        if name == "momentum8bit" and pname == "momentum":
            assert mine[pname].default == 0.9  # sgd's None would mean no state to quantize
        else:
            assert mine[pname].default == param.default, pname
    extra = set(mine) - set(inspect.signature(theirs).parameters)
    assert extra == {"block_size", "min_size", "overrides", "skip_nonfinite"}


@pytest.mark.parametrize("name", READY)
def test_ready_optimizer_state_maps_and_tracking_of_32bit(name):
    ours, theirs, kwargs, maps = READY[name]
    p8, state, losses8 = _train(ours(LR[name], **kwargs))
    p32, _, losses32 = _train(theirs(LR[name], **kwargs))
    formats = qo.state_formats(state)
    for field, fmt in maps.items():
        assert formats[f"0/{field}/w"] == fmt, formats
        assert formats[f"0/{field}/b"] == "float32"  # 128 < min_size
    assert losses8[-1] < 0.2 * losses8[0], "did not train"
    assert abs(losses8[-1] - losses32[-1]) <= 0.1 * losses32[-1] + 1e-4
    rel = np.linalg.norm(p8["w"] - p32["w"]) / np.linalg.norm(p32["w"])
    assert rel < WEIGHT_TOL[name], f"8-bit weights {rel:.3f} away from 32-bit ones"


@pytest.mark.parametrize("name", READY)
def test_ready_optimizer_equals_quantize_state_of_optax(name):
    ours, theirs, kwargs, _ = READY[name]
    a, _, _ = _train(ours(LR[name], block_size=128, **kwargs), steps=5)
    b, _, _ = _train(qo.quantize_state(theirs(LR[name], **kwargs), block_size=128), steps=5)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_adam8bit_state_is_at_most_026x_of_32bit_adam():
    params = {"w": jnp.zeros((512, 1024)), "b": jnp.zeros((1024,))}
    ratio = qo.state_nbytes(qo.adam8bit(1e-3).init(params)) / qo.state_nbytes(optax.adam(1e-3).init(params))
    assert ratio <= 0.26, ratio


def test_inject_hyperparams_schedules_the_learning_rate():
    params, loss = _problem()
    opt = optax.inject_hyperparams(qo.adam8bit)(learning_rate=optax.linear_schedule(1e-2, 0.0, 4))
    state = opt.init(params)
    step = jax.jit(opt.update)
    seen = []
    for _ in range(5):
        updates, state = step(jax.grad(loss)(params), state, params)
        seen.append(float(state.hyperparams["learning_rate"]))  # the rate this update used
    np.testing.assert_allclose(seen, [1e-2, 7.5e-3, 5e-3, 2.5e-3, 0.0], atol=1e-9)
    assert np.all(np.asarray(updates["w"]) == 0)  # learning rate 0 at the last step
    assert qo.state_formats(state)["inner_state/0/mu/w"] == "dynamic"


def test_inject_hyperparams_with_explicit_sizes_needs_static_args():
    params, _ = _problem()
    with pytest.raises(ValueError, match="static_args"):
        optax.inject_hyperparams(qo.adam8bit)(learning_rate=1e-3, block_size=512).init(params)
    opt = optax.inject_hyperparams(qo.adam8bit, static_args=("block_size", "min_size"))(
        learning_rate=1e-3, block_size=512
    )
    assert opt.init(params).inner_state[0].mu["w"].scale.shape == (16, 1)


def test_momentum8bit_refuses_no_momentum():
    with pytest.raises(ValueError, match="momentum=None"):
        qo.momentum8bit(1e-2, momentum=None)


@pytest.mark.parametrize("name", READY)
def test_ready_optimizers_pass_bad_sizes_on_as_value_errors(name):
    ours, _, _, _ = READY[name]
    with pytest.raises(ValueError, match="block_size=0"):
        ours(1e-3, block_size=0)
