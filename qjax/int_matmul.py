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
from qjax.quantizer import Quantizer, fake_quant, quantize

INT_KINDS = ("int", "binary", "ternary")


def integer_eligible(weight: Quantizer | None, inputs: Quantizer | None, hparams: dict) -> bool:
    """Whether a ``(K, *features)`` weight and ``(..., K)`` input can take the int8 path: signed integer
    codes of up to 8 bits without zero point, weight and input scales constant along K, and no per-step
    switch (``enabled``, ``biper_binarize``) that swaps the quantized value for a float one."""
    if weight is None or inputs is None or {"enabled", "biper_binarize"} & set(hparams):
        return False
    for q in (weight, inputs):
        if q.fmt.kind not in INT_KINDS or not q.fmt.signed or q.bases != 1 or q.scale == "minmax":
            return False
    if weight.is_sign and weight.surrogate == "biper":
        return False  # BiPer's codes are sign(sin(omega w)), still integer, but keep its float stages uniform
    gw, gx = weight.granularity, inputs.granularity
    weight_ok = isinstance(gw, PerTensor) or (isinstance(gw, PerChannel) and _keeps_only_outputs(gw))
    input_ok = isinstance(gx, PerTensor) or (isinstance(gx, PerToken) and _reduces_last(gx))
    return weight_ok and input_ok


def _keeps_only_outputs(g: PerChannel) -> bool:
    axes = g.axis if isinstance(g.axis, tuple) else (g.axis,)
    return all(a != 0 for a in axes) and all(a < 0 for a in axes)


def _reduces_last(g: PerToken) -> bool:
    axes = g.axis if isinstance(g.axis, tuple) else (g.axis,)
    return tuple(axes) in ((-1,),)


def _fake_quant_matmul(x, w, x_scale, w_scale, hparams, weight, inputs):
    xq = fake_quant(inputs, x, scale=x_scale, **qat.surrogate_kwargs(inputs, hparams))
    wq = fake_quant(weight, w, scale=w_scale, **qat.surrogate_kwargs(weight, hparams))
    return jnp.tensordot(xq.astype(jnp.float32), wq.astype(jnp.float32), axes=1)


def int8_qat_matmul(x: jax.Array, w: jax.Array, weight: Quantizer, inputs: Quantizer,
                    x_scale: jax.Array | None = None, w_scale: jax.Array | None = None,
                    hparams: dict | None = None) -> jax.Array:
    """``fake_quant(inputs, x) @ fake_quant(weight, w)`` computed as an int8 x int8 -> int32 matmul.

    ``x``: ``(..., K)``; ``w``: ``(K, *features)``; returns float32 ``(..., *features)``. Gradients are
    those of the fake-quant product. See the module docstring.
    """
    hparams = dict(hparams or {})
    return _int8_matmul(x, w, x_scale, w_scale, hparams, weight, inputs)


def _int8_forward(x, w, x_scale, w_scale, hparams, weight, inputs):
    qx = quantize(inputs, x, scale=x_scale, **qat.surrogate_kwargs(inputs, hparams))
    qw = quantize(weight, w, scale=w_scale, **qat.surrogate_kwargs(weight, hparams))
    k, n = w.shape[0], math.prod(w.shape[1:])
    acc = jax.lax.dot_general(qx.codes.astype(jnp.int8), qw.codes.astype(jnp.int8).reshape(k, n),
                              (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    sw = jnp.broadcast_to(qw.scale, (1, *w.shape[1:])).reshape(n)
    y = acc.astype(jnp.float32) * qx.scale.astype(jnp.float32) * sw
    return y.reshape(*x.shape[:-1], *w.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _int8_matmul(x, w, x_scale, w_scale, hparams, weight, inputs):
    return _int8_forward(x, w, x_scale, w_scale, hparams, weight, inputs)


def _int8_fwd(x, w, x_scale, w_scale, hparams, weight, inputs):
    y = _int8_forward(x, w, x_scale, w_scale, hparams, weight, inputs)
    return y, (x, w, x_scale, w_scale, hparams)


def _int8_bwd(weight, inputs, res, g):
    x, w, x_scale, w_scale, hparams = res
    _, vjp = jax.vjp(lambda *a: _fake_quant_matmul(*a, hparams, weight, inputs), x, w, x_scale, w_scale)
    return (*vjp(g.astype(jnp.float32)), jax.tree_util.tree_map(jnp.zeros_like, hparams))


_int8_matmul.defvjp(_int8_fwd, _int8_bwd)
