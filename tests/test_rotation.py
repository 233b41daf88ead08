"""qjax.rotation: Hadamard matrices (Sylvester, Paley, Kronecker) and randomized Hadamard rotations."""

import json
import math
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from kernels_pallas import KernelFallbackWarning
from qjax import rotation

pytestmark = pytest.mark.filterwarnings(f"ignore::{KernelFallbackWarning.__module__}.KernelFallbackWarning")

# powers of two, every Paley order, Kronecker products, and widths that only have a block-diagonal rotation
KRONECKER = (1, 2, 4, 64, 12, 20, 24, 40, 96, 160, 252, 768)
BLOCK_ONLY = {3: 1, 6: 2, 7: 1, 172: 4, 344: 8, 43 * 32: 32}


def dense_rotation(rot):
    """``diag(s) (I (x) H_b) / sqrt(b)`` from :func:`qjax.hadamard_matrix`, in float64."""
    h = np.kron(np.eye(rot.blocks), qjax.hadamard_matrix(rot.block, np.float64)) / math.sqrt(rot.block)
    return np.diag(np.asarray(rot.signs, np.float64)) @ h


@pytest.mark.parametrize("n", sorted({*KRONECKER, *rotation.HADAMARD_ORDERS, 128, 11 * 4 * 8}))
def test_hadamard_matrix_has_entries_plus_minus_one_and_orthogonal_rows(n):
    h = qjax.hadamard_matrix(n, np.int64)
    assert h.shape == (n, n) and set(np.unique(h)) <= {-1, 1}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))


def test_hadamard_orders_include_12_and_20_and_sylvester_is_natural_order():
    assert {12, 20, 28, 36, 44, 60} <= set(rotation.HADAMARD_ORDERS)
    h = qjax.hadamard_matrix(8)
    i = np.arange(8)
    want = (-1.0) ** np.vectorize(lambda v: bin(v).count("1"))(i[:, None] & i[None, :])
    np.testing.assert_array_equal(h, want)
    np.testing.assert_array_equal(qjax.hadamard_matrix(24), np.kron(qjax.hadamard_matrix(12), h[:2, :2]))


@pytest.mark.parametrize("n", [*KRONECKER, *BLOCK_ONLY])
def test_rotation_equals_its_dense_definition_and_is_orthogonal(n):
    rot = qjax.random_hadamard(n, jax.random.key(n))
    assert rot.block == BLOCK_ONLY.get(n, n) and rot.blocks * rot.block == n
    r = dense_rotation(rot)
    got = np.asarray(rot.matrix(), np.float64)  # apply(I) = R, by the fast transform
    np.testing.assert_allclose(got, r, atol=1e-6)
    np.testing.assert_allclose(np.asarray(rot.inverse().matrix()), r.T, atol=1e-6)
    np.testing.assert_allclose(got @ got.T, np.eye(n), atol=2e-6)


@pytest.mark.parametrize("n", [1024, 96, 344, 11008])
def test_rotated_input_times_rotated_weight_is_the_layer_output(n):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 2, n)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((n, 24)), jnp.float32)
    rot = qjax.random_hadamard(n, jax.random.key(1))
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    got = rot.apply(x) @ rot.rotate_weight(w)
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
    back = rot.inverse().apply(rot.apply(x))  # R R^T = I
    assert np.linalg.norm(back - x) <= 1e-5 * np.linalg.norm(x)
    np.testing.assert_allclose(rot.inverse().rotate_weight(rot.rotate_weight(w)), w, atol=1e-5)
    # the weight's input axis need not be first: an einsum weight (heads, n, dim)
    w3 = jnp.moveaxis(w.reshape(n, 4, 6), 0, 1)
    got3 = jnp.einsum("...n,hnd->...hd", rot.apply(x), rot.rotate_weight(w3, axis=1)).reshape(4, 2, 24)
    assert np.linalg.norm(got3 - want) <= 1e-5 * np.linalg.norm(want)


FRESH_INTERPRETER = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import json, warnings
warnings.simplefilter("ignore")
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np, qjax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
rng = np.random.default_rng(0)
out = {"float64": []}
for n in (1024, 160, 344):
    x, w = rng.standard_normal((8, n)), rng.standard_normal((n, 16))
    rot = qjax.random_hadamard(n, jax.random.key(0))
    y = rot.apply(jnp.asarray(x)) @ rot.rotate_weight(jnp.asarray(w))
    assert y.dtype == jnp.float64, y.dtype
    out["float64"].append(float(np.linalg.norm(np.asarray(y) - x @ w) / np.linalg.norm(x @ w)))
