"""The pure-jnp packed matmul: the reference every kernel backend is tested against.

``y = x @ W`` with ``W[k, n] = (code[k, n] - z[g(k), n]) * scale[g(k), n]`` where the codes are unpacked
from the uint32 plane layout of :mod:`kernels_pallas.layout` (packed along K, axis 0), ``g(k) = k //
group_size`` (one group when ``group_size`` is None, i.e. per-channel scales) and ``z`` is an optional zero
point.
Accumulates in float32. ``int8_dot_xla`` is the W8A8 reference: int8 codes, exact int32 sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas import layout


def dequantize_packed(w_packed: jax.Array, scales: jax.Array, *, bits: int, k: int,
                      group_size: int | None = None, zero_point: jax.Array | None = None,
                      signed: bool = True) -> jax.Array:
    """The float32 ``(K, N)`` weight of a packed ``(ceil(K / (32 // bits)), N)`` uint32 array."""
    codes = layout.unpack(w_packed, bits, 0, k, signed=signed).astype(jnp.float32)
    groups, n = scales.shape[0], w_packed.shape[1]
    codes = codes.reshape(groups, k // groups, n)  # n, not -1: K = 0 has no size to infer from
    if zero_point is not None:
        codes = codes - zero_point.reshape(groups, 1, n)
    return (codes * scales.reshape(groups, 1, n).astype(jnp.float32)).reshape(k, n)


def packed_matmul_xla(x: jax.Array, w_packed: jax.Array, scales: jax.Array, *, bits: int,
                      group_size: int | None = None, zero_point: jax.Array | None = None,
                      signed: bool = True) -> jax.Array:
    """``x @ dequantize_packed(...)`` with float32 accumulation, returned in float32."""
    w = dequantize_packed(w_packed, scales, bits=bits, k=x.shape[-1], group_size=group_size,
                          zero_point=zero_point, signed=signed)
    return jax.lax.dot_general(x.astype(jnp.float32), w, (((x.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def int8_dot_xla(a: jax.Array, b: jax.Array) -> jax.Array:
    """``acc = a (..., K) @ b (K, N)`` over int8 codes: one ``dot_general``, exact int32 accumulation."""
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
