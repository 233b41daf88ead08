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

Each is one :class:`Surrogate` record in :data:`SURROGATES` (``STE``, ``CLIPPED_STE``, ``APPROX_SIGN``,
``SWISH_SIGN``, ``RESTE``, ``BIPER``) holding its derivative, its hyperparameters with their defaults and
allowed ranges (``beta > 0``, ``o > 0``, ``t > 0``, ``omega > 0``; defaults 5, 1, 1.5, 20), any custom
real-valued forward (BiPer's ``sin(omega x)``) and how it acts on multi-level grids (``grid``, ``clipped``,
``identity_backward``). The quantizer and the QAT code read those attributes; no other module tests a
surrogate's name. A concrete hyperparameter outside its range (``o = 0`` would give NaN gradients, ``o < 0``,
``omega <= 0``, ``beta <= 0`` zero or negative ones) raises a ``ValueError``; a traced one cannot, so it
makes the input gradient NaN everywhere (the forward is unchanged), never a silently wrong gradient.

Grid surrogates for multi-level formats (records with ``grid=True``: ``ste``, ``clipped_ste``):
:func:`grid_ste` (identity or clipped STE through rounding, with the LSQ step-size gradient for the scale)
and :func:`lsq` (Esser et al., ICLR 2020).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qjax.scales import grid_units

Array = jax.Array

RESTE_INNER = 0.1  # ReSTE's fixed inner interval m


def binary_sign(x: Array) -> Array:
    """``-1`` where ``x < 0``, else ``+1`` (0 and NaN give +1), in ``x``'s dtype.

    ``jnp.sign(0) == 0`` is never used: binary codes are +-1 in training and in packed serving alike.
    """
    return jnp.where(x < 0, -1, 1).astype(x.dtype)


def as_hyperparameter(value, name: str, allowed: tuple[float, float] | None = None) -> Array:
    """A surrogate hyperparameter as a float32 array. A concrete value must be finite and, given
    ``allowed = (low, high)``, inside the open interval ``low < value < high``; a traced value cannot be
    checked here (a :class:`Surrogate` guards it: see :meth:`Surrogate.__call__`)."""
    if not isinstance(value, jax.core.Tracer):
        concrete = np.asarray(value)
        if concrete.dtype.kind not in "biuf":
            raise TypeError(f"hyperparameter {name}={value!r} must be a real number; allowed: a float or a "
                            "float array")
        if not np.all(np.isfinite(concrete)):
            raise ValueError(f"hyperparameter {name}={value!r} must be finite; allowed: real numbers")
        if allowed is not None and not np.all((concrete > allowed[0]) & (concrete < allowed[1])):
            raise ValueError(f"hyperparameter {name}={value!r} is out of range; "
                             f"allowed: {_interval(name, allowed)}")
    return jnp.asarray(value, jnp.float32)


def _interval(name: str, allowed: tuple[float, float]) -> str:
    low, high = allowed
    return f"{name} > {low:g}" if math.isinf(high) else f"{low:g} < {name} < {high:g}"


@jax.custom_vjp
def _nan_gradient_unless(x: Array, ok: Array) -> Array:
    """``x`` itself; its cotangent is NaN everywhere unless ``ok`` (a traced out-of-range hyperparameter)."""
    return x


def _nan_gradient_unless_fwd(x, ok):
    return x, ok


def _nan_gradient_unless_bwd(ok, g):
    return jnp.where(ok, g, jnp.nan).astype(g.dtype), None


_nan_gradient_unless.defvjp(_nan_gradient_unless_fwd, _nan_gradient_unless_bwd)


class Hyperparameter(NamedTuple):
    """A surrogate hyperparameter: its ``default`` and the open interval ``allowed = (low, high)``."""

    default: float
    allowed: tuple[float, float] = (0.0, math.inf)


def _make_sign_surrogate(derivative: Callable, forward: Callable | None) -> Callable:
    """A custom_vjp ``f(x, *params)``: forward ``sign(forward(x, *params))`` (``sign(x)`` without a
    ``forward``) in ``x``'s dtype; backward ``dx = g * derivative(x, *params)``, zero for every param."""

    def value(x, params):
        real = x if forward is None else forward(x, *params)
        return binary_sign(real).astype(x.dtype)

    @jax.custom_vjp
    def surrogate(x, *params):
        return value(x, params)

    def fwd(x, *params):
        return value(x, params), (x, params)

    def bwd(res, g):
        x, params = res
        dx = g * derivative(x.astype(jnp.float32), *params).astype(g.dtype)
        return (dx, *(jnp.zeros_like(p) for p in params))

    surrogate.defvjp(fwd, bwd)
    return surrogate