mesh = Mesh(np.array(jax.devices()), ("d",))
x = jnp.asarray(rng.standard_normal((16, 96)), jnp.float32)
w = jnp.asarray(rng.standard_normal((96, 32)), jnp.float32)
rot = qjax.random_hadamard(96, jax.random.key(1))
f = jax.jit(lambda r, x, w: (r.apply(x), r.rotate_weight(w)))
xs = jax.device_put(x, NamedSharding(mesh, P("d", None)))
ws = jax.device_put(w, NamedSharding(mesh, P(None, "d")))
(ya, wa), (yb, wb) = f(rot, x, w), f(rot, xs, ws)
out["sharded"] = {"diff": float(max(jnp.max(jnp.abs(ya - yb)), jnp.max(jnp.abs(wa - wb)))),
                  "devices": [len(yb.sharding.device_set), len(wb.sharding.device_set)]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fresh_interpreter():
    """float64 (jax x64) and 8 simulated CPU devices need a fresh interpreter: one for both."""
    done = subprocess.run([sys.executable, "-c", FRESH_INTERPRETER], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_float64_identity_is_exact_to_double_rounding(fresh_interpreter):
    errors = fresh_interpreter["float64"]
    assert len(errors) == 3 and max(errors) < 1e-13, errors


def test_sharded_inputs_and_weights_give_the_unsharded_result_and_stay_distributed(fresh_interpreter):
    sharded = fresh_interpreter["sharded"]
    assert sharded["diff"] < 1e-6 and sharded["devices"] == [8, 8], sharded


def test_rotations_run_under_scan():
    keys = jax.random.split(jax.random.key(3), 4)
    stack = jax.vmap(lambda k: qjax.random_hadamard(40, k))(keys)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 40)), jnp.float32)

    def layer(h, r):
        return r.inverse().apply(r.apply(h)), None

    y, _ = jax.lax.scan(layer, x, stack)
    np.testing.assert_allclose(y, x, atol=1e-5)


def test_rotating_spreads_outlier_input_channels_so_int4_weights_lose_less():
    """QuIP# / QuaRot's claim: a few large input channels set every per-output-channel int4 scale; after a
    random Hadamard rotation they are spread over all channels and the layer output's error drops."""
    rng = np.random.default_rng(0)
    n, out, tokens = 512, 128, 64
    w = rng.standard_normal((n, out)).astype(np.float32) * 0.02
    w[rng.choice(n, 4, replace=False)] *= 20  # 4 outlier input channels of 512
    x = jnp.asarray(rng.standard_normal((tokens, n)), jnp.float32)
    w = jnp.asarray(w)
    q = qjax.Quantizer("int4", qjax.PerChannel(-1))
    rot = qjax.random_hadamard(n, jax.random.key(0))
    y = x @ w
    plain = float(jnp.linalg.norm(x @ qjax.fake_quant(q, w) - y))
    rotated = float(jnp.linalg.norm(rot.apply(x) @ qjax.fake_quant(q, rot.rotate_weight(w)) - y))
    assert plain > 3.0 * rotated, (plain, rotated)  # measured: 4.14x on this seed


def test_apply_uses_the_fast_transform_not_an_n_by_n_matmul():
    x = jnp.ones((2, 4096))
    jaxpr = str(jax.make_jaxpr(qjax.random_hadamard(4096, jax.random.key(0)).apply)(x))
    assert "dot_general" not in jaxpr
    jaxpr = str(jax.make_jaxpr(qjax.random_hadamard(12 * 256, jax.random.key(0)).apply)(jnp.ones((2, 3072))))
    assert jaxpr.count("dot_general") == 1 and "f32[12,12]" in jaxpr  # H_12 on one axis, FWHT on the other


def test_jit_grad_and_vmap():
    n = 96
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((5, n)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((5, n)), jnp.float32)
    rot = qjax.random_hadamard(n, jax.random.key(2))
    np.testing.assert_allclose(jax.jit(lambda r, x: r.apply(x))(rot, x), rot.apply(x), atol=1e-6)
    # d/dx sum(c * (x R)) = c R^T
    g = jax.grad(lambda x: jnp.sum(c * rot.apply(x)))(x)
    np.testing.assert_allclose(g, rot.inverse().apply(c), atol=1e-5)
    gw = jax.jit(jax.grad(lambda w: jnp.sum(x @ rot.rotate_weight(w))))(jnp.ones((n, 3)))
    column = rot.inverse().apply(x.sum(0))  # d/dW sum(x R^T W) = R x^T 1, in each output column
    np.testing.assert_allclose(gw, np.tile(np.asarray(column)[:, None], (1, 3)), atol=1e-4)
    # a stack of rotations from a batch of keys, applied under vmap; jit traces the key
    keys = jax.random.split(jax.random.key(0), 3)
    stack = jax.vmap(lambda k: qjax.random_hadamard(n, k))(keys)
    assert stack.signs.shape == (3, n) and stack.block == n
    ys = jax.jit(jax.vmap(lambda r, x: r.apply(x), in_axes=(0, None)))(stack, x)
    for i in range(3):
        one = jax.jit(lambda k: qjax.random_hadamard(n, k))(keys[i])
        np.testing.assert_allclose(ys[i], one.apply(x), atol=1e-6)
    with pytest.raises(ValueError, match=r"signs of shape \(3, 96\); allowed: \(96,\) .*jax.vmap"):
        stack.apply(x)


