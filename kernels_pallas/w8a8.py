"""Integer products as one Pallas kernel: int8 activation codes times int8 or packed low-bit weight codes.

W8A8 (:func:`int8_dot_pallas`): ``acc[m, n] = sum_k a[m, k] * b[k, n]`` over int8 codes, accumulated in int32
(exact: ``|acc| <= K * 2^14``, no overflow below ``K = 2^17``), then ``y[m, n] = acc[m, n] * sx[m] * sw[n]``
in float32 with per-token activation scales ``sx`` and per-channel weight scales ``sw``: LLM.int8()'s
vector-wise quantization without the outlier split (Dettmers et al., "LLM.int8(): 8-bit Matrix
Multiplication for Transformers at Scale", 2022) and SmoothQuant's W8A8 GEMM (Xiao et al., 2023). The
integer product is the kernel; the rank-1 rescale is an elementwise epilogue that XLA fuses
(:func:`kernels_pallas.reference.group_term`).

Packed weights (:func:`packed_int_matmul_pallas`: W8A8, W4A8, W4A4, W2A8, ternary and binary weights, the
integer GEMMs of QuaRot, Atom and QServe's W4A8): the weight is ``bits``-bit codes ``c`` in the uint32 plane
layout of :mod:`kernels_pallas.layout` (``p = 32 // bits`` planes of ``P = ceil(K / p)`` words; plane ``j``
of word ``w`` holds ``c[j*P + w]``), unpacked in registers as :mod:`kernels_pallas.weight_only` does, and

    y[m, n] = s_x[m] * sum_g s_w[g, n] * (acc_g[m, n] - z[g, n] * r_g[m]),
    acc_g = sum_{k in g} x[m, k] c[k, n],   r_g = sum_{k in g} x[m, k],

with ``G`` groups of ``group_size`` along K and an optional zero point ``z`` (``sum x (c - z) = acc - z r``).
One group (per-channel scales): the kernel sums the whole of K in int32 and the epilogue scales it, as for
int8 weights. Several groups: a K block of a plane splits into segments of ``seg`` words that each lie in one
group (:func:`kernels_pallas.weight_only.scale_table`); each segment's int32 product (exact) takes its
group's scale in float32 and the kernel sums the scaled segments into a float32 output; the per-token
``s_x`` multiplies afterwards. The activations are laid out once per call as ``(p, M, P)`` (plane, row,
word) so each plane multiplies a contiguous block; int8 weights are the case of one plane and no unpacking.

Tiling follows the TPU rules for int8 (blocks ``(32k, 128k)``); M, K (or the words) and N are zero-padded to
block multiples (zero codes add nothing, to the row sums neither) and the result is sliced back. The output
block is the accumulator over the K grid axis (TPU, interpret), or a K loop inside the kernel accumulates it
(GPU). Tested here in interpret mode only; compiled, a segment is one dot, which the GPU lowering wants at
least 16 words wide: ``gcd(P, group_size) >= 16``, as in the usual layouts (group sizes and ``P``
multiples of 16), or whole planes per group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.backends import compiler_params, round_up, tile
from kernels_pallas.layout import decode_fields
from kernels_pallas.loops import accumulate_over_k, over_planes
from kernels_pallas.reference import group_term, int8_fields
from kernels_pallas.weight_only import scale_table

BLOCK_M = 128
BLOCK_N = 256
BLOCK_K = 512  # K rows per block: int8 weights, or max(128, BLOCK_K // (32 // bits)) words


def _kernel(x_ref, w_ref, *rest, bits: int | None, signed: bool, seg: int | None, block_words: int,
            k_blocks: int | None, unroll: bool):
    """One ``(block_m, block_n)`` output tile (module docstring). ``rest``: the scale table, the zero-point
    table (optional) and the output (several groups, float32), or the output alone (int32 sums).
    ``k_blocks is None``: one K step of the grid, else a loop over ``k_blocks`` blocks. ``unroll``: unroll
    the loops over planes and segments (compiled kernels: static shifts and offsets; the interpreter keeps
    the loops, which compile faster)."""
    o_ref, tables = rest[-1], rest[:-1]
    s_ref, z_ref = (*tables, None, None)[:2]
    planes = 1 if bits is None else 32 // bits
    nseg = 1 if seg is None else block_words // seg
    width = block_words // nseg

    def row(ref, j, r):  # (1, block_n): the table row of plane j, segment row r
        return ref[j if ref.shape[0] > 1 else 0, pl.ds(r if ref.shape[1] > 1 else 0, 1), :]

    def piece(j, k0, r):  # plane j's words k0 .. k0 + width (one group): its product, scaled if grouped
        x = x_ref[j, :, pl.ds(k0, width)]
        c = w_ref[pl.ds(k0, width), :]
        if bits is not None:
            field = (c >> jnp.asarray(j * bits).astype(jnp.uint32)) & jnp.uint32((1 << bits) - 1)
            c = decode_fields(field.astype(jnp.int32), bits, signed).astype(jnp.int8)
        acc = jnp.dot(x, c, preferred_element_type=jnp.int32)
        if s_ref is None:
            return acc
        if z_ref is None:
            return group_term(acc, row(s_ref, j, r))
        rowsum = jnp.sum(x.astype(jnp.int32), axis=1, keepdims=True)
        return group_term(acc, row(s_ref, j, r), row(z_ref, j, r), rowsum)

    def block(kb, k0):
        def plane(j, acc):
            if nseg == 1:
                return acc + piece(j, k0, kb)
            if unroll:  # static segment offsets (compiled kernels)
                for t in range(nseg):
                    acc = acc + piece(j, k0 + t * width, kb * nseg + t)
                return acc
            return jax.lax.fori_loop(0, nseg, lambda t, a: a + piece(j, k0 + t * width, kb * nseg + t), acc)

        return over_planes(plane, planes, jnp.zeros(o_ref.shape, o_ref.dtype), unroll)

    accumulate_over_k(o_ref, block, k_blocks, block_words)


def _int_product(x: jax.Array, w: jax.Array, scales: jax.Array | None = None, *, bits: int | None,
                 zero_point: jax.Array | None = None, signed: bool = True, interpret: bool = False,
                 k_in_grid: bool = True, block_m: int = BLOCK_M, block_n: int = BLOCK_N,
                 block_k: int = BLOCK_K, unroll: bool | None = None) -> jax.Array:
    """int8 ``x (..., K)`` times the weight ``w``: int8 codes ``(K, N)`` (``bits=None``) or packed words
    ``(ceil(K / (32 // bits)), N)``. ``scales`` None: the int32 sums ``(..., N)``; else ``(G, N)`` scales
    (and zero points), float32 ``sum_g s_w[g] (acc_g - z[g] r_g)`` ``(..., N)``."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    m, (words, n) = x2.shape[0], w.shape
    dtype = jnp.int32 if scales is None else jnp.float32
    if 0 in (m, n, k):  # nothing to tile: an empty sum is 0
        return jnp.zeros((*lead, n), dtype)
    planes = 1 if bits is None else 32 // bits
    pow2 = not k_in_grid  # the GPU (Triton) lowering: power-of-two arrays
    bm, bn = tile(m, block_m, 32, pow2), tile(n, block_n, 128, pow2)
    if bits is None:
        bw = tile(k, block_k, 128, pow2)
    else:
        bw = tile(words, max(128, block_k // planes), 16 if pow2 else 8, pow2)
    mp, np_, wp = round_up(m, bm), round_up(n, bn), round_up(words, bw)
    x3 = jnp.pad(x2, ((0, mp - m), (0, planes * words - k))).reshape(mp, planes, words).transpose(1, 0, 2)
    x3 = jnp.pad(x3, ((0, 0), (0, 0), (0, wp - words)))
    w2 = jnp.pad(w, ((0, wp - words), (0, np_ - n)))
    tables, seg = [], None
    if scales is not None:
        tables = [scales] if zero_point is None else [scales, zero_point]
        tables = [jnp.pad(t.astype(jnp.float32), ((0, 0), (0, np_ - n))) for t in tables]
        tables, segs = zip(*(scale_table(t, planes=planes, words=words, padded_words=wp, block_words=bw, k=k)
                             for t in tables), strict=True)
        seg = segs[0]
    kernel = functools.partial(_kernel, bits=bits, signed=signed, seg=seg, block_words=bw,
                               k_blocks=None if k_in_grid else wp // bw,
                               unroll=not interpret if unroll is None else unroll)
    if k_in_grid:
        grid = (mp // bm, np_ // bn, wp // bw)
        x_spec = pl.BlockSpec((planes, bm, bw), lambda i, j, kb: (0, i, kb))
        w_spec = pl.BlockSpec((bw, bn), lambda i, j, kb: (kb, j))
        t_specs = [pl.BlockSpec((t.shape[0], t.shape[1], bn), lambda i, j, kb: (0, 0, j)) for t in tables]
        o_spec = pl.BlockSpec((bm, bn), lambda i, j, kb: (i, j))
    else:
        grid = (mp // bm, np_ // bn)
        x_spec = pl.BlockSpec((planes, bm, wp), lambda i, j: (0, i, 0))
        w_spec = pl.BlockSpec((wp, bn), lambda i, j: (0, j))
        t_specs = [pl.BlockSpec((t.shape[0], t.shape[1], bn), lambda i, j: (0, 0, j)) for t in tables]
        o_spec = pl.BlockSpec((bm, bn), lambda i, j: (i, j))
    y = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((mp, np_), dtype), grid=grid,
                       in_specs=[x_spec, w_spec, *t_specs], out_specs=o_spec, interpret=interpret,
                       compiler_params=compiler_params(len(grid), interpret))(x3, w2, *tables)
    return y[:m, :n].reshape(*lead, n)


def int8_dot_pallas(a: jax.Array, b: jax.Array, *, interpret: bool = False, k_in_grid: bool = True,
                    block_m: int = BLOCK_M, block_n: int = BLOCK_N, block_k: int = BLOCK_K) -> jax.Array:
    """:func:`int8_dot_xla` as a Pallas kernel (module docstring): int32 ``(..., N)``, equal bit for bit."""
    return _int_product(a, b, bits=None, interpret=interpret, k_in_grid=k_in_grid, block_m=block_m,
                        block_n=block_n, block_k=block_k)


def packed_int_matmul_pallas(x_codes: jax.Array, x_scale: jax.Array, w_packed: jax.Array,
                             w_scales: jax.Array, zero_point: jax.Array | None = None, *, bits: int,
                             signed: bool = True, **options) -> jax.Array:
    """:func:`kernels_pallas.reference.packed_int_matmul_xla` with the integer product as the Pallas kernel
    (module docstring), float32 ``(..., N)``. Arguments are assumed checked by
    :func:`kernels_pallas.packed_int_matmul` (``w_scales``/``zero_point`` as ``(G, N)`` matrices, ``x_scale``
    ``(..., 1)`` or ``()``); ``options``: ``interpret``, ``k_in_grid``, ``block_m``, ``block_n``,
    ``block_k``, ``unroll`` (unroll the loop over planes; default: unless ``interpret``)."""
    signed, zero_point = int8_fields(bits, signed, zero_point, w_scales)
    if w_scales.shape[0] == 1:  # one group: the exact int32 sum over K, scaled once
        acc = _int_product(x_codes, w_packed, bits=bits, signed=signed, **options)
        if zero_point is None:
            return x_scale.astype(jnp.float32) * group_term(acc, w_scales[0])
        rowsum = jnp.sum(x_codes, axis=-1, keepdims=True, dtype=jnp.int32)
        return x_scale.astype(jnp.float32) * group_term(acc, w_scales[0], zero_point[0], rowsum)
    y = _int_product(x_codes, w_packed, w_scales, bits=bits, zero_point=zero_point, signed=signed, **options)
    return x_scale.astype(jnp.float32) * y