@dataclasses.dataclass(frozen=True)
class Surrogate:
    """One surrogate gradient, everything about it in one record (the quantizer and the QAT code read these
    attributes, never the name).

    Forward ``sign(r(x))`` with ``r = forward`` (``r(x) = x`` without one), +-1 in ``x``'s dtype; backward
    ``dx = g * derivative(x)``. Hyperparameters are traced float32 arrays with a zero cotangent.

    Attributes:
      name: the name a :class:`qjax.Quantizer` takes as ``surrogate=``.
      derivative: ``d(x, *params)``, the pseudo-derivative of the sign, params in ``hyperparameters`` order.
      hyperparameters: ``{name: Hyperparameter(default, allowed)}``, the keyword arguments it takes.
      forward: the real-valued forward ``r(x, *params)`` whose sign is taken (BiPer's ``sin(omega x)``, its
        stage-1 weight), or ``None`` for the plain sign.
      grid: it also applies to multi-level grids (int, fp, table formats; multi-basis binary) as a
        straight-through estimator through rounding (:func:`grid_ste`).
      clipped: on a grid, the gradient is zero outside the representable range (``|x| <= sum alpha_i`` for
        multi-basis binary); otherwise the identity.
      identity_backward: ``d(x) = 1`` (and, on a grid, not clipped): the input gradient is ``g`` itself.
      paper: where it comes from.
      fn: the ``jax.custom_vjp`` function ``fn(x, *params)`` built from the above.
    """

    name: str
    derivative: Callable[..., Array]
    hyperparameters: Mapping[str, Hyperparameter] = dataclasses.field(default_factory=dict, hash=False)
    forward: Callable[..., Array] | None = None
    grid: bool = False
    clipped: bool = False
    identity_backward: bool = False
    paper: str = ""
    fn: Callable[..., Array] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "hyperparameters", MappingProxyType(dict(self.hyperparameters)))
        object.__setattr__(self, "fn", _make_sign_surrogate(self.derivative, self.forward))

    @property
    def has_custom_forward(self) -> bool:
        """Whether the forward is ``sign(r(x))`` of a real-valued ``r`` other than the identity."""
        return self.forward is not None

    def values(self, **hparams) -> tuple[Array, ...]:
        """The hyperparameters as float32 arrays in declaration order, defaults filled in; an unknown name,
        a non-finite or an out-of-range concrete value raises a ``ValueError``."""
        unknown = sorted(set(hparams) - set(self.hyperparameters))
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {unknown} for surrogate {self.name!r}; allowed: "
                             f"{list(self.hyperparameters) or 'none'}")
        return tuple(as_hyperparameter(hparams.get(k, h.default), k, h.allowed)
                     for k, h in self.hyperparameters.items())

    def select(self, hparams: Mapping) -> dict:
        """The entries of ``hparams`` this surrogate takes."""
        return {k: hparams[k] for k in self.hyperparameters if k in hparams}

    def _guarded(self, x: Array, params: tuple[Array, ...]) -> Array:
        """``x``, with a NaN gradient wherever a traced hyperparameter is outside its allowed range (concrete
        ones were checked by :meth:`values`; nothing is added for them)."""
        traced = [(p, h.allowed) for p, h in zip(params, self.hyperparameters.values(), strict=True)
                  if isinstance(p, jax.core.Tracer)]
        if not traced:
            return x
        ok = functools.reduce(jnp.logical_and, [jnp.all((p > lo) & (p < hi)) for p, (lo, hi) in traced])
        return _nan_gradient_unless(x, ok)

    def __call__(self, x: Array, **hparams) -> Array:
        """``sign(r(x))`` (+-1 in ``x``'s dtype), backward ``g * d(x)``; ``hparams`` as in :meth:`values`.

        A traced hyperparameter outside its range (ReSTE ``o <= 0``, BiPer ``omega <= 0``, SwishSign
        ``beta <= 0``, NaN) leaves the forward as it is and makes the input gradient NaN everywhere, so a
        bad schedule shows at its first step instead of training on a zero, negative or infinite gradient.
        """
        params = self.values(**hparams)
        return self.fn(self._guarded(x, params), *params)

    def real_forward(self, x: Array, **hparams) -> Array:
        """``r(x)`` in float32, the value whose sign the forward takes: ``forward(x, *params)``, or ``x``
        (its gradient NaN for a traced out-of-range hyperparameter, as in :meth:`__call__`)."""
        x = jnp.asarray(x).astype(jnp.float32)
        if self.forward is None:
            return x
        params = self.values(**hparams)
        return self.forward(self._guarded(x, params), *params)


