"""Surrogate gradients: exact low-bit forwards with named, swappable backward rules.

Every function here is a ``jax.custom_vjp``: the forward is the true quantizer (``sign`` gives +-1, never
0), the backward is the surrogate. Hyperparameters that a schedule changes during training (ReSTE's ``o``,
BiPer's ``omega``, SwishSign's ``beta``) are traced array arguments with a zero cotangent, so changing them
under ``jit`` never recompiles.

Sign surrogates (forward ``sign(x) = +1 if x >= 0 else -1``; backward ``g * d(x)``):

==============  =======================================  =============================================
name            d(x)                                     paper
==============  =======================================  =============================================
``ste``         ``1``                                    Bengio et al. 2013
``clipped_ste`` ``1{|x| <= 1}`` (inclusive)              Hubara et al. 2016 (BNN), larq's ``ste_sign``
``approx_sign`` ``max(0, 2 - 2|x|)``                     Liu et al. 2018 (Bi-Real Net)
``swish_sign``  ``b(2 - bx tanh(bx/2)) / (1 + cosh(bx))`` Darabi et al. 2018 (BNN+), ``beta = 5``
``reste``       derivative of ``sign(x)|x|^(1/o)``       Wu et al., ICCV 2023 (ReSTE)
``biper``       ``omega cos(omega x)``, forward          Vargas et al., CVPR 2024 (BiPer)
                ``sign(sin(omega x))``
==============  =======================================  =============================================

Grid surrogates for multi-level formats: :func:`grid_ste` (identity or clipped STE through rounding, with
the LSQ step-size gradient for the scale) and :func:`lsq` (Esser et al., ICLR 2020).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

RESTE_INNER = 0.1  # ReSTE's fixed inner interval m


def binary_sign(x: Array) -> Array:
    """``-1`` where ``x < 0``, else ``+1`` (0 and NaN give +1), in ``x``'s dtype.

    ``jnp.sign(0) == 0`` is never used: binary codes are +-1 in training and in packed serving alike.
    """
    return jnp.where(x < 0, -1, 1).astype(x.dtype)


def _sign_forward(x, *params):
    return binary_sign(x)


def _make_sign_surrogate(derivative: Callable, forward: Callable = _sign_forward) -> Callable:
    """A custom_vjp ``f(x, *params)`` with forward ``forward(x, *params)`` and dx = g * derivative."""

    @jax.custom_vjp
    def surrogate(x, *params):
        return forward(x, *params)

    def fwd(x, *params):
        return forward(x, *params), (x, params)

    def bwd(res, g):
        x, params = res
        dx = g * derivative(x.astype(jnp.float32), *params).astype(g.dtype)
        return (dx, *(jnp.zeros_like(p) for p in params))

    surrogate.defvjp(fwd, bwd)
    return surrogate


def as_hyperparameter(value, name: str) -> Array:
    """A surrogate hyperparameter as a float32 array; a concrete non-finite value is refused."""
    if not isinstance(value, jax.core.Tracer):
        concrete = np.asarray(value)
        if concrete.dtype.kind not in "biuf" or not np.all(np.isfinite(concrete)):
            raise ValueError(f"surrogate hyperparameter {name}={value!r} must be finite; "
                             "allowed: real numbers")
    return jnp.asarray(value, jnp.float32)


_ste = _make_sign_surrogate(lambda x: jnp.ones_like(x))
_clipped_ste = _make_sign_surrogate(lambda x: (jnp.abs(x) <= 1).astype(x.dtype))
_approx_sign = _make_sign_surrogate(lambda x: jnp.maximum(0.0, 2.0 - 2.0 * jnp.abs(x)))


def _swish_derivative(x, beta):
    bx = beta * x
    return beta * (2.0 - bx * jnp.tanh(bx / 2.0)) / (1.0 + jnp.cosh(bx))


def _reste_derivative(x, o, t):
    a = jnp.abs(x)
    inner = RESTE_INNER ** (1.0 / o) / RESTE_INNER
    outer = (1.0 / o) * jnp.maximum(a, RESTE_INNER) ** ((1.0 - o) / o)
    return jnp.where(a <= RESTE_INNER, inner, jnp.where(a <= t, outer, 0.0))


def _biper_forward(w, omega):
    return binary_sign(jnp.sin(omega * w.astype(jnp.float32))).astype(w.dtype)


_swish_sign = _make_sign_surrogate(_swish_derivative)
_reste = _make_sign_surrogate(_reste_derivative)
_biper = _make_sign_surrogate(lambda w, omega: omega * jnp.cos(omega * w), _biper_forward)


def ste(x: Array) -> Array:
    """Straight-through estimator: forward ``sign(x)`` (+-1), backward ``g`` unchanged.

    Bengio, Leonard, Courville, "Estimating or Propagating Gradients Through Stochastic Neurons", 2013.
    """
    return _ste(x)


def clipped_ste(x: Array) -> Array:
    """Clipped STE: forward ``sign(x)``, backward ``g * 1{|x| <= 1}`` (the edges ``|x| = 1`` included).

    Hubara et al., "Binarized Neural Networks", NeurIPS 2016 (the hardtanh STE; larq's ``ste_sign``).
    """
    return _clipped_ste(x)


def approx_sign(x: Array) -> Array:
    """ApproxSign: forward ``sign(x)``, backward ``g * max(0, 2 - 2|x|)`` (a piecewise-quadratic sign).

    Liu et al., "Bi-Real Net", ECCV 2018.
    """
    return _approx_sign(x)


def swish_sign(x: Array, beta: float | Array = 5.0) -> Array:
    """SwishSign: forward ``sign(x)``, backward the derivative of ``2 sigma(bx)(1 + bx(1 - sigma(bx))) - 1``,
    ``g * b (2 - bx tanh(bx/2)) / (1 + cosh(bx))`` with ``b = beta`` (traced).

    Darabi et al., "BNN+: Improved Binary Network Training", 2018.
    """
    return _swish_sign(x, as_hyperparameter(beta, "beta"))


def reste(x: Array, o: float | Array = 1.0, t: float | Array = 1.5) -> Array:
    """ReSTE (rectified STE): forward ``sign(x)``, backward the derivative of ``sign(x)|x|^(1/o)``::

        d(x) = m^(1/o) / m                 |x| <= m    (m = 0.1, fixed)
               (1/o) |x|^((1 - o) / o)     m < |x| <= t
               0                           |x| > t

    ``o`` is annealed from 1 to 3 (``o(e) = 1 + 2(1 - cos(pi/2 e/E))``, :func:`reste_schedule`); at
    ``o = 1`` it is a clipped STE with window ``t = 1.5``. ``o`` and ``t`` are traced.

    Wu et al., "Estimator Meets Equilibrium Perspective: A Rectified Straight Through Estimator for
    Binary Neural Networks Training", ICCV 2023.
    """
    return _reste(x, as_hyperparameter(o, "o"), as_hyperparameter(t, "t"))


def reste_schedule(step: Array | float, total_steps: float, o_end: float = 3.0) -> Array:
    """ReSTE's annealing of ``o``: ``1 + (o_end - 1)(1 - cos(pi/2 * step/total_steps))`` (Wu et al. 2023)."""
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
    return 1.0 + (o_end - 1.0) * (1.0 - jnp.cos(jnp.pi / 2 * progress))


def biper(w: Array, omega: float | Array = 20.0) -> Array:
    """BiPer, the periodic binarizer: forward ``sign(sin(omega w))`` (a square wave, +-1),
    backward through the sine: ``g * omega * cos(omega w)``. ``omega = 20`` in every published run; traced.

    Vargas, Hidalgo, Arce, "BiPer: Binary Neural Networks using a Periodic Function", CVPR 2024.
    """
    return _biper(w, as_hyperparameter(omega, "omega"))


SIGN_SURROGATES: dict[str, Callable[..., Array]] = {
    "ste": ste,
    "clipped_ste": clipped_ste,
    "approx_sign": approx_sign,
    "swish_sign": swish_sign,
    "reste": reste,
    "biper": biper,
}
GRID_SURROGATES: tuple[str, ...] = ("ste", "clipped_ste")


def _sum_to_shape(x: Array, shape: tuple[int, ...]) -> Array:
    """Sum ``x`` over the axes along which an array of ``shape`` was broadcast to ``x.shape``."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1
    )
    return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


def _grid_value(grid, x, scale, zero_point):
    u = x.astype(jnp.float32) / scale
    if zero_point is not None:
        u = u + zero_point
    codes = grid.encode(u)
    return grid.dequant(codes, scale, zero_point).astype(x.dtype), u, codes


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def grid_ste(x: Array, scale: Array, zero_point: Array | None, grad_scale: Array, grid,
             clipped: bool = True) -> Array:
    """Round ``x`` to a scaled grid with a straight-through gradient and the LSQ step-size gradient.

    Forward: ``v = (decode(encode(u)) - z) * s`` with ``u = x / s + z``; the grid's ``encode`` rounds to
    the nearest representable value and clips to ``[lo, hi]``.

    Backward, with ``inside = 1{lo <= u <= hi}`` and ``q = decode(encode(u)) - z``:
      ``dx = g * inside`` (``clipped=True``, clipped STE) or ``g`` (identity STE);
      ``ds = sum(g * (q - (x/s) * inside)) * grad_scale`` summed over the elements sharing ``s``
      (Esser et al., "Learned Step Size Quantization", ICLR 2020); ``dz = 0``.

    ``grid`` is any object with ``encode``, ``dequant`` and ``lo``/``hi`` (a :class:`qjax.formats.Format`).
    """
    return _grid_value(grid, x, scale, zero_point)[0]


def _grid_ste_fwd(x, scale, zero_point, grad_scale, grid, clipped):
    value, u, codes = _grid_value(grid, x, scale, zero_point)
    return value, (x, scale, zero_point, grad_scale, u, codes)


def _grid_ste_bwd(grid, clipped, res, g):
    x, scale, zero_point, grad_scale, u, codes = res
    inside = (u >= grid.lo) & (u <= grid.hi)
    dx = jnp.where(inside, g, 0).astype(g.dtype) if clipped else g
    q = grid.dequant(codes, jnp.ones((), jnp.float32), zero_point)
    ds_elem = g.astype(jnp.float32) * (q - jnp.where(inside, x.astype(jnp.float32) / scale, 0.0))
    ds = _sum_to_shape(ds_elem, scale.shape) * grad_scale
    dz = None if zero_point is None else jnp.zeros_like(zero_point)
    return dx, ds.astype(scale.dtype), dz, jnp.zeros_like(grad_scale)


grid_ste.defvjp(_grid_ste_fwd, _grid_ste_bwd)


def lsq(x: Array, step: Array, bits: int = 8, signed: bool = True,
        grad_scale: float | Array | None = None) -> Array:
    """Learned Step Size Quantization: ``clip(round(x / s), qmin, qmax) * s`` with gradients

    ``dx = g * 1{qmin <= x/s <= qmax}`` and
    ``ds = g * (round(x/s) - x/s)`` inside the range, ``g * qmin`` below, ``g * qmax`` above,
    summed over the elements sharing ``s`` and multiplied by ``grad_scale`` (default
    ``1 / sqrt(n * qmax)``, ``n`` the number of elements per step).

    Esser et al., "Learned Step Size Quantization", ICLR 2020.
    """
    from qjax.formats import get_format

    grid = get_format(f"{'' if signed else 'u'}int{bits}")
    step = jnp.asarray(step, jnp.float32)
    if grad_scale is None:
        per_step = x.size // max(step.size, 1)
        grad_scale = 1.0 / math.sqrt(per_step * grid.hi)
    return grid_ste(x, step, None, jnp.asarray(grad_scale, jnp.float32), grid, True)
