"""The fused QAT matmul: ``fake_quant(x) . fake_quant(w)`` as one custom-VJP op, with an int8 x int8 -> int32
product or a float product of the fake-quant values.

For a weight quantized to integer codes ``c_w`` (up to 8 bits: int2..int8, ternary, binary) with scales
``s_w`` per tensor or per output channel, and an input quantized to integer codes ``c_x`` with a scale
``s_x`` per tensor or per token, the fake-quantized product is

    y[m, n] = sum_k (c_x[m, k] s_x[m]) (c_w[k, n] s_w[n]) = s_x[m] s_w[n] sum_k c_x[m, k] c_w[k, n]

and the integer sum is exact in int32, so computing it with an int8 ``dot_general`` and scaling afterwards
gives the float fake-quant result up to float rounding, faster where the platform multiplies int8 faster
than float32 (Qwix's QAT does the same for int8). The backward is exactly that of the fake-quant path
(``jax.vjp`` of ``fake_quant(x) @ fake_quant(w)``), surrogate gradients included.

Which product (the ``product`` argument; ``"auto"``: :func:`qjax.machine.resolve_product`): ``"int8"``
where int8 multiplies faster than float32 (GPU, TPU, CPUs with VNNI/AMX), ``"float"`` elsewhere (XLA's int8
dot is no faster than its float32 one on AVX2-only CPUs): the same op with ``fake_quant(x) . fake_quant(w)``
in float32, which keeps the fake-quant values themselves for the backward instead of recomputing them from
the codes (one pass fewer over each weight). Both give the fake-quant product up to float rounding and the
same gradients. Non-finite operands: the int8 product marks a group holding a NaN or Inf through its scale, as
:func:`qjax.quantize` does (integer codes cannot hold a NaN); the float product marks Inf the same way but
lets a NaN element through by itself (one reduction fewer per operand), which makes the same outputs NaN.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from qjax import qat
from qjax.granularity import PerChannel, PerTensor, PerToken
from qjax.machine import PRODUCTS, resolve_product
from qjax.qarray import QArray, dequantize
from qjax.quantizer import Quantizer, fake_quant, quantize
from qjax.scales import COMPUTED_RULES, compute_scale
from qjax.surrogates import grid_value

INT_KINDS = ("int", "binary", "ternary")
RESIDUALS = ("quantized", "original")
"""The backward products' operands (:func:`qat_matmul`): the fake-quant values, or the unquantized ones."""


def integer_codes(q: Quantizer) -> bool:
    """Whether ``q`` gives codes an integer product can sum exactly: signed integer grids of up to 8 bits
    (int2..int8, ternary, binary), one basis, no zero point (every rule but ``minmax``)."""
    fmt = q.fmt
    return fmt.kind in INT_KINDS and fmt.signed and fmt.bits <= 8 and q.bases == 1 and q.scale != "minmax"


def integer_eligible(weight: Quantizer | None, inputs: Quantizer | None, hparams: dict,
                     w_ndim: int = 2, contract: int = 1) -> bool:
    """Whether a ``(*K, *features)`` weight (``contract`` leading contraction axes, rank ``w_ndim``) and an
    ``(..., *K)`` input can take the int8 path: signed integer codes of up to 8 bits without zero point,
    weight scales constant along K (per tensor or per output channel), input scales constant along K (per
    tensor, or per token over the contracted axes), and no per-step switch (``enabled``, ``biper_binarize``)
    that swaps the quantized value for a float one."""
    if weight is None or inputs is None or {"enabled", "biper_binarize"} & set(hparams):
        return False
    if not 1 <= contract < w_ndim:
        return False
    if not (integer_codes(weight) and integer_codes(inputs)):
        return False
    if weight.is_sign and weight.surrogate_spec.has_custom_forward:
        return False  # a custom forward (BiPer's sign(sin(omega w)), its stage switch) stays on fake-quant
    gw, gx = weight.granularity, inputs.granularity
    weight_ok = isinstance(gw, PerTensor) or (
        isinstance(gw, PerChannel) and all(a % w_ndim >= contract for a in _axes(gw)))
    input_ok = isinstance(gx, PerTensor) or (
        isinstance(gx, PerToken) and sorted(_axes(gx)) == list(range(-contract, 0)))
    return weight_ok and input_ok


