"""The packed layout: 1-, 2-, 4- and 8-bit codes in uint32 words, in planes along one axis.

The one definition of the layout that the packed matmul kernels read and :mod:`qjax.packing` (QArray
packing, freezing) writes. Arrays only: this module imports neither qjax nor Flax.

Along ``axis`` of length ``K``, with ``n = 32 // bits`` codes per word and ``P = ceil(K / n)`` words::

    word[p] = sum_j stored(code[p + j * P]) << (j * bits),    j = 0 .. n-1

so unpacking plane ``j`` (``(word >> j*bits) & mask``) yields the contiguous slice
``code[j*P : (j+1)*P]``: no lane shuffles, a kernel multiplies each plane against one contiguous slice of
the activations. Positions past ``K`` are stored as 0. Codes are stored as unsigned ``bits``-bit fields:

- unsigned integer dtypes: the code itself (``0 .. 2^bits - 1``);
- signed integer dtypes, ``bits >= 2``: offset binary, ``code + 2^(bits-1)`` (int4 ``-8..7 -> 0..15``;
  ternary ``{-1, 0, 1}`` packs as 2-bit ``{1, 2, 3}``);
- signed, ``bits == 1``: binary ``{-1, +1} -> {0, 1}``.

Whether the codes were signed is the codes' dtype at :func:`pack` time and is not stored in the words:
:func:`unpack` and :func:`decode_fields` take it as ``signed`` (``unpack(pack(c, b, a), b, a, K,
signed=<c's dtype is signed>)`` gives ``c`` back, as int8 or uint8).

All other axes keep their size. Same plane layout as REFERENCES.md's suggestion for int4 kernels.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np

PACK_BITS = (1, 2, 4, 8)


def _check_bits(bits) -> int:
    value = as_int(bits)
    if value not in PACK_BITS:
        raise ValueError(f"bits={bits!r} cannot be packed; allowed: {PACK_BITS}")
    return value


def check_axis(axis, ndim: int, who: str) -> int:
    """``axis`` normalised to ``axis mod ndim`` in ``[0, ndim)``; an axis outside ``[-ndim, ndim)`` or not an
    integer raises a ``ValueError`` naming ``who`` and the allowed range."""
    axis_int = as_int(axis)
    if axis_int is None or not -ndim <= axis_int < ndim:
        allowed = f"[{-ndim}, {ndim - 1}]" if ndim else "none (a rank-0 array has no axis to pack along)"
        raise ValueError(f"{who}: axis={axis!r} is out of range for rank {ndim}; allowed: {allowed}")
    return axis_int % ndim


def as_int(value) -> int | None:
    """``value`` as a Python int if it is an integer (numpy integers included, bools not)."""
    if isinstance(value, bool | np.bool_):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """The codes a ``bits``-bit field holds: ``(-1, 1)`` for signed 1-bit (values +-1 only)."""
    if signed:
        return (-1, 1) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return 0, 2**bits - 1


def _check_codes(codes, bits: int) -> bool:
    dtype = jnp.asarray(codes).dtype if not hasattr(codes, "dtype") else codes.dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"pack: codes must have an integer dtype, got {dtype}; allowed: int8, "
                         "uint8, int16, uint16, int32, uint32 (cast float codes first)")
    signed = bool(jnp.issubdtype(dtype, jnp.signedinteger))
    if not isinstance(codes, jax.core.Tracer):
        values = np.asarray(codes)
        lo, hi = code_range(bits, signed)
        bad = (values < lo) | (values > hi)
        if bits == 1 and signed:
            bad |= values == 0
        if bad.any():
            allowed = "{-1, +1}" if bits == 1 and signed else f"[{lo}, {hi}]"
            raise ValueError(f"pack: code {values[bad].flat[0]} does not fit in {bits} bits "
                             f"({'signed' if signed else 'unsigned'}); allowed: {allowed}")
    return signed


def packed_size(size: int, bits: int) -> int:
    """Words that hold ``size`` codes of ``bits`` bits: ``P = ceil(size / (32 // bits))``."""
    bits, count = _check_bits(bits), as_int(size)
    if count is None or count < 0:
        raise ValueError(f"packed_size: size={size!r}; allowed: an integer >= 0")
    return -(-count // (32 // bits))


def pack(codes: jax.Array, bits: int, axis: int = 0) -> jax.Array:
    """Pack integer ``codes`` of ``bits`` bits into uint32 words along ``axis`` (module docstring):
    ``word[p] = sum_j stored(code[p + j P]) << (j bits)`` with ``P = ceil(K / (32 // bits))``.

    Signed dtypes are stored as offset binary (binary ``{-1, +1} -> {0, 1}``), unsigned ones as they are.
    Returns an array of the same rank with ``P`` entries along ``axis``. Concrete codes that do not fit
    raise ``ValueError``; traced codes (under ``jit``) cannot be checked: each is stored as the low ``bits``
    bits of its field, so a code that does not fit changes its own value, never its neighbours'.
    """
    bits = _check_bits(bits)
    signed = _check_codes(codes, bits)
    codes = jnp.asarray(codes)
    axis = check_axis(axis, codes.ndim, "pack")
    x = jnp.moveaxis(codes, axis, 0).astype(jnp.int32)
    if signed:
        x = (x + 1) // 2 if bits == 1 else x + 2 ** (bits - 1)
    n = 32 // bits
    length = x.shape[0]
    words = packed_size(length, bits)
    fields = x.astype(jnp.uint32) & jnp.uint32(2**bits - 1)  # a traced misfit stays in its field
    x = jnp.pad(fields, [(0, n * words - length)] + [(0, 0)] * (x.ndim - 1))
    planes = x.reshape(n, words, *x.shape[1:])
    shifts = (jnp.arange(n, dtype=jnp.uint32) * bits).reshape((n,) + (1,) * (x.ndim))
    packed = jnp.sum(planes << shifts, axis=0, dtype=jnp.uint32)
    return jnp.moveaxis(packed, 0, axis)


def decode_fields(stored: jax.Array, bits: int, signed: bool) -> jax.Array:
    """The integer code of an unsigned ``bits``-bit field (int32 in, int32 out), inverse of the storage in
    :func:`pack`: signed ``bits >= 2`` is offset binary ``c = f - 2^(bits-1)``; signed 1-bit is
    binary ``c = 2f - 1`` (``{0, 1} -> {-1, +1}``); unsigned codes are stored as they are."""
    if not signed:
        return stored
    return 2 * stored - 1 if bits == 1 else stored - (1 << (bits - 1))


ELEMENTS = ("int", "e2m1")
"""What a packed field holds: an integer code (:func:`decode_fields`) or an FP4 E2M1 bit pattern
(:func:`decode_e2m1`, 4-bit fields: MXFP4 / NVFP4 elements)."""


def decode_e2m1(stored: jax.Array) -> jax.Array:
    """The float32 value of a 4-bit E2M1 bit pattern (int32 in): sign ``s = f >> 3``, exponent ``e = (f >> 1)
    & 3``, mantissa ``m = f & 1``; ``|v| = m / 2`` for ``e = 0`` (subnormal), else ``(1 + m / 2) 2^(e - 1)``:
    ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` with a sign (OCP Microscaling Formats v1.0, section 5.3.3). 32-bit
    integer shifts and masks only, as the kernels need."""
    stored = stored.astype(jnp.int32)
    e, m = (stored >> 1) & 3, (stored & 1).astype(jnp.float32)
    power = jnp.left_shift(jnp.int32(1), e).astype(jnp.float32) * 0.5  # 2^(e - 1)
    mag = jnp.where(e == 0, m * 0.5, (1.0 + m * 0.5) * power)
    return jnp.where((stored >> 3) & 1 == 1, -mag, mag)


def decode_element(stored: jax.Array, bits: int, signed: bool, element: str) -> jax.Array:
    """A field's value as float32: :func:`decode_e2m1` for ``element="e2m1"``, else the integer code of
    :func:`decode_fields`."""
    if element == "e2m1":
        return decode_e2m1(stored)
    return decode_fields(stored.astype(jnp.int32), bits, signed).astype(jnp.float32)


def unpack(words: jax.Array, bits: int, axis: int, size: int, signed: bool = True) -> jax.Array:
    """Inverse of :func:`pack`: uint32 ``words`` -> ``size`` codes along ``axis``,
    ``code[j P + p] = decode_fields((word[p] >> j bits) & (2^bits - 1))``.

    ``signed`` says how the fields were stored, i.e. whether the codes given to :func:`pack` had a signed
    dtype: ``True`` (default) gives int8 codes (offset binary; binary ``{0, 1} -> {-1, +1}``), ``False``
    gives the stored fields as uint8 codes (``uint2`` .. ``uint8``, table indices, float bit patterns).
    """
    bits = _check_bits(bits)
    if not isinstance(signed, bool | np.bool_):
        raise TypeError(f"unpack: signed={signed!r}; allowed: True or False (the packed codes' dtype was "
                        "signed)")
    words = jnp.asarray(words)
    if words.dtype != jnp.uint32:
        raise ValueError(f"unpack: words must be uint32, got {words.dtype}; allowed: uint32")
    axis = check_axis(axis, words.ndim, "unpack")
    n = 32 // bits
    count = words.shape[axis]
    given, size = size, as_int(size)
    if size is None or not n * (count - 1) < size <= n * count:
        raise ValueError(f"unpack: size={given!r} does not match {count} words of {n} codes each; "
                         f"allowed: {n * (count - 1) + 1} .. {n * count}")
    w = jnp.moveaxis(words, axis, 0)
    shifts = (jnp.arange(n, dtype=jnp.uint32) * bits).reshape((n,) + (1,) * w.ndim)
    planes = (w[None] >> shifts) & jnp.uint32(2**bits - 1)
    values = planes.reshape(n * count, *w.shape[1:])[:size]
    if signed:
        values = decode_fields(values.astype(jnp.int32), bits, signed).astype(jnp.int8)
    else:
        values = values.astype(jnp.uint8)
    return jnp.moveaxis(values, 0, axis)
