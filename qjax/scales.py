"""Scale rules: the float step ``s`` (and zero point ``z``) of each group of elements sharing a scale.

All rules reduce the block view ``xb`` over ``axes`` (see :mod:`qjax.granularity`) with ``keepdims``;
``fmax`` is the format's ``max_abs`` and ``eps`` a floor on the statistic:

- ``absmax``:   ``s = max(max|x|, eps) / fmax`` (the largest magnitude maps to the largest code; LLM.int8,
  BitNet, SmoothQuant's and AWQ's reference code: int4 ``s = amax / 7``).
- ``absmax_edge``: ``s = max(max|x|, eps) / (2^(b-1) - 1/2)`` for signed integers (``Format.edge``; other
  formats as ``absmax``): the largest magnitude maps to the outer edge of the top code's bucket, the
  symmetric grid of GPTQ's reference quantizer (``scale = 2 amax / (2^b - 1)``, zero ``2^(b-1)``) and of
  Qwix. ``+amax`` is clipped to the top code, ``-amax`` is a tie, no element is more than ``s/2`` off, and
  the step is finer: int4 ``amax / 7.5``, int2 ``amax / 1.5`` instead of ``amax``.
- ``mean_abs``: ``s = max(mean|x|, eps)`` (XNOR-Net alpha; BitNet b1.58 gamma with ``eps = 1e-5``).
- ``median``:   ``s = max(median|x|, eps)`` (BitNet b1.58 Reloaded).
- ``minmax``:   asymmetric, integer formats: ``lo = min(min x, 0)``, ``hi = max(max x, 0)``,
  ``s = max(hi - lo, eps) / (qmax - qmin)``, ``z = qmin - round(lo / s)``, so 0 is exact.
- ``lsq_init``: ``s = 2 mean|x| / sqrt(Q_P)`` with ``Q_P`` the largest code (the LSQ initial step, Esser et
  al. 2020).

Block rules (:data:`MX_RULES`) for the microscaling block formats (presets ``qjax.presets.mxfp8``,
``mxfp4``, ``nvfp4``), float element formats only, with ``amax = max(max|x|, eps)`` per block:

- ``e8m0`` (OCP Microscaling Formats (MX) v1.0, section 6.3): one power of two per block,
  ``s = 2^(floor(log2 amax) - emax_elem)`` with ``emax_elem = floor(log2 fmax)`` (8 for E4M3, 2 for E2M1,
  15 for E5M2), stored as its biased exponent ``floor(log2 amax) - emax_elem + 127``, one uint8 per block
  (E8M0; ``0xFF`` is NaN). The elements ``x / s`` are then rounded to the element type, saturating at
  ``fmax`` (the top binade of a block, ``amax / s`` in ``[fmax, 2^(emax_elem + 1))``, clips to ``fmax``).
  The exponent is clipped to ``[-126, 127]`` (codes 1..254): the spec's ``2^-127`` is a float32 subnormal,
  which XLA flushes to 0, so an all-zero block gets ``2^-126`` = :data:`TINY`, as every other rule.
  Qwix (``qwix/_src/core/qarray.py``, ``compute_scale_zero_point``) rounds the other way,
  ``s = 2^ceil(log2(amax / fmax))``, kept in the input's dtype: it never clips but can leave the top binade
  of the element type unused (a block with ``amax = 7`` gets ``s = 2`` there, 7 -> 8 and -0.3 -> 0;
  ``s = 1`` here, 7 saturating to 6 and -0.3 -> -0.5).
- ``nvfp4`` (NVIDIA NVFP4, E2M1 elements only): a float32 tensor scale ``t = amax_tensor / (448 * 6)``
  (``amax_tensor`` over the blocks free of NaN and Inf, floored at ``2^-117``) and per block an E4M3 scale
  ``b = e4m3(amax / 6 / t)``, clipped to ``[2^-9, 448]`` (the smallest E4M3 subnormal, the E4M3 maximum);
  the elements divide by ``s = b t``, so ``s >= 2^-9 * 2^-117 = TINY``. Stored as ``b`` in float8_e4m3fn
  (one byte per block) plus ``t`` (4 bytes per tensor). Qwix's ``nvfp4`` has no tensor scale
  (``b = e4m3(amax / 6)`` kept in the input's dtype).

:func:`mx_scale` returns a block rule's stored scales, :func:`scale_value` reads any stored scale back as
the float32 ``s`` the elements divide by (exactly: every rule stores a scale that reads back to ``s``).

``given`` and ``learned`` scales come from the caller. Every scale is float32 (a block rule's as
:func:`scale_value` reads it) and at least the smallest normal float32 (:data:`TINY`) and at most the
largest finite one, so an all-zero group quantizes to exact zeros without NaN. A group holding a NaN or
Inf gets a NaN scale: its values dequantize to NaN, nothing is silently turned into a number, and other
groups are untouched. An empty group (a zero-size input) gets the scale ``TINY`` (and zero point 0).

No rule overflows on finite input: sums and differences are taken of scaled values (``mean|x|`` as
``sum(|x| 2^-k) / (n 2^-k)`` with ``2^k >= n``, ``hi - lo`` as ``2 (hi/2 - lo/2)`` where it would overflow,
the median of ``|x|/2`` doubled), each equal to the plain formula bit for bit on normal floats; only
elements below ``2^k`` times the smallest normal float32 count as 0 in a mean (XLA flushes subnormals).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qjax.formats import FORMAT_NAMES, Format, get_format

COMPUTED_RULES = ("absmax", "absmax_edge", "mean_abs", "median", "minmax")
MX_RULES = ("e8m0", "nvfp4")
"""Block rules whose scales are stored narrow (:func:`mx_scale`)."""
SCALE_RULES = (*COMPUTED_RULES, "given", "learned", *MX_RULES)
INIT_RULES = (*COMPUTED_RULES, "lsq_init")
MX_FORMATS = {
    "e8m0": tuple(name for name in FORMAT_NAMES if get_format(name).kind == "float"),
    "nvfp4": ("fp4_e2m1",),
}
"""The element formats each block rule takes."""

TINY = float(jnp.finfo(jnp.float32).tiny)
"""The smallest normal float32: the floor of every scale."""
HUGE = float(jnp.finfo(jnp.float32).max)
"""The largest finite float32: the ceiling of every computed scale."""
E8M0_NAN = 0xFF
"""The E8M0 code of NaN (OCP MX v1.0): a block holding a NaN or an Inf."""
E4M3_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)
E4M3_TINY = 2.0**-9
"""The smallest positive E4M3 value (a subnormal): the floor of an ``nvfp4`` block scale."""
NVFP4_TENSOR_FLOOR = TINY / E4M3_TINY
"""``2^-117``, the floor of an ``nvfp4`` tensor scale: the smallest block scale times it is :data:`TINY`."""


def mean_abs(a: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``mean(a)`` over ``axes`` (keepdims) of a float32 ``a >= 0`` that cannot overflow for finite ``a``:
    ``sum(a 2^-k) / (n 2^-k)`` with ``2^k >= n``, equal to ``sum(a) / n`` bit for bit on normal floats."""
    n = math.prod(a.shape[i] for i in axes)
    c = 2.0 ** -max(n - 1, 1).bit_length()
    return jnp.sum(a * c, axes, keepdims=True) / (n * c)


