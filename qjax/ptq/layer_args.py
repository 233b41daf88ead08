"""Argument checks shared by the layer-level solvers (:func:`qjax.ptq.ptqtp_layer`,
:func:`qjax.ptq.pb_llm_layer`, :func:`qjax.ptq.squeeze_llm_layer`, :func:`qjax.ptq.bitstack_layer`): a clear
``ValueError`` naming the bad value before anything is traced."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from kernels_pallas.layout import as_int


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


def check_count(who: str, name: str, value, minimum: int, hint: str) -> int:
    """``value`` as an int ``>= minimum``, else a ``ValueError`` naming ``who``, ``name`` and ``value``
    (``hint``: what the count means, said in the message)."""
    count = as_int(value)
    if count is None or count < minimum:
        raise ValueError(f"{who}: {name}={value!r}; allowed: an integer >= {minimum} ({hint})")
    return count


def check_group(who: str, group_size, k: int, allow_none: bool = False) -> int:
    """The group size ``g`` (rows along K per scale): a positive divisor of ``K``; ``None`` (with
    ``allow_none``) is one group of ``K``. Else a ``ValueError`` listing a few allowed sizes."""
    g = k if allow_none and group_size is None else as_int(group_size)
    if g is None or g < 1 or k % g:
        sizes = (d for d in (32, 64, 128, 256, k) if d <= k and k % d == 0)
        divisors = ", ".join(map(str, dict.fromkeys(sizes)))
        what = "None (one group per column) or a positive integer" if allow_none else "a positive integer"
        raise ValueError(f"{who}: group_size={group_size!r} must be {what} dividing K = {k}; allowed e.g.: "
                         f"{divisors}")
    return g
