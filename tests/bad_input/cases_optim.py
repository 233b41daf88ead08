"""Bad input and edges of qjax.optim: the 8-bit optimizers, quantize_state, encode_state, state_shardings and
the stable embedding. One small parameter tree (one leaf of two blocks of 256, one small leaf), built once."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qjax import dequantize
from qjax.optim import (
    StableEmbedding,
    StableEmbeddingNNX,
    adam8bit,
    encode_state,
    lion8bit,
    momentum8bit,
    quantize_state,
    state_shardings,
)
from tests.bad_input.table import Documented, Raises, Warns, case


@functools.cache
def _params():
    return {"w": jax.random.normal(jax.random.key(0), (4, 128)) * 0.1, "b": jnp.zeros((8,))}


def _grads(seed=1, **at):
    p = _params()
    g = {k: jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), v.shape) * 1e-2
         for i, (k, v) in enumerate(sorted(p.items()))}
    for (i, j), value in at.get("w", {}).items():
        g["w"] = g["w"].at[i, j].set(value)
    return g


def _opt(make=adam8bit, **kw):
    return make(1e-3, **{"min_size": 256, **kw})


def _step(opt, grads, steps=1, state=None):
    """``steps`` updates with ``grads`` after one clean step; returns (last updates, state)."""
    params = _params()
    state = opt.init(params) if state is None else state
    _, state = opt.update(_grads(0), state, params)
    for _ in range(steps):
        updates, state = opt.update(grads, state, params)
    return updates, state


def _finite_state(state):
    for x in jax.tree_util.tree_leaves(state, is_leaf=lambda x: hasattr(x, "codes")):
        values = dequantize(x) if hasattr(x, "codes") else x
        if jnp.issubdtype(jnp.result_type(values), jnp.floating):
            assert np.isfinite(np.asarray(values)).all()


def _overflow_like_32bit(result):
    """g = 1e20 at w[0, 3]: no NaN; that element's update is 0 (32-bit optax gives 0 too: m / sqrt(inf));
    the rest of its block within the 8-bit state's quantization error of 32-bit Adam."""
    (updates, state), ref = result
    got, want = np.asarray(updates["w"]), np.asarray(ref["w"])
    assert np.isfinite(got).all() and got[0, 3] == 0 and want[0, 3] == 0
    others = np.ones(got.shape, bool)
    others[0, 3] = False
    assert np.abs(got - want)[others].max() < 0.1 * np.abs(want).max()
    _finite_state(state)


def _overflow_vs_optax():
    g = _grads(2, w={(0, 3): 1e20})
    params = _params()
    ref_opt = optax.adam(1e-3)
    s = ref_opt.init(params)
    _, s = ref_opt.update(_grads(0), s, params)
    ref, _ = ref_opt.update(g, s, params)
    return _step(_opt(), g), ref


def _nan_leaves_param(result):
    updates, state = result
    u = np.asarray(updates["w"])
    assert u[1, 2] == 0 and np.isfinite(u).all() and np.count_nonzero(u) == u.size - 1
    _finite_state(state)


def _nan_passes(result):
    updates, _ = result
    assert np.isnan(np.asarray(updates["w"])[1, 2])


def _all_zero_updates(result):
    updates, state = result
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree_util.tree_leaves(updates))
    _finite_state(state)


def _zero_grads():
    return jax.tree_util.tree_map(jnp.zeros_like, _params())


@functools.cache
def _embedding():
    module = StableEmbedding(10, 4)
    return module, module.init(jax.random.key(0), jnp.zeros((2,), jnp.int32))


def _embed(ids):
    module, variables = _embedding()
    return module.apply(variables, ids)


