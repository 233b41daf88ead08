"""Sherry 1.25-bit weights: ternary codes with 3:4 sparsity, their packed layout, reference and Pallas kernel.

The format (Sherry: 1.25-bit ternary with 3:4 sparsity): along the contraction axis K, every block of four
consecutive weights holds exactly one 0 and three +-1, so a block is one of ``4 * 2^3 = 32`` patterns and
takes 5 bits, 1.25 bits per weight. A block's 5-bit field is ``(z, s0, s1, s2)``: ``z`` the position
``0 .. 3`` of its zero and ``s_i`` the sign bits (1 = negative) of the three other weights in order.

Layout. Along ``axis`` of length ``K`` (a multiple of 4), with ``B = K / 4`` blocks and ``Q = ceil(K / 128)``
groups of 32 fields, the words are five planes of ``Q`` words each (``sherry_packed_size(K) = 5 Q``)::

    word[q]         = sum_{j < 16}  z[j Q + q] << 2 j            (zero positions of fields 0 .. 15)
    word[Q + q]     = sum_{j >= 16} z[j Q + q] << 2 (j - 16)     (zero positions of fields 16 .. 31)
    word[(2+i)Q + q] = sum_j       s_i[j Q + q] << j             (sign bit i, i = 0, 1, 2)

so the five words ``word[q + r Q]`` (``r = 0 .. 4``) of group ``q`` hold its 32 fields, 160 bits for 128
weights, field ``j`` of group ``q`` is block ``j Q + q``, and field ``j`` of all ``Q`` groups (a 2-bit and
three 1-bit shifts and masks on uint32; no field straddles a word) decodes into the contiguous K slice of
weights ``4 j Q .. 4 (j + 1) Q - 1``. As in :mod:`kernels_pallas.layout`, a kernel multiplies each
field's decoded tile against one contiguous slice of the activations, without lane shuffles. Blocks past
``K / 4`` (when ``K % 128 != 0``) are stored as the all-zero field, zero first and signs ``+ + +``
(``[0, 1, 1, 1]``): :func:`sherry_unpack` drops them, the kernel meets them with zero activations. Exactly
1.25 bits per weight when ``K % 128 == 0``; otherwise ``5 ceil(K / 128)`` words per column.

A field decodes by integer math only: with ``S = s0 | s1 << 1 | s2 << 2``, inserting a zero bit at ``z``
spreads the signs to the four positions, ``spread = (S & ((1 << z) - 1)) | ((S >> z) << (z + 1))``, and with
``present = 15 ^ (1 << z)`` the code at position ``t`` is ``((present >> t) & 1) - 2 ((spread >> t) & 1)``.

The kernel (:func:`sherry_matmul_pallas`) is :mod:`kernels_pallas.weight_only`'s with 32 fields in place of
its planes and a K block of ``block_q`` words per plane (``128 block_q`` rows of K): each grid step loads a
``(5, block_q, block_n)`` tile of words, decodes field by field in registers into the four ``(block_q,
block_n)`` code tiles of the block positions ``t = 0 .. 3`` and multiplies them (cast to float) against the
activations, laid out once per call as ``(Q_pad / block_q, 32, 4, M, block_q)`` (K tile, field, position,
row, word) so every ``(field, position)`` pair is one block. Scales: per channel ``(1, N)`` or per group
``(K / group_size, N)`` with ``group_size`` a multiple of 4 (a block never straddles two groups), regrouped
per field and segment by :func:`kernels_pallas.weight_only.scale_table` over the ``K / 4`` blocks.
Tested here in interpret mode only (the compiled TPU and GPU lowerings are not yet run).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels_pallas.backends import compiler_params, round_up, tile
from kernels_pallas.layout import as_int, check_axis
from kernels_pallas.loops import accumulate_over_k, over_planes
from kernels_pallas.weight_only import KERNEL_DTYPES, scale_table

BLOCK = 4  # weights per Sherry block (one zero, three +-1)
FIELDS = 32  # 5-bit fields per group of five words
WORDS = 5  # uint32 words per group: two of zero positions, three of sign bits
GROUP = BLOCK * FIELDS  # 128 weights per group of five words: 160 / 128 = 1.25 bits per weight

BLOCK_M = 128
BLOCK_N = 256
BLOCK_K = 4096  # K rows per block: block_q = max(8, BLOCK_K // 128) words per plane


def _check_length(size, who: str) -> int:
    """``size`` as an int ``>= 0`` and a multiple of 4, or a ``ValueError`` naming ``who`` and the length."""
    count = as_int(size)
    if count is None or count < 0 or count % BLOCK:
        raise ValueError(f"{who}: length {size!r} along the axis is not a multiple of {BLOCK}; allowed: "
                         f"K = 0, 4, 8, ... (Sherry blocks of {BLOCK} consecutive weights along K)")
    return count


def sherry_packed_size(k: int) -> int:
    """Words that hold ``k`` Sherry weights: ``5 * ceil(k / 128)`` (32 blocks of 4 in five uint32 words), so
    ``32 * sherry_packed_size(k) == 1.25 * k`` bits when ``k % 128 == 0``.

    ``k`` must be a multiple of 4 (Sherry: 1.25-bit ternary with 3:4 sparsity, blocks of 4 along K).
    """
    return WORDS * -(-_check_length(k, "sherry_packed_size") // GROUP)


def sherry_project(w: jax.Array, axis: int = 0) -> jax.Array:
    """The nearest 3:4-sparse ternary pattern of ``w`` per block of 4 along ``axis``, as int8 codes.

    ``c[b, t] = 0`` at ``t = argmin_t |w[b, t]|`` (the first on ties), else ``sign(w[b, t])`` with
    ``sign(0) = +1``, for the blocks ``w[b, 0 .. 3]`` of four consecutive entries along ``axis``. For every
    scale ``a > 0`` this minimises ``sum_t (w[b, t] - a c[b, t])^2`` over the 32 patterns of a block (the
    zeroed entry costs ``w_z^2`` instead of ``(|w_z| - a)^2``, i.e. ``a (a - 2 |w_z|)`` less, most for the
    smallest ``|w_z|``): the projection of Sherry (Sherry: 1.25-bit ternary with 3:4 sparsity; each block of
    four weights along K keeps its three largest magnitudes as signs and drops the smallest). The length
    along ``axis`` must be a multiple of 4 (else ``ValueError``); the result always is a valid pattern
    (a NaN counts as the smallest magnitude).
    """
    w = jnp.asarray(w)
    if not (jnp.issubdtype(w.dtype, jnp.floating) or jnp.issubdtype(w.dtype, jnp.integer)):
        raise ValueError(f"sherry_project: w of dtype {w.dtype}; allowed: a real float (or integer) array")
    axis = check_axis(axis, w.ndim, "sherry_project")
    _check_length(w.shape[axis], "sherry_project")
    return _project(w, axis)


@functools.partial(jax.jit, static_argnums=1)
def _project(w: jax.Array, axis: int) -> jax.Array:  # one compile, not one per eager op
    x = jnp.moveaxis(w, axis, 0)
    blocks = x.reshape(x.shape[0] // BLOCK, BLOCK, *x.shape[1:])
    zero = jnp.argmin(jnp.abs(blocks), axis=1, keepdims=True)
    position = jnp.arange(BLOCK).reshape((1, BLOCK) + (1,) * (x.ndim - 1))
    codes = jnp.where(position == zero, 0, jnp.where(blocks < 0, -1, 1)).astype(jnp.int8)
    return jnp.moveaxis(codes.reshape(x.shape), 0, axis)


def _check_codes(values: np.ndarray) -> None:
    """Concrete codes ``(K, ...)`` that are not 3:4 ternary (each block of 4 along axis 0: one 0, three +-1)
    raise ``ValueError``."""
    bad = (values < -1) | (values > 1)
    if bad.any():
        raise ValueError(f"sherry_pack: code {values[bad].flat[0]} is not ternary; allowed: -1, 0, 1 "
                         "(one 0 and three +-1 in every block of 4 along the axis)")
    blocks = values.reshape(values.shape[0] // BLOCK, BLOCK, int(np.prod(values.shape[1:])))
    zeros = np.sum(blocks == 0, axis=1)
    if (zeros != 1).any():
        b, col = np.argwhere(zeros != 1)[0]
        block = blocks[b, :, col].tolist()
        raise ValueError(f"sherry_pack: block {b} (entries {BLOCK * b} .. {BLOCK * b + BLOCK - 1} along the "
                         f"axis, column {col} of the others flattened) is {block} with {zeros[b, col]} "
                         "zeros; allowed: exactly one 0 and three +-1 per block of 4 (sherry_project gives "
                         "the nearest such pattern)")


def sherry_pack(codes: jax.Array, axis: int = 0) -> jax.Array:
    """Pack 3:4-sparse ternary ``codes`` (int8 ``{-1, 0, 1}``, one 0 per block of 4 along ``axis``) into
    uint32 words along ``axis`` (module docstring): ``5 ceil(K / 128)`` words,
    ``word[q] = sum_{j<16} z[jQ+q] << 2j``, ``word[Q+q] = sum_{j>=16} z[jQ+q] << 2(j-16)``,
    ``word[(2+i)Q+q] = sum_j s_i[jQ+q] << j``, with ``z`` each block's zero position and ``s_i`` the sign bits
    (1 = negative) of its other three codes in order.

    Sherry's storage (Sherry: 1.25-bit ternary with 3:4 sparsity: 32 patterns per block of four, 5 bits,
    1.25 bits per weight). The length along ``axis`` must be a multiple of 4. Concrete codes that are not
    3:4 ternary raise ``ValueError``; traced ones (under ``jit``) cannot be checked and then pack to an
    undefined field of their own block (never touching another block's bits).
    """
    codes = jnp.asarray(codes)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ValueError(f"sherry_pack: codes must have an integer dtype, got {codes.dtype}; allowed: int8 "
                         "(sherry_project's codes), or another integer dtype holding -1, 0, 1")
    axis = check_axis(axis, codes.ndim, "sherry_pack")
    _check_length(codes.shape[axis], "sherry_pack")
    if not isinstance(codes, jax.core.Tracer):
        _check_codes(np.moveaxis(np.asarray(codes), axis, 0))
    return _pack(codes, axis)


@functools.partial(jax.jit, static_argnums=1)
def _pack(codes: jax.Array, axis: int) -> jax.Array:
    x = jnp.moveaxis(codes, axis, 0).astype(jnp.int32)
    length, rest = x.shape[0], x.shape[1:]
    groups = -(-length // GROUP)
    blocks = x.reshape(length // BLOCK, BLOCK, *rest)
    zero = jnp.argmin(jnp.abs(blocks), axis=1)  # (B, ...): the first zero's position
    i = jnp.arange(3).reshape((1, 3) + (1,) * len(rest))
    others = i + (i >= zero[:, None])  # sign bit i: position i before the zero, i + 1 after it
    signs = jnp.take_along_axis(blocks < 0, others, axis=1).astype(jnp.uint32)  # (B, 3, ...)
    pad = [(0, FIELDS * groups - length // BLOCK)] + [(0, 0)] * len(rest)
    zero = jnp.pad(zero.astype(jnp.uint32), pad).reshape(FIELDS, groups, *rest)
    signs = jnp.pad(jnp.moveaxis(signs, 1, 0), [(0, 0), *pad]).reshape(3, FIELDS, groups, *rest)
    expand = (1,) * (len(rest) + 1)
    zshift = (jnp.arange(FIELDS // 2, dtype=jnp.uint32) * 2).reshape((FIELDS // 2, *expand))
    sshift = jnp.arange(FIELDS, dtype=jnp.uint32).reshape((FIELDS, *expand))
    planes = [jnp.sum(zero[:16] << zshift, axis=0, dtype=jnp.uint32),
              jnp.sum(zero[16:] << zshift, axis=0, dtype=jnp.uint32),
              *(jnp.sum(signs[i] << sshift, axis=0, dtype=jnp.uint32) for i in range(3))]
    words = jnp.stack(planes).reshape(WORDS * groups, *rest)
    return jnp.moveaxis(words, 0, axis)


def decode_field(zero_words: jax.Array, sign_words: tuple[jax.Array, jax.Array, jax.Array],
                 j) -> tuple[jax.Array, ...]:
    """Field ``j`` (``0 .. 31``, a Python or traced int) of uint32 words -> the four int32 codes of its
    block, positions ``t = 0 .. 3`` (module docstring): ``zero_words`` the zero-position plane holding field
    ``j`` (``word[q]`` for ``j < 16``, ``word[Q + q]`` otherwise), ``sign_words`` the three sign planes.

    ``z = (zero_words >> 2 (j % 16)) & 3``, ``S = sum_i ((sign_words[i] >> j) & 1) << i``, then
    ``c_t = ((present >> t) & 1) - 2 ((spread >> t) & 1)`` with ``present = 15 ^ (1 << z)`` and
    ``spread = (S & ((1 << z) - 1)) | ((S >> z) << (z + 1))``: shifts and masks on 32-bit integers only
    (Sherry: 1.25-bit ternary with 3:4 sparsity; a block's zero position and the signs of the other three).
    """
    j = jnp.asarray(j).astype(jnp.uint32)
    one = jnp.uint32(1)
    z = ((zero_words >> ((j % 16) * 2)) & jnp.uint32(3)).astype(jnp.int32)
    s = functools.reduce(jnp.bitwise_or, [((w >> j) & one).astype(jnp.int32) << i
                                          for i, w in enumerate(sign_words)])
    spread = (s & ((1 << z) - 1)) | ((s >> z) << (z + 1))
    present = 15 ^ (1 << z)
    return tuple(((present >> t) & 1) - 2 * ((spread >> t) & 1) for t in range(BLOCK))


def sherry_unpack(words: jax.Array, axis: int, size: int) -> jax.Array:
    """Inverse of :func:`sherry_pack`: uint32 ``words`` (``5 Q`` along ``axis``) -> ``size`` int8 codes along
    ``axis``, ``code[4 (j Q + q) + t] = decode_field(word[q or Q + q], word[(2 + i) Q + q], j)[t]``.

    ``size`` must be a multiple of 4 with ``sherry_packed_size(size) == 5 Q``. Every word array decodes to
    valid 3:4 ternary codes (Sherry: 1.25-bit ternary with 3:4 sparsity: any 5-bit field is a pattern), so
    ``sherry_unpack(sherry_pack(c, a), a, K) == c`` for every valid ``c``.
    """
    words = jnp.asarray(words)
    if words.dtype != jnp.uint32:
        raise ValueError(f"sherry_unpack: words must be uint32, got {words.dtype}; allowed: uint32 "
                         "(from sherry_pack)")
    axis = check_axis(axis, words.ndim, "sherry_unpack")
    count = words.shape[axis]
    given, size = size, as_int(size)
    if count % WORDS or size is None or size < 0 or size % BLOCK or WORDS * -(-size // GROUP) != count:
        lo, hi = max(0, GROUP * (count // WORDS - 1) + BLOCK), GROUP * (count // WORDS)
        allowed = (f"a multiple of 4 in {lo} .. {hi}" if count % WORDS == 0
                   else f"none: {count} words are not a multiple of {WORDS}")
        raise ValueError(f"sherry_unpack: size={given!r} does not match {count} words (5 per 128 weights); "
                         f"allowed: {allowed}")
    return _unpack(words, axis, size)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _unpack(words: jax.Array, axis: int, size: int) -> jax.Array:
    groups = words.shape[axis] // WORDS
    w = jnp.moveaxis(words, axis, 0).reshape(WORDS, groups, *words.shape[:axis], *words.shape[axis + 1:])
    j = jnp.arange(FIELDS, dtype=jnp.uint32).reshape((FIELDS,) + (1,) * (w.ndim - 1))
    zero_words = jnp.concatenate([jnp.broadcast_to(w[0], (16, *w.shape[1:])),
                                  jnp.broadcast_to(w[1], (16, *w.shape[1:]))])
    codes = decode_field(zero_words, (w[2][None], w[3][None], w[4][None]), j)  # 4 x (32, Q, ...)
    values = jnp.stack(codes, axis=2).reshape(GROUP * groups, *w.shape[2:])[:size].astype(jnp.int8)
    return jnp.moveaxis(values, 0, axis)


def sherry_dequantize(words: jax.Array, scales: jax.Array, *, k: int) -> jax.Array:
    """The float32 ``(K, N)`` weight ``W[k, n] = c[k, n] * s[g(k), n]`` of Sherry ``words`` (``(5 ceil(K /
    128), N)``, axis 0) with ``(G, N)`` scales, ``g(k) = k // (K / G)`` (Sherry: 1.25-bit ternary with 3:4
    sparsity; a float scale per output channel or group on top of the ternary codes)."""
    codes = sherry_unpack(words, 0, k).astype(jnp.float32)
    groups, n = scales.shape[0], words.shape[1]
    return (codes.reshape(groups, k // groups, n) * scales.reshape(groups, 1, n).astype(jnp.float32)
            ).reshape(k, n)


def sherry_matmul_xla(x: jax.Array, words: jax.Array, scales: jax.Array, *, k: int,
                      group_size: int | None = None) -> jax.Array:
    """The pure-jnp reference ``y[..., n] = sum_k x[..., k] * c[k, n] * s[g(k), n]``, ``g(k) = k //
    group_size``, float32 ``(..., N)``: ``x @ sherry_dequantize(words, scales, k=k)`` with float32
    accumulation.

    ``words``: ``(5 ceil(K / 128), N)`` uint32 from :func:`sherry_pack` (axis 0); ``scales``: float ``(1, N)``
    per output channel or ``(K / group_size, N)`` per group (``group_size=None``: ``K / G`` for ``G`` rows).
    Arguments are assumed checked by :func:`kernels_pallas.sherry_matmul` (Sherry: 1.25-bit ternary with 3:4
    sparsity; the ternary codes' matmul is additions and subtractions of activations, scaled once per
    group).
    """
    n = words.shape[1]
    if k == 0:  # an empty sum
        return jnp.zeros((*x.shape[:-1], n), jnp.float32)
    groups = scales.shape[0] if group_size is None else k // group_size
    scales = jnp.broadcast_to(scales.reshape(scales.shape[0], -1), (groups, n))  # (1, 1), (G, 1, N) too
    w = sherry_dequantize(words, scales, k=k)
    return jax.lax.dot_general(x.astype(jnp.float32), w, (((x.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _kernel(x_ref, w_ref, s_ref, o_ref, *, seg: int | None, block_q: int, k_blocks: int | None,
            unroll: bool):
    """One ``(block_m, block_n)`` output tile; ``k_blocks is None``: one K step of the grid, else a loop.
    ``unroll``: unroll the loop over the 32 fields (compiled kernels; the interpreter keeps the loop)."""
    nseg = 1 if seg is None else block_q // seg

    def block(kb, k0):
        xi = 0 if k_blocks is None else kb  # the K tile of x in the kernel's view
        signs = tuple(w_ref[2 + i, pl.ds(k0, block_q), :] for i in range(3))

        def field(j, acc):  # decode field j in registers and multiply its four positions by x
            codes = decode_field(w_ref[j // 16, pl.ds(k0, block_q), :], signs, j)
            plane = j if s_ref.shape[0] > 1 else 0
            scale = s_ref[plane, pl.ds(0 if seg is None else kb * nseg, nseg), :].astype(jnp.float32)
            if nseg > 1:
                scale = jnp.broadcast_to(scale[:, None, :], (nseg, seg, scale.shape[-1])).reshape(
                    block_q, scale.shape[-1])
            part = jnp.zeros(o_ref.shape, jnp.float32)
            for t, c in enumerate(codes):
                x = x_ref[xi, j, t]
                w = c.astype(jnp.float32) if nseg == 1 else c.astype(jnp.float32) * scale
                part = part + jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)
            return acc + (part * scale if nseg == 1 else part)

        return over_planes(field, FIELDS, jnp.zeros(o_ref.shape, jnp.float32), unroll)

    accumulate_over_k(o_ref, block, k_blocks, block_q)


def sherry_matmul_pallas(x: jax.Array, words: jax.Array, scales: jax.Array, *, interpret: bool = False,
                         k_in_grid: bool = True, block_m: int = BLOCK_M, block_n: int = BLOCK_N,
                         block_k: int = BLOCK_K, unroll: bool | None = None) -> jax.Array:
    """``y[..., n] = sum_k x[..., k] * c[k, n] * s[g(k), n]`` for Sherry ``words`` (``(5 ceil(K / 128), N)``
    uint32, module docstring) and ``(G, N)`` float scales, ``K / G`` a multiple of 4, decoded in the kernel;
    float32 ``(..., N)``. Arguments are assumed checked by :func:`kernels_pallas.sherry_matmul`.

    ``k_in_grid``: accumulate over a K grid axis (TPU, interpret) or loop over K in the kernel (GPU).
    ``block_k``: K rows per block, ``block_q = max(8, block_k // 128)`` words per plane (``128 block_q``
    rows). ``unroll``: unroll the loop over the 32 fields (default: unless ``interpret``). Sherry: 1.25-bit
    ternary with 3:4 sparsity (the fields' zero positions and signs decode with shifts and masks, the dots
    see exact ``{-1, 0, 1}`` codes and the scale multiplies the partial product).
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.dtype not in KERNEL_DTYPES:
        x2 = x2.astype(jnp.float32)
    m, (count, n) = x2.shape[0], words.shape
    if 0 in (m, n, k):  # nothing to tile: an empty sum is 0
        return jnp.zeros((*lead, n), jnp.float32)
    groups = count // WORDS
    pow2 = not k_in_grid  # the GPU (Triton) lowering: power-of-two arrays, dots of 16 or more
    bm = tile(m, block_m, 16 if pow2 or x2.dtype.itemsize == 2 else 8, pow2)
    bn = tile(n, block_n, 128, pow2)
    bq = tile(groups, max(8, block_k // GROUP), 16 if pow2 else 8, pow2)
    mp, np_, qp = round_up(m, bm), round_up(n, bn), round_up(groups, bq)
    # x[m, 4 (j Q + q) + t] -> x5[q // bq, j, t, m, q % bq]: every (field, position) a contiguous block
    x4 = jnp.pad(x2, ((0, mp - m), (0, GROUP * groups - k))).reshape(mp, FIELDS, groups, BLOCK)
    x4 = jnp.pad(x4, ((0, 0), (0, 0), (0, qp - groups), (0, 0))).reshape(mp, FIELDS, qp // bq, bq, BLOCK)
    x5 = x4.transpose(2, 1, 4, 0, 3)
    w = jnp.pad(words.reshape(WORDS, groups, n), ((0, 0), (0, qp - groups), (0, np_ - n)))
    values = jnp.pad(scales.astype(jnp.float32), ((0, 0), (0, np_ - n)))
    table, seg = scale_table(values, planes=FIELDS, words=groups, padded_words=qp, block_words=bq,
                             k=k // BLOCK)
    kernel = functools.partial(_kernel, seg=seg, block_q=bq, k_blocks=None if k_in_grid else qp // bq,
                               unroll=not interpret if unroll is None else unroll)
    if k_in_grid:
        grid = (mp // bm, np_ // bn, qp // bq)
        x_spec = pl.BlockSpec((1, FIELDS, BLOCK, bm, bq), lambda i, j, kb: (kb, 0, 0, i, 0))
        w_spec = pl.BlockSpec((WORDS, bq, bn), lambda i, j, kb: (0, kb, j))
        t_spec = pl.BlockSpec((table.shape[0], table.shape[1], bn), lambda i, j, kb: (0, 0, j))
    else:
        grid = (mp // bm, np_ // bn)
        x_spec = pl.BlockSpec((qp // bq, FIELDS, BLOCK, bm, bq), lambda i, j: (0, 0, 0, i, 0))
        w_spec = pl.BlockSpec((WORDS, qp, bn), lambda i, j: (0, 0, j))
        t_spec = pl.BlockSpec((table.shape[0], table.shape[1], bn), lambda i, j: (0, 0, j))
    o_spec = pl.BlockSpec((bm, bn), lambda i, j, *_: (i, j))
    y = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.float32), grid=grid,
                       in_specs=[x_spec, w_spec, t_spec], out_specs=o_spec, interpret=interpret,
                       compiler_params=compiler_params(len(grid), interpret))(x5, w, table)
    return y[:m, :n].reshape(*lead, n)