def _swish_derivative(x, beta):
    bx = beta * x
    return beta * (2.0 - bx * jnp.tanh(bx / 2.0)) / (1.0 + jnp.cosh(bx))


def _reste_derivative(x, o, t):
    a = jnp.abs(x)
    inner = RESTE_INNER ** (1.0 / o) / RESTE_INNER
    outer = (1.0 / o) * jnp.maximum(a, RESTE_INNER) ** ((1.0 - o) / o)
    return jnp.where(a <= RESTE_INNER, inner, jnp.where(a <= t, outer, 0.0))


def _biper_wave(w, omega):
    return jnp.sin(omega * w.astype(jnp.float32))


STE = Surrogate("ste", lambda x: jnp.ones_like(x), grid=True, identity_backward=True,
                paper="Bengio, Leonard, Courville 2013")
CLIPPED_STE = Surrogate("clipped_ste", lambda x: (jnp.abs(x) <= 1).astype(x.dtype), grid=True, clipped=True,
                        paper="Hubara et al., NeurIPS 2016 (BNN)")
APPROX_SIGN = Surrogate("approx_sign", lambda x: jnp.maximum(0.0, 2.0 - 2.0 * jnp.abs(x)),
                        paper="Liu et al., ECCV 2018 (Bi-Real Net)")
SWISH_SIGN = Surrogate("swish_sign", _swish_derivative, {"beta": Hyperparameter(5.0)},
                       paper="Darabi et al. 2018 (BNN+)")
RESTE = Surrogate("reste", _reste_derivative, {"o": Hyperparameter(1.0), "t": Hyperparameter(1.5)},
                  paper="Wu et al., ICCV 2023 (ReSTE)")
BIPER = Surrogate("biper", lambda w, omega: omega * jnp.cos(omega * w), {"omega": Hyperparameter(20.0)},
                  forward=_biper_wave, paper="Vargas, Hidalgo, Arce, CVPR 2024 (BiPer)")

SURROGATES: Mapping[str, Surrogate] = MappingProxyType(
    {s.name: s for s in (STE, CLIPPED_STE, APPROX_SIGN, SWISH_SIGN, RESTE, BIPER)})
SIGN_SURROGATES = SURROGATES  # every surrogate is a sign surrogate (the binary format takes any of them)
GRID_SURROGATES: tuple[str, ...] = tuple(name for name, s in SURROGATES.items() if s.grid)


def get_surrogate(name: str | Surrogate) -> Surrogate:
    """The :class:`Surrogate` record of ``name`` (a record passes through); an unknown name raises a
    ``ValueError`` listing the allowed ones."""
    if isinstance(name, Surrogate):
        return name
    if not isinstance(name, str) or name not in SURROGATES:
        raise ValueError(f"unknown surrogate {name!r}; allowed: {', '.join(SURROGATES)}")
    return SURROGATES[name]


def ste(x: Array) -> Array:
    """Straight-through estimator: forward ``sign(x)`` (+-1), backward ``g`` unchanged.

    Bengio, Leonard, Courville, "Estimating or Propagating Gradients Through Stochastic Neurons", 2013.
    """
    return STE(x)


def clipped_ste(x: Array) -> Array:
    """Clipped STE: forward ``sign(x)``, backward ``g * 1{|x| <= 1}`` (the edges ``|x| = 1`` included).

    Hubara et al., "Binarized Neural Networks", NeurIPS 2016 (the hardtanh STE; larq's ``ste_sign``).
    """
    return CLIPPED_STE(x)


