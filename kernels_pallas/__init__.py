"""Packed low-bit matmul kernels: one dispatch function per product, three backends.

- :func:`packed_matmul`: weight-only, float activations ``x (..., K)`` times a weight stored as ``bits``-bit
  codes (8, 4, 2 with ternary as its ``{-1, 0, 1}`` subset, 1 = binary +-1) packed along K in uint32 words
  (:mod:`kernels_pallas.layout`, which :mod:`qjax.packing` re-exports), per-channel ``(1, N)`` or per-group
  ``(K / group_size, N)`` float scales, float32 accumulation (:mod:`kernels_pallas.weight_only`).
- :func:`int8_matmul` / :func:`int8_dot`: W8A8, int8 activation codes times int8 weight codes with exact
  int32 accumulation and per-token activation scales (:mod:`kernels_pallas.w8a8`).
- :func:`packed_int_matmul`: int8 activation codes times packed low-bit weight codes (the layout of
  :func:`packed_matmul`), exact int32 sums inside each weight group, per-token or per-tensor activation
  scales (W8A8, W4A8, W4A4, ...; the same kernel, :mod:`kernels_pallas.w8a8`).
- :func:`sherry_matmul`: weight-only, float activations times Sherry 1.25-bit weights, ternary with 3:4
  sparsity (one 0 and three +-1 in every block of four along K, 5 bits per block), 32 blocks in five uint32
  words (:func:`sherry_project`, :func:`sherry_pack`, :func:`sherry_unpack`, :func:`sherry_packed_size`),
  per-channel or per-group float scales, decoded in the kernel (:mod:`kernels_pallas.sherry`).
- :func:`pack_trits` / :func:`unpack_trits`: five ternary codes per byte (``3^5 = 243 <= 256``, 1.6 bits per
  trit), in planes along one axis (:mod:`kernels_pallas.trits`; PTQTP's trit planes).
- :func:`hadamard_transform`: the normalized fast Walsh-Hadamard transform ``x H_n / sqrt(n)`` on the last
  axis, ``n`` a power of two, the rotation of QuaRot / QuIP# (:mod:`kernels_pallas.hadamard`).

Backends (:mod:`kernels_pallas.backends`): ``"xla"`` the pure-jnp reference (:mod:`kernels_pallas.reference`),
``"pallas"`` the kernel compiled for TPU (Mosaic) or GPU, ``"interpret"`` the same kernel in Pallas'
interpreter (any platform; how CPU tests run it), ``"auto"`` = ``"pallas"`` on TPU/GPU, else ``"xla"`` with a
one-time :class:`KernelFallbackWarning`. All functions work under ``jit``, ``vmap`` and ``grad`` (the Pallas
backends differentiate by the reference's backward) and on sharded inputs; this package knows
only arrays, never Flax or qjax (the packed layout is :mod:`kernels_pallas.layout`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import backends, layout
from kernels_pallas.backends import BACKENDS, KernelFallbackWarning
from kernels_pallas.hadamard import hadamard_transform
from kernels_pallas.reference import (
    dequantize_packed,
    group_term,
    hadamard_transform_xla,
    int8_dot_xla,
    packed_int_matmul_xla,
    packed_matmul_xla,
)
from kernels_pallas.sherry import (
    sherry_dequantize,
    sherry_matmul_pallas,
    sherry_matmul_xla,
    sherry_pack,
    sherry_packed_size,
    sherry_project,
    sherry_unpack,
)
from kernels_pallas.trits import pack_trits, trits_packed_size, unpack_trits
from kernels_pallas.w8a8 import int8_dot_pallas, packed_int_matmul_pallas
from kernels_pallas.weight_only import packed_matmul_pallas

__all__ = [
    "BACKENDS",
    "KernelFallbackWarning",
    "dequantize_packed",
    "hadamard_transform",
    "hadamard_transform_xla",
    "int8_dot",
    "int8_matmul",
    "pack_trits",
    "packed_int_matmul",
    "packed_int_matmul_xla",
    "packed_matmul",
    "packed_matmul_xla",
    "sherry_dequantize",
    "sherry_matmul",
    "sherry_matmul_xla",
    "sherry_pack",
    "sherry_packed_size",
    "sherry_project",
    "sherry_unpack",
    "trits_packed_size",
    "unpack_trits",
]


def _check_bits_signed(bits, signed, what: str) -> int:
    """``bits`` as an int of :data:`layout.PACK_BITS`, ``signed`` a bool; a clear error naming ``what``."""
    if layout.as_int(bits) not in layout.PACK_BITS:
        raise ValueError(f"bits={bits!r} has no {what}; allowed: {layout.PACK_BITS}")
    if not isinstance(signed, bool | np.bool_):
        raise TypeError(f"signed={signed!r}; allowed: True or False (whether the packed codes were signed)")
    return layout.as_int(bits)


def packed_matmul(x: jax.Array, w_packed: jax.Array, scales: jax.Array, *, bits: int,
                  group_size: int | None = None, zero_point: jax.Array | None = None,
                  signed: bool = True, element: str = "int", backend: str = "auto") -> jax.Array:
    """``y[..., n] = sum_k x[..., k] * (c[k, n] - z[g(k), n]) * s[g(k), n]``, ``g(k) = k // group_size``,
    float32 ``(..., N)``.

    ``w_packed``: ``(ceil(K / (32 // bits)), N)`` uint32 words of :func:`kernels_pallas.layout.pack` (axis
    0);
    ``scales`` (and the optional ``zero_point``), float: ``(1, N)`` per channel, ``(1, 1)`` per tensor or
    ``(K / group_size, N)`` per group, also as ``(G, 1, N)`` (how a QArray quantized ``PerGroup(axis=0)``
    lays out its scales); ``group_size``: ``None`` (one group, or ``K / G``) or a positive divisor of K;
    ``signed``: the codes were packed from a signed dtype (offset binary; binary ``{-1, +1}``).
    ``element="e2m1"``: the 4-bit fields are FP4 E2M1 bit patterns (MXFP4 / NVFP4 elements; the block scales
    then come as float ``(K / block, N)`` scales), decoded in the kernel by
    :func:`kernels_pallas.layout.decode_e2m1`.
    ``K = 0`` gives zeros ``(..., N)`` (an empty sum). Bad arguments raise ``ValueError`` here, before any
    backend runs (shapes and dtypes are static, so also under ``jit``).
    Weight-only low-bit matmuls at small batch are memory bound, so reading packed words instead of a
    float weight is the speedup (Frantar et al., "MARLIN", 2024; Park et al., "LUT-GEMM", ICLR 2024).
    """
    bits = _check_bits_signed(bits, signed, "packed matmul")
    if element not in layout.ELEMENTS or (element == "e2m1" and (bits != 4 or zero_point is not None)):
        raise ValueError(f"packed matmul: element={element!r} with bits={bits} and "
                         f"{'a' if zero_point is not None else 'no'} zero point; allowed: 'int', or 'e2m1' "
                         "with bits=4 and no zero point")
    x, w_packed = _array(x, "x"), _array(w_packed, "w_packed")
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x of shape {x.shape} and dtype {x.dtype}: allowed a float array (..., K) "
                         "(float32, bfloat16, float16)")
    scales, zero_point, group_size = _check_packed_operands(
        x.shape[-1], w_packed, _array(scales, "scales"), _array(zero_point, "zero_point"), bits, group_size)
    backend = backends.resolve(backend)
    if x.shape[-1] == 0:  # an empty sum
        return jnp.zeros((*x.shape[:-1], w_packed.shape[1]), jnp.float32)
    if backend == "xla":
        return packed_matmul_xla(x, w_packed, scales, bits=bits, group_size=group_size,
                                 zero_point=zero_point, signed=signed, element=element)
    options = dict(bits=bits, signed=bool(signed), element=element)

    def reference(x, w_packed, scales, zero_point):
        return packed_matmul_xla(x, w_packed, scales, zero_point=zero_point, group_size=group_size, **options)

    def kernel(x, w_packed, scales, zero_point):
        return packed_matmul_pallas(x, w_packed, scales, zero_point=zero_point, **options,
                                    **backends.kernel_options(backend))

    return _with_reference_vjp(kernel, reference, x, w_packed, scales, zero_point)


def packed_int_matmul(x_codes: jax.Array, x_scale: jax.Array, w_packed: jax.Array, w_scales: jax.Array, *,
                      bits: int, group_size: int | None = None, zero_point: jax.Array | None = None,
                      signed: bool = True, backend: str = "auto") -> jax.Array:
    """``y[..., n] = s_x[...] * sum_g s_w[g, n] * (acc_g[..., n] - z[g, n] * r_g[...])``, float32
    ``(..., N)``, with ``acc_g = sum_{k in g} x[..., k] * c[k, n]`` summed exactly in int32 and
    ``r_g = sum_{k in g} x[..., k]`` (the zero-point term: ``sum_k x_k (c_k - z) = acc - z r``),
    ``g(k) = k // group_size``.

    ``x_codes``: int8 activation codes ``(..., K)`` (int8, int4, ..., ternary or binary ones, as
    :func:`qjax.quantize` gives them); ``x_scale``: float, ``(..., 1)`` one per token or a single value
    (``()``, ``(1,)``, ``(1, 1)``...) per tensor. ``w_packed``, ``w_scales``, ``zero_point``, ``group_size``,
    ``bits`` and ``signed``: the packed weight, as for :func:`packed_matmul`. It equals
    ``packed_matmul(x_codes * x_scale, ...)`` up to float rounding, without a float activation or weight in
    the product: the integer GEMM of W8A8 (Dettmers et al., "LLM.int8()", 2022; Xiao et al., "SmoothQuant",
    2023), W4A8 (Lin et al., "QServe: W4A8KV4 Quantization and System Co-design", 2024) and W4A4 with group
    scales (Ashkboos et al., "QuaRot", 2024; Zhao et al., "Atom: Low-bit Quantization for Efficient and
    Accurate LLM Serving", MLSys 2024). The sums are exact while ``K * 2^14 < 2^31`` (``K < 2^17``; unsigned
    8-bit codes are read as ``c - 128`` with ``z - 128``). ``K = 0`` gives zeros. A NaN scale (the mark
    :func:`qjax.quantize` gives a token holding NaN or Inf) makes that token's outputs NaN. Bad arguments
    raise ``ValueError`` here, before any backend runs (also under ``jit``). Differentiable in the scales
    and the zero point (the Pallas backends by the reference's backward).
    """
    bits = _check_bits_signed(bits, signed, "packed integer matmul")
    x_codes, x_scale = _array(x_codes, "x_codes"), _array(x_scale, "x_scale")
    if x_codes.ndim < 1 or x_codes.dtype != jnp.int8:
        raise ValueError(f"x_codes of shape {x_codes.shape} and dtype {x_codes.dtype}; allowed: int8 codes "
                         "(..., K) (the codes of qjax.quantize with an integer format of at most 8 bits)")
    x_scale = _token_scales(x_scale, x_codes.shape)
    w_scales, zero_point, group_size = _check_packed_operands(
        x_codes.shape[-1], _array(w_packed, "w_packed"), _array(w_scales, "w_scales"),
        _array(zero_point, "zero_point"), bits, group_size, "w_scales")
    backend = backends.resolve(backend)
    if x_codes.shape[-1] == 0:  # an empty sum
        return jnp.zeros((*x_codes.shape[:-1], w_packed.shape[1]), jnp.float32)
    reference = functools.partial(packed_int_matmul_xla, bits=bits, signed=bool(signed))
    if backend == "xla":
        return reference(x_codes, x_scale, w_packed, w_scales, zero_point)
    kernel = functools.partial(packed_int_matmul_pallas, bits=bits, signed=bool(signed),
                               **backends.kernel_options(backend))
    return _with_reference_vjp(kernel, reference, x_codes, x_scale, w_packed, w_scales, zero_point)


def sherry_matmul(x: jax.Array, words: jax.Array, scales: jax.Array, *, k: int, group_size: int | None = None,
                  backend: str = "auto") -> jax.Array:
    """``y[..., n] = sum_k x[..., k] * c[k, n] * s[g(k), n]``, ``g(k) = k // group_size``, float32
    ``(..., N)``, for Sherry weights: ternary codes ``c`` with 3:4 sparsity (Sherry: 1.25-bit ternary with
    3:4 sparsity; along K every block of four weights holds one 0 and three +-1, one of 32 patterns, 5 bits
    per block).

    ``words``: ``(5 ceil(K / 128), N)`` uint32 from :func:`sherry_pack` (axis 0; 1.25 bits per weight when
    ``K % 128 == 0``); ``k``: K, a multiple of 4, equal to ``x.shape[-1]``; ``scales``, float: ``(1, N)``
    per channel, ``(1, 1)`` per tensor or ``(K / group_size, N)`` per group (also ``(G, 1, N)``);
    ``group_size``: ``None`` (one group, or ``K / G``) or a positive divisor of K that is a multiple of 4 (a
    block never straddles two groups). ``K = 0`` gives zeros. Bad arguments raise ``ValueError`` here,
    before any backend runs (also under ``jit``). The Pallas backends decode the words in the kernel
    (:mod:`kernels_pallas.sherry`) and differentiate by the reference's backward (in ``x`` and ``scales``).
    """
    x, words, scales = _array(x, "x"), _array(words, "words"), _array(scales, "scales")
    given, k = k, layout.as_int(k)
    if k is None or k < 0 or k % 4:
        raise ValueError(f"k={given!r}; allowed: K = 0, 4, 8, ... (a multiple of 4: Sherry blocks of four "
                         "weights along K)")
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating) or x.shape[-1] != k:
        raise ValueError(f"x of shape {x.shape} and dtype {x.dtype} with k={k}: allowed a float array "
                         f"(..., {k}) (float32, bfloat16, float16)")
    count = sherry_packed_size(k)
    if words.dtype != jnp.uint32 or words.ndim != 2 or words.shape[0] != count:
        raise ValueError(f"words of shape {words.shape} and dtype {words.dtype} do not hold K={k} Sherry "
                         f"weights; allowed: uint32 ({count}, N) from kernels_pallas.sherry_pack(codes, "
                         "axis=0)")
    n = words.shape[1]
    if group_size is not None:
        size = layout.as_int(group_size)
        if size is None or size < 1 or k % size or size % 4:
            raise ValueError(f"group_size={group_size!r} is not a multiple of 4 dividing K={k}; allowed: "
                             f"None or one of {[d for d in range(4, k + 1, 4) if k % d == 0]}")
        group_size = size
    shape, scales = scales.shape, _matrix(scales, "scales", k, n, group_size)
    if k and (k // scales.shape[0]) % 4:
        raise ValueError(f"scales of shape {shape}: {scales.shape[0]} groups of {k // scales.shape[0]} of "
                         f"K={k} weights; allowed: groups of a multiple of 4 weights (a Sherry block of four "
                         "shares one scale)")
    backend = backends.resolve(backend)
    if k == 0:  # an empty sum
        return jnp.zeros((*x.shape[:-1], n), jnp.float32)
    reference = functools.partial(sherry_matmul_xla, k=k, group_size=group_size)
    if backend == "xla":
        return reference(x, words, scales)
    kernel = functools.partial(sherry_matmul_pallas, **backends.kernel_options(backend))
    return _with_reference_vjp(kernel, reference, x, words, scales)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _with_reference_vjp(kernel, reference, *args):
    """``kernel(*args)`` forward; the backward of ``reference(*args)`` for the float arguments (activations,
    scales, zero points; integer codes and words get a zero cotangent), so ``jax.grad`` works through the
    Pallas backends too."""
    return kernel(*args)


def _kernel_fwd(kernel, reference, *args):
    return kernel(*args), args


def _kernel_bwd(kernel, reference, args, g):
    floats = [i for i, a in enumerate(args) if a is not None and jnp.issubdtype(a.dtype, jnp.inexact)]

    def at(*values):
        full = list(args)
        for i, v in zip(floats, values, strict=True):
            full[i] = v
        return reference(*full)

    _, vjp = jax.vjp(at, *(args[i] for i in floats))
    grads = dict(zip(floats, vjp(g), strict=True))
    return tuple(grads[i] if i in grads else None if a is None else np.zeros(a.shape, jax.dtypes.float0)
                 for i, a in enumerate(args))


_with_reference_vjp.defvjp(_kernel_fwd, _kernel_bwd)


def int8_dot(x_codes: jax.Array, w_codes: jax.Array, *, backend: str = "auto") -> jax.Array:
    """``acc[..., n] = sum_k a[..., k] * b[k, n]`` over int8 codes, exact in int32 ``(..., N)``."""
    _check_int8_operands(x_codes, w_codes)
    backend = backends.resolve(backend)
    if backend == "xla":
        return int8_dot_xla(x_codes, w_codes)
    return int8_dot_pallas(x_codes, w_codes, **backends.kernel_options(backend))


def int8_matmul(x_codes: jax.Array, x_scales: jax.Array, w_codes: jax.Array, w_scales: jax.Array, *,
                backend: str = "auto") -> jax.Array:
    """W8A8: ``y[..., n] = (sum_k a[..., k] * b[k, n]) * sx[...] * sw[n]``, float32 ``(..., N)``.

    ``x_codes (..., K)`` int8 with per-token scales ``x_scales (..., 1)``; ``w_codes (K, N)`` int8 with
    per-channel scales ``w_scales (1, N)`` or ``(N,)``. The integer sum is exact (:func:`int8_dot`); the
    scales multiply afterwards (Dettmers et al., "LLM.int8()", 2022; Xiao et al., "SmoothQuant", 2023), by the
    epilogue of :func:`packed_int_matmul` (the one-group case of its formula, for unpacked int8 weights).
    """
    x_codes, x_scales = _array(x_codes, "x_codes"), _array(x_scales, "x_scales")
    w_codes, w_scales = _array(w_codes, "w_codes"), _array(w_scales, "w_scales")
    _check_int8_operands(x_codes, w_codes)
    for name, value in (("x_scales", x_scales), ("w_scales", w_scales)):
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(f"{name} of dtype {value.dtype}; allowed: a float dtype (float32)")
    n = w_codes.shape[-1]
    if x_scales.shape != (*x_codes.shape[:-1], 1):
        raise ValueError(f"x_scales of shape {x_scales.shape} do not fit x_codes {x_codes.shape}; "
                         f"allowed: {(*x_codes.shape[:-1], 1)} (one scale per token)")
    if w_scales.shape not in ((1, n), (n,)):
        raise ValueError(f"w_scales of shape {w_scales.shape} do not fit w_codes {w_codes.shape}; "
                         f"allowed: (1, {n}) or ({n},) (one scale per output channel)")
    acc = int8_dot(x_codes, w_codes, backend=backend)
    return x_scales.astype(jnp.float32) * group_term(acc, w_scales.reshape(n))


def _array(value, name: str):
    """``value`` unless it is not an array (``None`` passes): ``TypeError`` naming ``name``."""
    if value is None or (hasattr(value, "shape") and hasattr(value, "dtype")):
        return value
    raise TypeError(f"{name} is a {type(value).__name__}; allowed: an array (jax.Array or numpy.ndarray)")


def _token_scales(x_scale, shape: tuple[int, ...]):
    """``x_scale`` as ``(..., 1)`` (one per token) or ``()`` (per tensor) for codes of ``shape``."""
    lead = shape[:-1]
    if not jnp.issubdtype(x_scale.dtype, jnp.floating):
        raise ValueError(f"x_scale of dtype {x_scale.dtype}; allowed: a float dtype (float32)")
    if x_scale.shape == (*lead, 1):
        return x_scale
    if x_scale.size == 1 and x_scale.ndim <= len(shape):
        return x_scale.reshape(())
    raise ValueError(f"x_scale of shape {x_scale.shape} does not fit x_codes {shape}; allowed: "
                     f"{(*lead, 1)} (one scale per token) or one value ((), (1,), ...) per tensor")


def _check_packed_operands(k: int, w_packed, scales, zero_point, bits: int, group_size: int | None,
                           scales_name: str = "scales"):
    """Checked ``(scales, zero_point, group_size)`` for ``K = k``, the scales (and zero point) as ``(G, N)``
    matrices."""
    words = layout.packed_size(k, bits)
    if w_packed.dtype != jnp.uint32 or w_packed.ndim != 2 or w_packed.shape[0] != words:
        raise ValueError(f"w_packed of shape {w_packed.shape} and dtype {w_packed.dtype} does not hold "
                         f"K={k} {bits}-bit codes; allowed: uint32 ({words}, N) from "
                         f"kernels_pallas.layout.pack(codes, {bits}, axis=0) (qjax.packing.pack)")
    n = w_packed.shape[1]
    if group_size is not None:
        size = layout.as_int(group_size)
        if size is None or size < 1 or k % size:
            raise ValueError(f"group_size={group_size!r} does not divide K={k}; allowed: None or one of "
                             f"{[d for d in range(1, k + 1) if k % d == 0]}")
        group_size = size
    scales = _matrix(scales, scales_name, k, n, group_size)
    if zero_point is not None:
        zero_point = _matrix(zero_point, "zero_point", k, n, group_size)
        if zero_point.shape != scales.shape:
            raise ValueError(f"zero_point of shape {zero_point.shape}; allowed: None or the scales' shape "
                             f"{scales.shape}")
    return scales, zero_point, group_size


def _matrix(values, name: str, k: int, n: int, group_size: int | None):
    """Per-group ``values`` (``(G, N)``, ``(G, 1, N)``, or ``(1, 1)`` per tensor) as a ``(G, N)`` matrix."""
    shape = values.shape
    groups = shape[0] if len(shape) in (2, 3) else -1
    if group_size is not None and k:
        groups_ok = groups == k // group_size
    else:
        groups_ok = groups >= 1 and k % groups == 0 if k else groups >= 0
    fits = shape in ((groups, n), (groups, 1, n)) or (groups == 1 and shape == (1, 1))
    if not jnp.issubdtype(values.dtype, jnp.floating):
        raise ValueError(f"{name} of dtype {values.dtype}; allowed: a float dtype (float32, bfloat16)")
    if not (fits and groups_ok):
        g = "K / group_size" if group_size is None or not k else k // group_size
        raise ValueError(f"{name} of shape {shape} do not fit K={k}, N={n} with group_size={group_size}; "
                         f"allowed: ({g}, {n}) or ({g}, 1, {n}) with group_size dividing K, (1, {n}) per "
                         "channel, (1, 1) per tensor")
    return jnp.broadcast_to(values.reshape(groups, -1 if groups else n), (groups, n))


def _check_int8_operands(a, b) -> None:
    if a.dtype != jnp.int8 or b.dtype != jnp.int8:
        raise ValueError(f"int8_dot: codes of dtypes {a.dtype} and {b.dtype}; allowed: int8 and int8")
    if a.ndim < 1 or b.ndim != 2 or a.shape[-1] != b.shape[0]:
        raise ValueError(f"int8_dot: shapes {a.shape} @ {b.shape} do not contract; "
                         "allowed: (..., K) @ (K, N)")
