"""Number formats: which values a quantized element can take, and how codes are stored.

A format maps a float input already divided by its scale, ``u = x / s`` (in "grid units"), to a code
(``encode``) and a code back to its float value (``decode``). Scales, granularity and gradients live in
:mod:`qjax.quantizer`; this module knows nothing of them.

Formats, by name:

=====================  ========================================================  ==============
name                   values (grid units)                                       code dtype
=====================  ========================================================  ==============
``int2`` .. ``int8``   ``-2^(b-1) .. 2^(b-1)-1``, round half to even              int8
``uint2`` .. ``uint8`` ``0 .. 2^b-1``                                             uint8
``binary``             ``{-1, +1}``, ``+1`` for ``u >= 0`` (never 0)              int8
``ternary``            ``{-1, 0, +1}`` (BitNet b1.58)                             int8
``fp8_e4m3``           float8 E4M3FN, ``|u| <= 448``                              float8_e4m3fn
``fp8_e5m2``           float8 E5M2, ``|u| <= 57344``                              float8_e5m2
``fp4_e2m1``           float4 E2M1 (OCP MX), ``|u| <= 6``                         float4_e2m1fn
``nf4``                the 16 NormalFloat values of QLoRA (Dettmers et al. 2023)  uint8 index
``dynamic``            256-value signed dynamic map (Dettmers et al. 2022)        uint8 index
``dynamic_unsigned``   256-value unsigned dynamic map                             uint8 index
=====================  ========================================================  ==============

Float formats round to nearest even and saturate at their largest finite value; table formats
(``nf4``, dynamic maps) round to the nearest table value, comparing both neighbours.

Block formats (microscaling): an element format above plus ``PerGroup(axis, block)`` plus a block scale
rule (:mod:`qjax.scales`), built by :mod:`qjax.presets` along the contraction axis; real bits per element
once packed, scales included:

========================  ========  =====  ========================================================  ====
preset                    elements  block  scale, as stored                                          bits
========================  ========  =====  ========================================================  ====
``mxfp8(axis)`` (OCP MX)  fp8_e4m3  32     ``e8m0``: ``2^(floor(log2 amax) - 8)``, a uint8 exponent  8.25
``mxfp4(axis)`` (OCP MX)  fp4_e2m1  32     ``e8m0``: ``2^(floor(log2 amax) - 2)``, a uint8 exponent  4.25
``nvfp4(axis)`` (NVIDIA)  fp4_e2m1  16     ``nvfp4``: float8_e4m3fn per block, float32 per tensor    4.5
========================  ========  =====  ========================================================  ====
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

INT_BITS = tuple(range(2, 9))

# QLoRA's NormalFloat-4: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero
# (Dettmers et al., "QLoRA", 2023, appendix E). `normal_float_map` rebuilds it from the quantiles.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

_FLOAT_DTYPES = {
    "fp8_e4m3": jnp.float8_e4m3fn,
    "fp8_e5m2": jnp.float8_e5m2,
    "fp4_e2m1": jnp.float4_e2m1fn,
}


def dynamic_map(signed: bool = True) -> np.ndarray:
    """The 256-value dynamic (tree) quantization map of 8-bit optimizers, sorted, float32.

    Per decade ``10^(i-6)``, ``i = 0..6``, the values are ``10^(i-6) * mid(linspace(0.1, 1, n_i + 1))``
    where ``mid`` takes the midpoints of consecutive points, with ``n_i = 2^i`` values (signed, mirrored
    to negatives) or ``2^(i+1)`` values (unsigned); then ``0`` and ``1.0`` are added.

    Signed: 127 negatives down to -0.99297 (no -1.0), 0 at index 127, 127 positives from 5.5e-7,
    and 1.0 at index 255. Unsigned: 0, 254 positives from 3.25e-7, and 1.0.

    Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise Quantization", ICLR 2022.
    """
    if not isinstance(signed, bool | np.bool_):
        raise TypeError(f"dynamic_map: signed must be a bool, got {signed!r}; allowed: True, False")
    values = [0.0, 1.0]
    for i in range(7):
        count = 2**i if signed else 2 ** (i + 1)
        edges = np.linspace(0.1, 1.0, count + 1)
        means = 10.0 ** (i - 6) * (edges[:-1] + edges[1:]) / 2.0
        values += means.tolist()
        if signed:
            values += (-means).tolist()
    assert len(values) == 256
    return np.sort(np.asarray(values, dtype=np.float32))


def normal_float_map(offset: float = 0.9677083) -> np.ndarray:
    """Rebuild the NF4 table: ``Phi^-1`` of evenly spaced probabilities, normalised by the maximum.

    Positives: ``Phi^-1(linspace(offset, 0.5, 9)[:-1])``; negatives: ``-Phi^-1(linspace(offset, 0.5,
    8)[:-1])``; plus 0. Asymmetric so that 0 is exact with 16 values (QLoRA, Dettmers et al. 2023).
    """
    from jax.scipy.special import ndtri

    with jax.default_device(jax.devices("cpu")[0]):
        pos = np.asarray(ndtri(jnp.linspace(offset, 0.5, 9)[:-1]))
        neg = -np.asarray(ndtri(jnp.linspace(offset, 0.5, 8)[:-1]))
    values = np.sort(np.concatenate([pos, [0.0], neg]))
    return (values / np.abs(values).max()).astype(np.float32)


@functools.cache
def _table_buckets(table: tuple[float, ...]) -> tuple[int, np.ndarray, np.ndarray]:
    """Nearest-value lookup of a sorted table in two gathers, equal to ``searchsorted(midpoints, u)``.

    Float32 bit patterns are cut into buckets by their top ``32 - shift`` bits, with ``shift`` the largest
    such that no bucket holds two midpoints; ``base[bucket]`` counts the midpoints below the bucket, so the
    code of ``u`` is ``base + (midpoints[base] < u)`` (``midpoints`` padded with ``+inf``).
    """
    t = np.asarray(table, np.float32)
    mid = (t[1:] + t[:-1]) / np.float32(2)
    shift = next(s for s in range(23, -1, -1) if np.bincount(mid.view(np.uint32) >> s).max() <= 1)
    buckets = np.arange(1 << (32 - shift), dtype=np.uint64)
    first = (buckets << np.uint64(shift)).astype(np.uint32).view(np.float32)
    last = (((buckets + 1) << np.uint64(shift)) - 1).astype(np.uint32).view(np.float32)
    negative = buckets >= 1 << (31 - shift)
    low = np.where(negative, np.where(np.isnan(last), -np.inf, last), first)  # smallest value in bucket
    base = np.searchsorted(mid, low, side="left").astype(np.uint8)
    return shift, base, np.append(mid, np.float32(np.inf))


DYNAMIC_MAPS = ("dynamic", "dynamic_unsigned")


@dataclasses.dataclass(frozen=True)
class _DynamicCodec:
    """Constants of the arithmetic encoder of one dynamic map (see :func:`_dynamic_codec`)."""

    signed: bool
    e_min: int  # decades of the position m: e = floor(log2 m) in [e_min, e_max]
    e_max: int
    bounds: tuple[float, ...]  # the map's midpoint between decades e - 1 and e, for e = e_min + 1 .. e_max
    divisors: tuple[float, ...]  # D_e = 5^(E - e) 2^s for e = e_min .. e_max (integers, exact in float32)
    first_mid: float  # midpoint between 0 and the smallest positive value
    last_mid: float  # midpoint between the largest value below 1 and 1.0


def _dynamic_values(positions: np.ndarray, codec: _DynamicCodec) -> np.ndarray:
    """``T(m) = (18 m + 9 - 16 * 2^e) / D_e`` in float32 (one correctly rounded division), ``e =
    floor(log2 m)``, for positions ``m`` inside the decades (not 0, not the final 1.0)."""
    e = np.floor(np.log2(positions)).astype(np.int64)
    numerator = (18 * positions + 9 - 16 * 2**e).astype(np.float32)
    return numerator / np.asarray(codec.divisors, np.float32)[e - codec.e_min]


@functools.cache
def _dynamic_codec(signed: bool) -> _DynamicCodec:
    """The arithmetic form of :func:`dynamic_map`, checked value for value against the table.

    Positions: the signed map's code ``c`` has magnitude position ``m = |c - 127|`` (``m = 0`` is 0,
    ``m = 128``, code 255, is 1.0; negative codes mirror positive ones); the unsigned map's code has
    ``m = c + 1`` (code 0 is 0, code 255 is 1.0). Every other ``m`` lies in the decade holding the ``2^e``
    positions with ``e = floor(log2 m)``, and its value, the midpoint formula of :func:`dynamic_map`
    (Dettmers et al., ICLR 2022) written as one fraction, is::

        T(m) = 10^(i-6) * (0.1 + 0.9 (j + 1/2) / n_i) = (18 m + 9 - 16 * 2^e) / D_e,
        D_e = 5^(E - e) * 2^s,  (E, s) = (7, 8) signed, (8, 9) unsigned

    with numerator and ``D_e`` integers below 2^24, so the float32 table value is the correctly rounded
    quotient (checked here for all 256 codes).
    """
    big_e, s, e_min, e_max = (7, 8, 0, 6) if signed else (8, 9, 1, 7)
    table = dynamic_map(signed)
    mid = (table[1:] + table[:-1]) / np.float32(2)
    positive_mid = mid[127:] if signed else mid  # positive_mid[k]: between positions k + first, k + first + 1
    first = 0 if signed else 1
    codec = _DynamicCodec(
        signed=signed,
        e_min=e_min,
        e_max=e_max,
        bounds=tuple(float(positive_mid[2**e - 1 - first]) for e in range(e_min + 1, e_max + 1)),
        divisors=tuple(float(5 ** (big_e - e) * 2**s) for e in range(e_min, e_max + 1)),
        first_mid=float(positive_mid[0]),
        last_mid=float(positive_mid[-1]),
    )
    inner = np.arange(1, 128) if signed else np.arange(2, 256)  # positions of the values strictly inside
    values = table[128:255] if signed else table[1:255]
    if not np.array_equal(_dynamic_values(inner, codec).view(np.uint32), values.view(np.uint32)):
        raise RuntimeError("dynamic_map differs from its arithmetic form; the fast encoder needs it")
    if signed and not np.array_equal(table[:127], -table[128:255][::-1]):
        raise RuntimeError("dynamic_map(signed=True) is not mirrored; the fast encoder needs it")
    return codec


def _dynamic_encode(u: jax.Array, codec: _DynamicCodec) -> jax.Array:
    """Nearest code of a dynamic map, computed from ``u`` (no table): equal to ``searchsorted(midpoints,
    u, side="left")`` of the table for every float32 ``u`` (NaN as 0), i.e. the nearest value with ties
    to the lower code.

    Let ``a = |u|`` and ``P(a)`` the number of positive midpoints below ``a`` (the position of the
    nearest positive value). The decade ``e`` is counted exactly against the map's own midpoints between
    decades; inside it the values are evenly spaced, ``T(m) = (18 m + 9 - 16 * 2^e) / D_e``, so
    ``y = (a D_e + 16 * 2^e) / 18`` is within a hair of the position where the midpoint between ``m - 1``
    and ``m`` sits at ``y = m``. With ``r = round(y)`` (clamped to the decade), one exact comparison with
    that midpoint, ``(T(r - 1) + T(r)) / 2`` in float32 as the table's, decides ``m = r - 1`` or ``r``.
    Signed map: code ``127 + P(a)`` for ``u > 0``; for ``u < 0`` the midpoints *at or below* ``a`` count
    (ties go to the lower, more negative code), which is ``P(nextafter(a, inf))``, capped at 127 since the
    map has no -1.0.
    """
    f32 = jnp.float32
    bits = jax.lax.bitcast_convert_type(u.astype(f32), jnp.int32)
    magnitude = bits & 0x7FFFFFFF
    nan = magnitude > 0x7F800000
    neg = (bits < 0) & ~nan
    # NaN -> 0; Inf and |u| > 2 -> 2 (integer selects: XLA's float min/max would also handle NaN).
    magnitude = jnp.where(nan, 0, jnp.where(magnitude > 0x40000000, 0x40000000, magnitude))
    if codec.signed:
        magnitude = magnitude + neg.astype(jnp.int32)  # next float up: count midpoints <= |u|
    a = jax.lax.bitcast_convert_type(magnitude, f32)
    e = jnp.full(a.shape, codec.e_min, jnp.int32)
    d = jnp.full(a.shape, codec.divisors[0], f32)
    for bound, divisor in zip(codec.bounds, codec.divisors[1:], strict=True):
        above = a > f32(bound)
        e = e + above.astype(jnp.int32)
        d = jnp.where(above, f32(divisor), d)
    pow2 = jax.lax.bitcast_convert_type((e + 127) << 23, f32)
    r = jnp.floor((a * d + f32(16) * pow2) * f32(1 / 18) + f32(0.5))
    lowest, highest = pow2 + f32(1), f32(2) * pow2 - f32(1)
    r = jnp.where(r > highest, highest, jnp.where(r < lowest, lowest, r))
    n_r = f32(18) * r + (f32(9) - f32(16) * pow2)
    midpoint = (n_r / d + (n_r - f32(18)) / d) * f32(0.5)
    m = jnp.where(a > midpoint, r, r - f32(1))
    m = jnp.where(a > f32(codec.last_mid), f32(128 if codec.signed else 256), m)
    if codec.signed:
        m = jnp.where(a > f32(codec.first_mid), m, f32(0))
        code = jnp.where(neg, jnp.where(m > f32(127), f32(0), f32(127) - m), f32(127) + m)
    else:
        m = jnp.where(a > f32(codec.first_mid), m, f32(1))
        code = jnp.where(neg, f32(0), m - f32(1))
    # code is a whole number in [0, 255]: adding 2^23 puts it in the low mantissa bits (no float->int
    # conversion with its saturation checks); the uint8 conversion keeps the low byte.
    return jax.lax.bitcast_convert_type(code + f32(2**23), jnp.int32).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class Format:
    """A set of representable values, in grid units, and the dtype its codes are stored in.

    Attributes:
      name: the format's name (see the module docstring).
      kind: ``"int"``, ``"binary"``, ``"ternary"``, ``"float"`` or ``"table"``.
      bits: bits per element in packed storage.
      lo, hi: the smallest and largest representable value (the clipping range of ``encode``).
      max_abs: the value an absmax scale maps the largest input magnitude to.
      edge: the value an ``absmax_edge`` scale maps it to: ``hi + 1/2`` for signed integers (the outer edge
        of the top code's bucket), else ``max_abs``.
      table: the sorted values of a table format, else ``None``.
    """

    name: str
    kind: str
    bits: int
    lo: float
    hi: float
    max_abs: float
    table: tuple[float, ...] | None = None

    @property
    def signed(self) -> bool:
        return self.lo < 0

    @property
    def edge(self) -> float:
        return self.hi + 0.5 if self.kind == "int" and self.signed else self.max_abs

    @property
    def is_integer(self) -> bool:
        """Codes are integers whose value is the code itself (int, uint, binary, ternary)."""
        return self.kind in ("int", "binary", "ternary")

    @property
    def code_dtype(self) -> jnp.dtype:
        if self.kind == "float":
            return jnp.dtype(_FLOAT_DTYPES[self.name])
        if self.kind == "table" or not self.signed:
            return jnp.dtype(jnp.uint8)
        return jnp.dtype(jnp.int8)

    def encode(self, u: jax.Array) -> jax.Array:
        """Round grid-unit values ``u`` to codes: nearest representable value, clipped to [lo, hi].

        NaN maps to the code of 0 (the quantizer marks non-finite groups through their scale).
        """
        if self.name in DYNAMIC_MAPS:
            return _dynamic_encode(u, _dynamic_codec(self.name == "dynamic"))
        u = jnp.where(jnp.isnan(u), 0.0, u)
        if self.kind == "binary":
            return jnp.where(u < 0, -1, 1).astype(jnp.int8)
        if self.kind in ("int", "ternary"):
            return jnp.clip(jnp.round(u), self.lo, self.hi).astype(self.code_dtype)
        if self.kind == "float":
            return jnp.clip(u, self.lo, self.hi).astype(self.code_dtype)
        shift, base, midpoints = _table_buckets(self.table)
        u = u.astype(jnp.float32)
        lower = jnp.asarray(base)[jax.lax.bitcast_convert_type(u, jnp.uint32) >> shift].astype(jnp.int32)
        return (lower + (jnp.asarray(midpoints)[lower] < u)).astype(jnp.uint8)

    def decode(self, codes: jax.Array) -> jax.Array:
        """Codes -> float32 values in grid units."""
        if self.kind == "table":
            return jnp.asarray(self.table, jnp.float32)[codes.astype(jnp.int32)]
        return codes.astype(jnp.float32)

    def dequant(self, codes: jax.Array, scale: jax.Array, zero_point: jax.Array | None = None,
                dtype=jnp.float32):
        """Codes -> float32 values: ``(decode(codes) - zero_point) * scale``, saturated at ``dtype``'s
        largest finite value (a finite input rounded to the grid point past it never becomes inf; NaN stays
        NaN, and an infinite scale is never passed here: scale rules mark such groups NaN)."""
        values = self.decode(codes)
        if zero_point is not None:
            values = values - zero_point
        top = float(jnp.finfo(dtype).max)
        return jnp.clip(values * scale, -top, top)


def _int_format(bits: int, signed: bool) -> Format:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return Format(f"{'' if signed else 'u'}int{bits}", "int", bits, float(lo), float(hi), float(hi))


def _table_format(name: str, bits: int, values) -> Format:
    table = tuple(float(v) for v in values)
    return Format(name, "table", bits, table[0], table[-1], max(abs(table[0]), table[-1]), table)


def _float_format(name: str) -> Format:
    top = float(jnp.finfo(_FLOAT_DTYPES[name]).max)
    return Format(name, "float", jnp.finfo(_FLOAT_DTYPES[name]).bits, -top, top, top)


@functools.cache
def _registry() -> dict[str, Format]:
    formats = [_int_format(b, s) for b in INT_BITS for s in (True, False)]
    formats += [
        Format("binary", "binary", 1, -1.0, 1.0, 1.0),
        Format("ternary", "ternary", 2, -1.0, 1.0, 1.0),
        *(_float_format(name) for name in _FLOAT_DTYPES),
        _table_format("nf4", 4, NF4_VALUES),
        _table_format("dynamic", 8, dynamic_map(signed=True)),
        _table_format("dynamic_unsigned", 8, dynamic_map(signed=False)),
    ]
    return {f.name: f for f in formats}


FORMAT_NAMES: tuple[str, ...] = tuple(_registry())


def get_format(name: str | Format) -> Format:
    """Look a format up by name (``"int4"``, ``"binary"``, ``"nf4"``, ...); a Format passes through."""
    if isinstance(name, Format):
        return name
    formats = _registry()
    if not isinstance(name, str) or name not in formats:
        hint = ""
        if isinstance(name, str) and name.lstrip("u").startswith("int"):
            hint = " (integer formats have 2 to 8 bits; use 'binary' for 1 bit)"
        raise ValueError(f"unknown format {name!r}{hint}; allowed: {', '.join(formats)}")
    return formats[name]