def _axes(g) -> tuple[int, ...]:
    return g.axis if isinstance(g.axis, tuple) else (g.axis,)


def _fake_quant_vjp(q: Quantizer, x, scale, hparams):
    """``fake_quant(q, x)`` and its VJP function (a pytree that can be a custom_vjp residual)."""
    return jax.vjp(lambda v, s: fake_quant(q, v, scale=s, **qat.surrogate_kwargs(q, hparams)), x, scale)


def _identity_backward(q: Quantizer) -> bool:
    """Whether ``fake_quant(q, .)`` has the identity VJP: a multi-level grid with a computed (detached)
    scale and the plain straight-through estimator. Its backward then needs only the fake-quant value: the
    float product keeps the value it multiplied, the int8 product its codes and scales (4x fewer bytes)."""
    return q.scale in COMPUTED_RULES and not q.is_sign and q.surrogate_spec.identity_backward


def _float_fake_quant(q: Quantizer, x: jax.Array) -> jax.Array:
    """``fake_quant(q, x)`` of an identity-VJP quantizer (:func:`_identity_backward`) for the float product:
    the same grid rounding (:func:`qjax.surrogates.grid_value`), so the same bits wherever ``x``'s group is
    free of NaN. A NaN element stays NaN by itself instead of marking its whole group through the scale (one
    reduction fewer per operand; Inf still marks its group), so the product's outputs are NaN exactly
    where the group-marked product's are: a NaN term reaches every output its group's values feed.
    """
    gran = q.granularity.resolve(x.shape)
    xb = gran.to_blocks(x)
    s, _ = compute_scale(q.scale, q.fmt, jax.lax.stop_gradient(xb), gran.reduce_axes(xb.ndim), q.eps,
                         mark_nan=False)
    value = grid_value(q.fmt, xb, s)[0]
    return gran.from_blocks(jnp.where(jnp.isnan(xb), xb, value), x.shape)


def _residual(q: Quantizer, v, qa, value, scale, hparams, residuals: str):
    """What the backward keeps of one operand: the operand its product takes (``residuals="original"``: ``v``
    itself; else, with the identity VJP, its fake-quant ``value`` when the product computed it (float
    product) or its codes) and, unless the VJP is the identity, the fake-quant VJP."""
    if not _identity_backward(q):
        value_q, vjp = _fake_quant_vjp(q, v, scale, hparams)
        return (v if residuals == "original" else value_q), vjp
    if residuals == "original":
        return v
    return qa if value is None else value


def _value_and_vjp(res):
    """The backward product's operand and the fake-quant VJP function from :func:`_residual`
    (``dequantize(quantize(x))`` is ``fake_quant(x)`` bit for bit, in ``x``'s dtype)."""
    if isinstance(res, QArray | jax.Array):  # identity VJP
        return (dequantize(res) if isinstance(res, QArray) else res), lambda g: (g, None)
    return res


