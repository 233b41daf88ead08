"""QArray: a quantized array as a pytree of codes and scales (+ zero point) with static metadata.

Leaves: ``codes`` (the format's code dtype, or uint32 words once packed), ``scale`` (float32, in the block
view of the granularity, see :mod:`qjax.granularity`) and ``zero_point`` (float32 or ``None``). Static aux
data: the format name, the resolved granularity (negative axes), the float dtype to dequantize to, the
number of binary bases, and the packing ``(axis, size, bits)`` or ``None``. Being a registered dataclass,
a QArray passes through ``jit``, ``vmap``, ``tree_map``, sharding and Orbax like any pytree.

Value: ``x ~ dequantize(q) = from_blocks((decode(codes) - zero_point) * scale)``; with ``bases = k > 1``
(multi-basis binary) codes and scales carry a leading axis of ``k`` and the value is their sum over it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qjax import packing
from qjax.formats import Format, get_format
from qjax.granularity import Granularity


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    codes: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    format: str = dataclasses.field(metadata=dict(static=True))
    granularity: Granularity = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))
    bases: int = dataclasses.field(default=1, metadata=dict(static=True))
    packing: tuple[int, int, int] | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def fmt(self) -> Format:
        return get_format(self.format)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the dequantized array."""
        shape = list(self.codes.shape[1:] if self.bases > 1 else self.codes.shape)
        if self.packing is not None:
            axis, size, _ = self.packing
            shape[axis] = size
        return tuple(shape)

    @property
    def nbytes(self) -> int:
        """Real bytes of the leaves (codes + scales + zero points)."""
        return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(self))

    def dequantize(self) -> jax.Array:
        return dequantize(self)

    def pack(self, axis: int = 0) -> QArray:
        return pack(self, axis)

    def unpack(self) -> QArray:
        return unpack(self)


def dequantize_blocks(fmt: Format, codes_b: jax.Array, scale: jax.Array,
                      zero_point: jax.Array | None, bases: int) -> jax.Array:
    """float32 values of codes in the block view; multi-basis codes are summed basis by basis."""
    if bases == 1:
        return fmt.dequant(codes_b, scale, zero_point)
    value = fmt.dequant(codes_b[0], scale[0])
    for i in range(1, bases):
        value = value + fmt.dequant(codes_b[i], scale[i])
    return value


def dequantize(q: QArray) -> jax.Array:
    """``(decode(codes) - zero_point) * scale`` (summed over bases), reshaped to ``q.shape``, ``q.dtype``."""
    if not isinstance(q, QArray):
        raise ValueError(f"dequantize expects a QArray, got {type(q).__name__}")
    q = unpack(q)
    shape = q.shape
    to_blocks = q.granularity.to_blocks
    codes_b = jax.vmap(to_blocks)(q.codes) if q.bases > 1 else to_blocks(q.codes)
    value = dequantize_blocks(q.fmt, codes_b, q.scale, q.zero_point, q.bases)
    return q.granularity.from_blocks(value, shape).astype(q.dtype)


def _container_bits(fmt: Format) -> int:
    return next(b for b in packing.PACK_BITS if b >= fmt.bits)


def _codes_as_ints(fmt: Format, codes: jax.Array) -> jax.Array:
    if fmt.kind != "float":
        return codes
    raw = jax.lax.bitcast_convert_type(codes, jnp.uint4 if fmt.bits == 4 else jnp.uint8)
    return raw.astype(jnp.uint8)


def _ints_as_codes(fmt: Format, ints: jax.Array) -> jax.Array:
    if fmt.kind != "float":
        return ints.astype(fmt.code_dtype)
    raw = ints.astype(jnp.uint4) if fmt.bits == 4 else ints
    return jax.lax.bitcast_convert_type(raw, fmt.code_dtype)


def pack(q: QArray, axis: int = 0) -> QArray:
    """Pack ``q``'s codes into uint32 words along ``axis`` of the dequantized shape (see
    :mod:`qjax.packing`). Codes of 3, 5, 6 or 7 bits use 4- or 8-bit fields; float codes are packed by
    their bit patterns."""
    if q.packing is not None:
        return q
    axis = packing.check_axis(axis, len(q.shape), "QArray.pack") - len(q.shape)
    bits = _container_bits(q.fmt)
    words = packing.pack(_codes_as_ints(q.fmt, q.codes), bits, axis)
    return dataclasses.replace(q, codes=words, packing=(axis, q.shape[axis], bits))


def unpack(q: QArray) -> QArray:
    """Undo :func:`pack`; an unpacked QArray passes through."""
    if q.packing is None:
        return q
    axis, size, bits = q.packing
    signed = q.fmt.is_integer and q.fmt.signed
    ints = packing.unpack(q.codes, bits, axis, size, signed=signed)
    return dataclasses.replace(q, codes=_ints_as_codes(q.fmt, ints), packing=None)
