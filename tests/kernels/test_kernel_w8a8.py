"""W8A8: the int8 x int8 -> int32 kernel equals the exact integer product bit for bit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas as kp
from kernels_pallas.w8a8 import int8_dot_pallas


def int8_codes(rng, shape):
    return jnp.asarray(rng.integers(-128, 128, shape), jnp.int8)


@pytest.mark.parametrize("m,k,n,options", [
    (5, 300, 70, {}),
    (33, 700, 130, {"block_k": 128}),  # several K blocks, M and N past one block
    (3, 260, 20, {"block_k": 128, "k_in_grid": False}),  # the GPU structure: a K loop in the kernel
], ids=["one-block", "k-grid", "k-loop"])
def test_int8_dot_is_exact(m, k, n, options):
    rng = np.random.default_rng(k)
    a, b = int8_codes(rng, (m, k)), int8_codes(rng, (k, n))
    a = a.at[0].set(-128)  # the extreme product, K times: -128 * -128 * K
    b = b.at[:, 0].set(-128)
    exact = np.asarray(a, np.int64) @ np.asarray(b, np.int64)
    if options:
        got = int8_dot_pallas(a, b, interpret=True, **options)
    else:
        got = kp.int8_dot(a, b, backend="interpret")
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, exact)
    np.testing.assert_array_equal(kp.int8_dot(a, b, backend="xla"), exact)


def test_int8_matmul_applies_per_token_and_per_channel_scales_under_jit_and_vmap():
    rng = np.random.default_rng(0)
    a, b = int8_codes(rng, (2, 6, 64)), int8_codes(rng, (64, 24))
    sx = jnp.asarray(rng.uniform(0.01, 1, (2, 6, 1)), jnp.float32)
    sw = jnp.asarray(rng.uniform(0.01, 1, (1, 24)), jnp.float32)
    want = (np.asarray(a, np.float64) @ np.asarray(b, np.float64)) * np.asarray(sx) * np.asarray(sw)
    f = jax.jit(functools.partial(kp.int8_matmul, backend="interpret"))
    np.testing.assert_allclose(f(a, sx, b, sw), want, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(f, in_axes=(0, 0, None, None))(a, sx, b, sw[0]), want, rtol=1e-6)
    np.testing.assert_allclose(kp.int8_matmul(a, sx, b, sw, backend="xla"), want, rtol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda a, b: kp.int8_dot(a.astype(jnp.int32), b, backend="xla"), "int32 and int8; allowed: int8"),
    (lambda a, b: kp.int8_dot(a, b[:5], backend="xla"), r"\(4, 8\) @ \(5, 3\) do not contract"),
    (lambda a, b: kp.int8_matmul(a, jnp.ones((4,)), b, jnp.ones(3), backend="xla"), r"allowed: \(4, 1\)"),
    (lambda a, b: kp.int8_matmul(a, jnp.ones((4, 1)), b, jnp.ones(4), backend="xla"), r"allowed: \(1, 3\)"),
    (lambda a, b: kp.int8_dot(a, b, backend="triton"), "'triton'; allowed: auto, xla, pallas, interpret"),
])
def test_int8_errors_name_the_bad_value(call, match):
    with pytest.raises(ValueError, match=match):
        call(jnp.ones((4, 8), jnp.int8), jnp.ones((8, 3), jnp.int8))
