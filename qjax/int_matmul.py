"""The exact integer path of quantization-aware training: int8 x int8 -> int32 matmul, then the scales.

For a weight quantized to integer codes ``c_w`` (up to 8 bits: int2..int8, ternary, binary) with scales
``s_w`` per tensor or per output channel, and an input quantized to integer codes ``c_x`` with a scale
``s_x`` per tensor or per token, the fake-quantized product is

    y[m, n] = sum_k (c_x[m, k] s_x[m]) (c_w[k, n] s_w[n]) = s_x[m] s_w[n] sum_k c_x[m, k] c_w[k, n]

and the integer sum is exact in int32, so computing it with an int8 ``dot_general`` and scaling afterwards
gives the float fake-quant result up to float rounding, faster where the platform multiplies int8 faster
than float32 (Qwix's QAT does the same for int8). The backward is exactly that of the fake-quant path
(``jax.vjp`` of ``fake_quant(x) @ fake_quant(w)``), surrogate gradients included.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from qjax import qat
from qjax.granularity import PerChannel, PerTensor, PerToken
from qjax.qarray import QArray, dequantize
from qjax.quantizer import Quantizer, fake_quant, quantize
from qjax.scales import COMPUTED_RULES

INT_KINDS = ("int", "binary", "ternary")


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
    for q in (weight, inputs):
        if q.fmt.kind not in INT_KINDS or not q.fmt.signed or q.bases != 1 or q.scale == "minmax":
            return False
    if weight.is_sign and weight.surrogate == "biper":
        return False  # BiPer's stage switch and sin-wave codes stay on the fake-quant path
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
    scale and the plain straight-through estimator. Its backward then needs only the int8 codes and the
    scales the forward made, not a float copy of the fake-quant value (4x fewer residual bytes)."""
    return q.scale in COMPUTED_RULES and not q.is_sign and q.surrogate == "ste"


def _residual(q: Quantizer, v, qa, scale, hparams):
    """What the backward keeps of one operand: its codes (identity VJP) or the fake-quant VJP."""
    return qa if _identity_backward(q) else _fake_quant_vjp(q, v, scale, hparams)


def _value_and_vjp(res):
    """The fake-quant value and its VJP function from :func:`_residual` (``dequantize(quantize(x))`` is
    ``fake_quant(x)`` bit for bit, in ``x``'s dtype)."""
    if isinstance(res, QArray):
        return dequantize(res), lambda g: (g, None)
    return res


def int8_qat_matmul(x: jax.Array, w: jax.Array, weight: Quantizer, inputs: Quantizer,
                    x_scale: jax.Array | None = None, w_scale: jax.Array | None = None,
                    hparams: dict | None = None, contract: int = 1) -> jax.Array:
    """``fake_quant(inputs, x) . fake_quant(weight, w)`` contracted over ``contract`` axes, computed as an
    int8 x int8 -> int32 matmul.

    ``x``: ``(..., *K)``; ``w``: ``(*K, *features)``; returns float32 ``(..., *features)``. Gradients are
    those of the fake-quant product. See the module docstring.
    """
    return _int8_matmul(x, w, x_scale, w_scale, dict(hparams or {}), weight, inputs, contract)


def _int8_product(qx, qw, x_shape, w_shape, contract):
    k, n = math.prod(w_shape[:contract]), math.prod(w_shape[contract:])
    lead = x_shape[: len(x_shape) - contract]
    acc = jax.lax.dot_general(qx.codes.astype(jnp.int8).reshape(*lead, k),
                              qw.codes.astype(jnp.int8).reshape(k, n),
                              (((len(lead),), (0,)), ((), ())), preferred_element_type=jnp.int32)
    sx = qx.scale.astype(jnp.float32).reshape(*lead, 1) if qx.scale.size > 1 else qx.scale.reshape(())
    sw = jnp.broadcast_to(qw.scale, (1,) * contract + tuple(w_shape[contract:])).reshape(n)
    return (acc.astype(jnp.float32) * sx * sw).reshape(*lead, *w_shape[contract:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _int8_matmul(x, w, x_scale, w_scale, hparams, weight, inputs, contract):
    qx = quantize(inputs, x, scale=x_scale, **qat.surrogate_kwargs(inputs, hparams))
    qw = quantize(weight, w, scale=w_scale, **qat.surrogate_kwargs(weight, hparams))
    return _int8_product(qx, qw, x.shape, w.shape, contract)


def _int8_fwd(x, w, x_scale, w_scale, hparams, weight, inputs, contract):
    qx = quantize(inputs, x, scale=x_scale, **qat.surrogate_kwargs(inputs, hparams))
    qw = quantize(weight, w, scale=w_scale, **qat.surrogate_kwargs(weight, hparams))
    # The backward needs the fake-quant values and the surrogate VJPs; take them once, here.
    x_res = _residual(inputs, x, qx, x_scale, hparams)
    w_res = _residual(weight, w, qw, w_scale, hparams)
    y = _int8_product(qx, qw, x.shape, w.shape, contract)
    return y, (x_res, w_res, hparams)


def _int8_bwd(weight, inputs, contract, res, g):
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


_int8_matmul.defvjp(_int8_fwd, _int8_bwd)


def _fake_quant_matmul(x, w, x_scale, w_scale, hparams, weight, inputs, contract=1):
    """The float reference the int8 path equals: ``fake_quant(x) . fake_quant(w)`` over ``contract`` axes."""
    xq = fake_quant(inputs, x, scale=x_scale, **qat.surrogate_kwargs(inputs, hparams))
    wq = fake_quant(weight, w, scale=w_scale, **qat.surrogate_kwargs(weight, hparams))
    return jnp.tensordot(xq.astype(jnp.float32), wq.astype(jnp.float32), axes=contract)
