"""Quantizer: format + scale rule + granularity + surrogate gradient, and the three functions using it.

``fake_quant(q, x)`` (training), ``quantize(q, x) -> QArray`` (serving), ``dequantize(qarray)``, with the
invariant ``fake_quant(q, x) == dequantize(quantize(q, x))`` bit for bit: both compute the same codes and
scales and the same float operations; only the gradient differs. (XLA may order a float reduction
differently in two separately compiled programs; the multi-basis residual means are the one place where
that can change a scale by an ulp between an eager and a jitted call. Under one compilation mode the
invariant is exact for every quantizer, and the tests check it so.)

Gradients of ``fake_quant``:

- ``binary`` (one basis): ``y = s * sign(r(x))`` with the surrogate's real-valued forward ``r`` (the
  identity, or BiPer's ``sin(omega x)``), so ``dy/dx = s * d(x)`` with the surrogate's ``d``
  (:mod:`qjax.surrogates`: ste, clipped_ste, approx_sign, swish_sign, reste, biper) applied to the raw
  ``x``, as in larq, ReSTE and BiPer. :func:`relaxed_quant` gives ``s * r(x)`` with the same ``s``.
- multi-level formats (int, uint, ternary, fp8, fp4, nf4, dynamic): ``y = (q(x/s + z) - z) * s`` with
  the identity (``ste``) or clipped (``clipped_ste``, zero outside the representable range) straight-through
  gradient (:func:`qjax.surrogates.grid_ste`), as the surrogate record's ``clipped`` says.
- multi-basis binary (``bases = k > 1``): straight-through, clipped to ``|x| <= sum_i alpha_i`` for
  ``clipped_ste``.

Computed scales (absmax, mean_abs, median, minmax) are detached (``stop_gradient``), as in Bi-Real Net and
BitNet. A ``given`` scale passed by the caller receives the LSQ step gradient with ``grad_scale = 1``; a
``learned`` scale (a parameter) receives it scaled by ``1/sqrt(n * fmax)`` (Esser et al. 2020) and is used
by its magnitude ``|s|`` (a step pushed through zero by the optimizer keeps working). A ``given`` scale must
be finite and at least the smallest normal float32, the floor of every computed scale (a subnormal one acts
as 0 where the machine flushes subnormals); NaN marks a poisoned group. Concrete scales are checked; a
traced one (and a learned ``|s|``) is floored at that value, and an infinite or negative traced one makes
its group's values NaN. The MX block rules (``e8m0``, ``nvfp4``) compute their scales too, detached.
Surrogate hyperparameters (``o``, ``t``, ``omega``, ``beta``) are keyword arguments and may be traced.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax import surrogates
from qjax.formats import Format, get_format
from qjax.granularity import PerBlock, PerChannel, PerGroup, PerTensor, PerToken
from qjax.qarray import QArray, dequantize, dequantize_blocks
from qjax.scales import (
    COMPUTED_RULES,
    HUGE,
    INIT_RULES,
    MX_FORMATS,
    MX_RULES,
    SCALE_RULES,
    TINY,
    compute_scale,
    grid_units,
    mark_nonfinite,
    mx_scale,
    scale_value,
)

_GRANULARITIES = (PerTensor, PerChannel, PerToken, PerGroup, PerBlock)

__all__ = ["Quantizer", "dequantize", "fake_quant", "init_scale", "quantize", "relaxed_quant", "scale_shape"]


@dataclasses.dataclass(frozen=True)
class Quantizer:
    """How to quantize an array: a frozen, hashable description, static under ``jit``.

    Attributes:
      format: a name from :data:`qjax.formats.FORMAT_NAMES` (``"int4"``, ``"binary"``, ``"nf4"``, ...).
      granularity: ``PerTensor()``, ``PerChannel(axis)``, ``PerToken(axis)``, ``PerGroup(axis, size)``
        or ``PerBlock(size)``.
      scale: ``"absmax"``, ``"absmax_edge"`` (GPTQ's and Qwix's symmetric grid, :mod:`qjax.scales`),
        ``"mean_abs"``, ``"median"``, ``"minmax"`` (integer formats, with a zero point),
        ``"e8m0"`` (OCP MX: a power of two per block, stored as a uint8 exponent; float formats),
        ``"nvfp4"`` (NVIDIA NVFP4: an E4M3 scale per block and a float32 one per tensor; ``fp4_e2m1``),
        ``"given"`` or ``"learned"`` (passed to the call as ``scale=``). See :mod:`qjax.scales`; the MX
        block formats are built by :func:`qjax.presets.mxfp8`, :func:`~qjax.presets.mxfp4` and
        :func:`~qjax.presets.nvfp4`.
      surrogate: the backward rule, a name in :data:`qjax.surrogates.SURROGATES`: for ``binary`` any of
        them, for other formats (and multi-basis binary) those with ``grid=True`` (``"ste"``,
        ``"clipped_ste"``). Its record is :attr:`surrogate_spec`.
      bases: number of residual binary bases (``binary`` only): ``x ~ sum_i alpha_i b_i`` with
        ``b_i = sign(r_{i-1})``, ``alpha_i = mean|r_{i-1}|``, ``r_0 = x``, ``r_i = r_{i-1} - alpha_i b_i``
        (multi-basis binarization: ReActNet-style residual bases, BinaryDM, DB-LLM).
      eps: floor on the scale statistic (BitNet b1.58 uses ``1e-5``); scales are never below the
        smallest normal float32 in any case.
    """

    format: str = "int8"
    granularity: PerTensor | PerChannel | PerToken | PerGroup | PerBlock = PerTensor()  # noqa: RUF009 (frozen)
    scale: str = "absmax"
    surrogate: str = "ste"
    bases: int = 1
    eps: float = 0.0

    def __post_init__(self):
        fmt = get_format(self.format)
        if isinstance(self.format, Format):
            object.__setattr__(self, "format", fmt.name)
        if not isinstance(self.granularity, _GRANULARITIES):
            raise TypeError(f"granularity {self.granularity!r} is not a granularity; allowed: "
                            "PerTensor(), PerChannel(axis), PerToken(axis), PerGroup(axis, size), "
                            "PerBlock(size)")
        if self.scale not in SCALE_RULES:
            raise ValueError(f"unknown scale rule {self.scale!r}; allowed: {', '.join(SCALE_RULES)}")
        if self.scale == "minmax" and fmt.kind != "int":
            raise ValueError(f"scale rule 'minmax' needs an integer format, got {fmt.name!r}; "
                             "allowed: int2..int8, uint2..uint8")
        if self.scale in MX_RULES and fmt.name not in MX_FORMATS[self.scale]:
            raise ValueError(f"scale rule {self.scale!r} needs a float element format, got {fmt.name!r}; "
                             f"allowed: {', '.join(MX_FORMATS[self.scale])}")
        if not isinstance(self.bases, int) or isinstance(self.bases, bool) or self.bases < 1:
            raise ValueError(f"bases={self.bases!r} must be a positive integer")
        if self.bases > 1 and fmt.kind != "binary":
            raise ValueError(f"bases={self.bases} needs format 'binary', got {fmt.name!r}")
        if self.bases > 1 and self.scale not in ("mean_abs", "given"):
            raise ValueError(f"multi-basis binary computes alpha_i = mean|r_i|: scale {self.scale!r} "
                             "is not supported; allowed: 'mean_abs', 'given'")
        allowed = self.allowed_surrogates
        if self.surrogate not in allowed:
            raise ValueError(f"unknown surrogate {self.surrogate!r} for format {fmt.name!r}"
                             f"{' with bases > 1' if self.bases > 1 else ''}; allowed: "
                             f"{', '.join(allowed)}")
        if not isinstance(self.eps, int | float) or not 0 <= self.eps < math.inf:
            raise ValueError(f"eps={self.eps!r} must be a finite float >= 0")

    @property
    def fmt(self) -> Format:
        return get_format(self.format)

    @property
    def allowed_surrogates(self) -> tuple[str, ...]:
        if self.fmt.kind == "binary" and self.bases == 1:
            return tuple(surrogates.SURROGATES)
        return surrogates.GRID_SURROGATES

    @property
    def surrogate_spec(self) -> surrogates.Surrogate:
        """The :class:`qjax.surrogates.Surrogate` record of ``surrogate`` (hyperparameters, custom forward,
        ``clipped``, ``identity_backward``)."""
        return surrogates.SURROGATES[self.surrogate]

    @property
    def is_sign(self) -> bool:
        return self.fmt.kind == "binary" and self.bases == 1


def _check_input(x, who: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{who}: x must be a floating-point array, got dtype {x.dtype}; "
                        "allowed: float32, bfloat16, float16, float64")
    return x


def scale_shape(q: Quantizer, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of ``q``'s scale for an input of ``shape`` (block view with reduced axes of size 1;
    a leading axis of ``bases`` for multi-basis binary)."""
    gran = q.granularity.resolve(tuple(shape))
    blocks = jax.eval_shape(gran.to_blocks, jax.ShapeDtypeStruct(tuple(shape), jnp.float32)).shape
    axes = gran.reduce_axes(len(blocks))
    out = tuple(1 if i in axes else n for i, n in enumerate(blocks))
    return (q.bases, *out) if q.bases > 1 else out


