"""The pure-jnp packed matmul: the reference every kernel backend is tested against.

``y = x @ W`` with ``W[k, n] = (code[k, n] - z[g(k), n]) * scale[g(k), n]`` where the codes are unpacked
from the uint32 plane layout of :mod:`kernels_pallas.layout` (packed along K, axis 0), ``g(k) = k //
group_size`` (one group when ``group_size`` is None, i.e. per-channel scales) and ``z`` is an optional zero
point.
Accumulates in float32. ``int8_dot_xla`` is the W8A8 reference: int8 codes, exact int32 sums;
``int_matmul_xla`` (and ``packed_int_matmul_xla`` for packed weights) the integer product with per-group
weight scales, ``y = s_x sum_g s_w[g] (acc_g - z[g] r_g)`` (:func:`group_term`).
``hadamard_transform_xla`` is the reference of the fast Walsh-Hadamard transform ``x H_n / sqrt(n)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kernels_pallas import layout


def dequantize_packed(w_packed: jax.Array, scales: jax.Array, *, bits: int, k: int,
                      group_size: int | None = None, zero_point: jax.Array | None = None,
                      signed: bool = True, element: str = "int") -> jax.Array:
    """The float32 ``(K, N)`` weight of a packed ``(ceil(K / (32 // bits)), N)`` uint32 array; ``element``:
    what a field holds (:data:`kernels_pallas.layout.ELEMENTS`)."""
    if element == "e2m1":
        codes = layout.decode_e2m1(layout.unpack(w_packed, bits, 0, k, signed=False).astype(jnp.int32))
    else:
        codes = layout.unpack(w_packed, bits, 0, k, signed=signed).astype(jnp.float32)
    groups, n = scales.shape[0], w_packed.shape[1]
    codes = codes.reshape(groups, k // groups, n)  # n, not -1: K = 0 has no size to infer from
    if zero_point is not None:
        codes = codes - zero_point.reshape(groups, 1, n)
    return (codes * scales.reshape(groups, 1, n).astype(jnp.float32)).reshape(k, n)


def packed_matmul_xla(x: jax.Array, w_packed: jax.Array, scales: jax.Array, *, bits: int,
                      group_size: int | None = None, zero_point: jax.Array | None = None,
                      signed: bool = True, element: str = "int") -> jax.Array:
    """``x @ dequantize_packed(...)`` with float32 accumulation, returned in float32."""
    w = dequantize_packed(w_packed, scales, bits=bits, k=x.shape[-1], group_size=group_size,
                          zero_point=zero_point, signed=signed, element=element)
    return jax.lax.dot_general(x.astype(jnp.float32), w, (((x.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def int8_dot_xla(a: jax.Array, b: jax.Array) -> jax.Array:
    """``acc = a (..., K) @ b (K, N)`` over int8 codes: one ``dot_general``, exact int32 accumulation."""
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)


def group_term(acc: jax.Array, w_scale: jax.Array, zero_point: jax.Array | None = None,
               rowsum: jax.Array | None = None) -> jax.Array:
    """One weight group's share of an integer product, ``s_w[n] * (acc[..., n] - z[n] * r[...])`` in
    float32: ``acc`` the group's exact int32 sums ``sum_{k in g} x[..., k] c[k, n]``, ``w_scale`` (and
    ``zero_point``) broadcasting to ``acc``, ``rowsum`` the int32 ``r = sum_{k in g} x[..., k]`` ``(..., 1)``
    (with a zero point: ``sum_k x_k (c_k - z) = acc - z r``). The epilogue of every integer product here,
    the Pallas kernel's included."""
    y = acc.astype(jnp.float32)
    if zero_point is not None:
        y = y - rowsum.astype(jnp.float32) * zero_point.astype(jnp.float32)
    return y * w_scale.astype(jnp.float32)


def int_matmul_xla(x_codes: jax.Array, x_scale: jax.Array, w_codes: jax.Array, w_scales: jax.Array,
                   zero_point: jax.Array | None = None) -> jax.Array:
    """``y[..., n] = s_x[...] * sum_g group_term(acc_g, s_w[g], z[g], r_g)``, float32 ``(..., N)``: int8
    activation codes ``(..., K)`` times int8 weight codes ``(K, N)`` with ``(G, N)`` weight scales (and zero
    points) over ``G`` equal groups along K, each group's sums ``acc_g`` exact in int32 (one int8
    ``dot_general`` per group, a ``scan`` over the groups: XLA:CPU runs that as fast as one float dot, a
    batched dot of all groups several times slower); ``x_scale`` ``(..., 1)`` or ``()``."""
    k, (groups, n) = x_codes.shape[-1], w_scales.shape
    zero = [None] * groups if zero_point is None else zero_point

    def term(x, c, s, z):
        rowsum = None if z is None else jnp.sum(x, axis=-1, keepdims=True, dtype=jnp.int32)
        return group_term(int8_dot_xla(x, c), s, z, rowsum)

    if groups == 1:
        y = term(x_codes, w_codes, w_scales[0], zero[0])
    else:
        xg = jnp.moveaxis(x_codes.reshape(*x_codes.shape[:-1], groups, k // groups), -2, 0)
        step = lambda y, g: (y + term(*g), None)
        y = jax.lax.scan(step, jnp.zeros((*x_codes.shape[:-1], n), jnp.float32),
                         (xg, w_codes.reshape(groups, k // groups, n), w_scales, zero_point))[0]
    return x_scale.astype(jnp.float32) * y


def packed_int_matmul_xla(x_codes: jax.Array, x_scale: jax.Array, w_packed: jax.Array, w_scales: jax.Array,
                          zero_point: jax.Array | None = None, *, bits: int,
                          signed: bool = True) -> jax.Array:
    """:func:`int_matmul_xla` of the codes unpacked from ``w_packed`` (:func:`kernels_pallas.layout.unpack`)
    as int8 (:func:`int8_fields`: unsigned 8-bit codes ``c`` read as ``c - 128`` with the zero point
    ``z - 128``)."""
    signed, zero_point = int8_fields(bits, signed, zero_point, w_scales)
    codes = layout.unpack(w_packed, bits, 0, x_codes.shape[-1], signed=signed)
    return int_matmul_xla(x_codes, x_scale, codes.astype(jnp.int8), w_scales, zero_point)


def int8_fields(bits: int, signed: bool, zero_point: jax.Array | None,
                w_scales: jax.Array) -> tuple[bool, jax.Array | None]:
    """``(signed, zero_point)`` under which every packed code fits an int8: unsigned 8-bit fields ``f``
    (``0 .. 255``) decode as offset binary ``f - 128`` with the zero point ``z - 128`` (0 when there is
    none), as ``f - z = (f - 128) - (z - 128)``; every other layout already fits and is returned as it is."""
    if bits != 8 or signed:
        return signed, zero_point
    z = jnp.zeros(w_scales.shape, jnp.float32) if zero_point is None else zero_point.astype(jnp.float32)
    return True, z - 128.0


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