def qat_matmul(x: jax.Array, w: jax.Array, weight: Quantizer, inputs: Quantizer,
               x_scale: jax.Array | None = None, w_scale: jax.Array | None = None,
               hparams: dict | None = None, contract: int = 1, product: str = "auto",
               residuals: str = "quantized") -> jax.Array:
    """``y = fake_quant(inputs, x) . fake_quant(weight, w)`` contracted over ``contract`` axes, as one op.

    ``y[m, n] = s_x[m] s_w[n] sum_k c_x[m, k] c_w[k, n]`` (integer codes ``c``, scales ``s``), computed with
    ``product``: ``"int8"`` (int8 x int8 -> int32 ``dot_general``, then the scales), ``"float"`` (float32
    product of the fake-quant values) or ``"auto"`` (:func:`qjax.machine.resolve_product`: int8 where this
    machine multiplies int8 faster). ``x``: ``(..., *K)``; ``w``:
    ``(*K, *features)``; returns float32 ``(..., *features)``. Gradients are those of the fake-quant product
    (surrogates included): Jacob et al., "Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference", CVPR 2018, for the integer form. See the module docstring.

    ``residuals`` picks the operands of the backward's two products (:data:`RESIDUALS`). ``"quantized"``
    (default): the exact gradient of the fake-quant product, ``dx = r_x'(g . Q(w)^T)``,
    ``dw = r_w'(Q(x)^T . g)``, with ``r'`` each quantizer's surrogate VJP (the identity for the plain STE).
    ``"original"``: the unquantized operands, ``dx = r_x'(g . w^T)``, ``dw = r_w'(x^T . g)``, what Qwix's
    ``QtProvider`` computes: no fake-quant value is kept for the backward, so the forward may fuse the
    rounding into the product, at the price of a gradient that ignores the rounding of the other operand.

    Raises here (shapes and quantizers are static, so also under ``jit``): quantizers that are not
    :class:`~qjax.Quantizer` (``TypeError``), a pair that :func:`integer_eligible` refuses (an integer sum
    of nf4 indices or per-group scales would be wrong), ``contract`` outside ``1 .. w.ndim - 1``, or ``x``
    whose last ``contract`` axes are not ``w``'s first.
    """
    if product not in PRODUCTS:
        raise ValueError(f"qat_matmul: unknown product {product!r}; allowed: {', '.join(PRODUCTS)}")
    if residuals not in RESIDUALS:
        raise ValueError(f"qat_matmul: unknown residuals {residuals!r}; allowed: {', '.join(RESIDUALS)}")
    for name, q in (("weight", weight), ("inputs", inputs)):
        if not isinstance(q, Quantizer):
            raise TypeError(f"qat_matmul: {name} is a {type(q).__name__}; allowed: a Quantizer")
    x, w = jnp.asarray(x), jnp.asarray(w)
    if isinstance(contract, bool) or not isinstance(contract, int) or not 1 <= contract < w.ndim:
        raise ValueError(f"qat_matmul: contract={contract!r} for a weight of rank {w.ndim}; allowed: an "
                         f"integer in 1 .. {w.ndim - 1}")
    if x.shape[x.ndim - contract:] != w.shape[:contract]:
        k = ", ".join(map(str, w.shape[:contract]))
        raise ValueError(f"qat_matmul: x of shape {x.shape} does not contract with w of shape {w.shape} over "
                         f"{contract} axes; allowed: x of shape (..., {k})")
    if not integer_eligible(weight, inputs, dict(hparams or {}), w.ndim, contract):
        raise ValueError(f"qat_matmul: weight {weight.format!r} {weight.granularity} and inputs "
                         f"{inputs.format!r} {inputs.granularity} (hparams {sorted(hparams or {})}) have no "
                         "integer product; allowed: signed integer codes (int2..int8, ternary, binary), "
                         "weight scales per tensor or output channel, input scales per tensor or token "
                         "(see integer_eligible)")
    product = resolve_product(product)
    return _qat_matmul(x, w, x_scale, w_scale, dict(hparams or {}), weight, inputs, contract,
                       product == "int8", residuals)


def int8_qat_matmul(x: jax.Array, w: jax.Array, weight: Quantizer, inputs: Quantizer,
                    x_scale: jax.Array | None = None, w_scale: jax.Array | None = None,
                    hparams: dict | None = None, contract: int = 1) -> jax.Array:
    """:func:`qat_matmul` with the int8 x int8 -> int32 product, on every platform."""
    return qat_matmul(x, w, weight, inputs, x_scale, w_scale, hparams, contract, "int8")


