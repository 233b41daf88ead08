"""Input transforms: an invertible per-channel map of a weight contraction's input, folded into the weight.

For a Dense-like contraction ``y = x . W`` over ``c`` axes (``x (..., *K)``, ``W (*K, *F)``) and a positive
divisor ``s`` of shape ``K``,

    y = (x / s) . (diag(s) W)

exactly in real arithmetic (in float up to rounding): the input is divided by ``s`` channel by channel and
the weight's matching rows are multiplied by it. Quantizing the *transformed* operands is what the
activation-aware methods do:

- SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
  Language Models", ICML 2023): ``s_j = max|X_j|^a / max|W_j|^(1-a)`` moves the input's outlier channels into
  the weight, so that both quantize to 8 bits;
- AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration", MLSys
  2024): ``s_j = mean|X_j|^a`` scales the salient input channels up before the weight is rounded.

A rotation joins the same way: for an orthogonal ``R`` (``qjax.Rotation``, a randomized Hadamard
``diag(signs) H / sqrt(n)``), ``y = (x R)(R^T W)`` (QuaRot, Ashkboos et al. 2024; QuIP#, Tseng et al. 2024):
the rotated input and weight have no outlier channels left to quantize. With both, ``T(x) = (x / s) R`` and
the weight is stored as ``R^T diag(s) W``.

A transform is a dict of arrays (a pytree that Flax collections, NNX variables and checkpoints hold as they
are): ``{"divisor": s}``, ``{"signs": r}`` or both; the rotation's structure follows from its width
(:func:`qjax.rotation.default_block`), so its signs are all that is stored. The core
(:class:`qjax.core.Call`) applies it to the module's contraction input before the input is quantized, on
every path (QAT, fake-quant, packed and dequantized frozen weights); the weight stored is already
``R^T diag(s) W``. For a weight contracting ``c > 1`` axes (an einsum ``BTNH,NHD->BTD``) the divisor has
the contracted shape ``K`` and the rotation, of width ``prod K``, acts on the contracted axes flattened:
``x`` as ``(..., prod K)``, ``W`` as ``(prod K, prod F)``. Where the model's own code allows it the divisor
can instead be folded into the producer of the input (a norm's scale, :mod:`qjax.ptq.folding`); then no
divisor is stored at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax

DIVISOR = "divisor"
SIGNS = "signs"


def rotation(transform: Mapping, backend: str = "auto"):
    """The transform's :class:`qjax.Rotation` (``None`` without ``"signs"``)."""
    from qjax.rotation import Rotation, default_block

    signs = transform.get(SIGNS)
    if signs is None:
        return None
    n = int(signs.shape[-1])
    return Rotation(signs, n, default_block(n), backend=backend)


def _rotated_axes(shape: tuple[int, ...], n: int, leading: bool, divisor, what: str) -> int:
    """How many contracted axes the width-``n`` rotation spans: the divisor's rank when there is one, else
    the fewest trailing (input) / leading (weight) axes whose sizes multiply to ``n``."""
    if divisor is not None:
        count = divisor.ndim
    else:
        count = next((c for c in range(1, len(shape) + 1)
                      if math.prod(shape[:c] if leading else shape[len(shape) - c:]) == n), 0)
    part = shape[:count] if leading else shape[len(shape) - count:]
    if count == 0 or math.prod(part) != n:
        where = "leading" if leading else "trailing"
        raise ValueError(f"input transform: the rotation of width {n} does not match the {what}'s contracted "
                         f"axes ({what} shape {tuple(shape)}); allowed: {where} contracted axes whose sizes "
                         f"multiply to {n}")
    return count


def transform_input(transform: Mapping | None, x: jax.Array, backend: str = "auto") -> jax.Array:
    """``(x / s) R``: ``x`` divided by ``s`` over its trailing ``s.ndim`` axes (the contracted shape ``K``),
    then rotated over those axes flattened (``prod K`` channels in row-major order; without a divisor, the
    fewest trailing axes whose sizes multiply to the rotation's width), in ``x``'s dtype; ``x`` itself
    when ``transform`` is ``None``. ``backend``: the rotation's fast Walsh-Hadamard transform's. Works
    under ``jit``, ``grad``, ``vmap``."""
    if transform is None:
        return x
    s = transform.get(DIVISOR)
    if s is not None:
        if tuple(x.shape[x.ndim - s.ndim:]) != tuple(s.shape):
            raise ValueError(f"input transform: the divisor of shape {tuple(s.shape)} does not match the "
                             f"input's contracted axes (input shape {tuple(x.shape)}); allowed: a divisor "
                             "of the input's trailing contracted shape")
        x = (x / s.astype(x.dtype)).astype(x.dtype)
    r = rotation(transform, backend)
    if r is None:
        return x
    count = _rotated_axes(tuple(x.shape), r.n, False, s, "input")
    if count == 1:
        return r.apply(x)
    lead = x.shape[: x.ndim - count]
    return r.apply(x.reshape(*lead, r.n)).reshape(x.shape)


def transform_weight(transform: Mapping, w: jax.Array, backend: str = "auto") -> jax.Array:
    """``R^T diag(s) W``: the weight ``W (*K, *F)`` with its leading ``s.ndim`` axes multiplied by ``s``,
    then rotated over its contracted axes flattened (``W`` as the ``(prod K, prod F)`` matrix; without a
    divisor, the fewest leading axes whose sizes multiply to the rotation's width), so that
    ``transform_input(t, x) . transform_weight(t, W) == x . W`` up to float rounding. Works under ``jit``."""
    s = transform.get(DIVISOR)
    r = rotation(transform, backend)
    if s is not None:
        if tuple(w.shape[:s.ndim]) != tuple(s.shape):
            raise ValueError(f"input transform: the divisor of shape {tuple(s.shape)} does not match the "
                             f"weight's contracted axes (weight shape {tuple(w.shape)}); allowed: a divisor "
                             "of the weight's leading contracted shape")
        w = (w * s.reshape(s.shape + (1,) * (w.ndim - s.ndim)).astype(w.dtype)).astype(w.dtype)
    if r is None:
        return w
    count = _rotated_axes(tuple(w.shape), r.n, True, s, "weight")
    if count == 1:
        return r.rotate_weight(w, 0)
    return r.rotate_weight(w.reshape(r.n, -1), 0).reshape(w.shape)
