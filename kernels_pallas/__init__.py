"""Packed low-bit matmul kernels.

``packed_matmul(x, w_packed, scales, *, bits, group_size=None, backend="auto")`` multiplies float
activations ``x (..., K)`` by a weight stored as ``bits``-bit codes packed along K in uint32 words
(:mod:`qjax.packing`) with per-channel (``scales`` of shape ``(1, N)``) or per-group (``(K / group_size,
N)``) float scales. Backends: ``"xla"``, the pure-jnp reference (:mod:`kernels_pallas.reference`), on
every platform. ``"auto"`` picks the best backend the platform has.
"""

from __future__ import annotations

import jax

from kernels_pallas.reference import dequantize_packed, packed_matmul_xla
from qjax import packing

BACKENDS = ("auto", "xla")

__all__ = ["BACKENDS", "dequantize_packed", "packed_matmul", "packed_matmul_xla"]


def packed_matmul(x: jax.Array, w_packed: jax.Array, scales: jax.Array, *, bits: int,
                  group_size: int | None = None, zero_point: jax.Array | None = None,
                  signed: bool = True, backend: str = "auto") -> jax.Array:
    """``y[..., n] = sum_k x[..., k] * (code[k, n] - z) * scale[k // group_size, n]``, float32 out.

    ``w_packed``: ``(ceil(K / (32 // bits)), N)`` uint32; ``scales``: ``(1, N)`` or ``(K / group_size, N)``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if bits not in packing.PACK_BITS:
        raise ValueError(f"bits={bits!r} has no packed matmul; allowed: {packing.PACK_BITS}")
    k = x.shape[-1]
    groups = scales.shape[0]
    if scales.ndim != 2 or k % groups or (group_size is not None and k // groups != group_size):
        raise ValueError(f"scales of shape {scales.shape} do not fit K={k} with group_size={group_size}; "
                         "allowed: (1, N) or (K / group_size, N)")
    return packed_matmul_xla(x, w_packed, scales, bits=bits, group_size=group_size,
                             zero_point=zero_point, signed=signed)
