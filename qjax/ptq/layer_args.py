"""Argument checks shared by the layer-level solvers (:func:`qjax.ptq.ptqtp_layer`,
:func:`qjax.ptq.pb_llm_layer`, :func:`qjax.ptq.squeeze_llm_layer`, :func:`qjax.ptq.bitstack_layer`): a clear
``ValueError`` naming the bad value before anything is traced."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def finite_number(value, nonnegative: bool = False) -> bool:
    """Whether ``value`` is a finite real Python / numpy scalar (no bool), ``>= 0`` with ``nonnegative``."""
    if isinstance(value, bool | np.bool_):
        return False
    try:
        array = np.asarray(value)
    except Exception:  # anything numpy cannot read is no number
        return False
    ok = array.ndim == 0 and array.dtype.kind in "fiu" and bool(np.isfinite(array))
    return ok and (not nonnegative or bool(array >= 0))


def check_dense_kernel(w, who: str) -> tuple[int, int]:
    """``(K, N)`` of a non-empty float Dense kernel ``w`` (contraction axis 0), else a ``ValueError``
    naming ``who`` and the shape or dtype."""
    shape = jnp.shape(w)
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"{who}: weight of shape {shape}; allowed: a non-empty (K, N) Dense kernel "
                         "(contraction axis 0; a stack of layers: jax.vmap)")
    if not jnp.issubdtype(jnp.result_type(w), jnp.floating):
        raise ValueError(f"{who}: weight dtype {jnp.result_type(w)}; allowed: a float dtype "
                         "(float32, bfloat16, float16)")
    return shape