def _float_product(xq, wq, contract):
    """``fake_quant(x) . fake_quant(w)`` in float32 (the fake-quant path's own product)."""
    return jnp.tensordot(xq.astype(jnp.float32), wq.astype(jnp.float32), axes=contract)


def _int8_product(qx, qw, x_shape, w_shape, contract):
    k, n = math.prod(w_shape[:contract]), math.prod(w_shape[contract:])
    lead = x_shape[: len(x_shape) - contract]
    acc = jax.lax.dot_general(qx.codes.astype(jnp.int8).reshape(*lead, k),
                              qw.codes.astype(jnp.int8).reshape(k, n),
                              (((len(lead),), (0,)), ((), ())), preferred_element_type=jnp.int32)
    sx = qx.scale.astype(jnp.float32).reshape(*lead, 1) if qx.scale.size > 1 else qx.scale.reshape(())
    sw = jnp.broadcast_to(qw.scale, (1,) * contract + tuple(w_shape[contract:])).reshape(n)
    return (acc.astype(jnp.float32) * sx * sw).reshape(*lead, *w_shape[contract:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _qat_matmul(x, w, x_scale, w_scale, hparams, weight, inputs, contract, integer, residuals):
    return _qat_fwd(x, w, x_scale, w_scale, hparams, weight, inputs, contract, integer, residuals)[0]


def _qat_fwd(x, w, x_scale, w_scale, hparams, weight, inputs, contract, integer, residuals):
    qx = _quantize_operand(inputs, x, x_scale, hparams, integer)
    qw = _quantize_operand(weight, w, w_scale, hparams, integer)
    if integer:
        xq = wq = None
        y = _int8_product(qx, qw, x.shape, w.shape, contract)
    else:
        xq, wq = (q if isinstance(q, jax.Array) else dequantize(q) for q in (qx, qw))
        y = _float_product(xq, wq, contract)
    # The backward needs the fake-quant values and the surrogate VJPs; take them once, here.
    x_res = _residual(inputs, x, qx, xq, x_scale, hparams, residuals)
    w_res = _residual(weight, w, qw, wq, w_scale, hparams, residuals)
    return y, (x_res, w_res, hparams)


def _quantize_operand(q: Quantizer, v, scale, hparams, integer: bool):
    """The operand's QArray (int8 product; a quantizer whose VJP is not the identity), else its float
    fake-quant value (:func:`_float_fake_quant`)."""
    if integer or not _identity_backward(q) or scale is not None:
        return quantize(q, v, scale=scale, **qat.surrogate_kwargs(q, hparams))
    return _float_fake_quant(q, v)


def _qat_bwd(weight, inputs, contract, integer, residuals, res, g):
    x_res, w_res, hparams = res
    xq, x_vjp = _value_and_vjp(x_res)
    wq, w_vjp = _value_and_vjp(w_res)
    g = g.astype(jnp.float32)
    lead = xq.ndim - contract
    features = tuple(range(lead, g.ndim))
    gx = jnp.tensordot(g, wq.astype(jnp.float32), (features, tuple(range(contract, wq.ndim))))
    gw = jnp.tensordot(xq.astype(jnp.float32), g, (tuple(range(lead)), tuple(range(lead))))
    dx, dsx = x_vjp(gx.astype(xq.dtype))
    dw, dsw = w_vjp(gw.astype(wq.dtype))
    return dx, dw, dsx, dsw, jax.tree_util.tree_map(jnp.zeros_like, hparams)


_qat_matmul.defvjp(_qat_fwd, _qat_bwd)


def _fake_quant_matmul(x, w, x_scale, w_scale, hparams, weight, inputs, contract=1):
    """The reference the fused op equals: ``fake_quant(x) . fake_quant(w)`` over ``contract`` axes."""
    xq = fake_quant(inputs, x, scale=x_scale, **qat.surrogate_kwargs(inputs, hparams))
    wq = fake_quant(weight, w, scale=w_scale, **qat.surrogate_kwargs(weight, hparams))
    return _float_product(xq, wq, contract)
