"""Serving a frozen weight: ``x @ W`` straight from a packed :class:`~qjax.QArray`.

A frozen ``(K, *features)`` weight whose codes are integers (int, binary, ternary), packed along K (axis 0)
and scaled per tensor, per output channel or per group along K, runs on
:func:`kernels_pallas.packed_matmul` without ever materialising the float weight. Other frozen weights
(NF4, fp8, multi-basis, other layouts) are dequantized first. Shared by the Linen and NNX transforms.

Which kernel backend a frozen model runs is a static setting of the quantized model
(``quantize_model(..., backend="interpret")`` or ``qjax.nnx.freeze(model, backend=...)``;
:class:`qjax.core.Settings`), so a jitted function runs the program its arguments choose.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qjax.granularity import PerChannel, PerGroup, PerTensor
from qjax.qarray import QArray


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
    """``(K, N)`` when ``w`` can run on the packed matmul as a ``(K, N)`` matrix, else ``None``."""
    if not isinstance(w, QArray) or w.fmt.kind not in ("int", "binary", "ternary"):
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

    if not isinstance(w, QArray):
        raise TypeError(f"frozen_matmul: w is a {type(w).__name__}; allowed: a QArray (a frozen weight)")
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"frozen_matmul: x of shape {x.shape} does not contract with a weight of shape "
                         f"{w.shape}; allowed: x of shape (..., {w.shape[0]})")
    if backend not in kernels_pallas.BACKENDS:
        raise ValueError(f"frozen_matmul: unknown backend {backend!r}; allowed: "
                         f"{', '.join(kernels_pallas.BACKENDS)}")
    layout = packed_layout(w)
    if layout is None:
        return jnp.tensordot(x.astype(jnp.float32), w.dequantize().astype(jnp.float32), axes=1)

    _, n = layout
    scales, group_size = _matrix_scales(w, w.scale, n)
    zero = None if w.zero_point is None else _matrix_scales(w, w.zero_point, n)[0]
    words = w.codes.reshape(w.codes.shape[0], n)
    y = kernels_pallas.packed_matmul(x, words, scales, bits=w.packing[2], group_size=group_size,
                                     zero_point=zero, signed=w.fmt.signed,
                                     backend=backend)
    return y.reshape(*y.shape[:-1], *w.shape[1:])