def init_scale(q: Quantizer, x: jax.Array, rule: str = "absmax") -> jax.Array:
    """An initial value for a ``learned`` or ``given`` scale from the data, by ``rule`` (``absmax``,
    ``absmax_edge``, ``mean_abs``, ``median``, ``lsq_init``: ``2 mean|x| / sqrt(Q_P)``, ``Q_P`` the largest
    code)."""
    if not isinstance(q, Quantizer):
        raise TypeError(f"init_scale expects a Quantizer, got {type(q).__name__}")
    x = _check_input(x, "init_scale")
    if rule not in INIT_RULES or rule == "minmax":
        allowed = ", ".join(r for r in INIT_RULES if r != "minmax")
        raise ValueError(f"init_scale: unknown rule {rule!r}; allowed: {allowed}")
    gran = q.granularity.resolve(x.shape)
    xb = gran.to_blocks(x)
    axes = gran.reduce_axes(xb.ndim)
    if q.bases > 1:
        return _residual_codes(q, xb, axes, None)[1]
    return compute_scale(rule, q.fmt, xb, axes, q.eps)[0]


def _caller_scale(q: Quantizer, x: jax.Array, value, name: str, positive: bool = True) -> jax.Array:
    expected = scale_shape(q, x.shape)
    value = jnp.asarray(value, jnp.float32)
    squeeze = lambda s: tuple(n for n in s if n != 1)
    if value.shape != expected and squeeze(value.shape) != squeeze(expected):
        raise ValueError(f"{name} has shape {value.shape}; allowed: {expected} (or the same without "
                         f"its size-1 axes) for input shape {x.shape} and {q.granularity}")
    concrete = not isinstance(value, jax.core.Tracer)
    if positive and concrete:
        v = np.asarray(value)
        bad = v[~((v >= TINY) & (v < np.inf)) & ~np.isnan(v)]
        if bad.size:
            raise ValueError(f"{name} must be positive and finite, got {float(bad[0])}; allowed: finite "
                             f"values >= {TINY:g} (the smallest normal float32, the floor of every computed "
                             "scale); NaN marks a poisoned group")
    return value.reshape(expected)