CASES = [
    # sizes and other static arguments
    case("optim-block-size-zero", lambda: _opt(block_size=0),
         Raises(r"block_size=0 is not allowed; allowed: an integer >= 1")),
    case("optim-block-size-float", lambda: _opt(block_size=256.0),
         Raises(r"block_size=256.0 is not allowed; allowed: an integer >= 1")),
    case("optim-block-size-bool", lambda: quantize_state(optax.adam(1e-3), block_size=True),
         Raises(r"block_size=True is not allowed; allowed: an integer >= 1")),
    case("optim-block-size-array", lambda: _opt(block_size=jnp.asarray(256)),
         Raises(r"block_size=.* is an array; it must be a Python int.*static_args")),
    case("optim-min-size-negative", lambda: _opt(min_size=-1),
         Raises(r"min_size=-1 is not allowed; allowed: an integer >= 0")),
    case("optim-min-size-none", lambda: quantize_state(optax.adam(1e-3), min_size=None),
         Raises(r"min_size=None is not allowed; allowed: an integer >= 0")),
    case("optim-inner-not-a-transformation", lambda: quantize_state(lambda g: g),
         Raises(r"expects an optax GradientTransformation, got function", exc=TypeError)),
    case("optim-override-unknown-format", lambda: _opt(overrides={"w": "int8"}),
         Raises(r"override format 'int8' for 'w' is unknown; allowed: dynamic, dynamic_unsigned, float32")),
    case("optim-override-bad-regex", lambda: _opt(overrides={"w(": "float32"}),
         Raises(r"override path regex 'w\(' is invalid")),
    case("optim-override-not-a-pair", lambda: _opt(overrides=[("w",)]),
         Raises(r"override \('w',\) is not a \(path regex, format\) pair")),
    case("optim-override-matches-nothing", lambda: _opt(overrides={"nothing": "float32"}).init(_params()),
         Warns(r"override 'nothing' matched no state leaf; the state's paths are",
               lambda state: _finite_state(state))),
    case("optim-second-moment-fields-str",
         lambda: quantize_state(optax.adam(1e-3), second_moment_fields="nu"),
         Raises(r"second_moment_fields='nu' must be a sequence of field names")),
    case("optim-momentum-none", lambda: momentum8bit(1e-2, momentum=None),
         Raises(r"momentum=None has no state to quantize; allowed: a float")),
    # hyperparameters of the ready optimizers
    case("optim-learning-rate-nan", lambda: adam8bit(float("nan")),
         Raises(r"adam8bit: learning_rate=nan is not allowed; allowed: a finite number >= 0 or a schedule")),
    case("optim-learning-rate-negative", lambda: lion8bit(-1e-4),
         Raises(r"lion8bit: learning_rate=-0.0001 is not allowed; allowed: a finite number >= 0")),
    case("optim-learning-rate-string", lambda: adam8bit("1e-3"),
         Raises(r"adam8bit: learning_rate='1e-3' is not allowed; allowed: a finite number", exc=TypeError)),
    case("optim-b2-one", lambda: adam8bit(1e-3, b2=1.0),
         Raises(r"adam8bit: b2=1.0 is not allowed; allowed: a number in \[0, 1\)")),
    case("optim-b1-negative", lambda: lion8bit(1e-4, b1=-0.1),
         Raises(r"lion8bit: b1=-0.1 is not allowed; allowed: a number in \[0, 1\)")),
    case("optim-eps-negative", lambda: adam8bit(1e-3, eps=-1e-8),
         Raises(r"adam8bit: eps=-1e-08 is not allowed; allowed: a finite number >= 0")),
    case("optim-learning-rate-schedule-is-fine", lambda: _step(adam8bit(optax.constant_schedule(1e-3)),
                                                               _grads()),
         Documented(lambda r: _finite_state(r[1]), doc="a schedule (a callable) is a learning rate")),
    # parameters and states that do not belong
    case("optim-integer-params", lambda: _opt().init({"w": jnp.ones((4, 128), jnp.int32)}),
         Raises(r"params leaf behind state '0/mu/w' has dtype int32; allowed: floating", exc=TypeError)),
    case("optim-state-of-32bit-adam", lambda: _opt().update(_grads(), optax.adam(1e-3).init(_params()),
                                                           _params()),
         Raises(r"state was not made by this optimizer's init.*w.*allowed: the state .*init\(params\)")),
    case("optim-state-of-lion8bit",
         lambda: _opt().update(_grads(), _opt(lion8bit).init(_params()), _params()),
         Raises(r"state was not made by this optimizer's init.*allowed: the state .*init\(params\)")),
    case("optim-state-for-other-params",
         lambda: _opt().update(_grads(), _opt().init({"w": jnp.zeros((8, 128)), "b": jnp.zeros(8)}),
                               _params()),
         Raises(r"state was not made by this optimizer's init.*allowed: the state .*init\(params\)")),
    case("optim-encode-state-unknown-format", lambda: encode_state(jnp.ones(512), "int8", 256),
         Raises(r"encode_state: format 'int8' is not allowed; allowed: dynamic, dynamic_unsigned")),
    case("optim-encode-state-block-size-zero", lambda: encode_state(jnp.ones(512), "dynamic", 0),
         Raises(r"block_size=0 is not allowed; allowed: an integer >= 1")),
    case("optim-state-shardings-unsharded-params", lambda: state_shardings(_opt().init(_params()), {}),
         Raises(r"params must be a non-empty tree of arrays.*carry a sharding")),
    # gradients at the edges (issue 12, point 2)
    case("optim-finite-gradient-whose-square-overflows", _overflow_vs_optax,
         Documented(_overflow_like_32bit, doc="quantize_state module docstring: |g| > sqrt(float32 max) "
                                              "is skipped (32-bit Adam's update of it is 0 too)")),
    case("optim-overflow-gradient-under-jit",
         lambda: jax.jit(_opt().update)(_grads(2, w={(0, 3): 1e20}), _step(_opt(), _grads())[1], _params()),
         Documented(lambda r: (_finite_state(r[1]), np.testing.assert_array_equal(r[0]["w"][0, 3], 0)),
                    doc="the same rule under jit (elementwise jnp.where, no concrete check)")),
    case("optim-nan-gradient", lambda: _step(_opt(), _grads(2, w={(1, 2): jnp.nan})),
         Documented(_nan_leaves_param, doc="quantize_state module docstring: a NaN gradient element leaves "
                                           "its parameter and state unchanged")),
    case("optim-inf-gradient-lion", lambda: _step(_opt(lion8bit), _grads(2, w={(1, 2): -jnp.inf})),
         Documented(_nan_leaves_param, doc="quantize_state module docstring (any optimizer)")),
    case("optim-nan-gradient-skip-nonfinite-false",
         lambda: _step(_opt(skip_nonfinite=False), _grads(2, w={(1, 2): jnp.nan})),
         Documented(_nan_passes, doc="quantize_state: skip_nonfinite=False lets NaN through (documented)")),
    case("optim-all-nan-gradients", lambda: _step(_opt(), jax.tree_util.tree_map(
        lambda x: jnp.full_like(x, jnp.nan), _params())),
         Documented(_all_zero_updates, doc="quantize_state: a block all of whose gradients are skipped "
                                           "keeps its codes and absmax; updates 0")),
    case("optim-zero-gradients", lambda: _step(_opt(), _zero_grads(), steps=3),
         Documented(lambda r: (_finite_state(r[1]), [np.testing.assert_array_equal(np.isfinite(u), True)
                                                     for u in jax.tree_util.tree_leaves(r[0])]),
                    doc="all-zero gradients: finite states (absmax floor TINY), finite updates")),
    # stable embedding
    case("optim-stable-embedding-zero-rows", lambda: StableEmbedding(0, 4).init(jax.random.key(0),
                                                                                jnp.zeros(2, jnp.int32)),
         Raises(r"num_embeddings=0 is not allowed; allowed: a positive integer")),
    case("optim-stable-embedding-nnx-float-features",
         lambda: StableEmbeddingNNX(10, 4.0, rngs=nnx.Rngs(0)),
         Raises(r"features=4.0 is not allowed; allowed: a positive integer")),
    case("optim-stable-embedding-float-ids", lambda: _embed(jnp.array([0.5, 1.0])),
         Raises(r"ids must be integers, got dtype float32; allowed: int32", exc=TypeError)),
    case("optim-stable-embedding-ids-out-of-range", lambda: _embed(jnp.array([3, 10])),
         Raises(r"ids hold \[10\] outside \[0, 10\)")),
    case("optim-stable-embedding-ids-out-of-range-under-jit",
         lambda: jax.jit(_embed)(jnp.array([3, 10])),
         Documented(lambda y: (np.testing.assert_array_equal(np.isnan(np.asarray(y)).all(-1), [False, True])),
                    doc="StableEmbedding docstring: under jit an out-of-range id gives a NaN row")),
]
