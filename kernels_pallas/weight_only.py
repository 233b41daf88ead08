"""The weight-only packed matmul as a Pallas kernel: float activations times packed low-bit weights.

``y[m, n] = sum_k x[m, k] * (c[k, n] - z[g(k), n]) * s[g(k), n]``, ``g(k) = k // group_size``, with the codes
``c`` read straight from the uint32 plane layout of :mod:`kernels_pallas.layout`: with ``p = 32 // bits``
codes per word and ``P = ceil(K / p)`` words, bits ``j*bits .. j*bits + bits - 1`` of word ``w`` hold
``c[j*P + w]``.
The kernel never materialises the float weight in memory: each grid step loads a ``(block_words, block_n)``
tile of words, and for each plane ``j`` unpacks it in registers (``(word >> j*bits) & (2^bits - 1)``, 32-bit
integer math), decodes the stored field (offset binary for signed codes, ``{0, 1} -> {-1, +1}`` for binary)
and multiplies it against the matching contiguous slice ``x[:, j*P + w0 : j*P + w0 + block_words]``. To make
that slice a block, the activations are laid out as ``(p, M, P)`` (plane, row, word) once per call; the
layout needs no lane shuffles, the idea of Marlin's and BitBLAS's offline weight layouts (Frantar et al.,
"MARLIN: Mixed-Precision Auto-Regressive Parallel Inference on Large Language Models", 2024; Wang et al.,
"Ladder / BitBLAS", OSDI 2024).

Scales. Every run of ``seg`` consecutive words of one plane lies inside one scale group when ``seg`` divides
both ``P`` and ``group_size``, so the scales are regrouped once per call into a ``(p, P_pad / seg, N)``
table of per-segment rows (the same number of rows as the ``(K / group_size, N)`` scales when
``group_size`` divides ``P``). A K block whose planes each hold one segment scales the block's partial
product (exact integer-valued codes in the dot, the scale applied in float32 after it); otherwise each
segment's rows of the weight tile are scaled before the dot.

Tiling. Blocks obey the TPU rules (the last two block dimensions are multiples of 8 and 128 or span the
whole array); M, N and P are zero-padded to block multiples and the result is sliced back. Padded words
meet zero activations, so they add nothing. Accumulation is float32: over the K grid axis into the float32
output block (TPU, interpret mode), or over a K loop inside the kernel (GPU, whose grid programs run in
parallel).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels_pallas.backends import compiler_params, round_up, tile
from kernels_pallas.layout import decode_element
from kernels_pallas.loops import accumulate_over_k, over_planes

BLOCK_M = 128
BLOCK_N = 256
BLOCK_K = 2048  # K rows per block: block_words = max(128, BLOCK_K // (32 // bits))
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)  # other activations run as float32


def scale_table(values: jax.Array, *, planes: int, words: int, padded_words: int, block_words: int,
                k: int) -> tuple[jax.Array, int | None]:
    """``(G, N)`` per-group values -> ``(table, seg)``: the rows the kernel reads per plane and segment.

    ``G == 1``: ``(1, 1, N)``, one row for every plane. ``group_size`` a multiple of ``P``: ``(p, 1, N)``, one
    row per plane. Otherwise ``seg = gcd(P, group_size, block_words)`` and ``table[j, t] = values[(j*P +
    t*seg) // group_size]`` of shape ``(p, padded_words / seg, N)`` (group indices past the last group,
    reached only by padding, are clamped).
    """
    groups = values.shape[0]
    if groups == 1:
        return values[None], None
    group_size = k // groups
    if group_size % words == 0:
        rows = np.minimum(np.arange(planes) * words // group_size, groups - 1)
        return values[rows][:, None, :], None
    seg = math.gcd(math.gcd(words, group_size), block_words)
    starts = np.arange(planes)[:, None] * words + np.arange(padded_words // seg)[None, :] * seg
    return values[np.minimum(starts // group_size, groups - 1)], seg


def _kernel(x_ref, w_ref, s_ref, *rest, bits: int, signed: bool, seg: int | None, block_words: int,
            k_blocks: int | None, unroll: bool, element: str = "int"):
    """One ``(block_m, block_n)`` output tile; ``k_blocks is None``: one K step of the grid, else a loop.
    ``unroll``: unroll the loop over the ``32 // bits`` planes (compiled kernels; the interpreter keeps the
    loop, which compiles faster)."""
    z_ref, o_ref = rest if len(rest) == 2 else (None, rest[0])
    planes, mask = 32 // bits, (1 << bits) - 1
    nseg = 1 if seg is None else block_words // seg

    def rows(ref, j, kb):  # (nseg, block_n) scale or zero-point rows of plane j in K block kb
        plane = j if ref.shape[0] > 1 else 0
        start = 0 if seg is None else kb * nseg
        return ref[plane, pl.ds(start, nseg), :].astype(jnp.float32)

    def block(kb, k0):
        words = w_ref[pl.ds(k0, block_words), :]

        def plane(j, acc):  # unpack plane j in registers and multiply it by its slice of x
            x = x_ref[j, :, pl.ds(k0, block_words)]
            field = (words >> jnp.asarray(j * bits).astype(jnp.uint32)) & jnp.uint32(mask)
            w = decode_element(field.astype(jnp.int32), bits, signed, element)
            scale = rows(s_ref, j, kb)
            if z_ref is not None:
                w = w - _repeat(rows(z_ref, j, kb), block_words)
            if nseg == 1:  # one scale row for the whole tile: scale the partial product
                return acc + jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32) * scale
            w = w * _repeat(scale, block_words)
            return acc + jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)

        return over_planes(plane, planes, jnp.zeros(o_ref.shape, jnp.float32), unroll)

    accumulate_over_k(o_ref, block, k_blocks, block_words)


def _repeat(rows: jax.Array, length: int) -> jax.Array:
    """``(r, n)`` rows -> ``(length, n)``, each row repeated ``length / r`` times (row-wise broadcast)."""
    r, n = rows.shape
    if r == 1:
        return rows
    return jnp.broadcast_to(rows[:, None, :], (r, length // r, n)).reshape(length, n)


def packed_matmul_pallas(x: jax.Array, w_packed: jax.Array, scales: jax.Array, *, bits: int,
                         zero_point: jax.Array | None = None, signed: bool = True, element: str = "int",
                         interpret: bool = False,
                         k_in_grid: bool = True, block_m: int = BLOCK_M, block_n: int = BLOCK_N,
                         block_k: int = BLOCK_K, unroll: bool | None = None) -> jax.Array:
    """``x (..., K) @ W`` for the packed ``(ceil(K / (32 // bits)), N)`` uint32 ``w_packed`` (module
    docstring), float32 ``(..., N)``. Arguments are assumed checked by :func:`kernels_pallas.packed_matmul`.

    ``k_in_grid``: accumulate over a K grid axis (TPU, interpret) or loop over K in the kernel (GPU).
    ``block_k``: K rows per block; a block holds at most ``max(128, block_k // (32 // bits))`` words.
    ``unroll``: unroll the loop over planes (default: unless ``interpret``).
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.dtype not in KERNEL_DTYPES:
        x2 = x2.astype(jnp.float32)
    m, (words, n) = x2.shape[0], w_packed.shape
    if 0 in (m, n, k):  # nothing to tile: an empty sum is 0
        return jnp.zeros((*lead, n), jnp.float32)
    planes = 32 // bits
    pow2 = not k_in_grid  # the GPU (Triton) lowering: power-of-two arrays, dots of 16 or more
    bm = tile(m, block_m, 16 if pow2 or x2.dtype.itemsize == 2 else 8, pow2)
    bn = tile(n, block_n, 128, pow2)
    bw = tile(words, max(128, block_k // planes), 16 if pow2 else 8, pow2)
    mp, np_, wp = round_up(m, bm), round_up(n, bn), round_up(words, bw)
    x3 = jnp.pad(x2, ((0, mp - m), (0, planes * words - k))).reshape(mp, planes, words).transpose(1, 0, 2)
    x3 = jnp.pad(x3, ((0, 0), (0, 0), (0, wp - words)))
    w = jnp.pad(w_packed, ((0, wp - words), (0, np_ - n)))
    tables = [scales] if zero_point is None else [scales, zero_point]
    tables = [jnp.pad(t.astype(jnp.float32), ((0, 0), (0, np_ - n))) for t in tables]
    tables, segs = zip(*(scale_table(t, planes=planes, words=words, padded_words=wp, block_words=bw, k=k)
                         for t in tables), strict=True)
    kernel = functools.partial(_kernel, bits=bits, signed=signed, element=element, seg=segs[0],
                               block_words=bw,
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
    y = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.float32), grid=grid,
                       in_specs=[x_spec, w_spec, *t_specs], out_specs=o_spec, interpret=interpret,
                       compiler_params=compiler_params(len(grid), interpret))(x3, w, *tables)
    return y[:m, :n].reshape(*lead, n)