def _usable(s: jax.Array) -> jax.Array:
    """A caller's scale as the rules use it: floored at :data:`TINY`, an infinite or negative one NaN (its
    group dequantizes to NaN). Concrete ``given`` scales were checked; this is what a traced one does."""
    return jnp.where((s >= 0) & (s < jnp.inf), jnp.maximum(s, TINY), jnp.nan)


def _scales(q: Quantizer, x, xb, axes, scale, zero_point):
    """(scale, zero_point, tensor_scale) for the block view ``xb``, as a QArray stores them: float32, but a
    block rule's scale in its narrow dtype with its tensor scale (:func:`qjax.scales.mx_scale`; the elements
    divide by :func:`qjax.scales.scale_value` of the two). Computed scales are detached."""
    if q.scale in COMPUTED_RULES or q.scale in MX_RULES:
        if scale is not None or zero_point is not None:
            raise ValueError(f"scale rule {q.scale!r} computes its own scale; pass scale= only with "
                             "scale='given' or 'learned'")
        if q.bases > 1:
            return None, None, None
        if q.scale in MX_RULES:
            s, t = mx_scale(q.scale, q.fmt, jax.lax.stop_gradient(xb), axes, q.eps)
            return s, None, t
        s, z = compute_scale(q.scale, q.fmt, jax.lax.stop_gradient(xb), axes, q.eps)
        return s, z, None
    if scale is None:
        raise ValueError(f"scale rule {q.scale!r} needs scale=...; init_scale(q, x) gives a start")
    if q.scale == "learned":
        # A learned step is used by its magnitude, so a step that an optimizer pushes through zero (BiPer's
        # alpha under a large learning rate) keeps training and freezing: |s|, floored at the smallest normal.
        s = _usable(jnp.abs(_caller_scale(q, x, scale, "scale", positive=False)))
    else:
        s = _usable(_caller_scale(q, x, scale, "scale"))
    s = mark_nonfinite(s, jax.lax.stop_gradient(xb), axes)
    z = None if zero_point is None else _caller_scale(q, x, zero_point, "zero_point", positive=False)
    return s, z, None


