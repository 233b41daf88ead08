"""The pure-jnp packed matmul: the reference every kernel backend is tested against.

``y = x @ W`` with ``W[k, n] = (code[k, n] - z[g(k), n]) * scale[g(k), n]`` where the codes are unpacked
from the uint32 plane layout of :mod:`kernels_pallas.layout` (packed along K, axis 0), ``g(k) = k //
group_size`` (one group when ``group_size`` is None, i.e. per-channel scales) and ``z`` is an optional zero
point.
Accumulates in float32. ``int8_dot_xla`` is the W8A8 reference: int8 codes, exact int32 sums.
``hadamard_transform_xla`` is the reference of the fast Walsh-Hadamard transform ``x H_n / sqrt(n)``.
"""

from __future__ import annotations

import math

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


def hadamard_transform_xla(x: jax.Array) -> jax.Array:
    """``x H_n / sqrt(n)`` on the last axis, ``n`` a power of two, by the fast Walsh-Hadamard transform.

    ``H_n`` is Sylvester's matrix in natural order, ``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]]``, so
    ``H_n[i, j] = (-1)^popcount(i & j)``; ``log2(n)`` in-place butterfly stages, stage ``h = 1, 2, 4, ...``
    mapping each pair ``(x[i], x[i + h])`` with bit ``h`` of ``i`` clear to ``(x[i] + x[i + h], x[i] -
    x[i + h])``: ``n log2(n)`` additions instead of the ``n^2`` multiply-adds of a matmul. Computed in
    float32 (float64 for float64 input), returned in ``x``'s dtype.
    """
    n, lead = x.shape[-1], x.shape[:-1]
    y = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    h = 1
    while h < n:
        pairs = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, n)
        h *= 2
    return (y * (1.0 / math.sqrt(n))).astype(x.dtype)
