"""QArray: a quantized array as a pytree of codes and scales (+ zero point) with static metadata.

Leaves: ``codes`` (the format's code dtype, or uint32 words once packed), ``scale`` (in the block view of
the granularity, see :mod:`qjax.granularity`; float32, or as a block scale rule stores it: uint8 E8M0
exponents for ``e8m0``, float8_e4m3fn for ``nvfp4``), ``zero_point`` (float32 or ``None``) and
``tensor_scale`` (``nvfp4``'s float32 scale per tensor, with every block-view axis of size 1; else
``None``). Static aux data: the format name, the resolved granularity (negative axes), the float dtype to
dequantize to, the number of binary bases, and the packing ``(axis, size, bits)`` or ``None``. Being a
registered dataclass, a QArray passes through ``jit``, ``vmap``, ``tree_map``, sharding and Orbax like any
pytree.

Value: ``x ~ dequantize(q) = from_blocks((decode(codes) - zero_point) * s)`` with the float32 scale
``s = scale_value(scale, tensor_scale)`` (:func:`qjax.scales.scale_value`); with ``bases = k > 1``
(multi-basis binary) codes and scales carry a leading axis of ``k`` and the value is their sum over it.

Construction checks what it is given: the format, granularity, dtype, bases and packing; the codes' dtype
(the format's code dtype, uint32 words once packed, with as many words as the packing says); the scales'
and zero points' shape (the block view of the granularity with its reduced axes of size 1; leading axes may
be full size, as in a QArray stacked by ``vmap``) and dtype (float; a scale also uint8), and the tensor
scale's (every block-view axis of size 1, float). Leaves that are not arrays (shardings,
``None``) are not checked. When the codes are concrete (not traced) their values are checked too: an
integer code inside the format's range (binary: +-1), a table index inside the table. Under ``jit`` the
values cannot be checked: an out-of-range integer code dequantizes to its own value times the scale, an
index past a table reads the table's last value (JAX clamps gathers). A QArray that JAX rebuilds from a
checked one's leaves (after ``jit``, ``vmap``, ``tree_map``, an NNX state merge) is not checked again.
Packed words carry no format: relabelling a packed QArray with another format of the same bits (``int4`` as
``nf4``) reads the same fields as that format.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax import packing
from qjax.formats import Format, get_format
from qjax.granularity import Granularity, PerBlock, PerGroup
from qjax.scales import scale_value


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
    tensor_scale: jax.Array | None = None

    def __post_init__(self):
        _check(self)

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
        """Real bytes of the leaves (codes + scales + zero points + tensor scale)."""
        return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(self))

    def dequantize(self) -> jax.Array:
        return dequantize(self)

    def pack(self, axis: int = 0) -> QArray:
        return pack(self, axis)

    def unpack(self) -> QArray:
        return unpack(self)


_LEAVES = ("codes", "scale", "zero_point", "tensor_scale")
_STATIC = ("format", "granularity", "dtype", "bases", "packing")


def _children(q: QArray):
    return tuple(getattr(q, name) for name in _LEAVES), tuple(getattr(q, name) for name in _STATIC)


def _children_with_keys(q: QArray):
    leaves, static = _children(q)
    return tuple(zip(map(jax.tree_util.GetAttrKey, _LEAVES), leaves, strict=True)), static


def _rebuild(static, leaves) -> QArray:
    """A QArray rebuilt by JAX (after ``jit``, ``vmap``, ``tree_map``, an NNX state merge) from leaves of a
    QArray that was checked when it was built: not checked again (``vmap`` stacks leaves in front of the
    bases axis, and a value check would wait for the device each time)."""
    q = object.__new__(QArray)
    for name, value in zip(_STATIC + _LEAVES, (*static, *leaves), strict=True):
        object.__setattr__(q, name, value)
    return q


jax.tree_util.register_pytree_with_keys(QArray, _children_with_keys, _rebuild, _children)


def _spec(leaf) -> tuple[tuple[int, ...], np.dtype] | None:
    """``(shape, dtype)`` of an array-like leaf (array, tracer, ShapeDtypeStruct), else ``None``."""
    try:
        return tuple(leaf.shape), np.dtype(leaf.dtype)
    except (AttributeError, TypeError):
        return None


def _check(q: QArray) -> None:
    """The checks of the module docstring; raises ``ValueError`` (``TypeError`` for a granularity that is
    not one) naming the bad value and what is allowed."""
    fmt = q.fmt
    if not isinstance(q.granularity, Granularity):
        raise TypeError(f"QArray: granularity {q.granularity!r} is not a granularity; allowed: PerTensor, "
                        "PerChannel, PerToken, PerGroup, PerBlock")
    try:
        floating = jnp.issubdtype(jnp.dtype(q.dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise ValueError(f"QArray: dtype {q.dtype!r} is what dequantize returns; allowed: a float dtype name "
                         "('float32', 'bfloat16', 'float16')")
    if not isinstance(q.bases, int) or isinstance(q.bases, bool) or q.bases < 1:
        raise ValueError(f"QArray: bases={q.bases!r}; allowed: a positive integer")
    codes = _spec(q.codes)
    if codes is None or codes[1] == jax.dtypes.float0:  # shardings, None, a cotangent's codes
        return
    lead = (q.bases,) if q.bases > 1 else ()
    if codes[0][:len(lead)] != lead:
        raise ValueError(f"QArray: codes of shape {codes[0]} with bases={q.bases}; allowed: a leading axis "
                         f"of {q.bases}")
    shape = codes[0][len(lead):]
    if q.packing is None:
        if codes[1] != fmt.code_dtype:
            raise ValueError(f"QArray: codes of dtype {codes[1]} for format {fmt.name!r}; allowed: "
                             f"{fmt.code_dtype} (the format's code dtype; quantize(q, x) makes them)")
    else:
        shape = _packed_shape(q, fmt, shape, codes[1])
    object.__setattr__(q, "granularity", q.granularity.resolve(shape))
    blocks = _block_shape(q.granularity, shape)
    reduce = set(q.granularity.reduce_axes(len(blocks)))
    for name in ("scale", "zero_point"):
        _check_scale(name, _spec(getattr(q, name)), lead, blocks, reduce, q.granularity, shape)
    _check_scale("tensor_scale", _spec(q.tensor_scale), lead, blocks, set(range(len(blocks))),
                 q.granularity, shape)
    if q.packing is None and isinstance(q.codes, np.ndarray | jax.Array) and not isinstance(
            q.codes, jax.core.Tracer):
        _check_code_values(fmt, q.codes)


def _packed_shape(q: QArray, fmt: Format, words: tuple[int, ...], dtype) -> tuple[int, ...]:
    """The unpacked shape of packed ``words``, checking ``q.packing`` against them."""
    spec = q.packing
    ok = isinstance(spec, tuple) and len(spec) == 3 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in spec)
    if not ok or not -len(words) <= spec[0] < 0 or spec[1] < 0 or spec[2] != _container_bits(fmt):
        raise ValueError(f"QArray: packing={spec!r} for format {fmt.name!r} and words of shape {words}; "
                         f"allowed: None or (axis in [-{len(words)}, -1], size >= 0, bits="
                         f"{_container_bits(fmt)})")
    axis, size, bits = spec
    if dtype != jnp.uint32 or words[axis] != packing.packed_size(size, bits):
        raise ValueError(f"QArray: packed codes of shape {words} and dtype {dtype}; allowed: uint32 words "
                         f"with {packing.packed_size(size, bits)} along axis {axis} for size {size} at "
                         f"{bits} bits")
    return (*words[:axis % len(words)], size, *words[axis % len(words) + 1:])


def _block_shape(gran: Granularity, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of ``gran.to_blocks`` of an array of ``shape``."""
    if isinstance(gran, PerGroup):
        axis = gran.axis % len(shape)
        return (*shape[:axis], shape[axis] // gran.size, gran.size, *shape[axis + 1:])
    if isinstance(gran, PerBlock):
        return (-(-math.prod(shape) // gran.size), gran.size)
    return shape


def _check_scale(name: str, spec, lead: tuple[int, ...], blocks: tuple[int, ...], reduce: set[int],
                 gran: Granularity, shape: tuple[int, ...]) -> None:
    """A scale (zero point, tensor scale) has the block view's shape with the ``reduce`` axes of size 1; a
    reduced axis may be full size only in a run of leading full axes (a stack of QArrays made by ``vmap``).
    A scale may also be uint8 (E8M0 exponents, :func:`qjax.scales.scale_value`)."""
    if spec is None:
        return
    if not jnp.issubdtype(spec[1], jnp.floating) and not (name == "scale" and spec[1] == jnp.uint8):
        allowed = "a float dtype (float32), or uint8 (E8M0 exponents)" if name == "scale" else \
            "a float dtype (float32)"
        raise ValueError(f"QArray: {name} of dtype {spec[1]}; allowed: {allowed}")
    expected = (*lead, *(1 if i in reduce else n for i, n in enumerate(blocks)))
    fits, stacked = len(spec[0]) == len(expected), True
    for i, (s, n) in enumerate(zip(spec[0][len(lead):], blocks, strict=False)):
        stacked = stacked and s == n
        fits = fits and (s == n if i not in reduce else s == 1 or stacked)
    if not fits or spec[0][:len(lead)] != lead:
        raise ValueError(f"QArray: {name} of shape {spec[0]} does not fit codes of shape {shape} with "
                         f"{gran}; allowed: {expected} (the block view with the reduced axes of size 1)")


def _check_code_values(fmt: Format, codes: jax.Array) -> None:
    """Raise ``ValueError`` unless every (concrete) code is one of ``fmt``'s: an integer in ``[lo, hi]``
    (binary: +-1), a table index below the table's length; float codes are always valid."""
    if fmt.kind == "float":
        return
    lo, hi = (0, len(fmt.table) - 1) if fmt.kind == "table" else (int(fmt.lo), int(fmt.hi))
    info = jnp.iinfo(codes.dtype)
    if info.min >= lo and info.max <= hi:
        return  # every value of the dtype is a code
    bad = (codes < lo) | (codes > hi) | ((codes == 0) if fmt.kind == "binary" else False)
    if bool(jnp.any(bad)):
        allowed = "{-1, +1}" if fmt.kind == "binary" else f"[{lo}, {hi}]"
        raise ValueError(f"QArray: code {np.asarray(codes)[np.asarray(bad)].flat[0]} is not a {fmt.name!r} "
                         f"code; allowed: {allowed}")


def dequantize_blocks(fmt: Format, codes_b: jax.Array, scale: jax.Array,
                      zero_point: jax.Array | None, bases: int, dtype=jnp.float32) -> jax.Array:
    """float32 values of codes in the block view, each saturated at ``dtype``'s largest finite value
    (:meth:`Format.dequant`); multi-basis codes are summed basis by basis."""
    if bases == 1:
        return fmt.dequant(codes_b, scale, zero_point, dtype=dtype)
    value = fmt.dequant(codes_b[0], scale[0], dtype=dtype)
    for i in range(1, bases):
        value = value + fmt.dequant(codes_b[i], scale[i], dtype=dtype)
    return value


def dequantize(q: QArray) -> jax.Array:
    """``(decode(codes) - zero_point) * s`` (summed over bases), reshaped to ``q.shape``, ``q.dtype``; ``s``
    is :func:`qjax.scales.scale_value` of the stored ``scale`` and ``tensor_scale``."""
    if not isinstance(q, QArray):
        raise ValueError(f"dequantize expects a QArray, got {type(q).__name__}")
    q = unpack(q)
    shape = q.shape
    to_blocks = q.granularity.to_blocks
    codes_b = jax.vmap(to_blocks)(q.codes) if q.bases > 1 else to_blocks(q.codes)
    scale = scale_value(q.scale, q.tensor_scale)
    value = dequantize_blocks(q.fmt, codes_b, scale, q.zero_point, q.bases, q.dtype)
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
    their bit patterns. A QArray packed along ``axis`` already is returned as it is; one packed along
    another axis is refused (``unpack()`` it first)."""
    axis = packing.check_axis(axis, len(q.shape), "QArray.pack") - len(q.shape)
    if q.packing is not None:
        packed = q.packing[0] % len(q.shape)
        if q.packing[0] != axis:
            raise ValueError(f"QArray.pack: axis={axis % len(q.shape)} of a QArray packed along axis "
                             f"{packed} already; allowed: axis={packed} (a no-op), or unpack() first")
        return q
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
