"""Serving a frozen weight: ``x @ W`` straight from a packed :class:`~qjax.QArray`.

A frozen ``(K, *features)`` weight whose codes are integers (int, binary, ternary) or FP4 E2M1 values
(MXFP4, NVFP4: their block scales read as float32 steps), packed along K (axis 0) and scaled per tensor,
per output channel or per group along K, runs on :func:`kernels_pallas.packed_matmul` without ever
materialising the float weight. Other frozen weights (NF4, fp8, multi-basis, other layouts) are dequantized
first. Shared by the Linen and NNX transforms.

When the input quantizer also gives integer codes (signed, at most 8 bits, one scale per tensor or per
token: :func:`integer_input`), :func:`frozen_int_matmul` runs the integer product instead: the input is
quantized to int8 codes by :func:`qjax.quantize` (the very codes and scales of its fake-quant value) and
:func:`kernels_pallas.packed_int_matmul` multiplies them by the packed weight codes, exact int32 sums per
weight group, ``y = s_x sum_g s_w[g] (acc_g - z[g] r_g)``: ``fake_quant(x) @ dequantize(w)`` up to float
rounding, asymmetric (zero-point) weights included. (MX/NVFP4 inputs stay float: E2M1 values times 2 are
integers in ``[-12, 12]``, so an fp4 x fp4 product could be integer too, but no kernel here does it.)

Which kernel backend a frozen model runs is a static setting of the quantized model
(``quantize_model(..., backend="interpret")`` or ``qjax.nnx.freeze(model, backend=...)``;
:class:`qjax.core.Settings`), so a jitted function runs the program its arguments choose.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from qjax import qat
from qjax.granularity import PerChannel, PerGroup, PerTensor, PerToken
from qjax.int_matmul import integer_codes
from qjax.qarray import QArray
from qjax.quantizer import Quantizer, fake_quant, quantize
from qjax.scales import scale_value


def pack_axis(shape: tuple[int, ...], contract: int, bits: int) -> int:
    """The axis a frozen weight is packed along: axis 0 (K) for a weight the packed matmul reads as a
    ``(K, N)`` matrix (``contract == 1``), else the axis that needs the fewest uint32 words for ``bits``-bit
    codes (a ``(3, 3, cin, cout)`` conv kernel packs along ``cin`` or ``cout``, not along its 3 rows)."""
    if contract == 1:
        return 0
    per_word = 32 // next(b for b in (1, 2, 4, 8) if b >= bits)
    words = lambda a: -(-shape[a] // per_word) * math.prod(shape) // shape[a]
    return min(range(len(shape)), key=lambda a: (words(a), -shape[a], a))


def pack_for_serving(qa: QArray, contract: int) -> QArray:
    """``qa`` with its codes packed in uint32 words along :func:`pack_axis` (what every freeze stores)."""
    return qa.pack(pack_axis(qa.shape, contract, qa.fmt.bits))


def packed_layout(w: QArray) -> tuple[int, int] | None:
    """``(K, N)`` when ``w`` can run on the packed matmul as a ``(K, N)`` matrix, else ``None``: integer
    codes (int, binary, ternary) or FP4 E2M1 codes (MXFP4 / NVFP4, :func:`element`)."""
    if not isinstance(w, QArray) or (w.fmt.kind not in ("int", "binary", "ternary") and element(w) != "e2m1"):
        return None
    if w.bases != 1 or w.packing is None or w.packing[0] != -len(w.shape):
        return None
    gran = w.granularity
    if isinstance(gran, PerChannel) and 0 in {a % len(w.shape) for a in gran.axis}:
        return None
    if isinstance(gran, PerGroup) and gran.axis % len(w.shape) != 0:
        return None
    if not isinstance(gran, PerTensor | PerChannel | PerGroup):
        return None
    return w.shape[0], math.prod(w.shape[1:])


def integer_input(q: Quantizer | None, hparams: Mapping) -> bool:
    """Whether inputs quantized by ``q`` run on :func:`frozen_int_matmul`: signed integer codes (int2..int8,
    ternary, binary) of one basis without zero point (not ``minmax``), a scale constant along the last axis
    K whatever the input's rank (``PerTensor()``, ``PerToken`` over axes that include ``-1``, or
    ``PerChannel`` over negative axes other than ``-1``: one scale per token), computed, ``given`` or
    ``learned``; and no ``enabled`` switch in ``hparams`` (it may keep the input float)."""
    if not isinstance(q, Quantizer) or "enabled" in hparams or not integer_codes(q):
        return False
    gran = q.granularity
    if isinstance(gran, PerTensor):
        return True
    if not isinstance(gran, PerToken | PerChannel):
        return False
    axes = gran.axis if isinstance(gran.axis, tuple) else (gran.axis,)
    if isinstance(gran, PerToken):
        return -1 in axes
    return all(a < -1 for a in axes)


def element(w: QArray) -> str:
    """What the packed matmul decodes ``w``'s 4-bit fields as: ``"e2m1"`` for FP4 E2M1 codes packed in
    4-bit fields, else ``"int"`` (:data:`kernels_pallas.layout.ELEMENTS`)."""
    fp4 = w.format == "fp4_e2m1" and (w.packing is None or w.packing[2] == 4)
    return "e2m1" if fp4 else "int"


def _matrix_scales(w: QArray, values: jax.Array, n: int) -> tuple[jax.Array, int | None]:
    """Per-(group, column) scales (or zero points) of ``w`` as a ``(groups, N)`` matrix."""
    if isinstance(w.granularity, PerGroup):
        groups = w.shape[0] // w.granularity.size
        return jnp.broadcast_to(values, (groups, 1, *w.shape[1:])).reshape(groups, n), w.granularity.size
    return jnp.broadcast_to(values, (1, *w.shape[1:])).reshape(1, n), None


def frozen_matmul(x: jax.Array, w: QArray, backend: str = "auto") -> jax.Array:
    """``x (..., K) @ w`` for a frozen ``(K, *features)`` weight: the packed matmul when
    :func:`packed_layout` allows it, else the dequantized weight. float32 ``(..., *features)``.

    ``backend``: the kernel backend of :func:`kernels_pallas.packed_matmul` (``"auto"``, ``"xla"``,
    ``"pallas"``, ``"interpret"``), checked on both paths. ``w`` not a QArray or ``x`` whose last axis is
    not K raise here.
    """
    import kernels_pallas

    x = _check_frozen(x, w, backend, "frozen_matmul")
    layout = packed_layout(w)
    if layout is None:
        return jnp.tensordot(x.astype(jnp.float32), w.dequantize().astype(jnp.float32), axes=1)

    _, n = layout
    # block scales (E8M0 exponents, E4M3 under a tensor scale) as the float32 steps they stand for
    scales, group_size = _matrix_scales(w, scale_value(w.scale, w.tensor_scale), n)
    zero = None if w.zero_point is None else _matrix_scales(w, w.zero_point, n)[0]
    words = w.codes.reshape(w.codes.shape[0], n)
    y = kernels_pallas.packed_matmul(x, words, scales, bits=w.packing[2], group_size=group_size,
                                     zero_point=zero, signed=w.fmt.signed, element=element(w),
                                     backend=backend)
    return y.reshape(*y.shape[:-1], *w.shape[1:])



def frozen_int_matmul(x: jax.Array, w: QArray, inputs: Quantizer, input_scale: jax.Array | None = None,
                      hparams: Mapping | None = None, backend: str = "auto") -> jax.Array:
    """``fake_quant(inputs, x) @ dequantize(w)`` as an integer product, float32 ``(..., *features)``.

    ``x (..., K)`` is quantized by ``inputs`` (an :func:`integer_input` quantizer; ``input_scale`` its
    ``given``/``learned`` scale, ``hparams`` the surrogate's) to int8 codes ``c_x`` and scales ``s_x`` with
    :func:`qjax.quantize`, and ``w`` (a frozen weight :func:`packed_layout` accepts) runs on
    :func:`kernels_pallas.packed_int_matmul` (``backend``):
    ``y[..., n] = s_x[...] sum_g s_w[g, n] sum_{k in g} c_x[..., k] (c_w[k, n] - z[g, n])``, exact integer
    sums per weight group (QServe's W4A8, QuaRot's and Atom's W4A4, LLM.int8()'s W8A8 GEMM; see the kernel).
    Equal to :func:`frozen_matmul` of the fake-quant input up to float rounding, NaN rows included (a token
    holding NaN or Inf gets a NaN scale); its gradient is that path's (straight-through for ``x``).
    Raises here: ``w`` not a QArray or not packed along K, ``x`` whose last axis is not K, an unknown
    ``backend``, an ``inputs`` quantizer :func:`integer_input` refuses.
    """
    x = _check_frozen(x, w, backend, "frozen_int_matmul")
    if packed_layout(w) is None or w.fmt.kind == "float":
        raise ValueError(f"frozen_int_matmul: w ({w.format}, {w.granularity}, packing {w.packing}) is not a "
                         "packed integer (K, N) weight; allowed: what packed_layout accepts (int, binary or "
                         "ternary codes packed along axis 0, scales per tensor, output channel or K group)")
    if not integer_input(inputs, hparams or {}):
        raise ValueError(f"frozen_int_matmul: inputs {inputs!r} give no int8 codes with a scale constant "
                         "along K; allowed: signed integer formats of at most 8 bits (int2..int8, ternary, "
                         "binary), not 'minmax', PerTensor() or one scale per token (see integer_input)")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"frozen_int_matmul: x of dtype {x.dtype}; allowed: a float array")
    kw = qat.surrogate_kwargs(inputs, dict(hparams or {}))
    return _frozen_int(inputs, backend, x, w, input_scale, {k: jnp.asarray(v) for k, v in kw.items()})


def _check_frozen(x, w, backend: str, who: str) -> jax.Array:
    """``x`` as an array after the checks both frozen products share (module docstring)."""
    import kernels_pallas

    if not isinstance(w, QArray):
        raise TypeError(f"{who}: w is a {type(w).__name__}; allowed: a QArray (a frozen weight)")
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"{who}: x of shape {x.shape} does not contract with a weight of shape "
                         f"{w.shape}; allowed: x of shape (..., {w.shape[0]})")
    if backend not in kernels_pallas.BACKENDS:
        raise ValueError(f"{who}: unknown backend {backend!r}; allowed: {', '.join(kernels_pallas.BACKENDS)}")
    return x


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _frozen_int(inputs: Quantizer, backend: str, x, w: QArray, scale, kw: dict):
    """The integer product (:func:`frozen_int_matmul`); its VJP is the weight-only path's."""
    import kernels_pallas

    qx = quantize(inputs, x, scale=scale, **kw)
    lead, n = x.shape[:-1], packed_layout(w)[1]
    sx = qx.scale.reshape(()) if qx.scale.size == 1 else jnp.broadcast_to(qx.scale, (*lead, 1))
    scales, group_size = _matrix_scales(w, w.scale, n)
    zero = None if w.zero_point is None else _matrix_scales(w, w.zero_point, n)[0]
    y = kernels_pallas.packed_int_matmul(qx.codes.astype(jnp.int8), sx, w.codes.reshape(w.codes.shape[0], n),
                                         scales, bits=w.packing[2], group_size=group_size, zero_point=zero,
                                         signed=w.fmt.signed, backend=backend)
    return y.reshape(*lead, *w.shape[1:])


def _weight_only(inputs: Quantizer, backend: str, x, w: QArray, scale, kw: dict):
    """The same product on the weight-only path: ``frozen_matmul(fake_quant(inputs, x), w)``."""
    return frozen_matmul(fake_quant(inputs, x, scale=scale, **kw), w, backend)


def _frozen_int_fwd(inputs, backend, x, w, scale, kw):
    return _frozen_int(inputs, backend, x, w, scale, kw), (x, w, scale, kw)


def _frozen_int_bwd(inputs, backend, residuals, g):
    _, vjp = jax.vjp(functools.partial(_weight_only, inputs, backend), *residuals)
    return vjp(g)


_frozen_int.defvjp(_frozen_int_fwd, _frozen_int_bwd)