def _residual_codes(q: Quantizer, xb, axes, given):
    """Multi-basis binary: codes ``(k, *xb.shape)`` and scales ``(k, *scale)``, greedy on residuals. Each
    ``alpha_i`` is capped so that ``sum_i alpha_i`` stays below the largest float32 (``sum_i alpha_i b_i``
    of finite input never overflows; only inputs near 3.4e38 reach the cap)."""
    residual = xb.astype(jnp.float32)
    codes, scales = [], []
    room = jnp.float32(HUGE * (1 - 2.0**-20))
    for i in range(q.bases):
        codes.append(q.fmt.encode(residual))
        alpha = compute_scale("mean_abs", q.fmt, residual, axes, q.eps)[0] if given is None else given[i]
        alpha = jnp.minimum(alpha, jnp.maximum(room, TINY))
        room = room - alpha
        scales.append(alpha)
        residual = residual - q.fmt.dequant(codes[-1], alpha)
    return jnp.stack(codes), jnp.stack(scales)


def _encode_input(q: Quantizer, xb, hparams):
    """What the format encodes, in float32: a sign surrogate's real-valued forward ``r(x)`` (BiPer's
    ``sin(omega x)``, else ``x``), or ``x`` itself for other formats."""
    if q.is_sign:
        return q.surrogate_spec.real_forward(xb, **hparams)
    return xb.astype(jnp.float32)


def _check_hparams(q: Quantizer, hparams: dict) -> None:
    allowed = list(q.surrogate_spec.hyperparameters) if q.is_sign else []
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for surrogate {q.surrogate!r} on "
                         f"{q.format!r}; allowed: {allowed or 'none'}")


def quantize(q: Quantizer, x: jax.Array, scale: jax.Array | None = None,
             zero_point: jax.Array | None = None, **hparams) -> QArray:
    """Quantize ``x`` to a :class:`QArray`: ``codes = encode(x / s + z)`` per scale group.

    The QArray keeps the scale as its rule stores it: float32, or for the block rules (``e8m0``, ``nvfp4``)
    uint8 E8M0 exponents, or float8_e4m3fn block scales with a float32 ``tensor_scale``, where ``s`` is
    :func:`qjax.scales.scale_value` of them. ``scale``/``zero_point`` are required for the ``given`` and
    ``learned`` rules; ``hparams`` are the surrogate's (only BiPer's ``omega`` changes the codes).
    """
    if not isinstance(q, Quantizer):
        raise TypeError(f"quantize expects a Quantizer, got {type(q).__name__}")
    x = _check_input(x, "quantize")
    _check_hparams(q, hparams)
    gran = q.granularity.resolve(x.shape)
    xb = gran.to_blocks(x)
    axes = gran.reduce_axes(xb.ndim)
    s, z, t = _scales(q, x, xb, axes, scale, zero_point)
    if q.bases > 1:
        codes_b, s = _residual_codes(q, xb, axes, s)
        codes = jax.vmap(lambda c: gran.from_blocks(c, x.shape))(codes_b)
    else:
        u = grid_units(_encode_input(q, xb, hparams), scale_value(s, t))
        codes = gran.from_blocks(q.fmt.encode(u if z is None else u + z), x.shape)
    return QArray(codes, s, z, q.format, gran, x.dtype.name, q.bases, tensor_scale=t)