def approx_sign(x: Array) -> Array:
    """ApproxSign: forward ``sign(x)``, backward ``g * max(0, 2 - 2|x|)`` (a piecewise-quadratic sign).

    Liu et al., "Bi-Real Net", ECCV 2018.
    """
    return APPROX_SIGN(x)


def swish_sign(x: Array, beta: float | Array = 5.0) -> Array:
    """SwishSign: forward ``sign(x)``, backward the derivative of ``2 sigma(bx)(1 + bx(1 - sigma(bx))) - 1``,
    ``g * b (2 - bx tanh(bx/2)) / (1 + cosh(bx))`` with ``b = beta > 0`` (traced).

    Darabi et al., "BNN+: Improved Binary Network Training", 2018.
    """
    return SWISH_SIGN(x, beta=beta)


def reste(x: Array, o: float | Array = 1.0, t: float | Array = 1.5) -> Array:
    """ReSTE (rectified STE): forward ``sign(x)``, backward the derivative of ``sign(x)|x|^(1/o)``::

        d(x) = m^(1/o) / m                 |x| <= m    (m = 0.1, fixed)
               (1/o) |x|^((1 - o) / o)     m < |x| <= t
               0                           |x| > t

    ``o > 0`` is annealed from 1 to 3 (``o(e) = 1 + 2(1 - cos(pi/2 e/E))``, :func:`reste_schedule`); at
    ``o = 1`` it is a clipped STE with window ``t = 1.5`` (``t > 0``). ``o`` and ``t`` are traced.

    Wu et al., "Estimator Meets Equilibrium Perspective: A Rectified Straight Through Estimator for
    Binary Neural Networks Training", ICCV 2023.
    """
    return RESTE(x, o=o, t=t)


def reste_schedule(step: Array | float, total_steps: float, o_end: float = 3.0) -> Array:
    """ReSTE's annealing of ``o``: ``1 + (o_end - 1)(1 - cos(pi/2 * step/total_steps))`` (Wu et al. 2023)."""
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
    return 1.0 + (o_end - 1.0) * (1.0 - jnp.cos(jnp.pi / 2 * progress))


def biper(w: Array, omega: float | Array = 20.0) -> Array:
    """BiPer, the periodic binarizer: forward ``sign(sin(omega w))`` (a square wave, +-1),
    backward through the sine: ``g * omega * cos(omega w)``. ``omega = 20`` in every published run
    (``omega > 0``); traced. Its stage-1 real-valued weight ``sin(omega w)`` is ``BIPER.real_forward``.

    Vargas, Hidalgo, Arce, "BiPer: Binary Neural Networks using a Periodic Function", CVPR 2024.
    """
    return BIPER(w, omega=omega)


def _sum_to_shape(x: Array, shape: tuple[int, ...]) -> Array:
    """Sum ``x`` over the axes along which an array of ``shape`` was broadcast to ``x.shape``."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1
    )
    return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


def grid_value(grid, x: Array, scale: Array, zero_point: Array | None = None) -> tuple[Array, Array, Array]:
    """The grid rounding every integer and table fake-quant forward uses: ``(v, u, codes)`` with
    ``u = x / s + z`` (:func:`qjax.scales.grid_units`), ``codes = encode(u)`` and
    ``v = (decode(codes) - z) * s`` in ``x``'s dtype (saturated at its largest finite value)."""
    u = grid_units(x, scale)
    if zero_point is not None:
        u = u + zero_point
    codes = grid.encode(u)
    return grid.dequant(codes, scale, zero_point, dtype=x.dtype).astype(x.dtype), u, codes


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
    return grid_value(grid, x, scale, zero_point)[0]


def _grid_ste_fwd(x, scale, zero_point, grad_scale, grid, clipped):
    value, u, codes = grid_value(grid, x, scale, zero_point)
    return value, (x, scale, zero_point, grad_scale, u, codes)


def _grid_ste_bwd(grid, clipped, res, g):
    x, scale, zero_point, grad_scale, u, codes = res
    inside = (u >= grid.lo) & (u <= grid.hi)
    dx = jnp.where(inside, g, 0).astype(g.dtype) if clipped else g
    q = grid.dequant(codes, jnp.ones((), jnp.float32), zero_point)
    ds_elem = g.astype(jnp.float32) * (q - jnp.where(inside, grid_units(x, scale), 0.0))
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
