"""state_nbytes counts the real bytes of a state; state_formats names each leaf's storage."""

from __future__ import annotations

import jax.numpy as jnp
import optax

import qjax.optim as qo


def test_state_nbytes_is_the_sum_of_real_array_bytes():
    params = {"w": jnp.zeros((64, 128)), "b": jnp.zeros((100,))}
    state = qo.adam8bit(1e-3).init(params)
    codes, scales, floats, count = 2 * 64 * 128, 2 * (64 * 128 // 256) * 4, 2 * 100 * 4, 4
    assert qo.state_nbytes(state) == codes + scales + floats + count
    assert qo.state_nbytes(optax.adam(1e-3).init(params)) == 2 * 4 * (64 * 128 + 100) + 4


def test_state_formats_names_maps_and_dtypes():
    params = {"w": jnp.zeros((64, 128), jnp.bfloat16)}
    formats = qo.state_formats(qo.lion8bit(1e-3, mu_dtype=jnp.bfloat16).init(params))
    assert formats == {"0/count": "int32", "0/mu/w": "dynamic"}
    formats = qo.state_formats(qo.lion8bit(1e-3, min_size=10**6, mu_dtype=jnp.bfloat16).init(params))
    assert formats["0/mu/w"] == "bfloat16"
