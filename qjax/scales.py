"""Scale rules: the float step ``s`` (and zero point ``z``) of each group of elements sharing a scale.

All rules reduce the block view ``xb`` over ``axes`` (see :mod:`qjax.granularity`) with ``keepdims``;
``fmax`` is the format's ``max_abs`` and ``eps`` a floor on the statistic:

- ``absmax``:   ``s = max(max|x|, eps) / fmax`` (the largest magnitude maps to the largest code).
- ``mean_abs``: ``s = max(mean|x|, eps)`` (XNOR-Net alpha; BitNet b1.58 gamma with ``eps = 1e-5``).
- ``median``:   ``s = max(median|x|, eps)`` (BitNet b1.58 Reloaded).
- ``minmax``:   asymmetric, integer formats: ``lo = min(min x, 0)``, ``hi = max(max x, 0)``,
  ``s = max(hi - lo, eps) / (qmax - qmin)``, ``z = qmin - round(lo / s)``, so 0 is exact.
- ``lsq_init``: ``s = 2 mean|x| / sqrt(fmax)`` (the LSQ initial step, Esser et al. 2020).

``given`` and ``learned`` scales come from the caller. Every scale is float32 and at least the smallest
normal float32 (:data:`TINY`) and at most the largest finite one, so an all-zero group quantizes to exact
zeros without NaN. A group holding a NaN or Inf gets a NaN scale: its values dequantize to NaN, nothing is
silently turned into a number, and other groups are untouched. An empty group (a zero-size input) gets
the scale ``TINY`` (and zero point 0).

No rule overflows on finite input: sums and differences are taken of scaled values (``mean|x|`` as
``sum(|x| 2^-k) / (n 2^-k)`` with ``2^k >= n``, ``hi - lo`` as ``2 (hi/2 - lo/2)`` where it would overflow,
the median of ``|x|/2`` doubled), each equal to the plain formula bit for bit on normal floats; only
elements below ``2^k`` times the smallest normal float32 count as 0 in a mean (XLA flushes subnormals).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qjax.formats import Format

COMPUTED_RULES = ("absmax", "mean_abs", "median", "minmax")
SCALE_RULES = (*COMPUTED_RULES, "given", "learned")
INIT_RULES = (*COMPUTED_RULES, "lsq_init")

TINY = float(jnp.finfo(jnp.float32).tiny)
"""The smallest normal float32: the floor of every scale."""
HUGE = float(jnp.finfo(jnp.float32).max)
"""The largest finite float32: the ceiling of every computed scale."""


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
    if rule == "absmax":
        top = jnp.max(a, axes, keepdims=True)
        bad = jnp.isinf(top) | _holds_nan(x, axes) if mark_nan else jnp.isinf(top)
        scale = jnp.maximum(top, eps) / fmt.max_abs
    elif rule in ("mean_abs", "lsq_init"):
        mean = mean_abs(a, axes)
        bad = ~jnp.isfinite(mean)
        lsq = jnp.maximum(2.0 * mean, eps) / fmt.max_abs**0.5  # inf past the largest float: clipped below
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