def grid_units(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x / scale`` in float32, right also for a scale past ``2^100``: XLA computes a division by a broadcast
    scale as a product with its reciprocal, which is subnormal (flushed to 0) for a scale above ``1/TINY ~
    8.5e37``; such groups divide ``x 2^-64`` by ``scale 2^-64``. Elsewhere it is ``x / scale`` bit for bit."""
    x = x.astype(jnp.float32)
    p = jnp.where(scale > 2.0**100, jnp.float32(2.0**-64), jnp.float32(1.0))
    return (x * p) / (scale * p)


def compute_scale(rule: str, fmt: Format, xb: jax.Array, axes: tuple[int, ...],
                  eps: float = 0.0, mark_nan: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """Scale (and zero point for ``minmax``, else ``None``) of ``xb`` reduced over ``axes``.

    A group holding a NaN or Inf gets a NaN scale. ``mark_nan=False`` (max-based rules) drops the NaN
    test, one reduction: only for callers whose values carry a NaN element through on their own (a float
    fake-quant value, never integer codes); an Inf is still marked.
    """
    if rule not in INIT_RULES:
        raise ValueError(f"unknown scale rule {rule!r}; allowed: {', '.join(INIT_RULES)}")
    x = xb.astype(jnp.float32)
    if x.size == 0:  # no elements: the floor, as for an all-zero group (reductions of nothing are undefined)
        shape = tuple(1 if i in axes else n for i, n in enumerate(x.shape))
        zero_point = jnp.zeros(shape, jnp.float32) if rule == "minmax" else None
        return jnp.full(shape, TINY, jnp.float32), zero_point
    a = jnp.abs(x)
    zero_point = None
    # A group holding a NaN or Inf gets a NaN scale. XLA's CPU max does not always carry a NaN into its
    # result (nor can it be relied on to drop one), but it keeps an Inf; a sum of squares is NaN exactly
    # when the group holds a NaN (x * x >= 0 or NaN, so no inf - inf). Max-based rules mark a group by
    # ``isinf(max) | isnan(sum x^2)``: two reductions that read x directly (XLA CPU hands plain reductions,
    # with their elementwise producer, to YNNPACK), where one reduction of a written-out
    # ``where(finite, |x|, inf)`` cost 1.4x as much per QAT step. The median needs an explicit mark.
    if rule in ("absmax", "absmax_edge"):
        top, bad = _absmax(x, axes, mark_nan)
        scale = jnp.maximum(top, eps) / (fmt.max_abs if rule == "absmax" else fmt.edge)
    elif rule in ("mean_abs", "lsq_init"):
        mean = mean_abs(a, axes)
        bad = ~jnp.isfinite(mean)
        lsq = jnp.maximum(2.0 * mean, eps) / fmt.hi**0.5  # inf past the largest float: clipped below
        scale = jnp.maximum(mean, eps) if rule == "mean_abs" else lsq
    elif rule == "median":
        bad = _holds_nonfinite(x, axes)
        scale = jnp.maximum(jnp.median(a * 0.5, axes, keepdims=True) * 2.0, eps)  # halved: midpoints of
        # two huge values cannot overflow
    else:
        lo = jnp.min(x, axes, keepdims=True)
        hi = jnp.max(x, axes, keepdims=True)
        bad = jnp.isinf(lo) | jnp.isinf(hi)
        bad = bad | _holds_nan(x, axes) if mark_nan else bad
        lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
        steps = fmt.hi - fmt.lo  # hi - lo is inf (no element is) only past 3.4e38: then halve first
        halved = jnp.maximum(hi * 0.5 - lo * 0.5, eps * 0.5) / (steps * 0.5)
        scale = jnp.where(jnp.isinf(hi - lo), halved, jnp.maximum(hi - lo, eps) / steps)
        scale = jnp.maximum(scale, TINY)
        zero_point = fmt.lo - jnp.round(lo / scale)
    scale = jnp.clip(scale, TINY, HUGE)
    return jnp.where(bad, jnp.nan, scale), zero_point


def _absmax(x: jax.Array, axes: tuple[int, ...], mark_nan: bool = True) -> tuple[jax.Array, jax.Array]:
    """``(max|x|, bad)`` over ``axes`` (keepdims) of a float32 ``x``: ``bad`` marks the groups holding an
    Inf or (with ``mark_nan``) a NaN, as ``isinf(max) | isnan(sum x^2)`` (see :func:`compute_scale`)."""
    top = jnp.max(jnp.abs(x), axes, keepdims=True)
    return top, jnp.isinf(top) | _holds_nan(x, axes) if mark_nan else jnp.isinf(top)


def e8m0_emax(fmt: Format) -> int:
    """``emax_elem = floor(log2 fmax)``, the exponent of the element format's largest normal value: 8 for
    E4M3 (448), 15 for E5M2 (57344), 2 for E2M1 (6) (OCP MX v1.0, table 1)."""
    return math.frexp(fmt.max_abs)[1] - 1


def mx_scale(rule: str, fmt: Format, xb: jax.Array, axes: tuple[int, ...],
             eps: float = 0.0, tensor_scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """The stored scales of a block rule (:data:`MX_RULES`) for the block view ``xb`` reduced over ``axes``:
    ``(block scales, tensor scale)``, both with ``xb``'s rank (reduced axes of size 1; the tensor scale has
    every axis of size 1, so a QArray stacked by ``vmap`` still broadcasts).

    - ``e8m0``: uint8 biased exponents ``clip(floor(log2 amax) - emax_elem + 127, 1, 254)`` (``0xFF`` for a
      block holding a NaN or Inf), no tensor scale. ``floor(log2 amax)`` is read from the float32 exponent
      field of ``amax`` (exact, no ``log2``). OCP Microscaling Formats (MX) v1.0, section 6.3.
    - ``nvfp4``: float8_e4m3fn block scales ``e4m3(clip(amax / 6 / t, 2^-9, 448))`` (NaN for a block holding
      a NaN or Inf) and the float32 tensor scale ``t = max(amax_tensor / (448 * 6), 2^-117)``, with
      ``amax_tensor`` the largest ``amax`` of the blocks free of NaN and Inf (such a block poisons only
      itself). NVIDIA NVFP4 (two-level scaling: an E4M3 scale per 16 elements, an FP32 scale per tensor).

    ``amax = max(max|x|, eps)`` per block; an empty input counts as all zeros. :func:`scale_value` reads the
    result back as the float32 scale ``s`` (``2^k``, or ``float32(b) * t``). See the module docstring.
    ``tensor_scale``: an ``nvfp4`` tensor scale ``t`` fixed beforehand (GPTQ sets the block scales of a
    tensor's groups one by one under the ``t`` of the whole original tensor); ignored by ``e8m0``.
    """
    if rule not in MX_RULES:
        raise ValueError(f"unknown block scale rule {rule!r}; allowed: {', '.join(MX_RULES)}")
    if fmt.name not in MX_FORMATS[rule]:
        raise ValueError(f"scale rule {rule!r} needs a float element format, got {fmt.name!r}; allowed: "
                         f"{', '.join(MX_FORMATS[rule])}")
    x = xb.astype(jnp.float32)
    if x.size == 0:  # no elements: as an all-zero block (the smallest scale)
        shape = tuple(1 if i in axes else n for i, n in enumerate(x.shape))
        top, bad = jnp.zeros(shape, jnp.float32), jnp.zeros(shape, bool)
    else:
        top, bad = _absmax(x, axes)
    top = jnp.maximum(top, eps)
    if rule == "e8m0":
        log2 = jnp.right_shift(jax.lax.bitcast_convert_type(top, jnp.int32), 23) - 127  # top >= 0
        code = jnp.clip(log2 - e8m0_emax(fmt) + 127, 1, 254)
        return jnp.where(bad, E8M0_NAN, code).astype(jnp.uint8), None
    if tensor_scale is None:
        amax = jnp.max(jnp.where(bad, 0.0, top), keepdims=True, initial=0.0)
        tensor = jnp.maximum(amax / (E4M3_MAX * fmt.max_abs), NVFP4_TENSOR_FLOOR)
    else:
        tensor = jnp.asarray(tensor_scale, jnp.float32).reshape((1,) * x.ndim)  # one per tensor
    block = jnp.clip(top / fmt.max_abs / tensor, E4M3_TINY, E4M3_MAX)
    return jnp.where(bad, jnp.nan, block).astype(jnp.float8_e4m3fn), tensor


def scale_value(scale: jax.Array, tensor_scale: jax.Array | None = None) -> jax.Array:
    """The float32 scale ``s`` of a stored scale: a float scale as it is; a uint8 one as E8M0 biased
    exponents, ``2^(e - 127)`` (``0xFF`` NaN; ``e = 0`` is ``2^-127``, a float32 subnormal that XLA may
    flush to 0; :func:`mx_scale` never stores it); times ``tensor_scale`` when there is one.
    OCP Microscaling Formats (MX) v1.0, section 5.4 (E8M0)."""
    if scale.dtype == jnp.uint8:
        e = scale.astype(jnp.uint32)
        bits = jnp.where(e == E8M0_NAN, jnp.uint32(0x7FC00000),
                         jnp.where(e == 0, jnp.uint32(0x00400000), e << 23))
        value = jax.lax.bitcast_convert_type(bits, jnp.float32)
    else:
        value = scale.astype(jnp.float32)
    return value if tensor_scale is None else value * tensor_scale


def _holds_nan(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Per group: whether it holds a NaN, as ``isnan(sum x^2)`` (a sum of non-negative terms is NaN only
    from a NaN term; overflow gives +inf, never NaN)."""
    return jnp.isnan(jnp.sum(x * x, axes, keepdims=True))


def mark_nonfinite(scale: jax.Array, xb: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Set the scale of every group that holds a NaN or Inf to NaN."""
    return jnp.where(_holds_nonfinite(xb, axes), jnp.nan, scale)


def _holds_nonfinite(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Per group: whether it holds a NaN or an Inf."""
    return jnp.any(~jnp.isfinite(x), axis=axes, keepdims=True)
