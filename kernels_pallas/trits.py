"""Base-3 packing of ternary codes: 5 trits ``{-1, 0, 1}`` per byte, 1.6 bits per trit.

Arrays only: this module imports neither qjax nor Flax (the plane idea is :mod:`kernels_pallas.layout`'s).
A trit carries ``log2(3) = 1.585`` bits; 2-bit fields (:mod:`kernels_pallas.layout`) spend 2. Since
``3^5 = 243 <= 256``, five trits fit one byte: 8 / 5 = 1.6 bits per trit of real size (1% over the bound),
the storage of ternary weights and of PTQTP's trit-planes (Xiao et al., "PTQTP: Post-Training Quantization
to Trit-Plane Representation for Large Language Models", 2025).

Along ``axis`` of length ``K``, with ``P = ceil(K / 5)`` bytes (``K`` padded up to ``5 P`` with 0-trits)::

    byte[p] = sum_i (t[p + i * P] + 1) * 3^i,    i = 0 .. 4        (0 .. 242; 121 = five 0-trits)

the stored digit of a trit is ``t + 1`` in ``{0, 1, 2}``. As in :mod:`kernels_pallas.layout` the five trits of
a byte are *planes*: decoding digit ``i`` of every byte, ``(byte // 3^i) % 3 - 1``, yields the contiguous
slice ``t[i P : (i + 1) P]`` (no shuffles; a kernel multiplies each plane against one contiguous slice of the
activations). Positions past ``K`` hold 0-trits (digit 1). All other axes keep their size. Byte values
243 .. 255 never occur in a packing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.layout import as_int, check_axis

TRITS_PER_BYTE = 5
BITS_PER_TRIT = 8 / TRITS_PER_BYTE  # 1.6: the real size of a packed trit
_POW3 = tuple(3**i for i in range(TRITS_PER_BYTE))  # 1, 3, 9, 27, 81
_MAX_BYTE = 3**TRITS_PER_BYTE - 1  # 242


def _as_count(value) -> int | None:
    """``value`` as a Python int >= 0 if it is one (numpy integers included, bools not)."""
    count = as_int(value)
    return count if count is not None and count >= 0 else None


def trits_packed_size(size: int) -> int:
    """Bytes that hold ``size`` trits: ``P = ceil(size / 5)`` (module docstring; 1.6 bits per trit)."""
    count = _as_count(size)
    if count is None:
        raise ValueError(f"trits_packed_size: size={size!r}; allowed: an integer >= 0")
    return -(-count // TRITS_PER_BYTE)


def _check_trits(codes) -> None:
    dtype = codes.dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"pack_trits: codes must have an integer dtype, got {dtype}; allowed: int8, int16, "
                         "int32 (or unsigned) holding -1, 0, 1 (cast float codes first)")
    if not isinstance(codes, jax.core.Tracer):
        values = np.asarray(codes)
        bad = (values < -1) | (values > 1)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"pack_trits: code {values[bad].flat[0]} at index {index} is not a trit; "
                             "allowed: -1, 0, 1")


def pack_trits(codes: jax.Array, axis: int = 0) -> jax.Array:
    """Pack ternary ``codes`` (integers in ``{-1, 0, 1}``) 5 per byte along ``axis`` (module docstring):
    ``byte[p] = sum_{i<5} (t[p + i P] + 1) 3^i`` with ``P = ceil(K / 5)``, positions past ``K`` 0-trits.

    Returns a uint8 array of the same rank with ``P`` entries along ``axis`` (1.6 bits per trit; the
    storage of ternary / trit-plane weights, Xiao et al., "PTQTP", 2025). Concrete codes outside
    ``{-1, 0, 1}`` raise ``ValueError`` naming the first one; traced codes (under ``jit``) cannot be checked:
    each is clipped to ``{-1, 0, 1}``, so a misfit changes its own value, never its neighbours'.
    """
    if not hasattr(codes, "dtype"):
        codes = np.asarray(codes)
    _check_trits(codes)
    codes = jnp.asarray(codes)
    return _pack(codes, check_axis(axis, codes.ndim, "pack_trits"))


@functools.partial(jax.jit, static_argnums=1)
def _pack(codes: jax.Array, axis: int) -> jax.Array:
    x = jnp.moveaxis(codes, axis, 0)
    digits = jnp.clip(x.astype(jnp.int32), -1, 1) + 1  # {0, 1, 2}; a traced misfit stays in its digit
    length = x.shape[0]
    count = trits_packed_size(length)
    digits = jnp.pad(digits, [(0, TRITS_PER_BYTE * count - length)] + [(0, 0)] * (x.ndim - 1),
                     constant_values=1)  # padding: 0-trits
    planes = digits.reshape(TRITS_PER_BYTE, count, *x.shape[1:])
    weights = jnp.asarray(_POW3, jnp.int32).reshape((TRITS_PER_BYTE,) + (1,) * x.ndim)
    packed = jnp.sum(planes * weights, axis=0, dtype=jnp.int32).astype(jnp.uint8)
    return jnp.moveaxis(packed, 0, axis)


def unpack_trits(packed: jax.Array, axis: int, size: int) -> jax.Array:
    """Inverse of :func:`pack_trits`: uint8 ``packed`` -> ``size`` int8 trits along ``axis``,
    ``t[i P + p] = (byte[p] // 3^i) % 3 - 1`` for ``i < 5`` (module docstring).

    ``size`` is the packed length ``K`` (``5 (P - 1) < K <= 5 P`` for ``P`` bytes). Concrete bytes above 242
    (never written by :func:`pack_trits`) raise ``ValueError``; traced ones decode to some trits.
    ``unpack_trits(pack_trits(t, a), a, t.shape[a])`` gives ``t`` back exactly, as int8.
    """
    if not hasattr(packed, "dtype"):
        packed = np.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise ValueError(f"unpack_trits: packed must be uint8, got {packed.dtype}; allowed: uint8")
    if not isinstance(packed, jax.core.Tracer):
        values = np.asarray(packed)
        if (values > _MAX_BYTE).any():
            raise ValueError(f"unpack_trits: byte {values[values > _MAX_BYTE].flat[0]} is not 5 packed "
                             f"trits; allowed: 0 .. {_MAX_BYTE}")
    packed = jnp.asarray(packed)
    axis = check_axis(axis, packed.ndim, "unpack_trits")
    count = packed.shape[axis]
    given, size = size, _as_count(size)
    lo, hi = TRITS_PER_BYTE * (count - 1) + 1 if count else 0, TRITS_PER_BYTE * count
    if size is None or not lo <= size <= hi:
        raise ValueError(f"unpack_trits: size={given!r} does not match {count} bytes of {TRITS_PER_BYTE} "
                         f"trits each; allowed: {lo} .. {hi}")
    return _unpack(packed, axis, size)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _unpack(packed: jax.Array, axis: int, size: int) -> jax.Array:
    b = jnp.moveaxis(packed, axis, 0).astype(jnp.int32)
    weights = jnp.asarray(_POW3, jnp.int32).reshape((TRITS_PER_BYTE,) + (1,) * b.ndim)
    planes = (b[None] // weights) % 3 - 1
    trits = planes.reshape(TRITS_PER_BYTE * b.shape[0], *b.shape[1:])[:size].astype(jnp.int8)
    return jnp.moveaxis(trits, 0, axis)