@jax.custom_vjp
def _pass_through(x, value, mask):
    return value


def _pass_through_fwd(x, value, mask):
    return value, mask


def _pass_through_bwd(mask, g):
    return jnp.where(mask, g, 0).astype(g.dtype), jnp.zeros_like(g), None


_pass_through.defvjp(_pass_through_fwd, _pass_through_bwd)


def fake_quant(q: Quantizer, x: jax.Array, scale: jax.Array | None = None,
               zero_point: jax.Array | None = None, **hparams) -> jax.Array:
    """``dequantize(quantize(q, x))`` bit for bit, in ``x``'s dtype, with ``q.surrogate``'s gradient.

    See the module docstring for the gradients. Works under ``jit``, ``grad``, ``vmap`` and ``scan``;
    hyperparameters such as ReSTE's ``o`` or BiPer's ``omega`` may be traced arrays.
    """
    if not isinstance(q, Quantizer):
        raise TypeError(f"fake_quant expects a Quantizer, got {type(q).__name__}")
    x = _check_input(x, "fake_quant")
    _check_hparams(q, hparams)
    gran = q.granularity.resolve(x.shape)
    xb = gran.to_blocks(x)
    axes = gran.reduce_axes(xb.ndim)
    s, z, t = _scales(q, x, xb, axes, scale, zero_point)
    if q.is_sign:
        signs = q.surrogate_spec(xb, **hparams)
        value = q.fmt.dequant(signs, s, dtype=x.dtype).astype(x.dtype)
    elif q.bases > 1:
        codes_b, s = _residual_codes(q, jax.lax.stop_gradient(xb), axes, s)
        exact = dequantize_blocks(q.fmt, codes_b, s, None, q.bases).astype(x.dtype)
        inside = True
        if q.surrogate_spec.clipped:
            inside = jnp.abs(xb) <= jnp.sum(s, axis=0)
        value = _pass_through(xb, exact, jnp.broadcast_to(inside, xb.shape))
    else:
        grad_scale = 1.0
        if q.scale == "learned":
            grad_scale = 1.0 / math.sqrt(xb.size / s.size * q.fmt.hi)
        grad_scale = jnp.asarray(grad_scale, jnp.float32)
        value = surrogates.grid_ste(xb, scale_value(s, t), z, grad_scale, q.fmt, q.surrogate_spec.clipped)
    return gran.from_blocks(value, x.shape)


def relaxed_quant(q: Quantizer, x: jax.Array, scale: jax.Array | None = None, **hparams) -> jax.Array:
    """``s * r(x)``: the real-valued relaxation of a sign quantizer's ``fake_quant(q, x) = s * sign(r(x))``,
    with the surrogate's real-valued forward ``r`` (BiPer's ``sin(omega x)``; the identity for a plain
    sign) and the very scale ``s`` that ``fake_quant`` uses (a ``learned`` scale by its magnitude ``|s|``,
    a computed one detached), in ``x``'s dtype; ordinary autodiff gradients.

    BiPer's stage 1 (Vargas, Hidalgo, Arce, "BiPer: Binary Neural Networks using a Periodic Function", CVPR
    2024) trains ``alpha * sin(omega w)`` and stage 2 ``alpha * sign(sin(omega w))``: with one ``s`` the
    switch never flips a weight's sign, even for a channel whose learned alpha went negative.
    """
    if not isinstance(q, Quantizer):
        raise TypeError(f"relaxed_quant expects a Quantizer, got {type(q).__name__}")
    if not q.is_sign:
        raise ValueError(f"relaxed_quant needs a sign quantizer (format 'binary' with bases=1), got "
                         f"format {q.format!r} with bases={q.bases}")
    x = _check_input(x, "relaxed_quant")
    _check_hparams(q, hparams)
    gran = q.granularity.resolve(x.shape)
    xb = gran.to_blocks(x)
    s, _, _ = _scales(q, x, xb, gran.reduce_axes(xb.ndim), scale, None)
    value = s * q.surrogate_spec.real_forward(xb, **hparams)
    return gran.from_blocks(value.astype(x.dtype), x.shape)