def test_backends_agree_and_auto_is_the_default():
    n = 20 * 16
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, n)), jnp.float32)
    rot = qjax.random_hadamard(n, jax.random.key(5))
    assert rot.backend == "auto"
    interp = qjax.random_hadamard(n, jax.random.key(5), backend="interpret")
    np.testing.assert_allclose(interp.apply(x), rot.apply(x), atol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(interp.apply(x) ** 2))(x), 2 * x, atol=1e-5)


def test_dtypes_bfloat16_in_bfloat16_out():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 48)), jnp.bfloat16)
    rot = qjax.random_hadamard(48, jax.random.key(0))
    y = rot.apply(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), rot.apply(x.astype(jnp.float32)), atol=0.03)


def test_deterministic_hadamard_rotation_and_explicit_blocks():
    rot = qjax.hadamard_rotation(64)
    np.testing.assert_array_equal(rot.signs, np.ones(64))
    np.testing.assert_allclose(rot.matrix(), qjax.hadamard_matrix(64) / 8, atol=1e-7)
    np.testing.assert_allclose(rot.apply(rot.apply(jnp.eye(64))), np.eye(64), atol=1e-6)  # symmetric
    small = qjax.random_hadamard(96, jax.random.key(0), block=32)
    assert small.blocks == 3
    np.testing.assert_allclose(small.matrix(), dense_rotation(small), atol=1e-6)
    assert qjax.random_hadamard(np.int64(12), jax.random.PRNGKey(0)).n == 12  # a raw uint32 key


@pytest.mark.parametrize("call,exc,match", [
    (lambda: qjax.hadamard_matrix(172), ValueError,
     r"no Hadamard matrix of order 172 = 4 \* 43 is constructed here; allowed: orders 2\^k \* m with m = 1 "
     r"\(Sylvester\) or m in \(12, 20, .*\[4, 2, 1\] have one"),
    (lambda: qjax.hadamard_matrix(6), ValueError, r"order 6 exists: beyond 1 and 2 the order is a multiple"),
    (lambda: qjax.hadamard_matrix(12.0), TypeError, r"n=12.0 is a float; allowed: a positive int"),
    (lambda: qjax.random_hadamard(172, jax.random.key(0), block=172), ValueError,
     r"block=172 for n=172: no Hadamard matrix of order 172"),
    (lambda: qjax.random_hadamard(96, jax.random.key(0), block=64), ValueError,
     r"block=64 for n=96: 64 does not divide n; allowed: None or one of \[96, 48, 32"),
    (lambda: qjax.random_hadamard(64, 0), TypeError, r"key is 0 of type int; allowed: one PRNG key"),
    (lambda: qjax.random_hadamard(64, jnp.zeros(2)), TypeError,
     r"key is an array of shape \(2,\) and dtype float32; allowed: one PRNG key"),
    (lambda: qjax.random_hadamard(64, jax.random.split(jax.random.key(0), 2)), TypeError,
     r"key is an array of shape \(2,\) .*jax.vmap over keys"),
    (lambda: qjax.hadamard_rotation(64).apply(jnp.ones((2, 32))), ValueError,
     r"x of shape \(2, 32\) has 32 features .*allowed: x of shape \(\.\.\., 64\)"),
    (lambda: qjax.hadamard_rotation(64).rotate_weight(jnp.ones((16, 64))), ValueError,
     r"w of shape \(16, 64\) has 16 input features on axis 0; allowed: 64 there"),
    (lambda: qjax.hadamard_rotation(64).apply(jnp.ones((2, 64), jnp.int32)), ValueError,
     r"x of shape \(2, 64\) and dtype int32; allowed: a float array"),
    (lambda: qjax.hadamard_rotation(64, backend="cuda"), ValueError,
     r"unknown backend 'cuda'; allowed: auto, xla, pallas, interpret"),
])
def test_bad_input_names_the_value_and_what_is_allowed(call, exc, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc, match=match):
            call()
