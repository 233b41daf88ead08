"""qjax.rotation (hadamard_matrix, random_hadamard, Rotation) and kernels_pallas.hadamard_transform."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import kernels_pallas as kp
import qjax
from tests.bad_input.table import Documented, Raises, case

KEY = jax.random.key(0)
X = jnp.linspace(-1.0, 1.0, 2 * 64, dtype=jnp.float32).reshape(2, 64)


def rot(n=64, **kw):
    return qjax.random_hadamard(n, KEY, backend="xla", **kw)


def _check(predicate, what: str):
    def check(result):
        assert predicate(result), what
    return check


CASES = [
    # --- hadamard_matrix: which orders --------------------------------------------------------------------
    case("rotation-matrix-no-kronecker-construction-172", lambda: qjax.hadamard_matrix(172),
         Raises(r"no Hadamard matrix of order 172 = 4 \* 43 is constructed here; allowed: orders 2\^k \* m "
                r"with m = 1 \(Sylvester\) or m in \(12, 20, .*\) \(Paley\).*blocks of 4")),
    case("rotation-matrix-order-6-cannot-exist", lambda: qjax.hadamard_matrix(6),
         Raises(r"no Hadamard matrix of order 6 exists: beyond 1 and 2 the order is a multiple of 4")),
    case("rotation-matrix-n-a-float", lambda: qjax.hadamard_matrix(12.0),
         Raises(r"hadamard_matrix: n=12.0 is a float; allowed: a positive int", exc=TypeError)),
    case("rotation-matrix-n-a-bool", lambda: qjax.hadamard_matrix(True),
         Raises(r"hadamard_matrix: n=True is a bool; allowed: a positive int", exc=TypeError)),
    case("rotation-matrix-n-0", lambda: qjax.hadamard_matrix(0),
         Raises(r"hadamard_matrix: n=0; allowed: a positive int")),
    case("rotation-matrix-12-is-paley", lambda: qjax.hadamard_matrix(12, np.int64),
         Documented(_check(lambda h: (h @ h.T == 12 * np.eye(12)).all(), "H H^T = 12 I"),
                    doc="qjax.hadamard_matrix: Paley's construction for 12, H H^T = n I")),
    # --- random_hadamard: width, key, block ----------------------------------------------------------------
    case("rotation-random-n-a-string", lambda: qjax.random_hadamard("64", KEY),
         Raises(r"random_hadamard: n='64' is a str; allowed: a positive int", exc=TypeError)),
    case("rotation-random-key-an-int-seed", lambda: qjax.random_hadamard(64, 0),
         Raises(r"random_hadamard: key is 0 of type int; allowed: one PRNG key, jax.random.key\(seed\)",
                exc=TypeError)),
    case("rotation-random-key-a-float-array", lambda: qjax.random_hadamard(64, jnp.zeros(2)),
         Raises(r"key is an array of shape \(2,\) and dtype float32; allowed: one PRNG key", exc=TypeError)),
    case("rotation-random-key-a-batch-of-keys", lambda: qjax.random_hadamard(64, jax.random.split(KEY, 3)),
         Raises(r"key is an array of shape \(3,\) .*; for several rotations, jax.vmap over keys",
                exc=TypeError)),
    case("rotation-random-kronecker-form-asked-for-172", lambda: rot(172, block=172),
         Raises(r"random_hadamard: block=172 for n=172: no Hadamard matrix of order 172 .*allowed blocks for "
                r"n=172: None or one of \[4, 2, 1\]")),
    case("rotation-random-block-not-dividing-n", lambda: rot(96, block=64),
         Raises(r"block=64 for n=96: 64 does not divide n; allowed: None or one of \[96, 48, 32, 24")),
    case("rotation-random-block-a-float", lambda: rot(96, block=32.0),
         Raises(r"random_hadamard: block=32.0 is a float; allowed: a positive int", exc=TypeError)),
    case("rotation-random-unknown-backend", lambda: qjax.random_hadamard(64, KEY, backend="cuda"),
         Raises(r"Rotation: unknown backend 'cuda'; allowed: auto, xla, pallas, interpret")),
    case("rotation-random-odd-width-is-signs-only", lambda: (rot(7), rot(7).apply(X[:, :7])),
         Documented(_check(lambda r: r[0].block == 1 and bool(jnp.all(r[1] == X[:, :7] * r[0].signs)),
                           "block 1: x R = x * signs"),
                    doc="qjax.random_hadamard: an odd n has only b = 1, signs alone")),
    case("rotation-random-no-construction-is-block-diagonal", lambda: rot(11008).block,
         Documented(_check(lambda b: b == 256, "11008 = 2^8 * 43 rotates in 43 blocks of 256"),
                    doc="qjax.random_hadamard: the widest block dividing n that has a Hadamard matrix")),
    # --- Rotation.apply / rotate_weight --------------------------------------------------------------------
    case("rotation-apply-wrong-width", lambda: rot().apply(X[:, :32]),
         Raises(r"Rotation.apply: x of shape \(2, 32\) has 32 features on its last axis; allowed: x of shape "
                r"\(\.\.\., 64\)")),
    case("rotation-apply-integer-x", lambda: rot().apply(jnp.ones((2, 64), jnp.int32)),
         Raises(r"Rotation.apply: x of shape \(2, 64\) and dtype int32; allowed: a float array")),
    case("rotation-apply-x-a-list", lambda: rot(2).apply([1.0, 2.0]),
         Raises(r"Rotation.apply: x is a list; allowed: an array", exc=TypeError)),
    case("rotation-apply-stacked-without-vmap",
         lambda: jax.vmap(lambda k: qjax.random_hadamard(64, k))(jax.random.split(KEY, 2)).apply(X),
         Raises(r"Rotation: signs of shape \(2, 64\); allowed: \(64,\) \(a stack of rotations applies under "
                r"jax.vmap")),
    case("rotation-weight-transposed", lambda: rot().rotate_weight(jnp.ones((16, 64))),
         Raises(r"rotate_weight: w of shape \(16, 64\) has 16 input features on axis 0; allowed: 64 there "
                r"\(a Dense weight of shape \(64, out\)")),
    case("rotation-weight-axis-out-of-range", lambda: rot().rotate_weight(jnp.ones((64, 16)), axis=2),
         Raises(r"rotate_weight: axis=2 for a weight of rank 2; allowed: an int in \[-2, 1\]")),
    case("rotation-all-zero-input", lambda: rot(96).apply(jnp.zeros((3, 96))),
         Documented(_check(lambda y: y.shape == (3, 96) and not bool(jnp.any(y)), "zeros"),
                    doc="a rotation is linear: zeros stay zeros, no NaN")),
    case("rotation-nan-stays-in-its-row", lambda: rot(96).apply(jnp.ones((2, 96)).at[0, 5].set(jnp.nan)),
         Documented(_check(lambda y: bool(jnp.all(jnp.isnan(y[0]))) and bool(jnp.all(jnp.isfinite(y[1]))),
                           "row 0 NaN, row 1 finite"),
                    doc="the rotation mixes the features of one row (token), never rows")),
    # --- kernels_pallas.hadamard_transform -----------------------------------------------------------------
    case("kernels-hadamard-n-not-a-power-of-two",
         lambda: kp.hadamard_transform(jnp.ones((2, 12)), backend="xla"),
         Raises(r"last axis of length n=12 \(x of shape \(2, 12\)\) is not a power of two; allowed: 1, 2, 4, "
                r"\.\.\., e\.g\. 8 or 16")),
    case("kernels-hadamard-integer-x",
         lambda: kp.hadamard_transform(jnp.ones((2, 8), jnp.int8), backend="xla"),
         Raises(r"x of shape \(2, 8\) and dtype int8; allowed: a float array \(\.\.\., n\)")),
    case("kernels-hadamard-x-a-list", lambda: kp.hadamard_transform([1.0, 1.0], backend="xla"),
         Raises(r"hadamard_transform: x is a list; allowed: an array", exc=TypeError)),
    case("kernels-hadamard-unknown-backend", lambda: kp.hadamard_transform(X, backend="triton"),
         Raises(r"unknown backend 'triton'; allowed: auto, xla, pallas, interpret")),
    case("kernels-hadamard-n-1-is-the-identity", lambda: kp.hadamard_transform(X[:, :1], backend="interpret"),
         Documented(_check(lambda y: bool(jnp.all(y == X[:, :1])), "H_1 = [1]"),
                    doc="kernels_pallas.hadamard_transform: n = 1 is allowed, H_1 = [1]")),
    case("kernels-hadamard-no-rows", lambda: kp.hadamard_transform(jnp.ones((0, 8)), backend="interpret"),
         Documented(_check(lambda y: y.shape == (0, 8), "an empty (0, 8) result"),
                    doc="an empty batch gives an empty result")),
]
